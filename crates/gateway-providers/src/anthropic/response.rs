//! Anthropic message -> OpenAI `chat.completion`.
//!
//! Text blocks are concatenated into `content`, `tool_use` blocks become `tool_calls` with
//! their input encoded as a JSON string, and thinking blocks become `reasoning_content` (the
//! field OpenAI-compatible reasoning vendors use); their signatures cannot be carried, so a
//! later turn cannot hand them back to Anthropic.

use super::{AnthropicUsage, PROVIDER, encode, openai_finish_reason};
use bytes::Bytes;
use gateway_core::GatewayError;
use gateway_core::openai::Usage;
use serde::Deserialize;
use serde_json::{Value, json};

/// An Anthropic answer in OpenAI format, with what the gateway records about it.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The OpenAI `chat.completion` JSON.
    pub body: Bytes,
    pub usage: Option<Usage>,
    pub response_id: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    id: String,
    model: String,
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    Thinking {
        thinking: String,
    },
    // Server tool calls and their results, redacted thinking and block types added later
    // have no OpenAI form; what the model said about them is in its text blocks.
    #[serde(other)]
    Other,
}

/// Translates a non-streamed Anthropic answer; `created` is the Unix time to report.
pub fn to_openai_response(anthropic_body: &[u8], created: i64) -> Result<Translated, GatewayError> {
    let message: Message =
        serde_json::from_slice(anthropic_body).map_err(|err| GatewayError::UpstreamProtocol {
            provider: PROVIDER.into(),
            reason: format!("the message is not valid Anthropic JSON: {err}"),
        })?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for block in message.content {
        match block {
            Block::Text { text: part } => text.push_str(&part),
            Block::Thinking { thinking } => reasoning.push_str(&thinking),
            Block::ToolUse { id, name, input } => tool_calls.push(json!({
                "id": id,
                "type": "function",
                "function": { "name": name, "arguments": arguments(&input) },
            })),
            Block::Other => {}
        }
    }
    let mut reply = json!({
        "role": "assistant",
        // OpenAI answers `null` content when the model only called tools.
        "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { text.into() },
        "refusal": null,
    });
    if !tool_calls.is_empty() {
        reply["tool_calls"] = Value::Array(tool_calls);
    }
    if !reasoning.is_empty() {
        reply["reasoning_content"] = reasoning.into();
    }
    let usage = message.usage.to_openai();
    let body = json!({
        "id": message.id,
        "object": "chat.completion",
        "created": created,
        "model": message.model,
        "choices": [{
            "index": 0,
            "message": reply,
            "logprobs": null,
            "finish_reason": message.stop_reason.as_deref().map(openai_finish_reason),
        }],
        "usage": usage,
    });
    Ok(Translated {
        body: encode(&body)?,
        usage: Some(usage),
        response_id: Some(message.id),
    })
}

/// A tool input as OpenAI's JSON-string arguments. Encoding a `Value` cannot fail, and `{}` is
/// what an empty input means anyway.
pub(super) fn arguments(input: &Value) -> String {
    if input.is_null() {
        return "{}".into();
    }
    serde_json::to_string(input).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> (Value, Translated) {
        let translated = to_openai_response(body.to_string().as_bytes(), 1_700_000_000).unwrap();
        (
            serde_json::from_slice(&translated.body).unwrap(),
            translated,
        )
    }

    #[test]
    fn text_answer() {
        let (body, translated) = translate(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 3, "output_tokens": 2}
        }));
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["created"], 1_700_000_000);
        assert_eq!(body["model"], "claude-x");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert!(body["choices"][0]["message"].get("tool_calls").is_none());
        assert_eq!(translated.response_id.as_deref(), Some("msg_1"));
        let usage = translated.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (3, 2, 5)
        );
        assert_eq!(body["usage"]["total_tokens"], 5);
    }

    #[test]
    fn tool_use_thinking_and_unknown_blocks() {
        let (body, _) = translate(json!({
            "id": "msg_2", "model": "claude-x",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "xx"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}},
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 3, "output_tokens": 2}
        }));
        let message = &body["choices"][0]["message"];
        assert_eq!(message["content"], Value::Null);
        assert_eq!(message["reasoning_content"], "hmm");
        assert_eq!(message["tool_calls"][0]["id"], "toolu_1");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"],
            "{\"a\":[1,2]}"
        );
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn refusal_and_length() {
        for (stop, finish) in [("refusal", "content_filter"), ("max_tokens", "length")] {
            let (body, _) = translate(json!({
                "id": "m", "model": "c", "content": [], "stop_reason": stop,
                "usage": {"input_tokens": 1, "output_tokens": 0}
            }));
            assert_eq!(body["choices"][0]["finish_reason"], finish);
            assert_eq!(body["choices"][0]["message"]["content"], "");
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let err = to_openai_response(b"<html>", 0).unwrap_err();
        assert!(
            matches!(err, GatewayError::UpstreamProtocol { .. }),
            "{err:?}"
        );
        let err = to_openai_response(br#"{"id":"m"}"#, 0).unwrap_err();
        assert!(
            matches!(err, GatewayError::UpstreamProtocol { .. }),
            "{err:?}"
        );
    }
}
