//! The `Provider` trait the scheduler calls, and the normalised shapes of
//! what a provider returns.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::condition::{Condition, ProviderKind};
use crate::context::ContextPackage;

/// Token usage, normalised across providers.
///
/// `input_tokens` is the *uncached* input only: OpenAI's `prompt_tokens`
/// minus `cached_tokens`, Anthropic's `input_tokens`. Total input is
/// `input_tokens + cache_write_tokens + cache_read_tokens`.
/// `output_tokens` includes `reasoning_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Input neither written to nor read from the cache.
    pub input_tokens: u64,
    /// Input written to the cache (all TTLs).
    pub cache_write_tokens: u64,
    /// Of `cache_write_tokens`, those written with the 1-hour TTL.
    pub cache_write_1h_tokens: u64,
    /// Input read from the cache.
    pub cache_read_tokens: u64,
    /// Output, reasoning included.
    pub output_tokens: u64,
    /// Of `output_tokens`, the reasoning tokens.
    pub reasoning_tokens: u64,
}

impl Usage {
    /// All input tokens, however they were billed.
    pub fn total_input(&self) -> u64 {
        self.input_tokens + self.cache_write_tokens + self.cache_read_tokens
    }
    /// Whether the response read from the provider's cache.
    pub fn cache_hit(&self) -> bool {
        self.cache_read_tokens > 0
    }
}

/// Which prompt-cache lifetime to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheTtl {
    /// Five minutes (the default; writes cost 1.25× input on Anthropic).
    FiveMinutes,
    /// One hour (writes cost 2× input on Anthropic).
    OneHour,
}

/// Whether to send cache hints, and which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheHint {
    /// `--no-cache`: no `cache_control`, no `prompt_cache_key`.
    Off,
    /// Mark the context block as cacheable with this TTL.
    On(CacheTtl),
}

/// Which cache controls an OpenAI model takes beyond `prompt_cache_key`
/// (from the catalog). Anthropic models always take `cache_control`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheControls {
    /// Automatic prefix caching only (`prompt_cache_key` routes it).
    #[default]
    Automatic,
    /// `prompt_cache_retention: "24h"` keeps the prefix up to a day, at no
    /// extra price (GPT-5.1 to GPT-5.5, GPT-5, GPT-4.1).
    Retention,
    /// Explicit breakpoints (`prompt_cache_breakpoint`) with a TTL of 30
    /// minutes or 12 hours, writes billed (GPT-5.6 and later).
    Breakpoints,
}

/// A request body as sent, with its SHA-256, built once and shared: every
/// replicate and retry of one (condition, context) sends the same bytes, so
/// a 128K-token context is serialised and hashed once per group, not once
/// per request.
#[derive(Debug, Clone, Default)]
pub struct SharedBody(Arc<OnceLock<PreparedBody>>);

/// A built request body.
#[derive(Debug)]
pub struct PreparedBody {
    /// The bytes sent.
    pub bytes: Arc<[u8]>,
    /// SHA-256 of `bytes`, hex.
    pub sha256: String,
}

impl SharedBody {
    /// The body, built by `build` the first time it is asked for.
    pub fn get_or_build(&self, build: impl FnOnce() -> Vec<u8>) -> &PreparedBody {
        self.0.get_or_init(|| {
            let bytes: Arc<[u8]> = build().into();
            PreparedBody {
                sha256: crate::context::sha256_hex(&bytes),
                bytes,
            }
        })
    }

    /// How many handles share this body (the dispatcher's own among them
    /// while its group has work).
    pub fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }

    /// Whether two handles share one body.
    pub fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Equal when shared: two handles are the same body only if they share it.
impl PartialEq for SharedBody {
    fn eq(&self, other: &Self) -> bool {
        self.same_as(other)
    }
}

