//! The dispatcher's vocabulary, for both transports: how it is configured
//! ([`DispatchConfig`]), the attempts it hands out ([`Attempt`]), the
//! events a driver feeds it ([`Event`]), the actions it asks for
//! ([`Action`]) and how a dispatch ended ([`Summary`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::condition::{Condition, ProviderKind};
use crate::error::Error;
use crate::provider::{AttemptError, BatchCaps, CacheControls, CacheHint, Generated, SharedBody};
use crate::run::{AttemptEnd, BatchRecord, RunState, StatusCounts, Wave, WorkItem};
use crate::tokens::Tokenizer;

use super::ProgressEvent;
use super::retry::RetryPolicy;
use super::work::{BatchRef, GenerationId};

/// How the dispatcher paces, orders and retries.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Most attempts out at once.
    pub concurrency: usize,
    /// Send prompt-caching hints.
    pub cache: bool,
    /// One request per condition first; nothing else if one fails.
    pub verify_first: bool,
    /// When to retry and how long to wait.
    pub retry: RetryPolicy,
    /// Groups to claim at a time.
    pub claim_batch: u32,
    /// How often to heartbeat, and to look again for work when none was
    /// left to claim.
    pub claim_interval: Duration,
    /// Replicates per (condition, context), for choosing the cache TTL.
    pub replicates: usize,
    /// Multiplies the limiter's window.
    pub time_scale: f64,
    /// How often to share the rate-limit budgets with the other processes
    /// on the ledger; `None`: this process paces alone (or by `--workers`).
    pub share_interval: Option<Duration>,
    /// Send through the providers' Batch APIs (`--batch`), with their
    /// per-batch caps; `None`: every request synchronously.
    pub batch: Option<BatchTransport>,
}

/// The batch transport's settings.
#[derive(Debug, Clone, Default)]
pub struct BatchTransport {
    /// Each provider's per-batch caps.
    pub caps: HashMap<ProviderKind, BatchCaps>,
}

/// One attempt to begin or send.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The generation.
    pub generation_id: GenerationId,
    /// The ledger's attempt number (1-based, counting earlier executions).
    pub attempt: u32,
    /// Its condition.
    pub condition: Arc<Condition>,
    /// Its context package.
    pub prompt_id: String,
    /// The package version.
    pub version: String,
    /// The cache hint to send.
    pub cache: CacheHint,
    /// The cache controls the model takes.
    pub cache_controls: CacheControls,
    /// The body, shared by every attempt of the group with this hint.
    pub body: SharedBody,
    /// Its group's followers wait for it: it is streamed, and its first
    /// event ([`Event::AnswerBegun`]) lets them go.
    pub leads: bool,
}

impl Attempt {
    /// The request this attempt sends, `in_batch` or on its own, over
    /// `package`; its trace names the run, generation and attempt.
    pub fn request(
        &self,
        package: Arc<crate::context::ContextPackage>,
        run_id: &crate::run::RunId,
        in_batch: bool,
    ) -> crate::provider::GenerationRequest {
        crate::provider::GenerationRequest {
            trace: Some(format!("{run_id}/{}/{}", self.generation_id, self.attempt)),
            // A leader streamed only for its followers has a body of its
            // own (the group's says whether the condition streams).
            body: if self.leads && !self.condition.streams() {
                SharedBody::default()
            } else {
                self.body.clone()
            },
            in_batch,
            ..crate::provider::GenerationRequest::new(
                Arc::clone(&self.condition),
                package,
                self.cache,
                self.cache_controls,
            )
        }
    }
}

/// Work the driver was asked to do that could fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// [`Action::Claim`].
    Claim,
    /// [`Action::Renew`].
    Renew,
    /// [`Action::CountTokens`].
    Count {
        /// The package version.
        version: String,
        /// The tokenizer.
        tokenizer: Tokenizer,
    },
    /// [`Action::Begin`], [`Action::Send`] or [`Action::Store`] of one
    /// generation.
    Generation(GenerationId),
    /// [`Action::SharePacing`].
    Pacing,
    /// An action on a provider batch.
    Batch(BatchRef),
    /// [`Action::Check`] of a condition.
    Check(String),
}

