//! Executing a run, synchronously or through the providers' Batch APIs:
//! cache-aware order under per-minute rate limits, a concurrency bound,
//! retries with backoff, fatal errors that stop a condition, and a clean
//! stop on request.
//!
//! One engine. The rules live in [`Dispatcher`], a synchronous state
//! machine in the style of quinn-proto's `Connection`: a driver feeds it
//! [`Event`]s (work claimed, tokens counted, an attempt begun, finished or
//! stored; a batch submitted, found, polled, read or closed; a task failed,
//! a stop requested, time passed) and performs the [`Action`]s it hands out
//! (claim, count, begin, send or store an attempt; submit, look for, poll,
//! read or close a provider batch; notify; done);
//! [`Dispatcher::poll_timeout`] says when to wake it. It does no I/O and has
//! no runtime, so its tests feed events and check actions directly, and a
//! property test drives it in both transports against an independent model
//! of the outside. [`Executor`] performs the actions against a [`Store`]
//! and [`Provider`]s: what both transports share (claiming, storing,
//! patience with the ledger, paid results it could not take, stopping,
//! progress, closing the run) in `driver`, the batch calls in
//! `batch_driver`. The batch transport's rules are pure functions in
//! [`waves`].
//!
//! Order: for each (condition, context) the *leader* (first replicate) goes
//! first; its *followers* are released when it succeeds, so they read the
//! cache it wrote ([`GroupPhase::Warm`]); if it fails for good they go
//! anyway, each writing the cache ([`GroupPhase::Cold`]). Due retries go
//! first, then released followers, then new leaders. The very first request
//! of each condition goes alone and synchronously
//! ([`ConditionGate::Probing`]), in either transport: if it fails for a
//! reason every request of that condition would share (bad key, no quota,
//! unknown model, a base URL that redirects), the condition stops after one
//! request. In batch mode the rest go in two waves per (condition,
//! context), because items of one batch do not read each other's cache
//! writes: the leaders in a batch writing the longest cache the model
//! offers, then, once it has ended and while that cache is warm, the
//! followers in another.
//!
//! Every synchronous attempt passes the
//! [`RateLimiter`](crate::limiter::RateLimiter): it is reserved before it is
//! sent (output at `max_tokens`, input by estimate; a warm follower's cached
//! prefix does not count against Anthropic's ITPM) and settled to the real
//! usage when the response arrives. Every outcome, either transport, goes
//! through one [`RetryPolicy`]; a refused batch submission is answered by a
//! smaller or a later one, never the same one at once.
//!
//! [`Store`]: crate::store::Store
//! [`Provider`]: crate::provider::Provider

mod batch_driver;
mod driver;
mod machine;
pub(crate) mod pacing;
mod patience;
mod protocol;
mod retry;
pub mod waves;
mod work;

#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::limiter::LimitTable;
use crate::run::StatusCounts;

pub use driver::Executor;
pub use machine::{Dispatcher, ReservationBook};
pub use pacing::{CacheRole, charge, check_limits, choose_ttl};
pub use protocol::{
    Action, Attempt, BatchSubmission, BatchTransport, DispatchConfig, Event, ItemOutcome, Summary,
    Task,
};
pub use retry::{Budget, RetryPolicy, Verdict, backoff_delay};
pub use waves::queue_limit_in;
pub use work::{BatchRef, ConditionGate, GenerationId, GroupId, GroupPhase, Role, VerifyGate};

