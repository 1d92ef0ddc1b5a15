//! What each provider's wire format must supply to the shared send path.

use apex_core::provider::{ErrorClass, RateLimitSnapshot};
use apex_core::{GenerationRequest, ProviderKind, Usage};
use reqwest::header::HeaderMap;

use crate::key::ApiKey;

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

/// One provider's request building and response parsing: pure functions,
/// so they are tested without a network.
pub trait Wire: Send + Sync + 'static {
    /// Which API.
    const KIND: ProviderKind;
    /// The header carrying the provider's request id.
    const REQUEST_ID_HEADER: &'static str;
    /// The endpoint URL under a base URL.
    fn endpoint(base_url: &str) -> String;
    /// Auth and version headers.
    fn headers(key: &ApiKey) -> HeaderMap;
    /// The exact JSON body.
    fn body(request: &GenerationRequest) -> Vec<u8>;
    /// Parses a 200 body.
    fn parse(body: &[u8]) -> Result<ParsedResponse, String>;
    /// Classifies a non-200 response and extracts its message.
    fn classify(status: u16, body: &[u8]) -> (ErrorClass, String);
    /// Rate-limit headers.
    fn rate_limits(headers: &HeaderMap) -> RateLimitSnapshot;
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
