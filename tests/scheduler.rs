//! Scheduler tests on paused tokio time: an in-process provider with a
//! prompt cache like the real ones, the SQLite ledger in memory, and the
//! executor in between.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex::core::context::estimate_tokens;
use apex::core::executor::{Executor, NoProgress, RunOptions};
use apex::core::limiter::{LimitTable, SAFETY_MARGIN, WINDOW};
use apex::core::provider::{ErrorClass, RateLimitSnapshot};
use apex::core::{
    AttemptError, Catalog, Condition, ContextPackage, Generated, GenerationRequest, NewRun, Plan,
    PlanOptions, Provider, ProviderKind, RequestPreview, RunId, Store, Usage,
};
use apex::store::SqliteStore;
use async_trait::async_trait;
use proptest::prelude::*;
use tokio::time::Instant;

#[derive(Debug, Clone)]
struct Call {
    generation_id: i64,
    sent: Instant,
    done: Instant,
    usage: Option<Usage>,
    max_tokens: u64,
}

/// A provider whose cache serves a prefix only after the request that wrote
/// it has completed, with scripted latencies and failures.
struct FakeProvider {
    kind: ProviderKind,
    latencies: Mutex<VecDeque<Duration>>,
    default_latency: Duration,
    output_tokens: u64,
    failures: Mutex<VecDeque<AttemptError>>,
    cache: Mutex<HashMap<String, Instant>>,
    calls: Mutex<Vec<Call>>,
    /// Rate-limit headers sent with every success.
    headers: Mutex<RateLimitSnapshot>,
    /// Latencies by generation, whatever order requests arrive in.
    latency_of: Mutex<HashMap<i64, Duration>>,
}

