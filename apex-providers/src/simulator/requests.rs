//! What the simulator accepts: the three request schemas, checked as the
//! real services check them (unknown fields, parameters a model rejects),
//! reduced to what the answer needs.

use std::time::Duration;

use apex_core::catalog::ModelInfo;
use apex_core::context::estimate_tokens;
use apex_core::tokens::Tokenizer;
use apex_core::{CacheControls, Catalog, ProviderKind, Thinking};
use serde_json::Value;

/// The endpoints served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimApi {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/messages`.
    Messages,
}

impl SimApi {
    /// The endpoint a method and path name.
    pub fn route(method: &str, path: &str) -> Option<Self> {
        match (method, path.trim_end_matches('/')) {
            ("POST", "/v1/chat/completions") => Some(Self::Chat),
            ("POST", "/v1/responses") => Some(Self::Responses),
            ("POST", "/v1/messages") => Some(Self::Messages),
            _ => None,
        }
    }

    /// The provider whose API this is.
    pub fn provider(self) -> ProviderKind {
        match self {
            Self::Chat | Self::Responses => ProviderKind::OpenAi,
            Self::Messages => ProviderKind::Anthropic,
        }
    }
}

/// What a valid request asks for, in simulator terms.
pub(super) struct Parsed {
    pub model: String,
    pub max_tokens: u64,
    pub prefix_text_tokens: u64,
    pub rest_tokens: u64,
    pub cache_key: Option<String>,
    /// How long a cache entry written by this request lives (unscaled).
    pub ttl: Duration,
    /// Anthropic: the write was asked for with the 1-hour TTL.
    pub ttl_1h: bool,
    /// OpenAI explicit breakpoints: writes are reported (and billed).
    pub reports_writes: bool,
    pub stream: bool,
    /// The model thinks (or reasons) before it answers.
    pub thinks: bool,
    /// Responses: the caller asked OpenAI to store the response.
    pub store: bool,
    /// The longest text part (the context): what answers are drawn from.
    pub source: String,
    /// Sampling varies between identical requests (temperature not 0).
    pub varies: bool,
}

/// A rejected request: status, error type, error code, message.
pub(super) type Rejection = (u16, &'static str, Option<&'static str>, String);

/// The longest part's text, what an answer is made from.
fn source_of(parts: &[Part]) -> String {
    parts
        .iter()
        .max_by_key(|p| p.text.len())
        .map(|p| p.text.clone())
        .unwrap_or_default()
}

/// Whether identical requests may be answered differently.
fn varies(obj: &serde_json::Map<String, Value>) -> bool {
    obj.get("temperature").and_then(Value::as_f64) != Some(0.0)
}

/// One text part: its text, its Anthropic `cache_control`, and its OpenAI
/// `prompt_cache_breakpoint`.
struct Part {
    text: String,
    cache_control: Option<Value>,
    breakpoint: Option<Value>,
}

fn bad(message: String) -> Rejection {
    (400, "invalid_request_error", None, message)
}

fn unsupported_value(message: String) -> Rejection {
    (
        400,
        "invalid_request_error",
        Some("unsupported_value"),
        message,
    )
}

/// The text parts of a content value. `kinds`: the block types accepted;
/// `extra`: the per-block keys accepted besides `type` and `text`.
fn parts_of(value: &Value, kinds: &[&str], extra: &[&str]) -> Result<Vec<Part>, String> {
    match value {
        Value::String(s) => Ok(vec![Part {
            text: s.clone(),
            cache_control: None,
            breakpoint: None,
        }]),
        Value::Array(blocks) => {
            let mut out = Vec::new();
            for block in blocks {
                let obj = block.as_object().ok_or("content blocks must be objects")?;
                let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
                if !kinds.contains(&kind) {
                    return Err(format!(
                        "content block type `{kind}` is not simulated (only {})",
                        kinds.join(", ")
                    ));
                }
                if let Some(key) = obj.keys().find(|k| {
                    !matches!(k.as_str(), "type" | "text") && !extra.contains(&k.as_str())
                }) {
                    return Err(format!(
                        "content block: {key}: Extra inputs are not permitted"
                    ));
                }
                let text = obj
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or("text block without `text` string")?;
                let cache_control = obj.get("cache_control").cloned();
                if let Some(cc) = &cache_control {
                    let ok_type = cc.get("type").and_then(Value::as_str) == Some("ephemeral");
                    let ok_ttl = match cc.get("ttl") {
                        None => true,
                        Some(t) => matches!(t.as_str(), Some("5m" | "1h")),
                    };
                    if !ok_type || !ok_ttl {
                        return Err("cache_control must be {\"type\": \"ephemeral\", \"ttl\"?: \"5m\"|\"1h\"}".into());
                    }
                }
                let breakpoint = obj.get("prompt_cache_breakpoint").cloned();
                if let Some(bp) = &breakpoint {
                    let ok_mode = bp
                        .get("mode")
                        .is_none_or(|m| m.as_str() == Some("explicit"));
                    let ok_ttl = bp
                        .get("ttl")
                        .is_none_or(|t| matches!(t.as_str(), Some("30m" | "12h")));
                    if !ok_mode || !ok_ttl {
                        return Err("prompt_cache_breakpoint must be {\"mode\"?: \"explicit\", \"ttl\"?: \"30m\"|\"12h\"}".into());
                    }
                }
                out.push(Part {
                    text: text.to_owned(),
                    cache_control,
                    breakpoint,
                });
            }
            Ok(out)
        }
        _ => Err("content must be a string or an array of blocks".into()),
    }
}

