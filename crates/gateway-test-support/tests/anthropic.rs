//! The Anthropic Messages API of the mock upstream, seen from a real HTTP client.

mod common;

use common::{Event, prompt_tokens, read_sse, wait_for_stats};
use gateway_test_support::{Behaviour, MockStats, MockUpstream};
use serde_json::{Value, json};

fn messages_url(upstream: &MockUpstream) -> String {
    format!("{}/v1/messages", upstream.anthropic_base_url())
}

fn request(content: Value) -> Value {
    json!({
        "model": "claude-test",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": content}],
    })
}

// `cfg(test)` puts the helper under clippy's allow-unwrap-in-tests, like the tests it serves.
#[cfg(test)]
async fn post(upstream: &MockUpstream, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(messages_url(upstream))
        .header("x-api-key", "sk-ant-upstream")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

fn weather_tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}},
        {"name": "get_time", "input_schema": {"type": "object"}},
    ])
}

#[cfg(test)]
fn names(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .map(|event| event.name.as_deref().unwrap())
        .collect()
}

#[tokio::test]
async fn plain_message_has_anthropic_shape_and_documented_usage() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({
        "model": "claude-test",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Be brief"}],
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ],
    });
    let response = post(&upstream, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    assert_eq!(response.headers()["content-type"], "application/json");
    let answer: Value = response.json().await.unwrap();
    // "Be brief" + "hello" + "hi" + "again" = 8 + 5 + 2 + 5 = 20 characters.
    assert_eq!(prompt_tokens(20), 6);
    assert_eq!(
        answer,
        json!({
            "id": "msg_up_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": "tok0 tok1 tok2 tok3 tok4 "}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 6, "output_tokens": 5,
                "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
        })
    );

    // A string system prompt counts too, and the route works without /v1.
    let body = json!({"model": "m", "system": "abcd", "messages": [
        {"role": "user", "content": "[[mock chunks=2]]"}]});
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/messages", upstream.anthropic_base_url()))
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["id"], "msg_up_2");
    assert_eq!(answer["content"][0]["text"], "tok0 tok1 ");
    // 4 + 17 characters.
    assert_eq!(answer["usage"]["input_tokens"], prompt_tokens(21));
    assert_eq!(answer["usage"]["output_tokens"], 2);

    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].path, "/v1/messages");
    assert_eq!(recorded[0].query, None);
    assert_eq!(recorded[0].headers["x-api-key"], "sk-ant-upstream");
    assert_eq!(recorded[0].headers["anthropic-version"], "2023-06-01");
    assert_eq!(
        recorded[0].body,
        json!({
            "model": "claude-test",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "Be brief"}],
            "messages": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
                {"role": "user", "content": [{"type": "text", "text": "again"}]},
            ],
        })
    );
    assert_eq!(recorded[1].path, "/messages");
    assert_eq!(upstream.stats().chat_requests, 2);
}

#[tokio::test]
async fn directive_in_text_blocks_applies() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = post(
        &upstream,
        &request(json!([{"type": "text", "text": "x [[mock status=529]]"}])),
    )
    .await;
    assert_eq!(response.status(), 529);
}

