//! The dispatcher as a deterministic, synchronous state machine: events in,
//! actions out, `poll_timeout` for the next wake-up. No I/O, no runtime.
//! One machine for both transports: this file holds what they share and
//! the synchronous rules; [`bulk`] the provider-batch transitions.

mod bulk;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalog::Catalog;
use crate::condition::Condition;
use crate::condition::ProviderKind;
use crate::error::Error;
use crate::limiter::{Admission, Charge, LimitTable, RateLimiter, bucket_key};
use crate::plan::PackageRef;
use crate::provider::{AttemptError, CacheHint, Generated, SharedBody};
use crate::run::{AfterFailure, AttemptEnd, BatchRecord, GenerationResult, Wave, WorkItem};
use crate::tokens::Tokenizer;

use super::ProgressEvent;
use super::pacing::{self, CacheRole};
use super::protocol::{Action, Attempt, DispatchConfig, Event, Summary, Task};
use super::retry::{Budget, RetryPolicy, Verdict};
use super::work::{
    Attached, BatchRef, Candidate, ConditionGate, GenerationId, Group, GroupId, GroupPhase, Job,
    OpenBatch, Outcome, ReadyQueue, Role, Stage, VerifyGate,
};

/// Claiming work from the ledger.
#[derive(Debug)]
struct Claims {
    outstanding: bool,
    answered_once: bool,
    exhausted: bool,
    next_at: Instant,
    others_hold: u64,
}

/// Whether the dispatch is running, handing back retries, or done.
#[derive(Debug, PartialEq)]
enum Phase {
    Running,
    Finishing(HashSet<GenerationId>),
    Done,
}

/// The dispatcher. See the [module documentation](super).
pub struct Dispatcher {
    config: DispatchConfig,
    catalog: Arc<Catalog>,
    limits: LimitTable,
    limiter: RateLimiter,
    conditions: HashMap<String, Arc<Condition>>,
    bucket_keys: HashMap<String, String>,
    distinct_keys: usize,
    packages: HashMap<(String, String), PackageRef>,
    gates: HashMap<String, ConditionGate>,
    in_flight_by_condition: HashMap<String, usize>,
    groups: HashMap<GroupId, Group>,
    next_group: u32,
    open_group: Option<GroupId>,
    jobs: HashMap<GenerationId, Job>,
    splits: HashMap<(String, Tokenizer), (u64, u64)>,
    counting: HashSet<(String, Tokenizer)>,
    queue: ReadyQueue,
    verify: VerifyGate,
    claims: Claims,
    next_renew: Instant,
    renewing: bool,
    next_share: Instant,
    sharing: bool,
    limiter_wake: Option<Instant>,
    in_flight: usize,
    stopping: bool,
    summary: Summary,
    phase: Phase,
    outbox: VecDeque<Action>,
    now: Instant,
    reservations: ReservationBook,
    /// Provider batches open in this dispatch.
    batches: BTreeMap<BatchRef, OpenBatch>,
    next_batch: u32,
    /// Batch keys known here (submitted or re-attached), so a later claim
    /// does not attach one twice.
    known_batches: HashSet<String>,
    /// Batch conditions whose key and model are being checked.
    checking: HashSet<String>,
    /// Batch keys seen held by another live process (said once each).
    foreign_batches: HashSet<String>,
    /// Per (provider, model): the most requests per batch a refusal taught.
    learned_caps: HashMap<(ProviderKind, String), usize>,
    /// Per (provider, model): the enqueued-token limit a failure named.
    queue_limits: HashMap<(ProviderKind, String), u64>,
    /// Per provider: submissions refused in a row, and when the next may go.
    refusals: HashMap<ProviderKind, (u32, Instant)>,
    /// Per provider: the longest a batch took to end in this dispatch.
    turnaround: HashMap<ProviderKind, Duration>,
    /// The earliest a batch held back by a provider's backoff may go.
    bulk_wake: Option<Instant>,
}

/// Counts of reservations granted and settled, to check that each is
/// settled exactly once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReservationBook {
    /// Reservations granted.
    pub granted: u64,
    /// Reservations settled.
    pub settled: u64,
    /// Settlements asked for a job holding no reservation (a bug).
    pub settled_twice: u64,
}

impl Dispatcher {
    /// A dispatcher for the run's `conditions`, paced by `limits`, with the
    /// run's current `packages` (for cache TTL choices).
    pub fn new(
        config: DispatchConfig,
        conditions: Vec<Condition>,
        catalog: Arc<Catalog>,
        limits: LimitTable,
        packages: Vec<PackageRef>,
        now: Instant,
    ) -> Self {
        let mut limiter = if limits.is_off() {
            RateLimiter::fixed(config.time_scale)
        } else if config.share_interval.is_some() {
            RateLimiter::shared(config.time_scale)
        } else {
            RateLimiter::new(config.time_scale)
        };
        limiter.set_share(limits.share());
        let mut bucket_keys = HashMap::new();
        for c in &conditions {
            let key = bucket_key(&catalog, c.provider, &c.model);
            // Conditions on one model configure the same key alike.
            limiter.configure(&key, c.provider, limits.cap(&catalog, c.provider, &c.model));
            bucket_keys.insert(c.slug.clone(), key);
        }
        let distinct_keys = bucket_keys.values().collect::<HashSet<_>>().len();
        Self {
            verify: VerifyGate::Open,
            claims: Claims {
                outstanding: false,
                answered_once: false,
                exhausted: false,
                next_at: now,
                others_hold: 0,
            },
            next_renew: crate::time::later(now, config.claim_interval),
            config,
            catalog,
            limits,
            limiter,
            gates: conditions
                .iter()
                .map(|c| (c.slug.clone(), ConditionGate::Probing))
                .collect(),
            conditions: conditions
                .into_iter()
                .map(|c| (c.slug.clone(), Arc::new(c)))
                .collect(),
            bucket_keys,
            distinct_keys,
            packages: packages
                .into_iter()
                .map(|p| ((p.id.clone(), p.version.clone()), p))
                .collect(),
            in_flight_by_condition: HashMap::new(),
            groups: HashMap::new(),
            next_group: 0,
            open_group: None,
            jobs: HashMap::new(),
            splits: HashMap::new(),
            counting: HashSet::new(),
            queue: ReadyQueue::default(),
            renewing: false,
            next_share: now,
            sharing: false,
            limiter_wake: None,
            in_flight: 0,
            stopping: false,
            summary: Summary::default(),
            phase: Phase::Running,
            outbox: VecDeque::new(),
            now,
            reservations: ReservationBook::default(),
            batches: BTreeMap::new(),
            next_batch: 0,
            known_batches: HashSet::new(),
            foreign_batches: HashSet::new(),
            checking: HashSet::new(),
            learned_caps: HashMap::new(),
            queue_limits: HashMap::new(),
            refusals: HashMap::new(),
            turnaround: HashMap::new(),
            bulk_wake: None,
        }
    }

