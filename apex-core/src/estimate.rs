//! Estimating a run before it spends anything: tokens, expected cache writes
//! and reads under Apex's leader-then-followers schedule, cost with and
//! without caching (a range: output is unknown until it is produced), the
//! Batch-API price, and the least duration the per-minute limits allow.

use std::time::Duration;

use crate::catalog::{Catalog, Prices};
use crate::condition::{Condition, ProviderKind};
use crate::limiter::{LimitTable, Limits, WINDOW};
use crate::plan::PackageRef;
use crate::provider::{CacheControls, CacheTtl, Usage};
use crate::tokens::Tokenizer;

/// A planned context with its token split under each tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizedPackage {
    /// The package.
    pub package: PackageRef,
    /// (cacheable prefix, instruction) under `o200k_base`.
    pub o200k: (u64, u64),
    /// (cacheable prefix, instruction) under the 4-bytes-per-token estimate.
    pub estimate: (u64, u64),
}

impl SizedPackage {
    fn split(&self, tokenizer: Tokenizer) -> (u64, u64) {
        match tokenizer {
            Tokenizer::O200k => self.o200k,
            Tokenizer::Estimate => self.estimate,
        }
    }
}

/// A cost range in USD: output from 0 to `max_tokens` per request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CostRange {
    /// No output at all.
    pub low: f64,
    /// Every request writes `max_tokens`.
    pub high: f64,
}

impl CostRange {
    /// Whether a figure lies inside the range (with a rounding allowance).
    pub fn contains(&self, cost: f64) -> bool {
        cost >= self.low * (1.0 - 1e-9) && cost <= self.high * (1.0 + 1e-9)
    }
}

/// The estimate of one condition.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionEstimate {
    /// The condition's slug.
    pub slug: String,
    /// Its model.
    pub model: String,
    /// How its tokens were counted.
    pub tokenizer: Tokenizer,
    /// Requests (one per generation, before retries).
    pub requests: u64,
    /// Input tokens of each context (prefix + instruction), in plan order.
    pub input_tokens_per_context: Vec<u64>,
    /// Expected usage summed over the run, output excluded.
    pub usage: Usage,
    /// Output tokens if every request used its whole budget.
    pub max_output_tokens: u64,
    /// Cost with Apex's caching; `None` when the model has no prices.
    pub with_cache: Option<CostRange>,
    /// Cost if nothing were cached.
    pub without_cache: Option<CostRange>,
    /// The Batch APIs' price for the same requests sent in one batch: its
    /// items do not read each other's cache writes, so nothing is cached.
    pub batch: Option<CostRange>,
    /// The Batch APIs' price in two waves (`apex run --batch`): per context
    /// a leader writing the longest cache the model offers, then the other
    /// replicates reading it.
    pub batch_two_waves: Option<CostRange>,
    /// Least time the per-minute limits allow (output reserved at
    /// `max_tokens`, as the providers count it), request latency excluded.
    pub least_duration: Duration,
}

fn cost(prices: Option<&Prices>, usage: &Usage, max_output: u64) -> Option<CostRange> {
    let p = prices?;
    let high = Usage {
        output_tokens: max_output,
        ..*usage
    };
    Some(CostRange {
        low: p.cost(usage),
        high: p.cost(&high),
    })
}

/// The least time one per-minute limit allows for demand `d` made of
/// requests of at most `a` each: a 60-second window admits only whole
/// requests, ⌊L/a⌋ of them, and the first window is free.
pub fn limit_floor(d: f64, a: f64, l: f64) -> Duration {
    if l <= 0.0 || d <= 0.0 {
        return Duration::ZERO;
    }
    let whole = if a > 0.0 && a <= l {
        (((d / a).floor() / (l / a).floor()).ceil() - 1.0).max(0.0)
    } else {
        0.0
    };
    WINDOW.mul_f64(whole.max((d / l - 1.0).max(0.0)))
}

