//! [`Apex`]: everything `apex run` does, as a library.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use apex_core::executor::{
    BatchExecutor, Executor, Progress, ProgressEvent, RunOptions, RunReport,
};
use apex_core::limiter::LimitTable;
use apex_core::{
    CacheHint, CacheTtl, Catalog, Condition, ContextPackage, Error, GenerationRequest,
    IngestReport, NewRun, Plan, PlanOptions, Provider, ProviderKind, RegisterReport, Result, RunId,
    Store, UnstoredResult,
};
use apex_providers::ProviderConfig;
use tokio::sync::watch;

use crate::worker::{ProcessIdentity, is_gone_locally, worker_name};

/// What to run: conditions × the current contexts × replicates.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Condition slugs, in the order they go.
    pub conditions: Vec<String>,
    /// Replicates per (condition, context); 0 means 1.
    pub replicates: u32,
    /// Only the first this many contexts.
    pub limit: Option<u32>,
    /// Who starts it (`--created-by`).
    pub created_by: Option<String>,
    /// Free text (`--notes`).
    pub notes: Option<String>,
    /// The options used, recorded with the run for reproducibility.
    pub flags: serde_json::Value,
    /// Run conditions whose model is past its retirement date (refused
    /// otherwise, since every request would fail).
    pub allow_retired: bool,
}

impl Batch {
    /// A batch of these conditions, one replicate each.
    pub fn new<S: Into<String>>(conditions: impl IntoIterator<Item = S>) -> Self {
        Self {
            conditions: conditions.into_iter().map(Into::into).collect(),
            replicates: 1,
            flags: serde_json::json!({}),
            ..Self::default()
        }
    }

    /// With `n` replicates per (condition, context).
    pub fn replicates(mut self, n: u32) -> Self {
        self.replicates = n;
        self
    }

    fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            replicates: self.replicates.max(1),
            limit: self.limit,
        }
    }
}

/// A ledger with the catalog, limits and providers a batch runs with.
pub struct Apex {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    limits: LimitTable,
    provider_configs: HashMap<ProviderKind, ProviderConfig>,
    request_timeout: Option<std::time::Duration>,
    stream_idle_timeout: Option<std::time::Duration>,
    recovery_dir: std::path::PathBuf,
    /// Clients built so far, one per provider: building one loads TLS
    /// roots, so the early key check and the execution share it.
    built: std::sync::Mutex<HashMap<ProviderKind, Arc<dyn Provider>>>,
}

impl std::fmt::Debug for Apex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apex")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

/// A closure as a progress callback.
struct FnProgress<F>(F);

impl<F: Fn(&ProgressEvent) + Send + Sync> Progress for FnProgress<F> {
    fn event(&self, event: &ProgressEvent) {
        (self.0)(event);
    }
}

/// Wraps a closure as a [`Progress`] callback.
pub fn progress(f: impl Fn(&ProgressEvent) + Send + Sync + 'static) -> Arc<dyn Progress> {
    Arc::new(FnProgress(f))
}

impl Apex {
    /// Opens the ledger a URL names (`sqlite://apex.db`, `sqlite::memory:`,
    /// `postgres://…`), applying migrations; built-in catalog, limits
    /// learned from the servers, providers configured from the environment.
    pub async fn open(url: &str) -> Result<Self> {
        Ok(Self::new(apex_store::open_store(url).await?))
    }

    /// Over a store already open.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            catalog: Arc::new(Catalog::built_in()),
            limits: LimitTable::defaults(),
            provider_configs: HashMap::new(),
            request_timeout: None,
            stream_idle_timeout: None,
            recovery_dir: std::path::PathBuf::from("."),
            built: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// With another model catalog (negotiated prices, new models).
    pub fn with_catalog(mut self, catalog: Catalog) -> Self {
        self.catalog = Arc::new(catalog);
        self
    }

