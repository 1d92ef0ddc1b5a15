//! A loopback server that speaks both wire formats, for tests, examples and
//! benchmarks: `POST /v1/chat/completions` and `/v1/responses` (OpenAI),
//! `POST /v1/messages` (Anthropic), and both Batch APIs (`batches`).
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

use apex_core::context::sha256_hex;
use apex_core::tokens::Tokenizer;
use apex_core::{Catalog, ProviderKind};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

mod accounting;
mod answers;
mod batches;
mod checks;
mod requests;
pub mod sample;

use answers::Answer;
pub use batches::BatchLogEntry;
pub use requests::SimApi;
use requests::{Parsed, parse_chat, parse_messages, parse_responses};

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
    /// Extra time per input token processed (not read from the cache;
    /// written to it counts), before scaling.
    pub per_input_token: Duration,
    /// Extra time per output token, before scaling.
    pub per_output_token: Duration,
    /// Tokens each answer has at most (capped by the request's max tokens).
    pub output_tokens: u32,
    /// How much answer lengths vary (0..1): each answer has between
    /// `(1 - spread) * output_tokens` and `output_tokens`, drawn from the
    /// request and how often it was seen, so runs repeat exactly. 0 by
    /// default here (tests count tokens); `apex simulate` uses 0.6.
    pub output_spread: f64,
    /// How much latencies vary (0..1): each is scaled by a factor drawn
    /// from `1 ± jitter`. 0 by default here; `apex simulate` uses 0.3.
    pub latency_jitter: f64,
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
    /// How long a batch takes from creation to its end, before scaling.
    pub batch_time: Duration,
    /// Share of batches (0..1) that expire with the later half of their
    /// items unprocessed.
    pub batch_expire_rate: f64,
    /// Share of batch items (0..1) that end `errored` with a server error.
    pub batch_error_rate: f64,
    /// Most requests per batch (default: Anthropic 100,000, OpenAI 50,000).
    pub batch_max_requests: Option<usize>,
    /// Most bytes per batch (default: Anthropic 256 MB, OpenAI 200 MB).
    pub batch_max_bytes: Option<usize>,
    /// OpenAI's per-model limit on tokens enqueued in batches in progress
    /// (none by default).
    pub batch_queue_tokens: Option<u64>,
    /// The first this many downloads of batch results (Anthropic results,
    /// OpenAI file contents) answer 500.
    pub batch_result_failures: u32,
    /// The first this many batches created are created, but the connection
    /// drops before the answer.
    pub batch_create_drops: u32,
    /// Answer every request `307 Temporary Redirect` to this origin (same
    /// path and query), as a moved or misconfigured proxy would.
    pub redirect_to: Option<String>,
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
            output_spread: 0.0,
            latency_jitter: 0.0,
            fault_rate: 0.0,
            limits: Vec::new(),
            openai_rules: LimitRules::of(ProviderKind::OpenAi),
            anthropic_rules: LimitRules::of(ProviderKind::Anthropic),
            request_log: 4096,
            batch_time: Duration::from_secs(600),
            batch_expire_rate: 0.0,
            batch_error_rate: 0.0,
            batch_max_requests: None,
            batch_max_bytes: None,
            batch_queue_tokens: None,
            batch_result_failures: 0,
            batch_create_drops: 0,
            redirect_to: None,
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
    /// Serve the request, but stop half-way through the answer (a stream
    /// after half its events, a body after half its bytes) and close the
    /// connection: the client has paid and holds half an answer.
    Cut,
    /// Serve the request, send half the answer, then fall silent (for an
    /// hour, scaled) without closing: only an idle timeout ends it.
    Stall,
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
    /// When it was answered (a stream: when its last event went), from the
    /// simulator's start.
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
    /// How many answers each (model, source) has had: identical requests at
    /// a temperature above 0 get different answers, in a repeatable order.
    answered: HashMap<u64, u64>,
    batches: batches::Batches,
    /// `http://ADDR`, for the absolute URLs some answers carry.
    base_url: String,
    /// Every request that arrived (bounded like the request log).
    arrivals: VecDeque<Arrival>,
}

