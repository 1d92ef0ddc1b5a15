//! Executing a run: cache-aware order under per-minute rate limits, a
//! concurrency bound, retries with backoff, fatal errors that stop a
//! condition, and a clean stop on request.
//!
//! Order: for each (condition, context) the *leader* (first replicate) goes
//! first; its *followers* are released when it completes, so they read the
//! cache it wrote. Due retries go first, then released followers, then new
//! leaders. The very first request of each condition goes alone: if it fails
//! for a reason every request of that condition would share (bad key, no
//! quota, unknown model), the condition stops after one request.
//!
//! Every attempt passes the [`RateLimiter`]: it is reserved before it is
//! sent (output at `max_tokens`, input by estimate; a follower's cached
//! prefix does not count against Anthropic's ITPM) and settled to the real
//! usage when the response arrives. A dispatcher owns the order and the
//! limiter; each attempt runs as its own task.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::catalog::Catalog;
use crate::condition::{Condition, ProviderKind};
use crate::context::ContextPackage;
use crate::error::{Error, Result};
use crate::limiter::{Admission, Charge, LimitTable, RateLimiter, Reservation, bucket_key};
use crate::plan::PackageRef;
use crate::provider::{
    AttemptError, CacheHint, CacheTtl, ErrorClass, Generated, GenerationRequest, Provider,
};
use crate::run::{AttemptEnd, GenerationResult, RunId, RunState, StatusCounts, WorkItem};
use crate::store::Store;
use crate::tokens::Tokenizer;

/// How to execute.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Retries after a failed attempt (attempts = retries + 1).
    pub max_retries: u32,
    /// Send prompt-caching hints.
    pub cache: bool,
    /// Send one request per condition first; stop everything if one fails.
    pub verify_first: bool,
    /// Multiplies Apex's own pacing durations (windows, backoff, cache TTL
    /// planning); 1 in real use.
    pub time_scale: f64,
    /// First backoff delay (then ×2 per retry).
    pub backoff_base: Duration,
    /// Per-minute limits; [`LimitTable::none`] turns rate limiting off.
    pub limits: LimitTable,
    /// This process's name in claims (unique per process).
    pub worker: String,
    /// A claim not renewed for this long (times `time_scale`) is taken over:
    /// its process is presumed dead.
    pub claim_timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_retries: 3,
            cache: true,
            verify_first: false,
            time_scale: 1.0,
            backoff_base: Duration::from_secs(1),
            limits: LimitTable::defaults(),
            worker: default_worker(),
            claim_timeout: Duration::from_secs(60),
        }
    }
}

/// A worker name unique to this process: `apex-PID-RANDOM`.
pub fn default_worker() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("apex-{}-{}", std::process::id(), &id[id.len() - 8..])
}

/// What happened, for progress displays.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressEvent {
    /// Work is about to start.
    Started {
        /// Generations to execute.
        total: u64,
    },
    /// A generation reached `success` or `error`.
    Finished {
        /// Its condition.
        condition: String,
        /// Whether it succeeded.
        success: bool,
        /// Whether it read the provider's cache.
        cache_hit: bool,
        /// Its cost, if known.
        cost_usd: Option<f64>,
    },
    /// An attempt failed and will be retried.
    Retrying {
        /// Its condition.
        condition: String,
        /// The context.
        prompt_id: String,
        /// The replicate.
        replicate_index: u32,
        /// The attempt that failed (1-based).
        attempt: u32,
        /// Why.
        error: String,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// A condition stopped; its remaining generations stay `pending`.
    ConditionStopped {
        /// Its slug.
        condition: String,
        /// Why.
        reason: String,
    },
}

/// Receives progress events (the CLI draws a bar or logs lines).
pub trait Progress: Send + Sync {
    /// One event.
    fn event(&self, event: &ProgressEvent);
}

/// Ignores events.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _: &ProgressEvent) {}
}

/// How an execution ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunReport {
    /// Counts of the whole run afterwards.
    pub counts: StatusCounts,
    /// Conditions stopped by a fatal error: (slug, reason).
    pub stopped: Vec<(String, String)>,
    /// `--verify-first` failed: nothing fanned out.
    pub verify_failed: bool,
    /// A stop was requested (Ctrl-C).
    pub interrupted: bool,
    /// Responses with status 429 received.
    pub rate_limited: u64,
}

