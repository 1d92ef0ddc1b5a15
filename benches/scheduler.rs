//! Criterion benchmarks of the planner, the rate limiter and a whole run.
//!
//! ```text
//! cargo bench --bench scheduler -- --warm-up-time 1 --measurement-time 3
//! ```

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apex::core::executor::{Executor, NoProgress, RunOptions};
use apex::core::limiter::{Admission, Charge, LimitTable, Limits, RateLimiter};
use apex::core::testing::InstantProvider;
use apex::core::{
    Catalog, Condition, ContextPackage, NewRun, PackageRef, Plan, PlanOptions, Provider,
    ProviderKind, RunId, Store,
};
use apex::store::SqliteStore;
use criterion::{Criterion, criterion_group, criterion_main};

fn condition(slug: &str) -> Condition {
    Condition {
        slug: slug.into(),
        provider: ProviderKind::Anthropic,
        model: "claude-sonnet-4-5".into(),
        temperature: Some(0.7),
        top_p: None,
        max_tokens: 2048,
        reasoning_effort: None,
        api: Default::default(),
        thinking: None,
        thinking_budget: None,
        stream: false,
        store: None,
    }
}

fn packages(n: usize) -> Vec<PackageRef> {
    (0..n)
        .map(|i| PackageRef {
            id: format!("ctx-{i:05}"),
            version: format!("{i:064}"),
            estimated_tokens: 128_000,
            byte_len: 512_000,
            o200k_tokens: 110_000,
        })
        .collect()
}

fn planner(c: &mut Criterion) {
    let conditions: Vec<Condition> = ["prod-gpt5", "prod-gpt4o", "prod-sonnet45", "prod-opus41"]
        .into_iter()
        .map(condition)
        .collect();
    let production = packages(21);
    c.bench_function("plan/production_252_cells", |b| {
        b.iter(|| {
            Plan::build(
                black_box(conditions.clone()),
                black_box(production.clone()),
                PlanOptions {
                    replicates: 3,
                    limit: None,
                },
            )
            .unwrap()
        })
    });
    let large = packages(1000);
    c.bench_function("plan/10000_cells", |b| {
        b.iter(|| {
            Plan::build(
                vec![condition("c")],
                black_box(large.clone()),
                PlanOptions {
                    replicates: 10,
                    limit: None,
                },
            )
            .unwrap()
        })
    });
}

fn limiter(c: &mut Criterion) {
    c.bench_function("limiter/reserve_settle_1000", |b| {
        b.iter(|| {
            let mut limiter = RateLimiter::fixed(1.0);
            let limits = Limits {
                rpm: Some(1_000_000),
                tpm: None,
                itpm: Some(u64::MAX / 4),
                otpm: Some(u64::MAX / 4),
                ..Limits::default()
            };
            limiter.configure("k", ProviderKind::Anthropic, limits);
            let now = std::time::Instant::now();
            for _ in 0..1000 {
                let charge = Charge {
                    requests: 1,
                    input: 128_000,
                    output: 2048,
                };
                let Admission::Granted(r) = limiter.try_reserve("k", charge, now) else {
                    panic!("limits are generous")
                };
                limiter.settle(
                    &r,
                    Some(Charge {
                        requests: 1,
                        input: 128_000,
                        output: 300,
                    }),
                    now,
                );
            }
        })
    });
}

/// 10,000 generations (1,000 contexts x 10 replicates) against an instant
/// provider, SQLite ledger in a temporary file; only execution is timed.
fn whole_run(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("run");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(criterion::Throughput::Elements(10_000));
    group.bench_function("10000_generations_sqlite", |b| {
        b.to_async(&runtime).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = std::env::temp_dir().join(format!("apex-crit-{}", uuid_like()));
                std::fs::create_dir_all(&dir).unwrap();
                let store = Arc::new(SqliteStore::open(&dir.join("ledger.db")).unwrap());
                let c = condition("c");
                store
                    .register_conditions(std::slice::from_ref(&c))
                    .await
                    .unwrap();
                let texts: Vec<ContextPackage> = (0..1000)
                    .map(|i| {
                        ContextPackage::new(
                            format!("ctx-{i:05}"),
                            None,
                            format!("{i} text ").repeat(400),
                            "Go.".into(),
                        )
                        .unwrap()
                    })
                    .collect();
                store.ingest_packages(&texts).await.unwrap();
                let plan = Plan::build(
                    vec![c],
                    store.current_packages().await.unwrap(),
                    PlanOptions {
                        replicates: 10,
                        limit: None,
                    },
                )
                .unwrap();
                let run_id = RunId::generate();
                let run = NewRun {
                    run_id: run_id.clone(),
                    created_by: None,
                    notes: None,
                    flags: serde_json::json!({}),
                    dry_run: false,
                };
                store.create_run(&run, &plan).await.unwrap();
                let mut providers: HashMap<ProviderKind, Arc<dyn Provider>> = HashMap::new();
                providers.insert(
                    ProviderKind::Anthropic,
                    Arc::new(InstantProvider::new(ProviderKind::Anthropic, 100)),
                );
                let options = RunOptions {
                    concurrency: 64,
                    limits: LimitTable::none(),
                    ..RunOptions::default()
                };
                let executor = Executor::new(
                    store.clone() as Arc<dyn Store>,
                    providers,
                    Arc::new(Catalog::built_in()),
                    options,
                    Arc::new(NoProgress),
                );
                let (_stop, rx) = tokio::sync::watch::channel(false);
                let started = Instant::now();
                let report = executor.execute(&run_id, false, rx).await.unwrap();
                total += started.elapsed();
                assert_eq!(report.counts.success, 10_000);
                drop(executor);
                drop(store);
                let _ = std::fs::remove_dir_all(&dir);
            }
            total
        })
    });
    group.finish();
}

fn uuid_like() -> String {
    RunId::generate().to_string()
}

/// One share of the rate-limit budgets through a SQLite ledger file: what
/// each process pays, once per share interval (3 s at full scale), for
/// limits split with the others, whatever its request rate.
fn shared_pacing(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("apex-crit-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.join("ledger.db")).unwrap());
    let usage: Vec<(String, [u64; 3], u64)> = ["a", "b", "c", "d"]
        .iter()
        .map(|m| (format!("openai/model-{m}"), [40, 400_000, 0], 100))
        .collect();
    let minute = Duration::from_secs(60);
    // Three other processes already share the same four models.
    runtime.block_on(async {
        for worker in ["w1", "w2", "w3"] {
            store.share_pacing(worker, &usage, minute).await.unwrap();
        }
    });
    c.bench_function("pacing/share_4_models_4_processes_sqlite", |b| {
        b.to_async(&runtime).iter(|| {
            let (store, usage) = (Arc::clone(&store), usage.clone());
            async move { store.share_pacing("me", &usage, minute).await.unwrap() }
        })
    });
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, planner, limiter, whole_run, shared_pacing);
criterion_main!(benches);
