//! Progress for long runs: a bar on a terminal, log lines elsewhere.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use apex_core::executor::{Progress, ProgressEvent};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar being drawn, if any: log lines are printed above it.
static BAR: OnceLock<ProgressBar> = OnceLock::new();

#[derive(Default)]
struct Tally {
    total: u64,
    done: u64,
    errors: u64,
    cache_hits: u64,
    cost: f64,
}

impl Tally {
    fn summary(&self) -> String {
        format!(
            "{} error(s), {} cache hit(s), ${:.4} so far",
            self.errors, self.cache_hits, self.cost
        )
    }
}

/// Done / total, errors, cache hits, cost so far and ETA: drawn as a bar
/// when stderr is a terminal, logged every `every` otherwise.
pub struct RunProgress {
    started: Instant,
    every: Duration,
    last: Mutex<Instant>,
    tally: Mutex<Tally>,
    bar: Option<ProgressBar>,
}

impl RunProgress {
    pub fn new(every: Duration) -> Self {
        let now = Instant::now();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} {msg} eta {eta}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            let _ = BAR.set(bar.clone());
            bar
        });
        Self {
            started: now,
            every,
            last: Mutex::new(now),
            tally: Mutex::new(Tally::default()),
            bar,
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
            "progress {}/{} done, {}, {:.1}s elapsed{eta}",
            t.done,
            t.total,
            t.summary(),
            elapsed.as_secs_f64()
        )
    }

    /// Removes the bar (before the final tables are printed).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for RunProgress {
    fn event(&self, event: &ProgressEvent) {
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            ProgressEvent::Started { total } => {
                t.total = *total;
                if let Some(bar) = &self.bar {
                    bar.set_length(*total);
                    bar.set_message(t.summary());
                }
            }
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
                if let Some(bar) = &self.bar {
                    bar.set_position(t.done);
                    bar.set_message(t.summary());
                    return;
                }
                let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                if t.done == t.total || last.elapsed() >= self.every {
                    *last = Instant::now();
                    tracing::info!("{}", self.line(&t));
                }
            }
            ProgressEvent::Waiting {
                batches,
                processed,
                total,
            } => {
                let waiting = format!(
                    "waiting on {batches} batch(es): {processed}/{total} processed by the provider"
                );
                if let Some(bar) = &self.bar {
                    bar.set_message(format!("{}; {waiting}", t.summary()));
                    return;
                }
                let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= self.every {
                    *last = Instant::now();
                    tracing::info!("{}; {waiting}", self.line(&t));
                }
            }
            ProgressEvent::Retrying { .. } | ProgressEvent::ConditionStopped { .. } => {}
        }
    }
}

/// Log output that steps around the progress bar.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match BAR.get() {
            Some(bar) if !bar.is_finished() => bar.suspend(|| std::io::stderr().write_all(buf))?,
            _ => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}
