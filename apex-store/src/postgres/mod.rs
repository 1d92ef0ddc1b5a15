//! The PostgreSQL backend: the same `apex_audition` schema and semantics as
//! SQLite, over a pool of tokio-postgres connections.

use std::collections::HashMap;

use apex_core::run::AttemptEnd;
use apex_core::store::ConditionInfo;
use apex_core::time::now_rfc3339;
use apex_core::tokens::Tokenizer;
use apex_core::{
    Claim, Condition, ContextPackage, Error, ErrorRow, GenerationRow, IngestReport, NewRun,
    PackageRef, Plan, ProviderKind, QueryResult, RegisterReport, RunId, RunInfo, RunState,
    SqlValue, StatusCounts, Store, WorkItem,
};
use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::StoreError;
use crate::redact_url;
use crate::sqlite::check_read_only_keyword;

const MIGRATIONS: &[(&str, &str)] = &[
    ("init", include_str!("0001_init.sql")),
    ("o200k_tokens", include_str!("0002_o200k_tokens.sql")),
    ("workers", include_str!("0003_workers.sql")),
];

type CoreResult<T> = apex_core::Result<T>;

fn pg(e: tokio_postgres::Error) -> Error {
    Error::store_msg(format!("postgres: {}", describe(&e)))
}

/// A PostgreSQL error as one line, with the server's message when there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => Error::store_msg(format!("postgres pool: {other}")),
    }
}

/// The shared ledger on PostgreSQL.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects (checking the server and credentials at once) and applies
    /// migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let config: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| StoreError::BadUrl {
                    url: shown.clone(),
                    problem: format!(
                        "{}; use postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                        describe(&e)
                    ),
                })?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // TLS when the URL asks for it (`?sslmode=require`), with the
        // server's certificate verified against the Mozilla roots; the
        // default (`prefer`) connects in plain text, as on a trusted network.
        let manager = if config.get_ssl_mode() == SslMode::Require {
            Manager::from_config(
                config,
                MakeRustlsConnect::with_webpki_roots(),
                manager_config,
            )
        } else {
            let mut config = config;
            config.ssl_mode(SslMode::Disable);
            Manager::from_config(config, NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(16)
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot build a connection pool: {e}")))?;
        let client = pool.get().await.map_err(|e| {
            let (problem, hint) = match &e {
                deadpool_postgres::PoolError::Backend(e) => {
                    let code = e.as_db_error().map(|d| d.code().code().to_owned());
                    let hint = match code.as_deref() {
                        Some("28P01" | "28000") => "check the user and password in --database-url",
                        Some("3D000") => {
                            "create the database first (createdb NAME) or name an existing one"
                        }
                        _ => "check that the server is running and reachable at that host and port",
                    };
                    (describe(e), hint)
                }
                other => (other.to_string(), "check the server and --database-url"),
            };
            StoreError::Postgres(format!("cannot connect to {shown}: {problem}; {hint}"))
        })?;
        drop(client);
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::Postgres(describe(&e)))?;
        let step = |e: tokio_postgres::Error| {
            StoreError::Postgres(format!("migrating the ledger: {}", describe(&e)))
        };
        // One migrator at a time, whichever process gets there first.
        tx.execute("SELECT pg_advisory_xact_lock(7210351)", &[])
            .await
            .map_err(step)?;
        tx.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS apex_audition;
             CREATE TABLE IF NOT EXISTS apex_audition.schema_migrations (
                 version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
        )
        .await
        .map_err(step)?;
        let version: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM apex_audition.schema_migrations",
                &[],
            )
            .await
            .map_err(step)?
            .get(0);
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known,
            });
        }
        for (index, (name, sql)) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tracing::info!(
                version = index + 1,
                name,
                "applying ledger migration (postgres)"
            );
            tx.batch_execute(sql).await.map_err(step)?;
            tx.execute(
                "INSERT INTO apex_audition.schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&(index as i64 + 1), name, &now_rfc3339()],
            )
            .await
            .map_err(step)?;
        }
        tx.commit().await.map_err(step)?;
        Ok(())
    }

    async fn client(&self) -> CoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }
}

