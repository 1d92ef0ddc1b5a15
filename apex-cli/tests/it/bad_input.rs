use std::fs;

use crate::{Sandbox, examples, ok, run_id_from, stderr};

/// Runs a command that must fail: non-zero exit, a one-line error naming the
/// problem, and an unchanged ledger.
fn refused(sb: &Sandbox, args: &[&str], code: i32, needle: &str) {
    let before = sb.dump();
    let out = sb.apex(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert_eq!(before, sb.dump(), "{args:?} changed the ledger");
}

pub(crate) fn registered() -> Sandbox {
    let sb = Sandbox::new();
    ok(sb.apex(&[
        "conditions",
        "register",
        examples().join("conditions.toml").to_str().unwrap(),
    ]));
    ok(sb.apex(&["ingest", examples().join("contexts").to_str().unwrap()]));
    sb
}

fn write_conditions(sb: &Sandbox, text: &str) -> String {
    let path = sb.path("bad.toml");
    fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

const ONE: &str = "[[condition]]\nslug = \"c\"\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-4-5\"\nmax_tokens = 100\n";

#[test]
fn malformed_and_unknown_key_conditions_files() {
    let sb = registered();
    let file = write_conditions(&sb, "[[condition]\nslug = 1");
    refused(
        &sb,
        &["conditions", "register", &file],
        3,
        "invalid conditions file",
    );
    let file = write_conditions(&sb, &format!("{ONE}colour = \"red\"\n"));
    refused(
        &sb,
        &["conditions", "register", &file],
        3,
        "unknown field `colour`",
    );
    let file = write_conditions(&sb, &ONE.replace("anthropic", "gemini"));
    refused(
        &sb,
        &["conditions", "register", &file],
        3,
        "unknown variant `gemini`",
    );
    let file = write_conditions(
        &sb,
        &ONE.replace("max_tokens = 100", "max_tokens = 100\ntemperature = 3.0"),
    );
    refused(
        &sb,
        &["conditions", "register", &file],
        3,
        "`temperature` 3 is out of range",
    );
}

#[test]
fn used_slug_cannot_change() {
    let sb = registered();
    let out = ok(sb.apex(&[
        "run",
        "--allow-retired",
        "--condition-slug",
        "prod-sonnet45",
        "--dry-run",
    ]));
    let run_id = run_id_from(&out);
    let text = fs::read_to_string(examples().join("conditions.toml"))
        .unwrap()
        .replacen(
            "max_tokens = 2048\n\n[[condition]]\nslug = \"prod-opus41\"",
            "max_tokens = 4096\n\n[[condition]]\nslug = \"prod-opus41\"",
            1,
        );
    assert!(text.contains("4096"));
    let file = write_conditions(&sb, &text);
    refused(
        &sb,
        &["conditions", "register", &file],
        3,
        &format!("condition `prod-sonnet45` is used by run {run_id}"),
    );
}

#[test]
fn bad_context_packages() {
    let sb = registered();
    let cases: &[(&str, &[u8], &str)] = &[
        ("context.md", b"text", "no `prompt.md`"),
        ("prompt.md", b"go\xff", "`prompt.md` is not UTF-8"),
        ("prompt.md", b"", "`prompt.md` is empty"),
    ];
    for (i, (name, bytes, needle)) in cases.iter().enumerate() {
        let root = sb.path(&format!("pkgs{i}"));
        let pkg = root.join("ctx-new");
        fs::create_dir_all(&pkg).unwrap();
        fs::write(pkg.join("context.md"), "some context").unwrap();
        fs::write(pkg.join(name), bytes).unwrap();
        refused(&sb, &["ingest", root.to_str().unwrap()], 3, needle);
    }
    // An empty context file.
    let root = sb.path("pkgs-empty");
    fs::create_dir_all(root.join("ctx-new")).unwrap();
    fs::write(root.join("ctx-new/context.md"), "").unwrap();
    fs::write(root.join("ctx-new/prompt.md"), "go").unwrap();
    refused(
        &sb,
        &["ingest", root.to_str().unwrap()],
        3,
        "`context.md` is empty",
    );
}

#[test]
fn unknown_slug_bad_url_and_write_sql() {
    let sb = registered();
    refused(
        &sb,
        &["run", "--condition-slug", "prod-nope", "--dry-run"],
        3,
        "unknown condition `prod-nope`",
    );
    refused(
        &sb,
        &["sql", "DELETE FROM apex_audition.generations"],
        3,
        "read-only",
    );
    refused(
        &sb,
        &["sql", "UPDATE apex_audition.conditions SET model = 'x'"],
        3,
        "read-only",
    );
    refused(
        &sb,
        &["status", "not-a-uuid"],
        3,
        "`not-a-uuid` is not a run id",
    );
    refused(
        &sb,
        &["status", "01a2b3c4-0000-7000-8000-000000000000"],
        3,
        "unknown run `01a2b3c4-0000-7000-8000-000000000000`",
    );

    let before = sb.dump();
    for (url, needle) in [
        ("mysql://localhost/x", "unknown scheme"),
        (
            "sqlite:///no/such/dir/x.db",
            "check that the directory exists",
        ),
    ] {
        let out = sb.apex_raw(&["--database-url", url, "runs"]);
        assert_eq!(out.status.code(), Some(4), "{url}");
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    assert_eq!(before, sb.dump());
}

#[test]
fn usage_errors_exit_2() {
    let sb = registered();
    for args in [
        &["run", "--register-only"][..],
        &["run", "--condition-slug", "prod-gpt5", "--retry-errors"],
        &["run", "--condition-slug", "prod-gpt5", "--replicates", "x"],
        &["run", "--condition-slug", "prod-gpt5", "--replicates", "0"],
        &["run", "--condition-slug", "prod-gpt5", "--replicates", "-1"],
        &["run", "--condition-slug", "prod-gpt5", "--limit", "0"],
        &[
            "estimate",
            "--condition-slug",
            "prod-gpt5",
            "--replicates",
            "0",
        ],
        &["--log-level", "loud", "runs"],
        &["frobnicate"],
        &[
            "run",
            "--condition-slug",
            "prod-gpt5",
            "--batch",
            "--verify-first",
        ],
        &["report"],
        &["cancel"],
    ] {
        let out = sb.apex(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn simulator_options_are_checked() {
    let sb = Sandbox::new();
    fs::write(sb.path("limits.toml"), "[openai.\"gpt-5\"]\nrpn = 5\n").unwrap();
    for (args, needle) in [
        (
            &["simulate", "--token-count", "lots"][..],
            "--token-count `lots` is not billed, chars or a factor",
        ),
        (
            &["simulate", "--replenish", "daily"],
            "--replenish `daily` is not window or bucket",
        ),
        (
            &["simulate", "--limits", "limits.toml"],
            "limits file `limits.toml`: unknown field `rpn`",
        ),
        (
            &["simulate", "--limits", "absent.toml"],
            "cannot read limits file `absent.toml`",
        ),
        (
            &["simulate", "--limits", "limits.toml", "--no-limits"],
            "contradict",
        ),
        (
            &["simulate", "--batch-error-rate", "2"],
            "--batch-error-rate must be between 0 and 1",
        ),
        (
            &["simulate", "--batch-time", "-1"],
            "--batch-time must be a number of seconds",
        ),
        (
            &["simulate", "--batch-max-requests", "0"],
            "must be at least 1",
        ),
    ] {
        let out = sb.apex_raw(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_bad_catalog_file_is_named() {
    let sb = registered();
    let path = sb.path("catalog.toml");
    fs::write(&path, "[[model]\nids = 1").unwrap();
    let shown = path.to_string_lossy().into_owned();
    refused(
        &sb,
        &[
            "run",
            "--allow-retired",
            "--condition-slug",
            "prod-gpt5",
            "--dry-run",
            "--catalog",
            &shown,
        ],
        3,
        &shown,
    );
}

#[cfg(unix)]
#[test]
fn a_looping_symbolic_link_in_a_package_is_named_as_such() {
    let sb = registered();
    let package = sb.path("loops/ctx-loop");
    fs::create_dir_all(&package).unwrap();
    fs::write(package.join("prompt.md"), "Summarise.").unwrap();
    std::os::unix::fs::symlink("context.md", package.join("context.md")).unwrap();
    let dir = sb.path("loops").to_string_lossy().into_owned();
    refused(
        &sb,
        &["ingest", &dir],
        3,
        "`context.md` is a symbolic link that cannot be followed",
    );
}
