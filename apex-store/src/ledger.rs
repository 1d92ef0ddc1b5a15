//! The ledger's logic, written once for both backends: every statement,
//! every column list, every row mapper. A backend supplies a [`Tx`] (one
//! transaction, or one savepoint of a group commit) and only what its
//! engine does differently: locking, group commit, schema set-up and the
//! read-only entry point.

use std::collections::HashMap;

use apex_core::run::{AfterFailure, AttemptEnd};
use apex_core::run::{BatchItemRecord, BatchRecord, BatchState, Wave};
use apex_core::store::{ConditionInfo, ConditionUsage, PacingShare};
use apex_core::time::now_rfc3339;
use apex_core::{
    AttemptRow, Claim, Condition, ContextPackage, Error, ErrorRow, GenerationRow, IngestReport,
    NewRun, PackageRef, Plan, ProviderKind, RegisterReport, RunId, RunInfo, RunState, StatusCounts,
    StatusRow, Usage, WorkItem,
};

use crate::sql::{Record, Statement, params};

type CoreResult<T> = apex_core::Result<T>;

/// What a transaction must hold before it reads and decides.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Serialize<'a> {
    /// Registering conditions ("used by a run" is checked consistently).
    Conditions,
    /// Ingesting packages (current versions change consistently).
    Packages,
    /// Claiming a run's work (claimers of one run take turns).
    Claims(&'a RunId),
}

/// One transaction of a backend.
pub(crate) trait Tx {
    /// Runs a statement; the number of rows it changed.
    async fn execute(
        &mut self,
        statement: &Statement,
        params: &[apex_core::SqlValue],
    ) -> CoreResult<u64>;

    /// Runs a query; its rows.
    async fn query(
        &mut self,
        statement: &Statement,
        params: &[apex_core::SqlValue],
    ) -> CoreResult<Vec<Record>>;

    /// Takes what this engine needs to serialise such transactions (a
    /// no-op where the transaction already holds the write lock).
    async fn serialize(&mut self, what: Serialize<'_>) -> CoreResult<()>;

    /// At most one row.
    async fn query_opt(
        &mut self,
        statement: &Statement,
        params: &[apex_core::SqlValue],
    ) -> CoreResult<Option<Record>> {
        Ok(self.query(statement, params).await?.into_iter().next())
    }
}

// ---------------------------------------------------------------- conditions

static CONDITION_BY_SLUG: Statement =
    Statement::new("SELECT * FROM apex_audition.conditions WHERE slug = ?1");
static CONDITION_USED_BY: Statement = Statement::new(
    "SELECT run_id FROM apex_audition.run_conditions WHERE condition_slug = ?1 LIMIT 1",
);
static CONDITION_UPDATE: Statement = Statement::new(
    "UPDATE apex_audition.conditions SET provider = ?2, model = ?3, temperature = ?4,
         top_p = ?5, max_tokens = ?6, reasoning_effort = ?7, params_json = ?8, updated_at = ?9
     WHERE slug = ?1",
);
static CONDITION_INSERT: Statement = Statement::new(
    "INSERT INTO apex_audition.conditions (slug, provider, model, temperature, top_p,
         max_tokens, reasoning_effort, params_json, created_at, updated_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
);
static CONDITIONS_WITH_RUNS: Statement = Statement::new(
    "SELECT c.*, (SELECT COUNT(*) FROM apex_audition.run_conditions r
                  WHERE r.condition_slug = c.slug) AS runs
     FROM apex_audition.conditions c ORDER BY c.slug",
);

fn condition_from(r: &Record) -> CoreResult<Condition> {
    // The canonical JSON holds every parameter (the columns only the common
    // ones, for SQL readers); the slug is its own column.
    let slug = r.text("slug")?;
    let params = r.text("params_json")?;
    let corrupt = |problem: String| {
        Error::Corrupt(format!(
            "condition `{slug}` in the ledger: {problem}; register it again from its conditions file"
        ))
    };
    let mut value: serde_json::Value =
        serde_json::from_str(&params).map_err(|e| corrupt(e.to_string()))?;
    let map = value
        .as_object_mut()
        .ok_or_else(|| corrupt("params_json is not an object".into()))?;
    map.insert("slug".into(), serde_json::Value::String(slug.clone()));
    serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))
}

pub(crate) async fn register_conditions(
    tx: &mut impl Tx,
    conditions: &[Condition],
) -> CoreResult<RegisterReport> {
    tx.serialize(Serialize::Conditions).await?;
    let mut report = RegisterReport::default();
    let now = now_rfc3339();
    for c in conditions {
        let existing = tx.query_opt(&CONDITION_BY_SLUG, params![&c.slug]).await?;
        let params = c.params_json();
        // The same nine values insert a new condition or replace an unused one.
        let values = params![
            &c.slug,
            c.provider.as_str(),
            &c.model,
            c.temperature,
            c.top_p,
            c.max_tokens,
            &c.reasoning_effort,
            &params,
            &now
        ];
        let Some(existing) = existing else {
            tx.execute(&CONDITION_INSERT, values).await?;
            report.added.push(c.slug.clone());
            continue;
        };
        let old = condition_from(&existing)?;
        if old.params_json() == params {
            report.unchanged.push(c.slug.clone());
            continue;
        }
        if let Some(used) = tx.query_opt(&CONDITION_USED_BY, params![&c.slug]).await? {
            return Err(Error::ConditionImmutable {
                slug: c.slug.clone(),
                run_id: used.text("run_id")?,
                change: old.first_difference(c).unwrap_or_default(),
            });
        }
        tx.execute(&CONDITION_UPDATE, values).await?;
        report.updated.push(c.slug.clone());
    }
    Ok(report)
}

pub(crate) async fn conditions(tx: &mut impl Tx) -> CoreResult<Vec<ConditionInfo>> {
    tx.query(&CONDITIONS_WITH_RUNS, params![])
        .await?
        .iter()
        .map(|r| {
            Ok(ConditionInfo {
                condition: condition_from(r)?,
                runs: r.u64("runs")?,
            })
        })
        .collect()
}

pub(crate) async fn condition(tx: &mut impl Tx, slug: &str) -> CoreResult<Condition> {
    let row = tx
        .query_opt(&CONDITION_BY_SLUG, params![slug])
        .await?
        .ok_or_else(|| Error::UnknownCondition(slug.to_owned()))?;
    condition_from(&row)
}

