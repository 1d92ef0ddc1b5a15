//! The rate limiter: per (provider, model), requests and tokens per minute,
//! reserved before a request is sent and settled to the real usage when its
//! response arrives, paced to what the server says it has counted.
//!
//! Dimensions: requests; input tokens (Anthropic ITPM: uncached input plus
//! cache writes, cache reads excluded; OpenAI TPM: all input plus output);
//! output tokens (Anthropic OTPM, reserved at `max_tokens`, the unused part
//! free again when the answer settles).
//!
//! Limits come from the server: each model's first request goes alone, and
//! the rate-limit headers of its answer set them; a `--limits` file caps
//! them. Every answer's `limit − remaining` is the server's count at the
//! request's arrival: admission starts from the latest such report and adds
//! only what the server has not seen yet (the private `model` module has the
//! details), so Apex's own count matters only for what is in flight. The reset times tell
//! a bucket refilled continuously from a sliding window, and each is paced
//! as what it is. How the server counts against Apex (a factor, either way)
//! is measured from the reports. Processes sharing a ledger split each
//! model's limits by the work each holds for it.

mod model;
mod table;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::condition::ProviderKind;
use crate::provider::{LimitBucket, RateLimitSnapshot};

pub use model::Replenish;
use model::{Dim, Entry, LimitView};
pub use table::{Charge, LimitTable, Limits, bucket_key, parse_limits_file};

/// The server's window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Apex's margin on top of it.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(1);
/// Requests sent this close together may reach the server in either order
/// (times `time_scale`, at least [`LEAST_REAL_AMBIGUITY`] of real time).
pub const AMBIGUITY: Duration = Duration::from_millis(100);
/// The least ambiguity in real time, whatever the time scale.
pub const LEAST_REAL_AMBIGUITY: Duration = Duration::from_millis(25);
/// The least margin in real time, whatever the time scale: a request
/// reaches the server some milliseconds after Apex counts it sent, and that
/// lag does not shrink with a simulator's clock.
pub const LEAST_REAL_MARGIN: Duration = Duration::from_millis(25);

/// A granted reservation, settled when the response arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    key: String,
    id: u64,
    /// When it was taken (the send time).
    pub at: Instant,
}

/// The answer to a reservation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Send now.
    Granted(Reservation),
    /// Not before this instant (far in the future while the model's first
    /// request is out and its limits are not known yet).
    Wait(Instant),
}

/// What a key knows of its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Knowledge {
    /// Nothing yet: one request goes alone (its reservation id once out),
    /// and its answer's headers say what the limits are.
    Probing(Option<u64>),
    /// Answered, and the limits are shared with other processes: nothing
    /// more goes until they have been asked how many pace this key.
    Answered,
    /// The server has answered once (with or without rate-limit headers).
    Known,
}

/// One model's limits and what this process sent against them.
struct KeyState {
    provider: ProviderKind,
    /// The `--limits` file's caps.
    caps: [Option<u64>; 3],
    /// What the server's headers last reported.
    learned: [Option<u64>; 3],
    knowledge: Knowledge,
    dims: [Dim; 3],
    /// This process's share of the limits when processes share them
    /// through the ledger (its part of the work held for this model); 1
    /// alone.
    fraction: f64,
    /// Processes pacing this key through the ledger, this one included.
    members: u64,
    /// What the other processes counted in their windows at the last share
    /// round, per limit.
    others: [u64; 3],
    entries: VecDeque<Entry>,
    next_id: u64,
    /// Whether the server's `remaining` figures are exact, per limit.
    exact: [bool; 3],
}

impl KeyState {
    fn new(provider: ProviderKind, caps: [Option<u64>; 3], knowledge: Knowledge) -> Self {
        Self {
            provider,
            caps,
            learned: [None; 3],
            knowledge,
            dims: Default::default(),
            fraction: 1.0,
            members: 1,
            others: [0; 3],
            entries: VecDeque::new(),
            next_id: 1,
            exact: [false; 3],
        }
    }

    /// The limit of dimension `d`: the lower of the cap and what the
    /// server reports.
    fn limit(&self, d: usize) -> Option<u64> {
        match (self.caps[d], self.learned[d]) {
            (Some(cap), Some(server)) => Some(cap.min(server)),
            (one, other) => one.or(other),
        }
    }

    /// This process's part of a limit: 1/N with `--workers N`, else its
    /// share of the work the processes on the ledger hold.
    fn fraction(&self, workers: u64) -> f64 {
        if workers > 1 {
            1.0 / workers as f64
        } else {
            self.fraction.clamp(0.0, 1.0)
        }
    }

    fn entry_mut(&mut self, id: u64) -> Option<&mut Entry> {
        let index = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        self.entries.get_mut(index)
    }

    /// Forgets entries nothing looks at any more.
    fn prune(&mut self, now: Instant, keep: Duration) {
        while self
            .entries
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) >= keep)
        {
            self.entries.pop_front();
        }
    }

    /// What this process counts within `window` of `now`, per dimension.
    fn sums(&self, now: Instant, window: Duration) -> [u64; 3] {
        self.entries
            .iter()
            .filter(|e| now.saturating_duration_since(e.at) < window)
            .fold([0; 3], |mut s, e| {
                for (d, v) in s.iter_mut().zip(e.amounts) {
                    *d += v;
                }
                s
            })
    }
}

/// The limiter. One per dispatch; the dispatcher owns it.
pub struct RateLimiter {
    /// The server's window (60 s × time scale).
    window: Duration,
    /// Apex keeps its own charges this much longer than the server does.
    margin: Duration,
    /// Requests sent this close together may reach the server in either
    /// order.
    ambiguity: Duration,
    /// Whether limits are learned from response headers, each model's first
    /// request going alone until they are (off with `--no-rate-limiting`
    /// and for [`RateLimiter::fixed`]).
    learns: bool,
    /// Whether other processes share the limits through the ledger: a
    /// model's first answer is then followed by a share before more go.
    shared: bool,
    keys: HashMap<String, KeyState>,
    /// A 429's `retry-after` holds a model back whether or not it has
    /// limits.
    paused_until: HashMap<String, Instant>,
    /// `--workers N`.
    workers: u64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("window", &self.window)
            .field("learns", &self.learns)
            .finish_non_exhaustive()
    }
}

