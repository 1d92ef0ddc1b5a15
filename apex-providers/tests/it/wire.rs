use apex_core::provider::ErrorClass;
use apex_core::{CacheHint, CacheTtl, ProviderKind};
use apex_providers::{AnthropicWire, OpenAiWire, Wire, prompt_cache_key};
use serde_json::{Value, json};

use crate::{FIVE_MIN, request};

fn body<W: Wire>(req: &apex_core::GenerationRequest) -> Value {
    serde_json::from_slice(&W::body(req)).unwrap()
}

#[test]
fn anthropic_body_is_exact() {
    let req = request(ProviderKind::Anthropic, "claude-sonnet-4-5", FIVE_MIN);
    let context = req.package.context().to_string();
    assert_eq!(
        body::<AnthropicWire>(&req),
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": context, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Summarise."}
            ]}],
            "temperature": 0.7
        })
    );
    let one_hour = request(
        ProviderKind::Anthropic,
        "claude-sonnet-4-5",
        CacheHint::On(CacheTtl::OneHour),
    );
    assert_eq!(
        body::<AnthropicWire>(&one_hour)["messages"][0]["content"][0]["cache_control"],
        json!({"type": "ephemeral", "ttl": "1h"})
    );
    let off = request(ProviderKind::Anthropic, "claude-sonnet-4-5", CacheHint::Off);
    assert!(
        !String::from_utf8(AnthropicWire::body(&off))
            .unwrap()
            .contains("cache_control")
    );
}

#[test]
fn openai_body_is_exact() {
    let req = request(ProviderKind::OpenAi, "gpt-4o", FIVE_MIN);
    let context = req.package.context().to_string();
    assert_eq!(
        body::<OpenAiWire>(&req),
        json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": context},
                    {"type": "text", "text": "Summarise."}
                ]}
            ],
            "max_completion_tokens": 64,
            "temperature": 0.7,
            "prompt_cache_key": prompt_cache_key(req.package.version())
        })
    );
    assert_eq!(prompt_cache_key(req.package.version()).len(), 37);
    let off = request(ProviderKind::OpenAi, "gpt-4o", CacheHint::Off);
    assert!(body::<OpenAiWire>(&off).get("prompt_cache_key").is_none());
}

#[test]
fn usage_is_normalised() {
    let openai = br#"{"id":"chatcmpl-1","model":"gpt-5-2025-08-07","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],
        "usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920},"completion_tokens_details":{"reasoning_tokens":200}}}"#;
    let p = OpenAiWire::parse(openai).unwrap();
    assert_eq!(
        (
            p.usage.input_tokens,
            p.usage.cache_read_tokens,
            p.usage.cache_write_tokens
        ),
        (86, 1920, 0)
    );
    assert_eq!(
        (p.usage.output_tokens, p.usage.reasoning_tokens),
        (300, 200)
    );
    assert_eq!(p.finish_reason.as_deref(), Some("length"));
    assert_eq!(p.model.as_deref(), Some("gpt-5-2025-08-07"));

    let anthropic = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],
        "stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":1500,"cache_read_input_tokens":0,
        "cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":1500},"output_tokens":40}}"#;
    let p = AnthropicWire::parse(anthropic).unwrap();
    assert_eq!(p.text, "ab");
    assert_eq!(
        (
            p.usage.input_tokens,
            p.usage.cache_write_tokens,
            p.usage.cache_write_1h_tokens
        ),
        (12, 1500, 1500)
    );
    assert_eq!(p.usage.total_input(), 1512);
    assert!(
        OpenAiWire::parse(b"<html>bad gateway</html>")
            .unwrap_err()
            .1
            .contains("bad gateway")
    );
}

#[test]
fn errors_are_classified_by_status_and_body() {
    let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    assert_eq!(
        OpenAiWire::classify(429, quota).0,
        ErrorClass::QuotaExhausted
    );
    let too_large = br#"{"error":{"message":"Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 31538.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
    assert_eq!(
        OpenAiWire::classify(429, too_large).0,
        ErrorClass::ExceedsRateLimit
    );
    let limited = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    let (class, message) = OpenAiWire::classify(429, limited);
    assert_eq!(class, ErrorClass::RateLimited);
    assert_eq!(message, "requests/rate_limit_exceeded: Rate limit reached");
    assert_eq!(
        OpenAiWire::classify(401, b"{}").0,
        ErrorClass::Authentication
    );
    assert_eq!(
        OpenAiWire::classify(502, b"<html>").0,
        ErrorClass::ServerError
    );

    let a = |kind: &str, msg: &str| {
        format!(
            r#"{{"type":"error","error":{{"type":"{kind}","message":"{msg}"}},"request_id":"req_1"}}"#
        )
    };
    assert_eq!(
        AnthropicWire::classify(529, a("overloaded_error", "Overloaded").as_bytes()).0,
        ErrorClass::Overloaded
    );
    assert_eq!(
        AnthropicWire::classify(
            400,
            a(
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API."
            )
            .as_bytes()
        )
        .0,
        ErrorClass::QuotaExhausted
    );
    assert_eq!(
        AnthropicWire::classify(
            400,
            a("invalid_request_error", "prompt is too long").as_bytes()
        )
        .0,
        ErrorClass::InvalidRequest
    );
    assert_eq!(
        AnthropicWire::classify(404, a("not_found_error", "model: x").as_bytes()).0,
        ErrorClass::NotFound
    );
    assert_eq!(
        AnthropicWire::classify(413, a("request_too_large", "too big").as_bytes()).0,
        ErrorClass::RequestTooLarge
    );
    for class in [
        ErrorClass::InvalidRequest,
        ErrorClass::Authentication,
        ErrorClass::QuotaExhausted,
        ErrorClass::ExceedsRateLimit,
        ErrorClass::RequestTooLarge,
        ErrorClass::NotFound,
        ErrorClass::PermissionDenied,
    ] {
        assert!(!class.is_retryable(), "{class:?}");
    }
}