/// One request to send: a condition applied to a context package.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The condition (shared across its cells).
    pub condition: Arc<Condition>,
    /// The package (shared across replicates: its text is held once).
    pub package: Arc<ContextPackage>,
    /// The cache hint.
    pub cache: CacheHint,
    /// The cache controls the model takes (from the catalog).
    pub cache_controls: CacheControls,
    /// Sent as the `x-apex-generation` header (run id, generation id and
    /// attempt), so proxies and simulators can tell replicates apart.
    pub trace: Option<String>,
    /// The body, shared with the other requests of the same (condition,
    /// context, cache hint); `SharedBody::default()` for a one-off.
    pub body: SharedBody,
    /// An item of a provider batch: never streamed (a batch answers whole).
    pub in_batch: bool,
    /// Told when the answer's first event arrives: the request is streamed
    /// (whatever its condition says), and what waits for the provider to
    /// have begun answering (followers reading the cache it writes) goes.
    pub first_event: Option<FirstEvent>,
}

/// A signal given once, when a streamed answer's first event arrives.
#[derive(Clone)]
pub struct FirstEvent(Arc<dyn Fn() + Send + Sync>);

impl FirstEvent {
    /// A signal that calls `notify`.
    pub fn new(notify: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(notify))
    }

    /// Gives the signal.
    pub fn fire(&self) {
        (self.0)();
    }
}

impl std::fmt::Debug for FirstEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FirstEvent")
    }
}

impl GenerationRequest {
    /// A request of `condition` over `package` with these cache hints: one
    /// on its own (no trace, its own body, not in a batch). Both transports
    /// and the previews build their requests from it.
    pub fn new(
        condition: Arc<Condition>,
        package: Arc<ContextPackage>,
        cache: CacheHint,
        cache_controls: CacheControls,
    ) -> Self {
        Self {
            condition,
            package,
            cache,
            cache_controls,
            trace: None,
            body: SharedBody::default(),
            in_batch: false,
            first_event: None,
        }
    }

    /// Whether this request is sent as a stream: its condition streams (or
    /// something waits for its first event) and it is not a batch item.
    pub fn streams(&self) -> bool {
        (self.condition.streams() || self.first_event.is_some()) && !self.in_batch
    }
}

/// One bucket of a provider's rate-limit headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitBucket {
    /// The limit the provider applies.
    pub limit: Option<u64>,
    /// What is left now.
    pub remaining: Option<u64>,
    /// Time until the bucket is full again.
    pub reset_after: Option<Duration>,
}

/// What a response's rate-limit headers said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitSnapshot {
    /// Requests per minute.
    pub requests: Option<LimitBucket>,
    /// OpenAI TPM, or Anthropic's combined `tokens` bucket.
    pub tokens: Option<LimitBucket>,
    /// Anthropic ITPM.
    pub input_tokens: Option<LimitBucket>,
    /// Anthropic OTPM.
    pub output_tokens: Option<LimitBucket>,
}

/// A successful attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The response text.
    pub text: String,
    /// Normalised usage.
    pub usage: Usage,
    /// Finish or stop reason.
    pub finish_reason: Option<String>,
    /// The provider's request id.
    pub request_id: Option<String>,
    /// The model snapshot that answered.
    pub model_snapshot: Option<String>,
    /// SHA-256 of the exact request body sent.
    pub request_hash: String,
    /// Rate-limit headers of the response.
    pub rate_limits: RateLimitSnapshot,
}

/// Why an attempt failed, as the retry policy needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// 429 rate limit (retry after the hinted delay).
    RateLimited,
    /// Anthropic 529 or OpenAI 503 overloaded.
    Overloaded,
    /// Other 5xx.
    ServerError,
    /// 408, or the request timed out locally.
    Timeout,
    /// 409 conflict.
    Conflict,
    /// Connection failed or dropped.
    Transport,
    /// 400: the request is wrong and will stay wrong.
    InvalidRequest,
    /// 401.
    Authentication,
    /// 403.
    PermissionDenied,
    /// 404, e.g. an unknown or retired model.
    NotFound,
    /// 413.
    RequestTooLarge,
    /// Out of credit or over a spend limit.
    QuotaExhausted,
    /// One request larger than a per-minute limit: can never succeed.
    ExceedsRateLimit,
    /// A 200 whose body is cut off or not the API's JSON: a transport fault
    /// like a dropped connection, so it is retried.
    Decode,
    /// A 3xx: the base URL points elsewhere. Never followed (the key stays
    /// with its host) nor retried; the condition stops, and the generation
    /// goes back to `pending` for a resume once the URL is fixed.
    Redirected,
}

