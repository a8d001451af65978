//! Golden tests for the Gemini translation: each file under `tests/golden/gemini/` holds an
//! input and the exact expected output, compared as JSON values, so key order and whitespace
//! do not matter and every field and value does. The expected outputs are written by hand
//! from the two vendors' documented formats, not recorded from this code.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a failed unwrap or panic is how a test reports a mismatch"
)]

use gateway_core::GatewayError;
use gateway_core::openai::{ChatCompletionRequest, Usage};
use gateway_core::provider::{StreamEvent, StreamEventKind};
use gateway_providers::gemini::{
    EmbeddingEncoding, GeminiToOpenAi, error_from_gemini, to_gemini_embeddings_request,
    to_gemini_request, to_openai_embeddings_response_encoded, to_openai_response,
};
use http::StatusCode;
use serde_json::Value;
use std::path::PathBuf;

macro_rules! golden {
    ($($test:ident => $file:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check($file);
            }
        )*
        const FILES: &[&str] = &[$($file),*];
    };
}

golden! {
    request_plain => "request_plain.json",
    request_system_multiturn => "request_system_multiturn.json",
    request_images => "request_images.json",
    request_tools_round_trip => "request_tools_round_trip.json",
    request_json_schema => "request_json_schema.json",
    request_generation_config => "request_generation_config.json",
    request_stop_string => "request_stop_string.json",
    response_text => "response_text.json",
    response_tool_calls => "response_tool_calls.json",
    response_usage_cached_thinking => "response_usage_cached_thinking.json",
    response_safety_finish => "response_safety_finish.json",
    response_prompt_blocked => "response_prompt_blocked.json",
    stream_text => "stream_text.json",
    stream_function_call => "stream_function_call.json",
    stream_safety_stop => "stream_safety_stop.json",
    embeddings_request => "embeddings_request.json",
    embeddings_response => "embeddings_response.json",
    embeddings_response_base64 => "embeddings_response_base64.json",
    refusals => "refusals.json",
    errors => "errors.json",
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gemini")
}

