//! The one send path both providers share.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use apex_core::context::sha256_hex;
use apex_core::provider::ErrorClass;
use apex_core::{
    Api, AttemptError, Generated, GenerationRequest, Provider, ProviderKind, RequestPreview,
};
use async_trait::async_trait;

use crate::anthropic::AnthropicWire;
use crate::error::ProviderError;
use crate::key::ApiKey;
use crate::openai::OpenAiWire;
use crate::responses::ResponsesWire;
use crate::sse::SseParser;
use crate::wire::{ParsedResponse, StreamState, Wire};

/// Where and how to reach a provider.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Base URL (`https://api.openai.com/v1`, `https://api.anthropic.com`).
    pub base_url: String,
    /// The key; `None` allows dry runs and previews only.
    pub api_key: Option<ApiKey>,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout of a request answered in one body (a streamed
    /// one has none: long outputs take many minutes).
    pub request_timeout: Duration,
    /// Longest silence within a stream before it is abandoned and retried.
    pub stream_idle_timeout: Duration,
    /// Send the key over plain `http://` to a host that is not loopback
    /// (`APEX_ALLOW_INSECURE_HTTP=1`); refused otherwise.
    pub allow_insecure_http: bool,
}

impl ProviderConfig {
    /// The official default base URL of a provider.
    pub fn default_base_url(kind: ProviderKind) -> &'static str {
        match kind {
            ProviderKind::OpenAi => "https://api.openai.com/v1",
            ProviderKind::Anthropic => "https://api.anthropic.com",
        }
    }

    /// Reads `OPENAI_BASE_URL` / `ANTHROPIC_BASE_URL` and the API key
    /// variable, the official SDKs' names.
    pub fn from_env(kind: ProviderKind) -> Self {
        let base_url = std::env::var(kind.base_url_env())
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| Self::default_base_url(kind).to_owned());
        Self {
            base_url,
            api_key: ApiKey::from_env(kind.api_key_env()),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(300),
            allow_insecure_http: insecure_http_allowed(),
        }
    }
}

/// The variable that allows keys over plain `http://` to a host that is not
/// loopback.
pub const ALLOW_INSECURE_HTTP_ENV: &str = "APEX_ALLOW_INSECURE_HTTP";

/// Whether `APEX_ALLOW_INSECURE_HTTP` is set to `1` or `true`.
fn insecure_http_allowed() -> bool {
    std::env::var(ALLOW_INSECURE_HTTP_ENV)
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Checks a base URL before any client is built: http(s) only, and plain
/// `http://` only to loopback (the simulator, a local proxy) unless allowed.
pub(crate) fn check_base_url(
    base: &str,
    kind: ProviderKind,
    allow_insecure_http: bool,
) -> Result<reqwest::Url, ProviderError> {
    let bad = || ProviderError::BadBaseUrl {
        url: base.to_owned(),
        var: kind.base_url_env(),
    };
    let url = reqwest::Url::parse(base).map_err(|_| bad())?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if allow_insecure_http || is_loopback(&url) => Ok(url),
        "http" => Err(ProviderError::InsecureBaseUrl {
            url: base.to_owned(),
            var: kind.base_url_env(),
        }),
        _ => Err(bad()),
    }
}

/// `localhost`, `127.0.0.0/8` or `::1`.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// The one HTTP client every provider uses. Redirects are never followed:
/// the official SDKs do not follow them, and a followed redirect would carry
/// the key (`x-api-key`, `x-goog-api-key` are not headers a client knows to
/// strip) to another host. A 3xx is answered by [`redirect_error`].
pub(crate) fn client(config: &ProviderConfig) -> Result<reqwest::Client, ProviderError> {
    Ok(reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .tcp_keepalive(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// The error for a 3xx answer to `requested` (a URL under `base`): not
/// followed, not retried, naming where it points and the variable to set.
pub(crate) fn redirect_error(
    kind: ProviderKind,
    status: u16,
    headers: &reqwest::header::HeaderMap,
    requested: &str,
    base: &str,
) -> AttemptError {
    let location = headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| reqwest::Url::parse(requested).ok()?.join(l).ok());
    let var = kind.base_url_env();
    let message = match location {
        Some(to) => {
            // The path under the base URL, so the advice is a base URL.
            let tail = requested
                .strip_prefix(base.trim_end_matches('/'))
                .unwrap_or("")
                .split('?')
                .next()
                .unwrap_or("");
            let to = to.as_str();
            let to_path = to.split('?').next().unwrap_or(to);
            match to_path.strip_suffix(tail).filter(|_| !tail.is_empty()) {
                Some(new_base) => format!(
                    "the base URL {base} redirects (HTTP {status}) to {to}; redirects are not followed, so the key never leaves its host: set {var} to {new_base}"
                ),
                None => format!(
                    "the base URL {base} redirects (HTTP {status}) to {to}; redirects are not followed, so the key never leaves its host: set {var} to the API's own URL"
                ),
            }
        }
        None => format!(
            "the base URL {base} answered HTTP {status} (a redirect without a usable Location); redirects are not followed: set {var} to the API's own URL"
        ),
    };
    AttemptError {
        http_status: Some(status),
        ..AttemptError::new(ErrorClass::Redirected, message)
    }
}

/// A provider over HTTP, generic over its wire format.
pub struct HttpProvider<W: Wire> {
    client: reqwest::Client,
    url: String,
    base: String,
    key: Option<ApiKey>,
    request_timeout: Duration,
    stream_idle_timeout: Duration,
    /// Anthropic's Message Batches (OpenAI's Batch API is on
    /// [`OpenAiProvider`], which serves both of its endpoints).
    batch_api: Option<crate::batches::AnthropicBatches>,
    wire: PhantomData<W>,
}

/// OpenAI Chat Completions only (see [`OpenAiProvider`] for both endpoints).
pub type ChatProvider = HttpProvider<OpenAiWire>;
/// OpenAI Responses only.
pub type ResponsesProvider = HttpProvider<ResponsesWire>;
/// Anthropic Messages.
pub type AnthropicProvider = HttpProvider<AnthropicWire>;

impl<W: Wire> std::fmt::Debug for HttpProvider<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProvider")
            .field("kind", &W::KIND)
            .field("url", &self.url)
            .field("key", &self.key)
            .finish()
    }
}