    /// Attempts out now (begun, sent or being stored).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// How each condition's model is paced now, for displays.
    pub fn pacing_report(&self, now: Instant) -> Vec<ProgressEvent> {
        let mut keys: Vec<(&String, &String)> = self.bucket_keys.iter().collect();
        keys.sort();
        keys.into_iter()
            .map(|(slug, key)| ProgressEvent::Pacing {
                condition: slug.clone(),
                key: key.clone(),
                window: self.limiter.usage(key, now).unwrap_or_default(),
                limits: self
                    .limiter
                    .pacing(key)
                    .map(|p| p.limits)
                    .unwrap_or_default(),
                window_length: self.limiter.window(),
            })
            .collect()
    }

    /// The limits each condition's model is paced at now, whole (not this
    /// process's part), as JSON for the run's record: per limiter key, the
    /// provider, each limit, whether each refills as a bucket and where the
    /// figures came from. Keys not known yet are left out.
    pub fn paced_limits(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        for (slug, key) in &self.bucket_keys {
            let Some(pacing) = self.limiter.pacing(key) else {
                continue;
            };
            let provider = self.conditions.get(slug).map(|c| c.provider);
            let names = match provider {
                Some(crate::ProviderKind::OpenAi) => ["rpm", "tpm", "otpm"],
                _ => ["rpm", "itpm", "otpm"],
            };
            let mut entry = serde_json::Map::new();
            for (d, name) in names.iter().enumerate() {
                if let Some(limit) = pacing.whole[d] {
                    entry.insert((*name).into(), limit.into());
                    if pacing.buckets[d] {
                        entry.insert(format!("{name}_bucket"), true.into());
                    }
                }
            }
            let capped = pacing.capped.iter().any(|c| *c);
            let source = match (pacing.learned, capped) {
                (true, false) => "server",
                (true, true) => "server, capped by the limits file",
                (false, _) => "limits file",
            };
            entry.insert("source".into(), source.into());
            out.insert(key.clone(), entry.into());
        }
        out
    }

    /// The unfinished generations this process holds, per limiter key.
    fn work_by_key(&self) -> HashMap<String, u64> {
        let mut work: HashMap<String, u64> = HashMap::new();
        for job in self.jobs.values() {
            let slug = &self.groups[&job.group].condition.slug;
            *work.entry(self.bucket_keys[slug].clone()).or_default() += 1;
        }
        work
    }

    /// What this process tells the others: per key it paces, what it
    /// counts in its window and the work it holds (none: it leaves that
    /// key's pacing).
    fn share_report(&self) -> Vec<(String, [u64; 3], u64)> {
        let work = self.work_by_key();
        self.limiter
            .window_usage(self.now)
            .into_iter()
            .map(|(key, usage)| {
                let held = work.get(&key).copied().unwrap_or(0);
                (key, usage, held)
            })
            .collect()
    }

    /// The limiter's sums in the current window for a condition's model.
    pub fn window_usage(&self, slug: &str, now: Instant) -> Option<[u64; 3]> {
        self.limiter.usage(self.bucket_keys.get(slug)?, now)
    }

    /// (Condition, context) groups still held: those with work left.
    pub fn groups_held(&self) -> usize {
        self.groups.len()
    }

    /// Reservations granted and settled so far.
    pub fn reservation_book(&self) -> ReservationBook {
        self.reservations
    }

    /// How a held generation's next attempt meets the cache.
    pub fn cache_role_of(&self, id: GenerationId) -> Option<CacheRole> {
        self.jobs.contains_key(&id).then(|| self.cache_role(id))
    }

    /// A condition's gate.
    pub fn gate(&self, slug: &str) -> Option<&ConditionGate> {
        self.gates.get(slug)
    }