/// A cache entry's key: the model, the route key (OpenAI's
/// `prompt_cache_key`) and the prefix, hashed piece by piece rather than
/// joined into one more copy of a prefix that may be half a megabyte.
fn cache_key(model: &str, route: &str, prefix: &[Part]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for piece in [model, route]
        .into_iter()
        .chain(prefix.iter().map(|p| p.text.as_str()))
    {
        hash.update(piece.as_bytes());
        hash.update([0]);
    }
    apex_core::context::hex(&hash.finalize())
}

fn model_of<'c>(
    obj: &serde_json::Map<String, Value>,
    catalog: &'c Catalog,
) -> Result<(String, &'c ModelInfo), Rejection> {
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("you must provide a model parameter".into()))?;
    let info = catalog.lookup(ProviderKind::OpenAi, model).ok_or_else(|| {
        (
            404,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
    })?;
    Ok((model.to_owned(), info))
}

/// Sampling and effort as an OpenAI model takes them.
fn check_openai_parameters(
    obj: &serde_json::Map<String, Value>,
    info: &ModelInfo,
    effort: Option<&str>,
) -> Result<(), Rejection> {
    if let Some(effort) = effort
        && !info.efforts.iter().any(|e| e == effort)
    {
        return Err(unsupported_value(format!(
            "Unsupported value: 'reasoning_effort' does not support '{effort}' with this model."
        )));
    }
    for name in ["temperature", "top_p"] {
        let Some(v) = obj.get(name) else { continue };
        let v = v
            .as_f64()
            .ok_or_else(|| bad(format!("{name} must be a number")))?;
        if info.sampling.refuses(name, v, effort) {
            return Err(unsupported_value(format!(
                "Unsupported value: '{name}' does not support {v} with this model. Only the default (1) value is supported."
            )));
        }
    }
    if obj.contains_key("prompt_cache_retention") && obj.contains_key("prompt_cache_options") {
        return Err(bad(
            "prompt_cache_retention and prompt_cache_options cannot both be set; prompt_cache_options.ttl supersedes prompt_cache_retention".into(),
        ));
    }
    if obj.contains_key("prompt_cache_options") && info.cache_controls != CacheControls::Breakpoints
    {
        return Err(bad(
            "prompt_cache_options is supported for gpt-5.6 and later models only".into(),
        ));
    }
    if let Some(r) = obj.get("prompt_cache_retention")
        && !matches!(r.as_str(), Some("24h" | "in_memory" | "in-memory"))
    {
        return Err(bad(format!(
            "Invalid value for 'prompt_cache_retention': {r}"
        )));
    }
    Ok(())
}

