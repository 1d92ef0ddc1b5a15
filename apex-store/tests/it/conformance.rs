use apex_core::run::AttemptEnd;
use apex_core::{
    Error, ErrorClass, GenerationResult, NewRun, PacingShare, Plan, PlanOptions, ProviderKind,
    RunId, RunState, SqlValue, Store, Usage,
};
use std::sync::Arc;

use crate::backends::{Backend, conformance};
use crate::{condition, package};

async fn seeded(backend: Backend, replicates: u32) -> (Arc<dyn Store>, RunId) {
    let store = backend.open().await;
    let c = condition("c1", ProviderKind::Anthropic, "claude-sonnet-4-5");
    store
        .register_conditions(std::slice::from_ref(&c))
        .await
        .unwrap();
    store
        .ingest_packages(&[package("ctx-01", "one"), package("ctx-02", "two")])
        .await
        .unwrap();
    let plan = Plan::build(
        vec![c],
        store.current_packages().await.unwrap(),
        PlanOptions {
            replicates,
            limit: None,
        },
    )
    .unwrap();
    let run = NewRun {
        run_id: RunId::generate(),
        created_by: Some("tester".into()),
        notes: Some("notes".into()),
        flags: serde_json::json!({"replicates": replicates}),
        dry_run: false,
    };
    store.create_run(&run, &plan).await.unwrap();
    (store, run.run_id)
}

fn seed_status_sql(run_id: &RunId) -> String {
    format!(
        "SELECT\n  status,\n  COUNT(*) as count,\n  COUNT(*) FILTER (WHERE cache_hit) as cache_hits\nFROM apex_audition.generations\nWHERE run_id = '{run_id}'\nGROUP BY status;"
    )
}

fn success(cache_read: u64) -> AttemptEnd {
    AttemptEnd::Success(GenerationResult {
        usage: Usage {
            input_tokens: 10,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            cache_read_tokens: cache_read,
            output_tokens: 5,
            reasoning_tokens: 0,
        },
        cost_usd: Some(0.01),
        finish_reason: Some("end_turn".into()),
        provider_request_id: Some("req_1".into()),
        model_snapshot: Some("claude-sonnet-4-5-20250929".into()),
        request_hash: Some("abc".into()),
        response_text: "hello".into(),
        latency_ms: 12,
        transport: apex_core::Transport::Sync,
    })
}

conformance!(register_is_idempotent_and_used_slugs_are_immutable);
async fn register_is_idempotent_and_used_slugs_are_immutable(backend: Backend) {
    let store = backend.open().await;
    let c = condition("c1", ProviderKind::OpenAi, "gpt-4o");
    let first = store
        .register_conditions(std::slice::from_ref(&c))
        .await
        .unwrap();
    assert_eq!(first.added, vec!["c1"]);
    let again = store
        .register_conditions(std::slice::from_ref(&c))
        .await
        .unwrap();
    assert_eq!(again.unchanged, vec!["c1"]);

    // Not used yet: a change replaces the parameters.
    let mut changed = c.clone();
    changed.max_tokens = 512;
    let updated = store
        .register_conditions(std::slice::from_ref(&changed))
        .await
        .unwrap();
    assert_eq!(updated.updated, vec!["c1"]);
    assert_eq!(store.condition("c1").await.unwrap().max_tokens, 512);

    // Used by a run: a change is refused and nothing is written, not even
    // the new condition registered in the same call.
    store
        .ingest_packages(&[package("ctx-01", "x")])
        .await
        .unwrap();
    let plan = Plan::build(
        vec![changed.clone()],
        store.current_packages().await.unwrap(),
        PlanOptions::default(),
    )
    .unwrap();
    let run = NewRun {
        run_id: RunId::generate(),
        created_by: None,
        notes: None,
        flags: serde_json::json!({}),
        dry_run: true,
    };
    store.create_run(&run, &plan).await.unwrap();
    let mut again = changed.clone();
    again.temperature = Some(0.1);
    let other = condition("c2", ProviderKind::OpenAi, "gpt-4o");
    let err = store
        .register_conditions(&[other, again])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ConditionImmutable { .. }), "{err}");
    assert!(err.to_string().contains("temperature: 0.7 -> 0.1"), "{err}");
    let conditions = store.conditions().await.unwrap();
    assert_eq!(conditions.len(), 1, "c2 must not be half-registered");
    assert_eq!(conditions[0].runs, 1);
    assert_eq!(conditions[0].condition, changed);
}