// ------------------------------------------------------------------ packages

static CURRENT_VERSIONS: Statement =
    Statement::new("SELECT prompt_id, current_version FROM apex_audition.context_packages");
static CURRENT_VERSION_OF: Statement = Statement::new(
    "SELECT current_version FROM apex_audition.context_packages WHERE prompt_id = ?1",
);
static VERSION_INSERT: Statement = Statement::new(
    "INSERT INTO apex_audition.context_versions (prompt_id, version, system_text,
         context_text, prompt_text, estimated_tokens, byte_len, ingested_at, o200k_tokens,
         o200k_prompt_tokens)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
     ON CONFLICT (prompt_id, version) DO NOTHING",
);
static PACKAGE_UPSERT: Statement = Statement::new(
    "INSERT INTO apex_audition.context_packages (prompt_id, current_version, updated_at)
     VALUES (?1, ?2, ?3)
     ON CONFLICT (prompt_id) DO UPDATE SET current_version = excluded.current_version,
         updated_at = excluded.updated_at",
);
static CURRENT_PACKAGES: Statement = Statement::new(
    "SELECT p.prompt_id, p.current_version, v.estimated_tokens, v.byte_len,
            COALESCE(v.o200k_tokens, v.estimated_tokens) AS o200k_tokens
     FROM apex_audition.context_packages p
     JOIN apex_audition.context_versions v
       ON v.prompt_id = p.prompt_id AND v.version = p.current_version
     ORDER BY p.prompt_id",
);
static PACKAGE_O200K: Statement = Statement::new(
    "SELECT o200k_tokens, o200k_prompt_tokens FROM apex_audition.context_versions
     WHERE prompt_id = ?1 AND version = ?2",
);
static PACKAGE_TEXT: Statement = Statement::new(
    "SELECT system_text, context_text, prompt_text FROM apex_audition.context_versions
     WHERE prompt_id = ?1 AND version = ?2",
);

/// Each package's current version, by id (to count only what is new).
pub(crate) async fn current_versions(tx: &mut impl Tx) -> CoreResult<HashMap<String, String>> {
    tx.query(&CURRENT_VERSIONS, params![])
        .await?
        .iter()
        .map(|r| Ok((r.text("prompt_id")?, r.text("current_version")?)))
        .collect()
}

/// Stores packages; `o200k` holds the exact counts of the new ones (see
/// [`crate::o200k_for_new`]), counted before the transaction began.
pub(crate) async fn ingest_packages(
    tx: &mut impl Tx,
    packages: &[ContextPackage],
    o200k: Vec<Option<(u64, u64)>>,
) -> CoreResult<IngestReport> {
    tx.serialize(Serialize::Packages).await?;
    let mut report = IngestReport::default();
    let now = now_rfc3339();
    for (p, o200k) in packages.iter().zip(o200k) {
        let current = match tx.query_opt(&CURRENT_VERSION_OF, params![p.id()]).await? {
            Some(r) => Some(r.text("current_version")?),
            None => None,
        };
        if current.as_deref() == Some(p.version()) {
            report.unchanged.push(p.id().to_owned());
            continue;
        }
        // Another process may have changed the current version since the
        // counts were taken: count now if this one was skipped.
        let (prefix, rest) = o200k.unwrap_or_else(|| apex_core::tokens::Tokenizer::O200k.split(p));
        tx.execute(
            &VERSION_INSERT,
            params![
                p.id(),
                p.version(),
                p.system().map(|s| s.to_string()),
                p.context().to_string(),
                p.prompt().to_string(),
                p.estimated_input_tokens(),
                p.byte_len(),
                &now,
                prefix + rest,
                rest
            ],
        )
        .await?;
        tx.execute(&PACKAGE_UPSERT, params![p.id(), p.version(), &now])
            .await?;
        match current {
            None => report.added.push(p.id().to_owned()),
            Some(old) => report
                .new_versions
                .push((p.id().to_owned(), old, p.version().to_owned())),
        }
    }
    Ok(report)
}

pub(crate) async fn current_packages(tx: &mut impl Tx) -> CoreResult<Vec<PackageRef>> {
    tx.query(&CURRENT_PACKAGES, params![])
        .await?
        .iter()
        .map(|r| {
            Ok(PackageRef {
                id: r.text("prompt_id")?,
                version: r.text("current_version")?,
                estimated_tokens: r.u64("estimated_tokens")?,
                byte_len: r.u64("byte_len")?,
                o200k_tokens: r.u64("o200k_tokens")?,
            })
        })
        .collect()
}

pub(crate) async fn package(
    tx: &mut impl Tx,
    id: &str,
    version: &str,
) -> CoreResult<ContextPackage> {
    let r = tx
        .query_opt(&PACKAGE_TEXT, params![id, version])
        .await?
        .ok_or_else(|| {
            Error::Corrupt(format!(
                "context package `{id}` version {version} is not stored"
            ))
        })?;
    ContextPackage::from_stored(
        id.to_owned(),
        version,
        r.opt_text("system_text")?,
        r.text("context_text")?,
        r.text("prompt_text")?,
    )
}

pub(crate) async fn o200k_split(
    tx: &mut impl Tx,
    id: &str,
    version: &str,
) -> CoreResult<Option<(u64, u64)>> {
    let Some(r) = tx.query_opt(&PACKAGE_O200K, params![id, version]).await? else {
        return Ok(None);
    };
    let (total, prompt) = (
        r.opt_u64("o200k_tokens")?,
        r.opt_u64("o200k_prompt_tokens")?,
    );
    Ok(match (total, prompt) {
        (Some(total), Some(prompt)) if prompt <= total => Some((total - prompt, prompt)),
        _ => None,
    })
}

// ---------------------------------------------------------------------- runs

