//! `apex run` with this month's conditions: the Responses API, streams,
//! thinking, the new cache controls and the refusals of preflight, end to
//! end against the simulator.

use apex_providers::simulator::{Fault, SimulatorConfig};

use crate::live::Live;
use crate::{Sandbox, examples, ok, run_id_from, stderr, stdout};

const CURRENT: &str = "conditions-2026-11.toml";

async fn live() -> Live {
    let live = Live::with(SimulatorConfig::default()).await;
    ok(live
        .apex(&[
            "conditions",
            "register",
            examples().join(CURRENT).to_str().unwrap(),
        ])
        .await);
    live
}

/// The seed's audition on this month's models: every generation succeeds,
/// followers read the leader's cache on every API (explicit breakpoints on
/// OpenAI, whose writes are billed), Opus 5.5's thinking is counted, and
/// the Responses condition really went to /v1/responses with store false.
#[tokio::test]
async fn this_months_conditions_run_with_their_caches_and_thinking() {
    let live = live().await;
    let out = live
        .apex(&[
            "run",
            "--time-scale",
            "0.01",
            "--replicates",
            "3",
            "--condition-slug",
            "cur-gpt62sol",
            "--condition-slug",
            "cur-gpt6luna",
            "--condition-slug",
            "cur-sonnet55",
            "--condition-slug",
            "cur-opus55",
        ])
        .await;
    let text = ok(out);
    let run_id = run_id_from(&text);
    let rows = live
        .column(&format!(
            "SELECT condition_slug || '|' || COUNT(*) || '|' || SUM(status = 'success') || '|' ||
                    SUM(cache_write_tokens > 0) || '|' || SUM(cache_hit) || '|' || SUM(reasoning_tokens > 0) AS r
             FROM apex_audition.generations WHERE run_id = '{run_id}'
             GROUP BY condition_slug ORDER BY condition_slug"
        ))
        .await;
    // OpenAI: 3 contexts, each a leader writing (billed) and 2 followers
    // reading; both OpenAI models reason. The example contexts are below
    // Claude 5.x's cache minimum, so the Anthropic conditions cache nothing
    // (as the real API would); Opus 5.5 thinks, Sonnet 5.5 was told not to.
    assert_eq!(
        rows,
        vec![
            "cur-gpt62sol|9|9|3|6|9",
            "cur-gpt6luna|9|9|3|6|0",
            "cur-opus55|9|9|0|0|9",
            "cur-sonnet55|9|9|0|0|0",
        ]
    );
    let responses: Vec<_> = live
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.model == "gpt-6.2-sol")
        .collect();
    assert_eq!(responses.len(), 9);
    assert!(responses.iter().all(|r| {
        r.body.get("input").is_some()
            && r.body["store"] == serde_json::json!(false)
            && r.body["reasoning"]["effort"] == "low"
    }));
    // Cost: billed writes and reads priced per the catalog, reasoning as output.
    let cost = ok(live.apex(&["cost", &run_id]).await);
    assert!(cost.contains("cur-gpt62sol"), "{cost}");
    // The parameters beyond the common columns are listed, read back whole.
    let list = ok(live.apex(&["conditions", "list"]).await);
    assert!(
        list.lines()
            .any(|l| l.starts_with("cur-gpt62sol") && l.contains("api=responses")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("cur-sonnet55") && l.contains("thinking=disabled")),
        "{list}"
    );
}

/// A stream that stalls is abandoned after --stream-idle-timeout (scaled)
/// and retried; one cut before its end is retried too; the run ends with
/// whole answers and the failures in `attempts`.
#[tokio::test]
async fn stalled_and_cut_streams_are_retried_by_the_run() {
    let live = live().await;
    live.sim.push_fault(Some("claude-sonnet-5-5"), Fault::Stall);
    live.sim.push_fault(Some("claude-sonnet-5-5"), Fault::Cut);
    let sb = Sandbox::new();
    let conditions = sb.dir.path().join("streamed.toml");
    std::fs::write(
        &conditions,
        "[[condition]]\nslug = \"s55-stream\"\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-5-5\"\nthinking = \"disabled\"\nstream = true\nmax_tokens = 1024\n",
    )
    .unwrap();
    ok(live
        .apex(&["conditions", "register", conditions.to_str().unwrap()])
        .await);
    let out = live
        .run_one("s55-stream", &["--stream-idle-timeout", "10"])
        .await;
    let text = ok(out);
    let run_id = run_id_from(&text);
    let rows = live
        .column(&format!(
            "SELECT a.attempt || '|' || COALESCE(a.error_class, a.outcome) AS r FROM apex_audition.attempts a
             JOIN apex_audition.generations g ON g.generation_id = a.generation_id
             WHERE g.run_id = '{run_id}' ORDER BY a.attempt"
        ))
        .await;
    assert_eq!(
        rows,
        vec!["1|timeout", "2|transport", "3|success"],
        "{text}"
    );
    // The whole answer: 200 tokens of whole sentences (about 4 bytes
    // each), not a cut one.
    let status = live
        .column(&format!(
            "SELECT status || '|' || length(response_text) AS r FROM apex_audition.generations WHERE run_id = '{run_id}'"
        ))
        .await;
    let (state, length) = status[0].split_once('|').unwrap();
    let length: usize = length.parse().unwrap();
    assert_eq!(state, "success", "{status:?}");
    assert!((400..=800).contains(&length), "{status:?}");
}

