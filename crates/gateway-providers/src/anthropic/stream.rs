//! Anthropic SSE events -> OpenAI `chat.completion.chunk` events, one event at a time so the
//! stream is forwarded as it arrives.
//!
//! Anthropic numbers content blocks; OpenAI numbers tool calls. The translator remembers which
//! block is which, so text deltas become `content`, thinking deltas `reasoning_content`, and
//! `input_json_delta`s the `arguments` of the right tool call. The usage Anthropic splits
//! between `message_start` (input) and `message_delta` (output) is sent once, combined, in the
//! usage-only chunk before `[DONE]`.

use super::error::stream_error;
use super::response::{Block, arguments};
use super::{AnthropicUsage, PROVIDER, encode, openai_finish_reason};
use gateway_core::GatewayError;
use gateway_core::openai::Usage;
use gateway_core::provider::{StreamEvent, StreamEventKind};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;

/// Translates one Anthropic stream into OpenAI events.
#[derive(Debug)]
pub struct AnthropicToOpenAi {
    provider: String,
    created: i64,
    id: String,
    model: String,
    usage: AnthropicUsage,
    /// What each open Anthropic content block turns into.
    blocks: HashMap<usize, BlockKind>,
    next_tool_index: usize,
    done: bool,
}

#[derive(Debug, Clone, Copy)]
enum BlockKind {
    Text,
    Thinking,
    Tool { index: usize },
    Ignored,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: Block,
    },
    ContentBlockDelta {
        index: usize,
        delta: BlockDelta,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        #[serde(default)]
        usage: AnthropicUsage,
    },
    MessageStop,
    Error {
        error: ErrorDetail,
    },
    // `ping`, `content_block_stop` and event types added later carry nothing to translate;
    // Anthropic documents that clients should ignore unknown events.
    #[serde(other)]
    Ignored,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    // Signatures and citations have no OpenAI form.
    #[serde(other)]
    Ignored,
}

#[derive(Default, Deserialize)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    r#type: String,
    #[serde(default)]
    message: String,
}

impl AnthropicToOpenAi {
    /// `created` is the Unix time every chunk reports.
    pub fn new(created: i64) -> Self {
        Self {
            provider: PROVIDER.into(),
            created,
            id: String::new(),
            model: String::new(),
            usage: AnthropicUsage::default(),
            blocks: HashMap::new(),
            next_tool_index: 0,
            done: false,
        }
    }

    /// Names the configured provider in the errors this stream reports.
    #[must_use]
    pub fn with_provider(mut self, provider: &str) -> Self {
        provider.clone_into(&mut self.provider);
        self
    }

    /// The combined usage so far (input from `message_start`, output from `message_delta`).
    pub fn usage(&self) -> Usage {
        self.usage.to_openai()
    }

