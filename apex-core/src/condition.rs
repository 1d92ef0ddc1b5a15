//! Conditions: named, immutable model configurations, and their TOML file.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which API a condition is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
}

impl ProviderKind {
    /// The name used in files, the store and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }

    /// Parses the name written by [`ProviderKind::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "openai" => Some(Self::OpenAi),
            "anthropic" => Some(Self::Anthropic),
            _ => None,
        }
    }

    /// The environment variable holding this provider's API key.
    pub fn api_key_env(self) -> &'static str {
        match self {
            Self::OpenAi => "OPENAI_API_KEY",
            Self::Anthropic => "ANTHROPIC_API_KEY",
        }
    }

    /// The environment variable overriding this provider's base URL.
    pub fn base_url_env(self) -> &'static str {
        match self {
            Self::OpenAi => "OPENAI_BASE_URL",
            Self::Anthropic => "ANTHROPIC_BASE_URL",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named model configuration. Once a run has used a slug, its parameters
/// never change (the store enforces it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Stable name, e.g. `prod-sonnet45`.
    pub slug: String,
    /// The API to call.
    pub provider: ProviderKind,
    /// The provider's model id, e.g. `claude-sonnet-4-5-20250929`.
    pub model: String,
    /// Sampling temperature; leave it out where the model rejects it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling; most users leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Maximum output tokens (reasoning included for OpenAI reasoning models).
    pub max_tokens: u32,
    /// Reasoning effort: OpenAI `reasoning_effort` (`reasoning.effort` on
    /// the Responses API), Anthropic `output_config.effort`. Which values a
    /// model takes is in the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// OpenAI only: which endpoint, `chat` (Chat Completions, the default)
    /// or `responses`.
    #[serde(default, skip_serializing_if = "Api::is_chat")]
    pub api: Api,
    /// Anthropic only: extended thinking as the API names it: `adaptive`
    /// (the model decides), `enabled` (with `thinking_budget`) or
    /// `disabled`. Left out, the model's own default applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<Thinking>,
    /// Anthropic only: the thinking budget in tokens for `thinking =
    /// "enabled"` (at least 1024, below `max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking_budget: Option<u32>,
    /// Stream the answer (SSE). Apex also streams on its own when
    /// `max_tokens` is above what a request can safely wait for
    /// ([`NON_STREAMING_MAX_TOKENS`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Responses API only: let OpenAI store the response (`store: true`);
    /// Apex sends `store: false` unless this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
}

/// The largest `max_tokens` Apex sends without streaming. Anthropic's SDKs
/// refuse a non-streaming request whose expected time (an hour per 128,000
/// output tokens) passes the 10-minute limit: 600 s × 128,000 / 3,600 s.
pub const NON_STREAMING_MAX_TOKENS: u32 = 21_333;

/// Which OpenAI endpoint a condition is sent to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/chat/completions`.
    #[default]
    Chat,
    /// `POST /v1/responses`.
    Responses,
}

impl Api {
    /// Whether this is the default, Chat Completions.
    pub fn is_chat(&self) -> bool {
        *self == Self::Chat
    }

    /// The name used in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Responses => "responses",
        }
    }
}

/// Anthropic's thinking modes, as the API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Thinking {
    /// `{"type": "adaptive"}`: the model decides how much to think.
    Adaptive,
    /// `{"type": "enabled", "budget_tokens": N}`.
    Enabled,
    /// `{"type": "disabled"}`.
    Disabled,
}

