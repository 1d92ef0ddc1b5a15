//! The SQLite backend: one file in WAL mode, attached as `apex_audition`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_core::run::AttemptEnd;
use apex_core::run::{BatchRecord, BatchState};
use apex_core::store::{ConditionInfo, ConditionUsage, PacingShare};
use apex_core::{
    AttemptRow, Claim, Condition, ContextPackage, Error, ErrorRow, GenerationRow, IngestReport,
    NewRun, PackageRef, Plan, QueryResult, RegisterReport, RunId, RunInfo, RunState, SqlValue,
    StatusRow, Store,
};
use async_trait::async_trait;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, TransactionBehavior};

use crate::error::StoreError;
use crate::ledger::{self, Serialize, Tx};
use crate::sql::{Record, Statement, run_now};

/// Migrations in order; the index + 1 is the schema version.
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

/// How long a statement waits for another writer's lock by default.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

type CoreResult<T> = apex_core::Result<T>;

/// Maps rusqlite failures into apex-core's error.
trait Db<T> {
    fn db(self) -> CoreResult<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> CoreResult<T> {
        self.map_err(|e| StoreError::from(e).into())
    }
}

/// The embedded ledger. Cheap to clone; all clones share one connection,
/// used from blocking threads so the async scheduler never waits on disk.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    writer: std::sync::mpsc::Sender<WriteRequest>,
}

/// A small write that joins a group commit.
type WriteOp = Box<dyn FnOnce(&Connection) -> CoreResult<()> + Send>;

struct WriteRequest {
    op: WriteOp,
    done: std::sync::mpsc::SyncSender<CoreResult<()>>,
}

