//! A loopback server that speaks both wire formats, for tests, examples and
//! benchmarks: `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages`
//! (Anthropic).
//!
//! It checks auth and the request schema, answers with the real error bodies,
//! counts tokens (OpenAI exactly with `o200k_base`; Anthropic at four bytes
//! per token, Apex's estimate, since its tokenizer is not public), keeps a prompt
//! cache that serves a prefix only after the request that wrote it has
//! completed, enforces per-minute limits with the providers' headers by its
//! own accounting (`accounting`: by default counting and replenishing as the
//! real services do, not as Apex's limiter does), and plays scripted faults. Every duration is multiplied by `time_scale`, so a
//! simulator with `time_scale = 0.01` runs a minute in 0.6 s.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_core::context::{estimate_tokens, sha256_hex};
use apex_core::tokens::Tokenizer;
use apex_core::{Catalog, ProviderKind};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod accounting;

pub use accounting::{
    Account, LimitRules, Replenish, SimLimits, TokenCount, parse_limits, published_tiers,
};

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// The key clients must send; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    /// Multiplies every duration (latency, cache TTL, limit windows).
    pub time_scale: f64,
    /// Time to first byte of a response, before scaling.
    pub base_latency: Duration,
    /// Extra time per uncached input token, before scaling.
    pub per_input_token: Duration,
    /// Extra time per output token, before scaling.
    pub per_output_token: Duration,
    /// Tokens each answer has (capped by the request's max tokens).
    pub output_tokens: u32,
    /// Share of requests (0..1) answered with a transient error (500, 529
    /// or 503), chosen by a fixed-seed generator.
    pub fault_rate: f64,
    /// Limits per (provider, model id); models are matched through the
    /// catalog, so `claude-sonnet-4-5` covers its dated snapshot. None by
    /// default here; `apex simulate` enforces [`published_tiers`].
    pub limits: Vec<(ProviderKind, String, SimLimits)>,
    /// How OpenAI's limiter counts and replenishes (by default as the real
    /// one: characters / 4 plus `max_tokens`, a sliding window).
    pub openai_rules: LimitRules,
    /// How Anthropic's limiter counts and replenishes (by default as the
    /// real one: a token bucket, `remaining` rounded to thousands).
    pub anthropic_rules: LimitRules,
    /// How many of the most recent requests [`Simulator::requests`]
    /// remembers (each holds its parsed body): a long-lived simulator keeps
    /// bounded memory.
    pub request_log: usize,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            time_scale: 1.0,
            base_latency: Duration::from_millis(400),
            per_input_token: Duration::from_micros(20),
            per_output_token: Duration::from_millis(10),
            output_tokens: 200,
            fault_rate: 0.0,
            limits: Vec::new(),
            openai_rules: LimitRules::of(ProviderKind::OpenAi),
            anthropic_rules: LimitRules::of(ProviderKind::Anthropic),
            request_log: 4096,
        }
    }
}

/// A scripted response for the next matching request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status, headers and body.
    Respond {
        /// HTTP status.
        status: u16,
        /// Extra headers (e.g. `retry-after`).
        headers: Vec<(String, String)>,
        /// The body.
        body: String,
    },
    /// Close the connection without answering.
    Drop,
}

impl Fault {
    /// An OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai(status: u16, kind: &str, code: Option<&str>, message: &str) -> Self {
        Self::Respond {
            status,
            headers: Vec::new(),
            body: json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
                .to_string(),
        }
    }

    /// An Anthropic error body: `{"type": "error", "error": {...}, "request_id"}`.
    pub fn anthropic(status: u16, kind: &str, message: &str) -> Self {
        Self::Respond {
            status,
            headers: Vec::new(),
            body: json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_sim_fault"})
                .to_string(),
        }
    }

    /// Adds a header to a `Respond` fault.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Respond { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }
}

