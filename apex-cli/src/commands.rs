//! One function per subcommand.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use apex::{Apex, RunSpec};
use apex_core::executor::RunOptions;
use apex_core::limiter::LimitTable;
use apex_core::{Catalog, Condition, Plan, PlanOptions, ProviderKind, RunId, RunInfo, Store};
use apex_providers::ProviderConfig;
use apex_providers::simulator::{
    LimitRules, Replenish, Simulator, SimulatorConfig, TokenCount, parse_limits, published_tiers,
};
use apex_store::files::{read_conditions_file, read_packages_under};
use apex_store::{DEFAULT_DATABASE_URL, open_store};

use crate::UsageError;
use crate::args::{
    Cli, Command, ConditionsSub, EstimateCmd, MakeContextsCmd, ModelsCmd, ReportCmd, RunCmd,
    SimulateCmd,
};
use crate::exit;
use crate::progress::RunProgress;
use crate::report;
use crate::table::{render, render_query};

pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let url = cli
        .database_url
        .or_else(|| std::env::var("APEX_DATABASE_URL").ok())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let command = match cli.command {
        Command::Simulate(cmd) => return simulate(cmd).await,
        Command::Models(cmd) => return models(&cmd),
        Command::MakeContexts(cmd) => return make_contexts(&cmd),
        other => other,
    };
    let store = open_store(&url).await?;
    match command {
        Command::Conditions(c) => match c.command {
            ConditionsSub::Register(r) => register(&*store, Path::new(&r.file)).await,
            ConditionsSub::List(_) => list_conditions(&*store).await,
        },
        Command::Ingest(i) => ingest(&*store, Path::new(&i.dir)).await,
        Command::Run(r) => run(store, r).await,
        Command::Status(s) => status(&*store, &s.run_id).await,
        Command::Runs(_) => runs(&*store).await,
        Command::Simulate(_) | Command::Models(_) | Command::MakeContexts(_) => {
            unreachable!("handled before the store opens")
        }
        Command::Estimate(e) => estimate_cmd(store, e).await,
        Command::Cancel(c) => cancel(store, &c.run_id).await,
        Command::Report(r) => html_report(&*store, r).await,
        Command::Cost(c) => {
            let catalog = load_catalog(c.catalog.as_deref())?;
            report::cost(&*store, &catalog, &RunId::parse(&c.run_id)?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Export(e) => {
            let run_id = RunId::parse(&e.run_id)?;
            let n = report::export(
                &*store,
                &run_id,
                &e.format,
                e.output.as_deref().map(Path::new),
            )
            .await?;
            if e.output.is_some() {
                println!("exported {n} generation(s)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sql(q) => {
            let result = store.query_read_only(&q.query).await?;
            print!("{}", render_query(&result));
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn register(store: &dyn Store, file: &Path) -> Result<ExitCode> {
    let conditions = read_conditions_file(file)?;
    let report = store.register_conditions(&conditions).await?;
    for slug in &report.added {
        println!("added      {slug}");
    }
    for slug in &report.updated {
        println!("updated    {slug} (not yet used by a run)");
    }
    for slug in &report.unchanged {
        println!("unchanged  {slug}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `apex models`: the catalog as a table, with each model's status today.
fn models(cmd: &ModelsCmd) -> Result<ExitCode> {
    let catalog = load_catalog(cmd.catalog.as_deref())?;
    let provider = match cmd.provider.as_deref() {
        None => None,
        Some(name) => Some(ProviderKind::parse(name).ok_or_else(|| {
            UsageError(format!(
                "--provider `{name}` is not a provider; use openai or anthropic"
            ))
        })?),
    };
    let today = jiff::Timestamp::now().strftime("%Y-%m-%d").to_string();
    let money = |v: f64| format!("{v}");
    let tokens = |n: u64| {
        if n >= 1_000_000 && n.is_multiple_of(10_000) {
            format!("{}M", n as f64 / 1e6)
        } else if n.is_multiple_of(1000) {
            format!("{}K", n / 1000)
        } else {
            n.to_string()
        }
    };
    let mut rows = Vec::new();
    for m in catalog.models() {
        let status = m.status(&today);
        if provider.is_some_and(|p| p != m.provider)
            || (status == apex_core::catalog::Status::Retired && !cmd.all)
        {
            continue;
        }
        let lifecycle = match (&m.deprecated_on, &m.retires_on) {
            (_, Some(r)) if status == apex_core::catalog::Status::Retired => format!("on {r}"),
            (_, Some(r)) => format!("retires {r}"),
            (Some(d), None) if status != apex_core::catalog::Status::Current => {
                format!("since {d}")
            }
            _ => String::new(),
        };
        rows.push(vec![
            m.provider.to_string(),
            m.ids.join(", "),
            tokens(m.context_window),
            tokens(m.max_output),
            money(m.prices.input),
            format!(
                "{} / {}",
                money(m.prices.cache_write_5m),
                money(m.prices.cache_write_1h)
            ),
            money(m.prices.cache_read),
            money(m.prices.output),
            money(m.prices.batch_discount),
            format!("{} {lifecycle}", status.as_str()).trim().to_owned(),
        ]);
    }
    let columns = [
        "provider",
        "model",
        "window",
        "output",
        "input $/M",
        "cache write $/M (short / long TTL)",
        "cache read $/M",
        "output $/M",
        "batch ×",
        "status",
    ];
    print!("{}", render(&columns.map(String::from), &rows));
    println!(
        "status as of {today}; sources in the catalog file (apex-core/src/catalog.toml); long-context rates and accepted parameters there too"
    );
    Ok(ExitCode::SUCCESS)
}

/// The parameters beyond the common columns, as the conditions file names
/// them (`-` for none).
fn condition_options(c: &Condition) -> String {
    let mut options = Vec::new();
    if !c.api.is_chat() {
        options.push(format!("api={}", c.api.as_str()));
    }
    match (c.thinking, c.thinking_budget) {
        (Some(mode), Some(budget)) => options.push(format!("thinking={}({budget})", mode.as_str())),
        (Some(mode), None) => options.push(format!("thinking={}", mode.as_str())),
        _ => {}
    }
    if c.stream {
        options.push("stream".into());
    }
    if let Some(store) = c.store {
        options.push(format!("store={store}"));
    }
    if options.is_empty() {
        "-".into()
    } else {
        options.join(" ")
    }
}

async fn list_conditions(store: &dyn Store) -> Result<ExitCode> {
    let rows: Vec<Vec<String>> = store
        .conditions()
        .await?
        .into_iter()
        .map(|info| {
            let c = info.condition;
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            let options = condition_options(&c);
            vec![
                c.slug,
                c.provider.to_string(),
                c.model,
                opt(c.temperature.map(|t| t.to_string())),
                opt(c.top_p.map(|t| t.to_string())),
                c.max_tokens.to_string(),
                opt(c.reasoning_effort),
                options,
                info.runs.to_string(),
            ]
        })
        .collect();
    let columns = [
        "slug",
        "provider",
        "model",
        "temperature",
        "top_p",
        "max_tokens",
        "reasoning_effort",
        "options",
        "runs",
    ];
    print!("{}", render(&columns.map(String::from), &rows));
    Ok(ExitCode::SUCCESS)
}

async fn ingest(store: &dyn Store, dir: &Path) -> Result<ExitCode> {
    let packages = read_packages_under(dir)?;
    let report = store.ingest_packages(&packages).await?;
    for id in &report.added {
        println!("added        {id}");
    }
    for (id, old, new) in &report.new_versions {
        println!("new version  {id} ({} -> {})", short(old), short(new));
    }
    for id in &report.unchanged {
        println!("unchanged    {id}");
    }
    println!(
        "{} package(s): {} added, {} new version(s), {} unchanged",
        packages.len(),
        report.added.len(),
        report.new_versions.len(),
        report.unchanged.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// The first 12 characters of a version, whatever its length.
fn short(version: &str) -> &str {
    version
        .char_indices()
        .nth(12)
        .map_or(version, |(end, _)| &version[..end])
}

fn check_run_flags(cmd: &RunCmd) -> Result<()> {
    let usage = |m: &str| Err(UsageError(m.to_owned()).into());
    if cmd.register_only && cmd.ingest.is_none() {
        return usage("--register-only needs --ingest DIR");
    }
    if cmd.batch && cmd.verify_first {
        return usage(
            "--verify-first sends single requests before the batch; with --batch the leader batch stops a failing condition before its followers go: drop one of them",
        );
    }
    if cmd.retry_errors && cmd.resume.is_none() {
        return usage("--retry-errors needs --resume RUN_ID");
    }
    if cmd.resume.is_some()
        && (!cmd.condition_slug.is_empty()
            || cmd.replicates.is_some()
            || cmd.limit.is_some()
            || cmd.dry_run
            || cmd.ingest.is_some())
    {
        return usage(
            "--resume takes the run's own conditions, contexts and replicates; drop --condition-slug, --replicates, --limit, --ingest and --dry-run",
        );
    }
    if cmd.resume.is_none() && cmd.condition_slug.is_empty() && !cmd.register_only {
        return usage("give --condition-slug SLUG (repeat it for several), or --resume RUN_ID");
    }
    if let Some(f) = cmd.time_scale
        && !(f.is_finite() && f > 0.0)
    {
        return usage("--time-scale must be a number above 0");
    }
    if cmd.concurrency == Some(0) {
        return usage("--concurrency must be at least 1");
    }
    if cmd.workers == Some(0) {
        return usage("--workers must be at least 1");
    }
    if cmd.replicates == Some(0) {
        return usage("--replicates must be at least 1");
    }
    if cmd.limit == Some(0) {
        return usage("--limit must be at least 1 (leave it out for every context)");
    }
    if let Some(secs) = cmd.request_timeout
        && !(secs.is_finite() && secs > 0.0)
    {
        return usage("--request-timeout must be a number of seconds above 0");
    }
    if let Some(secs) = cmd.stream_idle_timeout
        && !(secs.is_finite() && secs > 0.0)
    {
        return usage("--stream-idle-timeout must be a number of seconds above 0");
    }
    if cmd.claim_timeout == Some(0) {
        return usage("--claim-timeout must be at least 1 second");
    }
    Ok(())
}

async fn resolve_conditions(store: &dyn Store, slugs: &[String]) -> Result<Vec<Condition>> {
    let mut conditions = Vec::with_capacity(slugs.len());
    for slug in slugs {
        conditions.push(store.condition(slug).await?);
    }
    Ok(conditions)
}

fn load_catalog(path: Option<&str>) -> Result<Catalog> {
    match path {
        None => Ok(Catalog::built_in()),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| apex_core::Error::CatalogFile(format!("cannot read `{path}`: {e}")))?;
            Ok(Catalog::with_overrides(&text).map_err(|e| match e {
                apex_core::Error::CatalogFile(m) => {
                    apex_core::Error::CatalogFile(format!("{path}: {m}"))
                }
                other => other,
            })?)
        }
    }
}

/// The account's per-minute limits: the defaults with `--limits FILE` laid
/// over them, or none with `--no-rate-limiting`. Read once per command.
fn load_limits(path: Option<&str>, no_rate_limiting: bool) -> Result<LimitTable> {
    if no_rate_limiting {
        return Ok(LimitTable::none());
    }
    let Some(path) = path else {
        return Ok(LimitTable::defaults());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| apex_core::Error::LimitsFile(format!("cannot read `{path}`: {e}")))?;
    Ok(LimitTable::with_file(&text).map_err(|e| match e {
        apex_core::Error::LimitsFile(m) => apex_core::Error::LimitsFile(format!("{path}: {m}")),
        other => other,
    })?)
}

/// How this process executes: the library's defaults, with what the
/// command line (or the run's record) sets; `limits` are the account's,
/// shared here among `--workers` processes.
fn run_options(cmd: &RunCmd, limits: LimitTable) -> RunOptions {
    let defaults = RunOptions::default();
    let secs = std::time::Duration::from_secs;
    RunOptions {
        concurrency: cmd.concurrency.unwrap_or(defaults.concurrency),
        max_retries: cmd.max_retries.unwrap_or(defaults.max_retries),
        cache: !cmd.no_cache,
        verify_first: cmd.verify_first,
        time_scale: cmd.time_scale.unwrap_or(defaults.time_scale),
        limits: limits.shared_by(cmd.workers.unwrap_or(1)),
        claim_timeout: cmd.claim_timeout.map_or(defaults.claim_timeout, secs),
        ledger_patience: cmd.ledger_timeout.map_or(defaults.ledger_patience, secs),
        batch: cmd.batch,
        ..defaults
    }
}

/// The options a run records that a resume restores: pacing, retries,
/// caching, files, timeouts. (Its conditions, contexts and replicates are
/// the run's own; `--verify-first` was for its start.)
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(default)]
struct RecordedOptions {
    batch: bool,
    max_retries: Option<u32>,
    no_cache: bool,
    no_rate_limiting: bool,
    limits: Option<String>,
    workers: Option<u32>,
    claim_timeout: Option<u64>,
    catalog: Option<String>,
    concurrency: Option<usize>,
    time_scale: Option<f64>,
    request_timeout: Option<f64>,
    stream_idle_timeout: Option<f64>,
    ledger_timeout: Option<u64>,
}

/// A resume runs with the options its run recorded; a flag given to the
/// resume overrides the recorded one and is recorded in turn.
async fn restore_options(store: &dyn Store, cmd: &mut RunCmd, run_id: &RunId) -> Result<()> {
    let mut flags = store.run(run_id).await?.flags;
    let recorded: RecordedOptions = serde_json::from_value(flags.clone()).map_err(|e| {
        // serde does not say which field: find the option that fails alone.
        let field = flags.as_object().and_then(|all| {
            all.iter()
                .find(|(k, v)| {
                    serde_json::from_value::<RecordedOptions>(serde_json::json!({ *k: v })).is_err()
                })
                .map(|(k, _)| format!("`{k}`: "))
        });
        apex_core::Error::Corrupt(format!(
            "run {run_id} records options this apex cannot read ({}{e}); the ledger was edited by hand",
            field.unwrap_or_default()
        ))
    })?;
    cmd.max_retries = cmd.max_retries.or(recorded.max_retries);
    cmd.no_cache |= recorded.no_cache;
    cmd.batch |= recorded.batch;
    cmd.no_rate_limiting |= recorded.no_rate_limiting;
    cmd.limits = cmd.limits.take().or(recorded.limits);
    cmd.workers = cmd.workers.or(recorded.workers);
    cmd.claim_timeout = cmd.claim_timeout.or(recorded.claim_timeout);
    cmd.catalog = cmd.catalog.take().or(recorded.catalog);
    cmd.concurrency = cmd.concurrency.or(recorded.concurrency);
    cmd.time_scale = cmd.time_scale.or(recorded.time_scale);
    cmd.request_timeout = cmd.request_timeout.or(recorded.request_timeout);
    cmd.stream_idle_timeout = cmd.stream_idle_timeout.or(recorded.stream_idle_timeout);
    cmd.ledger_timeout = cmd.ledger_timeout.or(recorded.ledger_timeout);
    let now = RecordedOptions {
        batch: cmd.batch,
        max_retries: cmd.max_retries,
        no_cache: cmd.no_cache,
        no_rate_limiting: cmd.no_rate_limiting,
        limits: cmd.limits.clone(),
        workers: cmd.workers,
        claim_timeout: cmd.claim_timeout,
        catalog: cmd.catalog.clone(),
        concurrency: cmd.concurrency,
        time_scale: cmd.time_scale,
        request_timeout: cmd.request_timeout,
        stream_idle_timeout: cmd.stream_idle_timeout,
        ledger_timeout: cmd.ledger_timeout,
    };
    if let (Some(flags), serde_json::Value::Object(now)) = (
        flags.as_object_mut(),
        serde_json::to_value(now).context("recording the flags")?,
    ) {
        flags.extend(now);
    }
    store.set_run_flags(run_id, &flags).await?;
    Ok(())
}

async fn run(store: Arc<dyn Store>, mut cmd: RunCmd) -> Result<ExitCode> {
    check_run_flags(&cmd)?;
    if let Some(id) = &cmd.resume {
        let run_id = RunId::parse(id)?;
        // A finished run has nothing to send: say so before asking for
        // keys or checking conditions.
        let counts = store.run(&run_id).await?.counts;
        let recovery = Path::new(&format!("apex-recovery-{run_id}.jsonl")).exists();
        if counts.pending + counts.running == 0
            && (counts.error == 0 || !cmd.retry_errors)
            && !recovery
            && store.open_batches(&run_id).await?.is_empty()
        {
            println!(
                "run {run_id}: nothing to do ({} success, {} error{})",
                counts.success,
                counts.error,
                if counts.error > 0 {
                    "; --retry-errors sends the errors again"
                } else {
                    ""
                }
            );
            return Ok(ExitCode::SUCCESS);
        }
        restore_options(&*store, &mut cmd, &run_id).await?;
    }
    if let Some(dir) = &cmd.ingest {
        ingest(&*store, Path::new(dir)).await?;
        if cmd.register_only {
            // Still name an unknown slug now rather than at run time.
            resolve_conditions(&*store, &cmd.condition_slug).await?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    let limits = load_limits(cmd.limits.as_deref(), cmd.no_rate_limiting)?;
    // A request that never answers is abandoned (and retried) after this
    // long; a simulator running F times faster waits F times less.
    let request_timeout = apex_core::time::scaled(
        cmd.request_timeout.map_or(
            ProviderConfig::DEFAULT_REQUEST_TIMEOUT,
            std::time::Duration::from_secs_f64,
        ),
        cmd.time_scale.unwrap_or(1.0),
    );
    let stream_idle_timeout = apex_core::time::scaled(
        cmd.stream_idle_timeout.map_or(
            ProviderConfig::DEFAULT_STREAM_IDLE_TIMEOUT,
            std::time::Duration::from_secs_f64,
        ),
        cmd.time_scale.unwrap_or(1.0),
    );
    let apex = Apex::new(Arc::clone(&store))
        .with_catalog(load_catalog(cmd.catalog.as_deref())?)
        .with_limits(limits.clone())
        .with_request_timeout(request_timeout)
        .with_stream_idle_timeout(stream_idle_timeout);
    let resume = cmd.resume.as_deref().map(RunId::parse).transpose()?;
    let spec = RunSpec {
        conditions: cmd.condition_slug.clone(),
        replicates: cmd.replicates.unwrap_or(1),
        limit: cmd.limit,
        created_by: cmd.created_by.clone(),
        notes: cmd.notes.clone(),
        flags: serde_json::to_value(&cmd).context("recording the flags")?,
        allow_retired: cmd.allow_retired,
    };
    if cmd.dry_run {
        return dry_run(&apex, &spec, &limits, !cmd.no_cache).await;
    }
    let options = run_options(&cmd, limits);
    let progress = Arc::new(RunProgress::new(
        std::time::Duration::from_secs(10),
        resume.is_some(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let batch_mode = cmd.batch;
    let (ledger, view) = (Arc::clone(&store), Arc::clone(&progress));
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            if batch_mode {
                tracing::warn!("interrupted: the batches keep running at the provider");
            } else {
                tracing::warn!(
                    "interrupted: finishing the requests in flight; press Ctrl-C again to exit at once"
                );
            }
            let _ = stop_tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                // One write, so `apex runs` tells the truth; bounded, since
                // the user asked to leave now.
                if let Some(run_id) = view.run_id() {
                    let recorded = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        ledger.set_run_state(&run_id, apex_core::RunState::Interrupted),
                    )
                    .await;
                    if !matches!(recorded, Ok(Ok(()))) {
                        eprintln!("warning: could not record the run as interrupted");
                    }
                }
                eprintln!(
                    "error: interrupted twice; exiting now (generations in flight stay `running` and are sent again by --resume)"
                );
                std::process::exit(i32::from(exit::INTERRUPTED));
            }
        }
    });
    let outcome = match &resume {
        Some(run_id) => apex
            .execute(run_id, options, cmd.retry_errors, progress.clone(), stop_rx)
            .await
            .map(|report| (run_id.clone(), report)),
        None => apex.run(&spec, options, progress.clone(), stop_rx).await,
    };
    progress.finish();
    let (run_id, report) = outcome?;
    if progress.run_id().is_none() {
        println!(
            "run {run_id}: nothing to do ({} success, {} error{})",
            report.counts.success,
            report.counts.error,
            if report.counts.error > 0 {
                "; --retry-errors sends the errors again"
            } else {
                ""
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!();
    status(&*store, run_id.as_str()).await?;
    for (slug, reason) in &report.stopped {
        eprintln!("error: condition `{slug}` stopped: {reason}");
    }
    let code = if let Some(reason) = &report.halted {
        eprintln!("error: {reason} (apex run --resume {run_id})");
        exit::RUN_STOPPED
    } else if report.verify_failed || !report.stopped.is_empty() {
        if report.verify_failed {
            eprintln!(
                "error: --verify-first failed; nothing else was sent. Fix the cause, then: apex run --resume {run_id}"
            );
        }
        exit::RUN_STOPPED
    } else if report.interrupted && report.batches_left > 0 {
        eprintln!(
            "interrupted; the run's {} batch(es) keep running at the provider. Collect them and finish the run with: apex run --resume {run_id} (or cancel them: apex cancel {run_id})",
            report.batches_left
        );
        exit::INTERRUPTED
    } else if report.interrupted {
        eprintln!("interrupted; finish the run with: apex run --resume {run_id}");
        exit::INTERRUPTED
    } else if report.counts.error > 0 {
        eprintln!(
            "error: {} generation(s) failed; retry them with: apex run --resume {run_id} --retry-errors",
            report.counts.error
        );
        exit::GENERATIONS_FAILED
    } else {
        0
    };
    Ok(ExitCode::from(code))
}

/// `apex run --dry-run`: plans, checks and records the run (`planned`),
/// logs each request it would send and prints the estimate; sends nothing.
async fn dry_run(
    apex: &Apex,
    spec: &RunSpec,
    limits: &LimitTable,
    cache: bool,
) -> Result<ExitCode> {
    let plan = apex.plan(spec).await?;
    apex.providers_for(&plan.conditions, false)?;
    let run_id = apex.record(spec, &plan, true).await?;
    dry_run_log(
        apex,
        &plan,
        apex_core::plan::sends_cache_hints(cache, spec.replicates),
    )
    .await?;
    report::print_estimate(
        &**apex.store(),
        apex.catalog(),
        limits,
        &plan.conditions,
        &plan.packages,
        spec.replicates,
        cache,
    )
    .await?;
    println!(
        "run {run_id} planned (dry run): {} generation(s), nothing sent",
        plan.cell_count()
    );
    println!("see it with: apex status {run_id}");
    Ok(ExitCode::SUCCESS)
}

/// Logs each request a dry run would send: URL, size and hash at INFO, the
/// body at TRACE. No key is needed and nothing leaves the machine.
async fn dry_run_log(apex: &Apex, plan: &Plan, cache: bool) -> Result<()> {
    for preview in apex.previews(plan, cache).await? {
        let cell = &preview.cell;
        tracing::info!(
            condition = %cell.condition_slug,
            prompt_id = %cell.prompt_id,
            replicate = cell.replicate_index,
            url = %preview.request.url,
            bytes = preview.request.body.len(),
            est_input_tokens = preview.estimated_input_tokens,
            request_hash = %preview.request.request_hash,
            "dry run: would send"
        );
        tracing::trace!(body = %preview.request.body, "dry run: request body");
    }
    Ok(())
}

async fn estimate_cmd(store: Arc<dyn Store>, cmd: EstimateCmd) -> Result<ExitCode> {
    if cmd.condition_slug.is_empty() {
        return Err(UsageError("give --condition-slug SLUG (repeat it for several)".into()).into());
    }
    if cmd.replicates == Some(0) || cmd.limit == Some(0) {
        return Err(UsageError("--replicates and --limit must be at least 1".into()).into());
    }
    let catalog = load_catalog(cmd.catalog.as_deref())?;
    let limits = load_limits(cmd.limits.as_deref(), false)?;
    let conditions = resolve_conditions(&*store, &cmd.condition_slug).await?;
    let options = PlanOptions {
        replicates: cmd.replicates.unwrap_or(1),
        limit: cmd.limit,
    };
    let plan = Plan::build(conditions, store.current_packages().await?, options)?;
    let apex = Apex::new(Arc::clone(&store)).with_catalog(catalog.clone());
    // An estimate of a retired model is still an estimate: warn, not
    // refuse, and say what a run would meet (an estimate sends nothing).
    for warning in apex.preflight_warnings(&plan, true)? {
        let warning = warning.replace(
            "; sent anyway (--allow-retired): expect 404 from the real API",
            ": requests to it would be answered 404 by the real API (apex run refuses it unless --allow-retired)",
        );
        tracing::warn!("{warning}");
    }
    report::print_estimate(
        &*store,
        &catalog,
        &limits,
        &plan.conditions,
        &plan.packages,
        options.replicates,
        !cmd.no_cache,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn simulate(cmd: SimulateCmd) -> Result<ExitCode> {
    if !(cmd.time_scale.is_finite() && cmd.time_scale > 0.0) {
        return Err(UsageError("--time-scale must be a number above 0".into()).into());
    }
    for (name, value) in [
        ("--fault-rate", cmd.fault_rate),
        ("--output-spread", cmd.output_spread),
        ("--latency-jitter", cmd.latency_jitter),
    ] {
        if !(0.0..=1.0).contains(&value) {
            return Err(UsageError(format!("{name} must be between 0 and 1")).into());
        }
    }
    if !(0.0..=1.0).contains(&cmd.batch_expire_rate) || !(0.0..=1.0).contains(&cmd.batch_error_rate)
    {
        return Err(UsageError(
            "--batch-expire-rate and --batch-error-rate must be between 0 and 1".into(),
        )
        .into());
    }
    if !(cmd.batch_time.is_finite() && cmd.batch_time >= 0.0) {
        return Err(
            UsageError("--batch-time must be a number of seconds, 0 or more".into()).into(),
        );
    }
    if cmd.batch_max_requests == Some(0) || cmd.batch_queue_tokens == Some(0) {
        return Err(UsageError(
            "--batch-max-requests and --batch-queue-tokens must be at least 1".into(),
        )
        .into());
    }
    let addr: std::net::SocketAddr = cmd.listen.parse().map_err(|_| {
        UsageError(format!(
            "--listen `{}` is not an address like 127.0.0.1:8080",
            cmd.listen
        ))
    })?;
    let limits = match (&cmd.limits, cmd.no_limits) {
        (Some(_), true) => {
            return Err(UsageError(
                "--limits and --no-limits contradict each other; give one".into(),
            )
            .into());
        }
        (None, true) => Vec::new(),
        (None, false) => published_tiers(),
        (Some(path), false) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("cannot read limits file `{path}`: {e}")))?;
            parse_limits(&text).map_err(|e| UsageError(format!("limits file `{path}`: {e}")))?
        }
    };
    let count = match cmd.token_count.as_deref() {
        None => None,
        Some("billed") => Some(TokenCount::Billed),
        Some("chars") => Some(TokenCount::Characters),
        Some(factor) => match factor.parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 && f <= 100.0 => Some(TokenCount::Factor(f)),
            _ => {
                return Err(UsageError(format!(
                    "--token-count `{factor}` is not billed, chars or a factor above 0 such as 1.3"
                ))
                .into());
            }
        },
    };
    let replenish = match cmd.replenish.as_deref() {
        None => None,
        Some("window") => Some(Replenish::SlidingWindow),
        Some("bucket") => Some(Replenish::TokenBucket),
        Some(other) => {
            return Err(
                UsageError(format!("--replenish `{other}` is not window or bucket")).into(),
            );
        }
    };
    let rules = |provider| {
        let mut rules = LimitRules::of(provider);
        rules.count = count.unwrap_or(rules.count);
        rules.replenish = replenish.unwrap_or(rules.replenish);
        rules.round_remaining &= !cmd.exact_remaining;
        rules
    };
    let config = SimulatorConfig {
        limits,
        openai_rules: rules(ProviderKind::OpenAi),
        anthropic_rules: rules(ProviderKind::Anthropic),
        api_key: cmd.api_key,
        time_scale: cmd.time_scale,
        base_latency: std::time::Duration::from_millis(cmd.latency_ms),
        output_tokens: cmd.output_tokens,
        output_spread: cmd.output_spread,
        latency_jitter: cmd.latency_jitter,
        fault_rate: cmd.fault_rate,
        batch_time: std::time::Duration::from_secs_f64(cmd.batch_time),
        batch_expire_rate: cmd.batch_expire_rate,
        batch_error_rate: cmd.batch_error_rate,
        batch_max_requests: cmd.batch_max_requests,
        batch_queue_tokens: cmd.batch_queue_tokens,
        // Nothing reads the log of a standalone simulator: keep none.
        request_log: 0,
        ..SimulatorConfig::default()
    };
    let sim = Simulator::start(config, addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    println!("OPENAI_BASE_URL={}", sim.openai_base_url());
    println!("ANTHROPIC_BASE_URL={}", sim.anthropic_base_url());
    if let Some(path) = &cmd.addr_file {
        std::fs::write(path, sim.addr().to_string()).with_context(|| format!("writing {path}"))?;
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(ExitCode::SUCCESS)
}

/// `apex make-contexts DIR`: sample packages, written whole or not at all
/// (each to a temporary name first), so an interrupted call never leaves a
/// half-written package that a later ingest would take.
fn make_contexts(cmd: &MakeContextsCmd) -> Result<ExitCode> {
    use apex_providers::simulator::sample::{SAMPLE_PROMPT, SAMPLE_SYSTEM, sample_context};
    if cmd.count == 0 || cmd.count > 100_000 {
        return Err(UsageError("--count must be between 1 and 100000".into()).into());
    }
    if cmd.tokens < 100 {
        return Err(UsageError("--tokens must be at least 100".into()).into());
    }
    let out = Path::new(&cmd.dir);
    for i in 1..=cmd.count {
        let name = format!("ctx-{i:02}");
        let dir = out.join(&name);
        if dir.join("context.md").exists() {
            let same = std::fs::read(dir.join("context.md"))
                .is_ok_and(|b| b == sample_context(i, cmd.tokens).as_bytes());
            if same {
                continue;
            }
            return Err(UsageError(format!(
                "{} already holds a different package; choose an empty directory",
                dir.display()
            ))
            .into());
        }
        let partial = out.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        std::fs::write(partial.join("system.md"), SAMPLE_SYSTEM)?;
        std::fs::write(partial.join("context.md"), sample_context(i, cmd.tokens))?;
        std::fs::write(partial.join("prompt.md"), SAMPLE_PROMPT)?;
        std::fs::rename(&partial, &dir)
            .with_context(|| format!("moving {} into place", dir.display()))?;
    }
    println!(
        "{} package(s) of about {} tokens under {}",
        cmd.count,
        cmd.tokens,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `apex report RUN_ID...`.
async fn html_report(store: &dyn Store, cmd: ReportCmd) -> Result<ExitCode> {
    if cmd.run_ids.is_empty() {
        return Err(UsageError(
            "give the run id(s) to report: apex report RUN_ID [RUN_ID ...]".into(),
        )
        .into());
    }
    let run_ids = cmd
        .run_ids
        .iter()
        .map(|id| RunId::parse(id))
        .collect::<apex_core::Result<Vec<_>>>()?;
    let catalog = load_catalog(cmd.catalog.as_deref())?;
    let contexts = cmd
        .contexts
        .as_deref()
        .map(|range| {
            let parsed = match range.split_once('-') {
                Some((a, b)) => a.trim().parse::<usize>().ok().zip(b.trim().parse::<usize>().ok()),
                None => range.trim().parse::<usize>().ok().map(|n| (n, n)),
            };
            parsed.filter(|(a, b)| *a >= 1 && a <= b).ok_or_else(|| {
                UsageError(format!(
                    "--contexts `{range}` is not a range of context positions like 1-40 (or one, like 7)"
                ))
            })
        })
        .transpose()?;
    if !(cmd.max_audition_mb.is_finite() && cmd.max_audition_mb > 0.0) {
        return Err(UsageError(
            "--max-audition-mb must be a number of megabytes above 0, like 20".into(),
        )
        .into());
    }
    let audition = crate::html::AuditionOptions {
        budget: (cmd.max_audition_mb * 1024.0 * 1024.0) as usize,
        contexts,
    };
    let path = cmd
        .output
        .unwrap_or_else(|| format!("apex-report-{}.html", run_ids[0]));
    // Written as it goes to a temporary file, then renamed: never half a
    // report, and never the whole page in memory.
    let partial = format!("{path}.partial");
    let cannot = |e: &dyn std::fmt::Display| {
        let _ = std::fs::remove_file(&partial);
        UsageError(format!("cannot write the report to `{path}`: {e}"))
    };
    let file = std::fs::File::create(&partial).map_err(|e| cannot(&e))?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    let written = match crate::html::report(
        store,
        &catalog,
        &LimitTable::defaults(),
        &run_ids,
        &audition,
        &mut out,
    )
    .await
    {
        Ok(written) => written,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    out.into_inner()
        .map_err(|e| cannot(&e.error().to_string()))?
        .sync_all()
        .map_err(|e| cannot(&e))?;
    std::fs::rename(&partial, &path).map_err(|e| cannot(&e))?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!("report written to {path} ({} KB)", bytes.div_ceil(1024));
    if written.contexts_shown < written.contexts_total {
        println!(
            "its audition shows {} of {} contexts (--max-audition-mb {}); --contexts A-B shows others",
            written.contexts_shown, written.contexts_total, cmd.max_audition_mb
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `apex cancel RUN_ID`.
async fn cancel(store: Arc<dyn Store>, run_id: &str) -> Result<ExitCode> {
    let run_id = RunId::parse(run_id)?;
    let apex = Apex::new(store);
    let n = apex.cancel_batches(&run_id).await?;
    if n == 0 {
        println!("run {run_id} has no batches in flight; nothing to cancel");
    } else {
        println!(
            "asked the provider to cancel {n} batch(es) of run {run_id}; `apex run --resume {run_id}` stores what they processed and sends the rest again"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_run_header(run: &RunInfo) {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("run         {}", run.run_id);
    println!("state       {}", run.state.as_str());
    println!("conditions  {}", run.condition_slugs.join(", "));
    println!("replicates  {}", run.replicates);
    println!("created_by  {}", or_dash(&run.created_by));
    println!("notes       {}", or_dash(&run.notes));
    println!("created     {}", run.created_at);
    println!("started     {}", or_dash(&run.started_at));
    println!("finished    {}", or_dash(&run.finished_at));
    println!("cost        ${:.4}", run.cost_usd);
}

async fn status(store: &dyn Store, run_id: &str) -> Result<ExitCode> {
    let run_id = RunId::parse(run_id)?;
    let run = store.run(&run_id).await?;
    print_run_header(&run);
    println!();
    // The seed's two monitoring queries, as the ledger answers them.
    let order = ["pending", "running", "success", "error"];
    let mut counts = store.status_counts(&run_id).await?;
    counts.sort_by_key(|r| order.iter().position(|s| *s == r.status));
    let rows: Vec<Vec<String>> = counts
        .into_iter()
        .map(|r| vec![r.status, r.count.to_string(), r.cache_hits.to_string()])
        .collect();
    print!(
        "{}",
        render(&["status", "count", "cache_hits"].map(String::from), &rows)
    );
    let errors = store.error_rows(&run_id).await?;
    if !errors.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = errors
            .into_iter()
            .map(|e| {
                vec![
                    e.prompt_id,
                    e.replicate_index.to_string(),
                    e.error_message.unwrap_or_else(|| "NULL".into()),
                ]
            })
            .collect();
        print!(
            "{}",
            render(
                &["prompt_id", "replicate_index", "error_message"].map(String::from),
                &rows
            )
        );
    }
    report::condition_summary(store, &run_id).await?;
    // What failed and was tried again: the faults a run met and rode out.
    let retried = store
        .query_read_only(&format!(
            "SELECT g.condition_slug AS condition, a.error_class AS failed_attempt, COUNT(*) AS attempts,
                    SUM(CASE WHEN g.status = 'success' THEN 1 ELSE 0 END) AS then_succeeded
             FROM apex_audition.attempts a JOIN apex_audition.generations g
               ON g.generation_id = a.generation_id
             WHERE g.run_id = '{run_id}' AND a.outcome = 'error'
             GROUP BY g.condition_slug, a.error_class ORDER BY g.condition_slug, a.error_class"
        ))
        .await?;
    if !retried.rows.is_empty() {
        println!();
        println!(
            "failed attempts (each retried or waited out; then_succeeded: its generation succeeded in the end)"
        );
        print!("{}", render_query(&retried));
    }
    Ok(ExitCode::SUCCESS)
}

async fn runs(store: &dyn Store) -> Result<ExitCode> {
    let rows: Vec<Vec<String>> = store
        .runs()
        .await?
        .into_iter()
        .map(|r| {
            vec![
                r.run_id.to_string(),
                r.state.as_str().to_owned(),
                r.condition_slugs.join(","),
                r.created_by.unwrap_or_default(),
                r.created_at,
                r.started_at.unwrap_or_default(),
                r.finished_at.unwrap_or_default(),
                r.counts.total().to_string(),
                r.counts.pending.to_string(),
                r.counts.success.to_string(),
                r.counts.error.to_string(),
                format!("{:.4}", r.cost_usd),
                r.notes.unwrap_or_default(),
            ]
        })
        .collect();
    let columns = [
        "run_id",
        "state",
        "conditions",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "total",
        "pending",
        "success",
        "error",
        "cost_usd",
        "notes",
    ];
    print!("{}", render(&columns.map(String::from), &rows));
    Ok(ExitCode::SUCCESS)
}
