//! The rules of the batch transport as pure functions: how long a leader's
//! cache lives, whether it is still warm for its followers, how items are cut
//! into batches within the caps and the enqueued-token limit, and what a
//! refusal means (split, wait for room, stop the condition, try later, or
//! isolate the bad request).

use std::time::{Duration, Instant};

use crate::condition::ProviderKind;
use crate::provider::{AttemptError, BatchCaps, CacheControls, ErrorClass};

/// First wait between polls of a batch (times `--time-scale`); doubled after
/// every poll up to [`POLL_MAX`].
pub const POLL_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between polls (times `--time-scale`).
pub const POLL_MAX: Duration = Duration::from_secs(30);
/// Tries of a results download that fails in passing before the run stops
/// (a resume reads them again: results stay at the provider for 29 days).
pub const RESULT_TRIES: u32 = 5;
/// Poll failures in a row after which the run stops (the batch keeps
/// running; a resume re-attaches).
pub const POLL_FAILURES: u32 = 100;

/// How long a leader's cache lives in batch mode: the longest the model
/// offers (`None`: writes are free and last, so followers always go after
/// leaders).
pub fn cache_lifetime(provider: ProviderKind, controls: CacheControls) -> Option<Duration> {
    match (provider, controls) {
        (ProviderKind::Anthropic, _) => Some(Duration::from_secs(3600)),
        (ProviderKind::OpenAi, CacheControls::Breakpoints) => Some(Duration::from_secs(12 * 3600)),
        (ProviderKind::OpenAi, _) => None,
    }
}

/// When a group's cache was written: by a request that left at `written`,
/// whose batch took `took` to end (zero for a synchronous leader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Warmth {
    /// When the writing request left.
    pub written: Instant,
    /// How long its batch took to end.
    pub took: Duration,
}

/// Whether followers submitted `now` still read the leader's cache: the
/// follower batch is expected to take as long as the slower of the leader's
/// batch and `expected` (the longest batch of the provider seen so far).
pub fn still_warm(
    warmth: Warmth,
    lifetime: Option<Duration>,
    expected: Duration,
    now: Instant,
    time_scale: f64,
) -> bool {
    let Some(lifetime) = lifetime else {
        return true;
    };
    let lifetime = lifetime.mul_f64(time_scale);
    now + warmth.took.max(expected) < warmth.written + lifetime
}

/// Splits items (each with its upload size and, where the model has an
/// enqueued-token limit, its tokens) into batches within the caps, and
/// within `(limit, already enqueued)` of the model's enqueued-token limit.
/// Returns the batches, the items left for later because the queue has no
/// room for them now, and the items larger than the limit alone (they can
/// never go in a batch).
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
            && (current.len() >= caps.max_requests.max(1) || bytes + size > caps.max_bytes)
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

