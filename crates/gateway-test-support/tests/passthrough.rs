//! OpenAI's pass-through endpoints (Responses, image generations, speech, transcriptions),
//! plain and under Azure's paths, seen from a real HTTP client.

mod common;

use common::{prompt_tokens, read_sse, wait_for_stats};
use futures_util::StreamExt;
use gateway_test_support::{IMAGE_PNG_BASE64, MockStats, MockUpstream};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const BOUNDARY: &str = "mock-test-boundary";

fn url(upstream: &MockUpstream, path: &str) -> String {
    format!("{}{path}", upstream.base_url())
}

fn azure_url(upstream: &MockUpstream, path: &str) -> String {
    format!(
        "{}{path}?api-version=2025-03-01-preview",
        upstream.azure_base_url()
    )
}

// `cfg(test)` puts the helpers under clippy's allow-unwrap-in-tests, like the tests they serve.
#[cfg(test)]
async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .bearer_auth("sk-upstream")
        .header("api-key", "azure-upstream")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[cfg(test)]
async fn post_form(url: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .bearer_auth("sk-upstream")
        .header("api-key", "azure-upstream")
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// A `multipart/form-data` body as a client library writes it: text fields, then files.
fn form(fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    for (name, filename, data) in files {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                 filename=\"{filename}\"\r\nContent-Type: audio/mpeg\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

/// The documented speech bytes, computed independently of the mock.
fn expected_speech(input: &str) -> Vec<u8> {
    let mut state: u64 = 0xcbf29ce484222325;
    for byte in input.bytes() {
        state ^= u64::from(byte);
        state = state.wrapping_mul(0x100000001b3);
    }
    let mut out = Vec::new();
    for _ in 0..128 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(&state.to_le_bytes());
    }
    out
}

fn completed_response(n: u64, model: &str, text: &str, p: u64, c: u64) -> Value {
    json!({
        "id": format!("resp_up_{n}"),
        "object": "response",
        "status": "completed",
        "model": model,
        "output": [{
            "type": "message",
            "id": format!("msg_up_{n}"),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }],
        "usage": {
            "input_tokens": p,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + c,
        },
    })
}

/// `value` without `created_at`, which is the clock's.
#[cfg(test)]
fn without_created_at(mut value: Value) -> Value {
    let created = value.as_object_mut().unwrap().remove("created_at").unwrap();
    assert!(created.as_u64().unwrap() > 1_700_000_000, "{created}");
    value
}

#[tokio::test]
async fn responses_plain_with_string_and_item_inputs() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = post(
        &url(&upstream, "/responses"),
        &json!({"model": "gpt-4.1", "input": "hello there", "instructions": "be brief"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let answer: Value = response.json().await.unwrap();
    // "hello there" + "be brief": 19 characters.
    assert_eq!(
        without_created_at(answer),
        completed_response(
            1,
            "gpt-4.1",
            "tok0 tok1 tok2 tok3 tok4 ",
            prompt_tokens(19),
            5
        )
    );

    let body = json!({"model": "gpt-4.1", "input": [
        {"role": "user", "content": "abc"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "de"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "fgh"},
            {"type": "input_image", "image_url": "data:image/png;base64,AA=="},
        ]},
    ]});
    let answer: Value = post(&url(&upstream, "/responses"), &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["id"], "resp_up_2");
    assert_eq!(answer["usage"]["input_tokens"], prompt_tokens(8));
    assert_eq!(answer["usage"]["total_tokens"], prompt_tokens(8) + 5);

    // Without the /v1 prefix too.
    let root = format!("http://{}/responses", upstream.addr());
    assert_eq!(post(&root, &json!({"input": "x"})).await.status(), 200);

    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[0].path, "/v1/responses");
    assert_eq!(recorded[1].body, body);
    assert_eq!(recorded[2].path, "/responses");
    let stats = upstream.stats();
    assert_eq!(
        stats,
        MockStats {
            requests: 3,
            passthrough_requests: 3,
            images_seen: 1,
            ..MockStats::default()
        }
    );
}

#[tokio::test]
async fn responses_stream_sends_every_event_in_order_with_usage_at_the_end() {
    let upstream = MockUpstream::start().await.unwrap();
    let response = post(
        &url(&upstream, "/responses"),
        &json!({"model": "gpt-4.1", "input": "stream it [[mock chunks=3]]", "stream": true}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (events, frames) = read_sse(response).await;
    let names: Vec<&str> = events
        .iter()
        .map(|event| event.name.as_deref().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(frames.len(), events.len(), "one frame per event");
    let payloads: Vec<Value> = events.iter().map(|event| event.json()).collect();
    for (k, (payload, name)) in payloads.iter().zip(&names).enumerate() {
        assert_eq!(payload["type"], *name);
        assert_eq!(payload["sequence_number"], k);
    }

    let created = &payloads[0]["response"];
    assert_eq!(created["id"], "resp_up_1");
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["output"], json!([]));
    assert_eq!(created["usage"], Value::Null);
    assert_eq!(payloads[2]["item"]["id"], "msg_up_1");
    assert_eq!(payloads[2]["item"]["status"], "in_progress");
    assert_eq!(
        payloads[3]["part"],
        json!({"type": "output_text", "text": "", "annotations": []})
    );
    for (i, delta) in payloads[4..7].iter().enumerate() {
        assert_eq!(
            *delta,
            json!({"type": "response.output_text.delta", "item_id": "msg_up_1",
                "output_index": 0, "content_index": 0, "delta": format!("tok{i} "),
                "sequence_number": 4 + i})
        );
    }
    assert_eq!(payloads[7]["text"], "tok0 tok1 tok2 ");
    assert_eq!(payloads[8]["part"]["text"], "tok0 tok1 tok2 ");
    assert_eq!(payloads[9]["item"]["status"], "completed");
    let p = prompt_tokens("stream it [[mock chunks=3]]".len());
    assert_eq!(
        without_created_at(payloads[10]["response"].clone()),
        completed_response(1, "gpt-4.1", "tok0 tok1 tok2 ", p, 3)
    );

    let stats = wait_for_stats(&upstream, |stats| stats.streams_completed == 1).await;
    assert_eq!(stats.streams_started, 1);
    assert_eq!(stats.streams_completed, 1);
    assert_eq!(stats.passthrough_requests, 1);
}

#[tokio::test]
async fn responses_stream_error_and_reset() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "[[mock stream_error_after_chunks=2]]"},
    ]}], "stream": true});
    let response = post(&url(&upstream, "/responses"), &body).await;
    assert_eq!(response.status(), 200);
    let (events, _) = read_sse(response).await;
    assert_eq!(events.len(), 7, "{events:?}");
    assert_eq!(
        events[5].name.as_deref(),
        Some("response.output_text.delta")
    );
    assert_eq!(events[6].name.as_deref(), Some("error"));
    assert_eq!(
        events[6].json(),
        json!({"type": "error", "code": "server_error", "message": "mock upstream error",
            "sequence_number": 6})
    );

    // Past the last delta: the error comes where `response.output_text.done` would.
    let late = json!({"input": "[[mock chunks=1 stream_error_after_chunks=9]]", "stream": true});
    let (events, _) = read_sse(post(&url(&upstream, "/responses"), &late).await).await;
    assert_eq!(events.len(), 6);
    assert_eq!(events[5].json()["sequence_number"], 5);

    let reset = json!({"input": "[[mock reset_after_chunks=1]]", "stream": true});
    let response = post(&url(&upstream, "/responses"), &reset).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut received = String::new();
    let mut failed = false;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(bytes) => received.push_str(&String::from_utf8_lossy(&bytes)),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the client must see the reset: {received}");
    assert!(received.contains("\"delta\":\"tok0 \""), "{received}");
    assert!(!received.contains("tok1"), "{received}");

    let stats = wait_for_stats(&upstream, |stats| stats.resets == 1).await;
    assert_eq!(stats.stream_errors, 2);
    assert_eq!(stats.resets, 1);
    assert_eq!(stats.streams_completed, 0);
}

