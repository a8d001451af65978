//! OpenAI beyond plain chat: tool calls, the in-band stream error, images, embeddings, and
//! the request numbering shared with the other formats.

mod common;

use common::{embedding_json, prompt_tokens, read_sse, wait_for_stats};
use gateway_test_support::MockUpstream;
use serde_json::{Value, json};

fn chat_url(upstream: &MockUpstream) -> String {
    format!("{}/chat/completions", upstream.base_url())
}

// `cfg(test)` puts the helper under clippy's allow-unwrap-in-tests, like the tests it serves.
#[cfg(test)]
async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .bearer_auth("sk-upstream")
        .json(body)
        .send()
        .await
        .unwrap()
}

fn tool_request(content: &str) -> Value {
    json!({
        "model": "gpt-test",
        "messages": [{"role": "user", "content": content}],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
            {"type": "function", "function": {"name": "get_time", "parameters": {}}},
        ],
    })
}

#[tokio::test]
async fn tool_call_plain() {
    let upstream = MockUpstream::start().await.unwrap();
    let answer: Value = post(&chat_url(&upstream), &tool_request("weather in Paris?"))
        .await
        .json()
        .await
        .unwrap();
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        choice["message"],
        json!({"role": "assistant", "content": null, "tool_calls": [{
            "id": "call_up_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"},
        }]})
    );
    assert_eq!(answer["usage"]["completion_tokens"], 5);

    // The tool answered: the model answers text.
    let mut body = tool_request("weather in Paris?");
    body["messages"] = json!([
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_up_1",
            "type": "function", "function": {"name": "get_weather",
            "arguments": "{\"location\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_up_1", "content": "sunny"},
    ]);
    let answer: Value = post(&chat_url(&upstream), &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 "
    );

    // tool_choice none and the directive both turn calls off; tool_call=true forces one.
    let mut body = tool_request("weather?");
    body["tool_choice"] = json!("none");
    let answer: Value = post(&chat_url(&upstream), &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let answer: Value = post(
        &chat_url(&upstream),
        &tool_request("[[mock tool_call=false]]"),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let mut body = tool_request("weather?");
    body["tool_choice"] = json!("none");
    body["messages"][0]["content"] = json!("[[mock tool_call=true]]");
    let answer: Value = post(&chat_url(&upstream), &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(upstream.stats().tool_calls, 2);
}

#[tokio::test]
async fn tool_call_streamed_as_name_then_two_fragments() {
    let upstream = MockUpstream::start().await.unwrap();
    let mut body = tool_request("weather in Paris?");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = post(&chat_url(&upstream), &body).await;
    assert_eq!(response.status(), 200);
    let (events, frames) = read_sse(response).await;
    // role+name, 2 argument fragments, finish, usage, [DONE]
    assert_eq!(events.len(), 6, "{events:?}");
    assert_eq!(frames.len(), 6);
    assert_eq!(events[5].data, "[DONE]");
    let chunks: Vec<Value> = events[..5].iter().map(|event| event.json()).collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0,
            "id": "call_up_1", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}]})
    );
    assert_eq!(
        chunks[1]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\":"}}]})
    );
    assert_eq!(
        chunks[2]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]})
    );
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 5);
    let stats = wait_for_stats(&upstream, |stats| stats.streams_completed == 1).await;
    assert_eq!(stats.streams_completed, 1);
    assert_eq!(stats.tool_calls, 1);
}

#[tokio::test]
async fn mid_stream_error_is_an_error_payload_without_done() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({"model": "m", "stream": true, "messages": [
        {"role": "user", "content": "[[mock stream_error_after_chunks=2]]"}]});
    let response = post(&chat_url(&upstream), &body).await;
    assert_eq!(response.status(), 200);
    let (events, _) = read_sse(response).await;
    // role, 2 content, error
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[2].json()["choices"][0]["delta"]["content"], "tok1 ");
    assert_eq!(
        events[3].json(),
        json!({"error": {"message": "mock upstream error mid-stream", "type": "server_error",
            "param": null, "code": null}})
    );
    let stats = wait_for_stats(&upstream, |stats| stats.stream_errors == 1).await;
    assert_eq!(stats.stream_errors, 1);
    assert_eq!(stats.streams_completed, 0);
    assert_eq!(stats.resets, 0);
}

#[tokio::test]
async fn image_parts_are_accepted_and_counted() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]}]});
    let response = post(&chat_url(&upstream), &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.stats().images_seen, 2);
}

#[tokio::test]
async fn embeddings_for_string_and_array_input() {
    let upstream = MockUpstream::start().await.unwrap();
    let url = format!("{}/embeddings", upstream.base_url());
    let response = post(&url, &json!({"model": "embed-test", "input": "hello"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": embedding_json("hello")}],
            "model": "embed-test",
            "usage": {"prompt_tokens": prompt_tokens(5), "total_tokens": prompt_tokens(5)},
        })
    );

    let answer: Value = post(
        &format!("http://{}/embeddings", upstream.addr()),
        &json!({"model": "embed-test", "input": ["hello", "wide world"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["embedding"], embedding_json("hello"));
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[1]["embedding"], embedding_json("wide world"));
    assert_eq!(answer["usage"]["prompt_tokens"], prompt_tokens(15));

    // Faults apply to embeddings too.
    let response = post(&url, &json!({"model": "e", "input": "[[mock status=503]]"})).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");

    let stats = upstream.stats();
    assert_eq!(stats.embedding_requests, 3);
    assert_eq!(stats.chat_requests, 0);
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[1].path, "/embeddings");
}

#[tokio::test]
async fn numbering_is_shared_by_every_format() {
    let upstream = MockUpstream::start().await.unwrap();
    let client = reqwest::Client::new();
    let user = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let openai: Value = post(&chat_url(&upstream), &user)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(openai["id"], "chatcmpl-up-1");
    let anthropic = client
        .post(format!("{}/v1/messages", upstream.anthropic_base_url()))
        .header("anthropic-version", "2023-06-01")
        .json(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.headers()["x-request-id"], "req-up-2");
    let anthropic: Value = anthropic.json().await.unwrap();
    assert_eq!(anthropic["id"], "msg_up_2");
    let gemini: Value = client
        .post(format!(
            "{}/models/g:generateContent",
            upstream.gemini_base_url()
        ))
        .header("x-goog-api-key", "k")
        .json(&json!({"contents": [{"parts": [{"text": "hi"}]}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gemini["responseId"], "gem-up-3");
    assert_eq!(upstream.stats().chat_requests, 3);
    assert_eq!(upstream.requests().len(), 3);
}

#[tokio::test]
async fn vendor_routes_refuse_other_methods() {
    let upstream = MockUpstream::start().await.unwrap();
    let client = reqwest::Client::new();
    let root = format!("http://{}", upstream.addr());
    for path in [
        "/v1/messages",
        "/v1/embeddings",
        "/v1beta/models/g:generateContent",
        "/openai/deployments/d/chat/completions",
    ] {
        let response = client.get(format!("{root}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 405, "{path}");
    }
    let response = client
        .post(format!("{root}/v1beta/models/g:countTokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(upstream.requests().is_empty());
}