conformance!(ingest_is_idempotent_and_versions_changed_content);
async fn ingest_is_idempotent_and_versions_changed_content(backend: Backend) {
    let store = backend.open().await;
    let a = package("ctx-01", "alpha");
    let report = store
        .ingest_packages(std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(report.added, vec!["ctx-01"]);
    let report = store
        .ingest_packages(std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(report.unchanged, vec!["ctx-01"]);
    let b = package("ctx-01", "alpha, revised");
    let report = store
        .ingest_packages(std::slice::from_ref(&b))
        .await
        .unwrap();
    assert_eq!(
        report.new_versions,
        vec![("ctx-01".into(), a.version().into(), b.version().into())]
    );
    let current = store.current_packages().await.unwrap();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].version, b.version());
    // Both versions stay readable: old runs still point at theirs.
    assert_eq!(store.package("ctx-01", a.version()).await.unwrap(), a);
    assert_eq!(store.package("ctx-01", b.version()).await.unwrap(), b);
    // Exact counts are kept per version, as a fresh count would give them.
    for p in [&a, &b] {
        assert_eq!(
            store.o200k_split("ctx-01", p.version()).await.unwrap(),
            Some(apex_core::tokens::Tokenizer::O200k.split(p))
        );
    }
    assert_eq!(store.o200k_split("ctx-01", "nope").await.unwrap(), None);
}

