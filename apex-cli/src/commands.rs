//! One function per subcommand.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use apex_core::{Condition, NewRun, Plan, PlanOptions, RunId, RunInfo, Store};
use apex_store::files::{read_conditions_file, read_packages_under};
use apex_store::{DEFAULT_DATABASE_URL, open_store};

use crate::UsageError;
use crate::args::{Cli, Command, ConditionsSub, RunCmd};
use crate::table::{render, render_query};

/// The seed's first monitoring query, verbatim but for the run id.
pub const STATUS_SQL: &str = "SELECT
  status,
  COUNT(*) as count,
  COUNT(*) FILTER (WHERE cache_hit) as cache_hits
FROM apex_audition.generations
WHERE run_id = '<run-id>'
GROUP BY status;";

/// The seed's second monitoring query, verbatim but for the run id.
pub const ERRORS_SQL: &str = "SELECT prompt_id, replicate_index, error_message
FROM apex_audition.generations
WHERE status = 'error' AND run_id = '<run-id>';";

pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let url = cli
        .database_url
        .or_else(|| std::env::var("APEX_DATABASE_URL").ok())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let store = open_store(&url).await?;
    match cli.command {
        Command::Conditions(c) => match c.command {
            ConditionsSub::Register(r) => register(&*store, Path::new(&r.file)).await,
            ConditionsSub::List(_) => list_conditions(&*store).await,
        },
        Command::Ingest(i) => ingest(&*store, Path::new(&i.dir)).await,
        Command::Run(r) => run(store, r).await,
        Command::Status(s) => status(&*store, &s.run_id).await,
        Command::Runs(_) => runs(&*store).await,
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

async fn list_conditions(store: &dyn Store) -> Result<ExitCode> {
    let rows: Vec<Vec<String>> = store
        .conditions()
        .await?
        .into_iter()
        .map(|info| {
            let c = info.condition;
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            vec![
                c.slug,
                c.provider.to_string(),
                c.model,
                opt(c.temperature.map(|t| t.to_string())),
                opt(c.top_p.map(|t| t.to_string())),
                c.max_tokens.to_string(),
                opt(c.reasoning_effort),
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
        println!("new version  {id} ({} -> {})", &old[..12], &new[..12]);
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

fn check_run_flags(cmd: &RunCmd) -> Result<()> {
    let usage = |m: &str| Err(UsageError(m.to_owned()).into());
    if cmd.register_only && cmd.ingest.is_none() {
        return usage("--register-only needs --ingest DIR");
    }
    if cmd.retry_errors && cmd.resume.is_none() {
        return usage("--retry-errors needs --resume RUN_ID");
    }
    if cmd.resume.is_some()
        && (!cmd.condition_slug.is_empty() || cmd.replicates.is_some() || cmd.limit.is_some())
    {
        return usage(
            "--resume takes the run's own conditions, replicates and limit; drop --condition-slug, --replicates and --limit",
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
    Ok(())
}

async fn resolve_conditions(store: &dyn Store, slugs: &[String]) -> Result<Vec<Condition>> {
    let mut conditions = Vec::with_capacity(slugs.len());
    for slug in slugs {
        conditions.push(store.condition(slug).await?);
    }
    Ok(conditions)
}

async fn run(store: Arc<dyn Store>, cmd: RunCmd) -> Result<ExitCode> {
    check_run_flags(&cmd)?;
    if let Some(dir) = &cmd.ingest {
        ingest(&*store, Path::new(dir)).await?;
        if cmd.register_only {
            // Still name an unknown slug now rather than at run time.
            resolve_conditions(&*store, &cmd.condition_slug).await?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    if cmd.resume.is_some() {
        return Err(UsageError(
            "--resume needs the executing runner, which this build does not have yet".into(),
        )
        .into());
    }
    let conditions = resolve_conditions(&*store, &cmd.condition_slug).await?;
    let packages = store.current_packages().await?;
    let options = PlanOptions {
        replicates: cmd.replicates.unwrap_or(1),
        limit: cmd.limit,
    };
    let plan = Plan::build(conditions, packages, options)?;
    if !cmd.dry_run {
        return Err(UsageError("sending requests needs the provider clients, which this build does not have yet; use --dry-run".into()).into());
    }
    let new_run = NewRun {
        run_id: RunId::generate(),
        created_by: cmd.created_by.clone(),
        notes: cmd.notes.clone(),
        flags: serde_json::to_value(&cmd).context("recording the flags")?,
        dry_run: cmd.dry_run,
    };
    store.create_run(&new_run, &plan).await?;
    for cell in &plan.cells {
        let package = plan.packages.iter().find(|p| p.id == cell.prompt_id);
        let condition = plan
            .conditions
            .iter()
            .find(|c| c.slug == cell.condition_slug);
        if let (Some(p), Some(c)) = (package, condition) {
            tracing::info!(
                condition = %c.slug,
                provider = %c.provider,
                model = %c.model,
                prompt_id = %p.id,
                replicate = cell.replicate_index,
                est_input_tokens = p.estimated_tokens,
                max_tokens = c.max_tokens,
                "dry run: would send"
            );
        }
    }
    println!(
        "run {} planned (dry run): {} generation(s), nothing sent",
        new_run.run_id,
        plan.cells.len()
    );
    println!("see it with: apex status {}", new_run.run_id);
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
    let counts = store
        .query_read_only(&STATUS_SQL.replace("<run-id>", run_id.as_str()))
        .await?;
    print!("{}", render_query(&counts));
    let errors = store
        .query_read_only(&ERRORS_SQL.replace("<run-id>", run_id.as_str()))
        .await?;
    if !errors.rows.is_empty() {
        println!();
        print!("{}", render_query(&errors));
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
