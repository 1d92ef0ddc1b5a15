//! The model catalog: per model its window, output limit, accepted
//! parameters, prices and lifecycle dates. Data, not code: the built-in table
//! is `catalog.toml`, and users can override or extend it with a file of the
//! same shape.

use serde::Deserialize;

use crate::condition::{Condition, ProviderKind, Thinking};
use crate::error::{Error, Result};
use crate::plan::PackageRef;
use crate::provider::{CacheControls, Usage};

const BUILT_IN: &str = include_str!("catalog.toml");

/// Prices in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Uncached input.
    pub input: f64,
    /// Cache write, 5-minute TTL (OpenAI: same as input).
    pub cache_write_5m: f64,
    /// Cache write, 1-hour TTL.
    pub cache_write_1h: f64,
    /// Cache read.
    pub cache_read: f64,
    /// Output, reasoning included.
    pub output: f64,
    /// Multiplier for the Batch APIs (0.5 = half price).
    pub batch_discount: f64,
    /// Premium rates for requests whose total input passes a threshold.
    #[serde(default)]
    pub long_context: Option<LongContextPrices>,
}

/// A long-context price tier: once a request's total input (uncached,
/// cache writes and cache reads) is above `above_input_tokens`, all of its
/// tokens, output included, are billed at these rates.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContextPrices {
    /// The threshold on total input tokens.
    pub above_input_tokens: u64,
    /// Uncached input.
    pub input: f64,
    /// Cache write, 5-minute TTL.
    pub cache_write_5m: f64,
    /// Cache write, 1-hour TTL.
    pub cache_write_1h: f64,
    /// Cache read.
    pub cache_read: f64,
    /// Output.
    pub output: f64,
}

impl Prices {
    /// The cost of one response's usage, in USD.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let (input, cw5m, cw1h, read, output) = match self.long_context {
            Some(lc) if usage.total_input() > lc.above_input_tokens => (
                lc.input,
                lc.cache_write_5m,
                lc.cache_write_1h,
                lc.cache_read,
                lc.output,
            ),
            _ => (
                self.input,
                self.cache_write_5m,
                self.cache_write_1h,
                self.cache_read,
                self.output,
            ),
        };
        let cw_1h = usage.cache_write_1h_tokens.min(usage.cache_write_tokens);
        let cw_5m = usage.cache_write_tokens - cw_1h;
        (usage.input_tokens as f64 * input
            + cw_5m as f64 * cw5m
            + cw_1h as f64 * cw1h
            + usage.cache_read_tokens as f64 * read
            + usage.output_tokens as f64 * output)
            / 1_000_000.0
    }
}

/// What Apex knows about one model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// The API.
    pub provider: ProviderKind,
    /// Model ids that name this model (alias and dated snapshots).
    pub ids: Vec<String>,
    /// Tokens of input plus output the model accepts.
    pub context_window: u64,
    /// Largest `max_tokens` the model accepts.
    pub max_output: u64,
    /// Shortest prefix the provider caches.
    #[serde(default)]
    pub min_cacheable_tokens: u64,
    /// Highest temperature accepted.
    #[serde(default)]
    pub max_temperature: Option<f64>,
    /// The older spelling of `sampling = "default-temperature"`, still read
    /// from catalog files; folded into `sampling` when a catalog is loaded.
    #[serde(default, skip_serializing)]
    only_default_temperature: bool,
    /// `temperature` and `top_p` cannot be sent together (Sonnet 4.5).
    #[serde(default)]
    pub rejects_temperature_with_top_p: bool,
    /// A reasoning model: output budget includes reasoning tokens.
    #[serde(default)]
    pub reasoning: bool,
    /// Which sampling parameters (`temperature`, `top_p`) the model takes.
    #[serde(default)]
    pub sampling: Sampling,
    /// The reasoning-effort values the model accepts; empty: it rejects the
    /// parameter.
    #[serde(default)]
    pub efforts: Vec<String>,
    /// Anthropic thinking modes the model accepts; empty: no thinking.
    #[serde(default)]
    pub thinking: Vec<Thinking>,
    /// The model thinks unless told not to (so thinking tokens, billed as
    /// output, count toward `max_tokens` even when a condition says nothing).
    #[serde(default)]
    pub thinks_by_default: bool,
    /// OpenAI's cache controls on this model (Anthropic models always take
    /// `cache_control` breakpoints).
    #[serde(default)]
    pub cache_controls: CacheControls,
    /// When the provider released it (YYYY-MM-DD).
    #[serde(default)]
    pub released_on: Option<String>,
    /// When the provider deprecated it (YYYY-MM-DD).
    #[serde(default)]
    pub deprecated_on: Option<String>,
    /// When the provider retires (retired) it (YYYY-MM-DD).
    #[serde(default)]
    pub retires_on: Option<String>,
    /// Where these facts come from.
    pub source: String,
    /// Prices.
    pub prices: Prices,
}

