//! Both Batch APIs as the simulator serves them: Anthropic Message Batches
//! (`/v1/messages/batches`) and OpenAI Batch (`/v1/files`, `/v1/batches`).
//!
//! A batch ends `batch_time` (scaled) after it is created. Its items are
//! processed together at that moment against the prompt cache as it was
//! before: items of one batch never read each other's writes, a later
//! batch reads what an earlier, ended one wrote (the behaviour users of
//! the real services report). Configurable: expired items (the later half
//! of a batch, unprocessed), errored items, per-batch caps (413 beyond
//! them) and OpenAI's per-model enqueued-token limit (a batch over it
//! fails as a whole with `token_limit_exceeded`).

#![allow(
    clippy::result_large_err,
    reason = "a refusal is the reply itself, built once per refused request"
)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use apex_core::ProviderKind;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::requests::SimApi;
use super::{
    DropConnection, Reply, State, cache_usage, check_key, error_body, presented_key, reply,
    validate,
};

/// One batch the simulator received, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLogEntry {
    /// The API.
    pub provider: ProviderKind,
    /// Its id.
    pub id: String,
    /// Requests in it.
    pub requests: usize,
    /// Whether it was accepted (not failed as a whole).
    pub accepted: bool,
}

/// One item's outcome once processed.
enum ItemOutcome {
    Succeeded(Value),
    Errored { status: u16, body: Value },
    Expired,
    Canceled,
}

/// A batch in the simulator.
pub(super) struct SimBatch {
    id: String,
    provider: ProviderKind,
    endpoint: String,
    model: String,
    created_unix: i64,
    created_at: String,
    deadline: Instant,
    items: Vec<(String, Arc<Value>)>,
    input_file_id: Option<String>,
    metadata: Value,
    /// Tokens it holds in OpenAI's enqueued-token count while in progress.
    tokens: u64,
    failed: Option<(String, String)>,
    cancelled_at: Option<Instant>,
    results: Option<Vec<(String, ItemOutcome)>>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
}

/// The batches and files the simulator holds.
#[derive(Default)]
pub(super) struct Batches {
    batches: HashMap<String, SimBatch>,
    order: Vec<String>,
    files: HashMap<String, Bytes>,
    pub log: Vec<BatchLogEntry>,
    next: u64,
}

/// Whether a method and path name a batch endpoint (`Some(provider)`).
pub(super) fn route(path: &str) -> Option<ProviderKind> {
    if path.starts_with("/v1/messages/batches") {
        Some(ProviderKind::Anthropic)
    } else if path.starts_with("/v1/files") || path.starts_with("/v1/batches") {
        Some(ProviderKind::OpenAi)
    } else {
        None
    }
}

fn not_found(provider: ProviderKind, what: &str) -> Reply {
    let kind = match provider {
        ProviderKind::OpenAi => "invalid_request_error",
        ProviderKind::Anthropic => "not_found_error",
    };
    reply(
        404,
        &[],
        error_body(provider, kind, None, &format!("{what} not found")),
    )
}

fn bad_request(provider: ProviderKind, message: &str) -> Reply {
    reply(
        400,
        &[],
        error_body(provider, "invalid_request_error", None, message),
    )
}

fn too_large(provider: ProviderKind, message: &str) -> Reply {
    let kind = match provider {
        ProviderKind::OpenAi => "invalid_request_error",
        ProviderKind::Anthropic => "request_too_large",
    };
    reply(413, &[], error_body(provider, kind, None, message))
}

/// Serves one batch-endpoint request.
pub(super) async fn handle(
    state: Arc<Mutex<State>>,
    provider: ProviderKind,
    req: Request<Incoming>,
) -> Result<Reply, DropConnection> {
    let creates = req.method() == Method::POST
        && matches!(
            req.uri().path().trim_end_matches('/'),
            "/v1/messages/batches" | "/v1/batches"
        );
    let reply = serve(&state, provider, req).await;
    if creates && reply.status() == 200 {
        // A batch created whose answer never arrives (a dropped connection
        // after the work was done): the client must find it, not pay again.
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        if s.config.batch_create_drops > 0 {
            s.config.batch_create_drops -= 1;
            return Err(DropConnection);
        }
    }
    Ok(reply)
}