impl<W: Wire> HttpProvider<W> {
    /// Builds a client for a configuration.
    pub fn new(config: ProviderConfig) -> Result<Self, ProviderError> {
        check_base_url(config.base_url.trim(), W::KIND, config.allow_insecure_http)?;
        Ok(Self::with_client(client(&config)?, &config))
    }

    /// Shares a client (its connections and TLS roots) with another wire.
    fn with_client(client: reqwest::Client, config: &ProviderConfig) -> Self {
        Self {
            client: client.clone(),
            url: W::endpoint(config.base_url.trim()),
            base: config.base_url.trim().to_owned(),
            key: config.api_key.clone(),
            request_timeout: config.request_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
            batch_api: (W::KIND == ProviderKind::Anthropic).then(|| {
                crate::batches::AnthropicBatches {
                    endpoint: crate::batches::Endpoint {
                        client: client.clone(),
                        base: config.base_url.trim().to_owned(),
                        key: config.api_key.clone(),
                    },
                }
            }),
            wire: PhantomData,
        }
    }

    /// Whether a key is configured.
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    fn transport_error(&self, error: &reqwest::Error) -> AttemptError {
        let class = if error.is_timeout() {
            ErrorClass::Timeout
        } else {
            ErrorClass::Transport
        };
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        let message = match &self.key {
            Some(key) => key.scrub(&message),
            None => message,
        };
        AttemptError::new(class, message)
    }
}

#[async_trait]
impl<W: Wire> Provider for HttpProvider<W> {
    fn kind(&self) -> ProviderKind {
        W::KIND
    }

    fn preview(&self, request: &GenerationRequest) -> RequestPreview {
        let body = W::body(request);
        RequestPreview {
            url: self.url.clone(),
            request_hash: sha256_hex(&body),
            body: String::from_utf8(body).expect("serde_json writes UTF-8"),
        }
    }

    fn batches(&self) -> Option<&dyn apex_core::batches::BatchApi> {
        self.batch_api
            .as_ref()
            .map(|b| b as &dyn apex_core::batches::BatchApi)
    }

