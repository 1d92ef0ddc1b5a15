//! What the limiter knows of one model at the server, per limit: what this
//! process sent (reserved, then settled), how the server gives back what it
//! counted (a sliding window, or a bucket refilled continuously), the
//! server's own word (anchors: what it reported used at a request's
//! arrival), and how it counts against Apex's count (a factor, either way).
//!
//! Admission asks one question per limit: how full will the server's count
//! be if this request goes now? With a fresh anchor the answer starts from
//! what the server said and adds only what it has not seen (requests sent
//! since, at the factor's upper bound), takes off what came back since
//! (unused output, at the estimate) and what expired or drained; an error
//! in the factor costs at most what is in flight, and a bucket's burst is
//! used. Without one (before the first answer, or for this process's share
//! when processes share the limits), Apex's own count stands in, scaled by
//! the same factor.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a server gives back what it counted against one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replenish {
    /// Each charge counts for the window after it arrived, then all of it
    /// returns.
    Window,
    /// A bucket of the limit's size refilled continuously at the limit per
    /// window.
    Bucket,
}

/// One request this process sent.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub id: u64,
    /// When it left.
    pub at: Instant,
    /// What it reserved (output at `max_tokens`).
    pub reserved: [u64; 3],
    /// What it counts now: the reservation until it settled, then what it
    /// used.
    pub amounts: [u64; 3],
    /// When its answer settled it.
    pub settled_at: Option<Instant>,
    /// The server refused it (a 429): its tokens never counted, at any time
    /// (the request itself does: OpenAI counts failed requests against its
    /// per-minute limit).
    pub refused: bool,
    /// Its place in the server's arrivals: the requests the server had
    /// counted with it (requests sent close together reach the server in
    /// either order; this tells which).
    pub rank: Option<f64>,
    /// It ended without an answer that says what the server counted (a
    /// 5xx, a dropped connection).
    pub unknown: bool,
}

impl Entry {
    /// What the server counted for it at `t`.
    fn counted_at(&self, d: usize, t: Instant) -> f64 {
        if self.refused && d > 0 {
            0.0
        } else if self.settled_at.is_some_and(|s| s <= t) {
            self.amounts[d] as f64
        } else {
            self.reserved[d] as f64
        }
    }

    /// The change its settling made: unused output back (negative), or
    /// use beyond the reservation (positive).
    fn settle_change(&self, d: usize) -> f64 {
        self.amounts[d] as f64 - self.reserved[d] as f64
    }
}

/// What the server reported used at a request's arrival.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Anchor {
    at: Instant,
    /// The reservation that carried the report.
    id: u64,
    used: f64,
    /// Its place in the server's arrivals.
    rank: Option<f64>,
}

/// The server's count per unit of Apex's, for one limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Factor {
    /// A lower bound (used for what comes back or leaves after a report).
    pub lower: f64,
    /// The best estimate (Apex's own count, without a report).
    pub estimate: f64,
    /// An upper bound (used for what goes out): pacing never counts less
    /// than the server may.
    pub upper: f64,
    /// Whether a span of answers has measured it.
    pub sampled: bool,
}

impl Default for Factor {
    fn default() -> Self {
        Self {
            lower: 1.0,
            estimate: 1.0,
            upper: 1.0,
            sampled: false,
        }
    }
}

/// A margin on the upper bound of the factor.
const FACTOR_MARGIN: f64 = 1.01;
/// The most a wide sample (small amounts against the rounding) can make
/// of the factor's upper bound: what 429s can make of it.
const WIDE_CEILING: f64 = 2.0;
/// Anchors kept per limit.
const ANCHORS_KEPT: usize = 64;
/// Earlier rounded reports read alongside the latest.
const ROUNDED_REPORTS: usize = 7;

/// One limit as the admission sees it now.
#[derive(Debug, Clone, Copy)]
pub(super) struct LimitView {
    /// The limit (this process's share of it, for its own count).
    pub limit: f64,
    /// The server's window (its refill period for a bucket).
    pub window: Duration,
    /// Apex keeps its charges this much longer than the server (a request
    /// arrives a little after it is counted sent).
    pub margin: Duration,
    /// The error of a reported figure (Anthropic rounds tokens to 1,000).
    pub rounding: f64,
    /// Requests sent this close together may reach the server in either
    /// order: whether a report counted them is not known.
    pub ambiguity: Duration,
    /// Whether other processes pace this limit too (then a report's count
    /// includes theirs, and only bounds the factor from above).
    pub alone: bool,
}

