//! The one HTTP layer every request goes through, synchronous or batch, of
//! every provider: the client (no redirects followed), the base URL check
//! (no key in clear text off loopback unless allowed), the refusal of a
//! redirect, and the keyed calls of the Batch APIs.

#![allow(
    clippy::result_large_err,
    reason = "errors are `AttemptError`s, as `Provider::generate` returns them"
)]

use std::time::Duration;

use apex_core::provider::{BatchResults, ErrorClass};
use apex_core::{AttemptError, ProviderKind};
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::error::ProviderError;
use crate::key::ApiKey;
use crate::wire::{Wire, body_excerpt};

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
    /// A request answered in one body is abandoned (and retried) after
    /// this long: the official SDKs' ten minutes.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
    /// A stream that sends nothing for this long is abandoned (and retried).
    pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

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
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            stream_idle_timeout: Self::DEFAULT_STREAM_IDLE_TIMEOUT,
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

/// What both clients share: a client, a base URL and a key.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub client: reqwest::Client,
    pub base: String,
    pub key: Option<ApiKey>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub(crate) fn key(&self, env: &str) -> Result<&ApiKey, AttemptError> {
        self.key.as_ref().ok_or_else(|| {
            AttemptError::new(ErrorClass::Authentication, format!("no API key; set {env}"))
        })
    }

    /// Sends one call; its body on a 2xx, else the error classified by `W`.
    pub(crate) async fn call<W: Wire>(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes, AttemptError> {
        let key = self.key(W::KIND.api_key_env())?;
        let scrub = |e: &reqwest::Error| {
            let class = if e.is_timeout() {
                ErrorClass::Timeout
            } else {
                ErrorClass::Transport
            };
            AttemptError::new(class, key.scrub(&e.to_string()))
        };
        let response = builder.send().await.map_err(|e| scrub(&e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if (300..400).contains(&status) {
            let error = redirect_error(
                W::KIND,
                status,
                &headers,
                response.url().as_str(),
                &self.base,
            );
            return Err(self.scrubbed(error));
        }
        let bytes = response.bytes().await.map_err(|e| scrub(&e))?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let (class, message) = W::classify(status, &bytes);
        Err(AttemptError {
            class,
            message: key.scrub(&message),
            http_status: Some(status),
            retry_after: crate::headers::retry_after(&headers),
            request_id: headers
                .get(W::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            rate_limits: W::rate_limits(&headers),
            server_refuses_retry: false,
        })
    }

    /// `GET url` with these headers; the body.
    pub(crate) async fn get<W: Wire>(
        &self,
        url: String,
        headers: HeaderMap,
    ) -> Result<bytes::Bytes, AttemptError> {
        self.call::<W>(self.client.get(url).headers(headers)).await
    }

    /// `GET url` as JSON.
    pub(crate) async fn get_json<W: Wire>(
        &self,
        url: String,
        headers: HeaderMap,
    ) -> Result<Value, AttemptError> {
        self.json::<W>(self.client.get(url).headers(headers)).await
    }

    /// Calls and reads the answer as JSON.
    pub(crate) async fn json<W: Wire>(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<Value, AttemptError> {
        let bytes = self.call::<W>(builder).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            self.scrubbed(AttemptError::new(
                ErrorClass::Decode,
                format!(
                    "unexpected batch API answer ({e}): {}",
                    body_excerpt(&bytes)
                ),
            ))
        })
    }

    /// An error whose message can never show the key, whatever a server
    /// echoed into it (as the synchronous path scrubs its errors).
    pub(crate) fn scrubbed(&self, mut error: AttemptError) -> AttemptError {
        if let Some(key) = &self.key {
            error.message = key.scrub(&error.message);
        }
        error
    }

    /// Item outcomes with their errors scrubbed.
    pub(crate) fn scrub_results(&self, results: BatchResults) -> BatchResults {
        results
            .into_iter()
            .map(|(id, outcome)| (id, outcome.map_err(|e| self.scrubbed(e))))
            .collect()
    }
}
