//! The providers' Batch APIs ([`BatchApi`]): Anthropic Message Batches
//! (`/v1/messages/batches`) and OpenAI Batch (a JSONL file uploaded to
//! `/v1/files`, then `/v1/batches`). Each item's body is the one the
//! synchronous client would send (never streamed), and each result is
//! parsed by the same wire format, so usage, cost and classification mean
//! the same in both modes.

#![allow(
    clippy::result_large_err,
    reason = "errors are `AttemptError`s, as `Provider::generate` returns them: a few per batch, never on a hot path"
)]

use std::collections::HashMap;

use apex_core::dispatch::queue_limit_in;
use apex_core::provider::ErrorClass;
use apex_core::provider::{BatchApi, BatchCaps, BatchProgress, BatchResults};
use apex_core::{Api, AttemptError, Generated, GenerationRequest};
use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Value, json};

use crate::anthropic::AnthropicWire;
use crate::openai::OpenAiWire;
use crate::responses::ResponsesWire;
use crate::transport::Endpoint;
use crate::wire::Wire;

/// Anthropic: at most 100,000 requests or 256 MB per batch.
pub const ANTHROPIC_CAPS: BatchCaps = BatchCaps {
    max_requests: 100_000,
    max_bytes: 256 << 20,
};
/// OpenAI: at most 50,000 requests and 200 MB per input file.
pub const OPENAI_CAPS: BatchCaps = BatchCaps {
    max_requests: 50_000,
    max_bytes: 200 << 20,
};