impl LimitView {
    fn rate(&self) -> f64 {
        self.limit / self.window.as_secs_f64().max(1e-9)
    }
}

/// What is known of one limit beyond its number.
#[derive(Debug)]
pub(super) struct Dim {
    replenish: Option<Replenish>,
    /// Evidence of a bucket (up) or a window (down), from reset times.
    votes: i32,
    /// Reports, in send order.
    anchors: VecDeque<Anchor>,
    /// Bounds on the factor, (low, high), one per report that gives one.
    samples: Vec<Sample>,
    /// What 429s added to the factor.
    boost: f64,
    pub factor: Factor,
}

impl Default for Dim {
    fn default() -> Self {
        Self {
            replenish: None,
            votes: 0,
            anchors: VecDeque::new(),
            samples: Vec::new(),
            boost: 1.0,
            factor: Factor::default(),
        }
    }
}

impl Dim {
    /// How the server replenishes this limit: a window until a bucket is
    /// seen (pacing a bucket as a window is slower, never over).
    pub fn replenish(&self) -> Replenish {
        self.replenish.unwrap_or(Replenish::Window)
    }

    /// A 429: the server counted more than predicted; what goes out is
    /// counted 10% higher from now on (up to twice), whatever the samples
    /// say.
    pub fn rejected(&mut self) {
        self.boost = (self.boost * 1.10).min(2.0);
        self.settle_factor();
    }

    /// The latest report still telling something at `now`.
    fn anchor(&self, view: &LimitView, now: Instant) -> Option<Anchor> {
        let anchor = *self.anchors.back()?;
        match self.replenish() {
            // Everything it counted has left a window since.
            Replenish::Window if now.saturating_duration_since(anchor.at) >= view.window => None,
            _ => Some(anchor),
        }
    }

    /// Takes an answer's report for this limit: `used` at the arrival of
    /// reservation `id` sent at `at`, and the time until the server would
    /// be fully replenished as of then, if it said. The replenishment, when
    /// it became known (or changed) with it.
    pub fn observe(
        &mut self,
        view: &LimitView,
        (at, id): (Instant, u64),
        used: u64,
        reset: Option<Duration>,
        entries: &VecDeque<Entry>,
        d: usize,
    ) -> Option<Replenish> {
        let before = self.replenish;
        // A bucket's reset is the time to refill what is used (used /
        // rate); a window's is when its charges leave, whatever their size.
        // Near the limit the two look alike (a full bucket takes a window
        // to refill): only a report well below it votes.
        let tolerance = (2.0 * view.rounding).max(0.03 * view.limit);
        if let Some(reset) = reset
            && used as f64 >= (0.05 * view.limit).max(4.0 * view.rounding)
            && used as f64 <= view.limit - 2.0 * tolerance
        {
            let implied = reset.as_secs_f64() * view.rate();
            let close = (implied - used as f64).abs() <= tolerance;
            self.votes = (self.votes + if close { 1 } else { -1 }).clamp(-4, 4);
            if self.votes >= 2 {
                self.replenish = Some(Replenish::Bucket);
            } else if self.votes <= -2 {
                self.replenish = Some(Replenish::Window);
            }
        }
        let anchor = Anchor {
            at,
            id,
            used: used as f64,
            rank: entries.iter().find(|e| e.id == id).and_then(|e| e.rank),
        };
        let place = self
            .anchors
            .iter()
            .rposition(|a| (a.at, a.id) <= (at, id))
            .map_or(0, |i| i + 1);
        self.anchors.insert(place, anchor);
        while self.anchors.len() > ANCHORS_KEPT {
            self.anchors.pop_front();
        }
        // Requests and output tokens are counted as Apex counts them (one,
        // and `max_tokens` then what was generated); input tokens by the
        // server's own tokenizer or estimate.
        if d == 1 {
            self.sample_factor(view, entries, d);
        }
        (self.replenish != before)
            .then_some(self.replenish)
            .flatten()
    }

