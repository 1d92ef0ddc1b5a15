//! apex-store integration tests: one binary (builds are slow on 2 cores).

mod backends;
mod conformance;
mod files;

use apex_core::{Condition, ContextPackage, ProviderKind};

pub(crate) fn condition(slug: &str, provider: ProviderKind, model: &str) -> Condition {
    Condition {
        slug: slug.into(),
        provider,
        model: model.into(),
        temperature: Some(0.7),
        top_p: None,
        max_tokens: 256,
        reasoning_effort: None,
        api: Default::default(),
        thinking: None,
        thinking_budget: None,
        stream: false,
        store: None,
    }
}

pub(crate) fn package(id: &str, context: &str) -> ContextPackage {
    ContextPackage::new(
        id,
        Some("Be brief.".into()),
        context.into(),
        "Summarise.".into(),
    )
    .unwrap()
}
