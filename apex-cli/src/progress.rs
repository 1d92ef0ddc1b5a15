//! Progress lines for long runs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use apex_core::executor::{Progress, ProgressEvent};

#[derive(Default)]
struct Tally {
    total: u64,
    done: u64,
    errors: u64,
    cache_hits: u64,
    cost: f64,
}

/// Logs a progress line at most every `every`, and at the end: done / total,
/// errors, cache hits, cost so far and an ETA from the average pace.
pub struct LogProgress {
    started: Instant,
    every: Duration,
    last: Mutex<Instant>,
    tally: Mutex<Tally>,
}

impl LogProgress {
    pub fn new(every: Duration) -> Self {
        let now = Instant::now();
        Self {
            started: now,
            every,
            last: Mutex::new(now),
            tally: Mutex::new(Tally::default()),
        }
    }

    fn line(&self, t: &Tally) -> String {
        let elapsed = self.started.elapsed();
        let eta = if t.done > 0 && t.done < t.total {
            let per = elapsed.as_secs_f64() / t.done as f64;
            format!(", eta {:.0}s", per * (t.total - t.done) as f64)
        } else {
            String::new()
        };
        format!(
            "progress {}/{} done, {} error(s), {} cache hit(s), ${:.4} so far, {:.1}s elapsed{eta}",
            t.done,
            t.total,
            t.errors,
            t.cache_hits,
            t.cost,
            elapsed.as_secs_f64()
        )
    }
}

impl Progress for LogProgress {
    fn event(&self, event: &ProgressEvent) {
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            ProgressEvent::Started { total } => t.total = *total,
            ProgressEvent::Finished {
                success,
                cache_hit,
                cost_usd,
                ..
            } => {
                t.done += 1;
                t.errors += u64::from(!success);
                t.cache_hits += u64::from(*cache_hit);
                t.cost += cost_usd.unwrap_or(0.0);
                let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                if t.done == t.total || last.elapsed() >= self.every {
                    *last = Instant::now();
                    tracing::info!("{}", self.line(&t));
                }
            }
            ProgressEvent::Retrying { .. } | ProgressEvent::ConditionStopped { .. } => {}
        }
    }
}
