//! The live view of a run: one line per condition (done / total, cache
//! hits, errors, retrying now, 429s, requests and tokens per minute against
//! the limits the run is paced at) and a run line (done, cost so far,
//! elapsed, and an ETA from the limiter's own bound). Redrawn in place when
//! stderr is a terminal, logged every few seconds otherwise. Retries are
//! counted here; their details are logged at `debug` (and every attempt is
//! a row in the ledger).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use apex_core::executor::{Progress, ProgressEvent};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The display being drawn, if any: log lines are printed above it.
static DISPLAY: OnceLock<MultiProgress> = OnceLock::new();

/// One condition's line.
#[derive(Default)]
struct Row {
    total: u64,
    done: u64,
    errors: u64,
    cache_hits: u64,
    /// Generations waiting for another attempt now.
    retrying: HashSet<(String, u32)>,
    retries: u64,
    rate_limited: u64,
    /// How its model is paced.
    pacing: Option<ModelPacing>,
}

/// How a model is paced, from [`ProgressEvent::Pacing`].
#[derive(Clone)]
struct ModelPacing {
    key: String,
    window: [u64; 3],
    limits: [Option<u64>; 3],
    length: Duration,
}

/// What the display shows.
#[derive(Default)]
struct Board {
    order: Vec<String>,
    rows: HashMap<String, Row>,
    total: u64,
    cost: f64,
    waiting: Option<String>,
}

/// Tokens in thousands or millions, as limits are written.
fn short(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.0}K", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

fn against(used: u64, limit: Option<u64>) -> String {
    match limit {
        Some(l) => format!("{}/{}", short(used), short(l)),
        None => short(used),
    }
}

fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}s", s)
    }
}

impl Board {
    fn row_line(&self, slug: &str, width: usize) -> String {
        let r = &self.rows[slug];
        let mut line = format!(
            "{slug:<width$}  {}/{} done · {} cache hit(s) · {} error(s) · {} retrying ({} retries) · {} × 429",
            r.done,
            r.total,
            r.cache_hits,
            r.errors,
            r.retrying.len(),
            r.retries,
            r.rate_limited
        );
        if let Some(ModelPacing {
            key,
            window,
            limits,
            ..
        }) = &r.pacing
        {
            let tokens = if key.starts_with("anthropic") {
                format!(
                    "ITPM {} · OTPM {}",
                    against(window[1], limits[1]),
                    against(window[2], limits[2])
                )
            } else {
                format!("TPM {}", against(window[1], limits[1]))
            };
            line.push_str(&format!(
                " · RPM {} · {tokens}",
                against(window[0], limits[0])
            ));
        }
        line
    }

    /// The least time the limits leave for what remains: per model, the
    /// remaining requests (and their tokens, at the window's tokens per
    /// request) against each limit; the longest model. `None` when no
    /// model's limits are known.
    fn bound(&self) -> Option<Duration> {
        let mut remaining: BTreeMap<&str, (u64, &ModelPacing)> = BTreeMap::new();
        for r in self.rows.values() {
            let Some(pacing) = &r.pacing else {
                continue;
            };
            remaining
                .entry(pacing.key.as_str())
                .or_insert((0, pacing))
                .0 += r.total.saturating_sub(r.done);
        }
        remaining
            .values()
            .filter_map(
                |(
                    left,
                    ModelPacing {
                        window,
                        limits,
                        length,
                        ..
                    },
                )| {
                    let per_request = |d: usize| {
                        if d == 0 {
                            1.0
                        } else if window[0] > 0 {
                            window[d] as f64 / window[0] as f64
                        } else {
                            0.0
                        }
                    };
                    let windows = (0..3)
                        .filter_map(|d| {
                            limits[d].map(|l| *left as f64 * per_request(d) / l.max(1) as f64)
                        })
                        .fold(None, |m: Option<f64>, w| Some(m.map_or(w, |m| m.max(w))))?;
                    Some(length.mul_f64(windows))
                },
            )
            .max()
    }

