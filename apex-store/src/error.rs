//! The one error type of apex-store.

/// Failures of the store backends and file loaders.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A `--database-url` that names no supported backend.
    #[error("bad database URL `{url}`: {problem}")]
    BadUrl {
        /// The URL as given (it holds no secret for SQLite).
        url: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// The database file could not be opened or created.
    #[error("cannot open SQLite database `{path}`: {cause}; {hint}")]
    Open {
        /// The file path.
        path: String,
        /// SQLite's error (shown in the message, not as a source, so the
        /// one-line error does not repeat it).
        cause: rusqlite::Error,
        /// How to fix it.
        hint: &'static str,
    },
    /// The database was written by a newer Apex.
    #[error(
        "the ledger schema is version {found}, newer than this apex (up to {known}); upgrade apex"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// Any other SQLite failure.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL could not be reached or used.
    #[error("{0}")]
    Postgres(String),
    /// The ledger's writer thread could not start.
    #[error("cannot start the ledger writer thread: {0}")]
    Thread(std::io::Error),
    /// A worker thread failed.
    #[error("store worker failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl From<StoreError> for apex_core::Error {
    fn from(error: StoreError) -> Self {
        // The message already carries the cause; a source would print it twice.
        apex_core::Error::store_msg(error.to_string())
    }
}
