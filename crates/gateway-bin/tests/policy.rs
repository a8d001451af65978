//! The policy layer through the real gateway and the mock upstream's fault modes: rate limits
//! and their headers, token settlement, breakers and the retry budget against an upstream that
//! always fails, Retry-After, stream timeouts, idempotency keys and load shedding.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use gateway_bin::{GatewayConfig, RunningGateway};
use gateway_test_support::{Behaviour, MockUpstream};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const KEY: &str = "sk-policy-test";

/// A gateway in front of `up` with one alias `chat`, and `extra` appended to the config
/// (`[policy]` tables, project limits).
/// A running gateway and its own usage spool, removed when the test ends.
struct Gateway {
    inner: RunningGateway,
    _spool: tempfile::TempDir,
}

impl Gateway {
    fn local_addr(&self) -> std::net::SocketAddr {
        self.inner.local_addr()
    }

    async fn shutdown(self) {
        self.inner.shutdown().await;
    }
}

async fn start(up: &MockUpstream, project_extra: &str, extra: &str) -> Gateway {
    let spool = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[database]
url = "sqlite::memory:"
spool_dir = "{spool_dir}"
[observability]
log_level = "error"
access_log = false

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{url}"]
timeout_secs = 5

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[projects]]
name = "p"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]
{project_extra}

{extra}
"#,
        url = up.base_url(),
        hash = gateway_access::hash_key(KEY),
        spool_dir = spool.path().display(),
    );
    let config = GatewayConfig::parse(&text, &|_| None).unwrap();
    Gateway {
        inner: RunningGateway::start(config).await.unwrap(),
        _spool: spool,
    }
}

fn url(gateway: &Gateway) -> String {
    format!("http://{}/v1/chat/completions", gateway.local_addr())
}

async fn chat(gateway: &Gateway, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(url(gateway)).bearer_auth(KEY);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.json(&body).send().await.unwrap()
}

