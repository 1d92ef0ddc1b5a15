//! The async driver: performs the dispatcher's actions against a [`Store`]
//! and [`Provider`]s and feeds their results back as events, for both
//! transports: what they share (claiming, storing, patience with the ledger,
//! the results it could not take, stopping, progress, closing the run) is
//! here with the synchronous send; the batch actions are performed by
//! [`batch_driver`](super::batch_driver). The only place with a runtime, a
//! `select!` and a `JoinSet`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::catalog::Catalog;
use crate::condition::ProviderKind;
use crate::context::ContextPackage;
use crate::error::{Error, Result};
use crate::provider::{FirstEvent, Provider};
use crate::run::{AttemptEnd, RunId, RunState, UnstoredResult};
use crate::store::Store;
use crate::tokens::Tokenizer;

use super::batch_driver::BatchIo;
use super::machine::Dispatcher;
use super::patience::patiently;
use super::protocol::{Action, Attempt, BatchTransport, DispatchConfig, Event, Summary, Task};
use super::retry::RetryPolicy;
use super::work::{BatchRef, GenerationId};
use super::{Progress, ProgressEvent, RunOptions, RunReport};

/// Jobs a claim asks for at least: a claim's cost is a scan of the run's
/// unfinished rows, so claims small enough to keep memory flat must not be
/// so small that a long run spends its time claiming (~300 bytes a job).
const CLAIM_JOBS: usize = 2048;

/// Executes runs against providers, writing every state change to a store.
pub struct Executor {
    store: Arc<dyn Store>,
    providers: HashMap<ProviderKind, Arc<dyn Provider>>,
    catalog: Arc<Catalog>,
    options: RunOptions,
    progress: Arc<dyn Progress>,
    /// Paid results the ledger never took, after a failed execution.
    unstored: std::sync::Mutex<Vec<UnstoredResult>>,
}

/// How many bytes of context text the driver keeps cached.
const PACKAGE_CACHE_BYTES: usize = 8 << 20;

