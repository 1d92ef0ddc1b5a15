//! Pacing against what the server allows, row by row: the seed's four models
//! (`max_tokens` 512, about 300 tokens generated) × 21 contexts of ~2,000
//! tokens × 3 replicates = 252 generations over HTTP, against the simulator
//! at the published Tier 1 limits (Anthropic 50 RPM, 30,000 ITPM, 8,000
//! OTPM; GPT-4o 500 RPM, 30,000 TPM; GPT-5 500 RPM, 500,000 TPM). Apex gets
//! no limits file: it learns them from the headers.
//!
//! ```text
//! cargo run --release --example pacing_bench -- [TIME_SCALE] [ROW ...]
//! ```
//!
//! Rows: `window` (a sliding 60-s window counting as Apex does), `bucket`
//! (a bucket refilled continuously, Anthropic's `remaining` rounded to
//! thousands), `window-0.8`, `bucket-0.8`, `window-1.3`, `bucket-1.3` (the
//! server counts 0.8 or 1.3 × the billed input), `processes-3` (three
//! processes on one run over one SQLite ledger, a window), `claude-otpm`
//! (the two Claude models alone, bound by OTPM, as the real service
//! counts: a bucket, rounded). Default: every row.
//!
//! Per model and row: wall time (first arrival to last answer at the
//! simulator) against the least time the limits allow by the simulator's
//! own count of each request (a window: whole windows; a bucket: the fluid
//! bound, a burst of the capacity then the refill rate; the largest over
//! the limits, plus two mean latencies), and the 429s after the model's
//! first answer. Times are real-time equivalents (measured / TIME_SCALE).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use apex::core::executor::{Executor, NoProgress, RunOptions};
use apex::core::limiter::{LimitTable, bucket_key};
use apex::core::{Catalog, ProviderKind, Store};
use apex::store::SqliteStore;
use apex_providers::simulator::{
    LimitRules, Replenish, SimLimits, Simulator, SimulatorConfig, TokenCount,
};

#[path = "support/bounds.rs"]
mod bounds;
#[path = "support/runs.rs"]
mod runs;
use bounds::{bucket_floor, count_floor, limit_floor};
use runs::{case_file, plan_and_record};

const ROWS: [&str; 8] = [
    "window",
    "bucket",
    "window-0.8",
    "bucket-0.8",
    "window-1.3",
    "bucket-1.3",
    "processes-3",
    "claude-otpm",
];

/// Requests in flight at once: enough that the limits, not the slots,
/// bind (Apex's default is 16).
const CONCURRENCY: usize = 64;

const CONDITIONS: &str = r#"
[[condition]]
slug = "gpt5"
provider = "openai"
model = "gpt-5"
max_tokens = 512

[[condition]]
slug = "gpt4o"
provider = "openai"
model = "gpt-4o"
temperature = 0.7
max_tokens = 512

[[condition]]
slug = "sonnet45"
provider = "anthropic"
model = "claude-sonnet-4-5"
temperature = 0.7
max_tokens = 512

[[condition]]
slug = "opus41"
provider = "anthropic"
model = "claude-opus-4-1"
temperature = 0.7
max_tokens = 512
"#;

/// The published Tier 1 limits (shared reference providers.md §1.4, §2.5).
fn tier_1(provider: ProviderKind, model: &str) -> SimLimits {
    match (provider, model) {
        (ProviderKind::Anthropic, _) => SimLimits {
            rpm: Some(50),
            itpm: Some(30_000),
            otpm: Some(8_000),
            tpm: None,
        },
        (ProviderKind::OpenAi, "gpt-4o") => SimLimits {
            rpm: Some(500),
            tpm: Some(30_000),
            ..SimLimits::default()
        },
        (ProviderKind::OpenAi, _) => SimLimits {
            rpm: Some(500),
            tpm: Some(500_000),
            ..SimLimits::default()
        },
    }
}

