//! The PostgreSQL backend: the same `apex_audition` schema and semantics as
//! SQLite, over a pool of tokio-postgres connections.

use apex_core::run::AttemptEnd;
use apex_core::run::{BatchRecord, BatchState};
use apex_core::store::{ConditionInfo, ConditionUsage, PacingShare};
use apex_core::time::now_rfc3339;
use apex_core::{
    AttemptRow, Claim, Condition, ContextPackage, Error, ErrorRow, GenerationRow, IngestReport,
    NewRun, PackageRef, Plan, QueryResult, RegisterReport, RunId, RunInfo, RunState, SqlValue,
    StatusRow, Store,
};
use async_trait::async_trait;
use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::GenericClient;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{NoTls, Row};

use crate::ledger::{self, Serialize, Tx};
use crate::sql::{Record, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::StoreError;
use crate::redact_url;
use crate::sqlite::check_read_only_keyword;

const MIGRATIONS: &[(&str, &str)] = &[
    ("init", include_str!("0001_init.sql")),
    ("o200k_tokens", include_str!("0002_o200k_tokens.sql")),
    ("workers", include_str!("0003_workers.sql")),
    ("o200k_split", include_str!("0004_o200k_split.sql")),
    ("pacing", include_str!("0005_pacing.sql")),
    ("batches", include_str!("0006_batches.sql")),
    ("transport", include_str!("0007_transport.sql")),
    ("pacing_work", include_str!("0008_pacing_work.sql")),
];

type CoreResult<T> = apex_core::Result<T>;

fn pg(e: tokio_postgres::Error) -> Error {
    Error::store_msg(format!("postgres: {}", describe(&e)))
}

/// A PostgreSQL error as one line, with the server's message when there is one.
/// A failed query: the caller's mistake where PostgreSQL says the statement
/// itself is wrong (class 42, syntax or an unknown name; class 22, bad
/// data in it), the ledger's otherwise.
fn query_error(e: &tokio_postgres::Error, text: String) -> Error {
    let class = e.as_db_error().map(|db| &db.code().code()[..2]);
    if matches!(class, Some("42" | "22")) {
        Error::Query(text)
    } else {
        Error::store_msg(format!("query failed: {text}"))
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => Error::store_msg(format!("postgres pool: {other}")),
    }
}

/// The shared ledger on PostgreSQL.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects (checking the server and credentials at once) and applies
    /// migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let config: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| StoreError::BadUrl {
                    url: shown.clone(),
                    problem: format!(
                        "{}; use postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                        describe(&e)
                    ),
                })?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // TLS when the URL asks for it (`?sslmode=require`), with the
        // server's certificate verified against the Mozilla roots; the
        // default (`prefer`) connects in plain text, as on a trusted network.
        let manager = if config.get_ssl_mode() == SslMode::Require {
            Manager::from_config(
                config,
                MakeRustlsConnect::with_webpki_roots(),
                manager_config,
            )
        } else {
            let mut config = config;
            config.ssl_mode(SslMode::Disable);
            Manager::from_config(config, NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(16)
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot build a connection pool: {e}")))?;
        let client = pool.get().await.map_err(|e| {
            let (problem, hint) = match &e {
                deadpool_postgres::PoolError::Backend(e) => {
                    let code = e.as_db_error().map(|d| d.code().code().to_owned());
                    let hint = match code.as_deref() {
                        Some("28P01" | "28000") => "check the user and password in --database-url",
                        Some("3D000") => {
                            "create the database first (createdb NAME) or name an existing one"
                        }
                        _ => "check that the server is running and reachable at that host and port",
                    };
                    (describe(e), hint)
                }
                other => (other.to_string(), "check the server and --database-url"),
            };
            StoreError::Postgres(format!("cannot connect to {shown}: {problem}; {hint}"))
        })?;
        drop(client);
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::Postgres(describe(&e)))?;
        let step = |e: tokio_postgres::Error| {
            StoreError::Postgres(format!("migrating the ledger: {}", describe(&e)))
        };
        // One migrator at a time, whichever process gets there first.
        tx.execute("SELECT pg_advisory_xact_lock(7210351)", &[])
            .await
            .map_err(step)?;
        tx.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS apex_audition;
             CREATE TABLE IF NOT EXISTS apex_audition.schema_migrations (
                 version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
        )
        .await
        .map_err(step)?;
        let version: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM apex_audition.schema_migrations",
                &[],
            )
            .await
            .map_err(step)?
            .get(0);
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known,
            });
        }
        for (index, (name, sql)) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tracing::info!(
                version = index + 1,
                name,
                "applying ledger migration (postgres)"
            );
            tx.batch_execute(sql).await.map_err(step)?;
            tx.execute(
                "INSERT INTO apex_audition.schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&(index as i64 + 1), name, &now_rfc3339()],
            )
            .await
            .map_err(step)?;
        }
        tx.commit().await.map_err(step)?;
        Ok(())
    }

    async fn client(&self) -> CoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }
}

