//! apex-store: the ledger backends behind apex-core's [`Store`] trait, and the
//! readers for the files users hand to Apex.
//!
//! # Overview
//!
//! - [`SqliteStore`]: the embedded default, a single file in WAL mode whose
//!   tables live in the `apex_audition` schema (attached database), so the
//!   seed's monitoring SQL runs verbatim.
//! - [`DatabaseUrl`] and [`open_store`]: choose a backend from
//!   `--database-url` / `APEX_DATABASE_URL`.
//! - [`files`]: read conditions files and context package directories.
//! - [`StoreError`]: this crate's error; it converts into [`apex_core::Error`].
//!
//! # Example
//!
//! ```
//! use apex_core::{ContextPackage, Store};
//! use apex_store::SqliteStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteStore::open_in_memory()?;
//! let package = ContextPackage::new("ctx-01", None, "A document.".into(), "Summarise it.".into())?;
//! let report = store.ingest_packages(&[package.clone()]).await?;
//! assert_eq!(report.added, vec!["ctx-01".to_string()]);
//! let again = store.ingest_packages(&[package]).await?;
//! assert_eq!(again.unchanged.len(), 1);
//! let rows = store.query_read_only("SELECT COUNT(*) AS n FROM apex_audition.context_packages").await?;
//! assert_eq!(rows.rows[0][0].to_string(), "1");
//! # Ok(())
//! # }
//! ```
//!
//! [`Store`]: apex_core::Store

mod error;
pub mod files;
mod ledger;
mod postgres;
mod sql;
mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

pub use error::StoreError;
pub use postgres::PostgresStore;
pub use sqlite::{SCHEMA_VERSION, SqliteStore};

use apex_core::Store;

/// The default ledger location.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://apex.db";

/// A parsed `--database-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://PATH` (relative to the working directory; `sqlite:///abs`
    /// for an absolute path) or `sqlite::memory:`.
    Sqlite(Option<PathBuf>),
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (or `postgresql://`).
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses a URL, naming the fix when it is not one Apex understands.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |problem: &str| StoreError::BadUrl {
            url: redact_url(url),
            problem: problem.to_owned(),
        };
        if url == "sqlite::memory:" {
            return Ok(Self::Sqlite(None));
        }
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(bad("no file path; use sqlite://apex.db"));
            }
            return Ok(Self::Sqlite(Some(PathBuf::from(path))));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        Err(bad(
            "unknown scheme; use sqlite://PATH (e.g. sqlite://apex.db)",
        ))
    }
}

/// Exact `o200k_base` (cacheable prefix, instruction) counts for the
/// packages an ingest will store: those whose version is not already the
/// current one (re-ingesting unchanged 128K-token contexts should cost
/// nothing). Both backends use this.
pub(crate) fn o200k_for_new(
    packages: &[apex_core::ContextPackage],
    current: &std::collections::HashMap<String, String>,
) -> Vec<Option<(u64, u64)>> {
    packages
        .iter()
        .map(|p| {
            (current.get(p.id()).map(String::as_str) != Some(p.version()))
                .then(|| apex_core::tokens::Tokenizer::O200k.split(p))
        })
        .collect()
}

/// Hides a password in a URL before it is shown anywhere.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// `sqlite://PATH?busy_timeout_ms=N`: how long a statement waits for
/// another writer's lock (default 30 s).
fn sqlite_busy_timeout(url: &str) -> Result<(&str, std::time::Duration), StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url, sqlite::DEFAULT_BUSY_TIMEOUT));
    };
    let bad = |problem: &str| StoreError::BadUrl {
        url: redact_url(url),
        problem: problem.to_owned(),
    };
    let ms = query
        .strip_prefix("busy_timeout_ms=")
        .ok_or_else(|| bad("the only SQLite option is ?busy_timeout_ms=N"))?
        .parse::<u64>()
        .map_err(|_| bad("busy_timeout_ms takes whole milliseconds, e.g. ?busy_timeout_ms=5000"))?;
    Ok((base, std::time::Duration::from_millis(ms)))
}

/// Opens the store a URL names, applying migrations.
pub async fn open_store(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let (url, busy_timeout) = if url.starts_with("sqlite") {
        sqlite_busy_timeout(url)?
    } else {
        (url, sqlite::DEFAULT_BUSY_TIMEOUT)
    };
    match DatabaseUrl::parse(url)? {
        DatabaseUrl::Sqlite(None) => Ok(Arc::new(SqliteStore::open_in_memory()?)),
        DatabaseUrl::Sqlite(Some(path)) => {
            let store =
                tokio::task::spawn_blocking(move || SqliteStore::open_waiting(&path, busy_timeout))
                    .await??;
            Ok(Arc::new(store))
        }
        DatabaseUrl::Postgres(url) => Ok(Arc::new(PostgresStore::open(&url).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            DatabaseUrl::parse("sqlite://apex.db").unwrap(),
            DatabaseUrl::Sqlite(Some("apex.db".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:///tmp/x.db").unwrap(),
            DatabaseUrl::Sqlite(Some("/tmp/x.db".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite::memory:").unwrap(),
            DatabaseUrl::Sqlite(None)
        );
        assert!(
            DatabaseUrl::parse("mysql://x")
                .unwrap_err()
                .to_string()
                .contains("unknown scheme")
        );
        assert!(DatabaseUrl::parse("sqlite://").is_err());
    }

    #[test]
    fn only_new_versions_are_counted() {
        let same =
            apex_core::ContextPackage::new("a", None, "hello world".into(), "go".into()).unwrap();
        let changed =
            apex_core::ContextPackage::new("b", None, "new text".into(), "go".into()).unwrap();
        let current = std::collections::HashMap::from([
            ("a".to_owned(), same.version().to_owned()),
            ("b".to_owned(), "an older version".to_owned()),
        ]);
        assert_eq!(
            o200k_for_new(&[same, changed], &current),
            vec![None, Some((2, 1))]
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }
}