    /// Measures the factor afresh from the reports kept, each read against
    /// what Apex sent, once everything the server may have counted for it
    /// is settled (so what each request used is known, not guessed).
    ///
    /// A window's report counts what arrived within a window of it. A
    /// bucket's drains: between two reports during which it cannot have run
    /// empty, what it added and refilled is what arrived in between plus
    /// what settled in between. Requests sent close to either end may have
    /// arrived on either side of it, and a request settled after the report
    /// may or may not have been settled at the server: each contributes an
    /// interval, and each report bounds the factor between what was surely
    /// and what was possibly counted (within the rounding). The estimate is
    /// the median of the samples (a report spoilt by an arrival further out
    /// of order than allowed does not move it); what goes out is counted
    /// at the lower quartile of the upper bounds, at least the estimate.
    /// With other processes on the limit a report counts theirs too: the
    /// factor stays what it was.
    fn sample_factor(&mut self, view: &LimitView, entries: &VecDeque<Entry>, d: usize) {
        if !view.alone {
            return;
        }
        let Some(&newest) = self.anchors.back() else {
            return;
        };
        let bucket = self.replenish() == Replenish::Bucket;
        let known = self.replenish.is_some();
        let mut samples: Vec<Sample> = Vec::new();
        for (i, &last) in self.anchors.iter().enumerate().rev() {
            if newest.at.saturating_duration_since(last.at) >= view.window {
                break;
            }
            let settled = entries
                .iter()
                .filter(|e| e.at <= last.at + view.ambiguity)
                .all(|e| e.settled_at.is_some());
            if !settled {
                continue;
            }
            let sample = if !known {
                // Alone in what the server counts (a model's first
                // answer): its report is its own count, a window or not.
                let alone = entries
                    .iter()
                    .filter(|e| e.id != last.id && !e.refused && e.at <= last.at + view.ambiguity)
                    .all(|e| {
                        last.at.saturating_duration_since(e.at) > view.window + view.ambiguity
                    });
                alone
                    .then(|| window_sample(view, entries, d, last))
                    .flatten()
            } else if bucket {
                let rate = view.rate();
                self.anchors
                    .iter()
                    .take(i)
                    .find(|f| {
                        let span = last.at.saturating_duration_since(f.at);
                        span >= view.ambiguity * 4
                            && span < view.window
                            && f.used > rate * span.as_secs_f64() + view.rounding
                    })
                    .and_then(|&first| bucket_sample(view, entries, d, first, last))
            } else {
                window_sample(view, entries, d, last)
            };
            samples.extend(sample);
        }
        // No report gives a sample now (all older than a window): what was
        // learned stands.
        if !samples.is_empty() {
            self.samples = samples;
            self.settle_factor();
        }
    }

    /// Settles the factor on the samples and the boost from 429s: what
    /// goes out at the lower quartile of the upper bounds (reports spoilt
    /// by arrivals out of order bound it too low), what comes back at the
    /// upper quartile of the lower bounds, Apex's own count at the median of the tight
    /// samples between them. Wide samples (small amounts against the
    /// rounding) bound it from above only.
    fn settle_factor(&mut self) {
        let tight: Vec<&Sample> = self.samples.iter().filter(|s| s.tight).collect();
        // A wide sample (a small amount against the rounding) bounds the
        // factor loosely: a report of a few tokens bounds it at thousands,
        // which says nothing. It counts up to what a 429 can make of the
        // factor, no further.
        let mut highs: Vec<f64> = self
            .samples
            .iter()
            .map(|s| {
                if s.tight {
                    s.high
                } else {
                    s.high.min(WIDE_CEILING)
                }
            })
            .collect();
        let mut lows: Vec<f64> = tight.iter().map(|s| s.low).filter(|l| *l > 0.0).collect();
        let mut mids: Vec<f64> = tight
            .iter()
            .filter(|s| s.low > 0.0)
            .map(|s| (s.low + s.high) / 2.0)
            .collect();
        highs.sort_by(f64::total_cmp);
        lows.sort_by(f64::total_cmp);
        mids.sort_by(f64::total_cmp);
        let high = highs.get(highs.len() / 4).copied();
        let low = lows.get(lows.len() * 3 / 4).copied();
        let estimate = match mids.get(mids.len() / 2) {
            Some(&mid) => mid.clamp(
                low.unwrap_or(0.0),
                high.unwrap_or(f64::INFINITY).max(low.unwrap_or(0.0)),
            ),
            // Only upper bounds: Apex never counts more than they allow.
            None => high.map_or(1.0, |h| h.min(1.0)),
        };
        let upper = high.unwrap_or(1.0).max(estimate) * FACTOR_MARGIN;
        let lower = low.unwrap_or(1.0).min(estimate) / FACTOR_MARGIN;
        self.factor = Factor {
            lower: lower.clamp(0.2, 5.0),
            estimate: (estimate * self.boost).clamp(0.2, 5.0),
            upper: (upper * self.boost).clamp(0.2, 5.0),
            sampled: !mids.is_empty(),
        };
    }

