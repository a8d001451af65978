//! OpenAI's formats, which Azure OpenAI shares: chat completions (plain, streamed, tool calls)
//! and embeddings.

use crate::behaviour::Behaviour;
use crate::endpoint::{has_type, openai_error_body};
use crate::reply::{
    Reply, TOOL_ARGUMENT_FRAGMENTS, ToolRequest, embedding, tokens_for_chars, tool_arguments,
};
use crate::server::{BilledUsage, Body, Shared, json_response};
use crate::stream::{Script, data_event, stream_response};
use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A chat completion; `deployment` (Azure) replaces the echoed model.
pub(crate) fn chat(
    shared: &Arc<Shared>,
    n: u64,
    body: &Value,
    behaviour: &Behaviour,
    deployment: Option<&str>,
    client_request_id: Option<String>,
) -> Response<Body> {
    let reply = Reply::new(
        shared,
        n,
        behaviour,
        prompt_tokens(body),
        tool_request(body),
    );
    let model = match deployment {
        Some(deployment) => json!(deployment),
        None => body.get("model").cloned().unwrap_or(Value::Null),
    };
    let completion = Completion::new(reply, model);
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let billed = BilledUsage {
        upstream_request_id: format!("req-up-{n}"),
        client_request_id,
        prompt_tokens: completion.reply.prompt_tokens,
        completion_tokens: completion.reply.completion_tokens(),
        streamed: stream,
    };
    if stream {
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let steps = completion.script(include_usage, billed).steps(behaviour);
        stream_response(shared, steps, behaviour)
    } else {
        shared.bill(billed);
        json_response(StatusCode::OK, &completion.plain())
    }
}

/// Everything an answer to one request is made of, plain or streamed.
struct Completion {
    id: String,
    created: u64,
    model: Value,
    reply: Reply,
    usage: Value,
}

impl Completion {
    fn new(reply: Reply, model: Value) -> Self {
        let completion_tokens = reply.completion_tokens();
        Self {
            id: format!("chatcmpl-up-{}", reply.n),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs()),
            model,
            usage: json!({
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": reply.prompt_tokens + completion_tokens,
            }),
            reply,
        }
    }

    fn call_id(&self) -> String {
        format!("call_up_{}", self.reply.n)
    }

    fn plain(&self) -> Value {
        let (message, finish) = match &self.reply.tool {
            Some(name) => (
                json!({
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [{
                        "id": self.call_id(),
                        "type": "function",
                        "function": {"name": name, "arguments": tool_arguments().to_string()},
                    }],
                }),
                "tool_calls",
            ),
            None => (
                json!({"role": "assistant", "content": self.reply.text()}),
                "stop",
            ),
        };
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": self.usage,
        })
    }

    fn chunk(&self, choices: Value, usage: Option<&Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let (Some(usage), Some(object)) = (usage, chunk.as_object_mut()) {
            object.insert("usage".into(), usage.clone());
        }
        chunk
    }

    /// Role chunk (which for a tool call also names the tool), the content chunks (text
    /// pieces or argument fragments), the finish chunk, the usage chunk if asked, `[DONE]`.
    fn script(&self, include_usage: bool, billed: BilledUsage) -> Script {
        // OpenAI puts `"usage": null` on every chunk once usage was asked for.
        let null_usage = include_usage.then_some(&Value::Null);
        let delta = |delta: Value, finish: Value| {
            let choices = json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
            data_event(&self.chunk(choices, null_usage))
        };
        let (role, content, finish) = match &self.reply.tool {
            Some(name) => (
                json!({
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [{
                        "index": 0,
                        "id": self.call_id(),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }],
                }),
                TOOL_ARGUMENT_FRAGMENTS
                    .iter()
                    .map(|fragment| {
                        delta(
                            json!({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}),
                            Value::Null,
                        )
                    })
                    .collect(),
                "tool_calls",
            ),
            None => (
                json!({"role": "assistant", "content": ""}),
                self.reply
                    .pieces
                    .iter()
                    .map(|piece| delta(json!({"content": piece}), Value::Null))
                    .collect(),
                "stop",
            ),
        };
        let mut trailer = vec![delta(json!({}), json!(finish))];
        let mut billing = None;
        if include_usage {
            billing = Some((trailer.len(), billed));
            trailer.push(data_event(&self.chunk(json!([]), Some(&self.usage))));
        }
        trailer.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Script {
            prelude: vec![delta(role, Value::Null)],
            content,
            trailer,
            error_event: data_event(&openai_error_body(
                "mock upstream error mid-stream",
                "server_error",
            )),
            billing,
        }
    }
}

