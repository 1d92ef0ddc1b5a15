//! The production matrix at full size against the local simulator, with the
//! providers' tier limits on scaled time: 4 conditions × 21 contexts of
//! ~120K tokens × 3 replicates = 252 generations over real HTTP.
//!
//! ```text
//! cargo run --release --example production_bench -- [TIME_SCALE] [CONTEXTS] [TOKENS] [MODE]
//! cargo run --release --example production_bench              # 0.01, 21, 120000, real
//! ```
//!
//! With `APEX_BENCH_KEEP=1` the ledger is kept and its path printed.
//!
//! MODE is how the simulator's limiters count and replenish, against Apex
//! learning the limits from headers with no limits file: `real` (as the
//! services do: OpenAI counts characters / 4 plus `max_tokens` in a sliding
//! window, Anthropic a token bucket with `remaining` rounded to thousands),
//! `exact` (the billed count, a sliding window, exact headers: the
//! simulator agrees with Apex), `count+30` and `count-30` (30% more or
//! fewer input tokens than billed, sliding window), `bucket` (billed count,
//! token bucket, rounded headers) and `file` (`real`, with the tier table
//! also given to Apex as a limits file). MODE `batch` sends the matrix
//! through the simulator's Batch APIs instead (`apex run --batch`; each
//! batch takes the simulator's default 600 s of its time) and reports, per
//! condition, the wall time against the two waves' processing time, the
//! follower cache hits, and the cost against the two-wave minimum, the same
//! run sent synchronously with caching, and a naive single batch.
//!
//! Contexts are 120,000 tokens under OpenAI's o200k_base (a little more by
//! Apex's four-bytes-per-token estimate used for Claude), not 128,000:
//! GPT-4o's 128K window includes the output, so a 128K context cannot be
//! sent to it at all. The limits are
//! Apex's documented defaults (`apex-core/src/limits.toml`), and the
//! simulator enforces the same numbers, as the real APIs would for an
//! account at those tiers. Times are reported in real-time equivalents
//! (measured time / TIME_SCALE).
//!
//! Per condition it prints: wall time; the least time the limits allow (per
//! limit: 60 s × max(0, ⌈⌊D/a⌋ / ⌊L/a⌋⌉ − 1), at least 60 s × max(0, D/L − 1)
//! and 60 s × (⌈n / ⌊L/t⌋⌉ − 1) for the n largest requests, each at least t,
//! for demand D, limit L and the largest single request a, as the simulator
//! counted them; the largest over the limits, plus two mean latencies);
//! their ratio; 429 responses;
//! cache-hit ratio against (R−1)/R; cost against the least cost caching allows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use apex::core::executor::{Executor, NoProgress, RunOptions};
use apex::core::limiter::LimitTable;
use apex::core::{Catalog, ContextPackage, Plan, Provider, ProviderKind, RunId, SqlValue, Store};
use apex::store::SqliteStore;
use apex_providers::simulator::{
    LimitRules, Replenish, SimLimits, Simulator, SimulatorConfig, TokenCount,
};
use apex_providers::{ApiKey, ProviderConfig};

#[path = "support/bounds.rs"]
mod bounds;
#[path = "support/runs.rs"]
#[allow(dead_code)]
mod runs;
use bounds::{bucket_floor, count_floor, limit_floor};
use runs::plan_and_record;

const REPLICATES: u32 = 3;

fn num(v: &SqlValue) -> f64 {
    match v {
        SqlValue::Integer(i) => *i as f64,
        SqlValue::Real(r) => *r,
        _ => 0.0,
    }
}

