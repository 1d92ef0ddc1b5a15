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
        let out = ok(live.run_one(slug, &[]).await);
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
    crate::signal(&child, "INT");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    crate::signal(&child, "INT");
    let out = finished(child).await;
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
        .run_one(
            "prod-gpt4o",
            &["--max-retries", "1", "--request-timeout", "50"],
        )
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
        .run_one("prod-gpt4o", &["--max-retries", "0", "--dry-run"])
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

/// Starts `apex run ARGS` on the sandbox's ledger with a short busy timeout,
/// so another writer's lock surfaces as a failing ledger.
fn spawn_impatient(live: &Live, args: &[&str]) -> std::process::Child {
    let url = format!("{}?busy_timeout_ms=200", live.sb.url());
    let mut argv = vec!["--database-url", url.as_str()];
    argv.extend_from_slice(args);
    live.sb
        .command(&argv, &live.env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Holds the ledger's write lock, as another writer would, for `held`.
fn lock_ledger(live: &Live, held: std::time::Duration) -> std::thread::JoinHandle<()> {
    let conn = rusqlite::Connection::open(live.sb.db_path()).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(held);
        conn.execute_batch("COMMIT").unwrap();
    })
}

/// Generation ids of the requests the simulator answered with 200, each as
/// often as it was answered.
fn answered(live: &Live) -> Vec<i64> {
    let mut ids: Vec<i64> = live
        .sim
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .map(crate::generation_of)
        .collect();
    ids.sort_unstable();
    ids
}

