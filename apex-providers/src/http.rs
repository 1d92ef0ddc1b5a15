//! The one send path both providers share.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use apex_core::context::sha256_hex;
use apex_core::provider::{ErrorClass, FirstEvent};
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
use crate::transport::{Endpoint, ProviderConfig, check_base_url, client, redirect_error};
use crate::wire::{ParsedResponse, StreamState, Wire};

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
                    endpoint: Endpoint {
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

    fn batches(&self) -> Option<&dyn apex_core::provider::BatchApi> {
        self.batch_api
            .as_ref()
            .map(|b| b as &dyn apex_core::provider::BatchApi)
    }

    async fn check(&self, condition: &apex_core::Condition) -> Result<(), AttemptError> {
        let endpoint = Endpoint {
            client: self.client.clone(),
            base: self.base.clone(),
            key: self.key.clone(),
        };
        let key = endpoint.key(W::KIND.api_key_env())?;
        let (method, url, body) = W::check_request(&self.base, &condition.model);
        let mut builder = self
            .client
            .request(method, url)
            .headers(W::headers(key))
            .timeout(self.request_timeout);
        if let Some(body) = body {
            builder = builder.body(body);
        }
        endpoint.call::<W>(builder).await.map(drop)
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
            let parsed = self
                .read_stream(response, request.first_event.as_ref())
                .await
                .map_err(&failed)?;
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
        mut first_event: Option<&FirstEvent>,
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
                // The provider has begun answering (`message_start`, the
                // first chunk): told once.
                if let Some(signal) = first_event.take() {
                    signal.fire();
                }
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
            endpoint: Endpoint {
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

    fn batches(&self) -> Option<&dyn apex_core::provider::BatchApi> {
        Some(&self.batch_api)
    }

    async fn check(&self, condition: &apex_core::Condition) -> Result<(), AttemptError> {
        self.chat.check(condition).await
    }
}
