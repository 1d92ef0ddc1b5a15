//! The sliding-window rate limiter: per (provider, model), requests and
//! tokens per minute, reserved before a request is sent and settled to the
//! real usage when its response arrives.
//!
//! Dimensions: requests; input tokens (Anthropic ITPM: uncached input plus
//! cache writes, cache reads excluded; OpenAI TPM: all input plus output);
//! output tokens (Anthropic OTPM, reserved at `max_tokens`). The window is
//! 60 s plus a 1 s safety margin (both times `time_scale`): a request is
//! counted from the moment Apex sends it, a little before the server counts
//! it, and kept a little longer than the server keeps it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
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

/// Limits per provider and model, from the defaults and a `--limits` file.
#[derive(Debug, Clone, Default)]
pub struct LimitTable {
    entries: Vec<(ProviderKind, String, Limits)>,
    /// `--no-rate-limiting`: no pacing at all, not even limits learned from
    /// response headers (a 429's `retry-after` is still honoured).
    off: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    openai: HashMap<String, Limits>,
    #[serde(default)]
    anthropic: HashMap<String, Limits>,
}

fn parse_table(text: &str) -> Result<Vec<(ProviderKind, String, Limits)>> {
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
                _ => None,
            };
            if let Some(problem) = wrong {
                return Err(Error::LimitsFile(format!(
                    "[{provider}.\"{model}\"]: {problem}"
                )));
            }
            if [limits.rpm, limits.tpm, limits.itpm, limits.otpm].contains(&Some(0)) {
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
    /// The documented defaults (`limits.toml`).
    pub fn defaults() -> Self {
        Self {
            entries: parse_table(DEFAULTS).expect("the built-in limits are valid"),
            off: false,
        }
    }

    /// The defaults with a user file's entries laid over them.
    pub fn with_file(text: &str) -> Result<Self> {
        let mut table = Self::defaults();
        for (provider, model, limits) in parse_table(text)? {
            table
                .entries
                .retain(|(p, m, _)| !(*p == provider && *m == model));
            table.entries.push((provider, model, limits));
        }
        Ok(table)
    }

    /// No limits at all (`--no-rate-limiting`): headers teach nothing either.
    pub fn none() -> Self {
        Self {
            entries: Vec::new(),
            off: true,
        }
    }

    /// Whether pacing is off (`--no-rate-limiting`).
    pub fn is_off(&self) -> bool {
        self.off
    }

    /// Each limit divided among `n` processes sharing one account, so that
    /// together they stay under it (at least 1 each).
    pub fn shared_by(mut self, n: u32) -> Self {
        let n = u64::from(n.max(1));
        let share = |v: Option<u64>| v.map(|l| (l / n).max(1));
        for (_, _, l) in &mut self.entries {
            *l = Limits {
                rpm: share(l.rpm),
                tpm: share(l.tpm),
                itpm: share(l.itpm),
                otpm: share(l.otpm),
            };
        }
        self
    }

    /// Whether no model has limits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The limits for a model, matched through the catalog's aliases.
    pub fn lookup(&self, catalog: &Catalog, provider: ProviderKind, model: &str) -> Limits {
        let key = bucket_key(catalog, provider, model);
        self.entries
            .iter()
            .find(|(p, m, _)| *p == provider && bucket_key(catalog, *p, m) == key)
            .map(|(_, _, l)| *l)
            .unwrap_or_default()
    }
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
    /// Not before this instant.
    Wait(Instant),
}

struct Entry {
    id: u64,
    at: Instant,
    amounts: [u64; 3],
    reserved: [u64; 3],
}

struct Bucket {
    provider: ProviderKind,
    limits: [Option<u64>; 3],
    entries: VecDeque<Entry>,
    next_id: u64,
}

impl Bucket {
    fn new(provider: ProviderKind) -> Self {
        Self {
            provider,
            limits: [None; 3],
            entries: VecDeque::new(),
            next_id: 1,
        }
    }

    /// The entry of a reservation (entries stay in id order).
    fn entry_mut(&mut self, id: u64) -> Option<&mut Entry> {
        let index = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        self.entries.get_mut(index)
    }

    fn prune(&mut self, now: Instant, window: Duration) {
        while self
            .entries
            .front()
            .is_some_and(|e| now.duration_since(e.at) >= window)
        {
            self.entries.pop_front();
        }
    }

