//! OpenAI's Responses API (`POST /v1/responses`), plain or streamed as named events.
//!
//! The gateway passes these through rather than translating them, so the mock's job is to look
//! enough like OpenAI for the gateway to find the usage (in the body, or in the
//! `response.completed` event of a stream) and for faults to land where they would.

use crate::behaviour::Behaviour;
use crate::endpoint::has_type;
use crate::reply::{Reply, ToolRequest, tokens_for_chars, unix_now};
use crate::server::{Body, Shared, json_response};
use crate::stream::{Script, named_event, stream_response};
use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

/// Events of a stream before the first text delta, which is therefore the first delta's
/// `sequence_number`.
const PRELUDE_EVENTS: u64 = 4;

pub(crate) fn respond(
    shared: &Arc<Shared>,
    n: u64,
    body: &Value,
    behaviour: &Behaviour,
) -> Response<Body> {
    // The Responses API's tools have another shape; the mock always answers text here.
    let no_tools = ToolRequest {
        first_tool: None,
        last_is_tool_result: false,
        choice_none: false,
    };
    let answer = Answer {
        created_at: unix_now(),
        model: body.get("model").cloned().unwrap_or(Value::Null),
        reply: Reply::new(shared, n, behaviour, prompt_tokens(body), no_tools),
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        stream_response(shared, answer.script(behaviour).steps(behaviour), behaviour)
    } else {
        json_response(StatusCode::OK, &answer.response("completed"))
    }
}

struct Answer {
    created_at: u64,
    model: Value,
    reply: Reply,
}

impl Answer {
    fn id(&self) -> String {
        format!("resp_up_{}", self.reply.n)
    }

    fn item_id(&self) -> String {
        format!("msg_up_{}", self.reply.n)
    }

    fn usage(&self) -> Value {
        let output = self.reply.completion_tokens();
        json!({
            "input_tokens": self.reply.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.reply.prompt_tokens + output,
        })
    }

    fn text_part(text: &str) -> Value {
        json!({"type": "output_text", "text": text, "annotations": []})
    }

    fn item(&self, status: &str, content: Value) -> Value {
        json!({
            "type": "message",
            "id": self.item_id(),
            "status": status,
            "role": "assistant",
            "content": content,
        })
    }

    /// The response object: finished (`completed`, with the output and usage), or as the
    /// first events of a stream announce it (`in_progress`, nothing yet).
    fn response(&self, status: &str) -> Value {
        let (output, usage) = if status == "completed" {
            let part = Self::text_part(&self.reply.text());
            (json!([self.item("completed", json!([part]))]), self.usage())
        } else {
            (json!([]), Value::Null)
        };
        json!({
            "id": self.id(),
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": usage,
        })
    }

    fn script(&self, behaviour: &Behaviour) -> Script {
        let mut sequence = 0_u64;
        let mut event = |name: &str, mut payload: Value| -> Bytes {
            if let Some(object) = payload.as_object_mut() {
                object.insert("type".into(), json!(name));
                object.insert("sequence_number".into(), json!(sequence));
            }
            sequence += 1;
            named_event(name, &payload)
        };
        let text = self.reply.text();
        let location = |extra: Value| {
            let mut payload = json!({
                "item_id": self.item_id(),
                "output_index": 0,
                "content_index": 0,
            });
            if let (Some(object), Value::Object(extra)) = (payload.as_object_mut(), extra) {
                object.extend(extra);
            }
            payload
        };

        let prelude = vec![
            event(
                "response.created",
                json!({"response": self.response("in_progress")}),
            ),
            event(
                "response.in_progress",
                json!({"response": self.response("in_progress")}),
            ),
            event(
                "response.output_item.added",
                json!({"output_index": 0, "item": self.item("in_progress", json!([]))}),
            ),
            event(
                "response.content_part.added",
                location(json!({"part": Self::text_part("")})),
            ),
        ];
        let content = self
            .reply
            .pieces
            .iter()
            .map(|piece| {
                event(
                    "response.output_text.delta",
                    location(json!({"delta": piece})),
                )
            })
            .collect();
        let trailer = vec![
            event("response.output_text.done", location(json!({"text": text}))),
            event(
                "response.content_part.done",
                location(json!({"part": Self::text_part(&text)})),
            ),
            event(
                "response.output_item.done",
                json!({
                    "output_index": 0,
                    "item": self.item("completed", json!([Self::text_part(&text)])),
                }),
            ),
            event(
                "response.completed",
                json!({"response": self.response("completed")}),
            ),
        ];
        // The error takes the place of whatever would have come next, so its number follows
        // the last delta actually sent.
        let sent = behaviour
            .stream_error_after_chunks
            .unwrap_or(0)
            .min(self.reply.pieces.len()) as u64;
        let error_event = named_event(
            "error",
            &json!({
                "type": "error",
                "code": "server_error",
                "message": "mock upstream error",
                "sequence_number": PRELUDE_EVENTS + sent,
            }),
        );
        Script {
            billing: None,
            prelude,
            content,
            trailer,
            error_event,
        }
    }
}

