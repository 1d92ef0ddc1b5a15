//! [`Apex`]: everything `apex run` does, as a library. It composes: the
//! ledger (`apex-store`), the provider clients (`apex-providers`) and the one
//! dispatcher (`apex-core`), whichever the transport.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apex_core::executor::{Executor, Progress, ProgressEvent, RunOptions, RunReport};
use apex_core::limiter::LimitTable;
use apex_core::{
    CacheHint, Catalog, Condition, ContextPackage, Error, GenerationRequest, IngestReport, NewRun,
    Plan, Provider, ProviderKind, RegisterReport, Result, RunId, Store,
};
use apex_providers::{Clients, ProviderConfig};
use apex_store::files::RecoveryFile;
use tokio::sync::watch;

use crate::spec::RunSpec;

/// A ledger with the catalog, limits and provider clients runs use.
pub struct Apex {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    limits: LimitTable,
    clients: Clients,
    recovery_dir: PathBuf,
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
            clients: Clients::default(),
            recovery_dir: PathBuf::from("."),
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
        self.clients.configure(kind, config);
        self
    }

    /// Abandons (and retries, as a transport fault) a request that has not
    /// completed after this long, whichever provider it goes to.
    pub fn with_request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.clients.set_request_timeout(timeout);
        self
    }

    /// Abandons (and retries) a streamed request that sends nothing for this
    /// long.
    pub fn with_stream_idle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.clients.set_stream_idle_timeout(timeout);
        self
    }

    /// Where paid results the ledger could not take are saved
    /// (`apex-recovery-RUN_ID.jsonl`; default: the current directory).
    pub fn with_recovery_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.recovery_dir = dir.into();
        self
    }

    /// The recovery file of a run.
    pub fn recovery_file(&self, run_id: &RunId) -> PathBuf {
        RecoveryFile::of(&self.recovery_dir, run_id)
            .path()
            .to_path_buf()
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

    /// Plans a run and checks it before anything is recorded or sent:
    /// every condition against the catalog (warnings are logged), every
    /// request against the limits.
    pub async fn plan(&self, spec: &RunSpec) -> Result<Plan> {
        let mut conditions = Vec::with_capacity(spec.conditions.len());
        for slug in &spec.conditions {
            conditions.push(self.store.condition(slug).await?);
        }
        let plan = Plan::build(
            conditions,
            self.store.current_packages().await?,
            spec.plan_options(),
        )?;
        self.preflight(&plan, spec.allow_retired)?;
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
        for warning in self.preflight_warnings(plan, allow_retired)? {
            tracing::warn!("{warning}");
        }
        Ok(())
    }

    /// The checks of [`preflight`](Self::preflight), returning its warnings
    /// (deprecated or retired models, little room to answer after
    /// thinking) instead of logging them.
    pub fn preflight_warnings(&self, plan: &Plan, allow_retired: bool) -> Result<Vec<String>> {
        let today = jiff::Timestamp::now().strftime("%Y-%m-%d").to_string();
        let mut out = Vec::new();
        for condition in &plan.conditions {
            let warnings = apex_core::catalog::preflight(
                &self.catalog,
                condition,
                &plan.packages,
                &today,
                allow_retired,
            )?;
            out.extend(warnings.into_iter().map(|w| w.0));
        }
        Ok(out)
    }

    /// Records a planned run: the run and every cell `pending` (state
    /// `planned` for a dry run).
    pub async fn record(&self, spec: &RunSpec, plan: &Plan, dry_run: bool) -> Result<RunId> {
        let run = NewRun {
            run_id: RunId::generate(),
            created_by: spec.created_by.clone(),
            notes: spec.notes.clone(),
            flags: spec.flags.clone(),
            dry_run,
        };
        self.store.create_run(&run, plan).await?;
        Ok(run.run_id)
    }

    /// One provider client per kind the conditions use; `need_keys`: a
    /// missing key is a preflight error naming the variable. Each client is
    /// built once per configuration.
    pub fn providers_for(
        &self,
        conditions: &[Condition],
        need_keys: bool,
    ) -> Result<HashMap<ProviderKind, Arc<dyn Provider>>> {
        self.clients
            .for_conditions(conditions, need_keys)
            .map_err(|e| Error::Preflight(e.to_string()))
    }

    /// The requests a dry run would send, as their providers would build
    /// them, with the cache hints a synchronous execution would choose.
    pub async fn previews(&self, plan: &Plan, cache: bool) -> Result<Vec<Preview>> {
        let providers = self.providers_for(&plan.conditions, false)?;
        let conditions: HashMap<&str, Arc<Condition>> = plan
            .conditions
            .iter()
            .map(|c| (c.slug.as_str(), Arc::new(c.clone())))
            .collect();
        let mut packages = HashMap::new();
        for p in &plan.packages {
            let package = self.store.package(&p.id, &p.version).await?;
            packages.insert(p.id.as_str(), (Arc::new(package), p));
        }
        let replicates = plan.options.replicates as usize;
        let mut previews = Vec::with_capacity(plan.cell_count());
        for cell in plan.cells() {
            let condition = &conditions[cell.condition_slug.as_str()];
            let (package, package_ref) = &packages[cell.prompt_id.as_str()];
            let controls = self
                .catalog
                .lookup(condition.provider, &condition.model)
                .map(|m| m.cache_controls)
                .unwrap_or_default();
            let hint = if cache {
                CacheHint::On(apex_core::dispatch::choose_ttl(
                    &self.catalog,
                    &self.limits,
                    condition,
                    replicates,
                    package_ref,
                ))
            } else {
                CacheHint::Off
            };
            let request =
                GenerationRequest::new(Arc::clone(condition), Arc::clone(package), hint, controls);
            previews.push(Preview {
                estimated_input_tokens: package.estimated_input_tokens(),
                request: providers[&condition.provider].preview(&request),
                cell,
            });
        }
        Ok(previews)
    }

    /// Executes a recorded run's remaining generations, synchronously or
    /// through the providers' Batch APIs (`options.batch`), until done or
    /// until `stop` turns true. Results saved in its recovery file are
    /// stored first, claims of this machine's dead processes taken back,
    /// and provider batches still in flight re-attached to (never
    /// submitted again). A run with nothing left returns at once, without
    /// providers or keys.
    pub async fn execute(
        &self,
        run_id: &RunId,
        options: RunOptions,
        retry_errors: bool,
        progress: Arc<dyn Progress>,
        stop: watch::Receiver<bool>,
    ) -> Result<RunReport> {
        let recovery = RecoveryFile::of(&self.recovery_dir, run_id);
        let run = self.store.run(run_id).await?;
        let left = run.counts.pending
            + run.counts.running
            + if retry_errors { run.counts.error } else { 0 };
        if left == 0 && !recovery.path().exists() {
            if run.state != apex_core::RunState::Finished {
                self.store
                    .set_run_state(run_id, apex_core::RunState::Finished)
                    .await?;
            }
            return Ok(RunReport {
                counts: run.counts,
                ..RunReport::default()
            });
        }
        let conditions = self.store.run_conditions(run_id).await?;
        let providers = self.providers_for(&conditions, true)?;
        recovery.import(&*self.store).await?;
        self.release_dead_local_claims(run_id).await?;
        let executor = Executor::new(
            Arc::clone(&self.store),
            providers,
            Arc::clone(&self.catalog),
            options,
            progress,
        );
        let report = executor.execute(run_id, retry_errors, stop).await;
        let unstored = executor.take_unstored();
        match report {
            Err(error) if !unstored.is_empty() => {
                let n = unstored.len();
                let path = recovery.path().display();
                Err(match recovery.append(&unstored) {
                    Ok(()) => Error::store_msg(format!(
                        "{error}; {n} paid response(s) it could not store are saved in {path}: `apex run --resume {run_id}` stores them"
                    )),
                    Err(e) => Error::store_msg(format!(
                        "{error}; {n} paid response(s) could not be stored, nor saved in {path} ({e})"
                    )),
                })
            }
            report => report,
        }
    }

    /// Cancels a run's provider batches still in flight (`apex cancel`);
    /// how many. The run's next execution stores what they processed and
    /// sends the rest.
    pub async fn cancel_batches(&self, run_id: &RunId) -> Result<usize> {
        self.store.run(run_id).await?;
        let conditions = self.store.run_conditions(run_id).await?;
        let executor = Executor::new(
            Arc::clone(&self.store),
            self.providers_for(&conditions, true)?,
            Arc::clone(&self.catalog),
            RunOptions::default(),
            Arc::new(apex_core::executor::NoProgress),
        );
        executor.cancel_batches(run_id).await
    }

    /// Plans, preflights, records and executes a run: `apex run` in one
    /// call. Keys are checked before anything is recorded; `progress` hears
    /// [`ProgressEvent::Started`] with the run's id before anything is sent.
    pub async fn run(
        &self,
        spec: &RunSpec,
        options: RunOptions,
        progress: Arc<dyn Progress>,
        stop: watch::Receiver<bool>,
    ) -> Result<(RunId, RunReport)> {
        let plan = self.plan(spec).await?;
        self.providers_for(&plan.conditions, true)?;
        let run_id = self.record(spec, &plan, false).await?;
        let report = self
            .execute(&run_id, options, false, progress, stop)
            .await?;
        Ok((run_id, report))
    }

    /// Gives back at once the claims held by processes of this machine that
    /// no longer run, so a resume need not wait out the claim timeout.
    async fn release_dead_local_claims(&self, run_id: &RunId) -> Result<()> {
        use apex_core::worker::{ProcessIdentity, is_gone_locally};
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