/// The `id` of an object the API created.
fn id_of(object: &Value, what: &str) -> Result<String, AttemptError> {
    object["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| decode_error(&format!("{what} (no id)"), object))
}

fn decode_error(what: &str, e: impl std::fmt::Display) -> AttemptError {
    AttemptError::new(ErrorClass::Decode, format!("unexpected {what} ({e})"))
}

fn expired() -> AttemptError {
    AttemptError::new(
        ErrorClass::Timeout,
        "the batch expired before this request was processed (not billed)",
    )
}

fn canceled() -> AttemptError {
    AttemptError::new(
        ErrorClass::Conflict,
        "the batch was cancelled before this request was processed (not billed)",
    )
}

/// Anthropic Message Batches.
#[derive(Debug, Clone)]
pub struct AnthropicBatches {
    pub(crate) endpoint: Endpoint,
}

impl AnthropicBatches {
    fn url(&self, path: &str) -> String {
        format!(
            "{}/v1/messages/batches{path}",
            self.endpoint.base.trim_end_matches('/')
        )
    }

    fn headers(&self) -> Result<HeaderMap, AttemptError> {
        Ok(AnthropicWire::headers(
            self.endpoint.key(AnthropicWire::KIND.api_key_env())?,
        ))
    }

    fn progress(batch: &Value) -> BatchProgress {
        let count = |name: &str| crate::wire::count(batch, &format!("/request_counts/{name}"));
        let processing = count("processing");
        let total = processing
            + ["succeeded", "errored", "canceled", "expired"]
                .iter()
                .map(|n| count(n))
                .sum::<u64>();
        BatchProgress {
            ended: batch["processing_status"] == "ended",
            processed: total - processing,
            total,
            cancelled: !batch["cancel_initiated_at"].is_null(),
            failure: None,
            queue_limit: None,
        }
    }
}

/// An Anthropic error type as the status its synchronous answer carries.
fn anthropic_status(kind: &str) -> u16 {
    match kind {
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "overloaded_error" => 529,
        _ => 400,
    }
}

#[async_trait]
impl BatchApi for AnthropicBatches {
    fn caps(&self) -> BatchCaps {
        ANTHROPIC_CAPS
    }

    fn item_bytes(&self, custom_id: &str, request: &GenerationRequest) -> usize {
        let body = request.body.get_or_build(|| AnthropicWire::body(request));
        body.bytes.len() + custom_id.len() + 32
    }

    async fn submit(
        &self,
        _key: &str,
        items: &[(String, GenerationRequest)],
    ) -> Result<String, AttemptError> {
        // {"requests": [{"custom_id": …, "params": <the Messages body>}, …]},
        // written around the bodies already built rather than re-parsed.
        let mut body = Vec::from(&b"{\"requests\":["[..]);
        for (i, (custom_id, request)) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            let params = request.body.get_or_build(|| AnthropicWire::body(request));
            body.extend_from_slice(b"{\"custom_id\":");
            body.extend_from_slice(json!(custom_id).to_string().as_bytes());
            body.extend_from_slice(b",\"params\":");
            body.extend_from_slice(&params.bytes);
            body.push(b'}');
        }
        body.extend_from_slice(b"]}");
        let builder = self
            .endpoint
            .client
            .post(self.url(""))
            .headers(self.headers()?)
            .body(body);
        let batch = self.endpoint.json::<AnthropicWire>(builder).await?;
        id_of(&batch, "batch")
    }

    async fn find(
        &self,
        _key: &str,
        since: &str,
        items: usize,
    ) -> Result<Option<String>, AttemptError> {
        // Message Batches carry no metadata: the batch created since the
        // intent with as many requests is the one (results are then matched
        // by custom_id, so a wrong match stores nothing).
        let since: jiff::Timestamp = since.parse().map_err(|e| decode_error("intent time", e))?;
        let list = self
            .endpoint
            .get_json::<AnthropicWire>(self.url("?limit=100"), self.headers()?)
            .await?;
        let found = list["data"].as_array().into_iter().flatten().find(|b| {
            let created = b["created_at"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok());
            created.is_some_and(|c| c >= since - jiff::SignedDuration::from_secs(60))
                && Self::progress(b).total == items as u64
        });
        Ok(found.and_then(|b| b["id"].as_str().map(str::to_owned)))
    }

    async fn status(&self, batch_id: &str) -> Result<BatchProgress, AttemptError> {
        let batch = self
            .endpoint
            .get_json::<AnthropicWire>(self.url(&format!("/{batch_id}")), self.headers()?)
            .await?;
        Ok(Self::progress(&batch))
    }

    async fn results(
        &self,
        batch_id: &str,
        requests: &HashMap<String, GenerationRequest>,
    ) -> Result<BatchResults, AttemptError> {
        let bytes = self
            .endpoint
            .get::<AnthropicWire>(self.url(&format!("/{batch_id}/results")), self.headers()?)
            .await?;
        let mut results = HashMap::new();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let line: Value =
                serde_json::from_slice(line).map_err(|e| decode_error("results line", e))?;
            let Some(custom_id) = line["custom_id"].as_str() else {
                continue;
            };
            let Some(request) = requests.get(custom_id) else {
                continue;
            };
            let result = &line["result"];
            let outcome = match result["type"].as_str() {
                Some("succeeded") => {
                    let message = serde_json::to_vec(&result["message"]).unwrap_or_default();
                    AnthropicWire::parse(&message)
                        .map(|parsed| {
                            let id = result["message"]["id"].as_str().map(str::to_owned);
                            crate::wire::generated::<AnthropicWire>(request, parsed, id)
                        })
                        .map_err(|(class, message)| AttemptError::new(class, message))
                }
                Some("errored") => {
                    let error = &result["error"];
                    let kind = error["error"]["type"].as_str().unwrap_or("");
                    let status = anthropic_status(kind);
                    let body = serde_json::to_vec(error).unwrap_or_default();
                    let (class, message) = AnthropicWire::classify(status, &body);
                    Err(AttemptError {
                        http_status: Some(status),
                        ..AttemptError::new(class, message)
                    })
                }
                Some("expired") => Err(expired()),
                Some("canceled") => Err(canceled()),
                other => Err(decode_error("result type", format!("{other:?}"))),
            };
            results.insert(custom_id.to_owned(), outcome);
        }
        Ok(self.endpoint.scrub_results(results))
    }

    async fn cancel(&self, batch_id: &str) -> Result<(), AttemptError> {
        let builder = self
            .endpoint
            .client
            .post(self.url(&format!("/{batch_id}/cancel")))
            .headers(self.headers()?);
        self.endpoint.call::<AnthropicWire>(builder).await.map(drop)
    }
}

/// OpenAI Batch.
#[derive(Debug, Clone)]
pub struct OpenAiBatches {
    pub(crate) endpoint: Endpoint,
}

/// The endpoint path a request's body goes to.
fn openai_path(request: &GenerationRequest) -> &'static str {
    match request.condition.api {
        Api::Chat => "/v1/chat/completions",
        Api::Responses => "/v1/responses",
    }
}