    /// The server's count of this limit at `now` as predicted: from the
    /// latest fresh report when there is one (and `anchored`), else from
    /// Apex's own count.
    pub fn level(
        &self,
        view: &LimitView,
        entries: &VecDeque<Entry>,
        d: usize,
        now: Instant,
        anchored: bool,
    ) -> Level {
        // The report misses nothing of others' use and the factor's error
        // stops at what it has not seen (counted as unseen when sent close
        // to it, as it may have arrived after).
        let Some(latest) = anchored.then(|| self.anchor(view, now)).flatten() else {
            return self.level_from(view, entries, d, now, None);
        };
        let mut level = self.level_from(view, entries, d, now, Some(latest));
        if view.rounding > 0.0 {
            // Each rounded report, carried forward, bounds the count from
            // above by its rounding: the lowest of a few recent ones is the
            // tightest (their rounding errors differ).
            for &anchor in self.anchors.iter().rev().skip(1).take(ROUNDED_REPORTS) {
                if self.replenish() == Replenish::Window
                    && now.saturating_duration_since(anchor.at) >= view.window
                {
                    break;
                }
                let earlier = self.level_from(view, entries, d, now, Some(anchor));
                if earlier.level < level.level {
                    level = earlier;
                }
            }
        }
        level
    }

    fn level_from(
        &self,
        view: &LimitView,
        entries: &VecDeque<Entry>,
        d: usize,
        now: Instant,
        anchor: Option<Anchor>,
    ) -> Level {
        let bucket = self.replenish() == Replenish::Bucket;
        let f = self.factor;
        // Apex's own count is the second opinion: at the estimate. What the
        // report has not seen goes at the upper bound.
        let adds = if anchor.is_some() {
            f.upper
        } else {
            f.estimate
        };
        if anchor.is_none() && !bucket {
            // Apex's own window: what it sent within a window and a margin.
            let level = entries
                .iter()
                .filter(|e| now.saturating_duration_since(e.at) < view.window + view.margin)
                .map(|e| e.amounts[d] as f64)
                .sum::<f64>()
                * f.estimate;
            return Level {
                level,
                anchored: None,
            };
        }
        // Changes in time order: (when, how much).
        let mut changes: Vec<(Instant, f64)> = Vec::new();
        let start = anchor.map(|a| a.at);
        for e in entries {
            let unseen = anchor.is_none_or(|a| seen(e, &a, view.ambiguity) != Seen::Yes);
            if e.refused && d > 0 && !unseen {
                // The report did not count it, and nothing comes back.
                continue;
            }
            if unseen {
                changes.push((e.at, e.reserved[d] as f64 * adds));
            }
            // A settling Apex saw close after the report may have reached
            // the server before it: a release counts only when surely
            // after, an increase whenever it may be.
            let change = e.settle_change(d);
            let after = |s: Instant, t: Instant| {
                if change < 0.0 {
                    s > t + view.ambiguity
                } else {
                    s + view.ambiguity > t
                }
            };
            if let Some(s) = e.settled_at
                && s <= now
                && start.is_none_or(|t| after(s, t))
            {
                let factor = match (change < 0.0, anchor) {
                    (true, Some(_)) => f.lower,
                    (true, None) => f.estimate,
                    (false, _) => adds,
                };
                changes.push((s, change * factor));
            }
            if !bucket {
                // The server lets it go a window after it arrived; Apex
                // counts it until a window and a margin after it left.
                // A report counted it only if it arrived within a window
                // of it; what leaves after a report goes at the lower bound.
                let leaves = e.at + view.window + view.margin;
                let counted_by_report =
                    start.is_none_or(|t| leaves > t && !unseen && e.at + view.window > t);
                if leaves <= now && counted_by_report {
                    let factor = if anchor.is_some() {
                        f.lower
                    } else {
                        f.estimate
                    };
                    changes.push((leaves, -e.counted_at(d, leaves) * factor));
                }
            }
        }
        changes.sort_by_key(|(t, _)| *t);
        let rate = if bucket { view.rate() } else { 0.0 };
        let mut level = anchor.map_or(0.0, |a| a.used);
        let mut t = start
            .or_else(|| changes.first().map(|c| c.0))
            .unwrap_or(now);
        for (at, change) in changes {
            level = (level - rate * at.saturating_duration_since(t).as_secs_f64()).max(0.0);
            level = (level + change).max(0.0);
            t = t.max(at);
        }
        level = (level - rate * now.saturating_duration_since(t).as_secs_f64()).max(0.0);
        Level {
            level,
            anchored: anchor.map(|a| a.at),
        }
    }

