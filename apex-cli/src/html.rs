//! `apex report`: one self-contained HTML file per set of runs — overview,
//! charts (SVG drawn by plotters, each with its numbers in a table beside
//! it), and the audition view of every output. No script, style or font is
//! loaded from anywhere: the file opens from a disk or an e-mail attachment.
//! Generated text is escaped, never interpreted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write;

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
    /// The texts of the generations the audition shows.
    texts: HashMap<i64, String>,
}

async fn load(store: &dyn Store, catalog: &Catalog, run_id: &RunId) -> Result<RunData> {
    let info = store.run(run_id).await?;
    let conditions = store.run_conditions(run_id).await?;
    // The least time: at the limits the run was paced at, else the tier
    // table's.
    let paced = crate::report::paced_limit_table(&info).unwrap_or_else(LimitTable::defaults);
    let estimates = run_estimates(store, catalog, &info, &conditions, &paced).await?;
    let mut generations = Vec::new();
    let mut after = 0;
    loop {
        let page = store.generations_brief_page(run_id, after, 2000).await?;
        let Some(last) = page.last() else { break };
        after = last.generation_id;
        // Brief rows: no texts (their lengths kept), read again only for
        // the contexts the audition shows, so memory follows that budget.
        generations.extend(page.into_iter().map(|mut g| {
            // What only a card shows is read again for the cards shown:
            // a large run's rows stay small here.
            for field in [
                &mut g.finish_reason,
                &mut g.provider_request_id,
                &mut g.model_snapshot,
                &mut g.request_hash,
                &mut g.error_message,
                &mut g.started_at,
                &mut g.transport,
            ] {
                *field = None;
            }
            g.run_id = String::new();
            g.package_version = String::new();
            g.created_at = String::new();
            g
        }));
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
        texts: HashMap::new(),
    })
}

/// Reads again, whole and with their texts, the generations in `wanted`
/// (by id): those the audition shows.
async fn load_texts(store: &dyn Store, run: &mut RunData, wanted: &HashSet<i64>) -> Result<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    let position: HashMap<i64, usize> = run
        .generations
        .iter()
        .enumerate()
        .filter(|(_, g)| wanted.contains(&g.generation_id))
        .map(|(i, g)| (g.generation_id, i))
        .collect();
    // The wanted ids in runs of consecutive ids, each read as pages of its
    // own: never every answer of a large run.
    let mut ids: Vec<i64> = wanted.iter().copied().collect();
    ids.sort_unstable();
    let mut segments: Vec<(i64, i64)> = Vec::new();
    for id in ids {
        match segments.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => segments.push((id, id)),
        }
    }
    for (first, last) in segments {
        let mut after = first - 1;
        while after < last {
            let room = u32::try_from((last - after).min(500)).unwrap_or(500);
            let page = store
                .generations_page(&run.info.run_id, after, room)
                .await?;
            let Some(end) = page.last().map(|g| g.generation_id) else {
                break;
            };
            after = end;
            for mut g in page {
                if let Some(&i) = position.get(&g.generation_id) {
                    if let Some(text) = g.response_text.take() {
                        run.texts.insert(g.generation_id, text);
                    }
                    run.generations[i] = g;
                }
            }
        }
    }
    Ok(())
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

/// A number as people read it on an axis or in a table: 1.2M, 30K, 500,
/// 2.5.
fn si(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "K")
    } else {
        (v, "")
    };
    let digits = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{x:.digits$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    };
    let text = if text == "-0" { "0".to_owned() } else { text };
    format!("{text}{suffix}")
}

/// Dollars on an axis.
fn si_usd(v: f64) -> String {
    format!("${}", si(v))
}

fn hex(c: RGBColor) -> String {
    format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
}

/// The legend of a chart, in the page below it (never over the data):
/// a solid swatch per series, a dashed one per limit line.
fn legend_html(series: &[String], limits: &[String]) -> String {
    let mut html = String::from("<ul class=\"legend\">");
    for (i, name) in series.iter().enumerate() {
        let _ = write!(
            html,
            "<li><span class=\"swatch\" style=\"background:{}\"></span>{}</li>",
            hex(PALETTE[i % PALETTE.len()]),
            escape(name)
        );
    }
    for (i, name) in limits.iter().enumerate() {
        let _ = write!(
            html,
            "<li><span class=\"swatch dashed\" style=\"border-color:{}\"></span>{}</li>",
            hex(PALETTE[i % PALETTE.len()]),
            escape(name)
        );
    }
    html.push_str("</ul>");
    html
}