/// Preflight refuses, before anything is recorded or sent, what today's
/// models reject, with the fix; a retired model needs --allow-retired.
#[tokio::test]
async fn preflight_refuses_what_the_model_rejects() {
    let live = live().await;
    let sb = Sandbox::new();
    let file = sb.dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[condition]]\nslug = \"s55-hot\"\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-5-5\"\ntemperature = 0.7\nmax_tokens = 1024\n\n\
         [[condition]]\nslug = \"sol-none\"\nprovider = \"openai\"\nmodel = \"gpt-6.2-sol\"\nreasoning_effort = \"none\"\nmax_tokens = 1024\n",
    )
    .unwrap();
    ok(live
        .apex(&["conditions", "register", file.to_str().unwrap()])
        .await);
    for (slug, needle) in [
        ("s55-hot", "remove `temperature`"),
        ("sol-none", "does not accept reasoning_effort `none`"),
        ("prod-opus41", "--allow-retired"),
    ] {
        let out = live
            .apex(&[
                "run",
                "--time-scale",
                "0.01",
                "--limit",
                "1",
                "--condition-slug",
                slug,
            ])
            .await;
        assert_eq!(out.status.code(), Some(3), "{slug}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(needle), "{slug}: {err}");
        assert_eq!(
            err.trim().lines().filter(|l| l.contains("error")).count(),
            1,
            "{err}"
        );
    }
    assert!(live.sim.requests().is_empty(), "nothing was sent");
    let runs = ok(live.apex(&["runs"]).await);
    assert!(runs.contains("(0 rows)"), "nothing was recorded: {runs}");
    // With --allow-retired the retired model is tried (the simulator still
    // serves it; the real API answers 404, which stops the condition).
    let out = live.run_one("prod-opus41", &["--allow-retired"]).await;
    assert!(
        stderr(&out).contains("was retired on 2026-08-05"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("success"), "{}", stdout(&out));
}

/// `apex models`: the catalog with each model's status today.
#[test]
fn models_lists_the_catalog_with_status() {
    use apex::core::catalog::Status;
    let sb = Sandbox::new();
    let out = ok(sb.apex(&["models"]));
    let all = ok(sb.apex(&["models", "--all"]));
    // What each model's row says is today's status by the catalog's own
    // dates (a model retiring tomorrow moves on its own, so the test does
    // not depend on the day it runs).
    let today = jiff::Timestamp::now().strftime("%Y-%m-%d").to_string();
    let row = |table: &str, id: &str| {
        table
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .skip(1)
                    .take_while(|w| {
                        w.ends_with(',')
                            || !w
                                .chars()
                                .all(|c| c.is_ascii_digit() || c == 'K' || c == 'M' || c == '.')
                    })
                    .any(|w| w.trim_end_matches(',') == id)
            })
            .map(str::to_owned)
    };
    let catalog = apex::core::Catalog::built_in();
    let mut seen = [false; 3];
    for model in catalog.models() {
        let id = &model.ids[0];
        let status = model.status(&today);
        let listed = row(&all, id).unwrap_or_else(|| panic!("{id} missing from --all: {all}"));
        assert!(listed.contains(status.as_str()), "{id}: {listed}");
        match status {
            Status::Retired => {
                seen[2] = true;
                assert!(row(&out, id).is_none(), "retired {id} listed without --all");
                assert!(listed.contains("retired on 20"), "{listed}");
            }
            Status::Deprecated => {
                seen[1] = true;
                assert!(row(&out, id).is_some(), "{id}");
            }
            Status::Current => {
                seen[0] = true;
                assert!(row(&out, id).is_some(), "{id}");
            }
        }
    }
    assert!(seen[0] && seen[2], "a current and a retired model at least");
    assert!(out.contains("1.05M"), "{out}");
    let anthropic = ok(sb.apex(&["models", "--all", "--provider", "anthropic"]));
    assert!(anthropic.contains("claude-opus-4-1"), "{anthropic}");
    assert!(!anthropic.contains("gpt-"), "{anthropic}");
    let out = sb.apex(&["models", "--provider", "gemini"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("use openai or anthropic"));
}