/// Group commit: the attempt writes of many concurrent generations share one
/// transaction (each in its own savepoint, so one failing write does not
/// undo the others). Every caller hears back only after the COMMIT, so each
/// write is durable before the scheduler acts on it.
fn writer_loop(conn: Arc<Mutex<Connection>>, requests: std::sync::mpsc::Receiver<WriteRequest>) {
    while let Ok(first) = requests.recv() {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let guard = conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = guard.execute_batch("BEGIN IMMEDIATE") {
            for r in batch {
                let _ = r
                    .done
                    .send(Err(Error::store_msg(format!("cannot begin a write: {e}"))));
            }
            continue;
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut broken: Option<String> = None;
        for r in batch {
            if broken.is_some() {
                results.push((r.done, Ok(())));
                continue;
            }
            let outcome = guard
                .execute_batch("SAVEPOINT apex_write")
                .db()
                .and_then(|()| (r.op)(&guard));
            let cleanup = if outcome.is_ok() {
                "RELEASE apex_write"
            } else {
                "ROLLBACK TO apex_write; RELEASE apex_write"
            };
            // If the savepoint cannot be undone, what it wrote may be half
            // there: nothing of this batch may be committed.
            if let Err(e) = guard.execute_batch(cleanup) {
                broken = Some(format!("cannot undo a failed write: {e}"));
            }
            results.push((r.done, outcome));
        }
        if let Some(problem) = broken {
            let _ = guard.execute_batch("ROLLBACK");
            for (done, _) in results {
                let _ = done.send(Err(Error::store_msg(problem.clone())));
            }
            continue;
        }
        match guard.execute_batch("COMMIT") {
            Ok(()) => {
                for (done, outcome) in results {
                    let _ = done.send(outcome);
                }
            }
            Err(e) => {
                let _ = guard.execute_batch("ROLLBACK");
                for (done, _) in results {
                    let _ = done.send(Err(Error::store_msg(format!("commit failed: {e}"))));
                }
            }
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the ledger file at `path` and applies migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_waiting(path, DEFAULT_BUSY_TIMEOUT)
    }

    /// Like [`open`](Self::open), waiting at most `busy_timeout` for
    /// another writer's lock before a statement fails (a run then retries
    /// it for its ledger patience).
    pub fn open_waiting(path: &Path, busy_timeout: Duration) -> Result<Self, StoreError> {
        let location = path.to_string_lossy().into_owned();
        Self::open_at(&location, true, busy_timeout)
    }

    /// A private in-memory ledger (for tests and examples).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::open_at(":memory:", false, DEFAULT_BUSY_TIMEOUT)
    }

    fn open_at(location: &str, file: bool, busy_timeout: Duration) -> Result<Self, StoreError> {
        let open_err = |cause: rusqlite::Error| {
            let hint = match cause.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => {
                    "the file is not a SQLite database; point --database-url at an Apex ledger or a new file"
                }
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    "another process holds the ledger locked; try again"
                }
                _ => "check that the directory exists and is writable",
            };
            StoreError::Open {
                path: location.to_owned(),
                cause,
                hint,
            }
        };
        let conn = Connection::open_in_memory().map_err(open_err)?;
        conn.execute("ATTACH DATABASE ?1 AS apex_audition", [location])
            .map_err(open_err)?;
        conn.execute_batch("PRAGMA foreign_keys = ON;")?;
        conn.busy_timeout(busy_timeout)?;
        // Every statement of the ledger stays prepared.
        conn.set_prepared_statement_cache_capacity(128);
        if file {
            // WAL lets `apex sql` read while a run writes. NORMAL sync in WAL
            // mode survives a process crash (SIGKILL) without losing commits.
            let mode: String = conn
                .query_row("PRAGMA apex_audition.journal_mode = WAL", [], |r| r.get(0))
                .map_err(open_err)?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(mode, "SQLite did not switch to WAL mode");
            }
            conn.execute_batch("PRAGMA apex_audition.synchronous = NORMAL;")?;
        }
        migrate(&conn).map_err(|e| match e {
            StoreError::Sqlite(cause) => open_err(cause),
            other => other,
        })?;
        let conn = Arc::new(Mutex::new(conn));
        let (writer, requests) = std::sync::mpsc::channel();
        let shared = Arc::clone(&conn);
        std::thread::Builder::new()
            .name("apex-sqlite-writer".into())
            .spawn(move || writer_loop(shared, requests))
            .map_err(StoreError::Thread)?;
        Ok(Self { conn, writer })
    }

    /// Runs a small write as part of the next group commit. The wait runs
    /// on a blocking thread, so the runtime knows work is under way (paused
    /// test clocks do not jump over a write).
    async fn write<F>(&self, op: F) -> CoreResult<()>
    where
        F: FnOnce(&Connection) -> CoreResult<()> + Send + 'static,
    {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let (done, result) = std::sync::mpsc::sync_channel(1);
            writer
                .send(WriteRequest {
                    op: Box::new(op),
                    done,
                })
                .map_err(|_| Error::store_msg("the ledger writer has stopped"))?;
            result
                .recv()
                .map_err(|_| Error::store_msg("the ledger writer has stopped"))?
        })
        .await
        .map_err(StoreError::from)?
    }

    async fn call<T, F>(&self, f: F) -> CoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> CoreResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-applied
            // transaction (rusqlite rolls back on drop), so the data is sound.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(StoreError::from)?
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA apex_audition.user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    // IMMEDIATE takes the write lock first, so two processes opening a new
    // ledger at once apply each migration exactly once.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let version: i64 = conn.query_row("PRAGMA apex_audition.user_version", [], |r| r.get(0))?;
        for (index, (name, sql)) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tracing::info!(version = index + 1, name, "applying ledger migration");
            conn.execute_batch(sql)?;
            conn.execute_batch(&format!(
                "PRAGMA apex_audition.user_version = {}",
                index + 1
            ))?;
        }
        Ok::<_, rusqlite::Error>(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    }
    Ok(())
}

/// The first keyword of a statement, skipping white space and comments.
fn first_keyword(sql: &str) -> String {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, tail)| tail);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, tail)| tail);
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// Statements `apex sql` accepts: queries only.
pub(crate) fn check_read_only_keyword(sql: &str) -> CoreResult<()> {
    let keyword = first_keyword(sql);
    if matches!(keyword.as_str(), "SELECT" | "WITH" | "VALUES" | "EXPLAIN") {
        Ok(())
    } else if keyword.is_empty() {
        Err(Error::ReadOnly(
            "empty statement; give one SELECT query".into(),
        ))
    } else {
        Err(Error::ReadOnly(format!(
            "`{keyword}` statements are not allowed; `apex sql` runs read-only queries (SELECT, WITH, VALUES, EXPLAIN)"
        )))
    }
}