/// One request the simulator received.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Which API.
    pub provider: ProviderKind,
    /// The model requested.
    pub model: String,
    /// The `x-apex-generation` header, if sent.
    pub trace: Option<String>,
    /// The status answered (0: connection dropped).
    pub status: u16,
    /// SHA-256 of the body.
    pub body_hash: String,
    /// Cache-read tokens reported.
    pub cache_read_tokens: u64,
    /// Cache-write tokens reported.
    pub cache_write_tokens: u64,
    /// The parsed body (kept for schema assertions in tests; shared, not
    /// copied, since a body can be half a megabyte).
    pub body: Arc<Value>,
    /// When it arrived, from the simulator's start.
    pub arrived: Duration,
    /// When it was answered, from the simulator's start.
    pub answered: Duration,
    /// What its limiter finally charged it, by the simulator's own count:
    /// requests, input-side tokens (OpenAI: all of TPM) and output tokens
    /// (zeros for a request it did not serve).
    pub charged: [u64; 3],
}

struct State {
    config: SimulatorConfig,
    catalog: Catalog,
    started: Instant,
    cache: HashMap<String, Instant>,
    accounts: HashMap<(ProviderKind, String), Account>,
    faults: VecDeque<(Option<String>, Fault)>,
    log: VecDeque<RequestRecord>,
    next_id: u64,
    rng: u64,
}

impl State {
    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.config.time_scale)
    }

    fn model_key(&self, provider: ProviderKind, model: &str) -> String {
        self.catalog
            .lookup(provider, model)
            .and_then(|m| m.ids.first().cloned())
            .unwrap_or_else(|| model.to_owned())
    }

    fn limits_for(&self, provider: ProviderKind, model: &str) -> SimLimits {
        let key = self.model_key(provider, model);
        self.config
            .limits
            .iter()
            .find(|(p, m, _)| *p == provider && self.model_key(*p, m) == key)
            .map(|(_, _, l)| *l)
            .unwrap_or_default()
    }

    fn next_random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

type Reply = Response<Full<Bytes>>;

/// A running simulator; dropping it stops the server.
pub struct Simulator {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The wait after `failures` accept errors in a row: 10 ms doubling to 1 s.
fn accept_backoff(failures: u32) -> Duration {
    Duration::from_millis(10)
        .saturating_mul(1 << failures.saturating_sub(1).min(7))
        .min(Duration::from_secs(1))
}

/// The error a handler returns to make hyper drop the connection.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("simulated connection drop")
    }
}

impl std::error::Error for DropConnection {}

impl Simulator {
    /// Binds `addr` (use port 0 for any free port) and serves until dropped.
    pub async fn start(config: SimulatorConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            config,
            catalog: Catalog::built_in(),
            started: Instant::now(),
            cache: HashMap::new(),
            accounts: HashMap::new(),
            faults: VecDeque::new(),
            log: VecDeque::new(),
            next_id: 1,
            rng: 0x2545_F491_4F6C_DD1D,
        }));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => {
                        failures = 0;
                        stream
                    }
                    Err(error) => {
                        // A persistent error (out of file descriptors) must
                        // not spin: wait, longer each time, then try again.
                        failures = failures.saturating_add(1);
                        tracing::warn!(%error, "simulator: accept failed");
                        tokio::time::sleep(accept_backoff(failures)).await;
                        continue;
                    }
                };
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&state), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The value for `OPENAI_BASE_URL`.
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The value for `ANTHROPIC_BASE_URL`.
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration that sends `kind`'s requests here, with the
    /// key this simulator expects (any non-empty key when it expects none).
    pub fn provider_config(&self, kind: ProviderKind) -> crate::ProviderConfig {
        let base_url = match kind {
            ProviderKind::OpenAi => self.openai_base_url(),
            ProviderKind::Anthropic => self.anthropic_base_url(),
        };
        let key = self.lock().config.api_key.clone();
        crate::ProviderConfig {
            base_url,
            api_key: Some(crate::ApiKey::new(
                key.unwrap_or_else(|| "sk-simulator".into()),
            )),
            ..crate::ProviderConfig::from_env(kind)
        }
    }

    /// Queues a fault for the next request (of `model`, if given).
    pub fn push_fault(&self, model: Option<&str>, fault: Fault) {
        self.lock()
            .faults
            .push_back((model.map(str::to_owned), fault));
    }

    /// The requests received so far: the most recent
    /// [`SimulatorConfig::request_log`] of them.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().log.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reply(status: u16, headers: &[(String, String)], body: String) -> Reply {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json");
    for (k, v) in headers {
        response = response.header(k.as_str(), v.as_str());
    }
    response
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn error_body(provider: ProviderKind, kind: &str, code: Option<&str>, message: &str) -> String {
    match provider {
        ProviderKind::OpenAi => {
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string()
        }
        ProviderKind::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_sim_error"})
            .to_string(),
    }
}