static RUN_INSERT: Statement = Statement::new(
    "INSERT INTO apex_audition.runs (run_id, created_by, notes, flags_json, state,
         replicates, context_limit, dry_run, apex_version, created_at, started_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
);
static RUN_CONDITION_INSERT: Statement = Statement::new(
    "INSERT INTO apex_audition.run_conditions (run_id, condition_slug, position, params_json)
     VALUES (?1, ?2, ?3, ?4)",
);
static GENERATION_INSERT: Statement = Statement::new(
    "INSERT INTO apex_audition.generations (run_id, condition_slug, prompt_id,
         package_version, context_index, replicate_index, created_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
);
static RUN_BY_ID: Statement = Statement::new(
    "SELECT created_by, notes, flags_json, state, created_at, started_at, finished_at, replicates
     FROM apex_audition.runs WHERE run_id = ?1",
);
static RUN_COUNTS: Statement = Statement::new(
    "SELECT status, COUNT(*) AS n, CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) AS cost
     FROM apex_audition.generations WHERE run_id = ?1 GROUP BY status",
);
static RUN_CONDITION_PARAMS: Statement = Statement::new(
    "SELECT condition_slug, params_json FROM apex_audition.run_conditions
     WHERE run_id = ?1 ORDER BY position",
);
static RUN_IDS: Statement =
    Statement::new("SELECT run_id FROM apex_audition.runs ORDER BY created_at DESC, run_id DESC");
static RUN_FLAGS: Statement =
    Statement::new("UPDATE apex_audition.runs SET flags_json = ?2 WHERE run_id = ?1");
static RUN_STATE_RUNNING: Statement = Statement::new(
    "UPDATE apex_audition.runs SET state = ?2, started_at = COALESCE(started_at, ?3),
         finished_at = NULL
     WHERE run_id = ?1",
);
static RUN_STATE_PLANNED: Statement = Statement::new(
    "UPDATE apex_audition.runs SET state = ?2 WHERE run_id = ?1 AND CAST(?3 AS TEXT) IS NOT NULL",
);
static RUN_STATE_ENDED: Statement =
    Statement::new("UPDATE apex_audition.runs SET state = ?2, finished_at = ?3 WHERE run_id = ?1");

pub(crate) async fn create_run(tx: &mut impl Tx, run: &NewRun, plan: &Plan) -> CoreResult<()> {
    let now = now_rfc3339();
    let state = if run.dry_run {
        RunState::Planned
    } else {
        RunState::Running
    };
    tx.execute(
        &RUN_INSERT,
        params![
            run.run_id.as_str(),
            &run.created_by,
            &run.notes,
            run.flags.to_string(),
            state.as_str(),
            plan.options.replicates,
            plan.options.limit,
            run.dry_run,
            env!("CARGO_PKG_VERSION"),
            &now,
            (!run.dry_run).then(|| now.clone())
        ],
    )
    .await?;
    for (position, c) in plan.conditions.iter().enumerate() {
        // The plan must carry the parameters the store has: a stale copy
        // would record one thing and send another.
        let stored = condition(tx, &c.slug).await?;
        if stored.params_json() != c.params_json() {
            return Err(Error::store_msg(format!(
                "condition `{}` changed while the run was being planned; plan again",
                c.slug
            )));
        }
        tx.execute(
            &RUN_CONDITION_INSERT,
            params![run.run_id.as_str(), &c.slug, position, c.params_json()],
        )
        .await?;
    }
    for cell in plan.cells() {
        tx.execute(
            &GENERATION_INSERT,
            params![
                run.run_id.as_str(),
                &cell.condition_slug,
                &cell.prompt_id,
                &cell.package_version,
                cell.context_index,
                cell.replicate_index,
                &now
            ],
        )
        .await?;
    }
    Ok(())
}

pub(crate) async fn load_run(tx: &mut impl Tx, run_id: &RunId) -> CoreResult<RunInfo> {
    let row = tx
        .query_opt(&RUN_BY_ID, params![run_id.as_str()])
        .await?
        .ok_or_else(|| Error::UnknownRun(run_id.to_string()))?;
    let mut counts = StatusCounts::default();
    let mut cost_usd = 0.0;
    for r in tx.query(&RUN_COUNTS, params![run_id.as_str()]).await? {
        let (status, n) = (r.text("status")?, r.u64("n")?);
        cost_usd += r.f64("cost")?;
        match status.as_str() {
            "pending" => counts.pending = n,
            "running" => counts.running = n,
            "success" => counts.success = n,
            "error" => counts.error = n,
            other => {
                return Err(Error::Corrupt(format!(
                    "run {run_id} has {n} generation(s) with unknown status `{other}`; the ledger was edited by hand"
                )));
            }
        }
    }
    let condition_slugs = tx
        .query(&RUN_CONDITION_PARAMS, params![run_id.as_str()])
        .await?
        .iter()
        .map(|r| r.text("condition_slug"))
        .collect::<CoreResult<_>>()?;
    let state = row.text("state")?;
    let flags = row.text("flags_json")?;
    Ok(RunInfo {
        run_id: run_id.clone(),
        created_by: row.opt_text("created_by")?,
        notes: row.opt_text("notes")?,
        flags: serde_json::from_str(&flags).map_err(|e| {
            Error::Corrupt(format!(
                "run {run_id} has unreadable flags ({e}); the ledger was edited by hand"
            ))
        })?,
        state: RunState::parse(&state)
            .ok_or_else(|| Error::Corrupt(format!("run {run_id} has unknown state `{state}`")))?,
        created_at: row.text("created_at")?,
        started_at: row.opt_text("started_at")?,
        finished_at: row.opt_text("finished_at")?,
        replicates: row.u32("replicates")?,
        condition_slugs,
        counts,
        cost_usd,
    })
}

pub(crate) async fn runs(tx: &mut impl Tx) -> CoreResult<Vec<RunInfo>> {
    let mut runs = Vec::new();
    for r in tx.query(&RUN_IDS, params![]).await? {
        let id = RunId::parse(&r.text("run_id")?)?;
        runs.push(load_run(tx, &id).await?);
    }
    Ok(runs)
}

pub(crate) async fn run_conditions(tx: &mut impl Tx, run_id: &RunId) -> CoreResult<Vec<Condition>> {
    load_run(tx, run_id).await?;
    tx.query(&RUN_CONDITION_PARAMS, params![run_id.as_str()])
        .await?
        .iter()
        .map(|r| {
            let slug = r.text("condition_slug")?;
            let bad = |e: serde_json::Error| Error::Corrupt(format!("run condition `{slug}`: {e}"));
            let mut value: serde_json::Value =
                serde_json::from_str(&r.text("params_json")?).map_err(bad)?;
            value["slug"] = serde_json::Value::String(slug.clone());
            serde_json::from_value(value).map_err(bad)
        })
        .collect()
}