impl FakeProvider {
    fn new(kind: ProviderKind, latency: Duration) -> Arc<Self> {
        Arc::new(Self {
            kind,
            latencies: Mutex::new(VecDeque::new()),
            default_latency: latency,
            output_tokens: 100,
            failures: Mutex::new(VecDeque::new()),
            cache: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
            headers: Mutex::new(RateLimitSnapshot::default()),
            latency_of: Mutex::new(HashMap::new()),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn preview(&self, _: &GenerationRequest) -> RequestPreview {
        RequestPreview {
            url: "fake://".into(),
            body: String::new(),
            request_hash: String::new(),
        }
    }

    async fn generate(&self, request: &GenerationRequest) -> Result<Generated, AttemptError> {
        let sent = Instant::now();
        let generation_id: i64 = request
            .trace
            .as_deref()
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let max_tokens = u64::from(request.condition.max_tokens);
        let failure = self.failures.lock().unwrap().pop_front();
        if let Some(error) = failure {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.calls.lock().unwrap().push(Call {
                generation_id,
                sent,
                done: Instant::now(),
                usage: None,
                max_tokens,
            });
            return Err(error);
        }
        let p = &request.package;
        let prefix = p.system().map_or(0, |s| estimate_tokens(s)) + estimate_tokens(p.context());
        let rest = estimate_tokens(p.prompt());
        let hit = self
            .cache
            .lock()
            .unwrap()
            .get(p.version())
            .is_some_and(|ready| *ready <= sent);
        let fixed = self.latency_of.lock().unwrap().get(&generation_id).copied();
        let latency = fixed.unwrap_or_else(|| {
            self.latencies
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(self.default_latency)
        });
        tokio::time::sleep(latency).await;
        self.cache
            .lock()
            .unwrap()
            .entry(p.version().to_owned())
            .or_insert_with(Instant::now);
        let output = self.output_tokens.min(max_tokens);
        let usage = Usage {
            input_tokens: rest,
            cache_write_tokens: if hit { 0 } else { prefix },
            cache_write_1h_tokens: 0,
            cache_read_tokens: if hit { prefix } else { 0 },
            output_tokens: output,
            reasoning_tokens: 0,
        };
        self.calls.lock().unwrap().push(Call {
            generation_id,
            sent,
            done: Instant::now(),
            usage: Some(usage),
            max_tokens,
        });
        Ok(Generated {
            text: "ok".into(),
            usage,
            finish_reason: Some("end_turn".into()),
            request_id: None,
            model_snapshot: None,
            request_hash: "h".into(),
            rate_limits: *self.headers.lock().unwrap(),
        })
    }
}

struct Setup {
    store: Arc<SqliteStore>,
    run_id: RunId,
    /// generation_id -> (context index, replicate)
    cells: HashMap<i64, (u32, u32)>,
}

async fn setup(contexts: usize, context_tokens: usize, replicates: u32, max_tokens: u32) -> Setup {
    let model = (ProviderKind::Anthropic, "claude-sonnet-4-5");
    setup_on(model, contexts, context_tokens, replicates, max_tokens).await
}

/// As [`setup`], for condition `c` on another (provider, model).
async fn setup_on(
    (provider, model): (ProviderKind, &str),
    contexts: usize,
    context_tokens: usize,
    replicates: u32,
    max_tokens: u32,
) -> Setup {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let condition = Condition {
        slug: "c".into(),
        provider,
        model: model.into(),
        temperature: Some(0.7),
        top_p: None,
        max_tokens,
        reasoning_effort: None,
        api: Default::default(),
        thinking: None,
        thinking_budget: None,
        stream: false,
        store: None,
    };
    store
        .register_conditions(std::slice::from_ref(&condition))
        .await
        .unwrap();
    let packages: Vec<ContextPackage> = (0..contexts)
        .map(|i| {
            ContextPackage::new(
                format!("ctx-{i:02}"),
                None,
                format!("{i} ").repeat(context_tokens * 2),
                "Go.".into(),
            )
            .unwrap()
        })
        .collect();
    store.ingest_packages(&packages).await.unwrap();
    let plan = Plan::build(
        vec![condition],
        store.current_packages().await.unwrap(),
        PlanOptions {
            replicates,
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
    let cells = store
        .query_read_only(&format!(
            "SELECT generation_id, context_index, replicate_index
             FROM apex_audition.generations WHERE run_id = '{run_id}'"
        ))
        .await
        .unwrap()
        .rows
        .iter()
        .map(|row| {
            let int = |i: usize| match row[i] {
                apex::core::SqlValue::Integer(v) => v,
                ref other => panic!("not an integer: {other:?}"),
            };
            (int(0), (int(1) as u32, int(2) as u32))
        })
        .collect();
    Setup {
        store,
        run_id,
        cells,
    }
}

/// An executor over `store` with the fake as its one provider.
fn executor(store: Arc<dyn Store>, fake: &Arc<FakeProvider>, options: RunOptions) -> Executor {
    let mut providers: HashMap<ProviderKind, Arc<dyn Provider>> = HashMap::new();
    providers.insert(fake.kind(), fake.clone());
    Executor::new(
        store,
        providers,
        Arc::new(Catalog::built_in()),
        options,
        Arc::new(NoProgress),
    )
}

async fn execute(
    setup: &Setup,
    provider: Arc<FakeProvider>,
    options: RunOptions,
) -> apex::core::executor::RunReport {
    let executor = executor(setup.store.clone(), &provider, options);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    executor.execute(&setup.run_id, false, rx).await.unwrap()
}

fn limits(rpm: u64, itpm: u64, otpm: u64) -> LimitTable {
    LimitTable::with_file(&format!(
        "[anthropic.\"claude-sonnet-4-5\"]\nrpm = {rpm}\nitpm = {itpm}\notpm = {otpm}\n"
    ))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn leaders_before_followers_and_followers_before_new_leaders() {
    let s = setup(5, 2000, 3, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(2));
    let options = RunOptions {
        concurrency: 3,
        limits: LimitTable::none(),
        ..RunOptions::default()
    };
    let report = execute(&s, Arc::clone(&fake), options).await;
    assert_eq!(report.counts.success, 15);
    let calls = fake.calls();
    let leader_done: HashMap<u32, Instant> = calls
        .iter()
        .filter(|c| s.cells[&c.generation_id].1 == 0)
        .map(|c| (s.cells[&c.generation_id].0, c.done))
        .collect();
    for c in &calls {
        let (ctx, rep) = s.cells[&c.generation_id];
        if rep > 0 {
            // A follower goes only after its leader's response.
            assert!(
                c.sent >= leader_done[&ctx],
                "follower of ctx {ctx} sent before its leader completed"
            );
            // Every cache read: the leader wrote, the followers read.
            assert!(c.usage.unwrap().cache_read_tokens > 0);
        }
    }
    // No new leader starts while a released follower is still waiting.
    for leader in calls.iter().filter(|c| s.cells[&c.generation_id].1 == 0) {
        for f in calls.iter().filter(|c| s.cells[&c.generation_id].1 > 0) {
            let released = leader_done[&s.cells[&f.generation_id].0];
            if released < leader.sent {
                assert!(
                    f.sent <= leader.sent,
                    "a leader jumped ahead of a released follower"
                );
            }
        }
    }
    let hits = calls
        .iter()
        .filter(|c| c.usage.unwrap().cache_read_tokens > 0)
        .count();
    assert_eq!(
        hits * 3,
        calls.len() * 2,
        "cache-hit ratio is exactly (R-1)/R"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_429_pauses_the_model() {
    // The probe (ctx-00) meets a 429 with retry-after 7 s. The condition is
    // then open, so ctx-01's leader could go at once: the pause must hold
    // it (and the retry) back, with limits and without (no bucket).
    for table in [limits(100, 1_000_000, 100_000), LimitTable::none()] {
        let s = setup(2, 2000, 1, 200).await;
        let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
        let mut error = AttemptError::new(ErrorClass::RateLimited, "rate_limit_error: slow down");
        error.http_status = Some(429);
        error.retry_after = Some(Duration::from_secs(7));
        fake.failures.lock().unwrap().push_back(error);
        let options = RunOptions {
            concurrency: 4,
            limits: table,
            ..RunOptions::default()
        };
        let report = execute(&s, Arc::clone(&fake), options).await;
        assert_eq!((report.counts.success, report.rate_limited), (2, 1));
        let calls = fake.calls();
        assert_eq!(calls.len(), 3);
        let rejected = calls[0].done;
        for later in &calls[1..] {
            let gap = later.sent.duration_since(rejected);
            assert!(
                gap >= Duration::from_secs(7) - Duration::from_millis(60),
                "sent {gap:?} after the 429: the model was not paused"
            );
            assert!(
                gap < Duration::from_secs(8),
                "backoff added on top of retry-after: {gap:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_per_window_when_the_limit_allows_one() {
    // ITPM admits one leader (a 4K-token cache write) per minute.
    let s = setup(3, 4000, 1, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let options = RunOptions {
        concurrency: 8,
        limits: limits(100, 5000, 100_000),
        ..RunOptions::default()
    };
    let started = Instant::now();
    execute(&s, Arc::clone(&fake), options).await;
    let sends: Vec<Duration> = fake
        .calls()
        .iter()
        .map(|c| c.sent.duration_since(started))
        .collect();
    assert_eq!(sends.len(), 3);
    assert!(
        sends[1] >= WINDOW + SAFETY_MARGIN
            && sends[1] < WINDOW + SAFETY_MARGIN + Duration::from_secs(1),
        "{sends:?}"
    );
    assert!(sends[2] >= (WINDOW + SAFETY_MARGIN) * 2, "{sends:?}");
}

/// For every window of the server's length, the sum of what arrived in it.
fn max_in_any_window(points: &[(Instant, u64)]) -> u64 {
    let mut points = points.to_vec();
    points.sort_by_key(|(t, _)| *t);
    let mut best = 0;
    for (i, (start, _)) in points.iter().enumerate() {
        let sum: u64 = points[i..]
            .iter()
            .take_while(|(t, _)| t.duration_since(*start) < WINDOW)
            .map(|(_, v)| v)
            .sum();
        best = best.max(sum);
    }
    best
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Limits are never exceeded in any 60-second window, whatever the plan
    /// and the latencies.
    #[test]
    fn limits_never_exceeded(
        contexts in 1usize..6,
        replicates in 1u32..4,
        context_tokens in 1100usize..6000,
        max_tokens in 50u32..3000,
        latencies in proptest::collection::vec(100u64..8000, 1..40),
        rpm in 2u64..12,
        concurrency in 1usize..6,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        runtime.block_on(async {
            let s = setup(contexts, context_tokens, replicates, max_tokens).await;
            let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_millis(700));
            fake.latencies.lock().unwrap().extend(latencies.iter().map(|ms| Duration::from_millis(*ms)));
            let itpm = 6000 + context_tokens as u64;
            let otpm = 3 * u64::from(max_tokens);
            let options = RunOptions { concurrency, limits: limits(rpm, itpm, otpm), ..RunOptions::default() };
            let report = execute(&s, Arc::clone(&fake), options).await;
            prop_assert_eq!(report.counts.success as usize, contexts * replicates as usize);
            let calls = fake.calls();
            let requests: Vec<(Instant, u64)> = calls.iter().map(|c| (c.sent, 1)).collect();
            // ITPM: uncached input + cache writes; OTPM: as the server counts
            // it, reserved at max tokens while in flight, then the output.
            let input: Vec<(Instant, u64)> = calls.iter().map(|c| (c.sent, c.usage.map_or(0, |u| u.input_tokens + u.cache_write_tokens))).collect();
            let output: Vec<(Instant, u64)> = calls.iter().map(|c| (c.sent, c.usage.map_or(c.max_tokens, |u| u.output_tokens))).collect();
            prop_assert!(max_in_any_window(&requests) <= rpm);
            prop_assert!(max_in_any_window(&input) <= itpm);
            prop_assert!(max_in_any_window(&output) <= otpm);
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_false_is_not_retried() {
    let s = setup(1, 2000, 1, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let mut error = AttemptError::new(ErrorClass::ServerError, "api_error: boom");
    error.http_status = Some(500);
    error.server_refuses_retry = true;
    fake.failures.lock().unwrap().push_back(error);
    let report = execute(
        &s,
        Arc::clone(&fake),
        RunOptions {
            limits: LimitTable::none(),
            ..RunOptions::default()
        },
    )
    .await;
    assert_eq!((report.counts.error, fake.calls().len()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_can_never_fit_is_refused_not_waited_for() {
    // A 4,000-token leader against a 3,000 ITPM limit, as a --resume with
    // tighter limits would meet it.
    let s = setup(1, 4000, 1, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let store: Arc<dyn Store> = s.store.clone();
    let options = RunOptions {
        limits: limits(100, 3000, 100_000),
        ..RunOptions::default()
    };
    let executor = executor(store, &fake, options);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = executor.execute(&s.run_id, false, rx).await.unwrap();
    assert_eq!(report.stopped.len(), 1);
    assert!(
        report.stopped[0].1.contains("can never be sent"),
        "{:?}",
        report.stopped
    );
    assert!(fake.calls().is_empty());
    assert_eq!(
        report.counts.pending, 1,
        "left pending for a resume with the right limits"
    );
}

/// The SQLite store, except that recording the end of one chosen generation
/// fails, as a full disk or a lost database connection would, and that
/// beginning chosen generations is refused once as if another process had
/// taken their claim over.
struct FailingEnd {
    inner: Arc<SqliteStore>,
    fail_for: i64,
    refuse_begin_once: Mutex<Vec<i64>>,
    /// Storing any result fails this many more times (an outage that ends).
    outage: Mutex<u32>,
    /// Reading a context finds it edited by hand.
    corrupt_contexts: bool,
    /// Reading a stored token count fails this many more times.
    count_outage: Mutex<u32>,
}

impl FailingEnd {
    /// A store over `inner` that fails nothing; tests set what fails.
    fn over(inner: &Arc<SqliteStore>) -> Self {
        Self {
            inner: Arc::clone(inner),
            fail_for: -1,
            refuse_begin_once: Mutex::new(Vec::new()),
            outage: Mutex::new(0),
            corrupt_contexts: false,
            count_outage: Mutex::new(0),
        }
    }
}

#[async_trait]
impl Store for FailingEnd {
    fn backend(&self) -> &'static str {
        "failing"
    }
    async fn register_conditions(
        &self,
        c: &[Condition],
    ) -> apex::core::Result<apex::core::RegisterReport> {
        self.inner.register_conditions(c).await
    }
    async fn conditions(&self) -> apex::core::Result<Vec<apex::core::ConditionInfo>> {
        self.inner.conditions().await
    }
    async fn condition(&self, slug: &str) -> apex::core::Result<Condition> {
        self.inner.condition(slug).await
    }
    async fn ingest_packages(
        &self,
        p: &[ContextPackage],
    ) -> apex::core::Result<apex::core::IngestReport> {
        self.inner.ingest_packages(p).await
    }
    async fn current_packages(&self) -> apex::core::Result<Vec<apex::core::PackageRef>> {
        self.inner.current_packages().await
    }
    async fn package(&self, id: &str, version: &str) -> apex::core::Result<ContextPackage> {
        if self.corrupt_contexts {
            return Err(apex::core::Error::Corrupt(format!(
                "context package `{id}` version {version} does not match its stored text"
            )));
        }
        self.inner.package(id, version).await
    }
    async fn create_run(&self, run: &NewRun, plan: &Plan) -> apex::core::Result<()> {
        self.inner.create_run(run, plan).await
    }
    async fn run(&self, run_id: &RunId) -> apex::core::Result<apex::core::RunInfo> {
        self.inner.run(run_id).await
    }
    async fn runs(&self) -> apex::core::Result<Vec<apex::core::RunInfo>> {
        self.inner.runs().await
    }
    async fn run_conditions(&self, run_id: &RunId) -> apex::core::Result<Vec<Condition>> {
        self.inner.run_conditions(run_id).await
    }
    async fn set_run_state(
        &self,
        run_id: &RunId,
        state: apex::core::RunState,
    ) -> apex::core::Result<()> {
        self.inner.set_run_state(run_id, state).await
    }
    async fn claim_work(
        &self,
        run_id: &RunId,
        worker: &str,
        max: u32,
        stale: &str,
    ) -> apex::core::Result<apex::core::Claim> {
        self.inner.claim_work(run_id, worker, max, stale).await
    }
    async fn renew_claims(&self, run_id: &RunId, worker: &str) -> apex::core::Result<()> {
        self.inner.renew_claims(run_id, worker).await
    }
    async fn release_claims(&self, run_id: &RunId, worker: &str) -> apex::core::Result<()> {
        self.inner.release_claims(run_id, worker).await
    }
    async fn share_pacing(
        &self,
        worker: &str,
        usage: &[(String, [u64; 3], u64)],
        fresh_within: Duration,
    ) -> apex::core::Result<Vec<apex::core::PacingShare>> {
        self.inner.share_pacing(worker, usage, fresh_within).await
    }
    async fn leave_pacing(&self, worker: &str) -> apex::core::Result<()> {
        self.inner.leave_pacing(worker).await
    }
    async fn o200k_split(&self, id: &str, version: &str) -> apex::core::Result<Option<(u64, u64)>> {
        let failing = {
            let mut outage = self.count_outage.lock().unwrap();
            let failing = *outage > 0;
            *outage = outage.saturating_sub(1);
            failing
        };
        if failing {
            return Err(apex::core::Error::store_msg("the ledger is restarting"));
        }
        self.inner.o200k_split(id, version).await
    }
    async fn set_run_flags(
        &self,
        run_id: &RunId,
        flags: &serde_json::Value,
    ) -> apex::core::Result<()> {
        self.inner.set_run_flags(run_id, flags).await
    }
    async fn claim_holders(&self, run_id: &RunId) -> apex::core::Result<Vec<String>> {
        self.inner.claim_holders(run_id).await
    }
    async fn usage_by_condition(
        &self,
        run_id: &RunId,
    ) -> apex::core::Result<Vec<apex::core::ConditionUsage>> {
        self.inner.usage_by_condition(run_id).await
    }
    async fn success_latency_at(
        &self,
        run_id: &RunId,
        condition: &str,
        rank: u64,
    ) -> apex::core::Result<Option<u64>> {
        self.inner.success_latency_at(run_id, condition, rank).await
    }
    async fn run_packages(&self, run_id: &RunId) -> apex::core::Result<Vec<(String, String)>> {
        self.inner.run_packages(run_id).await
    }
    async fn reset_errors(&self, run_id: &RunId) -> apex::core::Result<u64> {
        self.inner.reset_errors(run_id).await
    }
    async fn begin_attempt(
        &self,
        id: i64,
        attempt: u32,
        worker: Option<&str>,
    ) -> apex::core::Result<()> {
        let refused = {
            let mut refuse = self.refuse_begin_once.lock().unwrap();
            let found = refuse.iter().position(|r| *r == id);
            found.map(|i| refuse.remove(i)).is_some()
        };
        if refused {
            return Err(apex::core::Error::NotClaimable(id));
        }
        self.inner.begin_attempt(id, attempt, worker).await
    }
    async fn end_attempt(
        &self,
        id: i64,
        attempt: u32,
        end: &apex::core::AttemptEnd,
    ) -> apex::core::Result<()> {
        if id == self.fail_for {
            return Err(apex::core::Error::store_msg("disk full"));
        }
        {
            let mut outage = self.outage.lock().unwrap();
            if *outage > 0 {
                *outage -= 1;
                return Err(apex::core::Error::store_msg("connection refused"));
            }
        }
        self.inner.end_attempt(id, attempt, end).await
    }
    async fn error_rows(&self, run_id: &RunId) -> apex::core::Result<Vec<apex::core::ErrorRow>> {
        self.inner.error_rows(run_id).await
    }
    async fn status_counts(
        &self,
        run_id: &RunId,
    ) -> apex::core::Result<Vec<apex::core::StatusRow>> {
        self.inner.status_counts(run_id).await
    }
    async fn remaining_by_condition(
        &self,
        run_id: &RunId,
    ) -> apex::core::Result<Vec<(String, u64)>> {
        self.inner.remaining_by_condition(run_id).await
    }
    async fn attempts_page(
        &self,
        run_id: &RunId,
        after: (i64, u32),
        limit: u32,
    ) -> apex::core::Result<Vec<apex::core::AttemptRow>> {
        self.inner.attempts_page(run_id, after, limit).await
    }
    async fn generations_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> apex::core::Result<Vec<apex::core::GenerationRow>> {
        self.inner.generations_page(run_id, after, limit).await
    }
    async fn generations_brief_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> apex::core::Result<Vec<apex::core::GenerationRow>> {
        self.inner
            .generations_brief_page(run_id, after, limit)
            .await
    }
    async fn query_read_only(&self, sql: &str) -> apex::core::Result<apex::core::QueryResult> {
        self.inner.query_read_only(sql).await
    }
    async fn record_batch(&self, batch: &apex::core::run::BatchRecord) -> apex::core::Result<()> {
        self.inner.record_batch(batch).await
    }
    async fn update_batch(
        &self,
        batch_key: &str,
        provider_batch_id: Option<&str>,
        state: apex::core::run::BatchState,
    ) -> apex::core::Result<()> {
        self.inner
            .update_batch(batch_key, provider_batch_id, state)
            .await
    }
    async fn open_batches(
        &self,
        run_id: &RunId,
    ) -> apex::core::Result<Vec<apex::core::run::BatchRecord>> {
        self.inner.open_batches(run_id).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_ledger_failure_stops_new_work_but_stores_what_is_in_flight() {
    // ctx-00 goes alone (the condition's first request); then ctx-01 and
    // ctx-02 go together, and storing ctx-01 fails while ctx-02 is in flight.
    let s = setup(4, 2000, 1, 200).await;
    let ids: Vec<i64> = {
        let mut v: Vec<(i64, u32)> = s.cells.iter().map(|(id, (ctx, _))| (*id, *ctx)).collect();
        v.sort_by_key(|(_, ctx)| *ctx);
        v.into_iter().map(|(id, _)| id).collect()
    };
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    // By generation: ctx-01 and ctx-02 go together, whichever leaves first.
    fake.latency_of.lock().unwrap().extend([
        (ids[0], Duration::from_secs(1)),
        (ids[1], Duration::from_secs(1)),
        (ids[2], Duration::from_secs(5)),
    ]);
    let store: Arc<dyn Store> = Arc::new(FailingEnd {
        fail_for: ids[1],
        ..FailingEnd::over(&s.store)
    });
    // The ledger has failed for good (no retries): see the patience tests
    // below for a ledger that comes back.
    let options = RunOptions {
        concurrency: 2,
        limits: LimitTable::none(),
        ledger_patience: Duration::ZERO,
        ..RunOptions::default()
    };
    let executor = executor(store, &fake, options);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let err = executor.execute(&s.run_id, false, rx).await.unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    let status = |id: i64| {
        let store = Arc::clone(&s.store);
        async move {
            store
                .query_read_only(&format!(
                    "SELECT status FROM apex_audition.generations WHERE generation_id = {id}"
                ))
                .await
                .unwrap()
                .rows[0][0]
                .to_string()
        }
    };
    assert_eq!(status(ids[0]).await, "success");
    assert_eq!(
        status(ids[1]).await,
        "running",
        "its response could not be stored; a resume sends it again"
    );
    assert_eq!(
        status(ids[2]).await,
        "success",
        "the request in flight finished and was stored"
    );
    assert_eq!(
        status(ids[3]).await,
        "pending",
        "nothing new started after the failure"
    );
    assert_eq!(fake.calls().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn followers_of_a_failed_leader_are_paced_as_cache_writers() {
    // The leader fails for good (400); its three followers each write the
    // 4,000-token prefix. ITPM 9,000 admits two such writes a minute, so
    // they must not all leave at once.
    let s = setup(1, 4000, 4, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let mut bad = AttemptError::new(ErrorClass::InvalidRequest, "invalid_request_error: no");
    bad.http_status = Some(400);
    fake.failures.lock().unwrap().push_back(bad);
    let itpm = 9000;
    let options = RunOptions {
        concurrency: 8,
        limits: limits(100, itpm, 100_000),
        ..RunOptions::default()
    };
    let report = execute(&s, Arc::clone(&fake), options).await;
    assert_eq!((report.counts.error, report.counts.success), (1, 3));
    let input: Vec<(Instant, u64)> = fake
        .calls()
        .iter()
        .map(|c| {
            (
                c.sent,
                c.usage.map_or(0, |u| u.input_tokens + u.cache_write_tokens),
            )
        })
        .collect();
    assert!(
        max_in_any_window(&input) <= itpm,
        "cold followers were reserved as cache readers: {input:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_closed_stop_channel_is_not_a_stop() {
    let s = setup(3, 2000, 2, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let executor = executor(
        s.store.clone(),
        &fake,
        RunOptions {
            limits: LimitTable::none(),
            ..RunOptions::default()
        },
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    drop(tx);
    let report = executor.execute(&s.run_id, false, rx).await.unwrap();
    assert!(!report.interrupted);
    assert_eq!(report.counts.success, 6, "{:?}", report.counts);
}

#[tokio::test(start_paused = true)]
async fn a_group_whose_claim_was_refused_is_claimed_again() {
    // Beginning the first leader is refused once, as when another process
    // took the claim over; the ledger still lists the group as this
    // worker's, so the next claim hands it back and it must be sent.
    let s = setup(2, 2000, 2, 200).await;
    let first = s
        .cells
        .iter()
        .find(|(_, cell)| **cell == (0, 0))
        .map(|(id, _)| *id)
        .unwrap();
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let store: Arc<dyn Store> = Arc::new(FailingEnd {
        refuse_begin_once: Mutex::new(vec![first]),
        ..FailingEnd::over(&s.store)
    });
    let executor = executor(
        store,
        &fake,
        RunOptions {
            limits: LimitTable::none(),
            ..RunOptions::default()
        },
    );
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = executor.execute(&s.run_id, false, rx).await.unwrap();
    assert_eq!(report.counts.success, 4, "{:?}", report.counts);
}

#[tokio::test(start_paused = true)]
async fn no_rate_limiting_stays_off_whatever_the_headers_say() {
    let s = setup(4, 2000, 1, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    *fake.headers.lock().unwrap() = RateLimitSnapshot {
        requests: Some(apex::core::provider::LimitBucket {
            limit: Some(1),
            remaining: Some(0),
            reset_after: Some(Duration::from_secs(60)),
        }),
        ..RateLimitSnapshot::default()
    };
    let started = Instant::now();
    let options = RunOptions {
        concurrency: 8,
        limits: LimitTable::none(),
        ..RunOptions::default()
    };
    let report = execute(&s, Arc::clone(&fake), options).await;
    assert_eq!(report.counts.success, 4);
    let last = fake.calls().iter().map(|c| c.sent).max().unwrap();
    assert!(
        last.duration_since(started) < Duration::from_secs(5),
        "paced by a limit learned from headers: {:?}",
        last.duration_since(started)
    );
}

/// An executor over a faulty ledger with 30 s of patience.
fn faulty_executor(store: FailingEnd, fake: &Arc<FakeProvider>) -> Executor {
    let options = RunOptions {
        concurrency: 2,
        limits: LimitTable::none(),
        ledger_patience: Duration::from_secs(30),
        ..RunOptions::default()
    };
    executor(Arc::new(store), fake, options)
}

#[tokio::test(start_paused = true)]
async fn a_ledger_that_comes_back_within_its_patience_loses_nothing() {
    let s = setup(3, 2000, 2, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let store = FailingEnd {
        // Eight failed writes: seconds of retries, well within 30 s.
        outage: Mutex::new(8),
        ..FailingEnd::over(&s.store)
    };
    let executor = faulty_executor(store, &fake);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = executor.execute(&s.run_id, false, rx).await.unwrap();
    assert_eq!(report.counts.success, 6, "{:?}", report.counts);
    assert_eq!(fake.calls().len(), 6, "nothing sent twice");
}

#[tokio::test(start_paused = true)]
async fn a_token_count_read_waits_out_a_ledger_outage() {
    // OpenAI contexts are paced by the exact counts kept in the ledger.
    let s = setup_on((ProviderKind::OpenAi, "gpt-4o"), 2, 2000, 2, 200).await;
    let fake = FakeProvider::new(ProviderKind::OpenAi, Duration::from_secs(1));
    let store = FailingEnd {
        count_outage: Mutex::new(3),
        ..FailingEnd::over(&s.store)
    };
    let executor = faulty_executor(store, &fake);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let report = executor.execute(&s.run_id, false, rx).await.unwrap();
    assert_eq!(report.counts.success, 4, "{:?}", report.counts);
}

#[tokio::test(start_paused = true)]
async fn results_the_ledger_never_takes_are_handed_back_not_lost() {
    let s = setup(2, 2000, 1, 200).await;
    let lost = s
        .cells
        .iter()
        .find(|(_, cell)| **cell == (0, 0))
        .map(|(id, _)| *id)
        .unwrap();
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let store = FailingEnd {
        fail_for: lost,
        ..FailingEnd::over(&s.store)
    };
    let executor = faulty_executor(store, &fake);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let err = executor.execute(&s.run_id, false, rx).await.unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "retried for its patience"
    );
    assert!(err.to_string().contains("disk full"), "{err}");
    let results = executor.take_unstored();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].generation_id, lost);
    assert!(matches!(results[0].end, apex::core::AttemptEnd::Success(_)));
}

#[tokio::test(start_paused = true)]
async fn a_ledger_edited_by_hand_is_not_retried() {
    let s = setup(1, 2000, 1, 200).await;
    let fake = FakeProvider::new(ProviderKind::Anthropic, Duration::from_secs(1));
    let store = FailingEnd {
        corrupt_contexts: true,
        ..FailingEnd::over(&s.store)
    };
    let executor = faulty_executor(store, &fake);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let err = executor.execute(&s.run_id, false, rx).await.unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "retried what cannot succeed: {:?}",
        started.elapsed()
    );
    assert!(fake.calls().is_empty());
}

/// Batch mode through the facade, against the simulator's Batch APIs in
/// real (scaled) time: a stop channel whose sender is dropped means no
/// stop will come, and waiting on batches still sleeps between polls.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_stop_channel_never_turns_waiting_on_batches_into_a_busy_loop() {
    use apex::providers::simulator::{Simulator, SimulatorConfig};
    let sim = Simulator::start(
        SimulatorConfig {
            time_scale: 0.01,
            // 1.2 s a batch here: polls start at 50 ms and double to 300 ms.
            batch_time: Duration::from_secs(120),
            ..SimulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let apex = apex::Apex::open("sqlite::memory:")
        .await
        .unwrap()
        .with_provider(
            ProviderKind::Anthropic,
            sim.provider_config(ProviderKind::Anthropic),
        );
    apex.register(
        &apex::core::parse_conditions(
            "[[condition]]\nslug = \"s\"\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-5-5\"\nthinking = \"disabled\"\nmax_tokens = 64\n",
        )
        .unwrap(),
    )
    .await
    .unwrap();
    for i in 1..=3 {
        let text = format!("Document {i}. ").repeat(2000);
        apex.ingest(&[
            ContextPackage::new(format!("ctx-{i}"), None, text, "Summarise.".into()).unwrap(),
        ])
        .await
        .unwrap();
    }
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    drop(stop_sender);
    let options = RunOptions {
        time_scale: 0.01,
        batch: true,
        ..RunOptions::default()
    };
    let spec = apex::RunSpec::new(["s"]).replicates(3);
    let (_, report) = apex
        .run(&spec, options, Arc::new(NoProgress), stop)
        .await
        .unwrap();
    assert_eq!(report.counts.success, 9, "{report:?}");
    let polls = sim
        .arrivals()
        .iter()
        .filter(|a| {
            a.request.starts_with("GET /v1/messages/batches/") && !a.request.ends_with("/results")
        })
        .count();
    // Two waves of 1.2 s, each polled at 50, 100, 200, 300, 300, … ms.
    assert!(
        (2..=30).contains(&polls),
        "{polls} polls of the batches' status"
    );
}