/// The items of `input` when it is an array (a string input has none).
fn items(body: &Value) -> impl DoubleEndedIterator<Item = &Value> {
    body.get("input")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The text of an item's `content`: a string, or its `input_text` and `output_text` parts
/// joined (an assistant turn replayed as input carries `output_text`).
fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|part| has_type(part, "input_text") || has_type(part, "output_text"))
                .filter_map(|part| part.get("text")?.as_str())
                .collect();
            (!texts.is_empty()).then(|| texts.concat())
        }
        _ => None,
    }
}

/// `ceil(chars / 4) + 1` over `instructions` and all input text; documented in the crate docs
/// because tests compute it independently.
fn prompt_tokens(body: &Value) -> u64 {
    let count = |text: Option<String>| text.map_or(0, |text| text.chars().count());
    let instructions = count(
        body.get("instructions")
            .and_then(Value::as_str)
            .map(str::to_owned),
    );
    let input = match body.get("input") {
        Some(Value::String(text)) => text.chars().count(),
        _ => items(body)
            .map(|item| count(item.get("content").and_then(text_of)))
            .sum(),
    };
    tokens_for_chars(instructions + input)
}

/// A string input, or the text of the last user item.
pub(crate) fn directive_carrier(body: &Value) -> Option<String> {
    if let Some(text) = body.get("input").and_then(Value::as_str) {
        return Some(text.to_owned());
    }
    items(body)
        .rev()
        .filter(|item| item.get("role").and_then(Value::as_str) == Some("user"))
        .find_map(|item| text_of(item.get("content")?))
}

/// `input_image` parts across all input items.
pub(crate) fn images(body: &Value) -> u64 {
    items(body)
        .filter_map(|item| item.get("content")?.as_array())
        .flatten()
        .filter(|part| has_type(part, "input_image"))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_count_instructions_strings_and_text_parts() {
        let body = json!({
            "instructions": "abcd",
            "input": [
                {"role": "user", "content": "é"},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "xy"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA=="},
                ]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "z"}]},
                {"type": "function_call_output", "call_id": "c", "output": "ignored"},
            ],
        });
        // 4 + 1 + 2 + 1 = 8 characters: ceil(8 / 4) + 1.
        assert_eq!(prompt_tokens(&body), 3);
        assert_eq!(prompt_tokens(&json!({"input": "hello"})), 3);
        assert_eq!(prompt_tokens(&json!({})), 1);
        assert_eq!(images(&body), 1);
    }

    #[test]
    fn directive_comes_from_the_last_user_text() {
        assert_eq!(
            directive_carrier(&json!({"input": "[[mock chunks=1]]"})).as_deref(),
            Some("[[mock chunks=1]]")
        );
        let body = json!({"input": [
            {"role": "user", "content": "first"},
            {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                         {"type": "input_text", "text": "b"}]},
            {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},
            {"role": "assistant", "content": "not this"},
        ]});
        assert_eq!(directive_carrier(&body).as_deref(), Some("ab"));
        assert_eq!(directive_carrier(&json!({"input": 3})), None);
    }
}