fn openai_body(request: &GenerationRequest) -> &apex_core::PreparedBody {
    match request.condition.api {
        Api::Chat => request.body.get_or_build(|| OpenAiWire::body(request)),
        Api::Responses => request.body.get_or_build(|| ResponsesWire::body(request)),
    }
}

impl OpenAiBatches {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint.base.trim_end_matches('/'))
    }

    fn auth(&self) -> Result<HeaderMap, AttemptError> {
        let mut headers = OpenAiWire::headers(self.endpoint.key("OPENAI_API_KEY")?);
        headers.remove(CONTENT_TYPE);
        Ok(headers)
    }

    fn progress(batch: &Value) -> BatchProgress {
        let status = batch["status"].as_str().unwrap_or("");
        let total = crate::wire::count(batch, "/request_counts/total");
        let processed = crate::wire::count(batch, "/request_counts/completed")
            + crate::wire::count(batch, "/request_counts/failed");
        let failure = (status == "failed").then(|| {
            let error = &batch["errors"]["data"][0];
            let message = error["message"]
                .as_str()
                .unwrap_or("the batch failed")
                .to_owned();
            let code = error["code"].as_str().unwrap_or("");
            let class = if code == "token_limit_exceeded" || queue_limit_in(&message).is_some() {
                ErrorClass::RateLimited
            } else {
                ErrorClass::InvalidRequest
            };
            AttemptError::new(class, format!("{code}: {message}"))
        });
        BatchProgress {
            ended: matches!(status, "completed" | "failed" | "expired" | "cancelled"),
            processed,
            total,
            cancelled: status == "cancelled",
            queue_limit: failure.as_ref().and_then(|f| queue_limit_in(&f.message)),
            failure,
        }
    }

    /// A batch object.
    async fn batch(&self, batch_id: &str) -> Result<Value, AttemptError> {
        self.endpoint
            .get_json::<OpenAiWire>(self.url(&format!("/batches/{batch_id}")), self.auth()?)
            .await
    }

    /// The lines of an output or error file.
    async fn file_lines(&self, file_id: &str) -> Result<Vec<Value>, AttemptError> {
        let bytes = self
            .endpoint
            .get::<OpenAiWire>(self.url(&format!("/files/{file_id}/content")), self.auth()?)
            .await?;
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| serde_json::from_slice(l).map_err(|e| decode_error("output line", e)))
            .collect()
    }
}

/// One output or error line as an item's outcome.
fn openai_outcome(line: &Value, request: &GenerationRequest) -> Result<Generated, AttemptError> {
    let response = &line["response"];
    let status = response["status_code"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok());
    let request_id = response["request_id"].as_str().map(str::to_owned);
    let body = serde_json::to_vec(&response["body"]).unwrap_or_default();
    match status {
        Some(200) => {
            let parsed = match request.condition.api {
                Api::Chat => OpenAiWire::parse(&body),
                Api::Responses => ResponsesWire::parse(&body),
            };
            parsed
                .map(|p| match request.condition.api {
                    Api::Chat => crate::wire::generated::<OpenAiWire>(request, p, request_id),
                    Api::Responses => {
                        crate::wire::generated::<ResponsesWire>(request, p, request_id)
                    }
                })
                .map_err(|(class, message)| AttemptError::new(class, message))
        }
        Some(status) => {
            let (class, message) = OpenAiWire::classify(status, &body);
            Err(AttemptError {
                http_status: Some(status),
                request_id,
                ..AttemptError::new(class, message)
            })
        }
        None => {
            let code = line["error"]["code"].as_str().unwrap_or("");
            let message = line["error"]["message"].as_str().unwrap_or("no response");
            if code.contains("expired") {
                Err(expired())
            } else if code.contains("cancel") {
                Err(canceled())
            } else {
                Err(AttemptError::new(
                    ErrorClass::ServerError,
                    format!("{code}: {message}"),
                ))
            }
        }
    }
}

#[async_trait]
impl BatchApi for OpenAiBatches {
    fn caps(&self) -> BatchCaps {
        OPENAI_CAPS
    }

    fn item_bytes(&self, custom_id: &str, request: &GenerationRequest) -> usize {
        openai_body(request).bytes.len() + custom_id.len() + 80
    }