/// Which sampling parameters a model takes. The defaults (1 for both)
/// are always accepted; the rules are about other values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampling {
    /// `temperature` and `top_p` as the provider's ranges allow.
    #[default]
    Any,
    /// A temperature other than 1 is refused with a 400 (GPT-5); `top_p`
    /// is taken.
    DefaultTemperature,
    /// Any non-default `temperature` or `top_p` is refused with a 400.
    Rejected,
    /// Non-default values only with reasoning effort `none` (OpenAI's newer
    /// models).
    EffortNone,
}

impl Sampling {
    /// Whether the server refuses `value` for `name` (`temperature` or
    /// `top_p`) at this reasoning effort.
    pub fn refuses(self, name: &str, value: f64, effort: Option<&str>) -> bool {
        value != 1.0
            && match self {
                Self::Any => false,
                Self::DefaultTemperature => name == "temperature",
                Self::Rejected => true,
                Self::EffortNone => effort != Some("none"),
            }
    }
}

/// Where a model is in its life on a given day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not deprecated.
    Current,
    /// Deprecated, still answering.
    Deprecated,
    /// Past its retirement date: requests fail.
    Retired,
}

impl Status {
    /// The name shown by `apex models`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Deprecated => "deprecated",
            Self::Retired => "retired",
        }
    }
}

impl ModelInfo {
    /// One spelling per rule: the older `only_default_temperature` becomes
    /// its `sampling` value.
    fn normalised(mut self) -> Self {
        if std::mem::take(&mut self.only_default_temperature) && self.sampling == Sampling::Any {
            self.sampling = Sampling::DefaultTemperature;
        }
        self
    }

    /// Current, deprecated or retired on `today` (YYYY-MM-DD).
    pub fn status(&self, today: &str) -> Status {
        if self.retires_on.as_deref().is_some_and(|d| d <= today) {
            Status::Retired
        } else if self.deprecated_on.as_deref().is_some_and(|d| d <= today) {
            Status::Deprecated
        } else {
            Status::Current
        }
    }

    /// Whether the model thinks for this condition (asked, or by default).
    pub fn thinks(&self, condition: &Condition) -> bool {
        match condition.thinking {
            Some(Thinking::Disabled) => false,
            Some(_) => true,
            None => self.thinks_by_default,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    model: Vec<ModelInfo>,
}

/// The model catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    models: Vec<ModelInfo>,
}

impl Catalog {
    /// The built-in catalog.
    pub fn built_in() -> Self {
        let file: CatalogFile = toml::from_str(BUILT_IN).expect("the built-in catalog is valid");
        Self {
            models: file.model.into_iter().map(ModelInfo::normalised).collect(),
        }
    }

    /// The built-in catalog with a user file's entries laid over it: an entry
    /// sharing an id with a built-in one replaces it.
    pub fn with_overrides(text: &str) -> Result<Self> {
        let file: CatalogFile = toml::from_str(text)
            .map_err(|e| Error::CatalogFile(e.message().trim().replace('\n', " ")))?;
        let mut catalog = Self::built_in();
        for model in file.model.into_iter().map(ModelInfo::normalised) {
            catalog
                .models
                .retain(|m| !m.ids.iter().any(|id| model.ids.contains(id)));
            catalog.models.push(model);
        }
        Ok(catalog)
    }

    /// Every entry, in catalog order.
    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    /// The entry for a provider's model id, if known.
    pub fn lookup(&self, provider: ProviderKind, model: &str) -> Option<&ModelInfo> {
        self.models
            .iter()
            .find(|m| m.provider == provider && m.ids.iter().any(|id| id == model))
    }

