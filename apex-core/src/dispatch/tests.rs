//! The dispatcher without a runtime: events in, actions checked.
//!
//! `World` is an independent model of the outside: a ledger of statuses, a
//! provider whose prompt cache is warm once a request for the same context
//! has completed, and a server that counts requests and input tokens per
//! 60-second window by its own arithmetic (not the limiter's).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::catalog::Catalog;
use crate::condition::{Condition, ProviderKind};
use crate::provider::{AttemptError, CacheHint, ErrorClass, Generated, RateLimitSnapshot, Usage};
use crate::run::{AttemptEnd, GenerationStatus, WorkItem};
use crate::tokens::Tokenizer;

const REST: u64 = 10;
const PREFIX: u64 = 4000;

fn condition(slug: &str) -> Condition {
    Condition {
        slug: slug.into(),
        provider: ProviderKind::Anthropic,
        model: "claude-sonnet-4-5".into(),
        temperature: Some(0.7),
        top_p: None,
        max_tokens: 100,
        reasoning_effort: None,
        api: Default::default(),
        thinking: None,
        thinking_budget: None,
        stream: false,
        store: None,
    }
}

fn limits(rpm: u64, itpm: u64, otpm: u64) -> LimitTable {
    LimitTable::with_file(&format!(
        "[anthropic.\"claude-sonnet-4-5\"]\nrpm = {rpm}\nitpm = {itpm}\notpm = {otpm}\n"
    ))
    .unwrap()
}

fn config(concurrency: usize, verify_first: bool) -> DispatchConfig {
    DispatchConfig {
        concurrency,
        cache: true,
        verify_first,
        retry: RetryPolicy::new(3, Duration::from_secs(1), 1.0),
        claim_batch: 64,
        claim_interval: Duration::from_secs(20),
        replicates: 3,
        time_scale: 1.0,
        share_interval: None,
        batch: None,
    }
}

/// The plan: `conditions` × `contexts` × `replicates`, ids from 1 in plan
/// order (context-sequential, replicate 0 first).
fn plan(conditions: &[&str], contexts: u32, replicates: u32) -> Vec<WorkItem> {
    let mut items = Vec::new();
    for ctx in 0..contexts {
        for slug in conditions {
            for rep in 0..replicates {
                items.push(WorkItem {
                    generation_id: items.len() as i64 + 1,
                    condition_slug: (*slug).into(),
                    prompt_id: format!("ctx-{ctx}"),
                    package_version: format!("v{ctx}"),
                    context_index: ctx,
                    replicate_index: rep,
                    attempts: 0,
                });
            }
        }
    }
    items
}

fn generated(usage: Usage) -> Generated {
    Generated {
        text: "ok".into(),
        usage,
        finish_reason: Some("end_turn".into()),
        request_id: None,
        model_snapshot: None,
        request_hash: "h".into(),
        rate_limits: RateLimitSnapshot::default(),
    }
}

fn error(class: ErrorClass) -> AttemptError {
    let mut e = AttemptError::new(class, "scripted");
    if class == ErrorClass::InvalidRequest {
        e.http_status = Some(400);
    }
    if class == ErrorClass::RateLimited {
        e.http_status = Some(429);
        e.retry_after = Some(Duration::from_secs(5));
    }
    e
}

/// Drains the actions available now.
fn drain(m: &mut Dispatcher, now: Instant) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action(now)).collect()
}

fn begins(actions: &[Action]) -> Vec<i64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Begin(a) => Some(a.generation_id),
            _ => None,
        })
        .collect()
}

/// Starts a dispatcher and answers its first claim and token counts.
fn started(
    config: DispatchConfig,
    conditions: &[&str],
    items: Vec<WorkItem>,
    table: LimitTable,
    prefix: u64,
    now: Instant,
) -> (Dispatcher, Vec<Action>) {
    let mut m = Dispatcher::new(
        config,
        conditions.iter().map(|s| condition(s)).collect(),
        Arc::new(Catalog::built_in()),
        table,
        Vec::new(),
        now,
    );
    let first = drain(&mut m, now);
    assert!(matches!(first[..], [Action::Claim { .. }]), "{first:?}");
    m.handle(
        Event::Claimed {
            items: items.clone(),
            held_by_others: 0,
            batches: Vec::new(),
        },
        now,
    );
    let mut actions = Vec::new();
    loop {
        let batch = drain(&mut m, now);
        let mut answered = false;
        for action in &batch {
            match action {
                Action::CountTokens {
                    version, tokenizer, ..
                } => {
                    m.handle(
                        Event::Counted {
                            version: version.clone(),
                            tokenizer: *tokenizer,
                            split: (prefix, REST),
                        },
                        now,
                    );
                    answered = true;
                }
                // Claimed again: the same items, nothing new.
                Action::Claim { .. } => {
                    m.handle(
                        Event::Claimed {
                            items: items.clone(),
                            held_by_others: 0,
                            batches: Vec::new(),
                        },
                        now,
                    );
                    answered = true;
                }
                _ => {}
            }
        }
        actions.extend(batch);
        if !answered {
            return (m, actions);
        }
    }
}

