//! Anthropic Messages: `POST {base}/v1/messages`.

use apex_core::provider::{ErrorClass, RateLimitSnapshot};
use apex_core::{CacheHint, CacheTtl, GenerationRequest, ProviderKind, Thinking, Usage};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::key::ApiKey;
use crate::sse::SseEvent;
use crate::wire::{
    ParseError, ParsedResponse, StreamState, Wire, body_excerpt, class_for_status, decode,
    event_json,
};

/// The `anthropic-version` header value (what the official SDKs send).
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The Anthropic wire format.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnthropicWire;

#[derive(Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: [UserMessage<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<ThinkingParam>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<OutputConfig<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct ThinkingParam {
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_tokens: Option<u32>,
}

#[derive(Serialize)]
struct OutputConfig<'a> {
    effort: &'a str,
}

#[derive(Serialize)]
struct UserMessage<'a> {
    role: &'static str,
    content: [TextBlock<'a>; 2],
}

#[derive(Serialize)]
struct TextBlock<'a> {
    r#type: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<CacheControl>,
}

#[derive(Serialize)]
struct CacheControl {
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl: Option<&'static str>,
}

#[derive(Deserialize)]
struct MessagesResponse {
    id: Option<String>,
    model: Option<String>,
    content: Vec<ContentBlock>,
    stop_reason: Option<String>,
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Default)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    /// Of `output_tokens`, those spent thinking (2026 API).
    #[serde(default)]
    output_tokens_details: Option<OutputDetails>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation: Option<CacheCreation>,
}

#[derive(Deserialize)]
struct OutputDetails {
    #[serde(default)]
    thinking_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// Usage as billed: thinking tokens are part of `output_tokens`.
fn messages_usage(u: &AnthropicUsage) -> Usage {
    let write = u.cache_creation_input_tokens.unwrap_or(0);
    let write_1h = u
        .cache_creation
        .as_ref()
        .and_then(|c| c.ephemeral_1h_input_tokens)
        .unwrap_or(0)
        .min(write);
    Usage {
        input_tokens: u.input_tokens,
        cache_write_tokens: write,
        cache_write_1h_tokens: write_1h,
        cache_read_tokens: u.cache_read_input_tokens.unwrap_or(0),
        output_tokens: u.output_tokens,
        reasoning_tokens: u
            .output_tokens_details
            .as_ref()
            .and_then(|d| d.thinking_tokens)
            .unwrap_or(0)
            .min(u.output_tokens),
    }
}

/// An error type (body or stream event) as a class.
fn class_of(kind: &str, message: &str, status: u16) -> ErrorClass {
    match kind {
        "overloaded_error" => ErrorClass::Overloaded,
        "billing_error" => ErrorClass::QuotaExhausted,
        "authentication_error" => ErrorClass::Authentication,
        "permission_error" => ErrorClass::PermissionDenied,
        "not_found_error" => ErrorClass::NotFound,
        "request_too_large" => ErrorClass::RequestTooLarge,
        "rate_limit_error" => ErrorClass::RateLimited,
        "api_error" | "timeout_error" => ErrorClass::ServerError,
        "invalid_request_error" if message.contains("credit balance is too low") => {
            ErrorClass::QuotaExhausted
        }
        _ => class_for_status(status),
    }
}

impl Wire for AnthropicWire {
    const KIND: ProviderKind = ProviderKind::Anthropic;
    const REQUEST_ID_HEADER: &'static str = "request-id";

    fn endpoint(base_url: &str) -> String {
        format!("{}/v1/messages", base_url.trim_end_matches('/'))
    }

