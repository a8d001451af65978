//! The vendor's OpenAI stream -> Anthropic SSE frames, for Anthropic SDK clients.
//!
//! Anthropic streams one content block at a time (`content_block_start`, deltas,
//! `content_block_stop`); OpenAI streams deltas that may switch between text and tool calls,
//! so a block is closed whenever the kind of delta changes. The closing `message_delta` is
//! held until the vendor's usage (or `[DONE]`) arrives: OpenAI vendors report the prompt's
//! tokens only at the end, and Anthropic SDKs take the final `message_delta` usage as the
//! message's totals.

use super::UPSTREAM;
use crate::anthropic::error::anthropic_error_json;
use crate::anthropic::{anthropic_stop_reason, anthropic_usage_json};
use bytes::Bytes;
use gateway_core::GatewayError;
use gateway_core::openai::Usage;
use gateway_core::provider::{StreamEvent, StreamEventKind};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashSet;

/// Translates one OpenAI stream into Anthropic SSE frames.
#[derive(Debug)]
pub struct OpenAiToAnthropic {
    model: String,
    estimated_input_tokens: u64,
    started: bool,
    finished: bool,
    message_id: String,
    open: Option<OpenBlock>,
    next_block: usize,
    /// OpenAI tool-call indexes already given a block: their arguments must not resume after
    /// another block started, as Anthropic blocks cannot be reopened.
    seen_tools: HashSet<usize>,
    stop_reason: Option<&'static str>,
    usage: Option<Usage>,
}

#[derive(Debug, Clone, Copy)]
enum OpenBlock {
    Text { block: usize },
    Tool { block: usize, tool: usize },
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

impl OpenAiToAnthropic {
    /// `model` is reported in `message_start`; `estimated_input_tokens` stands in for the
    /// prompt's tokens until the vendor reports them.
    pub fn new(model: &str, estimated_input_tokens: u64) -> Self {
        Self {
            model: model.to_owned(),
            estimated_input_tokens,
            started: false,
            finished: false,
            message_id: String::new(),
            open: None,
            next_block: 0,
            seen_tools: HashSet::new(),
            stop_reason: None,
            usage: None,
        }
    }

    /// One OpenAI stream event -> zero or more complete Anthropic SSE frames.
    pub fn push(&mut self, event: &StreamEvent) -> Result<Vec<Bytes>, GatewayError> {
        let mut frames = Vec::new();
        if self.finished {
            return Ok(frames);
        }
        if event.kind == StreamEventKind::Done {
            self.start(event.response_id.as_deref(), &mut frames);
            self.finish(&mut frames);
            return Ok(frames);
        }
        let chunk: Chunk =
            serde_json::from_slice(&event.data).map_err(|err| GatewayError::UpstreamProtocol {
                provider: UPSTREAM.into(),
                reason: format!("a stream chunk is not valid OpenAI JSON: {err}"),
            })?;
        let id = event.response_id.as_deref().or(chunk.id.as_deref());
        self.start(id, &mut frames);
        if let Some(usage) = event.usage.or(chunk.usage) {
            self.usage = Some(usage);
        }
        let choices = chunk.choices.unwrap_or_default();
        let usage_only = event.kind == StreamEventKind::UsageOnly
            || (choices.is_empty() && self.usage.is_some());
        for choice in choices.into_iter().filter(|choice| choice.index == 0) {
            if let Some(delta) = choice.delta {
                self.delta(delta, &mut frames)?;
            }
            if let Some(finish_reason) = choice.finish_reason {
                self.close(&mut frames);
                self.stop_reason = Some(anthropic_stop_reason(&finish_reason));
            }
        }
        if usage_only && self.stop_reason.is_some() {
            self.finish(&mut frames);
        }
        Ok(frames)
    }

    /// An error in the middle of the stream, as an Anthropic `error` event.
    pub fn error_frame(&self, error: &GatewayError) -> Bytes {
        frame("error", &anthropic_error_json(error))
    }

