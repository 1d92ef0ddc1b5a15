//! An in-process provider for tests, examples and benchmarks: it answers at
//! once, with usage computed the way the real APIs report it, and a prompt
//! cache that serves a context only after the request that wrote it.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::condition::ProviderKind;
use crate::context::{estimate_tokens, sha256_hex};
use crate::provider::{
    AttemptError, Generated, GenerationRequest, Provider, RateLimitSnapshot, RequestPreview, Usage,
};

/// Answers every request at once (see the module docs).
#[derive(Debug)]
pub struct InstantProvider {
    kind: ProviderKind,
    output_tokens: u64,
    warm: Mutex<HashSet<String>>,
    calls: AtomicU64,
}

impl InstantProvider {
    /// A provider of `kind` answering with `output_tokens` tokens.
    pub fn new(kind: ProviderKind, output_tokens: u64) -> Self {
        Self {
            kind,
            output_tokens,
            warm: Mutex::new(HashSet::new()),
            calls: AtomicU64::new(0),
        }
    }

    /// Requests answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Provider for InstantProvider {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn preview(&self, request: &GenerationRequest) -> RequestPreview {
        let body = format!("{}:{}", request.condition.model, request.package.version());
        RequestPreview {
            url: "instant://".into(),
            request_hash: sha256_hex(body.as_bytes()),
            body,
        }
    }

    async fn generate(&self, request: &GenerationRequest) -> Result<Generated, AttemptError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let p = &request.package;
        let prefix = p.system().map_or(0, |s| estimate_tokens(s)) + estimate_tokens(p.context());
        let rest = estimate_tokens(p.prompt());
        // Contains-then-insert under one lock: the first request writes.
        let hit = !self
            .warm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.version().to_owned());
        let usage = Usage {
            input_tokens: rest,
            cache_write_tokens: if hit { 0 } else { prefix },
            cache_write_1h_tokens: 0,
            cache_read_tokens: if hit { prefix } else { 0 },
            output_tokens: self
                .output_tokens
                .min(u64::from(request.condition.max_tokens)),
            reasoning_tokens: 0,
        };
        Ok(Generated {
            text: "ok".into(),
            usage,
            finish_reason: Some("stop".into()),
            request_id: None,
            model_snapshot: Some(request.condition.model.clone()),
            request_hash: sha256_hex(p.version().as_bytes()),
            rate_limits: RateLimitSnapshot::default(),
        })
    }
}
