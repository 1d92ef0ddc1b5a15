//! The live view of `apex run`, as a user sees it in a real terminal
//! (tmux), and as plain lines where stderr is not one.

use std::process::Command;
use std::time::{Duration, Instant};

use apex_providers::simulator::SimulatorConfig;

use crate::live::{Live, args};
use crate::{stderr, stdout};

const SLUGS: [&str; 2] = ["prod-gpt4o", "prod-sonnet45"];

/// A tmux server of its own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn pane(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "view"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_view_in_a_real_terminal_shows_a_line_per_condition_and_counts_retries() {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(
            std::env::var("APEX_REQUIRE_TMUX").as_deref() != Ok("1"),
            "tmux is required here but not installed"
        );
        eprintln!("skipped: no tmux; scripts/test.sh installs it where it can");
        return;
    }
    // 20% transient faults, so retries happen; answers take 1.5 s.
    let live = Live::with(SimulatorConfig {
        fault_rate: 0.2,
        base_latency: Duration::from_secs(150),
        ..SimulatorConfig::default()
    })
    .await;
    let mut argv = vec![
        env!("CARGO_BIN_EXE_apex").to_owned(),
        "--database-url".into(),
        live.sb.url(),
    ];
    let mut run = args(&["--replicates", "3", "--max-retries", "6"]);
    for slug in SLUGS {
        run.extend(["--condition-slug", slug]);
    }
    argv.extend(run.iter().map(|s| (*s).to_owned()));
    let env: String = live
        .env()
        .iter()
        .map(|(k, v)| format!("{k}={} ", quoted(v)))
        .collect();
    let command = format!(
        "cd {} && env {env} {} 2>&1; echo APEX-EXIT=$?; sleep 600",
        quoted(live.sb.dir.path().to_str().unwrap()),
        argv.iter().map(|a| quoted(a)).collect::<Vec<_>>().join(" ")
    );
    let tmux = Tmux {
        socket: format!("apex-view-{}", std::process::id()),
    };
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "view",
        "-x",
        "220",
        "-y",
        "50",
        &command,
    ]);
    // Mid-run: the run line and one line per condition, redrawn in place.
    let started = Instant::now();
    let mut seen_mid_run = None;
    let last = loop {
        let pane = tmux.pane();
        if pane.contains("APEX-EXIT=") {
            break pane;
        }
        if seen_mid_run.is_none()
            && pane
                .lines()
                .any(|l| l.starts_with("run  ") && l.contains(" done · $"))
            && SLUGS.iter().all(|s| {
                pane.lines()
                    .any(|l| l.starts_with(s) && l.contains(" done · "))
            })
        {
            seen_mid_run = Some(pane);
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run did not end: {}",
            tmux.pane()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mid = seen_mid_run.expect("the live view was never drawn");
    assert!(last.contains("APEX-EXIT=0"), "{last}");
    // One run line and one line per condition, each drawn once.
    assert_eq!(
        mid.lines().filter(|l| l.starts_with("run  ")).count(),
        1,
        "{mid}"
    );
    for slug in SLUGS {
        assert_eq!(
            mid.lines().filter(|l| l.starts_with(slug)).count(),
            1,
            "{slug}: {mid}"
        );
    }
    let condition_line = |pane: &str, slug: &str| {
        pane.lines()
            .find(|l| l.starts_with(slug) && l.contains(" done · "))
            .unwrap_or_else(|| panic!("{slug}: {pane}"))
            .to_owned()
    };
    for slug in SLUGS {
        let line = condition_line(&mid, slug);
        for part in ["cache hit(s)", "error(s)", "retrying", "× 429", "RPM "] {
            assert!(line.contains(part), "{part}: {line}");
        }
    }
    // At the end: every condition done; the retries were counted on the
    // view, not logged one line each.
    for slug in SLUGS {
        let line = condition_line(&last, slug);
        assert!(line.contains(" 9/9 done"), "{line}");
    }
    assert!(
        !last
            .lines()
            .any(|l| l.contains("INFO") && l.contains("retrying")),
        "{last}"
    );
    let counted: u64 = SLUGS
        .iter()
        .map(|s| {
            let line = condition_line(&last, s);
            let at = line.find(" retries)").unwrap();
            line[..at]
                .rsplit('(')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    let run_line = last.lines().find(|l| l.starts_with("run  ")).unwrap();
    assert!(
        run_line.contains("18/18 done") && run_line.contains("so far"),
        "{run_line}"
    );
    let retries: u64 = live
        .column("SELECT COUNT(*) FROM apex_audition.attempts WHERE outcome = 'error'")
        .await[0]
        .parse()
        .unwrap();
    assert!(retries > 0, "the faults made no retry");
    assert_eq!(counted, retries, "every retry counted on the view: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_terminal_the_view_is_plain_periodic_lines() {
    let live = Live::with(SimulatorConfig::default()).await;
    let mut run = args(&["--replicates", "2"]);
    for slug in SLUGS {
        run.extend(["--condition-slug", slug]);
    }
    let out = live.apex(&run).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let log = stderr(&out);
    // The last state, logged: the run line and a line per condition.
    assert!(
        log.lines().any(|l| l.contains("run  12/12 done · $")),
        "{log}"
    );
    for slug in SLUGS {
        assert!(
            log.lines()
                .any(|l| l.contains(slug) && l.contains("6/6 done")),
            "{slug}: {log}"
        );
    }
    assert!(
        !log.contains('\u{1b}'),
        "no terminal escapes in a log: {log}"
    );
    assert!(stdout(&out).contains("success"));
}