/// What the driver tells the dispatcher.
#[derive(Debug)]
pub enum Event {
    /// The answer to [`Action::Claim`]: every unfinished generation this
    /// worker holds, how many live workers elsewhere hold, and the run's
    /// provider batches still open (with how long ago each was submitted).
    Claimed {
        /// The generations held, in plan order.
        items: Vec<WorkItem>,
        /// Unfinished generations other workers hold.
        held_by_others: u64,
        /// The run's open provider batches; those whose items this worker
        /// holds are re-attached, the others left to their process.
        batches: Vec<(BatchRecord, Duration)>,
    },
    /// [`Action::Renew`] was done.
    Renewed,
    /// The answer to [`Action::SharePacing`]: per key, the processes pacing
    /// it and what the others count; `None` if the ledger did not answer.
    PacingShared(Option<Vec<crate::store::PacingShare>>),
    /// The answer to [`Action::CountTokens`]: (cacheable prefix, rest).
    Counted {
        /// The package version.
        version: String,
        /// The tokenizer.
        tokenizer: Tokenizer,
        /// (cacheable prefix, the rest) in tokens.
        split: (u64, u64),
    },
    /// [`Action::Begin`] was recorded: the attempt may leave now.
    Began(GenerationId),
    /// [`Action::Begin`] was refused: another worker took the claim over.
    NotClaimable(GenerationId),
    /// A leader's streamed answer has begun: the provider serves its cache
    /// from now on.
    AnswerBegun(GenerationId),
    /// The answer to [`Action::Send`].
    Finished {
        /// The generation.
        generation_id: GenerationId,
        /// The response, or why there is none.
        outcome: Box<Result<Generated, AttemptError>>,
        /// Wall time of the attempt.
        latency_ms: u64,
    },
    /// [`Action::Store`] was done.
    Stored(GenerationId),
    /// A task failed (the ledger, or counting tokens): nothing new starts,
    /// what is in flight finishes and is stored.
    Failed {
        /// Which task.
        task: Task,
        /// Why.
        error: Error,
    },
    /// Stop starting work (Ctrl-C); what is in flight finishes.
    StopRequested,
    /// The answer to [`Action::SubmitBatch`]: the batch was recorded under
    /// `key` (at `created_at`, RFC 3339), then the provider accepted it
    /// (its id) or refused it.
    BatchSubmitted {
        /// The batch.
        batch: BatchRef,
        /// Apex's key for it, as recorded.
        key: String,
        /// When it was recorded (RFC 3339).
        created_at: String,
        /// The provider's batch id, or why there is none.
        outcome: Result<String, AttemptError>,
    },
    /// The answer to [`Action::FindBatch`] (found: recorded as submitted).
    BatchFound {
        /// The batch.
        batch: BatchRef,
        /// Its provider id if the provider has it.
        outcome: Result<Option<String>, AttemptError>,
    },
    /// The answer to [`Action::PollBatch`].
    BatchPolled {
        /// The batch.
        batch: BatchRef,
        /// Where it stands.
        outcome: Result<crate::provider::BatchProgress, AttemptError>,
    },
    /// The answer to [`Action::FetchResults`]: each item's outcome.
    BatchFetched {
        /// The batch.
        batch: BatchRef,
        /// Per generation, what the provider answered.
        outcome: Result<Vec<ItemOutcome>, AttemptError>,
    },
    /// [`Action::CloseBatch`] was done: every item's end and the batch's
    /// state are in the ledger.
    BatchClosed(BatchRef),
    /// The answer to [`Action::Check`].
    Checked {
        /// The condition.
        slug: String,
        /// Whether the provider would take its key and model.
        outcome: Result<(), AttemptError>,
    },
}

