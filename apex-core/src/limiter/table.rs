//! Limits per provider and model: the built-in tier table, a `--limits`
//! file laid over it (and capping what servers report), and what one request
//! counts against each limit ([`Charge`]).

use std::collections::HashMap;

use serde::Deserialize;

use crate::catalog::Catalog;
use crate::condition::ProviderKind;
use crate::error::{Error, Result};
use crate::provider::Usage;

const DEFAULTS: &str = include_str!("../limits.toml");

/// Per-minute limits of one model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// OpenAI tokens per minute (input, cached included, plus output).
    pub tpm: Option<u64>,
    /// Anthropic input tokens per minute (uncached input plus cache writes).
    pub itpm: Option<u64>,
    /// Anthropic output tokens per minute.
    pub otpm: Option<u64>,
    /// OpenAI's per-model limit on tokens enqueued in batches (`apex run
    /// --batch`); learned from a refused batch when not given.
    #[serde(default)]
    pub batch_queue_tokens: Option<u64>,
}

impl Limits {
    pub(crate) fn dims(&self, provider: ProviderKind) -> [Option<u64>; 3] {
        match provider {
            ProviderKind::OpenAi => [self.rpm, self.tpm, None],
            ProviderKind::Anthropic => [self.rpm, self.itpm, self.otpm],
        }
    }
}

/// What one request counts against each dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    /// Requests (1 per attempt).
    pub requests: u64,
    /// Input-side tokens as the provider counts them.
    pub input: u64,
    /// Output tokens (Anthropic OTPM; 0 for OpenAI, whose TPM is `input`).
    pub output: u64,
}

impl Charge {
    pub(crate) fn amounts(self) -> [u64; 3] {
        [self.requests, self.input, self.output]
    }

    /// The reservation for a request: `uncached` input tokens (not expected
    /// from the cache), `cache_write` tokens expected to be written, `total`
    /// input, and the output budget `max_tokens`.
    pub fn estimate(
        provider: ProviderKind,
        uncached: u64,
        cache_write: u64,
        total: u64,
        max_tokens: u64,
    ) -> Self {
        match provider {
            ProviderKind::Anthropic => Self {
                requests: 1,
                input: uncached + cache_write,
                output: max_tokens,
            },
            ProviderKind::OpenAi => Self {
                requests: 1,
                input: total + max_tokens,
                output: 0,
            },
        }
    }

    /// What a response's usage actually counts.
    pub fn actual(provider: ProviderKind, usage: &Usage) -> Self {
        match provider {
            ProviderKind::Anthropic => Self {
                requests: 1,
                input: usage.input_tokens + usage.cache_write_tokens,
                output: usage.output_tokens,
            },
            ProviderKind::OpenAi => Self {
                requests: 1,
                input: usage.total_input() + usage.output_tokens,
                output: 0,
            },
        }
    }
}

/// Limits per provider and model: the built-in tier table (for estimates,
/// `--dry-run` and cache TTL choices) with a `--limits` file laid over it;
/// the file's entries are also caps on what is learned from the server.
#[derive(Debug, Clone, Default)]
pub struct LimitTable {
    /// The tier table with the file's entries laid over it.
    entries: Vec<(ProviderKind, String, Limits)>,
    /// The file's entries alone: pacing never goes above them.
    caps: Vec<(ProviderKind, String, Limits)>,
    /// `--no-rate-limiting`: no pacing at all, not even limits learned from
    /// response headers (a 429's `retry-after` is still honoured).
    off: bool,
    /// `--workers N`: this process takes 1/N of every limit.
    share: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    openai: HashMap<String, Limits>,
    #[serde(default)]
    anthropic: HashMap<String, Limits>,
}

