//! The one retry policy every attempt's outcome goes through.

use std::time::Duration;

use crate::provider::{AttemptError, ErrorClass};

/// What happens to a generation after an attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// It succeeded.
    Success,
    /// It failed and goes again after `delay`.
    Retry {
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// It failed for good: stored as `error`.
    GiveUp,
    /// It never reached the API (the configuration is wrong): not tried
    /// again now, but handed back as `pending` for a resume.
    HandBack,
}

/// What one generation has used of its retry budget in this execution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// Attempts sent in this execution.
    pub tries: u32,
    /// Of those, rate-limit rejections waited out for free.
    pub waited: u32,
}

impl Budget {
    /// `tries` attempts, none of them free.
    pub fn tried(tries: u32) -> Self {
        Self { tries, waited: 0 }
    }

    /// The attempts that count against `--max-retries`.
    pub fn spent(&self) -> u32 {
        self.tries.saturating_sub(self.waited)
    }
}

/// When to try again, and how long to wait first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts allowed per generation in one execution (retries + 1).
    pub max_attempts: u32,
    /// The first backoff delay (then ×2 per retry).
    pub backoff_base: Duration,
    /// Multiplies backoff delays (not the server's `retry-after`).
    pub time_scale: f64,
}

impl RetryPolicy {
    /// A policy allowing `max_retries` retries (saturating: a huge value
    /// means "always retry what may succeed").
    pub fn new(max_retries: u32, backoff_base: Duration, time_scale: f64) -> Self {
        Self {
            max_attempts: max_retries.saturating_add(1),
            backoff_base,
            time_scale,
        }
    }

    /// The verdict on the latest attempt of generation `generation_id`,
    /// whose `budget` counts it already. A rate-limit rejection that came
    /// with a wait Apex sits out is recorded in the budget as free (up to
    /// [`FREE_WAITS`](Self::FREE_WAITS)).
    pub fn verdict(
        &self,
        outcome: Result<(), &AttemptError>,
        generation_id: i64,
        budget: &mut Budget,
    ) -> Verdict {
        let Err(error) = outcome else {
            return Verdict::Success;
        };
        if error.class.hands_back() {
            return Verdict::HandBack;
        }
        if self.waits_out(error) && budget.waited < Self::FREE_WAITS {
            budget.waited += 1;
        }
        let spent = budget.spent();
        if !error.is_retryable() || spent >= self.max_attempts || self.wait_too_long(error) {
            return Verdict::GiveUp;
        }
        Verdict::Retry {
            delay: backoff_delay(
                spent.saturating_sub(1),
                error.retry_after,
                self.backoff_base,
                jitter(generation_id, budget.tries),
                self.time_scale,
            ),
        }
    }

    /// The message stored for a failed attempt: the error's own, or, for a
    /// wait longer than Apex sits out, one naming the wait and `--resume`.
    pub fn stored_message(&self, error: &AttemptError) -> String {
        if self.wait_too_long(error) {
            self.too_long_message(error)
        } else {
            error.to_string()
        }
    }

    /// Whether the error stops its whole condition (every request of it
    /// would fail the same way).
    pub fn stops_condition(error: &AttemptError) -> bool {
        error.class.is_fatal_for_condition()
    }

    /// Whether the error is the server pacing us (counted and paused on).
    pub fn is_rate_limit(error: &AttemptError) -> bool {
        error.class == ErrorClass::RateLimited
    }

    /// The longest server-requested wait Apex sits out (before
    /// `time_scale`); a longer one (a daily limit, a quota window) ends the
    /// generation as `error`, to be resumed later.
    pub const LONGEST_WAIT: Duration = Duration::from_secs(15 * 60);

    /// Rate-limit rejections per generation and execution that are waited
    /// out without spending the retry budget (a server that never stops
    /// rejecting must still end).
    pub const FREE_WAITS: u32 = 100;

    /// Whether the error is a rate-limit or overload rejection that came
    /// with a wait Apex sits out: it does not spend the retry budget.
    pub fn waits_out(&self, error: &AttemptError) -> bool {
        matches!(
            error.class,
            ErrorClass::RateLimited | ErrorClass::Overloaded
        ) && error.retry_after.is_some()
            && !self.wait_too_long(error)
    }

