//! apex-providers: OpenAI and Anthropic clients implementing apex-core's
//! [`apex_core::Provider`] trait, and a loopback simulator of both.
//!
//! # Overview
//!
//! - [`HttpProvider`]: the one send path, generic over a [`Wire`] format:
//!   [`ChatProvider`] (Chat Completions), [`ResponsesProvider`] (Responses)
//!   and [`AnthropicProvider`] (Messages). [`OpenAiProvider`] sends each
//!   condition to the endpoint its `api` names. Building a request and
//!   parsing a response (a body or a stream of [`sse`] events) are pure
//!   functions of the wire format.
//! - [`ProviderConfig`]: base URL, key and timeouts, read from the official
//!   SDKs' environment variables by [`ProviderConfig::from_env`]; one HTTP
//!   layer for every request (`transport`): no redirect is followed (a key
//!   never reaches another host) and no key goes over plain `http://` off
//!   loopback unless [`ALLOW_INSECURE_HTTP_ENV`] allows it.
//! - [`Clients`]: the clients a process uses, each built once per
//!   configuration.
//! - [`batches`]: both providers' Batch APIs behind apex-core's
//!   [`BatchApi`](apex_core::provider::BatchApi).
//! - [`ApiKey`]: a key that cannot be printed.
//! - `simulator::Simulator` (feature `simulator`, off by default, on for the
//!   `apex` CLI): a loopback server speaking both wire formats, with a
//!   prompt cache, rate limits and scripted faults.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use apex_core::{CacheHint, CacheTtl, Condition, ContextPackage, GenerationRequest, Provider, ProviderKind, SharedBody};
//! use apex_providers::{AnthropicProvider, ApiKey, ProviderConfig};
//!
//! let provider = AnthropicProvider::new(ProviderConfig {
//!     base_url: "http://127.0.0.1:9".into(),
//!     api_key: Some(ApiKey::new("sk-ant-example")),
//!     connect_timeout: std::time::Duration::from_secs(1),
//!     request_timeout: std::time::Duration::from_secs(5),
//!     stream_idle_timeout: std::time::Duration::from_secs(5),
//!     allow_insecure_http: false,
//! })?;
//! let condition = Condition {
//!     slug: "c".into(), provider: ProviderKind::Anthropic, model: "claude-sonnet-4-5".into(),
//!     temperature: Some(0.7), top_p: None, max_tokens: 64, reasoning_effort: None, api: Default::default(), thinking: None,
//!     thinking_budget: None, stream: false, store: None,
//! };
//! let package = ContextPackage::new("ctx-01", None, "A document.".into(), "Summarise it.".into())?;
//! let request = GenerationRequest {
//!     condition: Arc::new(condition),
//!     package: Arc::new(package),
//!     cache: CacheHint::On(CacheTtl::FiveMinutes),
//!     cache_controls: Default::default(),
//!     trace: None,
//!     body: SharedBody::default(),
//!     in_batch: false,
//!     first_event: None,
//! };
//! let preview = provider.preview(&request);
//! assert_eq!(preview.url, "http://127.0.0.1:9/v1/messages");
//! assert!(preview.body.contains(r#""cache_control":{"type":"ephemeral"}"#));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod anthropic;
pub mod batches;
mod clients;
mod error;
pub mod headers;
mod http;
mod key;
mod openai;
mod responses;
#[cfg(feature = "simulator")]
pub mod simulator;
pub mod sse;
mod transport;
mod wire;

use std::sync::Arc;

pub use anthropic::{ANTHROPIC_VERSION, AnthropicWire};
pub use clients::Clients;
pub use error::ProviderError;
pub use http::{AnthropicProvider, ChatProvider, HttpProvider, OpenAiProvider, ResponsesProvider};
pub use key::ApiKey;
pub use openai::{OpenAiWire, prompt_cache_key};
pub use responses::ResponsesWire;
pub use transport::{ALLOW_INSECURE_HTTP_ENV, ProviderConfig};
pub use wire::{ParseError, ParsedResponse, StreamState, Wire};