/// The time axis every time chart of a run shares.
#[derive(Clone, Copy)]
struct TimeAxis {
    /// Wall-clock seconds of the run's first attempt.
    start: f64,
    /// Wall-clock seconds per minute of the run's own time (60, or 60 x
    /// the time scale of a simulated run).
    minute: f64,
    /// The axis' end, in the run's minutes.
    end: f64,
}

impl TimeAxis {
    fn x(&self, t: f64) -> f64 {
        (t - self.start) / self.minute
    }

    fn label(&self) -> String {
        if (self.minute - 60.0).abs() < 1e-9 {
            "minutes since the run started".into()
        } else {
            format!(
                "minutes of the run's time (time scale {}: a minute took {} s)",
                si(self.minute / 60.0),
                si(self.minute)
            )
        }
    }
}

/// A line chart of several series over the run's time axis, with optional
/// horizontal limit lines (dashed, in their series' colours); the legend
/// goes below it, in the page.
fn line_chart(
    title: &str,
    axis: TimeAxis,
    y_label: &str,
    series: &[Series],
    limits: &[(String, f64)],
    y_format: fn(f64) -> String,
) -> String {
    let x_max = axis.end.max(1e-3);
    let data_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    // A limit far above everything drawn would flatten the data to the
    // axis: it is named in the legend instead (plainly not crossed).
    let reachable = |limit: f64| data_max <= 0.0 || limit <= 5.0 * data_max;
    let y_max = limits
        .iter()
        .map(|l| l.1)
        .filter(|l| reachable(*l))
        .fold(data_max, f64::max)
        .max(1e-9)
        * 1.1;
    let chart = svg(700, 320, |root| {
        let mut chart = axes(&root, title, (0.0..x_max, 0.0..y_max))?;
        chart
            .configure_mesh()
            .x_desc(axis.label())
            .y_desc(y_label)
            .x_label_formatter(&|x| si(*x))
            .y_label_formatter(&|y| y_format(*y))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (_, points)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?;
        }
        for (i, (_, limit)) in limits.iter().enumerate() {
            if !reachable(*limit) {
                continue;
            }
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.0, *limit), (x_max, *limit)],
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let names: Vec<String> = series.iter().map(|(n, _)| n.clone()).collect();
    let limit_names: Vec<String> = limits
        .iter()
        .map(|(n, l)| {
            if reachable(*l) {
                n.clone()
            } else {
                format!("{n}: {}, above the chart", y_format(*l))
            }
        })
        .collect();
    format!(
        "<div class=\"plotbox\">{chart}{}</div>",
        legend_html(&names, &limit_names)
    )
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

/// Grouped bars: one group per label, one bar per series; the legend
/// below it.
fn bar_chart(title: &str, y_label: &str, labels: &[String], series: &[(&str, Vec<f64>)]) -> String {
    let y_max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let groups = labels.len().max(1) as f64;
    let per = series.len().max(1) as f64;
    let chart = svg(700, 320, |root| {
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
            .y_label_formatter(&|y| si(*y))
            .y_desc(y_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (s, (_, values)) in series.iter().enumerate() {
            let color = PALETTE[s % PALETTE.len()];
            let width = 0.8 / per;
            chart
                .draw_series(values.iter().enumerate().map(|(g, v)| {
                    let x0 = g as f64 + 0.1 + s as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
                }))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let names: Vec<String> = series.iter().map(|(n, _)| (*n).to_owned()).collect();
    format!(
        "<div class=\"plotbox\">{chart}{}</div>",
        legend_html(&names, &[])
    )
}

/// The value at quantile `q` of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Latency histograms, one row per condition on one shared seconds axis,
/// with p50 and p95 marked and named in each row's title.
fn latency_chart(by_condition: &[(String, Vec<f64>)]) -> String {
    let x_max = by_condition
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(0.001)
        * 1.05;
    let rows = by_condition.len().max(1);
    let chart = svg(700, 150 * rows as u32 + 20, |root| {
        let areas = root.split_evenly((rows, 1));
        for (area, (name, values)) in areas.iter().zip(by_condition) {
            let bins = 40usize;
            let width = x_max / bins as f64;
            let mut counts = vec![0u32; bins];
            for v in values {
                counts[((v / width) as usize).min(bins - 1)] += 1;
            }
            let y_max = f64::from(*counts.iter().max().unwrap_or(&1)).max(1.0) * 1.2;
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let (p50, p95) = (quantile(&sorted, 0.5), quantile(&sorted, 0.95));
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!(
                        "{name}: {} answers, p50 {} s, p95 {} s",
                        values.len(),
                        si(p50),
                        si(p95)
                    ),
                    ("sans-serif", 14),
                )
                .margin(6)
                .x_label_area_size(34)
                .y_label_area_size(56)
                .build_cartesian_2d(0.0..x_max, 0.0..y_max)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(8)
                .y_labels(4)
                .x_label_formatter(&|x| format!("{} s", si(*x)))
                .y_label_formatter(&|y| si(*y))
                .y_desc("answers")
                .label_style(("sans-serif", 12))
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
            for (x, color) in [(p50, PALETTE[1]), (p95, PALETTE[3])] {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x, 0.0), (x, y_max)],
                        color.stroke_width(2),
                    )))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    });
    format!(
        "<div class=\"plotbox\">{chart}{}</div>",
        legend_html(&[], &[])
            .replace(
                "</ul>",
                &format!(
                    "<li><span class=\"swatch\" style=\"background:{}\"></span>p50 (median)</li><li><span class=\"swatch\" style=\"background:{}\"></span>p95</li></ul>",
                    hex(PALETTE[1]),
                    hex(PALETTE[3])
                )
            )
    )
}

/// Per model, as its limits count: the provider, when each attempt was
/// sent, and per success (sent at, tokens counted against the input-side
/// limit, output tokens).
type Demand = (ProviderKind, Vec<f64>, Vec<(f64, f64, f64)>);

/// The run's time scale (1 unless it ran against a faster simulator).
fn time_scale(info: &RunInfo) -> f64 {
    info.flags
        .get("time_scale")
        .and_then(serde_json::Value::as_f64)
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0)
}