/// What the dispatcher asks the driver to do.
#[derive(Debug)]
pub enum Action {
    /// Claim up to `max_groups` more groups and heartbeat; answer with
    /// [`Event::Claimed`].
    Claim {
        /// How many (condition, context) groups.
        max_groups: u32,
    },
    /// Heartbeat; answer with [`Event::Renewed`].
    Renew,
    /// Tell the other processes what this one counts per limiter key and
    /// learn what they count; answer with [`Event::PacingShared`].
    SharePacing(Vec<(String, [u64; 3], u64)>),
    /// Count a package's tokens; answer with [`Event::Counted`].
    CountTokens {
        /// The package id.
        prompt_id: String,
        /// The package version.
        version: String,
        /// The tokenizer.
        tokenizer: Tokenizer,
    },
    /// Record the attempt as begun (if this worker still holds the claim);
    /// answer with [`Event::Began`] or [`Event::NotClaimable`].
    Begin(Attempt),
    /// Send the attempt; answer with [`Event::Finished`].
    Send(Attempt),
    /// Record how an attempt ended; answer with [`Event::Stored`].
    Store {
        /// The generation.
        generation_id: GenerationId,
        /// The attempt number.
        attempt: u32,
        /// How it ended.
        end: AttemptEnd,
    },
    /// Tell the user.
    Notify(ProgressEvent),
    /// Ask the provider, with a request that costs nothing, whether it
    /// would take the condition's key and model (the first request of a
    /// batch condition); answer with [`Event::Checked`].
    Check(Arc<Condition>),
    /// Record these attempts as one provider batch, then submit it; answer
    /// with [`Event::BatchSubmitted`].
    SubmitBatch(BatchSubmission),
    /// Look for a recorded batch whose submission got no answer; answer
    /// with [`Event::BatchFound`] (recording its id when found).
    FindBatch {
        /// The batch.
        batch: BatchRef,
        /// Its provider.
        provider: ProviderKind,
        /// Apex's key for it.
        key: String,
        /// When it was recorded (RFC 3339).
        created_at: String,
        /// Its item count.
        items: usize,
    },
    /// Ask where a batch stands; answer with [`Event::BatchPolled`].
    PollBatch {
        /// The batch.
        batch: BatchRef,
        /// Its provider.
        provider: ProviderKind,
        /// The provider's batch id.
        id: String,
    },
    /// Read an ended batch's results; answer with [`Event::BatchFetched`].
    FetchResults {
        /// The batch.
        batch: BatchRef,
        /// Its provider.
        provider: ProviderKind,
        /// The provider's batch id.
        id: String,
        /// Its items' attempts (to build the requests their results are
        /// completed from).
        items: Vec<Attempt>,
    },
    /// Record each item's end, then the batch's state; answer with
    /// [`Event::BatchClosed`].
    CloseBatch {
        /// The batch.
        batch: BatchRef,
        /// Apex's key for it.
        key: String,
        /// Its final state.
        state: crate::run::BatchState,
        /// (generation, attempt, end) per item.
        ends: Vec<(GenerationId, u32, AttemptEnd)>,
    },
    /// Nothing more to do.
    Done(Summary),
}

/// How a dispatch ended.
#[derive(Debug, Default)]
pub struct Summary {
    /// Conditions stopped: (slug, reason).
    pub stopped: Vec<(String, String)>,
    /// `--verify-first` failed.
    pub verify_failed: bool,
    /// A stop was requested.
    pub interrupted: bool,
    /// Responses with status 429.
    pub rate_limited: u64,
    /// Unfinished generations other workers held at the last claim.
    pub others_hold: u64,
    /// The failure that stopped it, if any.
    pub failure: Option<Error>,
    /// Why the run stopped short (a batch cancelled from outside, a Batch
    /// API that stopped answering), if it did.
    pub halted: Option<String>,
    /// Provider batches left running (a stop while they were processed):
    /// their items stay claimed for a resume.
    pub batches_left: usize,
}

impl Summary {
    /// The run's state given its final counts: `None` leaves it `running`
    /// (other workers still hold work).
    pub fn final_state(&self, counts: &StatusCounts) -> Option<RunState> {
        if counts.pending + counts.running == 0 {
            Some(RunState::Finished)
        } else if self.interrupted
            || self.verify_failed
            || !self.stopped.is_empty()
            || self.halted.is_some()
            || self.others_hold == 0
        {
            Some(RunState::Interrupted)
        } else {
            None
        }
    }
}

/// One item's outcome in a batch's results.
pub type ItemOutcome = (GenerationId, Result<Generated, AttemptError>);

/// Attempts to record as one provider batch and submit.
#[derive(Debug)]
pub struct BatchSubmission {
    /// The batch.
    pub batch: BatchRef,
    /// Its provider.
    pub provider: ProviderKind,
    /// The one model of its items.
    pub model: String,
    /// Its wave.
    pub wave: Wave,
    /// Its items.
    pub items: Vec<Attempt>,
}