    /// When `need` more fits under `cap`, from `level` at `now`: a bucket
    /// drains at its rate; a window frees what leaves it (Apex's own
    /// charges, oldest first), else everything a stale report counted.
    #[allow(clippy::too_many_arguments)]
    pub fn fits_at(
        &self,
        view: &LimitView,
        entries: &VecDeque<Entry>,
        d: usize,
        now: Instant,
        level: Level,
        need: f64,
        cap: f64,
    ) -> Instant {
        let excess = level.level + need - cap;
        if excess <= 0.0 {
            return now;
        }
        match self.replenish() {
            Replenish::Bucket => now + Duration::from_secs_f64(excess / view.rate().max(1e-9)),
            Replenish::Window => {
                // Freed at the factor the level counted them at.
                let factor = self.factor.estimate;
                let mut leaving: Vec<(Instant, f64)> = entries
                    .iter()
                    .map(|e| {
                        let leaves = e.at + view.window + view.margin;
                        (leaves, e.counted_at(d, leaves) * factor)
                    })
                    .filter(|(leaves, _)| *leaves > now)
                    .collect();
                leaving.sort_by_key(|(t, _)| *t);
                let mut freed = 0.0;
                for (leaves, amount) in leaving {
                    freed += amount;
                    if freed >= excess {
                        return leaves;
                    }
                }
                // What the report counted of others leaves with its window.
                level
                    .anchored
                    .map_or(now + view.window + view.margin, |at| {
                        (at + view.window).max(now + Duration::from_millis(1))
                    })
            }
        }
    }
}

/// Whether the server had counted a request when it reported for `anchor`:
/// surely, surely not, or either (sent within the ambiguity of it, and the
/// server's count of requests at either arrival does not tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Yes,
    No,
    Either,
}

fn seen(e: &Entry, anchor: &Anchor, ambiguity: Duration) -> Seen {
    if e.id == anchor.id {
        return Seen::Yes;
    }
    // Sent close together (a loaded client may send later than it stamps):
    // the server's own count of requests at each arrival orders them.
    let gap =
        e.at.max(anchor.at)
            .saturating_duration_since(e.at.min(anchor.at));
    if gap <= ambiguity * 4
        && let (Some(mine), Some(its)) = (e.rank, anchor.rank)
    {
        return match mine.total_cmp(&its) {
            std::cmp::Ordering::Less => Seen::Yes,
            std::cmp::Ordering::Greater => Seen::No,
            std::cmp::Ordering::Equal => Seen::Either,
        };
    }
    if e.at + ambiguity < anchor.at {
        Seen::Yes
    } else if e.at > anchor.at + ambiguity {
        Seen::No
    } else {
        Seen::Either
    }
}

