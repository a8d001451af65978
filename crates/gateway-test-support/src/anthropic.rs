//! Anthropic's Messages API: the plain message, the named-event stream, `tool_use` blocks, and
//! the in-band `error` event Anthropic sends once a stream has started.

use crate::behaviour::Behaviour;
use crate::endpoint::{anthropic_error_body, has_type};
use crate::reply::{Reply, TOOL_ARGUMENT_FRAGMENTS, ToolRequest, tokens_for_chars, tool_arguments};
use crate::server::{Body, Shared, json_response};
use crate::stream::{Script, named_event, stream_response};
use http::{Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

pub(crate) fn messages(
    shared: &Arc<Shared>,
    n: u64,
    body: &Value,
    behaviour: &Behaviour,
) -> Response<Body> {
    let reply = Reply::new(
        shared,
        n,
        behaviour,
        prompt_tokens(body),
        tool_request(body),
    );
    let message = Message {
        model: body.get("model").cloned().unwrap_or(Value::Null),
        reply,
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        stream_response(shared, message.script().steps(behaviour), behaviour)
    } else {
        json_response(StatusCode::OK, &message.plain())
    }
}

struct Message {
    model: Value,
    reply: Reply,
}

impl Message {
    fn id(&self) -> String {
        format!("msg_up_{}", self.reply.n)
    }

    fn tool_use_id(&self) -> String {
        format!("toolu_up_{}", self.reply.n)
    }

    fn stop_reason(&self) -> &'static str {
        if self.reply.tool.is_some() {
            "tool_use"
        } else {
            "end_turn"
        }
    }

    fn usage(&self, output_tokens: u64) -> Value {
        json!({
            "input_tokens": self.reply.prompt_tokens,
            "output_tokens": output_tokens,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        })
    }

    fn plain(&self) -> Value {
        let block = match &self.reply.tool {
            Some(name) => json!({
                "type": "tool_use",
                "id": self.tool_use_id(),
                "name": name,
                "input": tool_arguments(),
            }),
            None => json!({"type": "text", "text": self.reply.text()}),
        };
        json!({
            "id": self.id(),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [block],
            "stop_reason": self.stop_reason(),
            "stop_sequence": null,
            "usage": self.usage(self.reply.completion_tokens()),
        })
    }

    /// `message_start`, `ping`, `content_block_start`, the deltas, `content_block_stop`,
    /// `message_delta`, `message_stop`: the order Anthropic sends them in.
    fn script(&self) -> Script {
        let start = json!({
            "type": "message_start",
            "message": {
                "id": self.id(),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                // Anthropic reports a provisional output count of 1 until message_delta.
                "usage": self.usage(1),
            },
        });
        let block_delta = |delta: Value| {
            named_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": delta}),
            )
        };
        let (block, content) = match &self.reply.tool {
            Some(name) => (
                json!({"type": "tool_use", "id": self.tool_use_id(), "name": name, "input": {}}),
                TOOL_ARGUMENT_FRAGMENTS
                    .iter()
                    .map(|fragment| {
                        block_delta(json!({"type": "input_json_delta", "partial_json": fragment}))
                    })
                    .collect(),
            ),
            None => (
                json!({"type": "text", "text": ""}),
                self.reply
                    .pieces
                    .iter()
                    .map(|piece| block_delta(json!({"type": "text_delta", "text": piece})))
                    .collect(),
            ),
        };
        Script {
            billing: None,
            prelude: vec![
                named_event("message_start", &start),
                named_event("ping", &json!({"type": "ping"})),
                named_event(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": 0, "content_block": block}),
                ),
            ],
            content,
            trailer: vec![
                named_event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ),
                named_event(
                    "message_delta",
                    &json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null},
                        "usage": {"output_tokens": self.reply.completion_tokens()},
                    }),
                ),
                named_event("message_stop", &json!({"type": "message_stop"})),
            ],
            error_event: named_event(
                "error",
                &anthropic_error_body("overloaded_error", "mock upstream error mid-stream"),
            ),
        }
    }
}

fn messages_of(body: &Value) -> impl DoubleEndedIterator<Item = &Value> {
    body.get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The text of a string content, or of the `text` blocks of a block content.
fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(text) => Some(text.clone()),
        Value::Array(blocks) => {
            let texts: Vec<&str> = blocks
                .iter()
                .filter(|block| has_type(block, "text"))
                .filter_map(|block| block.get("text")?.as_str())
                .collect();
            (!texts.is_empty()).then(|| texts.concat())
        }
        _ => None,
    }
}

/// The text of the last message that has any: a gateway translating from OpenAI may turn a
/// string content into text blocks, and the directive must survive that.
pub(crate) fn directive_carrier(body: &Value) -> Option<String> {
    messages_of(body)
        .rev()
        .find_map(|message| text_of(message.get("content")?))
}

/// `ceil(chars / 4) + 1` over the system prompt and every message's string content or `text`
/// blocks (tool results and other blocks count nothing).
fn prompt_tokens(body: &Value) -> u64 {
    let count = |content: &Value| text_of(content).map_or(0, |text| text.chars().count());
    let system = body.get("system").map_or(0, count);
    let messages: usize = messages_of(body)
        .filter_map(|message| message.get("content"))
        .map(count)
        .sum();
    tokens_for_chars(system + messages)
}

fn tool_request(body: &Value) -> ToolRequest {
    let first_tool = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|tool| tool.get("name")?.as_str())
        .map(str::to_owned);
    let last_is_tool_result = messages_of(body).last().is_some_and(|message| {
        message.get("role").and_then(Value::as_str) == Some("user")
            && message
                .get("content")
                .and_then(Value::as_array)
                .is_some_and(|blocks| blocks.iter().any(|block| has_type(block, "tool_result")))
    });
    ToolRequest {
        first_tool,
        last_is_tool_result,
        choice_none: body
            .get("tool_choice")
            .is_some_and(|choice| has_type(choice, "none")),
    }
}

/// `image` blocks, including those inside `tool_result` contents.
pub(crate) fn images(body: &Value) -> u64 {
    fn count(blocks: &Value) -> u64 {
        blocks.as_array().map_or(0, |blocks| {
            blocks
                .iter()
                .map(|block| {
                    if has_type(block, "image") {
                        1
                    } else if has_type(block, "tool_result") {
                        block.get("content").map_or(0, count)
                    } else {
                        0
                    }
                })
                .sum()
        })
    }
    messages_of(body)
        .filter_map(|message| message.get("content"))
        .map(count)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_count_system_strings_and_text_blocks() {
        let body = json!({
            "system": [{"type": "text", "text": "ab"}],
            "messages": [
                {"role": "user", "content": "cd"},
                {"role": "user", "content": [
                    {"type": "text", "text": "e"},
                    {"type": "image", "source": {"type": "url", "url": "http://x/i.png"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": "ignored"},
                ]},
            ],
        });
        // 5 characters: ceil(5 / 4) + 1.
        assert_eq!(prompt_tokens(&body), 3);
        assert_eq!(prompt_tokens(&json!({"system": "abcd"})), 2);
        let request = tool_request(&body);
        assert!(request.last_is_tool_result);
        assert!(request.first_tool.is_none());
        assert_eq!(directive_carrier(&body).as_deref(), Some("e"));
    }

    #[test]
    fn images_inside_tool_results_count() {
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
            {"type": "tool_result", "tool_use_id": "t", "content": [
                {"type": "image", "source": {"type": "url", "url": "http://x/i.png"}},
            ]},
        ]}]});
        assert_eq!(images(&body), 2);
    }
}