    /// The wait a rate-limit rejection asked for, when it is longer than
    /// Apex waits out.
    pub fn wait_too_long(&self, error: &AttemptError) -> bool {
        let longest = crate::time::scaled(Self::LONGEST_WAIT, self.time_scale);
        error.class == ErrorClass::RateLimited && error.retry_after.is_some_and(|w| w > longest)
    }

    /// The message stored for a rejection whose wait is too long.
    pub fn too_long_message(&self, error: &AttemptError) -> String {
        let asked = error.retry_after.unwrap_or_default().as_secs_f64();
        let longest = crate::time::scaled(Self::LONGEST_WAIT, self.time_scale).as_secs_f64();
        format!(
            "{error}; the server asks to wait {asked:.0} s, longer than the {longest:.0} s Apex waits out (a daily or quota limit?): resume the run later with `apex run --resume RUN_ID`"
        )
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
    crate::time::scaled(
        exponential,
        (1.0 + 0.25 * jitter.clamp(0.0, 1.0)) * time_scale,
    )
}

/// A deterministic jitter in 0..1 per (generation, attempt), so a rerun waits
/// the same and tests are repeatable.
pub(crate) fn jitter(generation_id: i64, attempt: u32) -> f64 {
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

    #[test]
    fn verdicts() {
        let policy = RetryPolicy::new(2, Duration::from_secs(1), 1.0);
        let transient = AttemptError::new(ErrorClass::ServerError, "boom");
        let mut refused = transient.clone();
        refused.server_refuses_retry = true;
        let fatal = AttemptError::new(ErrorClass::Authentication, "bad key");
        assert_eq!(
            policy.verdict(Ok(()), 1, &mut Budget::tried(1)),
            Verdict::Success
        );
        assert!(matches!(
            policy.verdict(Err(&transient), 1, &mut Budget::tried(2)),
            Verdict::Retry { .. }
        ));
        assert_eq!(
            policy.verdict(Err(&transient), 1, &mut Budget::tried(3)),
            Verdict::GiveUp
        );
        assert_eq!(
            policy.verdict(Err(&refused), 1, &mut Budget::tried(1)),
            Verdict::GiveUp
        );
        assert_eq!(
            policy.verdict(Err(&fatal), 1, &mut Budget::tried(1)),
            Verdict::GiveUp
        );
        assert!(RetryPolicy::stops_condition(&fatal));
    }

    #[test]
    fn rate_limit_waits_are_free_up_to_a_cap() {
        let policy = RetryPolicy::new(0, Duration::from_secs(1), 1.0);
        let mut limited = AttemptError::new(ErrorClass::RateLimited, "429");
        assert!(
            !policy.waits_out(&limited),
            "no wait given: spends the budget"
        );
        limited.retry_after = Some(Duration::from_secs(20));
        assert!(policy.waits_out(&limited));
        let mut overloaded = AttemptError::new(ErrorClass::Overloaded, "529");
        overloaded.retry_after = Some(Duration::from_secs(5));
        assert!(policy.waits_out(&overloaded));
        limited.retry_after = Some(Duration::from_secs(24 * 3600));
        assert!(!policy.waits_out(&limited));
        assert_eq!(
            policy.verdict(Err(&limited), 1, &mut Budget::tried(0)),
            Verdict::GiveUp
        );
        let message = policy.too_long_message(&limited);
        assert!(
            message.contains("86400 s, longer than the 900 s") && message.contains("--resume"),
            "{message}"
        );
        // Scaled like every other duration.
        let scaled = RetryPolicy::new(0, Duration::from_secs(1), 0.01);
        limited.retry_after = Some(Duration::from_secs(10));
        assert!(scaled.wait_too_long(&limited));
    }

    #[test]
    fn huge_retry_budgets_and_scales_do_not_overflow() {
        let policy = RetryPolicy::new(u32::MAX, Duration::from_secs(1), f64::MAX);
        assert_eq!(policy.max_attempts, u32::MAX);
        let transient = AttemptError::new(ErrorClass::Transport, "reset");
        let Verdict::Retry { delay } = policy.verdict(Err(&transient), 1, &mut Budget::tried(40))
        else {
            panic!("retryable")
        };
        assert_eq!(delay, crate::time::FAR_FUTURE);
    }
}
