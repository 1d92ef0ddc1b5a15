//! Estimates, cost reports, per-condition status and exports.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context as _, Result};
use apex_core::estimate::{ConditionEstimate, SizedPackage, estimate};
use apex_core::limiter::LimitTable;
use apex_core::tokens::Tokenizer;
use apex_core::{Catalog, Condition, ConditionUsage, PackageRef, RunId, Store};

use crate::UsageError;
use crate::table::render;

/// Dollars to four places (shared by the text and HTML reports).
pub(crate) fn usd(v: f64) -> String {
    // A difference of two equal sums can come out as -0.00000001.
    let v = if v.abs() < 0.000_05 { 0.0 } else { v };
    format!("${v:.4}")
}

/// What caching saves, `without` against `with` dollars: never a negative
/// zero or a negative saving; a plan that caching makes dearer says so.
pub(crate) fn saving(without: f64, with: f64) -> String {
    let saved = without - with;
    let percent = 100.0 * saved.abs() / without.abs().max(1e-12);
    if saved.abs() < 0.000_05 {
        "none ($0.0000)".into()
    } else if saved > 0.0 {
        format!("{} ({percent:.0}%)", usd(saved))
    } else {
        format!("none: caching costs {} more ({percent:.0}%)", usd(-saved))
    }
}

fn range(r: Option<apex_core::estimate::CostRange>) -> String {
    r.map_or_else(
        || "no prices".to_owned(),
        |r| format!("{}–{}", usd(r.low), usd(r.high)),
    )
}

/// The limits a run recorded it was paced at (`paced_limits` in its
/// flags), as a limits table; `None` when it recorded none.
pub fn paced_limit_table(run: &apex_core::RunInfo) -> Option<LimitTable> {
    let paced = run.flags.get("paced_limits")?.as_object()?;
    let mut text = String::new();
    for (key, limits) in paced {
        let (provider, model) = key.split_once('/')?;
        text.push_str(&format!(
            "[{provider}.{}]\n",
            serde_json::Value::from(model)
        ));
        for name in ["rpm", "tpm", "itpm", "otpm"] {
            if let Some(n) = limits.get(name).and_then(serde_json::Value::as_u64) {
                text.push_str(&format!("{name} = {n}\n"));
            }
        }
    }
    LimitTable::with_file(&text).ok()
}

/// Loads the planned packages and counts their tokens under both tokenizers
/// (the exact `o200k_base` count read from the ledger where ingest kept it,
/// and only where an OpenAI condition needs it: it is the slow one).
pub async fn sized(
    store: &dyn Store,
    packages: &[PackageRef],
    conditions: &[Condition],
) -> Result<Vec<SizedPackage>> {
    let openai = conditions
        .iter()
        .any(|c| c.provider == apex_core::ProviderKind::OpenAi);
    let mut out = Vec::with_capacity(packages.len());
    for p in packages {
        let stored = if openai {
            store.o200k_split(&p.id, &p.version).await?
        } else {
            Some((0, 0))
        };
        let package = store.package(&p.id, &p.version).await?;
        let (o200k, est) = tokio::task::spawn_blocking(move || {
            (
                stored.unwrap_or_else(|| Tokenizer::O200k.split(&package)),
                Tokenizer::Estimate.split(&package),
            )
        })
        .await
        .context("counting tokens")?;
        out.push(SizedPackage {
            package: p.clone(),
            o200k,
            estimate: est,
        });
    }
    Ok(out)
}