/// A parameter as PostgreSQL wants it for the column's type.
#[derive(Debug)]
struct Bind<'a>(&'a SqlValue);

impl ToSql for Bind<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            SqlValue::Null => Ok(IsNull::Yes),
            SqlValue::Bool(b) => b.to_sql(ty, out),
            SqlValue::Integer(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            SqlValue::Real(r) => match *ty {
                Type::FLOAT4 => (*r as f32).to_sql(ty, out),
                _ => r.to_sql(ty, out),
            },
            SqlValue::Text(t) => t.as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A row's value as the ledger reads it; a column of a type the ledger
/// never stores is an error, not a panic.
fn value_at(row: &Row, i: usize) -> CoreResult<SqlValue> {
    let column = &row.columns()[i];
    let read = |e: tokio_postgres::Error| {
        Error::store_msg(format!("column `{}`: {}", column.name(), describe(&e)))
    };
    let ty = column.type_();
    Ok(if *ty == Type::BOOL {
        row.try_get::<_, Option<bool>>(i)
            .map_err(read)?
            .map_or(SqlValue::Null, SqlValue::Bool)
    } else if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)
            .map_err(read)?
            .map_or(SqlValue::Null, SqlValue::Integer)
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)
            .map_err(read)?
            .map_or(SqlValue::Null, |v| SqlValue::Integer(v.into()))
    } else if *ty == Type::FLOAT8 {
        row.try_get::<_, Option<f64>>(i)
            .map_err(read)?
            .map_or(SqlValue::Null, SqlValue::Real)
    } else if [Type::TEXT, Type::VARCHAR, Type::NAME].contains(ty) {
        row.try_get::<_, Option<String>>(i)
            .map_err(read)?
            .map_or(SqlValue::Null, SqlValue::Text)
    } else {
        return Err(Error::Corrupt(format!(
            "column `{}` has type {ty}, which the ledger does not use",
            column.name()
        )));
    })
}

/// One PostgreSQL transaction as the shared ledger logic sees it.
struct PgTx<'a, C>(&'a C);

