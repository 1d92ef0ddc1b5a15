//! `apex run` end to end against the loopback simulator.

use std::fs;
use std::process::Output;

use apex_providers::simulator::{Fault, Simulator, SimulatorConfig};

use crate::{Sandbox, examples, generation_of, ok, run_id_from, stderr, stdout};

const OPENAI_KEY: &str = "sk-test-openai-0123456789";
const ANTHROPIC_KEY: &str = "sk-ant-test-0123456789";

pub(crate) struct Live {
    pub sb: Sandbox,
    pub sim: Simulator,
}

impl Live {
    pub(crate) async fn new() -> Self {
        Self::with(SimulatorConfig::default()).await
    }

    pub(crate) async fn with(config: SimulatorConfig) -> Self {
        Self::on(Sandbox::new(), config).await
    }

    pub(crate) async fn on(sb: Sandbox, config: SimulatorConfig) -> Self {
        Self::on_scaled(sb, config, 0.01).await
    }

    /// A simulator at another time scale (runs must pass the same
    /// `--time-scale`).
    pub(crate) async fn on_scaled(sb: Sandbox, config: SimulatorConfig, time_scale: f64) -> Self {
        let sim = Simulator::start(
            SimulatorConfig {
                time_scale,
                ..config
            },
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        ok(sb.apex(&[
            "conditions",
            "register",
            examples().join("conditions.toml").to_str().unwrap(),
        ]));
        ok(sb.apex(&["ingest", examples().join("contexts").to_str().unwrap()]));
        Self { sb, sim }
    }

    /// Starts `apex ARGS` on this ledger and simulator without waiting.
    pub(crate) fn spawn(&self, args: &[&str]) -> std::process::Child {
        let url = self.sb.url();
        let mut argv = vec!["--database-url", url.as_str()];
        argv.extend_from_slice(args);
        self.sb
            .command(&argv, &self.env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The outputs of processes started with [`Live::spawn`], waited for off
    /// the async runtime.
    pub(crate) async fn outputs(children: Vec<std::process::Child>) -> Vec<Output> {
        tokio::task::spawn_blocking(move || {
            children
                .into_iter()
                .map(|c| c.wait_with_output().unwrap())
                .collect()
        })
        .await
        .unwrap()
    }

    /// Generations in `status`, read straight from the SQLite file (readable
    /// while another process writes; 0 before the ledger exists).
    pub(crate) fn count_in_file(&self, status: &str) -> i64 {
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
        let Ok(conn) = rusqlite::Connection::open_with_flags(self.sb.db_path(), flags) else {
            return 0;
        };
        conn.query_row(
            "SELECT COUNT(*) FROM generations WHERE status = ?1",
            [status],
            |r| r.get(0),
        )
        .unwrap_or(0)
    }

    /// Waits until `done` holds for the ledger file, for at most a minute.
    pub(crate) async fn wait_for(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !done(self) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub(crate) fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OPENAI_BASE_URL", self.sim.openai_base_url()),
            ("ANTHROPIC_BASE_URL", self.sim.anthropic_base_url()),
            ("OPENAI_API_KEY", OPENAI_KEY.to_owned()),
            ("ANTHROPIC_API_KEY", ANTHROPIC_KEY.to_owned()),
        ]
    }

    pub(crate) async fn apex(&self, args: &[&str]) -> Output {
        self.apex_env(args, self.env()).await
    }

    pub(crate) async fn apex_env(&self, args: &[&str], env: Vec<(&'static str, String)>) -> Output {
        let url = self.sb.url();
        let mut full = vec!["--database-url".to_owned(), url];
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let mut cmd = self.sb.command(&refs, &env);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    /// `apex run` of one generation (the first context, one replicate) of
    /// condition `slug`, with `extra` options.
    pub(crate) async fn run_one(&self, slug: &str, extra: &[&str]) -> Output {
        let mut argv = args(&[
            "--condition-slug",
            slug,
            "--limit",
            "1",
            "--replicates",
            "1",
        ]);
        argv.extend_from_slice(extra);
        self.apex(&argv).await
    }

    async fn sql(&self, query: &str) -> String {
        ok(self.apex(&["sql", query]).await)
    }

    /// Rows of a one-column query, without header and footer.
    pub(crate) async fn column(&self, query: &str) -> Vec<String> {
        let out = self.sql(query).await;
        out.lines()
            .skip(2)
            .filter(|l| !l.starts_with('('))
            .map(|l| l.trim().to_owned())
            .collect()
    }
}

const RUN: &[&str] = &["run", "--allow-retired", "--time-scale", "0.01"];

pub(crate) fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    RUN.iter().copied().chain(extra.iter().copied()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn production_example_runs_with_cache_hits_usage_and_cost() {
    let live = Live::new().await;
    let out = live
        .apex(&args(&[
            "--condition-slug",
            "prod-gpt5",
            "--condition-slug",
            "prod-gpt4o",
            "--condition-slug",
            "prod-sonnet45",
            "--condition-slug",
            "prod-opus41",
            "--replicates",
            "3",
            "--created-by",
            "t",
            "--notes",
            "n",
        ]))
        .await;
    let text = ok(out);
    let run_id = run_id_from(&text);
    // The seed's monitoring SQL: all success, hits for every follower.
    let status = live
        .sql(&format!("SELECT status, COUNT(*) AS count, COUNT(*) FILTER (WHERE cache_hit) AS cache_hits FROM apex_audition.generations WHERE run_id = '{run_id}' GROUP BY status"))
        .await;
    assert!(status.contains("success  36     24"), "{status}");
    // Leaders write, followers read, per (condition, context).
    let leaders = live
        .column(&format!("SELECT COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' AND replicate_index = 0 AND cache_hit"))
        .await;
    assert_eq!(leaders, vec!["0"]);
    let anthropic_writes = live
        .column(&format!("SELECT COUNT(*) FROM apex_audition.generations g JOIN apex_audition.conditions c ON c.slug = g.condition_slug WHERE run_id = '{run_id}' AND c.provider = 'anthropic' AND cache_write_tokens > 0"))
        .await;
    assert_eq!(
        anthropic_writes,
        vec!["6"],
        "one write per (condition, context)"
    );
    // Usage, cost and provenance are stored per generation.
    let missing = live
        .column(&format!("SELECT COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' AND (cost_usd IS NULL OR cost_usd <= 0 OR output_tokens IS NULL OR provider_request_id IS NULL OR model_snapshot IS NULL OR request_hash IS NULL OR response_text IS NULL OR finish_reason IS NULL OR latency_ms IS NULL OR attempts <> 1)"))
        .await;
    assert_eq!(missing, vec!["0"]);
    // The stored cost is the catalog's formula over the stored usage (Sonnet 4.5 prices).
    let check = live
        .column(&format!("SELECT COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' AND condition_slug = 'prod-sonnet45' AND ABS(cost_usd - (input_tokens * 3.0 + cache_write_tokens * 3.75 + cache_read_tokens * 0.30 + output_tokens * 15.0) / 1000000.0) > 1e-12"))
        .await;
    assert_eq!(check, vec!["0"]);
    // Every request the simulator answered was valid for its API (it
    // rejects unknown keys and bad shapes with 400).
    let requests = live.sim.requests();
    assert_eq!(requests.len(), 36);
    assert!(requests.iter().all(|r| r.status == 200));
    // Each follower read a cache its model's leader had begun writing
    // before it arrived (it goes at the leader's first event).
    for r in requests.iter().filter(|r| r.cache_read_tokens > 0) {
        assert!(
            requests
                .iter()
                .any(|l| l.model == r.model && l.cache_read_tokens == 0 && l.arrived < r.arrived)
        );
    }
    let status = ok(live.apex(&["status", &run_id]).await);
    assert!(status.contains("state       finished"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_are_retried_and_succeed() {
    let live = Live::new().await;
    for fault in [
        Fault::anthropic(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        )
        .with_header("retry-after", "0"),
        Fault::anthropic(500, "api_error", "Internal server error"),
        Fault::anthropic(529, "overloaded_error", "Overloaded"),
        Fault::Drop,
    ] {
        live.sim.push_fault(None, fault);
    }
    let out = live.run_one("prod-sonnet45", &["--max-retries", "4"]).await;
    let text = ok(out);
    let run_id = run_id_from(&text);
    let attempts = live
        .column(&format!("SELECT attempts || ' ' || status FROM apex_audition.generations WHERE run_id = '{run_id}' ORDER BY generation_id"))
        .await;
    // The leader failed four times (429, 500, 529, dropped) and then succeeded.
    assert_eq!(attempts, vec!["5 success"]);
    let classes = live
        .column(&format!("SELECT COALESCE(a.error_class, a.outcome) FROM apex_audition.attempts a JOIN apex_audition.generations g USING (generation_id) WHERE g.run_id = '{run_id}' ORDER BY a.attempt"))
        .await;
    assert_eq!(
        classes,
        vec![
            "rate_limited",
            "server_error",
            "overloaded",
            "transport",
            "success"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_are_bounded_and_errors_stored_with_their_message() {
    let live = Live::new().await;
    for _ in 0..4 {
        live.sim.push_fault(
            None,
            Fault::anthropic(500, "api_error", "Internal server error"),
        );
    }
    let out = live.run_one("prod-sonnet45", &[]).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    let rows = live
        .column(&format!("SELECT status || '|' || attempts || '|' || error_class || '|' || error_message FROM apex_audition.generations WHERE run_id = '{run_id}'"))
        .await;
    assert_eq!(
        rows,
        vec!["error|4|server_error|server_error (HTTP 500): api_error: Internal server error"]
    );
    let tries = live.column(&format!("SELECT COUNT(*) FROM apex_audition.attempts a JOIN apex_audition.generations g USING (generation_id) WHERE g.run_id = '{run_id}'")).await;
    assert_eq!(tries, vec!["4"]);
    // The seed's error query shows it.
    let errors = live.sql(&format!("SELECT prompt_id, replicate_index, error_message FROM apex_audition.generations WHERE status = 'error' AND run_id = '{run_id}';")).await;
    assert!(
        errors.contains("ctx-01") && errors.contains("Internal server error"),
        "{errors}"
    );
    // And --retry-errors finishes it.
    let out = live
        .apex(&args(&["--resume", &run_id, "--retry-errors"]))
        .await;
    ok(out);
    let rows = live.column(&format!("SELECT status || '|' || attempts FROM apex_audition.generations WHERE run_id = '{run_id}'")).await;
    assert_eq!(rows, vec!["success|5"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn permanent_errors_are_not_retried() {
    for (fault, class) in [
        (
            Fault::openai(
                400,
                "invalid_request_error",
                Some("context_length_exceeded"),
                "This model's maximum context length is 128000 tokens.",
            ),
            "invalid_request",
        ),
        (
            Fault::openai(
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
                "Incorrect API key provided",
            ),
            "authentication",
        ),
        (
            Fault::openai(
                429,
                "insufficient_quota",
                Some("insufficient_quota"),
                "You exceeded your current quota, please check your plan and billing details.",
            ),
            "quota_exhausted",
        ),
    ] {
        let live = Live::new().await;
        live.sim.push_fault(None, fault);
        let out = live.run_one("prod-gpt4o", &[]).await;
        assert!(
            matches!(out.status.code(), Some(5 | 6)),
            "{class}: {}",
            stderr(&out)
        );
        let run_id = run_id_from(&stdout(&out));
        let rows = live.column(&format!("SELECT attempts || '|' || error_class FROM apex_audition.generations WHERE run_id = '{run_id}'")).await;
        assert_eq!(rows, vec![format!("1|{class}")]);
        assert_eq!(live.sim.requests().len(), 1, "{class} was retried");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_failure_stops_the_condition_after_one_request() {
    let live = Live::new().await;
    // A simulator that knows one key: OpenAI gets it, Anthropic a wrong one.
    let sim = Simulator::start(
        SimulatorConfig {
            api_key: Some(OPENAI_KEY.into()),
            time_scale: 0.01,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let env = vec![
        ("OPENAI_BASE_URL", sim.openai_base_url()),
        ("ANTHROPIC_BASE_URL", sim.anthropic_base_url()),
        ("OPENAI_API_KEY", OPENAI_KEY.to_owned()),
        (
            "ANTHROPIC_API_KEY",
            "sk-ant-wrong-key-0000000000".to_owned(),
        ),
    ];
    let mut with_debug = vec!["--log-level", "debug"];
    with_debug.extend(args(&[
        "--condition-slug",
        "prod-sonnet45",
        "--condition-slug",
        "prod-gpt4o",
        "--replicates",
        "3",
    ]));
    let out = live.apex_env(&with_debug, env).await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("condition `prod-sonnet45` stopped"), "{err}");
    let anthropic: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.provider == apex_core::ProviderKind::Anthropic)
        .collect();
    assert_eq!(
        anthropic.len(),
        1,
        "one request, then the condition stopped"
    );
    let run_id = run_id_from(&stdout(&out));
    let rows = live.column(&format!("SELECT condition_slug || '|' || status || '|' || COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' GROUP BY condition_slug, status ORDER BY 1")).await;
    assert_eq!(
        rows,
        vec![
            "prod-gpt4o|success|9",
            "prod-sonnet45|error|1",
            "prod-sonnet45|pending|8"
        ]
    );
    // Secrets never reach logs or the ledger.
    for secret in ["sk-ant-wrong-key-0000000000", OPENAI_KEY] {
        assert!(!err.contains(secret) && !stdout(&out).contains(secret));
        let bytes = fs::read(live.sb.db_path()).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} in the ledger"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_refuses_before_sending() {
    let live = Live::new().await;
    let bad = live.sb.path("bad.toml");
    fs::write(&bad, "[[condition]]\nslug = \"gpt5-warm\"\nprovider = \"openai\"\nmodel = \"gpt-5\"\ntemperature = 0.7\nmax_tokens = 2048\n").unwrap();
    ok(live
        .sb
        .apex(&["conditions", "register", bad.to_str().unwrap()]));
    let before = live.sb.dump();
    let out = live.apex(&args(&["--condition-slug", "gpt5-warm"])).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("gpt-5 accepts only the default temperature (1)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, live.sb.dump(), "nothing recorded");

    // A context too large for GPT-4o's 128K window (input + output).
    let big = live.sb.path("big");
    fs::create_dir_all(big.join("ctx-big")).unwrap();
    // ~160K tokens of prose under o200k_base.
    fs::write(
        big.join("ctx-big/context.md"),
        "The harbour log records tides and storms. ".repeat(20_000),
    )
    .unwrap();
    fs::write(big.join("ctx-big/prompt.md"), "Summarise.").unwrap();
    ok(live.sb.apex(&["ingest", big.to_str().unwrap()]));
    let before = live.sb.dump();
    let out = live.apex(&args(&["--condition-slug", "prod-gpt4o"])).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("exceeds gpt-4o's window of 128000 tokens"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, live.sb.dump());
    // A missing key is named before anything is sent.
    let mut env = live.env();
    env.retain(|(k, _)| *k != "OPENAI_API_KEY");
    let out = live
        .apex_env(
            &args(&["--condition-slug", "prod-gpt5", "--limit", "1"]),
            env,
        )
        .await;
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("set OPENAI_API_KEY"),
        "{}",
        stderr(&out)
    );
    assert!(live.sim.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_first_stops_before_fanning_out() {
    let live = Live::new().await;
    live.sim.push_fault(
        Some("claude-opus-4-1-20250805"),
        Fault::anthropic(404, "not_found_error", "model: claude-opus-4-1-20250805"),
    );
    let out = live
        .apex(&args(&[
            "--condition-slug",
            "prod-sonnet45",
            "--condition-slug",
            "prod-opus41",
            "--replicates",
            "3",
            "--verify-first",
        ]))
        .await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--verify-first failed"),
        "{}",
        stderr(&out)
    );
    // One request per condition, nothing more.
    assert_eq!(live.sim.requests().len(), 2);
    let run_id = run_id_from(&stdout(&out));
    // Resuming after the cause is gone finishes the run.
    ok(live
        .apex(&args(&["--resume", &run_id, "--retry-errors"]))
        .await);
    let rows = live.column(&format!("SELECT status || ' ' || COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' GROUP BY status")).await;
    assert_eq!(rows, vec!["success 18"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_cache_sends_no_hints_and_debug_logs_hold_no_key() {
    let live = Live::new().await;
    let mut with_trace = vec!["--log-level", "trace"];
    with_trace.extend(args(&[
        "--condition-slug",
        "prod-sonnet45",
        "--condition-slug",
        "prod-gpt5",
        "--limit",
        "1",
        "--replicates",
        "2",
        "--no-cache",
    ]));
    let out = live.apex(&with_trace).await;
    let err = stderr(&out);
    ok(out);
    for r in live.sim.requests() {
        let body = r.body.to_string();
        assert!(
            !body.contains("cache_control") && !body.contains("prompt_cache_key"),
            "{body}"
        );
        assert!(r.trace.is_some(), "x-apex-generation header sent");
    }
    assert!(!err.contains(OPENAI_KEY) && !err.contains(ANTHROPIC_KEY));
    assert!(
        err.contains("DEBUG") || err.contains("TRACE"),
        "verbose logs were on: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_then_resume_sends_no_success_twice() {
    let live = Live::with(SimulatorConfig {
        base_latency: std::time::Duration::from_secs(3),
        ..SimulatorConfig::default()
    })
    .await;
    let mut child = live.spawn(&args(&[
        "--condition-slug",
        "prod-sonnet45",
        "--condition-slug",
        "prod-gpt4o",
        "--replicates",
        "3",
        "--concurrency",
        "2",
    ]));
    live.wait_for("6 successes", |l| l.count_in_file("success") >= 6)
        .await;
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let sent_before_kill = live.sim.requests().len();
    let conn = rusqlite::Connection::open(live.sb.db_path()).unwrap();
    let run_id: String = conn
        .query_row("SELECT run_id FROM runs", [], |r| r.get(0))
        .unwrap();
    let done_before: Vec<i64> = conn
        .prepare("SELECT generation_id FROM generations WHERE status = 'success'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let open_at_kill: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM attempts WHERE finished_at IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(conn);
    assert!(
        done_before.len() >= 6 && done_before.len() < 18,
        "killed mid-batch: {}",
        done_before.len()
    );

    // A long claim timeout: the dead process's claims are taken back because
    // its pid is gone on this machine, not because they timed out.
    let out = live
        .apex(&args(&["--resume", &run_id, "--claim-timeout", "100000"]))
        .await;
    ok(out);
    assert_eq!(
        live.count_in_file("success"),
        18,
        "every generation ends success"
    );
    assert_eq!(
        live.count_in_file("running") + live.count_in_file("pending") + live.count_in_file("error"),
        0
    );
    // No generation stored as success before the kill was requested again.
    for r in &live.sim.requests()[sent_before_kill..] {
        let generation_id = generation_of(r);
        assert!(
            !done_before.contains(&generation_id),
            "generation {generation_id} was sent again after success"
        );
    }
    let runs = live
        .column(&format!(
            "SELECT state FROM apex_audition.runs WHERE run_id = '{run_id}'"
        ))
        .await;
    assert_eq!(runs, vec!["finished"]);
    // The killed process's attempts in flight are closed, not left open.
    let open = live
        .column("SELECT COUNT(*) FROM apex_audition.attempts WHERE finished_at IS NULL")
        .await;
    assert_eq!(open, vec!["0"], "attempts left open");
    let abandoned = live
        .column("SELECT COUNT(*) FROM apex_audition.attempts WHERE outcome = 'abandoned'")
        .await;
    assert_eq!(
        abandoned,
        vec![open_at_kill.to_string()],
        "each attempt open at the kill is closed as abandoned"
    );
}

/// Cells of a rendered table row (columns are separated by two spaces).
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn estimate_matches_the_actual_run_and_cost_breaks_it_down() {
    let live = Live::new().await;
    let slugs = ["prod-gpt5", "prod-gpt4o", "prod-sonnet45", "prod-opus41"];
    let mut shape: Vec<&str> = Vec::new();
    for s in slugs {
        shape.extend(["--condition-slug", s]);
    }
    shape.extend(["--replicates", "3"]);
    let mut est_args = vec!["estimate"];
    est_args.extend(shape.iter().copied());
    let estimate = ok(live.apex(&est_args).await);
    let mut run_args = args(&shape);
    run_args.extend(["--notes", "cost"]);
    let run_id = run_id_from(&ok(live.apex(&run_args).await));
    for slug in slugs {
        let row = cells(estimate.lines().find(|l| l.starts_with(slug)).unwrap());
        let (write, read, uncached): (f64, f64, f64) = (
            row[3].parse().unwrap(),
            row[4].parse().unwrap(),
            row[5].parse().unwrap(),
        );
        let actual = live
            .column(&format!("SELECT SUM(cache_write_tokens) || ' ' || SUM(cache_read_tokens) || ' ' || SUM(input_tokens) FROM apex_audition.generations WHERE run_id = '{run_id}' AND condition_slug = '{slug}'"))
            .await;
        let actual: Vec<f64> = actual[0].split(' ').map(|v| v.parse().unwrap()).collect();
        for (expected, got) in [(write, actual[0]), (read, actual[1]), (uncached, actual[2])] {
            assert!(
                (expected - got).abs() <= expected * 0.02,
                "{slug}: estimated {expected}, actual {got}"
            );
        }
    }
    let cost = ok(live.apex(&["cost", &run_id]).await);
    assert!(
        !cost.contains("(outside)"),
        "actual cost outside the estimate: {cost}"
    );
    let sonnet = cells(
        cost.lines()
            .find(|l| l.starts_with("prod-sonnet45"))
            .unwrap(),
    );
    // Components add up to the stored total.
    let dollars = |s: &str| {
        s.trim_start_matches('$')
            .split(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    let parts: f64 = sonnet[2..7].iter().map(|c| dollars(c)).sum();
    assert!((parts - dollars(&sonnet[7])).abs() < 0.0002, "{sonnet:?}");
    let stored = live.column(&format!("SELECT ROUND(SUM(cost_usd), 4) FROM apex_audition.generations WHERE run_id = '{run_id}' AND condition_slug = 'prod-sonnet45'")).await;
    assert!((dollars(&sonnet[7]) - stored[0].parse::<f64>().unwrap()).abs() < 0.00011);
    // The dry run shows the same estimate.
    let dry = ok(live
        .apex(&args(&[
            "--condition-slug",
            "prod-sonnet45",
            "--replicates",
            "3",
            "--dry-run",
        ]))
        .await);
    assert!(
        dry.contains("estimate (3 replicate(s)") && dry.contains("prod-sonnet45"),
        "{dry}"
    );
    // Runs list and status show the run with its per-condition figures.
    let runs = ok(live.apex(&["runs"]).await);
    assert!(
        runs.contains(&run_id) && runs.contains("finished"),
        "{runs}"
    );
    let status = ok(live.apex(&["status", &run_id]).await);
    assert!(
        status.contains("p50_ms")
            && status
                .lines()
                .any(|l| l.starts_with("prod-opus41") && l.contains('$')),
        "{status}"
    );
}

#[derive(serde::Deserialize)]
struct Exported {
    generation_id: i64,
    status: String,
    response_text: Option<String>,
    cost_usd: Option<f64>,
    replicate_index: u32,
}

#[tokio::test(flavor = "multi_thread")]
async fn export_round_trips_in_jsonl_and_csv() {
    let live = Live::new().await;
    let run_id = run_id_from(&ok(live
        .apex(&args(&[
            "--condition-slug",
            "prod-sonnet45",
            "--condition-slug",
            "prod-gpt5",
            "--replicates",
            "2",
        ]))
        .await));
    let ids: Vec<i64> = live
        .column(&format!("SELECT generation_id FROM apex_audition.generations WHERE run_id = '{run_id}' ORDER BY generation_id"))
        .await
        .iter()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 12);
    let jsonl = live.sb.path("out.jsonl");
    let out = ok(live
        .apex(&[
            "export",
            &run_id,
            "--format",
            "jsonl",
            "--output",
            jsonl.to_str().unwrap(),
        ])
        .await);
    assert!(out.contains("exported 12"), "{out}");
    let rows: Vec<Exported> = fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.generation_id).collect::<Vec<_>>(),
        ids
    );
    assert!(rows.iter().all(|r| r.status == "success"
        && r.response_text.as_deref().is_some_and(|t| !t.is_empty())
        && r.cost_usd.unwrap() > 0.0));
    // CSV to standard output, read back with a CSV parser.
    let csv_out = ok(live.apex(&["export", &run_id, "--format", "csv"]).await);
    let mut reader = csv::Reader::from_reader(csv_out.as_bytes());
    let headers = reader.headers().unwrap().clone();
    for column in [
        "generation_id",
        "run_id",
        "condition_slug",
        "prompt_id",
        "cache_hit",
        "cache_read_tokens",
        "request_hash",
        "response_text",
        "error_message",
        "finished_at",
    ] {
        assert!(headers.iter().any(|h| h == column), "missing {column}");
    }
    let back: Vec<Exported> = reader.deserialize().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        back.iter().map(|r| r.generation_id).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(back.iter().filter(|r| r.replicate_index == 1).count(), 6);
    let out = live.apex(&["export", &run_id, "--format", "xml"]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn first_ctrl_c_finishes_in_flight_requests_and_stops() {
    let live = Live::with(SimulatorConfig {
        base_latency: std::time::Duration::from_secs(20),
        ..SimulatorConfig::default()
    })
    .await;
    let child = live.spawn(&args(&[
        "--condition-slug",
        "prod-sonnet45",
        "--condition-slug",
        "prod-gpt4o",
        "--replicates",
        "3",
        "--concurrency",
        "4",
    ]));
    live.wait_for("a request in flight", |l| l.count_in_file("running") > 0)
        .await;
    crate::signal(&child, "INT");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("apex run --resume"),
        "{}",
        stderr(&out)
    );
    let run_id = run_id_from(&stdout(&out));
    // In-flight requests finished and were stored; nothing is left running.
    let rows = live.column(&format!("SELECT status || ' ' || COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' GROUP BY status ORDER BY 1")).await;
    assert!(
        rows.iter()
            .all(|r| r.starts_with("pending") || r.starts_with("success")),
        "{rows:?}"
    );
    let answered = live
        .sim
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .count();
    let success: usize = rows
        .iter()
        .find(|r| r.starts_with("success"))
        .map_or(0, |r| r[8..].parse().unwrap());
    assert!(
        success >= 1 && success == answered,
        "every answered request was stored: {success} vs {answered}"
    );
    let state = live
        .column(&format!(
            "SELECT state FROM apex_audition.runs WHERE run_id = '{run_id}'"
        ))
        .await;
    assert_eq!(state, vec!["interrupted"]);
    ok(live.apex(&args(&["--resume", &run_id])).await);
    let done = live.column(&format!("SELECT COUNT(*) FROM apex_audition.generations WHERE run_id = '{run_id}' AND status = 'success'")).await;
    assert_eq!(done, vec!["18"]);
}
