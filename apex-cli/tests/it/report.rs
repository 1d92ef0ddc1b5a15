//! `apex report`: one self-contained HTML file, checked as text and as a
//! real browser (Debian's headless Chromium) renders it.

use std::path::{Path, PathBuf};
use std::process::Command;

use apex_providers::simulator::{Fault, SimulatorConfig};

use crate::live::{Live, args};
use crate::{ok, run_id_from, stdout};

const HOSTILE: &str =
    "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">";

/// The HTML elements that have no closing tag.
const VOID: &[&str] = &[
    "meta", "br", "img", "input", "hr", "link", "area", "base", "col", "embed", "source", "track",
    "wbr",
];

/// Every element closed, in order (script and style bodies skipped): the
/// report is well-formed.
fn assert_well_formed(html: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let end = rest.find('>').expect("an unterminated tag");
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') || tag.starts_with('?') {
            continue;
        }
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(closing) = tag.strip_prefix('/') {
            let closing = closing.trim().to_ascii_lowercase();
            let open = stack
                .pop()
                .unwrap_or_else(|| panic!("</{closing}> closes nothing"));
            assert_eq!(open, closing, "</{closing}> closes <{open}>");
        } else if !(tag.ends_with('/') || VOID.contains(&name.as_str())) {
            if name == "script" || name == "style" {
                let close = format!("</{name}>");
                let at = rest.find(&close).expect("a closed script or style");
                rest = &rest[at + close.len()..];
                continue;
            }
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
}

/// Every `src` and `href` refers to the page itself: nothing is loaded.
fn assert_loads_nothing(html: &str) {
    for attribute in ["src=\"", "href=\"", "src='", "href='", "url("] {
        for (at, _) in html.match_indices(attribute) {
            let value = &html[at + attribute.len()..];
            assert!(
                value.starts_with('#') || value.starts_with("data:"),
                "{attribute}{}",
                &value[..value.len().min(60)]
            );
        }
    }
    for scheme in ["http://", "https://", "//cdn"] {
        let outside = html
            .match_indices(scheme)
            .map(|(at, _)| &html[at.saturating_sub(30)..(at + 60).min(html.len())])
            // SVG namespaces are names, not loads.
            .find(|s| !s.contains("www.w3.org/"));
        assert!(outside.is_none(), "{outside:?}");
    }
}

fn report(live: &Live, run_ids: &[&str], file: &str) -> String {
    let path = live.sb.path(file);
    let mut argv = vec!["report"];
    argv.extend_from_slice(run_ids);
    argv.extend(["--output", path.to_str().unwrap()]);
    let out = ok(live.sb.apex(&argv));
    assert!(out.contains("report written to"), "{out}");
    std::fs::read_to_string(path).unwrap()
}

fn chat_answer(text: &str) -> Fault {
    Fault::Respond {
        status: 200,
        headers: Vec::new(),
        body: serde_json::json!({
            "id": "chatcmpl-hostile", "object": "chat.completion", "created": 0, "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1800, "completion_tokens": 30, "total_tokens": 1830}
        })
        .to_string(),
    }
}