impl Thinking {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Adaptive => "adaptive",
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

/// The smallest thinking budget Anthropic accepts.
pub const MIN_THINKING_BUDGET: u32 = 1024;

const REASONING_EFFORTS: &[&str] = &["none", "minimal", "low", "medium", "high", "xhigh", "max"];

impl Condition {
    /// Checks the parameters that can be judged without knowing the model.
    pub fn validate(&self) -> Result<()> {
        let invalid = |problem: String| Error::InvalidCondition {
            slug: self.slug.clone(),
            problem,
        };
        validate_slug(&self.slug).map_err(|problem| Error::InvalidCondition {
            slug: self.slug.clone(),
            problem,
        })?;
        if self.model.trim().is_empty() {
            return Err(invalid(
                "`model` is empty; set the provider's model id".into(),
            ));
        }
        if self.model.trim() != self.model {
            return Err(invalid(
                "`model` has leading or trailing white space".into(),
            ));
        }
        if self.max_tokens == 0 {
            return Err(invalid("`max_tokens` must be greater than 0".into()));
        }
        let max_temperature = match self.provider {
            ProviderKind::OpenAi => 2.0,
            ProviderKind::Anthropic => 1.0,
        };
        if let Some(t) = self.temperature
            && !(0.0..=max_temperature).contains(&t)
        {
            return Err(invalid(format!(
                "`temperature` {t} is out of range for {}; use a value from 0 to {max_temperature}",
                self.provider
            )));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(invalid(format!(
                "`top_p` {p} is out of range; use a value above 0 and at most 1"
            )));
        }
        if let Some(effort) = &self.reasoning_effort
            && !REASONING_EFFORTS.contains(&effort.as_str())
        {
            return Err(invalid(format!(
                "`reasoning_effort` `{effort}` is not one of {}",
                REASONING_EFFORTS.join(", ")
            )));
        }
        let anthropic_only = |key: &str| {
            invalid(format!(
                "`{key}` is an Anthropic parameter; remove it for {}",
                self.provider
            ))
        };
        let openai_only = |key: &str| {
            invalid(format!(
                "`{key}` is an OpenAI parameter; remove it for {}",
                self.provider
            ))
        };
        match self.provider {
            ProviderKind::OpenAi => {
                if self.thinking.is_some() {
                    return Err(anthropic_only("thinking"));
                }
                if self.thinking_budget.is_some() {
                    return Err(anthropic_only("thinking_budget"));
                }
                if self.store.is_some() && self.api != Api::Responses {
                    return Err(invalid(
                        "`store` applies to the Responses API only; add `api = \"responses\"` or remove it".into(),
                    ));
                }
            }
            ProviderKind::Anthropic => {
                if !self.api.is_chat() {
                    return Err(openai_only("api"));
                }
                if self.store.is_some() {
                    return Err(openai_only("store"));
                }
            }
        }
        match (self.thinking, self.thinking_budget) {
            (Some(Thinking::Enabled), None) => {
                return Err(invalid(
                    "`thinking = \"enabled\"` needs `thinking_budget` (tokens, at least 1024)"
                        .into(),
                ));
            }
            (Some(Thinking::Enabled), Some(budget)) => {
                if budget < MIN_THINKING_BUDGET {
                    return Err(invalid(format!(
                        "`thinking_budget` {budget} is below the minimum of {MIN_THINKING_BUDGET}"
                    )));
                }
                if budget >= self.max_tokens {
                    return Err(invalid(format!(
                        "`thinking_budget` {budget} must be below `max_tokens` {} (thinking counts toward it); raise max_tokens or lower the budget",
                        self.max_tokens
                    )));
                }
            }
            (Some(other), Some(_)) => {
                return Err(invalid(format!(
                    "`thinking_budget` goes with `thinking = \"enabled\"`, not `{}`; remove it",
                    other.as_str()
                )));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "`thinking_budget` needs `thinking = \"enabled\"`".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether requests of this condition are streamed: asked for, or
    /// needed because `max_tokens` is too large to wait for in one response.
    pub fn streams(&self) -> bool {
        self.stream || self.max_tokens > NON_STREAMING_MAX_TOKENS
    }

    /// The parameters as canonical JSON (slug excluded): what "the same
    /// condition" means when a slug is registered again.
    pub fn params_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("a condition always serializes");
        if let Some(map) = value.as_object_mut() {
            map.remove("slug");
        }
        value.to_string()
    }

    /// The first parameter that differs between two versions of a condition,
    /// phrased as `name: old -> new`.
    pub fn first_difference(&self, newer: &Condition) -> Option<String> {
        let old = serde_json::to_value(self).ok()?;
        let new = serde_json::to_value(newer).ok()?;
        let (old, new) = (old.as_object()?, new.as_object()?);
        let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        keys.into_iter().find_map(|key| {
            let (a, b) = (old.get(key), new.get(key));
            (a != b).then(|| {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or_else(|| "unset".to_owned(), ToString::to_string)
                };
                format!("{key}: {} -> {}", show(a), show(b))
            })
        })
    }
}

/// Checks a slug: 1 to 64 characters of letters, digits, `.`, `_` and `-`.
pub fn validate_slug(slug: &str) -> std::result::Result<(), String> {
    if slug.is_empty() || slug.len() > 64 {
        return Err("a slug must have 1 to 64 characters".into());
    }
    if !slug
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("a slug may hold only letters, digits, `.`, `_` and `-`".into());
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionsFile {
    #[serde(default)]
    condition: Vec<Condition>,
}

/// Parses and validates a conditions file (TOML with `[[condition]]` tables;
/// unknown keys are an error). Every condition is checked before any is
/// returned, so a caller never registers half a file.
pub fn parse_conditions(text: &str) -> Result<Vec<Condition>> {
    let file: ConditionsFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| {
            text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        });
        let message = e.message().trim().replace('\n', " ");
        Error::ConditionsFile(match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        })
    })?;
    if file.condition.is_empty() {
        return Err(Error::ConditionsFile(
            "no `[[condition]]` tables; add at least one".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for condition in &file.condition {
        condition.validate()?;
        if !seen.insert(condition.slug.as_str()) {
            return Err(Error::ConditionsFile(format!(
                "slug `{}` appears twice; each condition needs its own slug",
                condition.slug
            )));
        }
    }
    Ok(file.condition)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[condition]]
slug = "prod-sonnet45"
provider = "anthropic"
model = "claude-sonnet-4-5"
temperature = 0.7
max_tokens = 2048

[[condition]]
slug = "prod-gpt5"
provider = "openai"
model = "gpt-5"
max_tokens = 2048
"#;

    #[test]
    fn parses_valid_file() {
        let conditions = parse_conditions(GOOD).unwrap();
        assert_eq!(conditions.len(), 2);
        assert_eq!(conditions[0].provider, ProviderKind::Anthropic);
        assert_eq!(conditions[1].temperature, None);
    }

    #[test]
    fn rejects_unknown_key_with_line() {
        let text = GOOD.replace("max_tokens = 2048\n\n", "max_tokens = 2048\ncolour = 1\n\n");
        let err = parse_conditions(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
        assert!(err.contains("line 8"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn rejects_unknown_provider() {
        let err = parse_conditions(&GOOD.replace("\"anthropic\"", "\"gemini\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `gemini`"), "{err}");
    }

    #[test]
    fn rejects_out_of_range_and_empty_values() {
        for (from, to, needle) in [
            ("temperature = 0.7", "temperature = 1.5", "out of range"),
            ("\"claude-sonnet-4-5\"", "\"\"", "`model` is empty"),
            (
                "max_tokens = 2048\n\n[[",
                "max_tokens = 0\n\n[[",
                "greater than 0",
            ),
            ("\"prod-sonnet45\"", "\"prod sonnet\"", "slug may hold"),
        ] {
            let err = parse_conditions(&GOOD.replacen(from, to, 1)).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn rejects_duplicate_slug_and_empty_file() {
        let text = GOOD.replace("prod-gpt5", "prod-sonnet45");
        assert!(
            parse_conditions(&text)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(
            parse_conditions("")
                .unwrap_err()
                .to_string()
                .contains("no `[[condition]]`")
        );
    }

    #[test]
    fn current_parameters_parse_and_are_checked() {
        let text = r#"
[[condition]]
slug = "r"
provider = "openai"
model = "gpt-6.2-sol"
api = "responses"
reasoning_effort = "xhigh"
store = true
stream = true
max_tokens = 4096

[[condition]]
slug = "t"
provider = "anthropic"
model = "claude-sonnet-4-5"
thinking = "enabled"
thinking_budget = 2048
max_tokens = 30000
"#;
        let c = parse_conditions(text).unwrap();
        assert_eq!(
            (c[0].api, c[0].store, c[0].stream),
            (Api::Responses, Some(true), true)
        );
        assert!(c[0].params_json().contains("\"api\":\"responses\""));
        assert_eq!(c[1].thinking, Some(Thinking::Enabled));
        assert!(
            c[1].streams(),
            "30000 max_tokens streams without being asked"
        );
        // Defaults are left out of the identity, so older conditions keep theirs.
        let plain = parse_conditions(GOOD).unwrap();
        assert!(!plain[0].params_json().contains("api") && !plain[0].streams());
        for (from, to, needle) in [
            (
                "thinking_budget = 2048",
                "thinking_budget = 512",
                "below the minimum of 1024",
            ),
            (
                "thinking_budget = 2048",
                "thinking_budget = 40000",
                "must be below `max_tokens`",
            ),
            ("thinking_budget = 2048\n", "", "needs `thinking_budget`"),
            (
                "thinking = \"enabled\"",
                "thinking = \"adaptive\"",
                "goes with `thinking = \"enabled\"`",
            ),
            (
                "thinking = \"enabled\"",
                "thinking = \"sometimes\"",
                "unknown variant `sometimes`",
            ),
            (
                "api = \"responses\"",
                "api = \"completions\"",
                "unknown variant `completions`",
            ),
            (
                "provider = \"anthropic\"",
                "provider = \"openai\"",
                "`thinking` is an Anthropic parameter",
            ),
            (
                "reasoning_effort = \"xhigh\"",
                "reasoning_effort = \"extreme\"",
                "is not one of",
            ),
            (
                "api = \"responses\"\n",
                "",
                "`store` applies to the Responses API only",
            ),
        ] {
            let err = parse_conditions(&text.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{from} -> {to}: {err}");
        }
        let err = parse_conditions(&text.replace(
            "thinking = \"enabled\"\nthinking_budget = 2048\n",
            "api = \"responses\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`api` is an OpenAI parameter"), "{err}");
    }

    #[test]
    fn difference_names_the_parameter() {
        let conditions = parse_conditions(GOOD).unwrap();
        let mut changed = conditions[0].clone();
        changed.temperature = Some(0.2);
        assert_eq!(
            conditions[0].first_difference(&changed).unwrap(),
            "temperature: 0.7 -> 0.2"
        );
        assert_eq!(conditions[0].first_difference(&conditions[0]), None);
        assert!(!conditions[0].params_json().contains("slug"));
    }
}