/// How the simulated servers count and replenish in a row.
fn rules(row: &str, provider: ProviderKind) -> LimitRules {
    let (replenish, factor) = match row {
        "window" | "processes-3" => (Replenish::SlidingWindow, 1.0),
        "bucket" => (Replenish::TokenBucket, 1.0),
        "window-0.8" => (Replenish::SlidingWindow, 0.8),
        "bucket-0.8" => (Replenish::TokenBucket, 0.8),
        "window-1.3" => (Replenish::SlidingWindow, 1.3),
        "bucket-1.3" => (Replenish::TokenBucket, 1.3),
        _ => return LimitRules::of(provider),
    };
    LimitRules {
        count: if factor == 1.0 {
            TokenCount::Billed
        } else {
            TokenCount::Factor(factor)
        },
        replenish,
        // Anthropic rounds its token `remaining` to thousands; a window
        // that counts as Apex does is exact.
        round_remaining: provider == ProviderKind::Anthropic && replenish == Replenish::TokenBucket,
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let scale: f64 = args
        .next()
        .map_or(Ok(0.01), |a| a.parse())
        .context("TIME_SCALE")?;
    let rows: Vec<String> = args.collect();
    let rows: Vec<&str> = if rows.is_empty() {
        ROWS.iter().copied().chain(["first-token"]).collect()
    } else {
        rows.iter().map(String::as_str).collect()
    };
    println!(
        "252 generations (4 models x 21 contexts of ~2,000 tokens x 3 replicates, max_tokens 512, ~300 generated) at Tier 1 limits, time scale {scale}; wall / least time the limits allow (429s after the model's first answer)\n"
    );
    println!(
        "{:<12} {:>14} {:>14} {:>14} {:>14} {:>8}",
        "row", "gpt5", "gpt4o", "sonnet45", "opus41", "run"
    );
    for row in rows {
        if row == "first-token" {
            first_token_row(scale).await?;
            continue;
        }
        anyhow::ensure!(
            ROWS.contains(&row),
            "ROW `{row}` is not one of {ROWS:?} or `first-token`"
        );
        let result = run_row(row, scale).await?;
        let cell = |slug: &str| {
            result
                .iter()
                .find(|r| r.slug == slug)
                .map_or("-".to_owned(), |r| {
                    format!("{:.3} ({})", r.wall / r.bound, r.late_429s)
                })
        };
        let run = result.iter().map(|r| r.wall).fold(0.0, f64::max)
            / result.iter().map(|r| r.bound).fold(0.0, f64::max);
        println!(
            "{row:<12} {:>14} {:>14} {:>14} {:>14} {:>8.3}",
            cell("gpt5"),
            cell("gpt4o"),
            cell("sonnet45"),
            cell("opus41"),
            run
        );
    }
    Ok(())
}

/// An executor as a plain `apex run` has it: the tier table, limits learned
/// from the headers, [`CONCURRENCY`] in flight.
fn executor(
    store: Arc<dyn Store>,
    providers: HashMap<ProviderKind, Arc<dyn apex::core::Provider>>,
    catalog: &Arc<Catalog>,
    scale: f64,
) -> Executor {
    Executor::new(
        store,
        providers,
        Arc::clone(catalog),
        RunOptions {
            time_scale: scale,
            limits: LimitTable::defaults(),
            concurrency: CONCURRENCY,
            ..RunOptions::default()
        },
        Arc::new(NoProgress),
    )
}

/// One model's figures in a row.
struct ModelResult {
    slug: String,
    wall: f64,
    bound: f64,
    late_429s: usize,
}

async fn run_row(row: &str, scale: f64) -> Result<Vec<ModelResult>> {
    let catalog = Arc::new(Catalog::built_in());
    let mut conditions = apex::core::parse_conditions(CONDITIONS)?;
    if row == "claude-otpm" {
        conditions.retain(|c| c.provider == ProviderKind::Anthropic);
    }
    let sim = Simulator::start(
        SimulatorConfig {
            api_key: Some("sk-bench".into()),
            time_scale: scale,
            output_tokens: 300,
            limits: conditions
                .iter()
                .map(|c| (c.provider, c.model.clone(), tier_1(c.provider, &c.model)))
                .collect(),
            openai_rules: rules(row, ProviderKind::OpenAi),
            anthropic_rules: rules(row, ProviderKind::Anthropic),
            ..SimulatorConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let dir = std::env::temp_dir().join(format!("apex-pacing-bench-{}-{row}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("ledger.db");
    let store = Arc::new(SqliteStore::open(&path)?);
    store.register_conditions(&conditions).await?;
    for i in 0..21 {
        store.ingest_packages(&[case_file(i, 160)?]).await?;
    }
    let (run_id, plan) = plan_and_record(
        &*store,
        conditions.clone(),
        3,
        serde_json::json!({"bench": "pacing", "row": row}),
    )
    .await?;
    let processes = if row == "processes-3" { 3 } else { 1 };
    let mut runs = Vec::new();
    for _ in 0..processes {
        // Each process has its own connection to the ledger and its own
        // name, as separate `apex run --resume` processes would.
        let store: Arc<dyn Store> = if processes == 1 {
            store.clone()
        } else {
            Arc::new(SqliteStore::open(&path)?)
        };
        let providers = [ProviderKind::OpenAi, ProviderKind::Anthropic]
            .into_iter()
            .map(|kind| {
                Ok((
                    kind,
                    apex_providers::build(kind, sim.provider_config(kind))?,
                ))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        let executor = executor(store, providers, &catalog, scale);
        let run_id = run_id.clone();
        runs.push(tokio::spawn(async move {
            let (_stop, rx) = tokio::sync::watch::channel(false);
            executor.execute(&run_id, false, rx).await
        }));
    }
    for run in runs {
        run.await??;
    }
    let counts = store.run(&run_id).await?.counts;
    anyhow::ensure!(
        counts.success == plan.cell_count() as u64,
        "row {row}: not every generation succeeded: {counts:?}"
    );
    let requests = sim.requests();
    let bucket = rules(row, ProviderKind::Anthropic).replenish == Replenish::TokenBucket;
    let mut results = Vec::new();
    for c in &conditions {
        let key = bucket_key(&catalog, c.provider, &c.model);
        let mine: Vec<_> = requests
            .iter()
            .filter(|r| bucket_key(&catalog, r.provider, &r.model) == key)
            .collect();
        let ok: Vec<_> = mine.iter().filter(|r| r.status == 200).collect();
        let first = mine.iter().map(|r| r.arrived).min().unwrap_or_default();
        let first_answer = ok.iter().map(|r| r.answered).min().unwrap_or_default();
        let last = ok.iter().map(|r| r.answered).max().unwrap_or_default();
        let late_429s = mine
            .iter()
            .filter(|r| r.status == 429 && r.arrived > first_answer)
            .count();
        let mean_latency = ok
            .iter()
            .map(|r| (r.answered - r.arrived).as_secs_f64())
            .sum::<f64>()
            / ok.len().max(1) as f64
            / scale;
        let limits = tier_1(c.provider, &c.model);
        let dims = match c.provider {
            ProviderKind::OpenAi => [limits.rpm, limits.tpm, None],
            ProviderKind::Anthropic => [limits.rpm, limits.itpm, limits.otpm],
        };
        // Time the limits need (a window: whole windows after the first,
        // whose requests go after the first answer and whose last answer
        // comes a latency after it is sent; a bucket: what does not fit in
        // the capacity at the refill rate, overlapping the first answer's
        // latency).
        let mut bound: f64 = 0.0;
        for (d, limit) in dims.iter().enumerate() {
            let Some(limit) = limit.map(|l| l as f64) else {
                continue;
            };
            let charges: Vec<f64> = ok.iter().map(|r| r.charged[d] as f64).collect();
            let demand: f64 = charges.iter().sum();
            let largest = charges.iter().copied().fold(0.0, f64::max);
            bound = bound.max(if bucket {
                bucket_floor(demand, limit).max(mean_latency) + mean_latency
            } else {
                limit_floor(demand, largest, limit).max(count_floor(&charges, limit))
                    + 2.0 * mean_latency
            });
        }
        // A follower goes after its leader's answer (two latencies at
        // least), and no more than `concurrency` requests are in flight:
        // a model the limits do not bind is bound by that.
        let in_flight = ok.len() as f64 * mean_latency / CONCURRENCY as f64;
        results.push(ModelResult {
            slug: c.slug.clone(),
            wall: (last - first).as_secs_f64() / scale,
            bound: bound.max(in_flight + mean_latency).max(2.0 * mean_latency),
            late_429s,
        });
    }
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(results)
}

/// Followers at the leader's first token: one Claude model with limits that
/// do not bind, 8 contexts of ~128,000 tokens x 3 replicates, `max_tokens`
/// 2,048 all generated. Per context: from its leader's arrival to its last
/// follower's answer, against the leader's time to first token (processing
/// the context it writes) plus one follower's latency. The model's first
/// context waits for its leader's whole answer (the first answer teaches
/// the limits), so it is shown apart.
async fn first_token_row(scale: f64) -> Result<()> {
    const CONTEXTS: usize = 8;
    const REPLICATES: u32 = 3;
    let catalog = Arc::new(Catalog::built_in());
    let conditions = apex::core::parse_conditions(
        "[[condition]]\nslug = \"sonnet45\"\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-4-5\"\nmax_tokens = 2048\n",
    )?;
    let config = SimulatorConfig {
        api_key: Some("sk-bench".into()),
        time_scale: scale,
        output_tokens: 2048,
        limits: vec![(
            ProviderKind::Anthropic,
            "claude-sonnet-4-5".into(),
            SimLimits {
                rpm: Some(4_000),
                itpm: Some(2_000_000),
                otpm: Some(400_000),
                tpm: None,
            },
        )],
        ..SimulatorConfig::default()
    };
    let (base, per_input) = (config.base_latency, config.per_input_token);
    let sim = Simulator::start(config, "127.0.0.1:0".parse()?).await?;
    let dir = std::env::temp_dir().join(format!("apex-pacing-bench-{}-first", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(SqliteStore::open(&dir.join("ledger.db"))?);
    store.register_conditions(&conditions).await?;
    for i in 0..CONTEXTS {
        // About 128,000 tokens: 11 tokens a sentence.
        store.ingest_packages(&[case_file(i, 11_600)?]).await?;
    }
    let (run_id, _) = plan_and_record(
        &*store,
        conditions.clone(),
        REPLICATES,
        serde_json::json!({"bench": "pacing", "row": "first-token"}),
    )
    .await?;
    let providers = HashMap::from([(
        ProviderKind::Anthropic,
        apex_providers::build(
            ProviderKind::Anthropic,
            sim.provider_config(ProviderKind::Anthropic),
        )?,
    )]);
    let executor = executor(store.clone(), providers, &catalog, scale);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    executor.execute(&run_id, false, rx).await?;
    let requests = sim.requests();
    anyhow::ensure!(
        requests.iter().filter(|r| r.status == 200).count() == CONTEXTS * REPLICATES as usize,
        "first-token: not one answer per generation"
    );
    // Generations are numbered context by context, replicates together.
    let mut contexts: Vec<Vec<_>> = vec![Vec::new(); CONTEXTS];
    for r in requests.iter().filter(|r| r.status == 200) {
        let generation: usize = r
            .trace
            .as_deref()
            .and_then(|t| t.split('/').nth(1))
            .context("a trace")?
            .parse()?;
        contexts[(generation - 1) / REPLICATES as usize].push(r);
    }
    let mut ratios = Vec::new();
    for group in &contexts {
        let leader = group
            .iter()
            .find(|r| r.cache_write_tokens > 0)
            .context("a leader writes the cache")?;
        let followers: Vec<_> = group.iter().filter(|r| r.cache_read_tokens > 0).collect();
        anyhow::ensure!(
            followers.len() == REPLICATES as usize - 1,
            "first-token: every follower reads the cache"
        );
        let start = leader.arrived;
        let end = group.iter().map(|r| r.answered).max().unwrap_or_default();
        let first_token = base + per_input.mul_f64(leader.charged[1] as f64);
        let follower = followers
            .iter()
            .map(|r| (r.answered - r.arrived).as_secs_f64())
            .sum::<f64>()
            / followers.len() as f64
            / scale;
        ratios.push(((end - start).as_secs_f64() / scale) / (first_token.as_secs_f64() + follower));
    }
    let first = ratios.remove(0);
    ratios.sort_by(f64::total_cmp);
    println!(
        "first-token: {CONTEXTS} contexts of ~128,000 tokens x {REPLICATES}, 2,048 output tokens; wall per context / (leader's first token + a follower's latency): median {:.3}, worst {:.3} (the model's first context, which teaches the limits: {first:.3})",
        ratios[ratios.len() / 2],
        ratios.last().copied().unwrap_or_default(),
    );
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
