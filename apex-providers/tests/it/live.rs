//! The HTTP clients against the loopback simulator.

use std::time::Duration;

use apex_core::provider::ErrorClass;
use apex_core::{CacheHint, Provider, ProviderKind};
use apex_providers::simulator::{Fault, SimLimits, Simulator, SimulatorConfig};
use apex_providers::{AnthropicProvider, ApiKey, OpenAiProvider, ProviderConfig};

use crate::{FIVE_MIN, request};

const KEY: &str = "sk-test-0123456789abcdef";

async fn sim(config: SimulatorConfig) -> Simulator {
    Simulator::start(
        SimulatorConfig {
            api_key: Some(KEY.into()),
            time_scale: 0.01,
            ..config
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

fn config(base_url: String, key: &str) -> ProviderConfig {
    ProviderConfig {
        base_url,
        api_key: Some(ApiKey::new(key)),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        stream_idle_timeout: std::time::Duration::from_secs(300),
        allow_insecure_http: false,
    }
}

#[tokio::test]
async fn anthropic_cache_is_served_only_after_the_writer_completes() {
    let sim = sim(SimulatorConfig::default()).await;
    let p = AnthropicProvider::new(config(sim.anthropic_base_url(), KEY)).unwrap();
    let req = request(
        ProviderKind::Anthropic,
        "claude-sonnet-4-5-20250929",
        FIVE_MIN,
    );
    // Two identical requests at once: both miss and both pay for a write.
    let (a, b) = tokio::join!(p.generate(&req), p.generate(&req));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.usage.cache_write_tokens > 1000 && b.usage.cache_write_tokens > 1000);
    assert_eq!(a.usage.cache_read_tokens + b.usage.cache_read_tokens, 0);
    // After completion the prefix is served from the cache.
    let c = p.generate(&req).await.unwrap();
    assert_eq!(c.usage.cache_read_tokens, a.usage.cache_write_tokens);
    assert_eq!(c.usage.cache_write_tokens, 0);
    assert!(c.request_id.as_deref().unwrap().starts_with("req_sim"));
    assert_eq!(
        c.model_snapshot.as_deref(),
        Some("claude-sonnet-4-5-20250929")
    );
    assert_eq!(
        c.finish_reason.as_deref(),
        Some("max_tokens"),
        "64 max tokens < 200 simulated"
    );
    // Without the hint nothing is cached.
    let off = request(ProviderKind::Anthropic, "claude-sonnet-4-5", CacheHint::Off);
    let d = p.generate(&off).await.unwrap();
    assert_eq!(d.usage.cache_read_tokens + d.usage.cache_write_tokens, 0);
}

#[tokio::test]
async fn openai_reports_cached_tokens_in_128_token_steps() {
    let sim = sim(SimulatorConfig::default()).await;
    let p = OpenAiProvider::new(config(sim.openai_base_url(), KEY)).unwrap();
    let req = request(ProviderKind::OpenAi, "gpt-4o", FIVE_MIN);
    let first = p.generate(&req).await.unwrap();
    assert_eq!(first.usage.cache_read_tokens, 0);
    let second = p.generate(&req).await.unwrap();
    assert!(second.usage.cache_read_tokens >= 1024 && second.usage.cache_read_tokens % 128 == 0);
    assert_eq!(second.usage.total_input(), first.usage.total_input());
}

#[tokio::test]
async fn error_bodies_and_headers_reach_the_classifier() {
    let sim = sim(SimulatorConfig::default()).await;
    let p = OpenAiProvider::new(config(sim.openai_base_url(), KEY)).unwrap();
    let req = request(ProviderKind::OpenAi, "gpt-4o", FIVE_MIN);
    sim.push_fault(
        None,
        Fault::openai(
            429,
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached",
        )
        .with_header("retry-after", "2"),
    );
    let e = p.generate(&req).await.unwrap_err();
    assert_eq!(
        (e.class, e.http_status, e.retry_after),
        (
            ErrorClass::RateLimited,
            Some(429),
            Some(Duration::from_secs(2))
        )
    );
    sim.push_fault(
        None,
        Fault::openai(
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
            "You exceeded your current quota",
        ),
    );
    assert_eq!(
        p.generate(&req).await.unwrap_err().class,
        ErrorClass::QuotaExhausted
    );
    // The server's word against retrying is kept.
    sim.push_fault(
        None,
        Fault::openai(500, "server_error", None, "boom").with_header("x-should-retry", "false"),
    );
    let e = p.generate(&req).await.unwrap_err();
    assert!(e.class.is_retryable() && e.server_refuses_retry && !e.is_retryable());
    sim.push_fault(None, Fault::Drop);
    let e = p.generate(&req).await.unwrap_err();
    assert_eq!((e.class, e.http_status), (ErrorClass::Transport, None));
    // GPT-5 rejects a temperature other than 1, with the real error.
    let gpt5 = request(ProviderKind::OpenAi, "gpt-5", FIVE_MIN);
    let e = p.generate(&gpt5).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest);
    assert!(e.message.contains("unsupported_value"), "{}", e.message);
}

#[tokio::test]
async fn wrong_key_is_authentication_and_never_echoed() {
    let sim = sim(SimulatorConfig::default()).await;
    let wrong = "sk-wrong-key-that-must-not-leak";
    let p = OpenAiProvider::new(config(sim.openai_base_url(), wrong)).unwrap();
    let e = p
        .generate(&request(ProviderKind::OpenAi, "gpt-4o", FIVE_MIN))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Authentication);
    assert!(e.message.contains("Incorrect API key"), "{}", e.message);
    assert!(
        !e.message.contains("sk-wron") && !e.message.contains("leak"),
        "{}",
        e.message
    );
    assert!(!format!("{p:?}").contains(wrong));
    let a = AnthropicProvider::new(config(sim.anthropic_base_url(), wrong)).unwrap();
    let e = a
        .generate(&request(
            ProviderKind::Anthropic,
            "claude-sonnet-4-5",
            FIVE_MIN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Authentication);
}

#[tokio::test]
async fn rate_limit_headers_and_429_with_retry_after() {
    let limits = vec![(
        ProviderKind::Anthropic,
        "claude-sonnet-4-5".to_string(),
        SimLimits {
            rpm: Some(2),
            itpm: Some(100_000),
            otpm: Some(10_000),
            tpm: None,
        },
    )];
    let sim = sim(SimulatorConfig {
        limits,
        ..SimulatorConfig::default()
    })
    .await;
    let p = AnthropicProvider::new(config(sim.anthropic_base_url(), KEY)).unwrap();
    let req = request(
        ProviderKind::Anthropic,
        "claude-sonnet-4-5-20250929",
        FIVE_MIN,
    );
    let ok = p.generate(&req).await.unwrap();
    let requests = ok.rate_limits.requests.unwrap();
    assert_eq!((requests.limit, requests.remaining), (Some(2), Some(1)));
    assert_eq!(ok.rate_limits.output_tokens.unwrap().limit, Some(10_000));
    p.generate(&req).await.unwrap();
    let e = p.generate(&req).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::RateLimited);
    let wait = e.retry_after.unwrap();
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(600),
        "{wait:?}"
    );
    tokio::time::sleep(wait).await;
    p.generate(&req).await.unwrap();
}