/// How to execute.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Retries after a failed attempt (attempts = retries + 1).
    pub max_retries: u32,
    /// Send prompt-caching hints.
    pub cache: bool,
    /// Send one request per condition first; stop everything if one fails.
    pub verify_first: bool,
    /// Multiplies Apex's own pacing durations (windows, backoff, cache TTL
    /// planning); 1 in real use.
    pub time_scale: f64,
    /// First backoff delay (then ×2 per retry).
    pub backoff_base: Duration,
    /// Per-minute limits; [`LimitTable::none`] turns rate limiting off.
    pub limits: LimitTable,
    /// This process's name in claims (unique per process; by default
    /// [`worker::name`](crate::worker::name)).
    pub worker: String,
    /// A claim not renewed for this long (times `time_scale`) is taken over:
    /// its process is presumed dead.
    pub claim_timeout: Duration,
    /// How long a failing ledger is retried (with backoff) before the run
    /// stops; results received meanwhile are kept, not lost.
    pub ledger_patience: Duration,
    /// Send through the providers' Batch APIs at the batch price, in a
    /// leader wave and a follower wave per (condition, context).
    pub batch: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_retries: 3,
            cache: true,
            verify_first: false,
            time_scale: 1.0,
            backoff_base: Duration::from_secs(1),
            limits: LimitTable::defaults(),
            worker: crate::worker::name(),
            claim_timeout: Duration::from_secs(60),
            ledger_patience: Duration::from_secs(60),
            batch: false,
        }
    }
}

/// What happened, for progress displays.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressEvent {
    /// Work is about to start.
    Started {
        /// The run.
        run_id: crate::run::RunId,
        /// Generations to execute.
        total: u64,
        /// Of those, per condition, in plan order.
        conditions: Vec<(String, u64)>,
    },
    /// A generation reached `success` or `error`.
    Finished {
        /// Its condition.
        condition: String,
        /// The context.
        prompt_id: String,
        /// The replicate.
        replicate_index: u32,
        /// Whether it succeeded.
        success: bool,
        /// Whether it read the provider's cache.
        cache_hit: bool,
        /// Its cost, if known.
        cost_usd: Option<f64>,
    },
    /// An attempt failed and will be retried.
    Retrying {
        /// Its condition.
        condition: String,
        /// The context.
        prompt_id: String,
        /// The replicate.
        replicate_index: u32,
        /// The attempt that failed (1-based).
        attempt: u32,
        /// Why.
        error: String,
        /// The HTTP status of the failed attempt, if one came (429: a rate
        /// limit, waited out without spending a retry).
        http_status: Option<u16>,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// How a condition's model is paced now (sent about once a second by
    /// the synchronous driver).
    Pacing {
        /// The condition.
        condition: String,
        /// Its limiter key (`provider/model`; conditions on one model share
        /// its limits).
        key: String,
        /// What Apex counts in the current window: requests, input (OpenAI:
        /// all) tokens, output tokens.
        window: [u64; 3],
        /// The limits it paces at (learned from the server or capped by the
        /// limits file), per minute; `None` where none is known.
        limits: [Option<u64>; 3],
        /// The window's length (60 s times `--time-scale`).
        window_length: Duration,
    },
    /// Batch mode: waiting on provider batches (sent after each poll).
    Waiting {
        /// Batches still processing.
        batches: u32,
        /// Their items processed so far, as the providers report.
        processed: u64,
        /// Their items.
        total: u64,
    },
    /// A condition stopped; its remaining generations stay `pending`.
    ConditionStopped {
        /// Its slug.
        condition: String,
        /// Why.
        reason: String,
    },
}

/// Receives progress events (the CLI draws a bar or logs lines).
pub trait Progress: Send + Sync {
    /// One event.
    fn event(&self, event: &ProgressEvent);
}

/// Ignores events.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _: &ProgressEvent) {}
}

/// How an execution ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunReport {
    /// Counts of the whole run afterwards.
    pub counts: StatusCounts,
    /// Conditions stopped by a fatal error: (slug, reason).
    pub stopped: Vec<(String, String)>,
    /// `--verify-first` failed: nothing fanned out.
    pub verify_failed: bool,
    /// A stop was requested (Ctrl-C).
    pub interrupted: bool,
    /// Responses with status 429 received.
    pub rate_limited: u64,
    /// Why the run stopped short, if it did: a batch cancelled from outside
    /// the run, a Batch API that stopped answering.
    pub halted: Option<String>,
    /// Provider batches left running at the provider (a stop while they
    /// were processed); a resume collects them.
    pub batches_left: usize,
}
