//! `kind = "mock"`: answers locally, so the quickstart works with no key and no network.
//!
//! The answer is deterministic: it quotes the start of the last user message, and its usage is
//! an estimate (about four characters a token), so billing and logs have real numbers to show.

use crate::config::ProviderConfig;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use gateway_core::GatewayError;
use gateway_core::openai::{ChatCompletionRequest, Role, Usage};
use gateway_core::provider::{
    ChatCall, ChatProvider, ChatReply, CompleteReply, StreamEvent, StreamEventKind, StreamReply,
};
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct MockProvider {
    name: String,
    timeout: Duration,
}

impl MockProvider {
    pub fn new(config: &ProviderConfig) -> Self {
        Self {
            name: config.name.clone(),
            timeout: config.timeout(),
        }
    }
}

impl ChatProvider for MockProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn chat(&self, call: ChatCall) -> BoxFuture<'static, Result<ChatReply, GatewayError>> {
        let reply = answer(&call);
        Box::pin(std::future::ready(reply))
    }
}

fn answer(call: &ChatCall) -> Result<ChatReply, GatewayError> {
    let request = &call.request;
    let text = reply_text(request);
    let usage = Usage::new(estimate_prompt_tokens(request), word_count(&text));
    let id = format!("chatcmpl-mock-{}", call.request_id);
    let created = time::OffsetDateTime::now_utc().unix_timestamp();
    let model = request.model.as_str();

    if !request.is_stream() {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "gateway-mock",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage,
        });
        return Ok(ChatReply::Complete(CompleteReply {
            body: encode(&body)?,
            usage: Some(usage),
            vendor_response_id: Some(id),
            vendor_request_id: None,
        }));
    }

    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "gateway-mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let mut events = Vec::new();
    let mut push = |value: serde_json::Value, kind, usage| -> Result<(), GatewayError> {
        events.push(Ok(StreamEvent {
            data: encode(&value)?,
            kind,
            usage,
            response_id: Some(id.clone()),
        }));
        Ok(())
    };
    push(
        chunk(json!({"role": "assistant", "content": ""}), None),
        StreamEventKind::Delta,
        None,
    )?;
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    for word in words {
        push(
            chunk(json!({"content": word}), None),
            StreamEventKind::Delta,
            None,
        )?;
    }
    push(chunk(json!({}), Some("stop")), StreamEventKind::Delta, None)?;
    let usage_chunk = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "gateway-mock",
        "choices": [],
        "usage": usage,
    });
    push(usage_chunk, StreamEventKind::UsageOnly, Some(usage))?;
    events.push(Ok(StreamEvent::done()));
    Ok(ChatReply::Stream(StreamReply {
        vendor_request_id: None,
        events: futures_util::stream::iter(events).boxed(),
    }))
}

fn encode(value: &serde_json::Value) -> Result<Bytes, GatewayError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|err| GatewayError::Internal(format!("encoding the mock answer: {err}")))
}

fn reply_text(request: &ChatCompletionRequest) -> String {
    let last_user = request
        .messages
        .iter()
        .rev()
        .find(|message| message.role == Role::User)
        .and_then(|message| message.content.as_ref())
        .map(|content| content.text())
        .unwrap_or_default();
    let quoted: String = last_user.chars().take(200).collect();
    format!("This is the gateway's built-in mock provider. You said: {quoted}")
}

fn estimate_prompt_tokens(request: &ChatCompletionRequest) -> u64 {
    request
        .messages
        .iter()
        .map(|message| {
            let chars = message
                .content
                .as_ref()
                .map_or(0, |content| content.text().chars().count());
            // Roughly four characters a token, plus the per-message framing OpenAI counts.
            (chars as u64).div_ceil(4) + 4
        })
        .sum()
}

fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::RequestId;

    fn call(stream: bool) -> ChatCall {
        let body = format!(
            r#"{{"model":"mock-1","stream":{stream},"messages":[{{"role":"system","content":"be brief"}},{{"role":"user","content":"hello there"}}]}}"#
        );
        ChatCall {
            request: ChatCompletionRequest::from_json(body.as_bytes()).unwrap(),
            request_id: RequestId::new_v7(),
            trace: None,
        }
    }

    #[tokio::test]
    async fn plain_answer_quotes_user_and_reports_usage() {
        let provider = MockProvider {
            name: "mock".into(),
            timeout: Duration::from_secs(1),
        };
        let ChatReply::Complete(reply) = provider.chat(call(false)).await.unwrap() else {
            panic!("expected a complete reply");
        };
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(content.ends_with("hello there"), "{content}");
        let usage = reply.usage.unwrap();
        assert_eq!(body["usage"]["completion_tokens"], usage.completion_tokens);
        assert_eq!(usage.completion_tokens, word_count(content));
        assert!(usage.prompt_tokens > 0);
        assert_eq!(body["model"], "mock-1");
    }

    #[tokio::test]
    async fn stream_ends_with_usage_then_done() {
        let provider = MockProvider {
            name: "mock".into(),
            timeout: Duration::from_secs(1),
        };
        let ChatReply::Stream(reply) = provider.chat(call(true)).await.unwrap() else {
            panic!("expected a stream");
        };
        let events: Vec<_> = reply.events.map(Result::unwrap).collect().await;
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds[kinds.len() - 2], StreamEventKind::UsageOnly);
        assert_eq!(kinds[kinds.len() - 1], StreamEventKind::Done);
        let text: String = events
            .iter()
            .filter(|e| e.kind == StreamEventKind::Delta)
            .filter_map(|e| {
                let v: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert!(text.ends_with("hello there"), "{text}");
        let usage = events[events.len() - 2].usage.unwrap();
        assert_eq!(usage.completion_tokens, word_count(&text));
    }
}