    /// With a limits table: [`LimitTable::with_file`] caps what the servers
    /// report (the default learns the limits from their headers alone);
    /// [`LimitTable::none`] paces nothing.
    pub fn with_limits(mut self, limits: LimitTable) -> Self {
        self.limits = limits;
        self
    }

    /// Sends `kind`'s requests with this configuration instead of the
    /// environment's (another base URL, such as a simulator's, or a key).
    pub fn with_provider(mut self, kind: ProviderKind, config: ProviderConfig) -> Self {
        self.provider_configs.insert(kind, config);
        self.forget_clients();
        self
    }

    /// Abandons (and retries, as a transport fault) a request that has not
    /// completed after this long, whichever provider it goes to.
    pub fn with_request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.request_timeout = Some(timeout);
        self.forget_clients();
        self
    }

    /// Abandons (and retries) a streamed request that sends nothing for this
    /// long.
    pub fn with_stream_idle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.stream_idle_timeout = Some(timeout);
        self.forget_clients();
        self
    }

    /// Clients built with an older configuration are built again.
    fn forget_clients(&mut self) {
        self.built
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Where paid results the ledger could not take are saved
    /// (`apex-recovery-RUN_ID.jsonl`; default: the current directory).
    pub fn with_recovery_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.recovery_dir = dir.into();
        self
    }

    /// The recovery file of a run.
    pub fn recovery_file(&self, run_id: &RunId) -> std::path::PathBuf {
        self.recovery_dir
            .join(format!("apex-recovery-{run_id}.jsonl"))
    }

    /// The ledger.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The catalog in use.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The limits in use.
    pub fn limits(&self) -> &LimitTable {
        &self.limits
    }

    /// Registers conditions (idempotent; a slug used by a run is immutable).
    pub async fn register(&self, conditions: &[Condition]) -> Result<RegisterReport> {
        self.store.register_conditions(conditions).await
    }

    /// Registers the conditions of a TOML file.
    pub async fn register_file(&self, path: &Path) -> Result<RegisterReport> {
        self.register(&apex_store::files::read_conditions_file(path)?)
            .await
    }

    /// Ingests packages (idempotent; changed content is a new version).
    pub async fn ingest(&self, packages: &[ContextPackage]) -> Result<IngestReport> {
        self.store.ingest_packages(packages).await
    }

    /// Ingests every package directory under `dir`; returns how many were read.
    pub async fn ingest_dir(&self, dir: &Path) -> Result<(usize, IngestReport)> {
        let packages = apex_store::files::read_packages_under(dir)?;
        Ok((packages.len(), self.ingest(&packages).await?))
    }

    /// Plans a batch and checks it before anything is recorded or sent:
    /// every condition against the catalog (warnings are logged), every
    /// request against the limits.
    pub async fn plan(&self, batch: &Batch) -> Result<Plan> {
        let mut conditions = Vec::with_capacity(batch.conditions.len());
        for slug in &batch.conditions {
            conditions.push(self.store.condition(slug).await?);
        }
        let plan = Plan::build(
            conditions,
            self.store.current_packages().await?,
            batch.plan_options(),
        )?;
        self.preflight(&plan, batch.allow_retired)?;
        apex_core::executor::check_limits(
            &self.catalog,
            &self.limits,
            &plan.conditions,
            &plan.packages,
        )?;
        Ok(plan)
    }

    /// Checks every condition of a plan against the catalog (parameters the
    /// model accepts, window, output limit, lifecycle); warnings are logged.
    pub fn preflight(&self, plan: &Plan, allow_retired: bool) -> Result<()> {
        let today = jiff::Timestamp::now().strftime("%Y-%m-%d").to_string();
        for condition in &plan.conditions {
            let warnings = apex_core::catalog::preflight(
                &self.catalog,
                condition,
                &plan.packages,
                &today,
                allow_retired,
            )?;
            for warning in warnings {
                tracing::warn!("{}", warning.0);
            }
        }
        Ok(())
    }

    /// Records a planned batch: the run and every cell `pending` (state
    /// `planned` for a dry run).
    pub async fn record(&self, batch: &Batch, plan: &Plan, dry_run: bool) -> Result<RunId> {
        let run = NewRun {
            run_id: RunId::generate(),
            created_by: batch.created_by.clone(),
            notes: batch.notes.clone(),
            flags: batch.flags.clone(),
            dry_run,
        };
        self.store.create_run(&run, plan).await?;
        Ok(run.run_id)
    }

    /// One provider per kind the conditions use; `need_keys`: a missing key
    /// is a preflight error naming the variable.
    pub fn providers_for(
        &self,
        conditions: &[Condition],
        need_keys: bool,
    ) -> Result<HashMap<ProviderKind, Arc<dyn Provider>>> {
        let mut providers = HashMap::new();
        for c in conditions {
            if providers.contains_key(&c.provider) {
                continue;
            }
            let mut config = self
                .provider_configs
                .get(&c.provider)
                .cloned()
                .unwrap_or_else(|| ProviderConfig::from_env(c.provider));
            if let Some(timeout) = self.request_timeout {
                config.request_timeout = timeout;
            }
            if let Some(timeout) = self.stream_idle_timeout {
                config.stream_idle_timeout = timeout;
            }
            if need_keys && config.api_key.is_none() {
                return Err(Error::Preflight(format!(
                    "condition `{}`: no API key for {}; set {}",
                    c.slug,
                    c.provider,
                    c.provider.api_key_env()
                )));
            }
            let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
            let provider = match built.get(&c.provider) {
                Some(provider) => Arc::clone(provider),
                None => {
                    let provider = apex_providers::build(c.provider, config)
                        .map_err(|e| Error::Preflight(e.to_string()))?;
                    built.insert(c.provider, Arc::clone(&provider));
                    provider
                }
            };
            providers.insert(c.provider, provider);
        }
        Ok(providers)
    }

    /// The requests a dry run would send, as their providers would build
    /// them: (cell, URL, body bytes, SHA-256 of the body, body).
    pub async fn previews(&self, plan: &Plan, cache: bool) -> Result<Vec<Preview>> {
        let providers = self.providers_for(&plan.conditions, false)?;
        // Each condition with its model's cache controls, looked up once.
        let conditions: HashMap<&str, (Arc<Condition>, apex_core::CacheControls)> = plan
            .conditions
            .iter()
            .map(|c| {
                let controls = self
                    .catalog
                    .lookup(c.provider, &c.model)
                    .map(|m| m.cache_controls)
                    .unwrap_or_default();
                (c.slug.as_str(), (Arc::new(c.clone()), controls))
            })
            .collect();
        let mut packages: HashMap<&str, Arc<ContextPackage>> = HashMap::new();
        for p in &plan.packages {
            let package = self.store.package(&p.id, &p.version).await?;
            packages.insert(p.id.as_str(), Arc::new(package));
        }
        let mut previews = Vec::with_capacity(plan.cell_count());
        for cell in plan.cells() {
            let (condition, cache_controls) = &conditions[cell.condition_slug.as_str()];
            let request = GenerationRequest {
                condition: Arc::clone(condition),
                package: Arc::clone(&packages[cell.prompt_id.as_str()]),
                cache: if cache {
                    CacheHint::On(CacheTtl::FiveMinutes)
                } else {
                    CacheHint::Off
                },
                cache_controls: *cache_controls,
                trace: None,
                body: apex_core::SharedBody::default(),
                in_batch: false,
            };
            let preview = providers[&request.condition.provider].preview(&request);
            previews.push(Preview {
                cell,
                estimated_input_tokens: request.package.estimated_input_tokens(),
                request: preview,
            });
        }
        Ok(previews)
    }

    /// Executes a recorded run's remaining generations until done or until
    /// `stop` turns true. Claims left by processes of this machine that no
    /// longer run are taken back first.
    pub async fn execute(
        &self,
        run_id: &RunId,
        options: RunOptions,
        retry_errors: bool,
        progress: Arc<dyn Progress>,
        stop: watch::Receiver<bool>,
    ) -> Result<RunReport> {
        let in_flight = self.store.open_batches(run_id).await?.len();
        if in_flight > 0 {
            // Sending their items one by one would pay for them twice.
            return Err(Error::Preflight(format!(
                "run {run_id} has {in_flight} provider batch(es) in flight; resume it with --batch (it re-attaches to them) or cancel them first with `apex cancel {run_id}`"
            )));
        }
        let providers = self.prepare_execution(run_id).await?;
        let executor = Executor::new(
            Arc::clone(&self.store),
            providers,
            Arc::clone(&self.catalog),
            options,
            progress,
        );
        match executor.execute(run_id, retry_errors, stop).await {
            Err(error) => {
                let unstored = executor.take_unstored();
                if unstored.is_empty() {
                    Err(error)
                } else {
                    Err(self.save_unstored(run_id, &error.to_string(), &unstored))
                }
            }
            report => report,
        }
    }

    /// Before an execution: the run's providers (keys checked), the results
    /// an earlier execution saved in a recovery file stored, and the claims
    /// of this machine's dead processes taken back.
    async fn prepare_execution(
        &self,
        run_id: &RunId,
    ) -> Result<HashMap<ProviderKind, Arc<dyn Provider>>> {
        let conditions = self.store.run_conditions(run_id).await?;
        let providers = self.providers_for(&conditions, true)?;
        self.import_recovered(run_id).await?;
        self.release_dead_local_claims(run_id).await?;
        Ok(providers)
    }

    /// Appends paid results the ledger could not take to the run's recovery
    /// file; the error to report, naming the file and the way on.
    fn save_unstored(&self, run_id: &RunId, message: &str, results: &[UnstoredResult]) -> Error {
        use std::io::Write as _;
        let path = self.recovery_file(run_id);
        let saved = (|| {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            for result in results {
                serde_json::to_writer(&mut file, result)?;
                file.write_all(b"\n")?;
            }
            file.sync_all()
        })();
        let n = results.len();
        match saved {
            Ok(()) => Error::store_msg(format!(
                "{message}; {n} paid response(s) it could not store are saved in {}: `apex run --resume {run_id}` stores them",
                path.display()
            )),
            Err(e) => Error::store_msg(format!(
                "{message}; {n} paid response(s) could not be stored, nor saved in {} ({e})",
                path.display()
            )),
        }
    }

    /// Stores the results an earlier execution saved in the run's recovery
    /// file (never over a success), then renames the file `*.imported`.
    async fn import_recovered(&self, run_id: &RunId) -> Result<()> {
        let path = self.recovery_file(run_id);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(Error::store_msg(format!(
                    "cannot read the recovery file {}: {e}",
                    path.display()
                )));
            }
        };
        let mut stored = 0;
        for (number, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let result: UnstoredResult = serde_json::from_str(line).map_err(|e| {
                Error::store_msg(format!(
                    "recovery file {} line {}: {e}; fix or move the file, then resume again",
                    path.display(),
                    number + 1
                ))
            })?;
            self.store
                .end_attempt(result.generation_id, result.attempt, &result.end)
                .await?;
            stored += 1;
        }
        let done = path.with_extension("jsonl.imported");
        std::fs::rename(&path, &done)
            .map_err(|e| Error::store_msg(format!("cannot rename {}: {e}", path.display())))?;
        tracing::info!(file = %done.display(), responses = stored, "stored the responses an earlier execution saved");
        Ok(())
    }

    /// Executes a recorded run's remaining generations through the
    /// providers' Batch APIs (`apex run --batch`), in a leader wave and a
    /// follower wave per (condition, context) so followers read the cache
    /// their leader wrote, at the batch price. Batches still in flight from
    /// an earlier execution are re-attached to, never submitted again. A
    /// stop leaves the batches running at the provider.
    pub async fn execute_batch(
        &self,
        run_id: &RunId,
        options: RunOptions,
        retry_errors: bool,
        progress: Arc<dyn Progress>,
        stop: watch::Receiver<bool>,
    ) -> Result<RunReport> {
        let providers = self.prepare_execution(run_id).await?;
        BatchExecutor::new(
            Arc::clone(&self.store),
            providers,
            Arc::clone(&self.catalog),
            options,
            progress,
        )
        .execute(run_id, retry_errors, stop)
        .await
    }

    /// Cancels a run's provider batches still in flight (`apex cancel`);
    /// how many. Their processed items are stored, and the rest set back to
    /// `pending`, by the next `--batch` execution of the run.
    pub async fn cancel_batches(&self, run_id: &RunId) -> Result<usize> {
        self.store.run(run_id).await?;
        let conditions = self.store.run_conditions(run_id).await?;
        let providers = self.providers_for(&conditions, true)?;
        BatchExecutor::new(
            Arc::clone(&self.store),
            providers,
            Arc::clone(&self.catalog),
            RunOptions::default(),
            Arc::new(apex_core::executor::NoProgress),
        )
        .cancel(run_id)
        .await
    }

    /// Plans, records and executes a batch: `apex run` in one call.
    pub async fn run(
        &self,
        batch: &Batch,
        options: RunOptions,
        progress: Arc<dyn Progress>,
    ) -> Result<(RunId, RunReport)> {
        let plan = self.plan(batch).await?;
        self.providers_for(&plan.conditions, true)?;
        let run_id = self.record(batch, &plan, false).await?;
        let (_keep_open, stop) = watch::channel(false);
        let report = self
            .execute(&run_id, options, false, progress, stop)
            .await?;
        Ok((run_id, report))
    }

    /// A worker name for this process (unique; tells the machine apart).
    pub fn worker_name() -> String {
        worker_name()
    }

    /// Gives back at once the claims held by processes of this machine that
    /// no longer run, so a resume need not wait out the claim timeout.
    async fn release_dead_local_claims(&self, run_id: &RunId) -> Result<()> {
        let me = ProcessIdentity::of_self();
        if me.is_none() {
            return Ok(());
        }
        for worker in self.store.claim_holders(run_id).await? {
            if is_gone_locally(&worker, me.as_ref()) {
                tracing::info!(%worker, "its process is gone; taking its claims back now");
                self.store.release_claims(run_id, &worker).await?;
            }
        }
        Ok(())
    }
}

