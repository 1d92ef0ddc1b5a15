//! The provider-batch transport's transitions: which queued attempts go in
//! which batch (waves, caps, the enqueued-token limit), what a refusal asks
//! of the next submission, when to look for, poll and read a batch, and how
//! its results end each item. The rules are [`waves`](super::super::waves)'
//! pure functions; the verdicts are the one [`RetryPolicy`]'s; each item's
//! end goes through the same `judge` and `after_stored` as a synchronous
//! attempt's.

#![allow(
    clippy::result_large_err,
    reason = "item outcomes are `AttemptError`s, as `Provider::generate` returns them"
)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::Dispatcher;
use crate::condition::{Api, ProviderKind};
use crate::dispatch::ProgressEvent;
use crate::dispatch::protocol::{Action, BatchSubmission, ItemOutcome};
use crate::dispatch::retry::{RetryPolicy, Verdict};
use crate::dispatch::waves::{
    self, POLL_FAILURES, POLL_FIRST, POLL_MAX, RESULT_TRIES, Refusal, Warmth,
};
use crate::dispatch::work::{Attached, BatchStage, OpenBatch, Outcome, Stage};
use crate::dispatch::work::{
    BatchRef, Candidate, ConditionGate, GenerationId, GroupPhase, Role, VerifyGate,
};
use crate::provider::{AttemptError, BatchCaps, BatchProgress, ErrorClass, Generated};
use crate::run::{AttemptEnd, BatchRecord, BatchState, Wave, WorkItem};
use crate::tokens::Tokenizer;
use std::sync::Arc;

/// A batch's items as the machine decides them: per item, its verdict,
/// the outcome kept for when it is stored, and the end the ledger stores.
type Decisions = Vec<(GenerationId, Verdict, Outcome, AttemptEnd)>;

/// (provider, model, endpoint, wave, cap of a refused invalid batch).
type BucketKey = (ProviderKind, String, Api, Wave, Option<usize>);

impl Dispatcher {
    /// Whether a condition's requests go in provider batches.
    pub(super) fn via_batch(&self, _slug: &str) -> bool {
        self.config.batch.is_some()
    }

    /// Whether a batch condition's replicates share a cache: caching on
    /// and more than one replicate (a leader wave, then a follower wave);
    /// otherwise every request goes on its own, at once, without hints.
    pub(super) fn batch_shares_cache(&self) -> bool {
        self.config.cache && self.config.replicates > 1
    }

    fn scaled(&self, d: Duration) -> Duration {
        crate::time::scaled(d, self.config.time_scale).max(Duration::from_millis(10))
    }

    /// Re-attaches to the run's open batches whose items this worker holds
    /// (all of them), and names the items of the others.
    pub(super) fn attach_batches(
        &mut self,
        items: &[WorkItem],
        records: Vec<(BatchRecord, Duration)>,
    ) -> Attached {
        let held: HashSet<GenerationId> = items.iter().map(|i| i.generation_id).collect();
        let mut attached = Attached::default();
        for (record, age) in records {
            if self.known_batches.contains(&record.batch_key) {
                continue;
            }
            let ids: Vec<GenerationId> = record.items.iter().map(|i| i.generation_id).collect();
            let ours = ids
                .iter()
                .all(|id| held.contains(id) && !self.jobs.contains_key(id));
            if !ours {
                attached
                    .theirs
                    .extend(ids.iter().filter(|id| !self.jobs.contains_key(id)));
                if self.foreign_batches.insert(record.batch_key.clone()) {
                    tracing::warn!(
                        batch = record
                            .provider_batch_id
                            .as_deref()
                            .unwrap_or(&record.batch_key),
                        "another live process holds the work of this batch in flight; leaving it to it"
                    );
                }
                continue;
            }
            let batch = BatchRef(self.next_batch);
            self.next_batch += 1;
            tracing::info!(
                batch = record
                    .provider_batch_id
                    .as_deref()
                    .unwrap_or(&record.batch_key),
                items = ids.len(),
                "re-attaching to a batch of an earlier execution"
            );
            for id in &ids {
                attached.mine.insert(*id, (batch, record.wave));
            }
            attached.ages.insert(batch, age);
            self.known_batches.insert(record.batch_key.clone());
            let interval = self.scaled(POLL_FIRST);
            self.batches.insert(
                batch,
                OpenBatch {
                    provider: record.provider,
                    model: record.model,
                    wave: record.wave,
                    items: ids,
                    stage: if record.provider_batch_id.is_some() {
                        BatchStage::Waiting(self.now)
                    } else {
                        BatchStage::Unacknowledged(self.now)
                    },
                    key: Some(record.batch_key),
                    created_at: Some(record.created_at),
                    provider_id: record.provider_batch_id,
                    submitted: self.now.checked_sub(age).unwrap_or(self.now),
                    reattached: true,
                    cancelled: false,
                    tokens: 0,
                    interval,
                    failures: 0,
                    progress: (0, 0),
                },
            );
        }
        attached
    }