    /// One Anthropic SSE event (its `event:` name and `data:` JSON) -> zero or more OpenAI
    /// events. A vendor `error` event is returned as the error.
    pub fn push(&mut self, event: &str, data: &str) -> Result<Vec<StreamEvent>, GatewayError> {
        if self.done || data.trim().is_empty() {
            return Ok(Vec::new());
        }
        let mut value: Value =
            serde_json::from_str(data).map_err(|err| self.protocol(event, &err))?;
        // The `type` in the data is what Anthropic documents; the SSE event name is a copy of
        // it, used only when a proxy dropped the field.
        if let Some(object) = value.as_object_mut()
            && !object.contains_key("type")
        {
            object.insert("type".into(), event.into());
        }
        let parsed: Event =
            serde_json::from_value(value).map_err(|err| self.protocol(event, &err))?;
        let mut out = Vec::new();
        match parsed {
            Event::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                self.usage.merge(&message.usage);
                out.push(self.delta(json!({ "role": "assistant", "content": "" }), None)?);
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => {
                let kind = match content_block {
                    Block::Text { text } => {
                        if !text.is_empty() {
                            out.push(self.delta(json!({ "content": text }), None)?);
                        }
                        BlockKind::Text
                    }
                    Block::Thinking { thinking } => {
                        if !thinking.is_empty() {
                            out.push(self.delta(json!({ "reasoning_content": thinking }), None)?);
                        }
                        BlockKind::Thinking
                    }
                    Block::ToolUse { id, name, input } => {
                        let tool_index = self.next_tool_index;
                        self.next_tool_index += 1;
                        // Anthropic streams the input as `input_json_delta`s and starts with
                        // `{}`; a non-empty start input would otherwise be lost.
                        let initial = match &input {
                            Value::Object(map) if map.is_empty() => String::new(),
                            Value::Null => String::new(),
                            other => arguments(other),
                        };
                        out.push(self.delta(
                            json!({ "tool_calls": [{
                                "index": tool_index,
                                "id": id,
                                "type": "function",
                                "function": { "name": name, "arguments": initial },
                            }] }),
                            None,
                        )?);
                        BlockKind::Tool { index: tool_index }
                    }
                    Block::Other => BlockKind::Ignored,
                };
                self.blocks.insert(index, kind);
            }
            Event::ContentBlockDelta { index, delta } => {
                let kind = self.blocks.get(&index).copied().ok_or_else(|| {
                    self.protocol_reason(format!(
                        "a delta for content block {index}, which was never started"
                    ))
                })?;
                let delta = match (kind, delta) {
                    (BlockKind::Text, BlockDelta::TextDelta { text }) => json!({ "content": text }),
                    (BlockKind::Thinking, BlockDelta::ThinkingDelta { thinking }) => {
                        json!({ "reasoning_content": thinking })
                    }
                    (BlockKind::Tool { index }, BlockDelta::InputJsonDelta { partial_json })
                        if !partial_json.is_empty() =>
                    {
                        json!({ "tool_calls": [{ "index": index, "function": { "arguments": partial_json } }] })
                    }
                    _ => return Ok(out),
                };
                out.push(self.delta(delta, None)?);
            }
            Event::MessageDelta { delta, usage } => {
                self.usage.merge(&usage);
                if let Some(stop_reason) = delta.stop_reason {
                    out.push(self.delta(json!({}), Some(openai_finish_reason(&stop_reason)))?);
                }
            }
            Event::MessageStop => {
                self.done = true;
                let usage = self.usage.to_openai();
                let chunk = json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage,
                });
                out.push(StreamEvent {
                    data: encode(&chunk)?,
                    kind: StreamEventKind::UsageOnly,
                    usage: Some(usage),
                    response_id: self.response_id(),
                });
                out.push(StreamEvent::done());
            }
            Event::Error { error } => {
                self.done = true;
                return Err(stream_error(&self.provider, &error.r#type, &error.message));
            }
            Event::Ignored => {}
        }
        Ok(out)
    }

