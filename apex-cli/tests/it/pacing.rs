//! Pacing against servers that count and replenish differently from Apex:
//! limits learned from the headers (none in a file), no 429 after each
//! model's first request, no generation lost to pacing.

use std::process::Output;

use apex_core::ProviderKind;
use apex_providers::simulator::{
    Fault, LimitRules, Replenish, SimLimits, SimulatorConfig, TokenCount,
};

use crate::live::Live;
use crate::{Sandbox, ok, run_id_from, stderr};

/// The time scale of these runs: a minute is 6 s. Apex keeps each request
/// 1 s (here 100 ms) longer than the server does, for the lag between
/// sending and arriving; on a loaded two-core machine that lag has been
/// seen above 40 ms, more than the 10 ms of the usual 0.01.
const TIME_SCALE: &str = "0.1";

/// Limits no tier table has, so that pacing at them shows they were learned.
fn custom_limits() -> Vec<(ProviderKind, String, SimLimits)> {
    vec![
        (
            ProviderKind::OpenAi,
            "gpt-4o".into(),
            SimLimits {
                rpm: Some(61),
                tpm: Some(200_003),
                ..SimLimits::default()
            },
        ),
        (
            ProviderKind::Anthropic,
            "claude-sonnet-4-5".into(),
            SimLimits {
                rpm: Some(59),
                itpm: Some(80_007),
                otpm: Some(8_009),
                tpm: None,
            },
        ),
    ]
}

