//! `apex run --batch`: both Batch APIs of the simulator, in two waves.

use std::time::Duration;

use apex_providers::simulator::SimulatorConfig;

use crate::live::{Live, args};
use crate::{ok, run_id_from, stderr, stdout};

/// A simulator whose batches take `secs` of its time to end.
async fn live(secs: u64, config: SimulatorConfig) -> Live {
    Live::with(SimulatorConfig {
        batch_time: Duration::from_secs(secs),
        ..config
    })
    .await
}

fn slugs<'a>(slugs: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec!["--batch"];
    for s in slugs {
        argv.extend(["--condition-slug", s]);
    }
    argv.extend_from_slice(extra);
    args(&argv)
}

/// Rows of the ledger file, read while another process may write.
fn rows(live: &Live, query: &str) -> Vec<Vec<String>> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let Ok(conn) = rusqlite::Connection::open_with_flags(live.sb.db_path(), flags) else {
        return Vec::new();
    };
    let Ok(mut statement) = conn.prepare(query) else {
        return Vec::new();
    };
    let n = statement.column_count();
    statement
        .query_map([], |r| {
            (0..n)
                .map(|i| {
                    let v: rusqlite::types::Value = r.get(i)?;
                    Ok(match v {
                        rusqlite::types::Value::Null => "NULL".into(),
                        rusqlite::types::Value::Integer(i) => i.to_string(),
                        rusqlite::types::Value::Real(f) => f.to_string(),
                        rusqlite::types::Value::Text(t) => t,
                        rusqlite::types::Value::Blob(_) => "blob".into(),
                    })
                })
                .collect()
        })
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

fn submitted(live: &Live) -> usize {
    rows(
        live,
        "SELECT batch_key FROM batches WHERE state = 'submitted'",
    )
    .len()
}