    async fn submit(
        &self,
        key: &str,
        items: &[(String, GenerationRequest)],
    ) -> Result<String, AttemptError> {
        let Some((_, first)) = items.first() else {
            return Err(AttemptError::new(
                ErrorClass::InvalidRequest,
                "an empty batch",
            ));
        };
        let path = openai_path(first);
        // The JSONL file, written around the bodies already built.
        let mut file = Vec::new();
        for (custom_id, request) in items {
            file.extend_from_slice(b"{\"custom_id\":");
            file.extend_from_slice(json!(custom_id).to_string().as_bytes());
            file.extend_from_slice(b",\"method\":\"POST\",\"url\":\"");
            file.extend_from_slice(openai_path(request).as_bytes());
            file.extend_from_slice(b"\",\"body\":");
            file.extend_from_slice(&openai_body(request).bytes);
            file.extend_from_slice(b"}\n");
        }
        // multipart/form-data with `purpose` and `file`, as the SDKs send it.
        let boundary = format!("apex-{}", key.replace('-', ""));
        let mut form = Vec::with_capacity(file.len() + 512);
        form.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"apex-{key}.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
            )
            .as_bytes(),
        );
        form.extend_from_slice(&file);
        form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let content_type =
            HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}"))
                .map_err(|e| decode_error("boundary", e))?;
        let upload = self
            .endpoint
            .client
            .post(self.url("/files"))
            .headers(self.auth()?)
            .header(CONTENT_TYPE, content_type)
            .body(form);
        let uploaded = self.endpoint.json::<OpenAiWire>(upload).await?;
        let file_id = id_of(&uploaded, "file")?;
        let create = self
            .endpoint
            .client
            .post(self.url("/batches"))
            .headers(self.auth()?)
            .json(&json!({
                "input_file_id": file_id,
                "endpoint": path,
                "completion_window": "24h",
                "metadata": {"apex_batch": key},
            }));
        let batch = self.endpoint.json::<OpenAiWire>(create).await?;
        id_of(&batch, "batch")
    }

    async fn find(
        &self,
        key: &str,
        _since: &str,
        _items: usize,
    ) -> Result<Option<String>, AttemptError> {
        let list = self
            .endpoint
            .get_json::<OpenAiWire>(self.url("/batches?limit=100"), self.auth()?)
            .await?;
        Ok(list["data"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["metadata"]["apex_batch"] == key)
            .and_then(|b| b["id"].as_str().map(str::to_owned)))
    }

    async fn status(&self, batch_id: &str) -> Result<BatchProgress, AttemptError> {
        Ok(Self::progress(&self.batch(batch_id).await?))
    }

    async fn results(
        &self,
        batch_id: &str,
        requests: &HashMap<String, GenerationRequest>,
    ) -> Result<BatchResults, AttemptError> {
        let batch = self.batch(batch_id).await?;
        let mut results = HashMap::new();
        for file in ["output_file_id", "error_file_id"] {
            let Some(file_id) = batch[file].as_str() else {
                continue;
            };
            for line in self.file_lines(file_id).await? {
                let Some(custom_id) = line["custom_id"].as_str() else {
                    continue;
                };
                if let Some(request) = requests.get(custom_id) {
                    results.insert(custom_id.to_owned(), openai_outcome(&line, request));
                }
            }
        }
        Ok(self.endpoint.scrub_results(results))
    }

    async fn cancel(&self, batch_id: &str) -> Result<(), AttemptError> {
        let builder = self
            .endpoint
            .client
            .post(self.url(&format!("/batches/{batch_id}/cancel")))
            .headers(self.auth()?);
        self.endpoint.call::<OpenAiWire>(builder).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiKey;

    #[test]
    fn item_errors_never_show_the_key() {
        let endpoint = Endpoint {
            client: reqwest::Client::new(),
            base: "http://127.0.0.1:9".into(),
            key: Some(ApiKey::new("sk-ant-secret-0123456789")),
        };
        let echoed = AttemptError::new(
            ErrorClass::Authentication,
            "invalid x-api-key sk-ant-secret-0123456789",
        );
        let results: BatchResults = [("a".to_owned(), Err(echoed))].into_iter().collect();
        let scrubbed = endpoint.scrub_results(results);
        let message = &scrubbed["a"].as_ref().unwrap_err().message;
        assert!(!message.contains("secret-0123456789"), "{message}");
        assert!(message.contains("[REDACTED]"), "{message}");
    }
}