#[tokio::test]
async fn stream_sends_named_events_in_order_one_frame_each() {
    let upstream = MockUpstream::start().await.unwrap();
    upstream.set_behaviour(Behaviour {
        chunks: Some(3),
        chunk_delay_ms: 20,
        ..Behaviour::default()
    });
    let mut body = request(json!("12345678"));
    body["stream"] = json!(true);
    let response = post(&upstream, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let (events, frames) = read_sse(response).await;
    assert_eq!(
        names(&events),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        frames.len(),
        events.len(),
        "one frame per event: {frames:?}"
    );
    for event in &events {
        // Anthropic repeats the event name as the payload's type.
        assert_eq!(event.json()["type"], event.name.as_deref().unwrap());
    }
    assert_eq!(
        events[0].json()["message"],
        json!({
            "id": "msg_up_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": prompt_tokens(8), "output_tokens": 1,
                "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
        })
    );
    assert_eq!(
        events[2].json(),
        json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}})
    );
    for (i, event) in events[3..6].iter().enumerate() {
        assert_eq!(
            event.json(),
            json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": format!("tok{i} ")}})
        );
    }
    assert_eq!(
        events[6].json(),
        json!({"type": "content_block_stop", "index": 0})
    );
    assert_eq!(
        events[7].json(),
        json!({"type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 3}})
    );

    let stats = wait_for_stats(&upstream, |stats| stats.streams_completed == 1).await;
    assert_eq!(
        stats,
        MockStats {
            requests: 1,
            chat_requests: 1,
            streams_started: 1,
            streams_completed: 1,
            ..MockStats::default()
        }
    );
}

#[tokio::test]
async fn tool_use_plain_and_streamed() {
    let upstream = MockUpstream::start().await.unwrap();
    let mut body = request(json!("weather in Paris?"));
    body["tools"] = weather_tools();
    let answer: Value = post(&upstream, &body).await.json().await.unwrap();
    assert_eq!(
        answer["content"],
        json!([{"type": "tool_use", "id": "toolu_up_1", "name": "get_weather",
            "input": {"location": "Paris"}}])
    );
    assert_eq!(answer["stop_reason"], "tool_use");
    assert_eq!(answer["id"], "msg_up_1");

    body["stream"] = json!(true);
    let (events, _) = read_sse(post(&upstream, &body).await).await;
    assert_eq!(
        names(&events),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        events[2].json()["content_block"],
        json!({"type": "tool_use", "id": "toolu_up_2", "name": "get_weather", "input": {}})
    );
    let partial: String = events[3..5]
        .iter()
        .map(|event| {
            let delta = &event.json()["delta"];
            assert_eq!(delta["type"], "input_json_delta");
            delta["partial_json"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(events[3].json()["delta"]["partial_json"], "{\"location\":");
    assert_eq!(
        serde_json::from_str::<Value>(&partial).unwrap(),
        json!({"location": "Paris"})
    );
    assert_eq!(events[6].json()["delta"]["stop_reason"], "tool_use");

    // The tool result came back: the model answers text.
    let body = json!({
        "model": "claude-test",
        "tools": weather_tools(),
        "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_up_1",
                "name": "get_weather", "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_up_1",
                "content": "sunny"}]},
        ],
    });
    let answer: Value = post(&upstream, &body).await.json().await.unwrap();
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["content"][0]["text"], "tok0 tok1 tok2 tok3 tok4 ");

    // The directive turns tool calls off.
    let mut body = request(json!("weather? [[mock tool_call=false]]"));
    body["tools"] = weather_tools();
    let answer: Value = post(&upstream, &body).await.json().await.unwrap();
    assert_eq!(answer["content"][0]["type"], "text");
    assert_eq!(upstream.stats().tool_calls, 2);
}

#[tokio::test]
async fn error_statuses_have_anthropic_shape() {
    let upstream = MockUpstream::start().await.unwrap();
    for (status, kind) in [
        (529, "overloaded_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (400, "invalid_request_error"),
    ] {
        let response = post(
            &upstream,
            &request(json!(format!(
                "[[mock status={status} retry_after_secs=7]]"
            ))),
        )
        .await;
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["retry-after"], "7");
        assert!(response.headers().contains_key("x-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"type": "error", "error": {"type": kind,
                "message": format!("mock upstream error {status}")}})
        );
    }
}

#[tokio::test]
async fn missing_anthropic_version_is_a_400_and_recorded() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = reqwest::Client::new()
        .post(messages_url(&upstream))
        .header("x-api-key", "k")
        .json(&request(json!("hi")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic-version")
    );
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].headers["x-api-key"], "k");

    // Bad JSON is refused in Anthropic's shape too.
    let response = reqwest::Client::new()
        .post(messages_url(&upstream))
        .header("anthropic-version", "2023-06-01")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn mid_stream_error_is_an_error_event_then_a_clean_end() {
    let upstream = MockUpstream::start().await.unwrap();
    let mut body = request(json!("[[mock stream_error_after_chunks=2]]"));
    body["stream"] = json!(true);
    let response = post(&upstream, &body).await;
    assert_eq!(response.status(), 200);
    // read_sse unwraps every frame: the body ends without a transport error.
    let (events, _) = read_sse(response).await;
    assert_eq!(
        names(&events),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "error",
        ]
    );
    assert_eq!(
        events[5].json(),
        json!({"type": "error", "error": {"type": "overloaded_error",
            "message": "mock upstream error mid-stream"}})
    );
    let stats = wait_for_stats(&upstream, |stats| stats.stream_errors == 1).await;
    assert_eq!(stats.stream_errors, 1);
    assert_eq!(stats.streams_completed, 0);
    assert_eq!(stats.streams_aborted, 0);
    assert_eq!(stats.resets, 0);
}

#[tokio::test]
async fn image_blocks_are_accepted_and_counted() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = request(json!([
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.invalid/cat.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
            "data": "iVBORw0KGgo="}},
    ]));
    let response = post(&upstream, &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    // Only the text block counts: 13 characters.
    assert_eq!(answer["usage"]["input_tokens"], prompt_tokens(13));
    assert_eq!(upstream.stats().images_seen, 2);
}