/// The limits a model was paced at, from the run's record, whether each
/// refills as a bucket, and where they came from; the tier table (said
/// so) where the run recorded none, with Anthropic's limits as buckets (as
/// Anthropic documents them).
fn paced_limits(
    run: &RunData,
    catalog: &Catalog,
    limits: &LimitTable,
    provider: ProviderKind,
    model: &str,
) -> ([Option<u64>; 3], [bool; 3], String) {
    let key = apex_core::limiter::bucket_key(catalog, provider, model);
    let input_name = match provider {
        ProviderKind::OpenAi => "tpm",
        ProviderKind::Anthropic => "itpm",
    };
    let names = ["rpm", input_name, "otpm"];
    let default_bucket = provider == ProviderKind::Anthropic;
    if let Some(r) = run.info.flags.get("paced_limits").and_then(|p| p.get(&key)) {
        let source = r
            .get("source")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("recorded");
        return (
            names.map(|n| r.get(n).and_then(serde_json::Value::as_u64)),
            names.map(|n| {
                r.get(format!("{n}_bucket"))
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false)
            }),
            source.replace("server", "learned from the server"),
        );
    }
    let l = limits.lookup(catalog, provider, model);
    let input = match provider {
        ProviderKind::OpenAi => l.tpm,
        ProviderKind::Anthropic => l.itpm,
    };
    (
        [l.rpm, input, l.otpm],
        [default_bucket; 3],
        "tier table (the run recorded none)".into(),
    )
}

/// A bucket's level over time: what was sent fills it, it drains at its
/// limit per minute of the run's time; sampled at `samples` points.
fn bucket_levels(
    sent: &[(f64, f64)],
    limit: f64,
    axis: TimeAxis,
    samples: usize,
) -> Vec<(f64, f64)> {
    let mut sent = sent.to_vec();
    sent.sort_by(|a, b| a.0.total_cmp(&b.0));
    let drain = limit / axis.minute;
    let span = axis.end * axis.minute;
    let (mut level, mut at, mut next) = (0.0f64, axis.start, 0usize);
    let mut out = Vec::with_capacity(samples + 1);
    for i in 0..=samples {
        let t = axis.start + span * i as f64 / samples as f64;
        let mut peak = 0.0f64;
        while next < sent.len() && sent[next].0 <= t {
            level = (level - drain * (sent[next].0 - at)).max(0.0) + sent[next].1;
            at = sent[next].0;
            peak = peak.max(level);
            next += 1;
        }
        level = (level - drain * (t - at)).max(0.0);
        at = t;
        // A sample shows the highest level since the last one: a burst
        // between samples is not hidden.
        out.push((axis.x(t), peak.max(level)));
    }
    out
}

