//! The mock upstream seen from a real HTTP client, as the gateway will see it.

use futures_util::StreamExt;
use gateway_test_support::{Behaviour, MockStats, MockUpstream};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn chat_url(upstream: &MockUpstream) -> String {
    format!("{}/chat/completions", upstream.base_url())
}

fn user(content: &str) -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": content}]})
}

fn stream_request(content: &str, include_usage: Option<bool>) -> Value {
    let mut body = user(content);
    body["stream"] = json!(true);
    if let Some(include) = include_usage {
        body["stream_options"] = json!({"include_usage": include});
    }
    body
}

/// Reads a whole SSE body, returning each event's data and the body frames it arrived in.
// `cfg(test)` puts the helper under clippy's allow-unwrap-in-tests, like the tests it serves.
#[cfg(test)]
async fn read_stream(response: reqwest::Response) -> (Vec<String>, Vec<String>) {
    let mut frames = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(frame) = stream.next().await {
        frames.push(String::from_utf8(frame.unwrap().to_vec()).unwrap());
    }
    let events = frames
        .concat()
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| event.strip_prefix("data: ").unwrap().to_owned())
        .collect();
    (events, frames)
}

/// Stats change when the server notices something; give it a moment.
async fn wait_for_stats(upstream: &MockUpstream, done: impl Fn(&MockStats) -> bool) -> MockStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = upstream.stats();
        if done(&stats) || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn plain_answer_has_openai_shape_and_documented_usage() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "You are"},
            {"role": "user", "content": "hello there"},
            {"role": "user", "content": [{"type": "text", "text": "parts do not count"}]},
        ],
        "seed": 7,
    });
    let response = reqwest::Client::new()
        .post(chat_url(&upstream))
        .bearer_auth("sk-upstream")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    assert_eq!(response.headers()["content-type"], "application/json");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["id"], "chatcmpl-up-1");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "gpt-test");
    assert!(answer["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &answer["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(choice["finish_reason"], "stop");
    // 7 + 11 = 18 characters: ceil(18 / 4) + 1.
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11})
    );

    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, http::Method::POST);
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(recorded[0].headers["authorization"], "Bearer sk-upstream");
    assert_eq!(recorded[0].body, body);

    let second: Value = reqwest::Client::new()
        .post(chat_url(&upstream))
        .json(
            &json!({"model": "m", "messages": [{"role": "user", "content": "[[mock chunks=2]]"}]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["id"], "chatcmpl-up-2");
    assert_eq!(second["choices"][0]["message"]["content"], "tok0 tok1 ");
    // "[[mock chunks=2]]" is 17 characters: the directive counts as prompt text.
    assert_eq!(second["usage"]["prompt_tokens"], 6);
    assert_eq!(second["usage"]["completion_tokens"], 2);
    assert_eq!(upstream.stats().chat_requests, 2);
}

#[tokio::test]
async fn stream_without_usage_sends_events_in_order_one_frame_each() {
    let upstream = MockUpstream::start().await.unwrap();
    upstream.set_behaviour(Behaviour {
        chunks: Some(3),
        chunk_delay_ms: 30,
        ..Behaviour::default()
    });
    let response = reqwest::Client::new()
        .post(chat_url(&upstream))
        .json(&stream_request("hi", None))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let (events, frames) = read_stream(response).await;
    // role, 3 content, finish, [DONE]
    assert_eq!(events.len(), 6, "{events:?}");
    assert_eq!(
        frames.len(),
        6,
        "each event is flushed on its own: {frames:?}"
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..5]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    for chunk in &chunks {
        assert_eq!(chunk["id"], "chatcmpl-up-1");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "mock-model");
        assert!(chunk.get("usage").is_none(), "{chunk}");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    for (i, chunk) in chunks[1..4].iter().enumerate() {
        assert_eq!(
            chunk["choices"][0]["delta"],
            json!({"content": format!("tok{i} ")})
        );
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
    }
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");

    let stats = wait_for_stats(&upstream, |stats| stats.streams_completed == 1).await;
    assert_eq!(
        stats,
        MockStats {
            requests: 1,
            chat_requests: 1,
            streams_started: 1,
            streams_completed: 1,
            streams_aborted: 0,
            resets: 0,
            ..MockStats::default()
        }
    );
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_usage_chunk() {
    let upstream = MockUpstream::start().await.unwrap();
    let client = reqwest::Client::new();
    let response = client
        .post(chat_url(&upstream))
        .json(&stream_request("12345", Some(true)))
        .send()
        .await
        .unwrap();
    let (events, _) = read_stream(response).await;
    // role, 5 content, finish, usage, [DONE]
    assert_eq!(events.len(), 9, "{events:?}");
    assert_eq!(events[8], "[DONE]");
    let chunks: Vec<Value> = events[..8]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    let text: String = chunks[1..6]
        .iter()
        .map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    for chunk in &chunks[..7] {
        assert_eq!(chunk["usage"], Value::Null, "OpenAI sends usage: null");
        assert!(chunk.get("usage").is_some());
    }
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    let usage_chunk = &chunks[7];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["id"], "chatcmpl-up-1");
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    );

    // include_usage false is the same as absent.
    let response = client
        .post(chat_url(&upstream))
        .json(&stream_request("12345", Some(false)))
        .send()
        .await
        .unwrap();
    let (events, _) = read_stream(response).await;
    assert_eq!(events.len(), 8, "{events:?}");
    assert!(events.iter().all(|event| !event.contains("usage")));
}

