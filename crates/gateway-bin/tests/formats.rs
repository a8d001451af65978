//! Protocol adaptation end to end: each client format against each vendor format, through
//! the real gateway and the mock upstream speaking every vendor's wire format.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use common::{CLIENT_KEY, Harness, UPSTREAM_KEY, directive, sse_events};
use futures_util::StreamExt;
use serde_json::{Value, json};

const MOCK_TEXT: &str = "tok0 tok1 tok2 tok3 tok4 ";

fn text_of_openai_stream(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// `(event name, data)` pairs of an Anthropic-format SSE response.
async fn anthropic_events(response: reqwest::Response) -> Vec<(String, Value)> {
    let mut text = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in block.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    name = rest.to_owned();
                } else if let Some(rest) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(rest).unwrap();
                }
            }
            (name, data)
        })
        .collect()
}

fn messages_request(h: &Harness) -> reqwest::RequestBuilder {
    h.client
        .post(format!("{}/v1/messages", h.base))
        .header("x-api-key", CLIENT_KEY)
        .header("anthropic-version", "2023-06-01")
}

#[tokio::test]
async fn openai_client_to_anthropic_vendor() {
    let mut h = Harness::start().await;
    let response = h
        .chat(json!({"model": "claude", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"}
        ]}))
        .await;
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], MOCK_TEXT);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 5);

    let upstream = h.upstream.requests().pop().unwrap();
    assert_eq!(upstream.path, "/v1/messages");
    assert_eq!(upstream.headers["x-api-key"], UPSTREAM_KEY);
    assert!(upstream.headers.contains_key("anthropic-version"));
    assert_eq!(upstream.body["model"], "claude-test");
    assert_eq!(upstream.body["system"], "be brief");
    assert!(upstream.body["max_tokens"].as_u64().unwrap() > 0);

    let response = h
        .chat(json!({"model": "claude", "stream": true, "messages": directive("hi")}))
        .await;
    assert_eq!(response.status(), 200);
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(text_of_openai_stream(&events), MOCK_TEXT);

    let rows = h.finish().await;
    let row = rows.iter().find(|r| r.request_id == request_id).unwrap();
    assert_eq!(row.provider.as_deref(), Some("claude-upstream"));
    assert_eq!(row.output_tokens, Some(5));
    let streamed = rows.iter().find(|r| r.streamed).unwrap();
    assert_eq!(
        streamed.output_tokens,
        Some(5),
        "stream usage must be billed"
    );
}

#[tokio::test]
async fn openai_client_to_gemini_vendor() {
    let mut h = Harness::start().await;
    let response = h
        .chat(json!({"model": "gem", "messages": directive("hello")}))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], MOCK_TEXT);
    assert_eq!(body["usage"]["completion_tokens"], 5);
    let upstream = h.upstream.requests().pop().unwrap();
    assert_eq!(upstream.path, "/v1beta/models/gemini-test:generateContent");
    assert_eq!(upstream.headers["x-goog-api-key"], UPSTREAM_KEY);
    assert!(
        upstream.query.is_none(),
        "no key in the URL: {:?}",
        upstream.query
    );

    let response = h
        .chat(json!({"model": "gem", "stream": true, "stream_options": {"include_usage": true}, "messages": directive("hi")}))
        .await;
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(text_of_openai_stream(&events), MOCK_TEXT);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let rows = h.finish().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.output_tokens == Some(5)));
}

#[tokio::test]
async fn openai_client_to_azure_vendor() {
    let h = Harness::start().await;
    let response = h
        .chat(json!({"model": "az", "messages": directive("hello")}))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], MOCK_TEXT);
    let upstream = h.upstream.requests().pop().unwrap();
    assert_eq!(upstream.path, "/openai/deployments/dep-1/chat/completions");
    assert_eq!(upstream.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(upstream.headers["api-key"], UPSTREAM_KEY);
    assert!(!upstream.headers.contains_key("authorization"));
}

