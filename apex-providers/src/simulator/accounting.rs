//! The simulator's own rate-limit accounting: how the simulated servers
//! count a request against their limits and how they replenish them.
//!
//! Written apart from Apex's limiter (`apex_core::limiter`), and not sharing
//! a line with it, so that tests against the simulator catch a limiter that
//! only agrees with itself. By default it disagrees with Apex as the real
//! services do: OpenAI's limiter charges an estimate from the request's
//! characters plus `max_tokens` up front (Apex counts exact `o200k` tokens);
//! Anthropic refills its limits continuously as a token bucket and rounds the
//! token `remaining` headers to the nearest thousand (shared reference
//! providers.md §1.4 and §2.5).

use std::collections::VecDeque;
use std::time::Duration;

use apex_core::ProviderKind;
use apex_core::limiter::{Limits, parse_limits_file};
use tokio::time::Instant;

/// Per-minute limits the simulator enforces for one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// OpenAI tokens per minute (all input + output).
    pub tpm: Option<u64>,
    /// Anthropic input tokens per minute (uncached input + cache writes).
    pub itpm: Option<u64>,
    /// Anthropic output tokens per minute.
    pub otpm: Option<u64>,
}

impl SimLimits {
    fn dims(&self, provider: ProviderKind) -> [Option<u64>; 3] {
        match provider {
            ProviderKind::OpenAi => [self.rpm, self.tpm, None],
            ProviderKind::Anthropic => [self.rpm, self.itpm, self.otpm],
        }
    }
}

/// The published standard tiers the simulator enforces by default (the
/// shared reference providers.md §1.4 and §2.5): Anthropic Tier 2, OpenAI
/// Tier 2 for GPT-4o and Tier 1 for GPT-5; this month's Claude 5.5 models at
/// 1,000 RPM, 500K ITPM, 100K OTPM and GPT-6.x at 500 RPM, 500K TPM (the tier
/// table's assumptions for them). The simulator's own copy.
pub fn published_tiers() -> Vec<(ProviderKind, String, SimLimits)> {
    let current_anthropic = SimLimits {
        rpm: Some(1000),
        itpm: Some(500_000),
        otpm: Some(100_000),
        tpm: None,
    };
    let current_openai = SimLimits {
        rpm: Some(500),
        tpm: Some(500_000),
        ..SimLimits::default()
    };
    let anthropic_tier_2 = SimLimits {
        rpm: Some(1000),
        itpm: Some(450_000),
        otpm: Some(90_000),
        tpm: None,
    };
    vec![
        (
            ProviderKind::Anthropic,
            "claude-sonnet-4-5".into(),
            anthropic_tier_2,
        ),
        (
            ProviderKind::Anthropic,
            "claude-opus-4-1".into(),
            anthropic_tier_2,
        ),
        (
            ProviderKind::OpenAi,
            "gpt-4o".into(),
            SimLimits {
                rpm: Some(5000),
                tpm: Some(450_000),
                ..SimLimits::default()
            },
        ),
        (
            ProviderKind::OpenAi,
            "gpt-5".into(),
            SimLimits {
                rpm: Some(500),
                tpm: Some(500_000),
                ..SimLimits::default()
            },
        ),
        // This month's equivalents (examples/production/conditions-2026-11.toml).
        (
            ProviderKind::Anthropic,
            "claude-sonnet-5-5".into(),
            current_anthropic,
        ),
        (
            ProviderKind::Anthropic,
            "claude-opus-5-5".into(),
            current_anthropic,
        ),
        (ProviderKind::OpenAi, "gpt-6.2-sol".into(), current_openai),
        (ProviderKind::OpenAi, "gpt-6-luna".into(), current_openai),
    ]
}

impl From<Limits> for SimLimits {
    fn from(l: Limits) -> Self {
        Self {
            rpm: l.rpm,
            tpm: l.tpm,
            itpm: l.itpm,
            otpm: l.otpm,
        }
    }
}

/// Reads limits in the format of Apex's `--limits` file, with Apex's own
/// parser (reading a file is not accounting; the counting below is ours).
pub fn parse_limits(text: &str) -> Result<Vec<(ProviderKind, String, SimLimits)>, String> {
    let entries = parse_limits_file(text).map_err(|e| match e {
        apex_core::Error::LimitsFile(message) => message,
        other => other.to_string(),
    })?;
    Ok(entries
        .into_iter()
        .map(|(provider, model, limits)| (provider, model, limits.into()))
        .collect())
}

/// How the server counts a request's input tokens against its limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenCount {
    /// As it bills them (the usage it reports).
    Billed,
    /// The billed count times this factor (a tokenizer that differs).
    Factor(f64),
    /// OpenAI's estimate: the request's bytes / 4.
    Characters,
}

/// How the server gives back what a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replenish {
    /// Each charge counts for 60 s after it arrived, then all of it returns.
    SlidingWindow,
    /// A bucket of the limit's size refilled continuously (limit per 60 s).
    TokenBucket,
}