/// Computes and prints the estimate of a plan.
pub async fn print_estimate(
    store: &dyn Store,
    catalog: &Catalog,
    limits: &LimitTable,
    conditions: &[Condition],
    packages: &[PackageRef],
    replicates: u32,
    cache: bool,
) -> Result<Vec<ConditionEstimate>> {
    let sized = sized(store, packages, conditions).await?;
    let estimates = estimate(catalog, limits, conditions, &sized, replicates, cache);
    let mut rows = Vec::new();
    let (mut low, mut high, mut base_low, mut base_high) = (0.0, 0.0, 0.0, 0.0);
    for e in &estimates {
        let per_context = {
            let min = e
                .input_tokens_per_context
                .iter()
                .min()
                .copied()
                .unwrap_or(0);
            let max = e
                .input_tokens_per_context
                .iter()
                .max()
                .copied()
                .unwrap_or(0);
            if min == max {
                min.to_string()
            } else {
                format!("{min}–{max}")
            }
        };
        let saving = match (e.with_cache, e.without_cache) {
            (Some(w), Some(n)) => {
                low += w.low;
                high += w.high;
                base_low += n.low;
                base_high += n.high;
                if cache && !apex_core::plan::sends_cache_hints(cache, replicates) {
                    "none: one replicate is sent without cache hints".into()
                } else {
                    saving(n.low, w.low)
                }
            }
            _ => "-".into(),
        };
        rows.push(vec![
            e.slug.clone(),
            e.requests.to_string(),
            format!("{per_context} ({})", e.tokenizer.name()),
            e.usage.cache_write_tokens.to_string(),
            e.usage.cache_read_tokens.to_string(),
            e.usage.input_tokens.to_string(),
            range(e.with_cache),
            range(e.without_cache),
            saving,
            range(e.batch),
            range(e.batch_two_waves),
            format!("{:.0}s", e.least_duration.as_secs_f64()),
        ]);
    }
    let columns = [
        "condition",
        "requests",
        "input tokens per context",
        "cache_write",
        "cache_read",
        "uncached_input",
        "cost (cached)",
        "cost (no cache)",
        "saving",
        "batch (one wave)",
        "batch (two waves)",
        "least duration",
    ];
    println!(
        "estimate ({replicates} replicate(s); cost ranges run from no output to max_tokens on every request):"
    );
    print!("{}", render(&columns.map(String::from), &rows));
    let sum = |f: fn(&ConditionEstimate) -> Option<apex_core::estimate::CostRange>| {
        estimates
            .iter()
            .filter_map(f)
            .fold((0.0, 0.0), |(l, h), r| (l + r.low, h + r.high))
    };
    let (batch_low, batch_high) = sum(|e| e.batch_two_waves);
    println!(
        "total: {}–{} with caching, {}–{} without, {}–{} in batches of two waves (--batch); least duration {:.0}s plus request latencies (synchronous; batches take minutes to hours)",
        usd(low),
        usd(high),
        usd(base_low),
        usd(base_high),
        usd(batch_low),
        usd(batch_high),
        estimates
            .iter()
            .map(|e| e.least_duration.as_secs_f64())
            .fold(0.0, f64::max)
    );
    Ok(estimates)
}

/// Whether a run was started with `--batch` (as its recorded flags say).
pub fn is_batch_run(run: &apex_core::RunInfo) -> bool {
    run.flags.get("batch") == Some(&serde_json::Value::Bool(true))
}

/// Apex's estimate of a recorded run: its conditions over the package
/// versions it sent, with the caching it recorded.
pub async fn run_estimates(
    store: &dyn Store,
    catalog: &Catalog,
    run: &apex_core::RunInfo,
    conditions: &[Condition],
    limits: &LimitTable,
) -> Result<Vec<ConditionEstimate>> {
    let run_id = &run.run_id;
    // The packages this run sent, for the estimate beside the actual.
    let versions = store.run_packages(run_id).await?;
    let current: HashMap<(String, String), PackageRef> = store
        .current_packages()
        .await?
        .into_iter()
        .map(|p| ((p.id.clone(), p.version.clone()), p))
        .collect();
    let mut refs = Vec::new();
    for key in versions {
        let package = match current.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = store.package(&key.0, &key.1).await?;
                // Exact counts of a large context take a moment: off the
                // async threads.
                let o200k_tokens = tokio::task::spawn_blocking(move || {
                    let (prefix, rest) = Tokenizer::O200k.split(&p);
                    (
                        prefix + rest,
                        p.estimated_input_tokens(),
                        p.byte_len() as u64,
                    )
                })
                .await
                .context("counting tokens")?;
                PackageRef {
                    id: key.0.clone(),
                    version: key.1.clone(),
                    estimated_tokens: o200k_tokens.1,
                    byte_len: o200k_tokens.2,
                    o200k_tokens: o200k_tokens.0,
                }
            }
        };
        refs.push(package);
    }
    let cache = match run.flags.get("no_cache") {
        None => true,
        Some(serde_json::Value::Bool(no_cache)) => !no_cache,
        Some(other) => {
            return Err(apex_core::Error::Corrupt(format!(
                "run {run_id} records no_cache as {other}, not true or false; the ledger was edited by hand"
            ))
            .into());
        }
    };
    let sized = sized(store, &refs, conditions).await?;
    Ok(estimate(
        catalog,
        limits,
        conditions,
        &sized,
        run.replicates,
        cache,
    ))
}

