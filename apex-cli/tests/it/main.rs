//! apex-cli integration tests: the real `apex` binary, driven as a user would.

mod bad_input;
mod batch;
mod current;
mod keys;
mod live;
mod messages;
mod multi;
mod pacing;
mod report;
mod resilience;
mod sdks;
mod stored;
mod view;
mod workflow;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory with its own ledger.
pub(crate) struct Sandbox {
    pub dir: tempfile::TempDir,
    /// A ledger URL other than the sandbox's SQLite file (PostgreSQL).
    pub url_override: Option<String>,
}

impl Sandbox {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            url_override: None,
        }
    }

    pub fn with_url(url: String) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            url_override: Some(url),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }

    pub fn url(&self) -> String {
        self.url_override
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.db_path().display()))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `apex --database-url <this ledger> ARGS`.
    pub fn apex(&self, args: &[&str]) -> Output {
        let url = self.url();
        let mut full = vec!["--database-url", url.as_str()];
        full.extend_from_slice(args);
        self.apex_raw(&full)
    }

    pub fn apex_raw(&self, args: &[&str]) -> Output {
        self.command(args, &[]).output().unwrap()
    }

    /// The `apex` command with this ledger and extra environment; provider
    /// variables not given are removed, so nothing can reach a real API.
    pub fn command(&self, args: &[&str], env: &[(&str, String)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_apex"));
        cmd.args(args).current_dir(self.dir.path());
        for var in [
            "APEX_DATABASE_URL",
            "OPENAI_API_KEY",
            "ANTHROPIC_API_KEY",
            "OPENAI_BASE_URL",
            "ANTHROPIC_BASE_URL",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
            .env("ANTHROPIC_BASE_URL", "http://127.0.0.1:9");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Every row of every ledger table, as text: equal dumps mean an
    /// unchanged store.
    pub fn dump(&self) -> String {
        if !self.db_path().exists() {
            return String::new();
        }
        let conn = rusqlite::Connection::open(self.db_path()).unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut out = String::new();
        for table in tables {
            let mut stmt = conn
                .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY 1"))
                .unwrap();
            let width = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    Ok((0..width)
                        .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                        .collect::<Vec<_>>()
                        .join("|"))
                })
                .unwrap();
            out.push_str(&format!("## {table}\n"));
            for row in rows {
                out.push_str(&row.unwrap());
                out.push('\n');
            }
        }
        out
    }
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub(crate) fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Sends a signal (`INT`, `KILL`, …) to a process started by a test.
pub(crate) fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} failed");
}

/// The repository's examples directory.
pub(crate) fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/production")
}

/// The run id printed by `apex run`.
pub(crate) fn run_id_from(out: &str) -> String {
    out.lines()
        .filter_map(|l| l.strip_prefix("run "))
        .filter_map(|rest| rest.split_whitespace().next())
        .find(|id| id.len() == 36 && id.matches('-').count() == 4)
        .expect("a run id in the output")
        .to_owned()
}

/// A new, empty database on the test PostgreSQL server (`APEX_TEST_PG_URL`).
pub(crate) async fn fresh_postgres_database() -> String {
    let base = std::env::var("APEX_TEST_PG_URL").expect("APEX_TEST_PG_URL names the test server");
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let name = format!("apex_cli_{}", uuid::Uuid::now_v7().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').expect("a database in the URL");
    format!("{prefix}/{name}")
}

/// The generation a simulator request was for (its `x-apex-generation`
/// header is `RUN/GENERATION/ATTEMPT`).
pub(crate) fn generation_of(request: &apex_providers::simulator::RequestRecord) -> i64 {
    let trace = request
        .trace
        .as_deref()
        .expect("apex sends x-apex-generation");
    trace
        .split('/')
        .nth(1)
        .and_then(|g| g.parse().ok())
        .expect("RUN/GENERATION/ATTEMPT")
}
