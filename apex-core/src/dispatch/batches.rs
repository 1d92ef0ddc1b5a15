//! The driver for the providers' Batch APIs (`apex run --batch`): the same
//! order as synchronous runs — a (condition, context)'s leader before its
//! followers, retries within `--max-retries`, a condition stopped by a
//! failure all its requests would share — sent in bulk, in waves.
//!
//! Items of one batch do not read each other's cache writes, but a later
//! batch reads what an earlier, ended one wrote. So a run goes in two
//! waves: a *leader* batch with one request per (condition, context)
//! writing the longest cache the model offers (Anthropic 1 hour, OpenAI
//! 24-hour retention or a 12-hour breakpoint), then, once it has ended, a
//! *follower* batch with the other replicates reading it. A group whose
//! leader's cache would be cold before its followers could be processed
//! (the leader wave took longer than what is left of its TTL) goes as
//! plain requests without cache hints, since a write nobody reads is only
//! a surcharge; so does everything with caching off or one replicate.
//!
//! Durability: each batch is recorded as an intent with its items (their
//! attempts begun) before it is submitted, and with the provider's id
//! after. [`BatchExecutor::execute`] first re-attaches to every open batch
//! of the run (an intent found at the provider by its key, or given up if
//! it never got there), waits for them, stores each result once, and only
//! then plans the next wave. A stop (Ctrl-C) stops waiting and leaves the
//! batches running.

#![allow(
    clippy::result_large_err,
    reason = "item outcomes are `AttemptError`s, as `Provider::generate` returns them"
)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::batches::{
    BatchApi, BatchCaps, BatchItemRecord, BatchProgress, BatchRecord, BatchState, Wave, custom_id,
};
use crate::catalog::{Catalog, Prices};
use crate::condition::{Condition, ProviderKind};
use crate::context::ContextPackage;
use crate::error::{Error, Result};
use crate::provider::{
    AttemptError, CacheControls, CacheHint, CacheTtl, ErrorClass, Generated, GenerationRequest,
    Provider, SharedBody,
};
use crate::run::{AttemptEnd, GenerationResult, RunId, RunState, WorkItem};
use crate::store::Store;

use super::machine::Summary;
use super::retry::{Budget, RetryPolicy, Verdict};
use super::{Progress, ProgressEvent, RunOptions, RunReport};

/// First wait between polls of a batch (times `--time-scale`); doubled
/// after every poll up to [`POLL_MAX`].
pub const POLL_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between polls (times `--time-scale`).
pub const POLL_MAX: Duration = Duration::from_secs(30);
/// Tries of a results download that fails in passing before the run stops
/// (a resume reads them again).
const RESULT_TRIES: u32 = 5;

/// How long a leader's cache lives in batch mode: the longest the model
/// offers (`None`: writes are free, so followers always go after leaders).
fn cache_lifetime(provider: ProviderKind, controls: CacheControls) -> Option<Duration> {
    match (provider, controls) {
        (ProviderKind::Anthropic, _) => Some(Duration::from_secs(3600)),
        (ProviderKind::OpenAi, CacheControls::Breakpoints) => Some(Duration::from_secs(12 * 3600)),
        (ProviderKind::OpenAi, _) => None,
    }
}

/// When a group's cache was written, by a batch submitted at `written` that
/// took `took` to end.
#[derive(Debug, Clone, Copy)]
struct Warmth {
    written: Instant,
    took: Duration,
}

/// What a group sends in the next wave, given what is known of its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupCache {
    /// No leader has succeeded (in this execution): one leader goes.
    Unknown,
    /// A leader's cache is still warm when followers could be processed.
    Warm,
    /// It will be cold by then.
    Cold,
}

/// The next wave: for each group of unfinished items (in plan order), the
/// items to send now and in which role. `two_waves(slug)`: whether the
/// condition shares a cache among replicates; `cache(slug, prompt)`: what
/// is known of a group's cache.
pub fn plan_wave(
    items: &[WorkItem],
    two_waves: impl Fn(&str) -> bool,
    cache: impl Fn(&str, &str) -> GroupCache,
) -> Vec<(WorkItem, Wave)> {
    let mut wave = Vec::new();
    let mut led: HashSet<(&str, &str)> = HashSet::new();
    for item in items {
        let (slug, prompt) = (item.condition_slug.as_str(), item.prompt_id.as_str());
        if !two_waves(slug) {
            wave.push((item.clone(), Wave::Single));
            continue;
        }
        match cache(slug, prompt) {
            GroupCache::Warm => wave.push((item.clone(), Wave::Follower)),
            GroupCache::Cold => wave.push((item.clone(), Wave::Single)),
            // Items come in plan order: the group's first unfinished one
            // leads, the others wait for the next wave.
            GroupCache::Unknown => {
                if led.insert((slug, prompt)) {
                    wave.push((item.clone(), Wave::Leader));
                }
            }
        }
    }
    wave
}

