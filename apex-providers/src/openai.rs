//! OpenAI Chat Completions: `POST {base}/chat/completions`.

use apex_core::provider::{ErrorClass, RateLimitSnapshot};
use apex_core::{CacheHint, GenerationRequest, ProviderKind, Usage};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::key::ApiKey;
use crate::wire::{ParsedResponse, Wire, body_excerpt, class_for_status};

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
struct ChatUsage {
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
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = p.system() {
            messages.push(Message {
                role: "system",
                content: Content::Text(system),
            });
        }
        // Context first, instruction last: the shared prefix (system +
        // context) is what OpenAI's automatic cache can reuse.
        messages.push(Message {
            role: "user",
            content: Content::Parts(vec![
                TextPart {
                    r#type: "text",
                    text: p.context(),
                },
                TextPart {
                    r#type: "text",
                    text: p.prompt(),
                },
            ]),
        });
        let body = ChatRequest {
            model: &c.model,
            messages,
            max_completion_tokens: c.max_tokens,
            temperature: c.temperature,
            top_p: c.top_p,
            reasoning_effort: c.reasoning_effort.as_deref(),
            prompt_cache_key: match request.cache {
                CacheHint::On(_) => Some(prompt_cache_key(p.version())),
                CacheHint::Off => None,
            },
        };
        serde_json::to_vec(&body).expect("a request always serializes")
    }

    fn parse(body: &[u8]) -> Result<ParsedResponse, String> {
        let r: ChatResponse = serde_json::from_slice(body).map_err(|e| {
            format!(
                "unexpected chat completion body ({e}): {}",
                body_excerpt(body)
            )
        })?;
        let choice = r.choices.into_iter().next();
        let cached = r
            .usage
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
            .min(r.usage.prompt_tokens);
        let reasoning = r
            .usage
            .completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0);
        let (text, finish_reason) = match choice {
            Some(c) => (
                c.message.content.or(c.message.refusal).unwrap_or_default(),
                c.finish_reason,
            ),
            None => (String::new(), None),
        };
        Ok(ParsedResponse {
            text,
            usage: Usage {
                input_tokens: r.usage.prompt_tokens - cached,
                cache_write_tokens: 0,
                cache_write_1h_tokens: 0,
                cache_read_tokens: cached,
                output_tokens: r.usage.completion_tokens,
                reasoning_tokens: reasoning.min(r.usage.completion_tokens),
            },
            finish_reason,
            model: r.model,
            id: r.id,
        })
    }

    fn classify(status: u16, body: &[u8]) -> (ErrorClass, String) {
        let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
            return (class_for_status(status), body_excerpt(body));
        };
        let e = parsed.error;
        let code = e.code.as_ref().and_then(|c| c.as_str()).unwrap_or("");
        let kind = e.kind.as_deref().unwrap_or("");
        let message = e.message.unwrap_or_default();
        let class = if kind == "insufficient_quota" || code == "insufficient_quota" {
            ErrorClass::QuotaExhausted
        } else if status == 429 && message.contains("Request too large") {
            ErrorClass::ExceedsRateLimit
        } else if status == 503 && (message.contains("overloaded") || code.contains("overloaded")) {
            ErrorClass::Overloaded
        } else {
            class_for_status(status)
        };
        let label = [kind, code]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("/");
        (
            class,
            if label.is_empty() {
                message
            } else {
                format!("{label}: {message}")
            },
        )
    }

    fn rate_limits(headers: &HeaderMap) -> RateLimitSnapshot {
        crate::headers::openai_rate_limits(headers)
    }
}
