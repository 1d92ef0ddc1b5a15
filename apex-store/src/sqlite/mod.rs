//! The SQLite backend: one file in WAL mode, attached as `apex_audition`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use apex_core::run::AttemptEnd;
use apex_core::store::ConditionInfo;
use apex_core::time::now_rfc3339;
use apex_core::tokens::Tokenizer;
use apex_core::{
    Claim, Condition, ContextPackage, Error, ErrorRow, GenerationRow, IngestReport, NewRun,
    PackageRef, Plan, ProviderKind, QueryResult, RegisterReport, RunId, RunInfo, RunState,
    SqlValue, StatusCounts, Store, WorkItem,
};
use async_trait::async_trait;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::error::StoreError;

/// Migrations in order; the index + 1 is the schema version.
const MIGRATIONS: &[(&str, &str)] = &[
    ("init", include_str!("0001_init.sql")),
    ("o200k_tokens", include_str!("0002_o200k_tokens.sql")),
    ("workers", include_str!("0003_workers.sql")),
];

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
        for r in batch {
            let outcome = guard
                .execute_batch("SAVEPOINT apex_write")
                .db()
                .and_then(|()| (r.op)(&guard));
            let cleanup = if outcome.is_ok() {
                "RELEASE apex_write"
            } else {
                "ROLLBACK TO apex_write; RELEASE apex_write"
            };
            let _ = guard.execute_batch(cleanup);
            results.push((r.done, outcome));
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
        let location = path.to_string_lossy().into_owned();
        Self::open_at(&location, true)
    }

    /// A private in-memory ledger (for tests and examples).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::open_at(":memory:", false)
    }

    fn open_at(location: &str, file: bool) -> Result<Self, StoreError> {
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
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 30000;")?;
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

fn condition_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Condition> {
    let provider: String = row.get("provider")?;
    Ok(Condition {
        slug: row.get("slug")?,
        provider: ProviderKind::parse(&provider).ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(0, "provider".into(), rusqlite::types::Type::Text)
        })?,
        model: row.get("model")?,
        temperature: row.get("temperature")?,
        top_p: row.get("top_p")?,
        max_tokens: row.get("max_tokens")?,
        reasoning_effort: row.get("reasoning_effort")?,
    })
}

fn work_item_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkItem> {
    Ok(WorkItem {
        generation_id: r.get(0)?,
        condition_slug: r.get(1)?,
        prompt_id: r.get(2)?,
        package_version: r.get(3)?,
        context_index: r.get(4)?,
        replicate_index: r.get(5)?,
        attempts: r.get(6)?,
    })
}

fn load_run(conn: &Connection, run_id: &RunId) -> CoreResult<RunInfo> {
    let row = conn
        .query_row(
            "SELECT run_id, created_by, notes, flags_json, state, created_at, started_at,
                    finished_at, replicates
             FROM apex_audition.runs WHERE run_id = ?1",
            [run_id.as_str()],
            |r| {
                Ok((
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, u32>(8)?,
                ))
            },
        )
        .optional()
        .db()?
        .ok_or_else(|| Error::UnknownRun(run_id.to_string()))?;
    let (created_by, notes, flags, state, created_at, started_at, finished_at, replicates) = row;
    let mut counts = StatusCounts::default();
    let mut cost_usd = 0.0;
    let mut stmt = conn
        .prepare_cached(
            "SELECT status, COUNT(*), COALESCE(SUM(cost_usd), 0)
             FROM apex_audition.generations WHERE run_id = ?1 GROUP BY status",
        )
        .db()?;
    let rows = stmt
        .query_map([run_id.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, f64>(2)?,
            ))
        })
        .db()?;
    for row in rows {
        let (status, n, cost) = row.db()?;
        cost_usd += cost;
        match status.as_str() {
            "pending" => counts.pending = n,
            "running" => counts.running = n,
            "success" => counts.success = n,
            _ => counts.error = n,
        }
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT condition_slug FROM apex_audition.run_conditions
             WHERE run_id = ?1 ORDER BY position",
        )
        .db()?;
    let condition_slugs = stmt
        .query_map([run_id.as_str()], |r| r.get(0))
        .db()?
        .collect::<rusqlite::Result<Vec<String>>>()
        .db()?;
    Ok(RunInfo {
        run_id: run_id.clone(),
        created_by,
        notes,
        flags: serde_json::from_str(&flags).unwrap_or(serde_json::Value::Null),
        state: RunState::parse(&state)
            .ok_or_else(|| Error::store_msg(format!("run {run_id} has unknown state `{state}`")))?,
        created_at,
        started_at,
        finished_at,
        replicates,
        condition_slugs,
        counts,
        cost_usd,
    })
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