/// A finished run with a hostile answer and an error.
async fn run_with_errors(live: &Live) -> String {
    live.sim.push_fault(Some("gpt-4o"), chat_answer(HOSTILE));
    live.sim.push_fault(
        Some("claude-sonnet-4-5-20250929"),
        Fault::anthropic(
            400,
            "invalid_request_error",
            "prompt is too long for this test",
        ),
    );
    let out = live
        .apex(&args(&[
            "--condition-slug",
            "prod-gpt4o",
            "--condition-slug",
            "prod-sonnet45",
            "--replicates",
            "2",
            "--max-retries",
            "0",
        ]))
        .await;
    assert_eq!(out.status.code(), Some(5), "{}", crate::stderr(&out));
    run_id_from(&stdout(&out))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_holds_every_condition_context_and_cost_escaped_and_self_contained() {
    let live = Live::with(SimulatorConfig::default()).await;
    let run_id = run_with_errors(&live).await;
    let html = report(&live, &[&run_id], "report.html");
    assert_well_formed(&html);
    assert_loads_nothing(&html);
    // The hostile answer is text, not markup.
    assert!(!html.contains(HOSTILE));
    assert!(!html.contains("<img"));
    assert!(html.contains("&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;"));
    for needle in [
        "prod-gpt4o",
        "prod-sonnet45",
        "ctx-01",
        "ctx-02",
        "ctx-03",
        "id=\"chart-rate\"",
        "id=\"chart-cost\"",
        "id=\"chart-cache\"",
        "id=\"chart-latency\"",
        "id=\"chart-attempts\"",
        "prompt is too long for this test",
        "class=\"error\">invalid_request",
        run_id.as_str(),
        "<ul class=\"legend\">",
    ] {
        assert!(html.contains(needle), "{needle}");
    }
    // The total cost, as the ledger has it.
    let total = live
        .column(&format!(
            "SELECT ROUND(SUM(cost_usd), 4) FROM apex_audition.generations WHERE run_id = '{run_id}'"
        ))
        .await;
    let total: f64 = total[0].parse().unwrap();
    assert!(html.contains(&format!("${total:.4}")), "total {total}");
    // Each generation's id, for apex sql.
    let ids = live
        .column(&format!(
            "SELECT generation_id FROM apex_audition.generations WHERE run_id = '{run_id}'"
        ))
        .await;
    assert_eq!(ids.len(), 12);
    for id in ids {
        assert!(html.contains(&format!("generation_id {id}")), "{id}");
    }
    // Two runs side by side.
    let second = run_id_from(&ok(live
        .apex(&args(&["--condition-slug", "prod-gpt5", "--limit", "1"]))
        .await));
    let both = report(&live, &[&run_id, &second], "both.html");
    assert_well_formed(&both);
    assert!(both.contains(&format!("Run {second}")) && both.contains(&format!("Run {run_id}")));
    // One run: its id in the title and the heading, nowhere else.
    assert_eq!(
        html.matches(run_id.as_str()).count(),
        2,
        "the run id more than once"
    );
    assert!(both.contains(&format!("{} · prod-gpt5", &second[..8])));
    // Bad input: one line, nothing written.
    let out = live.sb.apex(&["report", "not-a-run"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(!live.sb.path("apex-report-not-a-run.html").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_of_a_run_in_progress_shows_what_is_stored_so_far() {
    // Answers take 3 s here: the report is written while most are out.
    let live = Live::with(SimulatorConfig {
        base_latency: std::time::Duration::from_secs(300),
        ..SimulatorConfig::default()
    })
    .await;
    let child = live.spawn(&args(&[
        "--condition-slug",
        "prod-gpt5",
        "--replicates",
        "2",
    ]));
    live.wait_for("a request in flight", |l| l.count_in_file("running") > 0)
        .await;
    let run_id = live.column("SELECT run_id FROM apex_audition.runs").await[0].clone();
    let html = report(&live, &[&run_id], "live.html");
    assert_well_formed(&html);
    assert!(html.contains("still in progress"));
    assert!(html.contains("not answered yet"));
    assert!(html.contains("state-running"));
    let out = Live::outputs(vec![child]).await.remove(0);
    assert_eq!(out.status.code(), Some(0));
}

/// Debian's Chromium, if installed (`scripts/test.sh` installs it where it
/// can and then requires it).
fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The DOM after load and scripts, and what the browser logged.
fn render(browser: &Path, file: &Path) -> (String, String) {
    let out = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", file.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn headless_chromium_renders_the_report_without_errors_and_draws_every_chart() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("APEX_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "chromium is required here but not installed"
        );
        eprintln!(
            "skipped: no chromium (Debian's `chromium` package); scripts/test.sh installs it where it can"
        );
        return;
    };
    let live = Live::with(SimulatorConfig::default()).await;
    let run_id = run_with_errors(&live).await;
    report(&live, &[&run_id], "report.html");
    let (dom, log) = render(&browser, &live.sb.path("report.html"));
    let console: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught") || l.contains("SyntaxError"))
        .collect();
    assert!(console.is_empty(), "{console:?}");
    // The page's own script ran to its end; the hostile one never ran.
    assert!(
        dom.contains("data-ready=\"1\""),
        "the report's script did not run"
    );
    assert!(
        !dom.contains("<title>pwned"),
        "generated text ran as script"
    );
    assert!(!dom.contains("<img"));
    // Every chart is an SVG with shapes drawn in it.
    for chart in [
        "chart-rate",
        "chart-cost",
        "chart-cache",
        "chart-latency",
        "chart-attempts",
    ] {
        let at = dom
            .find(&format!("id=\"{chart}\""))
            .unwrap_or_else(|| panic!("{chart}"));
        let figure = &dom[at..at + dom[at..].find("</figure>").unwrap()];
        assert!(figure.contains("<svg"), "{chart} has no SVG");
        let shapes = ["<polyline", "<rect", "<path", "<line", "<circle"]
            .iter()
            .map(|s| figure.matches(s).count())
            .sum::<usize>();
        assert!(shapes > 10, "{chart}: {shapes} shapes");
        assert!(
            figure.contains("<table"),
            "{chart} has no numbers beside it"
        );
    }
}

/// The cells of the table row that starts with `first`.
fn row<'a>(html: &'a str, first: &str) -> Vec<&'a str> {
    let start = html
        .find(&format!("<tr><td>{first}</td>"))
        .unwrap_or_else(|| panic!("no row for {first}"));
    let row = &html[start + 8..];
    let row = &row[..row.find("</tr>").unwrap()];
    row.trim_end_matches("</td>").split("</td><td>").collect()
}

/// A number as the report prints it (1.2M, 30K, 7).
fn number(text: &str) -> f64 {
    let (digits, factor) = match text.chars().last() {
        Some('K') => (&text[..text.len() - 1], 1e3),
        Some('M') => (&text[..text.len() - 1], 1e6),
        _ => (text, 1.0),
    };
    digits
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("`{text}` is not a number"))
        * factor
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_tells_the_truth_about_rates_limits_axes_and_size() {
    let live = Live::with(SimulatorConfig {
        limits: vec![(
            apex_core::ProviderKind::OpenAi,
            "gpt-4o".into(),
            apex_providers::simulator::SimLimits {
                rpm: Some(500),
                tpm: Some(90_000),
                ..Default::default()
            },
        )],
        ..SimulatorConfig::default()
    })
    .await;
    let out = live
        .apex(&args(&[
            "--condition-slug",
            "prod-gpt4o",
            "--replicates",
            "3",
        ]))
        .await;
    assert!(out.status.success(), "{}", crate::stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    // The limits it was paced at are in the ledger, with their source.
    let flags = live
        .column(&format!(
            "SELECT flags_json FROM apex_audition.runs WHERE run_id = '{run_id}'"
        ))
        .await;
    assert!(
        flags[0].contains("\"paced_limits\"") && flags[0].contains("\"rpm\":500"),
        "{flags:?}"
    );
    let html = report(&live, &[&run_id], "truth.html");
    // Nine requests in a run of a few seconds (a few minutes of its scaled
    // time): the highest count in any minute is at most what was sent, not
    // a rate extrapolated from seconds.
    let cells = row(&html, "gpt-4o");
    let attempts: f64 = cells[1].parse().unwrap();
    let highest_requests = number(cells[2]);
    assert!(highest_requests <= attempts, "{cells:?}");
    assert_eq!(cells[3], "500", "{cells:?}");
    let highest_tokens = number(cells[4]);
    assert!(
        highest_tokens > 0.0 && highest_tokens <= 90_000.0,
        "{cells:?}"
    );
    assert_eq!(cells[5], "90K", "{cells:?}");
    assert_eq!(cells[8], "learned from the server", "{cells:?}");
    assert!(html.contains("gpt-4o limit (learned from the server)"));
    // Axes read 30K, not 30000.0; the attempts chart names its interval.
    assert!(!html.contains("000.0</text>"), "an axis label like 30000.0");
    assert!(!html.contains("per 0 s"));
    assert!(html.contains("attempts started per "));
    // A size budget: the audition keeps to it and names the way to the rest.
    let path = live.sb.path("small.html");
    let out = ok(live.sb.apex(&[
        "report",
        &run_id,
        "--max-audition-mb",
        "0.004",
        "--output",
        path.to_str().unwrap(),
    ]));
    assert!(out.contains("its audition shows 1 of 3 contexts"), "{out}");
    let small = std::fs::read_to_string(&path).unwrap();
    assert_well_formed(&small);
    assert!(
        small.contains("This page shows contexts 1–1 of 3"),
        "budget note"
    );
    assert!(small.contains(&format!("apex report {run_id} --contexts 2-2")));
    assert!(small.contains("id=\"ctx-ctx-01\"") && !small.contains("id=\"ctx-ctx-02\""));
    // Every generation is still in the overview and the charts.
    assert!(row(&small, "gpt-4o")[1] == cells[1]);
    // And a range shows what it names.
    let out = ok(live.sb.apex(&[
        "report",
        &run_id,
        "--contexts",
        "2-3",
        "--output",
        path.to_str().unwrap(),
    ]));
    assert!(out.contains("its audition shows 2 of 3 contexts"), "{out}");
    let ranged = std::fs::read_to_string(&path).unwrap();
    assert!(ranged.contains("id=\"ctx-ctx-02\"") && ranged.contains("id=\"ctx-ctx-03\""));
    assert!(!ranged.contains("id=\"ctx-ctx-01\""));
    assert!(ranged.contains(&format!("apex report {run_id} --contexts 1-1")));
    let out = live.sb.apex(&["report", &run_id, "--contexts", "3-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(crate::stderr(&out).contains("--contexts `3-1` is not a range"));
}