/// `ceil(chars / 4) + 1` over every string content; documented in the crate docs because tests
/// compute it independently.
fn prompt_tokens(body: &Value) -> u64 {
    let chars: usize = messages(body)
        .filter_map(|message| message.get("content")?.as_str())
        .map(|text| text.chars().count())
        .sum();
    tokens_for_chars(chars)
}

fn messages(body: &Value) -> impl Iterator<Item = &Value> {
    body.get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn tool_request(body: &Value) -> ToolRequest {
    let first_tool = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|tool| tool.pointer("/function/name")?.as_str())
        .map(str::to_owned);
    let last_role = messages(body)
        .last()
        .and_then(|message| message.get("role")?.as_str());
    ToolRequest {
        first_tool,
        last_is_tool_result: matches!(last_role, Some("tool" | "function")),
        choice_none: body.get("tool_choice").and_then(Value::as_str) == Some("none"),
    }
}

/// `image_url` content parts across all messages.
pub(crate) fn images(body: &Value) -> u64 {
    messages(body)
        .filter_map(|message| message.get("content")?.as_array())
        .flatten()
        .filter(|part| has_type(part, "image_url"))
        .count() as u64
}

/// The inputs of an embeddings request: a string, or an array whose items are strings (or
/// token arrays, which stand for their JSON text).
fn embedding_inputs(body: &Value) -> Vec<String> {
    match body.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The last string input.
pub(crate) fn embeddings_directive_carrier(body: &Value) -> Option<String> {
    match body.get("input")? {
        Value::String(text) => Some(text.clone()),
        Value::Array(items) => items
            .iter()
            .rev()
            .find_map(|item| item.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// One vector per input; usage counts the characters of the string inputs.
pub(crate) fn embeddings(body: &Value, deployment: Option<&str>) -> Response<Body> {
    let inputs = embedding_inputs(body);
    let chars: usize = match body.get("input") {
        Some(Value::String(text)) => text.chars().count(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|text| text.chars().count())
            .sum(),
        _ => 0,
    };
    let prompt_tokens = tokens_for_chars(chars);
    let model = match deployment {
        Some(deployment) => json!(deployment),
        None => body.get("model").cloned().unwrap_or(Value::Null),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            json!({"object": "embedding", "index": index, "embedding": embedding(input)})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_token_formula() {
        let body = json!({"messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": "é"},
            {"role": "user", "content": [{"type": "text", "text": "ignored"}]},
        ]});
        // 5 characters: ceil(5 / 4) + 1.
        assert_eq!(prompt_tokens(&body), 3);
        assert_eq!(prompt_tokens(&json!({})), 1);
    }

    #[test]
    fn tool_request_reads_tools_last_role_and_choice() {
        let body = json!({
            "tools": [{"type": "function", "function": {"name": "get_weather"}},
                      {"type": "function", "function": {"name": "other"}}],
            "tool_choice": "auto",
            "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}],
        });
        let request = tool_request(&body);
        assert_eq!(request.first_tool.as_deref(), Some("get_weather"));
        assert!(request.last_is_tool_result);
        assert!(!request.choice_none);
        let none = tool_request(&json!({"tool_choice": "none", "messages": []}));
        assert!(none.first_tool.is_none());
        assert!(none.choice_none);
        assert!(!none.last_is_tool_result);
    }
}