async fn serve(state: &Arc<Mutex<State>>, provider: ProviderKind, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let presented = presented_key(provider, req.headers());
    let has_version = req.headers().contains_key("anthropic-version");
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return bad_request(provider, "the request body could not be read");
    };
    {
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(body) = check_key(provider, s.config.api_key.as_deref(), presented.as_deref()) {
            return reply(401, &[], body);
        }
    }
    if provider == ProviderKind::Anthropic && !has_version {
        return bad_request(provider, "anthropic-version: header is required");
    }
    let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
    let downloads = matches!(
        segments.as_slice(),
        ["messages", "batches", _, "results"] | ["files", _, "content"]
    );
    if downloads {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        if s.config.batch_result_failures > 0 {
            s.config.batch_result_failures -= 1;
            let kind = match provider {
                ProviderKind::OpenAi => "server_error",
                ProviderKind::Anthropic => "api_error",
            };
            return reply(
                500,
                &[],
                error_body(provider, kind, None, "Internal server error"),
            );
        }
    }
    match (provider, &method, segments.as_slice()) {
        (ProviderKind::Anthropic, &Method::POST, ["messages", "batches"]) => {
            create_anthropic(state, &body).await
        }
        (ProviderKind::Anthropic, &Method::GET, ["messages", "batches"]) => {
            list(state, provider, &query)
        }
        (ProviderKind::Anthropic, &Method::GET, ["messages", "batches", id]) => {
            retrieve(state, provider, id)
        }
        (ProviderKind::Anthropic, &Method::POST, ["messages", "batches", id, "cancel"]) => {
            cancel(state, provider, id)
        }
        (ProviderKind::Anthropic, &Method::GET, ["messages", "batches", id, "results"]) => {
            anthropic_results(state, id)
        }
        (ProviderKind::OpenAi, &Method::POST, ["files"]) => upload(state, &content_type, &body),
        (ProviderKind::OpenAi, &Method::GET, ["files", id, "content"]) => {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            match s.batches.files.get(*id) {
                Some(content) => super::respond(
                    200,
                    "application/jsonl",
                    &[],
                    super::SimBody::Full(Some(content.clone())),
                ),
                None => not_found(provider, &format!("file {id}")),
            }
        }
        (ProviderKind::OpenAi, &Method::POST, ["batches"]) => create_openai(state, &body).await,
        (ProviderKind::OpenAi, &Method::GET, ["batches"]) => list(state, provider, &query),
        (ProviderKind::OpenAi, &Method::GET, ["batches", id]) => retrieve(state, provider, id),
        (ProviderKind::OpenAi, &Method::POST, ["batches", id, "cancel"]) => {
            cancel(state, provider, id)
        }
        _ => not_found(provider, &format!("{method} {path}")),
    }
}

/// Counts the large texts of item bodies off the async threads, before the
/// lock, as synchronous requests are counted.
async fn warm(bodies: Vec<Arc<Value>>) {
    let _ =
        tokio::task::spawn_blocking(move || bodies.iter().for_each(|b| super::warm_o200k(b))).await;
}

fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks a new batch's items (ids valid and unique, within the caps).
fn check_items(
    s: &State,
    provider: ProviderKind,
    items: &[(String, Arc<Value>)],
    bytes: usize,
) -> Result<(), Reply> {
    let mut seen = HashSet::new();
    for (id, _) in items {
        if !valid_custom_id(id) {
            return Err(bad_request(
                provider,
                &format!("custom_id `{id}` must match ^[a-zA-Z0-9_-]{{1,64}}$"),
            ));
        }
        if !seen.insert(id.as_str()) {
            return Err(bad_request(
                provider,
                &format!("custom_id `{id}` is not unique within the batch"),
            ));
        }
    }
    if items.is_empty() {
        return Err(bad_request(provider, "a batch needs at least one request"));
    }
    let (max_requests, max_bytes) = s.batch_caps(provider);
    // Anthropic validates the request list as it takes it (a 400 naming
    // the cap); an OpenAI batch over the cap is created and then fails
    // validation as a whole (see `create_openai`).
    if provider == ProviderKind::Anthropic && items.len() > max_requests {
        return Err(bad_request(
            provider,
            &format!(
                "requests: List should have at most {max_requests} items after validation, not {}",
                items.len()
            ),
        ));
    }
    if bytes > max_bytes {
        return Err(too_large(
            provider,
            &format!("the batch is {bytes} bytes; at most {max_bytes} are allowed per batch"),
        ));
    }
    Ok(())
}