/// Asserts the shape every batch run has: nothing went synchronously (each
/// condition's first request was a free check of its key and model), every
/// generation succeeded in a batch with one attempt, and (where the model's
/// cache outlives a batch) every follower read its leader's cache.
fn assert_two_waves(live: &Live, run_id: &str, total: usize, followers_hit: bool) {
    assert!(live.sim.requests().is_empty(), "nothing went synchronously");
    let rows = rows(
        live,
        &format!(
            "SELECT transport, COUNT(*), SUM(attempts), SUM(replicate_index > 0), SUM(cache_hit)
             FROM generations WHERE run_id = '{run_id}' AND status = 'success' GROUP BY 1"
        ),
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row[0], "batch", "{row:?}");
    assert_eq!(row[1], total.to_string(), "{row:?}");
    assert_eq!(row[2], total.to_string(), "one attempt each: {row:?}");
    if followers_hit {
        assert_eq!(row[3], row[4], "every follower read the cache: {row:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_waves_for_both_providers_read_the_leaders_cache_at_the_batch_price() {
    let live = live(60, SimulatorConfig::default()).await;
    let out = live
        .apex(&slugs(
            &["prod-gpt5", "prod-gpt4o", "prod-sonnet45", "prod-opus41"],
            &["--replicates", "3"],
        ))
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    assert_two_waves(&live, &run_id, 36, true);
    // Per model one leader batch (a request per context), then one
    // follower batch (the other replicates); the first request of each
    // condition was a free check.
    let checks = live
        .sim
        .arrivals()
        .iter()
        .filter(|a| a.request.contains("/models/") || a.request.contains("count_tokens"))
        .count();
    assert_eq!(checks, 4, "one check per condition");
    let batches = live.sim.batches();
    let mut sizes: Vec<usize> = batches.iter().map(|b| b.requests).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![3, 3, 3, 3, 6, 6, 6, 6], "{batches:?}");
    // Leaders wrote (Anthropic for an hour), followers read.
    let by_role = rows(
        &live,
        &format!(
            "SELECT condition_slug, replicate_index > 0, SUM(cache_hit), COUNT(*),
                    SUM(cache_write_tokens), SUM(cache_write_1h_tokens), SUM(status = 'success')
             FROM generations WHERE run_id = '{run_id}'
             GROUP BY 1, 2 ORDER BY 1, 2"
        ),
    );
    assert_eq!(by_role.len(), 8, "{by_role:?}");
    for row in &by_role {
        let (slug, follower, hits, n) = (&row[0], row[1] == "1", &row[2], &row[3]);
        assert_eq!(row[6], *n, "all succeed: {row:?}");
        if follower {
            assert_eq!(hits, n, "every follower of {slug} read the cache: {row:?}");
        } else {
            assert_eq!(hits, "0", "{row:?}");
            if slug.contains("sonnet") || slug.contains("opus") {
                assert_ne!(row[4], "0", "{row:?}");
                assert_eq!(row[4], row[5], "leaders write the 1-hour cache: {row:?}");
            }
        }
    }
    // Each generation is priced at half its synchronous price.
    let catalog = apex::core::Catalog::built_in();
    let priced = rows(
        &live,
        &format!(
            "SELECT c.provider, c.model, g.input_tokens, g.cache_write_tokens, g.cache_write_1h_tokens,
                    g.cache_read_tokens, g.output_tokens, g.reasoning_tokens, g.cost_usd, g.transport
             FROM generations g JOIN conditions c ON c.slug = g.condition_slug
             WHERE g.run_id = '{run_id}'"
        ),
    );
    assert_eq!(priced.len(), 36);
    for row in priced {
        let n = |i: usize| row[i].parse::<u64>().unwrap();
        let usage = apex::core::Usage {
            input_tokens: n(2),
            cache_write_tokens: n(3),
            cache_write_1h_tokens: n(4),
            cache_read_tokens: n(5),
            output_tokens: n(6),
            reasoning_tokens: n(7),
        };
        let provider = apex::core::ProviderKind::parse(&row[0]).unwrap();
        let prices = catalog.lookup(provider, &row[1]).unwrap().prices;
        let stored: f64 = row[8].parse().unwrap();
        let synchronous = prices.cost(&usage);
        assert_eq!(row[9], "batch");
        let expected = synchronous / 2.0;
        assert!(
            (stored - expected).abs() < 1e-9,
            "{row:?}: {stored} vs {expected}"
        );
    }
    // Every batch and item is in the ledger, ended.
    let recorded = rows(
        &live,
        &format!(
            "SELECT state, wave, COUNT(*) FROM batches WHERE run_id = '{run_id}' GROUP BY 1, 2 ORDER BY 2"
        ),
    );
    assert_eq!(
        recorded,
        vec![
            vec!["ended".to_owned(), "follower".into(), "4".into()],
            vec!["ended".to_owned(), "leader".into(), "4".into()]
        ]
    );
    let cost = ok(live.apex(&["cost", &run_id]).await);
    assert!(cost.contains("batch price"), "{cost}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_run_re_attaches_to_its_batches_on_resume() {
    // Batches take 6 s here: long enough to kill the run while it waits.
    let live = live(600, SimulatorConfig::default()).await;
    let child = live.spawn(&slugs(
        &["prod-gpt5", "prod-sonnet45"],
        &["--replicates", "2"],
    ));
    live.wait_for("the leader batches", |l| submitted(l) == 2)
        .await;
    crate::signal(&child, "KILL");
    let out = Live::outputs(vec![child]).await.remove(0);
    let run_id = run_id_from(&stdout(&out));
    assert_eq!(live.sim.batches().len(), 2);
    let out = live.apex(&["run", "--resume", &run_id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The leaders were collected from the batches the killed process
    // submitted; only the followers went as new batches.
    let batches = live.sim.batches();
    assert_eq!(
        batches.iter().map(|b| b.requests).collect::<Vec<_>>(),
        vec![3, 3, 3, 3],
        "{batches:?}"
    );
    assert_two_waves(&live, &run_id, 12, true);
    let generations = rows(
        &live,
        &format!(
            "SELECT replicate_index, status, attempts, cache_hit FROM generations
             WHERE run_id = '{run_id}' ORDER BY generation_id"
        ),
    );
    assert_eq!(generations.len(), 12);
    for g in &generations {
        assert_eq!((g[1].as_str(), g[2].as_str()), ("success", "1"), "{g:?}");
        assert_eq!(g[3], if g[0] == "0" { "0" } else { "1" }, "{g:?}");
    }
    let successes = rows(
        &live,
        "SELECT COUNT(*) FROM attempts WHERE outcome = 'success'",
    );
    assert_eq!(successes, vec![vec!["12".to_owned()]], "stored once each");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_and_errored_items_go_into_a_later_batch_and_succeed() {
    // Every batch expires with its later half unprocessed, a fifth of the
    // items processed end errored, and the first results downloads fail.
    let live = live(
        30,
        SimulatorConfig {
            batch_expire_rate: 1.0,
            batch_error_rate: 0.2,
            batch_result_failures: 3,
            ..SimulatorConfig::default()
        },
    )
    .await;
    let out = live
        .apex(&slugs(
            &["prod-gpt5", "prod-sonnet45"],
            &["--replicates", "2", "--max-retries", "8"],
        ))
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    let done = rows(
        &live,
        &format!(
            "SELECT COUNT(*) FROM generations WHERE run_id = '{run_id}' AND status = 'success'"
        ),
    );
    assert_eq!(done, vec![vec!["12".to_owned()]]);
    let expired = rows(
        &live,
        "SELECT COUNT(*) FROM attempts WHERE error_class = 'timeout' AND error_message LIKE '%expired%'",
    );
    let expired: usize = expired[0][0].parse().unwrap();
    assert!(expired >= 2, "{expired}");
    let errored = rows(
        &live,
        "SELECT COUNT(*) FROM attempts WHERE error_class = 'server_error'",
    );
    let errored: usize = errored[0][0].parse().unwrap();
    assert!(errored >= 1, "{errored}");
    assert!(
        stderr(&out).contains("reading a batch's results failed; trying again"),
        "{}",
        stderr(&out)
    );
    assert!(live.sim.batches().len() > 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn apex_cancel_then_one_resume_collects_and_sends_the_rest() {
    let live = live(300, SimulatorConfig::default()).await;
    let child = live.spawn(&slugs(&["prod-opus41"], &["--replicates", "2"]));
    live.wait_for("the leader batch", |l| submitted(l) == 1)
        .await;
    crate::signal(&child, "INT");
    let out = Live::outputs(vec![child]).await.remove(0);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    let cancelled = ok(live.apex(&["cancel", &run_id]).await);
    assert!(cancelled.contains("cancel 1 batch"), "{cancelled}");
    // One resume: it reads what the cancelled batches processed (nothing
    // here), sends the rest in new batches, and finishes.
    let out = live.apex(&["run", "--resume", &run_id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let done = rows(
        &live,
        &format!("SELECT status, COUNT(*) FROM generations WHERE run_id = '{run_id}' GROUP BY 1"),
    );
    assert_eq!(done, vec![vec!["success".to_owned(), "6".into()]]);
    assert_eq!(
        rows(
            &live,
            &format!(
                "SELECT state, COUNT(*) FROM batches WHERE run_id = '{run_id}' AND state = 'cancelled' GROUP BY 1"
            )
        ),
        vec![vec!["cancelled".to_owned(), "1".into()]]
    );
    // Cancelled unprocessed, so unbilled: each generation paid once.
    let paid = rows(
        &live,
        &format!(
            "SELECT COUNT(*) FROM attempts a JOIN generations g USING (generation_id)
             WHERE g.run_id = '{run_id}' AND a.outcome = 'success'"
        ),
    );
    assert_eq!(paid, vec![vec!["6".to_owned()]]);
    let state = rows(&live, "SELECT state FROM runs");
    assert_eq!(state, vec![vec!["finished".to_owned()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_cancelled_while_its_run_waits_stops_the_run() {
    let live = live(300, SimulatorConfig::default()).await;
    let child = live.spawn(&slugs(&["prod-opus41"], &["--replicates", "2"]));
    live.wait_for("the leader batch", |l| submitted(l) == 1)
        .await;
    let run_id = rows(&live, "SELECT run_id FROM runs")[0][0].clone();
    let cancelled = ok(live.apex(&["cancel", &run_id]).await);
    assert!(cancelled.contains("cancel 1 batch"), "{cancelled}");
    let out = Live::outputs(vec![child]).await.remove(0);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cancelled outside this run"),
        "{}",
        stderr(&out)
    );
    // Nothing was processed, nothing billed: all pending again.
    let pending = rows(
        &live,
        &format!("SELECT status, COUNT(*) FROM generations WHERE run_id = '{run_id}' GROUP BY 1"),
    );
    assert_eq!(pending, vec![vec!["pending".to_owned(), "6".into()]]);
    let out = live.apex(&["run", "--resume", &run_id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Submissions the provider refused, per provider, and the batches it
/// took, in the order submitted.
fn refusals(live: &Live, run_id: &str) -> Vec<Vec<String>> {
    rows(
        live,
        &format!(
            "SELECT provider, state, item_count FROM batches WHERE run_id = '{run_id}' ORDER BY created_at, batch_key"
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_refused_for_its_size_is_split_at_the_cap_it_names() {
    // Anthropic answers 400 "requests: List should have at most 10 items";
    // an OpenAI batch over the cap fails validation naming it.
    let live = live(
        30,
        SimulatorConfig {
            batch_max_requests: Some(10),
            ..SimulatorConfig::default()
        },
    )
    .await;
    let out = live
        .apex(&slugs(
            &["prod-gpt4o", "prod-sonnet45"],
            &["--replicates", "12", "--no-cache"],
        ))
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    let done = rows(
        &live,
        &format!(
            "SELECT COUNT(*) FROM generations WHERE run_id = '{run_id}' AND status = 'success'"
        ),
    );
    assert_eq!(done, vec![vec!["72".to_owned()]]);
    // One refusal per provider, each followed by batches within the cap.
    let recorded = refusals(&live, &run_id);
    for provider in ["openai", "anthropic"] {
        let mine: Vec<_> = recorded.iter().filter(|r| r[0] == provider).collect();
        let refused = mine.iter().filter(|r| r[1] == "failed").count();
        assert_eq!(refused, 1, "{provider}: {mine:?}");
        assert_eq!(mine[0][1], "failed", "{provider}: {mine:?}");
        assert!(
            mine[1..]
                .iter()
                .all(|r| r[1] == "ended" && r[2].parse::<usize>().unwrap() <= 10),
            "{provider}: {mine:?}"
        );
    }
    let accepted: usize = live
        .sim
        .batches()
        .iter()
        .filter(|b| b.accepted)
        .map(|b| b.requests)
        .sum();
    assert_eq!(accepted, 72, "every item, once");
    let err = stderr(&out);
    assert!(
        err.contains("the provider's most requests per batch"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_refused_as_too_large_is_split_and_its_waves_kept() {
    let live = live(
        30,
        SimulatorConfig {
            batch_max_requests: Some(2),
            ..SimulatorConfig::default()
        },
    )
    .await;
    let out = live
        .apex(&slugs(
            &["prod-gpt4o", "prod-sonnet45"],
            &["--replicates", "3"],
        ))
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run_id = run_id_from(&stdout(&out));
    let batches = live.sim.batches();
    assert!(
        batches.iter().all(|b| !b.accepted || b.requests <= 2),
        "{batches:?}"
    );
    let refused = refusals(&live, &run_id)
        .iter()
        .filter(|r| r[1] == "failed")
        .count();
    assert!(refused >= 2, "{refused}");
    let hits = rows(
        &live,
        &format!(
            "SELECT SUM(status = 'success'), SUM(cache_hit) FROM generations WHERE run_id = '{run_id}'"
        ),
    );
    assert_eq!(hits, vec![vec!["18".to_owned(), "12".into()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn openais_enqueued_token_limit_is_learned_and_kept() {
    // Room for two of the example contexts (~1,700 tokens each) at once.
    let live = live(
        30,
        SimulatorConfig {
            batch_queue_tokens: Some(4000),
            ..SimulatorConfig::default()
        },
    )
    .await;
    let out = live
        .apex(&slugs(&["prod-gpt5"], &["--replicates", "2"]))
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let batches = live.sim.batches();
    // The first leader batch (with the probe's follower queued beside it)
    // failed as a whole; the limit it named was kept: nothing failed after.
    let failed: Vec<_> = batches.iter().filter(|b| !b.accepted).collect();
    assert_eq!(failed.len(), 1, "{batches:?}");
    assert!(
        batches.iter().all(|b| !b.accepted || b.requests <= 2),
        "{batches:?}"
    );
    let run_id = run_id_from(&stdout(&out));
    let done = rows(
        &live,
        &format!(
            "SELECT COUNT(*) FROM generations WHERE run_id = '{run_id}' AND status = 'success'"
        ),
    );
    assert_eq!(done, vec![vec!["6".to_owned()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_submitted_just_before_a_crash_is_found_not_sent_again() {
    use apex::core::run::{BatchItemRecord, BatchRecord, BatchState, Wave, custom_id};
    use apex::core::{CacheHint, CacheTtl, GenerationRequest, ProviderKind, Store};
    use std::sync::Arc;

    let live = live(30, SimulatorConfig::default()).await;
    let planned = ok(live
        .apex(&slugs(
            &["prod-gpt5", "prod-sonnet45"],
            &["--replicates", "2", "--dry-run"],
        ))
        .await);
    let run_id = apex::core::RunId::parse(
        planned
            .lines()
            .find_map(|l| l.strip_prefix("run ")?.split_whitespace().next())
            .unwrap(),
    )
    .unwrap();
    // What a process that died between submitting and recording the
    // provider's id leaves: an intent in the ledger, a batch at the provider.
    let store = apex::store::SqliteStore::open(&live.sb.db_path()).unwrap();
    let claim = store
        .claim_work(&run_id, "test", u32::MAX, &apex::core::time::now_rfc3339())
        .await
        .unwrap();
    let catalog = apex::core::Catalog::built_in();
    for (slug, kind) in [
        ("prod-gpt5", ProviderKind::OpenAi),
        ("prod-sonnet45", ProviderKind::Anthropic),
    ] {
        let condition = Arc::new(store.condition(slug).await.unwrap());
        let leaders: Vec<_> = claim
            .items
            .iter()
            .filter(|i| i.condition_slug == slug && i.replicate_index == 0)
            .collect();
        let key = uuid::Uuid::now_v7().hyphenated().to_string();
        let record = BatchRecord {
            batch_key: key.clone(),
            run_id: run_id.clone(),
            provider: kind,
            model: condition.model.clone(),
            wave: Wave::Leader,
            provider_batch_id: None,
            state: BatchState::Intent,
            created_at: apex::core::time::now_rfc3339(),
            submitted_at: None,
            items: leaders
                .iter()
                .map(|i| BatchItemRecord {
                    generation_id: i.generation_id,
                    attempt: 1,
                    custom_id: custom_id(i.generation_id, 1),
                    condition_slug: slug.into(),
                    prompt_id: i.prompt_id.clone(),
                    package_version: i.package_version.clone(),
                    replicate_index: i.replicate_index,
                })
                .collect(),
        };
        store.record_batch(&record).await.unwrap();
        let mut requests = Vec::new();
        for i in &leaders {
            let package = store
                .package(&i.prompt_id, &i.package_version)
                .await
                .unwrap();
            requests.push((
                custom_id(i.generation_id, 1),
                GenerationRequest {
                    condition: Arc::clone(&condition),
                    package: Arc::new(package),
                    cache: CacheHint::On(CacheTtl::OneHour),
                    cache_controls: catalog
                        .lookup(kind, &condition.model)
                        .unwrap()
                        .cache_controls,
                    trace: None,
                    body: Default::default(),
                    in_batch: true,
                    first_event: None,
                },
            ));
        }
        let provider = apex_providers::build(kind, live.sim.provider_config(kind)).unwrap();
        provider
            .batches()
            .unwrap()
            .submit(&key, &requests)
            .await
            .unwrap();
    }
    store.release_claims(&run_id, "test").await.unwrap();
    // One engine: a synchronous execution of the run re-attaches to the
    // batches in flight (the intents are found at the provider, never sent
    // again), collects the leaders, then sends the followers one by one.
    let apex = apex::Apex::new(Arc::new(store))
        .with_provider(
            ProviderKind::OpenAi,
            live.sim.provider_config(ProviderKind::OpenAi),
        )
        .with_provider(
            ProviderKind::Anthropic,
            live.sim.provider_config(ProviderKind::Anthropic),
        );
    let (_keep, stop) = tokio::sync::watch::channel(false);
    let report = apex
        .execute(
            &run_id,
            apex::core::executor::RunOptions {
                time_scale: 0.01,
                ..Default::default()
            },
            false,
            Arc::new(apex::core::executor::NoProgress),
            stop,
        )
        .await
        .unwrap();
    assert_eq!(report.counts.success, 12, "{report:?}");
    drop(apex);
    let sizes: Vec<usize> = live.sim.batches().iter().map(|b| b.requests).collect();
    assert_eq!(sizes, vec![3, 3], "nothing submitted again");
    assert_eq!(
        rows(
            &live,
            &format!(
                "SELECT state, provider_batch_id IS NOT NULL FROM batches WHERE run_id = '{run_id}'"
            )
        ),
        vec![vec!["ended".to_owned(), "1".into()]; 2]
    );
    let generations = rows(
        &live,
        &format!(
            "SELECT status, attempts, cache_hit, replicate_index, transport FROM generations
             WHERE run_id = '{run_id}'"
        ),
    );
    assert_eq!(generations.len(), 12);
    for g in generations {
        assert_eq!((g[0].as_str(), g[1].as_str()), ("success", "1"), "{g:?}");
        assert_eq!(g[2] == "1", g[3] == "1", "followers hit: {g:?}");
        assert_eq!(g[4], if g[3] == "0" { "batch" } else { "sync" }, "{g:?}");
    }
    assert_eq!(live.sim.requests().len(), 6, "the followers, synchronously");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_waiting_and_leaves_the_batches_running() {
    let live = live(300, SimulatorConfig::default()).await;
    let child = live.spawn(&slugs(&["prod-gpt4o"], &["--replicates", "2"]));
    live.wait_for("the leader batch", |l| submitted(l) == 1)
        .await;
    crate::signal(&child, "INT");
    let out = Live::outputs(vec![child]).await.remove(0);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("keep running at the provider"), "{err}");
    let run_id = run_id_from(&stdout(&out));
    assert!(err.contains(&format!("apex cancel {run_id}")), "{err}");
    // The batch is still recorded as in flight, its items' attempts open;
    // a resume goes in batch mode (the run recorded --batch) and
    // re-attaches to it.
    assert_eq!(submitted(&live), 1);
    assert_eq!(
        rows(
            &live,
            "SELECT COUNT(*) FROM attempts WHERE finished_at IS NULL"
        ),
        vec![vec!["3".to_owned()]],
        "one leader per context"
    );
    let out = live.apex(&["run", "--resume", &run_id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        live.sim.batches().len(),
        2,
        "re-attached, then the followers"
    );
    // GPT-4o's cache is in memory only: it does not outlive a 5-minute batch.
    assert_two_waves(&live, &run_id, 6, false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_leaves_another_live_process_its_batches() {
    let live = live(300, SimulatorConfig::default()).await;
    let first = live.spawn(&slugs(&["prod-sonnet45"], &["--replicates", "2"]));
    live.wait_for("the leader batch", |l| submitted(l) == 1)
        .await;
    let run_id = rows(&live, "SELECT run_id FROM runs")[0][0].clone();
    let second = live.apex(&["run", "--resume", &run_id]).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("another live process holds the work of this batch"),
        "{}",
        stderr(&second)
    );
    let first = Live::outputs(vec![first]).await.remove(0);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    // One leader and one follower batch: nothing collected or sent twice.
    assert_eq!(live.sim.batches().len(), 2, "{:?}", live.sim.batches());
    let done = rows(
        &live,
        &format!(
            "SELECT COUNT(*), SUM(attempts) FROM generations WHERE run_id = '{run_id}' AND status = 'success'"
        ),
    );
    assert_eq!(done, vec![vec!["6".to_owned(), "6".into()]]);
    let state = rows(&live, "SELECT state FROM runs");
    assert_eq!(state, vec![vec!["finished".to_owned()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_created_whose_answer_is_lost_is_found_not_paid_twice() {
    // The first two batches are created, but their answers never arrive.
    let live = live(
        30,
        SimulatorConfig {
            batch_create_drops: 2,
            ..SimulatorConfig::default()
        },
    )
    .await;
    let out = live
        .apex(&slugs(
            &["prod-gpt5", "prod-sonnet45"],
            &["--replicates", "2"],
        ))
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("looking for it at the provider"), "{err}");
    assert!(err.contains("recorded but never acknowledged"), "{err}");
    // Found and collected, never sent again.
    let run_id = run_id_from(&stdout(&out));
    assert_two_waves(&live, &run_id, 12, true);
    let sizes: Vec<usize> = live.sim.batches().iter().map(|b| b.requests).collect();
    assert_eq!(sizes, vec![3, 3, 3, 3]);
    let done = rows(
        &live,
        &format!(
            "SELECT COUNT(*), SUM(attempts) FROM generations WHERE run_id = '{run_id}' AND status = 'success'"
        ),
    );
    assert_eq!(done, vec![vec!["12".to_owned(), "12".into()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_key_or_model_stops_its_condition_before_a_batch_is_paid_for() {
    // The simulator knows one key: Anthropic gets another. The OpenAI
    // condition names a model the provider does not have.
    let live = live(
        30,
        SimulatorConfig {
            api_key: Some("sk-test-openai-0123456789".into()),
            ..SimulatorConfig::default()
        },
    )
    .await;
    ok(live.sb.apex(&["conditions", "register", &{
        let path = live.sb.path("bad.toml");
        std::fs::write(
            &path,
            "[[condition]]\nslug = \"no-such-model\"\nprovider = \"openai\"\nmodel = \"gpt-4o-nonexistent\"\nmax_tokens = 64\n",
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    }]));
    let mut env = live.env();
    env.retain(|(k, _)| *k != "ANTHROPIC_API_KEY");
    env.push(("ANTHROPIC_API_KEY", "sk-ant-wrong-0000000000".into()));
    let argv = slugs(
        &["prod-sonnet45", "no-such-model", "prod-gpt4o"],
        &["--replicates", "2"],
    );
    let out = live.apex_env(&argv, env).await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("condition `prod-sonnet45` stopped") && err.contains("authentication"),
        "{err}"
    );
    assert!(
        err.contains("condition `no-such-model` stopped") && err.contains("not_found"),
        "{err}"
    );
    // One free request each for the two that stopped; only the good
    // condition's batches were submitted.
    let checks: Vec<String> = live
        .sim
        .arrivals()
        .into_iter()
        .map(|a| a.request)
        .filter(|r| r.contains("/models/") || r.contains("count_tokens"))
        .collect();
    assert_eq!(checks.len(), 3, "{checks:?}");
    let batches = live.sim.batches();
    assert!(
        batches
            .iter()
            .all(|b| b.provider == apex::core::ProviderKind::OpenAi),
        "{batches:?}"
    );
    assert_eq!(batches.iter().map(|b| b.requests).sum::<usize>(), 6);
    assert!(live.sim.requests().is_empty());
    let run_id = run_id_from(&stdout(&out));
    let left = rows(
        &live,
        &format!(
            "SELECT condition_slug, status, COUNT(*) FROM generations WHERE run_id = '{run_id}' GROUP BY 1, 2 ORDER BY 1, 2"
        ),
    );
    assert_eq!(
        left,
        vec![
            vec!["no-such-model".to_owned(), "pending".into(), "6".into()],
            vec!["prod-gpt4o".to_owned(), "success".into(), "6".into()],
            vec!["prod-sonnet45".to_owned(), "pending".into(), "6".into()],
        ]
    );
}