#[tokio::test]
async fn responses_directives_come_from_the_last_user_text() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({"input": [
        {"role": "user", "content": "[[mock status=500]]"},
        {"role": "assistant", "content": "[[mock status=503]]"},
        {"role": "user", "content": [{"type": "input_text",
            "text": "again [[mock status=429 retry_after_secs=3]]"}]},
    ]});
    let response = post(&url(&upstream, "/responses"), &body).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3");
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error");

    let started = Instant::now();
    let answer: Value = post(
        &url(&upstream, "/responses"),
        &json!({"input": "[[mock delay_ms=150 chunks=2]]"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(answer["output"][0]["content"][0]["text"], "tok0 tok1 ");
    assert_eq!(answer["usage"]["output_tokens"], 2);

    // A directive in `instructions` is not the user's text.
    let answer = post(
        &url(&upstream, "/responses"),
        &json!({"instructions": "[[mock status=500]]", "input": "fine"}),
    )
    .await;
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn image_generations_answer_n_pngs_with_usage() {
    let upstream = MockUpstream::start().await.unwrap();
    let prompt = "a cat in a hat";
    let response = post(
        &url(&upstream, "/images/generations"),
        &json!({"model": "gpt-image-1", "prompt": prompt, "n": 2}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let answer: Value = response.json().await.unwrap();
    assert!(answer["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(
        answer["data"],
        json!([{"b64_json": IMAGE_PNG_BASE64}, {"b64_json": IMAGE_PNG_BASE64}])
    );
    assert!(
        IMAGE_PNG_BASE64.starts_with("iVBORw0KGgo"),
        "a PNG signature"
    );
    let p = prompt_tokens(prompt.len());
    assert_eq!(
        answer["usage"],
        json!({"input_tokens": p, "output_tokens": 2112, "total_tokens": p + 2112,
            "input_tokens_details": {"text_tokens": p, "image_tokens": 0}})
    );

    let answer: Value = post(
        &url(&upstream, "/images/generations"),
        &json!({"prompt": "x"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 1);
    assert_eq!(answer["usage"]["output_tokens"], 1056);

    let missing = post(&url(&upstream, "/images/generations"), &json!({"n": 1})).await;
    assert_eq!(missing.status(), 400);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");

    let injected = post(
        &url(&upstream, "/images/generations"),
        &json!({"prompt": "[[mock status=503 retry_after_secs=1]]"}),
    )
    .await;
    assert_eq!(injected.status(), 503);
    assert_eq!(injected.headers()["retry-after"], "1");
    assert_eq!(upstream.stats().passthrough_requests, 4);
}

#[tokio::test]
async fn speech_answers_deterministic_audio_bytes() {
    let upstream = MockUpstream::start().await.unwrap();
    let body = json!({"model": "gpt-4o-mini-tts", "input": "Hello world", "voice": "alloy"});
    let response = post(&url(&upstream, "/audio/speech"), &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "audio/mpeg");
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let audio = response.bytes().await.unwrap();
    assert_eq!(audio.len(), 1024);
    assert_eq!(audio.as_ref(), expected_speech("Hello world").as_slice());

    let mut wav = body.clone();
    wav["response_format"] = json!("wav");
    wav["input"] = json!("Other text");
    let response = post(&url(&upstream, "/audio/speech"), &wav).await;
    assert_eq!(response.headers()["content-type"], "audio/wav");
    let other = response.bytes().await.unwrap();
    assert_eq!(other.as_ref(), expected_speech("Other text").as_slice());
    assert_ne!(other, audio);

    let bad = post(
        &url(&upstream, "/audio/speech"),
        &json!({"model": "tts-1", "voice": "alloy"}),
    )
    .await;
    assert_eq!(bad.status(), 400);

    // The body is paced and cut like a stream.
    let started = Instant::now();
    let paced = post(
        &url(&upstream, "/audio/speech"),
        &json!({"input": "[[mock chunk_delay_ms=40]]"}),
    )
    .await;
    assert_eq!(paced.bytes().await.unwrap().len(), 1024);
    assert!(started.elapsed() >= Duration::from_millis(120), "3 pauses");

    let cut = post(
        &url(&upstream, "/audio/speech"),
        &json!({"input": "[[mock reset_after_chunks=2]]"}),
    )
    .await;
    assert_eq!(cut.status(), 200);
    let mut stream = cut.bytes_stream();
    let mut received = 0;
    let mut failed = false;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(bytes) => received += bytes.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed);
    assert_eq!(received, 512);

    let stats = wait_for_stats(&upstream, |stats| stats.resets == 1).await;
    assert_eq!(stats.streams_started, 4);
    assert_eq!(stats.streams_completed, 3);
    assert_eq!(stats.passthrough_requests, 5);
}

#[tokio::test]
async fn transcription_reads_the_multipart_form() {
    let upstream = MockUpstream::start().await.unwrap();
    let audio = vec![7_u8; 3000];
    let (content_type, body) = form(
        &[
            ("model", "gpt-4o-transcribe"),
            ("prompt", "[[mock chunks=2]]"),
        ],
        &[("file", "speech.mp3", &audio)],
    );
    let response = post_form(
        &url(&upstream, "/audio/transcriptions"),
        &content_type,
        body,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-up-1");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        json!({"text": "tok0 tok1 ", "usage": {"type": "tokens", "input_tokens": 50,
            "input_token_details": {"audio_tokens": 50, "text_tokens": 0},
            "output_tokens": 2, "total_tokens": 52}})
    );
    let recorded = upstream.requests();
    assert_eq!(
        recorded[0].body,
        json!({"model": "gpt-4o-transcribe", "prompt": "[[mock chunks=2]]",
            "file": {"filename": "speech.mp3", "bytes": 3000}})
    );
    assert_eq!(recorded[0].path, "/v1/audio/transcriptions");

    let (content_type, body) = form(
        &[("model", "whisper-1"), ("response_format", "text")],
        &[("file", "a.wav", b"RIFF")],
    );
    let response = post_form(
        &url(&upstream, "/audio/transcriptions"),
        &content_type,
        body,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(response.text().await.unwrap(), "tok0 tok1 tok2 tok3 tok4 ");

    // No file part: the form is still recorded, the request refused in OpenAI's shape.
    let (content_type, body) = form(&[("model", "whisper-1"), ("file", "not a file")], &[]);
    let response = post_form(
        &url(&upstream, "/audio/transcriptions"),
        &content_type,
        body,
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["x-request-id"], "req-up-3");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'file'"),
        "{error}"
    );
    assert_eq!(
        upstream.requests()[2].body,
        json!({"model": "whisper-1", "file": "not a file"})
    );

    // Not a multipart body at all.
    let response = post(
        &url(&upstream, "/audio/transcriptions"),
        &json!({"model": "whisper-1"}),
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(upstream.requests()[3].body, Value::Null);

    // A truncated form.
    let (content_type, mut body) = form(&[("model", "m")], &[("file", "a.mp3", b"abc")]);
    body.truncate(body.len() - 10);
    let response = post_form(
        &url(&upstream, "/audio/transcriptions"),
        &content_type,
        body,
    )
    .await;
    assert_eq!(response.status(), 400);

    let stats = upstream.stats();
    assert_eq!(stats.passthrough_requests, 5);
    assert_eq!(stats.chat_requests, 0);
    assert_eq!(stats.embedding_requests, 0);
}

#[tokio::test]
async fn azure_forms_check_version_and_key() {
    let upstream = MockUpstream::start().await.unwrap();

    let responses = azure_url(&upstream, "/openai/responses");
    let answer: Value = post(&responses, &json!({"model": "gpt-4.1-mini", "input": "hi"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["model"], "gpt-4.1-mini");
    assert_eq!(answer["usage"]["input_tokens"], prompt_tokens(2));

    let images = azure_url(&upstream, "/openai/deployments/img/images/generations");
    let answer: Value = post(&images, &json!({"prompt": "x", "n": 2}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 2);

    let speech = azure_url(&upstream, "/openai/deployments/tts/audio/speech");
    let response = post(&speech, &json!({"input": "hi", "voice": "alloy"})).await;
    assert_eq!(response.headers()["content-type"], "audio/mpeg");
    assert_eq!(
        response.bytes().await.unwrap().as_ref(),
        expected_speech("hi")
    );

    let transcriptions = azure_url(&upstream, "/openai/deployments/stt/audio/transcriptions");
    let (content_type, body) = form(&[], &[("file", "a.mp3", b"abc")]);
    let response = post_form(&transcriptions, &content_type, body).await;
    assert_eq!(response.status(), 200);
    let recorded = upstream.requests();
    assert_eq!(
        recorded[3].path,
        "/openai/deployments/stt/audio/transcriptions"
    );
    assert_eq!(
        recorded[3].query.as_deref(),
        Some("api-version=2025-03-01-preview")
    );

    // No api-key: 401; no or a bad api-version: 400; all in OpenAI's shape.
    let no_key = reqwest::Client::new()
        .post(&images)
        .bearer_auth("sk")
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let no_version = format!(
        "{}/openai/deployments/tts/audio/speech",
        upstream.azure_base_url()
    );
    assert_eq!(
        post(&no_version, &json!({"input": "hi"})).await.status(),
        400
    );
    let bad_version = format!(
        "{}/openai/responses?api-version=latest",
        upstream.azure_base_url()
    );
    let refused = post(&bad_version, &json!({"input": "hi"})).await;
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let (content_type, body) = form(&[], &[("file", "a.mp3", b"abc")]);
    let no_key = reqwest::Client::new()
        .post(&transcriptions)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);

    // Azure serves the Responses API per resource, not per deployment.
    let per_deployment = azure_url(&upstream, "/openai/deployments/d/responses");
    assert_eq!(
        post(&per_deployment, &json!({"input": "hi"}))
            .await
            .status(),
        404
    );

    let stats = upstream.stats();
    assert_eq!(stats.passthrough_requests, 8);
    assert_eq!(stats.requests, 9);
}

#[tokio::test]
async fn other_methods_are_refused() {
    let upstream = MockUpstream::start().await.unwrap();
    for path in [
        "/responses",
        "/images/generations",
        "/audio/speech",
        "/audio/transcriptions",
    ] {
        let response = reqwest::Client::new()
            .get(url(&upstream, path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{path}");
    }
    assert!(upstream.requests().is_empty());
}
