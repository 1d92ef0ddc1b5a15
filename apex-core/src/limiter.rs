//! The sliding-window rate limiter: per (provider, model), requests and
//! tokens per minute, reserved before a request is sent and settled to the
//! real usage when its response arrives.
//!
//! Dimensions: requests; input tokens (Anthropic ITPM: uncached input plus
//! cache writes, cache reads excluded; OpenAI TPM: all input plus output);
//! output tokens (Anthropic OTPM, reserved at `max_tokens`). The window is
//! 60 s plus a 1 s safety margin (both times `time_scale`, the margin at
//! least 25 ms of real time): a request is counted from the moment Apex
//! sends it, a little before the server counts it, and kept a little longer
//! than the server keeps it. A sliding window paced this way is also safe
//! against a server that refills continuously (a token bucket of the
//! limit's size never holds less than the limit minus the last minute's
//! charges).
//!
//! Limits come from the server: each model's first request goes alone, and
//! the rate-limit headers of its answer set them; a `--limits` file caps
//! them. Answer after answer, `limit − remaining` tells how the server counts
//! against Apex's own count, and a per-model correction scales what Apex
//! counts (see [`RateLimiter::observe`]).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use std::time::Instant;

use serde::Deserialize;

use crate::catalog::Catalog;
use crate::condition::ProviderKind;
use crate::error::{Error, Result};
use crate::provider::{LimitBucket, RateLimitSnapshot, Usage};

const DEFAULTS: &str = include_str!("limits.toml");

/// The server's window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Apex's margin on top of it.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(1);
/// The least margin in real time, whatever the time scale: a request
/// reaches the server some milliseconds after Apex counts it sent, and that
/// lag does not shrink with a simulator's clock.
pub const LEAST_REAL_MARGIN: Duration = Duration::from_millis(25);

/// Per-minute limits of one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// OpenAI tokens per minute (input, cached included, plus output).
    pub tpm: Option<u64>,
    /// Anthropic input tokens per minute (uncached input plus cache writes).
    pub itpm: Option<u64>,
    /// Anthropic output tokens per minute.
    pub otpm: Option<u64>,
    /// OpenAI's per-model limit on tokens enqueued in batches (`apex run
    /// --batch`); learned from a refused batch when not given.
    #[serde(default)]
    pub batch_queue_tokens: Option<u64>,
}

impl Limits {
    fn dims(&self, provider: ProviderKind) -> [Option<u64>; 3] {
        match provider {
            ProviderKind::OpenAi => [self.rpm, self.tpm, None],
            ProviderKind::Anthropic => [self.rpm, self.itpm, self.otpm],
        }
    }
}

/// What one request counts against each dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    /// Requests (1 per attempt).
    pub requests: u64,
    /// Input-side tokens as the provider counts them.
    pub input: u64,
    /// Output tokens (Anthropic OTPM; 0 for OpenAI, whose TPM is `input`).
    pub output: u64,
}

impl Charge {
    fn amounts(self) -> [u64; 3] {
        [self.requests, self.input, self.output]
    }

    /// The reservation for a request: `uncached` input tokens (not expected
    /// from the cache), `cache_write` tokens expected to be written, `total`
    /// input, and the output budget `max_tokens`.
    pub fn estimate(
        provider: ProviderKind,
        uncached: u64,
        cache_write: u64,
        total: u64,
        max_tokens: u64,
    ) -> Self {
        match provider {
            ProviderKind::Anthropic => Self {
                requests: 1,
                input: uncached + cache_write,
                output: max_tokens,
            },
            ProviderKind::OpenAi => Self {
                requests: 1,
                input: total + max_tokens,
                output: 0,
            },
        }
    }

    /// What a response's usage actually counts.
    pub fn actual(provider: ProviderKind, usage: &Usage) -> Self {
        match provider {
            ProviderKind::Anthropic => Self {
                requests: 1,
                input: usage.input_tokens + usage.cache_write_tokens,
                output: usage.output_tokens,
            },
            ProviderKind::OpenAi => Self {
                requests: 1,
                input: usage.total_input() + usage.output_tokens,
                output: 0,
            },
        }
    }
}

/// Limits per provider and model: the built-in tier table (for estimates,
/// `--dry-run` and cache TTL choices) with a `--limits` file laid over it;
/// the file's entries are also caps on what is learned from the server.
#[derive(Debug, Clone, Default)]
pub struct LimitTable {
    /// The tier table with the file's entries laid over it.
    entries: Vec<(ProviderKind, String, Limits)>,
    /// The file's entries alone: pacing never goes above them.
    caps: Vec<(ProviderKind, String, Limits)>,
    /// `--no-rate-limiting`: no pacing at all, not even limits learned from
    /// response headers (a 429's `retry-after` is still honoured).
    off: bool,
    /// `--workers N`: this process takes 1/N of every limit.
    share: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    openai: HashMap<String, Limits>,
    #[serde(default)]
    anthropic: HashMap<String, Limits>,
}