/// What the server counted for a request as of `t`, as an interval: what it
/// used once Apex had settled it by then (the server settles first), else
/// anywhere between its reservation and what it used.
fn counted(e: &Entry, d: usize, t: Instant) -> (f64, f64) {
    let (reserved, used) = (e.reserved[d] as f64, e.amounts[d] as f64);
    if e.unknown {
        (0.0, reserved)
    } else if e.settled_at.is_some_and(|s| s <= t) {
        (used, used)
    } else {
        (reserved.min(used), reserved.max(used))
    }
}

/// The union of the intervals of the cases that may hold.
fn either(cases: &[(bool, (f64, f64))]) -> (f64, f64) {
    cases.iter().filter(|(holds, _)| *holds).fold(
        (f64::INFINITY, f64::NEG_INFINITY),
        |(lo, hi), (_, (a, b))| (lo.min(*a), hi.max(*b)),
    )
}

/// One report's bounds on the factor.
#[derive(Debug, Clone, Copy)]
struct Sample {
    low: f64,
    high: f64,
    /// Amounts large against the rounding (or, with exact figures, a
    /// hundredth of the limit): narrow enough to estimate from.
    tight: bool,
}

/// Bounds on the factor from what was surely and possibly counted.
fn bounds(
    view: &LimitView,
    reported: f64,
    rounding: f64,
    sure: f64,
    possible: f64,
) -> Option<Sample> {
    (sure > 0.0 && reported > 0.0).then(|| Sample {
        low: if possible > 0.0 {
            (reported - rounding).max(0.0) / possible
        } else {
            0.0
        },
        high: (reported + rounding) / sure,
        tight: sure >= (20.0 * rounding).max(0.01 * view.limit),
    })
}

/// A window's report against what arrived within a window of it.
fn window_sample(
    view: &LimitView,
    entries: &VecDeque<Entry>,
    d: usize,
    last: Anchor,
) -> Option<Sample> {
    let (mut sure, mut possible) = (0.0, 0.0);
    for e in entries.iter().filter(|e| !e.refused) {
        let age = last.at.saturating_duration_since(e.at);
        let in_window = if age + view.ambiguity < view.window {
            Seen::Yes
        } else if age > view.window + view.ambiguity {
            Seen::No
        } else {
            Seen::Either
        };
        let arrived = seen(e, &last, view.ambiguity);
        let zero = (0.0, 0.0);
        let (lo, hi) = match (arrived, in_window) {
            (Seen::No, _) | (_, Seen::No) => zero,
            (Seen::Yes, Seen::Yes) => counted(e, d, last.at),
            _ => either(&[(true, zero), (true, counted(e, d, last.at))]),
        };
        sure += lo;
        possible += hi;
    }
    bounds(view, last.used, view.rounding, sure, possible)
}

/// A bucket's change between two reports against what arrived and settled
/// in between.
fn bucket_sample(
    view: &LimitView,
    entries: &VecDeque<Entry>,
    d: usize,
    first: Anchor,
    last: Anchor,
) -> Option<Sample> {
    let span = last.at.saturating_duration_since(first.at).as_secs_f64();
    let added = last.used - first.used + view.rate() * span;
    let (mut sure, mut possible) = (0.0, 0.0);
    for e in entries.iter().filter(|e| !e.refused) {
        let before = seen(e, &first, view.ambiguity);
        let by_last = seen(e, &last, view.ambiguity);
        // Seen at the first report: only its settling can fall in between
        // (if Apex settled it before the first, the server had too).
        let change = e.settle_change(d);
        let settling = if e.settled_at.is_some_and(|s| s <= first.at) {
            (0.0, 0.0)
        } else {
            (change.min(0.0), change.max(0.0))
        };
        let (lo, hi) = either(&[
            (before != Seen::No, settling),
            (
                before != Seen::Yes && by_last != Seen::No,
                counted(e, d, last.at),
            ),
            (before != Seen::Yes && by_last != Seen::Yes, (0.0, 0.0)),
        ]);
        if lo.is_finite() {
            sure += lo;
            possible += hi;
        }
    }
    bounds(view, added, 2.0 * view.rounding, sure, possible)
}

/// A predicted count.
#[derive(Debug, Clone, Copy)]
pub(super) struct Level {
    pub level: f64,
    /// The report it started from, if any.
    pub anchored: Option<Instant>,
}
