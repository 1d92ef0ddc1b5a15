//! What each provider's wire format must supply to the shared send path.

use apex_core::provider::{ErrorClass, RateLimitSnapshot};
use apex_core::{GenerationRequest, ProviderKind, Usage};
use reqwest::header::HeaderMap;

use crate::key::ApiKey;
use crate::sse::SseEvent;

/// A parsed success body.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedResponse {
    /// Visible text.
    pub text: String,
    /// Normalised usage.
    pub usage: Usage,
    /// Finish or stop reason.
    pub finish_reason: Option<String>,
    /// Model snapshot that answered.
    pub model: Option<String>,
    /// Body-level id (the header id is preferred).
    pub id: Option<String>,
}

/// A failed parse: a 200 whose body is not the API's success JSON
/// ([`ErrorClass::Decode`]), or one that reports a failure in its own terms
/// (a Responses `status: "failed"`, an error event inside a stream).
pub type ParseError = (ErrorClass, String);

/// What a stream has said so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamState {
    /// Visible text, deltas appended.
    pub text: String,
    /// Usage as reported (the input side early, the output side at the end).
    pub usage: Usage,
    /// Finish or stop reason.
    pub finish_reason: Option<String>,
    /// Model snapshot that answered.
    pub model: Option<String>,
    /// Body-level id.
    pub id: Option<String>,
    /// The final event arrived: only then is the answer whole.
    pub complete: bool,
    /// Usage arrived (a stream that ends without it cannot be priced).
    pub has_usage: bool,
}

impl StreamState {
    /// The whole answer, once the stream has completed.
    pub fn finish(self) -> Result<ParsedResponse, ParseError> {
        if !self.complete {
            return Err((
                ErrorClass::Transport,
                "the stream ended before its final event (cut off); the partial answer is discarded".into(),
            ));
        }
        if !self.has_usage {
            // Not a transport fault: a server that ends its streams without
            // usage does so every time, and each retry is paid for again.
            return Err((
                ErrorClass::InvalidRequest,
                "the stream ended without usage, so the answer cannot be priced; if the server does not send it (stream_options.include_usage), set `stream = false`".into(),
            ));
        }
        Ok(ParsedResponse {
            text: self.text,
            usage: self.usage,
            finish_reason: self.finish_reason,
            model: self.model,
            id: self.id,
        })
    }
}

/// One provider's request building and response parsing: pure functions,
/// so they are tested without a network.
pub trait Wire: Send + Sync + 'static {
    /// Which API.
    const KIND: ProviderKind;
    /// The header carrying the provider's request id.
    const REQUEST_ID_HEADER: &'static str;
    /// The endpoint URL under a base URL.
    fn endpoint(base_url: &str) -> String;
    /// The free request that checks a key and a model before anything is
    /// spent: method, URL under a base URL, and body.
    fn check_request(base_url: &str, model: &str) -> (reqwest::Method, String, Option<Vec<u8>>);
    /// Auth and version headers.
    fn headers(key: &ApiKey) -> HeaderMap;
    /// The exact JSON body (asking for a stream when the condition streams).
    fn body(request: &GenerationRequest) -> Vec<u8>;
    /// Parses a 200 body.
    fn parse(body: &[u8]) -> Result<ParsedResponse, ParseError>;
    /// Takes one event of a streamed answer.
    fn stream_event(state: &mut StreamState, event: &SseEvent) -> Result<(), ParseError>;
    /// Classifies a non-200 response and extracts its message.
    fn classify(status: u16, body: &[u8]) -> (ErrorClass, String);
    /// Rate-limit headers.
    fn rate_limits(headers: &HeaderMap) -> RateLimitSnapshot;
    /// Completes usage with what only the request knows (which TTL a cache
    /// write was asked for).
    fn complete_usage(_request: &GenerationRequest, _usage: &mut Usage) {}
}

/// A parsed answer as the outcome of a request: usage completed with what
/// only the request knows, the header's request id preferred to the body's,
/// the request's body hash.
pub fn generated<W: Wire>(
    request: &GenerationRequest,
    parsed: ParsedResponse,
    request_id: Option<String>,
) -> apex_core::Generated {
    let mut usage = parsed.usage;
    W::complete_usage(request, &mut usage);
    apex_core::Generated {
        text: parsed.text,
        usage,
        finish_reason: parsed.finish_reason,
        request_id: request_id.or(parsed.id),
        model_snapshot: parsed.model,
        request_hash: request
            .body
            .get_or_build(|| W::body(request))
            .sha256
            .clone(),
        rate_limits: RateLimitSnapshot::default(),
    }
}

/// A success body as the API's JSON, or a decode error naming `what` with
/// an excerpt of the body.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ParseError> {
    serde_json::from_slice(body).map_err(|e| {
        (
            ErrorClass::Decode,
            format!("unexpected {what} body ({e}): {}", body_excerpt(body)),
        )
    })
}

/// A stream event's JSON, or a decode error naming the event.
pub fn event_json(event: &SseEvent) -> Result<serde_json::Value, ParseError> {
    serde_json::from_str(&event.data).map_err(|e| {
        (
            ErrorClass::Decode,
            format!(
                "a stream event{} is not JSON ({e}): {}",
                event
                    .name
                    .as_deref()
                    .map(|n| format!(" `{n}`"))
                    .unwrap_or_default(),
                body_excerpt(event.data.as_bytes())
            ),
        )
    })
}

/// A JSON integer field, 0 when absent.
pub fn count(value: &serde_json::Value, pointer: &str) -> u64 {
    value
        .pointer(pointer)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

/// Classes shared by both APIs, by status alone.
pub fn class_for_status(status: u16) -> ErrorClass {
    match status {
        400 | 422 => ErrorClass::InvalidRequest,
        401 => ErrorClass::Authentication,
        402 => ErrorClass::QuotaExhausted,
        403 => ErrorClass::PermissionDenied,
        404 => ErrorClass::NotFound,
        408 => ErrorClass::Timeout,
        409 => ErrorClass::Conflict,
        413 => ErrorClass::RequestTooLarge,
        429 => ErrorClass::RateLimited,
        529 => ErrorClass::Overloaded,
        500..=599 => ErrorClass::ServerError,
        _ => ErrorClass::InvalidRequest,
    }
}

/// The body's text, shortened for an error message when it is not JSON.
pub fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut excerpt: String = text.chars().take(300).collect();
    if excerpt.len() < text.len() {
        excerpt.push_str(&format!("… ({} bytes)", body.len()));
    }
    if excerpt.is_empty() {
        "empty body".into()
    } else {
        excerpt.replace('\n', " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_whole_only_with_its_final_event_and_usage() {
        let cut = StreamState::default().finish().unwrap_err();
        assert_eq!(cut.0, ErrorClass::Transport);
        assert!(cut.0.is_retryable());
        // Complete but unpriced: the server will do it again, so no retry.
        let unpriced = StreamState {
            complete: true,
            ..StreamState::default()
        };
        let e = unpriced.finish().unwrap_err();
        assert_eq!(e.0, ErrorClass::InvalidRequest);
        assert!(!e.0.is_retryable(), "{}", e.1);
        let whole = StreamState {
            complete: true,
            has_usage: true,
            text: "Hi".into(),
            ..StreamState::default()
        };
        assert_eq!(whole.finish().unwrap().text, "Hi");
    }
}