conformance!(seed_sql_runs_verbatim_and_counts_transitions);
async fn seed_sql_runs_verbatim_and_counts_transitions(backend: Backend) {
    let (store, run_id) = seeded(backend, 3).await;
    let result = store
        .query_read_only(&seed_status_sql(&run_id))
        .await
        .unwrap();
    assert_eq!(result.columns, vec!["status", "count", "cache_hits"]);
    assert_eq!(
        result.rows,
        vec![vec![
            SqlValue::Text("pending".into()),
            SqlValue::Integer(6),
            SqlValue::Integer(0)
        ]]
    );

    let items = unfinished(&*store, &run_id).await;
    assert_eq!(items.len(), 6);
    assert_eq!(
        (items[0].prompt_id.as_str(), items[0].replicate_index),
        ("ctx-01", 0)
    );
    assert_eq!(
        (items[3].prompt_id.as_str(), items[3].replicate_index),
        ("ctx-02", 0)
    );

    // Leader writes the cache, follower reads it, one fails for good.
    store
        .begin_attempt(items[0].generation_id, 1, None)
        .await
        .unwrap();
    store
        .end_attempt(items[0].generation_id, 1, &success(0))
        .await
        .unwrap();
    store
        .begin_attempt(items[1].generation_id, 1, None)
        .await
        .unwrap();
    store
        .end_attempt(items[1].generation_id, 1, &success(900))
        .await
        .unwrap();
    let failed = |last: bool| AttemptEnd::Failed {
        class: ErrorClass::ServerError,
        message: "api_error: boom".into(),
        http_status: Some(500),
        provider_request_id: None,
        latency_ms: 3,
        then: if last {
            apex_core::AfterFailure::Error
        } else {
            apex_core::AfterFailure::Retry
        },
    };
    store
        .begin_attempt(items[2].generation_id, 1, None)
        .await
        .unwrap();
    store
        .end_attempt(items[2].generation_id, 1, &failed(false))
        .await
        .unwrap();
    store
        .begin_attempt(items[2].generation_id, 2, None)
        .await
        .unwrap();
    store
        .end_attempt(items[2].generation_id, 2, &failed(true))
        .await
        .unwrap();
    // Left running, as a crash would leave it.
    store
        .begin_attempt(items[3].generation_id, 1, None)
        .await
        .unwrap();

    let mut rows = store
        .query_read_only(&seed_status_sql(&run_id))
        .await
        .unwrap()
        .rows;
    rows.sort_by_key(|r| r[0].to_string());
    let shown: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {} {}", r[0], r[1], r[2]))
        .collect();
    assert_eq!(
        shown,
        vec!["error 1 0", "pending 2 0", "running 1 0", "success 2 1"]
    );

    // The same counts through the typed method the CLI reads.
    let mut typed: Vec<String> = store
        .status_counts(&run_id)
        .await
        .unwrap()
        .into_iter()
        .map(|r| format!("{} {} {}", r.status, r.count, r.cache_hits))
        .collect();
    typed.sort();
    assert_eq!(typed, shown);
    assert_eq!(
        store.remaining_by_condition(&run_id).await.unwrap(),
        vec![("c1".to_owned(), 3)],
        "2 pending + 1 running"
    );
    // Every attempt, paged in (generation, attempt) order; the failed one
    // by its class, the open one in flight.
    let mut attempts = Vec::new();
    let mut after = (0, 0);
    loop {
        let page = store.attempts_page(&run_id, after, 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = (last.generation_id, last.attempt);
        attempts.extend(page);
    }
    let outcomes: Vec<(i64, u32, &str)> = attempts
        .iter()
        .map(|a| (a.generation_id, a.attempt, a.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (items[0].generation_id, 1, "success"),
            (items[1].generation_id, 1, "success"),
            (items[2].generation_id, 1, "server_error"),
            (items[2].generation_id, 2, "server_error"),
            (items[3].generation_id, 1, "in flight"),
        ]
    );
    assert!(attempts.iter().all(|a| !a.started_at.is_empty()));
    assert!(attempts[4].finished_at.is_none() && attempts[0].finished_at.is_some());
    // A success records how it was sent.
    let page = store.generations_page(&run_id, 0, 10).await.unwrap();
    assert_eq!(page[0].transport.as_deref(), Some("sync"));
    assert_eq!(page[2].transport, None);

    let errors = store.error_rows(&run_id).await.unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].prompt_id, "ctx-01");
    assert_eq!(errors[0].replicate_index, 2);
    assert_eq!(errors[0].error_message.as_deref(), Some("api_error: boom"));
    let attempts = store
        .query_read_only(&format!(
            "SELECT attempts FROM apex_audition.generations WHERE generation_id = {}",
            items[2].generation_id
        ))
        .await
        .unwrap();
    assert_eq!(attempts.rows[0][0], SqlValue::Integer(2));

    // A success is never handed out or started again.
    let err = store
        .begin_attempt(items[0].generation_id, 2, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("it will not be sent"), "{err}");
    let todo = unfinished(&*store, &run_id).await;
    assert_eq!(todo.len(), 3, "2 pending + 1 running");
    assert!(
        todo.iter()
            .any(|w| w.generation_id == items[3].generation_id && w.attempts == 1)
    );
    assert_eq!(store.reset_errors(&run_id).await.unwrap(), 1);
    let with_errors = unfinished(&*store, &run_id).await;
    assert_eq!(with_errors.len(), 4);
    assert!(store.error_rows(&run_id).await.unwrap().is_empty());

    let info = store.run(&run_id).await.unwrap();
    assert_eq!(info.counts.success, 2);
    assert!((info.cost_usd - 0.02).abs() < 1e-9);
    assert_eq!(info.state, RunState::Running);
    store
        .set_run_state(&run_id, RunState::Finished)
        .await
        .unwrap();
    assert!(store.run(&run_id).await.unwrap().finished_at.is_some());
}