impl<C: GenericClient + Sync> Tx for PgTx<'_, C> {
    async fn execute(&mut self, statement: &Statement, params: &[SqlValue]) -> CoreResult<u64> {
        let binds: Vec<Bind<'_>> = params.iter().map(Bind).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = binds.iter().map(|b| b as _).collect();
        self.0
            .execute(statement.postgres(), &refs)
            .await
            .map_err(pg)
    }

    async fn query(
        &mut self,
        statement: &Statement,
        params: &[SqlValue],
    ) -> CoreResult<Vec<Record>> {
        let binds: Vec<Bind<'_>> = params.iter().map(Bind).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = binds.iter().map(|b| b as _).collect();
        let rows = self
            .0
            .query(statement.postgres(), &refs)
            .await
            .map_err(pg)?;
        let Some(first) = rows.first() else {
            return Ok(Vec::new());
        };
        let columns: std::sync::Arc<[String]> = first
            .columns()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        rows.iter()
            .map(|row| {
                Ok(Record {
                    columns: std::sync::Arc::clone(&columns),
                    values: (0..row.len())
                        .map(|i| value_at(row, i))
                        .collect::<CoreResult<_>>()?,
                })
            })
            .collect()
    }

    async fn serialize(&mut self, what: Serialize<'_>) -> CoreResult<()> {
        match what {
            Serialize::Conditions => self
                .0
                .execute(
                    "LOCK TABLE apex_audition.conditions IN SHARE ROW EXCLUSIVE MODE",
                    &[],
                )
                .await
                .map_err(pg)?,
            Serialize::Packages => self
                .0
                .execute(
                    "LOCK TABLE apex_audition.context_packages IN SHARE ROW EXCLUSIVE MODE",
                    &[],
                )
                .await
                .map_err(pg)?,
            Serialize::Claims(run_id) => self
                .0
                .execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))",
                    &[&run_id.as_str()],
                )
                .await
                .map_err(pg)?,
        };
        Ok(())
    }
}

/// Runs shared ledger logic in one transaction.
macro_rules! in_transaction {
    ($store:expr, |$tx:ident| $work:expr) => {{
        let mut client = $store.client().await?;
        let transaction = client.transaction().await.map_err(pg)?;
        let out = {
            let $tx = &mut PgTx(&*transaction);
            $work.await?
        };
        transaction.commit().await.map_err(pg)?;
        Ok(out)
    }};
}

