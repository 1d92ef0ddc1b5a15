//! The dispatcher's domain: groups and their phases, jobs and their stages,
//! condition gates, the verify-first gate and the ready queue.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::condition::{Condition, ProviderKind};
use crate::limiter::Reservation;
use crate::provider::{CacheControls, CacheTtl, SharedBody};
use crate::run::Wave;
use crate::run::WorkItem;

use super::retry::{Budget, Verdict};

/// A generation's row id in the ledger: jobs are keyed by it.
pub type GenerationId = i64;

/// A provider batch this dispatch submitted or re-attached to, by its place
/// in the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchRef(pub(crate) u32);

/// One (condition, context) group of replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub(crate) u32);

/// Where a group stands with its prompt cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupPhase {
    /// Its leader has not been sent.
    Queued,
    /// Its leader is out; its followers wait for it.
    LeaderOut,
    /// Its leader succeeded: followers read the cache it wrote.
    Warm,
    /// Its leader failed for good: followers go anyway, each writing the
    /// cache itself.
    Cold,
}

/// A group: its condition, context, cache TTL, phase and the followers
/// still waiting for the leader.
#[derive(Debug)]
pub(crate) struct Group {
    pub condition: Arc<Condition>,
    pub prompt_id: String,
    pub version: String,
    pub ttl: CacheTtl,
    /// The model's cache controls, looked up once for the group.
    pub cache_controls: CacheControls,
    pub phase: GroupPhase,
    pub leader: GenerationId,
    pub waiting: Vec<GenerationId>,
    /// Its jobs not yet finished (queued, out, or waiting to retry).
    pub live: usize,
    /// The request body every attempt of the group sends; dropped once the
    /// group has no work left.
    pub body: SharedBody,
    /// The body without cache hints (batch items whose cache would be
    /// cold, or that share none).
    pub plain_body: SharedBody,
    /// When its cache was written (batch transport: whether followers still
    /// read it when their batch is processed).
    pub warmth: Option<super::waves::Warmth>,
    /// Whether its replicates share a cache in the batch transport (caching
    /// on, more than one replicate): a leader wave, then a follower wave.
    pub shares_cache: bool,
}

/// What a job does in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The first request of its group: it writes the cache.
    Leader,
    /// A later replicate, released by its group's leader.
    Follower,
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Stage {
    /// Waiting in the ready queue (or, for a follower, for its leader).
    Queued,
    /// Waiting for its retry time (kept in the ready queue).
    Retrying,
    /// Its attempt is being recorded as begun.
    Beginning,
    /// Its request is out.
    Sending,
    /// Its outcome is being stored; the verdict applies once it is.
    Storing(Verdict, Box<Outcome>),
    /// Its attempt is an item of an open provider batch.
    InBatch,
}

/// What an attempt's outcome means for progress and for its condition,
/// kept while it is being stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// It succeeded.
    Success {
        cache_hit: bool,
        cost_usd: Option<f64>,
    },
    /// It failed.
    Failure(Box<crate::provider::AttemptError>),
}

/// One generation on its way.
#[derive(Debug)]
pub(crate) struct Job {
    pub item: WorkItem,
    pub group: GroupId,
    pub role: Role,
    /// Attempts made in this execution, and which of them were free.
    pub budget: Budget,
    pub stage: Stage,
    pub reservation: Option<Reservation>,
    /// The provider batch its current attempt is in, if any.
    pub batch: Option<BatchRef>,
    /// Most items a batch holding it may have: set when a batch it was in
    /// was refused as invalid, so the bad request is isolated by halving.
    pub max_batch: Option<usize>,
    /// A request that can never be sent: it fails with this error when its
    /// attempt is recorded, without leaving.
    pub doomed: Option<Box<crate::provider::AttemptError>>,
}

impl Job {
    /// The ledger's attempt number of the current attempt.
    pub fn attempt(&self) -> u32 {
        self.item.attempts.saturating_add(self.budget.tries)
    }

    /// Whether a synchronous attempt of this job is out (counted against
    /// concurrency); batch items are not.
    pub fn in_flight(&self) -> bool {
        self.batch.is_none()
            && matches!(
                self.stage,
                Stage::Beginning | Stage::Sending | Stage::Storing(..)
            )
    }
}

/// A condition's gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionGate {
    /// Its first request goes alone: a bad key or model costs one request.
    Probing,
    /// Answered once without a condition-wide failure: open.
    Open,
    /// Stopped, with the reason; its remaining cells stay `pending`.
    Stopped(String),
}