/// Executes runs against providers, writing every state change to a store.
pub struct Executor {
    store: Arc<dyn Store>,
    providers: HashMap<ProviderKind, Arc<dyn Provider>>,
    catalog: Arc<Catalog>,
    options: RunOptions,
    progress: Arc<dyn Progress>,
}

struct Group {
    condition: Arc<Condition>,
    prompt_id: String,
    version: String,
    items: Vec<WorkItem>,
    ttl: CacheTtl,
}

#[derive(Default)]
struct ConditionState {
    in_flight: usize,
    probed: bool,
    stopped: Option<String>,
}

/// One generation on its way: which group, which cell, attempts so far.
struct Job {
    group: usize,
    item: WorkItem,
    leader: bool,
    /// Attempts made in this execution (the retry budget counts these).
    tries: u32,
}

struct AttemptDone {
    job: Job,
    attempt: u32,
    reservation: Reservation,
    key: String,
    result: std::result::Result<Generated, AttemptError>,
    stored: Result<()>,
    /// Not sent: the generation finished elsewhere or its claim was taken
    /// over by another process (which sends it instead).
    skipped: bool,
}

/// The dispatcher's queues.
#[derive(Default)]
struct Queues {
    retries: Vec<(Instant, Job)>,
    followers: VecDeque<Job>,
    leaders: VecDeque<usize>,
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
        }
    }

    /// The reservation for one attempt.
    fn charge(&self, condition: &Condition, (prefix, rest): (u64, u64), warm: bool) -> Charge {
        let min_cacheable = self
            .catalog
            .lookup(condition.provider, &condition.model)
            .map_or(1024, |m| m.min_cacheable_tokens);
        let cached = self.options.cache && prefix >= min_cacheable;
        let (uncached, write) = match (cached, warm) {
            (true, true) => (rest, 0),
            (true, false) => (rest, prefix),
            (false, _) => (prefix + rest, 0),
        };
        Charge::estimate(
            condition.provider,
            uncached,
            write,
            prefix + rest,
            u64::from(condition.max_tokens),
        )
    }

    /// The cache TTL for a condition: 5 minutes, unless its followers could
    /// be held back by the limits for longer than half of that.
    fn choose_ttl(
        &self,
        condition: &Condition,
        replicates: usize,
        package: &PackageRef,
    ) -> CacheTtl {
        let followers = replicates.saturating_sub(1) as u64;
        if followers == 0 || self.options.limits_is_empty() {
            return CacheTtl::FiveMinutes;
        }
        let limits =
            self.options
                .limits
                .lookup(&self.catalog, condition.provider, &condition.model);
        let charge = Charge::estimate(
            condition.provider,
            64,
            0,
            package.tokens(Tokenizer::for_provider(condition.provider)),
            u64::from(condition.max_tokens),
        );
        let dims: [(Option<u64>, u64); 3] = match condition.provider {
            ProviderKind::OpenAi => [(limits.rpm, 1), (limits.tpm, charge.input), (None, 0)],
            ProviderKind::Anthropic => [
                (limits.rpm, 1),
                (limits.itpm, charge.input),
                (limits.otpm, charge.output),
            ],
        };
        let windows = dims
            .iter()
            .filter_map(|(limit, per)| limit.map(|l| (followers * per).div_ceil(l.max(1))))
            .max()
            .unwrap_or(0);
        if windows * 60 > 150 {
            CacheTtl::OneHour
        } else {
            CacheTtl::FiveMinutes
        }
    }

    /// Executes the run's remaining generations until done, or until
    /// `stop` turns true (then in-flight requests finish and are stored, and
    /// nothing new starts).
    pub async fn execute(
        &self,
        run_id: &RunId,
        include_errors: bool,
        mut stop: watch::Receiver<bool>,
    ) -> Result<RunReport> {
        let conditions: HashMap<String, Arc<Condition>> = self
            .store
            .run_conditions(run_id)
            .await?
            .into_iter()
            .map(|c| (c.slug.clone(), Arc::new(c)))
            .collect();
        for c in conditions.values() {
            if !self.providers.contains_key(&c.provider) {
                return Err(Error::Preflight(format!(
                    "condition `{}`: no {} provider configured",
                    c.slug, c.provider
                )));
            }
        }
        let limiter = Arc::new(RateLimiter::new(self.options.time_scale));
        for c in conditions.values() {
            let key = bucket_key(&self.catalog, c.provider, &c.model);
            limiter.configure(
                &key,
                c.provider,
                self.options
                    .limits
                    .lookup(&self.catalog, c.provider, &c.model),
            );
        }
        let limiter_keys: usize = conditions
            .values()
            .map(|c| bucket_key(&self.catalog, c.provider, &c.model))
            .collect::<HashSet<_>>()
            .len();
        let replicates = self.store.run(run_id).await?.replicates as usize;
        if include_errors {
            let n = self.store.reset_errors(run_id).await?;
            tracing::info!(generations = n, "retrying generations stored as error");
        }
        self.store.set_run_state(run_id, RunState::Running).await?;
        let remaining = self.store.run(run_id).await?.counts;
        self.progress.event(&ProgressEvent::Started {
            total: remaining.pending + remaining.running,
        });
        let mut groups: Vec<Group> = Vec::new();
        let mut refs: HashMap<(String, String), PackageRef> = HashMap::new();
        for p in self.store.current_packages().await? {
            refs.insert((p.id.clone(), p.version.clone()), p);
        }
        // Work is claimed a few (condition, context) groups at a time, so
        // several processes can share one run; a claim is renewed while this
        // process lives and taken over by others when it stops being renewed.
        let worker = self.options.worker.clone();
        let lease = self.options.claim_timeout.mul_f64(self.options.time_scale);
        let claim_batch = (self.options.concurrency.max(1) * 2).max(conditions.len() * 2) as u32;
        let mut held: HashSet<i64> = HashSet::new();
        let mut absorb = |items: Vec<WorkItem>,
                          groups: &mut Vec<Group>,
                          leaders: &mut VecDeque<usize>|
         -> Result<usize> {
            let mut added = 0;
            for item in items {
                if !held.insert(item.generation_id) {
                    continue;
                }
                added += 1;
                let condition = conditions
                    .get(&item.condition_slug)
                    .cloned()
                    .ok_or_else(|| {
                        Error::store_msg(format!(
                            "generation {} names condition `{}` that the run does not list",
                            item.generation_id, item.condition_slug
                        ))
                    })?;
                let same_group = groups.last().is_some_and(|g| {
                    g.condition.slug == item.condition_slug
                        && g.prompt_id == item.prompt_id
                        && g.version == item.package_version
                        && leaders.back() == Some(&(groups.len() - 1))
                });
                if same_group {
                    groups.last_mut().expect("checked").items.push(item);
                    continue;
                }
                let ttl = refs
                    .get(&(item.prompt_id.clone(), item.package_version.clone()))
                    .map_or(CacheTtl::FiveMinutes, |p| {
                        self.choose_ttl(&condition, replicates, p)
                    });
                groups.push(Group {
                    condition,
                    prompt_id: item.prompt_id.clone(),
                    version: item.package_version.clone(),
                    items: vec![item],
                    ttl,
                });
                leaders.push_back(groups.len() - 1);
            }
            Ok(added)
        };
        let stale_before = |lease: Duration| {
            let ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
            format!(
                "{:.3}",
                jiff::Timestamp::now() - jiff::SignedDuration::from_millis(ms)
            )
        };

        let mut packages: HashMap<(String, String), Arc<ContextPackage>> = HashMap::new();
        let mut splits: HashMap<(String, Tokenizer), (u64, u64)> = HashMap::new();
        let mut states: HashMap<String, ConditionState> = HashMap::new();
        let mut queues = Queues::default();
        let first = self
            .store
            .claim_work(run_id, &worker, claim_batch, &stale_before(lease))
            .await?;
        absorb(first.items, &mut groups, &mut queues.leaders)?;
        let mut others_hold = first.held_by_others;
        let mut claims_exhausted = false;
        let mut next_claim = Instant::now();
        let mut next_renew = Instant::now() + lease / 3;
        let mut tasks: JoinSet<AttemptDone> = JoinSet::new();
        let mut report = RunReport::default();
        let mut stopping = *stop.borrow();
        let max_tries = self.options.max_retries + 1;

        // --verify-first: the first generation of each condition goes first,
        // and nothing else until all of them have succeeded.
        let mut verifying = self.options.verify_first;
        let verify_groups: HashSet<usize> = if verifying {
            let mut seen = HashSet::new();
            queues
                .leaders
                .iter()
                .copied()
                .filter(|&g| seen.insert(groups[g].condition.slug.clone()))
                .collect()
        } else {
            HashSet::new()
        };

        // A ledger failure stops new work, but requests already in flight
        // are paid for: they finish and are stored before the error returns.
        let mut failure: Option<Error> = None;
        macro_rules! or_stop {
            ($result:expr) => {
                match $result {
                    Ok(value) => value,
                    Err(error) => {
                        tracing::error!(%error, "stopping: letting {} request(s) in flight finish", tasks.len());
                        failure.get_or_insert(error);
                        stopping = true;
                        continue;
                    }
                }
            };
        }
        loop {
            let now = Instant::now();
            if !stopping
                && !verifying
                && queues.leaders.len() < self.options.concurrency.max(1)
                && (!claims_exhausted || now >= next_claim)
            {
                let claim = or_stop!(
                    self.store
                        .claim_work(run_id, &worker, claim_batch, &stale_before(lease))
                        .await
                );
                others_hold = claim.held_by_others;
                let added = or_stop!(absorb(claim.items, &mut groups, &mut queues.leaders));
                claims_exhausted = added == 0;
                // With nothing new, look again later: another process may
                // finish, or die and leave its claims to be taken over.
                next_claim = now + lease / 3;
            }
            if now >= next_renew {
                or_stop!(self.store.renew_claims(run_id, &worker).await);
                next_renew = now + lease / 3;
            }
            let mut wake: Option<Instant> = None;
            let mut blocked: HashSet<String> = HashSet::new();
            // Candidates in priority order: due retries, followers, leaders.
            let mut due: Vec<(u8, usize)> = Vec::new();
            queues.retries.sort_by_key(|(at, _)| *at);
            for (i, (at, _)) in queues.retries.iter().enumerate() {
                if *at <= now {
                    due.push((0, i));
                } else {
                    wake = Some(wake.map_or(*at, |w: Instant| w.min(*at)));
                }
            }
            // Lazily, so a long queue costs nothing once the slots are full.
            let candidates = due
                .into_iter()
                .chain((0..queues.followers.len()).map(|i| (1, i)))
                .chain((0..queues.leaders.len()).map(|i| (2, i)));
            let mut taken: Vec<(u8, usize)> = Vec::new();
            for (kind, i) in candidates {
                if stopping
                    || tasks.len() >= self.options.concurrency.max(1)
                    || blocked.len() >= limiter_keys
                {
                    break;
                }
                let (g, leader) = match kind {
                    0 => (queues.retries[i].1.group, queues.retries[i].1.leader),
                    1 => (queues.followers[i].group, false),
                    _ => (queues.leaders[i], true),
                };
                if verifying && !(kind != 1 && verify_groups.contains(&g)) {
                    continue;
                }
                let condition = Arc::clone(&groups[g].condition);
                let state = states.entry(condition.slug.clone()).or_default();
                if state.stopped.is_some() || (kind == 2 && !state.probed && state.in_flight > 0) {
                    continue;
                }
                let key = bucket_key(&self.catalog, condition.provider, &condition.model);
                if blocked.contains(&key) {
                    continue;
                }
                let package = or_stop!(self.package(&mut packages, &groups[g]).await);
                let tokenizer = Tokenizer::for_provider(condition.provider);
                let split = match splits.get(&(package.version().to_owned(), tokenizer)) {
                    Some(split) => *split,
                    None => {
                        // Exact counts of a large context take a moment: off
                        // the async threads, once per (context, tokenizer).
                        let counted = Arc::clone(&package);
                        let split = or_stop!(
                            tokio::task::spawn_blocking(move || tokenizer.split(&counted))
                                .await
                                .map_err(|e| Error::store_msg(format!(
                                    "token counting failed: {e}"
                                )))
                        );
                        splits.insert((package.version().to_owned(), tokenizer), split);
                        split
                    }
                };
                let charge = self.charge(&condition, split, !leader);
                // Planning refuses these, but limits can change on --resume
                // or from headers: never wait for what can never fit. The
                // condition stops, as for any error its every request shares.
                if let Err(problem) = limiter.check_fits(&key, charge) {
                    let reason = format!("context `{}`: {problem}", groups[g].prompt_id);
                    tracing::error!(condition = %condition.slug, %reason, "condition stopped");
                    self.progress.event(&ProgressEvent::ConditionStopped {
                        condition: condition.slug.clone(),
                        reason: reason.clone(),
                    });
                    report
                        .stopped
                        .push((condition.slug.clone(), reason.clone()));
                    state.stopped = Some(reason);
                    continue;
                }
                let reservation = match limiter.try_reserve(&key, charge, now) {
                    Admission::Granted(r) => r,
                    Admission::Wait(until) => {
                        blocked.insert(key);
                        wake = Some(wake.map_or(until, |w| w.min(until)));
                        continue;
                    }
                };
                let job = match kind {
                    0 => None,
                    1 => None,
                    _ => {
                        let item = groups[g].items.remove(0);
                        Some(Job {
                            group: g,
                            item,
                            leader: true,
                            tries: 0,
                        })
                    }
                };
                taken.push((kind, i));
                let job = match job {
                    Some(job) => job,
                    None if kind == 0 => {
                        std::mem::replace(&mut queues.retries[i].1, placeholder_job())
                    }
                    None => std::mem::replace(&mut queues.followers[i], placeholder_job()),
                };
                state.in_flight += 1;
                self.spawn(
                    &mut tasks,
                    run_id,
                    job,
                    &groups,
                    package,
                    key,
                    reservation,
                    max_tries,
                    &limiter,
                );
            }
            // Remove what was taken, highest index first within each queue.
            taken.sort_by(|a, b| b.cmp(a));
            for (kind, i) in taken {
                match kind {
                    0 => {
                        queues.retries.remove(i);
                    }
                    1 => {
                        queues.followers.remove(i);
                    }
                    _ => {
                        queues.leaders.remove(i);
                    }
                }
            }

            if tasks.is_empty() {
                if verifying && (queues.retries.is_empty() || stopping) {
                    verifying = false;
                    if report.verify_failed || stopping {
                        break;
                    }
                    continue;
                }
                // Nothing in flight and nothing to wait for: what is left
                // belongs to stopped conditions, or a stop was requested.
                // While other processes hold live claims, keep looking.
                if !stopping && wake.is_none() && others_hold > 0 {
                    wake = Some(next_claim);
                }
                if stopping || wake.is_none() {
                    break;
                }
            }
            // Long requests must not let this process's claims go stale.
            let wake = if tasks.is_empty() {
                wake
            } else {
                Some(wake.map_or(next_renew, |w| w.min(next_renew)))
            };
            let sleep_until = wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let joined = tokio::select! {
                joined = tasks.join_next(), if !tasks.is_empty() => joined,
                () = tokio::time::sleep_until(sleep_until), if wake.is_some() => continue,
                changed = stop.changed(), if !stopping => {
                    if changed.is_err() || *stop.borrow() {
                        stopping = true;
                        tracing::warn!("stop requested: letting {} request(s) in flight finish", tasks.len());
                    }
                    continue;
                }
            };
            let Some(joined) = joined else { continue };
            let done = or_stop!(
                joined.map_err(|e| Error::store_msg(format!("a generation task failed: {e}")))
            );
            let condition = Arc::clone(&groups[done.job.group].condition);
            let now = Instant::now();
            let state = states.entry(condition.slug.clone()).or_default();
            state.in_flight -= 1;
            if done.skipped {
                tracing::warn!(
                    generation = done.job.item.generation_id,
                    "claim taken over by another process; not sent here"
                );
                limiter.settle(&done.reservation, Charge::default());
                if done.job.leader {
                    // The group was taken over whole.
                    groups[done.job.group].items.clear();
                }
                continue;
            }
            or_stop!(done.stored);
            let snapshot = match &done.result {
                Ok(g) => g.rate_limits,
                Err(e) => e.rate_limits,
            };
            limiter.observe(
                &done.key,
                condition.provider,
                &snapshot,
                done.reservation.at,
                now,
            );
            match done.result {
                Ok(generated) => {
                    limiter.settle(
                        &done.reservation,
                        Charge::actual(condition.provider, &generated.usage),
                    );
                    state.probed = true;
                    if done.job.leader {
                        let g = done.job.group;
                        let items = std::mem::take(&mut groups[g].items);
                        queues.followers.extend(items.into_iter().map(|item| Job {
                            group: g,
                            item,
                            leader: false,
                            tries: 0,
                        }));
                    }
                }
                Err(error) => {
                    if error.class == ErrorClass::RateLimited {
                        report.rate_limited += 1;
                        // Rejected requests spend no tokens.
                        limiter.settle(
                            &done.reservation,
                            Charge {
                                requests: 1,
                                input: 0,
                                output: 0,
                            },
                        );
                        if let Some(wait) = error.retry_after {
                            limiter.pause(&done.key, now + wait);
                        }
                    }
                    let will_retry = error.is_retryable() && done.job.tries < max_tries;
                    if error.class.is_fatal_for_condition() {
                        let reason = error.to_string();
                        if state.stopped.is_none() {
                            state.stopped = Some(reason.clone());
                            tracing::error!(condition = %condition.slug, %reason, "condition stopped");
                            self.progress.event(&ProgressEvent::ConditionStopped {
                                condition: condition.slug.clone(),
                                reason: reason.clone(),
                            });
                            report.stopped.push((condition.slug.clone(), reason));
                        }
                    } else {
                        state.probed = true;
                    }
                    if will_retry {
                        let delay = backoff_delay(
                            done.job.tries - 1,
                            error.retry_after,
                            self.options.backoff_base,
                            jitter(done.job.item.generation_id, done.attempt),
                            self.options.time_scale,
                        );
                        tracing::info!(condition = %condition.slug, prompt_id = %done.job.item.prompt_id, replicate = done.job.item.replicate_index, attempt = done.attempt, %error, delay_ms = delay.as_millis() as u64, "retrying");
                        self.progress.event(&ProgressEvent::Retrying {
                            condition: condition.slug.clone(),
                            prompt_id: done.job.item.prompt_id.clone(),
                            replicate_index: done.job.item.replicate_index,
                            attempt: done.attempt,
                            error: error.to_string(),
                            delay,
                        });
                        queues.retries.push((now + delay, done.job));
                    } else {
                        if verifying {
                            report.verify_failed = true;
                        }
                        if done.job.leader {
                            // The followers still run; they will write the cache themselves.
                            let g = done.job.group;
                            let items = std::mem::take(&mut groups[g].items);
                            queues.followers.extend(items.into_iter().map(|item| Job {
                                group: g,
                                item,
                                leader: true,
                                tries: 0,
                            }));
                        }
                    }
                }
            }
            if report.verify_failed && !stopping {
                stopping = true;
                tracing::error!("--verify-first failed: the batch stops before fanning out");
            }
        }

        if let Some(error) = failure {
            // Best effort: the ledger has just failed.
            let _ = self.store.release_claims(run_id, &worker).await;
            let _ = self
                .store
                .set_run_state(run_id, RunState::Interrupted)
                .await;
            return Err(error);
        }
        // Retries that will not happen hand their generation back as pending.
        for (_, job) in queues.retries.drain(..) {
            self.store
                .end_attempt(
                    job.item.generation_id,
                    job.item.attempts + job.tries,
                    &AttemptEnd::Abandoned,
                )
                .await?;
        }
        self.store.release_claims(run_id, &worker).await?;
        report.interrupted = *stop.borrow();
        let counts = self.store.run(run_id).await?.counts;
        if counts.pending + counts.running == 0 {
            self.store.set_run_state(run_id, RunState::Finished).await?;
        } else if report.interrupted
            || report.verify_failed
            || !report.stopped.is_empty()
            || others_hold == 0
        {
            self.store
                .set_run_state(run_id, RunState::Interrupted)
                .await?;
        }
        report.counts = counts;
        Ok(report)
    }

    async fn package(
        &self,
        packages: &mut HashMap<(String, String), Arc<ContextPackage>>,
        group: &Group,
    ) -> Result<Arc<ContextPackage>> {
        let key = (group.prompt_id.clone(), group.version.clone());
        if let Some(p) = packages.get(&key) {
            return Ok(Arc::clone(p));
        }
        let p = Arc::new(self.store.package(&key.0, &key.1).await?);
        packages.insert(key, Arc::clone(&p));
        Ok(p)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        tasks: &mut JoinSet<AttemptDone>,
        run_id: &RunId,
        mut job: Job,
        groups: &[Group],
        package: Arc<ContextPackage>,
        key: String,
        reservation: Reservation,
        max_tries: u32,
        limiter: &Arc<RateLimiter>,
    ) {
        let limiter = Arc::clone(limiter);
        let worker = self.options.worker.clone();
        let group = &groups[job.group];
        let condition = Arc::clone(&group.condition);
        let provider = Arc::clone(&self.providers[&condition.provider]);
        let store = Arc::clone(&self.store);
        let catalog = Arc::clone(&self.catalog);
        let progress = Arc::clone(&self.progress);
        job.tries += 1;
        let attempt = job.item.attempts + job.tries;
        let request = GenerationRequest {
            condition,
            package,
            cache: if self.options.cache {
                CacheHint::On(group.ttl)
            } else {
                CacheHint::Off
            },
            trace: Some(format!("{run_id}/{}/{attempt}", job.item.generation_id)),
        };
        tasks.spawn(async move {
            let mut reservation = reservation;
            let last_allowed = job.tries >= max_tries;
            let sent = Sent {
                limiter: &limiter,
                reservation: &mut reservation,
                worker: &worker,
            };
            let (result, stored, skipped) = attempt_once(
                store.as_ref(),
                catalog.as_ref(),
                progress.as_ref(),
                provider.as_ref(),
                &request,
                &job.item,
                attempt,
                last_allowed,
                sent,
            )
            .await;
            AttemptDone {
                job,
                attempt,
                reservation,
                key,
                result,
                stored,
                skipped,
            }
        });
    }
}

