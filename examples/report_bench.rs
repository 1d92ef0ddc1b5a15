//! A large ledger for the report benchmark: conditions × contexts ×
//! replicates answered at once in process, each answer `OUTPUT_TOKENS`
//! tokens of plausible text (four bytes each), so `apex report` can be
//! timed on tens of thousands of generations (`scripts/report_bench.sh`).
//!
//! ```text
//! cargo run --release --example report_bench -- DIR [CONTEXTS] [REPLICATES] [OUTPUT_TOKENS]
//! cargo run --release --example report_bench -- /tmp/big 1250 10 2000   # 4 x 1,250 x 10 = 50,000
//! ```
//!
//! Leaves `DIR/ledger.db` and prints the run id.

#[path = "support/runs.rs"]
#[allow(dead_code)]
mod runs;
use runs::plan_and_record;
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use apex::core::executor::{Executor, NoProgress, RunOptions};
use apex::core::limiter::LimitTable;
use apex::core::testing::InstantProvider;
use apex::core::{
    AttemptError, Catalog, Condition, ContextPackage, Generated, GenerationRequest, Provider,
    ProviderKind, RequestPreview, Store,
};
use apex::providers::simulator::sample::case_file;
use apex::store::SqliteStore;

/// Answers at once, with text of the asked length.
#[derive(Debug)]
struct Talkative {
    inner: InstantProvider,
    bytes: usize,
    answered: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Provider for Talkative {
    fn kind(&self) -> ProviderKind {
        self.inner.kind()
    }

    fn preview(&self, request: &GenerationRequest) -> RequestPreview {
        self.inner.preview(request)
    }

    async fn generate(&self, request: &GenerationRequest) -> Result<Generated, AttemptError> {
        let mut generated = self.inner.generate(request).await?;
        let seed = self
            .answered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        generated.text = case_file(seed % 997, self.bytes);
        generated.usage.output_tokens = (self.bytes / 4) as u64;
        Ok(generated)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(
        args.next()
            .context("usage: report_bench DIR [CONTEXTS] [REPLICATES] [OUTPUT_TOKENS]")?,
    );
    let contexts: usize = args
        .next()
        .map_or(Ok(1250), |a| a.parse())
        .context("CONTEXTS")?;
    let replicates: u32 = args
        .next()
        .map_or(Ok(10), |a| a.parse())
        .context("REPLICATES")?;
    let output: usize = args
        .next()
        .map_or(Ok(2000), |a| a.parse())
        .context("OUTPUT_TOKENS")?;
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(SqliteStore::open(&dir.join("ledger.db"))?);
    let conditions: Vec<Condition> = ["sonnet-a", "sonnet-b", "sonnet-c", "sonnet-d"]
        .iter()
        .map(|slug| Condition {
            slug: (*slug).into(),
            provider: ProviderKind::Anthropic,
            model: "claude-sonnet-4-5".into(),
            temperature: Some(0.7),
            top_p: None,
            max_tokens: 4096,
            reasoning_effort: None,
            api: Default::default(),
            thinking: None,
            thinking_budget: None,
            stream: false,
            store: None,
        })
        .collect();
    store.register_conditions(&conditions).await?;
    for chunk in (0..contexts).collect::<Vec<_>>().chunks(64) {
        let packages = chunk
            .iter()
            .map(|i| {
                ContextPackage::new(
                    format!("ctx-{i:05}"),
                    None,
                    case_file(*i, 4_000),
                    "Summarise.".into(),
                )
            })
            .collect::<apex::core::Result<Vec<_>>>()?;
        store.ingest_packages(&packages).await?;
    }
    let (run_id, plan) =
        plan_and_record(&*store, conditions, replicates, serde_json::json!({})).await?;
    let provider: Arc<dyn Provider> = Arc::new(Talkative {
        inner: InstantProvider::new(ProviderKind::Anthropic, output as u64),
        bytes: output * 4,
        answered: Default::default(),
    });
    let providers = HashMap::from([(ProviderKind::Anthropic, provider)]);
    let executor = Executor::new(
        store.clone() as Arc<dyn Store>,
        providers,
        Arc::new(Catalog::built_in()),
        RunOptions {
            concurrency: 64,
            limits: LimitTable::none(),
            ..RunOptions::default()
        },
        Arc::new(NoProgress),
    );
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let report = executor.execute(&run_id, false, rx).await?;
    anyhow::ensure!(
        report.counts.success == plan.cell_count() as u64,
        "not every generation succeeded"
    );
    println!("{run_id}");
    Ok(())
}