    /// The next action, or `None` until an event arrives or
    /// [`poll_timeout`](Self::poll_timeout) passes.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        self.advance_clock(now);
        if self.outbox.is_empty() && self.phase == Phase::Running {
            self.step();
        }
        self.outbox.pop_front()
    }

    /// When to call [`poll_action`](Self::poll_action) again if no event
    /// arrives first.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase != Phase::Running {
            return None;
        }
        let mut wake = [
            self.queue.next_retry_after(self.now),
            self.limiter_wake,
            (!self.stopping).then_some(self.bulk_wake).flatten(),
            self.next_batch_timer(),
            (self.config.share_interval.is_some() && !self.sharing && !self.stopping)
                .then_some(self.next_share),
            (self.in_flight > 0 || !self.batches.is_empty()).then_some(self.next_renew),
            self.idle_waiting_for_others()
                .then_some(self.claims.next_at),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(at) = wake
            && at <= self.now
        {
            // Never ask to be woken in the past: that would spin.
            wake = Some(self.now + Duration::from_millis(1));
        }
        wake
    }

    /// Time passed without an event.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance_clock(now);
    }

    /// Takes one event.
    pub fn handle(&mut self, event: Event, now: Instant) {
        self.advance_clock(now);
        match event {
            Event::Claimed {
                items,
                held_by_others,
                batches,
            } => self.on_claimed(items, held_by_others, batches),
            Event::Renewed => self.renewing = false,
            Event::PacingShared(shares) => {
                self.sharing = false;
                let mine = self.work_by_key();
                self.limiter.set_members(shares.as_deref(), &mine);
            }
            Event::Counted {
                version,
                tokenizer,
                split,
            } => {
                self.counting.remove(&(version.clone(), tokenizer));
                self.splits.insert((version, tokenizer), split);
            }
            Event::Began(id) => self.on_began(id),
            Event::NotClaimable(id) => self.on_not_claimable(id),
            Event::AnswerBegun(id) => self.on_answer_begun(id),
            Event::Finished {
                generation_id,
                outcome,
                latency_ms,
            } => self.on_finished(generation_id, *outcome, latency_ms),
            Event::Stored(id) => self.on_stored(id),
            Event::Failed { task, error } => self.on_failed(task, error),
            Event::StopRequested => {
                if !self.stopping {
                    tracing::warn!(
                        "stop requested: letting {} request(s) in flight finish",
                        self.in_flight
                    );
                }
                self.stopping = true;
                self.summary.interrupted = true;
            }
            Event::BatchSubmitted {
                batch,
                key,
                created_at,
                outcome,
            } => self.on_batch_submitted(batch, key, created_at, outcome),
            Event::BatchFound { batch, outcome } => self.on_batch_found(batch, outcome),
            Event::BatchPolled { batch, outcome } => self.on_batch_polled(batch, outcome),
            Event::BatchFetched { batch, outcome } => self.on_batch_fetched(batch, outcome),
            Event::BatchClosed(batch) => self.on_batch_closed(batch),
            Event::Checked { slug, outcome } => self.on_checked(&slug, outcome),
        }
        self.maybe_finish_handing_back();
    }

    fn advance_clock(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// One pass: share budgets, claim, heartbeat, dispatch, and end when
    /// nothing is left.
    fn step(&mut self) {
        if let Some(interval) = self.config.share_interval
            && !self.sharing
            && !self.stopping
            && (self.now >= self.next_share || self.limiter.awaits_share())
        {
            self.sharing = true;
            self.next_share = crate::time::later(self.now, interval);
            self.outbox
                .push_back(Action::SharePacing(self.share_report()));
        }
        if self.wants_claim() {
            self.claims.outstanding = true;
            self.outbox.push_back(Action::Claim {
                max_groups: self.config.claim_batch,
            });
            return;
        }
        if self.now >= self.next_renew && !self.renewing {
            self.renewing = true;
            self.next_renew = crate::time::later(self.now, self.config.claim_interval);
            self.outbox.push_back(Action::Renew);
        }
        if !self.claims.answered_once || self.claims.outstanding {
            return;
        }
        self.service_batches();
        loop {
            if !self.dispatch_ready() {
                return;
            }
            if !self.end_of_verification() {
                break;
            }
        }
        if !self.dispatch_bulk() {
            return;
        }
        self.finish_if_idle();
    }

    fn wants_claim(&self) -> bool {
        if self.claims.outstanding || self.stopping {
            return false;
        }
        if !self.claims.answered_once {
            return true;
        }
        // Held work stays under one claim's worth of jobs beyond what is in
        // hand, so memory follows --concurrency, not the run's size.
        let claim_jobs =
            (self.config.claim_batch as usize).saturating_mul(self.config.replicates.max(1));
        !matches!(self.verify, VerifyGate::Verifying(_))
            && self.queue.leaders.len() < self.config.concurrency.max(1)
            && self.jobs.len() < claim_jobs
            && (!self.claims.exhausted || self.now >= self.claims.next_at)
    }

    /// Nothing out: no synchronous attempt, claim or count, and no batch
    /// open (when stopping: no batch action outstanding; the batches left
    /// keep running at the provider).
    fn idle(&self) -> bool {
        self.in_flight == 0
            && !self.claims.outstanding
            && self.counting.is_empty()
            && self.checking.is_empty()
            && if self.stopping {
                !self.batch_action_outstanding()
            } else {
                self.batches.is_empty()
            }
    }

    fn idle_waiting_for_others(&self) -> bool {
        self.idle()
            && !self.stopping
            && self.claims.others_hold > 0
            && self.queue.next_retry_after(self.now).is_none()
            && self.limiter_wake.is_none()
            && self.bulk_wake.is_none()
    }

    /// Ends `--verify-first` once its requests are settled; true when the
    /// batch may now fan out (dispatch again).
    fn end_of_verification(&mut self) -> bool {
        if !matches!(self.verify, VerifyGate::Verifying(_))
            || !self.idle()
            || !(self.queue.retries.is_empty() || self.stopping)
        {
            return false;
        }
        if self.summary.verify_failed || self.stopping {
            self.verify = VerifyGate::Failed;
            return false;
        }
        self.verify = VerifyGate::Open;
        if self.wants_claim() {
            self.claims.outstanding = true;
            self.outbox.push_back(Action::Claim {
                max_groups: self.config.claim_batch,
            });
            return false;
        }
        true
    }

    fn finish_if_idle(&mut self) {
        if !self.idle() || self.claims.outstanding {
            return;
        }
        if self.verify == VerifyGate::Failed
            || self.stopping
            || (self.queue.next_retry_after(self.now).is_none()
                && self.limiter_wake.is_none()
                && self.bulk_wake.is_none()
                && self.claims.others_hold == 0)
        {
            self.begin_handing_back();
        }
    }

    /// Retries that will not happen hand their generation back as pending;
    /// then the dispatch is done. After a ledger failure nothing more is
    /// written.
    fn begin_handing_back(&mut self) {
        let mut handing_back = HashSet::new();
        if self.summary.failure.is_none() {
            for (_, id) in std::mem::take(&mut self.queue.retries) {
                if let Some(job) = self.jobs.get(&id) {
                    self.outbox.push_back(Action::Store {
                        generation_id: id,
                        attempt: job.attempt(),
                        end: AttemptEnd::Abandoned,
                    });
                    handing_back.insert(id);
                }
            }
        }
        self.phase = Phase::Finishing(handing_back);
        self.maybe_finish_handing_back();
    }

    fn maybe_finish_handing_back(&mut self) {
        if let Phase::Finishing(left) = &self.phase
            && left.is_empty()
        {
            self.phase = Phase::Done;
            self.summary.others_hold = self.claims.others_hold;
            self.summary.batches_left = self.batches.len();
            self.outbox
                .push_back(Action::Done(std::mem::take(&mut self.summary)));
        }
    }

    /// Dispatches what the gates, the concurrency bound and the limiter
    /// admit. False when it must wait for a token count first.
    fn dispatch_ready(&mut self) -> bool {
        self.limiter_wake = None;
        // Every slot taken (the usual case under load): nothing to scan.
        if self.stopping || self.in_flight >= self.config.concurrency.max(1) {
            return true;
        }
        let mut blocked: HashSet<String> = HashSet::new();
        for candidate in self.queue.candidates(self.now) {
            if self.stopping
                || self.in_flight >= self.config.concurrency.max(1)
                || blocked.len() >= self.distinct_keys
            {
                break;
            }
            let (id, group_id) = match candidate {
                Candidate::Retry(_, id) | Candidate::Follower(id) => (id, self.jobs[&id].group),
                Candidate::Leader(g) => (self.groups[&g].leader, g),
            };
            if !self.admitted_by_gates(candidate, group_id) {
                continue;
            }
            let group = &self.groups[&group_id];
            // Batch conditions go in bulk.
            if self.via_batch(&group.condition.slug) {
                continue;
            }
            let condition = Arc::clone(&group.condition);
            let key = self.bucket_keys[&condition.slug].clone();
            if blocked.contains(&key) {
                continue;
            }
            let tokenizer = Tokenizer::for_provider(condition.provider);
            let Some(split) = self
                .splits
                .get(&(group.version.clone(), tokenizer))
                .copied()
            else {
                self.request_count(group_id, tokenizer);
                return false;
            };
            let role = self.cache_role(id);
            let charge = pacing::charge(&self.catalog, &condition, self.config.cache, split, role);
            if let Err(problem) = self.limiter.check_fits(&key, charge) {
                let reason = format!("context `{}`: {problem}", self.groups[&group_id].prompt_id);
                self.stop_condition(&condition.slug, reason);
                continue;
            }
            match self.limiter.try_reserve(&key, charge, self.now) {
                Admission::Wait(until) => {
                    blocked.insert(key);
                    self.limiter_wake = Some(self.limiter_wake.map_or(until, |w| w.min(until)));
                }
                Admission::Granted(reservation) => {
                    self.queue.remove(candidate);
                    self.reservations.granted += 1;
                    self.launch(id, reservation);
                }
            }
        }
        true
    }

    fn admitted_by_gates(&self, candidate: Candidate, group_id: GroupId) -> bool {
        let admitted_by_verify = match &self.verify {
            VerifyGate::Open => true,
            VerifyGate::Failed => false,
            VerifyGate::Verifying(groups) => {
                !matches!(candidate, Candidate::Follower(_)) && groups.contains(&group_id)
            }
        };
        let slug = &self.groups[&group_id].condition.slug;
        let admitted_by_condition = match &self.gates[slug] {
            ConditionGate::Stopped(_) => false,
            ConditionGate::Open => true,
            // The first request of a condition goes alone.
            ConditionGate::Probing => {
                !matches!(candidate, Candidate::Leader(_))
                    || self.in_flight_by_condition.get(slug).copied().unwrap_or(0) == 0
            }
        };
        admitted_by_verify && admitted_by_condition
    }

    /// A leader writes the cache; a follower reads it only once its group is
    /// warm (a cold group's followers write it themselves).
    fn cache_role(&self, id: GenerationId) -> CacheRole {
        let job = &self.jobs[&id];
        match (job.role, self.groups[&job.group].phase) {
            (Role::Follower, GroupPhase::Warm) => CacheRole::Reads,
            _ => CacheRole::Writes,
        }
    }

    fn request_count(&mut self, group_id: GroupId, tokenizer: Tokenizer) {
        let group = &self.groups[&group_id];
        if self.counting.insert((group.version.clone(), tokenizer)) {
            self.outbox.push_back(Action::CountTokens {
                prompt_id: group.prompt_id.clone(),
                version: group.version.clone(),
                tokenizer,
            });
        }
    }

    fn launch(&mut self, id: GenerationId, reservation: crate::limiter::Reservation) {
        let job = self.jobs.get_mut(&id).expect("a queued job exists");
        job.budget.tries = job.budget.tries.saturating_add(1);
        job.stage = Stage::Beginning;
        job.reservation = Some(reservation);
        let group = self
            .groups
            .get_mut(&job.group)
            .expect("a job's group exists");
        if job.role == Role::Leader && group.phase == GroupPhase::Queued {
            group.phase = GroupPhase::LeaderOut;
        }
        let slug = group.condition.slug.clone();
        let attempt = self.attempt_of(id);
        self.in_flight += 1;
        *self.in_flight_by_condition.entry(slug).or_default() += 1;
        self.outbox.push_back(Action::Begin(attempt));
    }

    /// The current attempt of a job, as the driver needs it: with cache
    /// hints, unless caching is off or `plain` (a batch item reading no
    /// cache and writing none).
    fn attempt_of(&self, id: GenerationId) -> Attempt {
        self.attempt_with(id, false)
    }

    fn attempt_with(&self, id: GenerationId, plain: bool) -> Attempt {
        let job = &self.jobs[&id];
        let group = &self.groups[&job.group];
        let hinted =
            crate::plan::sends_cache_hints(self.config.cache, self.config.replicates as u32)
                && !plain;
        Attempt {
            generation_id: id,
            attempt: job.attempt(),
            condition: Arc::clone(&group.condition),
            prompt_id: group.prompt_id.clone(),
            version: group.version.clone(),
            cache: if hinted {
                CacheHint::On(group.ttl)
            } else {
                CacheHint::Off
            },
            cache_controls: group.cache_controls,
            body: if hinted {
                group.body.clone()
            } else {
                group.plain_body.clone()
            },
            leads: hinted
                && self.config.batch.is_none()
                && job.role == Role::Leader
                && matches!(group.phase, GroupPhase::Queued | GroupPhase::LeaderOut)
                && !group.waiting.is_empty(),
        }
    }

    /// A leader's answer has begun: the provider serves the cache it writes
    /// from now on, so its followers go (they read it even if the leader
    /// fails later).
    fn on_answer_begun(&mut self, id: GenerationId) {
        let Some(job) = self.jobs.get(&id).filter(|j| j.stage == Stage::Sending) else {
            return;
        };
        if job.role == Role::Leader
            && self
                .groups
                .get(&job.group)
                .is_some_and(|g| g.phase == GroupPhase::LeaderOut)
        {
            self.release_followers(job.group, GroupPhase::Warm);
        }
    }

    /// One of a group's jobs is finished for good; a group with none left
    /// is forgotten (with its request body), so a long run holds only the
    /// groups it is working on.
    fn job_finished(&mut self, group_id: GroupId) {
        let Some(group) = self.groups.get_mut(&group_id) else {
            return;
        };
        group.live = group.live.saturating_sub(1);
        if group.live == 0 {
            self.groups.remove(&group_id);
            if self.open_group == Some(group_id) {
                self.open_group = None;
            }
        }
    }

    fn stop_condition(&mut self, slug: &str, reason: String) {
        let gate = self
            .gates
            .entry(slug.to_owned())
            .or_insert(ConditionGate::Probing);
        if matches!(gate, ConditionGate::Stopped(_)) {
            return;
        }
        *gate = ConditionGate::Stopped(reason.clone());
        tracing::error!(condition = %slug, %reason, "condition stopped");
        self.outbox
            .push_back(Action::Notify(ProgressEvent::ConditionStopped {
                condition: slug.to_owned(),
                reason: reason.clone(),
            }));
        self.summary.stopped.push((slug.to_owned(), reason));
    }

    fn open_condition(&mut self, slug: &str) {
        if let Some(gate) = self.gates.get_mut(slug)
            && *gate == ConditionGate::Probing
        {
            *gate = ConditionGate::Open;
        }
    }

    fn on_claimed(
        &mut self,
        items: Vec<WorkItem>,
        held_by_others: u64,
        batches: Vec<(BatchRecord, Duration)>,
    ) {
        let first = !self.claims.answered_once;
        self.claims.outstanding = false;
        self.claims.answered_once = true;
        self.claims.others_hold = held_by_others;
        self.claims.next_at = crate::time::later(self.now, self.config.claim_interval);
        let attached = self.attach_batches(&items, batches);
        match self.absorb(items, &attached) {
            Ok(added) => self.claims.exhausted = added == 0,
            Err(error) => self.fail(error),
        }
        if first && self.config.verify_first {
            let mut seen = HashSet::new();
            let groups = self
                .queue
                .leaders
                .iter()
                .copied()
                .filter(|g| seen.insert(self.groups[g].condition.slug.clone()))
                .collect();
            self.verify = VerifyGate::Verifying(groups);
        }
    }

    /// Takes newly claimed generations in: a generation already held is
    /// skipped, and so is one in another process's open batch;
    /// consecutive replicates of a group join it. An item of a batch this
    /// dispatch re-attached to waits for that batch.
    fn absorb(&mut self, items: Vec<WorkItem>, attached: &Attached) -> Result<usize, Error> {
        let mut added = 0;
        for item in items {
            if self.jobs.contains_key(&item.generation_id)
                || attached.theirs.contains(&item.generation_id)
            {
                continue;
            }
            let Some(condition) = self.conditions.get(&item.condition_slug).cloned() else {
                return Err(Error::Corrupt(format!(
                    "generation {} names condition `{}` that the run does not list",
                    item.generation_id, item.condition_slug
                )));
            };
            added += 1;
            let id = item.generation_id;
            let in_batch = attached.mine.get(&id).copied();
            let joins = self.open_group.filter(|g| {
                let group = &self.groups[g];
                group.condition.slug == item.condition_slug
                    && group.prompt_id == item.prompt_id
                    && group.version == item.package_version
            });
            let (group_id, role) = match joins {
                Some(g) => {
                    let group = self.groups.get_mut(&g).expect("open");
                    match (in_batch, group.phase) {
                        (Some(_), _) => {}
                        (None, GroupPhase::Queued | GroupPhase::LeaderOut) => {
                            group.waiting.push(id);
                        }
                        (None, GroupPhase::Warm | GroupPhase::Cold) => {
                            self.queue.followers.push_back(id);
                        }
                    }
                    (g, Role::Follower)
                }
                None => {
                    let (phase, role) = match in_batch {
                        // Replicates that share no cache in a batch go
                        // together, each on its own: no leader to wait for.
                        None if self.via_batch(&condition.slug) && !self.batch_shares_cache() => {
                            (GroupPhase::Cold, Role::Follower)
                        }
                        None => (GroupPhase::Queued, Role::Leader),
                        Some((_, Wave::Leader)) => (GroupPhase::LeaderOut, Role::Leader),
                        Some((_, Wave::Follower)) => (GroupPhase::Warm, Role::Follower),
                        Some((_, Wave::Single)) => (GroupPhase::Cold, Role::Follower),
                    };
                    (self.new_group(condition, &item, phase), role)
                }
            };
            if let Some(group) = self.groups.get_mut(&group_id) {
                group.live += 1;
                if group.warmth.is_none() && group.phase == GroupPhase::Warm {
                    // Written before its followers' batch left.
                    let age = in_batch.and_then(|(b, _)| attached.ages.get(&b).copied());
                    group.warmth = Some(super::waves::Warmth {
                        written: self
                            .now
                            .checked_sub(age.unwrap_or_default())
                            .unwrap_or(self.now),
                        took: Duration::ZERO,
                    });
                }
            }
            self.jobs.insert(
                id,
                Job {
                    item,
                    group: group_id,
                    role,
                    budget: Budget::default(),
                    stage: if in_batch.is_some() {
                        Stage::InBatch
                    } else {
                        Stage::Queued
                    },
                    reservation: None,
                    batch: in_batch.map(|(b, _)| b),
                    max_batch: None,
                    doomed: None,
                },
            );
        }
        Ok(added)
    }

    fn new_group(
        &mut self,
        condition: Arc<Condition>,
        leader: &WorkItem,
        phase: GroupPhase,
    ) -> GroupId {
        let via_batch = self.via_batch(&condition.slug);
        // A batch's followers come a batch turnaround later: the leader
        // writes the longest cache the model offers.
        let ttl = if via_batch {
            crate::provider::CacheTtl::OneHour
        } else {
            self.packages
                .get(&(leader.prompt_id.clone(), leader.package_version.clone()))
                .map_or(crate::provider::CacheTtl::FiveMinutes, |p| {
                    pacing::choose_ttl(
                        &self.catalog,
                        &self.limits,
                        &condition,
                        self.config.replicates,
                        p,
                    )
                })
        };
        let cache_controls = self
            .catalog
            .lookup(condition.provider, &condition.model)
            .map(|m| m.cache_controls)
            .unwrap_or_default();
        let id = GroupId(self.next_group);
        self.next_group += 1;
        self.groups.insert(
            id,
            Group {
                condition,
                prompt_id: leader.prompt_id.clone(),
                version: leader.package_version.clone(),
                ttl,
                cache_controls,
                phase,
                leader: leader.generation_id,
                waiting: Vec::new(),
                live: 0,
                body: SharedBody::default(),
                plain_body: SharedBody::default(),
                warmth: None,
                shares_cache: via_batch && self.batch_shares_cache(),
            },
        );
        match phase {
            GroupPhase::Queued => self.queue.leaders.push_back(id),
            GroupPhase::Cold if via_batch && !self.batch_shares_cache() => {
                self.queue.followers.push_back(leader.generation_id);
            }
            _ => {}
        }
        self.open_group = Some(id);
        id
    }

    fn on_began(&mut self, id: GenerationId) {
        let Some(job) = self
            .jobs
            .get_mut(&id)
            .filter(|j| j.stage == Stage::Beginning)
        else {
            return;
        };
        job.stage = Stage::Sending;
        if let Some(error) = job.doomed.take() {
            // It can never be sent: recorded, and failed without leaving.
            self.on_finished(id, Err(*error), 0);
            return;
        }
        if let Some(reservation) = job.reservation.as_mut() {
            self.limiter.mark_sent(reservation, self.now);
        }
        let attempt = self.attempt_of(id);
        self.outbox.push_back(Action::Send(attempt));
    }

    /// Another worker took the claim over (this one was presumed dead): the
    /// job, and with a leader its whole group, is dropped here and may be
    /// claimed again later.
    fn on_not_claimable(&mut self, id: GenerationId) {
        if !self
            .jobs
            .get(&id)
            .is_some_and(|j| j.stage == Stage::Beginning)
        {
            return;
        }
        tracing::info!(
            generation = id,
            "another process holds this generation now; not sent here"
        );
        self.settle(id, Settlement::Refused);
        let Some(job) = self.remove_in_flight(id) else {
            return;
        };
        // Claimed again later if this worker turns out to hold it after all.
        self.claims.exhausted = false;
        if job.role == Role::Leader
            && let Some(group) = self.groups.get_mut(&job.group)
        {
            let followers = std::mem::take(&mut group.waiting);
            if self.open_group == Some(job.group) {
                self.open_group = None;
            }
            for follower in followers {
                self.jobs.remove(&follower);
                self.job_finished(job.group);
            }
        }
        self.job_finished(job.group);
    }

    fn remove_in_flight(&mut self, id: GenerationId) -> Option<Job> {
        let job = self.jobs.remove(&id)?;
        if job.in_flight() {
            self.in_flight -= 1;
            let slug = &self.groups[&job.group].condition.slug;
            if let Some(n) = self.in_flight_by_condition.get_mut(slug) {
                *n = n.saturating_sub(1);
            }
        }
        Some(job)
    }

    /// Settles a job's reservation: to `actual`, or as reserved.
    fn settle(&mut self, id: GenerationId, settlement: Settlement) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        match job.reservation.take() {
            Some(reservation) => {
                match settlement {
                    Settlement::Used(charge) => {
                        self.limiter.settle(&reservation, Some(charge), self.now);
                    }
                    Settlement::Unknown => self.limiter.settle(&reservation, None, self.now),
                    Settlement::Refused => self.limiter.settle_refused(&reservation, self.now),
                }
                self.reservations.settled += 1;
            }
            None => self.reservations.settled_twice += 1,
        }
    }

    fn on_finished(
        &mut self,
        id: GenerationId,
        outcome: Result<Generated, AttemptError>,
        latency_ms: u64,
    ) {
        let Some(job) = self.jobs.get(&id).filter(|j| j.stage == Stage::Sending) else {
            return;
        };
        let condition = Arc::clone(&self.groups[&job.group].condition);
        let key = self.bucket_keys[&condition.slug].clone();
        let key = key.as_str();
        let reservation = job.reservation.clone();
        let snapshot = match &outcome {
            Ok(g) => g.rate_limits,
            Err(e) => e.rate_limits,
        };
        let actual = match &outcome {
            Ok(g) => Settlement::Used(Charge::actual(condition.provider, &g.usage)),
            // Refused requests count nothing.
            Err(e) if RetryPolicy::is_rate_limit(e) => Settlement::Refused,
            Err(_) => Settlement::Unknown,
        };
        // Settled first: the report is read against what the request used.
        self.settle(id, actual);
        self.limiter.observe(
            key,
            condition.provider,
            &snapshot,
            // The server processed it (a 4xx is its word too; a 5xx or a
            // dropped connection may not have reached its limiter).
            match &outcome {
                Ok(_) => true,
                Err(e) => e.http_status.is_some_and(|s| (400..500).contains(&s)),
            },
            reservation.as_ref(),
            self.now,
        );
        if let Err(e) = &outcome
            && RetryPolicy::is_rate_limit(e)
        {
            self.summary.rate_limited += 1;
            self.limiter.rejected(key);
            if let Some(wait) = e.retry_after {
                self.limiter.pause(key, crate::time::later(self.now, wait));
            }
        }
        let (end, verdict, note) = self.judge(id, outcome, latency_ms, false);
        let job = self.jobs.get_mut(&id).expect("checked above");
        job.stage = Stage::Storing(verdict, Box::new(note));
        self.outbox.push_back(Action::Store {
            generation_id: id,
            attempt: job.attempt(),
            end,
        });
    }

    /// An attempt's outcome, either transport: the one retry policy's
    /// verdict (counted in the job's budget), the end the ledger stores
    /// (a success priced at the transport's rate) and the note kept for
    /// when it is stored.
    fn judge(
        &mut self,
        id: GenerationId,
        outcome: Result<Generated, AttemptError>,
        latency_ms: u64,
        in_batch: bool,
    ) -> (AttemptEnd, Verdict, Outcome) {
        let job = self.jobs.get_mut(&id).expect("a judged job exists");
        let condition = &self.groups[&job.group].condition;
        let policy = self.config.retry;
        let verdict = policy.verdict(outcome.as_ref().map(|_| ()), id, &mut job.budget);
        match outcome {
            Ok(generated) => {
                let cost_usd = if in_batch {
                    self.catalog.batch_cost(condition, &generated.usage)
                } else {
                    self.catalog.cost(condition, &generated.usage)
                };
                let note = Outcome::Success {
                    cache_hit: generated.usage.cache_hit(),
                    cost_usd,
                };
                let transport = if in_batch {
                    crate::run::Transport::Batch
                } else {
                    crate::run::Transport::Sync
                };
                (
                    success_end(generated, cost_usd, latency_ms, transport),
                    verdict,
                    note,
                )
            }
            Err(error) => (
                failed_end(&policy, &error, latency_ms, &verdict),
                verdict,
                Outcome::Failure(Box::new(error)),
            ),
        }
    }

    fn on_stored(&mut self, id: GenerationId) {
        if let Phase::Finishing(left) = &mut self.phase {
            left.remove(&id);
            return;
        }
        if !self
            .jobs
            .get(&id)
            .is_some_and(|j| j.batch.is_none() && matches!(j.stage, Stage::Storing(..)))
        {
            return;
        }
        let Some(job) = self.remove_in_flight(id) else {
            return;
        };
        self.after_stored(job);
    }

    /// A job whose attempt's end is in the ledger, either transport: what
    /// its verdict means for it, its group and its condition.
    fn after_stored(&mut self, mut job: Job) {
        let Stage::Storing(verdict, outcome) = std::mem::replace(&mut job.stage, Stage::Queued)
        else {
            return;
        };
        let slug = self.groups[&job.group].condition.slug.clone();
        let group = job.group;
        let retrying = matches!(verdict, Verdict::Retry { .. });
        match *outcome {
            Outcome::Success {
                cache_hit,
                cost_usd,
            } => {
                self.open_condition(&slug);
                self.notify_finished(&slug, &job.item, true, cache_hit, cost_usd);
                if job.role == Role::Leader {
                    self.release_followers(job.group, GroupPhase::Warm);
                }
            }
            Outcome::Failure(error) => self.after_failure(job, &slug, verdict, &error),
        }
        if !retrying {
            self.job_finished(group);
        }
    }

    fn after_failure(&mut self, mut job: Job, slug: &str, verdict: Verdict, error: &AttemptError) {
        if RetryPolicy::stops_condition(error) {
            self.stop_condition(slug, error.to_string());
        } else {
            self.open_condition(slug);
        }
        let item = &job.item;
        match verdict {
            Verdict::Retry { delay } => {
                // Counted on the display; the details are for debugging
                // (and every attempt is a row in the ledger).
                tracing::debug!(condition = %slug, prompt_id = %item.prompt_id, replicate = item.replicate_index, attempt = job.attempt(), %error, delay_ms = delay.as_millis() as u64, "retrying");
                self.outbox
                    .push_back(Action::Notify(ProgressEvent::Retrying {
                        condition: slug.to_owned(),
                        prompt_id: item.prompt_id.clone(),
                        replicate_index: item.replicate_index,
                        attempt: job.attempt(),
                        error: error.to_string(),
                        http_status: error.http_status,
                        delay,
                    }));
                let due = crate::time::later(self.now, delay);
                job.stage = Stage::Retrying;
                self.queue.retries.insert((due, item.generation_id));
                self.jobs.insert(item.generation_id, job);
            }
            Verdict::HandBack => {
                // Stored as `pending` already; a resume sends it.
                tracing::warn!(condition = %slug, prompt_id = %item.prompt_id, replicate = item.replicate_index, %error, "not sent; handed back for a resume");
            }
            Verdict::GiveUp | Verdict::Success => {
                tracing::warn!(condition = %slug, prompt_id = %item.prompt_id, replicate = item.replicate_index, attempt = job.attempt(), %error, "generation failed");
                self.notify_finished(slug, item, false, false, None);
                if matches!(self.verify, VerifyGate::Verifying(_)) && !self.summary.verify_failed {
                    self.summary.verify_failed = true;
                    self.stopping = true;
                    tracing::error!("--verify-first failed: the batch stops before fanning out");
                }
                if job.role == Role::Leader {
                    self.release_followers(job.group, GroupPhase::Cold);
                }
            }
        }
    }

    fn notify_finished(
        &mut self,
        slug: &str,
        item: &WorkItem,
        success: bool,
        cache_hit: bool,
        cost_usd: Option<f64>,
    ) {
        self.outbox
            .push_back(Action::Notify(ProgressEvent::Finished {
                condition: slug.to_owned(),
                prompt_id: item.prompt_id.clone(),
                replicate_index: item.replicate_index,
                success,
                cache_hit,
                cost_usd,
            }));
    }

    /// The leader is done: its followers may go, reading its cache (warm) or
    /// writing their own (cold).
    fn release_followers(&mut self, group_id: GroupId, phase: GroupPhase) {
        let now = self.now;
        let Some(group) = self.groups.get_mut(&group_id) else {
            return;
        };
        if group.phase == GroupPhase::Warm && phase == GroupPhase::Cold {
            // Released at the leader's first event: the cache was written
            // even if the leader failed afterwards.
            return;
        }
        group.phase = phase;
        if phase == GroupPhase::Warm {
            // A synchronous leader wrote it as its answer came (a batch
            // leader's warmth is set when its batch closes).
            group.warmth.get_or_insert(super::waves::Warmth {
                written: now,
                took: Duration::ZERO,
            });
        }
        self.queue.followers.extend(group.waiting.drain(..));
        if self.open_group == Some(group_id) {
            self.open_group = None;
        }
    }

    fn on_failed(&mut self, task: Task, error: Error) {
        match task {
            Task::Claim => self.claims.outstanding = false,
            Task::Renew => self.renewing = false,
            Task::Pacing => {
                // Sharing is best effort: pacing goes on with what it knows.
                self.sharing = false;
                self.limiter.set_members(None, &HashMap::new());
                return;
            }
            Task::Count { version, tokenizer } => {
                self.counting.remove(&(version, tokenizer));
            }
            Task::Batch(batch) => self.batch_task_failed(batch),
            Task::Check(slug) => {
                // The check itself broke (not the provider's answer): the
                // batches will tell.
                self.on_checked(&slug, Ok(()));
                return;
            }
            Task::Generation(id) => {
                if let Phase::Finishing(left) = &mut self.phase {
                    left.remove(&id);
                } else {
                    // A reservation never sent spends nothing; one sent
                    // stays counted as reserved.
                    let never_sent = self
                        .jobs
                        .get(&id)
                        .is_some_and(|j| j.stage == Stage::Beginning);
                    if self.jobs.get(&id).is_some_and(|j| j.reservation.is_some()) {
                        self.settle(
                            id,
                            if never_sent {
                                Settlement::Refused
                            } else {
                                Settlement::Unknown
                            },
                        );
                    }
                    if let Some(job) = self.remove_in_flight(id) {
                        self.job_finished(job.group);
                    }
                }
            }
        }
        self.fail(error);
    }

    /// A failure of the ledger (or of counting): nothing new starts; what is
    /// in flight is paid for, so it finishes and is stored first.
    fn fail(&mut self, error: Error) {
        tracing::error!(%error, "stopping: letting {} request(s) in flight finish", self.in_flight);
        self.summary.failure.get_or_insert(error);
        self.stopping = true;
    }
}