const DIMENSION_NAMES: [[&str; 3]; 2] = [["RPM", "TPM", "-"], ["RPM", "ITPM", "OTPM"]];

fn dimension_name(provider: ProviderKind, d: usize) -> &'static str {
    DIMENSION_NAMES[usize::from(provider == ProviderKind::Anthropic)][d]
}

/// What a key knows once its first answer is in: with limits shared
/// through the ledger, it first waits for a share round.
fn answered_knowledge(now: Knowledge, shared: bool) -> Knowledge {
    match now {
        Knowledge::Probing(_) if shared => Knowledge::Answered,
        Knowledge::Probing(_) => Knowledge::Known,
        known => known,
    }
}

/// Anthropic rounds its token `remaining` headers to the nearest thousand
/// (until a figure that is not a round thousand shows a server that does
/// not).
fn rounding(state: &KeyState, d: usize) -> f64 {
    match (state.provider, d) {
        (ProviderKind::Anthropic, 1 | 2) if !state.exact[d] => 500.0,
        _ => 0.0,
    }
}

impl RateLimiter {
    /// A limiter that learns each model's limits from the server: its first
    /// request goes alone, and the rate-limit headers of the answer set the
    /// limits (capped by [`configure`](Self::configure)) and, answer after
    /// answer, how the server counts and replenishes. Durations are scaled
    /// by `time_scale`.
    pub fn new(time_scale: f64) -> Self {
        Self {
            window: crate::time::scaled(WINDOW, time_scale),
            margin: crate::time::scaled(SAFETY_MARGIN, time_scale).max(LEAST_REAL_MARGIN),
            ambiguity: crate::time::scaled(AMBIGUITY, time_scale).max(LEAST_REAL_AMBIGUITY),
            learns: true,
            shared: false,
            keys: HashMap::new(),
            paused_until: HashMap::new(),
            workers: 1,
        }
    }

    /// A limiter that paces by the configured limits alone and learns
    /// nothing from headers (`--no-rate-limiting` configures none); pauses
    /// after a 429 still apply.
    pub fn fixed(time_scale: f64) -> Self {
        Self {
            learns: false,
            ..Self::new(time_scale)
        }
    }

    /// A learning limiter whose limits are split among the processes that
    /// pace the same keys through the ledger ([`set_members`](Self::set_members)).
    pub fn shared(time_scale: f64) -> Self {
        Self {
            shared: true,
            ..Self::new(time_scale)
        }
    }

    /// What this process counts in its window, per key: what it tells the
    /// other processes.
    pub fn window_usage(&self, now: Instant) -> Vec<(String, [u64; 3])> {
        let mut usage: Vec<_> = self
            .keys
            .iter()
            .map(|(key, k)| (key.clone(), k.sums(now, self.window + self.margin)))
            .collect();
        usage.sort();
        usage
    }

    /// Whether a key waits for a share round (its first answer is in).
    pub fn awaits_share(&self) -> bool {
        self.keys
            .values()
            .any(|k| k.knowledge == Knowledge::Answered)
    }

    /// The other processes' word, from the ledger: per key, how many pace
    /// it and how much of its work they hold; `mine` is the work this
    /// process holds per key. A key's limits are split in proportion to the
    /// work held. Keys not listed are paced by this process alone. `None`:
    /// the ledger did not answer; keys waiting for it go on with what is
    /// known.
    pub fn set_members(
        &mut self,
        shares: Option<&[crate::store::PacingShare]>,
        mine: &HashMap<String, u64>,
    ) {
        for (key, state) in &mut self.keys {
            if let Some(shares) = shares {
                let share = shares.iter().find(|s| &s.key == key);
                let members = share.map_or(1, |s| u64::from(s.members.max(1)));
                let own = mine.get(key).copied().unwrap_or(0) as f64;
                let others = share.map_or(0, |s| s.others_work) as f64;
                let fraction = if others > 0.0 {
                    own / (own + others)
                } else {
                    1.0
                };
                if members != state.members {
                    tracing::info!(key, members, "processes sharing this model's limits");
                }
                state.members = members;
                state.fraction = fraction;
                state.others = share.map_or([0; 3], |s| s.others);
            }
            if state.knowledge == Knowledge::Answered {
                state.knowledge = Knowledge::Known;
            }
        }
    }

    /// The window Apex counts its own requests over (the server's, plus
    /// the margin).
    pub fn window(&self) -> Duration {
        self.window + self.margin
    }

    /// This process takes 1/`n` of every limit (`--workers`).
    pub fn set_share(&mut self, n: u32) {
        self.workers = u64::from(n.max(1));
    }

    /// Declares a key and its caps (before any reservation). A learning
    /// limiter tracks every key; a fixed one only keys with a limit.
    pub fn configure(&mut self, key: &str, provider: ProviderKind, caps: Limits) {
        let dims = caps.dims(provider);
        if !self.learns && dims.iter().all(Option::is_none) {
            self.keys.remove(key);
            return;
        }
        let knowledge = if self.learns {
            Knowledge::Probing(None)
        } else {
            Knowledge::Known
        };
        self.keys
            .insert(key.to_owned(), KeyState::new(provider, dims, knowledge));
    }

    fn view(&self, state: &KeyState, d: usize, limit: u64, fraction: f64) -> LimitView {
        LimitView {
            limit: limit as f64 * fraction,
            window: self.window,
            margin: self.margin,
            rounding: rounding(state, d),
            ambiguity: self.ambiguity,
            alone: state.members <= 1 && self.workers <= 1,
        }
    }

