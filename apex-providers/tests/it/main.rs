//! apex-providers integration tests: wire formats as pure functions, and the
//! HTTP clients against the loopback simulator.

mod current;
mod live;
mod redirects;
mod wire;

use std::sync::Arc;

use apex_core::{CacheHint, CacheTtl, Condition, ContextPackage, GenerationRequest, ProviderKind};

pub(crate) fn request(provider: ProviderKind, model: &str, cache: CacheHint) -> GenerationRequest {
    let condition = Condition {
        slug: "c".into(),
        provider,
        model: model.into(),
        temperature: Some(0.7),
        top_p: None,
        max_tokens: 64,
        reasoning_effort: None,
        api: Default::default(),
        thinking: None,
        thinking_budget: None,
        stream: false,
        store: None,
    };
    // ~1.5K tokens of context: above every model's minimum cacheable prefix.
    let context = "The harbour log records tides and storms. ".repeat(150);
    let package = ContextPackage::new(
        "ctx-01",
        Some("Be brief.".into()),
        context,
        "Summarise.".into(),
    )
    .unwrap();
    GenerationRequest {
        condition: Arc::new(condition),
        package: Arc::new(package),
        cache,
        cache_controls: Default::default(),
        trace: None,
        body: apex_core::SharedBody::default(),
        in_batch: false,
        first_event: None,
    }
}

pub(crate) const FIVE_MIN: CacheHint = CacheHint::On(CacheTtl::FiveMinutes);
