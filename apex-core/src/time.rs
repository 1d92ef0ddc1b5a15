//! Wall-clock timestamps as the ledger stores them, and duration arithmetic
//! that saturates instead of panicking on huge user-given values
//! (`--claim-timeout`, `--time-scale`).

use std::time::{Duration, Instant};

/// Now, as RFC 3339 UTC with millisecond precision (e.g.
/// `2026-11-27T11:30:27.123Z`): readable in SQL and sortable as text.
pub fn now_rfc3339() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// The RFC 3339 instant `age` ago (the oldest time a live heartbeat may
/// carry); the beginning of time when `age` reaches past it.
pub fn rfc3339_ago(age: Duration) -> String {
    let ago = jiff::SignedDuration::try_from(age)
        .ok()
        .and_then(|age| jiff::Timestamp::now().checked_sub(age).ok())
        .unwrap_or(jiff::Timestamp::MIN);
    format!("{ago:.3}")
}

/// Longer than any run: what "never" saturates to.
pub const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `duration × factor`, saturating at [`FAR_FUTURE`] (and 0 for a factor
/// that is not a positive number) instead of panicking.
pub fn scaled(duration: Duration, factor: f64) -> Duration {
    let secs = duration.as_secs_f64() * factor;
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs)
        .unwrap_or(FAR_FUTURE)
        .min(FAR_FUTURE)
}

/// `at + duration`, saturating at `at` + [`FAR_FUTURE`].
pub fn later(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration.min(FAR_FUTURE))
        .unwrap_or_else(|| at + Duration::from_secs(24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_utc_with_millis() {
        let now = super::now_rfc3339();
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'));
    }

    #[test]
    fn huge_values_saturate_instead_of_panicking() {
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(scaled(huge, 1e300), FAR_FUTURE);
        assert_eq!(scaled(Duration::from_secs(60), f64::MAX), FAR_FUTURE);
        assert_eq!(
            scaled(Duration::from_secs(60), 0.5),
            Duration::from_secs(30)
        );
        assert_eq!(scaled(Duration::from_secs(60), f64::NAN), Duration::ZERO);
        let now = Instant::now();
        assert!(later(now, huge) > now);
        assert!(rfc3339_ago(huge).starts_with('-'), "{}", rfc3339_ago(huge));
        assert!(rfc3339_ago(Duration::from_secs(1)) < now_rfc3339());
    }
}
