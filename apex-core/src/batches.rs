//! The providers' Batch APIs as the batch driver sees them ([`BatchApi`]),
//! and provider batches as the ledger records them ([`BatchRecord`]).
//!
//! A batch is recorded as an *intent* (its items and their attempts) before
//! it is submitted, then as *submitted* with the provider's id, so a crash
//! at any point leaves a ledger from which `--resume` re-attaches to it
//! instead of paying for it again.

use std::collections::HashMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::condition::ProviderKind;
use crate::provider::{AttemptError, Generated, GenerationRequest};
use crate::run::RunId;

/// A provider's per-batch caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchCaps {
    /// Most requests in one batch.
    pub max_requests: usize,
    /// Most bytes of one batch's upload.
    pub max_bytes: usize,
}

/// What polling a batch says.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchProgress {
    /// Processing has ended (results, if any, can be read).
    pub ended: bool,
    /// Items processed so far.
    pub processed: u64,
    /// Items in the batch.
    pub total: u64,
    /// The batch was cancelled (by `apex cancel` or in the console).
    pub cancelled: bool,
    /// The whole batch failed without processing any item (e.g. OpenAI's
    /// enqueued-token limit); its items were not billed.
    pub failure: Option<AttemptError>,
    /// The per-model enqueued-token limit the failure named, if it did.
    pub queue_limit: Option<u64>,
}

/// One item's outcome, by its `custom_id`.
pub type BatchResults = HashMap<String, Result<Generated, AttemptError>>;

/// A provider's Batch API. Implementations live in `apex-providers`.
#[async_trait]
pub trait BatchApi: Send + Sync {
    /// The per-batch caps (requests and bytes).
    fn caps(&self) -> BatchCaps;

    /// The bytes one item adds to a batch's upload.
    fn item_bytes(&self, custom_id: &str, request: &GenerationRequest) -> usize;

    /// Submits one batch; `key` is Apex's id for it (sent as metadata where
    /// the API takes it). Returns the provider's batch id.
    async fn submit(
        &self,
        key: &str,
        items: &[(String, GenerationRequest)],
    ) -> Result<String, AttemptError>;

    /// After a crash between submitting and recording: the provider's id of
    /// the batch submitted for `key` (created after `since`, RFC 3339, with
    /// `items` requests), if there is one.
    async fn find(
        &self,
        key: &str,
        since: &str,
        items: usize,
    ) -> Result<Option<String>, AttemptError>;

    /// Where a batch stands.
    async fn status(&self, batch_id: &str) -> Result<BatchProgress, AttemptError>;

    /// The results of an ended batch, by `custom_id`; `requests` are the
    /// batch's items (to complete usage the way synchronous answers are).
    /// An item that expired unprocessed comes back as
    /// [`ErrorClass::Timeout`](crate::provider::ErrorClass::Timeout), one
    /// cancelled unprocessed as
    /// [`ErrorClass::Conflict`](crate::provider::ErrorClass::Conflict).
    async fn results(
        &self,
        batch_id: &str,
        requests: &HashMap<String, GenerationRequest>,
    ) -> Result<BatchResults, AttemptError>;

    /// Asks the provider to cancel a batch (items not yet processed end
    /// `canceled` and are not billed).
    async fn cancel(&self, batch_id: &str) -> Result<(), AttemptError>;
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

/// The enqueued-token limit an OpenAI batch failure names ("… Limit:
/// 90,000 enqueued tokens …"), if it names one.
pub fn queue_limit_in(message: &str) -> Option<u64> {
    let lower = message.to_ascii_lowercase();
    let at = lower.find("limit:")?;
    let digits: String = lower[at + 6..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    lower[at..]
        .contains("enqueued")
        .then(|| digits.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_ids_are_valid_custom_ids() {
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

    #[test]
    fn the_enqueued_token_limit_is_read_from_openais_message() {
        let message = "Enqueued token limit reached for gpt-4o in organization org-x. Limit: 90,000 enqueued tokens. Please try submitting your batch again later.";
        assert_eq!(queue_limit_in(message), Some(90_000));
        assert_eq!(queue_limit_in("Rate limit: 5 requests"), None);
        assert_eq!(queue_limit_in("no limit here"), None);
    }
}