/// Estimates each condition of a plan.
pub fn estimate(
    catalog: &Catalog,
    limits: &LimitTable,
    conditions: &[Condition],
    packages: &[SizedPackage],
    replicates: u32,
    cache: bool,
) -> Vec<ConditionEstimate> {
    let cache = crate::plan::sends_cache_hints(cache, replicates);
    conditions
        .iter()
        .map(|c| estimate_condition(catalog, limits, c, packages, replicates, cache))
        .collect()
}

/// What one request is expected to use: `(input, cache write, cache read)`.
fn expected_input(
    (provider, controls): (ProviderKind, CacheControls),
    cache: bool,
    min_cacheable: u64,
    (prefix, rest): (u64, u64),
    follower: bool,
) -> (u64, u64, u64) {
    let total = prefix + rest;
    let exact = provider == ProviderKind::Anthropic || controls == CacheControls::Breakpoints;
    match provider {
        // cache_control (and OpenAI's explicit breakpoint, whose writes are
        // billed) is sent only with caching on; both cache the exact prefix.
        _ if exact && cache && prefix >= min_cacheable.max(1) => {
            if follower {
                (rest, 0, prefix)
            } else {
                (rest, prefix, 0)
            }
        }
        ProviderKind::Anthropic => (total, 0, 0),
        // OpenAI caches long prefixes automatically, in 128-token steps,
        // once the first request completed.
        ProviderKind::OpenAi if follower && prefix >= min_cacheable.max(1024) => {
            let cached = prefix / 128 * 128;
            (total - cached, 0, cached)
        }
        ProviderKind::OpenAi => (total, 0, 0),
    }
}