/// The cache entry an OpenAI request reads or writes: the prefix ends at the
/// last breakpoint or, without one, before the final part.
fn openai_cache(
    model: &str,
    obj: &serde_json::Map<String, Value>,
    parts: &[Part],
    info: &ModelInfo,
    (max_tokens, effort): (u64, Option<&str>),
    (stream, store): (bool, bool),
) -> Result<Parsed, Rejection> {
    if parts.is_empty() {
        return Err(bad("input must not be empty".into()));
    }
    let explicit = obj
        .get("prompt_cache_options")
        .and_then(|o| o.get("mode"))
        .and_then(Value::as_str)
        == Some("explicit");
    let last_breakpoint = parts.iter().rposition(|p| p.breakpoint.is_some());
    if last_breakpoint.is_some() && info.cache_controls != CacheControls::Breakpoints {
        return Err(bad(
            "prompt_cache_breakpoint is supported for gpt-5.6 and later models only".into(),
        ));
    }
    let split = match last_breakpoint {
        Some(i) => i + 1,
        None if explicit => 0,
        None => parts.len() - 1,
    };
    let (prefix, rest) = parts.split_at(split);
    let prefix_tokens: u64 = prefix.iter().map(|p| Tokenizer::O200k.count(&p.text)).sum();
    let rest_tokens: u64 = rest.iter().map(|p| Tokenizer::O200k.count(&p.text)).sum();
    let breakpoint_ttl = last_breakpoint
        .and_then(|i| parts[i].breakpoint.as_ref())
        .and_then(|b| b.get("ttl"))
        .and_then(Value::as_str);
    let ttl = match (
        breakpoint_ttl,
        obj.get("prompt_cache_retention").and_then(Value::as_str),
    ) {
        (Some("12h"), _) => Duration::from_secs(12 * 3600),
        (Some(_), _) => Duration::from_secs(30 * 60),
        (None, Some("24h")) => Duration::from_secs(24 * 3600),
        _ if info.cache_controls == CacheControls::Breakpoints => Duration::from_secs(30 * 60),
        // In-memory: "typically 5 to 10 minutes of inactivity".
        _ => Duration::from_secs(300),
    };
    let route = obj
        .get("prompt_cache_key")
        .and_then(Value::as_str)
        .unwrap_or("");
    Ok(Parsed {
        model: model.to_owned(),
        max_tokens,
        prefix_text_tokens: prefix_tokens,
        rest_tokens,
        cache_key: (prefix_tokens >= info.min_cacheable_tokens.max(1024))
            .then(|| cache_key(model, route, prefix)),
        ttl,
        ttl_1h: false,
        reports_writes: info.cache_controls == CacheControls::Breakpoints,
        stream,
        // Effort `none` does not reason.
        thinks: info.reasoning && effort != Some("none"),
        store,
        source: source_of(parts),
        varies: varies(obj),
    })
}

fn stream_flag(obj: &serde_json::Map<String, Value>) -> Result<bool, Rejection> {
    match obj.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad("stream must be a boolean".into())),
    }
}

fn positive(v: Option<&Value>, name: &str) -> Result<Option<u64>, Rejection> {
    v.map(|v| {
        v.as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad(format!("{name} must be a positive integer")))
    })
    .transpose()
}

/// The body as an object whose keys are all `known`; `unknown` words the
/// API's own rejection of another key.
fn known_object<'b>(
    body: &'b Value,
    known: &[&str],
    unknown: impl Fn(&str) -> String,
) -> Result<&'b serde_json::Map<String, Value>, Rejection> {
    let obj = body
        .as_object()
        .ok_or_else(|| bad("body must be a JSON object".into()))?;
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(bad(unknown(key))),
        None => Ok(obj),
    }
}

/// `POST /v1/chat/completions`.
pub(super) fn parse_chat(body: &Value, catalog: &Catalog) -> Result<Parsed, Rejection> {
    const KNOWN: &[&str] = &[
        "model",
        "messages",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "reasoning_effort",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "seed",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "service_tier",
        "verbosity",
        "n",
        "stop",
        "store",
        "safety_identifier",
    ];
    let obj = known_object(body, KNOWN, |key| {
        format!("Unrecognized request argument supplied: {key}")
    })?;
    let (model, info) = model_of(obj, catalog)?;
    if info.reasoning && obj.contains_key("max_tokens") {
        return Err((400, "invalid_request_error", Some("unsupported_parameter"), "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.".into()));
    }
    let effort = obj.get("reasoning_effort").and_then(Value::as_str);
    check_openai_parameters(obj, info, effort)?;
    let max_tokens = positive(
        obj.get("max_completion_tokens")
            .or_else(|| obj.get("max_tokens")),
        "max_completion_tokens",
    )?
    .unwrap_or(info.max_output);
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages must be an array".into()))?;
    if messages.is_empty() {
        return Err(bad("messages must not be empty".into()));
    }
    let mut parts = Vec::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "system" | "developer" | "user" | "assistant") {
            return Err(bad(format!("Invalid value for 'role': '{role}'")));
        }
        parts.extend(
            parts_of(
                m.get("content").unwrap_or(&Value::Null),
                &["text"],
                &["prompt_cache_breakpoint"],
            )
            .map_err(bad)?,
        );
    }
    let stream = stream_flag(obj)?;
    if !stream && obj.contains_key("stream_options") {
        return Err(bad(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.".into(),
        ));
    }
    openai_cache(
        &model,
        obj,
        &parts,
        info,
        (max_tokens, effort),
        (stream, false),
    )
}