/// What a valid request asks for, in simulator terms.
struct Parsed {
    model: String,
    max_tokens: u64,
    prefix_text_tokens: u64,
    rest_tokens: u64,
    cache_key: Option<String>,
    ttl_1h: bool,
}

/// Text parts of a content value, each with its `cache_control` if any.
type TextParts = Vec<(String, Option<Value>)>;

/// A rejected request: status, error type, error code, message.
type Rejection = (u16, &'static str, Option<&'static str>, String);

fn text_of(value: &Value) -> Result<(TextParts, usize), String> {
    match value {
        Value::String(s) => Ok((vec![(s.clone(), None)], 0)),
        Value::Array(blocks) => {
            let mut out = Vec::new();
            let mut breakpoints = 0;
            for block in blocks {
                let obj = block.as_object().ok_or("content blocks must be objects")?;
                if obj.get("type").and_then(Value::as_str) != Some("text") {
                    return Err("only text content blocks are simulated".into());
                }
                for key in obj.keys() {
                    if !matches!(key.as_str(), "type" | "text" | "cache_control") {
                        return Err(format!(
                            "content block: {key}: Extra inputs are not permitted"
                        ));
                    }
                }
                let text = obj
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or("text block without `text` string")?;
                let cc = obj.get("cache_control").cloned();
                if let Some(cc) = &cc {
                    breakpoints += 1;
                    let ok_type = cc.get("type").and_then(Value::as_str) == Some("ephemeral");
                    let ok_ttl = match cc.get("ttl") {
                        None => true,
                        Some(t) => matches!(t.as_str(), Some("5m" | "1h")),
                    };
                    if !ok_type || !ok_ttl {
                        return Err("cache_control must be {\"type\": \"ephemeral\", \"ttl\"?: \"5m\"|\"1h\"}".into());
                    }
                }
                out.push((text.to_owned(), cc));
            }
            Ok((out, breakpoints))
        }
        _ => Err("content must be a string or an array of blocks".into()),
    }
}

fn parse_openai(body: &Value, catalog: &Catalog) -> Result<Parsed, Rejection> {
    let bad = |m: String| (400, "invalid_request_error", None, m);
    let obj = body
        .as_object()
        .ok_or_else(|| bad("body must be a JSON object".into()))?;
    const KNOWN: &[&str] = &[
        "model",
        "messages",
        "max_completion_tokens",
        "max_tokens",
        "temperature",
        "top_p",
        "reasoning_effort",
        "prompt_cache_key",
        "prompt_cache_retention",
        "seed",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "service_tier",
        "verbosity",
        "n",
        "stop",
    ];
    if let Some(key) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(format!(
            "Unrecognized request argument supplied: {key}"
        )));
    }
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("you must provide a model parameter".into()))?;
    let info = catalog.lookup(ProviderKind::OpenAi, model).ok_or_else(|| {
        (
            404,
            "invalid_request_error",
            Some("model_not_found"),
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
    })?;
    if info.reasoning && obj.contains_key("max_tokens") {
        return Err((400, "invalid_request_error", Some("unsupported_parameter"), "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.".into()));
    }
    if let Some(t) = obj.get("temperature") {
        let t = t
            .as_f64()
            .ok_or_else(|| bad("temperature must be a number".into()))?;
        if info.only_default_temperature && t != 1.0 {
            return Err((
                400,
                "invalid_request_error",
                Some("unsupported_value"),
                format!(
                    "Unsupported value: 'temperature' does not support {t} with this model. Only the default (1) value is supported."
                ),
            ));
        }
    }
    let max_tokens = obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
        .map(|v| {
            v.as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad("max_completion_tokens must be a positive integer".into()))
        })
        .transpose()?
        .unwrap_or(info.max_output);
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages must be an array".into()))?;
    if messages.is_empty() {
        return Err(bad("messages must not be empty".into()));
    }
    let mut texts = Vec::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "system" | "developer" | "user" | "assistant") {
            return Err(bad(format!("Invalid value for 'role': '{role}'")));
        }
        let (parts, breakpoints) =
            text_of(m.get("content").unwrap_or(&Value::Null)).map_err(bad)?;
        if breakpoints > 0 {
            return Err(bad(
                "Unrecognized request argument supplied: cache_control".into()
            ));
        }
        texts.extend(parts.into_iter().map(|(t, _)| t));
    }
    // The cacheable prefix is everything but the final part (the instruction).
    let (last, prefix) = texts.split_last().expect("messages are non-empty");
    let prefix_tokens: u64 = prefix.iter().map(|t| Tokenizer::O200k.count(t)).sum();
    let key_material = format!(
        "{model}\u{0}{}\u{0}{}",
        obj.get("prompt_cache_key")
            .and_then(Value::as_str)
            .unwrap_or(""),
        prefix.join("\u{0}")
    );
    Ok(Parsed {
        model: model.to_owned(),
        max_tokens,
        prefix_text_tokens: prefix_tokens,
        rest_tokens: Tokenizer::O200k.count(last),
        cache_key: (prefix_tokens >= info.min_cacheable_tokens.max(1024))
            .then(|| sha256_hex(key_material.as_bytes())),
        ttl_1h: false,
    })
}