/// The enqueued-token limit an OpenAI batch failure names ("… Limit:
/// 90,000 enqueued tokens …"), if it names one.
pub fn queue_limit_in(message: &str) -> Option<u64> {
    let lower = message.to_ascii_lowercase();
    let at = lower.find("limit:")?;
    let digits: String = lower[at + 6..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    lower[at..]
        .contains("enqueued")
        .then(|| digits.parse().ok())
        .flatten()
}

/// The per-batch request cap a refusal names, if it names one: "at most N
/// items" (Anthropic's validation), "the maximum of N requests", "N requests
/// per batch", "at most N are allowed".
pub fn cap_in(message: &str) -> Option<usize> {
    let lower = message.to_ascii_lowercase();
    let number_after = |marker: &str| -> Option<usize> {
        let at = lower.find(marker)? + marker.len();
        let digits: String = lower[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',')
            .filter(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let number_before = |marker: &str| -> Option<usize> {
        let at = lower.find(marker)?;
        let digits: String = lower[..at]
            .trim_end()
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit() || *c == ',')
            .filter(char::is_ascii_digit)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        digits.parse().ok()
    };
    let about_requests = ["item", "request", "line", "per batch"]
        .iter()
        .any(|w| lower.contains(w));
    if !about_requests || lower.contains("byte") {
        return None;
    }
    [
        "at most",
        "maximum of",
        "max of",
        "no more than",
        "cannot exceed",
    ]
    .iter()
    .find_map(|m| number_after(m))
    .or_else(|| number_before(" requests per batch"))
    .or_else(|| number_before(" items per batch"))
    .filter(|&n| n > 0)
}

/// What a refused submission (or a batch that failed validation as a whole)
/// asks of the next one. Every refusal is answered by a smaller or a later
/// submission, never the same one at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many requests or bytes for one batch: split it, at the cap the
    /// message names or in halves.
    TooLarge {
        /// The cap, if named.
        cap: Option<usize>,
    },
    /// The model's enqueued-token limit is full: wait for room (at the
    /// limit, if named).
    QueueFull {
        /// The limit, if named.
        limit: Option<u64>,
    },
    /// Every request of these conditions would fail (key, model, quota):
    /// stop them.
    Fatal,
    /// A passing refusal (429, overloaded, a server error): the same items
    /// later, after a backoff per provider.
    Later,
    /// A request in it is wrong and stays wrong: halve to isolate it, and
    /// store a lone one as `error`.
    Invalid,
}

/// What a refusal means.
pub fn classify_refusal(error: &AttemptError) -> Refusal {
    if error.class == ErrorClass::RequestTooLarge {
        return Refusal::TooLarge {
            cap: cap_in(&error.message),
        };
    }
    let lower = error.message.to_ascii_lowercase();
    if let Some(limit) = queue_limit_in(&error.message) {
        return Refusal::QueueFull { limit: Some(limit) };
    }
    if lower.contains("token_limit_exceeded") || lower.contains("enqueued token") {
        return Refusal::QueueFull { limit: None };
    }
    if let Some(cap) = cap_in(&error.message) {
        return Refusal::TooLarge { cap: Some(cap) };
    }
    if error.class.is_fatal_for_condition() {
        return Refusal::Fatal;
    }
    if error.is_retryable() {
        return Refusal::Later;
    }
    Refusal::Invalid
}

/// Whether a submission that failed may still have created the batch at the
/// provider (no answer, a timeout, a server error): it is looked for before
/// its items go again, so nothing is paid for twice. A 4xx (or a redirect,
/// which never reached the API) created nothing.
pub fn may_exist(error: &AttemptError) -> bool {
    match error.http_status {
        None => !error.class.hands_back(),
        Some(status) => status >= 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(class: ErrorClass, status: u16, message: &str) -> AttemptError {
        AttemptError {
            http_status: Some(status),
            ..AttemptError::new(class, message)
        }
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

    #[test]
    fn limits_are_read_from_the_providers_messages() {
        let message = "Enqueued token limit reached for gpt-4o in organization org-x. Limit: 90,000 enqueued tokens. Please try submitting your batch again later.";
        assert_eq!(queue_limit_in(message), Some(90_000));
        assert_eq!(queue_limit_in("Rate limit: 5 requests"), None);
        assert_eq!(queue_limit_in("no limit here"), None);
        for (message, cap) in [
            (
                "requests: List should have at most 10 items after validation, not 16",
                Some(10),
            ),
            (
                "The batch input file has 17 requests, more than the maximum of 10 requests per batch.",
                Some(10),
            ),
            (
                "the batch has 16 requests; at most 100,000 are allowed per batch",
                Some(100_000),
            ),
            ("at most 50000 requests per batch", Some(50_000)),
            ("the batch is 300 bytes; at most 200 are allowed", None),
            ("messages: at most 2 text blocks", None),
            ("temperature: at most 1.0", None),
        ] {
            assert_eq!(cap_in(message), cap, "{message}");
        }
    }

    #[test]
    fn refusals_are_classified_by_what_they_ask_of_the_next_submission() {
        let anthropic_cap = refused(
            ErrorClass::InvalidRequest,
            400,
            "requests: List should have at most 10 items after validation, not 16",
        );
        assert_eq!(
            classify_refusal(&anthropic_cap),
            Refusal::TooLarge { cap: Some(10) }
        );
        let too_large = refused(ErrorClass::RequestTooLarge, 413, "Request too large");
        assert_eq!(
            classify_refusal(&too_large),
            Refusal::TooLarge { cap: None }
        );
        let queue = refused(
            ErrorClass::InvalidRequest,
            400,
            "token_limit_exceeded: Enqueued token limit reached. Limit: 90,000 enqueued tokens.",
        );
        assert_eq!(
            classify_refusal(&queue),
            Refusal::QueueFull {
                limit: Some(90_000)
            }
        );
        let key = refused(ErrorClass::Authentication, 401, "invalid x-api-key");
        assert_eq!(classify_refusal(&key), Refusal::Fatal);
        let busy = refused(ErrorClass::RateLimited, 429, "slow down");
        assert_eq!(classify_refusal(&busy), Refusal::Later);
        let wrong = refused(
            ErrorClass::InvalidRequest,
            400,
            "max_tokens: must be positive",
        );
        assert_eq!(classify_refusal(&wrong), Refusal::Invalid);
        // What may have created the batch is looked for, not refused.
        assert!(may_exist(&AttemptError::new(
            ErrorClass::Transport,
            "reset"
        )));
        assert!(may_exist(&refused(
            ErrorClass::ServerError,
            502,
            "bad gateway"
        )));
        assert!(!may_exist(&busy));
        assert!(!may_exist(&AttemptError::new(
            ErrorClass::Redirected,
            "moved"
        )));
    }

    #[test]
    fn a_cache_is_warm_while_the_followers_would_end_within_its_lifetime() {
        let t0 = Instant::now();
        let hour = Some(Duration::from_secs(3600));
        let written = Warmth {
            written: t0,
            took: Duration::from_secs(1200),
        };
        let at = |mins: u64| t0 + Duration::from_secs(mins * 60);
        assert!(still_warm(written, hour, Duration::ZERO, at(20), 1.0));
        assert!(!still_warm(written, hour, Duration::ZERO, at(40), 1.0));
        // A slower batch seen since counts against the lifetime.
        assert!(!still_warm(
            written,
            hour,
            Duration::from_secs(2700),
            at(20),
            1.0
        ));
        // Free, lasting writes (OpenAI's automatic cache) are always warm.
        assert!(still_warm(written, None, Duration::ZERO, at(600), 1.0));
        // At time scale 0.01 the hour is 36 s.
        let fast = Warmth {
            written: t0,
            took: Duration::from_secs(12),
        };
        assert!(still_warm(
            fast,
            hour,
            Duration::ZERO,
            t0 + Duration::from_secs(20),
            0.01
        ));
        assert!(!still_warm(
            fast,
            hour,
            Duration::ZERO,
            t0 + Duration::from_secs(25),
            0.01
        ));
    }
}