/// How one provider's limiter behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitRules {
    /// Its count of input tokens.
    pub count: TokenCount,
    /// How it replenishes.
    pub replenish: Replenish,
    /// Whether token `remaining` headers are rounded to the nearest thousand.
    pub round_remaining: bool,
}

impl LimitRules {
    /// The real service's behaviour, as documented.
    pub fn of(provider: ProviderKind) -> Self {
        match provider {
            ProviderKind::OpenAi => Self {
                count: TokenCount::Characters,
                replenish: Replenish::SlidingWindow,
                round_remaining: false,
            },
            ProviderKind::Anthropic => Self {
                count: TokenCount::Billed,
                replenish: Replenish::TokenBucket,
                round_remaining: true,
            },
        }
    }

    /// The input tokens charged: `billed` as usage reports them, `bytes`
    /// the request body's size.
    pub fn input_charge(&self, billed: u64, bytes: u64, total_billed: u64) -> u64 {
        match self.count {
            TokenCount::Billed => billed,
            TokenCount::Factor(f) => (billed as f64 * f).round() as u64,
            // The estimate covers the whole request; a part of it (say,
            // Anthropic's uncached input) gets its share.
            TokenCount::Characters => {
                let estimate = bytes.div_ceil(4);
                if total_billed == 0 {
                    estimate
                } else {
                    (estimate as f64 * billed as f64 / total_billed as f64).round() as u64
                }
            }
        }
    }
}

/// One model's account: what it has charged, per dimension (requests,
/// input or all tokens, output tokens).
#[derive(Debug)]
pub struct Account {
    rules: LimitRules,
    window: Duration,
    /// Sliding window: (id, arrival, charge).
    charges: VecDeque<(u64, Instant, [u64; 3])>,
    /// Token bucket: what is used (the bucket's deficit) as of `updated`.
    used: [f64; 3],
    updated: Option<Instant>,
    next_id: u64,
}

/// The account's answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Admit {
    /// Charged; settle it later by this id.
    Granted(u64),
    /// Over a limit: come back after this long.
    Wait(Duration),
    /// One request above a whole limit: (limit, requested).
    TooLarge(u64, u64),
}

/// The rate-limit state to report in headers, per dimension.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Limit, remaining and time until fully replenished.
    pub dims: [Option<(u64, u64, Duration)>; 3],
}

impl Account {
    /// An empty account; `window` is the scaled 60 s.
    pub fn new(rules: LimitRules, window: Duration) -> Self {
        Self {
            rules,
            window,
            charges: VecDeque::new(),
            used: [0.0; 3],
            updated: None,
            next_id: 1,
        }
    }

    fn refill(&mut self, now: Instant, limits: &[Option<u64>; 3]) {
        let elapsed = self
            .updated
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.updated = Some(now);
        self.charges
            .retain(|(_, t, _)| now.saturating_duration_since(*t) < self.window);
        for (used, limit) in self.used.iter_mut().zip(limits) {
            let rate = limit.map_or(0.0, |l| l as f64 / self.window.as_secs_f64());
            *used = (*used - rate * elapsed.as_secs_f64()).max(0.0);
        }
    }

    fn used(&self, d: usize) -> u64 {
        match self.rules.replenish {
            Replenish::SlidingWindow => self.charges.iter().map(|(_, _, c)| c[d]).sum(),
            Replenish::TokenBucket => self.used[d].ceil() as u64,
        }
    }

    /// How long until `extra` more fits under `limit` in dimension `d`.
    fn wait_for(&self, d: usize, limit: u64, extra: u64) -> Duration {
        let used = self.used(d);
        match self.rules.replenish {
            Replenish::SlidingWindow => {
                let mut freed = 0;
                for (_, t, c) in &self.charges {
                    freed += c[d];
                    if used - freed + extra <= limit {
                        let age = self
                            .updated
                            .map_or(Duration::ZERO, |now| now.saturating_duration_since(*t));
                        return self.window.saturating_sub(age);
                    }
                }
                self.window
            }
            Replenish::TokenBucket => {
                let rate = limit as f64 / self.window.as_secs_f64();
                let short = (used + extra).saturating_sub(limit) as f64;
                Duration::from_secs_f64(short / rate)
            }
        }
    }