fn finish(m: &mut Dispatcher, id: i64, outcome: Result<Generated, AttemptError>, now: Instant) {
    m.handle(Event::Began(id), now);
    let sent = drain(m, now);
    assert!(
        sent.iter()
            .any(|a| matches!(a, Action::Send(a) if a.generation_id == id)),
        "{sent:?}"
    );
    m.handle(
        Event::Finished {
            generation_id: id,
            outcome: Box::new(outcome),
            latency_ms: 1,
        },
        now,
    );
}

/// Answers every store, token count (at [`PREFIX`]) and claim (with nothing
/// new) until the dispatcher asks for nothing more; returns all it asked.
fn store_all(m: &mut Dispatcher, now: Instant) -> Vec<Action> {
    let mut all = Vec::new();
    loop {
        let actions = drain(m, now);
        if actions.is_empty() {
            return all;
        }
        for action in &actions {
            match action {
                Action::Store { generation_id, .. } => m.handle(Event::Stored(*generation_id), now),
                Action::Claim { .. } => m.handle(
                    Event::Claimed {
                        items: Vec::new(),
                        held_by_others: 0,
                        batches: Vec::new(),
                    },
                    now,
                ),
                Action::CountTokens {
                    version, tokenizer, ..
                } => m.handle(
                    Event::Counted {
                        version: version.clone(),
                        tokenizer: *tokenizer,
                        split: (PREFIX, REST),
                    },
                    now,
                ),
                _ => {}
            }
        }
        all.extend(actions);
    }
}

fn warm(prefix: u64) -> Usage {
    Usage {
        input_tokens: REST,
        cache_read_tokens: prefix,
        output_tokens: 10,
        ..Usage::default()
    }
}

fn cold(prefix: u64) -> Usage {
    Usage {
        input_tokens: REST,
        cache_write_tokens: prefix,
        output_tokens: 10,
        ..Usage::default()
    }
}

#[test]
fn the_first_request_of_a_condition_goes_alone_then_followers_before_leaders() {
    let now = Instant::now();
    let (mut m, actions) = started(
        config(8, false),
        &["c"],
        plan(&["c"], 2, 2),
        LimitTable::none(),
        PREFIX,
        now,
    );
    assert_eq!(begins(&actions), vec![1], "the probe goes alone");
    finish(&mut m, 1, Ok(generated(cold(PREFIX))), now);
    let after = store_all(&mut m, now);
    // The follower of ctx-0 is released before ctx-1's leader.
    assert_eq!(begins(&drain(&mut m, now)), Vec::<i64>::new());
    assert_eq!(begins(&after), vec![2, 3]);
    assert_eq!(m.gate("c"), Some(&ConditionGate::Open));
}

#[test]
fn a_group_shares_one_body_until_its_last_attempt_is_stored() {
    let now = Instant::now();
    let (mut m, actions) = started(
        config(8, false),
        &["c"],
        plan(&["c"], 2, 2),
        LimitTable::none(),
        PREFIX,
        now,
    );
    let body_of = |actions: &[Action], id: i64| {
        actions.iter().find_map(|a| match a {
            Action::Begin(a) if a.generation_id == id => Some(a.body.clone()),
            _ => None,
        })
    };
    let leader = body_of(&actions, 1).expect("the leader begins");
    finish(&mut m, 1, Ok(generated(cold(PREFIX))), now);
    let next = store_all(&mut m, now);
    let follower = body_of(&next, 2).expect("its follower begins");
    let other = body_of(&next, 3).expect("the next context's leader begins");
    assert!(leader.same_as(&follower), "replicates share the body");
    assert!(!leader.same_as(&other), "another context has its own");
    finish(&mut m, 2, Ok(generated(warm(PREFIX))), now);
    store_all(&mut m, now);
    drop((follower, other, actions, next));
    assert_eq!(
        leader.holders(),
        1,
        "the dispatcher let go of a finished group's body"
    );
}

#[test]
fn followers_of_a_failed_leader_are_reserved_as_cache_writers() {
    let now = Instant::now();
    let prefix = PREFIX;
    let (mut m, actions) = started(
        config(8, false),
        &["c"],
        plan(&["c"], 1, 3),
        limits(100, 1_000_000, 100_000),
        prefix,
        now,
    );
    assert_eq!(begins(&actions), vec![1]);
    finish(&mut m, 1, Err(error(ErrorClass::InvalidRequest)), now);
    let released = store_all(&mut m, now);
    assert_eq!(begins(&released), vec![2, 3], "cold followers go");
    // The leader's reservation (kept: the server may have counted it) plus
    // two cold followers, each writing the prefix.
    let itpm = m.window_usage("c", now).unwrap()[1];
    assert_eq!(itpm, 3 * (prefix + REST), "cold followers write the cache");
}

#[test]
fn warm_followers_are_reserved_as_cache_readers() {
    let now = Instant::now();
    let prefix = PREFIX;
    let (mut m, _) = started(
        config(8, false),
        &["c"],
        plan(&["c"], 1, 3),
        limits(100, 1_000_000, 100_000),
        prefix,
        now,
    );
    finish(&mut m, 1, Ok(generated(cold(prefix))), now);
    assert_eq!(begins(&store_all(&mut m, now)), vec![2, 3]);
    let itpm = m.window_usage("c", now).unwrap()[1];
    assert_eq!(itpm, prefix + REST + 2 * REST);
}