pub(crate) async fn set_run_flags(
    tx: &mut impl Tx,
    run_id: &RunId,
    flags: &serde_json::Value,
) -> CoreResult<()> {
    let n = tx
        .execute(&RUN_FLAGS, params![run_id.as_str(), flags.to_string()])
        .await?;
    if n == 0 {
        return Err(Error::UnknownRun(run_id.to_string()));
    }
    Ok(())
}

pub(crate) async fn set_run_state(
    tx: &mut impl Tx,
    run_id: &RunId,
    state: RunState,
) -> CoreResult<()> {
    let statement = match state {
        RunState::Running => &RUN_STATE_RUNNING,
        RunState::Planned => &RUN_STATE_PLANNED,
        RunState::Finished | RunState::Interrupted => &RUN_STATE_ENDED,
    };
    let n = tx
        .execute(
            statement,
            params![run_id.as_str(), state.as_str(), now_rfc3339()],
        )
        .await?;
    if n == 0 {
        return Err(Error::UnknownRun(run_id.to_string()));
    }
    Ok(())
}

// -------------------------------------------------------------------- claims

/// Claimable: unfinished and unclaimed, or held by a worker whose heartbeat
/// is stale (or unknown). `?2` is the claimer, `?3` the oldest live heartbeat.
macro_rules! claimable {
    () => {
        "g.status IN ('pending', 'running') AND g.claimed_by IS DISTINCT FROM ?2 AND (
             g.claimed_by IS NULL OR NOT EXISTS (
                 SELECT 1 FROM apex_audition.workers w
                 WHERE w.worker = g.claimed_by AND w.heartbeat_at >= ?3))"
    };
}

static HEARTBEAT: Statement = Statement::new(
    "INSERT INTO apex_audition.workers (worker, run_id, started_at, heartbeat_at)
     VALUES (?1, ?2, ?3, ?3)
     ON CONFLICT (worker) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
);
static CLAIMABLE_GROUPS: Statement = Statement::new(concat!(
    "SELECT g.condition_slug, g.prompt_id FROM apex_audition.generations g
     WHERE g.run_id = ?1 AND ",
    claimable!(),
    " GROUP BY g.condition_slug, g.prompt_id ORDER BY MIN(g.generation_id) LIMIT ?4"
));
static CLAIM_GROUP: Statement = Statement::new(concat!(
    "UPDATE apex_audition.generations AS g SET claimed_by = ?2, claimed_at = ?5
     WHERE g.run_id = ?1 AND ",
    claimable!(),
    " AND g.condition_slug = ?4 AND g.prompt_id = ?6"
));
static HELD_ITEMS: Statement = Statement::new(
    "SELECT generation_id, condition_slug, prompt_id, package_version, context_index,
            replicate_index, attempts
     FROM apex_audition.generations
     WHERE run_id = ?1 AND claimed_by = ?2 AND status IN ('pending', 'running')
     ORDER BY generation_id",
);
static HELD_BY_OTHERS: Statement = Statement::new(
    "SELECT COUNT(*) AS n FROM apex_audition.generations g
     JOIN apex_audition.workers w ON w.worker = g.claimed_by
     WHERE g.run_id = ?1 AND g.status IN ('pending', 'running')
       AND g.claimed_by <> ?2 AND w.heartbeat_at >= ?3",
);
static CLAIM_HOLDERS: Statement = Statement::new(
    "SELECT DISTINCT claimed_by FROM apex_audition.generations
     WHERE run_id = ?1 AND status IN ('pending', 'running') AND claimed_by IS NOT NULL
     ORDER BY claimed_by",
);
static RELEASE_CLAIMS: Statement = Statement::new(
    "UPDATE apex_audition.generations SET claimed_by = NULL, claimed_at = NULL
     WHERE run_id = ?1 AND claimed_by = ?2 AND status IN ('pending', 'running')",
);
static FORGET_WORKER: Statement =
    Statement::new("DELETE FROM apex_audition.workers WHERE worker = ?1");

fn work_item_from(r: &Record) -> CoreResult<WorkItem> {
    Ok(WorkItem {
        generation_id: r.i64("generation_id")?,
        condition_slug: r.text("condition_slug")?,
        prompt_id: r.text("prompt_id")?,
        package_version: r.text("package_version")?,
        context_index: r.u32("context_index")?,
        replicate_index: r.u32("replicate_index")?,
        attempts: r.u32("attempts")?,
    })
}

pub(crate) async fn claim_work(
    tx: &mut impl Tx,
    run_id: &RunId,
    worker: &str,
    max_groups: u32,
    stale_before: &str,
) -> CoreResult<Claim> {
    tx.serialize(Serialize::Claims(run_id)).await?;
    let now = now_rfc3339();
    let run = run_id.as_str();
    tx.execute(&HEARTBEAT, params![worker, run, &now]).await?;
    let groups = tx
        .query(
            &CLAIMABLE_GROUPS,
            params![run, worker, stale_before, max_groups],
        )
        .await?;
    for group in groups {
        let (slug, prompt) = (group.text("condition_slug")?, group.text("prompt_id")?);
        tx.execute(
            &CLAIM_GROUP,
            params![run, worker, stale_before, slug, &now, prompt],
        )
        .await?;
    }
    let items = tx
        .query(&HELD_ITEMS, params![run, worker])
        .await?
        .iter()
        .map(work_item_from)
        .collect::<CoreResult<_>>()?;
    let held_by_others = match tx
        .query_opt(&HELD_BY_OTHERS, params![run, worker, stale_before])
        .await?
    {
        Some(r) => r.u64("n")?,
        None => 0,
    };
    Ok(Claim {
        items,
        held_by_others,
    })
}