fn sql_value(value: ValueRef<'_>) -> SqlValue {
    match value {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Integer(i),
        ValueRef::Real(r) => SqlValue::Real(r),
        ValueRef::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => SqlValue::Text(format!("<{} bytes>", b.len())),
    }
}

/// A failed query: the caller's mistake where SQLite says the statement
/// itself is wrong (`SQLITE_ERROR`: syntax, no such table or column, a
/// bad function), the ledger's otherwise (busy, I/O, corruption).
fn query_error(e: rusqlite::Error) -> Error {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::Unknown => {
            Error::Query(e.to_string())
        }
        rusqlite::Error::SqlInputError { .. } => Error::Query(e.to_string()),
        _ => Error::store_msg(format!("query failed: {e}")),
    }
}

fn run_read_only(conn: &Connection, sql: &str) -> CoreResult<QueryResult> {
    check_read_only_keyword(sql)?;
    let mut stmt = conn.prepare(sql).map_err(|e| match e {
        rusqlite::Error::MultipleStatement => {
            Error::ReadOnly("more than one statement; give one query at a time".into())
        }
        other => query_error(other),
    })?;
    if !stmt.readonly() {
        return Err(Error::ReadOnly(
            "the statement would write to the ledger; `apex sql` is read-only".into(),
        ));
    }
    let columns: Vec<String> = stmt.column_names().map(String::from).collect();
    let width = columns.len();
    let mut rows = stmt.query([]).map_err(query_error)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(query_error)? {
        out.push(
            (0..width)
                .map(|i| row.get_ref(i).map(sql_value))
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?,
        );
    }
    Ok(QueryResult { columns, rows: out })
}

/// One SQLite transaction (or group-commit savepoint) as the shared
/// ledger logic sees it. Its futures never wait.
struct SqliteTx<'c>(&'c Connection);

/// A parameter bound without copying its text.
struct Bind<'a>(&'a SqlValue);

