//! What each attempt reserves against the limits, and which cache TTL a
//! group asks for.

use crate::catalog::Catalog;
use crate::condition::{Condition, ProviderKind};
use crate::error::{Error, Result};
use crate::limiter::{Charge, LimitTable, RateLimiter, bucket_key};
use crate::plan::PackageRef;
use crate::provider::{CacheControls, CacheTtl};
use crate::tokens::Tokenizer;

/// How an attempt meets the prompt cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheRole {
    /// It writes the cache (a leader, or any request of a cold group).
    Writes,
    /// It reads what its group's leader wrote.
    Reads,
}

/// The reservation for one attempt of `condition` on a context split into
/// (cacheable prefix, rest) tokens.
pub fn charge(
    catalog: &Catalog,
    condition: &Condition,
    cache: bool,
    (prefix, rest): (u64, u64),
    role: CacheRole,
) -> Charge {
    let min_cacheable = catalog
        .lookup(condition.provider, &condition.model)
        .map_or(1024, |m| m.min_cacheable_tokens);
    let cached = cache && prefix >= min_cacheable;
    let (uncached, write) = match (cached, role) {
        (true, CacheRole::Reads) => (rest, 0),
        (true, CacheRole::Writes) => (rest, prefix),
        (false, _) => (prefix + rest, 0),
    };
    Charge::estimate(
        condition.provider,
        uncached,
        write,
        prefix + rest,
        u64::from(condition.max_tokens),
    )
}

/// The cache TTL for a condition: 5 minutes, unless its `replicates − 1`
/// followers could be held back by the limits for longer than half of that.
pub fn choose_ttl(
    catalog: &Catalog,
    limits: &LimitTable,
    condition: &Condition,
    replicates: usize,
    package: &PackageRef,
) -> CacheTtl {
    let followers = replicates.saturating_sub(1) as u64;
    if followers == 0 || limits.is_empty() {
        return CacheTtl::FiveMinutes;
    }
    let limits = limits.lookup(catalog, condition.provider, &condition.model);
    let charge = Charge::estimate(
        condition.provider,
        64,
        0,
        package.tokens(Tokenizer::for_provider(condition.provider)),
        u64::from(condition.max_tokens),
    );
    let dims: [(Option<u64>, u64); 3] = match condition.provider {
        ProviderKind::OpenAi => [(limits.rpm, 1), (limits.tpm, charge.input), (None, 0)],
        ProviderKind::Anthropic => [
            (limits.rpm, 1),
            (limits.itpm, charge.input),
            (limits.otpm, charge.output),
        ],
    };
    let windows = dims
        .iter()
        .filter_map(|(limit, per)| limit.map(|l| followers.saturating_mul(*per).div_ceil(l.max(1))))
        .max()
        .unwrap_or(0);
    // Followers must come within the short TTL, with room to spare: 5
    // minutes on Anthropic, 30 minutes on OpenAI's breakpoint models.
    let short_ttl_secs = match catalog
        .lookup(condition.provider, &condition.model)
        .map(|m| m.cache_controls)
    {
        Some(CacheControls::Breakpoints) if condition.provider == ProviderKind::OpenAi => 1800,
        _ => 300,
    };
    if windows.saturating_mul(60) > short_ttl_secs / 2 {
        CacheTtl::OneHour
    } else {
        CacheTtl::FiveMinutes
    }
}

/// Refuses, before anything is sent, a condition whose leader request could
/// never fit under the `--limits` caps (it would wait forever); limits learned
/// from the server are checked as they arrive.
pub fn check_limits(
    catalog: &Catalog,
    limits: &LimitTable,
    conditions: &[Condition],
    packages: &[PackageRef],
) -> Result<()> {
    let mut limiter = RateLimiter::fixed(1.0);
    limiter.set_share(limits.share());
    for c in conditions {
        let key = bucket_key(catalog, c.provider, &c.model);
        limiter.configure(&key, c.provider, limits.cap(catalog, c.provider, &c.model));
        for p in packages {
            let tokens = p.tokens(Tokenizer::for_provider(c.provider));
            let charge = Charge::estimate(c.provider, tokens, 0, tokens, u64::from(c.max_tokens));
            limiter.check_fits(&key, charge).map_err(|problem| {
                Error::Preflight(format!(
                    "condition `{}`, context `{}`: {problem}",
                    c.slug, p.id
                ))
            })?;
        }
    }
    Ok(())
}
