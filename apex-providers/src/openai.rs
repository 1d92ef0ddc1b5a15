//! OpenAI Chat Completions: `POST {base}/chat/completions`.

use apex_core::provider::{ErrorClass, RateLimitSnapshot};
use apex_core::{CacheControls, CacheHint, CacheTtl, GenerationRequest, ProviderKind, Usage};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::key::ApiKey;
use crate::sse::SseEvent;
use crate::wire::{
    ParseError, ParsedResponse, StreamState, Wire, body_excerpt, class_for_status, decode,
    event_json,
};

/// The OpenAI wire format.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAiWire;

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    /// Accepted by every current chat model and required by reasoning
    /// models, which reject `max_tokens`.
    max_completion_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_retention: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_options: Option<CacheOptions>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// `prompt_cache_options`: explicit mode, so only Apex's breakpoint (after
/// the context) is written, not an implicit one after the instruction.
#[derive(Serialize)]
pub(crate) struct CacheOptions {
    pub(crate) mode: &'static str,
}

/// `prompt_cache_breakpoint` on the content part that ends the context.
#[derive(Serialize)]
pub(crate) struct Breakpoint {
    pub(crate) mode: &'static str,
    pub(crate) ttl: &'static str,
}

/// The OpenAI cache parameters for a request: key, retention, options and
/// the breakpoint to put after the context. Shared by both endpoints.
pub(crate) struct CacheParams {
    pub(crate) key: Option<String>,
    pub(crate) retention: Option<&'static str>,
    pub(crate) options: Option<CacheOptions>,
    pub(crate) breakpoint: Option<Breakpoint>,
}

impl CacheParams {
    pub(crate) fn of(request: &GenerationRequest) -> Self {
        let CacheHint::On(ttl) = request.cache else {
            return Self {
                key: None,
                retention: None,
                options: None,
                breakpoint: None,
            };
        };
        let key = Some(prompt_cache_key(request.package.version()));
        match request.cache_controls {
            CacheControls::Automatic => Self {
                key,
                retention: None,
                options: None,
                breakpoint: None,
            },
            // Same price as in-memory, and a follower held back by pacing
            // for more than a few minutes still finds the prefix.
            CacheControls::Retention => Self {
                key,
                retention: Some("24h"),
                options: None,
                breakpoint: None,
            },
            CacheControls::Breakpoints => Self {
                key,
                retention: None,
                options: Some(CacheOptions { mode: "explicit" }),
                breakpoint: Some(Breakpoint {
                    mode: "explicit",
                    ttl: match ttl {
                        CacheTtl::FiveMinutes => "30m",
                        CacheTtl::OneHour => "12h",
                    },
                }),
            },
        }
    }
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Content<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(&'a str),
    Parts(Vec<TextPart<'a>>),
}

#[derive(Serialize)]
struct TextPart<'a> {
    r#type: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_breakpoint: Option<Breakpoint>,
}

#[derive(Deserialize)]
struct ChatResponse {
    id: Option<String>,
    model: Option<String>,
    choices: Vec<Choice>,
    usage: ChatUsage,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct ChatUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    /// GPT-5.6 and later: input written to the cache (billed).
    #[serde(default)]
    cache_write_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

/// Normalised usage from Chat Completions' counts: `prompt_tokens` holds
/// the cached and written tokens.
fn chat_usage(u: &ChatUsage) -> Usage {
    let details = u.prompt_tokens_details.as_ref();
    let read = details.and_then(|d| d.cached_tokens).unwrap_or(0);
    let write = details.and_then(|d| d.cache_write_tokens).unwrap_or(0);
    let reasoning = u
        .completion_tokens_details
        .as_ref()
        .and_then(|d| d.reasoning_tokens)
        .unwrap_or(0);
    split_input(u.prompt_tokens, read, write, u.completion_tokens, reasoning)
}

/// Usage from OpenAI's totals, whose input includes the cached and written
/// tokens and whose output includes reasoning (both endpoints).
pub(crate) fn split_input(input: u64, read: u64, write: u64, output: u64, reasoning: u64) -> Usage {
    let read = read.min(input);
    let write = write.min(input - read);
    Usage {
        input_tokens: input - read - write,
        cache_write_tokens: write,
        cache_write_1h_tokens: 0,
        cache_read_tokens: read,
        output_tokens: output,
        reasoning_tokens: reasoning.min(output),
    }
}

/// A write asked for with the 12-hour TTL is billed at that price: usage
/// does not say which TTL a write had, the request does.
pub(crate) fn long_ttl_writes(request: &GenerationRequest, usage: &mut Usage) {
    if request.cache == CacheHint::On(CacheTtl::OneHour)
        && request.cache_controls == CacheControls::Breakpoints
    {
        usage.cache_write_1h_tokens = usage.cache_write_tokens;
    }
}

/// An OpenAI error object (`{"message", "type", "code"}`) as a class and a
/// message: from an error body (`status` is its HTTP status) or from inside
/// a 200 stream or a failed response (`status` is `None`).
fn error_detail(status: Option<u16>, kind: &str, code: &str, message: &str) -> ParseError {
    let class = if kind == "insufficient_quota" || code == "insufficient_quota" {
        ErrorClass::QuotaExhausted
    } else if message.contains("Request too large") {
        ErrorClass::ExceedsRateLimit
    } else if message.contains("overloaded") || code.contains("overloaded") {
        ErrorClass::Overloaded
    } else if let Some(status) = status {
        class_for_status(status)
    } else if code == "rate_limit_exceeded" || kind == "rate_limit_error" {
        ErrorClass::RateLimited
    } else if kind == "invalid_request_error" {
        ErrorClass::InvalidRequest
    } else {
        ErrorClass::ServerError
    };
    let label = [kind, code]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    let message = if label.is_empty() {
        message.to_owned()
    } else {
        format!("{label}: {message}")
    };
    (class, message)
}

/// An error object inside a stream or a failed response.
pub(crate) fn stream_error(error: &serde_json::Value) -> ParseError {
    let text = |k: &str| error.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let (class, message) = error_detail(None, text("type"), text("code"), text("message"));
    (class, format!("{message} (in the stream)"))
}

/// The `prompt_cache_key` for a context: derived from its content version,
/// so every replicate (and every run) of one context shares a cache route.
pub fn prompt_cache_key(version: &str) -> String {
    format!("apex-{}", &version[..version.len().min(32)])
}

impl Wire for OpenAiWire {
    const KIND: ProviderKind = ProviderKind::OpenAi;
    const REQUEST_ID_HEADER: &'static str = "x-request-id";

