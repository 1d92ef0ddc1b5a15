//! The free endpoints a client can ask before it spends anything: OpenAI's
//! model retrieval (`GET /v1/models/{model}`) and Anthropic's token count
//! (`POST /v1/messages/count_tokens`). Both check the key and the model as
//! the paid endpoints do, and neither counts against a rate limit here.

use std::sync::{Arc, Mutex};

use apex_core::ProviderKind;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::{DropConnection, Reply, State, check_key, error_body, presented_key, reply};

/// Which free endpoint a request is for, if any.
pub(super) fn route(method: &str, path: &str) -> Option<ProviderKind> {
    let path = path.trim_end_matches('/');
    match method {
        "GET" if path.starts_with("/v1/models/") => Some(ProviderKind::OpenAi),
        "POST" if path == "/v1/messages/count_tokens" => Some(ProviderKind::Anthropic),
        _ => None,
    }
}

/// Answers one free request.
pub(super) async fn handle(
    state: Arc<Mutex<State>>,
    provider: ProviderKind,
    req: Request<Incoming>,
) -> Result<Reply, DropConnection> {
    let presented = presented_key(provider, req.headers());
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let has_version = req.headers().contains_key("anthropic-version");
    let body: Bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|_| DropConnection)?
        .to_bytes();
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(body) = check_key(provider, s.config.api_key.as_deref(), presented.as_deref()) {
        return Ok(reply(401, &[], body));
    }
    Ok(match provider {
        ProviderKind::OpenAi => {
            let model = path.trim_start_matches("/v1/models/");
            match s.catalog.lookup(provider, model) {
                Some(_) => reply(
                    200,
                    &[],
                    json!({"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"})
                        .to_string(),
                ),
                None => reply(
                    404,
                    &[],
                    error_body(
                        provider,
                        "invalid_request_error",
                        Some("model_not_found"),
                        &format!(
                            "The model `{model}` does not exist or you do not have access to it."
                        ),
                    ),
                ),
            }
        }
        ProviderKind::Anthropic => {
            if !has_version {
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
            let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let Some(model) = value.get("model").and_then(Value::as_str) else {
                return Ok(reply(
                    400,
                    &[],
                    error_body(
                        provider,
                        "invalid_request_error",
                        None,
                        "model: Field required",
                    ),
                ));
            };
            match s.catalog.lookup(provider, model) {
                Some(_) => {
                    let text = value["messages"].to_string();
                    let tokens = text.len().div_ceil(4).max(1);
                    reply(200, &[], json!({"input_tokens": tokens}).to_string())
                }
                None => reply(
                    404,
                    &[],
                    error_body(
                        provider,
                        "not_found_error",
                        None,
                        &format!("model: {model}"),
                    ),
                ),
            }
        }
    })
}