/// A golden file nobody checks would pass silently forever.
#[test]
fn every_golden_file_is_checked() {
    let mut on_disk: Vec<String> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = FILES.iter().map(|file| (*file).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap()
}

fn assert_json(actual: &Value, expected: &Value, what: &str) {
    assert!(
        actual == expected,
        "{what} differs\n--- actual\n{}\n--- expected\n{}",
        pretty(actual),
        pretty(expected)
    );
}

fn check(file: &str) {
    let text = std::fs::read_to_string(golden_dir().join(file)).unwrap();
    let golden: Value = serde_json::from_str(&text).unwrap();
    match golden["kind"].as_str().unwrap() {
        "request" => check_request(file, &golden),
        "response" => check_response(file, &golden),
        "response_error" => check_response_error(file, &golden),
        "stream" => check_stream(file, &golden),
        "embeddings_request" => check_embeddings_request(file, &golden),
        "embeddings_response" => check_embeddings_response(file, &golden),
        "refusals" => check_refusals(file, &golden),
        "errors" => check_errors(file, &golden),
        other => panic!("{file}: unknown golden kind `{other}`"),
    }
}

fn openai_request(value: &Value) -> ChatCompletionRequest {
    ChatCompletionRequest::from_json(value.to_string().as_bytes()).unwrap()
}

fn check_request(file: &str, golden: &Value) {
    let request = openai_request(&golden["openai"]);
    let actual = to_gemini_request(&request).unwrap_or_else(|err| panic!("{file}: {err}"));
    assert_json(&actual, &golden["gemini"], file);
}

fn usage_of(value: &Value) -> Usage {
    serde_json::from_value(value.clone()).unwrap()
}

fn check_response(file: &str, golden: &Value) {
    let body = golden["gemini"].to_string();
    let translated = to_openai_response(
        body.as_bytes(),
        golden["model"].as_str().unwrap(),
        golden["created"].as_i64().unwrap(),
    )
    .unwrap_or_else(|err| panic!("{file}: {err}"));
    let actual: Value = serde_json::from_slice(&translated.body).unwrap();
    assert_json(&actual, &golden["openai"], file);
    assert_eq!(
        translated.usage,
        Some(usage_of(&golden["usage"])),
        "{file}: usage"
    );
    assert_eq!(
        translated.response_id.as_deref(),
        golden["openai"]["id"].as_str(),
        "{file}: response id"
    );
}

fn check_response_error(file: &str, golden: &Value) {
    let body = golden["gemini"].to_string();
    let err = to_openai_response(body.as_bytes(), "m", 0).unwrap_err();
    assert_eq!(
        u64::from(err.status().as_u16()),
        golden["status"].as_u64().unwrap(),
        "{file}: {err}"
    );
    expect_invalid_request(file, &err, golden);
}

fn expect_invalid_request(what: &str, err: &GatewayError, golden: &Value) {
    let GatewayError::InvalidRequest { message, param } = err else {
        panic!("{what}: expected an invalid request, got {err:?}");
    };
    assert_eq!(
        param.as_deref(),
        golden["param"].as_str(),
        "{what}: {message}"
    );
    let needle = golden["message_contains"].as_str().unwrap();
    assert!(
        message.contains(needle),
        "{what}: `{message}` should contain `{needle}`"
    );
}

fn event_json(file: &str, event: &StreamEvent) -> Value {
    let kind = match event.kind {
        StreamEventKind::Delta => "delta",
        StreamEventKind::UsageOnly => "usage_only",
        StreamEventKind::Done => "done",
    };
    if event.kind == StreamEventKind::Done {
        assert_eq!(&event.data[..], b"[DONE]", "{file}");
        return serde_json::json!({ "kind": kind });
    }
    let data: Value = serde_json::from_slice(&event.data).unwrap();
    assert_eq!(
        event.response_id.as_deref(),
        data["id"].as_str(),
        "{file}: the event's response id is the chunk's"
    );
    if event.kind == StreamEventKind::UsageOnly {
        assert_eq!(event.usage, Some(usage_of(&data["usage"])), "{file}: usage");
    } else {
        assert_eq!(event.usage, None, "{file}: usage on a delta");
    }
    serde_json::json!({ "kind": kind, "data": data })
}

fn check_stream(file: &str, golden: &Value) {
    let mut stream = GeminiToOpenAi::new(
        golden["model"].as_str().unwrap(),
        golden["created"].as_i64().unwrap(),
    );
    let mut events = Vec::new();
    for payload in golden["payloads"].as_array().unwrap() {
        let events_now = stream
            .push(&payload.to_string())
            .unwrap_or_else(|err| panic!("{file}: {err}"));
        events.extend(events_now);
    }
    events.extend(stream.finish());
    let actual = Value::Array(events.iter().map(|e| event_json(file, e)).collect());
    assert_json(&actual, &golden["events"], file);
}

fn check_embeddings_request(file: &str, golden: &Value) {
    let actual = to_gemini_embeddings_request(
        &golden["openai"],
        golden["upstream_model"].as_str().unwrap(),
    )
    .unwrap_or_else(|err| panic!("{file}: {err}"));
    assert_json(&actual, &golden["gemini"], file);
}

fn check_embeddings_response(file: &str, golden: &Value) {
    let encoding = EmbeddingEncoding::from_request(
        &serde_json::json!({ "encoding_format": golden["encoding"] }),
    )
    .unwrap();
    let translated = to_openai_embeddings_response_encoded(
        golden["gemini"].to_string().as_bytes(),
        golden["model"].as_str().unwrap(),
        encoding,
    )
    .unwrap_or_else(|err| panic!("{file}: {err}"));
    let actual: Value = serde_json::from_slice(&translated.body).unwrap();
    assert_json(&actual, &golden["openai"], file);
}

fn check_refusals(file: &str, golden: &Value) {
    for case in golden["cases"].as_array().unwrap() {
        let name = format!("{file}: {}", case["name"].as_str().unwrap());
        let result = if case["embeddings"] == Value::Bool(true) {
            to_gemini_embeddings_request(&case["openai"], "gemini-embedding-001")
        } else {
            to_gemini_request(&openai_request(&case["openai"]))
        };
        match result {
            Ok(body) => panic!("{name}: accepted, sent\n{}", pretty(&body)),
            Err(err) => {
                assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{name}");
                expect_invalid_request(&name, &err, case);
            }
        }
    }
}

fn check_errors(file: &str, golden: &Value) {
    let provider = golden["provider"].as_str().unwrap();
    for (index, case) in golden["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("{file}: case {index}");
        let body = match &case["body"] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let status = u16::try_from(case["status"].as_u64().unwrap()).unwrap();
        let err = error_from_gemini(
            provider,
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
        );
        assert_eq!(
            u64::from(err.status().as_u16()),
            case["expected_status"].as_u64().unwrap(),
            "{what}"
        );
        // What the client receives: the gateway's one error-to-body mapping.
        let sent: Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_json(&sent, &case["expected_body"], &what);
    }
}
