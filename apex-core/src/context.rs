//! Context packages: one prompt to send, as an optional system text, a large
//! cacheable context and the final instruction, identified by a content hash.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::condition::validate_slug;
use crate::error::{Error, Result};

/// One file of a package as read from disk: its name (for messages) and bytes.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path relative to the package directory, e.g. `context/02-notes.md`.
    pub name: String,
    /// Raw content; must be non-empty UTF-8.
    pub bytes: Vec<u8>,
}

/// The files that make up a package, before validation.
#[derive(Debug, Clone, Default)]
pub struct PackageSources {
    /// `system.md`, if present.
    pub system: Option<SourceFile>,
    /// `context.md`, or the files of `context/` in name order.
    pub context: Vec<SourceFile>,
    /// `prompt.md` (required).
    pub prompt: Option<SourceFile>,
}

/// Separator placed between the files of a `context/` folder.
pub const CONTEXT_FILE_SEPARATOR: &str = "\n\n";

/// A validated context package. Its texts are shared (`Arc<str>`), so the
/// replicates of one context hold the text once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextPackage {
    id: String,
    version: String,
    system: Option<Arc<str>>,
    context: Arc<str>,
    prompt: Arc<str>,
}

impl ContextPackage {
    /// Builds a package from its three texts; each present text must be non-empty.
    pub fn new(
        id: impl Into<String>,
        system: Option<String>,
        context: String,
        prompt: String,
    ) -> Result<Self> {
        let id = id.into();
        let invalid = |problem: String| Error::InvalidPackage {
            id: id.clone(),
            problem,
        };
        validate_slug(&id)
            .map_err(|p| invalid(format!("bad package id: {p}; rename the directory")))?;
        if system.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(invalid(
                "`system.md` is empty; add text or delete it".into(),
            ));
        }
        if context.trim().is_empty() {
            return Err(invalid(
                "the context is empty; add text to `context.md`".into(),
            ));
        }
        if prompt.trim().is_empty() {
            return Err(invalid(
                "`prompt.md` is empty; write the final instruction".into(),
            ));
        }
        let version = content_version(system.as_deref(), &context, &prompt);
        Ok(Self {
            id,
            version,
            system: system.map(Arc::from),
            context: Arc::from(context),
            prompt: Arc::from(prompt),
        })
    }

    /// Validates the files read from a package directory and builds the package.
    pub fn from_sources(id: &str, sources: PackageSources) -> Result<Self> {
        let invalid = |problem: String| Error::InvalidPackage {
            id: id.to_owned(),
            problem,
        };
        let text = |file: SourceFile| -> Result<String> {
            if file.bytes.is_empty() {
                return Err(invalid(format!(
                    "`{}` is empty; add text or delete it",
                    file.name
                )));
            }
            String::from_utf8(file.bytes).map_err(|e| {
                invalid(format!(
                    "`{}` is not UTF-8 (invalid byte at offset {}); save it as UTF-8",
                    file.name,
                    e.utf8_error().valid_up_to()
                ))
            })
        };
        let prompt = sources.prompt.ok_or_else(|| {
            invalid(
                "no `prompt.md`; every package needs the final instruction in `prompt.md`".into(),
            )
        })?;
        if sources.context.is_empty() {
            return Err(invalid(
                "no context; add `context.md` or a `context/` folder of files".into(),
            ));
        }
        let system = sources.system.map(text).transpose()?;
        let parts = sources
            .context
            .into_iter()
            .map(text)
            .collect::<Result<Vec<_>>>()?;
        let prompt = text(prompt)?;
        Self::new(id, system, parts.join(CONTEXT_FILE_SEPARATOR), prompt)
    }

    /// Rebuilds a package read back from a store, checking the stored version.
    pub fn from_stored(
        id: String,
        version: &str,
        system: Option<String>,
        context: String,
        prompt: String,
    ) -> Result<Self> {
        let package = Self::new(id, system, context, prompt)?;
        if package.version != version {
            return Err(Error::Corrupt(format!(
                "context package `{}` version {version} does not match its stored text (hash {}); the ledger was edited",
                package.id, package.version
            )));
        }
        Ok(package)
    }

    /// The package id (its directory name), stored as `prompt_id`.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// SHA-256 (hex) of the canonical content.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// The system text, if any.
    pub fn system(&self) -> Option<&Arc<str>> {
        self.system.as_ref()
    }
    /// The large, cacheable context.
    pub fn context(&self) -> &Arc<str> {
        &self.context
    }
    /// The final instruction.
    pub fn prompt(&self) -> &Arc<str> {
        &self.prompt
    }
    /// Total UTF-8 bytes of the three texts.
    pub fn byte_len(&self) -> usize {
        self.system.as_ref().map_or(0, |s| s.len()) + self.context.len() + self.prompt.len()
    }
    /// A provider-neutral input token estimate (see [`estimate_tokens`]).
    pub fn estimated_input_tokens(&self) -> u64 {
        self.system.as_deref().map_or(0, estimate_tokens)
            + estimate_tokens(&self.context)
            + estimate_tokens(&self.prompt)
    }
}