/// The clock the dispatcher runs on: tokio's, so paused-time tests drive it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Executor {
    /// An executor; `providers` must hold one provider per kind the run uses.
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
            unstored: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// After `execute` failed because the ledger did not come back: the
    /// paid results it could not store (to keep, e.g. in a recovery file,
    /// and store later). Empty otherwise.
    pub fn take_unstored(&self) -> Vec<UnstoredResult> {
        std::mem::take(&mut *self.unstored.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Executes the run's remaining generations until done, or until `stop`
    /// turns true (then in-flight requests finish and are stored, and nothing
    /// new starts). A closed `stop` channel means no stop will come.
    pub async fn execute(
        &self,
        run_id: &RunId,
        include_errors: bool,
        stop: watch::Receiver<bool>,
    ) -> Result<RunReport> {
        let machine = self.prepare(run_id, include_errors).await?;
        let mut driver = Driver {
            executor: self,
            run_id,
            machine,
            tasks: JoinSet::new(),
            task_ids: HashMap::new(),
            packages: HashMap::new(),
            recent_packages: std::collections::VecDeque::new(),
            package_bytes: 0,
            stop,
            stop_open: true,
            storing: HashMap::new(),
            closing: HashMap::new(),
            unstored: Vec::new(),
            next_pacing_report: now(),
            began: tokio::sync::mpsc::unbounded_channel(),
        };
        let summary = driver.run().await;
        let unstored = std::mem::take(&mut driver.unstored);
        let paced = driver.machine.paced_limits();
        if !paced.is_empty() && summary.failure.is_none() {
            self.record_paced_limits(run_id, paced).await;
        }
        self.conclude(run_id, summary, unstored).await
    }

    /// Checks the run, moves it to `running` and builds its dispatcher.
    async fn prepare(&self, run_id: &RunId, include_errors: bool) -> Result<Dispatcher> {
        let conditions = self.store.run_conditions(run_id).await?;
        let mut caps = HashMap::new();
        for c in &conditions {
            let Some(provider) = self.providers.get(&c.provider) else {
                return Err(Error::Preflight(format!(
                    "condition `{}`: no {} provider configured",
                    c.slug, c.provider
                )));
            };
            match provider.batches() {
                Some(api) => {
                    caps.insert(c.provider, api.caps());
                }
                None if self.options.batch => {
                    return Err(Error::Preflight(format!(
                        "{} has no Batch API client here; run without --batch",
                        c.provider
                    )));
                }
                None => {}
            }
        }
        let replicates = self.store.run(run_id).await?.replicates as usize;
        if include_errors {
            let n = self.store.reset_errors(run_id).await?;
            tracing::info!(generations = n, "retrying generations stored as error");
        }
        self.store.set_run_state(run_id, RunState::Running).await?;
        let remaining: HashMap<String, u64> = self
            .store
            .remaining_by_condition(run_id)
            .await?
            .into_iter()
            .collect();
        let per_condition: Vec<(String, u64)> = conditions
            .iter()
            .map(|c| (c.slug.clone(), remaining.get(&c.slug).copied().unwrap_or(0)))
            .collect();
        self.progress.event(&ProgressEvent::Started {
            run_id: run_id.clone(),
            total: per_condition.iter().map(|(_, n)| n).sum(),
            conditions: per_condition,
        });
        let options = &self.options;
        let config = DispatchConfig {
            concurrency: options.concurrency.max(1),
            cache: options.cache,
            verify_first: options.verify_first,
            retry: RetryPolicy::new(
                options.max_retries,
                options.backoff_base,
                options.time_scale,
            ),
            // Groups per claim, sized in jobs (a group is `replicates`
            // jobs) so memory does not grow with the replicates: twice
            // --concurrency, and at least CLAIM_JOBS, since each claim
            // scans the run's unfinished rows; at least two per condition.
            // Batches take the whole run at once (a wave is every leader).
            claim_batch: if options.batch {
                u32::MAX
            } else {
                u32::try_from(
                    (options.concurrency.max(1) * 2)
                        .max(CLAIM_JOBS)
                        .div_ceil(replicates.max(1))
                        .max(conditions.len() * 2),
                )
                .unwrap_or(u32::MAX)
            },
            claim_interval: self.lease() / 3,
            replicates,
            time_scale: options.time_scale,
            // `--workers N` splits the limits statically; otherwise the
            // processes on this ledger split them as they come and go.
            share_interval: (!options.limits.is_off() && options.limits.share() == 1)
                .then(|| self.share_interval()),
            batch: options.batch.then_some(BatchTransport { caps }),
        };
        Ok(Dispatcher::new(
            config,
            conditions,
            Arc::clone(&self.catalog),
            options.limits.clone(),
            self.store.current_packages().await?,
            now(),
        ))
    }

    /// How often the rate-limit budgets are shared: a twentieth of the
    /// window, and at least 50 ms of real time.
    fn share_interval(&self) -> Duration {
        crate::time::scaled(Duration::from_secs(3), self.options.time_scale)
            .max(Duration::from_millis(50))
    }

    /// Records with the run (its flags, key `paced_limits`) the limits its
    /// models were paced at, so a report draws those rather than a tier
    /// table. Best effort: a ledger that fails here fails the run's own
    /// record next, and says so there.
    async fn record_paced_limits(
        &self,
        run_id: &RunId,
        paced: serde_json::Map<String, serde_json::Value>,
    ) {
        let patience = self.options.ledger_patience;
        let Ok(info) = patiently(patience, "reading the run", || self.store.run(run_id)).await
        else {
            return;
        };
        let mut flags = info.flags;
        let Some(object) = flags.as_object_mut() else {
            return;
        };
        let recorded = object
            .entry("paced_limits")
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let Some(recorded) = recorded.as_object_mut() {
            recorded.extend(paced);
        }
        if let Err(error) = patiently(patience, "recording the limits paced at", || {
            self.store.set_run_flags(run_id, &flags)
        })
        .await
        {
            tracing::warn!(%error, "could not record the limits the run was paced at");
        }
    }

    /// A claim not renewed for this long is taken over by other workers.
    fn lease(&self) -> Duration {
        crate::time::scaled(self.options.claim_timeout, self.options.time_scale)
    }

    /// Gives back claims and records the run's state. After a ledger
    /// failure, paid results that could not be stored are kept for
    /// [`take_unstored`](Self::take_unstored).
    async fn conclude(
        &self,
        run_id: &RunId,
        summary: Summary,
        unstored: Vec<UnstoredResult>,
    ) -> Result<RunReport> {
        let worker = &self.options.worker;
        let store = &self.store;
        let patience = self.options.ledger_patience;
        // Best effort: the others take this process's share of the limits
        // (they would after a few missed shares anyway).
        if let Err(error) = store.leave_pacing(worker).await {
            tracing::debug!(%error, "could not leave the shared pacing");
        }
        if let Some(error) = summary.failure {
            // Best effort: the ledger has just failed.
            if summary.batches_left == 0 {
                let _ = store.release_claims(run_id, worker).await;
            }
            let _ = store.set_run_state(run_id, RunState::Interrupted).await;
            self.unstored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(unstored);
            return Err(error);
        }
        // Batches left running keep their items claimed (their attempts
        // open) until a resume takes them back: at once on this machine,
        // after --claim-timeout from another.
        if summary.batches_left == 0 {
            patiently(patience, "giving back claims", || {
                store.release_claims(run_id, worker)
            })
            .await?;
        }
        let counts = patiently(patience, "reading the run", || store.run(run_id))
            .await?
            .counts;
        if let Some(state) = summary.final_state(&counts) {
            patiently(patience, "recording the run's state", || {
                store.set_run_state(run_id, state)
            })
            .await?;
        }
        Ok(RunReport {
            counts,
            stopped: summary.stopped,
            verify_failed: summary.verify_failed,
            interrupted: summary.interrupted,
            rate_limited: summary.rate_limited,
            halted: summary.halted,
            batches_left: summary.batches_left,
        })
    }

    /// Cancels the run's provider batches still in flight (`apex cancel`);
    /// how many were asked to cancel. The run's next execution stores what
    /// they processed and sends the rest.
    pub async fn cancel_batches(&self, run_id: &RunId) -> Result<usize> {
        super::batch_driver::cancel_open_batches(&*self.store, &self.providers, run_id).await
    }

    fn batch_io(
        &self,
        run_id: &RunId,
        provider: Option<crate::condition::ProviderKind>,
    ) -> BatchIo {
        BatchIo {
            store: Arc::clone(&self.store),
            provider: provider.map(|p| Arc::clone(&self.providers[&p])),
            run_id: run_id.clone(),
            patience: self.options.ledger_patience,
        }
    }
}

/// One execution in progress.
struct Driver<'a> {
    executor: &'a Executor,
    run_id: &'a RunId,
    machine: Dispatcher,
    tasks: JoinSet<Event>,
    task_ids: HashMap<tokio::task::Id, Task>,
    packages: HashMap<(String, String), std::sync::Weak<ContextPackage>>,
    /// The contexts kept for reuse, oldest first, and their size in bytes.
    recent_packages: std::collections::VecDeque<Arc<ContextPackage>>,
    package_bytes: usize,
    stop: watch::Receiver<bool>,
    stop_open: bool,
    /// Results being stored, kept until the ledger has them.
    storing: HashMap<GenerationId, (u32, AttemptEnd)>,
    /// The generations of each batch whose results are being stored.
    closing: HashMap<BatchRef, Vec<GenerationId>>,
    /// Paid results the ledger never took.
    unstored: Vec<UnstoredResult>,
    /// When the display next hears how each model is paced.
    next_pacing_report: Instant,
    /// Leaders whose streamed answers have begun, told by their requests.
    began: (
        tokio::sync::mpsc::UnboundedSender<GenerationId>,
        tokio::sync::mpsc::UnboundedReceiver<GenerationId>,
    ),
}

