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
