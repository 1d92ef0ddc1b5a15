//! The `Store` trait: the ledger every state change goes through.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::context::ContextPackage;
use crate::error::Result;
use crate::plan::{PackageRef, Plan};
use crate::provider::Usage;
use crate::run::{
    AttemptEnd, AttemptRow, ErrorRow, GenerationRow, NewRun, RunId, RunInfo, RunState, StatusRow,
    WorkItem,
};
use crate::run::{BatchRecord, BatchState};

/// What registering a conditions file changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReport {
    /// Slugs new to the store.
    pub added: Vec<String>,
    /// Slugs already registered with the same parameters.
    pub unchanged: Vec<String>,
    /// Slugs not yet used by any run whose parameters were replaced.
    pub updated: Vec<String>,
}

/// What ingesting packages changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    /// Package ids new to the store.
    pub added: Vec<String>,
    /// Packages whose content was already stored as their current version.
    pub unchanged: Vec<String>,
    /// Packages whose content changed: (id, old version, new version).
    pub new_versions: Vec<(String, String, String)>,
}

/// What [`Store::claim_work`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// Every unfinished generation the worker holds, in plan order.
    pub items: Vec<WorkItem>,
    /// Unfinished generations held by other workers' live claims.
    pub held_by_others: u64,
}

/// One model's rate-limit budget as the processes sharing a ledger use it,
/// from [`Store::share_pacing`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacingShare {
    /// The limiter key (`provider/model`).
    pub key: String,
    /// Processes pacing this key now, the caller included.
    pub members: u32,
    /// What the other members count in their current windows: requests,
    /// input-side tokens, output tokens.
    pub others: [u64; 3],
    /// The unfinished generations of this key's model the other members
    /// hold: the limits are split in proportion to the work held.
    pub others_work: u64,
}

/// A registered condition and whether a run has used it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionInfo {
    /// The condition.
    pub condition: Condition,
    /// Runs that used it (immutable once > 0).
    pub runs: u64,
}

/// The successful generations of one condition in a run, summed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditionUsage {
    /// The condition.
    pub condition_slug: String,
    /// Successful generations.
    pub generations: u64,
    /// Their usage, summed.
    pub usage: Usage,
    /// Their stored cost, summed (USD).
    pub cost_usd: f64,
}

/// A value in a query result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SqlValue {
    /// SQL NULL.
    Null,
    /// A boolean (PostgreSQL).
    Bool(bool),
    /// An integer.
    Integer(i64),
    /// A floating-point number.
    Real(f64),
    /// Text.
    Text(String),
}

impl fmt::Display for SqlValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("NULL"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Integer(i) => write!(f, "{i}"),
            Self::Real(r) => write!(f, "{r}"),
            Self::Text(t) => f.write_str(t),
        }
    }
}

/// Rows returned by [`Store::query_read_only`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, each as long as `columns`.
    pub rows: Vec<Vec<SqlValue>>,
}

/// The ledger. Backends (SQLite, PostgreSQL) live in `apex-store`.
///
/// Every method that changes state is durable when it returns: a crash right
/// after it leaves a ledger from which a run can be resumed.
#[async_trait]
pub trait Store: Send + Sync {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Registers conditions, all or nothing. Idempotent; a slug used by a run
    /// cannot change its parameters.
    async fn register_conditions(&self, conditions: &[Condition]) -> Result<RegisterReport>;

    /// All registered conditions, by slug.
    async fn conditions(&self) -> Result<Vec<ConditionInfo>>;

    /// One condition, or [`crate::Error::UnknownCondition`].
    async fn condition(&self, slug: &str) -> Result<Condition>;

    /// Stores packages, all or nothing. Idempotent; changed content under an
    /// existing id becomes that id's new current version.
    async fn ingest_packages(&self, packages: &[ContextPackage]) -> Result<IngestReport>;

    /// The current version of every package, by id.
    async fn current_packages(&self) -> Result<Vec<PackageRef>>;

    /// One package version with its text.
    async fn package(&self, id: &str, version: &str) -> Result<ContextPackage>;

    /// A package version's exact `o200k_base` (cacheable prefix,
    /// instruction) token counts, as counted once at ingest (`None` for
    /// versions ingested before both counts were kept).
    async fn o200k_split(&self, id: &str, version: &str) -> Result<Option<(u64, u64)>>;

    /// Records a run and all its cells as `pending`, in one transaction.
    async fn create_run(&self, run: &NewRun, plan: &Plan) -> Result<()>;

    /// One run with its counts.
    async fn run(&self, run_id: &RunId) -> Result<RunInfo>;

    /// All runs, newest first.
    async fn runs(&self) -> Result<Vec<RunInfo>>;

    /// The conditions a run uses, in plan order, with the parameters stored.
    async fn run_conditions(&self, run_id: &RunId) -> Result<Vec<Condition>>;

    /// Replaces the options a run records (a resume that overrides some).
    async fn set_run_flags(&self, run_id: &RunId, flags: &serde_json::Value) -> Result<()>;

    /// Moves a run to a state (and stamps `started_at` / `finished_at`).
    async fn set_run_state(&self, run_id: &RunId, state: RunState) -> Result<()>;

