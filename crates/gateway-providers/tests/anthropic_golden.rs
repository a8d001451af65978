//! Golden-file tests of the Anthropic <-> OpenAI translation, both directions.
//!
//! Every pair under `tests/golden/anthropic/` is an input and the translation expected of it,
//! written by hand from the two APIs' documentation rather than captured from the code, and
//! compared structurally (as JSON values, frame by frame for streams). Adding a case is adding
//! two files; each directory must hold at least the cases listed here, so a renamed or lost
//! directory fails instead of passing empty.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a panic in a test is a failed assertion"
)]

use bytes::Bytes;
use gateway_core::GatewayError;
use gateway_core::openai::{ChatCompletionRequest, CompletionSummary};
use gateway_core::provider::{StreamEvent, StreamEventKind};
use gateway_providers::anthropic::{
    AnthropicToOpenAi, OpenAiToAnthropic, error_response, from_anthropic_request,
    from_openai_response, to_anthropic_request, to_openai_response,
};
use http::StatusCode;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The upstream model outbound requests are sent to.
const UPSTREAM_MODEL: &str = "claude-sonnet-4-5";
/// The `created` time outbound translations report.
const CREATED: i64 = 1_700_000_000;
/// What inbound streams are told: the model the client asked for and the prompt estimate.
const INBOUND_MODEL: &str = "claude-sonnet-4-5";
const INBOUND_ESTIMATE: u64 = 20;

fn golden_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/anthropic")
        .join(sub)
}

/// The `(case, input, expected)` files of a directory: every `*{input_suffix}` file with its
/// `*{expected_suffix}` sibling, sorted by case name.
fn cases(sub: &str, input_suffix: &str, expected_suffix: &str) -> Vec<(String, PathBuf, PathBuf)> {
    let dir = golden_dir(sub);
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_owned();
            let case = name.strip_suffix(input_suffix)?.to_owned();
            let expected = dir.join(format!("{case}{expected_suffix}"));
            assert!(
                expected.exists(),
                "{} has no {}",
                path.display(),
                expected.display()
            );
            Some((case, path, expected))
        })
        .collect();
    found.sort();
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read(path)).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap()
}

/// Collects mismatches so one run shows every broken case, then fails if there was any.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn check(&mut self, case: &str, actual: &Value, expected: &Value) {
        if actual != expected {
            self.0.push(format!(
                "--- {case}\nexpected:\n{}\nactual:\n{}",
                pretty(expected),
                pretty(actual)
            ));
        }
    }

    fn finish(self, checked: &[String], required: &[&str]) {
        for case in required {
            assert!(
                checked.iter().any(|name| name == case),
                "golden case `{case}` is missing; found {checked:?}"
            );
        }
        assert!(self.0.is_empty(), "{}", self.0.join("\n\n"));
    }
}

/// One SSE frame of a golden file: its `event:` name (empty when absent) and its data, as
/// JSON, or as a string for `[DONE]`.
fn parse_sse(text: &str) -> Vec<(String, Value)> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|block| {
            let mut event = String::new();
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    name.trim().clone_into(&mut event);
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            if data.is_empty() {
                return None;
            }
            let data = data.join("\n");
            let value = if data == "[DONE]" {
                Value::String(data)
            } else {
                serde_json::from_str(&data).unwrap_or_else(|err| panic!("{data}: {err}"))
            };
            Some((event, value))
        })
        .collect()
}

fn frames_json(frames: &[(String, Value)]) -> Value {
    Value::Array(
        frames
            .iter()
            .map(|(event, data)| json!({ "event": event, "data": data }))
            .collect(),
    )
}