    fn sums(&self) -> [u64; 3] {
        self.entries.iter().fold([0; 3], |mut s, e| {
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
    /// Whether response headers may add or lower limits (off with
    /// `--no-rate-limiting`).
    learns_from_headers: bool,
    state: Mutex<State>,
}

/// Buckets of the keys with limits, and pauses of any key: a 429's
/// `retry-after` holds a model back whether or not it has limits.
#[derive(Default)]
struct State {
    buckets: HashMap<String, Bucket>,
    paused_until: HashMap<String, Instant>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

const DIMENSION_NAMES: [[&str; 3]; 2] = [["RPM", "TPM", "-"], ["RPM", "ITPM", "OTPM"]];

fn dimension_name(provider: ProviderKind, d: usize) -> &'static str {
    DIMENSION_NAMES[usize::from(provider == ProviderKind::Anthropic)][d]
}

impl RateLimiter {
    /// A limiter whose window is (60 s + margin) × `time_scale`.
    pub fn new(time_scale: f64) -> Self {
        Self {
            window: crate::time::scaled(WINDOW + SAFETY_MARGIN, time_scale),
            learns_from_headers: true,
            state: Mutex::new(State::default()),
        }
    }

    /// A limiter that paces nothing and learns nothing from headers
    /// (`--no-rate-limiting`); pauses after a 429 still apply.
    pub fn off(time_scale: f64) -> Self {
        Self {
            learns_from_headers: false,
            ..Self::new(time_scale)
        }
    }

    /// The window length in use.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declares the limits of a key (before any reservation). A key with no
    /// limit at all is not tracked until headers report one.
    pub fn configure(&self, key: &str, provider: ProviderKind, limits: Limits) {
        let dims = limits.dims(provider);
        let mut state = self.lock();
        if dims.iter().all(Option::is_none) {
            state.buckets.remove(key);
            return;
        }
        state
            .buckets
            .entry(key.to_owned())
            .or_insert_with(|| Bucket::new(provider))
            .limits = dims;
    }

    /// Checks that a request could ever be admitted: a charge above a limit
    /// would wait forever, so it is refused up front.
    pub fn check_fits(&self, key: &str, charge: Charge) -> std::result::Result<(), String> {
        let state = self.lock();
        let Some(bucket) = state.buckets.get(key) else {
            return Ok(());
        };
        for (d, (limit, amount)) in bucket.limits.iter().zip(charge.amounts()).enumerate() {
            if let Some(limit) = limit
                && amount > *limit
            {
                return Err(format!(
                    "one request needs {amount} against a {} limit of {limit}; it can never be sent. Raise the limit in --limits (if your tier allows), shorten the context or lower max_tokens",
                    dimension_name(bucket.provider, d)
                ));
            }
        }
        Ok(())
    }

    /// Reserves `charge` at `now`, or says when to ask again.
    pub fn try_reserve(&self, key: &str, charge: Charge, now: Instant) -> Admission {
        let window = self.window;
        let mut state = self.lock();
        if let Some(&until) = state.paused_until.get(key) {
            if until > now {
                return Admission::Wait(until);
            }
            state.paused_until.remove(key);
        }
        let Some(bucket) = state.buckets.get_mut(key) else {
            return Admission::Granted(Reservation {
                key: key.to_owned(),
                id: 0,
                at: now,
            });
        };
        bucket.prune(now, window);
        let sums = bucket.sums();
        let amounts = charge.amounts();
        let mut wait: Option<Instant> = None;
        for d in 0..3 {
            let Some(limit) = bucket.limits[d] else {
                continue;
            };
            if sums[d] + amounts[d] <= limit {
                continue;
            }
            // Walk from the oldest entry until enough would have expired.
            let excess = sums[d] + amounts[d] - limit;
            let mut by_time: Vec<(Instant, u64)> = bucket
                .entries
                .iter()
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
        bucket.entries.push_back(Entry {
            id,
            at: now,
            amounts,
            reserved: amounts,
        });
        Admission::Granted(Reservation {
            key: key.to_owned(),
            id,
            at: now,
        })
    }

    /// Replaces a reservation's amounts with what the request really used.
    pub fn settle(&self, reservation: &Reservation, actual: Charge) {
        let mut state = self.lock();
        if let Some(bucket) = state.buckets.get_mut(&reservation.key)
            && let Some(entry) = bucket.entry_mut(reservation.id)
        {
            entry.amounts = actual.amounts();
        }
    }

    /// Moves a reservation's timestamp to when the request actually left:
    /// the ledger write between reserving and sending takes time, and the
    /// server counts from arrival.
    pub fn mark_sent(&self, reservation: &mut Reservation, at: Instant) {
        let mut state = self.lock();
        if let Some(bucket) = state.buckets.get_mut(&reservation.key)
            && let Some(entry) = bucket.entry_mut(reservation.id)
        {
            entry.at = entry.at.max(at);
            reservation.at = entry.at;
        }
    }

    /// Stops admitting requests for a key until `until` (after a 429),
    /// whether or not the key has limits.
    pub fn pause(&self, key: &str, until: Instant) {
        let mut state = self.lock();
        let paused = state.paused_until.entry(key.to_owned()).or_insert(until);
        *paused = (*paused).max(until);
    }

    /// Feeds back a response's rate-limit headers. A lower `limit` than
    /// configured replaces it; a `remaining` well below what this limiter
    /// expects (someone else spends the same key) is charged as outside use.
    /// `sent_at` is when the request was sent: the server's `remaining` was
    /// computed then, so the comparison is made on that basis.
    pub fn observe(
        &self,
        key: &str,
        provider: ProviderKind,
        snapshot: &RateLimitSnapshot,
        sent_at: Instant,
        now: Instant,
    ) {
        if !self.learns_from_headers {
            return;
        }
        let window = self.window;
        let mut state = self.lock();
        let reports_limits = [
            snapshot.requests,
            snapshot.tokens,
            snapshot.input_tokens,
            snapshot.output_tokens,
        ]
        .iter()
        .any(|b| b.is_some_and(|b| b.limit.is_some()));
        if !reports_limits && !state.buckets.contains_key(key) {
            return;
        }
        let bucket = state
            .buckets
            .entry(key.to_owned())
            .or_insert_with(|| Bucket::new(provider));
        let buckets: [Option<LimitBucket>; 3] = match bucket.provider {
            ProviderKind::OpenAi => [snapshot.requests, snapshot.tokens, None],
            ProviderKind::Anthropic => [
                snapshot.requests,
                snapshot.input_tokens,
                snapshot.output_tokens,
            ],
        };
        bucket.prune(now, window);
        let mut outside = [0u64; 3];
        for d in 0..3 {
            let Some(reported) = buckets[d] else { continue };
            if let Some(limit) = reported.limit
                && bucket.limits[d].is_none_or(|ours| limit < ours)
            {
                tracing::info!(
                    key,
                    dimension = dimension_name(bucket.provider, d),
                    limit,
                    "provider reports a lower limit; using it"
                );
                bucket.limits[d] = Some(limit);
            }
            let (Some(limit), Some(remaining)) = (bucket.limits[d], reported.remaining) else {
                continue;
            };
            // What this limiter had counted in the server's window when the
            // request arrived, with reservations not yet settled at their
            // reserved size (the server still counts them so).
            let since = sent_at.checked_sub(window).unwrap_or(sent_at);
            let counted: u64 = bucket
                .entries
                .iter()
                .filter(|e| e.at > since)
                .map(|e| e.amounts[d].max(e.reserved[d]))
                .sum();
            let expected_remaining = limit.saturating_sub(counted);
            // One request counted a moment earlier or later by the server
            // than here must not look like outside use: the slack is the
            // larger of 5% of the limit and the largest request in view.
            let largest = bucket
                .entries
                .iter()
                .map(|e| e.amounts[d].max(e.reserved[d]))
                .max()
                .unwrap_or(0);
            let slack = (limit / 20).max(largest);
            if remaining + slack < expected_remaining {
                outside[d] = expected_remaining - remaining - slack;
            }
        }
        if outside.iter().any(|&v| v > 0) {
            tracing::info!(
                key,
                ?outside,
                "rate-limit headers show use outside this run; tightening"
            );
            let id = bucket.next_id;
            bucket.next_id += 1;
            bucket.entries.push_back(Entry {
                id,
                at: now,
                amounts: outside,
                reserved: outside,
            });
        }
    }

    /// The sums in the current window (for tests and displays).
    pub fn usage(&self, key: &str, now: Instant) -> Option<[u64; 3]> {
        let window = self.window;
        let mut state = self.lock();
        let bucket = state.buckets.get_mut(key)?;
        bucket.prune(now, window);
        Some(bucket.sums())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limits: Limits, provider: ProviderKind) -> RateLimiter {
        let l = RateLimiter::new(1.0);
        l.configure("k", provider, limits);
        l
    }

    fn anthropic(rpm: u64, itpm: u64, otpm: u64) -> Limits {
        Limits {
            rpm: Some(rpm),
            itpm: Some(itpm),
            otpm: Some(otpm),
            tpm: None,
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
        let l = limiter(anthropic(2, 1000, 1000), ProviderKind::Anthropic);
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
        let l = limiter(anthropic(100, 100_000, 4096), ProviderKind::Anthropic);
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
        l.settle(&r, charge(10, 200));
        assert_eq!(l.usage("k", now), Some([2, 20, 2248]));
        assert!(matches!(
            l.try_reserve("k", charge(10, 1848), now),
            Admission::Granted(_)
        ));
    }

    #[test]
    fn header_feedback_tightens_and_lowers_limits() {
        let l = limiter(anthropic(100, 100_000, 50_000), ProviderKind::Anthropic);
        let now = Instant::now();
        let Admission::Granted(_) = l.try_reserve("k", charge(10_000, 1000), now) else {
            panic!()
        };
        // The server says only 20,000 input tokens remain: 70,000 are used by
        // someone else; 60,000 of them count beyond the slack (the larger of
        // 5% and the largest request in view, 10,000). It also reports a
        // lower RPM.
        let snapshot = RateLimitSnapshot {
            requests: Some(LimitBucket {
                limit: Some(50),
                remaining: Some(49),
                reset_after: None,
            }),
            input_tokens: Some(LimitBucket {
                limit: Some(100_000),
                remaining: Some(20_000),
                reset_after: None,
            }),
            ..RateLimitSnapshot::default()
        };
        l.observe("k", ProviderKind::Anthropic, &snapshot, now, now);
        let used = l.usage("k", now).unwrap();
        assert_eq!(used[1], 10_000 + 60_000);
        assert!(matches!(
            l.try_reserve("k", charge(30_001, 10), now),
            Admission::Wait(_)
        ));
        assert!(matches!(
            l.try_reserve("k", charge(25_000, 10), now),
            Admission::Granted(_)
        ));
        // Headers that agree with our own view change nothing.
        let agree = RateLimitSnapshot {
            input_tokens: Some(LimitBucket {
                limit: Some(100_000),
                remaining: Some(5_000),
                reset_after: None,
            }),
            ..RateLimitSnapshot::default()
        };
        l.observe("k", ProviderKind::Anthropic, &agree, now, now);
        assert_eq!(l.usage("k", now).unwrap()[1], 95_000);
        for _ in 0..48 {
            let _ = l.try_reserve("k", charge(0, 0), now);
        }
        assert!(
            matches!(l.try_reserve("k", charge(0, 0), now), Admission::Wait(_)),
            "RPM now 50"
        );
    }

    #[test]
    fn pause_holds_until_retry_after() {
        let l = limiter(anthropic(100, 100_000, 50_000), ProviderKind::Anthropic);
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
        for l in [RateLimiter::new(1.0), RateLimiter::off(1.0)] {
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
        let off = RateLimiter::off(1.0);
        off.observe("k", ProviderKind::OpenAi, &snapshot, now, now);
        assert_eq!(off.usage("k", now), None, "no bucket learned");
        for _ in 0..5 {
            assert!(matches!(
                off.try_reserve("k", charge(1, 0), now),
                Admission::Granted(_)
            ));
        }
        // Pacing on, no configured limit: the headers' limit is learned.
        let on = RateLimiter::new(1.0);
        on.observe("k", ProviderKind::OpenAi, &snapshot, now, now);
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
                itpm: None,
                otpm: None,
            },
            ProviderKind::OpenAi,
        );
        let err = l
            .check_fits(
                "k",
                Charge::estimate(ProviderKind::OpenAi, 0, 0, 31_000, 2048),
            )
            .unwrap_err();
        assert!(err.contains("33048 against a TPM limit of 30000"), "{err}");
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
        for (bad, needle) in [
            (
                "[openai.\"gpt-5\"]\nitpm = 5\n",
                "itpm and otpm are Anthropic's",
            ),
            ("[anthropic.\"x\"]\ntpm = 5\n", "tpm is OpenAI's"),
            ("[openai.\"gpt-5\"]\nrpm = 0\n", "admits nothing"),
            ("[google.\"x\"]\nrpm = 1\n", "unknown field `google`"),
        ] {
            let err = LimitTable::with_file(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