/// The `--verify-first` gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyGate {
    /// Not asked for, or passed: everything may go.
    Open,
    /// Only these groups' leaders (one per condition) may go.
    Verifying(HashSet<GroupId>),
    /// A verification request failed for good: nothing else goes.
    Failed,
}

/// What may be dispatched, in priority order: due retries, released
/// followers, then new leaders. Jobs are referred to by id, never by index.
#[derive(Debug, Default)]
pub(crate) struct ReadyQueue {
    pub retries: BTreeSet<(Instant, GenerationId)>,
    pub followers: VecDeque<GenerationId>,
    pub leaders: VecDeque<GroupId>,
}

/// One candidate for dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Candidate {
    Retry(Instant, GenerationId),
    Follower(GenerationId),
    Leader(GroupId),
}

impl ReadyQueue {
    /// The candidates at `now`, in priority order.
    pub fn candidates(&self, now: Instant) -> Vec<Candidate> {
        self.retries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|&(at, id)| Candidate::Retry(at, id))
            .chain(self.followers.iter().map(|&id| Candidate::Follower(id)))
            .chain(self.leaders.iter().map(|&g| Candidate::Leader(g)))
            .collect()
    }

    /// Takes many candidates out of their queues at once (one pass each).
    pub fn remove_all(&mut self, candidates: &HashSet<Candidate>) {
        if candidates.is_empty() {
            return;
        }
        self.retries
            .retain(|&(at, id)| !candidates.contains(&Candidate::Retry(at, id)));
        self.followers
            .retain(|&id| !candidates.contains(&Candidate::Follower(id)));
        self.leaders
            .retain(|&g| !candidates.contains(&Candidate::Leader(g)));
    }

    /// Takes a candidate out of its queue.
    pub fn remove(&mut self, candidate: Candidate) {
        match candidate {
            Candidate::Retry(at, id) => {
                self.retries.remove(&(at, id));
            }
            Candidate::Follower(id) => self.followers.retain(|&f| f != id),
            Candidate::Leader(g) => self.leaders.retain(|&l| l != g),
        }
    }

    /// The earliest retry not yet due.
    pub fn next_retry_after(&self, now: Instant) -> Option<Instant> {
        self.retries.iter().map(|(at, _)| *at).find(|at| *at > now)
    }
}

/// Where an open batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchStage {
    /// [`Action::SubmitBatch`] is out.
    Submitting,
    /// Its submission got no answer: look for it at the provider then.
    Unacknowledged(Instant),
    /// [`Action::FindBatch`] is out.
    Finding,
    /// Submitted: poll it then.
    Waiting(Instant),
    /// [`Action::PollBatch`] is out.
    Polling,
    /// [`Action::FetchResults`] is out.
    Fetching,
    /// Its results failed to download: try again then.
    FetchAgain(Instant),
    /// [`Action::CloseBatch`] is out.
    Closing,
    /// Left at the provider (the run halted); a resume re-attaches.
    Left,
}

/// A provider batch open in this dispatch.
#[derive(Debug)]
pub(crate) struct OpenBatch {
    pub provider: ProviderKind,
    pub model: String,
    pub wave: Wave,
    pub items: Vec<GenerationId>,
    pub key: Option<String>,
    pub created_at: Option<String>,
    pub provider_id: Option<String>,
    pub stage: BatchStage,
    /// When it left (re-attached: its submission time, from the ledger).
    pub submitted: Instant,
    /// Re-attached from an earlier execution.
    pub reattached: bool,
    /// The provider reported it cancelled.
    pub cancelled: bool,
    /// Its items' input tokens, where its model's enqueued tokens count.
    pub tokens: u64,
    /// The wait before the next poll (doubling up to [`POLL_MAX`]).
    pub interval: Duration,
    /// Polls, lookups or downloads failed in a row.
    pub failures: u32,
    /// Items processed and in all, as the provider last reported.
    pub progress: (u64, u64),
}

/// What a claim's open batches mean for its items.
#[derive(Debug, Default)]
pub(crate) struct Attached {
    /// Items of batches this dispatch re-attached to, with their wave.
    pub mine: HashMap<GenerationId, (BatchRef, Wave)>,
    /// Items in another live process's open batches: left alone.
    pub theirs: HashSet<GenerationId>,
    /// How long ago each re-attached batch was submitted.
    pub ages: HashMap<BatchRef, Duration>,
}