#[tokio::test]
async fn anthropic_client_to_openai_vendor() {
    let mut h = Harness::start().await;
    let response = messages_request(&h)
        .json(&json!({
            "model": "chat",
            "max_tokens": 100,
            "system": "be brief",
            "messages": [{"role": "user", "content": "hello"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["content"][0]["type"], "text");
    assert_eq!(body["content"][0]["text"], MOCK_TEXT);
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["usage"]["output_tokens"], 5);
    let upstream = h.upstream.requests().pop().unwrap();
    assert_eq!(upstream.path, "/v1/chat/completions");
    assert_eq!(upstream.body["messages"][0]["role"], "system");

    let response = messages_request(&h)
        .json(&json!({
            "model": "chat",
            "max_tokens": 100,
            "stream": true,
            "messages": [{"role": "user", "content": "hello"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = anthropic_events(response).await;
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    let text: String = events
        .iter()
        .filter(|(name, _)| name == "content_block_delta")
        .filter_map(|(_, data)| data["delta"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, MOCK_TEXT);
    let (_, delta) = events
        .iter()
        .find(|(name, _)| name == "message_delta")
        .unwrap();
    assert_eq!(delta["usage"]["output_tokens"], 5);
    // The vendor's input count arrives at the end, and the final usage carries it.
    let upstream_usage_input = h.upstream.requests().len();
    assert!(upstream_usage_input > 0);
    assert!(delta["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let rows = h.finish().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.output_tokens == Some(5)));
}

#[tokio::test]
async fn anthropic_clients_get_anthropic_errors() {
    let h = Harness::start().await;
    let response = h
        .client
        .post(format!("{}/v1/messages", h.base))
        .header("x-api-key", "sk-wrong")
        .json(&json!({"model": "chat", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");

    let response = messages_request(&h)
        .json(&json!({"model": "nope", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");

    let response = messages_request(&h)
        .json(&json!({"model": "chat", "messages": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn vendor_errors_keep_status_and_message_across_formats() {
    let h = Harness::start().await;
    // Anthropic's 529 overloaded reaches an OpenAI client as 503 with the vendor's message.
    let response = h
        .chat(json!({"model": "claude", "messages": directive("[[mock status=529]]")}))
        .await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mock upstream error"),
        "{body}"
    );
    let response = h
        .chat(json!({"model": "gem", "messages": directive("[[mock status=429 retry_after_secs=7]]")}))
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    // A mid-stream vendor error is an error for the client, never a normal end.
    let response = h
        .chat(json!({"model": "claude", "stream": true, "messages": directive("[[mock stream_error_after_chunks=2]]")}))
        .await;
    let events = sse_events(response).await;
    assert_ne!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].is_string(), "{events:?}");
}

#[tokio::test]
async fn embeddings_through_openai_azure_and_gemini() {
    let mut h = Harness::start().await;
    let mut ids = Vec::new();
    for alias in ["chat", "az", "gem"] {
        let response = h
            .post("/v1/embeddings")
            .json(&json!({"model": alias, "input": ["hello", "world"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{alias}");
        ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        let body: Value = response.json().await.unwrap();
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 2, "{alias}: {body}");
        assert_eq!(data[1]["index"], 1);
        assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8, "{alias}");
    }
    let paths: Vec<String> = h
        .upstream
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/embeddings",
            "/openai/deployments/dep-1/embeddings",
            "/v1beta/models/gemini-test:batchEmbedContents"
        ]
    );
    // The OpenAI SDKs ask for base64 by default; a translated answer honours it.
    let response = h
        .post("/v1/embeddings")
        .json(&json!({"model": "gem", "input": "hello", "encoding_format": "base64"}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert!(body["data"][0]["embedding"].is_string(), "{body}");
    // A kind without an embeddings API is a clear 400, not a vendor's confusing answer.
    for alias in ["claude", "local"] {
        let response = h
            .post("/v1/embeddings")
            .json(&json!({"model": alias, "input": "hello"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{alias}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["param"], "model");
    }
    let rows = h.finish().await;
    let of = |id: &String| rows.iter().find(|r| &r.request_id == id).unwrap();
    assert_eq!(of(&ids[0]).usage_source.as_deref(), Some("vendor"));
    assert!(of(&ids[0]).input_tokens.unwrap() > 0);
    // Gemini reports no token counts for embeddings: the row says it is an estimate.
    assert_eq!(of(&ids[2]).usage_source.as_deref(), Some("estimate"));
    assert_eq!(of(&ids[2]).input_tokens, Some(4));
}

#[tokio::test]
async fn anthropic_client_to_anthropic_vendor_is_forwarded_natively() {
    let mut h = Harness::start().await;
    let response = messages_request(&h)
        .header("anthropic-beta", "interleaved-thinking-2025-05-14")
        .json(&json!({
            "model": "claude",
            "max_tokens": 2048,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
            "messages": [{"role": "user", "content": "hello"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    // The vendor's own answer, untouched (its id, not a translation's).
    assert!(
        body["id"].as_str().unwrap().starts_with("msg_up_"),
        "{body}"
    );
    assert_eq!(body["content"][0]["text"], MOCK_TEXT);

    let upstream = h.upstream.requests().pop().unwrap();
    assert_eq!(upstream.path, "/v1/messages");
    assert_eq!(upstream.body["model"], "claude-test");
    assert_eq!(upstream.body["thinking"]["budget_tokens"], 1024);
    assert_eq!(
        upstream.body["context_management"]["edits"][0]["type"],
        "clear_tool_uses_20250919"
    );
    assert_eq!(
        upstream.headers["anthropic-beta"],
        "interleaved-thinking-2025-05-14"
    );
    assert_eq!(upstream.headers["x-api-key"], UPSTREAM_KEY);

    // Streamed: the vendor's events in the vendor's order, usage read on the way.
    let response = messages_request(&h)
        .json(&json!({
            "model": "claude", "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": "hello"}]
        }))
        .send()
        .await
        .unwrap();
    let stream_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let events = anthropic_events(response).await;
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names[..3], ["message_start", "ping", "content_block_start"]);
    assert_eq!(names.last(), Some(&"message_stop"));

    // Anthropic SDKs add `?beta=true` for beta features; the vendor must see it.
    let response = h
        .client
        .post(format!("{}/v1/messages?beta=true", h.base))
        .header("x-api-key", common::CLIENT_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": "claude", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        h.upstream.requests().pop().unwrap().query.as_deref(),
        Some("beta=true")
    );

    // A vendor error reaches a native client unchanged, status, body and back-off.
    let response = messages_request(&h)
        .json(&json!({
            "model": "claude", "max_tokens": 64,
            "messages": [{"role": "user", "content": "[[mock status=429 retry_after_secs=4]]"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "4");
    for status in [400, 529] {
        let response = messages_request(&h)
            .json(&json!({
                "model": "claude", "max_tokens": 64,
                "messages": [{"role": "user", "content": format!("[[mock status={status}]]")}]
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(
            body["error"]["message"],
            format!("mock upstream error {status}")
        );
    }

    let rows = h.finish().await;
    let plain = rows.iter().find(|r| r.request_id == request_id).unwrap();
    assert_eq!(plain.provider.as_deref(), Some("claude-upstream"));
    assert_eq!(plain.output_tokens, Some(5));
    assert_eq!(plain.usage_source.as_deref(), Some("vendor"));
    let streamed = rows.iter().find(|r| r.request_id == stream_id).unwrap();
    assert!(streamed.streamed);
    assert_eq!(streamed.output_tokens, Some(5));
    assert!(streamed.input_tokens.unwrap() > 0);
    assert!(streamed.ttft_ms.is_some());
}