static PACING_RECORD: Statement = Statement::new(
    "INSERT INTO apex_audition.pacing
       (bucket_key, worker, seen_ms, requests, input_tokens, output_tokens, work)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
     ON CONFLICT (bucket_key, worker) DO UPDATE SET seen_ms = excluded.seen_ms,
       requests = excluded.requests, input_tokens = excluded.input_tokens,
       output_tokens = excluded.output_tokens, work = excluded.work",
);
static PACING_SHARES: Statement = Statement::new(
    "SELECT bucket_key,
            CAST(COUNT(CASE WHEN work > 0 OR worker = ?1 THEN 1 END) AS BIGINT) AS members,
            CAST(COALESCE(SUM(CASE WHEN worker <> ?1 THEN work ELSE 0 END), 0) AS BIGINT) AS others_work,
            CAST(COALESCE(SUM(CASE WHEN worker <> ?1 THEN requests ELSE 0 END), 0) AS BIGINT) AS requests,
            CAST(COALESCE(SUM(CASE WHEN worker <> ?1 THEN input_tokens ELSE 0 END), 0) AS BIGINT) AS input_tokens,
            CAST(COALESCE(SUM(CASE WHEN worker <> ?1 THEN output_tokens ELSE 0 END), 0) AS BIGINT) AS output_tokens
     FROM apex_audition.pacing WHERE seen_ms >= ?2
     GROUP BY bucket_key ORDER BY bucket_key",
);
static PACING_LEAVE: Statement =
    Statement::new("DELETE FROM apex_audition.pacing WHERE worker = ?1");

/// Milliseconds since the Unix epoch: the clock pacing rows are compared by.
fn epoch_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

pub(crate) async fn share_pacing(
    tx: &mut impl Tx,
    worker: &str,
    usage: &[(String, [u64; 3], u64)],
    fresh_within: std::time::Duration,
) -> CoreResult<Vec<PacingShare>> {
    let now = epoch_ms();
    for (key, [requests, input, output], work) in usage {
        tx.execute(
            &PACING_RECORD,
            params![key.as_str(), worker, now, *requests, *input, *output, *work],
        )
        .await?;
    }
    let since = now - i64::try_from(fresh_within.as_millis()).unwrap_or(i64::MAX / 2);
    tx.query(&PACING_SHARES, params![worker, since])
        .await?
        .iter()
        .map(|r| {
            Ok(PacingShare {
                key: r.text("bucket_key")?,
                members: r.u32("members")?,
                others_work: r.u64("others_work")?,
                others: [
                    r.u64("requests")?,
                    r.u64("input_tokens")?,
                    r.u64("output_tokens")?,
                ],
            })
        })
        .collect()
}

pub(crate) async fn leave_pacing(tx: &mut impl Tx, worker: &str) -> CoreResult<()> {
    tx.execute(&PACING_LEAVE, params![worker]).await?;
    Ok(())
}

pub(crate) async fn claim_holders(tx: &mut impl Tx, run_id: &RunId) -> CoreResult<Vec<String>> {
    tx.query(&CLAIM_HOLDERS, params![run_id.as_str()])
        .await?
        .iter()
        .map(|r| r.text("claimed_by"))
        .collect()
}

pub(crate) async fn renew_claims(tx: &mut impl Tx, run_id: &RunId, worker: &str) -> CoreResult<()> {
    tx.execute(&HEARTBEAT, params![worker, run_id.as_str(), now_rfc3339()])
        .await?;
    Ok(())
}

pub(crate) async fn release_claims(
    tx: &mut impl Tx,
    run_id: &RunId,
    worker: &str,
) -> CoreResult<()> {
    tx.execute(
        &ATTEMPTS_OF_RELEASED,
        params![run_id.as_str(), worker, now_rfc3339()],
    )
    .await?;
    tx.execute(&RELEASE_CLAIMS, params![run_id.as_str(), worker])
        .await?;
    tx.execute(&FORGET_WORKER, params![worker]).await?;
    Ok(())
}

// ------------------------------------------------------------------ attempts

static RESET_ERRORS: Statement = Statement::new(
    "UPDATE apex_audition.generations SET status = 'pending', error_class = NULL,
         error_message = NULL, finished_at = NULL
     WHERE run_id = ?1 AND status = 'error'",
);
static GENERATION_BEGIN: Statement = Statement::new(
    "UPDATE apex_audition.generations SET status = 'running', attempts = ?2,
         started_at = COALESCE(started_at, ?3)
     WHERE generation_id = ?1 AND status IN ('pending', 'running')
       AND (CAST(?4 AS TEXT) IS NULL OR claimed_by IS NULL OR claimed_by = ?4)",
);
/// Attempts left open by a process that died: closed as abandoned when
/// their generation is sent again.
static ATTEMPTS_ORPHANED: Statement = Statement::new(
    "UPDATE apex_audition.attempts SET finished_at = ?3, outcome = 'abandoned'
     WHERE generation_id = ?1 AND attempt < ?2 AND finished_at IS NULL",
);
/// The open attempts of a worker's unfinished generations, closed as
/// abandoned when its claims are given back (a live worker has none).
static ATTEMPTS_OF_RELEASED: Statement = Statement::new(
    "UPDATE apex_audition.attempts SET finished_at = ?3, outcome = 'abandoned'
     WHERE finished_at IS NULL AND generation_id IN (
         SELECT generation_id FROM apex_audition.generations
         WHERE run_id = ?1 AND claimed_by = ?2 AND status IN ('pending', 'running'))",
);
static ATTEMPT_BEGIN: Statement = Statement::new(
    "INSERT INTO apex_audition.attempts (generation_id, attempt, started_at)
     VALUES (?1, ?2, ?3)",
);
static GENERATION_SUCCESS: Statement = Statement::new(
    "UPDATE apex_audition.generations SET status = 'success', cache_hit = ?2,
         input_tokens = ?3, cache_write_tokens = ?4, cache_write_1h_tokens = ?5,
         cache_read_tokens = ?6, output_tokens = ?7, reasoning_tokens = ?8,
         cost_usd = ?9, latency_ms = ?10, finish_reason = ?11,
         provider_request_id = ?12, model_snapshot = ?13, request_hash = ?14,
         response_text = ?15, error_class = NULL, error_message = NULL,
         finished_at = ?16, transport = ?17
     WHERE generation_id = ?1 AND status <> 'success'",
);
static ATTEMPT_SUCCESS: Statement = Statement::new(
    "UPDATE apex_audition.attempts SET finished_at = ?3, outcome = 'success',
         http_status = 200, provider_request_id = ?4, latency_ms = ?5
     WHERE generation_id = ?1 AND attempt = ?2",
);
static GENERATION_ERROR: Statement = Statement::new(
    "UPDATE apex_audition.generations SET status = 'error', error_class = ?2,
         error_message = ?3, provider_request_id = ?4, latency_ms = ?5, finished_at = ?6
     WHERE generation_id = ?1",
);
static ATTEMPT_ERROR: Statement = Statement::new(
    "UPDATE apex_audition.attempts SET finished_at = ?3, outcome = 'error',
         http_status = ?4, error_class = ?5, error_message = ?6,
         provider_request_id = ?7, latency_ms = ?8
     WHERE generation_id = ?1 AND attempt = ?2",
);
static GENERATION_ABANDON: Statement = Statement::new(
    "UPDATE apex_audition.generations SET status = 'pending'
     WHERE generation_id = ?1 AND status = 'running'",
);
static ATTEMPT_ABANDON: Statement = Statement::new(
    "UPDATE apex_audition.attempts SET finished_at = ?3, outcome = 'abandoned'
     WHERE generation_id = ?1 AND attempt = ?2 AND finished_at IS NULL",
);