impl RunOptions {
    fn limits_is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}

fn placeholder_job() -> Job {
    Job {
        group: usize::MAX,
        item: WorkItem {
            generation_id: -1,
            condition_slug: String::new(),
            prompt_id: String::new(),
            package_version: String::new(),
            context_index: 0,
            replicate_index: 0,
            attempts: 0,
        },
        leader: false,
        tries: 0,
    }
}

/// Refuses, before anything is sent, a condition whose leader request could
/// never fit under its per-minute limits (it would wait forever).
pub fn check_limits(
    catalog: &Catalog,
    limits: &LimitTable,
    conditions: &[Condition],
    packages: &[PackageRef],
) -> Result<()> {
    let limiter = RateLimiter::new(1.0);
    for c in conditions {
        let key = bucket_key(catalog, c.provider, &c.model);
        limiter.configure(
            &key,
            c.provider,
            limits.lookup(catalog, c.provider, &c.model),
        );
        for p in packages {
            let tokens = p.tokens(Tokenizer::for_provider(c.provider));
            let charge = Charge::estimate(c.provider, tokens, 0, tokens, u64::from(c.max_tokens));
            limiter.check_fits(&key, charge).map_err(|problem| {
                Error::Preflight(format!(
                    "condition `{}`, context `{}`: {problem}",
                    c.slug, p.id
                ))
            })?;
        }
    }
    Ok(())
}