#[test]
fn outbound_requests() {
    let mut mismatches = Mismatches::default();
    let mut checked = Vec::new();
    for (case, input, expected) in cases("outbound/requests", ".openai.json", ".anthropic.json") {
        let request = ChatCompletionRequest::from_json(read(&input).as_bytes()).unwrap();
        let actual = to_anthropic_request(&request, UPSTREAM_MODEL)
            .unwrap_or_else(|err| panic!("{case}: {err:?}"));
        mismatches.check(&case, &actual, &read_json(&expected));
        checked.push(case);
    }
    mismatches.finish(
        &checked,
        &[
            "text_request",
            "system_multiturn_request",
            "image_request",
            "tools_request",
            "stop_request",
            "stop_string_request",
            "prompt_cache_request",
        ],
    );
}

#[test]
fn outbound_responses() {
    let mut mismatches = Mismatches::default();
    let mut checked = Vec::new();
    for (case, input, expected) in cases("outbound/responses", ".anthropic.json", ".openai.json") {
        let translated = to_openai_response(read(&input).as_bytes(), CREATED)
            .unwrap_or_else(|err| panic!("{case}: {err:?}"));
        let actual: Value = serde_json::from_slice(&translated.body).unwrap();
        mismatches.check(&case, &actual, &read_json(&expected));
        // What the gateway records must be what the client is told.
        assert_eq!(
            serde_json::to_value(translated.usage.unwrap()).unwrap(),
            actual["usage"],
            "{case}"
        );
        assert_eq!(
            translated.response_id.as_deref(),
            actual["id"].as_str(),
            "{case}"
        );
        checked.push(case);
    }
    mismatches.finish(
        &checked,
        &[
            "text_response",
            "tool_use_response",
            "cache_usage_response",
            "refusal_response",
            "thinking_response",
        ],
    );
}

/// Runs an Anthropic SSE file through [`AnthropicToOpenAi`]; an error ends the output with an
/// `error` frame holding its status and OpenAI body.
fn translate_outbound_stream(case: &str, input: &str) -> Vec<(String, Value)> {
    let mut translator = AnthropicToOpenAi::new(CREATED);
    let mut out = Vec::new();
    for (event, data) in parse_sse(input) {
        match translator.push(&event, &data.to_string()) {
            Ok(events) => {
                for event in events {
                    out.push((String::new(), check_openai_event(case, &event)));
                }
            }
            Err(err) => {
                let body: Value = serde_json::from_slice(&err.to_json()).unwrap();
                out.push((
                    "error".into(),
                    json!({ "status": err.status().as_u16(), "body": body }),
                ));
                break;
            }
        }
    }
    out
}

/// The event's data, after checking its metadata agrees with it.
fn check_openai_event(case: &str, event: &StreamEvent) -> Value {
    if event.kind == StreamEventKind::Done {
        assert_eq!(&event.data[..], b"[DONE]", "{case}");
        return Value::String("[DONE]".into());
    }
    let data: Value = serde_json::from_slice(&event.data).unwrap();
    assert_eq!(event.response_id.as_deref(), data["id"].as_str(), "{case}");
    let usage_only = data["choices"] == json!([]);
    assert_eq!(
        event.kind,
        if usage_only {
            StreamEventKind::UsageOnly
        } else {
            StreamEventKind::Delta
        },
        "{case}: {data}"
    );
    if usage_only {
        assert_eq!(
            serde_json::to_value(event.usage.unwrap()).unwrap(),
            data["usage"],
            "{case}"
        );
    }
    data
}

#[test]
fn outbound_streams() {
    let mut mismatches = Mismatches::default();
    let mut checked = Vec::new();
    for (case, input, expected) in cases("outbound/streams", ".anthropic.sse", ".openai.sse") {
        let actual = translate_outbound_stream(&case, &read(&input));
        let expected = parse_sse(&read(&expected));
        mismatches.check(&case, &frames_json(&actual), &frames_json(&expected));
        checked.push(case);
    }
    mismatches.finish(
        &checked,
        &[
            "text_stream",
            "tool_stream",
            "error_stream",
            "thinking_stream",
        ],
    );
}