pub(crate) async fn reset_errors(tx: &mut impl Tx, run_id: &RunId) -> CoreResult<u64> {
    load_run(tx, run_id).await?;
    tx.execute(&RESET_ERRORS, params![run_id.as_str()]).await
}

pub(crate) async fn begin_attempt(
    tx: &mut impl Tx,
    generation_id: i64,
    attempt: u32,
    worker: Option<&str>,
) -> CoreResult<()> {
    let now = now_rfc3339();
    let n = tx
        .execute(
            &GENERATION_BEGIN,
            params![generation_id, attempt, &now, worker],
        )
        .await?;
    if n == 0 {
        return Err(Error::NotClaimable(generation_id));
    }
    tx.execute(&ATTEMPTS_ORPHANED, params![generation_id, attempt, &now])
        .await?;
    tx.execute(&ATTEMPT_BEGIN, params![generation_id, attempt, &now])
        .await?;
    Ok(())
}

pub(crate) async fn end_attempt(
    tx: &mut impl Tx,
    generation_id: i64,
    attempt: u32,
    end: &AttemptEnd,
) -> CoreResult<()> {
    let now = now_rfc3339();
    match end {
        AttemptEnd::Success(r) => {
            let u = &r.usage;
            tx.execute(
                &GENERATION_SUCCESS,
                params![
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
                    &r.finish_reason,
                    &r.provider_request_id,
                    &r.model_snapshot,
                    &r.request_hash,
                    &r.response_text,
                    &now,
                    r.transport.as_str()
                ],
            )
            .await?;
            tx.execute(
                &ATTEMPT_SUCCESS,
                params![
                    generation_id,
                    attempt,
                    &now,
                    &r.provider_request_id,
                    r.latency_ms
                ],
            )
            .await?;
        }
        AttemptEnd::Failed {
            class,
            message,
            http_status,
            provider_request_id,
            latency_ms,
            then,
        } => {
            if *then == AfterFailure::Pending {
                tx.execute(&GENERATION_ABANDON, params![generation_id])
                    .await?;
            }
            if *then == AfterFailure::Error {
                tx.execute(
                    &GENERATION_ERROR,
                    params![
                        generation_id,
                        class.as_str(),
                        message,
                        provider_request_id,
                        *latency_ms,
                        &now
                    ],
                )
                .await?;
            }
            tx.execute(
                &ATTEMPT_ERROR,
                params![
                    generation_id,
                    attempt,
                    &now,
                    http_status.map(u32::from),
                    class.as_str(),
                    message,
                    provider_request_id,
                    *latency_ms
                ],
            )
            .await?;
        }
        AttemptEnd::Abandoned => {
            tx.execute(&GENERATION_ABANDON, params![generation_id])
                .await?;
            tx.execute(&ATTEMPT_ABANDON, params![generation_id, attempt, &now])
                .await?;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------- reports

/// The seed's first monitoring query, verbatim but for the run id.
static STATUS_COUNTS: Statement = Statement::new(
    "SELECT
  status,
  COUNT(*) as count,
  COUNT(*) FILTER (WHERE cache_hit) as cache_hits
FROM apex_audition.generations
WHERE run_id = ?1
GROUP BY status",
);
static REMAINING_BY_CONDITION: Statement = Statement::new(
    "SELECT condition_slug, COUNT(*) AS n FROM apex_audition.generations
     WHERE run_id = ?1 AND status IN ('pending', 'running')
     GROUP BY condition_slug ORDER BY condition_slug",
);
static ATTEMPTS_PAGE: Statement = Statement::new(
    "SELECT a.generation_id, a.attempt, a.started_at, a.finished_at,
            COALESCE(CASE WHEN a.outcome = 'error' THEN a.error_class ELSE a.outcome END,
                     'in flight') AS outcome
     FROM apex_audition.attempts a
     JOIN apex_audition.generations g ON g.generation_id = a.generation_id
     WHERE g.run_id = ?1 AND (a.generation_id > ?2 OR (a.generation_id = ?2 AND a.attempt > ?3))
     ORDER BY a.generation_id, a.attempt LIMIT ?4",
);
static ERROR_ROWS: Statement = Statement::new(
    "SELECT prompt_id, replicate_index, error_message FROM apex_audition.generations
     WHERE status = 'error' AND run_id = ?1 ORDER BY generation_id",
);
/// The one column list of a generation row.
macro_rules! generation_columns {
    ($text:literal) => {
        concat!(
            "SELECT generation_id, run_id, condition_slug, prompt_id, package_version,
            context_index, replicate_index, status, cache_hit, attempts,
            input_tokens, cache_write_tokens, cache_write_1h_tokens,
            cache_read_tokens, output_tokens, reasoning_tokens, cost_usd,
            latency_ms, finish_reason, provider_request_id, model_snapshot,
            request_hash, ",
            $text,
            " AS response_text, CAST(OCTET_LENGTH(response_text) AS BIGINT) AS response_length,
            error_class, error_message, created_at, started_at, finished_at, transport
     FROM apex_audition.generations
     WHERE run_id = ?1 AND generation_id > ?2
     ORDER BY generation_id LIMIT ?3"
        )
    };
}
static GENERATIONS_PAGE: Statement = Statement::new(generation_columns!("response_text"));
/// The same rows without their texts (their lengths kept).
static GENERATIONS_BRIEF_PAGE: Statement =
    Statement::new(generation_columns!("CAST(NULL AS TEXT)"));
static USAGE_BY_CONDITION: Statement = Statement::new(
    "SELECT condition_slug, COUNT(*) AS generations,
            CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens,
            CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT) AS cache_write_tokens,
            CAST(COALESCE(SUM(cache_write_1h_tokens), 0) AS BIGINT) AS cache_write_1h_tokens,
            CAST(COALESCE(SUM(cache_read_tokens), 0) AS BIGINT) AS cache_read_tokens,
            CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens,
            CAST(COALESCE(SUM(reasoning_tokens), 0) AS BIGINT) AS reasoning_tokens,
            CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) AS cost_usd
     FROM apex_audition.generations WHERE run_id = ?1 AND status = 'success'
     GROUP BY condition_slug ORDER BY condition_slug",
);
static SUCCESS_LATENCY_AT: Statement = Statement::new(
    "SELECT latency_ms FROM apex_audition.generations
     WHERE run_id = ?1 AND condition_slug = ?2 AND status = 'success'
     ORDER BY latency_ms LIMIT 1 OFFSET ?3",
);
static RUN_PACKAGES: Statement = Statement::new(
    "SELECT DISTINCT prompt_id, package_version FROM apex_audition.generations
     WHERE run_id = ?1 ORDER BY prompt_id, package_version",
);

fn usage_from(r: &Record) -> CoreResult<Usage> {
    Ok(Usage {
        input_tokens: r.opt_u64("input_tokens")?.unwrap_or(0),
        cache_write_tokens: r.opt_u64("cache_write_tokens")?.unwrap_or(0),
        cache_write_1h_tokens: r.opt_u64("cache_write_1h_tokens")?.unwrap_or(0),
        cache_read_tokens: r.opt_u64("cache_read_tokens")?.unwrap_or(0),
        output_tokens: r.opt_u64("output_tokens")?.unwrap_or(0),
        reasoning_tokens: r.opt_u64("reasoning_tokens")?.unwrap_or(0),
    })
}

fn generation_from(r: &Record) -> CoreResult<GenerationRow> {
    Ok(GenerationRow {
        generation_id: r.i64("generation_id")?,
        run_id: r.text("run_id")?,
        condition_slug: r.text("condition_slug")?,
        prompt_id: r.text("prompt_id")?,
        package_version: r.text("package_version")?,
        context_index: r.u32("context_index")?,
        replicate_index: r.u32("replicate_index")?,
        status: r.text("status")?,
        cache_hit: r.bool("cache_hit")?,
        attempts: r.u32("attempts")?,
        input_tokens: r.opt_u64("input_tokens")?,
        cache_write_tokens: r.opt_u64("cache_write_tokens")?,
        cache_write_1h_tokens: r.opt_u64("cache_write_1h_tokens")?,
        cache_read_tokens: r.opt_u64("cache_read_tokens")?,
        output_tokens: r.opt_u64("output_tokens")?,
        reasoning_tokens: r.opt_u64("reasoning_tokens")?,
        cost_usd: r.opt_f64("cost_usd")?,
        latency_ms: r.opt_u64("latency_ms")?,
        finish_reason: r.opt_text("finish_reason")?,
        provider_request_id: r.opt_text("provider_request_id")?,
        model_snapshot: r.opt_text("model_snapshot")?,
        request_hash: r.opt_text("request_hash")?,
        response_text: r.opt_text("response_text")?,
        response_length: r.opt_u64("response_length")?,
        error_class: r.opt_text("error_class")?,
        error_message: r.opt_text("error_message")?,
        created_at: r.text("created_at")?,
        started_at: r.opt_text("started_at")?,
        finished_at: r.opt_text("finished_at")?,
        transport: r.opt_text("transport")?,
    })
}

pub(crate) async fn error_rows(tx: &mut impl Tx, run_id: &RunId) -> CoreResult<Vec<ErrorRow>> {
    tx.query(&ERROR_ROWS, params![run_id.as_str()])
        .await?
        .iter()
        .map(|r| {
            Ok(ErrorRow {
                prompt_id: r.text("prompt_id")?,
                replicate_index: r.u32("replicate_index")?,
                error_message: r.opt_text("error_message")?,
            })
        })
        .collect()
}

pub(crate) async fn status_counts(tx: &mut impl Tx, run_id: &RunId) -> CoreResult<Vec<StatusRow>> {
    load_run(tx, run_id).await?;
    tx.query(&STATUS_COUNTS, params![run_id.as_str()])
        .await?
        .iter()
        .map(|r| {
            Ok(StatusRow {
                status: r.text("status")?,
                count: r.u64("count")?,
                cache_hits: r.u64("cache_hits")?,
            })
        })
        .collect()
}

pub(crate) async fn remaining_by_condition(
    tx: &mut impl Tx,
    run_id: &RunId,
) -> CoreResult<Vec<(String, u64)>> {
    tx.query(&REMAINING_BY_CONDITION, params![run_id.as_str()])
        .await?
        .iter()
        .map(|r| Ok((r.text("condition_slug")?, r.u64("n")?)))
        .collect()
}

pub(crate) async fn attempts_page(
    tx: &mut impl Tx,
    run_id: &RunId,
    (after_generation, after_attempt): (i64, u32),
    limit: u32,
) -> CoreResult<Vec<AttemptRow>> {
    tx.query(
        &ATTEMPTS_PAGE,
        params![run_id.as_str(), after_generation, after_attempt, limit],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(AttemptRow {
            generation_id: r.i64("generation_id")?,
            attempt: r.u32("attempt")?,
            started_at: r.text("started_at")?,
            finished_at: r.opt_text("finished_at")?,
            outcome: r.text("outcome")?,
        })
    })
    .collect()
}

