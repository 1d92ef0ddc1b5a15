//! The two backends the conformance suite runs against.

use std::sync::Arc;

use apex_core::Store;
use apex_store::{PostgresStore, SqliteStore};

/// Which backend a conformance case runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// A fresh, empty ledger.
    pub(crate) async fn open(self) -> Arc<dyn Store> {
        match self {
            Self::Sqlite => Arc::new(SqliteStore::open_in_memory().unwrap()),
            Self::Postgres => Arc::new(
                PostgresStore::open(&fresh_postgres_database().await)
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            ),
        }
    }
}

/// Direct access to a ledger's tables, to edit rows as a person with a SQL
/// client could.
pub(crate) enum Raw {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Raw {
    /// Runs `sql` (tables named without the `apex_audition.` schema).
    pub(crate) async fn exec(&self, sql: &str) {
        match self {
            Self::Sqlite(dir) => {
                let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Self::Postgres(url) => {
                let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("SET search_path = apex_audition; {sql}"))
                    .await
                    .unwrap();
            }
        }
    }
}

impl Backend {
    /// A fresh ledger, and direct access to its tables.
    pub(crate) async fn open_raw(self) -> (Arc<dyn Store>, Raw) {
        match self {
            Self::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let store = SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
                (Arc::new(store), Raw::Sqlite(dir))
            }
            Self::Postgres => {
                let url = fresh_postgres_database().await;
                let store = PostgresStore::open(&url)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                (Arc::new(store), Raw::Postgres(url))
            }
        }
    }
}

/// Creates a new database on the server named by `APEX_TEST_PG_URL` and
/// returns its URL, so every case starts from an empty `apex_audition`.
pub(crate) async fn fresh_postgres_database() -> String {
    let base = std::env::var("APEX_TEST_PG_URL").expect("APEX_TEST_PG_URL names the test server");
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let name = format!("apex_t_{}", uuid::Uuid::now_v7().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').expect("a database in the URL");
    format!("{prefix}/{name}")
}

/// Runs one async case against both backends. The PostgreSQL half is
/// ignored, with the reason shown, when no server is named.
macro_rules! conformance {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(crate::backends::Backend::Sqlite).await;
            }

            #[tokio::test]
            #[cfg_attr(not(pg_tests), ignore = "no PostgreSQL server: run scripts/test.sh, which starts one (or set APEX_TEST_PG=1 and APEX_TEST_PG_URL)")]
            async fn postgres() {
                super::$name(crate::backends::Backend::Postgres).await;
            }
        }
    };
}

pub(crate) use conformance;