#[test]
fn outbound_stream_survives_any_event_split() {
    // The same stream fed with its `event:` names dropped: the `type` in each data is enough.
    let input = read(&golden_dir("outbound/streams").join("tool_stream.anthropic.sse"));
    let expected = parse_sse(&read(
        &golden_dir("outbound/streams").join("tool_stream.openai.sse"),
    ));
    let mut translator = AnthropicToOpenAi::new(CREATED);
    let mut actual = Vec::new();
    for (_, data) in parse_sse(&input) {
        for event in translator.push("", &data.to_string()).unwrap() {
            actual.push((String::new(), check_openai_event("nameless", &event)));
        }
    }
    assert_eq!(frames_json(&actual), frames_json(&expected));
}

#[test]
fn inbound_requests() {
    let mut mismatches = Mismatches::default();
    let mut checked = Vec::new();
    for (case, input, expected) in cases("inbound/requests", ".anthropic.json", ".openai.json") {
        let request = from_anthropic_request(read(&input).as_bytes())
            .unwrap_or_else(|err| panic!("{case}: {err:?}"));
        let actual = serde_json::to_value(&request).unwrap();
        mismatches.check(&case, &actual, &read_json(&expected));
        // The canonical form must also be one the gateway itself accepts from OpenAI clients.
        ChatCompletionRequest::from_json(actual.to_string().as_bytes())
            .unwrap_or_else(|err| panic!("{case}: {err:?}"));
        checked.push(case);
    }
    mismatches.finish(
        &checked,
        &[
            "text_request",
            "system_multiturn_request",
            "image_request",
            "tools_request",
            "stream_request",
        ],
    );
}

#[test]
fn inbound_requests_round_trip_to_anthropic() {
    // An Anthropic client routed to an Anthropic model must reach it unchanged.
    let mut mismatches = Mismatches::default();
    let mut checked = Vec::new();
    for (case, input, _) in cases("inbound/requests", ".anthropic.json", ".openai.json") {
        let original = read_json(&input);
        let canonical = from_anthropic_request(read(&input).as_bytes()).unwrap();
        let model = original["model"].as_str().unwrap();
        let back = to_anthropic_request(&canonical, model).unwrap();
        mismatches.check(&case, &back, &original);
        checked.push(case);
    }
    mismatches.finish(&checked, &["tools_request", "system_multiturn_request"]);
}

#[test]
fn inbound_responses() {
    let mut mismatches = Mismatches::default();
    let mut checked = Vec::new();
    for (case, input, expected) in cases("inbound/responses", ".openai.json", ".anthropic.json") {
        let body = from_openai_response(read(&input).as_bytes())
            .unwrap_or_else(|err| panic!("{case}: {err:?}"));
        let actual: Value = serde_json::from_slice(&body).unwrap();
        mismatches.check(&case, &actual, &read_json(&expected));
        checked.push(case);
    }
    mismatches.finish(
        &checked,
        &[
            "text_response",
            "tool_calls_response",
            "cache_usage_response",
            "refusal_response",
        ],
    );
}

/// An OpenAI SSE file as the events the OpenAI provider yields: classified and with usage
/// read as `sse.rs` does. An `upstream_error` frame (`{"status","body"}`) stands for a vendor
/// error arriving mid-stream.
fn openai_events(input: &str) -> Vec<Result<StreamEvent, GatewayError>> {
    parse_sse(input)
        .into_iter()
        .map(|(event, data)| {
            if event == "upstream_error" {
                return Err(GatewayError::UpstreamStatus {
                    retry_after: None,
                    provider: "openai".into(),
                    status: StatusCode::from_u16(
                        u16::try_from(data["status"].as_u64().unwrap()).unwrap(),
                    )
                    .unwrap(),
                    body: Bytes::from(data["body"].to_string()),
                });
            }
            if data == "[DONE]" {
                return Ok(StreamEvent::done());
            }
            let raw = data.to_string();
            let summary = CompletionSummary::parse(raw.as_bytes()).unwrap();
            Ok(StreamEvent {
                kind: if summary.is_usage_only_chunk() {
                    StreamEventKind::UsageOnly
                } else {
                    StreamEventKind::Delta
                },
                usage: summary.usage,
                response_id: summary.id,
                data: Bytes::from(raw),
            })
        })
        .collect()
}