fn run_read_only(conn: &Connection, sql: &str) -> CoreResult<QueryResult> {
    check_read_only_keyword(sql)?;
    let mut stmt = conn.prepare(sql).map_err(|e| match e {
        rusqlite::Error::MultipleStatement => {
            Error::ReadOnly("more than one statement; give one query at a time".into())
        }
        other => Error::store_msg(format!("query failed: {other}")),
    })?;
    if !stmt.readonly() {
        return Err(Error::ReadOnly(
            "the statement would write to the ledger; `apex sql` is read-only".into(),
        ));
    }
    let columns: Vec<String> = stmt.column_names().map(String::from).collect();
    let width = columns.len();
    let mut rows = stmt
        .query([])
        .map_err(|e| Error::store_msg(format!("query failed: {e}")))?;
    let mut out = Vec::new();
    while let Some(row) = rows
        .next()
        .map_err(|e| Error::store_msg(format!("query failed: {e}")))?
    {
        out.push(
            (0..width)
                .map(|i| row.get_ref(i).map(sql_value))
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?,
        );
    }
    Ok(QueryResult { columns, rows: out })
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
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let mut report = RegisterReport::default();
            let now = now_rfc3339();
            for c in &conditions {
                let existing = tx
                    .query_row(
                        "SELECT * FROM apex_audition.conditions WHERE slug = ?1",
                        [&c.slug],
                        condition_from_row,
                    )
                    .optional()
                    .db()?;
                let params = c.params_json();
                // The same nine values insert a new condition or replace an unused one.
                let values = params![
                    c.slug,
                    c.provider.as_str(),
                    c.model,
                    c.temperature,
                    c.top_p,
                    c.max_tokens,
                    c.reasoning_effort,
                    params,
                    now
                ];
                match existing {
                    Some(old) if old.params_json() == params => {
                        report.unchanged.push(c.slug.clone());
                        continue;
                    }
                    Some(old) => {
                        let used: Option<String> = tx
                            .query_row(
                                "SELECT run_id FROM apex_audition.run_conditions
                                 WHERE condition_slug = ?1 LIMIT 1",
                                [&c.slug],
                                |r| r.get(0),
                            )
                            .optional()
                            .db()?;
                        if let Some(run_id) = used {
                            return Err(Error::ConditionImmutable {
                                slug: c.slug.clone(),
                                run_id,
                                change: old.first_difference(c).unwrap_or_default(),
                            });
                        }
                        tx.execute(
                            "UPDATE apex_audition.conditions SET provider = ?2, model = ?3,
                                 temperature = ?4, top_p = ?5, max_tokens = ?6,
                                 reasoning_effort = ?7, params_json = ?8, updated_at = ?9
                             WHERE slug = ?1",
                            values,
                        )
                        .db()?;
                        report.updated.push(c.slug.clone());
                    }
                    None => {
                        tx.execute(
                            "INSERT INTO apex_audition.conditions (slug, provider, model,
                                 temperature, top_p, max_tokens, reasoning_effort, params_json,
                                 created_at, updated_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
                            values,
                        )
                        .db()?;
                        report.added.push(c.slug.clone());
                    }
                }
            }
            tx.commit().db()?;
            Ok(report)
        })
        .await
    }

    async fn conditions(&self) -> CoreResult<Vec<ConditionInfo>> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT c.*, (SELECT COUNT(*) FROM apex_audition.run_conditions r
                                  WHERE r.condition_slug = c.slug) AS runs
                     FROM apex_audition.conditions c ORDER BY c.slug",
                )
                .db()?;
            stmt.query_map([], |r| {
                Ok(ConditionInfo {
                    condition: condition_from_row(r)?,
                    runs: r.get("runs")?,
                })
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }

    async fn condition(&self, slug: &str) -> CoreResult<Condition> {
        let slug = slug.to_owned();
        self.call(move |conn| {
            conn.query_row(
                "SELECT * FROM apex_audition.conditions WHERE slug = ?1",
                [&slug],
                condition_from_row,
            )
            .optional()
            .db()?
            .ok_or(Error::UnknownCondition(slug))
        })
        .await
    }

    async fn ingest_packages(&self, packages: &[ContextPackage]) -> CoreResult<IngestReport> {
        let packages = packages.to_vec();
        self.call(move |conn| {
            // Counted before the write lock is taken: exact counts of large
            // contexts take a moment.
            let current: HashMap<String, String> = conn
                .prepare("SELECT prompt_id, current_version FROM apex_audition.context_packages")
                .db()?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .db()?
                .collect::<rusqlite::Result<_>>()
                .db()?;
            let o200k = crate::o200k_for_new(&packages, &current);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let mut report = IngestReport::default();
            let now = now_rfc3339();
            for (p, o200k) in packages.iter().zip(o200k) {
                let current: Option<String> = tx
                    .query_row(
                        "SELECT current_version FROM apex_audition.context_packages
                         WHERE prompt_id = ?1",
                        [p.id()],
                        |r| r.get(0),
                    )
                    .optional()
                    .db()?;
                if current.as_deref() == Some(p.version()) {
                    report.unchanged.push(p.id().to_owned());
                    continue;
                }
                // Another process may have changed the current version since
                // the counts were taken: count now if this one was skipped.
                let o200k = o200k.unwrap_or_else(|| {
                    let (prefix, rest) = Tokenizer::O200k.split(p);
                    prefix + rest
                });
                tx.execute(
                    "INSERT OR IGNORE INTO apex_audition.context_versions (prompt_id, version,
                         system_text, context_text, prompt_text, estimated_tokens, byte_len,
                         ingested_at, o200k_tokens)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        p.id(),
                        p.version(),
                        p.system().map(|s| &**s),
                        &**p.context(),
                        &**p.prompt(),
                        p.estimated_input_tokens(),
                        p.byte_len() as u64,
                        now,
                        o200k
                    ],
                )
                .db()?;
                tx.execute(
                    "INSERT INTO apex_audition.context_packages (prompt_id, current_version, updated_at)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (prompt_id) DO UPDATE SET current_version = excluded.current_version,
                         updated_at = excluded.updated_at",
                    params![p.id(), p.version(), now],
                )
                .db()?;
                match current {
                    None => report.added.push(p.id().to_owned()),
                    Some(old) => {
                        report
                            .new_versions
                            .push((p.id().to_owned(), old, p.version().to_owned()))
                    }
                }
            }
            tx.commit().db()?;
            Ok(report)
        })
        .await
    }

    async fn current_packages(&self) -> CoreResult<Vec<PackageRef>> {
        self.call(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT p.prompt_id, p.current_version, v.estimated_tokens, v.byte_len,
                            COALESCE(v.o200k_tokens, v.estimated_tokens)
                     FROM apex_audition.context_packages p
                     JOIN apex_audition.context_versions v
                       ON v.prompt_id = p.prompt_id AND v.version = p.current_version
                     ORDER BY p.prompt_id",
                )
                .db()?;
            stmt.query_map([], |r| {
                Ok(PackageRef {
                    id: r.get(0)?,
                    version: r.get(1)?,
                    estimated_tokens: r.get(2)?,
                    byte_len: r.get(3)?,
                    o200k_tokens: r.get(4)?,
                })
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }

    async fn package(&self, id: &str, version: &str) -> CoreResult<ContextPackage> {
        let (id, version) = (id.to_owned(), version.to_owned());
        self.call(move |conn| {
            let row = conn
                .query_row(
                    "SELECT system_text, context_text, prompt_text FROM apex_audition.context_versions
                     WHERE prompt_id = ?1 AND version = ?2",
                    [&id, &version],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .db()?
                .ok_or_else(|| {
                    Error::store_msg(format!("context package `{id}` version {version} is not stored"))
                })?;
            ContextPackage::from_stored(id, &version, row.0, row.1, row.2)
        })
        .await
    }

    async fn create_run(&self, run: &NewRun, plan: &Plan) -> CoreResult<()> {
        let run = run.clone();
        let conditions = plan.conditions.clone();
        let cells = plan.cells.clone();
        let options = plan.options;
        self.call(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let now = now_rfc3339();
            let state = if run.dry_run {
                RunState::Planned
            } else {
                RunState::Running
            };
            tx.execute(
                "INSERT INTO apex_audition.runs (run_id, created_by, notes, flags_json, state,
                     replicates, context_limit, dry_run, apex_version, created_at, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    run.run_id.as_str(),
                    run.created_by,
                    run.notes,
                    run.flags.to_string(),
                    state.as_str(),
                    options.replicates,
                    options.limit,
                    run.dry_run,
                    env!("CARGO_PKG_VERSION"),
                    now,
                    (!run.dry_run).then(|| now.clone()),
                ],
            )
            .db()?;
            for (position, c) in conditions.iter().enumerate() {
                // The plan must carry the parameters the store has: a stale
                // copy would record one thing and send another.
                let stored = tx
                    .query_row(
                        "SELECT * FROM apex_audition.conditions WHERE slug = ?1",
                        [&c.slug],
                        condition_from_row,
                    )
                    .optional()
                    .db()?
                    .ok_or_else(|| Error::UnknownCondition(c.slug.clone()))?;
                if stored.params_json() != c.params_json() {
                    return Err(Error::store_msg(format!(
                        "condition `{}` changed while the run was being planned; plan again",
                        c.slug
                    )));
                }
                tx.execute(
                    "INSERT INTO apex_audition.run_conditions (run_id, condition_slug, position, params_json)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![run.run_id.as_str(), c.slug, position as i64, c.params_json()],
                )
                .db()?;
            }
            {
                let mut insert = tx
                    .prepare(
                        "INSERT INTO apex_audition.generations (run_id, condition_slug, prompt_id,
                             package_version, context_index, replicate_index, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .db()?;
                for cell in &cells {
                    insert
                        .execute(params![
                            run.run_id.as_str(),
                            cell.condition_slug,
                            cell.prompt_id,
                            cell.package_version,
                            cell.context_index,
                            cell.replicate_index,
                            now
                        ])
                        .db()?;
                }
            }
            tx.commit().db()
        })
        .await
    }

    async fn run(&self, run_id: &RunId) -> CoreResult<RunInfo> {
        let run_id = run_id.clone();
        self.call(move |conn| load_run(conn, &run_id)).await
    }

    async fn runs(&self) -> CoreResult<Vec<RunInfo>> {
        self.call(|conn| {
            let ids = conn
                .prepare(
                    "SELECT run_id FROM apex_audition.runs ORDER BY created_at DESC, run_id DESC",
                )
                .db()?
                .query_map([], |r| r.get::<_, String>(0))
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            ids.into_iter()
                .map(|id| load_run(conn, &RunId::parse(&id)?))
                .collect()
        })
        .await
    }

    async fn run_conditions(&self, run_id: &RunId) -> CoreResult<Vec<Condition>> {
        let run_id = run_id.clone();
        self.call(move |conn| {
            load_run(conn, &run_id)?;
            let mut stmt = conn
                .prepare(
                    "SELECT condition_slug, params_json FROM apex_audition.run_conditions
                     WHERE run_id = ?1 ORDER BY position",
                )
                .db()?;
            let rows = stmt
                .query_map([run_id.as_str()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            rows.into_iter()
                .map(|(slug, params)| {
                    let mut value: serde_json::Value = serde_json::from_str(&params)
                        .map_err(|e| Error::store_msg(format!("run condition `{slug}`: {e}")))?;
                    value["slug"] = serde_json::Value::String(slug.clone());
                    serde_json::from_value(value)
                        .map_err(|e| Error::store_msg(format!("run condition `{slug}`: {e}")))
                })
                .collect()
        })
        .await
    }

    async fn set_run_state(&self, run_id: &RunId, state: RunState) -> CoreResult<()> {
        let run_id = run_id.clone();
        self.call(move |conn| {
            let now = now_rfc3339();
            let sql = match state {
                RunState::Running => {
                    "UPDATE apex_audition.runs SET state = ?2,
                         started_at = COALESCE(started_at, ?3), finished_at = NULL
                     WHERE run_id = ?1"
                }
                RunState::Planned => {
                    "UPDATE apex_audition.runs SET state = ?2 WHERE run_id = ?1 AND ?3 IS NOT NULL"
                }
                RunState::Finished | RunState::Interrupted => {
                    "UPDATE apex_audition.runs SET state = ?2, finished_at = ?3 WHERE run_id = ?1"
                }
            };
            let n = conn
                .execute(sql, params![run_id.as_str(), state.as_str(), now])
                .db()?;
            if n == 0 {
                return Err(Error::UnknownRun(run_id.to_string()));
            }
            Ok(())
        })
        .await
    }

    async fn work_items(&self, run_id: &RunId, include_errors: bool) -> CoreResult<Vec<WorkItem>> {
        let run_id = run_id.clone();
        self.call(move |conn| {
            load_run(conn, &run_id)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            if include_errors {
                tx.execute(
                    "UPDATE apex_audition.generations SET status = 'pending', error_class = NULL,
                         error_message = NULL, finished_at = NULL
                     WHERE run_id = ?1 AND status = 'error'",
                    [run_id.as_str()],
                )
                .db()?;
            }
            let items = tx
                .prepare(
                    "SELECT generation_id, condition_slug, prompt_id, package_version,
                            context_index, replicate_index, attempts
                     FROM apex_audition.generations
                     WHERE run_id = ?1 AND status IN ('pending', 'running')
                     ORDER BY generation_id",
                )
                .db()?
                .query_map([run_id.as_str()], work_item_from_row)
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            tx.commit().db()?;
            Ok(items)
        })
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
        self.call(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            let now = now_rfc3339();
            tx.prepare_cached(
                "INSERT INTO apex_audition.workers (worker, run_id, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (worker) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            )
            .db()?
            .execute(params![worker, run_id.as_str(), now])
            .db()?;
            // Claimable: unclaimed, or held by a worker whose heartbeat is
            // stale (or unknown).
            const CLAIMABLE: &str = "g.status IN ('pending', 'running') AND g.claimed_by IS NOT ?2 AND (
                 g.claimed_by IS NULL OR NOT EXISTS (
                     SELECT 1 FROM apex_audition.workers w
                     WHERE w.worker = g.claimed_by AND w.heartbeat_at >= ?3))";
            let groups: Vec<(String, String)> = tx
                .prepare_cached(&format!(
                    "SELECT g.condition_slug, g.prompt_id FROM apex_audition.generations g
                     WHERE g.run_id = ?1 AND {CLAIMABLE}
                     GROUP BY g.condition_slug, g.prompt_id ORDER BY MIN(g.generation_id) LIMIT ?4"
                ))
                .db()?
                .query_map(params![run_id.as_str(), worker, stale, max_groups], |r| Ok((r.get(0)?, r.get(1)?)))
                .db()?
                .collect::<rusqlite::Result<_>>()
                .db()?;
            for (slug, prompt) in &groups {
                tx.prepare_cached(&format!(
                    "UPDATE apex_audition.generations AS g SET claimed_by = ?2, claimed_at = ?5
                     WHERE g.run_id = ?1 AND {CLAIMABLE} AND g.condition_slug = ?4 AND g.prompt_id = ?6"
                ))
                .db()?
                .execute(params![run_id.as_str(), worker, stale, slug, now, prompt])
                .db()?;
            }
            let items = tx
                .prepare_cached(
                    "SELECT generation_id, condition_slug, prompt_id, package_version, context_index,
                            replicate_index, attempts
                     FROM apex_audition.generations
                     WHERE run_id = ?1 AND claimed_by = ?2 AND status IN ('pending', 'running')
                     ORDER BY generation_id",
                )
                .db()?
                .query_map(params![run_id.as_str(), worker], work_item_from_row)
                .db()?
                .collect::<rusqlite::Result<Vec<_>>>()
                .db()?;
            let held_by_others: u64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM apex_audition.generations g
                     JOIN apex_audition.workers w ON w.worker = g.claimed_by
                     WHERE g.run_id = ?1 AND g.status IN ('pending', 'running')
                       AND g.claimed_by <> ?2 AND w.heartbeat_at >= ?3",
                    params![run_id.as_str(), worker, stale],
                    |r| r.get(0),
                )
                .db()?;
            tx.commit().db()?;
            Ok(Claim { items, held_by_others })
        })
        .await
    }

    async fn renew_claims(&self, run_id: &RunId, worker: &str) -> CoreResult<()> {
        let (run_id, worker) = (run_id.clone(), worker.to_owned());
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO apex_audition.workers (worker, run_id, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (worker) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            )
            .db()?
            .execute(params![worker, run_id.as_str(), now_rfc3339()])
            .db()?;
            Ok(())
        })
        .await
    }

    async fn release_claims(&self, run_id: &RunId, worker: &str) -> CoreResult<()> {
        let (run_id, worker) = (run_id.clone(), worker.to_owned());
        self.write(move |tx| {
            tx.prepare_cached(
                "UPDATE apex_audition.generations SET claimed_by = NULL, claimed_at = NULL
                 WHERE run_id = ?1 AND claimed_by = ?2 AND status IN ('pending', 'running')",
            )
            .db()?
            .execute(params![run_id.as_str(), worker])
            .db()?;
            tx.prepare_cached("DELETE FROM apex_audition.workers WHERE worker = ?1")
                .db()?
                .execute(params![worker])
                .db()?;
            Ok(())
        })
        .await
    }

    async fn reset_errors(&self, run_id: &RunId) -> CoreResult<u64> {
        let run_id = run_id.clone();
        self.call(move |conn| {
            load_run(conn, &run_id)?;
            let n = conn
                .execute(
                    "UPDATE apex_audition.generations SET status = 'pending', error_class = NULL,
                         error_message = NULL, finished_at = NULL
                     WHERE run_id = ?1 AND status = 'error'",
                    [run_id.as_str()],
                )
                .db()?;
            Ok(n as u64)
        })
        .await
    }

    async fn begin_attempt(
        &self,
        generation_id: i64,
        attempt: u32,
        worker: Option<&str>,
    ) -> CoreResult<()> {
        let worker = worker.map(str::to_owned);
        self.write(move |tx| {
            let now = now_rfc3339();
            let n = tx
                .prepare_cached(
                    "UPDATE apex_audition.generations SET status = 'running', attempts = ?2,
                         started_at = COALESCE(started_at, ?3)
                     WHERE generation_id = ?1 AND status IN ('pending', 'running')
                       AND (?4 IS NULL OR claimed_by IS NULL OR claimed_by = ?4)",
                )
                .db()?
                .execute(params![generation_id, attempt, now, worker])
                .db()?;
            if n == 0 {
                return Err(Error::NotClaimable(generation_id));
            }
            tx.prepare_cached(
                "INSERT INTO apex_audition.attempts (generation_id, attempt, started_at)
                 VALUES (?1, ?2, ?3)",
            )
            .db()?
            .execute(params![generation_id, attempt, now])
            .db()?;
            Ok(())
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
        self.write(move |tx| {
            let now = now_rfc3339();
            match &end {
                AttemptEnd::Success(r) => {
                    let u = &r.usage;
                    tx.prepare_cached("UPDATE apex_audition.generations SET status = 'success', cache_hit = ?2,
                             input_tokens = ?3, cache_write_tokens = ?4, cache_write_1h_tokens = ?5,
                             cache_read_tokens = ?6, output_tokens = ?7, reasoning_tokens = ?8,
                             cost_usd = ?9, latency_ms = ?10, finish_reason = ?11,
                             provider_request_id = ?12, model_snapshot = ?13, request_hash = ?14,
                             response_text = ?15, error_class = NULL, error_message = NULL,
                             finished_at = ?16
                         WHERE generation_id = ?1").db()?.execute(params![
                            generation_id,
                            u.cache_hit(),
                            u.input_tokens,
                            u.cache_write_tokens,
                            u.cache_write_1h_tokens,
                            u.cache_read_tokens,
                            u.output_tokens,
                            u.reasoning_tokens,
                            r.cost_usd,
                            r.latency_ms,
                            r.finish_reason,
                            r.provider_request_id,
                            r.model_snapshot,
                            r.request_hash,
                            r.response_text,
                            now
                        ],
                    )
                    .db()?;
                    tx.prepare_cached("UPDATE apex_audition.attempts SET finished_at = ?3, outcome = 'success',
                             http_status = 200, provider_request_id = ?4, latency_ms = ?5
                         WHERE generation_id = ?1 AND attempt = ?2").db()?.execute(params![generation_id, attempt, now, r.provider_request_id, r.latency_ms],
                    )
                    .db()?;
                }
                AttemptEnd::Failed {
                    class,
                    message,
                    http_status,
                    provider_request_id,
                    latency_ms,
                    last,
                } => {
                    if *last {
                        tx.prepare_cached("UPDATE apex_audition.generations SET status = 'error', error_class = ?2,
                                 error_message = ?3, provider_request_id = ?4, latency_ms = ?5,
                                 finished_at = ?6
                             WHERE generation_id = ?1").db()?.execute(params![
                                generation_id,
                                class.as_str(),
                                message,
                                provider_request_id,
                                latency_ms,
                                now
                            ],
                        )
                        .db()?;
                    }
                    tx.prepare_cached("UPDATE apex_audition.attempts SET finished_at = ?3, outcome = 'error',
                             http_status = ?4, error_class = ?5, error_message = ?6,
                             provider_request_id = ?7, latency_ms = ?8
                         WHERE generation_id = ?1 AND attempt = ?2").db()?.execute(params![
                            generation_id,
                            attempt,
                            now,
                            http_status,
                            class.as_str(),
                            message,
                            provider_request_id,
                            latency_ms
                        ],
                    )
                    .db()?;
                }
                AttemptEnd::Abandoned => {
                    tx.prepare_cached("UPDATE apex_audition.generations SET status = 'pending'
                         WHERE generation_id = ?1 AND status = 'running'").db()?.execute([generation_id],
                    )
                    .db()?;
                    tx.prepare_cached("UPDATE apex_audition.attempts SET finished_at = ?3, outcome = 'abandoned'
                         WHERE generation_id = ?1 AND attempt = ?2 AND finished_at IS NULL").db()?.execute(params![generation_id, attempt, now],
                    )
                    .db()?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn error_rows(&self, run_id: &RunId) -> CoreResult<Vec<ErrorRow>> {
        let run_id = run_id.clone();
        self.call(move |conn| {
            conn.prepare(
                "SELECT prompt_id, replicate_index, error_message FROM apex_audition.generations
                 WHERE status = 'error' AND run_id = ?1 ORDER BY generation_id",
            )
            .db()?
            .query_map([run_id.as_str()], |r| {
                Ok(ErrorRow {
                    prompt_id: r.get(0)?,
                    replicate_index: r.get(1)?,
                    error_message: r.get(2)?,
                })
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }

    async fn generations_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> CoreResult<Vec<GenerationRow>> {
        let run_id = run_id.clone();
        self.call(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT generation_id, run_id, condition_slug, prompt_id, package_version,
                            context_index, replicate_index, status, cache_hit, attempts,
                            input_tokens, cache_write_tokens, cache_write_1h_tokens,
                            cache_read_tokens, output_tokens, reasoning_tokens, cost_usd,
                            latency_ms, finish_reason, provider_request_id, model_snapshot,
                            request_hash, response_text, error_class, error_message,
                            created_at, started_at, finished_at
                     FROM apex_audition.generations
                     WHERE run_id = ?1 AND generation_id > ?2
                     ORDER BY generation_id LIMIT ?3",
                )
                .db()?;
            stmt.query_map(params![run_id.as_str(), after, limit], |r| {
                Ok(GenerationRow {
                    generation_id: r.get(0)?,
                    run_id: r.get(1)?,
                    condition_slug: r.get(2)?,
                    prompt_id: r.get(3)?,
                    package_version: r.get(4)?,
                    context_index: r.get(5)?,
                    replicate_index: r.get(6)?,
                    status: r.get(7)?,
                    cache_hit: r.get(8)?,
                    attempts: r.get(9)?,
                    input_tokens: r.get(10)?,
                    cache_write_tokens: r.get(11)?,
                    cache_write_1h_tokens: r.get(12)?,
                    cache_read_tokens: r.get(13)?,
                    output_tokens: r.get(14)?,
                    reasoning_tokens: r.get(15)?,
                    cost_usd: r.get(16)?,
                    latency_ms: r.get(17)?,
                    finish_reason: r.get(18)?,
                    provider_request_id: r.get(19)?,
                    model_snapshot: r.get(20)?,
                    request_hash: r.get(21)?,
                    response_text: r.get(22)?,
                    error_class: r.get(23)?,
                    error_message: r.get(24)?,
                    created_at: r.get(25)?,
                    started_at: r.get(26)?,
                    finished_at: r.get(27)?,
                })
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
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

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("apex-store-unit-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