/// A request as it arrived, whatever became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// `METHOD /path?query`.
    pub request: String,
    /// The credential headers it carried (`authorization`, `x-api-key`,
    /// `x-goog-api-key`), by name only.
    pub credentials: Vec<String>,
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

    /// The answer to a request served now: the next id, the snapshot of the
    /// model that answers, text drawn from the request's context, a length
    /// up to the configured output (cut at `max_tokens`).
    fn answer(&mut self, api: SimApi, parsed: &Parsed, input: (u64, u64, u64)) -> Answer {
        let id = self.next_id;
        self.next_id += 1;
        let snapshot = self
            .catalog
            .lookup(api.provider(), &parsed.model)
            .and_then(|m| m.ids.last().cloned())
            .unwrap_or_else(|| parsed.model.clone());
        let seed = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            parsed.model.hash(&mut h);
            parsed.source.hash(&mut h);
            let source = h.finish();
            if self.answered.len() > 100_000 {
                self.answered.clear();
            }
            let seen = self.answered.entry(source).or_default();
            *seen += 1;
            if parsed.varies {
                source ^ seen.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            } else {
                source
            }
        };
        let mut draw = sample::Xorshift(seed | 1);
        let unit = |r: &mut sample::Xorshift| (r.next() >> 11) as f64 / (1u64 << 53) as f64;
        let spread = self.config.output_spread.clamp(0.0, 1.0);
        let configured = u64::from(self.config.output_tokens);
        let configured = ((configured as f64) * (1.0 - spread * unit(&mut draw))).round() as u64;
        let configured = configured.max(1);
        let output = parsed.max_tokens.min(configured);
        let text = sample::answer_text(&parsed.source, output, draw.next());
        Answer::of(
            (api, id, snapshot),
            parsed,
            input,
            (output, text),
            parsed.max_tokens < configured,
        )
    }

    /// A latency varied by the configured jitter.
    fn jittered(&mut self, d: Duration) -> Duration {
        let jitter = self.config.latency_jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return d;
        }
        d.mul_f64(1.0 + jitter * (2.0 * self.next_random() - 1.0))
    }

    fn next_random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

type Reply = Response<SimBody>;