    /// The next time a batch needs looking at.
    pub(super) fn next_batch_timer(&self) -> Option<Instant> {
        if self.stopping {
            return None;
        }
        self.batches
            .values()
            .filter_map(|b| match b.stage {
                BatchStage::Unacknowledged(at)
                | BatchStage::Waiting(at)
                | BatchStage::FetchAgain(at) => Some(at),
                _ => None,
            })
            .min()
    }

    /// Whether an action on a batch is out (its answer is awaited even
    /// when stopping: a submission may have been paid for, results are).
    pub(super) fn batch_action_outstanding(&self) -> bool {
        self.batches.values().any(|b| {
            matches!(
                b.stage,
                BatchStage::Submitting
                    | BatchStage::Finding
                    | BatchStage::Polling
                    | BatchStage::Fetching
                    | BatchStage::Closing
            )
        })
    }

    /// Looks for, polls and reads the batches whose time has come.
    pub(super) fn service_batches(&mut self) {
        if self.stopping {
            return;
        }
        let now = self.now;
        let due: Vec<BatchRef> = self
            .batches
            .iter()
            .filter(|(_, b)| {
                matches!(b.stage, BatchStage::Unacknowledged(at) | BatchStage::Waiting(at) | BatchStage::FetchAgain(at) if at <= now)
            })
            .map(|(r, _)| *r)
            .collect();
        for batch in due {
            let open = self.batches.get_mut(&batch).expect("due");
            let action = match (open.stage, &open.provider_id) {
                (BatchStage::Unacknowledged(_), _) => {
                    open.stage = BatchStage::Finding;
                    Action::FindBatch {
                        batch,
                        provider: open.provider,
                        key: open.key.clone().unwrap_or_default(),
                        created_at: open.created_at.clone().unwrap_or_default(),
                        items: open.items.len(),
                    }
                }
                (BatchStage::Waiting(_), Some(id)) => {
                    let action = Action::PollBatch {
                        batch,
                        provider: open.provider,
                        id: id.clone(),
                    };
                    open.stage = BatchStage::Polling;
                    action
                }
                (BatchStage::FetchAgain(_), Some(_)) => self.fetch_action(batch),
                _ => continue,
            };
            self.outbox.push_back(action);
        }
    }

    fn fetch_action(&mut self, batch: BatchRef) -> Action {
        let open = self.batches.get_mut(&batch).expect("an open batch");
        open.stage = BatchStage::Fetching;
        let (provider, id, plain) = (
            open.provider,
            open.provider_id.clone().unwrap_or_default(),
            open.wave == Wave::Single,
        );
        let ids = open.items.clone();
        let items = ids
            .into_iter()
            .filter(|id| self.jobs.contains_key(id))
            .map(|id| self.attempt_with(id, plain))
            .collect();
        Action::FetchResults {
            batch,
            provider,
            id,
            items,
        }
    }

