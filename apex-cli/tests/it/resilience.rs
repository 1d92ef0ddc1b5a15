//! Nothing lost, nothing hung: garbled answers, timeouts, interrupted runs.

use apex_providers::simulator::{Fault, SimulatorConfig};

use crate::live::{Live, args};
use crate::{ok, run_id_from, stderr, stdout};

#[tokio::test(flavor = "multi_thread")]
async fn a_garbled_200_is_retried_like_a_dropped_connection() {
    for (slug, body) in [
        (
            "prod-gpt4o",
            r#"{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"#,
        ),
        ("prod-sonnet45", "<html>502 Bad Gateway</html>"),
    ] {
        let live = Live::with(SimulatorConfig::default()).await;
        live.sim.push_fault(
            None,
            Fault::Respond {
                status: 200,
                headers: Vec::new(),
                body: body.to_owned(),
            },
        );
        let out = ok(live
            .apex(&args(&[
                "--condition-slug",
                slug,
                "--limit",
                "1",
                "--replicates",
                "1",
            ]))
            .await);
        let run_id = run_id_from(&out);
        let rows = live
            .column(&format!(
                "SELECT attempts || '|' || status FROM apex_audition.generations WHERE run_id = '{run_id}'"
            ))
            .await;
        assert_eq!(rows, vec!["2|success"], "{slug}");
        let first = live
            .column(&format!(
                "SELECT a.outcome || '|' || a.error_class FROM apex_audition.attempts a
                 JOIN apex_audition.generations g USING (generation_id)
                 WHERE g.run_id = '{run_id}' AND a.attempt = 1"
            ))
            .await;
        assert_eq!(first, vec!["error|decode"], "{slug}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_ctrl_c_records_the_run_as_interrupted() {
    let live = Live::with(SimulatorConfig {
        // 6 s at the tests' time scale: still in flight at the second Ctrl-C.
        base_latency: std::time::Duration::from_secs(600),
        ..SimulatorConfig::default()
    })
    .await;
    let child = live.spawn(&args(&[
        "--condition-slug",
        "prod-sonnet45",
        "--replicates",
        "2",
    ]));
    live.wait_for("a request in flight", |l| l.count_in_file("running") > 0)
        .await;
    let pid = child.id().to_string();
    let interrupt = || {
        let status = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    interrupt();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    interrupt();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    let state = live
        .column(&format!(
            "SELECT state FROM apex_audition.runs WHERE run_id = '{run_id}'"
        ))
        .await;
    assert_eq!(state, vec!["interrupted"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_never_answers_times_out_and_is_retried() {
    // The simulator answers after 10 minutes of its time (6 s here); the
    // run allows 50 s (0.5 s here, at --time-scale 0.01).
    let live = Live::with(SimulatorConfig {
        base_latency: std::time::Duration::from_secs(600),
        ..SimulatorConfig::default()
    })
    .await;
    let started = std::time::Instant::now();
    let out = live
        .apex(&args(&[
            "--condition-slug",
            "prod-gpt4o",
            "--limit",
            "1",
            "--replicates",
            "1",
            "--max-retries",
            "1",
            "--request-timeout",
            "50",
        ]))
        .await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let run_id = run_id_from(&stdout(&out));
    let rows = live
        .column(&format!(
            "SELECT attempts || '|' || error_class FROM apex_audition.generations WHERE run_id = '{run_id}'"
        ))
        .await;
    assert_eq!(
        rows,
        vec!["2|timeout"],
        "retried once, then stored as error"
    );
    let bad = live
        .apex(&args(&[
            "--condition-slug",
            "prod-gpt4o",
            "--request-timeout",
            "0",
        ]))
        .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("--request-timeout"),
        "{}",
        stderr(&bad)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_restores_recorded_options_and_records_overrides() {
    let live = Live::with(SimulatorConfig::default()).await;
    // Planned (the tests run at --time-scale 0.01) with no retries.
    let out = ok(live
        .apex(&args(&[
            "--condition-slug",
            "prod-gpt4o",
            "--limit",
            "1",
            "--replicates",
            "1",
            "--max-retries",
            "0",
            "--dry-run",
        ]))
        .await);
    let run_id = run_id_from(&out);
    live.sim
        .push_fault(None, Fault::openai(500, "server_error", None, "boom"));
    // A bare resume keeps --max-retries 0: the transient failure is final.
    let out = live.apex(&["run", "--resume", &run_id]).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let rows = live
        .column(&format!(
            "SELECT attempts || '|' || error_class FROM apex_audition.generations WHERE run_id = '{run_id}'"
        ))
        .await;
    assert_eq!(rows, vec!["1|server_error"]);
    // A flag given to the resume overrides the recorded one, and is recorded.
    ok(live
        .apex(&[
            "run",
            "--resume",
            &run_id,
            "--retry-errors",
            "--max-retries",
            "2",
        ])
        .await);
    let flags = live
        .column(&format!(
            "SELECT flags_json FROM apex_audition.runs WHERE run_id = '{run_id}'"
        ))
        .await;
    let flags: serde_json::Value = serde_json::from_str(&flags[0]).unwrap();
    assert_eq!(flags["max_retries"], 2);
    assert_eq!(flags["time_scale"], 0.01);
    assert_eq!(flags["condition_slug"][0], "prod-gpt4o");
}