fn new_batch(
    s: &mut State,
    provider: ProviderKind,
    endpoint: &str,
    items: Vec<(String, Arc<Value>)>,
) -> SimBatch {
    s.batches.next += 1;
    let id = match provider {
        ProviderKind::Anthropic => format!("msgbatch_sim{:06}", s.batches.next),
        ProviderKind::OpenAi => format!("batch_sim{:06}", s.batches.next),
    };
    let now = Instant::now();
    let model = items
        .first()
        .and_then(|(_, b)| b.get("model").and_then(Value::as_str))
        .unwrap_or("")
        .to_owned();
    SimBatch {
        id,
        provider,
        endpoint: endpoint.to_owned(),
        model,
        created_unix: jiff::Timestamp::now().as_second(),
        created_at: jiff::Timestamp::now().to_string(),
        deadline: now + s.scaled(s.config.batch_time),
        items,
        input_file_id: None,
        metadata: Value::Null,
        tokens: 0,
        failed: None,
        cancelled_at: None,
        results: None,
        output_file_id: None,
        error_file_id: None,
    }
}

async fn create_anthropic(state: &Arc<Mutex<State>>, body: &Bytes) -> Reply {
    let provider = ProviderKind::Anthropic;
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return bad_request(provider, "the body is not JSON");
    };
    let Some(requests) = value.get("requests").and_then(Value::as_array) else {
        return bad_request(provider, "requests: Field required");
    };
    let mut items = Vec::with_capacity(requests.len());
    for r in requests {
        let id = r.get("custom_id").and_then(Value::as_str).unwrap_or("");
        let Some(params) = r.get("params") else {
            return bad_request(provider, "requests.params: Field required");
        };
        items.push((id.to_owned(), Arc::new(params.clone())));
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(reply) = check_items(&s, provider, &items, body.len()) {
        return reply;
    }
    let batch = new_batch(&mut s, provider, "/v1/messages", items);
    let object = anthropic_object(&batch, &s.base_url);
    s.batches.log.push(BatchLogEntry {
        provider,
        id: batch.id.clone(),
        requests: batch.items.len(),
        accepted: true,
    });
    s.batches.order.push(batch.id.clone());
    s.batches.batches.insert(batch.id.clone(), batch);
    reply(200, &[], object.to_string())
}

/// The `file` part of a multipart/form-data body, and its `purpose`.
fn multipart_file(content_type: &str, body: &[u8]) -> Option<(Vec<u8>, String)> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))?
        .trim_matches('"');
    let delimiter = format!("--{boundary}");
    let text = body;
    let mut file = None;
    let mut purpose = String::new();
    let positions: Vec<usize> = find_all(text, delimiter.as_bytes());
    for pair in positions.windows(2) {
        let part = &text[pair[0] + delimiter.len()..pair[1]];
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let split = find_all(part, b"\r\n\r\n").first().copied()?;
        let headers = String::from_utf8_lossy(&part[..split]).to_ascii_lowercase();
        let content = &part[split + 4..];
        let content = content.strip_suffix(b"\r\n").unwrap_or(content);
        if headers.contains("name=\"file\"") {
            file = Some(content.to_vec());
        } else if headers.contains("name=\"purpose\"") {
            purpose = String::from_utf8_lossy(content).trim().to_owned();
        }
    }
    file.map(|f| (f, purpose))
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return Vec::new();
    }
    (0..=haystack.len() - needle.len())
        .filter(|&i| haystack[i..].starts_with(needle))
        .collect()
}