    /// Checks that a request could ever be admitted: a charge above a limit
    /// would wait forever, so it is refused.
    pub fn check_fits(&self, key: &str, charge: Charge) -> std::result::Result<(), String> {
        let Some(state) = self.keys.get(key) else {
            return Ok(());
        };
        let fraction = state.fraction(self.workers);
        for (d, amount) in charge.amounts().into_iter().enumerate() {
            let Some(limit) = state.limit(d) else {
                continue;
            };
            let share = ((limit as f64 * fraction).floor() as u64).max(1);
            // At the least the server may count: only what can never fit
            // is refused.
            let factor = state.dims[d].factor.lower.min(1.0);
            let counted = amount as f64 * factor;
            if counted > share as f64 {
                let source =
                    if state.learned[d].is_some_and(|l| state.caps[d].is_none_or(|c| l < c)) {
                        "the server's"
                    } else {
                        "the --limits"
                    };
                return Err(format!(
                    "one request needs {amount} against {source} {} limit of {share}{}; it can never be sent. Raise the limit (if your tier allows), shorten the context or lower max_tokens",
                    dimension_name(state.provider, d),
                    if fraction < 1.0 {
                        " (this process's share)"
                    } else {
                        ""
                    },
                ));
            }
        }
        Ok(())
    }

    /// Reserves `charge` at `now`, or says when to ask again.
    pub fn try_reserve(&mut self, key: &str, charge: Charge, now: Instant) -> Admission {
        if let Some(&until) = self.paused_until.get(key) {
            if until > now {
                return Admission::Wait(until);
            }
            self.paused_until.remove(key);
        }
        let keep = self.window.saturating_mul(2) + self.margin;
        let workers = self.workers;
        let Some(state) = self.keys.get(key) else {
            return Admission::Granted(Reservation {
                key: key.to_owned(),
                id: 0,
                at: now,
            });
        };
        if matches!(
            state.knowledge,
            Knowledge::Probing(Some(_)) | Knowledge::Answered
        ) {
            return Admission::Wait(crate::time::later(now, crate::time::FAR_FUTURE));
        }
        let amounts = charge.amounts();
        let fraction = state.fraction(workers);
        let mut wait: Option<Instant> = None;
        for (d, amount) in amounts.into_iter().enumerate() {
            let Some(limit) = state.limit(d) else {
                continue;
            };
            let dim = &state.dims[d];
            let need = amount as f64 * dim.factor.upper;
            let full = self.view(state, d, limit, 1.0);
            // Alone, the server's word counts everything, others' use too;
            // sharing, this process keeps to its part of the limit (and the
            // server's word still bounds the whole).
            let mut checks = vec![(full, true)];
            if fraction < 1.0 {
                checks.push((self.view(state, d, limit, fraction), false));
            }
            if state.members > 1 {
                // Sharing: what this process and the others counted in
                // their windows (as of the last share round) stays under the
                // whole limit, while shares change hands (a process that
                // paced alone a moment ago may have used it all).
                let own: f64 = state
                    .entries
                    .iter()
                    .filter(|e| now.saturating_duration_since(e.at) < full.window + full.margin)
                    .map(|e| e.amounts[d] as f64)
                    .sum::<f64>()
                    * dim.factor.estimate;
                let excess = own + state.others[d] as f64 + need - (full.limit - full.rounding);
                if excess > 0.0 {
                    let mut freed = 0.0;
                    let mut at = now + full.window / 10;
                    for e in &state.entries {
                        let leaves = e.at + full.window + full.margin;
                        if leaves > now {
                            freed += e.amounts[d] as f64 * dim.factor.estimate;
                            if freed >= excess {
                                at = leaves;
                                break;
                            }
                        }
                    }
                    wait = Some(wait.map_or(at, |w| w.max(at)));
                }
            }
            for (view, anchored) in checks {
                let level = dim.level(&view, &state.entries, d, now, anchored);
                // A reported figure is off by its rounding at most.
                let cap = if level.anchored.is_some() {
                    view.limit - view.rounding
                } else {
                    view.limit
                };
                // An over-estimated factor slows pacing, never stops it:
                // what `check_fits` lets through goes once the server's
                // count is (predicted) empty, and its report measures the
                // factor afresh.
                let need = need.min(cap);
                let at = dim.fits_at(&view, &state.entries, d, now, level, need, cap);
                if at > now {
                    wait = Some(wait.map_or(at, |w| w.max(at)));
                }
            }
        }
        if let Some(until) = wait {
            return Admission::Wait(until);
        }
        let state = self.keys.get_mut(key).expect("looked up above");
        state.prune(now, keep);
        let id = state.next_id;
        state.next_id += 1;
        if state.knowledge == Knowledge::Probing(None) {
            state.knowledge = Knowledge::Probing(Some(id));
        }
        state.entries.push_back(Entry {
            unknown: false,
            id,
            at: now,
            reserved: amounts,
            amounts,
            settled_at: None,
            refused: false,
            rank: None,
        });
        Admission::Granted(Reservation {
            key: key.to_owned(),
            id,
            at: now,
        })
    }

    /// Ends a reservation at `now`: its amounts become what the request
    /// really used (`None`: unknown, it stays counted as reserved), and
    /// what it reserved beyond that comes back at once. A model's first
    /// request that ended without teaching the limits lets the next go
    /// alone.
    pub fn settle(&mut self, reservation: &Reservation, actual: Option<Charge>, now: Instant) {
        self.end(reservation, actual, false, now);
    }

    /// Ends a reservation the server refused (a 429): its tokens never
    /// counted; the request still does (servers count failed requests).
    pub fn settle_refused(&mut self, reservation: &Reservation, now: Instant) {
        let request = Charge {
            requests: 1,
            ..Charge::default()
        };
        self.end(reservation, Some(request), true, now);
    }

    fn end(
        &mut self,
        reservation: &Reservation,
        actual: Option<Charge>,
        refused: bool,
        now: Instant,
    ) {
        let Some(state) = self.keys.get_mut(&reservation.key) else {
            return;
        };
        if state.knowledge == Knowledge::Probing(Some(reservation.id)) {
            state.knowledge = Knowledge::Probing(None);
        }
        let Some(entry) = state.entry_mut(reservation.id) else {
            return;
        };
        entry.settled_at = Some(now.max(entry.at));
        match actual {
            Some(actual) => {
                entry.amounts = actual.amounts();
                entry.refused = refused;
            }
            // Not known what the server counted (a 5xx, a dropped
            // connection): paced as reserved, read by the factor as
            // anywhere between nothing and that; settled all the same, so
            // the reports after it still teach.
            None => entry.unknown = true,
        }
    }