/// How often a display hears how each model is paced.
const PACING_REPORT_EVERY: Duration = Duration::from_secs(1);

impl Driver<'_> {
    async fn run(&mut self) -> Summary {
        if *self.stop.borrow() {
            self.machine.handle(Event::StopRequested, now());
        }
        loop {
            if now() >= self.next_pacing_report {
                self.report_pacing();
            }
            while let Some(action) = self.machine.poll_action(now()) {
                if let Some(summary) = self.perform(action).await {
                    self.report_pacing();
                    return summary;
                }
            }
            let wake = self.machine.poll_timeout();
            let sleep_until = wake.map_or_else(
                || tokio::time::Instant::now() + crate::time::FAR_FUTURE,
                tokio::time::Instant::from_std,
            );
            tokio::select! {
                joined = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    let event = match joined {
                        Some(Ok((id, event))) => {
                            self.task_ids.remove(&id);
                            event
                        }
                        Some(Err(e)) => Event::Failed {
                            task: self.task_ids.remove(&e.id()).unwrap_or(Task::Claim),
                            error: Error::store_msg(format!("a generation task failed: {e}")),
                        },
                        None => continue,
                    };
                    self.track_stored(&event);
                    self.machine.handle(event, now());
                }
                Some(id) = self.began.1.recv() => {
                    self.machine.handle(Event::AnswerBegun(id), now());
                }
                () = tokio::time::sleep_until(sleep_until), if wake.is_some() => {
                    self.machine.handle_timeout(now());
                }
                changed = self.stop.changed(), if self.stop_open => match changed {
                    Ok(()) if *self.stop.borrow() => self.machine.handle(Event::StopRequested, now()),
                    Ok(()) => {}
                    Err(_) => self.stop_open = false,
                },
                else => {
                    // Nothing in flight, nothing to wait for: the machine
                    // would have finished. Stop rather than hang.
                    self.machine.handle(Event::StopRequested, now());
                }
            }
        }
    }

    /// Tells the display how each model is paced now.
    fn report_pacing(&mut self) {
        self.next_pacing_report = now() + PACING_REPORT_EVERY;
        for report in self.machine.pacing_report(now()) {
            self.executor.progress.event(&report);
        }
    }

    /// Keeps a successful result until the ledger has it; one the ledger
    /// never took is handed back at the end.
    fn track_stored(&mut self, event: &Event) {
        let ids = match event {
            Event::Stored(id) => {
                self.storing.remove(id);
                return;
            }
            Event::BatchClosed(batch) => {
                for id in self.closing.remove(batch).unwrap_or_default() {
                    self.storing.remove(&id);
                }
                return;
            }
            Event::Failed {
                task: Task::Generation(id),
                ..
            } => vec![*id],
            Event::Failed {
                task: Task::Batch(batch),
                ..
            } => self.closing.remove(batch).unwrap_or_default(),
            _ => return,
        };
        for id in ids {
            if let Some((attempt, end @ AttemptEnd::Success(_))) = self.storing.remove(&id) {
                self.unstored.push(UnstoredResult {
                    generation_id: id,
                    attempt,
                    end,
                });
            }
        }
    }

    /// Performs one action; the summary when it is [`Action::Done`].
    async fn perform(&mut self, action: Action) -> Option<Summary> {
        let store = Arc::clone(&self.executor.store);
        let worker = self.executor.options.worker.clone();
        match action {
            Action::Claim { max_groups } => {
                let stale_before = crate::time::rfc3339_ago(self.executor.lease());
                let claimed = patiently(self.patience(), "claiming work", || {
                    store.claim_work(self.run_id, &worker, max_groups, &stale_before)
                })
                .await;
                let batches = match &claimed {
                    Ok(_) => {
                        patiently(self.patience(), "reading open batches", || {
                            store.open_batches(self.run_id)
                        })
                        .await
                    }
                    Err(_) => Ok(Vec::new()),
                };
                let event = match claimed.and_then(|c| Ok((c, batches?))) {
                    Ok((claim, batches)) => Event::Claimed {
                        items: claim.items,
                        held_by_others: claim.held_by_others,
                        batches: batches
                            .into_iter()
                            .map(|b| {
                                let age = submitted_ago(&b);
                                (b, age)
                            })
                            .collect(),
                    },
                    Err(error) => Event::Failed {
                        task: Task::Claim,
                        error,
                    },
                };
                self.machine.handle(event, now());
            }
            Action::Renew => {
                let run_id = self.run_id.clone();
                let patience = self.patience();
                self.spawn(Task::Renew, async move {
                    let renewed = patiently(patience, "renewing claims", || {
                        store.renew_claims(&run_id, &worker)
                    });
                    match renewed.await {
                        Ok(()) => Event::Renewed,
                        Err(error) => Event::Failed {
                            task: Task::Renew,
                            error,
                        },
                    }
                });
            }
            Action::SharePacing(usage) => {
                // Members who have not shared for four rounds are gone.
                let fresh_within = self.executor.share_interval() * 4;
                self.spawn(Task::Pacing, async move {
                    match store.share_pacing(&worker, &usage, fresh_within).await {
                        Ok(shares) => Event::PacingShared(Some(shares)),
                        Err(error) => {
                            tracing::warn!(%error, "could not share the rate limits through the ledger; pacing with what is known");
                            Event::PacingShared(None)
                        }
                    }
                });
            }
            Action::CountTokens {
                prompt_id,
                version,
                tokenizer,
            } => {
                let event = match self.count(&prompt_id, &version, tokenizer).await {
                    Ok(split) => Event::Counted {
                        version,
                        tokenizer,
                        split,
                    },
                    Err(error) => Event::Failed {
                        task: Task::Count { version, tokenizer },
                        error,
                    },
                };
                self.machine.handle(event, now());
            }
            Action::Begin(attempt) => {
                let id = attempt.generation_id;
                let patience = self.patience();
                self.spawn(Task::Generation(id), async move {
                    let begun = patiently(patience, "recording an attempt", || {
                        store.begin_attempt(id, attempt.attempt, Some(&worker))
                    });
                    match begun.await {
                        Ok(()) => Event::Began(id),
                        Err(Error::NotClaimable(_)) => Event::NotClaimable(id),
                        Err(error) => Event::Failed {
                            task: Task::Generation(id),
                            error,
                        },
                    }
                });
            }
            Action::Send(attempt) => self.send(attempt).await,
            Action::Store {
                generation_id,
                attempt,
                end,
            } => {
                let patience = self.patience();
                self.storing.insert(generation_id, (attempt, end.clone()));
                self.spawn(Task::Generation(generation_id), async move {
                    let stored = patiently(patience, "storing a result", || {
                        store.end_attempt(generation_id, attempt, &end)
                    });
                    match stored.await {
                        Ok(()) => Event::Stored(generation_id),
                        Err(error) => Event::Failed {
                            task: Task::Generation(generation_id),
                            error,
                        },
                    }
                });
            }
            Action::Notify(event) => self.executor.progress.event(&event),
            Action::Check(condition) => {
                let provider = Arc::clone(&self.executor.providers[&condition.provider]);
                let slug = condition.slug.clone();
                self.spawn(Task::Check(slug.clone()), async move {
                    Event::Checked {
                        outcome: provider.check(&condition).await,
                        slug,
                    }
                });
            }
            Action::SubmitBatch(submission) => {
                let batch = submission.batch;
                let mut requests = Vec::with_capacity(submission.items.len());
                for attempt in &submission.items {
                    match self.request(attempt, true).await {
                        Ok(request) => requests.push(request),
                        Err(error) => {
                            let task = Task::Batch(batch);
                            self.machine.handle(Event::Failed { task, error }, now());
                            return None;
                        }
                    }
                }
                let io = self
                    .executor
                    .batch_io(self.run_id, Some(submission.provider));
                self.spawn(Task::Batch(batch), io.submit(submission, requests));
            }
            Action::FindBatch {
                batch,
                provider,
                key,
                created_at,
                items,
            } => {
                let io = self.executor.batch_io(self.run_id, Some(provider));
                self.spawn(Task::Batch(batch), io.find(batch, key, created_at, items));
            }
            Action::PollBatch {
                batch,
                provider,
                id,
            } => {
                let io = self.executor.batch_io(self.run_id, Some(provider));
                self.spawn(Task::Batch(batch), io.poll(batch, id));
            }
            Action::FetchResults {
                batch,
                provider,
                id,
                items,
            } => {
                let mut requests = Vec::with_capacity(items.len());
                for attempt in items {
                    match self.request(&attempt, true).await {
                        Ok(request) => requests.push((attempt, request)),
                        Err(error) => {
                            let task = Task::Batch(batch);
                            self.machine.handle(Event::Failed { task, error }, now());
                            return None;
                        }
                    }
                }
                let io = self.executor.batch_io(self.run_id, Some(provider));
                self.spawn(Task::Batch(batch), io.fetch(batch, id, requests));
            }
            Action::CloseBatch {
                batch,
                key,
                state,
                ends,
            } => {
                let mut held = Vec::new();
                for (id, attempt, end) in &ends {
                    if matches!(end, AttemptEnd::Success(_)) {
                        self.storing.insert(*id, (*attempt, end.clone()));
                        held.push(*id);
                    }
                }
                self.closing.insert(batch, held);
                let io = self.executor.batch_io(self.run_id, None);
                self.spawn(Task::Batch(batch), io.close(batch, key, state, ends));
            }
            Action::Done(summary) => return Some(summary),
        }
        None
    }

    /// The request an attempt sends, its context read once for all.
    async fn request(
        &mut self,
        attempt: &Attempt,
        in_batch: bool,
    ) -> Result<crate::provider::GenerationRequest> {
        let package = self.package(&attempt.prompt_id, &attempt.version).await?;
        Ok(attempt.request(package, self.run_id, in_batch))
    }

    fn patience(&self) -> Duration {
        self.executor.options.ledger_patience
    }

    fn spawn(&mut self, task: Task, work: impl Future<Output = Event> + Send + 'static) {
        let handle = self.tasks.spawn(work);
        self.task_ids.insert(handle.id(), task);
    }

    async fn send(&mut self, attempt: Attempt) {
        let id = attempt.generation_id;
        let request = match self.request(&attempt, false).await {
            Ok(mut request) => {
                if attempt.leads {
                    let began = self.began.0.clone();
                    request.first_event = Some(FirstEvent::new(move || {
                        // The driver outlives its requests; a closed channel
                        // means it has stopped listening.
                        let _ = began.send(id);
                    }));
                }
                request
            }
            Err(error) => {
                let task = Task::Generation(id);
                self.machine.handle(Event::Failed { task, error }, now());
                return;
            }
        };
        let provider = Arc::clone(&self.executor.providers[&attempt.condition.provider]);
        self.spawn(Task::Generation(id), async move {
            let started = tokio::time::Instant::now();
            let outcome = provider.generate(&request).await;
            Event::Finished {
                generation_id: id,
                outcome: Box::new(outcome),
                latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            }
        });
    }

    /// A context, held once: any copy still alive (in a request in flight)
    /// is reused; the most recently read ones are kept up to a byte budget
    /// (a long run must not keep every context it has sent).
    async fn package(&mut self, id: &str, version: &str) -> Result<Arc<ContextPackage>> {
        let key = (id.to_owned(), version.to_owned());
        if let Some(p) = self.packages.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(p);
        }
        let store = &self.executor.store;
        let p = patiently(self.patience(), "reading a context", || {
            store.package(id, version)
        })
        .await?;
        let p = Arc::new(p);
        self.package_bytes += p.byte_len();
        self.recent_packages.push_back(Arc::clone(&p));
        while self.package_bytes > PACKAGE_CACHE_BYTES
            && self.recent_packages.len() > 1
            && let Some(oldest) = self.recent_packages.pop_front()
        {
            self.package_bytes -= oldest.byte_len();
        }
        // Forget contexts no request holds any more.
        self.packages.retain(|_, weak| weak.strong_count() > 0);
        self.packages.insert(key, Arc::downgrade(&p));
        Ok(p)
    }

    /// (cacheable prefix, rest) in tokens. Exact `o200k_base` counts were
    /// taken once at ingest and kept in the ledger, so nothing is tokenised
    /// here. Otherwise (an estimate, or a version ingested before counts
    /// were kept) the package is counted, off the async threads, since exact
    /// counts of a large context take a moment.
    async fn count(&mut self, id: &str, version: &str, tokenizer: Tokenizer) -> Result<(u64, u64)> {
        let store = &self.executor.store;
        if tokenizer == Tokenizer::O200k
            && let Some(split) = patiently(self.patience(), "reading a token count", || {
                store.o200k_split(id, version)
            })
            .await?
        {
            return Ok(split);
        }
        let package = self.package(id, version).await?;
        tokio::task::spawn_blocking(move || tokenizer.split(&package))
            .await
            .map_err(|e| Error::store_msg(format!("token counting failed: {e}")))
    }
}

/// How long ago a recorded batch was submitted (or recorded, if never
/// acknowledged), by the ledger's timestamps.
fn submitted_ago(batch: &crate::run::BatchRecord) -> Duration {
    batch
        .submitted_at
        .as_deref()
        .unwrap_or(&batch.created_at)
        .parse::<jiff::Timestamp>()
        .ok()
        .and_then(|t| jiff::Timestamp::now().duration_since(t).try_into().ok())
        .unwrap_or_default()
}
