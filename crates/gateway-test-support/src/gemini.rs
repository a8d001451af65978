//! Gemini's `generateContent`, `streamGenerateContent?alt=sse`, `embedContent` and
//! `batchEmbedContents`.
//!
//! Gemini's REST API accepts both camelCase and snake_case field names, so the mock reads both.

use crate::behaviour::Behaviour;
use crate::endpoint::gemini_error_body;
use crate::reply::{Reply, ToolRequest, embedding, field, tokens_for_chars, tool_arguments};
use crate::server::{Body, Shared, json_response};
use crate::stream::{Script, data_event, stream_response};
use http::{Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

pub(crate) fn generate(
    shared: &Arc<Shared>,
    n: u64,
    body: &Value,
    behaviour: &Behaviour,
    model: &str,
    stream: bool,
) -> Response<Body> {
    let reply = Reply::new(
        shared,
        n,
        behaviour,
        prompt_tokens(body),
        tool_request(body),
    );
    let answer = Answer { model, reply };
    if stream {
        stream_response(shared, answer.script().steps(behaviour), behaviour)
    } else {
        json_response(StatusCode::OK, &answer.plain())
    }
}

struct Answer<'a> {
    model: &'a str,
    reply: Reply,
}

impl Answer<'_> {
    fn usage(&self) -> Value {
        let completion = self.reply.completion_tokens();
        json!({
            "promptTokenCount": self.reply.prompt_tokens,
            "candidatesTokenCount": completion,
            "totalTokenCount": self.reply.prompt_tokens + completion,
        })
    }

    /// One response object with `parts`; the last one of an answer also finishes it.
    fn payload(&self, parts: Value, last: bool) -> Value {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        let mut payload = json!({
            "candidates": [],
            "modelVersion": self.model,
            "responseId": format!("gem-up-{}", self.reply.n),
        });
        if last {
            candidate["finishReason"] = json!("STOP");
            payload["usageMetadata"] = self.usage();
        }
        payload["candidates"] = json!([candidate]);
        payload
    }

    fn call_part(name: &str) -> Value {
        json!({"functionCall": {"name": name, "args": tool_arguments()}})
    }

    fn plain(&self) -> Value {
        let part = match &self.reply.tool {
            Some(name) => Self::call_part(name),
            None => json!({"text": self.reply.text()}),
        };
        self.payload(json!([part]), true)
    }

    /// One `data:` payload per text piece, the last finishing; a tool call comes whole, as
    /// Gemini sends it. No `[DONE]`: Gemini streams just end.
    fn script(&self) -> Script {
        let content = match &self.reply.tool {
            Some(name) => vec![data_event(
                &self.payload(json!([Self::call_part(name)]), true),
            )],
            // A finishing payload even without text, so the stream still says it is complete.
            None if self.reply.pieces.is_empty() => {
                vec![data_event(&self.payload(json!([{"text": ""}]), true))]
            }
            None => {
                let last = self.reply.pieces.len() - 1;
                self.reply
                    .pieces
                    .iter()
                    .enumerate()
                    .map(|(i, piece)| {
                        data_event(&self.payload(json!([{"text": piece}]), i == last))
                    })
                    .collect()
            }
        };
        Script {
            billing: None,
            prelude: Vec::new(),
            content,
            trailer: Vec::new(),
            error_event: data_event(&gemini_error_body(
                StatusCode::SERVICE_UNAVAILABLE,
                "mock upstream error mid-stream",
            )),
        }
    }
}