#[tokio::test]
async fn the_request_log_keeps_only_the_most_recent() {
    let sim = sim(SimulatorConfig {
        request_log: 2,
        ..SimulatorConfig::default()
    })
    .await;
    let p = AnthropicProvider::new(config(sim.anthropic_base_url(), KEY)).unwrap();
    for trace in ["a", "b", "c"] {
        let mut req = request(
            ProviderKind::Anthropic,
            "claude-sonnet-4-5-20250929",
            FIVE_MIN,
        );
        req.trace = Some(trace.into());
        p.generate(&req).await.unwrap();
    }
    let traces: Vec<Option<String>> = sim.requests().into_iter().map(|r| r.trace).collect();
    assert_eq!(traces, [Some("b".to_owned()), Some("c".to_owned())]);
}

#[tokio::test]
async fn replicates_sharing_a_body_send_the_same_bytes_built_once() {
    let sim = sim(SimulatorConfig::default()).await;
    let p = AnthropicProvider::new(config(sim.anthropic_base_url(), KEY)).unwrap();
    let req = request(
        ProviderKind::Anthropic,
        "claude-sonnet-4-5-20250929",
        FIVE_MIN,
    );
    let first = p.generate(&req).await.unwrap();
    let second = p.generate(&req).await.unwrap();
    assert_eq!(first.request_hash, second.request_hash);
    let built = req.body.get_or_build(|| panic!("built again"));
    assert_eq!(built.sha256, first.request_hash);
    let hashes: Vec<String> = sim.requests().into_iter().map(|r| r.body_hash).collect();
    assert_eq!(hashes, [first.request_hash.clone(), first.request_hash]);
}

#[tokio::test]
async fn a_free_request_checks_the_key_and_the_model() {
    let sim = sim(SimulatorConfig {
        api_key: Some(KEY.into()),
        ..SimulatorConfig::default()
    })
    .await;
    for kind in [ProviderKind::OpenAi, ProviderKind::Anthropic] {
        let base = match kind {
            ProviderKind::OpenAi => sim.openai_base_url(),
            ProviderKind::Anthropic => sim.anthropic_base_url(),
        };
        let model = match kind {
            ProviderKind::OpenAi => "gpt-4o",
            ProviderKind::Anthropic => "claude-sonnet-4-5",
        };
        let good = apex_providers::build(kind, config(base.clone(), KEY)).unwrap();
        let req = request(kind, model, CacheHint::Off);
        good.check(&req.condition).await.unwrap();
        let bad_key =
            apex_providers::build(kind, config(base.clone(), "sk-wrong-0000000000")).unwrap();
        let e = bad_key.check(&req.condition).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Authentication, "{kind}: {e}");
        let unknown = request(kind, "no-such-model-1", CacheHint::Off);
        let e = good.check(&unknown.condition).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::NotFound, "{kind}: {e}");
    }
    // Free: nothing was generated, nothing counted.
    assert!(sim.requests().is_empty());
}
