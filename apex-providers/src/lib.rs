//! apex-providers: OpenAI and Anthropic clients implementing apex-core's
//! [`apex_core::Provider`] trait, and a loopback simulator of both.
//!
//! # Overview
//!
//! - [`HttpProvider`]: the one send path, generic over a [`Wire`] format;
//!   [`OpenAiProvider`] (Chat Completions) and [`AnthropicProvider`]
//!   (Messages) are its two instances. Building a request and parsing a
//!   response are pure functions of the wire format.
//! - [`ProviderConfig`]: base URL, key and timeouts, read from the official
//!   SDKs' environment variables by [`ProviderConfig::from_env`].
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
//! })?;
//! let condition = Condition {
//!     slug: "c".into(), provider: ProviderKind::Anthropic, model: "claude-sonnet-4-5".into(),
//!     temperature: Some(0.7), top_p: None, max_tokens: 64, reasoning_effort: None,
//! };
//! let package = ContextPackage::new("ctx-01", None, "A document.".into(), "Summarise it.".into())?;
//! let request = GenerationRequest {
//!     condition: Arc::new(condition),
//!     package: Arc::new(package),
//!     cache: CacheHint::On(CacheTtl::FiveMinutes),
//!     trace: None,
//!     body: SharedBody::default(),
//! };
//! let preview = provider.preview(&request);
//! assert_eq!(preview.url, "http://127.0.0.1:9/v1/messages");
//! assert!(preview.body.contains(r#""cache_control":{"type":"ephemeral"}"#));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod anthropic;
mod error;
pub mod headers;
mod http;
mod key;
mod openai;
#[cfg(feature = "simulator")]
pub mod simulator;
mod wire;

use std::sync::Arc;

pub use anthropic::{ANTHROPIC_VERSION, AnthropicWire};
pub use error::ProviderError;
pub use http::{AnthropicProvider, HttpProvider, OpenAiProvider, ProviderConfig};
pub use key::ApiKey;
pub use openai::{OpenAiWire, prompt_cache_key};
pub use wire::{ParsedResponse, Wire};

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