conformance!(read_only_sql_refuses_writes);
async fn read_only_sql_refuses_writes(backend: Backend) {
    let (store, run_id) = seeded(backend, 1).await;
    for sql in [
        "DELETE FROM apex_audition.generations",
        "UPDATE apex_audition.generations SET status = 'success'",
        "WITH x AS (SELECT 1) DELETE FROM apex_audition.generations",
        "DROP TABLE apex_audition.generations",
        "PRAGMA query_only = OFF",
        "SELECT 1; DELETE FROM apex_audition.generations",
    ] {
        let err = store.query_read_only(sql).await.unwrap_err();
        assert!(matches!(err, Error::ReadOnly(_)), "{sql}: {err}");
    }
    let rows = store
        .query_read_only(&seed_status_sql(&run_id))
        .await
        .unwrap();
    assert_eq!(rows.rows[0][1], SqlValue::Integer(2));
    // The connection is writable again afterwards.
    store
        .set_run_state(&run_id, RunState::Finished)
        .await
        .unwrap();
}

conformance!(unknown_run_and_condition_are_named);
async fn unknown_run_and_condition_are_named(backend: Backend) {
    let store = backend.open().await;
    let err = store.run(&RunId::generate()).await.unwrap_err();
    assert!(matches!(err, Error::UnknownRun(_)));
    let err = store.condition("nope").await.unwrap_err();
    assert!(err.to_string().contains("unknown condition `nope`"));
}

#[tokio::test]
async fn sqlite_file_store_survives_reopen() {
    use apex_store::SqliteStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .ingest_packages(&[package("ctx-01", "x")])
        .await
        .unwrap();
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.current_packages().await.unwrap().len(), 1);
    drop(store);
    // WAL is a property of the file: a fresh plain connection sees it.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

conformance!(export_pages_cover_every_generation_in_order);
async fn export_pages_cover_every_generation_in_order(backend: Backend) {
    let (store, run_id) = seeded(backend, 3).await;
    let items = unfinished(&*store, &run_id).await;
    store
        .begin_attempt(items[0].generation_id, 1, None)
        .await
        .unwrap();
    store
        .end_attempt(items[0].generation_id, 1, &success(5))
        .await
        .unwrap();
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = store.generations_page(&run_id, after, 4).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.generation_id;
        seen.extend(page);
    }
    assert_eq!(
        seen.iter().map(|r| r.generation_id).collect::<Vec<_>>(),
        items.iter().map(|w| w.generation_id).collect::<Vec<_>>()
    );
    // A brief page: the same rows, the texts left out, their lengths kept.
    let brief = store.generations_brief_page(&run_id, 0, 100).await.unwrap();
    assert_eq!(brief.len(), seen.len());
    for (b, full) in brief.iter().zip(&seen) {
        assert_eq!(b.response_text, None);
        assert_eq!(
            b.response_length,
            full.response_text.as_ref().map(|t| t.len() as u64)
        );
        assert_eq!(
            (b.generation_id, &b.status, b.cost_usd),
            (full.generation_id, &full.status, full.cost_usd)
        );
    }
    let first = &seen[0];
    assert_eq!(
        (
            first.status.as_str(),
            first.cache_hit,
            first.cache_read_tokens,
            first.response_text.as_deref()
        ),
        ("success", true, Some(5), Some("hello"))
    );
    assert_eq!(first.cost_usd, Some(0.01));
    assert!(seen[1].response_text.is_none() && seen[1].status == "pending");
    let runs = store.runs().await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].counts.total(), 6);
    assert_eq!(store.run_conditions(&run_id).await.unwrap()[0].slug, "c1");
}

conformance!(abandoned_attempts_return_to_pending);
async fn abandoned_attempts_return_to_pending(backend: Backend) {
    let (store, run_id) = seeded(backend, 1).await;
    let items = unfinished(&*store, &run_id).await;
    let id = items[0].generation_id;
    store.begin_attempt(id, 1, None).await.unwrap();
    store
        .end_attempt(
            id,
            1,
            &AttemptEnd::Failed {
                class: ErrorClass::Overloaded,
                message: "busy".into(),
                http_status: Some(529),
                provider_request_id: None,
                latency_ms: 1,
                then: apex_core::AfterFailure::Retry,
            },
        )
        .await
        .unwrap();
    store
        .end_attempt(id, 1, &AttemptEnd::Abandoned)
        .await
        .unwrap();
    let outcome = store
        .query_read_only(&format!(
            "SELECT outcome FROM apex_audition.attempts WHERE generation_id = {id}"
        ))
        .await
        .unwrap();
    assert_eq!(
        outcome.rows[0][0].to_string(),
        "error",
        "a finished attempt keeps its outcome"
    );
    let status = store
        .query_read_only(&format!(
            "SELECT status FROM apex_audition.generations WHERE generation_id = {id}"
        ))
        .await
        .unwrap();
    assert_eq!(status.rows[0][0].to_string(), "pending");
}