    async fn generate(&self, request: &GenerationRequest) -> Result<Generated, AttemptError> {
        let Some(key) = &self.key else {
            return Err(AttemptError::new(
                ErrorClass::Authentication,
                format!("no API key; set {}", W::KIND.api_key_env()),
            ));
        };
        // Built and hashed once per group: replicates and retries share it.
        let prepared = request.body.get_or_build(|| W::body(request));
        let request_hash = prepared.sha256.clone();
        let body = bytes::Bytes::from_owner(Arc::clone(&prepared.bytes));
        let mut builder = self
            .client
            .post(&self.url)
            .headers(W::headers(key))
            .body(body);
        if let Some(trace) = &request.trace {
            builder = builder.header("x-apex-generation", trace);
        }
        let streamed = request.streams();
        if !streamed {
            builder = builder.timeout(self.request_timeout);
        }
        tracing::debug!(url = %self.url, request_hash = %request_hash, trace = request.trace.as_deref().unwrap_or(""), streamed, "sending request");
        let response = builder.send().await.map_err(|e| {
            let error = self.transport_error(&e);
            tracing::debug!(url = %self.url, %error, "request failed without a response");
            error
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if (300..400).contains(&status) {
            let error = redirect_error(W::KIND, status, &headers, &self.url, &self.base);
            return Err(AttemptError {
                message: key.scrub(&error.message),
                ..error
            });
        }
        let request_id = headers
            .get(W::REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let rate_limits = W::rate_limits(&headers);
        let failed = |(class, message): (ErrorClass, String)| AttemptError {
            class,
            message: key.scrub(&message),
            http_status: Some(status),
            retry_after: None,
            request_id: request_id.clone(),
            rate_limits,
            server_refuses_retry: false,
        };
        let is_event_stream = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if status == 200 && is_event_stream {
            let parsed = self.read_stream(response).await.map_err(&failed)?;
            tracing::debug!(url = %self.url, status, request_id = request_id.as_deref().unwrap_or(""), ?rate_limits, "stream completed");
            return Ok(self.generated(request, parsed, request_id, request_hash, rate_limits));
        }
        let bytes = response.bytes().await.map_err(|e| AttemptError {
            // The status arrived; the body broke off after it.
            http_status: Some(status),
            request_id: request_id.clone(),
            ..self.transport_error(&e)
        })?;
        tracing::debug!(url = %self.url, status, request_id = request_id.as_deref().unwrap_or(""), bytes = bytes.len(), ?rate_limits, "response received");
        if status == 200 {
            let parsed = W::parse(&bytes).map_err(&failed)?;
            return Ok(self.generated(request, parsed, request_id, request_hash, rate_limits));
        }
        let (class, message) = W::classify(status, &bytes);
        let server_refuses_retry = headers
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
        Err(AttemptError {
            class,
            message: key.scrub(&message),
            http_status: Some(status),
            retry_after: crate::headers::retry_after(&headers),
            request_id,
            rate_limits,
            server_refuses_retry,
        })
    }
}

impl<W: Wire> HttpProvider<W> {
    /// Reads an event stream to its end: each chunk must come within the
    /// idle timeout; a stream that stops before its final event is a
    /// transport failure (retried), never half an answer.
    async fn read_stream(
        &self,
        mut response: reqwest::Response,
    ) -> Result<ParsedResponse, (ErrorClass, String)> {
        let mut parser = SseParser::default();
        let mut state = StreamState::default();
        loop {
            let chunk = match tokio::time::timeout(self.stream_idle_timeout, response.chunk()).await
            {
                Err(_) => {
                    return Err((
                        ErrorClass::Timeout,
                        format!(
                            "the stream sent nothing for {:.1} s (idle timeout)",
                            self.stream_idle_timeout.as_secs_f64()
                        ),
                    ));
                }
                Ok(Err(e)) => {
                    let error = self.transport_error(&e);
                    return Err((error.class, format!("the stream broke: {}", error.message)));
                }
                Ok(Ok(chunk)) => chunk,
            };
            let Some(chunk) = chunk else {
                if let Some(event) = parser.finish() {
                    W::stream_event(&mut state, &event)?;
                }
                return state.finish();
            };
            for event in parser.feed(&chunk).map_err(|m| (ErrorClass::Decode, m))? {
                W::stream_event(&mut state, &event)?;
            }
            if state.complete {
                // Everything after the final event is ignored.
                return state.finish();
            }
        }
    }

    fn generated(
        &self,
        request: &GenerationRequest,
        parsed: ParsedResponse,
        request_id: Option<String>,
        request_hash: String,
        rate_limits: apex_core::RateLimitSnapshot,
    ) -> Generated {
        Generated {
            request_hash,
            rate_limits,
            ..crate::wire::generated::<W>(request, parsed, request_id)
        }
    }
}

/// OpenAI: Chat Completions or Responses, as each condition's `api` says.
/// One client serves both endpoints.
#[derive(Debug)]
pub struct OpenAiProvider {
    chat: ChatProvider,
    responses: ResponsesProvider,
    batch_api: crate::batches::OpenAiBatches,
}

impl OpenAiProvider {
    /// Builds a client for a configuration.
    pub fn new(config: ProviderConfig) -> Result<Self, ProviderError> {
        let chat = ChatProvider::new(config.clone())?;
        let responses = ResponsesProvider::with_client(chat.client.clone(), &config);
        let batch_api = crate::batches::OpenAiBatches {
            endpoint: crate::batches::Endpoint {
                client: chat.client.clone(),
                base: config.base_url.trim().to_owned(),
                key: config.api_key.clone(),
            },
        };
        Ok(Self {
            chat,
            responses,
            batch_api,
        })
    }

    /// Whether a key is configured.
    pub fn has_key(&self) -> bool {
        self.chat.has_key()
    }

    fn route(&self, request: &GenerationRequest) -> &dyn Provider {
        match request.condition.api {
            Api::Chat => &self.chat,
            Api::Responses => &self.responses,
        }
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::OpenAi
    }

    fn preview(&self, request: &GenerationRequest) -> RequestPreview {
        self.route(request).preview(request)
    }

    async fn generate(&self, request: &GenerationRequest) -> Result<Generated, AttemptError> {
        self.route(request).generate(request).await
    }

    fn batches(&self) -> Option<&dyn apex_core::batches::BatchApi> {
        Some(&self.batch_api)
    }
}
