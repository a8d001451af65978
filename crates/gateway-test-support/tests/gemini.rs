//! The Gemini API of the mock upstream, seen from a real HTTP client.

mod common;

use common::{embedding_json, prompt_tokens, read_sse, wait_for_stats};
use gateway_test_support::{Behaviour, MockUpstream};
use serde_json::{Value, json};

const MODEL: &str = "gemini-test";

fn url(upstream: &MockUpstream, method: &str) -> String {
    format!("{}/models/{MODEL}:{method}", upstream.gemini_base_url())
}

fn request(text: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": text}]}]})
}

// `cfg(test)` puts the helper under clippy's allow-unwrap-in-tests, like the tests it serves.
#[cfg(test)]
async fn post(upstream: &MockUpstream, method: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url(upstream, method))
        .header("x-goog-api-key", "AIza-upstream")
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn stream(upstream: &MockUpstream, body: &Value) -> reqwest::Response {
    post(upstream, "streamGenerateContent?alt=sse", body).await
}

fn with_tools(mut body: Value) -> Value {
    body["tools"] = json!([{"functionDeclarations": [
        {"name": "get_weather", "parameters": {"type": "object"}},
        {"name": "get_time"},
    ]}]);
    body
}

#[tokio::test]
async fn generate_content_has_gemini_shape_and_documented_usage() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({
        "systemInstruction": {"parts": [{"text": "Be brief"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "hello"}, {"text": " there"}]},
            {"role": "model", "parts": [{"text": "hi"}]},
            {"role": "user", "parts": [{"text": "again"}]},
        ],
    });
    let response = post(&upstream, "generateContent", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let answer: Value = response.json().await.unwrap();
    // 8 + 5 + 6 + 2 + 5 = 26 characters.
    let p = prompt_tokens(26);
    assert_eq!(p, 8);
    assert_eq!(
        answer,
        json!({
            "candidates": [{
                "content": {"role": "model", "parts": [{"text": "tok0 tok1 tok2 tok3 tok4 "}]},
                "finishReason": "STOP",
                "index": 0,
            }],
            "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 5,
                "totalTokenCount": 13},
            "modelVersion": MODEL,
            "responseId": "gem-up-1",
        })
    );
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(
        recorded[0].path,
        format!("/v1beta/models/{MODEL}:generateContent")
    );
    assert_eq!(recorded[0].query, None);
    assert_eq!(recorded[0].headers["x-goog-api-key"], "AIza-upstream");
    assert_eq!(recorded[0].body, body);
    assert_eq!(upstream.stats().chat_requests, 1);
}