fn hello() -> Value {
    json!({"model": "chat", "messages": [{"role": "user", "content": "hello"}]})
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn project_request_limit_answers_429_with_openai_headers() {
    let up = MockUpstream::start().await.unwrap();
    let gateway = start(&up, "rate_limit = { requests_per_minute = 3 }", "").await;
    for remaining in ["2", "1", "0"] {
        let response = chat(&gateway, hello(), &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-ratelimit-limit-requests"), "3");
        assert_eq!(
            header(&response, "x-ratelimit-remaining-requests"),
            remaining
        );
        assert!(header(&response, "x-ratelimit-reset-requests").ends_with('s'));
    }
    let response = chat(&gateway, hello(), &[]).await;
    assert_eq!(response.status(), 429);
    // One request per 20 s refills: the client is told to wait for it, in whole seconds.
    let retry_after: u64 = header(&response, "retry-after").parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "0");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        up.stats().chat_requests,
        3,
        "the refused request never went upstream"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn token_reservations_are_settled_to_the_real_usage() {
    let up = MockUpstream::start().await.unwrap();
    let gateway = start(&up, "rate_limit = { tokens_per_minute = 1000 }", "").await;
    let big = json!({"model": "chat", "max_tokens": 900,
        "messages": [{"role": "user", "content": "hello"}]});
    let first = chat(&gateway, big.clone(), &[]).await;
    assert_eq!(first.status(), 200);
    let remaining: u64 = header(&first, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(
        remaining < 100,
        "900 output tokens were reserved: {remaining}"
    );
    first.bytes().await.unwrap();
    // The mock used a handful of tokens: once the first request is settled, the second
    // reservation of 900 fits again. Without the correction it would be refused.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = chat(&gateway, big.clone(), &[]).await;
    assert_eq!(second.status(), 200, "{:?}", second.text().await);
    // A request asking for more than a minute's worth is refused for good.
    let huge = json!({"model": "chat", "max_tokens": 5000,
        "messages": [{"role": "user", "content": "hello"}]});
    let response = chat(&gateway, huge, &[]).await;
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "tokens");
    gateway.shutdown().await;
}

#[tokio::test]
async fn always_failing_upstream_is_bounded_by_the_budget_and_then_the_breaker() {
    let up = MockUpstream::start().await.unwrap();
    up.set_behaviour(Behaviour {
        status: Some(500),
        ..Behaviour::default()
    });
    let policy = r"
[policy.retry]
max_attempts = 3
backoff_base_ms = 1
backoff_max_ms = 2
budget_percent = 20
budget_min_retries_per_sec = 0

[policy.breaker]
consecutive_failures = 1000
failure_rate_percent = 50
min_requests = 40
window_secs = 60
open_secs = 60
";
    let gateway = start(&up, "", policy).await;
    let requests = 30;
    for _ in 0..requests {
        let response = chat(&gateway, hello(), &[]).await;
        assert_eq!(response.status(), 500);
    }
    let calls = up.stats().chat_requests;
    // Each request makes one call, and retries only spend the 20 % budget.
    assert!(
        calls <= requests + requests / 5,
        "{calls} upstream calls for {requests} requests"
    );
    assert!(calls > requests, "some retries were allowed: {calls}");
    // Enough failures in the window: the breaker opens, and requests fail fast without a call.
    let mut fast_failures = 0;
    for _ in 0..20 {
        let before = up.stats().chat_requests;
        let started = Instant::now();
        let response = chat(&gateway, hello(), &[]).await;
        if response.status() == 503 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "circuit_open");
            assert_eq!(
                up.stats().chat_requests,
                before,
                "an open breaker makes no call"
            );
            assert!(started.elapsed() < Duration::from_millis(500));
            fast_failures += 1;
        }
    }
    assert!(fast_failures >= 10, "{fast_failures} fast failures");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_vendor_retry_after_is_honoured_before_retrying() {
    let up = std::sync::Arc::new(MockUpstream::start().await.unwrap());
    up.set_behaviour(Behaviour {
        status: Some(429),
        retry_after_secs: Some(1),
        ..Behaviour::default()
    });
    let gateway = start(&up, "", "").await;
    let recover = {
        let up = up.clone();
        tokio::spawn(async move {
            while up.stats().chat_requests == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            up.set_behaviour(Behaviour::default());
        })
    };
    let started = Instant::now();
    let response = chat(&gateway, hello(), &[]).await;
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried before the vendor's Retry-After: {:?}",
        started.elapsed()
    );
    assert_eq!(up.stats().chat_requests, 2);
    recover.await.unwrap();

    // A Retry-After beyond the cap is not waited for: the 429 goes back to the client.
    up.set_behaviour(Behaviour {
        status: Some(429),
        retry_after_secs: Some(60),
        ..Behaviour::default()
    });
    let started = Instant::now();
    let response = chat(&gateway, hello(), &[]).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), "60");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(up.stats().chat_requests, 3);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_error_event_and_closes_the_upstream() {
    let up = MockUpstream::start().await.unwrap();
    let gateway = start(&up, "", "[policy.timeouts]\nstream_idle_secs = 1\n").await;
    let body = json!({"model": "chat", "stream": true,
        "messages": [{"role": "user", "content": "[[mock chunks=5 chunk_delay_ms=1500]]"}]});
    let started = Instant::now();
    let response = chat(&gateway, body, &[]).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("upstream_stream_idle"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The upstream stream was dropped, not read to its end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.stats().streams_aborted, 1);
    assert_eq!(up.stats().streams_completed, 0);
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_total_deadline_cuts_a_slow_first_byte() {
    let up = MockUpstream::start().await.unwrap();
    let gateway = start(
        &up,
        "",
        "[policy.timeouts]\ntotal_secs = 1\n[policy.retry]\nmax_attempts = 1\n",
    )
    .await;
    let body = json!({"model": "chat",
        "messages": [{"role": "user", "content": "[[mock delay_ms=3000]]"}]});
    let started = Instant::now();
    let response = chat(&gateway, body, &[]).await;
    assert_eq!(response.status(), 504);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "timeout_error");
    gateway.shutdown().await;
}

