//! Runs, generations and attempts as the store records them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::condition::ProviderKind;
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

/// How a request was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// One request, answered at once, at the full price.
    #[default]
    Sync,
    /// An item of a provider batch, at the batch price.
    Batch,
}

impl Transport {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Batch => "batch",
        }
    }
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
    /// How it was sent (and so priced).
    #[serde(default)]
    pub transport: Transport,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AttemptEnd {
    /// The generation succeeded.
    Success(GenerationResult),
    /// The attempt failed; `then` says what becomes of the generation.
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
        /// What becomes of the generation.
        then: AfterFailure,
    },
    /// The attempt was not answered and will not be: the process is stopping
    /// (the generation goes back to `pending`).
    Abandoned,
}

/// What becomes of a generation after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterFailure {
    /// Another attempt follows: it stays `running`.
    Retry,
    /// That was its last attempt: it is `error`.
    Error,
    /// It never reached the API (a configuration to fix), or its batch was
    /// cancelled unprocessed: it goes back to `pending` for a resume.
    Pending,
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

/// A row of the seed's first monitoring query: generations by status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRow {
    /// The status.
    pub status: String,
    /// Generations in it.
    pub count: u64,
    /// Of those, the ones that read the provider's cache.
    pub cache_hits: u64,
}

/// One attempt as the ledger records it (for the report's timelines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRow {
    /// The generation.
    pub generation_id: i64,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// When it began (RFC 3339).
    pub started_at: String,
    /// When it ended, if it has.
    pub finished_at: Option<String>,
    /// `success`, `abandoned`, the error class of a failure, or `in flight`.
    pub outcome: String,
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
    /// The response text (`None` in a brief page, which leaves it out).
    pub response_text: Option<String>,
    /// The response text's length in bytes (UTF-8), also in a brief page.
    pub response_length: Option<u64>,
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
    /// How a success was sent: `sync` or `batch` (`None` before Apex kept
    /// it).
    pub transport: Option<String>,
}

/// Which wave a batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wave {
    /// One request per (condition, context), writing a long-lived cache.
    Leader,
    /// The other replicates, reading what the leaders wrote (and any
    /// group whose leader already succeeded).
    Follower,
    /// No cache to share (caching off, one replicate, or the leader's cache
    /// went cold): every request on its own, no cache hints.
    Single,
}

impl Wave {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Leader => "leader",
            Self::Follower => "follower",
            Self::Single => "single",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "leader" => Self::Leader,
            "follower" => Self::Follower,
            "single" => Self::Single,
            _ => return None,
        })
    }
}

/// Where a recorded batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Recorded, about to be submitted (or a crash came in between).
    Intent,
    /// The provider has it.
    Submitted,
    /// Ended; its results are stored.
    Ended,
    /// Ended by a cancellation; processed items are stored, the rest are
    /// `pending` again.
    Cancelled,
    /// Refused at submission, failed as a whole, or never reached the
    /// provider: nothing billed; its items are `pending` again.
    Failed,
}

impl BatchState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Intent => "intent",
            Self::Submitted => "submitted",
            Self::Ended => "ended",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "intent" => Self::Intent,
            "submitted" => Self::Submitted,
            "ended" => Self::Ended,
            "cancelled" => Self::Cancelled,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// Still to be waited on.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Intent | Self::Submitted)
    }
}

/// One item of a recorded batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItemRecord {
    /// The generation.
    pub generation_id: i64,
    /// Its attempt number in this batch.
    pub attempt: u32,
    /// The id the provider returns its result under.
    pub custom_id: String,
    /// The generation's condition (filled when read back).
    pub condition_slug: String,
    /// The context package id (filled when read back).
    pub prompt_id: String,
    /// The package version (filled when read back).
    pub package_version: String,
    /// The replicate (filled when read back).
    pub replicate_index: u32,
}

/// A provider batch as the ledger records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Apex's id for the batch (written before submission).
    pub batch_key: String,
    /// The run.
    pub run_id: RunId,
    /// The provider.
    pub provider: ProviderKind,
    /// The model every item uses.
    pub model: String,
    /// Its wave.
    pub wave: Wave,
    /// The provider's id, once submitted.
    pub provider_batch_id: Option<String>,
    /// Where it stands.
    pub state: BatchState,
    /// When the intent was recorded (RFC 3339).
    pub created_at: String,
    /// When the provider accepted it (RFC 3339).
    pub submitted_at: Option<String>,
    /// Its items.
    pub items: Vec<BatchItemRecord>,
}

/// The `custom_id` of a generation's attempt (`^[a-zA-Z0-9_-]{1,64}$`, as
/// both APIs require).
pub fn custom_id(generation_id: i64, attempt: u32) -> String {
    format!("apex-g{generation_id}-a{attempt}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_names_round_trip_and_ids_are_valid_custom_ids() {
        for wave in [Wave::Leader, Wave::Follower, Wave::Single] {
            assert_eq!(Wave::parse(wave.as_str()), Some(wave));
        }
        for state in [
            BatchState::Intent,
            BatchState::Submitted,
            BatchState::Ended,
            BatchState::Cancelled,
            BatchState::Failed,
        ] {
            assert_eq!(BatchState::parse(state.as_str()), Some(state));
        }
        let id = custom_id(i64::MAX, u32::MAX);
        assert!(id.len() <= 64);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
