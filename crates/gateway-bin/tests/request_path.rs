//! The request path end to end: a real client, the real gateway, the mock upstream, a real
//! usage store.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use common::{CLIENT_KEY, Harness, Options, UPSTREAM_KEY, directive, sse_events};
use gateway_test_support::Behaviour;
use serde_json::{Value, json};
use std::time::Duration;

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
        .unwrap_or_default()
}

#[tokio::test]
async fn plain_completion_is_forwarded_and_recorded() {
    let mut h = Harness::start().await;
    let response = h
        .chat(json!({
            "model": "chat",
            "messages": [{"role": "user", "content": "hello"}],
            "seed": 7,
            "provider": {"order": ["x"]}
        }))
        .await;
    assert_eq!(response.status(), 200);
    let request_id = header(&response, "x-request-id").to_owned();
    let uuid = uuid::Uuid::parse_str(&request_id).unwrap();
    assert_eq!(uuid.get_version_num(), 7);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 "
    );
    assert_eq!(body["usage"]["completion_tokens"], 5);

    // The upstream saw the upstream model, our vendor key (never the client's), and the
    // fields the gateway does not know.
    let seen = h.upstream.requests();
    assert_eq!(seen.len(), 1);
    let upstream = &seen[0];
    assert_eq!(upstream.body["model"], "mock-model");
    assert_eq!(upstream.body["seed"], 7);
    assert_eq!(upstream.body["provider"]["order"][0], "x");
    assert_eq!(
        upstream.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}").as_str()
    );
    let forwarded = format!("{:?}", upstream.headers);
    assert!(
        !forwarded.contains(CLIENT_KEY),
        "client key leaked upstream"
    );

    let rows = h.finish().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row.request_id, request_id);
    assert_eq!(row.project.as_deref(), Some("team-a"));
    assert_eq!(row.key_id.as_deref(), Some("a-key"));
    assert_eq!(row.alias.as_deref(), Some("chat"));
    assert_eq!(row.provider.as_deref(), Some("upstream"));
    assert_eq!(row.upstream_model.as_deref(), Some("mock-model"));
    assert_eq!(row.status, 200);
    assert_eq!(row.error_type, None);
    assert_eq!(row.input_tokens, body["usage"]["prompt_tokens"].as_i64());
    assert_eq!(row.output_tokens, Some(5));
    assert!(!row.streamed);
    assert_eq!(row.vendor_response_id.as_deref(), body["id"].as_str());
    assert!(
        row.vendor_request_id
            .as_deref()
            .unwrap()
            .starts_with("req-up-")
    );
    let tags: Value = serde_json::from_str(&row.tags).unwrap();
    assert_eq!(tags["team"], "a");
}