    /// Moves a reservation's timestamp to when the request actually left:
    /// the ledger write between reserving and sending takes time, and the
    /// server counts from arrival.
    pub fn mark_sent(&mut self, reservation: &mut Reservation, at: Instant) {
        if let Some(state) = self.keys.get_mut(&reservation.key)
            && let Some(entry) = state.entry_mut(reservation.id)
        {
            entry.at = entry.at.max(at);
            reservation.at = entry.at;
        }
    }

    /// Stops admitting requests for a key until `until` (after a 429),
    /// whether or not the key has limits.
    pub fn pause(&mut self, key: &str, until: Instant) {
        let paused = self.paused_until.entry(key.to_owned()).or_insert(until);
        *paused = (*paused).max(until);
    }

    /// A 429: the server counts more than this limiter thought; every
    /// token dimension's factor rises by 10%.
    pub fn rejected(&mut self, key: &str) {
        if !self.learns {
            return;
        }
        if let Some(state) = self.keys.get_mut(key) {
            for dim in &mut state.dims[1..] {
                dim.rejected();
            }
            tracing::debug!(key, "429: pacing tightened by 10%");
        }
    }

    /// Feeds back an answer's rate-limit headers (`answered`: the server
    /// processed the request, so its headers, or their absence, are the
    /// server's word) for the request `reservation` sent. Reported limits
    /// replace the learned ones, higher or lower (never above a cap).
    /// `remaining` is the server's count at the request's arrival: the
    /// anchor later admissions start from, and, over a span of answers, the
    /// measure of how the server counts against Apex. The reset times tell
    /// a bucket refilled continuously from a window.
    pub fn observe(
        &mut self,
        key: &str,
        provider: ProviderKind,
        snapshot: &RateLimitSnapshot,
        answered: bool,
        reservation: Option<&Reservation>,
        now: Instant,
    ) {
        if !self.learns {
            return;
        }
        let (window, margin, ambiguity, workers) =
            (self.window, self.margin, self.ambiguity, self.workers);
        let state = self
            .keys
            .entry(key.to_owned())
            .or_insert_with(|| KeyState::new(provider, [None; 3], Knowledge::Probing(None)));
        let reported: [Option<LimitBucket>; 3] = match state.provider {
            ProviderKind::OpenAi => [snapshot.requests, snapshot.tokens, None],
            ProviderKind::Anthropic => [
                snapshot.requests,
                snapshot.input_tokens,
                snapshot.output_tokens,
            ],
        };
        let limits: [Option<u64>; 3] = reported.map(|b| b.and_then(|b| b.limit).filter(|&l| l > 0));
        if limits.iter().any(Option::is_some) {
            let changed = limits != state.learned;
            for (learned, limit) in state.learned.iter_mut().zip(limits) {
                if limit.is_some() {
                    *learned = limit;
                }
            }
            if changed {
                let listed = |values: [Option<u64>; 3]| -> String {
                    (0..3)
                        .filter_map(|d| {
                            values[d].map(|v| format!("{} {v}", dimension_name(state.provider, d)))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let paced = std::array::from_fn(|d| state.limit(d));
                tracing::info!(
                    key,
                    "the server reports limits {}; pacing at {}",
                    listed(limits),
                    listed(paced)
                );
            }
            state.knowledge = answered_knowledge(state.knowledge, self.shared);
        } else if answered && matches!(state.knowledge, Knowledge::Probing(_)) {
            let source = if state.caps.iter().any(Option::is_some) {
                "pacing by the --limits file only"
            } else {
                "not pacing it"
            };
            tracing::info!(key, "the server sends no rate-limit headers; {source}");
            state.knowledge = answered_knowledge(state.knowledge, self.shared);
        }
        let Some(reservation) = reservation else {
            return;
        };
        // The server's count of requests at the arrival orders requests sent
        // close together.
        if let Some(requests) = reported[0]
            && let (Some(limit), Some(remaining)) = (requests.limit, requests.remaining)
            && let Some(entry) = state.entry_mut(reservation.id)
        {
            entry.rank = Some(limit.saturating_sub(remaining) as f64);
        }
        for (d, report) in reported.iter().enumerate() {
            let (Some(limit), Some(remaining)) = (
                report.and_then(|b| b.limit),
                report.and_then(|b| b.remaining),
            ) else {
                continue;
            };
            let used = limit.saturating_sub(remaining);
            if remaining % 1000 != 0 {
                state.exact[d] = true;
            }
            // The reset as of the request's arrival: Anthropic's is a time
            // of day (read against now), OpenAI's a duration from then.
            let reset = report.and_then(|b| b.reset_after).map(|r| match provider {
                ProviderKind::Anthropic => r + now.saturating_duration_since(reservation.at),
                ProviderKind::OpenAi => r,
            });
            let view = LimitView {
                limit: limit as f64,
                window,
                margin,
                rounding: rounding(state, d),
                ambiguity,
                alone: state.members <= 1 && workers <= 1,
            };
            let dim = &mut state.dims[d];
            match dim.observe(
                &view,
                (reservation.at, reservation.id),
                used,
                reset,
                &state.entries,
                d,
            ) {
                Some(Replenish::Bucket) => tracing::info!(
                    key,
                    limit = dimension_name(state.provider, d),
                    "the server refills this limit continuously (a bucket): pacing it as one"
                ),
                Some(Replenish::Window) => tracing::debug!(
                    key,
                    limit = dimension_name(state.provider, d),
                    "the server counts this limit over a sliding window"
                ),
                None => {}
            }
        }
    }

    /// What this process counts in the window now (for tests and displays).
    pub fn usage(&self, key: &str, now: Instant) -> Option<[u64; 3]> {
        let state = self.keys.get(key)?;
        Some(state.sums(now, self.window + self.margin))
    }

    /// What a key is paced at: per dimension (requests, input or all tokens,
    /// output tokens) the limit in use (this process's part of it), the
    /// server's count per unit of Apex's, and how the server replenishes.
    /// `None` for a key not tracked or not known yet.
    pub fn pacing(&self, key: &str) -> Option<Pacing> {
        let state = self.keys.get(key)?;
        let fraction = state.fraction(self.workers);
        (state.knowledge == Knowledge::Known).then(|| Pacing {
            limits: std::array::from_fn(|d| {
                state
                    .limit(d)
                    .map(|l| ((l as f64 * fraction).floor() as u64).max(1))
            }),
            whole: std::array::from_fn(|d| state.limit(d)),
            learned: state.learned.iter().any(Option::is_some),
            capped: std::array::from_fn(|d| {
                matches!((state.caps[d], state.learned[d]), (Some(cap), server) if server.is_none_or(|s| cap < s))
            }),
            corrections: std::array::from_fn(|d| state.dims[d].factor.upper),
            buckets: std::array::from_fn(|d| state.dims[d].replenish() == Replenish::Bucket),
        })
    }
}

/// What a model is paced at, from [`RateLimiter::pacing`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// Requests, input (or all, on OpenAI) tokens, output tokens per minute:
    /// this process's part.
    pub limits: [Option<u64>; 3],
    /// The same, whole (every process's).
    pub whole: [Option<u64>; 3],
    /// Whether the server's headers taught any of them.
    pub learned: bool,
    /// Per dimension, whether the `--limits` file's cap is what binds.
    pub capped: [bool; 3],
    /// The server's count per unit of Apex's (the upper bound paced at),
    /// per dimension.
    pub corrections: [f64; 3],
    /// Whether the server refills each limit continuously (a bucket).
    pub buckets: [bool; 3],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limits: Limits, provider: ProviderKind) -> RateLimiter {
        let mut l = RateLimiter::fixed(1.0);
        l.configure("k", provider, limits);
        l
    }

    fn anthropic(rpm: u64, itpm: u64, otpm: u64) -> Limits {
        Limits {
            rpm: Some(rpm),
            itpm: Some(itpm),
            otpm: Some(otpm),
            ..Limits::default()
        }
    }

    fn charge(input: u64, output: u64) -> Charge {
        Charge {
            requests: 1,
            input,
            output,
        }
    }

    fn bucket(limit: u64, remaining: u64, reset_after: Option<Duration>) -> Option<LimitBucket> {
        Some(LimitBucket {
            limit: Some(limit),
            remaining: Some(remaining),
            reset_after,
        })
    }

    /// OpenAI's token limit: `limit`, `remaining`, and when it is full again.
    fn tokens(limit: u64, remaining: u64, reset_after: Option<Duration>) -> RateLimitSnapshot {
        RateLimitSnapshot {
            tokens: bucket(limit, remaining, reset_after),
            ..RateLimitSnapshot::default()
        }
    }

    fn input_report(limit: u64, remaining: u64) -> RateLimitSnapshot {
        RateLimitSnapshot {
            input_tokens: bucket(limit, remaining, None),
            ..RateLimitSnapshot::default()
        }
    }

    fn granted(l: &mut RateLimiter, charge: Charge, now: Instant) -> Reservation {
        match l.try_reserve("k", charge, now) {
            Admission::Granted(r) => r,
            Admission::Wait(until) => panic!("waits {:?}", until - now),
        }
    }

    /// Settles a request to what it used and reads its answer's headers.
    fn answered(
        l: &mut RateLimiter,
        provider: ProviderKind,
        r: &Reservation,
        used: Charge,
        snapshot: &RateLimitSnapshot,
        now: Instant,
    ) {
        l.settle(r, Some(used), now);
        l.observe("k", provider, snapshot, true, Some(r), now);
    }

    #[test]
    fn a_request_that_fits_goes_once_the_server_is_empty_whatever_the_factor() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::Anthropic, Limits::default());
        let t0 = Instant::now();
        let probe = granted(&mut l, charge(1_000, 0), t0);
        answered(
            &mut l,
            ProviderKind::Anthropic,
            &probe,
            charge(1_000, 0),
            &input_report(450_000, 449_000),
            t0,
        );
        // 429s count what goes out up to twice over: a request of 300,000
        // is then 600,000 to pacing, more than the whole limit.
        for _ in 0..10 {
            l.rejected("k");
        }
        assert!(l.pacing("k").unwrap().corrections[1] >= 2.0);
        assert!(l.check_fits("k", charge(300_000, 0)).is_ok());
        // It still goes, once nothing is counted against it any more.
        let later = t0 + Duration::from_secs(600);
        assert!(matches!(
            l.try_reserve("k", charge(300_000, 0), later),
            Admission::Granted(_)
        ));
    }

    #[test]
    fn a_request_without_an_answer_does_not_stop_the_factor_being_measured() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::OpenAi, Limits::default());
        let t0 = Instant::now();
        // Two answers a second apart, each reset a minute out: a window,
        // counting as Apex does.
        let minute = Some(Duration::from_secs(60));
        for (i, used) in [(0u64, 10_000u64), (1, 20_000)] {
            let at = t0 + Duration::from_secs(i);
            let r = granted(&mut l, charge(10_000, 0), at);
            answered(
                &mut l,
                ProviderKind::OpenAi,
                &r,
                charge(10_000, 0),
                &tokens(100_000, 100_000 - used, minute),
                at,
            );
        }
        assert!(!l.pacing("k").unwrap().buckets[1]);
        assert!((l.pacing("k").unwrap().corrections[1] - 1.01).abs() < 1e-9);
        // A minute on, one request ends without an answer (a 500, a dropped
        // connection), then the next answer shows the server counting 1.3
        // times Apex's count: 13,000 for each of the two.
        let t61 = t0 + Duration::from_secs(61);
        let lost = granted(&mut l, charge(10_000, 0), t61);
        l.settle(&lost, None, t61 + Duration::from_millis(100));
        let t62 = t0 + Duration::from_secs(62);
        let next = granted(&mut l, charge(10_000, 0), t62);
        answered(
            &mut l,
            ProviderKind::OpenAi,
            &next,
            charge(10_000, 0),
            &tokens(100_000, 74_000, minute),
            t62,
        );
        let factor = l.pacing("k").unwrap().corrections[1];
        assert!(factor > 1.2, "{factor}");
    }

    #[test]
    fn waits_until_the_oldest_entries_expire() {
        let mut l = limiter(anthropic(2, 1000, 1000), ProviderKind::Anthropic);
        let t0 = Instant::now();
        assert!(matches!(
            l.try_reserve("k", charge(100, 10), t0),
            Admission::Granted(_)
        ));
        let t10 = t0 + Duration::from_secs(10);
        assert!(matches!(
            l.try_reserve("k", charge(100, 10), t10),
            Admission::Granted(_)
        ));
        // RPM exhausted: the first entry frees the slot at t0 + 61 s.
        assert_eq!(
            l.try_reserve("k", charge(1, 1), t10),
            Admission::Wait(t0 + Duration::from_secs(61))
        );
        assert!(matches!(
            l.try_reserve("k", charge(1, 1), t0 + Duration::from_secs(61)),
            Admission::Granted(_)
        ));
    }

    #[test]
    fn settle_returns_unused_output_reservation() {
        let mut l = limiter(anthropic(100, 100_000, 4096), ProviderKind::Anthropic);
        let now = Instant::now();
        let r = granted(&mut l, charge(10, 2048), now);
        granted(&mut l, charge(10, 2048), now);
        assert!(matches!(
            l.try_reserve("k", charge(10, 2048), now),
            Admission::Wait(_)
        ));
        l.settle(&r, Some(charge(10, 200)), now);
        assert_eq!(l.usage("k", now), Some([2, 20, 2248]));
        granted(&mut l, charge(10, 1848), now);
    }

    #[test]
    fn unused_output_comes_back_at_once_after_a_report() {
        // Anthropic counts `max_tokens` when a request starts and what was
        // generated when it ends: the difference is free again at once.
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::Anthropic, Limits::default());
        let t0 = Instant::now();
        let probe = granted(&mut l, charge(10, 512), t0);
        let report = RateLimitSnapshot {
            output_tokens: bucket(8_000, 7_700, None),
            ..RateLimitSnapshot::default()
        };
        answered(
            &mut l,
            ProviderKind::Anthropic,
            &probe,
            charge(10, 300),
            &report,
            t0,
        );
        // 300 used; fifteen more at 512 fit (7,980), a sixteenth does not.
        let t1 = t0 + Duration::from_secs(1);
        let out: Vec<_> = (0..15)
            .map(|_| granted(&mut l, charge(10, 512), t1))
            .collect();
        assert!(matches!(
            l.try_reserve("k", charge(10, 512), t1),
            Admission::Wait(_)
        ));
        // Three answers of 300: 636 back, at the same instant.
        for r in &out[..3] {
            l.settle(r, Some(charge(10, 300)), t1);
        }
        granted(&mut l, charge(10, 512), t1);
    }

    #[test]
    fn the_first_request_goes_alone_and_the_server_sets_the_limits() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::OpenAi, Limits::default());
        let now = Instant::now();
        let probe = granted(&mut l, charge(1, 0), now);
        let Admission::Wait(until) = l.try_reserve("k", charge(1, 0), now) else {
            panic!("the second request waits for the first's answer")
        };
        assert!(until > now + Duration::from_secs(3600));
        assert_eq!(l.pacing("k"), None, "not known yet");
        // A server with limits far above any tier table: they are used.
        let snapshot = RateLimitSnapshot {
            requests: bucket(3, 2, None),
            tokens: bucket(40_000_000, 39_999_999, None),
            ..RateLimitSnapshot::default()
        };
        answered(
            &mut l,
            ProviderKind::OpenAi,
            &probe,
            charge(1, 0),
            &snapshot,
            now,
        );
        let pacing = l.pacing("k").unwrap();
        assert_eq!(pacing.limits, [Some(3), Some(40_000_000), None]);
        granted(&mut l, charge(1, 0), now);
        granted(&mut l, charge(1, 0), now);
        assert!(matches!(
            l.try_reserve("k", charge(1, 0), now),
            Admission::Wait(_)
        ));
    }

    #[test]
    fn a_first_request_that_fails_lets_the_next_go_alone() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::OpenAi, Limits::default());
        let now = Instant::now();
        let probe = granted(&mut l, charge(1, 0), now);
        // A 500 without headers teaches nothing.
        l.settle(&probe, None, now);
        l.observe(
            "k",
            ProviderKind::OpenAi,
            &RateLimitSnapshot::default(),
            false,
            Some(&probe),
            now,
        );
        let second = granted(&mut l, charge(1, 0), now);
        assert!(matches!(
            l.try_reserve("k", charge(1, 0), now),
            Admission::Wait(_)
        ));
        // An answer without rate-limit headers: nothing to learn, no pacing.
        answered(
            &mut l,
            ProviderKind::OpenAi,
            &second,
            charge(1, 0),
            &RateLimitSnapshot::default(),
            now,
        );
        assert_eq!(l.pacing("k").unwrap().limits, [None; 3]);
        for _ in 0..100 {
            granted(&mut l, charge(1, 0), now);
        }
    }

    #[test]
    fn a_limits_file_caps_what_the_server_reports() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::Anthropic, anthropic(100, 50_000, 8_000));
        let now = Instant::now();
        let probe = granted(&mut l, charge(1_000, 100), now);
        answered(
            &mut l,
            ProviderKind::Anthropic,
            &probe,
            charge(1_000, 100),
            &input_report(400_000, 399_000),
            now,
        );
        assert_eq!(
            l.pacing("k").unwrap().limits,
            [Some(100), Some(50_000), Some(8_000)]
        );
        l.observe(
            "k",
            ProviderKind::Anthropic,
            &input_report(20_000, 19_000),
            true,
            None,
            now,
        );
        assert_eq!(l.pacing("k").unwrap().limits[1], Some(20_000));
        l.set_share(2);
        assert_eq!(
            l.pacing("k").unwrap().limits,
            [Some(50), Some(10_000), Some(4_000)]
        );
    }

    #[test]
    fn the_correction_follows_the_servers_count_either_way() {
        // (the server's count per unit of Apex's, the most that then fits
        // in the server's 100,000 in Apex's count, and a little more)
        for (server_count, allowed, refused) in [(1.3, 66_000, 67_000), (0.7, 131_000, 132_000)] {
            let mut l = RateLimiter::new(1.0);
            l.configure("k", ProviderKind::OpenAi, Limits::default());
            let now = Instant::now();
            let probe = granted(&mut l, charge(10_000, 0), now);
            let used = (10_000.0 * server_count) as u64;
            let report = tokens(100_000, 100_000 - used, None);
            answered(
                &mut l,
                ProviderKind::OpenAi,
                &probe,
                charge(10_000, 0),
                &report,
                now,
            );
            let factor = l.pacing("k").unwrap().corrections[1];
            assert!((factor - server_count * 1.01).abs() < 1e-9, "{factor}");
            // Below one, Apex sends more than the limit by its own count.
            assert!(matches!(
                l.try_reserve("k", charge(refused, 0), now),
                Admission::Wait(_)
            ));
            granted(&mut l, charge(allowed, 0), now);
        }
    }

    #[test]
    fn anthropics_rounding_teaches_only_from_large_amounts() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::Anthropic, Limits::default());
        let t0 = Instant::now();
        // 2,000 reported (to the nearest thousand) for 1,800 counted: the
        // rounding could hide anything from 0.8 to 1.4 times; pacing counts
        // what goes out at the top, estimates nothing.
        let probe = granted(&mut l, charge(1_800, 0), t0);
        answered(
            &mut l,
            ProviderKind::Anthropic,
            &probe,
            charge(1_800, 0),
            &input_report(450_000, 448_000),
            t0,
        );
        let factor = l.pacing("k").unwrap().corrections[1];
        assert!((factor - 2_500.0 / 1_800.0 * 1.01).abs() < 1e-9, "{factor}");
        // A minute later, 26,000 reported for 20,000 counted: between
        // 25,500 and 26,500 of it; pacing takes the top.
        let t61 = t0 + Duration::from_secs(61);
        let big = granted(&mut l, charge(20_000, 0), t61);
        answered(
            &mut l,
            ProviderKind::Anthropic,
            &big,
            charge(20_000, 0),
            &input_report(450_000, 424_000),
            t61,
        );
        let factor = l.pacing("k").unwrap().corrections[1];
        assert!(
            (factor - 26_500.0 / 20_000.0 * 1.01).abs() < 1e-9,
            "{factor}"
        );
    }

    #[test]
    fn a_refilling_bucket_is_told_from_a_window_and_paced_as_one() {
        // 60,000 tokens a minute; two requests of 20,000, 10 s apart. A
        // bucket reports the time to refill what is used (used / 1,000 per
        // s); a window, the time until its newest charge leaves (60 s).
        let t0 = Instant::now();
        let t10 = t0 + Duration::from_secs(10);
        for refills in [true, false] {
            let mut l = RateLimiter::new(1.0);
            l.configure("k", ProviderKind::OpenAi, Limits::default());
            let report = |used: u64| {
                let reset = if refills {
                    Duration::from_secs(used / 1_000)
                } else {
                    Duration::from_secs(60)
                };
                tokens(60_000, 60_000 - used, Some(reset))
            };
            let first = granted(&mut l, charge(20_000, 0), t0);
            answered(
                &mut l,
                ProviderKind::OpenAi,
                &first,
                charge(20_000, 0),
                &report(20_000),
                t0,
            );
            let second = granted(&mut l, charge(20_000, 0), t10);
            // A bucket has given 10,000 back since; a window nothing.
            let used = if refills { 30_000 } else { 40_000 };
            answered(
                &mut l,
                ProviderKind::OpenAi,
                &second,
                charge(20_000, 0),
                &report(used),
                t10,
            );
            assert_eq!(l.pacing("k").unwrap().buckets[1], refills);
            // 35,000 more: a bucket has it in about 5 s (at 1,000 a second,
            // a 1% margin on the count); a window when the first leaves.
            let Admission::Wait(until) = l.try_reserve("k", charge(35_000, 0), t10) else {
                panic!("fits too early")
            };
            let wait = until - t10;
            if refills {
                assert!(
                    wait > Duration::from_secs(5) && wait < Duration::from_secs(6),
                    "{wait:?}"
                );
            } else {
                assert!(wait >= Duration::from_secs(50), "{wait:?}");
            }
        }
    }

    #[test]
    fn limits_are_split_by_the_work_each_process_holds() {
        let mut l = RateLimiter::shared(1.0);
        let now = Instant::now();
        let report = RateLimitSnapshot {
            requests: bucket(100, 99, None),
            tokens: bucket(100_000, 99_000, None),
            ..RateLimitSnapshot::default()
        };
        for key in ["a", "b"] {
            l.configure(key, ProviderKind::OpenAi, Limits::default());
            let Admission::Granted(probe) = l.try_reserve(key, charge(1_000, 0), now) else {
                panic!("the first request goes")
            };
            l.settle(&probe, Some(charge(1_000, 0)), now);
            l.observe(key, ProviderKind::OpenAi, &report, true, Some(&probe), now);
        }
        assert!(l.awaits_share(), "a share round before more go");
        let share = |key: &str, members, others_work| crate::store::PacingShare {
            key: key.into(),
            members,
            others: [0; 3],
            others_work,
        };
        // Another process holds 300 generations of `a`'s model to this
        // one's 100; nobody else paces `b`.
        let mine = HashMap::from([("a".to_owned(), 100), ("b".to_owned(), 40)]);
        l.set_members(Some(&[share("a", 2, 300)]), &mine);
        assert!(!l.awaits_share());
        assert_eq!(
            l.pacing("a").unwrap().limits,
            [Some(25), Some(25_000), None]
        );
        assert_eq!(
            l.pacing("b").unwrap().limits,
            [Some(100), Some(100_000), None]
        );
        // The other process finished its part: this one paces alone again.
        l.set_members(Some(&[share("a", 1, 0)]), &mine);
        assert_eq!(
            l.pacing("a").unwrap().limits,
            [Some(100), Some(100_000), None]
        );
    }

    #[test]
    fn a_429_tightens_pacing_and_a_fixed_limiter_learns_nothing() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::OpenAi, Limits::default());
        let now = Instant::now();
        let probe = granted(&mut l, charge(20_000, 0), now);
        answered(
            &mut l,
            ProviderKind::OpenAi,
            &probe,
            charge(20_000, 0),
            &tokens(100_000, 50_000, None),
            now,
        );
        let factor = l.pacing("k").unwrap().corrections[1];
        assert!((factor - 2.5 * 1.01).abs() < 1e-9, "{factor}");
        l.rejected("k");
        let tightened = l.pacing("k").unwrap().corrections[1];
        assert!((tightened - factor * 1.1).abs() < 1e-9, "{tightened}");
        // A fixed limiter learns nothing.
        let mut fixed = RateLimiter::fixed(1.0);
        fixed.configure("k", ProviderKind::Anthropic, anthropic(10, 100_000, 1_000));
        fixed.observe(
            "k",
            ProviderKind::Anthropic,
            &input_report(5, 0),
            true,
            None,
            now,
        );
        fixed.rejected("k");
        assert_eq!(
            fixed.pacing("k").unwrap(),
            Pacing {
                limits: [Some(10), Some(100_000), Some(1_000)],
                whole: [Some(10), Some(100_000), Some(1_000)],
                // The figures are the file's, whatever a header said.
                learned: false,
                capped: [true; 3],
                corrections: [1.0; 3],
                buckets: [false; 3],
            }
        );
    }

    #[test]
    fn pause_holds_until_retry_after() {
        let mut l = limiter(anthropic(100, 100_000, 50_000), ProviderKind::Anthropic);
        let now = Instant::now();
        l.pause("k", now + Duration::from_secs(7));
        assert_eq!(
            l.try_reserve("k", charge(1, 1), now),
            Admission::Wait(now + Duration::from_secs(7))
        );
        assert!(matches!(
            l.try_reserve("k", charge(1, 1), now + Duration::from_secs(7)),
            Admission::Granted(_)
        ));
    }

    #[test]
    fn a_429_pauses_a_model_without_limits() {
        // No bucket: no limits configured (or --no-rate-limiting).
        for mut l in [RateLimiter::new(1.0), RateLimiter::fixed(1.0)] {
            let now = Instant::now();
            l.pause("unlimited", now + Duration::from_secs(7));
            assert_eq!(
                l.try_reserve("unlimited", charge(1, 1), now),
                Admission::Wait(now + Duration::from_secs(7))
            );
            assert!(matches!(
                l.try_reserve("unlimited", charge(1, 1), now + Duration::from_secs(7)),
                Admission::Granted(_)
            ));
        }
    }

    #[test]
    fn no_rate_limiting_is_not_turned_back_on_by_headers() {
        let snapshot = RateLimitSnapshot {
            requests: Some(LimitBucket {
                limit: Some(1),
                remaining: Some(1),
                reset_after: None,
            }),
            ..RateLimitSnapshot::default()
        };
        let now = Instant::now();
        let mut off = RateLimiter::fixed(1.0);
        off.observe("k", ProviderKind::OpenAi, &snapshot, true, None, now);
        assert_eq!(off.usage("k", now), None, "no bucket learned");
        for _ in 0..5 {
            assert!(matches!(
                off.try_reserve("k", charge(1, 0), now),
                Admission::Granted(_)
            ));
        }
        // Pacing on, no configured limit: the headers' limit is learned.
        let mut on = RateLimiter::new(1.0);
        on.observe("k", ProviderKind::OpenAi, &snapshot, true, None, now);
        assert!(matches!(
            on.try_reserve("k", charge(1, 0), now),
            Admission::Granted(_)
        ));
        assert!(matches!(
            on.try_reserve("k", charge(1, 0), now),
            Admission::Wait(_)
        ));
    }

    #[test]
    fn oversized_requests_never_fit() {
        let l = limiter(
            Limits {
                rpm: Some(500),
                tpm: Some(30_000),
                ..Limits::default()
            },
            ProviderKind::OpenAi,
        );
        let err = l
            .check_fits(
                "k",
                Charge::estimate(ProviderKind::OpenAi, 0, 0, 31_000, 2048),
            )
            .unwrap_err();
        assert!(
            err.contains("33048 against the --limits TPM limit of 30000"),
            "{err}"
        );
        assert!(
            l.check_fits(
                "k",
                Charge::estimate(ProviderKind::OpenAi, 0, 0, 20_000, 2048)
            )
            .is_ok()
        );
        assert!(
            l.check_fits(
                "unknown",
                Charge::estimate(ProviderKind::OpenAi, 0, 0, 1 << 40, 0)
            )
            .is_ok()
        );
    }

    #[test]
    fn limits_files_are_checked() {
        let table = LimitTable::with_file(
            "[anthropic.\"claude-sonnet-4-5\"]\nrpm = 50\nitpm = 30000\notpm = 8000\n",
        )
        .unwrap();
        let catalog = crate::Catalog::built_in();
        let l = table.lookup(
            &catalog,
            ProviderKind::Anthropic,
            "claude-sonnet-4-5-20250929",
        );
        assert_eq!(
            (l.rpm, l.itpm, l.otpm),
            (Some(50), Some(30_000), Some(8000))
        );
        assert_eq!(
            table.lookup(&catalog, ProviderKind::OpenAi, "gpt-5").tpm,
            Some(500_000)
        );
        let queued =
            LimitTable::with_file("[openai.\"gpt-5\"]\nbatch_queue_tokens = 1500000\n").unwrap();
        assert_eq!(
            queued
                .cap(&catalog, ProviderKind::OpenAi, "gpt-5")
                .batch_queue_tokens,
            Some(1_500_000)
        );
        for (bad, needle) in [
            (
                "[openai.\"gpt-5\"]\nitpm = 5\n",
                "itpm and otpm are Anthropic's",
            ),
            ("[anthropic.\"x\"]\ntpm = 5\n", "tpm is OpenAI's"),
            ("[openai.\"gpt-5\"]\nrpm = 0\n", "admits nothing"),
            (
                "[openai.\"gpt-5\"]\nbatch_queue_tokens = 0\n",
                "admits nothing",
            ),
            (
                "[anthropic.\"x\"]\nbatch_queue_tokens = 5\n",
                "OpenAI's per-model limit",
            ),
            ("[google.\"x\"]\nrpm = 1\n", "unknown field `google`"),
        ] {
            let err = LimitTable::with_file(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