/// Four contexts of about 25,000 tokens, so that a few requests fill a
/// minute's token limit (each model's twelve requests take two or more).
fn write_contexts(sb: &Sandbox) -> String {
    let root = sb.path("big");
    for c in 1..=4 {
        let dir = root.join(format!("big-{c:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = format!("# Ledger {c}\n\n");
        for line in 0..1100 {
            text.push_str(&format!(
                "Entry {line} of ledger {c}: the harbour crew logged {} crates and {} barrels at dock {}.\n",
                line * 7 % 113,
                line * 13 % 71,
                line % 9
            ));
        }
        std::fs::write(dir.join("context.md"), text).unwrap();
        std::fs::write(dir.join("prompt.md"), "Sum the crates of dock 3.\n").unwrap();
    }
    root.display().to_string()
}

struct Paced {
    live: Live,
    out: Output,
}

async fn paced_run(rules: LimitRules) -> Paced {
    let live = Live::on_scaled(
        Sandbox::new(),
        SimulatorConfig {
            limits: custom_limits(),
            openai_rules: rules,
            anthropic_rules: rules,
            ..SimulatorConfig::default()
        },
        TIME_SCALE.parse().unwrap(),
    )
    .await;
    let dir = write_contexts(&live.sb);
    ok(live.apex(&["ingest", &dir]).await);
    let out = live
        .apex(&[
            "run",
            "--allow-retired",
            "--time-scale",
            TIME_SCALE,
            "--condition-slug",
            "prod-gpt4o",
            "--condition-slug",
            "prod-sonnet45",
            "--replicates",
            "3",
            "--limit",
            "4",
        ])
        .await;
    Paced { live, out }
}

fn check(paced: Paced, mode: &str) {
    let log = stderr(&paced.out);
    let text = ok(paced.out);
    let run_id = run_id_from(&text);
    assert!(!run_id.is_empty());
    let requests = paced.live.sim.requests();
    let rejected = requests.iter().filter(|r| r.status == 429).count();
    if rejected > 0 {
        for r in &requests {
            eprintln!(
                "{:?} {} {} arr {:?} ans {:?} w {} r {}",
                r.provider,
                r.trace.as_deref().unwrap_or(""),
                r.status,
                r.arrived,
                r.answered,
                r.cache_write_tokens,
                r.cache_read_tokens
            );
        }
    }
    assert_eq!(rejected, 0, "{mode}: 429s\n{log}");
    assert_eq!(requests.len(), 24, "{mode}: one request per generation");
    assert!(requests.iter().all(|r| r.status == 200), "{mode}");
    for (model, limits) in [
        ("gpt-4o", "RPM 61, TPM 200003"),
        ("claude-sonnet-4-5", "RPM 59, ITPM 80007, OTPM 8009"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(model)
                    && l.contains(&format!("the server reports limits {limits}"))),
            "{mode}: learned limits of {model} not reported\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sliding_window_counting_differently_either_way() {
    for count in [
        TokenCount::Billed,
        TokenCount::Factor(1.3),
        TokenCount::Factor(0.7),
        TokenCount::Characters,
    ] {
        let rules = LimitRules {
            count,
            replenish: Replenish::SlidingWindow,
            round_remaining: false,
        };
        check(paced_run(rules).await, &format!("window, {count:?}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rounded_token_bucket_counting_differently_either_way() {
    for count in [
        TokenCount::Billed,
        TokenCount::Factor(1.3),
        TokenCount::Factor(0.7),
    ] {
        let rules = LimitRules {
            count,
            replenish: Replenish::TokenBucket,
            round_remaining: true,
        };
        check(paced_run(rules).await, &format!("bucket, {count:?}"));
    }
}

fn rate_limit_fault(retry_after: &str) -> Fault {
    Fault::anthropic(
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
    )
    .with_header("retry-after", retry_after)
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_waits_do_not_spend_the_retry_budget() {
    let live = Live::with(SimulatorConfig::default()).await;
    // Six 429s in a row, each with a wait, against a budget of one retry.
    for _ in 0..6 {
        live.sim.push_fault(None, rate_limit_fault("0"));
    }
    let out = live.run_one("prod-sonnet45", &["--max-retries", "1"]).await;
    let run_id = run_id_from(&ok(out));
    let attempts = live
        .column(&format!("SELECT attempts || ' ' || status FROM apex_audition.generations WHERE run_id = '{run_id}'"))
        .await;
    assert_eq!(attempts, vec!["7 success"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daily_limit_wait_ends_the_generation_naming_resume() {
    let live = Live::with(SimulatorConfig::default()).await;
    // A day (at time scale 0.01, 864 s), beyond the 15 minutes (9 s) Apex waits.
    live.sim.push_fault(None, rate_limit_fault("864"));
    let out = live.run_one("prod-sonnet45", &[]).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let run_id = run_id_from(&String::from_utf8_lossy(&out.stdout));
    let rows = live
        .column(&format!("SELECT attempts || ' ' || status || ' ' || error_message FROM apex_audition.generations WHERE run_id = '{run_id}'"))
        .await;
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0].starts_with("1 error ")
            && rows[0].contains("longer than the 9 s Apex waits out")
            && rows[0].contains("--resume"),
        "{rows:?}"
    );
}

/// Three processes on one run, no `--workers`, against servers that refill
/// continuously (buckets, Anthropic's figures rounded): each paces a model
/// by its share of that model's work, and together they never go over.
#[tokio::test(flavor = "multi_thread")]
async fn three_processes_share_the_limits_through_the_ledger() {
    let mut limits = custom_limits();
    // A third of each limit still fits the largest request.
    for (_, _, l) in &mut limits {
        l.tpm = l.tpm.map(|v| v * 2);
        l.itpm = l.itpm.map(|v| v * 3);
        l.otpm = l.otpm.map(|v| v * 3);
    }
    let live = Live::on_scaled(
        Sandbox::new(),
        SimulatorConfig {
            limits,
            openai_rules: LimitRules {
                replenish: Replenish::TokenBucket,
                ..LimitRules::of(ProviderKind::OpenAi)
            },
            anthropic_rules: LimitRules::of(ProviderKind::Anthropic),
            ..SimulatorConfig::default()
        },
        TIME_SCALE.parse().unwrap(),
    )
    .await;
    let dir = write_contexts(&live.sb);
    ok(live.apex(&["ingest", &dir]).await);
    let planned = ok(live
        .apex(&[
            "run",
            "--allow-retired",
            "--condition-slug",
            "prod-gpt4o",
            "--condition-slug",
            "prod-sonnet45",
            "--replicates",
            "3",
            "--limit",
            "4",
            "--dry-run",
        ])
        .await);
    let run_id = run_id_from(&planned);
    let children: Vec<_> = (0..3)
        .map(|_| {
            live.spawn(&[
                "run",
                "--allow-retired",
                "--time-scale",
                TIME_SCALE,
                "--resume",
                &run_id,
                "--concurrency",
                "4",
                "--claim-timeout",
                "600",
            ])
        })
        .collect();
    let outputs = Live::outputs(children).await;
    let logs: String = outputs.iter().map(stderr).collect();
    for o in &outputs {
        assert!(o.status.success(), "{}", stderr(o));
    }
    let requests = live.sim.requests();
    let rejected = requests.iter().filter(|r| r.status == 429).count();
    assert_eq!(rejected, 0, "429s\n{logs}");
    assert_eq!(requests.len(), 24, "one request per generation\n{logs}");
    let remaining = live
        .column(&format!(
            "SELECT COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' AND status <> 'success'"
        ))
        .await;
    assert_eq!(remaining, ["0"], "{logs}");
}