    fn start(&mut self, id: Option<&str>, frames: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        // Every OpenAI vendor sends an id; the fallback only keeps the SDK's required field.
        self.message_id = id.unwrap_or("msg_gateway").to_owned();
        frames.push(frame(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": self.message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {
                        "input_tokens": self.estimated_input_tokens,
                        "output_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "cache_creation_input_tokens": 0,
                    },
                },
            }),
        ));
    }

    fn delta(&mut self, delta: Delta, frames: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        // A refusal is what the model said instead of an answer: shown as text.
        for text in [delta.content, delta.refusal].into_iter().flatten() {
            if !text.is_empty() {
                self.text(&text, frames);
            }
        }
        for call in delta.tool_calls.unwrap_or_default() {
            self.tool_call(call, frames)?;
        }
        Ok(())
    }

    fn text(&mut self, text: &str, frames: &mut Vec<Bytes>) {
        let block = match self.open {
            Some(OpenBlock::Text { block }) => block,
            _ => {
                self.close(frames);
                let block = self.open_block(json!({ "type": "text", "text": "" }), frames);
                self.open = Some(OpenBlock::Text { block });
                block
            }
        };
        frames.push(block_delta(
            block,
            json!({ "type": "text_delta", "text": text }),
        ));
    }

    fn tool_call(
        &mut self,
        call: ToolCallDelta,
        frames: &mut Vec<Bytes>,
    ) -> Result<(), GatewayError> {
        let (name, arguments) = match call.function {
            Some(function) => (function.name, function.arguments),
            None => (None, None),
        };
        let current = match self.open {
            Some(OpenBlock::Tool { block, tool }) => Some((block, tool)),
            _ => None,
        };
        // Vendors that leave out `index` send one call at a time: a new id starts the next.
        let tool = call.index.unwrap_or(match (current, &call.id) {
            (Some((_, tool)), None) => tool,
            (Some((_, tool)), Some(_)) => tool + 1,
            (None, _) => self.seen_tools.len(),
        });
        let block = match current {
            Some((block, open_tool)) if open_tool == tool => block,
            _ => {
                if !self.seen_tools.insert(tool) {
                    return Err(GatewayError::UpstreamProtocol {
                        provider: UPSTREAM.into(),
                        reason: format!(
                            "tool call {tool} resumed after another block started; Anthropic blocks cannot interleave"
                        ),
                    });
                }
                self.close(frames);
                let id = call
                    .id
                    .unwrap_or_else(|| format!("toolu_{}_{tool}", self.message_id));
                let block = self.open_block(
                    json!({ "type": "tool_use", "id": id, "name": name.unwrap_or_default(), "input": {} }),
                    frames,
                );
                self.open = Some(OpenBlock::Tool { block, tool });
                block
            }
        };
        if let Some(arguments) = arguments.filter(|arguments| !arguments.is_empty()) {
            frames.push(block_delta(
                block,
                json!({ "type": "input_json_delta", "partial_json": arguments }),
            ));
        }
        Ok(())
    }

    fn open_block(&mut self, content_block: Value, frames: &mut Vec<Bytes>) -> usize {
        let block = self.next_block;
        self.next_block += 1;
        frames.push(frame(
            "content_block_start",
            &json!({ "type": "content_block_start", "index": block, "content_block": content_block }),
        ));
        block
    }

    fn close(&mut self, frames: &mut Vec<Bytes>) {
        if let Some(open) = self.open.take() {
            let (OpenBlock::Text { block } | OpenBlock::Tool { block, .. }) = open;
            frames.push(frame(
                "content_block_stop",
                &json!({ "type": "content_block_stop", "index": block }),
            ));
        }
    }

    fn finish(&mut self, frames: &mut Vec<Bytes>) {
        self.close(frames);
        self.finished = true;
        let usage = self.usage.as_ref().map_or_else(
            || {
                json!({
                    "input_tokens": self.estimated_input_tokens,
                    "output_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "cache_creation_input_tokens": 0,
                })
            },
            anthropic_usage_json,
        );
        frames.push(frame(
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": { "stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null },
                "usage": usage,
            }),
        ));
        frames.push(frame("message_stop", &json!({ "type": "message_stop" })));
    }
}

fn block_delta(block: usize, delta: Value) -> Bytes {
    frame(
        "content_block_delta",
        &json!({ "type": "content_block_delta", "index": block, "delta": delta }),
    )
}

