//! Several `apex` processes on one run, and the PostgreSQL ledger through
//! the command line.

use std::collections::HashMap;

use apex_providers::simulator::SimulatorConfig;

use crate::live::{Live, args};
use crate::{Sandbox, fresh_postgres_database, generation_of, ok, run_id_from, stderr};

/// Three processes resume one planned run at once: every generation ends
/// `success` exactly once and was sent exactly once.
async fn three_processes(sb: Sandbox) {
    let live = Live::on(
        sb,
        SimulatorConfig {
            base_latency: std::time::Duration::from_secs(2),
            ..SimulatorConfig::default()
        },
    )
    .await;
    let planned = ok(live
        .apex(&[
            "run",
            "--allow-retired",
            "--condition-slug",
            "prod-sonnet45",
            "--condition-slug",
            "prod-gpt4o",
            "--condition-slug",
            "prod-opus41",
            "--replicates",
            "3",
            "--dry-run",
        ])
        .await);
    let run_id = run_id_from(&planned);
    let children: Vec<_> = (0..3)
        .map(|_| {
            live.spawn(&args(&[
                "--resume",
                &run_id,
                "--concurrency",
                "2",
                "--workers",
                "3",
                // Generous on a loaded machine: no process is presumed dead.
                "--claim-timeout",
                "600",
            ]))
        })
        .collect();
    let outputs = Live::outputs(children).await;
    for o in &outputs {
        assert!(
            o.status.success(),
            "a worker failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let rows = live.column(&format!("SELECT status || ' ' || COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' GROUP BY status")).await;
    assert_eq!(rows, vec!["success 27"]);
    let attempts = live.column(&format!("SELECT COUNT(*) FROM apex_audition.attempts a JOIN apex_audition.generations g USING (generation_id) WHERE g.run_id = '{run_id}'")).await;
    assert_eq!(attempts, vec!["27"], "one attempt per generation");
    let mut sent: HashMap<i64, usize> = HashMap::new();
    for r in live.sim.requests() {
        *sent.entry(generation_of(&r)).or_default() += 1;
    }
    assert_eq!(sent.len(), 27);
    assert!(
        sent.values().all(|n| *n == 1),
        "a generation was sent twice: {sent:?}"
    );
    let state = live
        .column(&format!(
            "SELECT state FROM apex_audition.runs WHERE run_id = '{run_id}'"
        ))
        .await;
    assert_eq!(state, vec!["finished"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_processes_share_one_run_on_sqlite() {
    three_processes(Sandbox::new()).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(pg_tests),
    ignore = "no PostgreSQL server: run scripts/test.sh, which starts one (or set APEX_TEST_PG=1 and APEX_TEST_PG_URL)"
)]
async fn three_processes_share_one_run_on_postgres() {
    three_processes(Sandbox::with_url(fresh_postgres_database().await)).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(pg_tests),
    ignore = "no PostgreSQL server: run scripts/test.sh, which starts one (or set APEX_TEST_PG=1 and APEX_TEST_PG_URL)"
)]
async fn postgres_ledger_through_the_cli_and_psql() {
    let url = fresh_postgres_database().await;
    let live = Live::on(Sandbox::with_url(url.clone()), SimulatorConfig::default()).await;
    let out = ok(live
        .apex(&args(&[
            "--condition-slug",
            "prod-sonnet45",
            "--replicates",
            "3",
        ]))
        .await);
    let run_id = run_id_from(&out);
    // The seed's SQL, verbatim, through apex sql and through psql.
    let seed = format!(
        "SELECT\n  status,\n  COUNT(*) as count,\n  COUNT(*) FILTER (WHERE cache_hit) as cache_hits\nFROM apex_audition.generations\nWHERE run_id = '{run_id}'\nGROUP BY status;"
    );
    let via_apex = ok(live.apex(&["sql", &seed]).await);
    assert!(via_apex.contains("success  9      6"), "{via_apex}");
    let psql = std::process::Command::new("psql")
        .args([url.as_str(), "-XAt", "-F", " ", "-c", &seed])
        .output()
        .unwrap();
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), "success 9 6");
    let refused = live
        .apex(&["sql", "DELETE FROM apex_audition.generations"])
        .await;
    assert_eq!(refused.status.code(), Some(3));

    // A ledger from a newer apex is refused with a one-line error.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute("INSERT INTO apex_audition.schema_migrations VALUES (99, 'future', 'x')")
        .await
        .unwrap();
    let out = live.apex(&["runs"]).await;
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).contains("schema is version 99"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).trim().lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(pg_tests),
    ignore = "no PostgreSQL server: run scripts/test.sh, which starts one (or set APEX_TEST_PG=1 and APEX_TEST_PG_URL)"
)]
async fn postgres_connection_errors_are_one_line_with_the_fix() {
    let base = std::env::var("APEX_TEST_PG_URL").unwrap();
    let wrong_password = match base
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
    {
        Some((userinfo, host)) => format!(
            "postgres://{}:wrong-password@{host}",
            userinfo.split(':').next().unwrap()
        ),
        None => panic!("APEX_TEST_PG_URL has no credentials"),
    };
    let (prefix, _) = base.rsplit_once('/').unwrap();
    for (url, needle) in [
        (
            "postgres://apex:secret@127.0.0.1:1/apex".to_owned(),
            "check that the server is running",
        ),
        (wrong_password.clone(), "check the user and password"),
        (
            format!("{prefix}/no_such_database"),
            "create the database first",
        ),
    ] {
        let sb = Sandbox::with_url(url.clone());
        let out = sb.apex(&["runs"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{url}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{url}: {err}");
        assert!(
            !err.contains("secret") && !err.contains("wrong-password"),
            "a password leaked: {err}"
        );
    }
}
