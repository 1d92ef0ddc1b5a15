//! Runs, generations and attempts as the store records them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::provider::{ErrorClass, Usage};

/// A run's id: a time-ordered UUID (v7) in its hyphenated text form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RunId(String);

impl RunId {
    /// A new, time-ordered id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    /// Parses an id given by a user; only UUIDs are accepted, so an id can be
    /// placed into SQL text safely.
    pub fn parse(text: &str) -> Result<Self> {
        uuid::Uuid::parse_str(text.trim())
            .map(|u| Self(u.hyphenated().to_string()))
            .map_err(|_| Error::NotARunId(text.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Recorded by a dry run; nothing sent yet.
    Planned,
    /// Being executed (or a process died while executing it).
    Running,
    /// Stopped by Ctrl-C or a fatal error with work left.
    Interrupted,
    /// Every generation reached `success` or `error`.
    Finished,
}

impl RunState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Planned => "planned",
            Self::Running => "running",
            Self::Interrupted => "interrupted",
            Self::Finished => "finished",
        }
    }
    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "planned" => Self::Planned,
            "running" => Self::Running,
            "interrupted" => Self::Interrupted,
            "finished" => Self::Finished,
            _ => return None,
        })
    }
}

/// A generation's status: `pending` → `running` → `success` | `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerationStatus {
    /// Planned, not yet sent.
    Pending,
    /// An attempt is (or was, at a crash) in flight.
    Running,
    /// Stored with its response.
    Success,
    /// Failed after its last attempt.
    Error,
}

impl GenerationStatus {
    /// The stored name (what the seed's SQL groups by).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Error => "error",
        }
    }
}

/// What the CLI passes to record a new run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewRun {
    /// The run's id.
    pub run_id: RunId,
    /// Who started it (`--created-by`).
    pub created_by: Option<String>,
    /// Free text (`--notes`).
    pub notes: Option<String>,
    /// The flags used, as JSON, for reproducibility.
    pub flags: serde_json::Value,
    /// Whether this is a dry run (recorded as `planned`).
    pub dry_run: bool,
}

/// A run as listed from the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    /// The run's id.
    pub run_id: RunId,
    /// Who started it.
    pub created_by: Option<String>,
    /// Free text.
    pub notes: Option<String>,
    /// The flags used, as JSON.
    pub flags: serde_json::Value,
    /// Where it stands.
    pub state: RunState,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// First time execution started.
    pub started_at: Option<String>,
    /// When it last finished.
    pub finished_at: Option<String>,
    /// Replicates per cell.
    pub replicates: u32,
    /// The conditions, in plan order.
    pub condition_slugs: Vec<String>,
    /// Generation counts by status.
    pub counts: StatusCounts,
    /// Sum of the stored costs, in USD.
    pub cost_usd: f64,
}

/// Generation counts of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    /// Not yet sent.
    pub pending: u64,
    /// In flight, or in flight at a crash.
    pub running: u64,
    /// Done.
    pub success: u64,
    /// Failed after the last attempt.
    pub error: u64,
}

impl StatusCounts {
    /// All generations.
    pub fn total(&self) -> u64 {
        self.pending + self.running + self.success + self.error
    }
}

/// One generation to execute, as the store hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    /// The store's row id.
    pub generation_id: i64,
    /// The condition's slug.
    pub condition_slug: String,
    /// The context package id.
    pub prompt_id: String,
    /// The package version to send.
    pub package_version: String,
    /// Position of the context in the plan.
    pub context_index: u32,
    /// Replicate number (0-based).
    pub replicate_index: u32,
    /// Attempts already made (a resumed generation keeps counting).
    pub attempts: u32,
}

/// A successful response, normalised, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationResult {
    /// Token usage, normalised across providers.
    pub usage: Usage,
    /// Cost in USD, when the model's prices are known.
    pub cost_usd: Option<f64>,
    /// The provider's finish or stop reason.
    pub finish_reason: Option<String>,
    /// The provider's request id.
    pub provider_request_id: Option<String>,
    /// The model snapshot that answered.
    pub model_snapshot: Option<String>,
    /// SHA-256 of the exact request body.
    pub request_hash: Option<String>,
    /// The response text.
    pub response_text: String,
    /// Wall time of the successful attempt.
    pub latency_ms: u64,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AttemptEnd {
    /// The generation succeeded.
    Success(GenerationResult),
    /// The attempt failed; `last` says whether the generation is now `error`
    /// (no retry follows) or stays `running` for another attempt.
    Failed {
        /// Why it failed.
        class: ErrorClass,
        /// The provider's (or transport's) message.
        message: String,
        /// HTTP status, if a response arrived.
        http_status: Option<u16>,
        /// The provider's request id, if any.
        provider_request_id: Option<String>,
        /// Wall time of the attempt.
        latency_ms: u64,
        /// Whether this was the last attempt.
        last: bool,
    },
    /// The attempt was not answered and will not be: the process is stopping
    /// (the generation goes back to `pending`).
    Abandoned,
}

/// A paid result the ledger could not take: the attempt's end, kept until
/// it can be stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnstoredResult {
    /// The generation.
    pub generation_id: i64,
    /// The attempt number.
    pub attempt: u32,
    /// How the attempt ended.
    pub end: AttemptEnd,
}

/// A row of the seed's error query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRow {
    /// Context package id.
    pub prompt_id: String,
    /// Replicate number.
    pub replicate_index: u32,
    /// The stored message.
    pub error_message: Option<String>,
}

/// Every ledger column of one generation, as exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRow {
    /// Row id.
    pub generation_id: i64,
    /// The run.
    pub run_id: String,
    /// The condition's slug.
    pub condition_slug: String,
    /// The context package id.
    pub prompt_id: String,
    /// The package version sent.
    pub package_version: String,
    /// Position of the context in the plan.
    pub context_index: u32,
    /// Replicate number.
    pub replicate_index: u32,
    /// `pending`, `running`, `success` or `error`.
    pub status: String,
    /// Whether the response read the provider's cache.
    pub cache_hit: bool,
    /// Attempts made.
    pub attempts: u32,
    /// Uncached input tokens.
    pub input_tokens: Option<u64>,
    /// Cache-write tokens.
    pub cache_write_tokens: Option<u64>,
    /// Of those, 1-hour writes.
    pub cache_write_1h_tokens: Option<u64>,
    /// Cache-read tokens.
    pub cache_read_tokens: Option<u64>,
    /// Output tokens (reasoning included).
    pub output_tokens: Option<u64>,
    /// Reasoning tokens.
    pub reasoning_tokens: Option<u64>,
    /// Cost in USD.
    pub cost_usd: Option<f64>,
    /// Latency of the last attempt.
    pub latency_ms: Option<u64>,
    /// Finish or stop reason.
    pub finish_reason: Option<String>,
    /// The provider's request id.
    pub provider_request_id: Option<String>,
    /// The model snapshot that answered.
    pub model_snapshot: Option<String>,
    /// SHA-256 of the request body.
    pub request_hash: Option<String>,
    /// The response text.
    pub response_text: Option<String>,
    /// Error class of the last failure.
    pub error_class: Option<String>,
    /// Error message of the last failure.
    pub error_message: Option<String>,
    /// When the row was created (RFC 3339).
    pub created_at: String,
    /// When the first attempt started.
    pub started_at: Option<String>,
    /// When it reached `success` or `error`.
    pub finished_at: Option<String>,
}