fn parse_anthropic(body: &Value, catalog: &Catalog) -> Result<Parsed, Rejection> {
    let bad = |m: String| (400, "invalid_request_error", None, m);
    let obj = body
        .as_object()
        .ok_or_else(|| bad("body must be a JSON object".into()))?;
    const KNOWN: &[&str] = &[
        "model",
        "max_tokens",
        "messages",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "metadata",
        "service_tier",
        "thinking",
        "cache_control",
    ];
    if let Some(key) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(format!("{key}: Extra inputs are not permitted")));
    }
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("model: Field required".into()))?;
    let info = catalog
        .lookup(ProviderKind::Anthropic, model)
        .ok_or_else(|| (404, "not_found_error", None, format!("model: {model}")))?;
    let max_tokens = obj
        .get("max_tokens")
        .ok_or_else(|| bad("max_tokens: Field required".into()))?
        .as_u64()
        .ok_or_else(|| bad("max_tokens: Input should be a valid integer".into()))?;
    if let Some(t) = obj.get("temperature") {
        let t = t
            .as_f64()
            .ok_or_else(|| bad("temperature: Input should be a valid number".into()))?;
        if !(0.0..=1.0).contains(&t) {
            return Err(bad("temperature: range: 0..1".into()));
        }
        if info.rejects_temperature_with_top_p && obj.contains_key("top_p") {
            return Err(bad("`temperature` and `top_p` cannot both be specified for this model. Please use only one.".into()));
        }
    }
    let mut parts: TextParts = Vec::new();
    let mut breakpoints = 0;
    if let Some(system) = obj.get("system") {
        let (p, b) = text_of(system).map_err(|e| bad(format!("system: {e}")))?;
        parts.extend(p);
        breakpoints += b;
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages: Field required".into()))?;
    if messages.is_empty() {
        return Err(bad("messages: at least one message is required".into()));
    }
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "user" | "assistant") {
            return Err(bad(format!("messages: Unexpected role \"{role}\"")));
        }
        let (p, b) = text_of(m.get("content").unwrap_or(&Value::Null))
            .map_err(|e| bad(format!("messages: {e}")))?;
        parts.extend(p);
        breakpoints += b;
    }
    if breakpoints > 4 {
        return Err(bad(
            "A maximum of 4 blocks with cache_control may be provided.".into(),
        ));
    }
    // The cached prefix ends at the last breakpoint.
    let last_breakpoint = parts.iter().rposition(|(_, cc)| cc.is_some());
    let (prefix, rest) = match last_breakpoint {
        Some(i) => parts.split_at(i + 1),
        None => parts.split_at(0),
    };
    let prefix_tokens: u64 = prefix.iter().map(|(t, _)| estimate_tokens(t)).sum();
    let rest_tokens: u64 = rest.iter().map(|(t, _)| estimate_tokens(t)).sum();
    let ttl_1h = prefix
        .iter()
        .filter_map(|(_, cc)| cc.as_ref())
        .any(|cc| cc.get("ttl").and_then(Value::as_str) == Some("1h"));
    let key_material = format!(
        "{model}\u{0}{}",
        prefix
            .iter()
            .map(|(t, _)| t.as_str())
            .collect::<Vec<_>>()
            .join("\u{0}")
    );
    Ok(Parsed {
        model: model.to_owned(),
        max_tokens,
        prefix_text_tokens: prefix_tokens,
        rest_tokens,
        cache_key: (last_breakpoint.is_some() && prefix_tokens >= info.min_cacheable_tokens)
            .then(|| sha256_hex(key_material.as_bytes())),
        ttl_1h,
    })
}