#[test]
fn followers_go_at_their_leaders_first_event_and_stay_warm() {
    let now = Instant::now();
    let (mut m, actions) = started(
        config(8, false),
        &["c"],
        plan(&["c"], 1, 3),
        LimitTable::none(),
        PREFIX,
        now,
    );
    let leads = |actions: &[Action], id: i64| {
        actions.iter().find_map(|a| match a {
            Action::Begin(a) | Action::Send(a) if a.generation_id == id => Some(a.leads),
            _ => None,
        })
    };
    assert_eq!(leads(&actions, 1), Some(true), "followers wait on it");
    m.handle(Event::Began(1), now);
    let sent = drain(&mut m, now);
    assert_eq!(leads(&sent, 1), Some(true), "streamed for its followers");
    assert!(
        begins(&sent).is_empty(),
        "followers wait for the answer to begin"
    );
    // The leader's answer begins: its followers go, reading its cache,
    // while it is still answering.
    m.handle(Event::AnswerBegun(1), now);
    let released = drain(&mut m, now);
    assert_eq!(begins(&released), vec![2, 3]);
    for action in &released {
        if let Action::Begin(a) = action {
            assert!(!a.leads);
            assert!(matches!(a.cache, CacheHint::On(_)));
        }
    }
    // The leader then fails: the cache was written, the followers stay
    // warm (a retry of the leader is its own affair).
    m.handle(
        Event::Finished {
            generation_id: 1,
            outcome: Box::new(Err(error(ErrorClass::InvalidRequest))),
            latency_ms: 1,
        },
        now,
    );
    store_all(&mut m, now);
    assert_eq!(m.cache_role_of(2), Some(CacheRole::Reads));
}

#[test]
fn a_group_taken_over_and_claimed_again_is_dispatched_again() {
    let now = Instant::now();
    let items = plan(&["c"], 1, 2);
    let (mut m, actions) = started(
        config(8, false),
        &["c"],
        items.clone(),
        LimitTable::none(),
        PREFIX,
        now,
    );
    assert_eq!(begins(&actions), vec![1]);
    m.handle(Event::NotClaimable(1), now);
    assert_eq!(m.in_flight(), 0);
    let next = drain(&mut m, now);
    assert!(
        matches!(next[..], [Action::Claim { .. }]),
        "looks for work again: {next:?}"
    );
    m.handle(
        Event::Claimed {
            items,
            held_by_others: 0,
            batches: Vec::new(),
        },
        now,
    );
    assert_eq!(
        begins(&store_all(&mut m, now)),
        vec![1],
        "not skipped forever"
    );
    assert_eq!(m.reservation_book().settled_twice, 0);
}

#[test]
fn a_stop_lets_in_flight_finish_and_leaves_the_rest_pending() {
    let now = Instant::now();
    let (mut m, actions) = started(
        config(8, false),
        &["c"],
        plan(&["c"], 2, 1),
        LimitTable::none(),
        PREFIX,
        now,
    );
    assert_eq!(begins(&actions), vec![1]);
    m.handle(Event::StopRequested, now);
    finish(&mut m, 1, Ok(generated(cold(PREFIX))), now);
    let end = store_all(&mut m, now);
    assert!(begins(&end).is_empty(), "nothing new after a stop");
    let Some(Action::Done(summary)) = end.last() else {
        panic!("done: {end:?}")
    };
    assert!(summary.interrupted);
}

#[test]
fn a_retry_waits_its_backoff_and_is_handed_back_on_stop() {
    let now = Instant::now();
    let (mut m, _) = started(
        config(8, false),
        &["c"],
        plan(&["c"], 1, 1),
        LimitTable::none(),
        PREFIX,
        now,
    );
    finish(&mut m, 1, Err(error(ErrorClass::ServerError)), now);
    let stored = store_all(&mut m, now);
    assert!(stored.iter().any(|a| matches!(
        a,
        Action::Store {
            end: AttemptEnd::Failed {
                then: crate::run::AfterFailure::Retry,
                ..
            },
            ..
        }
    )));
    let wake = m.poll_timeout().expect("a retry is due later");
    assert!(wake >= now + Duration::from_secs(1) && wake < now + Duration::from_secs(2));
    m.handle(Event::StopRequested, now);
    let end = drain(&mut m, now);
    assert!(
        end.iter().any(|a| matches!(
            a,
            Action::Store {
                generation_id: 1,
                end: AttemptEnd::Abandoned,
                ..
            }
        )),
        "{end:?}"
    );
    m.handle(Event::Stored(1), now);
    assert!(matches!(drain(&mut m, now)[..], [Action::Done(_)]));
}

#[test]
fn verify_first_failure_stops_before_fanning_out() {
    let now = Instant::now();
    let (mut m, actions) = started(
        config(8, true),
        &["a", "b"],
        plan(&["a", "b"], 2, 2),
        LimitTable::none(),
        PREFIX,
        now,
    );
    // One leader per condition: ids 1 (a, ctx-0) and 3 (b, ctx-0).
    assert_eq!(begins(&actions), vec![1, 3]);
    finish(&mut m, 1, Ok(generated(cold(PREFIX))), now);
    assert!(
        begins(&store_all(&mut m, now)).is_empty(),
        "still verifying"
    );
    finish(&mut m, 3, Err(error(ErrorClass::InvalidRequest)), now);
    let end = store_all(&mut m, now);
    assert!(begins(&end).is_empty());
    let Some(Action::Done(summary)) = end.last() else {
        panic!("done: {end:?}")
    };
    assert!(summary.verify_failed);
}

