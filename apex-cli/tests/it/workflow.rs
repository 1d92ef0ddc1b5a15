use crate::{Sandbox, examples, ok, run_id_from};

const SEED_STATUS: &str = "SELECT
  status,
  COUNT(*) as count,
  COUNT(*) FILTER (WHERE cache_hit) as cache_hits
FROM apex_audition.generations
WHERE run_id = '<run-id>'
GROUP BY status;";

const SEED_ERRORS: &str = "SELECT prompt_id, replicate_index, error_message
FROM apex_audition.generations
WHERE status = 'error' AND run_id = '<run-id>';";

#[test]
fn register_ingest_dry_run_status_and_seed_sql() {
    let sb = Sandbox::new();
    let conditions = examples().join("conditions.toml");
    let contexts = examples().join("contexts");
    let out = ok(sb.apex(&["conditions", "register", conditions.to_str().unwrap()]));
    assert_eq!(out.matches("added").count(), 4, "{out}");
    let out = ok(sb.apex(&["ingest", contexts.to_str().unwrap()]));
    assert!(out.contains("3 package(s): 3 added"), "{out}");

    // Re-running register and ingest changes nothing at all.
    let before = sb.dump();
    let out = ok(sb.apex(&["conditions", "register", conditions.to_str().unwrap()]));
    assert_eq!(out.matches("unchanged").count(), 4, "{out}");
    let out = ok(sb.apex(&["ingest", contexts.to_str().unwrap()]));
    assert!(out.contains("3 unchanged"), "{out}");
    assert_eq!(before, sb.dump());

    let out = ok(sb.apex(&[
        "run",
        "--allow-retired",
        "--condition-slug",
        "prod-sonnet45",
        "--replicates",
        "3",
        "--dry-run",
        "--created-by",
        "a",
        "--notes",
        "b",
    ]));
    assert!(out.contains("9 generation(s), nothing sent"), "{out}");
    let run_id = run_id_from(&out);

    let status = ok(sb.apex(&["status", &run_id]));
    assert!(status.contains("state       planned"), "{status}");
    assert!(status.contains("created_by  a"), "{status}");
    assert!(status.contains("pending  9      0"), "{status}");

    let sql = ok(sb.apex(&["sql", &SEED_STATUS.replace("<run-id>", &run_id)]));
    assert_eq!(
        sql,
        "status   count  cache_hits\n-------  -----  ----------\npending  9      0\n(1 row)\n"
    );
    let sql = ok(sb.apex(&["sql", &SEED_ERRORS.replace("<run-id>", &run_id)]));
    assert!(sql.ends_with("(0 rows)\n"), "{sql}");

    // The flags used are recorded with the run.
    let flags = ok(sb.apex(&[
        "sql",
        &format!("SELECT flags_json FROM apex_audition.runs WHERE run_id = '{run_id}'"),
    ]));
    assert!(
        flags.contains("\"replicates\":3") && flags.contains("\"dry_run\":true"),
        "{flags}"
    );

    let runs = ok(sb.apex(&["runs"]));
    assert!(runs.contains(&run_id) && runs.contains("planned"), "{runs}");
    let list = ok(sb.apex(&["conditions", "list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("prod-sonnet45") && l.ends_with('1')),
        "{list}"
    );
}

#[test]
fn limit_and_several_conditions_shape_the_plan() {
    let sb = Sandbox::new();
    ok(sb.apex(&[
        "conditions",
        "register",
        examples().join("conditions.toml").to_str().unwrap(),
    ]));
    let out = ok(sb.apex(&[
        "run",
        "--allow-retired",
        "--ingest",
        examples().join("contexts").to_str().unwrap(),
        "--condition-slug",
        "prod-gpt4o",
        "--condition-slug",
        "prod-sonnet45",
        "--replicates",
        "2",
        "--limit",
        "2",
        "--dry-run",
    ]));
    assert!(out.contains("8 generation(s)"), "{out}");
    let run_id = run_id_from(&out);
    let rows = ok(sb.apex(&["sql", &format!(
        "SELECT prompt_id, condition_slug, replicate_index FROM apex_audition.generations WHERE run_id = '{run_id}' ORDER BY generation_id"
    )]));
    let lines: Vec<&str> = rows
        .lines()
        .skip(2)
        .take(8)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .map(|s| Box::leak(s.into_boxed_str()) as &str)
        .collect();
    assert_eq!(lines[0], "ctx-01 prod-gpt4o 0");
    assert_eq!(lines[3], "ctx-01 prod-sonnet45 1");
    assert_eq!(lines[4], "ctx-02 prod-gpt4o 0");
    assert!(!rows.contains("ctx-03"));
}

#[test]
fn ingest_register_only_stops_after_ingest() {
    let sb = Sandbox::new();
    ok(sb.apex(&[
        "conditions",
        "register",
        examples().join("conditions.toml").to_str().unwrap(),
    ]));
    let out = ok(sb.apex(&[
        "run",
        "--allow-retired",
        "--condition-slug",
        "prod-gpt5",
        "--ingest",
        examples().join("contexts").to_str().unwrap(),
        "--register-only",
    ]));
    assert!(out.contains("3 added"), "{out}");
    let runs = ok(sb.apex(&["sql", "SELECT COUNT(*) AS n FROM apex_audition.runs"]));
    assert!(runs.contains("\n0\n"), "{runs}");
}
