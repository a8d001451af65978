//! The vendor's OpenAI `chat.completion` -> an Anthropic message.
//!
//! Only the first choice is translated: inbound requests never ask for more. A refusal is
//! reported as text with `stop_reason: "refusal"`, since Anthropic has no refusal field.

use super::UPSTREAM;
use crate::anthropic::{anthropic_stop_reason, anthropic_usage_json, encode};
use bytes::Bytes;
use gateway_core::GatewayError;
use gateway_core::openai::{MessageContent, Usage};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<Reply>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    content: Option<MessageContent>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Deserialize)]
struct ToolCall {
    id: String,
    function: Function,
}

#[derive(Deserialize)]
struct Function {
    name: String,
    #[serde(default)]
    arguments: String,
}

/// Translates a vendor's non-streamed OpenAI answer into the Anthropic message JSON.
pub fn from_openai_response(openai_body: &[u8]) -> Result<Bytes, GatewayError> {
    let completion: Completion = serde_json::from_slice(openai_body)
        .map_err(|err| protocol(format!("the completion is not valid OpenAI JSON: {err}")))?;
    let choice = completion.choices.into_iter().next();
    let (reply, finish_reason) = match choice {
        Some(choice) => (choice.message, choice.finish_reason),
        None => (None, None),
    };
    let mut content = Vec::new();
    let mut refused = false;
    if let Some(reply) = reply {
        let text = reply
            .content
            .map(|content| content.text())
            .unwrap_or_default();
        if !text.is_empty() {
            content.push(json!({ "type": "text", "text": text }));
        }
        if let Some(refusal) = reply.refusal.filter(|refusal| !refusal.is_empty()) {
            refused = true;
            content.push(json!({ "type": "text", "text": refusal }));
        }
        for call in reply.tool_calls.unwrap_or_default() {
            content.push(json!({
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": tool_input(&call.function.arguments)?,
            }));
        }
    }
    let stop_reason = if refused {
        Some("refusal")
    } else {
        finish_reason.as_deref().map(anthropic_stop_reason)
    };
    let body = json!({
        "id": completion.id,
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": anthropic_usage_json(&completion.usage.unwrap_or_default()),
    });
    encode(&body)
}

/// OpenAI's JSON-string arguments as the object Anthropic clients expect: SDKs and agents
/// read `input` as an object, so arguments that are not one are the vendor's fault.
fn tool_input(arguments: &str) -> Result<Value, GatewayError> {
    if arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(object @ Value::Object(_)) => Ok(object),
        _ => Err(protocol(
            "a tool call's arguments are not a JSON object".into(),
        )),
    }
}

fn protocol(reason: String) -> GatewayError {
    GatewayError::UpstreamProtocol {
        provider: UPSTREAM.into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> Value {
        serde_json::from_slice(&from_openai_response(body.to_string().as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn text_answer_with_cached_usage() {
        let out = translate(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                      "prompt_tokens_details": {"cached_tokens": 60}}
        }));
        assert_eq!(
            out,
            json!({"id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt-x",
                   "content": [{"type": "text", "text": "Hello"}],
                   "stop_reason": "end_turn", "stop_sequence": null,
                   "usage": {"input_tokens": 40, "output_tokens": 5,
                             "cache_read_input_tokens": 60, "cache_creation_input_tokens": 0}})
        );
    }

    #[test]
    fn tool_calls_become_tool_use() {
        let out = translate(json!({
            "id": "c", "model": "gpt-x",
            "choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}}]},
                "finish_reason": "tool_calls"}]
        }));
        assert_eq!(
            out["content"],
            json!([
                {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                {"type": "tool_use", "id": "call_2", "name": "g", "input": {}},
            ])
        );
        assert_eq!(out["stop_reason"], "tool_use");
        assert_eq!(out["usage"]["output_tokens"], 0);
    }

    #[test]
    fn refusal_and_length() {
        let out = translate(json!({"id": "c", "model": "m", "choices": [{"message":
            {"role": "assistant", "content": null, "refusal": "I can't help with that."}, "finish_reason": "stop"}]}));
        assert_eq!(out["stop_reason"], "refusal");
        assert_eq!(out["content"][0]["text"], "I can't help with that.");
        let out = translate(json!({"id": "c", "model": "m", "choices": [{"message":
            {"role": "assistant", "content": "trunc"}, "finish_reason": "length"}]}));
        assert_eq!(out["stop_reason"], "max_tokens");
        let out = translate(json!({"id": "c", "model": "m", "choices": [{"message":
            {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}]}));
        assert_eq!(out["stop_reason"], "refusal");
        assert_eq!(out["content"], json!([]));
    }

    #[test]
    fn bad_vendor_answers_are_protocol_errors() {
        assert!(matches!(
            from_openai_response(b"nope"),
            Err(GatewayError::UpstreamProtocol { .. })
        ));
        let body = json!({"id": "c", "model": "m", "choices": [{"message": {"tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{broken"}}]}}]});
        assert!(matches!(
            from_openai_response(body.to_string().as_bytes()),
            Err(GatewayError::UpstreamProtocol { .. })
        ));
    }
}
