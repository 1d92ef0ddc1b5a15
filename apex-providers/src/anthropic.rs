//! Anthropic Messages: `POST {base}/v1/messages`.

use apex_core::provider::{ErrorClass, RateLimitSnapshot};
use apex_core::{CacheHint, CacheTtl, GenerationRequest, ProviderKind, Usage};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::key::ApiKey;
use crate::wire::{ParsedResponse, Wire, body_excerpt, class_for_status};

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

#[derive(Deserialize)]
struct AnthropicUsage {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation: Option<CacheCreation>,
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

impl Wire for AnthropicWire {
    const KIND: ProviderKind = ProviderKind::Anthropic;
    const REQUEST_ID_HEADER: &'static str = "request-id";

    fn endpoint(base_url: &str) -> String {
        format!("{}/v1/messages", base_url.trim_end_matches('/'))
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
        };
        serde_json::to_vec(&body).expect("a request always serializes")
    }

    fn parse(body: &[u8]) -> Result<ParsedResponse, String> {
        let r: MessagesResponse = serde_json::from_slice(body)
            .map_err(|e| format!("unexpected messages body ({e}): {}", body_excerpt(body)))?;
        let text = r
            .content
            .iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text.as_deref())
            .collect::<Vec<_>>()
            .join("");
        let write = r.usage.cache_creation_input_tokens.unwrap_or(0);
        let write_1h = r
            .usage
            .cache_creation
            .and_then(|c| c.ephemeral_1h_input_tokens)
            .unwrap_or(0)
            .min(write);
        Ok(ParsedResponse {
            text,
            usage: Usage {
                input_tokens: r.usage.input_tokens,
                cache_write_tokens: write,
                cache_write_1h_tokens: write_1h,
                cache_read_tokens: r.usage.cache_read_input_tokens.unwrap_or(0),
                output_tokens: r.usage.output_tokens,
                reasoning_tokens: 0,
            },
            finish_reason: r.stop_reason,
            model: r.model,
            id: r.id,
        })
    }

    fn classify(status: u16, body: &[u8]) -> (ErrorClass, String) {
        let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
            return (class_for_status(status), body_excerpt(body));
        };
        let e = parsed.error;
        let class = match e.kind.as_str() {
            "overloaded_error" => ErrorClass::Overloaded,
            "billing_error" => ErrorClass::QuotaExhausted,
            "authentication_error" => ErrorClass::Authentication,
            "permission_error" => ErrorClass::PermissionDenied,
            "not_found_error" => ErrorClass::NotFound,
            "request_too_large" => ErrorClass::RequestTooLarge,
            "rate_limit_error" => ErrorClass::RateLimited,
            "invalid_request_error" if e.message.contains("credit balance is too low") => {
                ErrorClass::QuotaExhausted
            }
            _ => class_for_status(status),
        };
        (class, format!("{}: {}", e.kind, e.message))
    }

    fn rate_limits(headers: &HeaderMap) -> RateLimitSnapshot {
        crate::headers::anthropic_rate_limits(headers)
    }
}