pub(crate) async fn generations_page(
    tx: &mut impl Tx,
    run_id: &RunId,
    after: i64,
    limit: u32,
    texts: bool,
) -> CoreResult<Vec<GenerationRow>> {
    let statement = if texts {
        &GENERATIONS_PAGE
    } else {
        &GENERATIONS_BRIEF_PAGE
    };
    tx.query(statement, params![run_id.as_str(), after, limit])
        .await?
        .iter()
        .map(generation_from)
        .collect()
}

pub(crate) async fn usage_by_condition(
    tx: &mut impl Tx,
    run_id: &RunId,
) -> CoreResult<Vec<ConditionUsage>> {
    tx.query(&USAGE_BY_CONDITION, params![run_id.as_str()])
        .await?
        .iter()
        .map(|r| {
            Ok(ConditionUsage {
                condition_slug: r.text("condition_slug")?,
                generations: r.u64("generations")?,
                usage: usage_from(r)?,
                cost_usd: r.f64("cost_usd")?,
            })
        })
        .collect()
}

pub(crate) async fn success_latency_at(
    tx: &mut impl Tx,
    run_id: &RunId,
    condition: &str,
    rank: u64,
) -> CoreResult<Option<u64>> {
    match tx
        .query_opt(
            &SUCCESS_LATENCY_AT,
            params![run_id.as_str(), condition, rank],
        )
        .await?
    {
        Some(r) => Ok(Some(r.opt_u64("latency_ms")?.unwrap_or(0))),
        None => Ok(None),
    }
}