/// Restamps a reservation at the moment its request leaves.
struct Sent<'a> {
    limiter: &'a RateLimiter,
    reservation: &'a mut Reservation,
    worker: &'a str,
}

/// One attempt: mark it, send it, store how it ended.
#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    store: &dyn Store,
    catalog: &Catalog,
    progress: &dyn Progress,
    provider: &dyn Provider,
    request: &GenerationRequest,
    item: &WorkItem,
    attempt: u32,
    last_allowed: bool,
    sent: Sent<'_>,
) -> (
    std::result::Result<Generated, AttemptError>,
    Result<()>,
    bool,
) {
    let slug = request.condition.slug.clone();
    if let Err(e) = store
        .begin_attempt(item.generation_id, attempt, Some(sent.worker))
        .await
    {
        let skipped = matches!(e, Error::NotClaimable(_));
        return (
            Err(AttemptError::new(
                ErrorClass::Decode,
                "not sent: the ledger refused the attempt",
            )),
            if skipped { Ok(()) } else { Err(e) },
            skipped,
        );
    }
    let started = Instant::now();
    sent.limiter.mark_sent(sent.reservation, started);
    let result = provider.generate(request).await;
    let latency_ms = started.elapsed().as_millis() as u64;
    let stored = match &result {
        Ok(generated) => {
            let cost = catalog.cost(&request.condition, &generated.usage);
            let end = AttemptEnd::Success(GenerationResult {
                usage: generated.usage,
                cost_usd: cost,
                finish_reason: generated.finish_reason.clone(),
                provider_request_id: generated.request_id.clone(),
                model_snapshot: generated.model_snapshot.clone(),
                request_hash: Some(generated.request_hash.clone()),
                response_text: generated.text.clone(),
                latency_ms,
            });
            let stored = store.end_attempt(item.generation_id, attempt, &end).await;
            progress.event(&ProgressEvent::Finished {
                condition: slug,
                success: true,
                cache_hit: generated.usage.cache_hit(),
                cost_usd: cost,
            });
            stored
        }
        Err(error) => {
            let last = last_allowed || !error.is_retryable();
            let end = AttemptEnd::Failed {
                class: error.class,
                message: error.to_string(),
                http_status: error.http_status,
                provider_request_id: error.request_id.clone(),
                latency_ms,
                last,
            };
            let stored = store.end_attempt(item.generation_id, attempt, &end).await;
            if last {
                tracing::warn!(condition = %slug, prompt_id = %item.prompt_id, replicate = item.replicate_index, attempt, %error, "generation failed");
                progress.event(&ProgressEvent::Finished {
                    condition: slug,
                    success: false,
                    cache_hit: false,
                    cost_usd: None,
                });
            }
            stored
        }
    };
    (result, stored, false)
}