/// Splits items (each with its upload size and, where the model has an
/// enqueued-token limit, its tokens) into batches within the caps, and
/// within `(limit, already enqueued)` of the model's enqueued-token limit.
/// Returns the batches and the items left for a later wave because the
/// queue has no room for them now; an item larger than the limit alone is
/// in neither (it can never be sent) but in the third list.
pub fn split_batches<T>(
    items: Vec<(T, usize, u64)>,
    caps: BatchCaps,
    queue: Option<(u64, u64)>,
) -> (Vec<Vec<T>>, Vec<T>, Vec<T>) {
    let mut batches = Vec::new();
    let mut later = Vec::new();
    let mut never = Vec::new();
    let (mut current, mut bytes, mut tokens) = (Vec::new(), 0usize, 0u64);
    let mut queued = queue.map_or(0, |(_, q)| q);
    for (item, size, item_tokens) in items {
        if let Some((limit, _)) = queue {
            if item_tokens > limit {
                never.push(item);
                continue;
            }
            if queued + tokens + item_tokens > limit {
                later.push(item);
                continue;
            }
        }
        if !current.is_empty()
            && (current.len() >= caps.max_requests || bytes + size > caps.max_bytes)
        {
            batches.push(std::mem::take(&mut current));
            queued += tokens;
            (bytes, tokens) = (0, 0);
        }
        current.push(item);
        bytes += size;
        tokens += item_tokens;
    }
    if !current.is_empty() {
        batches.push(current);
    }
    (batches, later, never)
}

/// One condition as the batch driver needs it.
struct ConditionInfo {
    condition: Arc<Condition>,
    controls: CacheControls,
    prices: Option<Prices>,
}

/// An item about to be submitted.
struct Outgoing {
    item: WorkItem,
    attempt: u32,
    custom_id: String,
    request: GenerationRequest,
    /// Its input tokens, where the model's enqueued tokens are limited.
    tokens: u64,
}

/// Executes runs through the providers' Batch APIs.
pub struct BatchExecutor {
    store: Arc<dyn Store>,
    providers: HashMap<ProviderKind, Arc<dyn Provider>>,
    catalog: Arc<Catalog>,
    options: RunOptions,
    progress: Arc<dyn Progress>,
}

/// Why waiting ended.
enum Waited {
    /// Every open batch ended and its results are stored.
    Ended,
    /// A stop was requested: the batches keep running.
    Stopped,
}

/// State of one execution.
struct Execution<'a> {
    executor: &'a BatchExecutor,
    run_id: &'a RunId,
    conditions: HashMap<String, ConditionInfo>,
    replicates: u32,
    /// When a failed item goes again (the synchronous runs' policy).
    retry: RetryPolicy,
    /// Outcomes per generation in this execution.
    budgets: HashMap<i64, Budget>,
    warm: HashMap<(String, String), Warmth>,
    stopped: Vec<(String, String)>,
    /// Learned enqueued-token limits per (provider, model).
    queue_limits: HashMap<(ProviderKind, String), u64>,
    packages: HashMap<(String, String), Arc<ContextPackage>>,
    bodies: HashMap<(String, String, bool), SharedBody>,
    /// Submissions in a row that did not reach the provider.
    failed_submissions: u32,
    cancelled: Option<String>,
    /// Unfinished generations other live processes held at the last claim.
    others_hold: u64,
    stop: watch::Receiver<bool>,
}

impl BatchExecutor {
    /// An executor; `providers` must hold one provider per kind the run
    /// uses, each with a Batch API.
    pub fn new(
        store: Arc<dyn Store>,
        providers: HashMap<ProviderKind, Arc<dyn Provider>>,
        catalog: Arc<Catalog>,
        options: RunOptions,
        progress: Arc<dyn Progress>,
    ) -> Self {
        Self {
            store,
            providers,
            catalog,
            options,
            progress,
        }
    }