    /// Claims up to `max_groups` more (condition, context) groups of the
    /// run's remaining work for `worker` and records its heartbeat, taking
    /// over the claims of workers whose heartbeat is older than
    /// `stale_before` (RFC 3339: their process stopped renewing). Returns
    /// every unfinished generation `worker` holds, and how many unfinished
    /// generations live workers hold.
    async fn claim_work(
        &self,
        run_id: &RunId,
        worker: &str,
        max_groups: u32,
        stale_before: &str,
    ) -> Result<Claim>;

    /// Keeps `worker`'s claims alive: one heartbeat write, however many
    /// generations it holds.
    async fn renew_claims(&self, run_id: &RunId, worker: &str) -> Result<()>;

    /// The workers holding claims on the run's unfinished generations.
    async fn claim_holders(&self, run_id: &RunId) -> Result<Vec<String>>;

    /// Gives back `worker`'s unfinished generations (on a clean exit).
    async fn release_claims(&self, run_id: &RunId, worker: &str) -> Result<()>;

    /// Shares rate-limit budgets among the processes using this ledger:
    /// records what `worker` counts in its window per limiter key and how
    /// much of that model's work it holds (unfinished generations), and
    /// returns, per key any live member paces, how many members hold work
    /// for it (those that shared within `fresh_within`; the caller always
    /// counts), what the others count and the work they hold. One round
    /// trip.
    async fn share_pacing(
        &self,
        worker: &str,
        usage: &[(String, [u64; 3], u64)],
        fresh_within: std::time::Duration,
    ) -> Result<Vec<PacingShare>>;

    /// `worker` paces nothing any more (it ends): the others take its share.
    async fn leave_pacing(&self, worker: &str) -> Result<()>;

    /// Sets the run's `error` generations back to `pending` (`--retry-errors`).
    async fn reset_errors(&self, run_id: &RunId) -> Result<u64>;

    /// Marks a generation `running` for attempt number `attempt` (1-based).
    /// With a `worker`, only if that worker still holds its claim, so no
    /// generation is sent twice while its claimant is alive.
    async fn begin_attempt(
        &self,
        generation_id: i64,
        attempt: u32,
        worker: Option<&str>,
    ) -> Result<()>;

    /// Records how an attempt ended and the generation's resulting status.
    async fn end_attempt(&self, generation_id: i64, attempt: u32, end: &AttemptEnd) -> Result<()>;

    /// A run's generations by status, with cache hits (the seed's first
    /// query).
    async fn status_counts(&self, run_id: &RunId) -> Result<Vec<StatusRow>>;

    /// Generations still to do (`pending` or `running`) per condition.
    async fn remaining_by_condition(&self, run_id: &RunId) -> Result<Vec<(String, u64)>>;

    /// Up to `limit` attempts of a run after `(generation_id, attempt)`, in
    /// that order: a page of its attempts, so any run reads in bounded
    /// memory.
    async fn attempts_page(
        &self,
        run_id: &RunId,
        after: (i64, u32),
        limit: u32,
    ) -> Result<Vec<AttemptRow>>;

    /// The error rows of a run (the seed's second query).
    async fn error_rows(&self, run_id: &RunId) -> Result<Vec<ErrorRow>>;

    /// The successful generations of a run, summed per condition.
    async fn usage_by_condition(&self, run_id: &RunId) -> Result<Vec<ConditionUsage>>;

    /// The latency of the successful generation of `condition` at `rank`
    /// (0-based) in ascending order of latency: percentiles without reading
    /// every row.
    async fn success_latency_at(
        &self,
        run_id: &RunId,
        condition: &str,
        rank: u64,
    ) -> Result<Option<u64>>;

    /// The (package id, version) pairs a run sends, by id.
    async fn run_packages(&self, run_id: &RunId) -> Result<Vec<(String, String)>>;

    /// Up to `limit` generations of a run with ids above `after`, in id
    /// order: a page of an export, so any run exports in bounded memory.
    async fn generations_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<GenerationRow>>;

    /// The same page without the response texts (`response_text` is
    /// `None`, `response_length` kept): what a summary of a large run needs
    /// without reading every answer.
    async fn generations_brief_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<GenerationRow>>;

    /// Records a provider batch before it is submitted: the batch, its
    /// items, and each item's attempt as begun (`running`), in one
    /// transaction.
    async fn record_batch(&self, batch: &BatchRecord) -> Result<()>;

    /// Moves a recorded batch on: the provider's id once submitted (kept
    /// when `None`), and its state.
    async fn update_batch(
        &self,
        batch_key: &str,
        provider_batch_id: Option<&str>,
        state: BatchState,
    ) -> Result<()>;

    /// The run's batches still open (`intent` or `submitted`), oldest
    /// first, with their items.
    async fn open_batches(&self, run_id: &RunId) -> Result<Vec<BatchRecord>>;

    /// Runs one read-only statement; a statement that would write is refused
    /// with [`crate::Error::ReadOnly`]. The `apex_audition` schema is available.
    async fn query_read_only(&self, sql: &str) -> Result<QueryResult>;
}