    /// Charges `charge` at `now` if every limit allows it.
    pub fn admit(
        &mut self,
        now: Instant,
        limits: SimLimits,
        provider: ProviderKind,
        charge: [u64; 3],
    ) -> Admit {
        let limits = limits.dims(provider);
        self.refill(now, &limits);
        let mut wait: Option<Duration> = None;
        for d in 0..3 {
            let Some(limit) = limits[d] else { continue };
            if charge[d] > limit {
                return Admit::TooLarge(limit, charge[d]);
            }
            if self.used(d) + charge[d] > limit {
                let w = self.wait_for(d, limit, charge[d]);
                wait = Some(wait.map_or(w, |x| x.max(w)));
            }
        }
        if let Some(w) = wait {
            return Admit::Wait(w);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.charges.push_back((id, now, charge));
        for (used, c) in self.used.iter_mut().zip(charge) {
            *used += c as f64;
        }
        Admit::Granted(id)
    }

    /// Replaces what charge `id` counts (`charged` at arrival) with `final`
    /// (the output reservation becomes the output produced; OpenAI's
    /// `max_tokens` likewise). A bucket gives the difference back even when
    /// the charge has left the window's list.
    pub fn settle(&mut self, id: u64, charged: [u64; 3], settled: [u64; 3]) {
        if let Some((_, _, c)) = self.charges.iter_mut().find(|(i, ..)| *i == id) {
            *c = settled;
        }
        for ((used, before), after) in self.used.iter_mut().zip(charged).zip(settled) {
            *used = (*used - before as f64 + after as f64).max(0.0);
        }
    }

    /// The state the headers report at `now`.
    pub fn report(&mut self, now: Instant, limits: SimLimits, provider: ProviderKind) -> Report {
        let limits = limits.dims(provider);
        self.refill(now, &limits);
        let dims = std::array::from_fn(|d| {
            let limit = limits[d]?;
            let used = self.used(d).min(limit);
            let mut remaining = limit - used;
            if self.rules.round_remaining && d > 0 {
                remaining = (remaining + 500) / 1000 * 1000;
            }
            let reset = match self.rules.replenish {
                Replenish::SlidingWindow => {
                    self.charges.back().map_or(Duration::ZERO, |(_, t, _)| {
                        self.window
                            .saturating_sub(now.saturating_duration_since(*t))
                    })
                }
                Replenish::TokenBucket => Duration::from_secs_f64(
                    used as f64 / (limit as f64 / self.window.as_secs_f64()),
                ),
            };
            Some((limit, remaining.min(limit), reset))
        });
        Report { dims }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn tpm(limit: u64) -> SimLimits {
        SimLimits {
            tpm: Some(limit),
            ..SimLimits::default()
        }
    }

    #[test]
    fn a_sliding_window_returns_a_charge_whole_after_a_minute() {
        let rules = LimitRules {
            replenish: Replenish::SlidingWindow,
            ..LimitRules::of(ProviderKind::OpenAi)
        };
        let mut a = Account::new(rules, MINUTE);
        let t0 = Instant::now();
        let limits = tpm(100);
        assert_eq!(
            a.admit(t0, limits, ProviderKind::OpenAi, [1, 80, 0]),
            Admit::Granted(1)
        );
        let t30 = t0 + Duration::from_secs(30);
        assert_eq!(
            a.admit(t30, limits, ProviderKind::OpenAi, [1, 30, 0]),
            Admit::Wait(Duration::from_secs(30))
        );
        assert!(matches!(
            a.admit(t0 + MINUTE, limits, ProviderKind::OpenAi, [1, 30, 0]),
            Admit::Granted(_)
        ));
        assert_eq!(
            a.admit(t0, limits, ProviderKind::OpenAi, [1, 101, 0]),
            Admit::TooLarge(100, 101)
        );
    }

    #[test]
    fn a_token_bucket_refills_continuously_and_rounds() {
        let mut a = Account::new(LimitRules::of(ProviderKind::Anthropic), MINUTE);
        let t0 = Instant::now();
        let limits = SimLimits {
            itpm: Some(60_000),
            ..SimLimits::default()
        };
        let p = ProviderKind::Anthropic;
        assert!(matches!(
            a.admit(t0, limits, p, [1, 59_600, 0]),
            Admit::Granted(_)
        ));
        // Rounded to the nearest thousand: 400 left reads as 0.
        assert_eq!(a.report(t0, limits, p).dims[1].unwrap().1, 0);
        // 10 s later 10,000 are back (1,000 per second).
        let t10 = t0 + Duration::from_secs(10);
        let report = a.report(t10, limits, p).dims[1].unwrap();
        assert_eq!(report.1, 10_000);
        assert!(
            (report.2.as_secs_f64() - 49.6).abs() < 0.01,
            "{:?}",
            report.2
        );
        assert_eq!(
            a.admit(t10, limits, p, [1, 12_400, 0]),
            Admit::Wait(Duration::from_secs(2))
        );
    }

    #[test]
    fn counts_that_differ_from_the_billed_one() {
        let billed = LimitRules::of(ProviderKind::Anthropic);
        assert_eq!(billed.input_charge(1000, 9000, 1000), 1000);
        let factor = LimitRules {
            count: TokenCount::Factor(1.3),
            ..billed
        };
        assert_eq!(factor.input_charge(1000, 9000, 1000), 1300);
        let chars = LimitRules::of(ProviderKind::OpenAi);
        assert_eq!(chars.input_charge(1000, 4800, 1000), 1200);
        assert_eq!(chars.input_charge(500, 4800, 1000), 600);
    }

    #[test]
    fn limits_files_parse() {
        let limits =
            parse_limits("[openai.\"gpt-5\"]\nrpm = 7\ntpm = 9000\n[anthropic.\"x\"]\nitpm = 5\n")
                .unwrap();
        assert_eq!(limits.len(), 2);
        assert!(parse_limits("[openai.\"gpt-5\"]\nrpm = 0\n").is_err());
        assert!(parse_limits("[openai.\"gpt-5\"]\nrpn = 1\n").is_err());
    }
}