    fn api(&self, provider: ProviderKind) -> Result<&dyn BatchApi> {
        self.providers
            .get(&provider)
            .and_then(|p| p.batches())
            .ok_or_else(|| {
                Error::Preflight(format!(
                    "{provider} has no Batch API client here; run without --batch"
                ))
            })
    }

    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.options.time_scale)
            .max(Duration::from_millis(10))
    }

    /// Executes the run's remaining generations in batches until done, or
    /// until `stop` turns true (then the batches in flight keep running;
    /// `--resume` re-attaches to them).
    pub async fn execute(
        &self,
        run_id: &RunId,
        include_errors: bool,
        stop: watch::Receiver<bool>,
    ) -> Result<RunReport> {
        let run = self.store.run(run_id).await?;
        if include_errors {
            self.store.reset_errors(run_id).await?;
        }
        let mut conditions = HashMap::new();
        for condition in self.store.run_conditions(run_id).await? {
            self.api(condition.provider)?;
            let model = self.catalog.lookup(condition.provider, &condition.model);
            conditions.insert(
                condition.slug.clone(),
                ConditionInfo {
                    controls: model.map(|m| m.cache_controls).unwrap_or_default(),
                    prices: model.map(|m| m.prices),
                    condition: Arc::new(condition),
                },
            );
        }
        self.store.set_run_state(run_id, RunState::Running).await?;
        let remaining = run.counts.pending
            + run.counts.running
            + if include_errors { run.counts.error } else { 0 };
        self.progress
            .event(&ProgressEvent::Started { total: remaining });
        let mut execution = Execution {
            executor: self,
            run_id,
            conditions,
            replicates: run.replicates.max(1),
            retry: RetryPolicy::new(
                self.options.max_retries,
                self.options.backoff_base,
                self.options.time_scale,
            ),
            budgets: HashMap::new(),
            warm: HashMap::new(),
            stopped: Vec::new(),
            queue_limits: HashMap::new(),
            packages: HashMap::new(),
            bodies: HashMap::new(),
            failed_submissions: 0,
            cancelled: None,
            others_hold: 0,
            stop,
        };
        let outcome = execution.run().await;
        let interrupted = match outcome {
            Ok(interrupted) => interrupted,
            Err(error) => {
                let _ = self
                    .store
                    .set_run_state(run_id, RunState::Interrupted)
                    .await;
                return Err(error);
            }
        };
        if !interrupted {
            self.store
                .release_claims(run_id, &self.options.worker)
                .await?;
        }
        // Stopped while batches run: the claims (and the items' open
        // attempts) stay until a resume takes them back, at once on this
        // machine, after --claim-timeout elsewhere.
        let counts = self.store.run(run_id).await?.counts;
        let stopped = execution.stopped;
        let summary = Summary {
            stopped: stopped.clone(),
            interrupted: interrupted || execution.cancelled.is_some(),
            others_hold: execution.others_hold,
            ..Summary::default()
        };
        if let Some(state) = summary.final_state(&counts) {
            self.store.set_run_state(run_id, state).await?;
        }
        Ok(RunReport {
            counts,
            stopped,
            verify_failed: false,
            interrupted,
            rate_limited: 0,
            cancelled: execution.cancelled,
        })
    }

    /// Cancels the run's batches still in flight; how many were asked to
    /// cancel. Their processed items are stored when a `--resume` collects
    /// them; the rest go back to `pending`.
    pub async fn cancel(&self, run_id: &RunId) -> Result<usize> {
        let mut cancelled = 0;
        for batch in self.store.open_batches(run_id).await? {
            let Some(id) = &batch.provider_batch_id else {
                continue;
            };
            self.api(batch.provider)?
                .cancel(id)
                .await
                .map_err(|e| Error::Preflight(format!("cannot cancel batch {id}: {e}")))?;
            cancelled += 1;
        }
        Ok(cancelled)
    }
}