    fn delta(
        &self,
        delta: Value,
        finish_reason: Option<&str>,
    ) -> Result<StreamEvent, GatewayError> {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason }],
        });
        Ok(StreamEvent {
            data: encode(&chunk)?,
            kind: StreamEventKind::Delta,
            usage: None,
            response_id: self.response_id(),
        })
    }

    fn response_id(&self) -> Option<String> {
        (!self.id.is_empty()).then(|| self.id.clone())
    }

    fn protocol(&self, event: &str, err: &serde_json::Error) -> GatewayError {
        self.protocol_reason(format!(
            "the `{event}` event is not valid Anthropic JSON: {err}"
        ))
    }

    fn protocol_reason(&self, reason: String) -> GatewayError {
        GatewayError::UpstreamProtocol {
            provider: self.provider.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(events: &[StreamEvent]) -> Vec<Value> {
        events
            .iter()
            .map(|event| {
                if event.kind == StreamEventKind::Done {
                    Value::String("[DONE]".into())
                } else {
                    serde_json::from_slice(&event.data).unwrap()
                }
            })
            .collect()
    }

    fn start(translator: &mut AnthropicToOpenAi) -> Vec<StreamEvent> {
        translator
            .push(
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[],"stop_reason":null,"usage":{"input_tokens":12,"output_tokens":1,"cache_read_input_tokens":4}}}"#,
            )
            .unwrap()
    }

    #[test]
    fn text_stream() {
        let mut translator = AnthropicToOpenAi::new(7);
        let first = start(&mut translator);
        assert_eq!(first.len(), 1);
        let role = &chunks(&first)[0];
        assert_eq!(
            role["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(role["id"], "msg_1");
        assert_eq!(role["created"], 7);
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(first[0].response_id.as_deref(), Some("msg_1"));

        assert!(
            translator
                .push("ping", r#"{"type":"ping"}"#)
                .unwrap()
                .is_empty()
        );
        assert!(translator
            .push("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#)
            .unwrap()
            .is_empty());
        let text = translator
            .push("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#)
            .unwrap();
        assert_eq!(
            chunks(&text)[0]["choices"][0]["delta"],
            json!({"content": "Hi"})
        );
        assert!(
            translator
                .push(
                    "content_block_stop",
                    r#"{"type":"content_block_stop","index":0}"#
                )
                .unwrap()
                .is_empty()
        );
        let finish = translator
            .push("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":9}}"#)
            .unwrap();
        assert_eq!(chunks(&finish)[0]["choices"][0]["finish_reason"], "stop");
        let end = translator
            .push("message_stop", r#"{"type":"message_stop"}"#)
            .unwrap();
        assert_eq!(end.len(), 2);
        assert_eq!(end[0].kind, StreamEventKind::UsageOnly);
        assert_eq!(end[1].kind, StreamEventKind::Done);
        let usage = end[0].usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (16, 9));
        assert_eq!(usage.cached_tokens(), 4);
        assert_eq!(chunks(&end)[0]["choices"], json!([]));
        assert!(
            translator
                .push("message_stop", r#"{"type":"message_stop"}"#)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn tool_blocks_are_numbered_as_tool_calls() {
        let mut translator = AnthropicToOpenAi::new(0);
        start(&mut translator);
        translator
            .push("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#)
            .unwrap();
        let tool = translator
            .push("content_block_start", r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}"#)
            .unwrap();
        assert_eq!(
            chunks(&tool)[0]["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": ""}}]})
        );
        assert!(translator
            .push("content_block_delta", r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}"#)
            .unwrap()
            .is_empty());
        let args = translator
            .push("content_block_delta", r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\":"}}"#)
            .unwrap();
        assert_eq!(
            chunks(&args)[0]["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]})
        );
        let second = translator
            .push("content_block_start", r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_2","name":"g","input":{}}}"#)
            .unwrap();
        assert_eq!(
            chunks(&second)[0]["choices"][0]["delta"]["tool_calls"][0]["index"],
            1
        );
    }

    #[test]
    fn thinking_becomes_reasoning_content() {
        let mut translator = AnthropicToOpenAi::new(0);
        start(&mut translator);
        translator
            .push("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#)
            .unwrap();
        let out = translator
            .push("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#)
            .unwrap();
        assert_eq!(
            chunks(&out)[0]["choices"][0]["delta"],
            json!({"reasoning_content": "hmm"})
        );
        assert!(translator
            .push("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"s"}}"#)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn overloaded_error_is_a_503_with_the_vendor_message() {
        let mut translator = AnthropicToOpenAi::new(0).with_provider("claude-main");
        start(&mut translator);
        let err = translator
            .push(
                "error",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            )
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        let body: Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_eq!(body["error"]["message"], "Overloaded");
        assert!(
            matches!(err, GatewayError::UpstreamStatus { ref provider, .. } if provider == "claude-main")
        );
        assert!(translator.push("message_stop", "{}").unwrap().is_empty());
    }

    #[test]
    fn protocol_errors() {
        let mut translator = AnthropicToOpenAi::new(0);
        assert!(matches!(
            translator.push("message_start", "{not json"),
            Err(GatewayError::UpstreamProtocol { .. })
        ));
        assert!(matches!(
            translator.push("content_block_delta", r#"{"type":"content_block_delta","index":3,"delta":{"type":"text_delta","text":"x"}}"#),
            Err(GatewayError::UpstreamProtocol { .. })
        ));
        // The event name stands in for a missing `type`, and unknown events are skipped.
        assert!(translator.push("ping", "{}").unwrap().is_empty());
        assert!(
            translator
                .push("brand_new_event", r#"{"type":"brand_new_event"}"#)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            translator
                .push("message_start", r#"{"message":{"id":"m","model":"c"}}"#)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn message_delta_may_carry_cumulative_input_usage() {
        let mut translator = AnthropicToOpenAi::new(0);
        start(&mut translator);
        translator
            .push("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"input_tokens":20,"output_tokens":3,"cache_creation_input_tokens":5}}"#)
            .unwrap();
        let usage = translator.usage();
        assert_eq!(usage.prompt_tokens, 20 + 4 + 5);
        assert_eq!(usage.cache_write_tokens(), 5);
        assert_eq!(usage.completion_tokens, 3);
    }
}