    /// The cost of a response, or `None` for a model the catalog lacks.
    pub fn cost(&self, condition: &Condition, usage: &Usage) -> Option<f64> {
        self.lookup(condition.provider, &condition.model)
            .map(|m| m.prices.cost(usage))
    }

    /// The cost of a response from a provider batch (the batch discount on
    /// every rate), or `None` for a model the catalog lacks.
    pub fn batch_cost(&self, condition: &Condition, usage: &Usage) -> Option<f64> {
        self.lookup(condition.provider, &condition.model)
            .map(|m| m.prices.cost(usage) * m.prices.batch_discount)
    }
}

/// A preflight finding that does not stop the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning(pub String);

/// Checks a condition against its model and the planned contexts before any
/// paid request. Errors name the condition and the fix; warnings are
/// returned for the caller to show.
pub fn preflight(
    catalog: &Catalog,
    condition: &Condition,
    packages: &[PackageRef],
    today: &str,
    allow_retired: bool,
) -> Result<Vec<Warning>> {
    let slug = &condition.slug;
    let fail = |problem: String| Err(Error::Preflight(format!("condition `{slug}`: {problem}")));
    let mut warnings = Vec::new();
    let Some(model) = catalog.lookup(condition.provider, &condition.model) else {
        warnings.push(Warning(format!(
            "condition `{slug}`: model `{}` is not in the catalog; no cost will be computed and its window is not checked",
            condition.model
        )));
        return Ok(warnings);
    };
    if let Err(problem) = check_parameters(model, condition) {
        return fail(problem);
    }
    if !allow_retired
        && model.status(today) == Status::Retired
        && let Some(retired) = &model.retires_on
    {
        return fail(format!(
            "{} was retired on {retired} and every request would fail; pick a current model (`apex models`) or pass --allow-retired to try anyway",
            condition.model
        ));
    }
    let tokenizer = crate::tokens::Tokenizer::for_provider(condition.provider);
    for package in packages {
        let input = package.tokens(tokenizer);
        let needed = input + u64::from(condition.max_tokens);
        if needed > model.context_window {
            return fail(format!(
                "context `{}` ({input} input tokens, {}) plus max_tokens {} exceeds {}'s window of {} tokens; use a model with a larger window, a smaller context or fewer max_tokens",
                package.id,
                tokenizer.name(),
                condition.max_tokens,
                condition.model,
                model.context_window
            ));
        }
        if let Some(lc) = model.prices.long_context
            && input * 10 > lc.above_input_tokens * 9
        {
            warnings.push(Warning(format!(
                "condition `{slug}`: context `{}` ({input} input tokens) approaches {}'s long-context price tier above {} tokens, where every token costs more",
                package.id, condition.model, lc.above_input_tokens
            )));
        }
        if needed * 10 > model.context_window * 9 {
            warnings.push(Warning(format!(
                "condition `{slug}`: context `{}` ({input} input tokens + {} max_tokens) uses over 90% of {}'s window",
                package.id, condition.max_tokens, condition.model
            )));
        }
    }
    warnings.extend(lifecycle_warnings(model, condition, today));
    // A prefix under the model's caching minimum is never cached: every
    // replicate pays the whole input (the whole package bounds the prefix).
    let uncacheable: Vec<&str> = packages
        .iter()
        .filter(|p| p.tokens(tokenizer) < model.min_cacheable_tokens)
        .map(|p| p.id.as_str())
        .collect();
    if !uncacheable.is_empty() {
        let shown: Vec<&str> = uncacheable.iter().take(5).copied().collect();
        warnings.push(Warning(format!(
            "condition `{slug}`: {} of {} context(s) ({}{}) are below {}'s prompt-caching minimum of {} tokens: they will not be cached, and every replicate pays their whole input",
            uncacheable.len(),
            packages.len(),
            shown.join(", "),
            if uncacheable.len() > shown.len() { ", …" } else { "" },
            condition.model,
            model.min_cacheable_tokens
        )));
    }
    Ok(warnings)
}

/// The parameters the model rejects, with the fix.
fn check_parameters(model: &ModelInfo, condition: &Condition) -> std::result::Result<(), String> {
    if let (Some(t), Some(max)) = (condition.temperature, model.max_temperature)
        && t > max
    {
        return Err(format!(
            "{} accepts temperature up to {max}, not {t}",
            condition.model
        ));
    }
    if model.rejects_temperature_with_top_p
        && condition.temperature.is_some()
        && condition.top_p.is_some()
    {
        return Err(format!(
            "{} rejects `temperature` and `top_p` together; keep one of them",
            condition.model
        ));
    }
    if u64::from(condition.max_tokens) > model.max_output {
        return Err(format!(
            "max_tokens {} is above {}'s output limit of {}; lower it",
            condition.max_tokens, condition.model, model.max_output
        ));
    }
    check_sampling(model, condition)?;
    if let Some(effort) = &condition.reasoning_effort
        && !model.efforts.contains(effort)
    {
        return Err(if model.efforts.is_empty() {
            format!(
                "{} takes no reasoning effort; remove `reasoning_effort`",
                condition.model
            )
        } else {
            format!(
                "{} does not accept reasoning_effort `{effort}`; use one of {}",
                condition.model,
                model.efforts.join(", ")
            )
        });
    }
    if let Some(mode) = condition.thinking
        && !model.thinking.contains(&mode)
    {
        return Err(if model.thinking.is_empty() {
            format!(
                "{} has no extended thinking; remove `thinking`",
                condition.model
            )
        } else {
            let accepted: Vec<&str> = model.thinking.iter().map(|t| t.as_str()).collect();
            format!(
                "{} rejects thinking `{}`; use one of {}",
                condition.model,
                mode.as_str(),
                accepted.join(", ")
            )
        });
    }
    Ok(())
}

/// Sampling parameters against what the model takes (and against thinking,
/// which Anthropic does not combine with a changed temperature).
fn check_sampling(model: &ModelInfo, condition: &Condition) -> std::result::Result<(), String> {
    let effort = condition.reasoning_effort.as_deref();
    let refused: Vec<&str> = [
        ("temperature", condition.temperature),
        ("top_p", condition.top_p),
    ]
    .into_iter()
    .filter(|(name, value)| value.is_some_and(|v| model.sampling.refuses(name, v, effort)))
    .map(|(name, _)| name)
    .collect();
    if let Some(first) = refused.first() {
        let names = refused
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(" and ");
        return Err(match model.sampling {
            Sampling::DefaultTemperature => format!(
                "{} accepts only the default temperature (1); remove `temperature` from the condition and register it under a new slug",
                condition.model
            ),
            Sampling::EffortNone => format!(
                "{} accepts {names} only with reasoning_effort `none`; set `reasoning_effort = \"none\"` or remove {names}",
                condition.model
            ),
            Sampling::Any | Sampling::Rejected => format!(
                "{} accepts only the default sampling and answers 400 to `{first}`; remove {names} from the condition and register it under a new slug",
                condition.model
            ),
        });
    }
    if condition.provider == ProviderKind::Anthropic
        && model.thinks(condition)
        && condition.temperature.is_some_and(|t| t != 1.0)
    {
        return Err(format!(
            "{} does not take a temperature while it thinks; remove `temperature` or set `thinking = \"disabled\"`",
            condition.model
        ));
    }
    Ok(())
}

/// Deprecation, retirement and reasoning-budget warnings.
fn lifecycle_warnings(model: &ModelInfo, condition: &Condition, today: &str) -> Vec<Warning> {
    let slug = &condition.slug;
    let mut warnings = Vec::new();
    if let Some(retires) = &model.retires_on {
        if retires.as_str() <= today {
            warnings.push(Warning(format!(
                "condition `{slug}`: {} was retired on {retires}; sent anyway (--allow-retired): expect 404 from the real API",
                condition.model
            )));
        } else {
            warnings.push(Warning(format!(
                "condition `{slug}`: {} is deprecated and retires on {retires}",
                condition.model
            )));
        }
    } else if let Some(since) = &model.deprecated_on
        && since.as_str() <= today
    {
        warnings.push(Warning(format!(
            "condition `{slug}`: {} is deprecated (since {since})",
            condition.model
        )));
    }
    if model.thinks(condition) && condition.max_tokens < 4096 {
        warnings.push(Warning(format!(
            "condition `{slug}`: {} thinks before it answers and its thinking counts toward max_tokens {}; the answer may be cut short or empty",
            condition.model, condition.max_tokens
        )));
    }
    if model.reasoning && condition.max_tokens < 25_000 {
        warnings.push(Warning(format!(
            "condition `{slug}`: {} spends output tokens on reasoning; max_tokens {} may end with little visible text (OpenAI suggests ~25000)",
            condition.model, condition.max_tokens
        )));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(provider: ProviderKind, model: &str, temperature: Option<f64>) -> Condition {
        Condition {
            slug: "c".into(),
            provider,
            model: model.into(),
            temperature,
            top_p: None,
            max_tokens: 2048,
            reasoning_effort: None,
            api: Default::default(),
            thinking: None,
            thinking_budget: None,
            stream: false,
            store: None,
        }
    }

    fn package(tokens: u64) -> PackageRef {
        PackageRef {
            id: "ctx-01".into(),
            version: "v".into(),
            estimated_tokens: tokens,
            byte_len: tokens * 4,
            o200k_tokens: tokens,
        }
    }

    #[test]
    fn anthropic_cost_matches_the_documented_formula() {
        // providers.md §1.2: input×P + 5m write×1.25P + 1h write×2P + read×0.1P + output×Pout.
        let catalog = Catalog::built_in();
        let c = condition(
            ProviderKind::Anthropic,
            "claude-sonnet-4-5-20250929",
            Some(0.7),
        );
        let usage = Usage {
            input_tokens: 50,
            cache_write_tokens: 128_000,
            cache_write_1h_tokens: 28_000,
            cache_read_tokens: 0,
            output_tokens: 1000,
            reasoning_tokens: 0,
        };
        let expected = (50.0 * 3.0 + 100_000.0 * 3.75 + 28_000.0 * 6.0 + 1000.0 * 15.0) / 1e6;
        assert!((catalog.cost(&c, &usage).unwrap() - expected).abs() < 1e-12);
        let hit = Usage {
            input_tokens: 50,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            cache_read_tokens: 128_000,
            output_tokens: 1000,
            reasoning_tokens: 0,
        };
        // 128K read at $0.30/M + 50 input at $3/M + 1000 output at $15/M.
        assert!((catalog.cost(&c, &hit).unwrap() - 0.05355).abs() < 1e-12);
    }

    #[test]
    fn long_context_tier_prices_every_token_above_the_threshold() {
        let catalog = Catalog::built_in();
        let c = condition(ProviderKind::Anthropic, "claude-sonnet-4-5", None);
        let usage = |read| Usage {
            input_tokens: 1000,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            cache_read_tokens: read,
            output_tokens: 500,
            reasoning_tokens: 0,
        };
        // 199,000 + 1,000 = 200,000: not above the threshold.
        let standard = (1000.0 * 3.0 + 199_000.0 * 0.30 + 500.0 * 15.0) / 1e6;
        assert!((catalog.cost(&c, &usage(199_000)).unwrap() - standard).abs() < 1e-12);
        // 200,001 total input: every token at the premium rates.
        let premium = (1000.0 * 6.0 + 199_001.0 * 0.60 + 500.0 * 22.5) / 1e6;
        assert!((catalog.cost(&c, &usage(199_001)).unwrap() - premium).abs() < 1e-12);
        let w = preflight(&catalog, &c, &[package(185_000)], "2026-11-27", false).unwrap();
        assert!(
            w.iter().any(|w| w.0.contains("long-context price tier")),
            "{w:?}"
        );
    }

    #[test]
    fn batch_discount_halves_the_price() {
        let catalog = Catalog::built_in();
        let m = catalog.lookup(ProviderKind::OpenAi, "gpt-5").unwrap();
        assert_eq!(m.prices.batch_discount, 0.5);
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            ..Usage::default()
        };
        // $1.25 input + $10 output per million, halved.
        assert!((m.prices.cost(&usage) * m.prices.batch_discount - 5.625).abs() < 1e-12);
    }

    #[test]
    fn openai_cost_uses_cached_price_for_reads() {
        let catalog = Catalog::built_in();
        let c = condition(ProviderKind::OpenAi, "gpt-5", None);
        // prompt_tokens 2006 with 1920 cached → uncached 86.
        let usage = Usage {
            input_tokens: 86,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            cache_read_tokens: 1920,
            output_tokens: 300,
            reasoning_tokens: 200,
        };
        let expected = (86.0 * 1.25 + 1920.0 * 0.125 + 300.0 * 10.0) / 1e6;
        assert!((catalog.cost(&c, &usage).unwrap() - expected).abs() < 1e-12);
        assert_eq!(
            catalog.cost(&condition(ProviderKind::OpenAi, "gpt-9", None), &usage),
            None
        );
    }

    #[test]
    fn preflight_refuses_gpt5_temperature_and_gpt4o_overflow() {
        let catalog = Catalog::built_in();
        let today = "2026-11-27";
        let err = preflight(
            &catalog,
            &condition(ProviderKind::OpenAi, "gpt-5", Some(0.7)),
            &[package(1000)],
            today,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("only the default temperature"), "{err}");
        let err = preflight(
            &catalog,
            &condition(ProviderKind::OpenAi, "gpt-4o", Some(0.7)),
            &[package(127_000)],
            today,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("exceeds gpt-4o's window of 128000"), "{err}");
        assert!(
            preflight(
                &catalog,
                &condition(ProviderKind::OpenAi, "gpt-4o", Some(0.7)),
                &[package(100_000)],
                today,
                false
            )
            .is_ok()
        );
        let mut both = condition(ProviderKind::Anthropic, "claude-sonnet-4-5", Some(0.7));
        both.top_p = Some(0.9);
        assert!(preflight(&catalog, &both, &[package(10)], today, false).is_err());
    }

    #[test]
    fn preflight_warns_about_lifecycle_and_unknown_models() {
        let catalog = Catalog::built_in();
        let opus41 = condition(
            ProviderKind::Anthropic,
            "claude-opus-4-1-20250805",
            Some(0.7),
        );
        let err = preflight(&catalog, &opus41, &[package(10)], "2026-11-27", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("retired on 2026-08-05"), "{err}");
        assert!(err.contains("--allow-retired"), "{err}");
        let w = preflight(&catalog, &opus41, &[package(10)], "2026-11-27", true).unwrap();
        assert!(w[0].0.contains("retired on 2026-08-05"), "{w:?}");
        let w = preflight(
            &catalog,
            &condition(ProviderKind::Anthropic, "claude-sonnet-4-5", Some(0.7)),
            &[package(10)],
            "2026-11-27",
            false,
        )
        .unwrap();
        assert!(w[0].0.contains("retires on 2026-11-30"), "{w:?}");
        let w = preflight(
            &catalog,
            &condition(ProviderKind::OpenAi, "my-finetune", None),
            &[package(10)],
            "2026-11-27",
            false,
        )
        .unwrap();
        assert!(w[0].0.contains("not in the catalog"), "{w:?}");
        let gpt4o = catalog.lookup(ProviderKind::OpenAi, "gpt-4o").unwrap();
        assert_eq!(gpt4o.status("2026-10-13"), Status::Current);
        assert_eq!(gpt4o.status("2026-11-29"), Status::Deprecated);
        assert_eq!(gpt4o.status("2027-01-14"), Status::Retired);
    }

    /// Each parameter a current model rejects is refused before anything is
    /// sent, with the fix in the message.
    #[test]
    fn preflight_refuses_what_current_models_reject() {
        let catalog = Catalog::built_in();
        let today = "2026-11-29";
        let check = |c: &Condition| {
            preflight(&catalog, c, &[package(1000)], today, false).map_err(|e| e.to_string())
        };
        let mut c = condition(ProviderKind::Anthropic, "claude-sonnet-5-5", Some(0.7));
        let err = check(&c).unwrap_err();
        assert!(
            err.contains("only the default sampling") && err.contains("remove `temperature`"),
            "{err}"
        );
        // The default value is what the server assumes anyway: accepted.
        c.temperature = Some(1.0);
        assert!(check(&c).is_ok());
        c.temperature = None;
        assert!(check(&c).is_ok());
        c.thinking = Some(Thinking::Enabled);
        c.thinking_budget = Some(1024);
        let err = check(&c).unwrap_err();
        assert!(
            err.contains("rejects thinking `enabled`") && err.contains("adaptive, disabled"),
            "{err}"
        );

        let mut luna = condition(ProviderKind::OpenAi, "gpt-6-luna", Some(0.2));
        let err = check(&luna).unwrap_err();
        assert!(err.contains("reasoning_effort = \"none\""), "{err}");
        luna.reasoning_effort = Some("none".into());
        assert!(check(&luna).is_ok());

        let mut sol = condition(ProviderKind::OpenAi, "gpt-6.2-sol", None);
        sol.reasoning_effort = Some("none".into());
        let err = check(&sol).unwrap_err();
        assert!(
            err.contains("does not accept reasoning_effort `none`"),
            "{err}"
        );
        assert!(err.contains("low, medium, high, xhigh, max"), "{err}");

        let mut opus = condition(ProviderKind::Anthropic, "claude-opus-5-5", None);
        opus.thinking = Some(Thinking::Disabled);
        let err = check(&opus).unwrap_err();
        assert!(err.contains("use one of adaptive"), "{err}");

        let mut sonnet45 = condition(ProviderKind::Anthropic, "claude-sonnet-4-5", Some(0.7));
        sonnet45.thinking = Some(Thinking::Enabled);
        sonnet45.thinking_budget = Some(1024);
        let err = check(&sonnet45).unwrap_err();
        assert!(
            err.contains("does not take a temperature while it thinks"),
            "{err}"
        );
        sonnet45.reasoning_effort = Some("high".into());
        sonnet45.temperature = None;
        let err = check(&sonnet45).unwrap_err();
        assert!(err.contains("takes no reasoning effort"), "{err}");
        sonnet45.reasoning_effort = None;
        let w = check(&sonnet45).unwrap();
        assert!(
            w.iter().any(|w| w.0.contains("thinks before it answers")),
            "{w:?}"
        );
    }

    #[test]
    fn every_entry_names_its_source_and_sane_prices() {
        let catalog = Catalog::built_in();
        let mut ids = std::collections::BTreeSet::new();
        for m in catalog.models() {
            assert!(!m.source.trim().is_empty(), "{:?}", m.ids);
            for id in &m.ids {
                assert!(ids.insert((m.provider, id.clone())), "{id} listed twice");
            }
            let p = &m.prices;
            assert!(p.input > 0.0 && p.output > p.input, "{:?}", m.ids);
            assert!(p.cache_read < p.input, "{:?}", m.ids);
            assert!(p.cache_write_1h >= p.cache_write_5m, "{:?}", m.ids);
            assert!(u64::from(u32::MAX) > m.max_output && m.max_output < m.context_window);
            if m.provider == ProviderKind::Anthropic {
                assert_eq!(m.cache_controls, CacheControls::Automatic, "{:?}", m.ids);
            } else {
                assert!(m.thinking.is_empty(), "{:?}", m.ids);
            }
        }
    }

    #[test]
    fn the_older_temperature_rule_in_a_file_is_still_a_rule() {
        let text = r#"
[[model]]
provider = "openai"
ids = ["my-reasoner"]
context_window = 128000
max_output = 16384
only_default_temperature = true
source = "overlay"
[model.prices]
input = 1.0
cache_write_5m = 1.0
cache_write_1h = 1.0
cache_read = 0.5
output = 4.0
batch_discount = 0.5
"#;
        let catalog = Catalog::with_overrides(text).unwrap();
        let m = catalog.lookup(ProviderKind::OpenAi, "my-reasoner").unwrap();
        assert_eq!(m.sampling, Sampling::DefaultTemperature);
        let mut c = condition(ProviderKind::OpenAi, "my-reasoner", Some(0.7));
        let err = preflight(&catalog, &c, &[package(10)], "2026-11-29", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only the default temperature"), "{err}");
        c.temperature = None;
        c.top_p = Some(0.5);
        assert!(preflight(&catalog, &c, &[package(10)], "2026-11-29", false).is_ok());
    }

    #[test]
    fn overrides_replace_entries() {
        let text = r#"
[[model]]
provider = "openai"
ids = ["gpt-4o"]
context_window = 128000
max_output = 16384
source = "negotiated"
[model.prices]
input = 1.0
cache_write_5m = 1.0
cache_write_1h = 1.0
cache_read = 0.5
output = 4.0
batch_discount = 0.5
"#;
        let catalog = Catalog::with_overrides(text).unwrap();
        assert_eq!(
            catalog
                .lookup(ProviderKind::OpenAi, "gpt-4o")
                .unwrap()
                .prices
                .input,
            1.0
        );
        assert!(
            catalog
                .lookup(ProviderKind::OpenAi, "gpt-4o-2024-08-06")
                .is_none()
        );
        assert!(catalog.lookup(ProviderKind::OpenAi, "gpt-5").is_some());
    }
}
