//! What both backends share below the ledger's logic: statements written
//! once (SQLite's `?N` placeholders, rewritten to `$N` for PostgreSQL),
//! parameters as [`SqlValue`]s, and result rows as [`Record`]s read by
//! column name with typed, checked getters (never by position, never a
//! panic on a surprising value).

use std::sync::OnceLock;

use apex_core::{Error, SqlValue};

type CoreResult<T> = apex_core::Result<T>;

/// One SQL statement, written once for both engines.
pub(crate) struct Statement {
    text: &'static str,
    postgres: OnceLock<String>,
}

impl Statement {
    /// A statement with SQLite-style `?N` placeholders.
    pub(crate) const fn new(text: &'static str) -> Self {
        Self {
            text,
            postgres: OnceLock::new(),
        }
    }

    /// The text for SQLite.
    pub(crate) fn sqlite(&self) -> &'static str {
        self.text
    }

    /// The text for PostgreSQL: `?N` becomes `$N` (outside quotes).
    pub(crate) fn postgres(&self) -> &str {
        self.postgres.get_or_init(|| dollar_placeholders(self.text))
    }
}

fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted && chars.peek().is_some_and(char::is_ascii_digit) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

/// Converts a Rust value into a statement parameter.
pub(crate) trait IntoParam {
    fn param(self) -> SqlValue;
}

impl IntoParam for &str {
    fn param(self) -> SqlValue {
        SqlValue::Text(self.to_owned())
    }
}
impl IntoParam for String {
    fn param(self) -> SqlValue {
        SqlValue::Text(self)
    }
}
impl IntoParam for &String {
    fn param(self) -> SqlValue {
        SqlValue::Text(self.clone())
    }
}
impl IntoParam for i64 {
    fn param(self) -> SqlValue {
        SqlValue::Integer(self)
    }
}
impl IntoParam for u32 {
    fn param(self) -> SqlValue {
        SqlValue::Integer(i64::from(self))
    }
}
impl IntoParam for u64 {
    fn param(self) -> SqlValue {
        SqlValue::Integer(i64::try_from(self).unwrap_or(i64::MAX))
    }
}
impl IntoParam for usize {
    fn param(self) -> SqlValue {
        SqlValue::Integer(i64::try_from(self).unwrap_or(i64::MAX))
    }
}
impl IntoParam for f64 {
    fn param(self) -> SqlValue {
        SqlValue::Real(self)
    }
}
impl IntoParam for bool {
    fn param(self) -> SqlValue {
        SqlValue::Bool(self)
    }
}
impl<T: IntoParam> IntoParam for Option<T> {
    fn param(self) -> SqlValue {
        self.map_or(SqlValue::Null, IntoParam::param)
    }
}
impl<T: IntoParam + Clone> IntoParam for &Option<T> {
    fn param(self) -> SqlValue {
        self.clone().map_or(SqlValue::Null, IntoParam::param)
    }
}

/// A parameter list: `params![a, b, c]`.
macro_rules! params {
    () => {
        &[] as &[apex_core::SqlValue]
    };
    ($($value:expr),+ $(,)?) => {
        &[$($crate::sql::IntoParam::param($value)),*][..]
    };
}
pub(crate) use params;

/// One result row, by column name.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub columns: std::sync::Arc<[String]>,
    pub values: Vec<SqlValue>,
}

fn bad(column: &str, want: &str, got: &SqlValue) -> Error {
    Error::Corrupt(format!(
        "column `{column}` holds {got:?} where the ledger keeps {want}; was it edited by hand?"
    ))
}

impl Record {
    fn value(&self, column: &str) -> CoreResult<&SqlValue> {
        self.columns
            .iter()
            .position(|c| c == column)
            .map(|i| &self.values[i])
            .ok_or_else(|| Error::Corrupt(format!("the ledger returned no column `{column}`")))
    }

    /// Text that may be NULL.
    pub fn opt_text(&self, column: &str) -> CoreResult<Option<String>> {
        match self.value(column)? {
            SqlValue::Null => Ok(None),
            SqlValue::Text(t) => Ok(Some(t.clone())),
            other => Err(bad(column, "text", other)),
        }
    }