/// The entries of a limits file (`[openai."gpt-5"] rpm tpm`,
/// `[anthropic."…"] rpm itpm otpm`), checked: unknown keys, a dimension of
/// the other provider and a limit of 0 are errors.
pub fn parse_limits_file(text: &str) -> Result<Vec<(ProviderKind, String, Limits)>> {
    let file: LimitsFile = toml::from_str(text)
        .map_err(|e| Error::LimitsFile(e.message().trim().replace('\n', " ")))?;
    let mut entries = Vec::new();
    for (provider, models) in [
        (ProviderKind::OpenAi, file.openai),
        (ProviderKind::Anthropic, file.anthropic),
    ] {
        for (model, limits) in models {
            let wrong = match provider {
                ProviderKind::OpenAi if limits.itpm.is_some() || limits.otpm.is_some() => {
                    Some("OpenAI limits are rpm and tpm; itpm and otpm are Anthropic's")
                }
                ProviderKind::Anthropic if limits.tpm.is_some() => {
                    Some("Anthropic limits are rpm, itpm and otpm; tpm is OpenAI's")
                }
                ProviderKind::Anthropic if limits.batch_queue_tokens.is_some() => Some(
                    "batch_queue_tokens is OpenAI's per-model limit; Anthropic limits batches by requests, not tokens",
                ),
                _ => None,
            };
            if let Some(problem) = wrong {
                return Err(Error::LimitsFile(format!(
                    "[{provider}.\"{model}\"]: {problem}"
                )));
            }
            if [
                limits.rpm,
                limits.tpm,
                limits.itpm,
                limits.otpm,
                limits.batch_queue_tokens,
            ]
            .contains(&Some(0))
            {
                return Err(Error::LimitsFile(format!(
                    "[{provider}.\"{model}\"]: a limit of 0 admits nothing; leave it out to mean no limit"
                )));
            }
            entries.push((provider, model, limits));
        }
    }
    entries.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(entries)
}

impl LimitTable {
    /// The documented defaults (`limits.toml`), with no caps: pacing follows
    /// what the server reports.
    pub fn defaults() -> Self {
        Self {
            entries: parse_limits_file(DEFAULTS).expect("the built-in limits are valid"),
            caps: Vec::new(),
            off: false,
            share: 1,
        }
    }

    /// The defaults with a user file's entries laid over them; the file's
    /// entries also cap what is learned from the server.
    pub fn with_file(text: &str) -> Result<Self> {
        let mut table = Self::defaults();
        let caps = parse_limits_file(text)?;
        for (provider, model, limits) in &caps {
            table
                .entries
                .retain(|(p, m, _)| !(p == provider && m == model));
            table.entries.push((*provider, model.clone(), *limits));
        }
        table.caps = caps;
        Ok(table)
    }

    /// No limits at all (`--no-rate-limiting`): headers teach nothing either.
    pub fn none() -> Self {
        Self {
            entries: Vec::new(),
            caps: Vec::new(),
            off: true,
            share: 1,
        }
    }

    /// Whether pacing is off (`--no-rate-limiting`).
    pub fn is_off(&self) -> bool {
        self.off
    }

    /// Each limit (learned or capped) divided among `n` processes sharing
    /// one account, so that together they stay under it.
    pub fn shared_by(mut self, n: u32) -> Self {
        self.share = n.max(1);
        self
    }

    /// The share this process takes (`--workers`; 1 by default).
    pub fn share(&self) -> u32 {
        self.share.max(1)
    }

    /// Whether no model has limits to plan with.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The limits to plan with (estimates, `--dry-run`, cache TTLs): the
    /// file's, else the tier table's, matched through the catalog's aliases.
    pub fn lookup(&self, catalog: &Catalog, provider: ProviderKind, model: &str) -> Limits {
        find(&self.entries, catalog, provider, model)
    }

    /// The user's cap for a model (`--limits`): pacing uses at most this,
    /// whatever the server reports.
    pub fn cap(&self, catalog: &Catalog, provider: ProviderKind, model: &str) -> Limits {
        find(&self.caps, catalog, provider, model)
    }
}

fn find(
    entries: &[(ProviderKind, String, Limits)],
    catalog: &Catalog,
    provider: ProviderKind,
    model: &str,
) -> Limits {
    let key = bucket_key(catalog, provider, model);
    entries
        .iter()
        .find(|(p, m, _)| *p == provider && bucket_key(catalog, *p, m) == key)
        .map(|(_, _, l)| *l)
        .unwrap_or_default()
}