/// The entries of a limits file (`[openai."gpt-5"] rpm tpm`,
/// `[anthropic."…"] rpm itpm otpm`), checked: unknown keys, a dimension of
/// the other provider and a limit of 0 are errors.
pub fn parse_limits_file(text: &str) -> Result<Vec<(ProviderKind, String, Limits)>> {
    let file: LimitsFile = toml::from_str(text)
        .map_err(|e| Error::LimitsFile(e.message().trim().replace('\n', " ")))?;
    let mut entries = Vec::new();
    for (provider, models) in [
        (ProviderKind::OpenAi, file.openai),
        (ProviderKind::Anthropic, file.anthropic),
    ] {
        for (model, limits) in models {
            let wrong = match provider {
                ProviderKind::OpenAi if limits.itpm.is_some() || limits.otpm.is_some() => {
                    Some("OpenAI limits are rpm and tpm; itpm and otpm are Anthropic's")
                }
                ProviderKind::Anthropic if limits.tpm.is_some() => {
                    Some("Anthropic limits are rpm, itpm and otpm; tpm is OpenAI's")
                }
                ProviderKind::Anthropic if limits.batch_queue_tokens.is_some() => Some(
                    "batch_queue_tokens is OpenAI's per-model limit; Anthropic limits batches by requests, not tokens",
                ),
                _ => None,
            };
            if let Some(problem) = wrong {
                return Err(Error::LimitsFile(format!(
                    "[{provider}.\"{model}\"]: {problem}"
                )));
            }
            if [
                limits.rpm,
                limits.tpm,
                limits.itpm,
                limits.otpm,
                limits.batch_queue_tokens,
            ]
            .contains(&Some(0))
            {
                return Err(Error::LimitsFile(format!(
                    "[{provider}.\"{model}\"]: a limit of 0 admits nothing; leave it out to mean no limit"
                )));
            }
            entries.push((provider, model, limits));
        }
    }
    entries.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(entries)
}

impl LimitTable {
    /// The documented defaults (`limits.toml`), with no caps: pacing follows
    /// what the server reports.
    pub fn defaults() -> Self {
        Self {
            entries: parse_limits_file(DEFAULTS).expect("the built-in limits are valid"),
            caps: Vec::new(),
            off: false,
            share: 1,
        }
    }

    /// The defaults with a user file's entries laid over them; the file's
    /// entries also cap what is learned from the server.
    pub fn with_file(text: &str) -> Result<Self> {
        let mut table = Self::defaults();
        let caps = parse_limits_file(text)?;
        for (provider, model, limits) in &caps {
            table
                .entries
                .retain(|(p, m, _)| !(p == provider && m == model));
            table.entries.push((*provider, model.clone(), *limits));
        }
        table.caps = caps;
        Ok(table)
    }

    /// No limits at all (`--no-rate-limiting`): headers teach nothing either.
    pub fn none() -> Self {
        Self {
            entries: Vec::new(),
            caps: Vec::new(),
            off: true,
            share: 1,
        }
    }

    /// Whether pacing is off (`--no-rate-limiting`).
    pub fn is_off(&self) -> bool {
        self.off
    }

    /// Each limit (learned or capped) divided among `n` processes sharing
    /// one account, so that together they stay under it.
    pub fn shared_by(mut self, n: u32) -> Self {
        self.share = n.max(1);
        self
    }

    /// The share this process takes (`--workers`; 1 by default).
    pub fn share(&self) -> u32 {
        self.share.max(1)
    }

    /// Whether no model has limits to plan with.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The limits to plan with (estimates, `--dry-run`, cache TTLs): the
    /// file's, else the tier table's, matched through the catalog's aliases.
    pub fn lookup(&self, catalog: &Catalog, provider: ProviderKind, model: &str) -> Limits {
        find(&self.entries, catalog, provider, model)
    }

    /// The user's cap for a model (`--limits`): pacing uses at most this,
    /// whatever the server reports.
    pub fn cap(&self, catalog: &Catalog, provider: ProviderKind, model: &str) -> Limits {
        find(&self.caps, catalog, provider, model)
    }
}

fn find(
    entries: &[(ProviderKind, String, Limits)],
    catalog: &Catalog,
    provider: ProviderKind,
    model: &str,
) -> Limits {
    let key = bucket_key(catalog, provider, model);
    entries
        .iter()
        .find(|(p, m, _)| *p == provider && bucket_key(catalog, *p, m) == key)
        .map(|(_, _, l)| *l)
        .unwrap_or_default()
}

/// The limiter key of a model: its catalog entry's first id, so a dated
/// snapshot and its alias share one budget.
pub fn bucket_key(catalog: &Catalog, provider: ProviderKind, model: &str) -> String {
    let canonical = catalog
        .lookup(provider, model)
        .and_then(|m| m.ids.first().map(String::as_str))
        .unwrap_or(model);
    format!("{provider}/{canonical}")
}