conformance!(claims_split_work_and_stale_claims_are_taken_over);
async fn claims_split_work_and_stale_claims_are_taken_over(backend: Backend) {
    let (store, run_id) = seeded(backend, 3).await;
    let future = "9999-12-31T00:00:00.000Z";
    let past = "1970-01-01T00:00:00.000Z";
    // Worker a takes one (condition, context) group, b the other.
    let a = store.claim_work(&run_id, "a", 1, past).await.unwrap();
    let b = store.claim_work(&run_id, "b", 1, past).await.unwrap();
    assert_eq!(a.items.len(), 3);
    assert_eq!(b.items.len(), 3);
    assert!(
        a.items.iter().all(|w| w.prompt_id == "ctx-01")
            && b.items.iter().all(|w| w.prompt_id == "ctx-02")
    );
    assert_eq!((a.held_by_others, b.held_by_others), (0, 3));
    // Nothing more to claim; claims are kept, not doubled.
    let again = store.claim_work(&run_id, "a", 5, past).await.unwrap();
    assert_eq!(again.items, a.items);
    // b may not start a's generation while a's claim is alive.
    let err = store
        .begin_attempt(a.items[0].generation_id, 1, Some("b"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotClaimable(_)), "{err}");
    store
        .begin_attempt(a.items[0].generation_id, 1, Some("a"))
        .await
        .unwrap();
    // a stops renewing: with every claim older than the cut-off, c takes a's
    // and b's groups over, the running one included.
    let c = store.claim_work(&run_id, "c", 10, future).await.unwrap();
    assert_eq!(c.items.len(), 6);
    store.renew_claims(&run_id, "c").await.unwrap();
    store.release_claims(&run_id, "c").await.unwrap();
    let d = store.claim_work(&run_id, "d", 10, past).await.unwrap();
    assert_eq!(d.items.len(), 6, "released claims are free at once");
    // --retry-errors resets errors only.
    assert_eq!(store.reset_errors(&run_id).await.unwrap(), 0);
}

/// The run's unfinished generations in plan order, all claimed by one test
/// worker (every other claim counts as stale).
async fn unfinished(store: &dyn Store, run_id: &RunId) -> Vec<apex_core::WorkItem> {
    let now = apex_core::time::now_rfc3339();
    store
        .claim_work(run_id, "conformance", u32::MAX, &now)
        .await
        .unwrap()
        .items
}