fn translate_inbound_stream(input: &str) -> Vec<(String, Value)> {
    let mut translator = OpenAiToAnthropic::new(INBOUND_MODEL, INBOUND_ESTIMATE);
    let mut frames = Vec::new();
    for event in openai_events(input) {
        let bytes = match event {
            Ok(event) => translator.push(&event).unwrap(),
            Err(err) => vec![translator.error_frame(&err)],
        };
        for frame in bytes {
            let text = std::str::from_utf8(&frame).unwrap();
            // Each item must be exactly one complete frame, ready to write to the client.
            assert!(text.ends_with("\n\n"), "{text:?}");
            let mut parsed = parse_sse(text);
            assert_eq!(parsed.len(), 1, "{text:?}");
            frames.append(&mut parsed);
        }
    }
    frames
}

#[test]
fn inbound_streams() {
    let mut mismatches = Mismatches::default();
    let mut checked = Vec::new();
    for (case, input, expected) in cases("inbound/streams", ".openai.sse", ".anthropic.sse") {
        let actual = translate_inbound_stream(&read(&input));
        let expected = parse_sse(&read(&expected));
        mismatches.check(&case, &frames_json(&actual), &frames_json(&expected));
        checked.push(case);
    }
    mismatches.finish(&checked, &["text_stream", "tool_stream", "error_stream"]);
}

#[test]
fn refusals() {
    let mut mismatches = Mismatches::default();
    let mut checked = Vec::new();
    let outbound = cases("refusals", ".openai.json", ".error.json")
        .into_iter()
        .map(|(case, input, expected)| {
            let request = ChatCompletionRequest::from_json(read(&input).as_bytes()).unwrap();
            (
                case,
                to_anthropic_request(&request, UPSTREAM_MODEL).map(|_| ()),
                expected,
            )
        });
    let inbound = cases("refusals", ".anthropic.json", ".error.json")
        .into_iter()
        .map(|(case, input, expected)| {
            (
                case,
                from_anthropic_request(read(&input).as_bytes()).map(|_| ()),
                expected,
            )
        });
    for (case, result, expected) in outbound.chain(inbound).collect::<Vec<_>>() {
        let expected = read_json(&expected);
        let err = result
            .err()
            .unwrap_or_else(|| panic!("{case}: translated, but must be refused"));
        let GatewayError::InvalidRequest { message, param } = &err else {
            panic!("{case}: {err:?} is not an invalid request");
        };
        let actual = json!({
            "status": err.status().as_u16(),
            "param": param,
            "message_contains": expected["message_contains"],
        });
        let needle = expected["message_contains"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{case}: `{message}` lacks `{needle}`"
        );
        mismatches.check(&case, &actual, &expected);
        // Anthropic SDK clients get the same refusal in their own error shape.
        let (status, body) = error_response(&err);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{case}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["type"], "error", "{case}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{case}");
        assert_eq!(body["error"]["message"], message.as_str(), "{case}");
        checked.push(case);
    }
    mismatches.finish(
        &checked,
        &[
            "response_format",
            "n_choices",
            "logprobs",
            "server_tool",
            "missing_max_tokens",
        ],
    );
}

#[test]
fn golden_parser_sees_every_frame() {
    // The checks above are only as good as this parser: it must not drop or merge frames.
    let frames = parse_sse("event: a\ndata: {\"x\":1}\n\n: comment\n\ndata: [DONE]\r\n\r\n");
    assert_eq!(
        frames,
        vec![
            ("a".to_owned(), json!({"x": 1})),
            (String::new(), Value::String("[DONE]".into()))
        ]
    );
}