#[test]
fn a_fatal_error_stops_its_condition_only() {
    let now = Instant::now();
    let (mut m, actions) = started(
        config(8, false),
        &["a", "b"],
        plan(&["a", "b"], 2, 1),
        LimitTable::none(),
        PREFIX,
        now,
    );
    assert_eq!(begins(&actions), vec![1, 2], "one probe per condition");
    finish(&mut m, 1, Err(error(ErrorClass::Authentication)), now);
    let after = store_all(&mut m, now);
    assert!(matches!(m.gate("a"), Some(ConditionGate::Stopped(_))));
    assert!(begins(&after).is_empty());
    finish(&mut m, 2, Ok(generated(cold(PREFIX))), now);
    assert_eq!(begins(&store_all(&mut m, now)), vec![4], "b goes on");
}

#[test]
fn a_redirect_stops_its_condition_and_hands_the_generation_back() {
    let now = Instant::now();
    let (mut m, actions) = started(
        config(8, false),
        &["a"],
        plan(&["a"], 2, 2),
        LimitTable::none(),
        PREFIX,
        now,
    );
    assert_eq!(begins(&actions), vec![1]);
    finish(&mut m, 1, Err(error(ErrorClass::Redirected)), now);
    let end = store_all(&mut m, now);
    assert!(matches!(m.gate("a"), Some(ConditionGate::Stopped(_))));
    assert!(begins(&end).is_empty(), "not retried: {end:?}");
    let stores: Vec<&AttemptEnd> = end
        .iter()
        .filter_map(|a| match a {
            Action::Store {
                generation_id: 1,
                end,
                ..
            } => Some(end),
            _ => None,
        })
        .collect();
    assert!(
        matches!(
            stores[..],
            [AttemptEnd::Failed {
                then: crate::run::AfterFailure::Pending,
                ..
            }]
        ),
        "its attempt recorded, the generation handed back as pending: {stores:?}"
    );
    let Some(Action::Done(summary)) = end.last() else {
        panic!("done: {end:?}")
    };
    assert_eq!(summary.stopped.len(), 1);
}

#[test]
fn a_ledger_failure_stops_new_work() {
    let now = Instant::now();
    let (mut m, actions) = started(
        config(8, false),
        &["c"],
        plan(&["c"], 3, 1),
        LimitTable::none(),
        PREFIX,
        now,
    );
    assert_eq!(begins(&actions), vec![1]);
    finish(&mut m, 1, Ok(generated(cold(PREFIX))), now);
    m.handle(
        Event::Failed {
            task: Task::Generation(1),
            error: crate::Error::store_msg("disk full"),
        },
        now,
    );
    let end = drain(&mut m, now);
    assert!(begins(&end).is_empty());
    let Some(Action::Done(summary)) = end.last() else {
        panic!("done: {end:?}")
    };
    assert!(summary.failure.is_some());
}

/// What one attempt meets at the provider.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Success,
    Retryable,
    RateLimited,
    Fatal,
    Invalid,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        12 => Just(Fate::Success),
        2 => Just(Fate::Retryable),
        2 => Just(Fate::RateLimited),
        1 => Just(Fate::Invalid),
        1 => Just(Fate::Fatal),
    ]
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "a test's queue of events")]
enum Due {
    Event(Event),
    Stop,
}

/// The outside world of one property case.
struct World {
    now: Instant,
    start: Instant,
    status: HashMap<i64, GenerationStatus>,
    items: Vec<WorkItem>,
    claimed_groups: usize,
    groups_per_claim: usize,
    /// (condition, context) → when a success for it completed.
    cache_ready: HashMap<(String, u32), Instant>,
    /// Per send: (time, input tokens as the server counts them).
    server_log: Vec<(Instant, u64)>,
    due: BTreeMap<(Instant, u64), Due>,
    seq: u64,
    fates: Vec<Fate>,
    latencies: Vec<u64>,
    out: usize,
    max_out: usize,
    prefix: u64,
    sends: usize,
    /// The batch world, when the dispatcher sends in batches.
    bulk: Option<BulkWorld>,
}

/// The provider's Batch API, by its own rules: a per-batch cap the
/// dispatcher is not told, submissions refused in passing, batches that end
/// after a while and answer each item by its fate, a cache that items of
/// one batch do not share.
#[derive(Default)]
struct BulkWorld {
    /// Most requests per batch; more is refused, naming the cap or not.
    cap: usize,
    names_cap: bool,
    /// Submissions refused in passing (429), in a row, before one goes.
    busy: u32,
    busy_left: u32,
    /// Batches by id: their items, when they left and when they end.
    open: HashMap<String, (Vec<i64>, Instant, Instant)>,
    /// Every item in an open batch here (submitted, not yet read).
    in_batches: HashMap<i64, String>,
    /// Refusals: (items, when).
    refused: Vec<(Vec<i64>, Instant)>,
    /// Items answered with a success, ever (each must be paid once).
    paid: HashMap<i64, u32>,
    next: u64,
    submissions: usize,
}