    /// Text.
    pub fn text(&self, column: &str) -> CoreResult<String> {
        self.opt_text(column)?
            .ok_or_else(|| bad(column, "text", &SqlValue::Null))
    }

    /// An integer that may be NULL.
    pub fn opt_i64(&self, column: &str) -> CoreResult<Option<i64>> {
        match self.value(column)? {
            SqlValue::Null => Ok(None),
            SqlValue::Integer(i) => Ok(Some(*i)),
            other => Err(bad(column, "an integer", other)),
        }
    }

    /// An integer.
    pub fn i64(&self, column: &str) -> CoreResult<i64> {
        self.opt_i64(column)?
            .ok_or_else(|| bad(column, "an integer", &SqlValue::Null))
    }

    /// A count or size that may be NULL.
    pub fn opt_u64(&self, column: &str) -> CoreResult<Option<u64>> {
        self.opt_i64(column)?
            .map(|i| u64::try_from(i).map_err(|_| bad(column, "a count", &SqlValue::Integer(i))))
            .transpose()
    }

    /// A count or size.
    pub fn u64(&self, column: &str) -> CoreResult<u64> {
        self.opt_u64(column)?
            .ok_or_else(|| bad(column, "a count", &SqlValue::Null))
    }

    /// A small count (attempts, indexes, max tokens).
    pub fn u32(&self, column: &str) -> CoreResult<u32> {
        let i = self.i64(column)?;
        u32::try_from(i).map_err(|_| bad(column, "a small count", &SqlValue::Integer(i)))
    }

    /// A number that may be NULL (integers are read as numbers too).
    pub fn opt_f64(&self, column: &str) -> CoreResult<Option<f64>> {
        match self.value(column)? {
            SqlValue::Null => Ok(None),
            SqlValue::Real(r) => Ok(Some(*r)),
            SqlValue::Integer(i) => Ok(Some(*i as f64)),
            other => Err(bad(column, "a number", other)),
        }
    }

    /// A number.
    pub fn f64(&self, column: &str) -> CoreResult<f64> {
        self.opt_f64(column)?
            .ok_or_else(|| bad(column, "a number", &SqlValue::Null))
    }

    /// A boolean (PostgreSQL BOOLEAN, SQLite 0/1).
    pub fn bool(&self, column: &str) -> CoreResult<bool> {
        match self.value(column)? {
            SqlValue::Bool(b) => Ok(*b),
            SqlValue::Integer(0) => Ok(false),
            SqlValue::Integer(1) => Ok(true),
            other => Err(bad(column, "a boolean", other)),
        }
    }
}

/// Runs a future that never waits (SQLite work, done on the calling
/// thread) to completion.
pub(crate) fn run_now<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => unreachable!("SQLite ledger work never waits"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            dollar_placeholders("SELECT '?1', x FROM t WHERE a = ?1 AND b = ?12 AND c IS NULL"),
            "SELECT '?1', x FROM t WHERE a = $1 AND b = $12 AND c IS NULL"
        );
    }

    #[test]
    fn getters_check_types_instead_of_panicking() {
        let record = Record {
            columns: vec!["n".to_owned(), "t".to_owned(), "b".to_owned()].into(),
            values: vec![
                SqlValue::Integer(-1),
                SqlValue::Text("x".into()),
                SqlValue::Integer(1),
            ],
        };
        assert_eq!(record.i64("n").unwrap(), -1);
        assert!(
            record
                .u64("n")
                .unwrap_err()
                .to_string()
                .contains("edited by hand")
        );
        assert!(record.i64("t").is_err());
        assert!(record.text("missing").is_err());
        assert!(record.bool("b").unwrap());
        assert_eq!(record.opt_f64("n").unwrap(), Some(-1.0));
    }

    #[test]
    fn futures_that_never_wait_run_now() {
        assert_eq!(run_now(async { 7 }), 7);
    }
}
