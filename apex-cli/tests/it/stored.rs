//! What Apex finds in the ledger is checked, not trusted: claims of other
//! processes, hand-edited rows, and user-given durations at their extremes.

use crate::live::Live;
use crate::{examples, ok, run_id_from, stderr};
use apex_providers::simulator::SimulatorConfig;

/// A planned run of one condition (a dry run: nothing sent), by id.
async fn planned(live: &Live, extra: &[&str]) -> String {
    let mut args = vec![
        "run",
        "--allow-retired",
        "--condition-slug",
        "prod-sonnet45",
        "--replicates",
        "2",
        "--dry-run",
    ];
    args.extend_from_slice(extra);
    run_id_from(&ok(live.apex(&args).await))
}

fn ledger(live: &Live) -> rusqlite::Connection {
    rusqlite::Connection::open(live.sb.db_path()).unwrap()
}

/// Hands every generation of the run to `worker`, whose heartbeat is fresh.
fn claimed_by(live: &Live, run_id: &str, worker: &str) {
    let conn = ledger(live);
    let now = "9999-01-01T00:00:00.000Z";
    conn.execute(
        "UPDATE generations SET claimed_by = ?1, claimed_at = ?2 WHERE run_id = ?3",
        rusqlite::params![worker, now, run_id],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO workers (worker, run_id, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?3)",
        rusqlite::params![worker, run_id, now],
    )
    .unwrap();
}

fn all_succeeded(live: &Live) {
    assert!(live.count_in_file("success") > 0);
    for unfinished in ["pending", "running", "error"] {
        assert_eq!(live.count_in_file(unfinished), 0, "{unfinished}");
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// (hostname, boot id, pid namespace) of this machine and namespace.
fn here() -> (String, String, String) {
    let boot: String = read("/proc/sys/kernel/random/boot_id")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    let ns: String = std::fs::read_link("/proc/self/ns/pid")
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    (
        read("/proc/sys/kernel/hostname").trim().to_owned(),
        boot,
        ns,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_claimant_of_this_namespace_is_released_at_once_another_containers_is_not() {
    let (host, boot, ns) = here();
    if boot.is_empty() || ns.is_empty() {
        eprintln!("skipped: no /proc (not Linux)");
        return;
    }
    // A process of this very pid namespace that no longer runs (its pid is
    // above pid_max): its claims are taken back at once.
    let live = Live::with(SimulatorConfig::default()).await;
    let run_id = planned(&live, &[]).await;
    let dead = format!("apex-{host}-4194304-dead~{boot}.{ns}.1");
    claimed_by(&live, &run_id, &dead);
    // (Were the claim not released, the heartbeat would never lapse: the
    // timeout bounds the wait.)
    let out = live
        .apex(&["run", "--resume", &run_id, "--claim-timeout", "30"])
        .await;
    let log = stderr(&out);
    ok(out);
    assert!(log.contains("its process is gone"), "{log}");
    all_succeeded(&live);

    // The same hostname and pid, but another container (pid namespace): its
    // process may well be alive; only its lapsed heartbeat frees its claims.
    let live = Live::with(SimulatorConfig::default()).await;
    let run_id = planned(&live, &[]).await;
    let other = format!("apex-{host}-4194304-else~{boot}.1.1");
    claimed_by(&live, &run_id, &other);
    {
        let conn = ledger(&live);
        let stale = "2000-01-01T00:00:00.000Z";
        conn.execute(
            "UPDATE workers SET heartbeat_at = ?1 WHERE worker = ?2",
            rusqlite::params![stale, other],
        )
        .unwrap();
    }
    let out = live
        .apex(&["run", "--resume", &run_id, "--claim-timeout", "100000"])
        .await;
    let log = stderr(&out);
    ok(out);
    assert!(
        !log.contains("its process is gone"),
        "another container's claim was taken as dead: {log}"
    );
    // Taken over once its heartbeat lapsed.
    all_succeeded(&live);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_run_flags_stop_a_resume_instead_of_turning_caching_on() {
    let live = Live::with(SimulatorConfig::default()).await;
    let run_id = planned(&live, &["--no-cache"]).await;
    ledger(&live)
        .execute(
            "UPDATE runs SET flags_json = '{not json' WHERE run_id = ?1",
            [&run_id],
        )
        .unwrap();
    let out = live.apex(&["run", "--resume", &run_id]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unreadable flags"),
        "{}",
        stderr(&out)
    );
    assert!(live.sim.requests().is_empty(), "nothing was sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_status_is_an_error_not_a_failed_generation() {
    let live = Live::with(SimulatorConfig::default()).await;
    let run_id = planned(&live, &[]).await;
    let conn = ledger(&live);
    conn.execute_batch("PRAGMA ignore_check_constraints = ON")
        .unwrap();
    conn.execute(
        "UPDATE generations SET status = 'paused' WHERE run_id = ?1",
        [&run_id],
    )
    .unwrap();
    drop(conn);
    let out = live.apex(&["status", &run_id]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unknown status `paused`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_shortened_version_does_not_crash_the_ingest_summary() {
    let live = Live::with(SimulatorConfig::default()).await;
    let conn = ledger(&live);
    let id: String = conn
        .query_row("SELECT MIN(prompt_id) FROM context_packages", [], |r| {
            r.get(0)
        })
        .unwrap();
    conn.execute(
        "INSERT INTO context_versions (prompt_id, version, system_text, context_text,
             prompt_text, estimated_tokens, byte_len, ingested_at, o200k_tokens)
         SELECT prompt_id, 'abc', system_text, context_text, prompt_text, estimated_tokens,
                byte_len, ingested_at, o200k_tokens
         FROM context_versions WHERE prompt_id = ?1 LIMIT 1",
        [&id],
    )
    .unwrap();
    conn.execute(
        "UPDATE context_packages SET current_version = 'abc' WHERE prompt_id = ?1",
        [&id],
    )
    .unwrap();
    drop(conn);
    let contexts = examples().join("contexts");
    let out = ok(live.apex(&["ingest", contexts.to_str().unwrap()]).await);
    assert!(
        out.contains(&format!("new version  {id} (abc -> ")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_durations_scales_and_retry_budgets_saturate() {
    let live = Live::with(SimulatorConfig::default()).await;
    let out = live
        .apex(&[
            "run",
            "--allow-retired",
            "--condition-slug",
            "prod-sonnet45",
            "--replicates",
            "2",
            "--no-rate-limiting",
            "--claim-timeout",
            "18446744073709551615",
            "--max-retries",
            "4294967295",
            "--time-scale",
            "1e300",
        ])
        .await;
    ok(out);
    all_succeeded(&live);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_edited_no_cache_flag_is_refused_not_read_as_caching_on() {
    let live = Live::with(SimulatorConfig::default()).await;
    let run_id = planned(&live, &["--no-cache"]).await;
    ledger(&live)
        .execute(
            "UPDATE runs SET flags_json = json_set(flags_json, '$.no_cache', 'yes') WHERE run_id = ?1",
            [&run_id],
        )
        .unwrap();
    for args in [
        vec!["cost", run_id.as_str()],
        vec!["run", "--resume", run_id.as_str()],
    ] {
        let out = live.apex(&args).await;
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no_cache"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(live.sim.requests().is_empty(), "nothing was sent");
}