/// `apex cost RUN_ID`.
pub async fn cost(store: &dyn Store, catalog: &Catalog, run_id: &RunId) -> Result<()> {
    let run = store.run(run_id).await?;
    let conditions = store.run_conditions(run_id).await?;
    let usage = store.usage_by_condition(run_id).await?;
    let by_slug: HashMap<&str, &ConditionUsage> = usage
        .iter()
        .map(|u| (u.condition_slug.as_str(), u))
        .collect();
    let batch_run = is_batch_run(&run);
    // The estimate of what this run did: in two waves of batches, or
    // synchronously with caching.
    let expected = |e: &ConditionEstimate| {
        if batch_run {
            e.batch_two_waves
        } else {
            e.with_cache
        }
    };
    let estimates = run_estimates(store, catalog, &run, &conditions, &LimitTable::none()).await?;

    let mut table = Vec::new();
    let mut total = 0.0;
    for (c, e) in conditions.iter().zip(&estimates) {
        let Some(r) = by_slug.get(c.slug.as_str()) else {
            table.push(vec![
                c.slug.clone(),
                "0".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                usd(0.0),
                "-".into(),
                range(expected(e)),
            ]);
            continue;
        };
        let Some(prices) = catalog.lookup(c.provider, &c.model).map(|m| m.prices) else {
            table.push(vec![
                c.slug.clone(),
                r.generations.to_string(),
                "no prices".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
                usd(r.cost_usd),
                "".into(),
                "-".into(),
            ]);
            continue;
        };
        let u = &r.usage;
        let (input, write, write_1h, read, output, reasoning) = (
            u.input_tokens as f64,
            u.cache_write_tokens as f64,
            u.cache_write_1h_tokens as f64,
            u.cache_read_tokens as f64,
            u.output_tokens as f64,
            u.reasoning_tokens as f64,
        );
        let m = 1e6;
        let uncached = input * prices.input / m;
        let writes =
            ((write - write_1h) * prices.cache_write_5m + write_1h * prices.cache_write_1h) / m;
        let reads = read * prices.cache_read / m;
        let reasoning_cost = reasoning * prices.output / m;
        let visible = (output - reasoning) * prices.output / m;
        let actual = r.cost_usd;
        let synchronous = uncached + writes + reads + reasoning_cost + visible;
        let batch_price = synchronous * prices.batch_discount;
        // Caching's saving against the same run's own price list: a batch
        // run is compared at batch prices.
        let discount = if batch_run {
            prices.batch_discount
        } else {
            1.0
        };
        let without_caching =
            ((input + write + read) * prices.input / m + output * prices.output / m) * discount;
        total += actual;
        let fits = expected(e).is_some_and(|range| range.contains(actual));
        table.push(vec![
            c.slug.clone(),
            r.generations.to_string(),
            usd(uncached),
            usd(writes),
            usd(reads),
            usd(reasoning_cost),
            usd(visible),
            usd(synchronous),
            usd(batch_price),
            usd(actual),
            saving(without_caching, actual),
            format!(
                "{}{}",
                range(expected(e)),
                if fits { "" } else { " (outside)" }
            ),
        ]);
    }
    let columns = [
        "condition",
        "generations",
        "uncached input",
        "cache writes",
        "cache reads",
        "reasoning",
        "visible output",
        "synchronous price",
        "batch price",
        "total",
        "saved by caching",
        "estimate",
    ];
    println!(
        "run {run_id}: cost of successful generations{} (the parts at synchronous prices; the batch price of the same usage beside them)",
        if batch_run { ", sent in batches" } else { "" }
    );
    print!("{}", render(&columns.map(String::from), &table));
    println!("total {}", usd(total));
    Ok(())
}