    fn run_line(&self, elapsed: Duration) -> String {
        let done: u64 = self.rows.values().map(|r| r.done).sum();
        let total = self.total.max(self.rows.values().map(|r| r.total).sum());
        let eta = match self.bound() {
            Some(b) if done < total => format!(" · eta {} (the limits' bound)", duration(b)),
            None if done > 0 && done < total => {
                let per = elapsed.as_secs_f64() / done as f64;
                format!(
                    " · eta {} (recent rate; no limits known)",
                    duration(Duration::from_secs_f64(per * (total - done) as f64))
                )
            }
            _ => String::new(),
        };
        let mut line = format!(
            "run  {done}/{total} done · ${:.4} so far · {} elapsed{eta}",
            self.cost,
            duration(elapsed)
        );
        if let Some(waiting) = &self.waiting {
            line.push_str(" · ");
            line.push_str(waiting);
        }
        line
    }

    fn row(&mut self, slug: &str) -> &mut Row {
        if !self.rows.contains_key(slug) {
            self.order.push(slug.to_owned());
        }
        self.rows.entry(slug.to_owned()).or_default()
    }
}

/// The live view of a run.
pub struct RunProgress {
    started: Mutex<Instant>,
    every: Duration,
    /// Whether the run was recorded by an earlier command.
    resumed: bool,
    last: Mutex<Instant>,
    board: Mutex<Board>,
    /// The run line, then one line per condition, when drawn in place
    /// (once the run has started).
    lines: OnceLock<(ProgressBar, Vec<ProgressBar>)>,
    /// The run, once it has started.
    run_id: OnceLock<apex_core::RunId>,
}

impl RunProgress {
    /// A view drawn in place on a terminal, logged every `every` otherwise,
    /// from the moment the run starts; `resumed`: the run was recorded
    /// before.
    pub fn new(every: Duration, resumed: bool) -> Self {
        Self {
            started: Mutex::new(Instant::now()),
            every,
            resumed,
            last: Mutex::new(Instant::now()),
            board: Mutex::new(Board::default()),
            lines: OnceLock::new(),
            run_id: OnceLock::new(),
        }
    }

    /// The run, once it has started.
    pub fn run_id(&self) -> Option<apex_core::RunId> {
        self.run_id.get().cloned()
    }

    /// The run started: says so on stdout (its id is how every other
    /// command finds it) and sets the lines up, one per condition.
    fn start(&self, board: &mut Board, run_id: &apex_core::RunId, totals: &[(String, u64)]) {
        let total: u64 = totals.iter().map(|(_, n)| n).sum();
        if self.resumed {
            println!("run {run_id} resumed: {total} generation(s) to do");
        } else {
            println!("run {run_id} started: {total} generation(s)");
        }
        let _ = self.run_id.set(run_id.clone());
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        for (slug, n) in totals {
            board.row(slug).total = *n;
        }
        board.total = total;
        if std::io::stderr().is_terminal() {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{msg}").expect("the template is valid");
            let line = |_| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar
            };
            let run = line(());
            let conditions = totals.iter().map(|_| line(())).collect();
            let _ = DISPLAY.set(multi);
            let _ = self.lines.set((run, conditions));
        }
        self.redraw(board);
    }

    fn elapsed(&self) -> Duration {
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn width(board: &Board) -> usize {
        board.order.iter().map(String::len).max().unwrap_or(0)
    }

    fn redraw(&self, board: &Board) {
        let Some((run, conditions)) = self.lines.get() else {
            return;
        };
        run.set_message(board.run_line(self.elapsed()));
        let width = Self::width(board);
        for (bar, slug) in conditions.iter().zip(&board.order) {
            bar.set_message(board.row_line(slug, width));
        }
    }

    /// Logs the view (not a terminal): every `every`, and at the end.
    fn log(&self, board: &Board, force: bool) {
        if self.lines.get().is_some() || self.run_id.get().is_none() {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if !force && last.elapsed() < self.every {
            return;
        }
        *last = Instant::now();
        tracing::info!("{}", board.run_line(self.elapsed()));
        let width = Self::width(board);
        for slug in &board.order {
            tracing::info!("{}", board.row_line(slug, width));
        }
    }

    /// Clears the view (before the final tables are printed), logging its
    /// last state where nothing was drawn in place.
    pub fn finish(&self) {
        let board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        match self.lines.get() {
            Some((run, conditions)) => {
                self.redraw(&board);
                run.finish();
                for bar in conditions {
                    bar.finish();
                }
            }
            None => self.log(&board, true),
        }
    }
}

impl Progress for RunProgress {
    fn event(&self, event: &ProgressEvent) {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            ProgressEvent::Started {
                run_id, conditions, ..
            } => self.start(&mut board, run_id, conditions),
            ProgressEvent::Finished {
                condition,
                prompt_id,
                replicate_index,
                success,
                cache_hit,
                cost_usd,
            } => {
                board.cost += cost_usd.unwrap_or(0.0);
                let row = board.row(condition);
                row.done += 1;
                row.errors += u64::from(!success);
                row.cache_hits += u64::from(*cache_hit);
                row.retrying.remove(&(prompt_id.clone(), *replicate_index));
            }
            ProgressEvent::Retrying {
                condition,
                prompt_id,
                replicate_index,
                http_status,
                ..
            } => {
                let row = board.row(condition);
                row.retries += 1;
                row.rate_limited += u64::from(*http_status == Some(429));
                row.retrying.insert((prompt_id.clone(), *replicate_index));
            }
            ProgressEvent::Pacing {
                condition,
                key,
                window,
                limits,
                window_length,
            } => {
                board.row(condition).pacing = Some(ModelPacing {
                    key: key.clone(),
                    window: *window,
                    limits: *limits,
                    length: *window_length,
                });
            }
            ProgressEvent::Waiting {
                batches,
                processed,
                total,
            } => {
                board.waiting = Some(format!(
                    "waiting on {batches} batch(es): {processed}/{total} processed by the provider"
                ));
            }
            ProgressEvent::ConditionStopped { .. } => {}
        }
        self.redraw(&board);
        self.log(&board, false);
    }
}

