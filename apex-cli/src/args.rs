//! The command line, as argh structs. Options take their value after a space
//! (`--replicates 3`; argh does not accept `--replicates=3`).

use argh::FromArgs;
use serde::Serialize;

#[derive(FromArgs, Debug)]
/// Apex runs reproducible batches of LLM generations (conditions x contexts x
/// replicates) against OpenAI and Anthropic, and records every generation in a
/// SQL ledger.
pub struct Cli {
    /// ledger URL: sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE
    /// (default: $APEX_DATABASE_URL, else sqlite://apex.db)
    #[argh(option)]
    pub database_url: Option<String>,
    /// log level: error, warn, info (default), debug or trace
    #[argh(option)]
    pub log_level: Option<String>,
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Conditions(ConditionsCmd),
    Ingest(IngestCmd),
    Run(RunCmd),
    Status(StatusCmd),
    Runs(RunsCmd),
    Sql(SqlCmd),
    Simulate(SimulateCmd),
    Estimate(EstimateCmd),
    Cost(CostCmd),
    Export(ExportCmd),
    Models(ModelsCmd),
    Cancel(CancelCmd),
    Report(ReportCmd),
    MakeContexts(MakeContextsCmd),
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "make-contexts")]
/// Write synthetic context packages (case files of plausible text, the same
/// bytes every time) for trying Apex against `apex simulate`.
pub struct MakeContextsCmd {
    #[argh(positional)]
    /// the directory to write ctx-01, ctx-02, ... under
    pub dir: String,
    /// how many packages (default 21)
    #[argh(option, default = "21")]
    pub count: usize,
    /// about how many tokens each package holds, system and prompt included,
    /// at four bytes per token (default 128000)
    #[argh(option, default = "128_000")]
    pub tokens: usize,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "report")]
/// Write one self-contained HTML file showing runs: overview, charts and every
/// output side by side (works on a run still in progress).
pub struct ReportCmd {
    #[argh(positional)]
    /// the run id(s), shown side by side
    pub run_ids: Vec<String>,
    /// the file to write (default apex-report-RUN_ID.html)
    #[argh(option)]
    pub output: Option<String>,
    /// model catalog TOML file (as for `run`)
    #[argh(option)]
    pub catalog: Option<String>,
    /// most megabytes of answers in the audition view (default 20); the
    /// contexts beyond are listed with the command that shows them
    #[argh(option, default = "20.0")]
    pub max_audition_mb: f64,
    /// show only these contexts in the audition, by position (e.g. 41-80)
    #[argh(option)]
    pub contexts: Option<String>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "cancel")]
/// Cancel a run's provider batches still in flight (runs started with
/// --batch). Processed items are kept; `apex run --resume RUN_ID` stores them
/// and sends the rest again.
pub struct CancelCmd {
    #[argh(positional)]
    /// the run id
    pub run_id: String,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "models")]
/// List the model catalog: provider, model ids, window, output limit,
/// prices per million tokens and status today (current, deprecated, retired).
pub struct ModelsCmd {
    /// model catalog TOML file laid over the built-in one (as for `run`)
    #[argh(option)]
    pub catalog: Option<String>,
    /// only this provider (openai or anthropic)
    #[argh(option)]
    pub provider: Option<String>,
    /// also list retired models
    #[argh(switch)]
    pub all: bool,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "conditions")]
