//! What a newcomer reads: the hints and messages of the first hour, each
//! checked as the user sees it (exit code, one line, the words that help).

use crate::bad_input::registered;
use crate::live::Live;
use crate::{Sandbox, ok, run_id_from, stderr, stdout};

/// One line on stderr, starting `error: ` and holding `needle`.
fn one_error_line(out: &std::process::Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

#[test]
fn an_option_with_equals_gets_the_form_it_takes() {
    let sb = registered();
    let before = sb.dump();
    let out = sb.apex(&["run", "--condition-slug", "prod-gpt5", "--replicates=3"]);
    one_error_line(
        &out,
        2,
        "options take their value after a space: write `--replicates 3`, not `--replicates=3`",
    );
    assert_eq!(before, sb.dump());
}

#[test]
fn a_bad_query_is_the_callers_mistake_with_the_databases_words() {
    let sb = registered();
    let out = sb.apex(&["sql", "SELECT * FROM no_such_table"]);
    one_error_line(&out, 7, "query failed");
    assert!(
        stderr(&out).contains("no such table: no_such_table"),
        "{}",
        stderr(&out)
    );
    let out = sb.apex(&["sql", "SELECT FROM WHERE"]);
    one_error_line(&out, 7, "syntax error");
    // A write is refused as before (bad input), not as a failed query.
    let out = sb.apex(&["sql", "DELETE FROM runs"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[test]
fn estimates_say_what_would_happen_without_doubled_parentheses_or_negative_savings() {
    let sb = registered();
    let out = sb.apex(&[
        "estimate",
        "--condition-slug",
        "prod-opus41",
        "--condition-slug",
        "prod-gpt5",
        "--replicates",
        "1",
    ]);
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{err}");
    // Opus 4.1 is retired: an estimate sends nothing, so nothing is "sent
    // anyway".
    assert!(!err.contains("sent anyway"), "{err}");
    assert!(
        err.contains("would be answered 404 by the real API"),
        "{err}"
    );
    assert!(!text.contains("(("), "{text}");
    assert!(!text.contains("))"), "{text}");
    assert!(text.contains("4-bytes-per-token estimate"), "{text}");
    // One replicate: nobody would read what a hint writes, so none is sent
    // and the estimate says so; no negative dollars or percentages, no
    // negative zero.
    assert!(
        text.contains("none: one replicate is sent without cache hints"),
        "{text}"
    );
    assert!(!text.contains("$-"), "{text}");
    assert!(!text.contains("-0%"), "{text}");
    assert!(
        !(0..10).any(|d| text.contains(&format!("(-{d}"))),
        "a negative percentage: {text}"
    );
}

#[test]
fn contexts_under_a_models_cache_minimum_are_named_at_preflight() {
    let sb = registered();
    let tiny = sb.path("tiny");
    let package = tiny.join("ctx-small");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(package.join("context.md"), "A short note. ".repeat(40)).unwrap();
    std::fs::write(package.join("prompt.md"), "Summarise.").unwrap();
    ok(sb.apex(&["ingest", tiny.to_str().unwrap()]));
    let out = sb.apex(&[
        "run",
        "--condition-slug",
        "prod-sonnet45",
        "--allow-retired",
        "--replicates",
        "3",
        "--dry-run",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("1 of 4 context(s) (ctx-small) are below claude-sonnet-4-5-20250929's prompt-caching minimum of 1024 tokens: they will not be cached"),
        "{err}"
    );
}

#[test]
fn sonnet_4_6_has_its_own_row_and_prices() {
    let out = ok(Sandbox::new().apex(&["models", "--provider", "anthropic"]));
    let row = out
        .lines()
        .find(|l| l.contains("claude-sonnet-4-6"))
        .unwrap_or_else(|| panic!("no claude-sonnet-4-6 in: {out}"));
    assert!(!row.contains("claude-opus-4-6"), "{row}");
    // Input $3 and output $15 per million, not Opus 4.6's $5 / $25.
    let words: Vec<&str> = row.split_whitespace().collect();
    assert!(words.contains(&"3") && words.contains(&"15"), "{row}");
    assert!(!words.contains(&"25"), "{row}");
}

#[tokio::test]
async fn resuming_a_finished_run_says_so_and_needs_no_key() {
    let live = Live::new().await;
    let out = live
        .apex(&[
            "run",
            "--allow-retired",
            "--time-scale",
            "0.01",
            "--condition-slug",
            "prod-gpt4o",
            "--limit",
            "1",
            "--replicates",
            "1",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    // No keys, no base URLs: a finished run sends nothing, so asks for
    // nothing.
    let out = live
        .apex_env(&["run", "--resume", &run_id], Vec::new())
        .await;
    let (text, err) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{text}{err}");
    assert!(
        text.contains(&format!("run {run_id}: nothing to do (1 success, 0 error)")),
        "{text}"
    );
    assert!(!text.contains("resumed"), "{text}");
    assert!(!err.contains("error"), "{err}");
}

#[tokio::test]
async fn one_replicate_is_sent_without_cache_hints_and_two_with_them() {
    let live = Live::new().await;
    for replicates in ["1", "2"] {
        let out = live
            .apex(&[
                "run",
                "--allow-retired",
                "--time-scale",
                "0.01",
                "--condition-slug",
                "prod-sonnet45",
                "--limit",
                "1",
                "--replicates",
                replicates,
            ])
            .await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let hinted: Vec<bool> = live
        .sim
        .requests()
        .iter()
        .map(|r| r.body.to_string().contains("cache_control"))
        .collect();
    // The first run's one request carries no hint (no write premium for
    // nobody to read); the second run's leader and follower do.
    assert_eq!(hinted, vec![false, true, true], "{hinted:?}");
}