impl World {
    fn at(&mut self, delay: Duration, due: Due) {
        self.seq += 1;
        self.due.insert((self.now + delay, self.seq), due);
    }

    fn item(&self, id: i64) -> &WorkItem {
        &self.items[(id - 1) as usize]
    }

    fn claim(&mut self) -> Vec<WorkItem> {
        // Whole groups at a time, a few per claim, in plan order.
        let mut groups: Vec<(String, u32)> = Vec::new();
        for item in &self.items {
            let g = (item.condition_slug.clone(), item.context_index);
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        self.claimed_groups = (self.claimed_groups + self.groups_per_claim).min(groups.len());
        let held = &groups[..self.claimed_groups];
        self.items
            .iter()
            .filter(|i| held.contains(&(i.condition_slug.clone(), i.context_index)))
            .filter(|i| {
                matches!(
                    self.status[&i.generation_id],
                    GenerationStatus::Pending | GenerationStatus::Running
                )
            })
            .cloned()
            .collect()
    }

    /// The provider's answer to one request, by the world's own cache.
    fn answer(&mut self, id: i64, n: usize) -> (Duration, Result<Generated, AttemptError>) {
        let item = self.item(id).clone();
        let latency = Duration::from_millis(self.latencies[n % self.latencies.len()]);
        let key = (item.condition_slug.clone(), item.context_index);
        let warm = self.cache_ready.get(&key).is_some_and(|t| *t <= self.now);
        let outcome = match self.fates[n % self.fates.len()] {
            Fate::Success => Ok(generated(if warm {
                warm_usage(self.prefix)
            } else {
                cold(self.prefix)
            })),
            Fate::Retryable => Err(error(ErrorClass::ServerError)),
            Fate::RateLimited => Err(error(ErrorClass::RateLimited)),
            Fate::Fatal => Err(error(ErrorClass::Authentication)),
            Fate::Invalid => Err(error(ErrorClass::InvalidRequest)),
        };
        let counted = match &outcome {
            Ok(g) => g.usage.input_tokens + g.usage.cache_write_tokens,
            Err(e) if e.class == ErrorClass::RateLimited => 0,
            // A failed request counts its input as a success would have.
            Err(_) if warm => REST,
            Err(_) => self.prefix + REST,
        };
        self.server_log.push((self.now, counted));
        if outcome.is_ok() {
            self.cache_ready.entry(key).or_insert(self.now + latency);
        }
        (latency, outcome)
    }
}

/// The status an attempt's end leaves its generation in, as the ledger
/// records it.
fn status_after(end: &AttemptEnd) -> GenerationStatus {
    match end {
        AttemptEnd::Success(_) => GenerationStatus::Success,
        AttemptEnd::Failed { then, .. } => match then {
            crate::run::AfterFailure::Error => GenerationStatus::Error,
            crate::run::AfterFailure::Retry => GenerationStatus::Running,
            crate::run::AfterFailure::Pending => GenerationStatus::Pending,
        },
        AttemptEnd::Abandoned => GenerationStatus::Pending,
    }
}

fn warm_usage(prefix: u64) -> Usage {
    warm(prefix)
}

fn max_in_window(points: &[(Instant, u64)]) -> u64 {
    let mut points = points.to_vec();
    points.sort_by_key(|(t, _)| *t);
    (0..points.len())
        .map(|i| {
            points[i..]
                .iter()
                .take_while(|(t, _)| t.duration_since(points[i].0) < crate::limiter::WINDOW)
                .map(|(_, v)| v)
                .sum()
        })
        .max()
        .unwrap_or(0)
}

impl World {
    /// Performs one action as the outside would; the summary when done.
    fn perform(
        &mut self,
        m: &mut Dispatcher,
        action: Action,
    ) -> Result<Option<Summary>, TestCaseError> {
        match action {
            Action::Claim { .. } => {
                let items = self.claim();
                let claimed = Event::Claimed {
                    items,
                    held_by_others: 0,
                    batches: Vec::new(),
                };
                m.handle(claimed, self.now);
            }
            Action::Renew => m.handle(Event::Renewed, self.now),
            Action::SharePacing(_) => m.handle(Event::PacingShared(Some(Vec::new())), self.now),
            Action::CountTokens {
                version, tokenizer, ..
            } => {
                prop_assert_eq!(tokenizer, Tokenizer::Estimate);
                let split = (self.prefix, REST);
                let counted = Event::Counted {
                    version,
                    tokenizer,
                    split,
                };
                m.handle(counted, self.now);
            }
            Action::Begin(a) => self.begin(a.generation_id)?,
            Action::Send(a) => self.send(a.generation_id)?,
            Action::Store {
                generation_id, end, ..
            } => self.store(generation_id, &end)?,
            Action::Notify(_) => {}
            Action::SubmitBatch(sub) => self.submit_batch(sub)?,
            Action::Check(condition) => self.at(
                Duration::from_millis(3),
                Due::Event(Event::Checked {
                    slug: condition.slug.clone(),
                    outcome: Ok(()),
                }),
            ),
            Action::FindBatch { batch, .. } => {
                // Submissions here always answer: never left unknown.
                prop_assert!(false, "looked for batch {:?} that was answered", batch);
            }
            Action::PollBatch { batch, id, .. } => {
                let bulk = self.bulk.as_ref().expect("batch mode");
                let (items, _, ends) = bulk
                    .open
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| TestCaseError::fail(format!("polled unknown batch {id}")))?;
                let ended = ends <= self.now;
                let progress = crate::provider::BatchProgress {
                    ended,
                    processed: if ended { items.len() as u64 } else { 0 },
                    total: items.len() as u64,
                    cancelled: false,
                    failure: None,
                    queue_limit: None,
                };
                self.at(
                    Duration::from_millis(5),
                    Due::Event(Event::BatchPolled {
                        batch,
                        outcome: Ok(progress),
                    }),
                );
            }
            Action::FetchResults {
                batch, id, items, ..
            } => self.fetch(batch, &id, &items)?,
            Action::CloseBatch { batch, ends, .. } => {
                for (id, _, end) in &ends {
                    self.end_item(*id, end)?;
                }
                self.at(
                    Duration::from_millis(2),
                    Due::Event(Event::BatchClosed(batch)),
                );
            }
            Action::Done(summary) => return Ok(Some(summary)),
        }
        Ok(None)
    }