conformance!(hand_edited_rows_are_errors_naming_the_cause_not_panics);
async fn hand_edited_rows_are_errors_naming_the_cause_not_panics(backend: Backend) {
    let (store, raw) = backend.open_raw().await;
    let c = condition("c1", ProviderKind::Anthropic, "claude-sonnet-4-5");
    store
        .register_conditions(std::slice::from_ref(&c))
        .await
        .unwrap();
    store
        .ingest_packages(&[package("ctx-01", "one")])
        .await
        .unwrap();
    let plan = apex_core::Plan::build(
        vec![c],
        store.current_packages().await.unwrap(),
        apex_core::PlanOptions {
            replicates: 1,
            limit: None,
        },
    )
    .unwrap();
    let run_id = RunId::generate();
    let run = apex_core::NewRun {
        run_id: run_id.clone(),
        created_by: None,
        notes: None,
        flags: serde_json::json!({"no_cache": true}),
        dry_run: false,
    };
    store.create_run(&run, &plan).await.unwrap();

    // Unreadable flags would silently turn caching back on at a resume.
    raw.exec("UPDATE runs SET flags_json = '{not json'").await;
    let err = store.run(&run_id).await.unwrap_err().to_string();
    assert!(err.contains("unreadable flags"), "{err}");

    // A condition's canonical parameters (what it is read back from) edited
    // into something that is not a condition.
    raw.exec(r#"UPDATE conditions SET params_json = '{"provider":"openai","model":"m","max_tokens":"many"}'"#)
        .await;
    let err = store.conditions().await.unwrap_err().to_string();
    assert!(
        err.contains("expected u32") && err.contains("register it again"),
        "{err}"
    );
    raw.exec("UPDATE conditions SET params_json = '{not json'")
        .await;
    let err = store.conditions().await.unwrap_err().to_string();
    assert!(err.contains("in the ledger"), "{err}");
}

conformance!(latency_ranks_and_usage_sums_per_condition);
async fn latency_ranks_and_usage_sums_per_condition(backend: Backend) {
    let (store, run_id) = seeded(backend, 3).await;
    let items = unfinished(&*store, &run_id).await;
    for (item, latency) in items.iter().zip([30, 10, 20]) {
        let AttemptEnd::Success(mut result) = success(0) else {
            unreachable!()
        };
        result.latency_ms = latency;
        store
            .begin_attempt(item.generation_id, 1, None)
            .await
            .unwrap();
        store
            .end_attempt(item.generation_id, 1, &AttemptEnd::Success(result))
            .await
            .unwrap();
    }
    let at = |rank| {
        let store = Arc::clone(&store);
        let run_id = run_id.clone();
        async move { store.success_latency_at(&run_id, "c1", rank).await.unwrap() }
    };
    assert_eq!(
        (at(0).await, at(1).await, at(2).await, at(3).await),
        (Some(10), Some(20), Some(30), None)
    );
    assert_eq!(
        store.success_latency_at(&run_id, "other", 0).await.unwrap(),
        None
    );
    let usage = store.usage_by_condition(&run_id).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(
        (
            usage[0].generations,
            usage[0].usage.input_tokens,
            usage[0].usage.output_tokens
        ),
        (3, 30, 15)
    );
    assert!((usage[0].cost_usd - 0.03).abs() < 1e-9);
}

conformance!(pacing_is_shared_among_live_members);
async fn pacing_is_shared_among_live_members(backend: Backend) {
    let (store, _) = seeded(backend, 1).await;
    let minute = std::time::Duration::from_secs(60);
    let gpt = "openai/gpt-4o".to_owned();
    let claude = "anthropic/claude-sonnet-4-5".to_owned();
    let share = |key: &String, members, others, others_work| PacingShare {
        key: key.clone(),
        members,
        others,
        others_work,
    };
    // a alone: one member, nobody else counting.
    let a = store
        .share_pacing("a", &[(gpt.clone(), [3, 30_000, 0], 50)], minute)
        .await
        .unwrap();
    assert_eq!(a, vec![share(&gpt, 1, [0; 3], 0)]);
    // b joins on gpt-4o and alone paces Claude: it sees a's use and work,
    // a sees b's.
    let b = store
        .share_pacing(
            "b",
            &[
                (claude.clone(), [1, 500, 20], 10),
                (gpt.clone(), [2, 20_000, 0], 30),
            ],
            minute,
        )
        .await
        .unwrap();
    assert_eq!(
        b,
        vec![
            share(&claude, 1, [0; 3], 0),
            share(&gpt, 2, [3, 30_000, 0], 50),
        ]
    );
    let a = store
        .share_pacing("a", &[(gpt.clone(), [4, 40_000, 0], 50)], minute)
        .await
        .unwrap();
    assert_eq!(
        a,
        vec![
            share(&claude, 1, [1, 500, 20], 10),
            share(&gpt, 2, [2, 20_000, 0], 30)
        ]
    );
    // b holds no more gpt-4o work: it no longer takes a share of its
    // limits, though what it sent still counts.
    store
        .share_pacing("b", &[(gpt.clone(), [2, 20_000, 0], 0)], minute)
        .await
        .unwrap();
    let a = store
        .share_pacing("a", &[(gpt.clone(), [4, 40_000, 0], 50)], minute)
        .await
        .unwrap();
    let gpt_share = a.iter().find(|s| s.key == gpt).unwrap();
    assert_eq!(gpt_share, &share(&gpt, 1, [2, 20_000, 0], 0));
    // A member that left, or stopped sharing, no longer counts.
    store.leave_pacing("b").await.unwrap();
    let a = store
        .share_pacing("a", &[(gpt.clone(), [4, 40_000, 0], 50)], minute)
        .await
        .unwrap();
    assert_eq!(a, vec![share(&gpt, 1, [0; 3], 0)]);
    store
        .share_pacing("b", &[(gpt.clone(), [1, 1, 0], 5)], minute)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let fresh = std::time::Duration::from_millis(10);
    let a = store
        .share_pacing("a", &[(gpt.clone(), [4, 40_000, 0], 50)], fresh)
        .await
        .unwrap();
    assert_eq!(a, vec![share(&gpt, 1, [0; 3], 0)], "b is stale");
}

conformance!(batches_are_recorded_before_submission_and_found_again);
async fn batches_are_recorded_before_submission_and_found_again(backend: Backend) {
    use apex_core::run::{BatchItemRecord, BatchRecord, BatchState, Wave, custom_id};
    let (store, run_id) = seeded(backend, 2).await;
    let items = unfinished(&*store, &run_id).await;
    let leaders: Vec<_> = items.iter().filter(|i| i.replicate_index == 0).collect();
    let record = BatchRecord {
        batch_key: "01930000-0000-7000-8000-000000000001".into(),
        run_id: run_id.clone(),
        provider: ProviderKind::Anthropic,
        model: "claude-sonnet-4-5".into(),
        wave: Wave::Leader,
        provider_batch_id: None,
        state: BatchState::Intent,
        created_at: apex_core::time::now_rfc3339(),
        submitted_at: None,
        items: leaders
            .iter()
            .map(|i| BatchItemRecord {
                generation_id: i.generation_id,
                attempt: 1,
                custom_id: custom_id(i.generation_id, 1),
                condition_slug: String::new(),
                prompt_id: String::new(),
                package_version: String::new(),
                replicate_index: 0,
            })
            .collect(),
    };
    store.record_batch(&record).await.unwrap();
    // The intent is open, its items are running with their attempt begun,
    // and what it holds is read back with each item's cell.
    let open = store.open_batches(&run_id).await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].state, BatchState::Intent);
    assert_eq!(open[0].wave, Wave::Leader);
    assert_eq!(open[0].items.len(), leaders.len());
    for (item, leader) in open[0].items.iter().zip(&leaders) {
        assert_eq!(item.generation_id, leader.generation_id);
        assert_eq!(item.condition_slug, "c1");
        assert_eq!(item.prompt_id, leader.prompt_id);
        assert_eq!(item.package_version, leader.package_version);
    }
    let counts = store.run(&run_id).await.unwrap().counts;
    assert_eq!((counts.running, counts.pending), (2, 2));
    store
        .update_batch(&record.batch_key, Some("msgbatch_1"), BatchState::Submitted)
        .await
        .unwrap();
    let open = store.open_batches(&run_id).await.unwrap();
    assert_eq!(open[0].provider_batch_id.as_deref(), Some("msgbatch_1"));
    assert!(open[0].submitted_at.is_some());
    // Ending keeps the provider's id; an ended batch is no longer open.
    store
        .update_batch(&record.batch_key, None, BatchState::Ended)
        .await
        .unwrap();
    assert!(store.open_batches(&run_id).await.unwrap().is_empty());
    let ids = store
        .query_read_only("SELECT provider_batch_id, state, item_count FROM apex_audition.batches")
        .await
        .unwrap();
    assert_eq!(
        ids.rows,
        vec![vec![
            SqlValue::Text("msgbatch_1".into()),
            SqlValue::Text("ended".into()),
            SqlValue::Integer(2)
        ]]
    );
    assert!(
        store
            .update_batch("no-such-batch", None, BatchState::Ended)
            .await
            .is_err()
    );
}
