//! Apex as a library: a small run against the built-in simulator, printed
//! as it runs, once synchronously and once through the providers' Batch
//! APIs (at half the price), by the same call. `cargo run --example embed`
use apex::core::executor::{ProgressEvent, RunOptions};
use apex::core::{ContextPackage, ProviderKind::*, parse_conditions};
use apex::providers::simulator::{Simulator, SimulatorConfig};
use apex::{Apex, RunSpec};

const CONDITIONS: &str = r#"
[[condition]]
slug = "sonnet"
provider = "anthropic"
model = "claude-sonnet-5-5"
thinking = "disabled"
max_tokens = 256

[[condition]]
slug = "gpt"
provider = "openai"
model = "gpt-6-luna"
reasoning_effort = "none"
max_tokens = 256
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Both APIs, simulated on loopback at 100× real time.
    let config = SimulatorConfig {
        time_scale: 0.01,
        batch_time: std::time::Duration::from_secs(120),
        ..Default::default()
    };
    let sim = Simulator::start(config, "127.0.0.1:0".parse()?).await?;
    let apex = Apex::open("sqlite::memory:")
        .await?
        .with_provider(OpenAi, sim.provider_config(OpenAi))
        .with_provider(Anthropic, sim.provider_config(Anthropic));
    apex.register(&parse_conditions(CONDITIONS)?).await?;
    for i in 1..=3 {
        let text = format!("Document {i}. ").repeat(900);
        apex.ingest(&[ContextPackage::new(
            format!("ctx-{i}"),
            None,
            text,
            "Summarise it.".into(),
        )?])
        .await?;
    }
    let progress = apex::progress(|event| {
        if let ProgressEvent::Finished {
            condition,
            cache_hit,
            ..
        } = event
        {
            println!("{condition}: done, cache hit {cache_hit}");
        }
    });
    let spec = RunSpec::new(["sonnet", "gpt"]).replicates(3);
    for batch in [false, true] {
        let options = RunOptions {
            time_scale: 0.01,
            batch,
            ..Default::default()
        };
        // No stop will come: the sender is dropped.
        let (_, stop) = tokio::sync::watch::channel(false);
        let (run_id, report) = apex.run(&spec, options, progress.clone(), stop).await?;
        let cost = apex.store().run(&run_id).await?.cost_usd;
        println!(
            "{} run {run_id}: {} succeeded, {} failed, ${cost:.4}",
            if batch { "batch" } else { "synchronous" },
            report.counts.success,
            report.counts.error
        );
    }
    Ok(())
}
