//! Throughput and memory of a whole run against an instant in-process
//! provider, with the SQLite ledger in a temporary file.
//!
//! ```text
//! cargo run --release --example bench_inprocess -- [CONTEXTS] [REPLICATES] [CONTEXT_TOKENS]
//! cargo run --release --example bench_inprocess -- 1000 10 1000      # 10,000 generations
//! cargo run --release --example bench_inprocess -- 20 1 128000       # memory: R = 1 ...
//! cargo run --release --example bench_inprocess -- 20 30 128000      # ... against R = 30
//! ```
//!
//! Prints generations per second (execution only: planning and ingest are
//! timed apart) and the process's peak resident memory (VmHWM).

#[path = "support/runs.rs"]
#[allow(dead_code)]
mod runs;
use runs::plan_and_record;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use apex::core::executor::{Executor, NoProgress, RunOptions};
use apex::core::limiter::LimitTable;
use apex::core::testing::InstantProvider;
use apex::core::{Catalog, Condition, ContextPackage, Provider, ProviderKind, Store};
use apex::store::SqliteStore;

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let contexts: usize = args
        .next()
        .map_or(Ok(1000), |a| a.parse())
        .context("CONTEXTS")?;
    let replicates: u32 = args
        .next()
        .map_or(Ok(10), |a| a.parse())
        .context("REPLICATES")?;
    let tokens: usize = args
        .next()
        .map_or(Ok(1000), |a| a.parse())
        .context("CONTEXT_TOKENS")?;

    let dir = std::env::temp_dir().join(format!("apex-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(SqliteStore::open(&dir.join("ledger.db"))?);
    let condition = Condition {
        slug: "bench".into(),
        provider: ProviderKind::Anthropic,
        model: "claude-sonnet-4-5".into(),
        temperature: Some(0.7),
        top_p: None,
        max_tokens: 256,
        reasoning_effort: None,
        api: Default::default(),
        thinking: None,
        thinking_budget: None,
        stream: false,
        store: None,
    };
    store
        .register_conditions(std::slice::from_ref(&condition))
        .await?;
    let started = Instant::now();
    // Ingest in slices, so the texts are not all held at once.
    for chunk in (0..contexts).collect::<Vec<_>>().chunks(16) {
        let packages = chunk
            .iter()
            .map(|i| {
                ContextPackage::new(
                    format!("ctx-{i:05}"),
                    None,
                    format!("{i:05} word ").repeat(tokens * 4 / 11 + 1),
                    "Summarise.".into(),
                )
            })
            .collect::<apex::core::Result<Vec<_>>>()?;
        store.ingest_packages(&packages).await?;
    }
    let (run_id, _) =
        plan_and_record(&*store, vec![condition], replicates, serde_json::json!({})).await?;
    let setup = started.elapsed();

    let provider = Arc::new(InstantProvider::new(ProviderKind::Anthropic, 100));
    let mut providers: HashMap<ProviderKind, Arc<dyn Provider>> = HashMap::new();
    providers.insert(ProviderKind::Anthropic, provider.clone());
    let options = RunOptions {
        concurrency: 64,
        limits: LimitTable::none(),
        ..RunOptions::default()
    };
    let executor = Executor::new(
        store.clone() as Arc<dyn Store>,
        providers,
        Arc::new(Catalog::built_in()),
        options,
        Arc::new(NoProgress),
    );
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let report = executor.execute(&run_id, false, rx).await?;
    let elapsed = started.elapsed();
    let n = report.counts.success;
    println!(
        "{contexts} contexts x {replicates} replicates ({tokens} tokens each): {n} generations in {:.2} s = {:.0} generations/s (setup {:.2} s), peak RSS {:.1} MiB",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        setup.as_secs_f64(),
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    anyhow::ensure!(
        n == (contexts as u64) * u64::from(replicates) && provider.calls() == n,
        "not every generation succeeded once"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