/// `POST /v1/responses`.
pub(super) fn parse_responses(body: &Value, catalog: &Catalog) -> Result<Parsed, Rejection> {
    const KNOWN: &[&str] = &[
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "reasoning",
        "text",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "store",
        "stream",
        "stream_options",
        "metadata",
        "service_tier",
        "truncation",
        "user",
        "safety_identifier",
        "include",
        "background",
        "parallel_tool_calls",
    ];
    let obj = known_object(body, KNOWN, |key| format!("Unknown parameter: '{key}'."))?;
    if obj.contains_key("max_completion_tokens") || obj.contains_key("max_tokens") {
        return Err(bad("Unknown parameter: use 'max_output_tokens'.".into()));
    }
    let (model, info) = model_of(obj, catalog)?;
    let effort = obj
        .get("reasoning")
        .and_then(|r| r.get("effort"))
        .and_then(Value::as_str);
    check_openai_parameters(obj, info, effort)?;
    let max_tokens =
        positive(obj.get("max_output_tokens"), "max_output_tokens")?.unwrap_or(info.max_output);
    if max_tokens < 16 {
        return Err(bad(format!(
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, but got {max_tokens} instead."
        )));
    }
    let mut parts = Vec::new();
    if let Some(instructions) = obj.get("instructions") {
        let text = instructions
            .as_str()
            .ok_or_else(|| bad("instructions must be a string".into()))?;
        parts.push(Part {
            text: text.to_owned(),
            cache_control: None,
            breakpoint: None,
        });
    }
    match obj.get("input") {
        Some(Value::String(s)) => parts.push(Part {
            text: s.clone(),
            cache_control: None,
            breakpoint: None,
        }),
        Some(Value::Array(items)) => {
            for item in items {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                if !matches!(role, "system" | "developer" | "user" | "assistant") {
                    return Err(bad(format!("Invalid value for 'input[].role': '{role}'")));
                }
                if item
                    .get("type")
                    .is_some_and(|t| t.as_str() != Some("message"))
                {
                    return Err(bad("only message input items are simulated".into()));
                }
                parts.extend(
                    parts_of(
                        item.get("content").unwrap_or(&Value::Null),
                        &["input_text", "output_text"],
                        &["prompt_cache_breakpoint"],
                    )
                    .map_err(bad)?,
                );
            }
        }
        _ => return Err(bad("Missing required parameter: 'input'.".into())),
    }
    let store = match obj.get("store") {
        None => true,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad("store must be a boolean".into()))?,
    };
    let stream = stream_flag(obj)?;
    openai_cache(
        &model,
        obj,
        &parts,
        info,
        (max_tokens, effort),
        (stream, store),
    )
}