/// The limiter key of a model: its catalog entry's first id, so a dated
/// snapshot and its alias share one budget.
pub fn bucket_key(catalog: &Catalog, provider: ProviderKind, model: &str) -> String {
    let canonical = catalog
        .lookup(provider, model)
        .and_then(|m| m.ids.first().map(String::as_str))
        .unwrap_or(model);
    format!("{provider}/{canonical}")
}

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

/// One reservation. Its amounts are what the server counts for it now: the
/// reservation until the response arrives (OpenAI charges `max_tokens` up
/// front, Anthropic estimates OTPM from it), then the real usage.
struct Entry {
    id: u64,
    at: Instant,
    amounts: [u64; 3],
}

/// What the limiter knows of a key's limits.
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

/// Recent estimates of how the server counts against how Apex counts.
#[derive(Debug, Clone, Default)]
struct Correction {
    /// Over-the-window samples: each at most the true ratio.
    lower: VecDeque<f64>,
    /// Samples from pairs of answers: around the true ratio, with outliers
    /// when requests reach the server out of the order they were sent.
    paired: VecDeque<f64>,
}

fn keep_recent(samples: &mut VecDeque<f64>, sample: f64) {
    if !sample.is_finite() || sample <= 0.0 {
        return;
    }
    if samples.len() == Correction::KEPT {
        samples.pop_front();
    }
    samples.push_back(sample.clamp(0.05, 100.0));
}

impl Correction {
    const KEPT: usize = 32;
    /// Added on top of the estimate for a token dimension: the server's
    /// count of a request varies a little with its text (requests are
    /// counted exactly).
    const MARGIN: f64 = 1.01;
    /// Each 429 raises the correction by this much.
    const ON_REJECTION: f64 = 1.10;
    /// Pairs needed before their median is trusted.
    const PAIRS_NEEDED: usize = 3;

    /// The server's count per unit of Apex's: the largest recent lower
    /// bound, or the median of recent pairs when that is higher; 1 before
    /// any sample.
    fn factor(&self, margin: f64) -> f64 {
        let lower = self
            .lower
            .iter()
            .copied()
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
        let paired = (self.paired.len() >= Self::PAIRS_NEEDED).then(|| {
            let mut sorted: Vec<f64> = self.paired.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            sorted[sorted.len() / 2]
        });
        match (lower, paired) {
            (None, None) => 1.0,
            (l, p) => l.unwrap_or(0.0).max(p.unwrap_or(0.0)) * margin,
        }
    }

    /// A 429: what was estimated was too low.
    fn tighten(&mut self) {
        let raised = self.factor(1.0) * Self::ON_REJECTION;
        keep_recent(&mut self.lower, raised);
    }
}

struct Bucket {
    provider: ProviderKind,
    /// The `--limits` file's caps.
    caps: [Option<u64>; 3],
    /// What the server's headers last reported.
    learned: [Option<u64>; 3],
    knowledge: Knowledge,
    corrections: [Correction; 3],
    /// Recent answers: (send time, what the server reported as used).
    observations: [VecDeque<(Instant, u64)>; 3],
    /// Processes pacing this key through the ledger, this one included.
    members: u64,
    /// What the other members count in their windows.
    others: [u64; 3],
    entries: VecDeque<Entry>,
    next_id: u64,
}

impl Bucket {
    fn new(provider: ProviderKind, caps: [Option<u64>; 3], knowledge: Knowledge) -> Self {
        Self {
            provider,
            caps,
            learned: [None; 3],
            knowledge,
            corrections: Default::default(),
            observations: Default::default(),
            members: 1,
            others: [0; 3],
            entries: VecDeque::new(),
            next_id: 1,
        }
    }

    /// The limit paced at in dimension `d`: the lower of the cap and what
    /// the server reports, this process's share of it (`--workers`, else
    /// the members pacing the key through the ledger).
    fn limit(&self, d: usize, share: u64) -> Option<u64> {
        let limit = match (self.caps[d], self.learned[d]) {
            (Some(cap), Some(server)) => Some(cap.min(server)),
            (one, other) => one.or(other),
        }?;
        Some((limit / share.max(self.members)).max(1))
    }

    /// How much of Apex's count fits under `limit` once corrected to the
    /// server's count.
    fn allowance(&self, d: usize, limit: u64) -> u64 {
        (limit as f64 / self.correction(d)).floor() as u64
    }

    /// The server's count per unit of Apex's in dimension `d`.
    fn correction(&self, d: usize) -> f64 {
        let margin = if d == 0 { 1.0 } else { Correction::MARGIN };
        self.corrections[d].factor(margin)
    }

    /// The entry of a reservation (entries stay in id order).
    fn entry_mut(&mut self, id: u64) -> Option<&mut Entry> {
        let index = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        self.entries.get_mut(index)
    }