pub(crate) async fn run_packages(
    tx: &mut impl Tx,
    run_id: &RunId,
) -> CoreResult<Vec<(String, String)>> {
    tx.query(&RUN_PACKAGES, params![run_id.as_str()])
        .await?
        .iter()
        .map(|r| Ok((r.text("prompt_id")?, r.text("package_version")?)))
        .collect()
}

// ------------------------------------------------------------------- batches

static BATCH_INSERT: Statement = Statement::new(
    "INSERT INTO apex_audition.batches (batch_key, run_id, provider, model, wave,
         provider_batch_id, state, item_count, created_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
);
static BATCH_ITEM_INSERT: Statement = Statement::new(
    "INSERT INTO apex_audition.batch_items (batch_key, generation_id, attempt, custom_id)
     VALUES (?1, ?2, ?3, ?4)",
);
static BATCH_UPDATE: Statement = Statement::new(
    "UPDATE apex_audition.batches SET state = ?2,
         provider_batch_id = COALESCE(?3, provider_batch_id),
         submitted_at = CASE WHEN ?2 = 'submitted' THEN ?4 ELSE submitted_at END,
         ended_at = CASE WHEN ?2 IN ('ended', 'cancelled', 'failed') THEN ?4 ELSE ended_at END
     WHERE batch_key = ?1",
);
static OPEN_BATCHES: Statement = Statement::new(
    "SELECT batch_key, run_id, provider, model, wave, provider_batch_id, state,
            created_at, submitted_at
     FROM apex_audition.batches
     WHERE run_id = ?1 AND state IN ('intent', 'submitted')
     ORDER BY created_at, batch_key",
);
static BATCH_ITEMS: Statement = Statement::new(
    "SELECT i.generation_id, i.attempt, i.custom_id, g.condition_slug, g.prompt_id,
            g.package_version, g.replicate_index
     FROM apex_audition.batch_items i
     JOIN apex_audition.generations g ON g.generation_id = i.generation_id
     WHERE i.batch_key = ?1 ORDER BY i.generation_id",
);

pub(crate) async fn record_batch(tx: &mut impl Tx, batch: &BatchRecord) -> CoreResult<()> {
    tx.execute(
        &BATCH_INSERT,
        params![
            &batch.batch_key,
            batch.run_id.as_str(),
            batch.provider.as_str(),
            &batch.model,
            batch.wave.as_str(),
            &batch.provider_batch_id,
            batch.state.as_str(),
            batch.items.len() as u64,
            &batch.created_at
        ],
    )
    .await?;
    for item in &batch.items {
        tx.execute(
            &BATCH_ITEM_INSERT,
            params![
                &batch.batch_key,
                item.generation_id,
                item.attempt,
                &item.custom_id
            ],
        )
        .await?;
        begin_attempt(tx, item.generation_id, item.attempt, None).await?;
    }
    Ok(())
}

pub(crate) async fn update_batch(
    tx: &mut impl Tx,
    batch_key: &str,
    provider_batch_id: Option<&str>,
    state: BatchState,
) -> CoreResult<()> {
    let now = now_rfc3339();
    let n = tx
        .execute(
            &BATCH_UPDATE,
            params![batch_key, state.as_str(), provider_batch_id, &now],
        )
        .await?;
    if n == 0 {
        return Err(Error::store_msg(format!(
            "no batch `{batch_key}` in the ledger"
        )));
    }
    Ok(())
}

pub(crate) async fn open_batches(tx: &mut impl Tx, run_id: &RunId) -> CoreResult<Vec<BatchRecord>> {
    let rows = tx.query(&OPEN_BATCHES, params![run_id.as_str()]).await?;
    let mut batches = Vec::with_capacity(rows.len());
    for r in rows {
        let bad = |what: &str, value: String| {
            Error::store_msg(format!(
                "the ledger holds an unknown batch {what} `{value}`"
            ))
        };
        let provider = r.text("provider")?;
        let wave = r.text("wave")?;
        let state = r.text("state")?;
        let batch_key = r.text("batch_key")?;
        let items = tx
            .query(&BATCH_ITEMS, params![&batch_key])
            .await?
            .iter()
            .map(|i| {
                Ok(BatchItemRecord {
                    generation_id: i.i64("generation_id")?,
                    attempt: i.u32("attempt")?,
                    custom_id: i.text("custom_id")?,
                    condition_slug: i.text("condition_slug")?,
                    prompt_id: i.text("prompt_id")?,
                    package_version: i.text("package_version")?,
                    replicate_index: i.u32("replicate_index")?,
                })
            })
            .collect::<CoreResult<_>>()?;
        batches.push(BatchRecord {
            batch_key,
            run_id: run_id.clone(),
            provider: ProviderKind::parse(&provider).ok_or_else(|| bad("provider", provider))?,
            model: r.text("model")?,
            wave: Wave::parse(&wave).ok_or_else(|| bad("wave", wave))?,
            provider_batch_id: r.opt_text("provider_batch_id")?,
            state: BatchState::parse(&state).ok_or_else(|| bad("state", state))?,
            created_at: r.text("created_at")?,
            submitted_at: r.opt_text("submitted_at")?,
            items,
        });
    }
    Ok(batches)
}