impl rusqlite::ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value};
        Ok(match self.0 {
            SqlValue::Null => ToSqlOutput::Owned(Value::Null),
            SqlValue::Bool(b) => ToSqlOutput::Owned(Value::Integer(i64::from(*b))),
            SqlValue::Integer(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            SqlValue::Real(r) => ToSqlOutput::Owned(Value::Real(*r)),
            SqlValue::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

impl Tx for SqliteTx<'_> {
    async fn execute(&mut self, statement: &Statement, params: &[SqlValue]) -> CoreResult<u64> {
        let mut stmt = self.0.prepare_cached(statement.sqlite()).db()?;
        let n = stmt
            .execute(rusqlite::params_from_iter(params.iter().map(Bind)))
            .db()?;
        Ok(n as u64)
    }

    async fn query(
        &mut self,
        statement: &Statement,
        params: &[SqlValue],
    ) -> CoreResult<Vec<Record>> {
        let mut stmt = self.0.prepare_cached(statement.sqlite()).db()?;
        let columns: Arc<[String]> = stmt.column_names().map(String::from).collect();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(params.iter().map(Bind)))
            .db()?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().db()? {
            let values = (0..columns.len())
                .map(|i| row.get_ref(i).map(sql_value))
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            out.push(Record {
                columns: Arc::clone(&columns),
                values,
            });
        }
        Ok(out)
    }

    async fn serialize(&mut self, _: Serialize<'_>) -> CoreResult<()> {
        // Every transaction that decides begins IMMEDIATE: it already holds
        // the write lock.
        Ok(())
    }
}

impl SqliteStore {
    /// Runs shared ledger logic in one IMMEDIATE transaction.
    async fn transaction<T, F>(&self, work: F) -> CoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteTx<'_>) -> CoreResult<T> + Send + 'static,
    {
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let out = work(&mut SqliteTx(&tx))?;
            tx.commit().db()?;
            Ok(out)
        })
        .await
    }

    /// Runs shared ledger logic statement by statement (reads, and single
    /// writes that need no transaction).
    async fn on_connection<T, F>(&self, work: F) -> CoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqliteTx<'_>) -> CoreResult<T> + Send + 'static,
    {
        self.call(move |conn| work(&mut SqliteTx(conn))).await
    }

    /// Runs shared ledger logic as part of the next group commit.
    async fn grouped<F>(&self, work: F) -> CoreResult<()>
    where
        F: FnOnce(&mut SqliteTx<'_>) -> CoreResult<()> + Send + 'static,
    {
        self.write(move |conn| work(&mut SqliteTx(conn))).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn register_conditions(&self, conditions: &[Condition]) -> CoreResult<RegisterReport> {
        for condition in conditions {
            condition.validate()?;
        }
        let conditions = conditions.to_vec();
        self.transaction(move |tx| run_now(ledger::register_conditions(tx, &conditions)))
            .await
    }

    async fn conditions(&self) -> CoreResult<Vec<ConditionInfo>> {
        self.on_connection(|tx| run_now(ledger::conditions(tx)))
            .await
    }

    async fn condition(&self, slug: &str) -> CoreResult<Condition> {
        let slug = slug.to_owned();
        self.on_connection(move |tx| run_now(ledger::condition(tx, &slug)))
            .await
    }

    async fn ingest_packages(&self, packages: &[ContextPackage]) -> CoreResult<IngestReport> {
        let packages = packages.to_vec();
        self.call(move |conn| {
            // Counted before the write lock is taken: exact counts of large
            // contexts take a moment.
            let current = run_now(ledger::current_versions(&mut SqliteTx(conn)))?;
            let o200k = crate::o200k_for_new(&packages, &current);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let report = run_now(ledger::ingest_packages(
                &mut SqliteTx(&tx),
                &packages,
                o200k,
            ))?;
            tx.commit().db()?;
            Ok(report)
        })
        .await
    }

    async fn current_packages(&self) -> CoreResult<Vec<PackageRef>> {
        self.on_connection(|tx| run_now(ledger::current_packages(tx)))
            .await
    }

    async fn package(&self, id: &str, version: &str) -> CoreResult<ContextPackage> {
        let (id, version) = (id.to_owned(), version.to_owned());
        self.on_connection(move |tx| run_now(ledger::package(tx, &id, &version)))
            .await
    }

    async fn o200k_split(&self, id: &str, version: &str) -> CoreResult<Option<(u64, u64)>> {
        let (id, version) = (id.to_owned(), version.to_owned());
        self.on_connection(move |tx| run_now(ledger::o200k_split(tx, &id, &version)))
            .await
    }

    async fn create_run(&self, run: &NewRun, plan: &Plan) -> CoreResult<()> {
        let (run, plan) = (run.clone(), plan.clone());
        self.transaction(move |tx| run_now(ledger::create_run(tx, &run, &plan)))
            .await
    }

    async fn run(&self, run_id: &RunId) -> CoreResult<RunInfo> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::load_run(tx, &run_id)))
            .await
    }

    async fn runs(&self) -> CoreResult<Vec<RunInfo>> {
        self.on_connection(|tx| run_now(ledger::runs(tx))).await
    }

    async fn run_conditions(&self, run_id: &RunId) -> CoreResult<Vec<Condition>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::run_conditions(tx, &run_id)))
            .await
    }

    async fn set_run_flags(&self, run_id: &RunId, flags: &serde_json::Value) -> CoreResult<()> {
        let (run_id, flags) = (run_id.clone(), flags.clone());
        self.on_connection(move |tx| run_now(ledger::set_run_flags(tx, &run_id, &flags)))
            .await
    }

    async fn set_run_state(&self, run_id: &RunId, state: RunState) -> CoreResult<()> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::set_run_state(tx, &run_id, state)))
            .await
    }

    async fn claim_work(
        &self,
        run_id: &RunId,
        worker: &str,
        max_groups: u32,
        stale_before: &str,
    ) -> CoreResult<Claim> {
        let (run_id, worker, stale) = (run_id.clone(), worker.to_owned(), stale_before.to_owned());
        self.transaction(move |tx| {
            run_now(ledger::claim_work(tx, &run_id, &worker, max_groups, &stale))
        })
        .await
    }

    async fn claim_holders(&self, run_id: &RunId) -> CoreResult<Vec<String>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::claim_holders(tx, &run_id)))
            .await
    }

    async fn share_pacing(
        &self,
        worker: &str,
        usage: &[(String, [u64; 3], u64)],
        fresh_within: Duration,
    ) -> CoreResult<Vec<PacingShare>> {
        let (worker, usage) = (worker.to_owned(), usage.to_vec());
        self.transaction(move |tx| run_now(ledger::share_pacing(tx, &worker, &usage, fresh_within)))
            .await
    }

    async fn leave_pacing(&self, worker: &str) -> CoreResult<()> {
        let worker = worker.to_owned();
        self.on_connection(move |tx| run_now(ledger::leave_pacing(tx, &worker)))
            .await
    }

    async fn renew_claims(&self, run_id: &RunId, worker: &str) -> CoreResult<()> {
        let (run_id, worker) = (run_id.clone(), worker.to_owned());
        self.grouped(move |tx| run_now(ledger::renew_claims(tx, &run_id, &worker)))
            .await
    }

    async fn release_claims(&self, run_id: &RunId, worker: &str) -> CoreResult<()> {
        let (run_id, worker) = (run_id.clone(), worker.to_owned());
        self.grouped(move |tx| run_now(ledger::release_claims(tx, &run_id, &worker)))
            .await
    }

    async fn reset_errors(&self, run_id: &RunId) -> CoreResult<u64> {
        let run_id = run_id.clone();
        self.transaction(move |tx| run_now(ledger::reset_errors(tx, &run_id)))
            .await
    }

    async fn begin_attempt(
        &self,
        generation_id: i64,
        attempt: u32,
        worker: Option<&str>,
    ) -> CoreResult<()> {
        let worker = worker.map(str::to_owned);
        self.grouped(move |tx| {
            run_now(ledger::begin_attempt(
                tx,
                generation_id,
                attempt,
                worker.as_deref(),
            ))
        })
        .await
    }

    async fn end_attempt(
        &self,
        generation_id: i64,
        attempt: u32,
        end: &AttemptEnd,
    ) -> CoreResult<()> {
        let end = end.clone();
        self.grouped(move |tx| run_now(ledger::end_attempt(tx, generation_id, attempt, &end)))
            .await
    }

    async fn status_counts(&self, run_id: &RunId) -> CoreResult<Vec<StatusRow>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::status_counts(tx, &run_id)))
            .await
    }

    async fn remaining_by_condition(&self, run_id: &RunId) -> CoreResult<Vec<(String, u64)>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::remaining_by_condition(tx, &run_id)))
            .await
    }

    async fn attempts_page(
        &self,
        run_id: &RunId,
        after: (i64, u32),
        limit: u32,
    ) -> CoreResult<Vec<AttemptRow>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::attempts_page(tx, &run_id, after, limit)))
            .await
    }

    async fn error_rows(&self, run_id: &RunId) -> CoreResult<Vec<ErrorRow>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::error_rows(tx, &run_id)))
            .await
    }

    async fn usage_by_condition(&self, run_id: &RunId) -> CoreResult<Vec<ConditionUsage>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::usage_by_condition(tx, &run_id)))
            .await
    }

    async fn success_latency_at(
        &self,
        run_id: &RunId,
        condition: &str,
        rank: u64,
    ) -> CoreResult<Option<u64>> {
        let (run_id, condition) = (run_id.clone(), condition.to_owned());
        self.on_connection(move |tx| {
            run_now(ledger::success_latency_at(tx, &run_id, &condition, rank))
        })
        .await
    }

    async fn run_packages(&self, run_id: &RunId) -> CoreResult<Vec<(String, String)>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::run_packages(tx, &run_id)))
            .await
    }

    async fn generations_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> CoreResult<Vec<GenerationRow>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| {
            run_now(ledger::generations_page(tx, &run_id, after, limit, true))
        })
        .await
    }

    async fn generations_brief_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> CoreResult<Vec<GenerationRow>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| {
            run_now(ledger::generations_page(tx, &run_id, after, limit, false))
        })
        .await
    }

    async fn record_batch(&self, batch: &BatchRecord) -> CoreResult<()> {
        let batch = batch.clone();
        self.transaction(move |tx| run_now(ledger::record_batch(tx, &batch)))
            .await
    }

    async fn update_batch(
        &self,
        batch_key: &str,
        provider_batch_id: Option<&str>,
        state: BatchState,
    ) -> CoreResult<()> {
        let (key, id) = (batch_key.to_owned(), provider_batch_id.map(str::to_owned));
        self.transaction(move |tx| run_now(ledger::update_batch(tx, &key, id.as_deref(), state)))
            .await
    }

    async fn open_batches(&self, run_id: &RunId) -> CoreResult<Vec<BatchRecord>> {
        let run_id = run_id.clone();
        self.on_connection(move |tx| run_now(ledger::open_batches(tx, &run_id)))
            .await
    }

    async fn query_read_only(&self, sql: &str) -> CoreResult<QueryResult> {
        let sql = sql.to_owned();
        self.call(move |conn| {
            // query_only makes SQLite itself refuse writes, whatever slipped
            // past the keyword and statement checks.
            conn.execute_batch("PRAGMA query_only = ON").db()?;
            let result = run_read_only(conn, &sql);
            conn.execute_batch("PRAGMA query_only = OFF").db()?;
            result
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_check_skips_comments() {
        assert!(check_read_only_keyword("-- hi\n /* x */ select 1").is_ok());
        assert!(check_read_only_keyword("  WITH x AS (SELECT 1) SELECT * FROM x").is_ok());
        for bad in [
            "DELETE FROM x",
            "drop table x",
            "PRAGMA query_only = OFF",
            "ATTACH 'x' AS y",
            "",
        ] {
            assert!(check_read_only_keyword(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn migrations_are_idempotent_and_versioned() {
        let dir = tempfile_dir();
        let path = dir.join("ledger.db");
        SqliteStore::open(&path).unwrap();
        SqliteStore::open(&path).unwrap();
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(conn);
        let err = SqliteStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("schema is version 99"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    proptest::proptest! {
        /// `apex sql` statements, arbitrary or near a real query or write:
        /// an answer or a typed error, never a panic, never a write.
        #[test]
        fn sql_statements_are_answered_or_refused_never_written(
            sql in proptest::prop_oneof![
                near("SELECT status, COUNT(*) FROM apex_audition.generations GROUP BY status"),
                near("DELETE FROM apex_audition.conditions"),
                near("WITH x AS (DELETE FROM apex_audition.conditions RETURNING *) SELECT * FROM x"),
                near("PRAGMA query_only = OFF; DROP TABLE apex_audition.conditions"),
                "\\PC{0,200}",
            ],
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let store = SqliteStore::open_in_memory().unwrap();
                let c = apex_core::parse_conditions(
                    "[[condition]]\nslug = \"c\"\nprovider = \"openai\"\nmodel = \"gpt-4o\"\nmax_tokens = 8\n",
                )
                .unwrap();
                store.register_conditions(&c).await.unwrap();
                let _ = store.query_read_only(&sql).await;
                proptest::prop_assert_eq!(store.conditions().await.unwrap().len(), 1);
                Ok(())
            })?;
        }
    }

    /// Valid text with up to eight random character edits.
    fn near(valid: &'static str) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        proptest::collection::vec((any::<usize>(), any::<char>(), any::<bool>()), 0..8).prop_map(
            move |edits| {
                let mut text: Vec<char> = valid.chars().collect();
                for (at, c, insert) in edits {
                    let at = at % (text.len() + 1);
                    if insert || at == text.len() {
                        text.insert(at, c);
                    } else {
                        text.remove(at);
                    }
                }
                text.into_iter().collect()
            },
        )
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("apex-store-unit-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