    /// A batch submission, as the provider takes it: recorded (its items
    /// begun) first, then accepted or refused.
    fn submit_batch(&mut self, sub: BatchSubmission) -> Result<(), TestCaseError> {
        let ids: Vec<i64> = sub.items.iter().map(|a| a.generation_id).collect();
        let now = self.now;
        for id in &ids {
            prop_assert!(
                self.status[id] != GenerationStatus::Success,
                "{} submitted after its success",
                id
            );
            self.status.insert(*id, GenerationStatus::Running);
        }
        let latency = Duration::from_millis(self.latencies[self.sends % self.latencies.len()]) * 20;
        let bulk = self.bulk.as_mut().expect("batch mode");
        bulk.submissions += 1;
        prop_assert!(bulk.submissions < 2000, "submits for ever");
        for id in &ids {
            prop_assert!(
                !bulk.in_batches.contains_key(id),
                "{} is in two open batches",
                id
            );
        }
        // "At once": without a backoff (the policy's first is a second).
        for (refused, at) in &bulk.refused {
            if now < *at + Duration::from_millis(500) && ids.iter().any(|id| refused.contains(id)) {
                prop_assert!(
                    ids.len() < refused.len(),
                    "a refusal answered by the same submission at once: {:?} after {:?}",
                    ids,
                    refused
                );
            }
        }
        let key = format!("k{}", sub.batch.0);
        // The answer comes in 4 ms: a refusal is known from then.
        let answered = now + Duration::from_millis(4);
        let outcome = if ids.len() > bulk.cap {
            bulk.refused.push((ids.clone(), answered));
            let mut e = if bulk.names_cap {
                AttemptError::new(
                    ErrorClass::InvalidRequest,
                    format!(
                        "requests: List should have at most {} items after validation, not {}",
                        bulk.cap,
                        ids.len()
                    ),
                )
            } else {
                AttemptError::new(ErrorClass::RequestTooLarge, "Request too large")
            };
            e.http_status = Some(if bulk.names_cap { 400 } else { 413 });
            Err(e)
        } else if bulk.busy_left > 0 {
            bulk.busy_left -= 1;
            bulk.refused.push((ids.clone(), answered));
            Err(error(ErrorClass::RateLimited))
        } else {
            bulk.busy_left = bulk.busy;
            bulk.next += 1;
            let id = format!("batch_{}", bulk.next);
            for item in &ids {
                bulk.in_batches.insert(*item, id.clone());
            }
            bulk.open
                .insert(id.clone(), (ids.clone(), now, now + latency));
            Ok(id)
        };
        self.at(
            Duration::from_millis(4),
            Due::Event(Event::BatchSubmitted {
                batch: sub.batch,
                key,
                created_at: "2026-01-01T00:00:00Z".into(),
                outcome,
            }),
        );
        Ok(())
    }

    /// An ended batch's results: each item by its fate; a success reads
    /// the cache only if it was written before the batch left.
    fn fetch(&mut self, batch: BatchRef, id: &str, items: &[Attempt]) -> Result<(), TestCaseError> {
        let bulk = self.bulk.as_mut().expect("batch mode");
        let (ids, submitted, ends) = bulk
            .open
            .remove(id)
            .ok_or_else(|| TestCaseError::fail(format!("read unknown batch {id}")))?;
        prop_assert!(ends <= self.now, "read before it ended");
        let asked: Vec<i64> = items.iter().map(|a| a.generation_id).collect();
        prop_assert_eq!(&asked, &ids, "read the results of other items");
        for item in &ids {
            bulk.in_batches.remove(item);
        }
        let mut results = Vec::new();
        for item in ids {
            let n = self.sends;
            self.sends += 1;
            let key = {
                let i = self.item(item);
                (i.condition_slug.clone(), i.context_index)
            };
            let warm = self.cache_ready.get(&key).is_some_and(|t| *t <= submitted);
            let outcome = match self.fates[n % self.fates.len()] {
                Fate::Success | Fate::RateLimited => Ok(generated(if warm {
                    warm_usage(self.prefix)
                } else {
                    cold(self.prefix)
                })),
                Fate::Retryable => Err(error(ErrorClass::ServerError)),
                Fate::Fatal | Fate::Invalid => Err(error(ErrorClass::InvalidRequest)),
            };
            if outcome.is_ok() {
                *self
                    .bulk
                    .as_mut()
                    .expect("batch mode")
                    .paid
                    .entry(item)
                    .or_default() += 1;
                self.cache_ready.entry(key).or_insert(ends);
            }
            results.push((item, outcome));
        }
        self.at(
            Duration::from_millis(5),
            Due::Event(Event::BatchFetched {
                batch,
                outcome: Ok(results),
            }),
        );
        Ok(())
    }

