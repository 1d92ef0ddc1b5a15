//! Executing a run: cache-aware order, a concurrency bound, retries with
//! backoff, fatal errors that stop a condition, and a clean stop on request.
//!
//! Order: for each (condition, context) the *leader* (first replicate) goes
//! first; its *followers* are released when it completes, so they read the
//! cache it wrote. Released followers always go before new leaders. The very
//! first request of each condition goes alone: if it fails for a reason that
//! every request of that condition would share (bad key, no quota, unknown
//! model), the condition stops after one request instead of one per cell.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::catalog::Catalog;
use crate::condition::{Condition, ProviderKind};
use crate::context::ContextPackage;
use crate::error::{Error, Result};
use crate::provider::{AttemptError, CacheHint, CacheTtl, GenerationRequest, Provider};
use crate::run::{AttemptEnd, GenerationResult, RunId, RunState, StatusCounts, WorkItem};
use crate::store::Store;

/// How to execute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunOptions {
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Retries after a failed attempt (attempts = retries + 1).
    pub max_retries: u32,
    /// Send prompt-caching hints.
    pub cache: bool,
    /// Send one request per condition first; stop everything if one fails.
    pub verify_first: bool,
    /// Multiplies Apex's own pacing durations (backoff); 1 in real use.
    pub time_scale: f64,
    /// First backoff delay (then ×2 per retry).
    pub backoff_base: Duration,
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
        }
    }
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
}

#[derive(Default)]
struct ConditionState {
    in_flight: usize,
    probed: bool,
    stopped: Option<String>,
}

enum Outcome {
    Success,
    Failed(Box<AttemptError>),
    Abandoned,
}

struct TaskResult {
    group: Option<usize>,
    slug: String,
    outcome: Result<Outcome>,
}

/// Shared per-execution context for generation tasks.
struct TaskContext {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    options: RunOptions,
    progress: Arc<dyn Progress>,
    run_id: RunId,
    stopped: Arc<Mutex<HashMap<String, String>>>,
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
        let items = self.store.work_items(run_id, include_errors).await?;
        self.store.set_run_state(run_id, RunState::Running).await?;
        self.progress.event(&ProgressEvent::Started {
            total: items.len() as u64,
        });
        let mut groups: Vec<Group> = Vec::new();
        for item in items {
            let condition = conditions
                .get(&item.condition_slug)
                .cloned()
                .ok_or_else(|| {
                    Error::store_msg(format!(
                        "generation {} names condition `{}` that the run does not list",
                        item.generation_id, item.condition_slug
                    ))
                })?;
            match groups.last_mut() {
                Some(g)
                    if g.condition.slug == item.condition_slug
                        && g.prompt_id == item.prompt_id
                        && g.version == item.package_version =>
                {
                    g.items.push(item)
                }
                _ => groups.push(Group {
                    condition,
                    prompt_id: item.prompt_id.clone(),
                    version: item.package_version.clone(),
                    items: vec![item],
                }),
            }
        }

        let ctx = Arc::new(TaskContext {
            store: Arc::clone(&self.store),
            catalog: Arc::clone(&self.catalog),
            options: self.options,
            progress: Arc::clone(&self.progress),
            run_id: run_id.clone(),
            stopped: Arc::new(Mutex::new(HashMap::new())),
        });
        let mut packages: HashMap<(String, String), Arc<ContextPackage>> = HashMap::new();
        let mut states: HashMap<String, ConditionState> = HashMap::new();
        let mut leaders: VecDeque<usize> = (0..groups.len()).collect();
        let mut followers: VecDeque<(usize, WorkItem)> = VecDeque::new();
        let mut tasks: JoinSet<TaskResult> = JoinSet::new();
        let mut report = RunReport::default();
        let mut stopping = *stop.borrow();

        // --verify-first: the first generation of each condition, alone.
        let mut verifying = self.options.verify_first;
        if verifying {
            let mut seen = std::collections::HashSet::new();
            let firsts: Vec<usize> = leaders
                .iter()
                .copied()
                .filter(|&g| seen.insert(groups[g].condition.slug.clone()))
                .collect();
            leaders.retain(|g| !firsts.contains(g));
            for g in firsts {
                let item = groups[g].items.remove(0);
                self.spawn(
                    &ctx,
                    &mut tasks,
                    &groups,
                    g,
                    item,
                    true,
                    &mut packages,
                    &mut states,
                )
                .await?;
            }
        }