    fn endpoint(base_url: &str) -> String {
        format!("{}/chat/completions", base_url.trim_end_matches('/'))
    }

    fn check_request(base_url: &str, model: &str) -> (reqwest::Method, String, Option<Vec<u8>>) {
        // Retrieving the model is free and answers 401 / 404 as a request
        // would.
        (
            reqwest::Method::GET,
            format!("{}/models/{model}", base_url.trim_end_matches('/')),
            None,
        )
    }

    fn headers(key: &ApiKey) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", key.expose())) {
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        headers
    }

    fn body(request: &GenerationRequest) -> Vec<u8> {
        let c = &request.condition;
        let p = &request.package;
        let cache = CacheParams::of(request);
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = p.system() {
            messages.push(Message {
                role: "system",
                content: Content::Text(system),
            });
        }
        // Context first, instruction last: the shared prefix (system +
        // context) is what OpenAI's cache can reuse.
        messages.push(Message {
            role: "user",
            content: Content::Parts(vec![
                TextPart {
                    r#type: "text",
                    text: p.context(),
                    prompt_cache_breakpoint: cache.breakpoint,
                },
                TextPart {
                    r#type: "text",
                    text: p.prompt(),
                    prompt_cache_breakpoint: None,
                },
            ]),
        });
        let stream = request.streams();
        let body = ChatRequest {
            model: &c.model,
            messages,
            max_completion_tokens: c.max_tokens,
            temperature: c.temperature,
            top_p: c.top_p,
            reasoning_effort: c.reasoning_effort.as_deref(),
            prompt_cache_key: cache.key,
            prompt_cache_retention: cache.retention,
            prompt_cache_options: cache.options,
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        serde_json::to_vec(&body).expect("a request always serializes")
    }

    fn parse(body: &[u8]) -> Result<ParsedResponse, ParseError> {
        let r: ChatResponse = decode(body, "chat completion")?;
        let choice = r.choices.into_iter().next();
        let usage = chat_usage(&r.usage);
        let (text, finish_reason) = match choice {
            Some(c) => (
                c.message.content.or(c.message.refusal).unwrap_or_default(),
                c.finish_reason,
            ),
            None => (String::new(), None),
        };
        Ok(ParsedResponse {
            text,
            usage,
            finish_reason,
            model: r.model,
            id: r.id,
        })
    }

    /// `chat.completion.chunk` events, a usage chunk (`choices: []`) and
    /// `[DONE]`; an error arrives as `{"error": …}`.
    fn stream_event(state: &mut StreamState, event: &SseEvent) -> Result<(), ParseError> {
        if event.data.trim() == "[DONE]" {
            state.complete = true;
            return Ok(());
        }
        let value = event_json(event)?;
        if let Some(error) = value.get("error") {
            return Err(stream_error(error));
        }
        if state.id.is_none() {
            state.id = value.get("id").and_then(|v| v.as_str()).map(str::to_owned);
            state.model = value
                .get("model")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
        }
        if let Some(choice) = value.pointer("/choices/0") {
            for field in ["/delta/content", "/delta/refusal"] {
                if let Some(text) = choice.pointer(field).and_then(|v| v.as_str()) {
                    state.text.push_str(text);
                }
            }
            if let Some(reason) = choice.get("finish_reason").and_then(|v| v.as_str()) {
                state.finish_reason = Some(reason.to_owned());
            }
        }
        if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
            let usage = ChatUsage::deserialize(usage).map_err(|e| {
                (
                    ErrorClass::Decode,
                    format!("unexpected usage in a chat stream ({e})"),
                )
            })?;
            state.usage = chat_usage(&usage);
            state.has_usage = true;
        }
        Ok(())
    }

    fn complete_usage(request: &GenerationRequest, usage: &mut Usage) {
        long_ttl_writes(request, usage);
    }

    fn classify(status: u16, body: &[u8]) -> (ErrorClass, String) {
        let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
            return (class_for_status(status), body_excerpt(body));
        };
        let e = parsed.error;
        let code = e.code.as_ref().and_then(|c| c.as_str()).unwrap_or("");
        error_detail(
            Some(status),
            e.kind.as_deref().unwrap_or(""),
            code,
            e.message.as_deref().unwrap_or(""),
        )
    }

    fn rate_limits(headers: &HeaderMap) -> RateLimitSnapshot {
        crate::headers::openai_rate_limits(headers)
    }
}