#[tokio::test]
async fn an_idempotency_key_replays_during_and_after_the_first_request() {
    let up = MockUpstream::start().await.unwrap();
    let gateway = start(&up, "", "").await;
    let slow = json!({"model": "chat",
        "messages": [{"role": "user", "content": "[[mock delay_ms=400]] once only"}]});
    let key = [("idempotency-key", "order-42")];
    let (first, during) = tokio::join!(chat(&gateway, slow.clone(), &key), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        chat(&gateway, slow.clone(), &key).await
    });
    assert_eq!(first.status(), 200);
    assert_eq!(during.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(header(&during, "idempotent-replayed"), "true");
    assert_eq!(
        header(&during, "x-original-request-id"),
        header(&first, "x-request-id")
    );
    let first_body = first.text().await.unwrap();
    assert_eq!(during.text().await.unwrap(), first_body);

    let after = chat(&gateway, slow.clone(), &key).await;
    assert_eq!(after.status(), 200);
    assert_eq!(after.text().await.unwrap(), first_body);
    assert_eq!(
        up.stats().chat_requests,
        1,
        "one upstream call for three requests"
    );

    // The same key with another body is a client error.
    let other = chat(&gateway, hello(), &key).await;
    assert_eq!(other.status(), 422);
    let body: Value = other.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reused");

    // A streamed answer is stored as it passes and replayed whole.
    let stream = json!({"model": "chat", "stream": true,
        "messages": [{"role": "user", "content": "stream me"}]});
    let key = [("idempotency-key", "stream-1")];
    let original = chat(&gateway, stream.clone(), &key)
        .await
        .text()
        .await
        .unwrap();
    assert!(original.ends_with("data: [DONE]\n\n"), "{original}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let replay = chat(&gateway, stream, &key).await;
    assert_eq!(header(&replay, "idempotent-replayed"), "true");
    assert_eq!(replay.text().await.unwrap(), original);
    assert_eq!(up.stats().chat_requests, 2);

    // A failed request does not hold its key: the client's retry reaches the vendor.
    let failing = json!({"model": "chat",
        "messages": [{"role": "user", "content": "[[mock status=400]]"}]});
    let key = [("idempotency-key", "failing")];
    assert_eq!(chat(&gateway, failing.clone(), &key).await.status(), 400);
    assert_eq!(chat(&gateway, failing, &key).await.status(), 400);
    assert_eq!(up.stats().chat_requests, 4);
    gateway.shutdown().await;
}

#[tokio::test]
async fn past_the_in_flight_cap_requests_are_shed_at_once() {
    let up = MockUpstream::start().await.unwrap();
    let gateway = start(&up, "", "[policy.shed]\nmax_in_flight_per_project = 2\n").await;
    let slow = json!({"model": "chat",
        "messages": [{"role": "user", "content": "[[mock delay_ms=500]]"}]});
    let (a, b, c) = tokio::join!(
        chat(&gateway, slow.clone(), &[]),
        chat(&gateway, slow.clone(), &[]),
        async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let started = Instant::now();
            let response = chat(&gateway, slow.clone(), &[]).await;
            (response, started.elapsed())
        }
    );
    assert_eq!(a.status(), 200);
    assert_eq!(b.status(), 200);
    let (shed, elapsed) = c;
    assert_eq!(shed.status(), 503);
    assert!(elapsed < Duration::from_millis(200), "{elapsed:?}");
    assert_eq!(header(&shed, "retry-after"), "1");
    let body: Value = shed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    // The slots were given back.
    assert_eq!(chat(&gateway, hello(), &[]).await.status(), 200);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_relayed_vendor_error_is_retried_and_then_returned_as_the_vendor_sent_it() {
    let up = std::sync::Arc::new(MockUpstream::start().await.unwrap());
    let anthropic = format!(
        r#"
[[providers]]
name = "claude-upstream"
kind = "anthropic"
base_urls = ["{}"]
api_keys = ["vendor-key"]

[[models]]
alias = "claude"
targets = [{{ provider = "claude-upstream", model = "claude-x" }}]

[policy.retry]
backoff_base_ms = 1
backoff_max_ms = 2
"#,
        up.base_url()
    );
    let gateway = start(&up, "", &anthropic).await;
    let messages = || {
        reqwest::Client::new()
            .post(format!("http://{}/v1/messages", gateway.local_addr()))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": "claude", "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}]}))
    };
    // Overloaded once, then fine: the client never sees the 529. The 529 is held back for a
    // moment so the task below makes the vendor recover before the retry arrives, however
    // loaded the machine (without the delay it sometimes lost that race to a 1 ms back-off).
    up.set_behaviour(Behaviour {
        status: Some(529),
        delay_ms: 200,
        ..Behaviour::default()
    });
    let recover = {
        let up = up.clone();
        tokio::spawn(async move {
            while up.stats().chat_requests == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            up.set_behaviour(Behaviour::default());
        })
    };
    let response = messages().send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(up.stats().chat_requests, 2);
    recover.await.unwrap();

    // Overloaded for good: three calls, then the vendor's own Anthropic error body.
    up.set_behaviour(Behaviour {
        status: Some(529),
        ..Behaviour::default()
    });
    let response = messages().send().await.unwrap();
    assert_eq!(response.status(), 529);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(up.stats().chat_requests, 2 + 3);
    gateway.shutdown().await;
}
