//! Plain-text tables for terminal output.

use apex_core::QueryResult;

/// Renders rows as an aligned table with a header rule. Cells are shown in
/// full (nothing truncated); line breaks inside a cell are shown as `\n`.
pub fn render(columns: &[String], rows: &[Vec<String>]) -> String {
    debug_assert!(
        rows.iter().all(|r| r.len() == columns.len()),
        "a row does not match the header"
    );
    let clean = |s: &str| s.replace('\r', "\\r").replace('\n', "\\n");
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            if i + 1 < cells.len() {
                out.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count()));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(columns);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(&rule));
    for row in &rows {
        out.push_str(&line(row));
    }
    out.push_str(&format!(
        "({} row{})\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    ));
    out
}

/// Renders a query result.
pub fn render_query(result: &QueryResult) -> String {
    let rows: Vec<Vec<String>> = result
        .rows
        .iter()
        .map(|r| r.iter().map(ToString::to_string).collect())
        .collect();
    render(&result.columns, &rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligns_columns() {
        let out = super::render(
            &["status".into(), "count".into()],
            &[
                vec!["pending".into(), "9".into()],
                vec!["a\nb".into(), "10".into()],
            ],
        );
        assert_eq!(
            out,
            "status   count\n-------  -----\npending  9\na\\nb     10\n(2 rows)\n"
        );
    }
}