/// Register or list conditions.
pub struct ConditionsCmd {
    #[argh(subcommand)]
    pub command: ConditionsSub,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum ConditionsSub {
    Register(RegisterCmd),
    List(ListCmd),
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "register")]
/// Register the conditions of a TOML file (idempotent; a slug used by a run can
/// never change its parameters).
pub struct RegisterCmd {
    #[argh(positional)]
    /// the conditions file
    pub file: String,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
/// List the registered conditions.
pub struct ListCmd {}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ingest")]
/// Ingest every context package directory under DIR (idempotent).
pub struct IngestCmd {
    #[argh(positional)]
    /// directory holding one directory per package
    pub dir: String,
}

#[derive(FromArgs, Debug, Serialize)]
#[argh(subcommand, name = "run")]
/// Plan and run a batch, or resume one.
pub struct RunCmd {
    /// condition to run (repeat the flag for several)
    #[argh(option)]
    pub condition_slug: Vec<String>,
    /// replicates per (condition, context) (default 1)
    #[argh(option)]
    pub replicates: Option<u32>,
    /// only the first N contexts, in id order
    #[argh(option)]
    pub limit: Option<u32>,
    /// send one real request per condition before the rest of the batch
    #[argh(switch)]
    pub verify_first: bool,
    /// send through the providers' Batch APIs at half price: a leader batch
    /// writes each context's cache, then a follower batch reads it (each
    /// batch minutes to an hour, up to 24 hours; Ctrl-C leaves the batches
    /// running)
    #[argh(switch)]
    pub batch: bool,
    /// run conditions whose model is past its retirement date (refused
    /// otherwise: every request would fail)
    #[argh(switch)]
    pub allow_retired: bool,
    /// plan and record the run, log every request it would send, send nothing
    #[argh(switch)]
    pub dry_run: bool,
    /// send no prompt-caching hints (no cache_control, no prompt_cache_key)
    #[argh(switch)]
    pub no_cache: bool,
    /// retries after a failed attempt (default 3)
    #[argh(option)]
    pub max_retries: Option<u32>,
    /// do not pace requests under the per-minute limits
    #[argh(switch)]
    pub no_rate_limiting: bool,
    /// rate limits TOML file (per provider and model, per minute): caps on
    /// what the server's headers report (no file: the server's limits)
    #[argh(option)]
    pub limits: Option<String>,
    /// pace at a fixed 1/N of every limit, for N processes (default: the
    /// processes on this ledger share the limits among themselves)
    #[argh(option)]
    pub workers: Option<u32>,
    /// seconds after which a claim not renewed by its process is taken over (default 60)
    #[argh(option)]
    pub claim_timeout: Option<u64>,
    /// seconds a whole request may take before it is abandoned and retried
    /// (default 600; times --time-scale; streamed requests are bounded by
    /// --stream-idle-timeout instead)
    #[argh(option)]
    pub request_timeout: Option<f64>,
    /// seconds a streamed answer may stay silent before it is abandoned and
    /// retried (default 300; times --time-scale)
    #[argh(option)]
    pub stream_idle_timeout: Option<f64>,
    /// seconds a failing ledger is retried before the run stops, saving
    /// what it could not store to a recovery file (default 60)
    #[argh(option)]
    pub ledger_timeout: Option<u64>,
    /// model catalog TOML file whose entries override or extend the built-in prices and limits
    #[argh(option)]
    pub catalog: Option<String>,
    /// most requests in flight at once (default 16)
    #[argh(option)]
    pub concurrency: Option<usize>,
    /// multiply every pacing duration by F, for simulators F times faster than real time (default 1)
    #[argh(option)]
    pub time_scale: Option<f64>,
    /// who started the run
    #[argh(option)]
    pub created_by: Option<String>,
    /// free-text notes stored with the run
    #[argh(option)]
    pub notes: Option<String>,
    /// ingest the context packages under DIR first
    #[argh(option)]
    pub ingest: Option<String>,
    /// with --ingest: ingest, then stop
    #[argh(switch)]
    pub register_only: bool,
    /// finish the run RUN_ID: its pending and crashed-while-running generations
    #[argh(option)]
    pub resume: Option<String>,
    /// with --resume: also retry the generations stored as error
    #[argh(switch)]
    pub retry_errors: bool,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
/// Show a run's progress: the seed's monitoring queries as tables.
pub struct StatusCmd {
    #[argh(positional)]
    /// the run id
    pub run_id: String,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "runs")]
/// List the runs in the store, newest first.
pub struct RunsCmd {}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "sql")]
/// Run one read-only SQL query against the ledger (schema apex_audition).
pub struct SqlCmd {
    #[argh(positional)]
    /// the query
    pub query: String,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "simulate")]