fn condition_from_row(r: &Row) -> CoreResult<Condition> {
    let provider: String = r.get("provider");
    Ok(Condition {
        slug: r.get("slug"),
        provider: ProviderKind::parse(&provider).ok_or_else(|| {
            Error::store_msg(format!("unknown provider `{provider}` in the ledger"))
        })?,
        model: r.get("model"),
        temperature: r.get("temperature"),
        top_p: r.get("top_p"),
        max_tokens: r.get::<_, i64>("max_tokens") as u32,
        reasoning_effort: r.get("reasoning_effort"),
    })
}

async fn load_run<C: GenericClient>(client: &C, run_id: &RunId) -> CoreResult<RunInfo> {
    let row = client
        .query_opt(
            "SELECT created_by, notes, flags_json, state, created_at, started_at, finished_at, replicates
             FROM apex_audition.runs WHERE run_id = $1",
            &[&run_id.as_str()],
        )
        .await
        .map_err(pg)?
        .ok_or_else(|| Error::UnknownRun(run_id.to_string()))?;
    let mut counts = StatusCounts::default();
    let mut cost_usd = 0.0;
    for r in client
        .query(
            "SELECT status, COUNT(*), COALESCE(SUM(cost_usd), 0)::DOUBLE PRECISION
             FROM apex_audition.generations WHERE run_id = $1 GROUP BY status",
            &[&run_id.as_str()],
        )
        .await
        .map_err(pg)?
    {
        let (status, n, cost): (String, i64, f64) = (r.get(0), r.get(1), r.get(2));
        cost_usd += cost;
        match status.as_str() {
            "pending" => counts.pending = n as u64,
            "running" => counts.running = n as u64,
            "success" => counts.success = n as u64,
            _ => counts.error = n as u64,
        }
    }
    let condition_slugs = client
        .query(
            "SELECT condition_slug FROM apex_audition.run_conditions WHERE run_id = $1 ORDER BY position",
            &[&run_id.as_str()],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let state: String = row.get(3);
    let flags: String = row.get(2);
    Ok(RunInfo {
        run_id: run_id.clone(),
        created_by: row.get(0),
        notes: row.get(1),
        flags: serde_json::from_str(&flags).unwrap_or(serde_json::Value::Null),
        state: RunState::parse(&state)
            .ok_or_else(|| Error::store_msg(format!("run {run_id} has unknown state `{state}`")))?,
        created_at: row.get(4),
        started_at: row.get(5),
        finished_at: row.get(6),
        replicates: row.get::<_, i64>(7) as u32,
        condition_slugs,
        counts,
        cost_usd,
    })
}

fn work_item_from_row(r: &Row) -> WorkItem {
    WorkItem {
        generation_id: r.get(0),
        condition_slug: r.get(1),
        prompt_id: r.get(2),
        package_version: r.get(3),
        context_index: r.get::<_, i64>(4) as u32,
        replicate_index: r.get::<_, i64>(5) as u32,
        attempts: r.get::<_, i64>(6) as u32,
    }
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|n| n as u64)
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn register_conditions(&self, conditions: &[Condition]) -> CoreResult<RegisterReport> {
        for c in conditions {
            c.validate()?;
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        // Serialise registrations so "used by a run" is checked consistently.
        tx.execute(
            "LOCK TABLE apex_audition.conditions IN SHARE ROW EXCLUSIVE MODE",
            &[],
        )
        .await
        .map_err(pg)?;
        let mut report = RegisterReport::default();
        let now = now_rfc3339();
        for c in conditions {
            let existing = tx
                .query_opt(
                    "SELECT * FROM apex_audition.conditions WHERE slug = $1",
                    &[&c.slug],
                )
                .await
                .map_err(pg)?;
            let params = c.params_json();
            let values: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                &c.slug,
                &c.provider.as_str(),
                &c.model,
                &c.temperature,
                &c.top_p,
                &i64::from(c.max_tokens),
                &c.reasoning_effort,
                &params,
                &now,
            ];
            match existing {
                Some(row) => {
                    let old = condition_from_row(&row)?;
                    if old.params_json() == params {
                        report.unchanged.push(c.slug.clone());
                        continue;
                    }
                    let used = tx
                        .query_opt(
                            "SELECT run_id FROM apex_audition.run_conditions WHERE condition_slug = $1 LIMIT 1",
                            &[&c.slug],
                        )
                        .await
                        .map_err(pg)?;
                    if let Some(used) = used {
                        return Err(Error::ConditionImmutable {
                            slug: c.slug.clone(),
                            run_id: used.get(0),
                            change: old.first_difference(c).unwrap_or_default(),
                        });
                    }
                    tx.execute(
                        "UPDATE apex_audition.conditions SET provider = $2, model = $3, temperature = $4,
                             top_p = $5, max_tokens = $6, reasoning_effort = $7, params_json = $8, updated_at = $9
                         WHERE slug = $1",
                        &values,
                    )
                    .await
                    .map_err(pg)?;
                    report.updated.push(c.slug.clone());
                }
                None => {
                    tx.execute(
                        "INSERT INTO apex_audition.conditions (slug, provider, model, temperature, top_p,
                             max_tokens, reasoning_effort, params_json, created_at, updated_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
                        &values,
                    )
                    .await
                    .map_err(pg)?;
                    report.added.push(c.slug.clone());
                }
            }
        }
        tx.commit().await.map_err(pg)?;
        Ok(report)
    }

    async fn conditions(&self) -> CoreResult<Vec<ConditionInfo>> {
        let client = self.client().await?;
        client
            .query(
                "SELECT c.*, (SELECT COUNT(*) FROM apex_audition.run_conditions r WHERE r.condition_slug = c.slug) AS runs
                 FROM apex_audition.conditions c ORDER BY c.slug",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                Ok(ConditionInfo {
                    condition: condition_from_row(r)?,
                    runs: r.get::<_, i64>("runs") as u64,
                })
            })
            .collect()
    }

    async fn condition(&self, slug: &str) -> CoreResult<Condition> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT * FROM apex_audition.conditions WHERE slug = $1",
                &[&slug],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| Error::UnknownCondition(slug.to_owned()))?;
        condition_from_row(&row)
    }

    async fn ingest_packages(&self, packages: &[ContextPackage]) -> CoreResult<IngestReport> {
        let mut client = self.client().await?;
        let current: HashMap<String, String> = client
            .query(
                "SELECT prompt_id, current_version FROM apex_audition.context_packages",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let counted = packages.to_vec();
        let o200k = tokio::task::spawn_blocking(move || crate::o200k_for_new(&counted, &current))
            .await
            .map_err(|e| Error::store_msg(format!("token counting failed: {e}")))?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "LOCK TABLE apex_audition.context_packages IN SHARE ROW EXCLUSIVE MODE",
            &[],
        )
        .await
        .map_err(pg)?;
        let mut report = IngestReport::default();
        let now = now_rfc3339();
        for (p, o200k) in packages.iter().zip(o200k) {
            let current: Option<String> = tx
                .query_opt("SELECT current_version FROM apex_audition.context_packages WHERE prompt_id = $1", &[&p.id()])
                .await
                .map_err(pg)?
                .map(|r| r.get(0));
            if current.as_deref() == Some(p.version()) {
                report.unchanged.push(p.id().to_owned());
                continue;
            }
            // Another process may have changed the current version since
            // the counts were taken: count now if this one was skipped.
            let o200k = o200k.unwrap_or_else(|| {
                let (prefix, rest) = Tokenizer::O200k.split(p);
                prefix + rest
            }) as i64;
            tx.execute(
                "INSERT INTO apex_audition.context_versions (prompt_id, version, system_text, context_text,
                     prompt_text, estimated_tokens, byte_len, ingested_at, o200k_tokens)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                &[
                    &p.id(),
                    &p.version(),
                    &p.system().map(|s| &**s),
                    &&**p.context(),
                    &&**p.prompt(),
                    &(p.estimated_input_tokens() as i64),
                    &(p.byte_len() as i64),
                    &now,
                    &o200k,
                ],
            )
            .await
            .map_err(pg)?;
            tx.execute(
                "INSERT INTO apex_audition.context_packages (prompt_id, current_version, updated_at)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (prompt_id) DO UPDATE SET current_version = excluded.current_version,
                     updated_at = excluded.updated_at",
                &[&p.id(), &p.version(), &now],
            )
            .await
            .map_err(pg)?;
            match current {
                None => report.added.push(p.id().to_owned()),
                Some(old) => {
                    report
                        .new_versions
                        .push((p.id().to_owned(), old, p.version().to_owned()))
                }
            }
        }
        tx.commit().await.map_err(pg)?;
        Ok(report)
    }

    async fn current_packages(&self) -> CoreResult<Vec<PackageRef>> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT p.prompt_id, p.current_version, v.estimated_tokens, v.byte_len,
                        COALESCE(v.o200k_tokens, v.estimated_tokens)
                 FROM apex_audition.context_packages p
                 JOIN apex_audition.context_versions v ON v.prompt_id = p.prompt_id AND v.version = p.current_version
                 ORDER BY p.prompt_id",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| PackageRef {
                id: r.get(0),
                version: r.get(1),
                estimated_tokens: r.get::<_, i64>(2) as u64,
                byte_len: r.get::<_, i64>(3) as u64,
                o200k_tokens: r.get::<_, i64>(4) as u64,
            })
            .collect())
    }

    async fn package(&self, id: &str, version: &str) -> CoreResult<ContextPackage> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT system_text, context_text, prompt_text FROM apex_audition.context_versions
                 WHERE prompt_id = $1 AND version = $2",
                &[&id, &version],
            )
            .await
            .map_err(pg)?
            .ok_or_else(|| {
                Error::store_msg(format!(
                    "context package `{id}` version {version} is not stored"
                ))
            })?;
        ContextPackage::from_stored(id.to_owned(), version, row.get(0), row.get(1), row.get(2))
    }

    async fn create_run(&self, run: &NewRun, plan: &Plan) -> CoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let now = now_rfc3339();
        let state = if run.dry_run {
            RunState::Planned
        } else {
            RunState::Running
        };
        let started = (!run.dry_run).then(|| now.clone());
        tx.execute(
            "INSERT INTO apex_audition.runs (run_id, created_by, notes, flags_json, state, replicates,
                 context_limit, dry_run, apex_version, created_at, started_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &run.run_id.as_str(),
                &run.created_by,
                &run.notes,
                &run.flags.to_string(),
                &state.as_str(),
                &i64::from(plan.options.replicates),
                &plan.options.limit.map(i64::from),
                &run.dry_run,
                &env!("CARGO_PKG_VERSION"),
                &now,
                &started,
            ],
        )
        .await
        .map_err(pg)?;
        for (position, c) in plan.conditions.iter().enumerate() {
            let stored = tx
                .query_opt(
                    "SELECT * FROM apex_audition.conditions WHERE slug = $1 FOR SHARE",
                    &[&c.slug],
                )
                .await
                .map_err(pg)?
                .ok_or_else(|| Error::UnknownCondition(c.slug.clone()))?;
            if condition_from_row(&stored)?.params_json() != c.params_json() {
                return Err(Error::store_msg(format!(
                    "condition `{}` changed while the run was being planned; plan again",
                    c.slug
                )));
            }
            tx.execute(
                "INSERT INTO apex_audition.run_conditions (run_id, condition_slug, position, params_json)
                 VALUES ($1, $2, $3, $4)",
                &[&run.run_id.as_str(), &c.slug, &(position as i64), &c.params_json()],
            )
            .await
            .map_err(pg)?;
        }
        let insert = tx
            .prepare(
                "INSERT INTO apex_audition.generations (run_id, condition_slug, prompt_id, package_version,
                     context_index, replicate_index, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await
            .map_err(pg)?;
        for cell in &plan.cells {
            tx.execute(
                &insert,
                &[
                    &run.run_id.as_str(),
                    &cell.condition_slug,
                    &cell.prompt_id,
                    &cell.package_version,
                    &i64::from(cell.context_index),
                    &i64::from(cell.replicate_index),
                    &now,
                ],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    async fn run(&self, run_id: &RunId) -> CoreResult<RunInfo> {
        load_run(&self.client().await?, run_id).await
    }

    async fn runs(&self) -> CoreResult<Vec<RunInfo>> {
        let client = self.client().await?;
        let ids: Vec<String> = client
            .query(
                "SELECT run_id FROM apex_audition.runs ORDER BY created_at DESC, run_id DESC",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(load_run(&client, &RunId::parse(&id)?).await?);
        }
        Ok(out)
    }

    async fn run_conditions(&self, run_id: &RunId) -> CoreResult<Vec<Condition>> {
        let client = self.client().await?;
        load_run(&client, run_id).await?;
        client
            .query(
                "SELECT condition_slug, params_json FROM apex_audition.run_conditions WHERE run_id = $1 ORDER BY position",
                &[&run_id.as_str()],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| {
                let (slug, params): (String, String) = (r.get(0), r.get(1));
                let mut value: serde_json::Value = serde_json::from_str(&params)
                    .map_err(|e| Error::store_msg(format!("run condition `{slug}`: {e}")))?;
                value["slug"] = serde_json::Value::String(slug.clone());
                serde_json::from_value(value).map_err(|e| Error::store_msg(format!("run condition `{slug}`: {e}")))
            })
            .collect()
    }

    async fn set_run_state(&self, run_id: &RunId, state: RunState) -> CoreResult<()> {
        let client = self.client().await?;
        let sql = match state {
            RunState::Running => {
                "UPDATE apex_audition.runs SET state = $2, started_at = COALESCE(started_at, $3), finished_at = NULL
                 WHERE run_id = $1"
            }
            RunState::Planned => "UPDATE apex_audition.runs SET state = $2 WHERE run_id = $1 AND $3::TEXT IS NOT NULL",
            RunState::Finished | RunState::Interrupted => {
                "UPDATE apex_audition.runs SET state = $2, finished_at = $3 WHERE run_id = $1"
            }
        };
        let n = client
            .execute(sql, &[&run_id.as_str(), &state.as_str(), &now_rfc3339()])
            .await
            .map_err(pg)?;
        if n == 0 {
            return Err(Error::UnknownRun(run_id.to_string()));
        }
        Ok(())
    }

    async fn work_items(&self, run_id: &RunId, include_errors: bool) -> CoreResult<Vec<WorkItem>> {
        let mut client = self.client().await?;
        load_run(&client, run_id).await?;
        let tx = client.transaction().await.map_err(pg)?;
        if include_errors {
            tx.execute(
                "UPDATE apex_audition.generations SET status = 'pending', error_class = NULL, error_message = NULL,
                     finished_at = NULL
                 WHERE run_id = $1 AND status = 'error'",
                &[&run_id.as_str()],
            )
            .await
            .map_err(pg)?;
        }
        let items = tx
            .query(
                "SELECT generation_id, condition_slug, prompt_id, package_version, context_index, replicate_index, attempts
                 FROM apex_audition.generations
                 WHERE run_id = $1 AND status IN ('pending', 'running')
                 ORDER BY generation_id",
                &[&run_id.as_str()],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(work_item_from_row)
            .collect();
        tx.commit().await.map_err(pg)?;
        Ok(items)
    }

    async fn claim_work(
        &self,
        run_id: &RunId,
        worker: &str,
        max_groups: u32,
        stale_before: &str,
    ) -> CoreResult<Claim> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        // Claimers of one run take turns; claims are rare (a few groups at a time).
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&run_id.as_str()],
        )
        .await
        .map_err(pg)?;
        let now = now_rfc3339();
        tx.execute(
            "INSERT INTO apex_audition.workers (worker, run_id, started_at, heartbeat_at) VALUES ($1, $2, $3, $3)
             ON CONFLICT (worker) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            &[&worker, &run_id.as_str(), &now],
        )
        .await
        .map_err(pg)?;
        // Claimable: unclaimed, or held by a worker whose heartbeat is stale
        // (or unknown).
        let claimable =
            "g.status IN ('pending', 'running') AND g.claimed_by IS DISTINCT FROM $2 AND (
             g.claimed_by IS NULL OR NOT EXISTS (
                 SELECT 1 FROM apex_audition.workers w
                 WHERE w.worker = g.claimed_by AND w.heartbeat_at >= $3))";
        let groups = tx
            .query(
                &format!(
                    "SELECT g.condition_slug, g.prompt_id FROM apex_audition.generations g
                     WHERE g.run_id = $1 AND {claimable}
                     GROUP BY g.condition_slug, g.prompt_id ORDER BY MIN(g.generation_id) LIMIT $4"
                ),
                &[
                    &run_id.as_str(),
                    &worker,
                    &stale_before,
                    &i64::from(max_groups),
                ],
            )
            .await
            .map_err(pg)?;
        for group in &groups {
            let (slug, prompt): (String, String) = (group.get(0), group.get(1));
            tx.execute(
                &format!(
                    "UPDATE apex_audition.generations AS g SET claimed_by = $2, claimed_at = $5
                     WHERE g.run_id = $1 AND {claimable} AND g.condition_slug = $4 AND g.prompt_id = $6"
                ),
                &[&run_id.as_str(), &worker, &stale_before, &slug, &now, &prompt],
            )
            .await
            .map_err(pg)?;
        }
        let items = tx
            .query(
                "SELECT generation_id, condition_slug, prompt_id, package_version, context_index, replicate_index, attempts
                 FROM apex_audition.generations
                 WHERE run_id = $1 AND claimed_by = $2 AND status IN ('pending', 'running')
                 ORDER BY generation_id",
                &[&run_id.as_str(), &worker],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(work_item_from_row)
            .collect();
        let held_by_others: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM apex_audition.generations g
                 JOIN apex_audition.workers w ON w.worker = g.claimed_by
                 WHERE g.run_id = $1 AND g.status IN ('pending', 'running')
                   AND g.claimed_by <> $2 AND w.heartbeat_at >= $3",
                &[&run_id.as_str(), &worker, &stale_before],
            )
            .await
            .map_err(pg)?
            .get(0);
        tx.commit().await.map_err(pg)?;
        Ok(Claim {
            items,
            held_by_others: held_by_others as u64,
        })
    }

    async fn renew_claims(&self, run_id: &RunId, worker: &str) -> CoreResult<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO apex_audition.workers (worker, run_id, started_at, heartbeat_at) VALUES ($1, $2, $3, $3)
                 ON CONFLICT (worker) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                &[&worker, &run_id.as_str(), &now_rfc3339()],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    async fn release_claims(&self, run_id: &RunId, worker: &str) -> CoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "UPDATE apex_audition.generations SET claimed_by = NULL, claimed_at = NULL
             WHERE run_id = $1 AND claimed_by = $2 AND status IN ('pending', 'running')",
            &[&run_id.as_str(), &worker],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "DELETE FROM apex_audition.workers WHERE worker = $1",
            &[&worker],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    async fn reset_errors(&self, run_id: &RunId) -> CoreResult<u64> {
        let client = self.client().await?;
        load_run(&client, run_id).await?;
        client
            .execute(
                "UPDATE apex_audition.generations SET status = 'pending', error_class = NULL, error_message = NULL,
                     finished_at = NULL
                 WHERE run_id = $1 AND status = 'error'",
                &[&run_id.as_str()],
            )
            .await
            .map_err(pg)
    }

    async fn begin_attempt(
        &self,
        generation_id: i64,
        attempt: u32,
        worker: Option<&str>,
    ) -> CoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let now = now_rfc3339();
        let n = tx
            .execute(
                "UPDATE apex_audition.generations SET status = 'running', attempts = $2,
                     started_at = COALESCE(started_at, $3)
                 WHERE generation_id = $1 AND status IN ('pending', 'running')
                   AND ($4::TEXT IS NULL OR claimed_by IS NULL OR claimed_by = $4)",
                &[&generation_id, &i64::from(attempt), &now, &worker],
            )
            .await
            .map_err(pg)?;
        if n == 0 {
            return Err(Error::NotClaimable(generation_id));
        }
        tx.execute(
            "INSERT INTO apex_audition.attempts (generation_id, attempt, started_at) VALUES ($1, $2, $3)",
            &[&generation_id, &i64::from(attempt), &now],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    async fn end_attempt(
        &self,
        generation_id: i64,
        attempt: u32,
        end: &AttemptEnd,
    ) -> CoreResult<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        let now = now_rfc3339();
        let attempt = i64::from(attempt);
        match end {
            AttemptEnd::Success(r) => {
                let u = &r.usage;
                let n = |v: u64| v as i64;
                tx.execute(
                    "UPDATE apex_audition.generations SET status = 'success', cache_hit = $2, input_tokens = $3,
                         cache_write_tokens = $4, cache_write_1h_tokens = $5, cache_read_tokens = $6,
                         output_tokens = $7, reasoning_tokens = $8, cost_usd = $9, latency_ms = $10,
                         finish_reason = $11, provider_request_id = $12, model_snapshot = $13, request_hash = $14,
                         response_text = $15, error_class = NULL, error_message = NULL, finished_at = $16
                     WHERE generation_id = $1",
                    &[
                        &generation_id,
                        &u.cache_hit(),
                        &n(u.input_tokens),
                        &n(u.cache_write_tokens),
                        &n(u.cache_write_1h_tokens),
                        &n(u.cache_read_tokens),
                        &n(u.output_tokens),
                        &n(u.reasoning_tokens),
                        &r.cost_usd,
                        &n(r.latency_ms),
                        &r.finish_reason,
                        &r.provider_request_id,
                        &r.model_snapshot,
                        &r.request_hash,
                        &r.response_text,
                        &now,
                    ],
                )
                .await
                .map_err(pg)?;
                tx.execute(
                    "UPDATE apex_audition.attempts SET finished_at = $3, outcome = 'success', http_status = 200,
                         provider_request_id = $4, latency_ms = $5
                     WHERE generation_id = $1 AND attempt = $2",
                    &[&generation_id, &attempt, &now, &r.provider_request_id, &n(r.latency_ms)],
                )
                .await
                .map_err(pg)?;
            }
            AttemptEnd::Failed {
                class,
                message,
                http_status,
                provider_request_id,
                latency_ms,
                last,
            } => {
                let latency = *latency_ms as i64;
                if *last {
                    tx.execute(
                        "UPDATE apex_audition.generations SET status = 'error', error_class = $2, error_message = $3,
                             provider_request_id = $4, latency_ms = $5, finished_at = $6
                         WHERE generation_id = $1",
                        &[&generation_id, &class.as_str(), message, provider_request_id, &latency, &now],
                    )
                    .await
                    .map_err(pg)?;
                }
                tx.execute(
                    "UPDATE apex_audition.attempts SET finished_at = $3, outcome = 'error', http_status = $4,
                         error_class = $5, error_message = $6, provider_request_id = $7, latency_ms = $8
                     WHERE generation_id = $1 AND attempt = $2",
                    &[
                        &generation_id,
                        &attempt,
                        &now,
                        &http_status.map(i64::from),
                        &class.as_str(),
                        message,
                        provider_request_id,
                        &latency,
                    ],
                )
                .await
                .map_err(pg)?;
            }
            AttemptEnd::Abandoned => {
                tx.execute(
                    "UPDATE apex_audition.generations SET status = 'pending' WHERE generation_id = $1 AND status = 'running'",
                    &[&generation_id],
                )
                .await
                .map_err(pg)?;
                tx.execute(
                    "UPDATE apex_audition.attempts SET finished_at = $3, outcome = 'abandoned'
                     WHERE generation_id = $1 AND attempt = $2 AND finished_at IS NULL",
                    &[&generation_id, &attempt, &now],
                )
                .await
                .map_err(pg)?;
            }
        }
        tx.commit().await.map_err(pg)
    }

    async fn error_rows(&self, run_id: &RunId) -> CoreResult<Vec<ErrorRow>> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT prompt_id, replicate_index, error_message FROM apex_audition.generations
                 WHERE status = 'error' AND run_id = $1 ORDER BY generation_id",
                &[&run_id.as_str()],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| ErrorRow {
                prompt_id: r.get(0),
                replicate_index: r.get::<_, i64>(1) as u32,
                error_message: r.get(2),
            })
            .collect())
    }

    async fn generations_page(
        &self,
        run_id: &RunId,
        after: i64,
        limit: u32,
    ) -> CoreResult<Vec<GenerationRow>> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT generation_id, run_id, condition_slug, prompt_id, package_version, context_index,
                        replicate_index, status, cache_hit, attempts, input_tokens, cache_write_tokens,
                        cache_write_1h_tokens, cache_read_tokens, output_tokens, reasoning_tokens, cost_usd,
                        latency_ms, finish_reason, provider_request_id, model_snapshot, request_hash,
                        response_text, error_class, error_message, created_at, started_at, finished_at
                 FROM apex_audition.generations WHERE run_id = $1 AND generation_id > $2
                 ORDER BY generation_id LIMIT $3",
                &[&run_id.as_str(), &after, &i64::from(limit)],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| GenerationRow {
                generation_id: r.get(0),
                run_id: r.get(1),
                condition_slug: r.get(2),
                prompt_id: r.get(3),
                package_version: r.get(4),
                context_index: r.get::<_, i64>(5) as u32,
                replicate_index: r.get::<_, i64>(6) as u32,
                status: r.get(7),
                cache_hit: r.get(8),
                attempts: r.get::<_, i64>(9) as u32,
                input_tokens: opt_u64(r.get(10)),
                cache_write_tokens: opt_u64(r.get(11)),
                cache_write_1h_tokens: opt_u64(r.get(12)),
                cache_read_tokens: opt_u64(r.get(13)),
                output_tokens: opt_u64(r.get(14)),
                reasoning_tokens: opt_u64(r.get(15)),
                cost_usd: r.get(16),
                latency_ms: opt_u64(r.get(17)),
                finish_reason: r.get(18),
                provider_request_id: r.get(19),
                model_snapshot: r.get(20),
                request_hash: r.get(21),
                response_text: r.get(22),
                error_class: r.get(23),
                error_message: r.get(24),
                created_at: r.get(25),
                started_at: r.get(26),
                finished_at: r.get(27),
            })
            .collect())
    }

    async fn query_read_only(&self, sql: &str) -> CoreResult<QueryResult> {
        check_read_only_keyword(sql)?;
        let mut client = self.client().await?;
        // Preparing through the extended protocol refuses several
        // statements and tells the column types; the text of the result
        // comes from the simple protocol, inside a READ ONLY transaction.
        let statement = client.prepare(sql).await.map_err(|e| {
            let text = describe(&e);
            if text.contains("cannot insert multiple commands") {
                Error::ReadOnly("more than one statement; give one query at a time".into())
            } else {
                Error::store_msg(format!("query failed: {text}"))
            }
        })?;
        let types: Vec<Type> = statement
            .columns()
            .iter()
            .map(|c| c.type_().clone())
            .collect();
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let messages = tx.simple_query(sql).await.map_err(|e| {
            let text = describe(&e);
            if text.contains("read-only transaction") {
                Error::ReadOnly(
                    "the statement would write to the ledger; `apex sql` is read-only".into(),
                )
            } else {
                Error::store_msg(format!("query failed: {text}"))
            }
        })?;
        tx.rollback().await.map_err(pg)?;
        let mut result = QueryResult::default();
        for message in messages {
            match message {
                tokio_postgres::SimpleQueryMessage::RowDescription(columns) => {
                    result.columns = columns.iter().map(|c| c.name().to_owned()).collect();
                }
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    if result.columns.is_empty() {
                        result.columns =
                            row.columns().iter().map(|c| c.name().to_owned()).collect();
                    }
                    let values = (0..row.len())
                        .map(|i| match row.get(i) {
                            None => SqlValue::Null,
                            Some(text) => typed(types.get(i), text),
                        })
                        .collect();
                    result.rows.push(values);
                }
                _ => {}
            }
        }
        Ok(result)
    }
}

/// A text value from the simple protocol, as the column's type.
fn typed(ty: Option<&Type>, text: &str) -> SqlValue {
    match ty {
        Some(t) if *t == Type::BOOL => SqlValue::Bool(text == "t"),
        Some(t) if [Type::INT2, Type::INT4, Type::INT8].contains(t) => text
            .parse()
            .map_or_else(|_| SqlValue::Text(text.to_owned()), SqlValue::Integer),
        Some(t) if *t == Type::NUMERIC && !text.contains(['.', 'e', 'E']) => text
            .parse()
            .map_or_else(|_| SqlValue::Text(text.to_owned()), SqlValue::Integer),
        Some(t) if [Type::FLOAT4, Type::FLOAT8, Type::NUMERIC].contains(t) => text
            .parse()
            .map_or_else(|_| SqlValue::Text(text.to_owned()), SqlValue::Real),
        _ => SqlValue::Text(text.to_owned()),
    }
}