use apex_core::{Provider, ProviderKind};

/// Builds the provider for `kind` from a configuration.
pub fn build(
    kind: ProviderKind,
    config: ProviderConfig,
) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match kind {
        ProviderKind::OpenAi => Arc::new(OpenAiProvider::new(config)?),
        ProviderKind::Anthropic => Arc::new(AnthropicProvider::new(config)?),
    })
}

/// Every parser of what a server sends, thrown arbitrary bytes and
/// near-valid variations: a typed error or a value, never a panic. Cases:
/// proptest's default (256) or `PROPTEST_CASES`.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

    use crate::{AnthropicWire, OpenAiWire, Wire, headers};

    const OPENAI: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
    const ANTHROPIC: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":3}}"#;
    const ERROR: &str = r#"{"error":{"message":"slow down","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#;

    /// Valid text with up to eight random edits (bytes, so UTF-8 breaks too).
    fn near(valid: &'static str) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 0..8).prop_map(
            move |edits| {
                let mut bytes = valid.as_bytes().to_vec();
                for (at, byte, insert) in edits {
                    let at = at % (bytes.len() + 1);
                    if insert || at == bytes.len() {
                        bytes.insert(at, byte);
                    } else {
                        bytes.remove(at);
                    }
                }
                bytes
            },
        )
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            near(OPENAI),
            near(ANTHROPIC),
            near(ERROR),
            proptest::collection::vec(any::<u8>(), 0..600),
        ]
    }

    const NAMES: &[&str] = &[
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
    ];

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{0,30}(\\.[0-9]{0,30})?(e[0-9]{1,3})?",
            "([0-9]{1,20}(\\.[0-9]{0,9})?(h|m|s|ms|us|ns)){0,5}",
            "20[0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z",
            "[ -~]{0,60}",
        ]
    }

    const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"x\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1},\"output\":[]}}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":1}}\n\ndata: [DONE]\n\n";

    proptest! {
        /// Streams: the SSE parser over bytes cut anywhere, and every event
        /// it yields through each API's stream reader.
        #[test]
        fn streams(bytes in prop_oneof![near(STREAM), proptest::collection::vec(any::<u8>(), 0..600)], cut in 1usize..64) {
            let mut parser = crate::sse::SseParser::default();
            let mut states = [crate::StreamState::default(), crate::StreamState::default(), crate::StreamState::default()];
            let mut events = Vec::new();
            for chunk in bytes.chunks(cut) {
                match parser.feed(chunk) {
                    Ok(more) => events.extend(more),
                    Err(_) => break,
                }
            }
            events.extend(parser.finish());
            for event in &events {
                let _ = OpenAiWire::stream_event(&mut states[0], event);
                let _ = crate::ResponsesWire::stream_event(&mut states[1], event);
                let _ = AnthropicWire::stream_event(&mut states[2], event);
            }
            for state in states {
                let _ = state.finish();
            }
        }

        #[test]
        fn response_bodies(bytes in body(), status in 100u16..600) {
            let _ = OpenAiWire::parse(&bytes);
            let _ = crate::ResponsesWire::parse(&bytes);
            let _ = AnthropicWire::parse(&bytes);
            let _ = OpenAiWire::classify(status, &bytes);
            let _ = AnthropicWire::classify(status, &bytes);
            let _ = crate::wire::body_excerpt(&bytes);
        }

        #[test]
        fn rate_limit_and_retry_headers(
            pairs in proptest::collection::vec((0..NAMES.len(), value()), 0..12),
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    map.insert(HeaderName::from_static(NAMES[name]), value);
                }
            }
            let _ = headers::retry_after(&map);
            let _ = headers::openai_rate_limits(&map);
            let _ = headers::anthropic_rate_limits(&map);
        }

        #[test]
        fn durations(text in value()) {
            let _ = headers::go_duration(&text);
            let _ = headers::until_rfc3339(&text);
        }
    }
}
