//! OpenAI Responses: `POST {base}/responses`, for conditions with
//! `api = "responses"`.

use apex_core::provider::{ErrorClass, RateLimitSnapshot};
use apex_core::{GenerationRequest, ProviderKind, Usage};
use reqwest::header::HeaderMap;
use serde::Serialize;
use serde_json::Value;

use crate::key::ApiKey;
use crate::openai::{
    Breakpoint, CacheOptions, CacheParams, OpenAiWire, long_ttl_writes, split_input, stream_error,
};
use crate::sse::SseEvent;
use crate::wire::{
    ParseError, ParsedResponse, StreamState, Wire, body_excerpt, count, decode, event_json,
};

/// The Responses wire format (auth, errors and rate-limit headers as Chat
/// Completions).
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponsesWire;

#[derive(Serialize)]
struct ResponsesRequest<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    instructions: Option<&'a str>,
    input: [InputMessage<'a>; 1],
    max_output_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<Reasoning<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_retention: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_options: Option<CacheOptions>,
    /// `false` unless the condition asks: the API stores responses by
    /// default, and a batch runner's ledger is the record.
    store: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct Reasoning<'a> {
    effort: &'a str,
}

#[derive(Serialize)]
struct InputMessage<'a> {
    role: &'static str,
    content: [InputText<'a>; 2],
}

#[derive(Serialize)]
struct InputText<'a> {
    r#type: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_cache_breakpoint: Option<Breakpoint>,
}

/// A response object (the body, or the `response` of a terminal event).
fn parse_response(r: &Value) -> Result<ParsedResponse, ParseError> {
    let status = r.get("status").and_then(Value::as_str).unwrap_or("");
    if status == "failed" {
        return Err(stream_error(r.get("error").unwrap_or(&Value::Null)));
    }
    let Some(usage) = r.get("usage").filter(|u| u.is_object()) else {
        return Err((
            ErrorClass::Decode,
            format!(
                "a response without usage (status `{status}`): {}",
                body_excerpt(r.to_string().as_bytes())
            ),
        ));
    };
    if !matches!(status, "completed" | "incomplete") {
        return Err((
            ErrorClass::Decode,
            format!("a response with status `{status}` where `completed` was expected"),
        ));
    }
    let text = r
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|item| item.get("type").and_then(Value::as_str) == Some("message"))
        .filter_map(|item| item.get("content").and_then(Value::as_array))
        .flatten()
        .filter_map(|part| match part.get("type").and_then(Value::as_str) {
            Some("output_text") => part.get("text").and_then(Value::as_str).map(str::to_owned),
            Some("refusal") => part
                .get("refusal")
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        })
        .collect::<String>();
    Ok(ParsedResponse {
        text,
        usage: responses_usage(usage),
        finish_reason: Some(finish_reason(r)),
        model: r.get("model").and_then(Value::as_str).map(str::to_owned),
        id: r.get("id").and_then(Value::as_str).map(str::to_owned),
    })
}

/// Chat Completions' vocabulary, so one column means one thing: `stop`, or
/// `length` / `content_filter` for an incomplete response.
fn finish_reason(r: &Value) -> String {
    match r
        .pointer("/incomplete_details/reason")
        .and_then(Value::as_str)
    {
        Some("max_output_tokens") => "length".into(),
        Some(other) => other.to_owned(),
        None => "stop".into(),
    }
}

fn responses_usage(u: &Value) -> Usage {
    split_input(
        count(u, "/input_tokens"),
        count(u, "/input_tokens_details/cached_tokens"),
        count(u, "/input_tokens_details/cache_write_tokens"),
        count(u, "/output_tokens"),
        count(u, "/output_tokens_details/reasoning_tokens"),
    )
}

impl Wire for ResponsesWire {
    const KIND: ProviderKind = ProviderKind::OpenAi;
    const REQUEST_ID_HEADER: &'static str = "x-request-id";

    fn endpoint(base_url: &str) -> String {
        format!("{}/responses", base_url.trim_end_matches('/'))
    }

    fn check_request(base_url: &str, model: &str) -> (reqwest::Method, String, Option<Vec<u8>>) {
        OpenAiWire::check_request(base_url, model)
    }

    fn headers(key: &ApiKey) -> HeaderMap {
        OpenAiWire::headers(key)
    }

    fn body(request: &GenerationRequest) -> Vec<u8> {
        let c = &request.condition;
        let p = &request.package;
        let cache = CacheParams::of(request);
        let body = ResponsesRequest {
            model: &c.model,
            instructions: p.system().map(|s| &**s),
            input: [InputMessage {
                role: "user",
                content: [
                    InputText {
                        r#type: "input_text",
                        text: p.context(),
                        prompt_cache_breakpoint: cache.breakpoint,
                    },
                    InputText {
                        r#type: "input_text",
                        text: p.prompt(),
                        prompt_cache_breakpoint: None,
                    },
                ],
            }],
            max_output_tokens: c.max_tokens,
            temperature: c.temperature,
            top_p: c.top_p,
            reasoning: c
                .reasoning_effort
                .as_deref()
                .map(|effort| Reasoning { effort }),
            prompt_cache_key: cache.key,
            prompt_cache_retention: cache.retention,
            prompt_cache_options: cache.options,
            store: c.store.unwrap_or(false),
            stream: request.streams(),
        };
        serde_json::to_vec(&body).expect("a request always serializes")
    }

    fn parse(body: &[u8]) -> Result<ParsedResponse, ParseError> {
        parse_response(&decode::<Value>(body, "response")?)
    }

    /// Typed events (`type` in the data); the answer is whole at
    /// `response.completed` or `response.incomplete`, whose `response`
    /// carries the usage.
    fn stream_event(state: &mut StreamState, event: &SseEvent) -> Result<(), ParseError> {
        let value = event_json(event)?;
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .or(event.name.as_deref())
            .unwrap_or("");
        match kind {
            "response.output_text.delta" => {
                if let Some(delta) = value.get("delta").and_then(Value::as_str) {
                    state.text.push_str(delta);
                }
            }
            "response.completed" | "response.incomplete" => {
                let whole = parse_response(value.get("response").unwrap_or(&Value::Null))?;
                // The deltas are what arrived; the final object may repeat
                // them, and then it is the authority.
                if !whole.text.is_empty() {
                    state.text = whole.text;
                }
                state.usage = whole.usage;
                state.has_usage = true;
                state.finish_reason = whole.finish_reason;
                state.model = whole.model;
                state.id = whole.id;
                state.complete = true;
            }
            "response.failed" => {
                return Err(stream_error(
                    value.pointer("/response/error").unwrap_or(&Value::Null),
                ));
            }
            "error" => return Err(stream_error(value.get("error").unwrap_or(&value))),
            _ => {}
        }
        Ok(())
    }

    fn classify(status: u16, body: &[u8]) -> (ErrorClass, String) {
        OpenAiWire::classify(status, body)
    }

    fn rate_limits(headers: &HeaderMap) -> RateLimitSnapshot {
        OpenAiWire::rate_limits(headers)
    }

    fn complete_usage(request: &GenerationRequest, usage: &mut Usage) {
        long_ttl_writes(request, usage);
    }
}