    /// Gathers the queued attempts of batch conditions into batches, one
    /// per (provider, model, endpoint, wave), within the caps and the
    /// enqueued-token limit. False when a token count must come first.
    pub(super) fn dispatch_bulk(&mut self) -> bool {
        self.bulk_wake = None;
        if self.config.batch.is_none() || self.stopping || self.verify != VerifyGate::Open {
            return true;
        }
        let now = self.now;
        let mut buckets: Vec<(BucketKey, Vec<(Candidate, GenerationId)>)> = Vec::new();
        for candidate in self.queue.candidates(now) {
            let (id, group_id) = match candidate {
                Candidate::Retry(_, id) | Candidate::Follower(id) => (id, self.jobs[&id].group),
                Candidate::Leader(g) => (self.groups[&g].leader, g),
            };
            let group = &self.groups[&group_id];
            let slug = &group.condition.slug;
            if !self.via_batch(slug) {
                continue;
            }
            match &self.gates[slug] {
                ConditionGate::Open => {}
                ConditionGate::Stopped(_) => continue,
                // The first request of a condition goes alone: a free one
                // that checks its key and model before a batch is paid for.
                ConditionGate::Probing => {
                    if self.checking.insert(slug.clone()) {
                        tracing::debug!(condition = %slug, "checking the key and model with a free request");
                        let condition = Arc::clone(&group.condition);
                        self.outbox.push_back(Action::Check(condition));
                    }
                    continue;
                }
            }
            let provider = group.condition.provider;
            if let Some(&(_, not_before)) = self.refusals.get(&provider)
                && not_before > now
            {
                self.bulk_wake = Some(self.bulk_wake.map_or(not_before, |w| w.min(not_before)));
                continue;
            }
            let tokenizer = Tokenizer::for_provider(provider);
            if !self
                .splits
                .contains_key(&(group.version.clone(), tokenizer))
            {
                self.request_count(group_id, tokenizer);
                return false;
            }
            let (model, api) = (group.condition.model.clone(), group.condition.api);
            let wave = self.wave_of(id);
            let key = (provider, model, api, wave, self.jobs[&id].max_batch);
            match buckets.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push((candidate, id)),
                None => buckets.push((key, vec![(candidate, id)])),
            }
        }
        for (key, members) in buckets {
            self.submit_bucket(key, members);
        }
        true
    }

    /// The wave an attempt goes in: a leader writes the long cache, a
    /// follower reads it while it is warm; otherwise neither.
    fn wave_of(&mut self, id: GenerationId) -> Wave {
        let job = &self.jobs[&id];
        let group_id = job.group;
        let group = &self.groups[&group_id];
        if !group.shares_cache {
            return Wave::Single;
        }
        match (job.role, group.phase) {
            (Role::Leader, GroupPhase::Queued | GroupPhase::LeaderOut) => Wave::Leader,
            (_, GroupPhase::Warm) => {
                let provider = group.condition.provider;
                let lifetime = waves::cache_lifetime(provider, group.cache_controls);
                let expected = self.turnaround.get(&provider).copied().unwrap_or_default();
                let warm = group.warmth.is_some_and(|w| {
                    waves::still_warm(w, lifetime, expected, self.now, self.config.time_scale)
                });
                if warm {
                    Wave::Follower
                } else {
                    // A write nobody would read is only a surcharge.
                    tracing::debug!(prompt_id = %group.prompt_id, condition = %group.condition.slug, "its leader's cache would be cold: the rest go without cache hints");
                    self.groups.get_mut(&group_id).expect("a group").phase = GroupPhase::Cold;
                    Wave::Single
                }
            }
            _ => Wave::Single,
        }
    }

    /// A request's size in a batch upload, by its context's bytes (or its
    /// tokens where the version's size is unknown) and the body around it.
    fn estimated_bytes(&self, prompt_id: &str, version: &str, tokens: u64) -> usize {
        let text = self
            .packages
            .get(&(prompt_id.to_owned(), version.to_owned()))
            .map_or(tokens.saturating_mul(4), |p| p.byte_len);
        usize::try_from(text + text / 16 + 2048).unwrap_or(usize::MAX)
    }

    fn submit_bucket(
        &mut self,
        (provider, model, _, wave, max_batch): BucketKey,
        members: Vec<(Candidate, GenerationId)>,
    ) {
        let mut caps = self
            .config
            .batch
            .as_ref()
            .and_then(|b| b.caps.get(&provider).copied())
            .unwrap_or(BatchCaps {
                max_requests: 50_000,
                max_bytes: 200 << 20,
            });
        if let Some(&cap) = self.learned_caps.get(&(provider, model.clone())) {
            caps.max_requests = caps.max_requests.min(cap);
        }
        if let Some(cap) = max_batch {
            caps.max_requests = caps.max_requests.min(cap);
        }
        let queue_limit = self
            .queue_limits
            .get(&(provider, model.clone()))
            .copied()
            .or_else(|| {
                self.limits
                    .cap(&self.catalog, provider, &model)
                    .batch_queue_tokens
            });
        let enqueued: u64 = self
            .batches
            .values()
            .filter(|b| b.provider == provider && b.model == model)
            .map(|b| b.tokens)
            .sum();
        let sized = members
            .into_iter()
            .map(|(candidate, id)| {
                let group = &self.groups[&self.jobs[&id].group];
                let tokenizer = Tokenizer::for_provider(provider);
                let (prefix, rest) = self.splits[&(group.version.clone(), tokenizer)];
                let bytes = self.estimated_bytes(&group.prompt_id, &group.version, prefix + rest);
                let counted = if queue_limit.is_some() {
                    prefix + rest
                } else {
                    0
                };
                ((candidate, id, prefix + rest), bytes, counted)
            })
            .collect();
        let (batches, later, never) =
            waves::split_batches(sized, caps, queue_limit.map(|l| (l, enqueued)));
        if !later.is_empty() {
            tracing::debug!(
                model,
                items = later.len(),
                "no room in the enqueued-token limit now; they go when a batch of the model ends"
            );
        }
        for (candidate, id, _) in never {
            // Larger than the queue alone: it can never go in a batch.
            let error = AttemptError::new(
                ErrorClass::ExceedsRateLimit,
                format!(
                    "the request is larger than the model's enqueued-token limit for batches ({} tokens); run it without --batch",
                    queue_limit.unwrap_or(0)
                ),
            );
            self.queue.remove_all(&HashSet::from([candidate]));
            self.launch_doomed(id, error);
        }
        for batch in batches {
            self.open_batch(provider, &model, wave, batch);
        }
    }

    fn open_batch(
        &mut self,
        provider: ProviderKind,
        model: &str,
        wave: Wave,
        members: Vec<(Candidate, GenerationId, u64)>,
    ) {
        let batch = BatchRef(self.next_batch);
        self.next_batch += 1;
        let taken: HashSet<Candidate> = members.iter().map(|(c, _, _)| *c).collect();
        self.queue.remove_all(&taken);
        let mut ids = Vec::with_capacity(members.len());
        let mut tokens = 0;
        for (_, id, item_tokens) in members {
            let job = self.jobs.get_mut(&id).expect("a queued job");
            job.budget.tries = job.budget.tries.saturating_add(1);
            job.stage = Stage::InBatch;
            job.batch = Some(batch);
            if job.role == Role::Leader
                && let Some(group) = self.groups.get_mut(&job.group)
                && group.phase == GroupPhase::Queued
            {
                group.phase = GroupPhase::LeaderOut;
            }
            tokens += item_tokens;
            ids.push(id);
        }
        let items = ids
            .iter()
            .map(|&id| self.attempt_with(id, wave == Wave::Single))
            .collect();
        let interval = self.scaled(POLL_FIRST);
        self.batches.insert(
            batch,
            OpenBatch {
                provider,
                model: model.to_owned(),
                wave,
                items: ids,
                key: None,
                created_at: None,
                provider_id: None,
                stage: BatchStage::Submitting,
                submitted: self.now,
                reattached: false,
                cancelled: false,
                tokens,
                interval,
                failures: 0,
                progress: (0, 0),
            },
        );
        self.outbox.push_back(Action::SubmitBatch(BatchSubmission {
            batch,
            provider,
            model: model.to_owned(),
            wave,
            items,
        }));
    }

    /// An attempt that can never be sent: recorded, then failed at once.
    fn launch_doomed(&mut self, id: GenerationId, error: AttemptError) {
        let job = self.jobs.get_mut(&id).expect("a queued job");
        job.budget.tries = job.budget.tries.saturating_add(1);
        job.stage = Stage::Beginning;
        job.doomed = Some(Box::new(error));
        let slug = self.groups[&job.group].condition.slug.clone();
        self.in_flight += 1;
        *self.in_flight_by_condition.entry(slug).or_default() += 1;
        let attempt = self.attempt_of(id);
        self.outbox.push_back(Action::Begin(attempt));
    }

    /// Halts the run (a Batch API that stopped answering, a batch cancelled
    /// from outside): nothing new starts; open batches keep running at the
    /// provider for a resume.
    fn halt(&mut self, reason: String) {
        tracing::error!(%reason, "the run stops");
        self.summary.halted.get_or_insert(reason);
        self.stopping = true;
    }

    pub(super) fn on_batch_submitted(
        &mut self,
        batch: BatchRef,
        key: String,
        created_at: String,
        outcome: Result<String, AttemptError>,
    ) {
        let max_retries = self.config.retry.max_attempts.saturating_sub(1);
        let now = self.now;
        let Some(open) = self
            .batches
            .get_mut(&batch)
            .filter(|b| b.stage == BatchStage::Submitting)
        else {
            return;
        };
        self.known_batches.insert(key.clone());
        open.key = Some(key);
        open.created_at = Some(created_at);
        let provider = open.provider;
        match outcome {
            Ok(id) => {
                tracing::info!(batch = %id, wave = open.wave.as_str(), model = %open.model, items = open.items.len(), "submitted a batch");
                open.provider_id = Some(id);
                open.submitted = now;
                open.stage = BatchStage::Waiting(now + open.interval);
                self.refusals.remove(&provider);
            }
            Err(error) if waves::may_exist(&error) => {
                // It may exist at the provider: looked for before its
                // items go again, so nothing is paid for twice.
                tracing::warn!(%error, "a batch submission got no answer; looking for it at the provider before sending its items again");
                open.stage = BatchStage::Unacknowledged(now + open.interval);
                let in_a_row = self.refused_again(provider, &error);
                if in_a_row > max_retries {
                    self.halt(format!(
                        "{provider} failed {in_a_row} batch submissions in a row, the last with {error}; a resume looks for them at the provider and tries again"
                    ));
                }
            }
            Err(error) => self.refuse(batch, &error),
        }
    }

    /// Counts a refusal of `provider`'s submissions and backs it off:
    /// exponentially, or as long as the provider asked. Returns how many in
    /// a row.
    fn refused_again(&mut self, provider: ProviderKind, error: &AttemptError) -> u32 {
        let policy = self.config.retry;
        let entry = self.refusals.entry(provider).or_insert((0, self.now));
        entry.0 += 1;
        let delay = crate::dispatch::backoff_delay(
            entry.0 - 1,
            error.retry_after,
            policy.backoff_base,
            crate::dispatch::retry::jitter(i64::from(entry.0), entry.0),
            policy.time_scale,
        );
        entry.1 = crate::time::later(self.now, delay);
        entry.0
    }

    /// A batch the provider refused (or that failed validation as a whole):
    /// nothing was processed or billed. Its items are answered by a smaller
    /// or a later submission, or end as the refusal says.
    fn refuse(&mut self, batch: BatchRef, error: &AttemptError) {
        let Some(open) = self.batches.get(&batch) else {
            return;
        };
        let (provider, model, n) = (open.provider, open.model.clone(), open.items.len());
        let items = open.items.clone();
        let others_enqueued: u64 = self
            .batches
            .iter()
            .filter(|(r, b)| **r != batch && b.provider == provider && b.model == model)
            .map(|(_, b)| b.tokens)
            .sum();
        let own_tokens = open.tokens;
        let refusal = waves::classify_refusal(error);
        tracing::warn!(batch = ?batch, items = n, %error, ?refusal, "the provider refused a batch");
        let free = Verdict::Retry {
            delay: Duration::ZERO,
        };
        // What each item meets: the same answer for all but where the
        // retry policy judges each (its budget).
        enum ItemFate {
            GiveUp,
            Free,
            Halve,
            HandBack,
            Policy(Instant),
        }
        let fate = match refusal {
            Refusal::TooLarge { .. } | Refusal::Invalid if n == 1 => ItemFate::GiveUp,
            Refusal::TooLarge { cap } => {
                let cap = cap.filter(|&c| c < n).unwrap_or((n / 2).max(1));
                let learned = self
                    .learned_caps
                    .entry((provider, model.clone()))
                    .or_insert(cap);
                *learned = (*learned).min(cap);
                tracing::info!(
                    model,
                    cap = *learned,
                    "the provider's most requests per batch; the items go again in batches that size"
                );
                ItemFate::Free
            }
            // Halve to find the request that is wrong.
            Refusal::Invalid => ItemFate::Halve,
            Refusal::QueueFull { limit } if limit.is_some() || others_enqueued > 0 => {
                // Wait for room: never more than was refused, nor more
                // than the others leave.
                let limit = limit
                    .unwrap_or(others_enqueued)
                    .min((others_enqueued + own_tokens).saturating_sub(1));
                tracing::info!(
                    model,
                    limit,
                    "the provider's enqueued-token limit for this model; later batches fit under it"
                );
                self.queue_limits.insert((provider, model.clone()), limit);
                ItemFate::Free
            }
            Refusal::Fatal => ItemFate::HandBack,
            Refusal::QueueFull { .. } | Refusal::Later => {
                self.refused_again(provider, error);
                ItemFate::Policy(self.refusals[&provider].1)
            }
        };
        let policy = self.config.retry;
        let now = self.now;
        let per_item = |m: &mut Self, id: GenerationId| -> Verdict {
            match fate {
                ItemFate::GiveUp => Verdict::GiveUp,
                ItemFate::Free => free,
                ItemFate::HandBack => Verdict::HandBack,
                ItemFate::Halve => {
                    if let Some(job) = m.jobs.get_mut(&id) {
                        job.max_batch = Some((n / 2).max(1));
                    }
                    free
                }
                ItemFate::Policy(not_before) => {
                    let Some(job) = m.jobs.get_mut(&id) else {
                        return Verdict::GiveUp;
                    };
                    match policy.verdict(Err(error), id, &mut job.budget) {
                        Verdict::Retry { delay } => Verdict::Retry {
                            delay: delay.max(not_before.saturating_duration_since(now)),
                        },
                        other => other,
                    }
                }
            }
        };
        let mut decisions: Decisions = Vec::with_capacity(n);
        for id in items {
            let verdict = per_item(self, id);
            if verdict == free
                && let Some(job) = self.jobs.get_mut(&id)
            {
                // A split or a wait for room spends no retry.
                job.budget.waited = job.budget.waited.saturating_add(1);
            }
            decisions.push(self.failed_decision(id, verdict, error));
        }
        if refusal == Refusal::Fatal {
            let slugs: HashSet<String> = decisions
                .iter()
                .filter_map(|(id, ..)| self.jobs.get(id))
                .map(|j| self.groups[&j.group].condition.slug.clone())
                .collect();
            for slug in slugs {
                self.stop_condition(&slug, error.to_string());
            }
        }
        self.close(batch, BatchState::Failed, decisions);
    }

    /// An item that failed without a result of its own (a refusal, a
    /// cancellation), under `verdict`.
    fn failed_decision(
        &self,
        id: GenerationId,
        verdict: Verdict,
        error: &AttemptError,
    ) -> (GenerationId, Verdict, Outcome, AttemptEnd) {
        let end = super::failed_end(&self.config.retry, error, 0, &verdict);
        (id, verdict, Outcome::Failure(Box::new(error.clone())), end)
    }

    /// Stores each item's end and the batch's state; the verdicts apply
    /// when the ledger has them.
    fn close(&mut self, batch: BatchRef, state: BatchState, decisions: Decisions) {
        let Some(open) = self.batches.get_mut(&batch) else {
            return;
        };
        open.stage = BatchStage::Closing;
        let key = open.key.clone().unwrap_or_default();
        let mut ends = Vec::with_capacity(decisions.len());
        for (id, verdict, outcome, end) in decisions {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            ends.push((id, job.attempt(), end));
            job.stage = Stage::Storing(verdict, Box::new(outcome));
        }
        self.outbox.push_back(Action::CloseBatch {
            batch,
            key,
            state,
            ends,
        });
    }

    /// The answer to a condition's check: taken, its batches may go; a
    /// refusal every request would share stops it, before anything is paid.
    pub(super) fn on_checked(&mut self, slug: &str, outcome: Result<(), AttemptError>) {
        if !self.checking.remove(slug) {
            return;
        }
        match outcome {
            Ok(()) => self.open_condition(slug),
            Err(error) if RetryPolicy::stops_condition(&error) || error.class.hands_back() => {
                self.stop_condition(slug, error.to_string());
            }
            Err(error) => {
                // A passing failure of the check proves nothing either way:
                // the batches will tell.
                tracing::warn!(condition = slug, %error, "could not check the key and model; sending the batches");
                self.open_condition(slug);
            }
        }
    }

    pub(super) fn on_batch_found(
        &mut self,
        batch: BatchRef,
        outcome: Result<Option<String>, AttemptError>,
    ) {
        let now = self.now;
        let Some(open) = self
            .batches
            .get_mut(&batch)
            .filter(|b| b.stage == BatchStage::Finding)
        else {
            return;
        };
        match outcome {
            Ok(Some(id)) => {
                tracing::info!(batch = %id, "found at the provider a batch recorded but never acknowledged; re-attaching");
                open.provider_id = Some(id);
                open.failures = 0;
                open.stage = BatchStage::Waiting(now);
            }
            Ok(None) => {
                // It never got there: its items go again, a try spent.
                let error = AttemptError::new(
                    ErrorClass::Transport,
                    "the batch submission got no answer and the provider has no such batch (not billed)",
                );
                let items = open.items.clone();
                let policy = self.config.retry;
                let mut decisions = Vec::with_capacity(items.len());
                for id in items {
                    let Some(job) = self.jobs.get_mut(&id) else {
                        continue;
                    };
                    let verdict = policy.verdict(Err(&error), id, &mut job.budget);
                    decisions.push(self.failed_decision(id, verdict, &error));
                }
                self.close(batch, BatchState::Failed, decisions);
            }
            Err(error) => {
                open.failures += 1;
                if error.is_retryable() && open.failures < POLL_FAILURES {
                    open.stage = BatchStage::Unacknowledged(now + open.interval);
                } else {
                    open.stage = BatchStage::Left;
                    let key = open.key.clone().unwrap_or_default();
                    self.halt(format!(
                        "cannot look for batch {key} at the provider: {error}; a resume looks again"
                    ));
                }
            }
        }
    }

    pub(super) fn on_batch_polled(
        &mut self,
        batch: BatchRef,
        outcome: Result<BatchProgress, AttemptError>,
    ) {
        let (now, poll_max) = (self.now, self.scaled(POLL_MAX));
        let stopping = self.stopping;
        let Some(open) = self
            .batches
            .get_mut(&batch)
            .filter(|b| b.stage == BatchStage::Polling)
        else {
            return;
        };
        let id = open.provider_id.clone().unwrap_or_default();
        match outcome {
            Ok(progress) => {
                open.failures = 0;
                open.progress = (progress.processed, progress.total);
                if let Some(failure) = &progress.failure {
                    // Failed validation as a whole: a refusal, not item
                    // errors.
                    let mut failure = failure.clone();
                    if let Some(limit) = progress.queue_limit
                        && waves::queue_limit_in(&failure.message).is_none()
                    {
                        failure.message =
                            format!("{} (Limit: {limit} enqueued tokens)", failure.message);
                    }
                    self.refuse(batch, &failure);
                } else if progress.ended && !stopping {
                    open.cancelled = progress.cancelled;
                    let took = now.saturating_duration_since(open.submitted);
                    let provider = open.provider;
                    let longest = self.turnaround.entry(provider).or_default();
                    *longest = (*longest).max(took);
                    let action = self.fetch_action(batch);
                    self.outbox.push_back(action);
                } else {
                    open.stage = BatchStage::Waiting(now + open.interval);
                    open.interval = (open.interval * 2).min(poll_max);
                }
                self.notify_waiting();
            }
            Err(error) => {
                open.failures += 1;
                if error.is_retryable() && open.failures < POLL_FAILURES {
                    tracing::warn!(batch = %id, %error, "polling a batch failed; trying again");
                    open.stage = BatchStage::Waiting(now + open.interval);
                } else {
                    open.stage = BatchStage::Left;
                    self.halt(format!(
                        "cannot poll batch {id}: {error}; it keeps running: a resume re-attaches to it, `apex cancel` cancels it"
                    ));
                }
            }
        }
    }

    pub(super) fn on_batch_fetched(
        &mut self,
        batch: BatchRef,
        outcome: Result<Vec<ItemOutcome>, AttemptError>,
    ) {
        let now = self.now;
        let poll_max = self.scaled(POLL_MAX);
        let Some(open) = self
            .batches
            .get_mut(&batch)
            .filter(|b| b.stage == BatchStage::Fetching)
        else {
            return;
        };
        let id = open.provider_id.clone().unwrap_or_default();
        let results = match outcome {
            Ok(results) => results,
            Err(error) => {
                open.failures += 1;
                if error.is_retryable() && open.failures <= RESULT_TRIES {
                    tracing::warn!(batch = %id, %error, "reading a batch's results failed; trying again");
                    open.stage = BatchStage::FetchAgain(now + open.interval);
                    open.interval = (open.interval * 2).min(poll_max);
                } else {
                    open.stage = BatchStage::Left;
                    self.halt(format!(
                        "cannot read the results of batch {id}: {error}; a resume reads them again"
                    ));
                }
                return;
            }
        };
        let (cancelled, ours_to_resend) = (open.cancelled, open.reattached);
        let took = now.saturating_duration_since(open.submitted);
        let latency_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let wave = open.wave;
        let mut by_id: HashMap<GenerationId, Result<Generated, AttemptError>> =
            results.into_iter().collect();
        let items = open.items.clone();
        let mut decisions: Decisions = Vec::with_capacity(items.len());
        let mut cancelled_outside = false;
        for item in items {
            if !self.jobs.contains_key(&item) {
                continue;
            }
            let outcome = by_id.remove(&item).unwrap_or_else(|| {
                Err(AttemptError::new(
                    ErrorClass::ServerError,
                    "the batch's results have no line for this item",
                ))
            });
            match outcome {
                Err(error) if cancelled && error.class == ErrorClass::Conflict => {
                    // Cancelled before it was processed: not billed.
                    let verdict = if ours_to_resend {
                        // Cancelled before this execution (`apex cancel`,
                        // then a resume): it goes again, free.
                        let job = self.jobs.get_mut(&item).expect("checked");
                        job.budget.waited = job.budget.waited.saturating_add(1);
                        Verdict::Retry {
                            delay: Duration::ZERO,
                        }
                    } else {
                        cancelled_outside = true;
                        Verdict::HandBack
                    };
                    decisions.push(self.failed_decision(item, verdict, &error));
                }
                outcome => {
                    let (end, verdict, note) = self.judge(item, outcome, latency_ms, true);
                    let job = self.jobs.get_mut(&item).expect("checked");
                    if wave == Wave::Leader
                        && job.role == Role::Leader
                        && matches!(note, Outcome::Success { .. })
                        && let Some(group) = self.groups.get_mut(&job.group)
                    {
                        group.warmth = Some(Warmth {
                            written: now.checked_sub(took).unwrap_or(now),
                            took,
                        });
                    }
                    decisions.push((item, verdict, note, end));
                }
            }
        }
        if cancelled_outside {
            self.halt(format!(
                "batch {id} was cancelled outside this run (`apex cancel` or the provider's console); its unprocessed items are pending: a resume sends them"
            ));
        }
        self.close(
            batch,
            if cancelled {
                BatchState::Cancelled
            } else {
                BatchState::Ended
            },
            decisions,
        );
    }

    pub(super) fn on_batch_closed(&mut self, batch: BatchRef) {
        if !self
            .batches
            .get(&batch)
            .is_some_and(|b| b.stage == BatchStage::Closing)
        {
            return;
        }
        let open = self.batches.remove(&batch).expect("checked");
        for id in open.items {
            let Some(mut job) = self.jobs.remove(&id) else {
                continue;
            };
            if !matches!(job.stage, Stage::Storing(..)) {
                self.jobs.insert(id, job);
                continue;
            }
            job.batch = None;
            self.after_stored(job);
        }
        self.notify_waiting();
    }

    /// A ledger action on a batch failed (the run stops): the batch is
    /// forgotten here; what the ledger has of it (an intent, a submitted
    /// batch) is found again by a resume, and paid results it did not take
    /// are kept by the driver.
    pub(super) fn batch_task_failed(&mut self, batch: BatchRef) {
        let Some(open) = self.batches.remove(&batch) else {
            return;
        };
        for id in open.items {
            if let Some(job) = self.jobs.remove(&id) {
                self.job_finished(job.group);
            }
        }
    }

    /// Tells the display how the open batches stand.
    fn notify_waiting(&mut self) {
        if self.batches.is_empty() && self.config.batch.is_none() {
            return;
        }
        let (processed, total) = self.batches.values().fold((0, 0), |(p, t), b| {
            (p + b.progress.0, t + b.progress.1.max(b.items.len() as u64))
        });
        self.outbox
            .push_back(Action::Notify(ProgressEvent::Waiting {
                batches: u32::try_from(self.batches.len()).unwrap_or(u32::MAX),
                processed,
                total,
            }));
    }
}