/// One SSE frame. JSON never contains a raw newline, so the data fits on one line.
fn frame(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: Value) -> StreamEvent {
        let usage = data
            .get("usage")
            .filter(|usage| !usage.is_null())
            .map(|usage| serde_json::from_value::<Usage>(usage.clone()).unwrap());
        let kind = if data["choices"] == json!([]) {
            StreamEventKind::UsageOnly
        } else {
            StreamEventKind::Delta
        };
        StreamEvent {
            data: Bytes::from(data.to_string()),
            kind,
            usage,
            response_id: data["id"].as_str().map(str::to_owned),
        }
    }

    fn parse(frames: &[Bytes]) -> Vec<(String, Value)> {
        frames
            .iter()
            .map(|frame| {
                let text = std::str::from_utf8(frame).unwrap();
                assert!(text.ends_with("\n\n"), "{text:?}");
                let (event, data) = text.trim_end().split_once('\n').unwrap();
                (
                    event.strip_prefix("event: ").unwrap().to_owned(),
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(),
                )
            })
            .collect()
    }

    fn names(frames: &[Bytes]) -> Vec<String> {
        parse(frames).into_iter().map(|(name, _)| name).collect()
    }

    #[test]
    fn text_stream_holds_the_message_delta_for_the_usage() {
        let mut translator = OpenAiToAnthropic::new("claude-alias", 42);
        let first = translator
            .push(&event(json!({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})))
            .unwrap();
        let first = parse(&first);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, "message_start");
        assert_eq!(first[0].1["message"]["id"], "c1");
        assert_eq!(first[0].1["message"]["model"], "claude-alias");
        assert_eq!(first[0].1["message"]["usage"]["input_tokens"], 42);

        let text = translator
            .push(&event(
                json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
            ))
            .unwrap();
        assert_eq!(names(&text), ["content_block_start", "content_block_delta"]);
        let more = translator
            .push(&event(
                json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "!"}}]}),
            ))
            .unwrap();
        assert_eq!(
            parse(&more)[0].1["delta"],
            json!({"type": "text_delta", "text": "!"})
        );
        let finish = translator
            .push(&event(json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})))
            .unwrap();
        assert_eq!(names(&finish), ["content_block_stop"]);
        let usage = translator
            .push(&event(json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 2, "total_tokens": 52,
                "prompt_tokens_details": {"cached_tokens": 30}}})))
            .unwrap();
        let usage = parse(&usage);
        assert_eq!(usage[0].0, "message_delta");
        assert_eq!(usage[0].1["delta"]["stop_reason"], "max_tokens");
        assert_eq!(
            usage[0].1["usage"],
            json!({"input_tokens": 20, "output_tokens": 2, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 0})
        );
        assert_eq!(usage[1].0, "message_stop");
        assert!(translator.push(&StreamEvent::done()).unwrap().is_empty());
    }

    #[test]
    fn done_without_usage_still_ends_the_message() {
        let mut translator = OpenAiToAnthropic::new("m", 7);
        translator
            .push(&event(json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]})))
            .unwrap();
        let end = parse(&translator.push(&StreamEvent::done()).unwrap());
        assert_eq!(end[0].0, "message_delta");
        assert_eq!(end[0].1["delta"]["stop_reason"], "end_turn");
        assert_eq!(end[0].1["usage"]["input_tokens"], 7);
        assert_eq!(end[1].0, "message_stop");
    }

    #[test]
    fn tool_calls_become_tool_use_blocks() {
        let mut translator = OpenAiToAnthropic::new("m", 1);
        let mut all = Vec::new();
        for chunk in [
            json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "Let me check."}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\":"}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ] {
            all.extend(translator.push(&event(chunk)).unwrap());
        }
        all.extend(translator.push(&StreamEvent::done()).unwrap());
        let frames = parse(&all);
        let summary: Vec<(String, Value)> = frames
            .iter()
            .map(|(name, data)| {
                (
                    name.clone(),
                    data.get("index").cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("message_start".into(), Value::Null),
                ("content_block_start".into(), json!(0)),
                ("content_block_delta".into(), json!(0)),
                ("content_block_stop".into(), json!(0)),
                ("content_block_start".into(), json!(1)),
                ("content_block_delta".into(), json!(1)),
                ("content_block_delta".into(), json!(1)),
                ("content_block_stop".into(), json!(1)),
                ("content_block_start".into(), json!(2)),
                ("content_block_delta".into(), json!(2)),
                ("content_block_stop".into(), json!(2)),
                ("message_delta".into(), Value::Null),
                ("message_stop".into(), Value::Null),
            ]
        );
        assert_eq!(
            frames[4].1["content_block"],
            json!({"type": "tool_use", "id": "call_a", "name": "f", "input": {}})
        );
        assert_eq!(
            frames[6].1["delta"],
            json!({"type": "input_json_delta", "partial_json": "1}"})
        );
        assert_eq!(frames[11].1["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn interleaved_tool_calls_are_refused() {
        let mut translator = OpenAiToAnthropic::new("m", 1);
        for chunk in [
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f"}}]}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g"}}]}}]}),
        ] {
            translator.push(&event(chunk)).unwrap();
        }
        let err = translator
            .push(&event(json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]})))
            .unwrap_err();
        assert!(
            matches!(err, GatewayError::UpstreamProtocol { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn error_frame_is_an_anthropic_error_event() {
        let translator = OpenAiToAnthropic::new("m", 1);
        let err = GatewayError::UpstreamUnavailable {
            provider: "p".into(),
            reason: "reset".into(),
        };
        let frames = parse(&[translator.error_frame(&err)]);
        assert_eq!(frames[0].0, "error");
        assert_eq!(frames[0].1["type"], "error");
        assert_eq!(frames[0].1["error"]["type"], "api_error");
        assert_eq!(
            frames[0].1["error"]["message"],
            "Provider `p` is unreachable: reset"
        );
    }

    #[test]
    fn garbage_chunk_is_a_protocol_error() {
        let mut translator = OpenAiToAnthropic::new("m", 1);
        let bad = StreamEvent {
            data: Bytes::from_static(b"{oops"),
            kind: StreamEventKind::Delta,
            usage: None,
            response_id: None,
        };
        assert!(matches!(
            translator.push(&bad),
            Err(GatewayError::UpstreamProtocol { .. })
        ));
    }
}