/// A response body: whole, or fed by a task (a stream, or an answer that is
/// cut or stalls). An error from the task closes the connection mid-body.
pub enum SimBody {
    /// The whole body at once.
    Full(Option<Bytes>),
    /// Chunks as the task sends them.
    Channel(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl hyper::body::Body for SimBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Self::Full(bytes) => std::task::Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Full(Some(b)) => hyper::body::SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => hyper::body::SizeHint::with_exact(0),
            Self::Channel(_) => hyper::body::SizeHint::default(),
        }
    }
}

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
            answered: HashMap::new(),
            batches: batches::Batches::default(),
            base_url: format!("http://{addr}"),
            arrivals: VecDeque::new(),
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

    /// Every request that arrived, oldest first (the most recent
    /// [`SimulatorConfig::request_log`] of them), answered or not.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.lock().arrivals.iter().cloned().collect()
    }

    /// The batches received so far (both Batch APIs), oldest first.
    pub fn batches(&self) -> Vec<BatchLogEntry> {
        self.lock().batches.log.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reply(status: u16, headers: &[(String, String)], body: String) -> Reply {
    respond(
        status,
        "application/json",
        headers,
        SimBody::Full(Some(Bytes::from(body))),
    )
}

fn respond(status: u16, content_type: &str, headers: &[(String, String)], body: SimBody) -> Reply {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", content_type);
    for (k, v) in headers {
        response = response.header(k.as_str(), v.as_str());
    }
    response
        .body(body)
        .expect("static response parts are valid")
}

/// Sends `chunks` through a channel body: one at once, the rest spaced over
/// `spread`; then, as `fault` says, ends, stalls or breaks the connection.
fn fed(chunks: Vec<Bytes>, spread: Duration, fault: Option<Fault>, stall: Duration) -> SimBody {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let keep = match fault {
        Some(Fault::Cut | Fault::Stall) => chunks
            .len()
            .div_ceil(2)
            .min(chunks.len().saturating_sub(1))
            .max(1),
        _ => chunks.len(),
    };
    let gap = spread / u32::try_from(chunks.len().max(1)).unwrap_or(u32::MAX);
    tokio::spawn(async move {
        for (i, chunk) in chunks.into_iter().take(keep).enumerate() {
            if i > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
        match fault {
            Some(Fault::Cut) => {
                let _ = tx.send(Err(std::io::Error::other("simulated cut"))).await;
            }
            Some(Fault::Stall) => {
                // Silent until the stall ends or the client gives up.
                tokio::select! {
                    () = tokio::time::sleep(stall) => {
                        let _ = tx.send(Err(std::io::Error::other("simulated stall"))).await;
                    }
                    () = tx.closed() => {}
                }
            }
            _ => {}
        }
    });
    SimBody::Channel(rx)
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

/// The key a request presents: OpenAI's bearer token; Anthropic's
/// `x-api-key`, or a bearer token (its SDKs 2.0 and later may send one).
fn presented_key(provider: ProviderKind, headers: &hyper::HeaderMap) -> Option<String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let bearer = header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
    match provider {
        ProviderKind::OpenAi => bearer,
        ProviderKind::Anthropic => header("x-api-key").or(bearer),
    }
}

/// Whether a presented key is accepted (the configured one, or any
/// non-empty key when none is configured); the 401 body when not, echoing a
/// masked form of the key as the real services do.
fn check_key(
    provider: ProviderKind,
    expected: Option<&str>,
    presented: Option<&str>,
) -> Result<(), String> {
    let ok = match (presented, expected) {
        (Some(p), Some(e)) => p == e,
        (Some(p), None) => !p.is_empty(),
        (None, _) => false,
    };
    if ok {
        return Ok(());
    }
    let shown = presented.map_or_else(String::new, |k| {
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
    Err(match provider {
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
    })
}

/// A request body checked as its endpoint checks it: schema, the model's
/// rules, and input plus `max_tokens` within the model's window.
fn validate(api: SimApi, body: &Value, catalog: &Catalog) -> Result<Parsed, requests::Rejection> {
    let parsed = match api {
        SimApi::Chat => parse_chat(body, catalog),
        SimApi::Responses => parse_responses(body, catalog),
        SimApi::Messages => parse_messages(body, catalog),
    }?;
    let info = catalog
        .lookup(api.provider(), &parsed.model)
        .expect("parse checked the model");
    let total_input = parsed.prefix_text_tokens + parsed.rest_tokens;
    if total_input + parsed.max_tokens > info.context_window {
        let message = format!(
            "prompt is too long: {total_input} tokens + {} max tokens > {} maximum",
            parsed.max_tokens, info.context_window
        );
        return Err((
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
            message,
        ));
    }
    Ok(parsed)
}

/// (cache read, cache write, uncached) input of a request that hit the
/// cache or not. OpenAI's automatic cache serves 128-token blocks of the
/// prefix and reports no writes; explicit breakpoints (and Anthropic)
/// serve and write the prefix exactly.
fn cache_usage(parsed: &Parsed, hit: bool) -> (u64, u64, u64) {
    let total_input = parsed.prefix_text_tokens + parsed.rest_tokens;
    match (&parsed.cache_key, hit, parsed.reports_writes) {
        (Some(_), true, false) => {
            let cached = parsed.prefix_text_tokens / 128 * 128;
            (cached, 0, total_input - cached)
        }
        (Some(_), true, true) => (parsed.prefix_text_tokens, 0, parsed.rest_tokens),
        (Some(_), false, true) => (0, parsed.prefix_text_tokens, parsed.rest_tokens),
        _ => (0, 0, total_input),
    }
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
    {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let credentials = ["authorization", "x-api-key", "x-goog-api-key"]
            .into_iter()
            .filter(|h| req.headers().contains_key(*h))
            .map(str::to_owned)
            .collect();
        while s.arrivals.len() >= s.config.request_log.max(1) {
            s.arrivals.pop_front();
        }
        s.arrivals.push_back(Arrival {
            request: format!("{} {path}", req.method()),
            credentials,
        });
        if let Some(to) = &s.config.redirect_to {
            let location = format!("{}{path}", to.trim_end_matches('/'));
            return Ok(reply(
                307,
                &[("location".to_owned(), location)],
                String::new(),
            ));
        }
    }
    if let Some(provider) = batches::route(req.uri().path()) {
        return batches::handle(state, provider, req).await;
    }
    if let Some(provider) = checks::route(req.method().as_str(), req.uri().path()) {
        return checks::handle(state, provider, req).await;
    }
    let Some(api) = SimApi::route(req.method().as_str(), req.uri().path()) else {
        let message = format!(
            "Invalid URL ({} {}): the simulator serves POST /v1/chat/completions, /v1/responses, /v1/messages and /v1/messages/count_tokens, GET /v1/models/MODEL, and both Batch APIs",
            req.method(),
            req.uri().path()
        );
        return Ok(reply(
            404,
            &[],
            json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})
                .to_string(),
        ));
    };
    let provider = api.provider();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let trace = header("x-apex-generation");
    let presented = presented_key(provider, req.headers());
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
        if let Err(body) = check_key(provider, s.config.api_key.as_deref(), presented.as_deref()) {
            record(&mut s, 401, 0, 0);
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
        let mut answer_fault = None;
        if let Some(i) = fault_index {
            let (_, fault) = s.faults.remove(i).expect("index from position");
            match fault {
                Fault::Drop => {
                    record(&mut s, 0, 0, 0);
                    return Err(DropConnection);
                }
                Fault::Respond {
                    status,
                    headers,
                    body,
                } => {
                    record(&mut s, status, 0, 0);
                    return Ok(reply(status, &headers, body));
                }
                cut_or_stall => answer_fault = Some(cut_or_stall),
            }
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
        let parsed = match validate(api, &body, &s.catalog) {
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
        let total_input = parsed.prefix_text_tokens + parsed.rest_tokens;
        // Cache: hit if an entry written by a *completed* request is alive.
        // Limits are charged at arrival (entries may come in a little out
        // of order, so expired ones are dropped wherever they are).
        let now = arrived_at;
        let hit = parsed
            .cache_key
            .as_ref()
            .is_some_and(|k| s.cache.get(k).is_some_and(|exp| *exp > now));
        let (cache_read, cache_write, uncached) = cache_usage(&parsed, hit);
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
        let answer = s.answer(api, &parsed, (uncached, cache_read, cache_write));
        // The input is processed before the first byte: what is not read
        // from the cache, including what is written to it.
        let processed = uncached + cache_write;
        // Time to first token, then the output at the model's throughput,
        // each varied by the jitter.
        let to_first = s.config.base_latency + s.config.per_input_token.mul_f64(processed as f64);
        let first_byte = s.jittered(to_first);
        let writing = s.config.per_output_token.mul_f64(answer.output as f64);
        let writing = s.jittered(writing);
        let (first_byte, latency) = (s.scaled(first_byte), s.scaled(first_byte + writing));
        let ttl = s.scaled(parsed.ttl);
        Accepted {
            first_byte,
            answer_fault,
            parsed,
            answer,
            latency,
            ttl,
            headers,
            key,
            charge_id,
            charged: [1, charge_in, charge_out],
        }
    };
    let Accepted {
        parsed,
        answer,
        latency,
        first_byte,
        ttl,
        headers,
        key,
        charge_id,
        charged,
        answer_fault,
    } = decision;
    let (output, id) = (answer.output, answer.id);
    // A stream's headers come after the input is read; its text over the
    // output time. A body comes whole after both.
    tokio::time::sleep(if parsed.stream { first_byte } else { latency }).await;

    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    // The entry becomes usable only now that the writing request has begun
    // answering.
    if let Some(k) = &parsed.cache_key {
        let expires = Instant::now() + ttl;
        s.cache.insert(k.clone(), expires);
    }
    // Settle the output reservation to what was produced, when the answer
    // ends (Anthropic adjusts OTPM at the end; a stream ends after its
    // text).
    let settled = match key.0 {
        ProviderKind::OpenAi => [1, charged[1] - parsed.max_tokens + output, 0],
        ProviderKind::Anthropic => [1, charged[1], output],
    };
    if parsed.stream {
        let (state, key, spread) = (
            Arc::clone(&state),
            key.clone(),
            latency.saturating_sub(first_byte),
        );
        tokio::spawn(async move {
            tokio::time::sleep(spread).await;
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(account) = s.accounts.get_mut(&key) {
                account.settle(charge_id, charged, settled);
            }
        });
    } else if let Some(account) = s.accounts.get_mut(&key) {
        account.settle(charge_id, charged, settled);
    }
    record(&mut s, 200, answer.cache_read, answer.cache_write);
    if let Some(last) = s.log.back_mut() {
        last.charged = settled;
        if parsed.stream {
            // A stream is answered when its last event has gone.
            last.answered += latency.saturating_sub(first_byte);
        }
    }
    let stall = s.scaled(Duration::from_secs(3600));
    drop(s);
    let mut headers = headers;
    let id_header = match key.0 {
        ProviderKind::OpenAi => "x-request-id",
        ProviderKind::Anthropic => "request-id",
    };
    headers.push((id_header.into(), format!("req_sim{id}")));
    if parsed.stream {
        let spread = latency.saturating_sub(first_byte);
        let events = answer.events().into_iter().map(Bytes::from).collect();
        let body = fed(events, spread, answer_fault, stall);
        headers.push(("cache-control".into(), "no-cache".into()));
        return Ok(respond(
            200,
            "text/event-stream; charset=utf-8",
            &headers,
            body,
        ));
    }
    let body = answer.body().to_string();
    if answer_fault.is_some() {
        // Half a body, then a cut (or a stall): a 200 the client cannot use.
        let mut whole = Bytes::from(body);
        let half = whole.split_to(whole.len() / 2);
        let body = fed(vec![half, whole], Duration::ZERO, answer_fault, stall);
        return Ok(respond(200, "application/json", &headers, body));
    }
    Ok(reply(200, &headers, body))
}

/// A request that passed every check, waiting for its simulated latency.
struct Accepted {
    parsed: Parsed,
    /// What it will answer (text, usage, ids).
    answer: Answer,
    latency: Duration,
    first_byte: Duration,
    answer_fault: Option<Fault>,
    ttl: Duration,
    headers: Vec<(String, String)>,
    key: (ProviderKind, String),
    /// The account's id of the charge, and what it charged at arrival.
    charge_id: u64,
    charged: [u64; 3],
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