fn upload(state: &Arc<Mutex<State>>, content_type: &str, body: &Bytes) -> Reply {
    let provider = ProviderKind::OpenAi;
    let Some((file, purpose)) = multipart_file(content_type, body) else {
        return bad_request(provider, "expected multipart/form-data with a `file` part");
    };
    if purpose != "batch" {
        return bad_request(
            provider,
            &format!("purpose `{purpose}` is not served here; use `batch`"),
        );
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let (_, max_bytes) = s.batch_caps(provider);
    if file.len() > max_bytes {
        return too_large(
            provider,
            &format!(
                "the file is {} bytes; at most {max_bytes} are allowed",
                file.len()
            ),
        );
    }
    s.batches.next += 1;
    let id = format!("file-sim{:06}", s.batches.next);
    let bytes = file.len();
    s.batches.files.insert(id.clone(), Bytes::from(file));
    reply(
        200,
        &[],
        json!({"id": id, "object": "file", "bytes": bytes, "created_at": jiff::Timestamp::now().as_second(),
               "filename": "batch.jsonl", "purpose": "batch", "status": "processed", "status_details": null, "expires_at": null})
            .to_string(),
    )
}

async fn create_openai(state: &Arc<Mutex<State>>, body: &Bytes) -> Reply {
    let provider = ProviderKind::OpenAi;
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return bad_request(provider, "the body is not JSON");
    };
    let endpoint = value["endpoint"].as_str().unwrap_or("").to_owned();
    if !["/v1/chat/completions", "/v1/responses"].contains(&endpoint.as_str()) {
        return bad_request(provider, &format!("endpoint `{endpoint}` is not supported"));
    }
    if value["completion_window"] != "24h" {
        return bad_request(provider, "completion_window must be `24h`");
    }
    let file_id = value["input_file_id"].as_str().unwrap_or("").to_owned();
    let file = {
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.batches.files.get(&file_id).cloned()
    };
    let Some(file) = file else {
        return not_found(provider, &format!("file {file_id}"));
    };
    let mut items = Vec::new();
    for line in file
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
    {
        let Ok(line) = serde_json::from_slice::<Value>(line) else {
            return bad_request(provider, "a line of the input file is not JSON");
        };
        if line["method"] != "POST" || line["url"] != endpoint.as_str() {
            return bad_request(
                provider,
                &format!("every line must be a POST to the batch's endpoint {endpoint}"),
            );
        }
        let id = line["custom_id"].as_str().unwrap_or("").to_owned();
        items.push((id, Arc::new(line["body"].clone())));
    }
    warm(items.iter().map(|(_, b)| Arc::clone(b)).collect()).await;
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(reply) = check_items(&s, provider, &items, file.len()) {
        return reply;
    }
    let api = if endpoint == "/v1/responses" {
        SimApi::Responses
    } else {
        SimApi::Chat
    };
    let (max_requests, _) = s.batch_caps(provider);
    let count = items.len();
    let mut batch = new_batch(&mut s, provider, &endpoint, items);
    batch.input_file_id = Some(file_id);
    batch.metadata = value["metadata"].clone();
    if count > max_requests {
        // Validation fails as a whole, naming the cap (the shape of
        // OpenAI's failed batches; the wording is the simulator's).
        batch.failed = Some((
            "invalid_request".into(),
            format!(
                "The batch input file contains {count} requests; the maximum is {max_requests} requests per batch."
            ),
        ));
    }
    batch.tokens = batch
        .items
        .iter()
        .filter_map(|(_, b)| validate(api, b, &s.catalog).ok())
        .map(|p| p.prefix_text_tokens + p.rest_tokens)
        .sum();
    if let Some(limit) = s.config.batch_queue_tokens {
        let now = Instant::now();
        let ids: Vec<String> = s.batches.order.clone();
        for id in &ids {
            settle(&mut s, id, now);
        }
        let model_key = s.model_key(provider, &batch.model);
        let enqueued: u64 = s
            .batches
            .batches
            .values()
            .filter(|b| {
                b.provider == provider
                    && b.results.is_none()
                    && b.failed.is_none()
                    && s.model_key(provider, &b.model) == model_key
            })
            .map(|b| b.tokens)
            .sum();
        if batch.failed.is_none() && enqueued + batch.tokens > limit {
            let limit_text = thousands(limit);
            batch.failed = Some((
                "token_limit_exceeded".into(),
                format!(
                    "Enqueued token limit reached for {} in organization org-simulator. Limit: {limit_text} enqueued tokens. Please try submitting your batch again later.",
                    batch.model
                ),
            ));
        }
    }
    let object = openai_object(&batch);
    s.batches.log.push(BatchLogEntry {
        provider,
        id: batch.id.clone(),
        requests: batch.items.len(),
        accepted: batch.failed.is_none(),
    });
    s.batches.order.push(batch.id.clone());
    s.batches.batches.insert(batch.id.clone(), batch);
    reply(200, &[], object.to_string())
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Processes a batch whose time has come (or that was cancelled).
fn settle(s: &mut State, id: &str, now: Instant) {
    let Some(batch) = s.batches.batches.get(id) else {
        return;
    };
    if batch.results.is_some() || batch.failed.is_some() {
        return;
    }
    let at = match batch.cancelled_at {
        Some(c) if c < batch.deadline => c,
        _ if now >= batch.deadline => batch.deadline,
        _ => return,
    };
    let cancelled = batch.cancelled_at.is_some_and(|c| c < batch.deadline);
    let provider = batch.provider;
    let api = match batch.endpoint.as_str() {
        "/v1/responses" => SimApi::Responses,
        "/v1/messages" => SimApi::Messages,
        _ => SimApi::Chat,
    };
    let items: Vec<(String, Arc<Value>)> = batch.items.clone();
    let expire_from = if !cancelled && s.next_random() < s.config.batch_expire_rate {
        items.len().div_ceil(2)
    } else {
        items.len()
    };
    let mut writes = Vec::new();
    let mut results = Vec::with_capacity(items.len());
    for (index, (custom_id, body)) in items.iter().enumerate() {
        let outcome = if cancelled {
            ItemOutcome::Canceled
        } else if index >= expire_from {
            ItemOutcome::Expired
        } else if s.config.batch_error_rate > 0.0 && s.next_random() < s.config.batch_error_rate {
            let (kind, message) = match provider {
                ProviderKind::Anthropic => ("api_error", "Internal server error"),
                ProviderKind::OpenAi => (
                    "server_error",
                    "The server had an error while processing your request.",
                ),
            };
            ItemOutcome::Errored {
                status: 500,
                body: serde_json::from_str(&error_body(provider, kind, None, message))
                    .unwrap_or_default(),
            }
        } else {
            match validate(api, body, &s.catalog) {
                Err((status, kind, code, message)) => ItemOutcome::Errored {
                    status,
                    body: serde_json::from_str(&error_body(provider, kind, code, &message))
                        .unwrap_or_default(),
                },
                Ok(parsed) if parsed.stream => ItemOutcome::Errored {
                    status: 400,
                    body: serde_json::from_str(&error_body(
                        provider,
                        "invalid_request_error",
                        None,
                        "stream: streaming is not supported in batches",
                    ))
                    .unwrap_or_default(),
                },
                Ok(parsed) => {
                    // Read against the cache as it was before this batch:
                    // its own writes land after all of its items.
                    let hit = parsed
                        .cache_key
                        .as_ref()
                        .is_some_and(|k| s.cache.get(k).is_some_and(|exp| *exp > at));
                    let (cache_read, cache_write, uncached) = cache_usage(&parsed, hit);
                    if let Some(k) = &parsed.cache_key {
                        writes.push((k.clone(), at + s.scaled(parsed.ttl)));
                    }
                    let answer = s.answer(api, &parsed, (uncached, cache_read, cache_write));
                    ItemOutcome::Succeeded(answer.body())
                }
            }
        };
        results.push((custom_id.clone(), outcome));
    }
    for (key, expires) in writes {
        let entry = s.cache.entry(key).or_insert(expires);
        *entry = (*entry).max(expires);
    }
    let (output_file, error_file) = if provider == ProviderKind::OpenAi {
        let mut output = Vec::new();
        let mut errors = Vec::new();
        for (n, (custom_id, outcome)) in results.iter().enumerate() {
            let line = match outcome {
                ItemOutcome::Succeeded(body) => {
                    json!({"id": format!("batch_req_sim{n}"), "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": format!("req_simb{n}"), "body": body}, "error": null})
                }
                ItemOutcome::Errored { status, body } => {
                    json!({"id": format!("batch_req_sim{n}"), "custom_id": custom_id,
                    "response": {"status_code": status, "request_id": format!("req_simb{n}"), "body": body}, "error": null})
                }
                ItemOutcome::Expired => {
                    json!({"id": format!("batch_req_sim{n}"), "custom_id": custom_id, "response": null,
                    "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}})
                }
                ItemOutcome::Canceled => {
                    json!({"id": format!("batch_req_sim{n}"), "custom_id": custom_id, "response": null,
                    "error": {"code": "batch_cancelled", "message": "This request was cancelled before it was executed."}})
                }
            };
            let target = if matches!(outcome, ItemOutcome::Succeeded(_)) {
                &mut output
            } else {
                &mut errors
            };
            target.extend_from_slice(line.to_string().as_bytes());
            target.push(b'\n');
        }
        let mut store = |content: Vec<u8>| {
            (!content.is_empty()).then(|| {
                s.batches.next += 1;
                let id = format!("file-sim{:06}", s.batches.next);
                s.batches.files.insert(id.clone(), Bytes::from(content));
                id
            })
        };
        (store(output), store(errors))
    } else {
        (None, None)
    };
    if let Some(batch) = s.batches.batches.get_mut(id) {
        batch.results = Some(results);
        batch.output_file_id = output_file;
        batch.error_file_id = error_file;
    }
}

fn counts(batch: &SimBatch) -> (u64, u64, u64, u64, u64) {
    let (mut ok, mut errored, mut canceled, mut expired) = (0, 0, 0, 0);
    for (_, outcome) in batch.results.iter().flatten() {
        match outcome {
            ItemOutcome::Succeeded(_) => ok += 1,
            ItemOutcome::Errored { .. } => errored += 1,
            ItemOutcome::Canceled => canceled += 1,
            ItemOutcome::Expired => expired += 1,
        }
    }
    let processing = if batch.results.is_some() {
        0
    } else {
        batch.items.len() as u64
    };
    (processing, ok, errored, canceled, expired)
}

fn anthropic_object(batch: &SimBatch, base_url: &str) -> Value {
    let (processing, ok, errored, canceled, expired) = counts(batch);
    let ended = batch.results.is_some();
    let results_url = ended.then(|| format!("{base_url}/v1/messages/batches/{}/results", batch.id));
    let cancel_initiated = batch
        .cancelled_at
        .map(|_| jiff::Timestamp::now().to_string());
    json!({
        "id": batch.id,
        "type": "message_batch",
        "processing_status": if ended { "ended" } else if batch.cancelled_at.is_some() { "canceling" } else { "in_progress" },
        "request_counts": {"processing": processing, "succeeded": ok, "errored": errored, "canceled": canceled, "expired": expired},
        "ended_at": ended.then(|| jiff::Timestamp::now().to_string()),
        "created_at": batch.created_at,
        "expires_at": (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24)).to_string(),
        "archived_at": null,
        "cancel_initiated_at": cancel_initiated,
        "results_url": results_url,
    })
}

fn openai_object(batch: &SimBatch) -> Value {
    let (_, ok, errored, canceled, expired) = counts(batch);
    let status = if batch.failed.is_some() {
        "failed"
    } else if batch.results.is_none() {
        if batch.cancelled_at.is_some() {
            "cancelling"
        } else {
            "in_progress"
        }
    } else if canceled > 0 {
        "cancelled"
    } else if expired > 0 {
        "expired"
    } else {
        "completed"
    };
    let now = jiff::Timestamp::now().as_second();
    let errors = batch.failed.as_ref().map(|(code, message)| {
        json!({"object": "list", "data": [{"code": code, "message": message, "param": null, "line": null}]})
    });
    json!({
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": errors,
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": batch.created_unix,
        "in_progress_at": batch.failed.is_none().then_some(batch.created_unix),
        "expires_at": batch.created_unix + 86_400,
        "finalizing_at": batch.results.as_ref().map(|_| now),
        "completed_at": (status == "completed").then_some(now),
        "failed_at": (status == "failed").then_some(now),
        "expired_at": (status == "expired").then_some(now),
        "cancelling_at": batch.cancelled_at.map(|_| now),
        "cancelled_at": (status == "cancelled").then_some(now),
        "request_counts": {"total": batch.items.len(), "completed": ok, "failed": errored + canceled + expired},
        "metadata": batch.metadata,
    })
}

fn object(batch: &SimBatch, base_url: &str) -> Value {
    match batch.provider {
        ProviderKind::Anthropic => anthropic_object(batch, base_url),
        ProviderKind::OpenAi => openai_object(batch),
    }
}

fn retrieve(state: &Arc<Mutex<State>>, provider: ProviderKind, id: &str) -> Reply {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    settle(&mut s, id, Instant::now());
    match s.batches.batches.get(id).filter(|b| b.provider == provider) {
        Some(batch) => reply(200, &[], object(batch, &s.base_url).to_string()),
        None => not_found(provider, &format!("batch {id}")),
    }
}

fn list(state: &Arc<Mutex<State>>, provider: ProviderKind, query: &str) -> Reply {
    let limit = query
        .split('&')
        .find_map(|p| p.strip_prefix("limit="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 100);
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let ids: Vec<String> = s.batches.order.iter().rev().cloned().collect();
    for id in &ids {
        settle(&mut s, id, now);
    }
    let data: Vec<Value> = ids
        .iter()
        .filter_map(|id| s.batches.batches.get(id))
        .filter(|b| b.provider == provider)
        .take(limit)
        .map(|b| object(b, &s.base_url))
        .collect();
    let first = data.first().map(|b| b["id"].clone());
    let last = data.last().map(|b| b["id"].clone());
    let body = match provider {
        ProviderKind::Anthropic => {
            json!({"data": data, "has_more": false, "first_id": first, "last_id": last})
        }
        ProviderKind::OpenAi => {
            json!({"object": "list", "data": data, "has_more": false, "first_id": first, "last_id": last})
        }
    };
    reply(200, &[], body.to_string())
}

fn cancel(state: &Arc<Mutex<State>>, provider: ProviderKind, id: &str) -> Reply {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    settle(&mut s, id, now);
    let Some(batch) = s
        .batches
        .batches
        .get_mut(id)
        .filter(|b| b.provider == provider)
    else {
        return not_found(provider, &format!("batch {id}"));
    };
    if batch.results.is_none() && batch.failed.is_none() && batch.cancelled_at.is_none() {
        batch.cancelled_at = Some(now);
    }
    let object = {
        let batch = &s.batches.batches[id];
        object(batch, &s.base_url)
    };
    reply(200, &[], object.to_string())
}

fn anthropic_results(state: &Arc<Mutex<State>>, id: &str) -> Reply {
    let provider = ProviderKind::Anthropic;
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    settle(&mut s, id, Instant::now());
    let Some(batch) = s.batches.batches.get(id).filter(|b| b.provider == provider) else {
        return not_found(provider, &format!("batch {id}"));
    };
    let Some(results) = &batch.results else {
        return bad_request(
            provider,
            &format!("batch {id} is still processing; its results are not ready"),
        );
    };
    let mut out = Vec::new();
    for (custom_id, outcome) in results {
        let result = match outcome {
            ItemOutcome::Succeeded(message) => json!({"type": "succeeded", "message": message}),
            ItemOutcome::Errored { body, .. } => json!({"type": "errored", "error": body}),
            ItemOutcome::Expired => json!({"type": "expired"}),
            ItemOutcome::Canceled => json!({"type": "canceled"}),
        };
        out.extend_from_slice(
            json!({"custom_id": custom_id, "result": result})
                .to_string()
                .as_bytes(),
        );
        out.push(b'\n');
    }
    super::respond(
        200,
        "application/binary",
        &[],
        super::SimBody::Full(Some(Bytes::from(out))),
    )
}

impl State {
    /// (max requests, max bytes) per batch.
    fn batch_caps(&self, provider: ProviderKind) -> (usize, usize) {
        let (requests, bytes) = match provider {
            ProviderKind::Anthropic => (100_000, 256 << 20),
            ProviderKind::OpenAi => (50_000, 200 << 20),
        };
        (
            self.config.batch_max_requests.unwrap_or(requests),
            self.config.batch_max_bytes.unwrap_or(bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_are_read_as_the_sdks_send_them() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n{\"a\":1}\n{\"b\":2}\n\r\n--XyZ--\r\n";
        let (file, purpose) = multipart_file("multipart/form-data; boundary=XyZ", body).unwrap();
        assert_eq!(purpose, "batch");
        assert_eq!(file, b"{\"a\":1}\n{\"b\":2}\n");
        assert!(multipart_file("application/json", body).is_none());
        assert_eq!(thousands(90_000), "90,000");
        assert_eq!(thousands(1_500_000), "1,500,000");
        assert_eq!(thousands(999), "999");
    }
}