/// Log output that steps around the live view.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match DISPLAY.get() {
            Some(display) => display.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pacing(
        condition: &str,
        key: &str,
        window: [u64; 3],
        limits: [Option<u64>; 3],
    ) -> ProgressEvent {
        ProgressEvent::Pacing {
            condition: condition.into(),
            key: key.into(),
            window,
            limits,
            window_length: Duration::from_secs(60),
        }
    }

    /// A view of a run that has started with these totals.
    fn started(totals: &[(&str, u64)]) -> RunProgress {
        let view = RunProgress::new(Duration::from_secs(3600), false);
        view.event(&ProgressEvent::Started {
            run_id: apex_core::RunId::generate(),
            total: totals.iter().map(|(_, n)| n).sum(),
            conditions: totals.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect(),
        });
        view
    }

    #[test]
    fn the_eta_is_the_limits_bound_for_what_remains_per_model() {
        let view = started(&[("a", 100), ("b", 50)]);
        // 100 + 50 requests left on one model at 50 RPM: 3 minutes; its
        // tokens (1,000 per request, 100K TPM) allow them in 1.5.
        view.event(&pacing(
            "a",
            "openai/gpt-5",
            [10, 10_000, 0],
            [Some(50), Some(100_000), None],
        ));
        view.event(&pacing(
            "b",
            "openai/gpt-5",
            [10, 10_000, 0],
            [Some(50), Some(100_000), None],
        ));
        let board = view.board.lock().unwrap();
        assert_eq!(board.bound(), Some(Duration::from_secs(180)));
        assert!(
            board
                .run_line(Duration::from_secs(5))
                .contains("eta 3m00s (the limits' bound)")
        );
        let row = board.row_line("a", 1);
        assert!(
            row.contains("0/100 done") && row.contains("RPM 10/50 · TPM 10K/100K"),
            "{row}"
        );
    }

    #[test]
    fn retries_are_counted_while_they_wait_and_429s_apart() {
        let view = started(&[("a", 2)]);
        let retry = |status| ProgressEvent::Retrying {
            condition: "a".into(),
            prompt_id: "ctx".into(),
            replicate_index: 0,
            attempt: 1,
            error: "x".into(),
            http_status: Some(status),
            delay: Duration::ZERO,
        };
        view.event(&retry(500));
        view.event(&retry(429));
        assert!(
            view.board
                .lock()
                .unwrap()
                .row_line("a", 1)
                .contains("1 retrying (2 retries) · 1 × 429")
        );
        view.event(&ProgressEvent::Finished {
            condition: "a".into(),
            prompt_id: "ctx".into(),
            replicate_index: 0,
            success: true,
            cache_hit: true,
            cost_usd: Some(0.5),
        });
        let board = view.board.lock().unwrap();
        let row = board.row_line("a", 1);
        assert!(
            row.contains("1/2 done · 1 cache hit(s) · 0 error(s) · 0 retrying (2 retries)"),
            "{row}"
        );
        assert!(
            board
                .run_line(Duration::from_secs(1))
                .contains("$0.5000 so far")
        );
    }
}