    /// The ledger takes one item's end from a batch.
    fn end_item(&mut self, id: i64, end: &AttemptEnd) -> Result<(), TestCaseError> {
        prop_assert!(
            self.status[&id] != GenerationStatus::Success,
            "stored twice"
        );
        let status = status_after(end);
        self.status.insert(id, status);
        Ok(())
    }

    fn begin(&mut self, id: i64) -> Result<(), TestCaseError> {
        self.out += 1;
        prop_assert!(self.out <= self.max_out, "more in flight than the bound");
        prop_assert!(
            self.status[&id] != GenerationStatus::Success,
            "re-sent after success"
        );
        self.status.insert(id, GenerationStatus::Running);
        self.at(Duration::from_millis(3), Due::Event(Event::Began(id)));
        Ok(())
    }

    fn send(&mut self, id: i64) -> Result<(), TestCaseError> {
        let item = self.item(id).clone();
        if item.replicate_index > 0 {
            let leader = self.status[&(id - i64::from(item.replicate_index))];
            prop_assert!(
                matches!(leader, GenerationStatus::Success | GenerationStatus::Error),
                "follower {} sent while its leader is {:?}",
                id,
                leader
            );
        }
        let (latency, outcome) = self.answer(id, self.sends);
        self.sends += 1;
        let finished = Event::Finished {
            generation_id: id,
            outcome: Box::new(outcome),
            latency_ms: latency.as_millis() as u64,
        };
        self.at(latency, Due::Event(finished));
        Ok(())
    }

    fn store(&mut self, id: i64, end: &AttemptEnd) -> Result<(), TestCaseError> {
        let status = status_after(end);
        prop_assert!(
            self.status[&id] != GenerationStatus::Success,
            "stored twice"
        );
        if *end != AttemptEnd::Abandoned {
            // Abandoning a queued retry frees no slot.
            self.out -= 1;
        }
        self.status.insert(id, status);
        self.at(Duration::from_millis(2), Due::Event(Event::Stored(id)));
        Ok(())
    }

    /// Delivers whatever comes first: a due event, or the dispatcher's
    /// own timeout.
    fn advance(&mut self, m: &mut Dispatcher) -> Result<(), TestCaseError> {
        let next_due = self.due.keys().next().map(|(t, _)| *t);
        let Some(next) = [next_due, m.poll_timeout()].into_iter().flatten().min() else {
            return Err(TestCaseError::fail("stalled: nothing due and no timeout"));
        };
        prop_assert!(next >= self.now, "asked to wake in the past");
        prop_assert!(
            next.duration_since(self.start) < Duration::from_secs(24 * 3600),
            "runs for ever"
        );
        self.now = next;
        if next_due == Some(next) {
            let key = *self.due.keys().next().expect("due");
            match self.due.remove(&key).expect("due") {
                Due::Event(event) => m.handle(event, self.now),
                Due::Stop => m.handle(Event::StopRequested, self.now),
            }
        } else {
            m.handle_timeout(self.now);
        }
        Ok(())
    }

    /// What must hold once the dispatcher is done.
    fn check_end(
        &self,
        m: &Dispatcher,
        summary: &Summary,
        rpm: u64,
        itpm: u64,
    ) -> Result<(), TestCaseError> {
        let book = m.reservation_book();
        prop_assert_eq!(book.granted, book.settled, "every reservation settled");
        prop_assert_eq!(book.settled_twice, 0);
        prop_assert_eq!(self.out, 0);
        let requests: Vec<(Instant, u64)> = self.server_log.iter().map(|(t, _)| (*t, 1)).collect();
        prop_assert!(max_in_window(&requests) <= rpm, "RPM exceeded");
        prop_assert!(max_in_window(&self.server_log) <= itpm, "ITPM exceeded");
        let may_leave_pending = summary.interrupted || !summary.stopped.is_empty();
        if !may_leave_pending {
            prop_assert_eq!(m.groups_held(), 0, "finished groups are forgotten");
        }
        let left_in_batches = self
            .bulk
            .as_ref()
            .map(|b| b.in_batches.clone())
            .unwrap_or_default();
        prop_assert_eq!(
            summary.batches_left,
            self.bulk.as_ref().map_or(0, |b| b.open.len()),
            "the batches left are the ones still open"
        );
        for (id, status) in &self.status {
            match status {
                GenerationStatus::Success | GenerationStatus::Error => {}
                GenerationStatus::Pending => {
                    prop_assert!(may_leave_pending, "{} left pending", id)
                }
                GenerationStatus::Running => prop_assert!(
                    summary.interrupted && left_in_batches.contains_key(id),
                    "{} left running",
                    id
                ),
            }
        }
        if let Some(bulk) = &self.bulk {
            for (id, paid) in &bulk.paid {
                prop_assert_eq!(*paid, 1, "{} paid {} times", id, paid);
            }
        }
        Ok(())
    }
}

