//! Wall-clock timestamps as the ledger stores them.

/// Now, as RFC 3339 UTC with millisecond precision (e.g.
/// `2026-11-27T11:30:27.123Z`): readable in SQL and sortable as text.
pub fn now_rfc3339() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    #[test]
    fn format_is_utc_with_millis() {
        let now = super::now_rfc3339();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'));
    }
}
