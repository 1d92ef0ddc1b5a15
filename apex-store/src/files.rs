//! The files Apex reads and writes beside the ledger: conditions files,
//! context package directories, and a run's [`RecoveryFile`].

use std::fs;
use std::path::{Path, PathBuf};

use apex_core::{
    Condition, ContextPackage, Error, PackageSources, Result, RunId, SourceFile, Store,
    UnstoredResult,
};

/// The paid results of a run that the ledger could not take
/// (`apex-recovery-RUN_ID.jsonl`, one JSON result per line): written when a
/// run stops on a failing ledger, stored (never over a success) by the
/// run's next execution, then renamed `*.jsonl.imported`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryFile {
    path: PathBuf,
}

impl RecoveryFile {
    /// The recovery file of `run_id` in `dir`.
    pub fn of(dir: &Path, run_id: &RunId) -> Self {
        Self {
            path: dir.join(format!("apex-recovery-{run_id}.jsonl")),
        }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends results and syncs the file to disk.
    pub fn append(&self, results: &[UnstoredResult]) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        for result in results {
            serde_json::to_writer(&mut file, result)?;
            file.write_all(b"\n")?;
        }
        file.sync_all()
    }

    /// Stores the results it holds, if it exists, then renames it
    /// `*.jsonl.imported`; how many it stored.
    pub async fn import(&self, store: &dyn Store) -> Result<usize> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(Error::store_msg(format!(
                    "cannot read the recovery file {}: {e}",
                    self.path.display()
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
                    self.path.display(),
                    number + 1
                ))
            })?;
            store
                .end_attempt(result.generation_id, result.attempt, &result.end)
                .await?;
            stored += 1;
        }
        let done = self.path.with_extension("jsonl.imported");
        fs::rename(&self.path, &done)
            .map_err(|e| Error::store_msg(format!("cannot rename {}: {e}", self.path.display())))?;
        tracing::info!(file = %done.display(), responses = stored, "stored the responses an earlier execution saved");
        Ok(stored)
    }
}

/// Reads and validates a conditions TOML file.
pub fn read_conditions_file(path: &Path) -> Result<Vec<Condition>> {
    let text = fs::read_to_string(path)
        .map_err(|e| Error::ConditionsFile(format!("cannot read `{}`: {e}", path.display())))?;
    apex_core::parse_conditions(&text).map_err(|e| match e {
        Error::ConditionsFile(m) => Error::ConditionsFile(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Whether a directory entry is hidden (`.DS_Store`, editor swap files):
/// those are skipped everywhere, and only those.
fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// An entry that cannot be followed (a symbolic link that loops or points
/// nowhere) is named as such, not as an unexpected entry.
fn followable(path: &Path, name: &str) -> std::result::Result<(), String> {
    match fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) => {
            Err(format!(
                "`{name}` is a symbolic link that cannot be followed ({e}); point it at a file or remove it"
            ))
        }
        Err(e) => Err(format!("cannot read `{name}`: {e}")),
    }
}

/// Reads one package directory; its name is the package id.
pub fn read_package_dir(dir: &Path) -> Result<ContextPackage> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let invalid = |problem: String| Error::InvalidPackage {
        id: id.clone(),
        problem,
    };
    let read = |path: &Path, name: &str| -> Result<SourceFile> {
        let bytes = fs::read(path).map_err(|e| invalid(format!("cannot read `{name}`: {e}")))?;
        Ok(SourceFile {
            name: name.to_owned(),
            bytes,
        })
    };
    let entries = fs::read_dir(dir)
        .map_err(|e| invalid(format!("cannot read directory `{}`: {e}", dir.display())))?;
    let mut sources = PackageSources::default();
    let mut context_file = None;
    let mut context_dir = None;
    let mut names: Vec<_> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| invalid(format!("cannot list `{}`: {e}", dir.display())))?;
    names.sort();
    for path in names {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if is_hidden(&name) {
            continue;
        }
        followable(&path, &name).map_err(&invalid)?;
        match name.as_str() {
            "system.md" if path.is_file() => sources.system = Some(read(&path, &name)?),
            "prompt.md" if path.is_file() => sources.prompt = Some(read(&path, &name)?),
            "context.md" if path.is_file() => context_file = Some(read(&path, &name)?),
            "context" if path.is_dir() => context_dir = Some(path),
            _ => {
                return Err(invalid(format!(
                    "unexpected entry `{name}`; a package holds only system.md, context.md or context/, and prompt.md"
                )));
            }
        }
    }
    match (context_file, context_dir) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "has both `context.md` and `context/`; keep one of them".into(),
            ));
        }
        (Some(file), None) => sources.context.push(file),
        (None, Some(folder)) => {
            let mut files: Vec<_> = fs::read_dir(&folder)
                .and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect())
                .map_err(|e: std::io::Error| invalid(format!("cannot read `context/`: {e}")))?;
            files.sort();
            for path in files {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if is_hidden(&name) {
                    continue;
                }
                let shown = format!("context/{name}");
                followable(&path, &shown).map_err(&invalid)?;
                if !path.is_file() {
                    return Err(invalid(format!(
                        "`{shown}` is not a file; `context/` holds files only"
                    )));
                }
                sources.context.push(read(&path, &shown)?);
            }
            if sources.context.is_empty() {
                return Err(invalid(
                    "`context/` holds no files; add the context text".into(),
                ));
            }
        }
        (None, None) => {}
    }
    ContextPackage::from_sources(&id, sources)
}

/// Reads every package directory directly under `dir`, in name order. Every
/// package is validated before any is returned, so ingest is all or nothing.
/// Plain files beside the packages (a README) are skipped with a warning.
pub fn read_packages_under(dir: &Path) -> Result<Vec<ContextPackage>> {
    let not_found = |problem: String| Error::InvalidPackage {
        id: dir.display().to_string(),
        problem,
    };
    let mut paths: Vec<_> = fs::read_dir(dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect())
        .map_err(|e: std::io::Error| not_found(format!("cannot read directory: {e}")))?;
    paths.sort();
    let mut packages = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if is_hidden(&name) {
            continue;
        }
        if path.is_dir() {
            packages.push(read_package_dir(&path)?);
        } else {
            tracing::warn!(file = %path.display(), "not a package directory; skipped");
        }
    }
    if packages.is_empty() {
        return Err(not_found(
            "no package directories found; each package is a directory holding prompt.md".into(),
        ));
    }
    Ok(packages)
}
