//! OpenAI endpoints the gateway forwards without translating (`/v1/responses`, images, audio):
//! the body reaches an OpenAI-format vendor with only `model` replaced, the answer comes back
//! unchanged, and usage is recorded where the API reports it.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use common::{Harness, UPSTREAM_KEY};
use futures_util::StreamExt;
use serde_json::{Value, json};

const MOCK_TEXT: &str = "tok0 tok1 tok2 tok3 tok4 ";

fn id_of(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn responses_api_plain_and_streamed() {
    let mut h = Harness::start().await;
    let response = h
        .post("/v1/responses")
        .json(&json!({"model": "chat", "input": "hello", "store": false, "reasoning": {"effort": "low"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let plain_id = id_of(&response);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["id"].as_str().unwrap().starts_with("resp_up_"),
        "{body}"
    );
    assert_eq!(body["output"][0]["content"][0]["text"], MOCK_TEXT);
    let upstream = h.upstream.requests().pop().unwrap();
    assert_eq!(upstream.path, "/v1/responses");
    assert_eq!(upstream.body["model"], "mock-model");
    // Fields the gateway does not know reach the vendor untouched.
    assert_eq!(upstream.body["reasoning"]["effort"], "low");
    assert_eq!(
        upstream.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}").as_str()
    );

    let response = h
        .post("/v1/responses")
        .json(&json!({"model": "chat", "input": "hello", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stream_id = id_of(&response);
    let mut text = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let names: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));

    let rows = h.finish().await;
    for id in [&plain_id, &stream_id] {
        let row = rows.iter().find(|r| &r.request_id == id).unwrap();
        assert_eq!(row.output_tokens, Some(5), "{row:?}");
        assert!(row.input_tokens.unwrap() > 0);
        assert_eq!(row.usage_source.as_deref(), Some("vendor"));
    }
    let streamed = rows.iter().find(|r| r.request_id == stream_id).unwrap();
    assert!(streamed.streamed && streamed.ttft_ms.is_some());
}

#[tokio::test]
async fn responses_api_through_azure_and_refused_elsewhere() {
    let h = Harness::start().await;
    let response = h
        .post("/v1/responses")
        .json(&json!({"model": "az", "input": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let upstream = h.upstream.requests().pop().unwrap();
    assert_eq!(upstream.path, "/openai/responses");
    assert_eq!(upstream.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(upstream.headers["api-key"], UPSTREAM_KEY);
    // An Anthropic-format vendor has no Responses API: a clear 400.
    let response = h
        .post("/v1/responses")
        .json(&json!({"model": "claude", "input": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model");
}

#[tokio::test]
async fn images_and_speech_are_relayed() {
    let mut h = Harness::start().await;
    let response = h
        .post("/v1/images/generations")
        .json(&json!({"model": "chat", "prompt": "a cat", "n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let image_id = id_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        h.upstream.requests().pop().unwrap().path,
        "/v1/images/generations"
    );

    let response = h
        .post("/v1/audio/speech")
        .json(&json!({"model": "chat", "input": "hello there", "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "audio/mpeg");
    let speech_id = id_of(&response);
    assert_eq!(response.bytes().await.unwrap().len(), 1024);

    let rows = h.finish().await;
    let image = rows.iter().find(|r| r.request_id == image_id).unwrap();
    assert_eq!(image.usage_source.as_deref(), Some("vendor"));
    assert_eq!(image.output_tokens, Some(2 * 1056), "two images");
    // Speech reports no usage: the row says its numbers are estimates.
    let speech = rows.iter().find(|r| r.request_id == speech_id).unwrap();
    assert_eq!(speech.usage_source.as_deref(), Some("estimate"));
}

#[tokio::test]
async fn transcription_form_gets_the_upstream_model() {
    let mut h = Harness::start().await;
    let boundary = "gateway-test-boundary";
    let audio = vec![7u8; 3000];
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&audio);
    body.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nchat\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n\
             --{boundary}--\r\n"
        )
        .as_bytes(),
    );
    let response = h
        .post("/v1/audio/transcriptions")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = id_of(&response);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["text"], MOCK_TEXT);
    let upstream = h.upstream.requests().pop().unwrap();
    assert_eq!(upstream.path, "/v1/audio/transcriptions");
    assert_eq!(upstream.body["model"], "mock-model");
    assert_eq!(upstream.body["language"], "en");
    assert_eq!(upstream.body["file"]["bytes"], 3000);

    // A form without a model is the client's mistake.
    let response = h
        .post("/v1/audio/transcriptions")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--{boundary}--\r\n"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let rows = h.finish().await;
    let row = rows.iter().find(|r| r.request_id == id).unwrap();
    assert_eq!(row.output_tokens, Some(5));
}