        loop {
            while !verifying && !stopping && tasks.len() < self.options.concurrency.max(1) {
                let next_follower = followers.iter().position(|(g, _)| {
                    states
                        .get(&groups[*g].condition.slug)
                        .is_none_or(|s| s.stopped.is_none())
                });
                if let Some(i) = next_follower {
                    let (g, item) = followers.remove(i).expect("position is in range");
                    self.spawn(
                        &ctx,
                        &mut tasks,
                        &groups,
                        g,
                        item,
                        false,
                        &mut packages,
                        &mut states,
                    )
                    .await?;
                    continue;
                }
                let next_leader = leaders.iter().position(|&g| {
                    let s = states.entry(groups[g].condition.slug.clone()).or_default();
                    s.stopped.is_none() && (s.probed || s.in_flight == 0)
                });
                let Some(i) = next_leader else { break };
                let g = leaders.remove(i).expect("position is in range");
                let item = groups[g].items.remove(0);
                self.spawn(
                    &ctx,
                    &mut tasks,
                    &groups,
                    g,
                    item,
                    true,
                    &mut packages,
                    &mut states,
                )
                .await?;
            }
            if tasks.is_empty() {
                if verifying && !report.verify_failed && !stopping {
                    verifying = false;
                    continue;
                }
                break;
            }
            let joined = tokio::select! {
                joined = tasks.join_next() => joined,
                changed = stop.changed(), if !stopping => {
                    if changed.is_err() || *stop.borrow() {
                        stopping = true;
                        tracing::warn!("stop requested: letting {} request(s) in flight finish", tasks.len());
                    }
                    continue;
                }
            };
            let Some(joined) = joined else { continue };
            let result =
                joined.map_err(|e| Error::store_msg(format!("a generation task failed: {e}")))?;
            let state = states.entry(result.slug.clone()).or_default();
            state.in_flight -= 1;
            match result.outcome? {
                Outcome::Success => state.probed = true,
                Outcome::Failed(error) if error.class.is_fatal_for_condition() => {
                    let reason = error.to_string();
                    if state.stopped.is_none() {
                        state.stopped = Some(reason.clone());
                        ctx.stopped
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(result.slug.clone(), reason.clone());
                        tracing::error!(condition = %result.slug, %reason, "condition stopped");
                        self.progress.event(&ProgressEvent::ConditionStopped {
                            condition: result.slug.clone(),
                            reason: reason.clone(),
                        });
                        report.stopped.push((result.slug.clone(), reason));
                    }
                    if verifying {
                        report.verify_failed = true;
                    }
                }
                Outcome::Failed(_) => {
                    state.probed = true;
                    if verifying {
                        report.verify_failed = true;
                    }
                }
                Outcome::Abandoned => {}
            }
            if report.verify_failed && !stopping {
                stopping = true;
                tracing::error!("--verify-first failed: the batch stops before fanning out");
            }
            if let Some(g) = result.group {
                followers.extend(
                    std::mem::take(&mut groups[g].items)
                        .into_iter()
                        .map(|item| (g, item)),
                );
                // The package text is no longer needed once the group's
                // requests are built (each holds its own Arc).
                packages.remove(&(groups[g].prompt_id.clone(), groups[g].version.clone()));
            }
        }