impl Execution<'_> {
    fn store(&self) -> &Arc<dyn Store> {
        &self.executor.store
    }

    /// Waves until nothing is left; `true` when stopped by a request.
    async fn run(&mut self) -> Result<bool> {
        loop {
            if *self.stop.borrow() {
                return Ok(true);
            }
            // Claim first: a process collects only the batches of the work
            // it holds, so two processes on one run never store (or send
            // again) each other's items.
            let stale_before = crate::time::rfc3339_ago(
                self.executor
                    .options
                    .claim_timeout
                    .mul_f64(self.executor.options.time_scale),
            );
            let claim = self
                .store()
                .claim_work(
                    self.run_id,
                    &self.executor.options.worker,
                    u32::MAX,
                    &stale_before,
                )
                .await?;
            self.others_hold = claim.held_by_others;
            let held: HashSet<i64> = claim.items.iter().map(|i| i.generation_id).collect();
            let (mine, theirs): (Vec<BatchRecord>, Vec<BatchRecord>) = self
                .store()
                .open_batches(self.run_id)
                .await?
                .into_iter()
                .partition(|b| b.items.iter().all(|i| held.contains(&i.generation_id)));
            if !mine.is_empty() {
                match self.wait(mine).await? {
                    Waited::Stopped => return Ok(true),
                    Waited::Ended => {}
                }
                if self.cancelled.is_some() {
                    return Ok(false);
                }
                continue;
            }
            if !theirs.is_empty() {
                tracing::warn!(
                    batches = theirs.len(),
                    "another live process holds the work of this run's batches in flight; leaving them to it"
                );
            }
            let in_theirs: HashSet<i64> = theirs
                .iter()
                .flat_map(|b| b.items.iter().map(|i| i.generation_id))
                .collect();
            let stopped: HashSet<&str> = self.stopped.iter().map(|(s, _)| s.as_str()).collect();
            let items: Vec<WorkItem> = claim
                .items
                .into_iter()
                .filter(|i| {
                    !stopped.contains(i.condition_slug.as_str())
                        && !in_theirs.contains(&i.generation_id)
                })
                .collect();
            if items.is_empty() {
                return Ok(false);
            }
            let now = Instant::now();
            let wave = plan_wave(
                &items,
                |slug| {
                    self.executor.options.cache
                        && self.replicates > 1
                        && self.conditions.contains_key(slug)
                },
                |slug, prompt| self.group_cache(slug, prompt, now),
            );
            let submitted = self.submit_wave(wave).await?;
            if submitted == 0 && self.store().open_batches(self.run_id).await?.is_empty() {
                // Nothing could go (every item refused or its condition
                // stopped): what is left stays for a resume.
                return Ok(false);
            }
        }
    }

    fn group_cache(&self, slug: &str, prompt: &str, now: Instant) -> GroupCache {
        let Some(warmth) = self.warm.get(&(slug.to_owned(), prompt.to_owned())) else {
            return GroupCache::Unknown;
        };
        let info = &self.conditions[slug];
        match cache_lifetime(info.condition.provider, info.controls) {
            None => GroupCache::Warm,
            Some(ttl) => {
                let ttl = ttl.mul_f64(self.executor.options.time_scale);
                // The followers' batch is expected to take as long as the
                // leaders' did.
                if now + warmth.took < warmth.written + ttl {
                    GroupCache::Warm
                } else {
                    GroupCache::Cold
                }
            }
        }
    }

    async fn package(&mut self, id: &str, version: &str) -> Result<Arc<ContextPackage>> {
        let key = (id.to_owned(), version.to_owned());
        if let Some(p) = self.packages.get(&key) {
            return Ok(Arc::clone(p));
        }
        let p = Arc::new(self.store().package(id, version).await?);
        self.packages.insert(key, Arc::clone(&p));
        Ok(p)
    }

    /// The request one item sends in a wave.
    async fn request(
        &mut self,
        slug: &str,
        prompt: &str,
        version: &str,
        wave: Wave,
    ) -> Result<GenerationRequest> {
        let info = &self.conditions[slug];
        let condition = Arc::clone(&info.condition);
        let controls = info.controls;
        let cache = match wave {
            Wave::Single => CacheHint::Off,
            Wave::Leader | Wave::Follower => CacheHint::On(CacheTtl::OneHour),
        };
        let body = self
            .bodies
            .entry((slug.to_owned(), version.to_owned(), cache != CacheHint::Off))
            .or_default()
            .clone();
        Ok(GenerationRequest {
            condition,
            package: self.package(prompt, version).await?,
            cache,
            cache_controls: controls,
            trace: None,
            body,
            in_batch: true,
        })
    }

    /// Submits a wave; how many batches went.
    async fn submit_wave(&mut self, wave: Vec<(WorkItem, Wave)>) -> Result<usize> {
        // One batch per (provider, model, endpoint, wave): OpenAI takes one
        // model and endpoint per batch.
        type Bucket = (ProviderKind, String, crate::condition::Api, Wave);
        let mut buckets: Vec<(Bucket, Vec<WorkItem>)> = Vec::new();
        for (item, role) in wave {
            let c = &self.conditions[&item.condition_slug].condition;
            let key = (c.provider, c.model.clone(), c.api, role);
            match buckets.iter_mut().find(|(k, _)| *k == key) {
                Some((_, items)) => items.push(item),
                None => buckets.push((key, vec![item])),
            }
        }
        let mut submitted = 0;
        // Tokens this wave has enqueued per model so far (every earlier
        // batch has ended before a wave is planned).
        let mut enqueued: HashMap<(ProviderKind, String), u64> = HashMap::new();
        for ((provider, model, _, role), items) in buckets {
            let api = self.executor.api(provider)?;
            let caps = api.caps();
            let queue_room = self
                .queue_limits
                .get(&(provider, model.clone()))
                .copied()
                .or_else(|| {
                    self.executor
                        .options
                        .limits
                        .cap(&self.executor.catalog, provider, &model)
                        .batch_queue_tokens
                });
            let mut sized = Vec::with_capacity(items.len());
            for item in items {
                let attempt = item.attempts + 1;
                let request = self
                    .request(
                        &item.condition_slug,
                        &item.prompt_id,
                        &item.package_version,
                        role,
                    )
                    .await?;
                let id = custom_id(item.generation_id, attempt);
                let bytes = api.item_bytes(&id, &request);
                let tokens = if queue_room.is_some() {
                    match self
                        .store()
                        .o200k_split(&item.prompt_id, &item.package_version)
                        .await?
                    {
                        Some((a, b)) => a + b,
                        None => request.package.estimated_input_tokens(),
                    }
                } else {
                    0
                };
                sized.push((
                    Outgoing {
                        item,
                        attempt,
                        custom_id: id,
                        request,
                        tokens,
                    },
                    bytes,
                    tokens,
                ));
            }
            let queued = enqueued.entry((provider, model.clone())).or_default();
            let (batches, later, never) =
                split_batches(sized, caps, queue_room.map(|limit| (limit, *queued)));
            *queued += batches.iter().flatten().map(|o| o.tokens).sum::<u64>();
            if !later.is_empty() {
                tracing::info!(
                    model,
                    items = later.len(),
                    "the enqueued-token limit has no room for these now; they go in a later batch"
                );
            }
            for out in never {
                // It can never be sent: larger than the queue alone.
                let error = AttemptError::new(
                    ErrorClass::ExceedsRateLimit,
                    format!(
                        "the request is larger than the model's enqueued-token limit for batches ({} tokens); run it without --batch",
                        queue_room.unwrap_or(0)
                    ),
                );
                self.store()
                    .begin_attempt(out.item.generation_id, out.attempt, None)
                    .await?;
                self.fail_for_good(&out, &error).await?;
            }
            let mut queue: VecDeque<Vec<Outgoing>> = batches.into();
            while let Some(batch) = queue.pop_front() {
                match self.submit(provider, &model, role, batch).await? {
                    Submitted::Yes => submitted += 1,
                    Submitted::No => {}
                    Submitted::Split(halves) => {
                        for half in halves.into_iter().rev() {
                            queue.push_front(half);
                        }
                    }
                }
            }
        }
        Ok(submitted)
    }

    /// An item that fails for good without a batch result (its attempt
    /// begun): stored as `error`.
    async fn fail_for_good(&self, out: &Outgoing, error: &AttemptError) -> Result<()> {
        let end = AttemptEnd::Failed {
            class: error.class,
            message: error.message.clone(),
            http_status: error.http_status,
            provider_request_id: error.request_id.clone(),
            latency_ms: 0,
            last: true,
        };
        self.store()
            .end_attempt(out.item.generation_id, out.attempt, &end)
            .await?;
        self.notify_finished(
            (
                &out.item.condition_slug,
                &out.item.prompt_id,
                out.item.replicate_index,
            ),
            None,
        );
        Ok(())
    }

    /// Records one batch's intent, submits it and records its id.
    async fn submit(
        &mut self,
        provider: ProviderKind,
        model: &str,
        wave: Wave,
        batch: Vec<Outgoing>,
    ) -> Result<Submitted> {
        let record = BatchRecord {
            batch_key: uuid::Uuid::now_v7().hyphenated().to_string(),
            run_id: self.run_id.clone(),
            provider,
            model: model.to_owned(),
            wave,
            provider_batch_id: None,
            state: BatchState::Intent,
            created_at: crate::time::now_rfc3339(),
            submitted_at: None,
            items: batch
                .iter()
                .map(|o| BatchItemRecord {
                    generation_id: o.item.generation_id,
                    attempt: o.attempt,
                    custom_id: o.custom_id.clone(),
                    condition_slug: o.item.condition_slug.clone(),
                    prompt_id: o.item.prompt_id.clone(),
                    package_version: o.item.package_version.clone(),
                    replicate_index: o.item.replicate_index,
                })
                .collect(),
        };
        self.store().record_batch(&record).await?;
        let api = self.executor.api(provider)?;
        let items: Vec<(String, GenerationRequest)> = batch
            .iter()
            .map(|o| (o.custom_id.clone(), o.request.clone()))
            .collect();
        match api.submit(&record.batch_key, &items).await {
            Ok(id) => {
                self.store()
                    .update_batch(&record.batch_key, Some(&id), BatchState::Submitted)
                    .await?;
                self.failed_submissions = 0;
                tracing::info!(
                    batch = %id,
                    wave = wave.as_str(),
                    model,
                    items = batch.len(),
                    "submitted a batch"
                );
                Ok(Submitted::Yes)
            }
            Err(error) => {
                // A refusal (a 4xx) created nothing. Without one (a dropped
                // connection, a timeout, a 5xx) the batch may exist at the
                // provider: the intent stays, and waiting finds it there or
                // gives it up, so nothing is paid for twice.
                let refused = error.http_status.is_some_and(|s| (400..500).contains(&s))
                    || error.class.hands_back();
                if !refused {
                    self.failed_submissions += 1;
                    if self.failed_submissions > self.executor.options.max_retries {
                        return Err(Error::Preflight(format!(
                            "{provider} failed {} batch submissions in a row, the last with {error}; `apex run --resume {}` looks for them at the provider and tries again",
                            self.failed_submissions, self.run_id
                        )));
                    }
                    tracing::warn!(%error, "a batch submission got no answer; looking for it at the provider before sending its items again");
                    return Ok(Submitted::No);
                }
                self.refused(&record).await?;
                if error.class == ErrorClass::RequestTooLarge && batch.len() > 1 {
                    tracing::info!(model, items = batch.len(), %error, "the provider refused the batch as too large; submitting it in two halves");
                    let mut first = batch;
                    let mut second = first.split_off(first.len() / 2);
                    for out in first.iter_mut().chain(second.iter_mut()) {
                        out.attempt += 1;
                        out.item.attempts += 1;
                        out.custom_id = custom_id(out.item.generation_id, out.attempt);
                    }
                    return Ok(Submitted::Split(vec![first, second]));
                }
                if RetryPolicy::stops_condition(&error) {
                    for out in &batch {
                        self.stop_condition(&out.item.condition_slug, &error);
                    }
                    return Ok(Submitted::No);
                }
                if error.is_retryable() {
                    // A 429 on submission: its items go in the next wave,
                    // after the wait the provider asked for.
                    self.failed_submissions += 1;
                    if self.failed_submissions > self.executor.options.max_retries {
                        return Err(Error::Preflight(format!(
                            "{provider} refused {} batch submissions in a row, the last with {error}; `apex run --resume {}` tries again",
                            self.failed_submissions, self.run_id
                        )));
                    }
                    let delay = error
                        .retry_after
                        .unwrap_or_else(|| self.executor.scaled(POLL_FIRST));
                    tracing::warn!(%error, "a batch submission was refused for now; its items go in the next batch");
                    tokio::time::sleep(delay).await;
                    return Ok(Submitted::No);
                }
                // The batch itself is wrong and will stay wrong (e.g. a
                // single request over the size cap): its items fail.
                for out in &batch {
                    self.fail_for_good(out, &error).await?;
                }
                Ok(Submitted::No)
            }
        }
    }

    /// A batch that never reached the provider (or failed as a whole): its
    /// items go back to `pending`, unbilled.
    async fn refused(&self, record: &BatchRecord) -> Result<()> {
        for item in &record.items {
            self.store()
                .end_attempt(item.generation_id, item.attempt, &AttemptEnd::Abandoned)
                .await?;
        }
        self.store()
            .update_batch(&record.batch_key, None, BatchState::Failed)
            .await
    }

    fn stop_condition(&mut self, slug: &str, error: &AttemptError) {
        if self.stopped.iter().any(|(s, _)| s == slug) {
            return;
        }
        let reason = error.to_string();
        tracing::error!(condition = slug, %reason, "condition stopped");
        self.executor
            .progress
            .event(&ProgressEvent::ConditionStopped {
                condition: slug.to_owned(),
                reason: reason.clone(),
            });
        self.stopped.push((slug.to_owned(), reason));
    }

    fn notify_finished(
        &self,
        (slug, prompt_id, replicate_index): (&str, &str, u32),
        success: Option<(&Generated, Option<f64>)>,
    ) {
        self.executor.progress.event(&ProgressEvent::Finished {
            condition: slug.to_owned(),
            prompt_id: prompt_id.to_owned(),
            replicate_index,
            success: success.is_some(),
            cache_hit: success.is_some_and(|(g, _)| g.usage.cache_hit()),
            cost_usd: success.and_then(|(_, c)| c),
        });
    }

    /// Waits for open batches to end, storing each one's results as it
    /// ends.
    async fn wait(&mut self, open: Vec<BatchRecord>) -> Result<Waited> {
        let mut open: Vec<BatchRecord> = open;
        let mut interval = self.executor.scaled(POLL_FIRST);
        let poll_max = self.executor.scaled(POLL_MAX);
        let mut unanswered = 0u32;
        loop {
            let mut still_open = Vec::with_capacity(open.len());
            let (mut processed, mut total) = (0u64, 0u64);
            for mut batch in open {
                let api = self.executor.api(batch.provider)?;
                let Some(id) = batch.provider_batch_id.clone() else {
                    // An intent never acknowledged (a crash between
                    // submitting and recording, or an answer that never
                    // came): find it at the provider, or give it up.
                    match api
                        .find(&batch.batch_key, &batch.created_at, batch.items.len())
                        .await
                    {
                        Ok(Some(id)) => {
                            tracing::info!(batch = %id, "found at the provider a batch recorded but never acknowledged; re-attaching");
                            self.store()
                                .update_batch(&batch.batch_key, Some(&id), BatchState::Submitted)
                                .await?;
                            batch.provider_batch_id = Some(id);
                            batch.state = BatchState::Submitted;
                            still_open.push(batch);
                        }
                        Ok(None) => self.refused(&batch).await?,
                        Err(error) if !error.is_retryable() => {
                            return Err(Error::Preflight(format!(
                                "cannot look for batch {} at the provider: {error}",
                                batch.batch_key
                            )));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "could not list the provider's batches; trying again");
                            still_open.push(batch);
                        }
                    }
                    continue;
                };
                match api.status(&id).await {
                    Ok(status) if status.ended => {
                        unanswered = 0;
                        self.collect(&batch, &id, &status).await?;
                    }
                    Ok(status) => {
                        unanswered = 0;
                        processed += status.processed;
                        total += status.total;
                        still_open.push(batch);
                    }
                    Err(error) if error.is_retryable() && unanswered < 100 => {
                        unanswered += 1;
                        tracing::warn!(batch = %id, %error, "polling a batch failed; trying again");
                        total += batch.items.len() as u64;
                        still_open.push(batch);
                    }
                    Err(error) => {
                        return Err(Error::Preflight(format!(
                            "cannot poll batch {id}: {error}; it keeps running: `apex run --resume {}` re-attaches to it, `apex cancel {}` cancels it",
                            self.run_id, self.run_id
                        )));
                    }
                }
            }
            open = still_open;
            if open.is_empty() {
                return Ok(Waited::Ended);
            }
            self.executor.progress.event(&ProgressEvent::Waiting {
                batches: open.len() as u32,
                processed,
                total,
            });
            let _ = self
                .store()
                .renew_claims(self.run_id, &self.executor.options.worker)
                .await;
            if *self.stop.borrow() {
                return Ok(Waited::Stopped);
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                changed = self.stop.changed() => {
                    if changed.is_ok() && *self.stop.borrow() {
                        return Ok(Waited::Stopped);
                    }
                }
            }
            interval = (interval * 2).min(poll_max);
        }
    }

    /// Stores an ended batch's results, each once.
    async fn collect(
        &mut self,
        batch: &BatchRecord,
        id: &str,
        status: &BatchProgress,
    ) -> Result<()> {
        let api = self.executor.api(batch.provider)?;
        if let Some(failure) = &status.failure {
            if let Some(limit) = status.queue_limit {
                tracing::info!(model = %batch.model, limit, "the provider's enqueued-token limit for this model; later batches fit under it");
                self.queue_limits
                    .insert((batch.provider, batch.model.clone()), limit);
            } else {
                self.failed_submissions += 1;
                if self.failed_submissions > self.executor.options.max_retries {
                    return Err(Error::Preflight(format!(
                        "batch {id} failed as a whole ({failure}), {} times in a row; `apex run --resume {}` tries again",
                        self.failed_submissions, self.run_id
                    )));
                }
            }
            tracing::warn!(batch = id, error = %failure, "the batch failed as a whole; its items go in a later batch");
            return self.refused(batch).await;
        }
        let wave = batch.wave;
        let mut requests = HashMap::with_capacity(batch.items.len());
        for item in &batch.items {
            let request = self
                .request(
                    &item.condition_slug,
                    &item.prompt_id,
                    &item.package_version,
                    wave,
                )
                .await?;
            requests.insert(item.custom_id.clone(), request);
        }
        // A download that fails in passing is tried again; the batch's
        // results stay at the provider (29-30 days) whatever happens here.
        let mut delay = self.executor.scaled(POLL_FIRST);
        let mut tries = 0;
        let mut results = loop {
            tries += 1;
            match api.results(id, &requests).await {
                Ok(results) => break results,
                Err(error) if error.is_retryable() && tries <= RESULT_TRIES => {
                    tracing::warn!(batch = id, %error, "reading a batch's results failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.executor.scaled(POLL_MAX));
                }
                Err(error) => {
                    return Err(Error::Preflight(format!(
                        "cannot read the results of batch {id}: {error}; `apex run --resume {}` reads them again",
                        self.run_id
                    )));
                }
            }
        };
        // When it left, by the ledger (this process's submission or an
        // earlier one's alike).
        let ago = batch
            .submitted_at
            .as_deref()
            .unwrap_or(&batch.created_at)
            .parse::<jiff::Timestamp>()
            .ok()
            .and_then(|t| jiff::Timestamp::now().duration_since(t).try_into().ok())
            .unwrap_or_default();
        let started = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        let took = started.elapsed();
        let latency_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        for item in &batch.items {
            let outcome = results.remove(&item.custom_id).unwrap_or_else(|| {
                Err(AttemptError::new(
                    ErrorClass::ServerError,
                    "the batch's results have no line for this item",
                ))
            });
            self.store_outcome(
                batch,
                item,
                outcome,
                latency_ms,
                (started, took),
                status.cancelled,
            )
            .await?;
        }
        let state = if status.cancelled {
            BatchState::Cancelled
        } else {
            BatchState::Ended
        };
        self.store()
            .update_batch(&batch.batch_key, None, state)
            .await?;
        if status.cancelled && self.cancelled.is_none() {
            self.cancelled = Some(format!(
                "batch {id} was cancelled; its unprocessed items are pending again (`apex run --resume {}` sends them)",
                self.run_id
            ));
        }
        Ok(())
    }

    async fn store_outcome(
        &mut self,
        batch: &BatchRecord,
        item: &BatchItemRecord,
        outcome: std::result::Result<Generated, AttemptError>,
        latency_ms: u64,
        (started, took): (Instant, Duration),
        cancelled: bool,
    ) -> Result<()> {
        let (id, attempt, slug) = (item.generation_id, item.attempt, &item.condition_slug);
        match outcome {
            Ok(generated) => {
                let cost = self.conditions[slug]
                    .prices
                    .map(|p| p.cost(&generated.usage) * p.batch_discount);
                let result = GenerationResult {
                    usage: generated.usage,
                    cost_usd: cost,
                    finish_reason: generated.finish_reason.clone(),
                    provider_request_id: generated.request_id.clone(),
                    model_snapshot: generated.model_snapshot.clone(),
                    request_hash: Some(generated.request_hash.clone()),
                    response_text: generated.text.clone(),
                    latency_ms,
                };
                self.store()
                    .end_attempt(id, attempt, &AttemptEnd::Success(result))
                    .await?;
                if batch.wave == Wave::Leader {
                    self.warm.insert(
                        (slug.clone(), item.prompt_id.clone()),
                        Warmth {
                            written: started,
                            took,
                        },
                    );
                }
                self.notify_finished(
                    (slug, &item.prompt_id, item.replicate_index),
                    Some((&generated, cost)),
                );
            }
            Err(error) if cancelled && error.class == ErrorClass::Conflict => {
                // Cancelled before it was processed: back to pending,
                // unbilled, without spending a retry.
                self.store()
                    .end_attempt(id, attempt, &AttemptEnd::Abandoned)
                    .await?;
            }
            Err(error) => {
                let budget = self.budgets.entry(id).or_default();
                budget.tries += 1;
                let fatal = RetryPolicy::stops_condition(&error);
                // A later batch is the retry, so the policy's delay is moot.
                let last = !fatal && self.retry.verdict(Err(&error), id, budget) == Verdict::GiveUp;
                let end = AttemptEnd::Failed {
                    class: error.class,
                    message: self.retry.stored_message(&error),
                    http_status: error.http_status,
                    provider_request_id: error.request_id.clone(),
                    latency_ms,
                    last,
                };
                self.store().end_attempt(id, attempt, &end).await?;
                if last {
                    self.notify_finished((slug, &item.prompt_id, item.replicate_index), None);
                } else {
                    // Pending again: a later batch sends it.
                    self.store()
                        .end_attempt(id, attempt, &AttemptEnd::Abandoned)
                        .await?;
                    if fatal {
                        self.stop_condition(slug, &error);
                    } else {
                        self.executor.progress.event(&ProgressEvent::Retrying {
                            condition: slug.clone(),
                            prompt_id: item.prompt_id.clone(),
                            replicate_index: item.replicate_index,
                            attempt,
                            error: error.to_string(),
                            http_status: error.http_status,
                            delay: Duration::ZERO,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// What became of a submission.
enum Submitted {
    Yes,
    No,
    /// Refused as too large: these halves go instead.
    Split(Vec<Vec<Outgoing>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: i64, slug: &str, prompt: &str, replicate: u32) -> WorkItem {
        WorkItem {
            generation_id: id,
            condition_slug: slug.into(),
            prompt_id: prompt.into(),
            package_version: "v".into(),
            context_index: 0,
            replicate_index: replicate,
            attempts: 0,
        }
    }

    #[test]
    fn leaders_go_first_then_followers_unless_cold() {
        let items = vec![
            item(1, "a", "p1", 0),
            item(2, "a", "p1", 1),
            item(3, "a", "p2", 0),
            item(4, "a", "p2", 1),
            item(5, "b", "p1", 0),
            item(6, "b", "p1", 1),
        ];
        let roles = |wave: Vec<(WorkItem, Wave)>| {
            wave.into_iter()
                .map(|(i, w)| (i.generation_id, w))
                .collect::<Vec<_>>()
        };
        // Nothing known: one leader per group; `b` shares no cache.
        let first = plan_wave(&items, |s| s == "a", |_, _| GroupCache::Unknown);
        assert_eq!(
            roles(first),
            vec![
                (1, Wave::Leader),
                (3, Wave::Leader),
                (5, Wave::Single),
                (6, Wave::Single)
            ]
        );
        // After the leaders: warm groups send followers, cold ones plain.
        let rest = vec![items[1].clone(), items[3].clone()];
        let second = plan_wave(
            &rest,
            |_| true,
            |_, p| {
                if p == "p1" {
                    GroupCache::Warm
                } else {
                    GroupCache::Cold
                }
            },
        );
        assert_eq!(roles(second), vec![(2, Wave::Follower), (4, Wave::Single)]);
    }

    #[test]
    fn batches_split_at_caps_and_the_queue_limit() {
        let caps = BatchCaps {
            max_requests: 2,
            max_bytes: 100,
        };
        let items = (0..5).map(|i| (i, 40, 10)).collect();
        let (batches, later, never) = split_batches(items, caps, None);
        assert_eq!(batches, vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert!(later.is_empty() && never.is_empty());
        // Bytes: two items of 60 do not fit in 100.
        let (batches, _, _) = split_batches(vec![(0, 60, 0), (1, 60, 0)], caps, None);
        assert_eq!(batches, vec![vec![0], vec![1]]);
        // Queue room for 25 tokens: two items now, the rest later; one
        // item above the limit alone can never go.
        let items = vec![(0, 1, 10), (1, 1, 10), (2, 1, 10), (3, 1, 30)];
        let (batches, later, never) = split_batches(items, caps, Some((25, 0)));
        assert_eq!(batches, vec![vec![0, 1]]);
        assert_eq!(later, vec![2]);
        assert_eq!(never, vec![3]);
        // With 10 already enqueued, one fits now, the others later.
        let items = vec![(0, 1, 10), (1, 1, 10), (2, 1, 30)];
        let (batches, later, never) = split_batches(items, caps, Some((25, 10)));
        assert_eq!((batches, later, never), (vec![vec![0]], vec![1], vec![2]));
    }
}
