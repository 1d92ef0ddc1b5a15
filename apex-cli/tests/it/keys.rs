//! Keys stay with their host: a base URL that redirects elsewhere ends the
//! run with a clear error and hands the generation back for a resume; the
//! second origin never hears a credential. Plain http off loopback is
//! refused before anything is recorded, unless the user opts in.

use apex_providers::simulator::{Simulator, SimulatorConfig};

use crate::live::{Live, args};
use crate::{ok, run_id_from, stderr, stdout};

/// A simulator on a second loopback address (another origin), where the
/// machine has one.
async fn second_origin() -> Simulator {
    let host = if std::net::TcpListener::bind("127.0.0.2:0").is_ok() {
        "127.0.0.2"
    } else {
        "127.0.0.1"
    };
    Simulator::start(
        SimulatorConfig {
            time_scale: 0.01,
            ..Default::default()
        },
        format!("{host}:0").parse().unwrap(),
    )
    .await
    .unwrap()
}

/// A simulator that redirects every request to `to`.
async fn redirecting_to(to: &Simulator) -> Simulator {
    Simulator::start(
        SimulatorConfig {
            redirect_to: Some(to.anthropic_base_url()),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

fn with(
    env: Vec<(&'static str, String)>,
    var: &'static str,
    value: String,
) -> Vec<(&'static str, String)> {
    env.into_iter()
        .filter(|(k, _)| *k != var)
        .chain([(var, value)])
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_stops_the_condition_and_the_key_stays_home() {
    let live = Live::new().await;
    let second = second_origin().await;
    let proxy = redirecting_to(&second).await;
    for (slug, var, base, batch) in [
        (
            "prod-sonnet45",
            "ANTHROPIC_BASE_URL",
            proxy.anthropic_base_url(),
            false,
        ),
        (
            "prod-gpt4o",
            "OPENAI_BASE_URL",
            proxy.openai_base_url(),
            false,
        ),
        (
            "prod-sonnet45",
            "ANTHROPIC_BASE_URL",
            proxy.anthropic_base_url(),
            true,
        ),
        (
            "prod-gpt4o",
            "OPENAI_BASE_URL",
            proxy.openai_base_url(),
            true,
        ),
    ] {
        let env = with(live.env(), var, base.clone());
        let mut argv = args(&[
            "--condition-slug",
            slug,
            "--limit",
            "1",
            "--replicates",
            "2",
        ]);
        if batch {
            argv.push("--batch");
        }
        let out = live.apex_env(&argv, env).await;
        let what = format!("{slug} batch={batch}");
        assert_eq!(out.status.code(), Some(6), "{what}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("redirects (HTTP 307) to") && err.contains(&format!("set {var} to")),
            "{what}: {err}"
        );
        assert!(!err.contains("sk-"), "{what}: {err}");
        let run_id = run_id_from(&stdout(&out));
        // Nothing stored as success or error: both cells wait for a resume.
        let statuses = live
            .column(&format!(
                "SELECT status FROM apex_audition.generations WHERE run_id = '{run_id}'"
            ))
            .await;
        assert_eq!(statuses, vec!["pending", "pending"], "{what}");
        if !batch {
            let classes = live
                .column(&format!(
                    "SELECT a.error_class FROM apex_audition.attempts a JOIN apex_audition.generations g USING (generation_id) WHERE g.run_id = '{run_id}'"
                ))
                .await;
            assert_eq!(
                classes,
                vec!["redirected"],
                "{what}: one request, not retried"
            );
        }
        // Once the URL is fixed, a plain resume finishes the run.
        let out = live.apex(&args(&["--resume", &run_id])).await;
        ok(out);
        let statuses = live
            .column(&format!(
                "SELECT status FROM apex_audition.generations WHERE run_id = '{run_id}'"
            ))
            .await;
        assert_eq!(statuses, vec!["success", "success"], "{what}");
    }
    assert!(!proxy.arrivals().is_empty(), "the proxy was asked");
    assert!(
        second.arrivals().is_empty(),
        "a request reached the second origin: {:?}",
        second.arrivals()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clear_text_to_another_host_is_refused_unless_allowed() {
    let live = Live::new().await;
    let before = live.sb.dump();
    let env = with(
        live.env(),
        "ANTHROPIC_BASE_URL",
        "http://api.anthropic.example:80".to_owned(),
    );
    let argv = args(&["--condition-slug", "prod-sonnet45", "--limit", "1"]);
    let out = live.apex_env(&argv, env.clone()).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("ANTHROPIC_BASE_URL")
            && err.contains("clear text")
            && err.contains("APEX_ALLOW_INSECURE_HTTP=1"),
        "{err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one line: {err}");
    assert_eq!(live.sb.dump(), before, "nothing recorded");
    // Opted in, the same URL passes preflight (a dry run sends nothing).
    let mut argv = argv.clone();
    argv.push("--dry-run");
    let allowed = with(env, "APEX_ALLOW_INSECURE_HTTP", "1".to_owned());
    let out = live.apex_env(&argv, allowed).await;
    let printed = ok(out);
    assert!(printed.contains("nothing sent"), "{printed}");
}