/// `POST /v1/messages`.
pub(super) fn parse_messages(body: &Value, catalog: &Catalog) -> Result<Parsed, Rejection> {
    const KNOWN: &[&str] = &[
        "model",
        "max_tokens",
        "messages",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "metadata",
        "service_tier",
        "thinking",
        "output_config",
        "cache_control",
    ];
    let obj = known_object(body, KNOWN, |key| {
        format!("{key}: Extra inputs are not permitted")
    })?;
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("model: Field required".into()))?;
    let info = catalog
        .lookup(ProviderKind::Anthropic, model)
        .ok_or_else(|| (404, "not_found_error", None, format!("model: {model}")))?;
    let max_tokens = obj
        .get("max_tokens")
        .ok_or_else(|| bad("max_tokens: Field required".into()))?
        .as_u64()
        .ok_or_else(|| bad("max_tokens: Input should be a valid integer".into()))?;
    let thinking = match obj.get("thinking") {
        None => None,
        Some(t) => {
            let mode = match t.get("type").and_then(Value::as_str) {
                Some("adaptive") => Thinking::Adaptive,
                Some("enabled") => Thinking::Enabled,
                Some("disabled") => Thinking::Disabled,
                _ => {
                    return Err(bad(
                        "thinking.type: Input should be 'adaptive', 'enabled' or 'disabled'".into(),
                    ));
                }
            };
            if !info.thinking.contains(&mode) {
                return Err(bad(format!(
                    "thinking.type: '{}' is not supported for model {model}",
                    mode.as_str()
                )));
            }
            if mode == Thinking::Enabled {
                let budget = t
                    .get("budget_tokens")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad("thinking.enabled.budget_tokens: Field required".into()))?;
                if budget < 1024 {
                    return Err(bad(
                        "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024".into(),
                    ));
                }
                if budget >= max_tokens {
                    return Err(bad(format!(
                        "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size ({max_tokens} <= {budget})"
                    )));
                }
            }
            Some(mode)
        }
    };
    let thinks = match thinking {
        Some(Thinking::Disabled) => false,
        Some(_) => true,
        None => info.thinks_by_default,
    };
    if let Some(config) = obj.get("output_config") {
        let effort = config.get("effort").and_then(Value::as_str);
        if let Some(key) = config
            .as_object()
            .and_then(|c| c.keys().find(|k| k.as_str() != "effort"))
        {
            return Err(bad(format!(
                "output_config.{key}: Extra inputs are not permitted"
            )));
        }
        match effort {
            Some(e) if info.efforts.iter().any(|x| x == e) => {}
            Some(e) if info.efforts.is_empty() => {
                return Err(bad(format!(
                    "output_config.effort: effort is not supported for model {model} ('{e}')"
                )));
            }
            Some(e) => {
                return Err(bad(format!(
                    "output_config.effort: Input should be {} (got '{e}')",
                    info.efforts.join(", ")
                )));
            }
            None => return Err(bad("output_config.effort: Field required".into())),
        }
    }
    for name in ["temperature", "top_p", "top_k"] {
        let Some(v) = obj.get(name) else { continue };
        let v = v
            .as_f64()
            .ok_or_else(|| bad(format!("{name}: Input should be a valid number")))?;
        if name == "temperature" && !(0.0..=1.0).contains(&v) {
            return Err(bad("temperature: range: 0..1".into()));
        }
        if info.sampling.refuses(name, v, None) {
            return Err(bad(format!(
                "{name}: sampling parameters are not supported for model {model}; remove `{name}`"
            )));
        }
        if name == "temperature" && thinks && v != 1.0 {
            return Err(bad(
                "`temperature` may only be set to 1 when thinking is enabled. Please consult our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#feature-compatibility".into(),
            ));
        }
    }
    if info.rejects_temperature_with_top_p
        && obj.contains_key("temperature")
        && obj.contains_key("top_p")
    {
        return Err(bad("`temperature` and `top_p` cannot both be specified for this model. Please use only one.".into()));
    }
    let mut parts = Vec::new();
    if let Some(system) = obj.get("system") {
        parts.extend(
            parts_of(system, &["text"], &["cache_control"])
                .map_err(|e| bad(format!("system: {e}")))?,
        );
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages: Field required".into()))?;
    if messages.is_empty() {
        return Err(bad("messages: at least one message is required".into()));
    }
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "user" | "assistant") {
            return Err(bad(format!("messages: Unexpected role \"{role}\"")));
        }
        parts.extend(
            parts_of(
                m.get("content").unwrap_or(&Value::Null),
                &["text"],
                &["cache_control"],
            )
            .map_err(|e| bad(format!("messages: {e}")))?,
        );
    }
    let breakpoints = parts.iter().filter(|p| p.cache_control.is_some()).count();
    if breakpoints > 4 {
        return Err(bad(
            "A maximum of 4 blocks with cache_control may be provided.".into(),
        ));
    }
    // The cached prefix ends at the last breakpoint.
    let last_breakpoint = parts.iter().rposition(|p| p.cache_control.is_some());
    let (prefix, rest) = parts.split_at(last_breakpoint.map_or(0, |i| i + 1));
    let prefix_tokens: u64 = prefix.iter().map(|p| estimate_tokens(&p.text)).sum();
    let rest_tokens: u64 = rest.iter().map(|p| estimate_tokens(&p.text)).sum();
    let ttl_1h = prefix
        .iter()
        .filter_map(|p| p.cache_control.as_ref())
        .any(|cc| cc.get("ttl").and_then(Value::as_str) == Some("1h"));
    Ok(Parsed {
        model: model.to_owned(),
        max_tokens,
        prefix_text_tokens: prefix_tokens,
        rest_tokens,
        cache_key: (last_breakpoint.is_some() && prefix_tokens >= info.min_cacheable_tokens)
            .then(|| cache_key(model, "", prefix)),
        ttl: Duration::from_secs(if ttl_1h { 3600 } else { 300 }),
        ttl_1h,
        reports_writes: true,
        stream: stream_flag(obj)?,
        thinks,
        store: false,
        source: source_of(&parts),
        varies: varies(obj),
    })
}