#[tokio::test]
async fn directive_429_with_retry_after_applies_to_one_request_only() {
    let upstream = MockUpstream::start().await.unwrap();
    let client = reqwest::Client::new();
    let response = client
        .post(chat_url(&upstream))
        .json(&user("slow down [[mock status=429 retry_after_secs=3]]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3");
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {"message": "mock upstream error 429", "type": "rate_limit_error",
            "param": null, "code": null}})
    );

    let response = client
        .post(chat_url(&upstream))
        .json(&user("[[mock status=503]]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");

    let response = client
        .post(chat_url(&upstream))
        .json(&user("fine"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-3");

    // A default error status is overridden back to success by a directive.
    upstream.set_behaviour(Behaviour {
        status: Some(500),
        ..Behaviour::default()
    });
    let response = client
        .post(chat_url(&upstream))
        .json(&user("[[mock status=none]]"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = client
        .post(chat_url(&upstream))
        .json(&user("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
}

#[tokio::test]
async fn delay_holds_back_the_headers() {
    let upstream = MockUpstream::start().await.unwrap();
    let client = reqwest::Client::new();

    let started = Instant::now();
    let response = client
        .post(chat_url(&upstream))
        .json(&user("[[mock delay_ms=300]]"))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(response.status(), 200);

    // The default, set over HTTP as a harness in another language would.
    let config = client
        .post(format!("http://{}/mock/config", upstream.addr()))
        .json(&json!({"delay_ms": 250}))
        .send()
        .await
        .unwrap();
    assert_eq!(config.status(), 200);
    let started = Instant::now();
    client
        .post(chat_url(&upstream))
        .json(&user("x"))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    client
        .post(chat_url(&upstream))
        .json(&user("[[mock delay_ms=0]]"))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    // A request given up during the delay is not answered late.
    let timed_out = client
        .post(chat_url(&upstream))
        .timeout(Duration::from_millis(50))
        .json(&user("x"))
        .send()
        .await;
    assert!(timed_out.unwrap_err().is_timeout());
}

#[tokio::test]
async fn reset_mid_stream_is_an_error_for_the_client_and_counted() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = reqwest::Client::new()
        .post(chat_url(&upstream))
        .json(&stream_request(
            "[[mock chunks=5 reset_after_chunks=2]]",
            Some(true),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut received = String::new();
    let mut error = None;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(bytes) => received.push_str(std::str::from_utf8(&bytes).unwrap()),
            Err(err) => {
                error = Some(err);
                break;
            }
        }
    }
    assert!(error.is_some(), "the stream ended cleanly: {received}");
    // The chunks before the reset did arrive.
    assert!(received.contains("tok1 "), "{received}");
    assert!(!received.contains("tok2 "), "{received}");
    assert!(!received.contains("[DONE]"), "{received}");

    let stats = wait_for_stats(&upstream, |stats| stats.resets == 1).await;
    assert_eq!(stats.resets, 1);
    assert_eq!(stats.streams_started, 1);
    assert_eq!(stats.streams_completed, 0);
    assert_eq!(
        stats.streams_aborted, 0,
        "a deliberate reset is not a client abort"
    );
}

#[tokio::test]
async fn client_disconnect_mid_stream_counts_as_aborted() {
    let upstream = MockUpstream::start().await.unwrap();
    upstream.set_behaviour(Behaviour {
        chunks: Some(500),
        chunk_delay_ms: 20,
        ..Behaviour::default()
    });
    let client = reqwest::Client::new();
    let response = client
        .post(chat_url(&upstream))
        .json(&stream_request("hi", None))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert_eq!(upstream.stats().streams_aborted, 0);
    drop(stream);
    drop(client);

    let stats = wait_for_stats(&upstream, |stats| stats.streams_aborted == 1).await;
    assert_eq!(stats.streams_aborted, 1, "{stats:?}");
    assert_eq!(stats.streams_completed, 0);
    assert_eq!(stats.resets, 0);
}

#[tokio::test]
async fn malformed_json_is_a_400_in_openai_shape() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = reqwest::Client::new()
        .post(chat_url(&upstream))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("JSON"));
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].body, Value::Null);
}

#[tokio::test]
async fn http2_prior_knowledge_and_other_endpoints() {
    let upstream = MockUpstream::start().await.unwrap();
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let root = format!("http://{}", upstream.addr());

    let response = client
        .post(format!("{root}/chat/completions"))
        .json(&user("no /v1 prefix, over h2c"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 "
    );

    let response = client
        .post(format!("{root}/v1/chat/completions"))
        .json(&stream_request("h2 stream", Some(true)))
        .send()
        .await
        .unwrap();
    let (events, _) = read_stream(response).await;
    assert_eq!(events.len(), 9);

    for url in [format!("{root}/v1/models"), format!("{root}/models")] {
        let models: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(
            models,
            json!({"object": "list", "data": [{"id": "mock-model", "object": "model",
                "created": 0, "owned_by": "mock"}]})
        );
    }
    let health = client.get(format!("{root}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let missing = client
        .get(format!("{root}/v1/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let wrong_method = client
        .get(format!("{root}/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);

    let stats: MockStats = client
        .get(format!("{root}/mock/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, upstream.stats());
    assert_eq!(stats.chat_requests, 2);
    // Control endpoints do not count themselves.
    assert_eq!(stats.requests, 7);
    assert_eq!(stats.streams_completed, 1);

    let bad_config = client
        .post(format!("{root}/mock/config"))
        .json(&json!({"delay": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_config.status(), 400);

    let reset = client
        .post(format!("{root}/mock/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(upstream.stats(), MockStats::default());
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn reset_restores_defaults_and_recording_is_bounded() {
    let upstream = MockUpstream::start().await.unwrap();
    upstream.set_behaviour(Behaviour {
        status: Some(500),
        ..Behaviour::default()
    });
    let client = reqwest::Client::new();
    for i in 0..1005 {
        client
            .post(chat_url(&upstream))
            .json(&user(&format!("request {i}")))
            .send()
            .await
            .unwrap();
    }
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 1000);
    assert_eq!(recorded[0].body["messages"][0]["content"], "request 5");
    assert_eq!(recorded[999].body["messages"][0]["content"], "request 1004");

    upstream.reset();
    assert_eq!(upstream.stats(), MockStats::default());
    assert!(upstream.requests().is_empty());
    let response = client
        .post(chat_url(&upstream))
        .json(&user("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "reset restored the default behaviour"
    );
    // Ids stay unique across resets.
    assert_eq!(response.headers()["x-request-id"], "req-up-1006");
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let upstream = MockUpstream::start().await.unwrap();
    let url = format!("http://{}/health", upstream.addr());
    let client = reqwest::Client::new();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    drop(upstream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(&url).send().await.is_err());
}