fn contents(body: &Value) -> impl DoubleEndedIterator<Item = &Value> {
    body.get("contents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn parts(content: &Value) -> impl Iterator<Item = &Value> {
    content
        .get("parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The joined text parts of a content, if it has any.
fn text_of(content: &Value) -> Option<String> {
    let texts: Vec<&str> = parts(content)
        .filter_map(|part| part.get("text")?.as_str())
        .collect();
    (!texts.is_empty()).then(|| texts.concat())
}

/// The text of the last content that has any.
pub(crate) fn directive_carrier(body: &Value) -> Option<String> {
    contents(body).rev().find_map(text_of)
}

/// `ceil(chars / 4) + 1` over every text part of `systemInstruction` and `contents`.
fn prompt_tokens(body: &Value) -> u64 {
    let count = |content: &Value| text_of(content).map_or(0, |text| text.chars().count());
    let system = field(body, &["systemInstruction", "system_instruction"]).map_or(0, count);
    let contents: usize = contents(body).map(count).sum();
    tokens_for_chars(system + contents)
}

fn tool_request(body: &Value) -> ToolRequest {
    let first_tool = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|tool| field(tool, &["functionDeclarations", "function_declarations"]))
        .filter_map(Value::as_array)
        .flatten()
        .find_map(|declaration| declaration.get("name")?.as_str())
        .map(str::to_owned);
    let last_is_tool_result = contents(body).last().is_some_and(|content| {
        parts(content).any(|part| field(part, &["functionResponse", "function_response"]).is_some())
    });
    let mode = field(body, &["toolConfig", "tool_config"])
        .and_then(|config| {
            field(
                config,
                &["functionCallingConfig", "function_calling_config"],
            )
        })
        .and_then(|config| config.get("mode"))
        .and_then(Value::as_str);
    ToolRequest {
        first_tool,
        last_is_tool_result,
        choice_none: mode == Some("NONE"),
    }
}

/// `inlineData` and `fileData` parts across all contents.
pub(crate) fn images(body: &Value) -> u64 {
    contents(body)
        .flat_map(parts)
        .filter(|part| {
            field(
                part,
                &["inlineData", "inline_data", "fileData", "file_data"],
            )
            .is_some()
        })
        .count() as u64
}

/// The requests of a batch, or the one request `embedContent` carries in its body.
fn embed_requests(body: &Value, batch: bool) -> Vec<&Value> {
    if batch {
        body.get("requests")
            .and_then(Value::as_array)
            .map(|requests| requests.iter().collect())
            .unwrap_or_default()
    } else {
        vec![body]
    }
}

fn embed_text(request: &Value) -> String {
    request.get("content").and_then(text_of).unwrap_or_default()
}

/// The text of the last embed request that has any.
pub(crate) fn embeddings_directive_carrier(body: &Value) -> Option<String> {
    let requests = embed_requests(body, body.get("requests").is_some());
    requests
        .into_iter()
        .rev()
        .find_map(|request| text_of(request.get("content")?))
}

/// `{"embeddings":[{"values":[...]}, ...]}` for a batch, `{"embedding":{"values":[...]}}` for
/// one; Gemini reports no usage for embeddings.
pub(crate) fn embed(body: &Value, batch: bool) -> Response<Body> {
    let vectors: Vec<Value> = embed_requests(body, batch)
        .into_iter()
        .map(|request| json!({"values": embedding(&embed_text(request))}))
        .collect();
    let answer = if batch {
        json!({"embeddings": vectors})
    } else {
        json!({"embedding": vectors.into_iter().next().unwrap_or(Value::Null)})
    };
    json_response(StatusCode::OK, &answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_camel_and_snake_case() {
        let body = json!({
            "system_instruction": {"parts": [{"text": "ab"}]},
            "contents": [
                {"role": "user", "parts": [{"text": "cd"}, {"inline_data": {"mime_type": "image/png", "data": "AA=="}}]},
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                {"role": "user", "parts": [{"function_response": {"name": "f", "response": {}}}]},
            ],
            "tools": [{"googleSearch": {}}, {"function_declarations": [{"name": "get_weather"}]}],
            "tool_config": {"function_calling_config": {"mode": "NONE"}},
        });
        // 4 characters: ceil(4 / 4) + 1.
        assert_eq!(prompt_tokens(&body), 2);
        assert_eq!(images(&body), 1);
        let request = tool_request(&body);
        assert_eq!(request.first_tool.as_deref(), Some("get_weather"));
        assert!(request.last_is_tool_result);
        assert!(request.choice_none);
        assert_eq!(directive_carrier(&body).as_deref(), Some("cd"));
    }
}