fn warm_o200k(value: &Value) {
    match value {
        Value::String(s) if s.len() >= 4096 => {
            Tokenizer::O200k.count(s);
        }
        Value::Array(items) => items.iter().for_each(warm_o200k),
        Value::Object(map) => map.values().for_each(warm_o200k),
        _ => {}
    }
}

fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Reply, DropConnection> {
    let provider = match (req.method().as_str(), req.uri().path()) {
        ("POST", "/v1/chat/completions") => ProviderKind::OpenAi,
        ("POST", "/v1/messages") => ProviderKind::Anthropic,
        _ => {
            return Ok(reply(
                404,
                &[],
                json!({"error": {"message": "unknown path", "type": "invalid_request_error"}})
                    .to_string(),
            ));
        }
    };
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let trace = header("x-apex-generation");
    let presented = match provider {
        ProviderKind::OpenAi => {
            header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
        }
        ProviderKind::Anthropic => header("x-api-key"),
    };
    let has_version = header("anthropic-version").is_some();
    // A request counts from its arrival, before its body is read, as the
    // real services count it.
    let arrived_at = Instant::now();
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(DropConnection),
    };
    let body: Arc<Value> = Arc::new(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
    if provider == ProviderKind::OpenAi {
        // Count large texts before taking the lock (the counts are
        // remembered); OpenAI is counted exactly, as the real API does.
        let warm = Arc::clone(&body);
        let _ = tokio::task::spawn_blocking(move || warm_o200k(&warm)).await;
    }
    let body_hash = sha256_hex(&bytes);
    let model_name = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();

    // Everything decided under the lock happens at arrival; the answer is
    // sent after the simulated latency.
    let record = |s: &mut State, status: u16, read: u64, write: u64| {
        let arrived = arrived_at.duration_since(s.started);
        if s.config.request_log == 0 {
            return;
        }
        while s.log.len() >= s.config.request_log {
            s.log.pop_front();
        }
        s.log.push_back(RequestRecord {
            provider,
            model: model_name.clone(),
            trace: trace.clone(),
            status,
            body_hash: body_hash.clone(),
            cache_read_tokens: read,
            cache_write_tokens: write,
            body: Arc::clone(&body),
            arrived,
            answered: Instant::now().duration_since(s.started),
            charged: [0; 3],
        });
    };

    let decision = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let expected = s.config.api_key.clone();
        let auth_ok = match (&presented, &expected) {
            (Some(p), Some(e)) => p == e,
            (Some(p), None) => !p.is_empty(),
            (None, _) => false,
        };
        if !auth_ok {
            record(&mut s, 401, 0, 0);
            // Like the real service, echo a masked form of the key presented.
            let shown = presented.as_deref().map_or_else(String::new, |k| {
                let head: String = k.chars().take(7).collect();
                let tail: String = k
                    .chars()
                    .rev()
                    .take(4)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("{head}***{tail}")
            });
            let body = match provider {
                ProviderKind::OpenAi => error_body(
                    provider,
                    "invalid_request_error",
                    Some("invalid_api_key"),
                    &format!(
                        "Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys."
                    ),
                ),
                ProviderKind::Anthropic => {
                    error_body(provider, "authentication_error", None, "invalid x-api-key")
                }
            };
            return Ok(reply(401, &[], body));
        }
        if provider == ProviderKind::Anthropic && !has_version {
            record(&mut s, 400, 0, 0);
            return Ok(reply(
                400,
                &[],
                error_body(
                    provider,
                    "invalid_request_error",
                    None,
                    "anthropic-version: header is required",
                ),
            ));
        }
        let fault_index = s
            .faults
            .iter()
            .position(|(m, _)| m.as_deref().is_none_or(|m| m == model_name));
        if let Some(i) = fault_index {
            let (_, fault) = s.faults.remove(i).expect("index from position");
            return match fault {
                Fault::Drop => {
                    record(&mut s, 0, 0, 0);
                    Err(DropConnection)
                }
                Fault::Respond {
                    status,
                    headers,
                    body,
                } => {
                    record(&mut s, status, 0, 0);
                    Ok(reply(status, &headers, body))
                }
            };
        }
        if s.config.fault_rate > 0.0 && s.next_random() < s.config.fault_rate {
            let (status, kind, message) = match (provider, s.next_random() < 0.5) {
                (ProviderKind::Anthropic, true) => (529, "overloaded_error", "Overloaded"),
                (ProviderKind::Anthropic, false) => (500, "api_error", "Internal server error"),
                (ProviderKind::OpenAi, true) => (
                    503,
                    "server_error",
                    "The engine is currently overloaded, please try again later",
                ),
                (ProviderKind::OpenAi, false) => (
                    500,
                    "server_error",
                    "The server had an error while processing your request.",
                ),
            };
            record(&mut s, status, 0, 0);
            return Ok(reply(
                status,
                &[],
                error_body(provider, kind, None, message),
            ));
        }
        let catalog = s.catalog.clone();
        let parsed = match provider {
            ProviderKind::OpenAi => parse_openai(&body, &catalog),
            ProviderKind::Anthropic => parse_anthropic(&body, &catalog),
        };
        let parsed = match parsed {
            Ok(p) => p,
            Err((status, kind, code, message)) => {
                record(&mut s, status, 0, 0);
                return Ok(reply(
                    status,
                    &[],
                    error_body(provider, kind, code, &message),
                ));
            }
        };
        let info = catalog
            .lookup(provider, &parsed.model)
            .expect("parse checked the model");
        let total_input = parsed.prefix_text_tokens + parsed.rest_tokens;
        if total_input + parsed.max_tokens > info.context_window {
            record(&mut s, 400, 0, 0);
            let message = format!(
                "prompt is too long: {total_input} tokens + {} max tokens > {} maximum",
                parsed.max_tokens, info.context_window
            );
            return Ok(reply(
                400,
                &[],
                error_body(
                    provider,
                    "invalid_request_error",
                    Some("context_length_exceeded"),
                    &message,
                ),
            ));
        }
        // Cache: hit if an entry written by a *completed* request is alive.
        // Limits are charged at arrival (entries may come in a little out
        // of order, so expired ones are dropped wherever they are).
        let now = arrived_at;
        let hit = parsed
            .cache_key
            .as_ref()
            .is_some_and(|k| s.cache.get(k).is_some_and(|exp| *exp > now));
        let (cache_read, cache_write, uncached) = match (&parsed.cache_key, hit, provider) {
            (Some(_), true, ProviderKind::OpenAi) => {
                let cached = parsed.prefix_text_tokens / 128 * 128;
                (cached, 0, total_input - cached)
            }
            (Some(_), true, ProviderKind::Anthropic) => {
                (parsed.prefix_text_tokens, 0, parsed.rest_tokens)
            }
            (Some(_), false, ProviderKind::Anthropic) => {
                (0, parsed.prefix_text_tokens, parsed.rest_tokens)
            }
            _ => (0, 0, total_input),
        };
        // Per-minute limits, charged at arrival like the real services, by
        // the simulator's own accounting (`accounting`), not Apex's.
        let limits = s.limits_for(provider, &parsed.model);
        let window = s.scaled(Duration::from_secs(60));
        let key = (provider, s.model_key(provider, &parsed.model));
        let rules = match provider {
            ProviderKind::OpenAi => s.config.openai_rules,
            ProviderKind::Anthropic => s.config.anthropic_rules,
        };
        let body_bytes = bytes.len() as u64;
        let (charge_in, charge_out) = match provider {
            ProviderKind::Anthropic => (
                rules.input_charge(uncached + cache_write, body_bytes, total_input),
                parsed.max_tokens,
            ),
            ProviderKind::OpenAi => (
                rules.input_charge(total_input, body_bytes, total_input) + parsed.max_tokens,
                0,
            ),
        };
        let account = s
            .accounts
            .entry(key.clone())
            .or_insert_with(|| Account::new(rules, window));
        let admitted = account.admit(now, limits, provider, [1, charge_in, charge_out]);
        let report = account.report(now, limits, provider);
        let (too_large, blocked, charge_id) = match admitted {
            accounting::Admit::Granted(id) => (None, None, Some(id)),
            accounting::Admit::Wait(wait) => (None, Some(wait), None),
            accounting::Admit::TooLarge(limit, requested) => (Some((limit, requested)), None, None),
        };
        let mut headers: Vec<(String, String)> = Vec::new();
        match provider {
            ProviderKind::OpenAi => {
                for (name, dim) in [("requests", report.dims[0]), ("tokens", report.dims[1])] {
                    if let Some((limit, remaining, reset)) = dim {
                        headers.push((format!("x-ratelimit-limit-{name}"), limit.to_string()));
                        headers.push((
                            format!("x-ratelimit-remaining-{name}"),
                            remaining.to_string(),
                        ));
                        headers.push((format!("x-ratelimit-reset-{name}"), go_duration(reset)));
                    }
                }
            }
            ProviderKind::Anthropic => {
                for (name, dim) in [
                    ("requests", report.dims[0]),
                    ("input-tokens", report.dims[1]),
                    ("output-tokens", report.dims[2]),
                ] {
                    if let Some((limit, remaining, reset)) = dim {
                        let reset_at = (jiff::Timestamp::now()
                            + jiff::SignedDuration::try_from(reset).unwrap_or_default())
                        .to_string();
                        headers.push((
                            format!("anthropic-ratelimit-{name}-limit"),
                            limit.to_string(),
                        ));
                        headers.push((
                            format!("anthropic-ratelimit-{name}-remaining"),
                            remaining.to_string(),
                        ));
                        headers.push((format!("anthropic-ratelimit-{name}-reset"), reset_at));
                    }
                }
            }
        }
        if let Some((limit, requested)) = too_large {
            record(&mut s, 429, 0, 0);
            let message = match provider {
                ProviderKind::OpenAi => format!(
                    "Request too large for {} on tokens per min (TPM): Limit {limit}, Requested {requested}.",
                    parsed.model
                ),
                ProviderKind::Anthropic => format!(
                    "This request would exceed the rate limit for your organization of {limit} tokens per minute."
                ),
            };
            return Ok(reply(
                429,
                &headers,
                error_body(
                    provider,
                    if provider == ProviderKind::OpenAi {
                        "tokens"
                    } else {
                        "rate_limit_error"
                    },
                    Some("rate_limit_exceeded"),
                    &message,
                ),
            ));
        }
        if let Some(wait) = blocked {
            record(&mut s, 429, 0, 0);
            headers.push((
                "retry-after".into(),
                wait.as_secs_f64().ceil().max(1.0).to_string(),
            ));
            headers.push(("retry-after-ms".into(), wait.as_millis().max(1).to_string()));
            let message = format!(
                "Rate limit reached for {}. Please try again in {}.",
                parsed.model,
                go_duration(wait)
            );
            let kind = if provider == ProviderKind::OpenAi {
                "requests"
            } else {
                "rate_limit_error"
            };
            return Ok(reply(
                429,
                &headers,
                error_body(provider, kind, Some("rate_limit_exceeded"), &message),
            ));
        }
        let charge_id = charge_id.expect("admitted above");
        let output = parsed.max_tokens.min(u64::from(s.config.output_tokens));
        let latency = s.scaled(
            s.config.base_latency
                + s.config.per_input_token.mul_f64(uncached as f64)
                + s.config.per_output_token.mul_f64(output as f64),
        );
        let id = s.next_id;
        s.next_id += 1;
        let snapshot = info
            .ids
            .last()
            .cloned()
            .unwrap_or_else(|| parsed.model.clone());
        let ttl = s.scaled(Duration::from_secs(if parsed.ttl_1h { 3600 } else { 300 }));
        Accepted {
            finish_length: parsed.max_tokens < u64::from(s.config.output_tokens),
            parsed,
            output,
            latency,
            id,
            snapshot,
            ttl,
            headers,
            cache_read,
            cache_write,
            uncached,
            key,
            charge_id,
            charged: [1, charge_in, charge_out],
            reasoning: info.reasoning,
        }
    };
    let Accepted {
        parsed,
        output,
        latency,
        id,
        snapshot,
        ttl,
        headers,
        cache_read,
        cache_write,
        uncached,
        key,
        charge_id,
        charged,
        reasoning,
        finish_length,
    } = decision;
    tokio::time::sleep(latency).await;

    let text = std::iter::repeat_n("word ", output as usize).collect::<String>();
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    // The entry becomes usable only now that the writing request completed.
    if let Some(k) = &parsed.cache_key {
        let expires = Instant::now() + ttl;
        s.cache.insert(k.clone(), expires);
    }
    // Settle the output reservation to what was produced.
    let settled = match key.0 {
        ProviderKind::OpenAi => [1, charged[1] - parsed.max_tokens + output, 0],
        ProviderKind::Anthropic => [1, charged[1], output],
    };
    if let Some(account) = s.accounts.get_mut(&key) {
        account.settle(charge_id, charged, settled);
    }
    record(&mut s, 200, cache_read, cache_write);
    if let Some(last) = s.log.back_mut() {
        last.charged = settled;
    }
    let body = match key.0 {
        ProviderKind::OpenAi => {
            let reasoning_tokens = if reasoning { output / 2 } else { 0 };
            json!({
                "id": format!("chatcmpl-sim{id}"),
                "object": "chat.completion",
                "created": jiff::Timestamp::now().as_second(),
                "model": snapshot,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.trim_end(), "refusal": null},
                             "finish_reason": if finish_length { "length" } else { "stop" }}],
                "usage": {
                    "prompt_tokens": uncached + cache_read,
                    "completion_tokens": output,
                    "total_tokens": uncached + cache_read + output,
                    "prompt_tokens_details": {"cached_tokens": cache_read, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": reasoning_tokens, "audio_tokens": 0,
                                                  "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
                }
            })
        }
        ProviderKind::Anthropic => json!({
            "id": format!("msg_sim{id}"),
            "type": "message",
            "role": "assistant",
            "model": snapshot,
            "content": [{"type": "text", "text": text.trim_end()}],
            "stop_reason": if finish_length { "max_tokens" } else { "end_turn" },
            "stop_sequence": null,
            "usage": {
                "input_tokens": uncached,
                "cache_creation_input_tokens": cache_write,
                "cache_read_input_tokens": cache_read,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": if parsed.ttl_1h { 0 } else { cache_write },
                    "ephemeral_1h_input_tokens": if parsed.ttl_1h { cache_write } else { 0 }
                },
                "output_tokens": output,
                "service_tier": "standard"
            }
        }),
    };
    let mut headers = headers;
    let id_header = match key.0 {
        ProviderKind::OpenAi => "x-request-id",
        ProviderKind::Anthropic => "request-id",
    };
    headers.push((id_header.into(), format!("req_sim{id}")));
    drop(s);
    Ok(reply(200, &headers, body.to_string()))
}

/// A request that passed every check, waiting for its simulated latency.
struct Accepted {
    parsed: Parsed,
    output: u64,
    latency: Duration,
    id: u64,
    snapshot: String,
    ttl: Duration,
    headers: Vec<(String, String)>,
    cache_read: u64,
    cache_write: u64,
    uncached: u64,
    key: (ProviderKind, String),
    /// The account's id of the charge, and what it charged at arrival.
    charge_id: u64,
    charged: [u64; 3],
    reasoning: bool,
    finish_length: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_up_to_a_second() {
        assert_eq!(accept_backoff(1), Duration::from_millis(10));
        assert_eq!(accept_backoff(2), Duration::from_millis(20));
        assert_eq!(accept_backoff(8), Duration::from_secs(1));
        assert_eq!(accept_backoff(u32::MAX), Duration::from_secs(1));
    }
}