impl ErrorClass {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::Overloaded
                | Self::ServerError
                | Self::Timeout
                | Self::Conflict
                | Self::Transport
                | Self::Decode
        )
    }

    /// Whether every request of the same condition will fail the same way,
    /// so the condition stops at once.
    pub fn is_fatal_for_condition(self) -> bool {
        matches!(
            self,
            Self::Authentication
                | Self::PermissionDenied
                | Self::NotFound
                | Self::QuotaExhausted
                | Self::Redirected
        )
    }

    /// Whether the request never reached the API, so the failure is the
    /// configuration's, not the generation's: it goes back to `pending`.
    pub fn hands_back(self) -> bool {
        self == Self::Redirected
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Conflict => "conflict",
            Self::Transport => "transport",
            Self::InvalidRequest => "invalid_request",
            Self::Authentication => "authentication",
            Self::PermissionDenied => "permission_denied",
            Self::NotFound => "not_found",
            Self::RequestTooLarge => "request_too_large",
            Self::QuotaExhausted => "quota_exhausted",
            Self::ExceedsRateLimit => "exceeds_rate_limit",
            Self::Decode => "decode",
            Self::Redirected => "redirected",
        }
    }
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} ({}): {message}", class.as_str(), http_status.map_or_else(|| "no response".to_owned(), |s| format!("HTTP {s}")))]
pub struct AttemptError {
    /// What kind of failure.
    pub class: ErrorClass,
    /// The provider's message (never contains the API key).
    pub message: String,
    /// HTTP status, if a response arrived.
    pub http_status: Option<u16>,
    /// `retry-after-ms` / `retry-after`, if the response carried one.
    pub retry_after: Option<Duration>,
    /// The provider's request id, if any.
    pub request_id: Option<String>,
    /// Rate-limit headers of the response.
    pub rate_limits: RateLimitSnapshot,
    /// The server said not to retry (`x-should-retry: false`).
    pub server_refuses_retry: bool,
}

impl AttemptError {
    /// An error with only a class and message.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            http_status: None,
            retry_after: None,
            request_id: None,
            rate_limits: RateLimitSnapshot::default(),
            server_refuses_retry: false,
        }
    }

    /// Whether another attempt may succeed: the class allows it and the
    /// server did not say otherwise. (A server's `x-should-retry: true`
    /// never makes a permanent error retryable.)
    pub fn is_retryable(&self) -> bool {
        self.class.is_retryable() && !self.server_refuses_retry
    }
}

/// A preview of the exact request a provider would send (for dry runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPreview {
    /// The full URL.
    pub url: String,
    /// The JSON body, exactly as it would be sent.
    pub body: String,
    /// SHA-256 of `body`.
    pub request_hash: String,
}

/// A model API. Implementations live in `apex-providers`; the scheduler only
/// sees this trait, so tests and benchmarks can plug in fakes.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Which API this is.
    fn kind(&self) -> ProviderKind;

    /// The exact request that [`Provider::generate`] would send, without sending it.
    fn preview(&self, request: &GenerationRequest) -> RequestPreview;

    /// Sends one attempt and returns its normalised outcome. Implementations
    /// do not retry: the scheduler owns retries, so each attempt is counted
    /// and passes the rate limiter.
    async fn generate(&self, request: &GenerationRequest) -> Result<Generated, AttemptError>;

    /// The provider's Batch API, if it has one (`apex run --batch`).
    fn batches(&self) -> Option<&dyn BatchApi> {
        None
    }

    /// Checks, with a request that costs nothing (a token count, a model
    /// lookup), that the key and the condition's model would be accepted:
    /// what the first request of a condition learns before its batches are
    /// paid for. `Ok` where the provider has no such request.
    async fn check(&self, _condition: &Condition) -> Result<(), AttemptError> {
        Ok(())
    }
}