        report.interrupted = *stop.borrow();
        let counts = self.store.run(run_id).await?.counts;
        let state = if counts.pending + counts.running == 0 {
            RunState::Finished
        } else {
            RunState::Interrupted
        };
        self.store.set_run_state(run_id, state).await?;
        report.counts = counts;
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn(
        &self,
        ctx: &Arc<TaskContext>,
        tasks: &mut JoinSet<TaskResult>,
        groups: &[Group],
        g: usize,
        item: WorkItem,
        leader: bool,
        packages: &mut HashMap<(String, String), Arc<ContextPackage>>,
        states: &mut HashMap<String, ConditionState>,
    ) -> Result<()> {
        let group = &groups[g];
        let key = (group.prompt_id.clone(), group.version.clone());
        let package = match packages.get(&key) {
            Some(p) => Arc::clone(p),
            None => {
                let p = Arc::new(self.store.package(&key.0, &key.1).await?);
                packages.insert(key, Arc::clone(&p));
                p
            }
        };
        let condition = Arc::clone(&group.condition);
        let provider = Arc::clone(&self.providers[&condition.provider]);
        states.entry(condition.slug.clone()).or_default().in_flight += 1;
        let ctx = Arc::clone(ctx);
        let request = GenerationRequest {
            condition,
            package,
            cache: if self.options.cache {
                CacheHint::On(CacheTtl::FiveMinutes)
            } else {
                CacheHint::Off
            },
            trace: None,
        };
        tasks.spawn(async move {
            let slug = request.condition.slug.clone();
            let outcome = run_generation(&ctx, provider.as_ref(), request, &item).await;
            TaskResult {
                group: leader.then_some(g),
                slug,
                outcome,
            }
        });
        Ok(())
    }
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

async fn run_generation(
    ctx: &TaskContext,
    provider: &dyn Provider,
    mut request: GenerationRequest,
    item: &WorkItem,
) -> Result<Outcome> {
    let slug = request.condition.slug.clone();
    let first = item.attempts + 1;
    let last = item.attempts + ctx.options.max_retries + 1;
    for attempt in first..=last {
        let stopped = ctx
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&slug)
            .cloned();
        if let Some(reason) = stopped {
            tracing::debug!(condition = %slug, %reason, "skipped: condition stopped");
            if attempt > first {
                // A retry was pending: hand the generation back as pending.
                ctx.store
                    .end_attempt(item.generation_id, attempt - 1, &AttemptEnd::Abandoned)
                    .await?;
            }
            return Ok(Outcome::Abandoned);
        }
        request.trace = Some(format!("{}/{}/{attempt}", ctx.run_id, item.generation_id));
        ctx.store.begin_attempt(item.generation_id, attempt).await?;
        let started = Instant::now();
        let result = provider.generate(&request).await;
        let latency_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(generated) => {
                let cost = ctx.catalog.cost(&request.condition, &generated.usage);
                let cache_hit = generated.usage.cache_hit();
                let end = AttemptEnd::Success(GenerationResult {
                    usage: generated.usage,
                    cost_usd: cost,
                    finish_reason: generated.finish_reason,
                    provider_request_id: generated.request_id,
                    model_snapshot: generated.model_snapshot,
                    request_hash: Some(generated.request_hash),
                    response_text: generated.text,
                    latency_ms,
                });
                ctx.store
                    .end_attempt(item.generation_id, attempt, &end)
                    .await?;
                ctx.progress.event(&ProgressEvent::Finished {
                    condition: slug,
                    success: true,
                    cache_hit,
                    cost_usd: cost,
                });
                return Ok(Outcome::Success);
            }
            Err(error) => {
                let final_attempt = attempt == last || !error.class.is_retryable();
                let end = AttemptEnd::Failed {
                    class: error.class,
                    message: error.to_string(),
                    http_status: error.http_status,
                    provider_request_id: error.request_id.clone(),
                    latency_ms,
                    last: final_attempt,
                };
                ctx.store
                    .end_attempt(item.generation_id, attempt, &end)
                    .await?;
                if final_attempt {
                    tracing::warn!(condition = %slug, prompt_id = %item.prompt_id, replicate = item.replicate_index, attempt, %error, "generation failed");
                    ctx.progress.event(&ProgressEvent::Finished {
                        condition: slug,
                        success: false,
                        cache_hit: false,
                        cost_usd: None,
                    });
                    return Ok(Outcome::Failed(Box::new(error)));
                }
                let delay = backoff_delay(
                    attempt - first,
                    error.retry_after,
                    ctx.options.backoff_base,
                    jitter(item.generation_id, attempt),
                    ctx.options.time_scale,
                );
                tracing::info!(condition = %slug, prompt_id = %item.prompt_id, replicate = item.replicate_index, attempt, %error, delay_ms = delay.as_millis() as u64, "retrying");
                ctx.progress.event(&ProgressEvent::Retrying {
                    condition: slug.clone(),
                    prompt_id: item.prompt_id.clone(),
                    replicate_index: item.replicate_index,
                    attempt,
                    error: error.to_string(),
                    delay,
                });
                tokio::time::sleep(delay).await;
            }
        }
    }
    unreachable!("the last attempt always returns")
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
