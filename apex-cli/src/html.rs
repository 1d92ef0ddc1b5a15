//! `apex report`: one self-contained HTML file per set of runs — overview,
//! charts (SVG drawn by plotters, each with its numbers in a table beside
//! it), and the audition view of every output. No script, style or font is
//! loaded from anywhere: the file opens from a disk or an e-mail attachment.
//! Generated text is escaped, never interpreted.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use anyhow::Result;
use apex_core::estimate::ConditionEstimate;
use apex_core::limiter::LimitTable;
use apex_core::{Catalog, Condition, GenerationRow, ProviderKind, RunId, RunInfo, Store};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::report::{is_batch_run, run_estimates, usd};

/// Colours for series, in order (readable on white, distinct in greyscale
/// by lightness).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the Unix epoch of an RFC 3339 time.
fn seconds(t: &str) -> Option<f64> {
    t.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

/// One attempt, as the charts need it.
struct AttemptRow {
    generation_id: i64,
    started: f64,
    finished: Option<f64>,
    outcome: String,
}

/// Everything the report shows of one run.
struct RunData {
    info: RunInfo,
    conditions: Vec<Condition>,
    estimates: Vec<ConditionEstimate>,
    generations: Vec<GenerationRow>,
    attempts: Vec<AttemptRow>,
    batch: bool,
}

async fn load(store: &dyn Store, catalog: &Catalog, run_id: &RunId) -> Result<RunData> {
    let info = store.run(run_id).await?;
    let conditions = store.run_conditions(run_id).await?;
    let estimates = run_estimates(store, catalog, &info, &conditions).await?;
    let mut generations = Vec::new();
    let mut after = 0;
    loop {
        let page = store.generations_page(run_id, after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.generation_id;
        generations.extend(page);
    }
    let mut attempts = Vec::new();
    let mut after = (0, 0);
    loop {
        let page = store.attempts_page(run_id, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = (last.generation_id, last.attempt);
        attempts.extend(page.into_iter().filter_map(|a| {
            Some(AttemptRow {
                generation_id: a.generation_id,
                started: seconds(&a.started_at)?,
                finished: a.finished_at.as_deref().and_then(seconds),
                outcome: a.outcome,
            })
        }));
    }
    attempts.sort_by(|a, b| a.started.total_cmp(&b.started));
    let batch = is_batch_run(&info);
    Ok(RunData {
        info,
        conditions,
        estimates,
        generations,
        attempts,
        batch,
    })
}

/// Draws a chart into an SVG string.
fn svg(
    width: u32,
    height: u32,
    draw: impl FnOnce(DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String>,
) -> String {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        if let Err(e) = root
            .fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|()| draw(root.clone()))
        {
            return format!(
                "<p class=\"chart-error\">chart not drawn: {}</p>",
                escape(&e)
            );
        }
        let _ = root.present();
    }
    out
}

/// A table of numbers beside a chart.
fn table(columns: &[&str], rows: &[Vec<String>]) -> String {
    let mut html = String::from("<table><thead><tr>");
    for c in columns {
        let _ = write!(html, "<th>{}</th>", escape(c));
    }
    html.push_str("</tr></thead><tbody>");
    for row in rows {
        html.push_str("<tr>");
        for cell in row {
            let _ = write!(html, "<td>{}</td>", escape(cell));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    html
}

fn figure(id: &str, title: &str, chart: String, numbers: String) -> String {
    format!(
        "<figure class=\"chart\" id=\"{id}\"><figcaption>{}</figcaption><div class=\"plot\">{chart}</div><div class=\"numbers\">{numbers}</div></figure>",
        escape(title)
    )
}

/// A series of (x, y) points with a name.
type Series = (String, Vec<(f64, f64)>);

/// A line chart of several series over time (minutes since the start),
/// with optional horizontal limit lines.
fn line_chart(title: &str, y_label: &str, series: &[Series], limits: &[(String, f64)]) -> String {
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1e-3);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .chain(limits.iter().map(|l| l.1))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    svg(640, 300, |root| {
        let mut chart = axes(&root, title, (0.0..x_max, 0.0..y_max))?;
        chart
            .configure_mesh()
            .x_desc("minutes since the run started")
            .y_desc(y_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        for (i, (name, limit)) in limits.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, *limit), (x_max, *limit)],
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(|e| e.to_string())?
                .label(format!("{name} limit"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        legend(&mut chart)
    })
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A titled chart with room for its axis labels.
fn axes<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    title: &str,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
) -> Result<Chart<'a, 'b>, String> {
    ChartBuilder::on(root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(|e| e.to_string())
}

/// The series' names in a box.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// Grouped bars: one group per label, one bar per series.
fn bar_chart(title: &str, y_label: &str, labels: &[String], series: &[(&str, Vec<f64>)]) -> String {
    let y_max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let groups = labels.len().max(1) as f64;
    let per = series.len().max(1) as f64;
    svg(640, 300, |root| {
        let mut chart = axes(&root, title, (0.0..groups, 0.0..y_max))?;
        let names = labels.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            // Ticks every half group: the names go on the centres.
            .x_labels(2 * labels.len() + 1)
            .x_label_formatter(&move |x| {
                if (x - x.floor() - 0.5).abs() < 0.01 {
                    names.get(x.floor() as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (s, (name, values)) in series.iter().enumerate() {
            let color = PALETTE[s % PALETTE.len()];
            let width = 0.8 / per;
            chart
                .draw_series(values.iter().enumerate().map(|(g, v)| {
                    let x0 = g as f64 + 0.1 + s as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
                }))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        legend(&mut chart)
    })
}

/// The value at quantile `q` of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Latency histograms, one row per condition, with p50 and p95 marked.
fn latency_chart(by_condition: &[(String, Vec<f64>)]) -> String {
    let x_max = by_condition
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(0.001)
        * 1.05;
    let rows = by_condition.len().max(1);
    svg(640, 90 * rows as u32 + 40, |root| {
        let areas = root.split_evenly((rows, 1));
        for (area, (name, values)) in areas.iter().zip(by_condition) {
            let bins = 30usize;
            let width = x_max / bins as f64;
            let mut counts = vec![0u32; bins];
            for v in values {
                counts[((v / width) as usize).min(bins - 1)] += 1;
            }
            let y_max = f64::from(*counts.iter().max().unwrap_or(&1)).max(1.0) * 1.2;
            let mut chart = ChartBuilder::on(area)
                .caption(name, ("sans-serif", 13))
                .margin(4)
                .x_label_area_size(22)
                .y_label_area_size(40)
                .build_cartesian_2d(0.0..x_max, 0.0..y_max)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(6)
                .y_labels(3)
                .draw()
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(counts.iter().enumerate().map(|(i, c)| {
                    let x0 = i as f64 * width;
                    Rectangle::new(
                        [(x0, 0.0), (x0 + width * 0.9, f64::from(*c))],
                        PALETTE[0].filled(),
                    )
                }))
                .map_err(|e| e.to_string())?;
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            for (q, color) in [(0.5, PALETTE[1]), (0.95, PALETTE[3])] {
                let x = quantile(&sorted, q);
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x, 0.0), (x, y_max)],
                        color.stroke_width(2),
                    )))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    })
}

/// Minutes since `start` of a time in seconds.
fn minutes(t: f64, start: f64) -> f64 {
    (t - start) / 60.0
}

/// The charts of one run, each with its numbers.
fn charts(run: &RunData, catalog: &Catalog, limits: &LimitTable) -> String {
    let start = run
        .attempts
        .iter()
        .map(|a| a.started)
        .fold(f64::INFINITY, f64::min);
    let end = run
        .attempts
        .iter()
        .map(|a| a.finished.unwrap_or(a.started))
        .fold(start, f64::max);
    let mut html = String::new();
    let slug_of: HashMap<i64, &GenerationRow> = run
        .generations
        .iter()
        .map(|g| (g.generation_id, g))
        .collect();
    let condition_of: HashMap<&str, &Condition> = run
        .conditions
        .iter()
        .map(|c| (c.slug.as_str(), c))
        .collect();
    if !start.is_finite() {
        html.push_str("<p>No attempt has been made yet: the charts appear once requests go.</p>");
        return html;
    }
    let span = (end - start).max(1.0);
    let samples = 120usize;
    let window = 60.0f64.min(span);
    // Requests and tokens per minute per model, over a sliding 60 s window
    // (what the limits count), against each model's limits.
    // Per model: its provider, its attempts' start times, and (finish time,
    // tokens) of its successes.
    type Demand = (ProviderKind, Vec<f64>, Vec<(f64, f64)>);
    let mut models: BTreeMap<String, Demand> = BTreeMap::new();
    for a in &run.attempts {
        let Some(g) = slug_of.get(&a.generation_id) else {
            continue;
        };
        let Some(c) = condition_of.get(g.condition_slug.as_str()) else {
            continue;
        };
        let entry = models
            .entry(c.model.clone())
            .or_insert_with(|| (c.provider, Vec::new(), Vec::new()));
        entry.1.push(a.started);
        if a.outcome == "success" {
            let tokens = g.input_tokens.unwrap_or(0)
                + g.cache_write_tokens.unwrap_or(0)
                + g.cache_read_tokens.unwrap_or(0)
                + g.output_tokens.unwrap_or(0);
            entry
                .2
                .push((a.finished.unwrap_or(a.started), tokens as f64));
        }
    }
    let per_minute = 60.0 / window;
    let rate = |times: &[(f64, f64)], t: f64| -> f64 {
        times
            .iter()
            .filter(|(s, _)| *s > t - window && *s <= t)
            .map(|(_, w)| w)
            .sum::<f64>()
            * per_minute
    };
    let mut request_series = Vec::new();
    let mut token_series = Vec::new();
    let mut request_limits = Vec::new();
    let mut token_limits = Vec::new();
    let mut rows = Vec::new();
    for (model, (provider, starts, tokens)) in &models {
        let weighted: Vec<(f64, f64)> = starts.iter().map(|s| (*s, 1.0)).collect();
        let points = |w: &[(f64, f64)]| -> Vec<(f64, f64)> {
            (0..=samples)
                .map(|i| {
                    let t = start + span * i as f64 / samples as f64;
                    (minutes(t, start), rate(w, t))
                })
                .collect()
        };
        let rpm = points(&weighted);
        let tpm = points(tokens);
        let peak = |p: &[(f64, f64)]| p.iter().map(|p| p.1).fold(0.0, f64::max);
        let l = limits.lookup(catalog, *provider, model);
        let token_limit = match provider {
            ProviderKind::OpenAi => l.tpm,
            ProviderKind::Anthropic => l.itpm,
        };
        rows.push(vec![
            model.clone(),
            starts.len().to_string(),
            format!("{:.0}", peak(&rpm)),
            l.rpm.map_or("-".into(), |v| v.to_string()),
            format!("{:.0}", peak(&tpm)),
            token_limit.map_or("-".into(), |v| v.to_string()),
        ]);
        if let Some(r) = l.rpm {
            request_limits.push((model.clone(), r as f64));
        }
        if let Some(t) = token_limit {
            token_limits.push((model.clone(), t as f64));
        }
        request_series.push((model.clone(), rpm));
        token_series.push((model.clone(), tpm));
    }
    let pacing_numbers = table(
        &[
            "model",
            "attempts",
            "peak requests/min",
            "RPM limit",
            "peak tokens/min",
            "token limit (TPM / ITPM)",
        ],
        &rows,
    ) + "<p class=\"note\">Rates over a sliding 60-second window (shorter runs: over the run). Limits: Apex's tier table (or the run's limits file); the servers' own are learned at run time.</p>";
    html.push_str(&figure(
        "chart-rate",
        "Requests and tokens per minute against each limit",
        line_chart(
            "requests per minute",
            "requests / min",
            &request_series,
            &request_limits,
        ) + &line_chart(
            "tokens per minute (input + output)",
            "tokens / min",
            &token_series,
            &token_limits,
        ),
        pacing_numbers,
    ));

    // Cumulative cost over time.
    let mut costs: Vec<(f64, f64)> = run
        .generations
        .iter()
        .filter_map(|g| Some((seconds(g.finished_at.as_deref()?)?, g.cost_usd?)))
        .collect();
    costs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut cumulative = vec![(0.0, 0.0)];
    for (t, c) in &costs {
        total += c;
        cumulative.push((minutes(*t, start), total));
    }
    let quarter = |q: f64| -> String {
        let t = start + span * q;
        usd(costs.iter().filter(|(f, _)| *f <= t).map(|(_, c)| c).sum())
    };
    html.push_str(&figure(
        "chart-cost",
        "Cumulative cost",
        line_chart(
            "cumulative cost",
            "USD",
            &[("cost".into(), cumulative)],
            &[],
        ),
        table(
            &["at 25%", "at 50%", "at 75%", "at the end"],
            &[vec![quarter(0.25), quarter(0.5), quarter(0.75), usd(total)]],
        ),
    ));

    // Cache hits, writes and reads per condition.
    let slugs: Vec<String> = run.conditions.iter().map(|c| c.slug.clone()).collect();
    let sum = |slug: &str, f: fn(&GenerationRow) -> u64| -> u64 {
        run.generations
            .iter()
            .filter(|g| g.condition_slug == slug && g.status == "success")
            .map(f)
            .sum()
    };
    let writes: Vec<f64> = slugs
        .iter()
        .map(|s| sum(s, |g| g.cache_write_tokens.unwrap_or(0)) as f64)
        .collect();
    let reads: Vec<f64> = slugs
        .iter()
        .map(|s| sum(s, |g| g.cache_read_tokens.unwrap_or(0)) as f64)
        .collect();
    let hits: Vec<u64> = slugs
        .iter()
        .map(|s| sum(s, |g| u64::from(g.cache_hit)))
        .collect();
    let successes: Vec<u64> = slugs.iter().map(|s| sum(s, |_| 1)).collect();
    html.push_str(&figure(
        "chart-cache",
        "Cache writes and reads per condition",
        bar_chart(
            "cache tokens per condition",
            "tokens",
            &slugs,
            &[("written", writes.clone()), ("read", reads.clone())],
        ),
        table(
            &[
                "condition",
                "cache hits",
                "successes",
                "tokens written",
                "tokens read",
            ],
            &slugs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    vec![
                        s.clone(),
                        hits[i].to_string(),
                        successes[i].to_string(),
                        format!("{:.0}", writes[i]),
                        format!("{:.0}", reads[i]),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    ));

    // Latency distributions.
    let latencies: Vec<(String, Vec<f64>)> = slugs
        .iter()
        .map(|s| {
            let mut v: Vec<f64> = run
                .generations
                .iter()
                .filter(|g| g.condition_slug == *s && g.status == "success")
                .filter_map(|g| g.latency_ms.map(|l| l as f64 / 1000.0))
                .collect();
            v.sort_by(f64::total_cmp);
            (s.clone(), v)
        })
        .collect();
    html.push_str(&figure(
        "chart-latency",
        "Latency per condition (seconds; p50 orange, p95 red)",
        latency_chart(&latencies),
        table(
            &["condition", "n", "p50 s", "p95 s", "max s"],
            &latencies
                .iter()
                .map(|(s, v)| {
                    vec![
                        s.clone(),
                        v.len().to_string(),
                        format!("{:.2}", quantile(v, 0.5)),
                        format!("{:.2}", quantile(v, 0.95)),
                        format!("{:.2}", v.last().copied().unwrap_or(0.0)),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    ));

    // Attempts and errors by class over time.
    let buckets = 20usize;
    let mut by_class: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for a in &run.attempts {
        let b = (((a.started - start) / span) * buckets as f64) as usize;
        by_class
            .entry(a.outcome.as_str())
            .or_insert_with(|| vec![0.0; buckets + 1])[b.min(buckets)] += 1.0;
    }
    let class_series: Vec<Series> = by_class
        .iter()
        .map(|(class, counts)| {
            (
                (*class).to_owned(),
                counts
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (minutes(start + span * i as f64 / buckets as f64, start), *c))
                    .collect(),
            )
        })
        .collect();
    html.push_str(&figure(
        "chart-attempts",
        "Attempts by outcome over time (errors by class)",
        line_chart(
            &format!("attempts per {:.0} s", span / buckets as f64),
            "attempts",
            &class_series,
            &[],
        ),
        table(
            &["outcome", "attempts"],
            &by_class
                .iter()
                .map(|(c, v)| vec![(*c).to_owned(), format!("{:.0}", v.iter().sum::<f64>())])
                .collect::<Vec<_>>(),
        ),
    ));
    html
}

/// The overview of one run.
fn overview(run: &RunData, catalog: &Catalog) -> String {
    let i = &run.info;
    let mut html = String::new();
    let duration = match (
        i.started_at.as_deref().and_then(seconds),
        i.finished_at.as_deref().and_then(seconds),
    ) {
        (Some(s), Some(f)) => format!("{:.1} s", f - s),
        (Some(s), None) => format!(
            "{:.1} s so far",
            jiff::Timestamp::now().as_millisecond() as f64 / 1000.0 - s
        ),
        _ => "-".into(),
    };
    let bound = run
        .estimates
        .iter()
        .map(|e| e.least_duration.as_secs_f64())
        .fold(0.0, f64::max);
    let _ = write!(
        html,
        "<dl class=\"overview\"><dt>run</dt><dd><code>{}</code></dd><dt>state</dt><dd class=\"state-{}\">{}</dd><dt>mode</dt><dd>{}</dd><dt>conditions</dt><dd>{}</dd><dt>replicates</dt><dd>{}</dd><dt>created by</dt><dd>{}</dd><dt>notes</dt><dd>{}</dd><dt>started</dt><dd>{}</dd><dt>finished</dt><dd>{}</dd><dt>duration</dt><dd>{duration} (least the limits allow: {bound:.0} s plus latencies{})</dd></dl>",
        escape(i.run_id.as_str()),
        i.state.as_str(),
        i.state.as_str(),
        if run.batch {
            "batch (two waves)"
        } else {
            "synchronous"
        },
        escape(&i.condition_slugs.join(", ")),
        i.replicates,
        escape(i.created_by.as_deref().unwrap_or("-")),
        escape(i.notes.as_deref().unwrap_or("-")),
        escape(i.started_at.as_deref().unwrap_or("-")),
        escape(i.finished_at.as_deref().unwrap_or("-")),
        if run.batch {
            "; batches take their own processing time"
        } else {
            ""
        },
    );
    let c = &i.counts;
    html.push_str(&table(
        &["pending", "running", "success", "error", "total"],
        &[vec![
            c.pending.to_string(),
            c.running.to_string(),
            c.success.to_string(),
            c.error.to_string(),
            c.total().to_string(),
        ]],
    ));
    let mut rows = Vec::new();
    let mut totals = [0.0f64; 5];
    for (condition, e) in run.conditions.iter().zip(&run.estimates) {
        let done: Vec<&GenerationRow> = run
            .generations
            .iter()
            .filter(|g| g.condition_slug == condition.slug && g.status == "success")
            .collect();
        let actual: f64 = done.iter().filter_map(|g| g.cost_usd).sum();
        let prices = catalog
            .lookup(condition.provider, &condition.model)
            .map(|m| m.prices);
        let usage = |g: &GenerationRow| apex_core::Usage {
            input_tokens: g.input_tokens.unwrap_or(0),
            cache_write_tokens: g.cache_write_tokens.unwrap_or(0),
            cache_write_1h_tokens: g.cache_write_1h_tokens.unwrap_or(0),
            cache_read_tokens: g.cache_read_tokens.unwrap_or(0),
            output_tokens: g.output_tokens.unwrap_or(0),
            reasoning_tokens: g.reasoning_tokens.unwrap_or(0),
        };
        let (synchronous, uncached) = prices.map_or((0.0, 0.0), |p| {
            done.iter().fold((0.0, 0.0), |(s, u), g| {
                let used = usage(g);
                let plain = apex_core::Usage {
                    input_tokens: used.total_input(),
                    cache_write_tokens: 0,
                    cache_write_1h_tokens: 0,
                    cache_read_tokens: 0,
                    ..used
                };
                (s + p.cost(&used), u + p.cost(&plain))
            })
        });
        let discount = prices.map_or(1.0, |p| p.batch_discount);
        let saved = if run.batch {
            uncached * discount
        } else {
            uncached
        } - actual;
        let estimate = if run.batch {
            e.batch_two_waves
        } else {
            e.with_cache
        };
        totals[0] += actual;
        totals[1] += saved;
        totals[2] += synchronous * discount;
        totals[3] += estimate.map_or(0.0, |r| r.low);
        totals[4] += estimate.map_or(0.0, |r| r.high);
        rows.push(vec![
            condition.slug.clone(),
            condition.model.clone(),
            done.len().to_string(),
            usd(actual),
            estimate.map_or("no prices".into(), |r| {
                format!("{}–{}", usd(r.low), usd(r.high))
            }),
            usd(saved),
            usd(synchronous * discount),
        ]);
    }
    rows.push(vec![
        "total".into(),
        String::new(),
        c.success.to_string(),
        usd(totals[0]),
        format!("{}–{}", usd(totals[3]), usd(totals[4])),
        usd(totals[1]),
        usd(totals[2]),
    ]);
    html.push_str(&table(
        &[
            "condition",
            "model",
            "successes",
            "cost",
            "estimate",
            "saved by caching",
            "batch price of this usage",
        ],
        &rows,
    ));
    html
}

/// One generation in the audition view.
fn card(run: &RunData, g: &GenerationRow, several_runs: bool) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<article class=\"gen status-{}\" id=\"g{}\"><header><span class=\"rep\">replicate {}</span> <span class=\"status\">{}</span>{}</header>",
        escape(&g.status),
        g.generation_id,
        g.replicate_index,
        escape(&g.status),
        if g.cache_hit {
            " <span class=\"hit\">cache hit</span>"
        } else {
            ""
        },
    );
    match g.status.as_str() {
        "success" => {
            let _ = write!(
                html,
                "<pre class=\"text\">{}</pre>",
                escape(g.response_text.as_deref().unwrap_or(""))
            );
        }
        "error" => {
            let _ = write!(
                html,
                "<p class=\"error\">{}: {}</p>",
                escape(g.error_class.as_deref().unwrap_or("error")),
                escape(g.error_message.as_deref().unwrap_or(""))
            );
        }
        other => {
            let _ = write!(
                html,
                "<p class=\"waiting\">{} — not answered yet</p>",
                escape(other)
            );
        }
    }
    let n = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    let _ = write!(
        html,
        "<footer><span>finish {}</span> <span>in {} (written {}, read {})</span> <span>out {} (reasoning {})</span> <span>{} ms</span> <span>{}</span> <span>attempts {}</span><br><span class=\"ids\">{}generation_id {} · request {}</span></footer></article>",
        escape(g.finish_reason.as_deref().unwrap_or("-")),
        n(g.input_tokens),
        n(g.cache_write_tokens),
        n(g.cache_read_tokens),
        n(g.output_tokens),
        n(g.reasoning_tokens),
        n(g.latency_ms),
        g.cost_usd.map_or("-".into(), usd),
        g.attempts,
        if several_runs {
            format!("run {} · ", escape(run.info.run_id.as_str()))
        } else {
            String::new()
        },
        g.generation_id,
        escape(g.provider_request_id.as_deref().unwrap_or("-")),
    );
    html
}

/// The audition view: per context, each (run, condition)'s replicates side
/// by side, with a filter by condition and a jump list of contexts.
fn audition(runs: &[RunData]) -> String {
    let several = runs.len() > 1;
    let mut columns: Vec<(usize, String)> = Vec::new();
    for (r, run) in runs.iter().enumerate() {
        for c in &run.conditions {
            columns.push((r, c.slug.clone()));
        }
    }
    let mut contexts: BTreeMap<(u32, String), ()> = BTreeMap::new();
    for run in runs {
        for g in &run.generations {
            contexts.insert((g.context_index, g.prompt_id.clone()), ());
        }
    }
    let label = |(r, slug): &(usize, String)| {
        if several {
            format!("{} · {slug}", &runs[*r].info.run_id.as_str()[..8])
        } else {
            slug.clone()
        }
    };
    let mut html = String::from("<nav class=\"filters\"><strong>conditions:</strong> ");
    for (i, column) in columns.iter().enumerate() {
        let _ = write!(
            html,
            "<label><input type=\"checkbox\" checked data-column=\"c{i}\"> {}</label> ",
            escape(&label(column))
        );
    }
    html.push_str("</nav><nav class=\"contexts\"><strong>contexts:</strong> ");
    for (_, prompt) in contexts.keys() {
        let _ = write!(html, "<a href=\"#ctx-{0}\">{0}</a> ", escape(prompt));
    }
    html.push_str("</nav>");
    for (_, prompt) in contexts.keys() {
        let _ = write!(
            html,
            "<section class=\"context\" id=\"ctx-{0}\"><h3>{0}</h3><div class=\"grid\">",
            escape(prompt)
        );
        for (i, column @ (r, slug)) in columns.iter().enumerate() {
            let run = &runs[*r];
            let _ = write!(
                html,
                "<div class=\"column c{i}\"><h4>{}</h4>",
                escape(&label(column))
            );
            for g in run
                .generations
                .iter()
                .filter(|g| g.prompt_id == *prompt && g.condition_slug == *slug)
            {
                html.push_str(&card(run, g, several));
            }
            html.push_str("</div>");
        }
        html.push_str("</div></section>");
    }
    html
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1400px;padding:1em 2em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}td:first-child,th:first-child{text-align:left}
dl.overview{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
figure.chart{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start;margin:1em 0;border-top:1px solid #eee;padding-top:.5em}
figure.chart figcaption{width:100%;font-weight:600}.note{font-size:.8em;color:#555;max-width:40em}
nav{margin:.5em 0;line-height:1.8}nav a{margin-right:.4em}
.grid{display:grid;grid-auto-flow:column;grid-auto-columns:minmax(260px,1fr);gap:.8em;overflow-x:auto}
.column h4{margin:.2em 0;position:sticky;top:0;background:#fff}
article.gen{border:1px solid #ccc;border-radius:4px;margin:.4em 0;padding:.4em;font-size:.85em}
article.gen header{font-weight:600}.hit{background:#dfd;padding:0 .3em;border-radius:3px}
.status-error{border-color:#c33;background:#fff6f6}.error{color:#a00}
pre.text{white-space:pre-wrap;word-wrap:break-word;max-height:24em;overflow:auto;background:#fafafa;padding:.4em;margin:.3em 0}
footer{color:#555}footer span{margin-right:.6em}.ids{font-family:monospace;font-size:.9em}
.state-finished{color:#070}.state-interrupted{color:#a00}.state-running{color:#a60}
.hidden{display:none}";

/// Filters columns by condition, then marks the page ready (tests read the
/// mark to know the script ran to its end); nothing else runs.
const SCRIPT: &str = "document.querySelectorAll('nav.filters input').forEach(function(box){box.addEventListener('change',function(){var c=box.getAttribute('data-column');document.querySelectorAll('.column.'+c).forEach(function(col){col.classList.toggle('hidden',!box.checked);});});});document.body.dataset.ready='1';";

/// The whole report of these runs, as one HTML document.
pub async fn report(
    store: &dyn Store,
    catalog: &Catalog,
    limits: &LimitTable,
    run_ids: &[RunId],
) -> Result<String> {
    let mut runs = Vec::with_capacity(run_ids.len());
    for id in run_ids {
        runs.push(load(store, catalog, id).await?);
    }
    let title = if runs.len() == 1 {
        format!("Apex run {}", run_ids[0])
    } else {
        format!(
            "Apex runs {}",
            run_ids
                .iter()
                .map(RunId::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body><h1>{}</h1><p class=\"note\">Written {} by apex {} from the ledger as it stood then{}. Every id below is a column of <code>apex_audition.generations</code> (query it with <code>apex sql</code>).</p>",
        escape(&title),
        escape(&title),
        jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S UTC"),
        env!("CARGO_PKG_VERSION"),
        if runs
            .iter()
            .any(|r| r.info.counts.pending + r.info.counts.running > 0)
        {
            " (a run still in progress shows what is stored so far)"
        } else {
            ""
        },
    );
    for run in &runs {
        let _ = write!(
            html,
            "<h2 id=\"run-{0}\">Run {0}</h2>",
            escape(run.info.run_id.as_str())
        );
        html.push_str(&overview(run, catalog));
        html.push_str(&charts(run, catalog, limits));
    }
    html.push_str("<h2 id=\"audition\">Audition</h2>");
    html.push_str(&audition(&runs));
    let _ = write!(html, "<script>{SCRIPT}</script></body></html>");
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_content_and_attributes() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn charts_draw_svg_with_their_series() {
        let chart = line_chart(
            "t",
            "y",
            &[("a".into(), vec![(0.0, 1.0), (1.0, 3.0)])],
            &[("a".into(), 5.0)],
        );
        assert!(chart.starts_with("<svg"), "{chart}");
        assert!(
            chart.contains("<polyline") || chart.contains("<path"),
            "{chart}"
        );
        let bars = bar_chart("t", "y", &["x".into()], &[("s", vec![2.0])]);
        assert!(bars.contains("<rect"), "{bars}");
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 3.0);
    }
}