/// One property case: a plan, a world, limits.
struct Case<'a> {
    conditions: &'a [&'a str],
    contexts: u32,
    replicates: u32,
    concurrency: usize,
    fates: Vec<Fate>,
    latencies: Vec<u64>,
    stop_after: Option<u64>,
    groups_per_claim: usize,
    rpm: u64,
    /// Batch mode: the provider's hidden cap, whether its refusal names
    /// it, and how many submissions in a row it refuses in passing.
    bulk: Option<(usize, bool, u32)>,
}

fn run_world(case: Case<'_>) -> Result<(), TestCaseError> {
    let prefix = 3000;
    let itpm = 2 * (prefix + REST) + 500;
    let items = plan(case.conditions, case.contexts, case.replicates);
    let start = Instant::now();
    let mut cfg = config(case.concurrency, false);
    cfg.claim_batch = case.groups_per_claim as u32;
    cfg.replicates = case.replicates as usize;
    if case.bulk.is_some() {
        cfg.batch = Some(BatchTransport {
            caps: HashMap::from([(
                ProviderKind::Anthropic,
                crate::provider::BatchCaps {
                    max_requests: 100_000,
                    max_bytes: 256 << 20,
                },
            )]),
        });
    }
    let mut m = Dispatcher::new(
        cfg,
        case.conditions.iter().map(|s| condition(s)).collect(),
        Arc::new(Catalog::built_in()),
        limits(case.rpm, itpm, 1_000_000),
        Vec::new(),
        start,
    );
    let mut w = World {
        now: start,
        start,
        status: items
            .iter()
            .map(|i| (i.generation_id, GenerationStatus::Pending))
            .collect(),
        items,
        claimed_groups: 0,
        groups_per_claim: case.groups_per_claim,
        cache_ready: HashMap::new(),
        server_log: Vec::new(),
        due: BTreeMap::new(),
        seq: 0,
        fates: case.fates,
        latencies: case.latencies,
        out: 0,
        max_out: case.concurrency,
        prefix,
        sends: 0,
        bulk: case.bulk.map(|(cap, names_cap, busy)| BulkWorld {
            cap,
            names_cap,
            busy,
            busy_left: busy,
            ..BulkWorld::default()
        }),
    };
    if let Some(ms) = case.stop_after {
        w.at(Duration::from_millis(ms), Due::Stop);
    }
    loop {
        while let Some(action) = m.poll_action(w.now) {
            if let Some(summary) = w.perform(&mut m, action)? {
                return w.check_end(&m, &summary, case.rpm, itpm);
            }
        }
        w.advance(&mut m)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After every step: never more in flight than the bound; no follower
    /// before its leader ended; nothing sent after success; at the end,
    /// every reservation settled once, no 60-second window over a limit,
    /// every cell success, error or (after a stop) pending.
    #[test]
    fn dispatch_invariants_hold(
        two_conditions in any::<bool>(),
        contexts in 1u32..5,
        replicates in 1u32..4,
        concurrency in 1usize..6,
        fates in proptest::collection::vec(fate(), 1..30),
        latencies in proptest::collection::vec(50u64..20_000, 1..30),
        stop_after in proptest::option::weighted(0.2, 0u64..120_000),
        groups_per_claim in 1usize..4,
        rpm in 2u64..20,
    ) {
        let conditions: &[&str] = if two_conditions { &["a", "b"] } else { &["a"] };
        run_world(Case { conditions, contexts, replicates, concurrency, fates, latencies, stop_after, groups_per_claim, rpm, bulk: None })?;
    }

    /// The same dispatcher through a Batch API that refuses what passes a
    /// cap it does not tell, and refuses in passing: no item in two open
    /// batches, nothing paid or stored twice, no refusal answered by the
    /// same submission at once (only by a smaller or a later one), every
    /// cell success, error or (after a stop) pending or in a batch left
    /// running.
    #[test]
    fn batch_dispatch_invariants_hold(
        two_conditions in any::<bool>(),
        contexts in 1u32..6,
        replicates in 1u32..4,
        fates in proptest::collection::vec(fate(), 1..30),
        latencies in proptest::collection::vec(50u64..20_000, 1..30),
        stop_after in proptest::option::weighted(0.2, 0u64..600_000),
        cap in 1usize..8,
        names_cap in any::<bool>(),
        busy in 0u32..3,
    ) {
        let conditions: &[&str] = if two_conditions { &["a", "b"] } else { &["a"] };
        run_world(Case { conditions, contexts, replicates, concurrency: 4, fates, latencies, stop_after, groups_per_claim: 64, rpm: 1000, bulk: Some((cap, names_cap, busy)) })?;
    }
}