/// What a run sent in the minute up to `t` (of its own time), never before
/// its start: a run shorter than a minute shows what it sent, not a
/// rate extrapolated from it.
fn in_last_minute(times: &[(f64, f64)], t: f64, axis: TimeAxis) -> f64 {
    let from = (t - axis.minute).max(axis.start - 1e-9);
    times
        .iter()
        .filter(|(s, _)| *s > from && *s <= t)
        .map(|(_, w)| w)
        .sum()
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
    let scale = time_scale(&run.info);
    let minute = 60.0 * scale;
    let axis = TimeAxis {
        start,
        minute,
        end: ((end - start) / minute).max(1e-3),
    };
    let span = (end - start).max(1e-3);
    let samples = 240usize;
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
            let input = g.input_tokens.unwrap_or(0) + g.cache_write_tokens.unwrap_or(0);
            let output = g.output_tokens.unwrap_or(0) as f64;
            // As each limit counts at arrival: OpenAI's TPM all input
            // (cached too) and output; Anthropic's ITPM uncached input and
            // cache writes (reads are free of it), output under OTPM.
            let counted = match c.provider {
                ProviderKind::OpenAi => (input + g.cache_read_tokens.unwrap_or(0)) as f64 + output,
                ProviderKind::Anthropic => input as f64,
            };
            entry.2.push((a.started, counted, output));
        }
    }
    let mut request_series = Vec::new();
    let mut token_series = Vec::new();
    let mut request_limits = Vec::new();
    let mut token_limits = Vec::new();
    let mut rows = Vec::new();
    for (model, (provider, starts, tokens)) in &models {
        let ([rpm_limit, token_limit, otpm_limit], buckets, source) =
            paced_limits(run, catalog, limits, *provider, model);
        // As the server replenishes each limit: a window's last minute, a
        // bucket's level.
        let measure = |w: &[(f64, f64)], limit: Option<u64>, bucket: bool| -> Vec<(f64, f64)> {
            match limit {
                Some(limit) if bucket => bucket_levels(w, limit as f64, axis, samples),
                _ => (0..=samples)
                    .map(|i| {
                        let t = start + span * i as f64 / samples as f64;
                        (axis.x(t), in_last_minute(w, t, axis))
                    })
                    .collect(),
            }
        };
        let requests: Vec<(f64, f64)> = starts.iter().map(|s| (*s, 1.0)).collect();
        let counted: Vec<(f64, f64)> = tokens.iter().map(|(s, c, _)| (*s, *c)).collect();
        let output: Vec<(f64, f64)> = tokens.iter().map(|(s, _, o)| (*s, *o)).collect();
        let rpm = measure(&requests, rpm_limit, buckets[0]);
        let tpm = measure(&counted, token_limit, buckets[1]);
        let peak = |p: &[(f64, f64)]| p.iter().map(|p| p.1).fold(0.0, f64::max);
        let out_peak = peak(&measure(&output, otpm_limit, buckets[2]));
        let shown = |v: Option<u64>, bucket: bool| {
            v.map_or("-".into(), |v| {
                format!("{}{}", si(v as f64), if bucket { " (bucket)" } else { "" })
            })
        };
        rows.push(vec![
            model.clone(),
            starts.len().to_string(),
            si(peak(&rpm)),
            shown(rpm_limit, buckets[0]),
            si(peak(&tpm)),
            shown(token_limit, buckets[1]),
            if *provider == ProviderKind::Anthropic {
                si(out_peak)
            } else {
                "(in TPM)".into()
            },
            shown(otpm_limit, buckets[2]),
            source.clone(),
        ]);
        if let Some(r) = rpm_limit {
            request_limits.push((format!("{model} limit ({source})"), r as f64));
        }
        if let Some(t) = token_limit {
            token_limits.push((format!("{model} limit ({source})"), t as f64));
        }
        request_series.push((model.clone(), rpm));
        token_series.push((model.clone(), tpm));
    }
    let pacing_numbers = table(
        &[
            "model",
            "attempts",
            "highest request count",
            "RPM limit",
            "highest token count",
            "TPM / ITPM limit",
            "highest output count",
            "OTPM limit",
            "limits",
        ],
        &rows,
    ) + "<p class=\"note\">Each model's use of each limit as the server replenishes it, from the attempts' send times: for a window, what it sent in the minute up to each moment (of the run's own time); for a bucket (Anthropic's, refilled continuously), the bucket's level — what was sent, less the refill since. A line above its limit is a limit crossed. Tokens as the limits count them: OpenAI's TPM all input, cached included, and output; Anthropic's ITPM uncached input and cache writes (cache reads do not count), its output under OTPM. A run shorter than a minute shows what it sent, not an extrapolated rate. Limits: what the run was paced at, as recorded in the ledger (<code>runs.flags_json</code> → <code>paced_limits</code>).</p>";
    html.push_str(&figure(
        "chart-rate",
        "Requests and tokens against each model's limits (a window's last minute, a bucket's level)",
        line_chart(
            "requests counted against RPM",
            axis,
            "requests",
            &request_series,
            &request_limits,
            si,
        ) + &line_chart(
            "tokens counted against TPM / ITPM",
            axis,
            "tokens",
            &token_series,
            &token_limits,
            si,
        ),
        pacing_numbers,
    ));

    // Cumulative cost over the same time axis.
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
        cumulative.push((axis.x(*t), total));
    }
    cumulative.push((axis.end, total));
    let quarter = |q: f64| -> String {
        let t = start + span * q;
        usd(costs.iter().filter(|(f, _)| *f <= t).map(|(_, c)| c).sum())
    };
    html.push_str(&figure(
        "chart-cost",
        "Cost so far",
        line_chart(
            "cumulative cost (USD)",
            axis,
            "USD",
            &[("cost of the stored answers".into(), cumulative)],
            &[],
            si_usd,
        ),
        table(
            &["at 25% of the time", "at 50%", "at 75%", "at the end"],
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
        "Cache tokens written and read per condition",
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
                .filter_map(|g| g.latency_ms.map(|l| l as f64 / 1000.0 / scale))
                .collect();
            v.sort_by(f64::total_cmp);
            (s.clone(), v)
        })
        .collect();
    html.push_str(&figure(
        "chart-latency",
        &format!(
            "Latency per condition: answers by seconds from sending to the last byte{}",
            if (scale - 1.0).abs() > 1e-9 {
                format!(
                    " (of the run's time: wall seconds / time scale {})",
                    si(scale)
                )
            } else {
                String::new()
            }
        ),
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

    // Attempts by outcome and error class, per interval of the same axis.
    let buckets = 24usize;
    let interval = axis.end / buckets as f64;
    let mut by_class: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for a in &run.attempts {
        let b = ((axis.x(a.started) / interval) as usize).min(buckets - 1);
        by_class
            .entry(a.outcome.clone())
            .or_insert_with(|| vec![0.0; buckets])[b] += 1.0;
    }
    let class_series: Vec<Series> = by_class
        .iter()
        .map(|(class, counts)| {
            (
                class.clone(),
                counts
                    .iter()
                    .enumerate()
                    .map(|(i, c)| ((i as f64 + 0.5) * interval, *c))
                    .collect(),
            )
        })
        .collect();
    let interval_text = if interval >= 1.0 {
        format!("{} min", si(interval))
    } else {
        format!("{} s", si(interval * 60.0))
    };
    html.push_str(&figure(
        "chart-attempts",
        "Attempts by outcome over time",
        line_chart(
            &format!("attempts started per {interval_text} of the run's time, by outcome"),
            axis,
            "attempts",
            &class_series,
            &[],
            si,
        ),
        table(
            &["outcome", "attempts"],
            &by_class
                .iter()
                .map(|(c, v)| vec![c.clone(), format!("{:.0}", v.iter().sum::<f64>())])
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
    let scale = time_scale(i);
    // The estimate's least time is in the run's own time.
    let bound = run
        .estimates
        .iter()
        .map(|e| e.least_duration.as_secs_f64())
        .fold(0.0, f64::max)
        * scale;
    let limits_said = if i.flags.get("paced_limits").is_some() {
        "the limits it was paced at"
    } else {
        "the tier table's limits"
    };
    let _ = write!(
        html,
        "<dl class=\"overview\"><dt>state</dt><dd class=\"state-{}\">{}</dd><dt>mode</dt><dd>{}</dd><dt>conditions</dt><dd>{}</dd><dt>replicates</dt><dd>{}</dd><dt>created by</dt><dd>{}</dd><dt>notes</dt><dd>{}</dd><dt>started</dt><dd>{}</dd><dt>finished</dt><dd>{}</dd><dt>duration</dt><dd>{duration} (least {limits_said} allow: {} s plus latencies{}{})</dd></dl>",
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
        si(bound),
        if run.batch {
            "; batches take their own processing time"
        } else {
            ""
        },
        if (scale - 1.0).abs() > 1e-9 {
            format!(
                "; time scale {}: every duration is {} of the real one",
                si(scale),
                si(scale)
            )
        } else {
            String::new()
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
                escape(run.texts.get(&g.generation_id).map_or("", String::as_str))
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

/// Which contexts the audition shows, and how to see the others.
pub struct AuditionOptions {
    /// Most bytes of answers (and their cards) the page holds; the
    /// contexts that do not fit are listed with the command that shows them.
    pub budget: usize,
    /// Only contexts at these positions (1-based, inclusive) of the run's
    /// order.
    pub contexts: Option<(usize, usize)>,
}

impl Default for AuditionOptions {
    fn default() -> Self {
        Self {
            budget: 20 * 1024 * 1024,
            contexts: None,
        }
    }
}

/// A card's bytes beyond its text (markup, footer, ids).
const CARD_OVERHEAD: usize = 700;

/// Every context of the runs, in order: (context index, prompt id).
fn all_contexts(runs: &[RunData]) -> Vec<(u32, String)> {
    let mut contexts: BTreeMap<(u32, String), ()> = BTreeMap::new();
    for run in runs {
        for g in &run.generations {
            contexts.insert((g.context_index, g.prompt_id.clone()), ());
        }
    }
    contexts.into_keys().collect()
}

/// The contexts the audition shows: those in the chosen range, in order,
/// while their answers fit the budget (the first always).
fn chosen_contexts(
    runs: &[RunData],
    all: &[(u32, String)],
    options: &AuditionOptions,
) -> Vec<(u32, String)> {
    let (from, to) = options.contexts.unwrap_or((1, all.len()));
    let mut size: HashMap<&str, usize> = HashMap::new();
    for run in runs {
        for g in &run.generations {
            *size.entry(g.prompt_id.as_str()).or_default() +=
                CARD_OVERHEAD + g.response_length.unwrap_or(0) as usize;
        }
    }
    let mut used = 0usize;
    let mut chosen = Vec::new();
    for context in all
        .iter()
        .skip(from.saturating_sub(1))
        .take(to.saturating_sub(from.saturating_sub(1)))
    {
        let bytes = size.get(context.1.as_str()).copied().unwrap_or(0);
        if !chosen.is_empty() && used + bytes > options.budget {
            break;
        }
        used += bytes;
        chosen.push(context.clone());
    }
    chosen
}

/// The audition view, written as it goes: per context, each (run,
/// condition)'s replicates side by side, with a filter by condition and a
/// jump list of contexts; the contexts left out are named with the command
/// that shows them.
fn write_audition(
    out: &mut dyn Write,
    runs: &[RunData],
    all: &[(u32, String)],
    chosen: &[(u32, String)],
    options: &AuditionOptions,
) -> std::io::Result<()> {
    let several = runs.len() > 1;
    let mut columns: Vec<(usize, String)> = Vec::new();
    for (r, run) in runs.iter().enumerate() {
        for c in &run.conditions {
            columns.push((r, c.slug.clone()));
        }
    }
    let label = |(r, slug): &(usize, String)| {
        if several {
            format!("{} · {slug}", &runs[*r].info.run_id.as_str()[..8])
        } else {
            slug.clone()
        }
    };
    if chosen.len() < all.len() {
        let first = all
            .iter()
            .position(|c| Some(c) == chosen.first())
            .unwrap_or(0)
            + 1;
        let last = first + chosen.len().saturating_sub(1);
        let per_page = chosen.len().max(1);
        // The next range after these, else the one before.
        let (from, to) = if last < all.len() {
            (last + 1, (last + per_page).min(all.len()))
        } else {
            (first.saturating_sub(per_page).max(1), first - 1)
        };
        let ids: Vec<&str> = runs.iter().map(|r| r.info.run_id.as_str()).collect();
        write!(
            out,
            "<p class=\"note budget\">This page shows contexts {first}–{last} of {} ({}). The others open with <code>apex report {} --contexts {from}-{to}</code>, and so on.</p>",
            all.len(),
            if options.contexts.is_some() {
                format!(
                    "the range asked for, within {} MB of answers",
                    si(options.budget as f64 / (1024.0 * 1024.0))
                )
            } else {
                format!(
                    "to keep the page under {} MB of answers; --max-audition-mb changes that",
                    si(options.budget as f64 / (1024.0 * 1024.0))
                )
            },
            escape(&ids.join(" ")),
        )?;
    }
    write!(out, "<nav class=\"filters\"><strong>conditions:</strong> ")?;
    for (i, column) in columns.iter().enumerate() {
        write!(
            out,
            "<label><input type=\"checkbox\" checked data-column=\"c{i}\"> {}</label> ",
            escape(&label(column))
        )?;
    }
    write!(
        out,
        "</nav><nav class=\"contexts\"><strong>contexts:</strong> "
    )?;
    for (_, prompt) in chosen {
        write!(out, "<a href=\"#ctx-{0}\">{0}</a> ", escape(prompt))?;
    }
    write!(out, "</nav>")?;
    // Each context's generations, found without scanning every row per
    // context.
    let mut by_context: HashMap<(&str, usize, &str), Vec<&GenerationRow>> = HashMap::new();
    for (r, run) in runs.iter().enumerate() {
        for g in &run.generations {
            by_context
                .entry((g.prompt_id.as_str(), r, g.condition_slug.as_str()))
                .or_default()
                .push(g);
        }
    }
    for (_, prompt) in chosen {
        write!(
            out,
            "<section class=\"context\" id=\"ctx-{0}\"><h3>{0}</h3><div class=\"grid\">",
            escape(prompt)
        )?;
        for (i, column @ (r, slug)) in columns.iter().enumerate() {
            let run = &runs[*r];
            write!(
                out,
                "<div class=\"column c{i}\"><h4>{}</h4>",
                escape(&label(column))
            )?;
            for g in by_context
                .get(&(prompt.as_str(), *r, slug.as_str()))
                .map_or(&[][..], Vec::as_slice)
            {
                out.write_all(card(run, g, several).as_bytes())?;
            }
            write!(out, "</div>")?;
        }
        write!(out, "</div></section>")?;
    }
    Ok(())
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
.hidden{display:none}
section.context{content-visibility:auto;contain-intrinsic-size:auto 1600px}
.plotbox{max-width:100%}.plotbox svg{max-width:100%;height:auto;display:block}
ul.legend{list-style:none;padding:0;margin:.2em 0 .6em;font-size:.85em;display:flex;flex-wrap:wrap;gap:.3em 1.2em;max-width:700px}
.swatch{display:inline-block;width:1.6em;height:.7em;margin-right:.4em;vertical-align:middle;border-radius:2px}
.swatch.dashed{height:0;border-top:2px dashed;border-radius:0}
.numbers{overflow-x:auto;max-width:100%}
@media (max-width:700px){body{padding:.5em}td,th{padding:.15em .3em}table{display:block;overflow-x:auto;max-width:100%}}";

/// Filters columns by condition, then marks the page ready (tests read the
/// mark to know the script ran to its end); nothing else runs.
const SCRIPT: &str = "document.querySelectorAll('nav.filters input').forEach(function(box){box.addEventListener('change',function(){var c=box.getAttribute('data-column');document.querySelectorAll('.column.'+c).forEach(function(col){col.classList.toggle('hidden',!box.checked);});});});document.body.dataset.ready='1';";

/// What [`report`] wrote.
pub struct Written {
    /// Contexts in the audition, of all the runs' contexts.
    pub contexts_shown: usize,
    pub contexts_total: usize,
}

/// Writes the whole report of these runs to `out`, as one HTML document,
/// as it goes: the overview and charts of every generation, then the
/// audition of the contexts that fit `audition`'s budget.
pub async fn report(
    store: &dyn Store,
    catalog: &Catalog,
    limits: &LimitTable,
    run_ids: &[RunId],
    audition: &AuditionOptions,
    out: &mut dyn Write,
) -> Result<Written> {
    let mut runs = Vec::with_capacity(run_ids.len());
    for id in run_ids {
        runs.push(load(store, catalog, id).await?);
    }
    let all = all_contexts(&runs);
    let chosen = chosen_contexts(&runs, &all, audition);
    let shown: HashSet<&str> = chosen.iter().map(|(_, p)| p.as_str()).collect();
    for run in &mut runs {
        let wanted: HashSet<i64> = run
            .generations
            .iter()
            .filter(|g| shown.contains(g.prompt_id.as_str()))
            .map(|g| g.generation_id)
            .collect();
        load_texts(store, run, &wanted).await?;
    }
    let title = if runs.len() == 1 {
        format!("Apex run {}", run_ids[0])
    } else {
        format!("Apex: {} runs side by side", runs.len())
    };
    write!(
        out,
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
    )?;
    for run in &runs {
        if runs.len() > 1 {
            write!(
                out,
                "<h2 id=\"run-{0}\">Run {0}</h2>",
                escape(run.info.run_id.as_str())
            )?;
        } else {
            write!(out, "<h2 id=\"overview\">Overview</h2>")?;
        }
        out.write_all(overview(run, catalog).as_bytes())?;
        out.write_all(charts(run, catalog, limits).as_bytes())?;
    }
    write!(out, "<h2 id=\"audition\">Audition</h2>")?;
    write_audition(out, &runs, &all, &chosen, audition)?;
    write!(out, "<script>{SCRIPT}</script></body></html>")?;
    Ok(Written {
        contexts_shown: chosen.len(),
        contexts_total: all.len(),
    })
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
        let axis = TimeAxis {
            start: 0.0,
            minute: 60.0,
            end: 1.0,
        };
        let chart = line_chart(
            "t",
            axis,
            "y",
            &[("a".into(), vec![(0.0, 1.0), (1.0, 3.0)])],
            &[("a limit".into(), 5.0)],
            si,
        );
        assert!(chart.contains("<svg"), "{chart}");
        assert!(
            chart.contains("<polyline") || chart.contains("<path"),
            "{chart}"
        );
        // The legend is in the page, below the plot, not drawn over it.
        assert!(chart.contains("<ul class=\"legend\">"), "{chart}");
        assert!(chart.contains("a limit</li>"), "{chart}");
        let bars = bar_chart("t", "y", &["x".into()], &[("s", vec![2.0])]);
        assert!(bars.contains("<rect"), "{bars}");
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 3.0);
    }

    #[test]
    fn a_limit_far_above_the_data_is_named_not_drawn() {
        let axis = TimeAxis {
            start: 0.0,
            minute: 60.0,
            end: 1.0,
        };
        let chart = line_chart(
            "t",
            axis,
            "y",
            &[("a".into(), vec![(0.0, 1.0), (1.0, 20.0)])],
            &[("a limit".into(), 5_000.0), ("b limit".into(), 50.0)],
            si,
        );
        assert!(
            chart.contains("a limit: 5K, above the chart</li>"),
            "{chart}"
        );
        assert!(chart.contains("b limit</li>"), "{chart}");
        // The axis reaches the near limit, not the far one.
        assert!(!chart.contains(">5K<"), "{chart}");
    }

    #[test]
    fn axis_numbers_read_as_people_write_them() {
        assert_eq!(si(1_200_000.0), "1.2M");
        assert_eq!(si(30_000.0), "30K");
        assert_eq!(si(450_000.0), "450K");
        assert_eq!(si(500.0), "500");
        assert_eq!(si(2.5), "2.5");
        assert_eq!(si(0.0), "0");
        assert_eq!(si(-0.0), "0");
        assert_eq!(si_usd(12.0), "$12");
    }

    #[test]
    fn a_short_run_shows_what_it_sent_not_an_extrapolated_rate() {
        // Ten requests in the run's first 6 seconds: the minute up to any
        // moment holds at most those ten, never 10 x 60/6 = 100.
        let axis = TimeAxis {
            start: 100.0,
            minute: 60.0,
            end: 0.1,
        };
        let sent: Vec<(f64, f64)> = (0..10).map(|i| (100.0 + f64::from(i) * 0.6, 1.0)).collect();
        assert_eq!(in_last_minute(&sent, 106.0, axis), 10.0);
        assert_eq!(in_last_minute(&sent, 103.0, axis), 6.0);
        // A window of the run's own time: at time scale 0.02 a minute is
        // 1.2 s.
        let scaled = TimeAxis {
            start: 100.0,
            minute: 1.2,
            end: 5.0,
        };
        assert_eq!(in_last_minute(&sent, 105.4, scaled), 2.0);
    }
}
