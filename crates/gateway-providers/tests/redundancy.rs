//! Redundancy inside one provider, against real sockets: base URLs that cannot be connected to
//! are passed over (and only those), and a key the vendor refuses is set aside for the calls
//! that follow. Every HTTP provider kind is checked, since each builds its own requests.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a panic in a test is a failed assertion"
)]

use gateway_core::openai::ChatCompletionRequest;
use gateway_core::provider::{ChatCall, ChatReply};
use gateway_core::{GatewayError, RequestId};
use gateway_providers::{
    DynProvider, ProviderConfig, ProviderKind, Secret, UpstreamClient, build_providers,
};
use gateway_test_support::MockUpstream;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const KINDS: [ProviderKind; 4] = [
    ProviderKind::Openai,
    ProviderKind::Azure,
    ProviderKind::Anthropic,
    ProviderKind::Gemini,
];

/// The base URL a provider of `kind` is configured with for a server at `addr`.
fn base_url(kind: ProviderKind, addr: SocketAddr) -> String {
    match kind {
        ProviderKind::Openai | ProviderKind::Anthropic => format!("http://{addr}/v1"),
        ProviderKind::Azure => format!("http://{addr}"),
        ProviderKind::Gemini => format!("http://{addr}/v1beta"),
        ProviderKind::Mock => panic!("the mock provider has no base URL"),
    }
}

/// The header the key travels in, and how the key appears in it.
fn key_header(kind: ProviderKind, key: &str) -> (&'static str, String) {
    match kind {
        ProviderKind::Openai => ("authorization", format!("Bearer {key}")),
        ProviderKind::Azure => ("api-key", key.to_owned()),
        ProviderKind::Anthropic => ("x-api-key", key.to_owned()),
        ProviderKind::Gemini => ("x-goog-api-key", key.to_owned()),
        ProviderKind::Mock => panic!("the mock provider has no key"),
    }
}

/// An address nothing listens on: bound, then released.
async fn closed_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn provider(
    kind: ProviderKind,
    base_urls: Vec<String>,
    keys: &[&str],
    base_url_cooldown_secs: u64,
) -> DynProvider {
    let config = ProviderConfig {
        name: "redundant".into(),
        kind,
        base_urls,
        api_keys: keys.iter().map(|key| Secret::new(*key)).collect(),
        api_version: (kind == ProviderKind::Azure).then(|| "2024-10-21".to_owned()),
        extra_fields: Vec::new(),
        timeout_secs: 10,
        base_url_cooldown_secs,
        key_cooldown_secs: 60,
        key_revoked_cooldown_secs: 300,
    };
    let client = UpstreamClient::new(Duration::from_secs(2)).unwrap();
    build_providers(&[config], &client)
        .unwrap()
        .remove("redundant")
        .unwrap()
}

fn call(text: &str) -> ChatCall {
    let body = serde_json::json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": text}],
    });
    ChatCall {
        request: ChatCompletionRequest::from_json(body.to_string().as_bytes()).unwrap(),
        request_id: RequestId::new_v7(),
        trace: None,
    }
}

async fn answer(provider: &DynProvider, text: &str) -> Result<(), GatewayError> {
    match provider.chat(call(text)).await? {
        ChatReply::Complete(reply) => {
            assert!(!reply.body.is_empty());
            Ok(())
        }
        ChatReply::Stream(_) => panic!("asked for a complete answer"),
    }
}

