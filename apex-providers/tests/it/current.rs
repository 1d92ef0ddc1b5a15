//! Today's surface against the loopback simulator: the Responses API,
//! streams of all three APIs (whole, cut, stalled), Anthropic thinking, and
//! OpenAI's cache controls.

use std::sync::Arc;
use std::time::Duration;

use apex_core::provider::ErrorClass;
use apex_core::{
    Api, CacheHint, CacheTtl, Condition, GenerationRequest, Provider, ProviderKind, Thinking,
};
use apex_providers::simulator::{Fault, Simulator, SimulatorConfig};
use apex_providers::{
    AnthropicProvider, AnthropicWire, ApiKey, OpenAiProvider, OpenAiWire, ProviderConfig,
    ResponsesWire, Wire,
};
use serde_json::{Value, json};

use crate::{FIVE_MIN, request};

const KEY: &str = "sk-test-current-0123456789";

async fn sim() -> Simulator {
    Simulator::start(
        SimulatorConfig {
            api_key: Some(KEY.into()),
            time_scale: 0.01,
            ..SimulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

fn config(base_url: String, idle: Duration) -> ProviderConfig {
    ProviderConfig {
        base_url,
        api_key: Some(ApiKey::new(KEY)),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        stream_idle_timeout: idle,
        allow_insecure_http: false,
    }
}

/// Both providers' clients against the simulator.
fn clients(sim: &Simulator, idle: Duration) -> (OpenAiProvider, AnthropicProvider) {
    (
        OpenAiProvider::new(config(sim.openai_base_url(), idle)).unwrap(),
        AnthropicProvider::new(config(sim.anthropic_base_url(), idle)).unwrap(),
    )
}

/// A request for `model` with no sampling parameters, the condition
/// changed by `edit`, and the model's cache controls from the catalog.
fn current(
    provider: ProviderKind,
    model: &str,
    cache: CacheHint,
    edit: impl FnOnce(&mut Condition),
) -> GenerationRequest {
    let mut req = request(provider, model, cache);
    let mut condition = (*req.condition).clone();
    condition.temperature = None;
    edit(&mut condition);
    req.condition = Arc::new(condition);
    req.cache_controls = apex_core::Catalog::built_in()
        .lookup(provider, model)
        .map(|m| m.cache_controls)
        .unwrap_or_default();
    req
}

fn json_of<W: Wire>(req: &GenerationRequest) -> Value {
    serde_json::from_slice(&W::body(req)).unwrap()
}

#[test]
fn responses_body_is_exact() {
    let req = current(ProviderKind::OpenAi, "gpt-6.2-sol", FIVE_MIN, |c| {
        c.api = Api::Responses;
        c.reasoning_effort = Some("high".into());
    });
    let context = req.package.context().to_string();
    let key = apex_providers::prompt_cache_key(req.package.version());
    assert_eq!(
        json_of::<ResponsesWire>(&req),
        json!({
            "model": "gpt-6.2-sol",
            "instructions": "Be brief.",
            "input": [{"role": "user", "content": [
                {"type": "input_text", "text": context,
                 "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}},
                {"type": "input_text", "text": "Summarise."}
            ]}],
            "max_output_tokens": 64,
            "reasoning": {"effort": "high"},
            "prompt_cache_key": key,
            "prompt_cache_options": {"mode": "explicit"},
            "store": false
        })
    );
    let long = current(
        ProviderKind::OpenAi,
        "gpt-6.2-sol",
        CacheHint::On(CacheTtl::OneHour),
        |c| {
            c.api = Api::Responses;
            c.store = Some(true);
            c.stream = true;
        },
    );
    let body = json_of::<ResponsesWire>(&long);
    assert_eq!(
        body["input"][0]["content"][0]["prompt_cache_breakpoint"]["ttl"],
        "12h"
    );
    assert_eq!(
        (&body["store"], &body["stream"]),
        (&json!(true), &json!(true))
    );
}

#[test]
fn cache_controls_follow_the_model() {
    // GPT-5: 24-hour retention (same price); GPT-4o: the key only; GPT-5.6+:
    // an explicit breakpoint after the context, and no retention (OpenAI
    // refuses both together).
    let gpt5 = json_of::<OpenAiWire>(&current(ProviderKind::OpenAi, "gpt-5", FIVE_MIN, |_| {}));
    assert_eq!(gpt5["prompt_cache_retention"], "24h");
    assert!(gpt5.get("prompt_cache_options").is_none());
    let gpt4o = json_of::<OpenAiWire>(&current(ProviderKind::OpenAi, "gpt-4o", FIVE_MIN, |_| {}));
    assert!(gpt4o.get("prompt_cache_retention").is_none());
    assert!(gpt4o["prompt_cache_key"].is_string());
    let luna = json_of::<OpenAiWire>(&current(
        ProviderKind::OpenAi,
        "gpt-6-luna",
        FIVE_MIN,
        |c| c.stream = true,
    ));
    assert!(luna.get("prompt_cache_retention").is_none());
    assert_eq!(
        luna["messages"][1]["content"][0]["prompt_cache_breakpoint"],
        json!({"mode": "explicit", "ttl": "30m"})
    );
    assert_eq!(
        (&luna["stream"], &luna["stream_options"]),
        (&json!(true), &json!({"include_usage": true}))
    );
    let off = json_of::<OpenAiWire>(&current(
        ProviderKind::OpenAi,
        "gpt-6-luna",
        CacheHint::Off,
        |_| {},
    ));
    assert!(!off.to_string().contains("cache"), "{off}");
}

#[test]
fn thinking_and_effort_reach_the_messages_body() {
    let budget = current(
        ProviderKind::Anthropic,
        "claude-sonnet-4-5",
        FIVE_MIN,
        |c| {
            c.max_tokens = 4096;
            c.thinking = Some(Thinking::Enabled);
            c.thinking_budget = Some(2048);
        },
    );
    let body = json_of::<AnthropicWire>(&budget);
    assert_eq!(
        body["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert!(body.get("output_config").is_none() && body.get("temperature").is_none());
    let adaptive = current(
        ProviderKind::Anthropic,
        "claude-sonnet-5-5",
        FIVE_MIN,
        |c| {
            c.thinking = Some(Thinking::Adaptive);
            c.reasoning_effort = Some("xhigh".into());
            c.max_tokens = 30_000;
        },
    );
    let body = json_of::<AnthropicWire>(&adaptive);
    assert_eq!(body["thinking"], json!({"type": "adaptive"}));
    assert_eq!(body["output_config"], json!({"effort": "xhigh"}));
    // Above ~21K output tokens a request is streamed without being asked.
    assert_eq!(body["stream"], json!(true));
}

#[tokio::test]
async fn responses_api_plain_cached_and_reasoning() {
    let sim = sim().await;
    let (p, _) = clients(&sim, Duration::from_secs(5));
    let req = current(ProviderKind::OpenAi, "gpt-6.2-sol", FIVE_MIN, |c| {
        c.api = Api::Responses;
        c.reasoning_effort = Some("low".into());
    });
    let first = p.generate(&req).await.unwrap();
    assert!(first.usage.cache_write_tokens > 1000, "{:?}", first.usage);
    assert_eq!(first.usage.cache_read_tokens, 0);
    assert!(
        first.usage.reasoning_tokens > 0
            && first.usage.reasoning_tokens < first.usage.output_tokens
    );
    // Drawn from the context: whole sentences of it.
    assert!(
        first
            .text
            .starts_with("The harbour log records tides and storms."),
        "{}",
        first.text
    );
    assert_eq!(first.finish_reason.as_deref(), Some("length"));
    let second = p.generate(&req).await.unwrap();
    assert_eq!(
        second.usage.cache_read_tokens,
        first.usage.cache_write_tokens
    );
    assert_eq!(second.usage.total_input(), first.usage.total_input());
    let log = sim.requests();
    assert!(log.iter().all(|r| r.body["store"] == json!(false)));
    assert!(log[0].body.get("max_output_tokens").is_some());
    // A write asked for with the 12-hour TTL is priced as one.
    let long = current(
        ProviderKind::OpenAi,
        "gpt-6-luna",
        CacheHint::On(CacheTtl::OneHour),
        |c| c.api = Api::Responses,
    );
    let g = p.generate(&long).await.unwrap();
    assert!(g.usage.cache_write_tokens > 0);
    assert_eq!(g.usage.cache_write_1h_tokens, g.usage.cache_write_tokens);
    // Chat Completions on the same model reports the same usage shape.
    let chat = current(ProviderKind::OpenAi, "gpt-6.2-sol", FIVE_MIN, |c| {
        c.max_tokens = 90
    });
    let g = p.generate(&chat).await.unwrap();
    assert_eq!(
        g.usage.cache_write_tokens + g.usage.cache_read_tokens,
        first.usage.cache_write_tokens
    );
    // The model's rules are the server's too: effort `none` is refused.
    let none = current(ProviderKind::OpenAi, "gpt-6.2-sol", FIVE_MIN, |c| {
        c.api = Api::Responses;
        c.reasoning_effort = Some("none".into());
    });
    let e = p.generate(&none).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest);
    assert!(e.message.contains("unsupported_value"), "{}", e.message);
}

/// A model of each API: Chat Completions, Responses, Messages.
fn three_apis<'a>(
    openai: &'a OpenAiProvider,
    anthropic: &'a AnthropicProvider,
) -> Vec<(&'a dyn Provider, ProviderKind, &'static str, Api)> {
    vec![
        (openai, ProviderKind::OpenAi, "gpt-4o", Api::Chat),
        (openai, ProviderKind::OpenAi, "gpt-6-luna", Api::Responses),
        (
            anthropic,
            ProviderKind::Anthropic,
            "claude-opus-5-5",
            Api::Chat,
        ),
    ]
}

/// The same answer streamed and in one body: text, usage and finish
/// reason agree, for each of the three APIs.
#[tokio::test]
async fn streamed_answers_equal_whole_ones() {
    let sim = sim().await;
    let (openai, anthropic) = clients(&sim, Duration::from_secs(5));
    let cases = three_apis(&openai, &anthropic);
    for (provider, kind, model, api) in cases {
        let whole = current(kind, model, CacheHint::Off, |c| c.api = api);
        let streamed = current(kind, model, CacheHint::Off, |c| {
            c.api = api;
            c.stream = true;
        });
        let a = provider.generate(&whole).await.unwrap();
        let b = provider.generate(&streamed).await.unwrap();
        // OpenAI caches the second on its own: compare totals.
        let totals = |u: apex_core::Usage| (u.total_input(), u.output_tokens, u.reasoning_tokens);
        assert_eq!(
            (&a.text, totals(a.usage), &a.finish_reason),
            (&b.text, totals(b.usage), &b.finish_reason),
            "{model}"
        );
        assert!(
            b.model_snapshot.is_some() && b.request_id.is_some(),
            "{model}"
        );
        let log = sim.requests();
        assert_eq!(log.last().unwrap().body["stream"], json!(true), "{model}");
    }
}

/// A request something waits on is streamed though its condition is not,
/// and says so at its first event, once, before its answer ends: for each
/// of the three APIs.
#[tokio::test]
async fn the_first_event_is_told_while_the_answer_streams() {
    let sim = sim().await;
    let (openai, anthropic) = clients(&sim, Duration::from_secs(5));
    let cases = three_apis(&openai, &anthropic);
    for (provider, kind, model, api) in cases {
        let told: Arc<std::sync::Mutex<Vec<std::time::Instant>>> = Arc::default();
        let mut request = current(kind, model, CacheHint::Off, |c| c.api = api);
        let record = Arc::clone(&told);
        request.first_event = Some(apex_core::FirstEvent::new(move || {
            record.lock().unwrap().push(std::time::Instant::now());
        }));
        let sent = std::time::Instant::now();
        let answer = provider.generate(&request).await.unwrap();
        let ended = std::time::Instant::now();
        assert!(!answer.text.is_empty(), "{model}");
        let told = told.lock().unwrap().clone();
        assert_eq!(told.len(), 1, "{model}: told once");
        assert!(sent <= told[0] && told[0] < ended, "{model}");
        assert_eq!(
            sim.requests().last().unwrap().body["stream"],
            json!(true),
            "{model}"
        );
    }
}

/// A stream cut before its final event, or silent past the idle timeout, is
/// a retryable failure, never a success with half a text; so is a body cut
/// half-way.
#[tokio::test]
async fn cut_and_stalled_answers_are_retryable_failures() {
    let sim = sim().await;
    let (openai, anthropic) = clients(&sim, Duration::from_millis(300));
    let cases: Vec<(&dyn Provider, ProviderKind, &str, Api)> = vec![
        (&openai, ProviderKind::OpenAi, "gpt-4o", Api::Chat),
        (&openai, ProviderKind::OpenAi, "gpt-6.2-sol", Api::Responses),
        (
            &anthropic,
            ProviderKind::Anthropic,
            "claude-sonnet-4-5",
            Api::Chat,
        ),
    ];
    for (provider, kind, model, api) in cases {
        for streamed in [true, false] {
            let req = current(kind, model, FIVE_MIN, |c| {
                c.api = api;
                c.stream = streamed;
            });
            sim.push_fault(None, Fault::Cut);
            let e = provider.generate(&req).await.unwrap_err();
            assert!(e.is_retryable(), "{model} streamed={streamed}: {e}");
            assert_eq!(e.http_status, Some(200), "{model}");
            if streamed {
                assert!(e.class == ErrorClass::Transport, "{model}: {e}");
                sim.push_fault(None, Fault::Stall);
                let started = std::time::Instant::now();
                let e = provider.generate(&req).await.unwrap_err();
                assert_eq!(e.class, ErrorClass::Timeout, "{model}: {e}");
                assert!(e.message.contains("idle timeout"), "{e}");
                assert!(started.elapsed() < Duration::from_secs(10));
            }
            // The next request is whole.
            let ok = provider.generate(&req).await.unwrap();
            assert!(!ok.text.is_empty());
        }
    }
}

#[tokio::test]
async fn anthropic_thinking_is_billed_as_output_and_counted() {
    let sim = sim().await;
    let (_, p) = clients(&sim, Duration::from_secs(5));
    let budget = current(
        ProviderKind::Anthropic,
        "claude-sonnet-4-5",
        FIVE_MIN,
        |c| {
            c.max_tokens = 4096;
            c.thinking = Some(Thinking::Enabled);
            c.thinking_budget = Some(1024);
        },
    );
    for stream in [false, true] {
        let mut req = budget.clone();
        let mut c = (*req.condition).clone();
        c.stream = stream;
        req.condition = Arc::new(c);
        let g = p.generate(&req).await.unwrap();
        assert!(g.usage.reasoning_tokens > 0, "{:?}", g.usage);
        assert!(g.usage.reasoning_tokens < g.usage.output_tokens);
        // The thinking text is not the answer.
        assert!(!g.text.contains("Considering"), "{}", g.text);
    }
    // A model that thinks by default counts its thinking without being asked.
    let opus = current(ProviderKind::Anthropic, "claude-opus-5-5", FIVE_MIN, |_| {});
    assert!(p.generate(&opus).await.unwrap().usage.reasoning_tokens > 0);
    // What the model refuses, the server refuses.
    let disabled = current(ProviderKind::Anthropic, "claude-opus-5-5", FIVE_MIN, |c| {
        c.thinking = Some(Thinking::Disabled);
    });
    let e = p.generate(&disabled).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest, "{e}");
    let sampled = current(
        ProviderKind::Anthropic,
        "claude-sonnet-5-5",
        FIVE_MIN,
        |c| {
            c.temperature = Some(0.3);
        },
    );
    let e = p.generate(&sampled).await.unwrap_err();
    assert!(
        e.message.contains("sampling parameters are not supported"),
        "{e}"
    );
}

#[tokio::test]
async fn the_simulator_takes_a_bearer_key_for_anthropic() {
    let sim = sim().await;
    let client = reqwest::Client::new();
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "Hi"}]});
    for (name, value) in [
        ("authorization", format!("Bearer {KEY}")),
        ("x-api-key", KEY.to_owned()),
    ] {
        let r = client
            .post(format!("{}/v1/messages", sim.anthropic_base_url()))
            .header(name, value)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
    }
    let r = client
        .post(format!("{}/v1/nowhere", sim.anthropic_base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