#[tokio::test]
async fn vendor_extensions_need_the_providers_consent() {
    let h = Harness::start().await;
    // `transforms` is not an OpenAI parameter and the provider lists only `provider`.
    let response = h
        .chat(json!({"model": "chat", "messages": directive("hi"), "transforms": ["x"]}))
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "transforms");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("extra_fields"),
        "{error}"
    );
    assert_eq!(h.upstream.stats().requests, 0, "nothing sent upstream");
    // OpenAI's own parameters need no consent.
    let response = h
        .chat(json!({"model": "chat", "messages": directive("hi"), "seed": 1, "logprobs": true}))
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn inbound_request_id_is_kept_when_valid() {
    let h = Harness::start().await;
    let inbound = uuid::Uuid::now_v7().to_string();
    let response = h
        .post("/v1/chat/completions")
        .header("x-request-id", &inbound)
        .json(&json!({"model": "local", "messages": directive("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "x-request-id"), inbound);
}

#[tokio::test]
async fn stream_is_forwarded_chunk_by_chunk_and_usage_chunk_stripped() {
    let mut h = Harness::start().await;
    h.upstream.set_behaviour(Behaviour {
        chunk_delay_ms: 150,
        ..Behaviour::default()
    });
    let response = h
        .chat(json!({"model": "chat", "stream": true, "messages": directive("hi")}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "text/event-stream");
    let request_id = header(&response, "x-request-id").to_owned();

    // The first event reaches the client while the upstream is still producing the rest:
    // nothing is buffered whole.
    let mut stream = response.bytes_stream();
    use futures_util::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    assert_eq!(
        h.upstream.stats().streams_completed,
        0,
        "gateway buffered the stream"
    );
    let mut rest = first.to_vec();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(rest).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(
            chunk.get("usage").is_none_or(Value::is_null),
            "usage leaked: {event}"
        );
    }
    let content: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "tok0 tok1 tok2 tok3 tok4 ");

    // The gateway asked the upstream for usage anyway, to bill the stream.
    let upstream = &h.upstream.requests()[0];
    assert_eq!(upstream.body["stream_options"]["include_usage"], true);

    let rows = h.finish().await;
    let row = rows.iter().find(|r| r.request_id == request_id).unwrap();
    assert!(row.streamed);
    assert_eq!(row.output_tokens, Some(5));
    assert!(row.ttft_ms.is_some());
    assert!(!row.client_aborted);
}

#[tokio::test]
async fn stream_keeps_usage_chunk_when_client_asks() {
    let h = Harness::start().await;
    let response = h
        .chat(json!({
            "model": "chat",
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": directive("hi")
        }))
        .await;
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);
    assert_eq!(usage_chunk["choices"], json!([]));
}

/// Sends a long stream request, reads its first event, and hangs up.
async fn abandon_stream(h: &Harness) -> String {
    h.upstream.set_behaviour(Behaviour {
        chunks: Some(40),
        chunk_delay_ms: 50,
        ..Behaviour::default()
    });
    let response = h
        .chat(json!({"model": "chat", "stream": true, "messages": directive("hi")}))
        .await;
    let request_id = header(&response, "x-request-id").to_owned();
    let mut stream = response.bytes_stream();
    use futures_util::StreamExt;
    stream.next().await.unwrap().unwrap();
    drop(stream);
    request_id
}

async fn wait_for(h: &Harness, what: &str, done: impl Fn(gateway_test_support::MockStats) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done(h.upstream.stats()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {:?}",
            h.upstream.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn abandoned_stream_is_drained_for_the_vendors_usage() {
    let mut h = Harness::start().await;
    let request_id = abandon_stream(&h).await;
    // The gateway keeps reading (40 chunks, 2 s, within the 10 s drain) to the usage chunk.
    wait_for(&h, "stream not read to its end", |s| {
        s.streams_completed == 1
    })
    .await;
    assert_eq!(h.upstream.stats().streams_aborted, 0);
    let rows = h.finish().await;
    let row = rows.iter().find(|r| r.request_id == request_id).unwrap();
    assert!(row.client_aborted);
    assert_eq!(row.error_type.as_deref(), Some("client_aborted"));
    assert_eq!(row.output_tokens, Some(40), "billed as the vendor reported");
    assert_eq!(row.usage_source.as_deref(), Some("vendor"));
}

#[tokio::test]
async fn without_drain_an_abandoned_stream_is_ended_and_estimated() {
    let mut h = Harness::start_with(Options {
        stream_drain_secs: 0,
        ..Options::default()
    })
    .await;
    let request_id = abandon_stream(&h).await;
    // The upstream connection is closed: the mock sees its stream abandoned long before the
    // 40 chunks (2 s) would have been sent.
    wait_for(&h, "upstream stream was not ended", |s| {
        s.streams_aborted == 1
    })
    .await;
    assert_eq!(h.upstream.stats().streams_completed, 0);
    let rows = h.finish().await;
    let row = rows.iter().find(|r| r.request_id == request_id).unwrap();
    assert!(row.client_aborted);
    assert_eq!(row.usage_source.as_deref(), Some("estimate"));
    assert!(row.input_tokens.unwrap() > 0);
}

#[tokio::test]
async fn drain_is_bounded() {
    let mut h = Harness::start_with(Options {
        stream_drain_secs: 1,
        ..Options::default()
    })
    .await;
    let request_id = abandon_stream(&h).await;
    // 40 chunks take 2 s; after 1 s of draining the gateway gives up and hangs up.
    wait_for(&h, "drain did not stop", |s| s.streams_aborted == 1).await;
    let rows = h.finish().await;
    let row = rows.iter().find(|r| r.request_id == request_id).unwrap();
    assert_eq!(row.usage_source.as_deref(), Some("estimate"));
    // About 20 of the 40 chunks ("tokN " is 5 or 6 characters) were seen before giving up.
    let estimated = row.output_tokens.unwrap();
    assert!(
        (10..40).contains(&estimated),
        "estimated {estimated} output tokens"
    );
}

#[tokio::test]
async fn upstream_reset_mid_stream_becomes_an_error_event() {
    let mut h = Harness::start().await;
    let response = h
        .chat(json!({
            "model": "chat",
            "stream": true,
            "messages": directive("[[mock reset_after_chunks=2]]")
        }))
        .await;
    assert_eq!(response.status(), 200);
    let request_id = header(&response, "x-request-id").to_owned();
    let events = sse_events(response).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].is_string(), "{events:?}");
    assert_ne!(events.last().map(String::as_str), Some("[DONE]"));
    let rows = h.finish().await;
    let row = rows.iter().find(|r| r.request_id == request_id).unwrap();
    assert_eq!(row.error_type.as_deref(), Some("upstream_stream_error"));
}

#[tokio::test]
async fn slow_upstream_times_out_with_504() {
    let h = Harness::start_with(Options {
        timeout_secs: 1,
        ..Options::default()
    })
    .await;
    let response = h
        .chat(json!({"model": "chat", "messages": directive("[[mock delay_ms=3000]]")}))
        .await;
    assert_eq!(response.status(), 504);
    assert!(!header(&response, "x-request-id").is_empty());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn vendor_errors_keep_their_status_and_message() {
    let h = Harness::start().await;
    let response = h
        .chat(json!({"model": "chat", "messages": directive("[[mock status=429 retry_after_secs=3]]")}))
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        header(&response, "retry-after"),
        "3",
        "the vendor's back-off is relayed"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["message"], "mock upstream error 429");
    let response = h
        .chat(json!({"model": "chat", "messages": directive("[[mock status=503]]")}))
        .await;
    assert_eq!(response.status(), 503);
}

#[tokio::test]
async fn unreachable_upstream_is_a_502() {
    // A port that was just free: connecting to it is refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(
        &format!("http://{dead}/v1"),
        "sqlite::memory:",
        &dir.path().join("spool"),
        &Options::default(),
    );
    let config = gateway_bin::GatewayConfig::parse(&text, &|_| None).unwrap();
    let gateway = gateway_bin::RunningGateway::start(config).await.unwrap();
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/chat/completions",
            gateway.local_addr()
        ))
        .bearer_auth(CLIENT_KEY)
        .json(&json!({"model": "chat", "messages": directive("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    gateway.shutdown().await;
}

#[tokio::test]
async fn authentication_failures_are_401_in_openai_format() {
    let mut h = Harness::start().await;
    let url = format!("{}/v1/chat/completions", h.base);
    let body = json!({"model": "chat", "messages": directive("hi")});
    for key in [Some("sk-wrong"), None] {
        let mut request = h.client.post(&url).json(&body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert!(!header(&response, "x-request-id").is_empty());
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_api_key");
    }
    assert_eq!(h.upstream.stats().requests, 0);
    // Rejected at the door: nothing reached routing, nothing to record.
    assert!(h.finish().await.is_empty());
}

#[tokio::test]
async fn unknown_or_forbidden_alias_is_404_model_not_found() {
    let mut h = Harness::start().await;
    for alias in ["nope", "hidden"] {
        let response = h
            .chat(json!({"model": alias, "messages": directive("hi")}))
            .await;
        assert_eq!(response.status(), 404, "{alias}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "model_not_found");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    let rows = h.finish().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.status == 404 && r.provider.is_none()));
}

#[tokio::test]
async fn malformed_requests_are_400_naming_the_field() {
    let h = Harness::start().await;
    let cases = [
        (json!({"model": "chat", "messages": "hi"}), Some("messages")),
        (
            json!({"model": "chat", "messages": directive("x"), "max_tokens": "ten"}),
            Some("max_tokens"),
        ),
        (
            json!({"model": "chat", "messages": [{"role": "robot", "content": "x"}]}),
            Some("messages[0].role"),
        ),
        (json!({"messages": directive("x")}), None),
    ];
    for (body, param) in cases {
        let response = h.chat(body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error");
        if let Some(param) = param {
            assert_eq!(error["error"]["param"], param, "{error}");
            assert!(error["error"]["message"].as_str().unwrap().contains(param));
        }
    }
    let response = h
        .post("/v1/chat/completions")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(h.upstream.stats().requests, 0);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let h = Harness::start_with(Options {
        max_body_bytes: 1024,
        ..Options::default()
    })
    .await;
    let big = "x".repeat(4096);
    let response = h
        .chat(json!({"model": "chat", "messages": directive(&big)}))
        .await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "request_too_large");
    // Also without a Content-Length (chunked): the limit is enforced while reading.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 512]))),
    );
    let response = h
        .post("/v1/chat/completions")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn models_lists_only_the_aliases_the_key_may_use() {
    let h = Harness::start().await;
    let response = h
        .client
        .get(format!("{}/v1/models", h.base))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "claude", "gem", "az", "local"]);
}

#[tokio::test]
async fn health_endpoints_and_unknown_routes() {
    let h = Harness::start().await;
    let get = |path: &str| h.client.get(format!("{}{path}", h.base)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let response = h
        .client
        .get(format!("{}/v1/nothing", h.base))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unknown_url");
    let response = h
        .client
        .get(format!("{}/v1/chat/completions", h.base))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
}

#[tokio::test]
async fn http2_clients_are_served() {
    let h = Harness::start().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .post(format!("{}/v1/chat/completions", h.base))
        .bearer_auth(CLIENT_KEY)
        .json(&json!({"model": "local", "messages": directive("over h2")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .ends_with("over h2")
    );
}

#[tokio::test]
async fn builtin_mock_provider_streams() {
    let h = Harness::start().await;
    let response = h
        .chat(json!({"model": "local", "stream": true, "messages": directive("hi there")}))
        .await;
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.len() > 3);
    assert_eq!(
        h.upstream.stats().requests,
        0,
        "mock provider must not use the network"
    );
}