/// Estimates tokens as one per four bytes of UTF-8, rounded up: the usual rule
/// of thumb for English text on current tokenizers. Exact counts come from the
/// provider's usage once a request has been answered.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// SHA-256 over a length-prefixed encoding of the three parts, so that moving
/// text between parts always changes the version.
fn content_version(system: Option<&str>, context: &str, prompt: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"apex-package-v1");
    for part in [system, Some(context), Some(prompt)] {
        match part {
            None => hasher.update([0u8]),
            Some(text) => {
                hasher.update([1u8]);
                hasher.update((text.len() as u64).to_le_bytes());
                hasher.update(text.as_bytes());
            }
        }
    }
    hex(&hasher.finalize())
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// SHA-256 (hex) of arbitrary bytes, e.g. an exact request body.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &[u8]) -> SourceFile {
        SourceFile {
            name: name.into(),
            bytes: text.to_vec(),
        }
    }

    fn sources() -> PackageSources {
        PackageSources {
            system: Some(file("system.md", b"You are careful.")),
            context: vec![file("context.md", b"A long document.")],
            prompt: Some(file("prompt.md", b"Summarise it.")),
        }
    }

    #[test]
    fn version_is_stable_and_content_addressed() {
        let a = ContextPackage::from_sources("ctx-01", sources()).unwrap();
        let b = ContextPackage::from_sources("ctx-01", sources()).unwrap();
        assert_eq!(a.version(), b.version());
        assert_eq!(a.version().len(), 64);
        let mut moved = sources();
        moved.system = None;
        moved.context = vec![file("context.md", b"You are careful.A long document.")];
        let c = ContextPackage::from_sources("ctx-01", moved).unwrap();
        assert_ne!(a.version(), c.version());
    }

    #[test]
    fn context_folder_files_are_joined_in_order() {
        let mut s = sources();
        s.context = vec![
            file("context/a.md", b"first"),
            file("context/b.md", b"second"),
        ];
        let p = ContextPackage::from_sources("ctx", s).unwrap();
        assert_eq!(&**p.context(), "first\n\nsecond");
    }

    #[test]
    fn missing_prompt_empty_and_non_utf8_files_are_refused() {
        let mut s = sources();
        s.prompt = None;
        let err = ContextPackage::from_sources("ctx", s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `prompt.md`"), "{err}");

        let mut s = sources();
        s.context = vec![file("context.md", b"")];
        let err = ContextPackage::from_sources("ctx", s)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`context.md` is empty"), "{err}");

        let mut s = sources();
        s.system = Some(file("system.md", b"ok \xff\xfe"));
        let err = ContextPackage::from_sources("ctx", s)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`system.md` is not UTF-8 (invalid byte at offset 3)"),
            "{err}"
        );
    }

    #[test]
    fn stored_text_must_match_version() {
        let p = ContextPackage::from_sources("ctx", sources()).unwrap();
        let err = ContextPackage::from_stored("ctx".into(), "00", None, "x".into(), "y".into());
        assert!(err.is_err());
        let again = ContextPackage::from_stored(
            "ctx".into(),
            p.version(),
            p.system().map(|s| s.to_string()),
            p.context().to_string(),
            p.prompt().to_string(),
        )
        .unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn token_estimate_rounds_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcde"), 2);
    }
}