/// Runs shared ledger logic on one connection, statement by statement.
macro_rules! on_connection {
    ($store:expr, |$tx:ident| $work:expr) => {{
        let client = $store.client().await?;
        let $tx = &mut PgTx(&**client);
        $work.await
    }};
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn register_conditions(&self, conditions: &[Condition]) -> CoreResult<RegisterReport> {
        for c in conditions {
            c.validate()?;
        }
        in_transaction!(self, |tx| ledger::register_conditions(tx, conditions))
    }

    async fn conditions(&self) -> CoreResult<Vec<ConditionInfo>> {
        on_connection!(self, |tx| ledger::conditions(tx))
    }

    async fn condition(&self, slug: &str) -> CoreResult<Condition> {
        on_connection!(self, |tx| ledger::condition(tx, slug))
    }

    async fn ingest_packages(&self, packages: &[ContextPackage]) -> CoreResult<IngestReport> {
        let current = on_connection!(self, |tx| ledger::current_versions(tx))?;
        let counted = packages.to_vec();
        let o200k = tokio::task::spawn_blocking(move || crate::o200k_for_new(&counted, &current))
            .await
            .map_err(|e| Error::store_msg(format!("token counting failed: {e}")))?;
        in_transaction!(self, |tx| ledger::ingest_packages(tx, packages, o200k))
    }

    async fn current_packages(&self) -> CoreResult<Vec<PackageRef>> {
        on_connection!(self, |tx| ledger::current_packages(tx))
    }

    async fn package(&self, id: &str, version: &str) -> CoreResult<ContextPackage> {
        on_connection!(self, |tx| ledger::package(tx, id, version))
    }

    async fn o200k_split(&self, id: &str, version: &str) -> CoreResult<Option<(u64, u64)>> {
        on_connection!(self, |tx| ledger::o200k_split(tx, id, version))
    }

    async fn create_run(&self, run: &NewRun, plan: &Plan) -> CoreResult<()> {
        in_transaction!(self, |tx| ledger::create_run(tx, run, plan))
    }

    async fn run(&self, run_id: &RunId) -> CoreResult<RunInfo> {
        in_transaction!(self, |tx| ledger::load_run(tx, run_id))
    }

    async fn runs(&self) -> CoreResult<Vec<RunInfo>> {
        in_transaction!(self, |tx| ledger::runs(tx))
    }

    async fn run_conditions(&self, run_id: &RunId) -> CoreResult<Vec<Condition>> {
        in_transaction!(self, |tx| ledger::run_conditions(tx, run_id))
    }

    async fn set_run_flags(&self, run_id: &RunId, flags: &serde_json::Value) -> CoreResult<()> {
        on_connection!(self, |tx| ledger::set_run_flags(tx, run_id, flags))
    }

    async fn set_run_state(&self, run_id: &RunId, state: RunState) -> CoreResult<()> {
        on_connection!(self, |tx| ledger::set_run_state(tx, run_id, state))
    }

    async fn claim_work(
        &self,
        run_id: &RunId,
        worker: &str,
        max_groups: u32,
        stale_before: &str,
    ) -> CoreResult<Claim> {
        in_transaction!(self, |tx| ledger::claim_work(
            tx,
            run_id,
            worker,
            max_groups,
            stale_before
        ))
    }

    async fn claim_holders(&self, run_id: &RunId) -> CoreResult<Vec<String>> {
        on_connection!(self, |tx| ledger::claim_holders(tx, run_id))
    }

    async fn renew_claims(&self, run_id: &RunId, worker: &str) -> CoreResult<()> {
        on_connection!(self, |tx| ledger::renew_claims(tx, run_id, worker))
    }

    async fn share_pacing(
        &self,
        worker: &str,
        usage: &[(String, [u64; 3], u64)],
        fresh_within: std::time::Duration,
    ) -> CoreResult<Vec<PacingShare>> {
        in_transaction!(self, |tx| ledger::share_pacing(
            tx,
            worker,
            usage,
            fresh_within
        ))
    }

    async fn leave_pacing(&self, worker: &str) -> CoreResult<()> {
        on_connection!(self, |tx| ledger::leave_pacing(tx, worker))
    }

    async fn release_claims(&self, run_id: &RunId, worker: &str) -> CoreResult<()> {
        in_transaction!(self, |tx| ledger::release_claims(tx, run_id, worker))
    }

    async fn reset_errors(&self, run_id: &RunId) -> CoreResult<u64> {
        in_transaction!(self, |tx| ledger::reset_errors(tx, run_id))
    }

    async fn begin_attempt(
        &self,
        generation_id: i64,
        attempt: u32,
        worker: Option<&str>,
    ) -> CoreResult<()> {
        in_transaction!(self, |tx| ledger::begin_attempt(
            tx,
            generation_id,
            attempt,
            worker
        ))
    }

    async fn end_attempt(
        &self,
        generation_id: i64,
        attempt: u32,
        end: &AttemptEnd,
    ) -> CoreResult<()> {
        in_transaction!(self, |tx| ledger::end_attempt(
            tx,
            generation_id,
            attempt,
            end
        ))
    }

    async fn status_counts(&self, run_id: &RunId) -> CoreResult<Vec<StatusRow>> {
        on_connection!(self, |tx| ledger::status_counts(tx, run_id))
    }

    async fn remaining_by_condition(&self, run_id: &RunId) -> CoreResult<Vec<(String, u64)>> {
        on_connection!(self, |tx| ledger::remaining_by_condition(tx, run_id))
    }

    async fn attempts_page(
        &self,
        run_id: &RunId,
        after: (i64, u32),
        limit: u32,
    ) -> CoreResult<Vec<AttemptRow>> {
        on_connection!(self, |tx| ledger::attempts_page(tx, run_id, after, limit))
    }

    async fn error_rows(&self, run_id: &RunId) -> CoreResult<Vec<ErrorRow>> {
        on_connection!(self, |tx| ledger::error_rows(tx, run_id))
    }

    async fn usage_by_condition(&self, run_id: &RunId) -> CoreResult<Vec<ConditionUsage>> {
        on_connection!(self, |tx| ledger::usage_by_condition(tx, run_id))
    }

    async fn success_latency_at(
        &self,
        run_id: &RunId,
        condition: &str,
        rank: u64,
    ) -> CoreResult<Option<u64>> {
        on_connection!(self, |tx| ledger::success_latency_at(
            tx, run_id, condition, rank
        ))
    }

    async fn run_packages(&self, run_id: &RunId) -> CoreResult<Vec<(String, String)>> {
        on_connection!(self, |tx| ledger::run_packages(tx, run_id))
    }

    async fn generations_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> CoreResult<Vec<GenerationRow>> {
        on_connection!(self, |tx| ledger::generations_page(
            tx, run_id, after, limit, true
        ))
    }

    async fn generations_brief_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> CoreResult<Vec<GenerationRow>> {
        on_connection!(self, |tx| ledger::generations_page(
            tx, run_id, after, limit, false
        ))
    }

    async fn record_batch(&self, batch: &BatchRecord) -> CoreResult<()> {
        in_transaction!(self, |tx| ledger::record_batch(tx, batch))
    }

    async fn update_batch(
        &self,
        batch_key: &str,
        provider_batch_id: Option<&str>,
        state: BatchState,
    ) -> CoreResult<()> {
        in_transaction!(self, |tx| ledger::update_batch(
            tx,
            batch_key,
            provider_batch_id,
            state
        ))
    }

    async fn open_batches(&self, run_id: &RunId) -> CoreResult<Vec<BatchRecord>> {
        in_transaction!(self, |tx| ledger::open_batches(tx, run_id))
    }

    async fn query_read_only(&self, sql: &str) -> CoreResult<QueryResult> {
        check_read_only_keyword(sql)?;
        let mut client = self.client().await?;
        // Preparing through the extended protocol refuses several
        // statements and tells the column types; the text of the result
        // comes from the simple protocol, inside a READ ONLY transaction.
        let statement = client.prepare(sql).await.map_err(|e| {
            let text = describe(&e);
            if text.contains("cannot insert multiple commands") {
                Error::ReadOnly("more than one statement; give one query at a time".into())
            } else {
                query_error(&e, text)
            }
        })?;
        let types: Vec<Type> = statement
            .columns()
            .iter()
            .map(|c| c.type_().clone())
            .collect();
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let messages = tx.simple_query(sql).await.map_err(|e| {
            let text = describe(&e);
            if text.contains("read-only transaction") {
                Error::ReadOnly(
                    "the statement would write to the ledger; `apex sql` is read-only".into(),
                )
            } else {
                query_error(&e, text)
            }
        })?;
        tx.rollback().await.map_err(pg)?;
        let mut result = QueryResult::default();
        for message in messages {
            match message {
                tokio_postgres::SimpleQueryMessage::RowDescription(columns) => {
                    result.columns = columns.iter().map(|c| c.name().to_owned()).collect();
                }
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    if result.columns.is_empty() {
                        result.columns =
                            row.columns().iter().map(|c| c.name().to_owned()).collect();
                    }
                    let values = (0..row.len())
                        .map(|i| match row.get(i) {
                            None => SqlValue::Null,
                            Some(text) => typed(types.get(i), text),
                        })
                        .collect();
                    result.rows.push(values);
                }
                _ => {}
            }
        }
        Ok(result)
    }
}

/// A text value from the simple protocol, as the column's type.
fn typed(ty: Option<&Type>, text: &str) -> SqlValue {
    match ty {
        Some(t) if *t == Type::BOOL => SqlValue::Bool(text == "t"),
        Some(t) if [Type::INT2, Type::INT4, Type::INT8].contains(t) => text
            .parse()
            .map_or_else(|_| SqlValue::Text(text.to_owned()), SqlValue::Integer),
        Some(t) if *t == Type::NUMERIC && !text.contains(['.', 'e', 'E']) => text
            .parse()
            .map_or_else(|_| SqlValue::Text(text.to_owned()), SqlValue::Integer),
        Some(t) if [Type::FLOAT4, Type::FLOAT8, Type::NUMERIC].contains(t) => text
            .parse()
            .map_or_else(|_| SqlValue::Text(text.to_owned()), SqlValue::Real),
        _ => SqlValue::Text(text.to_owned()),
    }
}