/// The stored end of a failed attempt under `verdict`.
fn failed_end(
    policy: &RetryPolicy,
    error: &AttemptError,
    latency_ms: u64,
    verdict: &Verdict,
) -> AttemptEnd {
    AttemptEnd::Failed {
        class: error.class,
        message: policy.stored_message(error),
        http_status: error.http_status,
        provider_request_id: error.request_id.clone(),
        latency_ms,
        then: match verdict {
            Verdict::Retry { .. } | Verdict::Success => AfterFailure::Retry,
            Verdict::GiveUp => AfterFailure::Error,
            Verdict::HandBack => AfterFailure::Pending,
        },
    }
}

/// How a reservation ends.
enum Settlement {
    /// The answer's usage.
    Used(Charge),
    /// Never counted: refused (a 429) or never sent.
    Refused,
    /// Unknown (no answer): it stays counted as reserved.
    Unknown,
}

fn success_end(
    generated: Generated,
    cost_usd: Option<f64>,
    latency_ms: u64,
    transport: crate::run::Transport,
) -> AttemptEnd {
    AttemptEnd::Success(GenerationResult {
        usage: generated.usage,
        cost_usd,
        finish_reason: generated.finish_reason,
        provider_request_id: generated.request_id,
        model_snapshot: generated.model_snapshot,
        request_hash: Some(generated.request_hash),
        response_text: generated.text,
        latency_ms,
        transport,
    })
}
