//! The dispatcher's domain: groups and their phases, jobs and their stages,
//! condition gates, the verify-first gate and the ready queue.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::condition::Condition;
use crate::limiter::Reservation;
use crate::provider::{CacheControls, CacheTtl, SharedBody};
use crate::run::WorkItem;

use super::retry::{Budget, Verdict};

/// A generation's row id in the ledger: jobs are keyed by it.
pub type GenerationId = i64;

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
}

impl Job {
    /// The ledger's attempt number of the current attempt.
    pub fn attempt(&self) -> u32 {
        self.item.attempts.saturating_add(self.budget.tries)
    }

    /// Whether an attempt of this job is out (counted against concurrency).
    pub fn in_flight(&self) -> bool {
        matches!(
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