/// The least time the limits allow for these requests, each charging
/// `(input-side tokens, output tokens)`.
fn least_duration(limits: Limits, provider: ProviderKind, charges: &[(u64, u64)]) -> Duration {
    let requests = charges.len() as f64;
    let sum = |f: fn(&(u64, u64)) -> u64| charges.iter().map(f).sum::<u64>() as f64;
    let max = |f: fn(&(u64, u64)) -> u64| charges.iter().map(f).max().unwrap_or(0) as f64;
    let input_limit = match provider {
        ProviderKind::Anthropic => limits.itpm,
        ProviderKind::OpenAi => limits.tpm,
    };
    [
        limits.rpm.map(|rpm| limit_floor(requests, 1.0, rpm as f64)),
        input_limit.map(|lim| limit_floor(sum(|c| c.0), max(|c| c.0), lim as f64)),
        limits
            .otpm
            .map(|lim| limit_floor(sum(|c| c.1), max(|c| c.1), lim as f64)),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or_default()
}

fn estimate_condition(
    catalog: &Catalog,
    limits: &LimitTable,
    c: &Condition,
    packages: &[SizedPackage],
    replicates: u32,
    cache: bool,
) -> ConditionEstimate {
    let tokenizer = Tokenizer::for_provider(c.provider);
    let model = catalog.lookup(c.provider, &c.model);
    let min_cacheable = model.map_or(1024, |m| m.min_cacheable_tokens);
    let controls = model.map(|m| m.cache_controls).unwrap_or_default();
    let max_tokens = u64::from(c.max_tokens);
    let mut usage = Usage::default();
    // Priced per request: a price tier depends on one request's size.
    let prices = model.map(|m| &m.prices);
    let mut with_cache = prices.map(|_| CostRange::default());
    let mut without_cache = with_cache;
    let mut two_waves = with_cache;
    // Per request, what the limits count (output at max_tokens).
    let mut charges: Vec<(u64, u64)> = Vec::new();
    for p in packages {
        let split = p.split(tokenizer);
        let total = split.0 + split.1;
        // Writes at the TTL the run will ask for (1 hour / 12 hours when
        // the limits hold followers back), priced as such.
        let long_ttl = cache
            && crate::dispatch::pacing::choose_ttl(
                catalog,
                limits,
                c,
                replicates as usize,
                &p.package,
            ) == CacheTtl::OneHour;
        for replicate in 0..u64::from(replicates) {
            let (input, write, read) = expected_input(
                (c.provider, controls),
                cache,
                min_cacheable,
                split,
                replicate > 0,
            );
            let one = Usage {
                input_tokens: input,
                cache_write_tokens: write,
                cache_write_1h_tokens: if long_ttl { write } else { 0 },
                cache_read_tokens: read,
                ..Usage::default()
            };
            let plain = Usage {
                input_tokens: total,
                ..Usage::default()
            };
            // Two waves of batches: the leader writes the long cache (the
            // gap until its followers is a batch's processing time). An
            // in-memory cache (5 to 10 minutes) rarely outlives a batch, so
            // models with only that are expected to read nothing.
            let in_memory_only =
                c.provider == ProviderKind::OpenAi && controls == CacheControls::Automatic;
            let waved = if cache && replicates > 1 && !in_memory_only {
                Usage {
                    cache_write_1h_tokens: write,
                    ..one
                }
            } else {
                plain
            };
            for (range, u) in [
                (&mut with_cache, one),
                (&mut without_cache, plain),
                (&mut two_waves, waved),
            ] {
                if let (Some(r), Some(c)) = (range.as_mut(), cost(prices, &u, max_tokens)) {
                    r.low += c.low;
                    r.high += c.high;
                }
            }
            usage.input_tokens += input;
            usage.cache_write_tokens += write;
            usage.cache_write_1h_tokens += one.cache_write_1h_tokens;
            usage.cache_read_tokens += read;
            charges.push(match c.provider {
                ProviderKind::Anthropic => (input + write, max_tokens),
                ProviderKind::OpenAi => (total + max_tokens, 0),
            });
        }
    }
    let requests = charges.len() as u64;
    let discount = prices.map_or(1.0, |p| p.batch_discount);
    let at_batch_price = |range: CostRange| CostRange {
        low: range.low * discount,
        high: range.high * discount,
    };
    let batch = without_cache.map(at_batch_price);
    let batch_two_waves = two_waves.map(at_batch_price);
    ConditionEstimate {
        slug: c.slug.clone(),
        model: c.model.clone(),
        tokenizer,
        requests,
        input_tokens_per_context: packages
            .iter()
            .map(|p| {
                let (a, b) = p.split(tokenizer);
                a + b
            })
            .collect(),
        usage,
        max_output_tokens: max_tokens * requests,
        with_cache,
        without_cache,
        batch,
        batch_two_waves,
        least_duration: least_duration(
            limits.lookup(catalog, c.provider, &c.model),
            c.provider,
            &charges,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(prefix: u64, rest: u64) -> SizedPackage {
        SizedPackage {
            package: PackageRef {
                id: "ctx".into(),
                version: "v".into(),
                estimated_tokens: prefix + rest,
                byte_len: 4 * (prefix + rest),
                o200k_tokens: prefix + rest,
            },
            o200k: (prefix, rest),
            estimate: (prefix, rest),
        }
    }

    fn condition(provider: ProviderKind, model: &str) -> Condition {
        Condition {
            slug: "c".into(),
            provider,
            model: model.into(),
            temperature: None,
            top_p: None,
            max_tokens: 2048,
            reasoning_effort: None,
            api: Default::default(),
            thinking: None,
            thinking_budget: None,
            stream: false,
            store: None,
        }
    }

    #[test]
    fn anthropic_leader_writes_followers_read() {
        let e = &estimate(
            &Catalog::built_in(),
            &LimitTable::defaults(),
            &[condition(ProviderKind::Anthropic, "claude-sonnet-4-5")],
            &[sized(128_000, 50)],
            3,
            true,
        )[0];
        assert_eq!(e.requests, 3);
        assert_eq!(
            (
                e.usage.input_tokens,
                e.usage.cache_write_tokens,
                e.usage.cache_read_tokens
            ),
            (150, 128_000, 256_000)
        );
        // Hand computed: 150 × $3 + 128,000 × $3.75 + 256,000 × $0.30, per million.
        let low = (150.0 * 3.0 + 128_000.0 * 3.75 + 256_000.0 * 0.30) / 1e6;
        let with = e.with_cache.unwrap();
        assert!((with.low - low).abs() < 1e-12);
        assert!((with.high - (low + 3.0 * 2048.0 * 15.0 / 1e6)).abs() < 1e-12);
        let without = e.without_cache.unwrap();
        assert!((without.low - 3.0 * 128_050.0 * 3.0 / 1e6).abs() < 1e-12);
        // Batch: half of the uncached price.
        assert!((e.batch.unwrap().low - without.low * 0.5).abs() < 1e-12);
        // Tier 2 ITPM 450,000: 128,050-token leaders; one context fits one window.
        assert_eq!(e.least_duration, Duration::ZERO);
    }

    #[test]
    fn openai_followers_read_in_128_token_steps() {
        let e = &estimate(
            &Catalog::built_in(),
            &LimitTable::defaults(),
            &[condition(ProviderKind::OpenAi, "gpt-4o")],
            &[sized(100_010, 40), sized(100_010, 40)],
            3,
            false,
        )[0];
        let cached = 100_010 / 128 * 128;
        assert_eq!(e.usage.cache_read_tokens, 4 * cached);
        assert_eq!(e.usage.input_tokens, 6 * 100_050 - 4 * cached);
        // TPM 450,000 admits 4 requests of 102,098 per window: 6 requests → 1 extra window.
        assert_eq!(e.least_duration, Duration::from_secs(60));
    }

    #[test]
    fn openai_breakpoint_models_bill_the_leaders_write() {
        let e = &estimate(
            &Catalog::built_in(),
            &LimitTable::defaults(),
            &[condition(ProviderKind::OpenAi, "gpt-6.2-sol")],
            &[sized(100_010, 40)],
            3,
            true,
        )[0];
        // The exact prefix: written once at 1.25×, read twice at 0.05×.
        assert_eq!(
            (
                e.usage.input_tokens,
                e.usage.cache_write_tokens,
                e.usage.cache_read_tokens
            ),
            (120, 100_010, 200_020)
        );
        let low = (120.0 * 2.0 + 100_010.0 * 2.5 + 200_020.0 * 0.10) / 1e6;
        assert!((e.with_cache.unwrap().low - low).abs() < 1e-12);
    }

    #[test]
    fn writes_are_priced_at_the_ttl_the_run_will_ask_for() {
        // At 1,000 OTPM a context's two followers (2,048 max tokens each)
        // wait minutes for the output budget, longer than half of 5
        // minutes: the leader writes with the 1-hour TTL, at 2× input.
        let limits = LimitTable::with_file(
            "[anthropic.\"claude-sonnet-4-5\"]\nrpm = 1000\nitpm = 1000000\notpm = 1000\n",
        )
        .unwrap();
        let e = &estimate(
            &Catalog::built_in(),
            &limits,
            &[condition(ProviderKind::Anthropic, "claude-sonnet-4-5")],
            &[sized(128_000, 50)],
            3,
            true,
        )[0];
        assert_eq!(e.usage.cache_write_1h_tokens, 128_000);
        let low = (150.0 * 3.0 + 128_000.0 * 6.0 + 256_000.0 * 0.30) / 1e6;
        assert!((e.with_cache.unwrap().low - low).abs() < 1e-12);
    }

    #[test]
    fn limit_floor_matches_the_formula() {
        // 21 leaders of 120K against 450K ITPM: 3 per window → 6 more windows.
        assert_eq!(
            limit_floor(21.0 * 120_000.0, 120_000.0, 450_000.0),
            Duration::from_secs(360)
        );
        assert_eq!(limit_floor(10.0, 1.0, 50.0), Duration::ZERO);
        assert_eq!(limit_floor(150.0, 1.0, 50.0), Duration::from_secs(120));
    }
}