    fn check_request(base_url: &str, model: &str) -> (reqwest::Method, String, Option<Vec<u8>>) {
        // Counting tokens is free and answers 401 / 404 as a message would.
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "ping"}],
        });
        (
            reqwest::Method::POST,
            format!(
                "{}/v1/messages/count_tokens",
                base_url.trim_end_matches('/')
            ),
            Some(body.to_string().into_bytes()),
        )
    }

    fn headers(key: &ApiKey) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            "anthropic-version",
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
        if let Ok(mut value) = HeaderValue::from_str(key.expose()) {
            value.set_sensitive(true);
            headers.insert("x-api-key", value);
        }
        headers
    }

    fn body(request: &GenerationRequest) -> Vec<u8> {
        let c = &request.condition;
        let p = &request.package;
        // The breakpoint closes the context block: system + context form the
        // cached prefix, and the instruction after it is read fresh.
        let cache_control = match request.cache {
            CacheHint::Off => None,
            CacheHint::On(CacheTtl::FiveMinutes) => Some(CacheControl {
                r#type: "ephemeral",
                ttl: None,
            }),
            CacheHint::On(CacheTtl::OneHour) => Some(CacheControl {
                r#type: "ephemeral",
                ttl: Some("1h"),
            }),
        };
        let body = MessagesRequest {
            model: &c.model,
            max_tokens: c.max_tokens,
            system: p.system().map(|s| &**s),
            messages: [UserMessage {
                role: "user",
                content: [
                    TextBlock {
                        r#type: "text",
                        text: p.context(),
                        cache_control,
                    },
                    TextBlock {
                        r#type: "text",
                        text: p.prompt(),
                        cache_control: None,
                    },
                ],
            }],
            temperature: c.temperature,
            top_p: c.top_p,
            thinking: c.thinking.map(|mode| ThinkingParam {
                r#type: mode.as_str(),
                budget_tokens: (mode == Thinking::Enabled)
                    .then_some(c.thinking_budget)
                    .flatten(),
            }),
            output_config: c
                .reasoning_effort
                .as_deref()
                .map(|effort| OutputConfig { effort }),
            stream: request.streams(),
        };
        serde_json::to_vec(&body).expect("a request always serializes")
    }

    fn parse(body: &[u8]) -> Result<ParsedResponse, ParseError> {
        let r: MessagesResponse = decode(body, "messages")?;
        // Thinking blocks are not the answer; their tokens are in usage.
        let text = r
            .content
            .iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text.as_deref())
            .collect::<Vec<_>>()
            .join("");
        Ok(ParsedResponse {
            text,
            usage: messages_usage(&r.usage),
            finish_reason: r.stop_reason,
            model: r.model,
            id: r.id,
        })
    }

    /// `message_start` (input usage), `content_block_delta` (text and
    /// thinking), `message_delta` (stop reason, output usage),
    /// `message_stop`; `ping`; an `error` event even after a 200.
    fn stream_event(state: &mut StreamState, event: &SseEvent) -> Result<(), ParseError> {
        let value = event_json(event)?;
        let kind = value
            .get("type")
            .and_then(|v| v.as_str())
            .or(event.name.as_deref())
            .unwrap_or("");
        let usage_of = |v: &serde_json::Value| -> Result<Usage, ParseError> {
            AnthropicUsage::deserialize(v)
                .map(|u| messages_usage(&u))
                .map_err(|e| {
                    (
                        ErrorClass::Decode,
                        format!("unexpected usage in a messages stream ({e})"),
                    )
                })
        };
        match kind {
            "message_start" => {
                let message = value.get("message").unwrap_or(&serde_json::Value::Null);
                let text = |k: &str| message.get(k).and_then(|v| v.as_str()).map(str::to_owned);
                state.id = text("id");
                state.model = text("model");
                if let Some(usage) = message.get("usage") {
                    state.usage = usage_of(usage)?;
                }
            }
            "content_block_delta" => {
                if value.pointer("/delta/type").and_then(|v| v.as_str()) == Some("text_delta")
                    && let Some(text) = value.pointer("/delta/text").and_then(|v| v.as_str())
                {
                    state.text.push_str(text);
                }
            }
            "message_delta" => {
                if let Some(reason) = value.pointer("/delta/stop_reason").and_then(|v| v.as_str()) {
                    state.finish_reason = Some(reason.to_owned());
                }
                if let Some(usage) = value.get("usage") {
                    // Counts here are cumulative: the output side is final;
                    // the input side replaces `message_start`'s only when
                    // it is sent again.
                    let delta = usage_of(usage)?;
                    if usage.get("input_tokens").is_some() {
                        state.usage = delta;
                    } else {
                        state.usage.output_tokens = delta.output_tokens;
                        state.usage.reasoning_tokens = delta.reasoning_tokens;
                    }
                    state.has_usage = true;
                }
            }
            "message_stop" => state.complete = true,
            "error" => {
                let error = value.get("error").cloned().unwrap_or_default();
                let error_kind = error.get("type").and_then(|v| v.as_str()).unwrap_or("");
                let message = error.get("message").and_then(|v| v.as_str()).unwrap_or("");
                return Err((
                    class_of(error_kind, message, 500),
                    format!("{error_kind}: {message} (in the stream)"),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    fn classify(status: u16, body: &[u8]) -> (ErrorClass, String) {
        let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
            return (class_for_status(status), body_excerpt(body));
        };
        let e = parsed.error;
        let class = class_of(&e.kind, &e.message, status);
        (class, format!("{}: {}", e.kind, e.message))
    }

    fn rate_limits(headers: &HeaderMap) -> RateLimitSnapshot {
        crate::headers::anthropic_rate_limits(headers)
    }
}