/// Per-condition latency, tokens and cost under the seed's tables.
pub async fn condition_summary(store: &dyn Store, run_id: &RunId) -> Result<()> {
    let mut table: Vec<Vec<String>> = Vec::new();
    for u in store.usage_by_condition(run_id).await? {
        // The same ranks as a sorted list's percentile: ceil(p/100 × n).
        let at = |p: f64| ((p / 100.0) * u.generations as f64).ceil().max(1.0) as u64 - 1;
        let mut percentiles = Vec::with_capacity(2);
        for p in [50.0, 95.0] {
            let ms = store
                .success_latency_at(run_id, &u.condition_slug, at(p))
                .await?;
            percentiles.push(ms.map_or_else(|| "-".to_owned(), |ms| ms.to_string()));
        }
        table.push(vec![
            u.condition_slug.clone(),
            u.generations.to_string(),
            percentiles[0].clone(),
            percentiles[1].clone(),
            u.usage.input_tokens.to_string(),
            u.usage.cache_write_tokens.to_string(),
            u.usage.cache_read_tokens.to_string(),
            u.usage.output_tokens.to_string(),
            usd(u.cost_usd),
        ]);
    }
    if !table.is_empty() {
        println!();
        let columns = [
            "condition",
            "success",
            "p50_ms",
            "p95_ms",
            "input",
            "cache_write",
            "cache_read",
            "output",
            "cost",
        ];
        print!("{}", render(&columns.map(String::from), &table));
    }
    Ok(())
}

/// `apex export`: pages of 500 rows, written as they arrive.
pub async fn export(
    store: &dyn Store,
    run_id: &RunId,
    format: &str,
    output: Option<&Path>,
) -> Result<u64> {
    if !matches!(format, "jsonl" | "csv") {
        return Err(UsageError(format!(
            "--format `{format}` is not supported; use jsonl or csv"
        ))
        .into());
    }
    store.run(run_id).await?;
    let sink: Box<dyn Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    enum Out {
        Csv(Box<csv::Writer<Box<dyn Write>>>),
        Jsonl(Box<dyn Write>),
    }
    let mut out = if format == "csv" {
        Out::Csv(Box::new(csv::Writer::from_writer(sink)))
    } else {
        Out::Jsonl(sink)
    };
    let mut after = 0;
    let mut written = 0;
    loop {
        let page = store.generations_page(run_id, after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.generation_id;
        for row in &page {
            match &mut out {
                Out::Csv(w) => w.serialize(row).context("writing csv")?,
                Out::Jsonl(w) => {
                    serde_json::to_writer(&mut *w, row).context("writing jsonl")?;
                    w.write_all(b"\n")?;
                }
            }
            written += 1;
        }
    }
    match out {
        Out::Csv(mut w) => w.flush()?,
        Out::Jsonl(mut w) => w.flush()?,
    }
    Ok(written)
}

#[cfg(test)]
mod saving_tests {
    use super::saving;

    #[test]
    fn a_saving_is_never_negative_and_a_dearer_plan_says_so() {
        assert_eq!(saving(1.0, 0.49), "$0.5100 (51%)");
        assert_eq!(saving(1.0, 1.0), "none ($0.0000)");
        assert_eq!(saving(1.0, 1.000_01), "none ($0.0000)");
        assert_eq!(saving(0.0, 0.0), "none ($0.0000)");
        assert_eq!(saving(1.0, 1.25), "none: caching costs $0.2500 more (25%)");
    }
}