/// Rows `[prompt_id, input, cache write, cache read, …]` grouped by
/// context, each group with its cacheable prefix (the most any of its rows
/// wrote or read).
fn by_context(rows: &[Vec<SqlValue>]) -> Vec<(f64, Vec<&Vec<SqlValue>>)> {
    let mut groups: HashMap<String, Vec<&Vec<SqlValue>>> = HashMap::new();
    for r in rows {
        groups.entry(r[0].to_string()).or_default().push(r);
    }
    groups
        .into_values()
        .map(|group| {
            let prefix = group
                .iter()
                .map(|r| num(&r[2]) + num(&r[3]))
                .fold(0.0, f64::max);
            (prefix, group)
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let scale: f64 = args
        .next()
        .map_or(Ok(0.01), |a| a.parse())
        .context("TIME_SCALE")?;
    let contexts: usize = args
        .next()
        .map_or(Ok(21), |a| a.parse())
        .context("CONTEXTS")?;
    let tokens: usize = args
        .next()
        .map_or(Ok(120_000), |a| a.parse())
        .context("TOKENS")?;
    let mode = args.next().unwrap_or_else(|| "real".into());
    let catalog = Arc::new(Catalog::built_in());
    let tiers = LimitTable::defaults();
    let rules = |provider: ProviderKind| -> Result<LimitRules> {
        let window = |count| LimitRules {
            count,
            replenish: Replenish::SlidingWindow,
            round_remaining: false,
        };
        Ok(match mode.as_str() {
            "real" | "file" | "batch" => LimitRules::of(provider),
            "exact" => window(TokenCount::Billed),
            "count+30" => window(TokenCount::Factor(1.3)),
            "count-30" => window(TokenCount::Factor(0.7)),
            "bucket" => LimitRules {
                count: TokenCount::Billed,
                replenish: Replenish::TokenBucket,
                round_remaining: true,
            },
            other => anyhow::bail!(
                "MODE `{other}` is not real, exact, count+30, count-30, bucket, file or batch"
            ),
        })
    };
    // Apex learns the limits from the headers; `file` also caps them.
    let limits = if mode == "file" {
        LimitTable::with_file(include_str!("../apex-core/src/limits.toml"))?
    } else {
        LimitTable::defaults()
    };

    let conditions = apex::core::parse_conditions(include_str!("production/conditions.toml"))?;
    let sim_limits = conditions
        .iter()
        .map(|c| {
            let l = tiers.lookup(&catalog, c.provider, &c.model);
            (
                c.provider,
                c.model.clone(),
                SimLimits {
                    rpm: l.rpm,
                    tpm: l.tpm,
                    itpm: l.itpm,
                    otpm: l.otpm,
                },
            )
        })
        .collect();
    let sim = Simulator::start(
        SimulatorConfig {
            api_key: Some("sk-bench".into()),
            time_scale: scale,
            limits: sim_limits,
            openai_rules: rules(ProviderKind::OpenAi)?,
            anthropic_rules: rules(ProviderKind::Anthropic)?,
            ..SimulatorConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;

    let dir = std::env::temp_dir().join(format!("apex-prod-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(SqliteStore::open(&dir.join("ledger.db"))?);
    store.register_conditions(&conditions).await?;
    let system =
        "You are a careful analyst. Answer only from the case file you are given.".to_string();
    // Size each context to TOKENS under o200k_base (OpenAI's exact count);
    // Apex's 4-bytes-per-token estimate for Claude comes out a few % higher.
    let sentence = |i: usize| format!("On day {i}, the survey team recorded the tide readings. ");
    let per_sentence =
        apex::core::tokens::Tokenizer::O200k.count(&sentence(7).repeat(100)) as f64 / 100.0;
    for i in 0..contexts {
        let body = format!("Case file {i:02}. ")
            + &sentence(i).repeat((tokens as f64 / per_sentence) as usize);
        let package = ContextPackage::new(
            format!("ctx-{:02}", i + 1),
            Some(system.clone()),
            body,
            "List the three most important events.".into(),
        )?;
        store.ingest_packages(&[package]).await?;
    }
    let (run_id, plan) = plan_and_record(
        &*store,
        conditions.clone(),
        REPLICATES,
        serde_json::json!({"bench": "production", "time_scale": scale}),
    )
    .await?;
    apex::core::executor::check_limits(&catalog, &limits, &plan.conditions, &plan.packages)?;

    let mut providers: HashMap<ProviderKind, Arc<dyn Provider>> = HashMap::new();
    for (kind, base) in [
        (ProviderKind::OpenAi, sim.openai_base_url()),
        (ProviderKind::Anthropic, sim.anthropic_base_url()),
    ] {
        let config = ProviderConfig {
            base_url: base,
            api_key: Some(ApiKey::new("sk-bench")),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
            stream_idle_timeout: std::time::Duration::from_secs(300),
            allow_insecure_http: false,
        };
        providers.insert(kind, apex_providers::build(kind, config)?);
    }
    let batch = mode == "batch";
    let options = RunOptions {
        concurrency: 32,
        time_scale: scale,
        limits,
        batch,
        ..RunOptions::default()
    };
    let executor = Executor::new(
        store.clone() as Arc<dyn Store>,
        providers,
        Arc::clone(&catalog),
        options,
        Arc::new(NoProgress),
    );
    let (_stop, rx) = tokio::sync::watch::channel(false);
    if batch {
        let started = std::time::Instant::now();
        let report = executor.execute(&run_id, false, rx).await?;
        let wall = started.elapsed().as_secs_f64() / scale;
        ensure!(
            report.counts.success == plan.cell_count() as u64,
            "not every generation succeeded: {:?}",
            report.counts
        );
        batch_report(&*store, &catalog, &conditions, &plan, &run_id, wall, &sim).await?;
        drop(store);
        finish(&dir, &run_id)?;
        return Ok(());
    }
    let report = executor.execute(&run_id, false, rx).await?;
    ensure!(
        report.counts.success == plan.cell_count() as u64,
        "not every generation succeeded: {:?}",
        report.counts
    );

    let sample = store
        .current_packages()
        .await?
        .into_iter()
        .next()
        .context("a package")?;
    println!(
        "{contexts} contexts x {} o200k tokens ({} estimated for Claude) x {REPLICATES} replicates, time scale {scale}, simulator mode {mode} (times in real-time equivalents)\n",
        sample.o200k_tokens, sample.estimated_tokens
    );
    println!(
        "{:<14} {:>5} {:>9} {:>9} {:>6} {:>5} {:>11} {:>10} {:>10} {:>6}",
        "condition",
        "gens",
        "wall_s",
        "bound_s",
        "ratio",
        "429s",
        "cache_hits",
        "cost_usd",
        "min_usd",
        "ratio"
    );
    let requests = sim.requests();
    for c in &conditions {
        let key = apex::core::limiter::bucket_key(&catalog, c.provider, &c.model);
        let mine: Vec<_> = requests
            .iter()
            .filter(|r| apex::core::limiter::bucket_key(&catalog, r.provider, &r.model) == key)
            .collect();
        let ok: Vec<_> = mine.iter().filter(|r| r.status == 200).collect();
        let first = mine.iter().map(|r| r.arrived).min().unwrap_or_default();
        let last = ok.iter().map(|r| r.answered).max().unwrap_or_default();
        let wall = (last - first).as_secs_f64() / scale;
        let mean_latency = ok
            .iter()
            .map(|r| (r.answered - r.arrived).as_secs_f64())
            .sum::<f64>()
            / ok.len().max(1) as f64
            / scale;
        let rate_limited = mine.iter().filter(|r| r.status == 429).count();

        let rows = store
            .query_read_only(&format!(
                "SELECT prompt_id, input_tokens, cache_write_tokens, cache_read_tokens, output_tokens, cost_usd, cache_hit
                 FROM apex_audition.generations WHERE run_id = '{run_id}' AND condition_slug = '{}'",
                c.slug
            ))
            .await?
            .rows;
        let l = tiers.lookup(&catalog, c.provider, &c.model);
        // Demand as the server counted it.
        let per_request: Vec<(f64, f64)> = ok
            .iter()
            .map(|r| (r.charged[1] as f64, r.charged[2] as f64))
            .collect();
        let demand = |f: fn(&(f64, f64)) -> f64| {
            (
                per_request.iter().map(f).sum::<f64>(),
                per_request.iter().map(f).fold(0.0, f64::max),
            )
        };
        let (d_in, a_in) = demand(|x| x.0);
        let (d_out, a_out) = demand(|x| x.1);
        let n = ok.len() as f64;
        let in_limit = match c.provider {
            ProviderKind::Anthropic => l.itpm,
            ProviderKind::OpenAi => l.tpm,
        };
        let ins: Vec<f64> = per_request.iter().map(|x| x.0).collect();
        let outs: Vec<f64> = per_request.iter().map(|x| x.1).collect();
        let bound = if rules(c.provider)?.replenish == Replenish::TokenBucket {
            // A burst of each bucket's size, then its refill, overlapping
            // the first answer; the last answer a latency after.
            let mut bound = l.rpm.map_or(0.0, |rpm| bucket_floor(n, rpm as f64));
            bound = bound.max(in_limit.map_or(0.0, |lim| bucket_floor(d_in, lim as f64)));
            bound = bound.max(l.otpm.map_or(0.0, |lim| bucket_floor(d_out, lim as f64)));
            bound.max(mean_latency) + mean_latency
        } else {
            let mut bound = l.rpm.map_or(0.0, |rpm| limit_floor(n, 1.0, rpm as f64));
            bound = bound.max(in_limit.map_or(0.0, |lim| {
                limit_floor(d_in, a_in, lim as f64).max(count_floor(&ins, lim as f64))
            }));
            bound = bound.max(l.otpm.map_or(0.0, |lim| {
                limit_floor(d_out, a_out, lim as f64).max(count_floor(&outs, lim as f64))
            }));
            bound + 2.0 * mean_latency
        };

        // The least cost caching allows: per context one write of the
        // cacheable prefix, reads for the other replicates.
        let prices = catalog
            .lookup(c.provider, &c.model)
            .map(|m| m.prices)
            .context("model prices")?;
        let mut min_cost = 0.0;
        for (prefix, group) in by_context(&rows) {
            for (i, r) in group.iter().enumerate() {
                let total = num(&r[1]) + num(&r[2]) + num(&r[3]);
                let rest = total - prefix;
                let prefix_price = if i == 0 {
                    prices.cache_write_5m
                } else {
                    prices.cache_read
                };
                min_cost +=
                    (prefix * prefix_price + rest * prices.input + num(&r[4]) * prices.output)
                        / 1e6;
            }
        }
        let cost: f64 = rows.iter().map(|r| num(&r[5])).sum();
        let hits = rows.iter().filter(|r| num(&r[6]) > 0.0).count();
        println!(
            "{:<14} {:>5} {:>9.1} {:>9.1} {:>6.3} {:>5} {:>5}/{:<5} {:>10.4} {:>10.4} {:>6.3}",
            c.slug,
            rows.len(),
            wall,
            bound,
            wall / bound,
            rate_limited,
            hits,
            rows.len() * (REPLICATES as usize - 1) / REPLICATES as usize,
            cost,
            min_cost,
            cost / min_cost
        );
    }
    drop(store);
    finish(&dir, &run_id)
}

/// Removes the bench's ledger, or keeps it with `APEX_BENCH_KEEP=1` (for
/// `apex report` of the full matrix) and says where.
fn finish(dir: &std::path::Path, run_id: &RunId) -> Result<()> {
    if std::env::var("APEX_BENCH_KEEP").as_deref() == Ok("1") {
        println!(
            "\nledger kept: apex --database-url sqlite://{} report {run_id}",
            dir.join("ledger.db").display()
        );
        return Ok(());
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// MODE `batch`: per condition, wall time against the two waves' processing
/// time, follower cache hits against (R−1)/R, and cost against the two-wave
/// minimum (per context one leader at batch rates writing the cache the
/// gap needs, R−1 followers reading it), the same run sent synchronously
/// with caching (Apex's estimate at the output produced), and one naive
/// batch (nothing cached).
async fn batch_report(
    store: &dyn Store,
    catalog: &Catalog,
    conditions: &[apex::core::Condition],
    plan: &Plan,
    run_id: &RunId,
    wall: f64,
    sim: &Simulator,
) -> Result<()> {
    let waves = 2.0 * 600.0;
    let batches = sim.batches();
    println!(
        "{} generations in {} batches; wall {wall:.0} s (real-time equivalent) against the two waves' processing time {waves:.0} s: ratio {:.3}\n",
        plan.cell_count(),
        batches.len(),
        wall / waves
    );
    let mut sized = Vec::new();
    for p in &plan.packages {
        let package = store.package(&p.id, &p.version).await?;
        sized.push(apex::core::estimate::SizedPackage {
            package: p.clone(),
            o200k: apex::core::tokens::Tokenizer::O200k.split(&package),
            estimate: apex::core::tokens::Tokenizer::Estimate.split(&package),
        });
    }
    let estimates = apex::core::estimate::estimate(
        catalog,
        &LimitTable::none(),
        conditions,
        &sized,
        REPLICATES,
        true,
    );
    println!(
        "{:<14} {:>11} {:>10} {:>10} {:>6} {:>10} {:>6} {:>10} {:>6}",
        "condition",
        "cache_hits",
        "cost_usd",
        "2wave_min",
        "ratio",
        "sync_usd",
        "ratio",
        "naive_usd",
        "ratio"
    );
    let (mut all_cost, mut all_sync, mut all_sync_extra) = (0.0, 0.0, 0.0);
    for (c, e) in conditions.iter().zip(&estimates) {
        let rows = store
            .query_read_only(&format!(
                "SELECT prompt_id, input_tokens, cache_write_tokens, cache_read_tokens, output_tokens, cost_usd, cache_hit, replicate_index, transport
                 FROM apex_audition.generations WHERE run_id = '{run_id}' AND condition_slug = '{}'",
                c.slug
            ))
            .await?
            .rows;
        let prices = catalog
            .lookup(c.provider, &c.model)
            .map(|m| m.prices)
            .context("model prices")?;
        // Each generation at the rate of the transport it took: the batch
        // rate, or the full rate for the one that went alone first.
        let mut least = 0.0;
        let mut sync_extra = 0.0;
        for (prefix, group) in by_context(&rows) {
            for r in group {
                let total = num(&r[1]) + num(&r[2]) + num(&r[3]);
                let leader = num(&r[7]) == 0.0;
                // Anthropic's leader writes for an hour; OpenAI's writes
                // (24-hour retention, or none) are billed as input.
                let prefix_price = match (leader, c.provider) {
                    (true, ProviderKind::Anthropic) => prices.cache_write_1h,
                    (true, ProviderKind::OpenAi) => prices.input,
                    (false, _) => prices.cache_read,
                };
                let full = (prefix * prefix_price
                    + (total - prefix) * prices.input
                    + num(&r[4]) * prices.output)
                    / 1e6;
                if r[8].to_string() == "batch" {
                    least += full * prices.batch_discount;
                } else {
                    least += full;
                    sync_extra += full * (1.0 - prices.batch_discount);
                }
            }
        }
        let output: f64 = rows.iter().map(|r| num(&r[4])).sum();
        let output_cost = output * prices.output / 1e6;
        let sync = e.with_cache.map_or(0.0, |r| r.low) + output_cost;
        let naive = e.batch.map_or(0.0, |r| r.low) + output_cost * prices.batch_discount;
        let cost: f64 = rows.iter().map(|r| num(&r[5])).sum();
        let hits = rows.iter().filter(|r| num(&r[6]) > 0.0).count();
        all_cost += cost;
        all_sync += sync;
        all_sync_extra += sync_extra;
        println!(
            "{:<14} {:>5}/{:<5} {:>10.4} {:>10.4} {:>6.3} {:>10.4} {:>6.3} {:>10.4} {:>6.3}",
            c.slug,
            hits,
            rows.len() * (REPLICATES as usize - 1) / REPLICATES as usize,
            cost,
            least,
            cost / least,
            sync,
            cost / sync,
            naive,
            cost / naive
        );
    }
    let refused = batches.iter().filter(|b| !b.accepted).count();
    println!(
        "\nall four: {all_cost:.4} USD, {:.3} of the same run sent synchronously with caching ({all_sync:.4} USD); generations sent synchronously cost {all_sync_extra:.4} USD more than the batch rate; {refused} batch(es) refused or failed as a whole",
        all_cost / all_sync
    );
    Ok(())
}