/// One request a dry run would send.
#[derive(Debug, Clone)]
pub struct Preview {
    /// The cell.
    pub cell: apex_core::Cell,
    /// Apex's estimate of its input tokens.
    pub estimated_input_tokens: u64,
    /// URL, body and hash.
    pub request: apex_core::RequestPreview,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_provider_client_is_built_once_per_configuration() {
        let store = Arc::new(apex_store::SqliteStore::open_in_memory().unwrap());
        let conditions = apex_core::parse_conditions(
            "[[condition]]\nslug = \"c\"\nprovider = \"openai\"\nmodel = \"gpt-4o\"\nmax_tokens = 8\n",
        )
        .unwrap();
        let config = |url: &str| ProviderConfig {
            base_url: url.into(),
            api_key: Some(apex_providers::ApiKey::new("sk-test")),
            ..ProviderConfig::from_env(ProviderKind::OpenAi)
        };
        let apex =
            Apex::new(store).with_provider(ProviderKind::OpenAi, config("http://127.0.0.1:9"));
        let first = apex.providers_for(&conditions, true).unwrap();
        let again = apex.providers_for(&conditions, false).unwrap();
        assert!(Arc::ptr_eq(
            &first[&ProviderKind::OpenAi],
            &again[&ProviderKind::OpenAi]
        ));
        let apex = apex.with_provider(ProviderKind::OpenAi, config("http://127.0.0.1:10"));
        let rebuilt = apex.providers_for(&conditions, true).unwrap();
        assert!(!Arc::ptr_eq(
            &first[&ProviderKind::OpenAi],
            &rebuilt[&ProviderKind::OpenAi]
        ));
    }
}
