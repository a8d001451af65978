//! The Azure OpenAI endpoints of the mock upstream, seen from a real HTTP client.

mod common;

use common::{embedding_json, prompt_tokens, read_sse};
use gateway_test_support::MockUpstream;
use serde_json::{Value, json};

const API_VERSION: &str = "2024-10-21";

fn deployment_url(upstream: &MockUpstream, deployment: &str, operation: &str) -> String {
    format!(
        "{}/openai/deployments/{deployment}/{operation}",
        upstream.azure_base_url()
    )
}

fn chat_url(upstream: &MockUpstream) -> String {
    format!(
        "{}?api-version={API_VERSION}",
        deployment_url(upstream, "gpt4o-prod", "chat/completions")
    )
}

fn user(content: &str) -> Value {
    json!({"messages": [{"role": "user", "content": content}]})
}

// `cfg(test)` puts the helper under clippy's allow-unwrap-in-tests, like the tests it serves.
#[cfg(test)]
async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("api-key", "azure-upstream")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn chat_answers_like_openai_with_the_deployment_as_model() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = post(&chat_url(&upstream), &user("hello there")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["id"], "chatcmpl-up-1");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], "gpt4o-prod");
    assert_eq!(
        answer["choices"][0]["message"],
        json!({"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "})
    );
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": prompt_tokens(11), "completion_tokens": 5,
            "total_tokens": prompt_tokens(11) + 5})
    );
    let recorded = upstream.requests();
    assert_eq!(
        recorded[0].path,
        "/openai/deployments/gpt4o-prod/chat/completions"
    );
    assert_eq!(recorded[0].query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(recorded[0].headers["api-key"], "azure-upstream");
    assert_eq!(upstream.stats().chat_requests, 1);

    // A preview version is fine too.
    let url = format!(
        "{}?api-version=2025-01-01-preview",
        deployment_url(&upstream, "gpt4o-prod", "chat/completions")
    );
    assert_eq!(post(&url, &user("x")).await.status(), 200);
}

#[tokio::test]
async fn stream_and_tool_call_follow_openai() {
    let upstream = MockUpstream::start().await.unwrap();
    let mut body = user("[[mock chunks=2]]");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (events, _) = read_sse(post(&chat_url(&upstream), &body).await).await;
    // role, 2 content, finish, usage, [DONE]
    assert_eq!(events.len(), 6, "{events:?}");
    assert_eq!(events[5].data, "[DONE]");
    for event in &events[..5] {
        assert_eq!(event.json()["model"], "gpt4o-prod");
    }
    assert_eq!(events[4].json()["usage"]["completion_tokens"], 2);

    body = user("weather?");
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather"}}]);
    let answer: Value = post(&chat_url(&upstream), &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
}

#[tokio::test]
async fn missing_api_version_or_key_is_refused() {
    let upstream = MockUpstream::start().await.unwrap();
    let bare = deployment_url(&upstream, "gpt4o-prod", "chat/completions");
    let response = post(&bare, &user("hi")).await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api-version")
    );

    let response = post(&format!("{bare}?api-version=latest"), &user("hi")).await;
    assert_eq!(response.status(), 400);

    let response = reqwest::Client::new()
        .post(chat_url(&upstream))
        .bearer_auth("not-how-azure-keys-travel")
        .json(&user("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api-key")
    );

    let embeddings = deployment_url(&upstream, "embed-prod", "embeddings");
    let response = post(&embeddings, &json!({"input": "hi"})).await;
    assert_eq!(response.status(), 400);
    assert_eq!(upstream.requests().len(), 4);
}

#[tokio::test]
async fn embeddings_with_the_deployment_as_model() {
    let upstream = MockUpstream::start().await.unwrap();
    let url = format!(
        "{}?api-version={API_VERSION}",
        deployment_url(&upstream, "embed-prod", "embeddings")
    );
    let response = post(&url, &json!({"input": ["ab", "cde"]})).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        json!({
            "object": "list",
            "data": [
                {"object": "embedding", "index": 0, "embedding": embedding_json("ab")},
                {"object": "embedding", "index": 1, "embedding": embedding_json("cde")},
            ],
            "model": "embed-prod",
            "usage": {"prompt_tokens": prompt_tokens(5), "total_tokens": prompt_tokens(5)},
        })
    );
    assert_eq!(upstream.stats().embedding_requests, 1);
}