fn assert_each_paid_once(live: &Live) {
    let ids = answered(live);
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids, unique, "a paid response was paid for twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_locked_for_a_while_delays_the_run_and_loses_nothing() {
    let live = Live::with(SimulatorConfig {
        base_latency: std::time::Duration::from_secs(50),
        ..SimulatorConfig::default()
    })
    .await;
    let child = spawn_impatient(
        &live,
        &args(&["--condition-slug", "prod-sonnet45", "--replicates", "2"]),
    );
    live.wait_for("a request in flight", |l| l.count_in_file("running") > 0)
        .await;
    let lock = lock_ledger(&live, std::time::Duration::from_secs(2));
    let out = finished(child).await;
    lock.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("retrying"), "{}", stderr(&out));
    assert_eq!(
        live.count_in_file("pending") + live.count_in_file("running"),
        0
    );
    assert_each_paid_once(&live);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_gone_past_its_patience_saves_paid_results_that_a_resume_stores() {
    let live = Live::with(SimulatorConfig {
        base_latency: std::time::Duration::from_secs(50),
        ..SimulatorConfig::default()
    })
    .await;
    let child = spawn_impatient(
        &live,
        &args(&[
            "--condition-slug",
            "prod-sonnet45",
            "--replicates",
            "2",
            "--ledger-timeout",
            "1",
        ]),
    );
    live.wait_for("a request in flight", |l| l.count_in_file("running") > 0)
        .await;
    let lock = lock_ledger(&live, std::time::Duration::from_secs(6));
    let out = finished(child).await;
    lock.join().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let last = err
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect::<Vec<_>>();
    assert_eq!(last.len(), 1, "{err}");
    assert!(
        last[0].contains("paid response(s)") && last[0].contains("--resume"),
        "{err}"
    );
    let run_id = run_id_from(&stdout(&out));
    let file = live.sb.path(&format!("apex-recovery-{run_id}.jsonl"));
    let saved: Vec<i64> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["generation_id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(!saved.is_empty());
    // The ledger is back: the resume stores what was saved, sends the rest.
    ok(live.apex(&["run", "--resume", &run_id]).await);
    assert!(!file.exists(), "the recovery file was imported");
    assert_eq!(
        live.count_in_file("pending") + live.count_in_file("running") + live.count_in_file("error"),
        0
    );
    assert_each_paid_once(&live);
    for id in saved {
        assert_eq!(
            answered(&live).iter().filter(|&&g| g == id).count(),
            1,
            "{id} sent again"
        );
    }
}

/// The PostgreSQL cluster `scripts/test.sh` started with `pg_virtualenv`:
/// (version, name), to stop and start.
fn cluster() -> (String, String) {
    let out = std::process::Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters (postgresql-common): run through scripts/test.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let (Some(version), Some(name)) = (fields.next(), fields.next()) else {
        panic!("no PostgreSQL cluster to stop: run through scripts/test.sh ({text})")
    };
    (version.to_owned(), name.to_owned())
}

fn pg_ctl(cluster: &(String, String), action: &str) {
    let status = std::process::Command::new("pg_ctlcluster")
        .args([cluster.0.as_str(), cluster.1.as_str(), action, "-m", "fast"])
        .status()
        .unwrap();
    assert!(status.success(), "pg_ctlcluster {action}");
}

/// Starts the cluster again however the test ends.
struct StartAgain((String, String));

impl Drop for StartAgain {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pg_ctlcluster")
            .args([self.0.0.as_str(), self.0.1.as_str(), "start"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

async fn pg_count(url: &str, status: &str) -> i64 {
    let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
        return 0;
    };
    tokio::spawn(connection);
    client
        .query_one(
            "SELECT COUNT(*) FROM apex_audition.generations WHERE status = $1",
            &[&status],
        )
        .await
        .map_or(0, |r| r.get(0))
}

async fn wait_pg(url: &str, status: &str, at_least: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pg_count(url, status).await < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A run of prod-sonnet45 × 3 replicates, two at a time, on a fresh
/// PostgreSQL ledger, with `extra` options and answers after `latency`
/// seconds of simulator time; (the live set-up, the ledger URL, the child).
async fn outage_run(latency: u64, extra: &[&str]) -> (Live, String, std::process::Child) {
    let url = crate::fresh_postgres_database().await;
    let live = Live::on(
        crate::Sandbox::with_url(url.clone()),
        SimulatorConfig {
            base_latency: std::time::Duration::from_secs(latency),
            ..SimulatorConfig::default()
        },
    )
    .await;
    let mut run = vec![
        "--condition-slug",
        "prod-sonnet45",
        "--replicates",
        "3",
        "--concurrency",
        "2",
    ];
    run.extend_from_slice(extra);
    let child = live.spawn(&args(&run));
    (live, url, child)
}

async fn finished(child: std::process::Child) -> std::process::Output {
    Live::outputs(vec![child]).await.remove(0)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops and starts the PostgreSQL server: scripts/test.sh runs the outage tests on their own, before the suite"]
async fn postgres_outage_a_restart_mid_run_loses_nothing() {
    let cluster = cluster();
    let (live, url, child) = outage_run(50, &[]).await;
    wait_pg(&url, "success", 2).await;
    let restart = StartAgain(cluster.clone());
    pg_ctl(&cluster, "stop");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    pg_ctl(&cluster, "start");
    drop(restart);
    let out = finished(child).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(pg_count(&url, "success").await, 9);
    assert_each_paid_once(&live);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops and starts the PostgreSQL server: scripts/test.sh runs the outage tests on their own, before the suite"]
async fn postgres_outage_past_its_patience_saves_results_that_a_resume_stores() {
    let cluster = cluster();
    let (live, url, child) = outage_run(100, &["--ledger-timeout", "2"]).await;
    wait_pg(&url, "running", 1).await;
    let restart = StartAgain(cluster.clone());
    pg_ctl(&cluster, "stop");
    let out = finished(child).await;
    pg_ctl(&cluster, "start");
    drop(restart);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let run_id = run_id_from(&stdout(&out));
    let file = live.sb.path(&format!("apex-recovery-{run_id}.jsonl"));
    let saved = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(!saved.trim().is_empty(), "paid responses saved: {err}");
    ok(live.apex(&["run", "--resume", &run_id]).await);
    assert!(!file.exists(), "the recovery file was imported");
    assert_eq!(pg_count(&url, "success").await, 9);
    assert_each_paid_once(&live);
}

/// A small tmpfs holding the ledger, so the disk can fill up for real
/// (SQLite answers `SQLITE_FULL`); unmounted when dropped.
struct SmallDisk {
    dir: std::path::PathBuf,
    filler: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts a 16 MiB tmpfs at `dir`, or says why it cannot (not root, no
    /// mount permission in this container).
    fn mount(dir: std::path::PathBuf) -> Result<Self, String> {
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let filler = dir.join("filler");
        Ok(Self { dir, filler })
    }

    /// Fills every free byte.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(&self.filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&[0u8; 512]);
        let _ = file.sync_all();
    }

    /// Frees the space again.
    fn free(&self) {
        std::fs::remove_file(&self.filler).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// A sandbox whose ledger lives on a small disk of its own (the recovery
/// file, written to the working directory, does not).
async fn on_small_disk() -> Option<(Live, SmallDisk)> {
    let mut sb = crate::Sandbox::new();
    let disk = match SmallDisk::mount(sb.path("disk")) {
        Ok(disk) => disk,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return None;
        }
    };
    sb.url_override = Some(format!("sqlite://{}", disk.dir.join("ledger.db").display()));
    let live = Live::on(
        sb,
        SimulatorConfig {
            base_latency: std::time::Duration::from_secs(50),
            output_tokens: 2000,
            ..SimulatorConfig::default()
        },
    )
    .await;
    Some((live, disk))
}

fn count_on(disk: &SmallDisk, status: &str) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        disk.dir.join("ledger.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row(
        "SELECT COUNT(*) FROM generations WHERE status = ?1",
        [status],
        |r| r.get(0),
    )
    .unwrap()
}

fn spawn_run(live: &Live, extra: &[&str]) -> std::process::Child {
    let mut argv = args(&["--condition-slug", "prod-sonnet45", "--replicates", "2"]);
    argv.extend_from_slice(extra);
    live.spawn(&argv)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_for_a_while_delays_the_run_and_loses_nothing() {
    let Some((live, disk)) = on_small_disk().await else {
        return;
    };
    let child = spawn_run(&live, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count_on(&disk, "running") == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing went out");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    disk.fill();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    disk.free();
    let out = finished(child).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("full"), "the log names the full disk: {err}");
    assert_eq!(count_on(&disk, "success"), 6, "{err}");
    assert_each_paid_once(&live);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_full_past_its_patience_saves_paid_results_that_a_resume_stores() {
    let Some((live, disk)) = on_small_disk().await else {
        return;
    };
    let child = spawn_run(&live, &["--ledger-timeout", "1"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count_on(&disk, "running") == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing went out");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    disk.fill();
    let out = finished(child).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("--resume"), "{err}");
    let run_id = run_id_from(&stdout(&out));
    let file = live.sb.path(&format!("apex-recovery-{run_id}.jsonl"));
    assert!(file.exists(), "paid responses were saved: {err}");
    // Space again: the resume stores what was saved and sends the rest.
    disk.free();
    ok(live.apex(&["run", "--resume", &run_id]).await);
    assert!(!file.exists(), "the recovery file was imported");
    assert_eq!(count_on(&disk, "success"), 6);
    assert_each_paid_once(&live);
}