    /// Forgets entries older than `keep` (longer than the pacing window:
    /// observations look back one window from a request's send time).
    fn prune(&mut self, now: Instant, keep: Duration) {
        while self
            .entries
            .front()
            .is_some_and(|e| now.duration_since(e.at) >= keep)
        {
            self.entries.pop_front();
        }
    }

    fn in_window(&self, now: Instant, window: Duration) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(move |e| now.saturating_duration_since(e.at) < window)
    }

    fn sums(&self, now: Instant, window: Duration) -> [u64; 3] {
        self.in_window(now, window).fold([0; 3], |mut s, e| {
            for (d, v) in s.iter_mut().zip(e.amounts) {
                *d += v;
            }
            s
        })
    }
}

/// The limiter. One per run; shared by the dispatcher and the settle path.
pub struct RateLimiter {
    window: Duration,
    /// Whether limits are learned from response headers, each model's first
    /// request going alone until they are (off with `--no-rate-limiting`
    /// and for [`RateLimiter::fixed`]).
    learns: bool,
    /// Whether other processes share the limits through the ledger: a
    /// model's first answer is then followed by a share before more go.
    shared: bool,
    state: State,
}

/// Buckets of the keys with limits, and pauses of any key: a 429's
/// `retry-after` holds a model back whether or not it has limits.
#[derive(Default)]
struct State {
    buckets: HashMap<String, Bucket>,
    paused_until: HashMap<String, Instant>,
    share: u64,
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

/// Anthropic rounds its token `remaining` headers to the nearest thousand.
fn rounding(provider: ProviderKind, d: usize) -> u64 {
    match (provider, d) {
        (ProviderKind::Anthropic, 1 | 2) => 500,
        _ => 0,
    }
}

impl RateLimiter {
    /// A limiter that learns each model's limits from the server: its first
    /// request goes alone, and the rate-limit headers of the answer set the
    /// limits (capped by [`configure`](Self::configure)) and, answer after
    /// answer, how the server's token count compares with Apex's. The window
    /// is (60 s + margin) × `time_scale`.
    pub fn new(time_scale: f64) -> Self {
        Self {
            window: crate::time::scaled(WINDOW, time_scale)
                + crate::time::scaled(SAFETY_MARGIN, time_scale).max(LEAST_REAL_MARGIN),
            learns: true,
            shared: false,
            state: State {
                share: 1,
                ..State::default()
            },
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
        let state = &self.state;
        let mut usage: Vec<_> = state
            .buckets
            .iter()
            .map(|(key, bucket)| (key.clone(), bucket.sums(now, self.window)))
            .collect();
        usage.sort();
        usage
    }

    /// Whether a key waits for a share round (its first answer is in).
    pub fn awaits_share(&self) -> bool {
        self.state
            .buckets
            .values()
            .any(|b| b.knowledge == Knowledge::Answered)
    }

    /// The other processes' word, from the ledger: per key, how many pace
    /// it and what the others count. Keys not listed are paced by this
    /// process alone. `None`: the ledger did not answer; keys waiting for
    /// it go on with what is known.
    pub fn set_members(&mut self, shares: Option<&[crate::store::PacingShare]>) {
        let state = &mut self.state;
        for (key, bucket) in &mut state.buckets {
            if let Some(shares) = shares {
                let share = shares.iter().find(|s| &s.key == key);
                let members = share.map_or(1, |s| u64::from(s.members.max(1)));
                if members != bucket.members {
                    tracing::info!(key, members, "processes sharing this model's limits");
                }
                bucket.members = members;
                bucket.others = share.map_or([0; 3], |s| s.others);
            }
            if bucket.knowledge == Knowledge::Answered {
                bucket.knowledge = Knowledge::Known;
            }
        }
    }

    /// The window length in use.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// This process takes 1/`n` of every limit (`--workers`).
    pub fn set_share(&mut self, n: u32) {
        self.state.share = u64::from(n.max(1));
    }

    /// Declares a key and its caps (before any reservation). A learning
    /// limiter tracks every key; a fixed one only keys with a limit.
    pub fn configure(&mut self, key: &str, provider: ProviderKind, caps: Limits) {
        let dims = caps.dims(provider);
        let state = &mut self.state;
        if !self.learns && dims.iter().all(Option::is_none) {
            state.buckets.remove(key);
            return;
        }
        let knowledge = if self.learns {
            Knowledge::Probing(None)
        } else {
            Knowledge::Known
        };
        state
            .buckets
            .insert(key.to_owned(), Bucket::new(provider, dims, knowledge));
    }

    /// Checks that a request could ever be admitted: a charge above a limit
    /// would wait forever, so it is refused.
    pub fn check_fits(&self, key: &str, charge: Charge) -> std::result::Result<(), String> {
        let state = &self.state;
        let Some(bucket) = state.buckets.get(key) else {
            return Ok(());
        };
        for (d, amount) in charge.amounts().into_iter().enumerate() {
            let Some(limit) = bucket.limit(d, state.share) else {
                continue;
            };
            if amount > bucket.allowance(d, limit) {
                let source =
                    if bucket.learned[d].is_some_and(|l| bucket.caps[d].is_none_or(|c| l < c)) {
                        "the server's"
                    } else {
                        "the --limits"
                    };
                return Err(format!(
                    "one request needs {amount} against {source} {} limit of {limit}{}; it can never be sent. Raise the limit (if your tier allows), shorten the context or lower max_tokens",
                    dimension_name(bucket.provider, d),
                    if state.share > 1 {
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
        let window = self.window;
        let state = &mut self.state;
        if let Some(&until) = state.paused_until.get(key) {
            if until > now {
                return Admission::Wait(until);
            }
            state.paused_until.remove(key);
        }
        let share = state.share;
        let Some(bucket) = state.buckets.get_mut(key) else {
            return Admission::Granted(Reservation {
                key: key.to_owned(),
                id: 0,
                at: now,
            });
        };
        if matches!(
            bucket.knowledge,
            Knowledge::Probing(Some(_)) | Knowledge::Answered
        ) {
            return Admission::Wait(crate::time::later(now, crate::time::FAR_FUTURE));
        }
        bucket.prune(now, window.saturating_mul(2));
        let sums = bucket.sums(now, window);
        let amounts = charge.amounts();
        let mut wait: Option<Instant> = None;
        for d in 0..3 {
            let Some(limit) = bucket.limit(d, share) else {
                continue;
            };
            let allowed = bucket.allowance(d, limit);
            if sums[d] + amounts[d] <= allowed {
                continue;
            }
            // Walk from the oldest entry until enough would have expired.
            let excess = sums[d] + amounts[d] - allowed;
            let mut by_time: Vec<(Instant, u64)> = bucket
                .in_window(now, window)
                .map(|e| (e.at, e.amounts[d]))
                .collect();
            by_time.sort_by_key(|(at, _)| *at);
            let mut freed = 0;
            let mut until = crate::time::later(now, window);
            for (at, amount) in by_time {
                freed += amount;
                if freed >= excess {
                    until = crate::time::later(at, window);
                    break;
                }
            }
            wait = Some(wait.map_or(until, |w| w.max(until)));
        }
        if let Some(until) = wait {
            return Admission::Wait(until);
        }
        let id = bucket.next_id;
        bucket.next_id += 1;
        if bucket.knowledge == Knowledge::Probing(None) {
            bucket.knowledge = Knowledge::Probing(Some(id));
        }
        bucket.entries.push_back(Entry {
            id,
            at: now,
            amounts,
        });
        Admission::Granted(Reservation {
            key: key.to_owned(),
            id,
            at: now,
        })
    }

    /// Ends a reservation: its amounts become what the request really used
    /// (`None`: unknown, it stays counted as reserved). A model's first
    /// request that ended without teaching the limits lets the next go alone.
    pub fn settle(&mut self, reservation: &Reservation, actual: Option<Charge>) {
        let state = &mut self.state;
        let Some(bucket) = state.buckets.get_mut(&reservation.key) else {
            return;
        };
        if bucket.knowledge == Knowledge::Probing(Some(reservation.id)) {
            bucket.knowledge = Knowledge::Probing(None);
        }
        if let Some(actual) = actual
            && let Some(entry) = bucket.entry_mut(reservation.id)
        {
            entry.amounts = actual.amounts();
        }
    }

    /// Moves a reservation's timestamp to when the request actually left:
    /// the ledger write between reserving and sending takes time, and the
    /// server counts from arrival.
    pub fn mark_sent(&mut self, reservation: &mut Reservation, at: Instant) {
        let state = &mut self.state;
        if let Some(bucket) = state.buckets.get_mut(&reservation.key)
            && let Some(entry) = bucket.entry_mut(reservation.id)
        {
            entry.at = entry.at.max(at);
            reservation.at = entry.at;
        }
    }

    /// Stops admitting requests for a key until `until` (after a 429),
    /// whether or not the key has limits.
    pub fn pause(&mut self, key: &str, until: Instant) {
        let state = &mut self.state;
        let paused = state.paused_until.entry(key.to_owned()).or_insert(until);
        *paused = (*paused).max(until);
    }

    /// A 429: the server counts more than this limiter thought; every
    /// dimension's correction rises by 10%.
    pub fn rejected(&mut self, key: &str) {
        if !self.learns {
            return;
        }
        let state = &mut self.state;
        if let Some(bucket) = state.buckets.get_mut(key) {
            for correction in &mut bucket.corrections {
                correction.tighten();
            }
            tracing::debug!(key, "429: pacing tightened by 10%");
        }
    }

    /// Feeds back an answer's rate-limit headers (`answered`: the server
    /// processed the request, so its headers, or their absence, are the
    /// server's word). Reported limits replace the learned ones, higher or
    /// lower (never above a cap). `remaining` teaches how the server counts,
    /// two ways. Over the window: what it counts as used (limit − remaining)
    /// is at most the true ratio times what this limiter counted from a
    /// window before the request was sent up to now, under a sliding window
    /// and a token bucket alike (a bucket only ever counts less), so each
    /// answer gives a lower bound and the largest recent one is kept. Between
    /// two answers sent close together: what the server added for the
    /// requests sent in between, whatever its replenishment; these scatter
    /// when requests arrive out of send order, so their median is kept. Use
    /// of the key by other processes raises both.
    pub fn observe(
        &mut self,
        key: &str,
        provider: ProviderKind,
        snapshot: &RateLimitSnapshot,
        answered: bool,
        sent_at: Instant,
        now: Instant,
    ) {
        if !self.learns {
            return;
        }
        let window = self.window;
        let state = &mut self.state;
        let share = state.share;
        let bucket = state
            .buckets
            .entry(key.to_owned())
            .or_insert_with(|| Bucket::new(provider, [None; 3], Knowledge::Probing(None)));
        let reported: [Option<LimitBucket>; 3] = match bucket.provider {
            ProviderKind::OpenAi => [snapshot.requests, snapshot.tokens, None],
            ProviderKind::Anthropic => [
                snapshot.requests,
                snapshot.input_tokens,
                snapshot.output_tokens,
            ],
        };
        let limits: [Option<u64>; 3] = reported.map(|b| b.and_then(|b| b.limit).filter(|&l| l > 0));
        if limits.iter().any(Option::is_some) {
            let changed = limits != bucket.learned;
            for (learned, limit) in bucket.learned.iter_mut().zip(limits) {
                if limit.is_some() {
                    *learned = limit;
                }
            }
            if changed {
                let listed = |values: [Option<u64>; 3]| -> String {
                    (0..3)
                        .filter_map(|d| {
                            values[d].map(|v| format!("{} {v}", dimension_name(bucket.provider, d)))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let paced = std::array::from_fn(|d| bucket.limit(d, share));
                tracing::info!(
                    key,
                    "the server reports limits {}; pacing at {}",
                    listed(limits),
                    listed(paced)
                );
            }
            bucket.knowledge = answered_knowledge(bucket.knowledge, self.shared);
        } else if answered && matches!(bucket.knowledge, Knowledge::Probing(_)) {
            tracing::info!(
                key,
                "the server sends no rate-limit headers; pacing by the --limits file only"
            );
            bucket.knowledge = answered_knowledge(bucket.knowledge, self.shared);
        }
        bucket.prune(now, window.saturating_mul(2));
        let since = sent_at.checked_sub(window).unwrap_or(sent_at);
        // Two answers sent this close together see (almost) no expiry or
        // refill between them.
        let close = window / 20;
        for (d, report) in reported.iter().enumerate() {
            let (Some(limit), Some(remaining)) = (
                report.and_then(|b| b.limit),
                report.and_then(|b| b.remaining),
            ) else {
                continue;
            };
            let rounding = rounding(bucket.provider, d);
            let used = limit.saturating_sub(remaining);
            let counted = |from: Instant, to: Instant| -> u64 {
                bucket
                    .entries
                    .iter()
                    .filter(|e| e.at > from && e.at <= to)
                    .map(|e| e.amounts[d])
                    .sum()
            };
            // A rounded figure says little about a small amount: samples
            // need 40 times the rounding (a 2.5% error at most).
            let enough = |amount: u64| amount > 0 && amount >= 40 * rounding;
            // Over the window: a lower bound (a bucket refills, a window
            // forgets nothing Apex still counts). Other processes' use
            // counts as they last told it.
            let own_in_window = counted(since, now);
            let in_window = own_in_window + bucket.others[d];
            if enough(in_window) && used > 0 {
                let sample = used as f64 / in_window as f64;
                keep_recent(&mut bucket.corrections[d].lower, sample);
            }
            // Against the previous answer sent just before: what the
            // server added for the requests sent in between, whatever its
            // replenishment (too little time passed for it to matter).
            if let Some(&(before_at, before_used)) = bucket.observations[d]
                .iter()
                .filter(|(at, _)| *at < sent_at && sent_at.duration_since(*at) <= close)
                .max_by_key(|(at, _)| *at)
            {
                // Others sent in between too, at about their share of the window.
                let own_between = counted(before_at, sent_at);
                let between = own_between
                    .saturating_mul(in_window)
                    .checked_div(own_in_window)
                    .unwrap_or(own_between);
                if enough(between) && used > before_used {
                    let sample = (used - before_used) as f64 / between as f64;
                    keep_recent(&mut bucket.corrections[d].paired, sample);
                }
            }
            let observations = &mut bucket.observations[d];
            if observations.len() == Correction::KEPT {
                observations.pop_front();
            }
            observations.push_back((sent_at, used));
        }
    }

    /// The sums in the current window (for tests and displays).
    pub fn usage(&self, key: &str, now: Instant) -> Option<[u64; 3]> {
        let window = self.window;
        let state = &self.state;
        let bucket = state.buckets.get(key)?;
        Some(bucket.sums(now, window))
    }

    /// What a key is paced at: per dimension (requests, input or all tokens,
    /// output tokens) the limit in use and the correction applied to
    /// Apex's count. `None` for a key not tracked or not known yet.
    pub fn pacing(&self, key: &str) -> Option<Pacing> {
        let state = &self.state;
        let bucket = state.buckets.get(key)?;
        (bucket.knowledge == Knowledge::Known).then(|| Pacing {
            limits: std::array::from_fn(|d| bucket.limit(d, state.share)),
            corrections: std::array::from_fn(|d| bucket.correction(d)),
        })
    }
}

/// What a model is paced at, from [`RateLimiter::pacing`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// Requests, input (or all, on OpenAI) tokens, output tokens per minute.
    pub limits: [Option<u64>; 3],
    /// The server's count per unit of Apex's, per dimension.
    pub corrections: [f64; 3],
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
        let Admission::Granted(r) = l.try_reserve("k", charge(10, 2048), now) else {
            panic!()
        };
        let Admission::Granted(_) = l.try_reserve("k", charge(10, 2048), now) else {
            panic!()
        };
        assert!(matches!(
            l.try_reserve("k", charge(10, 2048), now),
            Admission::Wait(_)
        ));
        l.settle(&r, Some(charge(10, 200)));
        assert_eq!(l.usage("k", now), Some([2, 20, 2248]));
        assert!(matches!(
            l.try_reserve("k", charge(10, 1848), now),
            Admission::Granted(_)
        ));
    }

    fn input_report(limit: u64, remaining: u64) -> RateLimitSnapshot {
        RateLimitSnapshot {
            input_tokens: Some(LimitBucket {
                limit: Some(limit),
                remaining: Some(remaining),
                reset_after: None,
            }),
            ..RateLimitSnapshot::default()
        }
    }

    fn granted(l: &mut RateLimiter, charge: Charge, now: Instant) -> Reservation {
        match l.try_reserve("k", charge, now) {
            Admission::Granted(r) => r,
            Admission::Wait(until) => panic!("waits {:?}", until - now),
        }
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
            requests: Some(LimitBucket {
                limit: Some(3),
                remaining: Some(2),
                reset_after: None,
            }),
            tokens: Some(LimitBucket {
                limit: Some(40_000_000),
                remaining: Some(39_999_999),
                reset_after: None,
            }),
            ..RateLimitSnapshot::default()
        };
        l.observe("k", ProviderKind::OpenAi, &snapshot, true, probe.at, now);
        l.settle(&probe, Some(charge(1, 0)));
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
        l.observe(
            "k",
            ProviderKind::OpenAi,
            &RateLimitSnapshot::default(),
            false,
            probe.at,
            now,
        );
        l.settle(&probe, None);
        let second = granted(&mut l, charge(1, 0), now);
        assert!(matches!(
            l.try_reserve("k", charge(1, 0), now),
            Admission::Wait(_)
        ));
        // An answer without rate-limit headers: nothing to learn, no pacing.
        l.observe(
            "k",
            ProviderKind::OpenAi,
            &RateLimitSnapshot::default(),
            true,
            second.at,
            now,
        );
        l.settle(&second, Some(charge(1, 0)));
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
        l.observe(
            "k",
            ProviderKind::Anthropic,
            &input_report(400_000, 399_000),
            true,
            probe.at,
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
            probe.at,
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
        for (server_count, allowed, refused) in [(1.3, 75_000, 76_500), (0.7, 140_000, 142_000)] {
            let mut l = RateLimiter::new(1.0);
            l.configure("k", ProviderKind::OpenAi, Limits::default());
            let now = Instant::now();
            let probe = granted(&mut l, charge(10_000, 0), now);
            let used = (10_000.0 * server_count) as u64;
            let snapshot = RateLimitSnapshot {
                tokens: Some(LimitBucket {
                    limit: Some(100_000),
                    remaining: Some(100_000 - used),
                    reset_after: None,
                }),
                ..RateLimitSnapshot::default()
            };
            l.observe("k", ProviderKind::OpenAi, &snapshot, true, probe.at, now);
            l.settle(&probe, Some(charge(10_000, 0)));
            let factor = l.pacing("k").unwrap().corrections[1];
            assert!((factor - server_count * 1.01).abs() < 1e-9, "{factor}");
            // What fits in the server's 100,000, in Apex's count.
            assert!(matches!(
                l.try_reserve("k", charge(refused - 10_000, 0), now),
                Admission::Wait(_)
            ));
            granted(&mut l, charge(allowed - 10_000, 0), now);
        }
    }

    #[test]
    fn anthropics_rounding_teaches_only_from_large_amounts() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::Anthropic, Limits::default());
        let now = Instant::now();
        // 2,000 reported for 1,800 counted: within the rounding, no sample.
        let probe = granted(&mut l, charge(1_800, 0), now);
        l.observe(
            "k",
            ProviderKind::Anthropic,
            &input_report(450_000, 448_000),
            true,
            probe.at,
            now,
        );
        assert_eq!(l.pacing("k").unwrap().corrections[1], 1.0);
        // 120,000 reported for 100,000: a sample.
        let big = granted(&mut l, charge(98_200, 0), now);
        l.observe(
            "k",
            ProviderKind::Anthropic,
            &input_report(450_000, 330_000),
            true,
            big.at,
            now,
        );
        let factor = l.pacing("k").unwrap().corrections[1];
        assert!((factor - 1.2 * 1.01).abs() < 1e-9, "{factor}");
    }

    #[test]
    fn answers_sent_close_together_see_past_a_token_bucket() {
        // A bucket of 60,000 per minute that counts 1.3 times what Apex
        // counts: 30 s after a request, half of it has been refilled, so the
        // window alone would read the ratio as too low.
        let t0 = Instant::now();
        let report = |remaining: u64| RateLimitSnapshot {
            tokens: Some(LimitBucket {
                limit: Some(60_000),
                remaining: Some(remaining),
                reset_after: None,
            }),
            ..RateLimitSnapshot::default()
        };
        let t30 = t0 + Duration::from_secs(30);
        let mut l2 = RateLimiter::new(1.0);
        l2.configure("k", ProviderKind::OpenAi, Limits::default());
        // Two requests 100 ms apart, 30 s after the bucket was last drained.
        let a = granted(&mut l2, charge(10_000, 0), t0);
        // Its answer reported the limit but not what remained.
        let mut limit_only = report(0);
        limit_only.tokens.as_mut().unwrap().remaining = None;
        l2.observe("k", ProviderKind::OpenAi, &limit_only, true, a.at, t0);
        l2.settle(&a, Some(charge(10_000, 0)));
        let b = granted(&mut l2, charge(10_000, 0), t30);
        // Refilled 30,000 of 13,000: full, then 13,000 used.
        l2.observe("k", ProviderKind::OpenAi, &report(47_000), true, b.at, t30);
        // Three more, 100 ms apart, each counted 13,000 by the server.
        for (i, remaining) in [(1u64, 34_000u64), (2, 21_000), (3, 8_000)] {
            let at = t30 + Duration::from_millis(100 * i);
            let r = granted(&mut l2, charge(10_000, 0), at);
            l2.observe(
                "k",
                ProviderKind::OpenAi,
                &report(remaining),
                true,
                r.at,
                at,
            );
        }
        // Window samples: 13,000 / 20,000 up to 52,000 / 50,000 (too low
        // while the bucket refills); pairs give 13,000 / 10,000 each.
        let factor = l2.pacing("k").unwrap().corrections[1];
        assert!((factor - 1.3 * 1.01).abs() < 1e-9, "{factor}");
    }

    #[test]
    fn use_by_others_and_429s_tighten_pacing() {
        let mut l = RateLimiter::new(1.0);
        l.configure("k", ProviderKind::Anthropic, Limits::default());
        let now = Instant::now();
        let probe = granted(&mut l, charge(20_000, 0), now);
        // Another process spent 30,000 of the same key's 100,000.
        l.observe(
            "k",
            ProviderKind::Anthropic,
            &input_report(100_000, 50_000),
            true,
            probe.at,
            now,
        );
        l.settle(&probe, Some(charge(20_000, 0)));
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
            now,
            now,
        );
        fixed.rejected("k");
        assert_eq!(
            fixed.pacing("k").unwrap(),
            Pacing {
                limits: [Some(10), Some(100_000), Some(1_000)],
                corrections: [1.0; 3]
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
        off.observe("k", ProviderKind::OpenAi, &snapshot, true, now, now);
        assert_eq!(off.usage("k", now), None, "no bucket learned");
        for _ in 0..5 {
            assert!(matches!(
                off.try_reserve("k", charge(1, 0), now),
                Admission::Granted(_)
            ));
        }
        // Pacing on, no configured limit: the headers' limit is learned.
        let mut on = RateLimiter::new(1.0);
        on.observe("k", ProviderKind::OpenAi, &snapshot, true, now, now);
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
        let catalog = Catalog::built_in();
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
