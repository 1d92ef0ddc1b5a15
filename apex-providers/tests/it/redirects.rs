//! Keys stay with their host: every request path of every provider, sent to
//! a base URL that redirects to a second origin, fails with a `redirected`
//! error naming where it points, and the second origin hears nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_core::provider::BatchApi;
use apex_core::provider::ErrorClass;
use apex_core::{Api, AttemptError, CacheHint, Provider, ProviderKind};
use apex_providers::{AnthropicProvider, ApiKey, OpenAiProvider, ProviderConfig, ProviderError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::request;

/// A raw HTTP/1.1 server that records each request's head and answers every
/// request with `answer(path)`.
struct RawServer {
    addr: std::net::SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawServer {
    async fn start(host: &str, answer: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind((host, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (seen, answer) = (Arc::clone(&heads), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (seen, answer) = (Arc::clone(&seen), Arc::clone(&answer));
                tokio::spawn(async move {
                    // One request per connection is all a refusal needs.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 65536];
                    let head_end = loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    seen.lock().unwrap().push(head);
                    let _ = socket.write_all(answer(&path).as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { addr, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// The second origin: another loopback address where the machine has one,
/// else another port (a different origin all the same).
async fn elsewhere() -> RawServer {
    let ok = |_: &str| {
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".to_owned()
    };
    match std::net::TcpListener::bind("127.0.0.2:0") {
        Ok(_) => RawServer::start("127.0.0.2", ok).await,
        Err(_) => RawServer::start("127.0.0.1", ok).await,
    }
}

/// A base URL whose server answers everything with `status` pointing at
/// the same path on `target`.
async fn redirector(status: u16, target: std::net::SocketAddr) -> RawServer {
    RawServer::start("127.0.0.1", move |path| {
        format!(
            "HTTP/1.1 {status} Redirect\r\nlocation: http://{target}{path}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
    })
    .await
}

fn config(base_url: String, key: &str) -> ProviderConfig {
    ProviderConfig {
        base_url,
        api_key: Some(ApiKey::new(key)),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        stream_idle_timeout: Duration::from_secs(10),
        allow_insecure_http: false,
    }
}

fn assert_refused(what: &str, outcome: Result<impl std::fmt::Debug, AttemptError>, var: &str) {
    let error = outcome.expect_err(what);
    assert_eq!(error.class, ErrorClass::Redirected, "{what}: {error}");
    assert!(!error.is_retryable(), "{what}");
    assert!(
        error.message.contains("redirects") && error.message.contains(var),
        "{what}: {error}"
    );
    assert!(!error.message.contains("sk-"), "{what}: {error}");
}

#[tokio::test]
async fn no_request_path_follows_a_redirect_with_its_key() {
    let second = elsewhere().await;
    for status in [301, 302, 307, 308] {
        let first = redirector(status, second.addr).await;
        let openai_base = format!("http://{}/v1", first.addr);
        let anthropic_base = format!("http://{}", first.addr);
        let openai =
            OpenAiProvider::new(config(openai_base.clone(), "sk-openai-secret-0123456789"))
                .unwrap();
        let anthropic =
            AnthropicProvider::new(config(anthropic_base, "sk-ant-secret-0123456789")).unwrap();

        // Synchronous and streamed, on every endpoint.
        for stream in [false, true] {
            for (api, model) in [(Api::Chat, "gpt-4o"), (Api::Responses, "gpt-5")] {
                let mut req = request(ProviderKind::OpenAi, model, CacheHint::Off);
                let condition = Arc::make_mut(&mut req.condition);
                condition.api = api;
                condition.stream = stream;
                assert_refused(
                    &format!("{api:?} stream={stream} on {status}"),
                    openai.generate(&req).await,
                    "OPENAI_BASE_URL",
                );
            }
            let mut req = request(ProviderKind::Anthropic, "claude-sonnet-4-5", CacheHint::Off);
            Arc::make_mut(&mut req.condition).stream = stream;
            assert_refused(
                &format!("messages stream={stream} on {status}"),
                anthropic.generate(&req).await,
                "ANTHROPIC_BASE_URL",
            );
        }
        // The free check of a key and model.
        let req = request(ProviderKind::OpenAi, "gpt-4o", CacheHint::Off);
        assert_refused(
            "openai check",
            openai.check(&req.condition).await,
            "OPENAI_BASE_URL",
        );
        let req = request(ProviderKind::Anthropic, "claude-sonnet-4-5", CacheHint::Off);
        assert_refused(
            "anthropic check",
            anthropic.check(&req.condition).await,
            "ANTHROPIC_BASE_URL",
        );

        // Every Batch API call: submit (OpenAI: the file upload first),
        // find, status, results (OpenAI: the file download), cancel.
        for (name, provider, var) in [
            ("openai", &openai as &dyn Provider, "OPENAI_BASE_URL"),
            (
                "anthropic",
                &anthropic as &dyn Provider,
                "ANTHROPIC_BASE_URL",
            ),
        ] {
            let api: &dyn BatchApi = provider.batches().unwrap();
            let kind = provider.kind();
            let model = if kind == ProviderKind::OpenAi {
                "gpt-4o"
            } else {
                "claude-sonnet-4-5"
            };
            let mut item = request(kind, model, CacheHint::Off);
            item.in_batch = true;
            let items = vec![("apex-g1-a1".to_owned(), item.clone())];
            assert_refused(
                &format!("{name} submit"),
                api.submit("key-1", &items).await,
                var,
            );
            assert_refused(
                &format!("{name} find"),
                api.find("key-1", "2026-01-01T00:00:00Z", 1).await,
                var,
            );
            assert_refused(&format!("{name} status"), api.status("batch_1").await, var);
            let requests: HashMap<_, _> = items.into_iter().collect();
            assert_refused(
                &format!("{name} results"),
                api.results("batch_1", &requests).await,
                var,
            );
            assert_refused(&format!("{name} cancel"), api.cancel("batch_1").await, var);
        }
        assert!(
            !first.heads().is_empty(),
            "the redirecting server was asked"
        );
    }
    assert!(
        second.heads().is_empty(),
        "a request reached the second origin: {:?}",
        second.heads()
    );
}

#[tokio::test]
async fn the_refusal_names_the_base_url_to_set() {
    let second = elsewhere().await;
    // The proxy moved: /v1/messages now lives under /api on the new host.
    let moved = RawServer::start("127.0.0.1", move |path| {
        format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{}/api{path}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            second.addr
        )
    })
    .await;
    let anthropic = AnthropicProvider::new(config(
        format!("http://{}", moved.addr),
        "sk-ant-secret-0123456789",
    ))
    .unwrap();
    let req = request(ProviderKind::Anthropic, "claude-sonnet-4-5", CacheHint::Off);
    let error = anthropic.generate(&req).await.unwrap_err();
    let to = format!("http://{}/api", second.addr);
    assert!(
        error
            .message
            .ends_with(&format!("set ANTHROPIC_BASE_URL to {to}")),
        "{error}"
    );
    assert_eq!(error.http_status, Some(307));
}

#[test]
fn clear_text_is_refused_off_loopback_unless_allowed() {
    let build = |url: &str, allow: bool| {
        AnthropicProvider::new(ProviderConfig {
            allow_insecure_http: allow,
            ..config(url.into(), "sk-ant-secret-0123456789")
        })
        .map(|_| ())
    };
    for loopback in [
        "http://127.0.0.1:9",
        "http://127.8.0.3:9",
        "http://localhost:9",
        "http://[::1]:9",
        "https://api.anthropic.com",
        "https://10.0.0.1",
    ] {
        build(loopback, false).unwrap_or_else(|e| panic!("{loopback}: {e}"));
    }
    for remote in [
        "http://api.anthropic.com",
        "http://10.0.0.1:8080",
        "http://[2001:db8::1]",
        "http://localhost.example.com",
    ] {
        let error = build(remote, false).unwrap_err();
        assert!(
            matches!(error, ProviderError::InsecureBaseUrl { .. }),
            "{remote}: {error}"
        );
        let text = error.to_string();
        assert!(
            text.contains("ANTHROPIC_BASE_URL") && text.contains("APEX_ALLOW_INSECURE_HTTP=1"),
            "{text}"
        );
        build(remote, true).unwrap_or_else(|e| panic!("{remote} allowed: {e}"));
    }
    assert!(matches!(
        build("ftp://127.0.0.1", true),
        Err(ProviderError::BadBaseUrl { .. })
    ));
    let openai = OpenAiProvider::new(ProviderConfig {
        allow_insecure_http: false,
        ..config("http://api.openai.com/v1".into(), "sk-x")
    });
    assert!(matches!(
        openai,
        Err(ProviderError::InsecureBaseUrl {
            var: "OPENAI_BASE_URL",
            ..
        })
    ));
}