/// Serve a local simulator of both APIs (for offline runs and tests); point
/// OPENAI_BASE_URL and ANTHROPIC_BASE_URL at it.
pub struct SimulateCmd {
    /// address to listen on (default 127.0.0.1:0, any free port)
    #[argh(option, default = "String::from(\"127.0.0.1:0\")")]
    pub listen: String,
    /// the API key clients must send (default: any)
    #[argh(option)]
    pub api_key: Option<String>,
    /// multiply every simulated duration by F (default 1)
    #[argh(option, default = "1.0")]
    pub time_scale: f64,
    /// base latency of a response in milliseconds, before scaling (default 400)
    #[argh(option, default = "400")]
    pub latency_ms: u64,
    /// most output tokens per answer (default 200)
    #[argh(option, default = "200")]
    pub output_tokens: u32,
    /// how much answer lengths vary, 0 to 1: each has between (1 - F) x
    /// --output-tokens and --output-tokens (default 0.6)
    #[argh(option, default = "0.6")]
    pub output_spread: f64,
    /// how much latencies vary, 0 to 1: each is scaled by 1 +/- F
    /// (default 0.3)
    #[argh(option, default = "0.3")]
    pub latency_jitter: f64,
    /// share of requests (0 to 1) answered with a transient 500/503/529 (default 0)
    #[argh(option, default = "0.0")]
    pub fault_rate: f64,
    /// seconds a batch takes from creation to its end, before scaling
    /// (default 600)
    #[argh(option, default = "600.0")]
    pub batch_time: f64,
    /// share of batches (0 to 1) that expire with half their items
    /// unprocessed (default 0)
    #[argh(option, default = "0.0")]
    pub batch_expire_rate: f64,
    /// share of batch items (0 to 1) that end errored with a server error
    /// (default 0)
    #[argh(option, default = "0.0")]
    pub batch_error_rate: f64,
    /// most requests per batch, for both APIs (default: 100,000 Anthropic,
    /// 50,000 OpenAI); larger batches are refused with 413
    #[argh(option)]
    pub batch_max_requests: Option<usize>,
    /// the per-model limit (OpenAI) on tokens enqueued in batches (default: none)
    #[argh(option)]
    pub batch_queue_tokens: Option<u64>,
    /// write the listening address to this file once bound
    #[argh(option)]
    pub addr_file: Option<String>,
    /// per-minute limits to enforce, in the --limits file format (default:
    /// the published tiers of the seed's four models and their current
    /// equivalents)
    #[argh(option)]
    pub limits: Option<String>,
    /// enforce no limits and send no rate-limit headers
    #[argh(switch)]
    pub no_limits: bool,
    /// how the limiters count input tokens: billed (as usage reports them),
    /// chars (bytes / 4, OpenAI's estimate) or a factor on the billed count
    /// such as 1.3 (default: chars for OpenAI, billed for Anthropic)
    #[argh(option)]
    pub token_count: Option<String>,
    /// how limits refill: window (sliding 60 s) or bucket (continuous)
    /// (default: window for OpenAI, bucket for Anthropic)
    #[argh(option)]
    pub replenish: Option<String>,
    /// report Anthropic's token `remaining` exactly instead of rounded to
    /// the nearest thousand
    #[argh(switch)]
    pub exact_remaining: bool,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "estimate")]
/// Estimate a run before spending: tokens, cache writes and reads, cost with
/// and without caching, the Batch-API price and the least duration.
pub struct EstimateCmd {
    /// condition to estimate (repeat the flag for several)
    #[argh(option)]
    pub condition_slug: Vec<String>,
    /// replicates per (condition, context) (default 1)
    #[argh(option)]
    pub replicates: Option<u32>,
    /// only the first N contexts, in id order
    #[argh(option)]
    pub limit: Option<u32>,
    /// estimate without prompt-caching hints
    #[argh(switch)]
    pub no_cache: bool,
    /// rate limits TOML file (as for `run`)
    #[argh(option)]
    pub limits: Option<String>,
    /// model catalog TOML file (as for `run`)
    #[argh(option)]
    pub catalog: Option<String>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "cost")]
/// A run's actual cost per condition, broken down, beside its estimate.
pub struct CostCmd {
    #[argh(positional)]
    /// the run id
    pub run_id: String,
    /// model catalog TOML file (as for `run`)
    #[argh(option)]
    pub catalog: Option<String>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "export")]
/// Export every generation of a run with every ledger column, streamed.
pub struct ExportCmd {
    #[argh(positional)]
    /// the run id
    pub run_id: String,
    /// jsonl or csv
    #[argh(option)]
    pub format: String,
    /// write to FILE instead of standard output
    #[argh(option)]
    pub output: Option<String>,
}