/// The delay before retry number `retry` (0-based): the server's
/// `retry-after` when given (already in real time), else `base · 2^retry`
/// stretched by up to 25% jitter (`jitter` in 0..1) and scaled.
pub fn backoff_delay(
    retry: u32,
    retry_after: Option<Duration>,
    base: Duration,
    jitter: f64,
    time_scale: f64,
) -> Duration {
    if let Some(wait) = retry_after {
        return wait;
    }
    let exponential = base.saturating_mul(1u32 << retry.min(16));
    exponential.mul_f64((1.0 + 0.25 * jitter.clamp(0.0, 1.0)) * time_scale)
}

/// A deterministic jitter in 0..1 per (generation, attempt), so a rerun waits
/// the same and tests are repeatable.
fn jitter(generation_id: i64, attempt: u32) -> f64 {
    let mut x = (generation_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(attempt);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_1_2_4_seconds_with_bounded_jitter() {
        let base = Duration::from_secs(1);
        for (retry, secs) in [(0, 1.0), (1, 2.0), (2, 4.0)] {
            let low = backoff_delay(retry, None, base, 0.0, 1.0);
            let high = backoff_delay(retry, None, base, 0.999, 1.0);
            assert_eq!(low, Duration::from_secs_f64(secs));
            assert!(high < Duration::from_secs_f64(secs * 1.25) && high > low);
        }
        assert_eq!(
            backoff_delay(0, None, base, 0.0, 0.01),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn retry_after_wins_and_is_not_scaled() {
        let d = backoff_delay(
            2,
            Some(Duration::from_millis(1500)),
            Duration::from_secs(1),
            0.5,
            0.01,
        );
        assert_eq!(d, Duration::from_millis(1500));
    }

    #[test]
    fn jitter_is_deterministic_and_in_range() {
        assert_eq!(jitter(7, 2), jitter(7, 2));
        assert_ne!(jitter(7, 2), jitter(7, 3));
        assert!((0..1000).all(|i| (0.0..1.0).contains(&jitter(i, 1))));
    }
}