/// A provider's per-batch caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchCaps {
    /// Most requests in one batch.
    pub max_requests: usize,
    /// Most bytes of one batch's upload.
    pub max_bytes: usize,
}

/// What polling a batch says.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchProgress {
    /// Processing has ended (results, if any, can be read).
    pub ended: bool,
    /// Items processed so far.
    pub processed: u64,
    /// Items in the batch.
    pub total: u64,
    /// The batch was cancelled (by `apex cancel` or in the console).
    pub cancelled: bool,
    /// The whole batch failed without processing any item (e.g. OpenAI's
    /// enqueued-token limit); its items were not billed.
    pub failure: Option<AttemptError>,
    /// The per-model enqueued-token limit the failure named, if it did.
    pub queue_limit: Option<u64>,
}

/// One item's outcome, by its `custom_id`.
pub type BatchResults = HashMap<String, Result<Generated, AttemptError>>;

/// A provider's Batch API. Implementations live in `apex-providers`.
#[async_trait]
pub trait BatchApi: Send + Sync {
    /// The per-batch caps (requests and bytes).
    fn caps(&self) -> BatchCaps;

    /// The bytes one item adds to a batch's upload.
    fn item_bytes(&self, custom_id: &str, request: &GenerationRequest) -> usize;

    /// Submits one batch; `key` is Apex's id for it (sent as metadata where
    /// the API takes it). Returns the provider's batch id.
    async fn submit(
        &self,
        key: &str,
        items: &[(String, GenerationRequest)],
    ) -> Result<String, AttemptError>;

    /// After a crash between submitting and recording: the provider's id of
    /// the batch submitted for `key` (created after `since`, RFC 3339, with
    /// `items` requests), if there is one.
    async fn find(
        &self,
        key: &str,
        since: &str,
        items: usize,
    ) -> Result<Option<String>, AttemptError>;

    /// Where a batch stands.
    async fn status(&self, batch_id: &str) -> Result<BatchProgress, AttemptError>;

    /// The results of an ended batch, by `custom_id`; `requests` are the
    /// batch's items (to complete usage the way synchronous answers are).
    /// An item that expired unprocessed comes back as
    /// [`ErrorClass::Timeout`](ErrorClass::Timeout), one
    /// cancelled unprocessed as
    /// [`ErrorClass::Conflict`](ErrorClass::Conflict).
    async fn results(
        &self,
        batch_id: &str,
        requests: &HashMap<String, GenerationRequest>,
    ) -> Result<BatchResults, AttemptError>;

    /// Asks the provider to cancel a batch (items not yet processed end
    /// `canceled` and are not billed).
    async fn cancel(&self, batch_id: &str) -> Result<(), AttemptError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_and_fatal_classes_are_disjoint() {
        use ErrorClass::*;
        let all = [
            RateLimited,
            Overloaded,
            ServerError,
            Timeout,
            Conflict,
            Transport,
            InvalidRequest,
            Authentication,
            PermissionDenied,
            NotFound,
            RequestTooLarge,
            QuotaExhausted,
            ExceedsRateLimit,
            Decode,
            Redirected,
        ];
        for class in all {
            assert!(
                !(class.is_retryable() && class.is_fatal_for_condition()),
                "{class:?}"
            );
        }
        assert!(!InvalidRequest.is_retryable());
        assert!(!ExceedsRateLimit.is_retryable());
        assert!(QuotaExhausted.is_fatal_for_condition());
    }

    #[test]
    fn usage_totals() {
        let u = Usage {
            input_tokens: 10,
            cache_write_tokens: 100,
            cache_write_1h_tokens: 0,
            cache_read_tokens: 0,
            output_tokens: 5,
            reasoning_tokens: 2,
        };
        assert_eq!(u.total_input(), 110);
        assert!(!u.cache_hit());
    }
}