#[tokio::test]
async fn stream_sends_one_payload_per_piece_and_no_done() {
    let upstream = MockUpstream::start().await.unwrap();
    upstream.set_behaviour(Behaviour {
        chunks: Some(3),
        chunk_delay_ms: 20,
        ..Behaviour::default()
    });
    let response = stream(&upstream, &request("12345")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (events, frames) = read_sse(response).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(frames.len(), 3, "one frame per event: {frames:?}");
    assert!(events.iter().all(|event| event.name.is_none()));
    assert!(events.iter().all(|event| event.data != "[DONE]"));
    for (i, event) in events.iter().enumerate() {
        let payload = event.json();
        assert_eq!(payload["responseId"], "gem-up-1");
        assert_eq!(payload["modelVersion"], MODEL);
        let candidate = &payload["candidates"][0];
        assert_eq!(
            candidate["content"],
            json!({"role": "model", "parts": [{"text": format!("tok{i} ")}]})
        );
        if i < 2 {
            assert!(candidate.get("finishReason").is_none(), "{payload}");
            assert!(payload.get("usageMetadata").is_none(), "{payload}");
        }
    }
    let last = events[2].json();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert_eq!(
        last["usageMetadata"],
        json!({"promptTokenCount": prompt_tokens(5), "candidatesTokenCount": 3,
            "totalTokenCount": prompt_tokens(5) + 3})
    );
    let recorded = upstream.requests();
    assert_eq!(recorded[0].query.as_deref(), Some("alt=sse"));
    let stats = wait_for_stats(&upstream, |stats| stats.streams_completed == 1).await;
    assert_eq!(stats.streams_started, 1);
    assert_eq!(stats.streams_completed, 1);
}

#[tokio::test]
async fn function_call_plain_and_streamed() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = with_tools(request("weather in Paris?"));
    let answer: Value = post(&upstream, "generateContent", &body)
        .await
        .json()
        .await
        .unwrap();
    let candidate = &answer["candidates"][0];
    assert_eq!(
        candidate["content"]["parts"],
        json!([{"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}}])
    );
    assert_eq!(candidate["finishReason"], "STOP");

    let (events, _) = read_sse(stream(&upstream, &body).await).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let payload = events[0].json();
    assert_eq!(
        payload["candidates"][0]["content"]["parts"][0]["functionCall"],
        json!({"name": "get_weather", "args": {"location": "Paris"}})
    );
    assert_eq!(payload["candidates"][0]["finishReason"], "STOP");
    assert!(payload["usageMetadata"].is_object());

    // The function response came back: the model answers text.
    let body = with_tools(json!({"contents": [
        {"role": "user", "parts": [{"text": "weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
            "args": {"location": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
            "response": {"sky": "sunny"}}}]},
    ]}));
    let answer: Value = post(&upstream, "generateContent", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["candidates"][0]["content"]["parts"],
        json!([{"text": "tok0 tok1 tok2 tok3 tok4 "}])
    );

    // Calling mode NONE forbids calls.
    let mut body = with_tools(request("weather?"));
    body["toolConfig"] = json!({"functionCallingConfig": {"mode": "NONE"}});
    let answer: Value = post(&upstream, "generateContent", &body)
        .await
        .json()
        .await
        .unwrap();
    assert!(answer["candidates"][0]["content"]["parts"][0]["text"].is_string());
    assert_eq!(upstream.stats().tool_calls, 2);
}

#[tokio::test]
async fn error_statuses_have_google_shape() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = post(
        &upstream,
        "generateContent",
        &request("[[mock status=429 retry_after_secs=4]]"),
    )
    .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "4");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {"code": 429, "message": "mock upstream error 429",
            "status": "RESOURCE_EXHAUSTED", "details": [{
                "@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "4s"}]}})
    );
    for (status, name) in [
        (503, "UNAVAILABLE"),
        (500, "INTERNAL"),
        (400, "INVALID_ARGUMENT"),
    ] {
        let response = stream(&upstream, &request(&format!("[[mock status={status}]]"))).await;
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({"error": {"code": status,
                "message": format!("mock upstream error {status}"), "status": name}})
        );
    }
}

#[tokio::test]
async fn key_must_be_a_header_never_in_the_url() {
    let upstream = MockUpstream::start().await.unwrap();
    let client = reqwest::Client::new();
    let response = client
        .post(url(&upstream, "generateContent"))
        .json(&request("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], 403);
    assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
    assert!(body["error"]["message"].is_string());

    // Even with the header, a key in the URL is refused.
    let response = client
        .post(format!(
            "{}?key=AIza-leaked",
            url(&upstream, "generateContent")
        ))
        .header("x-goog-api-key", "AIza")
        .json(&request("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    let response = client
        .post(format!(
            "{}?alt=sse&key=AIza-leaked",
            url(&upstream, "streamGenerateContent")
        ))
        .header("x-goog-api-key", "AIza")
        .json(&request("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // Streams must ask for SSE.
    let response = post(&upstream, "streamGenerateContent", &request("hi")).await;
    assert_eq!(response.status(), 400);

    // Every refusal was recorded, with its query.
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 4);
    assert_eq!(recorded[1].query.as_deref(), Some("key=AIza-leaked"));
    assert_eq!(upstream.stats().streams_started, 0);
}

#[tokio::test]
async fn mid_stream_error_is_an_error_payload_then_a_clean_end() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = stream(&upstream, &request("[[mock stream_error_after_chunks=1]]")).await;
    assert_eq!(response.status(), 200);
    let (events, _) = read_sse(response).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[0].json()["candidates"][0]["content"]["parts"][0]["text"],
        "tok0 "
    );
    assert!(
        events[0].json()["candidates"][0]
            .get("finishReason")
            .is_none()
    );
    assert_eq!(
        events[1].json(),
        json!({"error": {"code": 503, "message": "mock upstream error mid-stream",
            "status": "UNAVAILABLE"}})
    );
    let stats = wait_for_stats(&upstream, |stats| stats.stream_errors == 1).await;
    assert_eq!(stats.stream_errors, 1);
    assert_eq!(stats.streams_completed, 0);
}

#[tokio::test]
async fn embeddings_one_deterministic_vector_per_request() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({"requests": [
        {"model": format!("models/{MODEL}"), "content": {"parts": [{"text": "hello"}]}},
        {"model": format!("models/{MODEL}"), "content": {"parts": [{"text": "world"}]}},
        {"model": format!("models/{MODEL}"), "content": {"parts": [{"text": "hello"}]}},
    ]});
    let response = post(&upstream, "batchEmbedContents", &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        json!({"embeddings": [
            {"values": embedding_json("hello")},
            {"values": embedding_json("world")},
            {"values": embedding_json("hello")},
        ]})
    );
    assert_ne!(embedding_json("hello"), embedding_json("world"));
    assert_eq!(
        answer["embeddings"][0]["values"].as_array().unwrap().len(),
        8
    );

    let answer: Value = post(
        &upstream,
        "embedContent",
        &json!({"content": {"parts": [{"text": "world"}]}}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        answer,
        json!({"embedding": {"values": embedding_json("world")}})
    );

    let missing_key = reqwest::Client::new()
        .post(url(&upstream, "batchEmbedContents"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(missing_key.status(), 403);
    let stats = upstream.stats();
    assert_eq!(stats.embedding_requests, 3);
    assert_eq!(stats.chat_requests, 0);
}

#[tokio::test]
async fn inline_and_file_data_are_accepted_and_counted() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({"contents": [{"role": "user", "parts": [
        {"text": "what is this?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "gs://bucket/cat.jpg"}},
    ]}]});
    let response = post(&upstream, "generateContent", &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["usageMetadata"]["promptTokenCount"],
        prompt_tokens(13)
    );
    assert_eq!(upstream.stats().images_seen, 2);
}