/// The vendor's error status came back as the call's error (each kind maps the status to what
/// the client sees in its own way: Gemini's 401 and 500 become 502s).
fn vendor_error(kind: ProviderKind, result: Result<(), GatewayError>) {
    match result {
        Err(GatewayError::UpstreamStatus { .. }) => {}
        other => panic!("{kind:?}: expected the vendor's error status, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_connection_moves_on_to_the_next_base_url() {
    for kind in KINDS {
        let closed = closed_addr().await;
        let mock = MockUpstream::start().await.unwrap();
        let provider = provider(
            kind,
            vec![base_url(kind, closed), base_url(kind, mock.addr())],
            &["key-a"],
            30,
        );
        answer(&provider, "hello")
            .await
            .unwrap_or_else(|err| panic!("{kind:?}: {err}"));
        assert_eq!(mock.stats().chat_requests, 1, "{kind:?}");
    }
}

#[tokio::test]
async fn a_base_url_that_refused_is_passed_over_then_preferred_again() {
    let kind = ProviderKind::Openai;
    let first = closed_addr().await;
    let second = MockUpstream::start().await.unwrap();
    let provider = provider(
        kind,
        vec![base_url(kind, first), base_url(kind, second.addr())],
        &["key-a"],
        1,
    );
    answer(&provider, "one").await.unwrap();
    assert_eq!(second.stats().chat_requests, 1);

    // The first base URL comes back, but is not tried again until its cool-down ends.
    let first = MockUpstream::start_on(first).await.unwrap();
    answer(&provider, "two").await.unwrap();
    assert_eq!(
        first.stats().chat_requests,
        0,
        "passed over while cooling down"
    );
    assert_eq!(second.stats().chat_requests, 2);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    answer(&provider, "three").await.unwrap();
    answer(&provider, "four").await.unwrap();
    assert_eq!(first.stats().chat_requests, 2, "preferred again");
    assert_eq!(second.stats().chat_requests, 2);
}

#[tokio::test]
async fn when_no_base_url_connects_the_call_fails_as_unavailable() {
    let kind = ProviderKind::Openai;
    let provider = provider(
        kind,
        vec![
            base_url(kind, closed_addr().await),
            base_url(kind, closed_addr().await),
        ],
        &[],
        30,
    );
    match answer(&provider, "hello").await {
        Err(GatewayError::UpstreamUnavailable { reason, .. }) => {
            assert!(reason.contains("none of the 2 base URLs"), "{reason}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn an_error_status_is_not_retried_on_the_next_base_url() {
    for kind in KINDS {
        let first = MockUpstream::start().await.unwrap();
        let second = MockUpstream::start().await.unwrap();
        let provider = provider(
            kind,
            vec![base_url(kind, first.addr()), base_url(kind, second.addr())],
            &["key-a"],
            30,
        );
        vendor_error(kind, answer(&provider, "[[mock status=500]]").await);
        assert_eq!(first.stats().requests, 1, "{kind:?}");
        assert_eq!(second.stats().requests, 0, "{kind:?}: not retried");
    }
}

#[tokio::test]
async fn a_connection_closed_after_sending_is_not_retried() {
    // Accepts, reads the request, and hangs up without answering: the request was sent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let first = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0; 64 * 1024];
            let _ = socket.read(&mut buffer).await;
        }
    });
    let second = MockUpstream::start().await.unwrap();
    let kind = ProviderKind::Openai;
    let provider = provider(
        kind,
        vec![base_url(kind, first), base_url(kind, second.addr())],
        &["key-a"],
        30,
    );
    match answer(&provider, "hello").await {
        Err(GatewayError::UpstreamUnavailable { .. }) => {}
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(second.stats().requests, 0, "not retried");
    server.abort();
}

/// The keys the mock saw, in order.
fn keys_seen(mock: &MockUpstream, kind: ProviderKind) -> Vec<String> {
    let (header, _) = key_header(kind, "");
    mock.requests()
        .iter()
        .map(|request| {
            request
                .headers
                .get(header)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_refused_key_is_set_aside_for_the_next_calls() {
    for kind in KINDS {
        let mock = MockUpstream::start().await.unwrap();
        let provider = provider(
            kind,
            vec![base_url(kind, mock.addr())],
            &["key-a", "key-b"],
            30,
        );
        vendor_error(kind, answer(&provider, "[[mock status=401]]").await);
        answer(&provider, "two").await.unwrap();
        answer(&provider, "three").await.unwrap();
        let a = key_header(kind, "key-a").1;
        let b = key_header(kind, "key-b").1;
        assert_eq!(keys_seen(&mock, kind), [a, b.clone(), b], "{kind:?}");
    }
}

#[tokio::test]
async fn an_ordinary_rate_limit_does_not_set_the_key_aside() {
    for kind in KINDS {
        let mock = MockUpstream::start().await.unwrap();
        let provider = provider(
            kind,
            vec![base_url(kind, mock.addr())],
            &["key-a", "key-b"],
            30,
        );
        vendor_error(
            kind,
            answer(&provider, "[[mock status=429 retry_after_secs=1]]").await,
        );
        answer(&provider, "two").await.unwrap();
        answer(&provider, "three").await.unwrap();
        let a = key_header(kind, "key-a").1;
        let b = key_header(kind, "key-b").1;
        assert_eq!(keys_seen(&mock, kind), [a.clone(), b, a], "{kind:?}");
    }
}
