//! `streamGenerateContent?alt=sse` -> OpenAI `chat.completion.chunk` events.
//!
//! Each Gemini SSE payload is a partial `GenerateContentResponse`. OpenAI clients expect a
//! role chunk first, then content and tool-call deltas, a finish chunk per choice, the
//! usage-only chunk and `[DONE]`; [`GeminiToOpenAi`] keeps the little state that takes.

use super::PROVIDER;
use super::response::{
    Candidate, GenerateContentResponse, ResponseIds, finish_reason, logprobs, tool_call, usage_from,
};
use bytes::Bytes;
use gateway_core::GatewayError;
use gateway_core::openai::Usage;
use gateway_core::provider::{StreamEvent, StreamEventKind};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

/// Translates one Gemini stream into OpenAI events: [`push`](Self::push) each SSE `data:`
/// payload as it arrives, then [`finish`](Self::finish) when the upstream stream ends.
pub struct GeminiToOpenAi {
    model: String,
    created: i64,
    provider: String,
    /// Set from the first payload (Gemini's `responseId` or a generated id).
    ids: Option<ResponseIds>,
    /// Tool calls numbered across the whole response, as in a complete one.
    calls: usize,
    choices: BTreeMap<u32, ChoiceState>,
    /// Gemini repeats usage on every chunk with running totals; the last one is the total.
    usage: Option<Usage>,
    done: bool,
}

#[derive(Default)]
struct ChoiceState {
    /// Tool calls in this choice so far: the next call's `index` in OpenAI's delta.
    tool_calls: usize,
    finished: bool,
}

impl GeminiToOpenAi {
    pub fn new(model: &str, created: i64) -> Self {
        Self {
            model: model.to_owned(),
            created,
            provider: PROVIDER.to_owned(),
            ids: None,
            calls: 0,
            choices: BTreeMap::new(),
            usage: None,
            done: false,
        }
    }

    /// Names the configured provider in errors raised from the stream (default `gemini`).
    #[must_use]
    pub fn with_provider(mut self, provider: &str) -> Self {
        provider.clone_into(&mut self.provider);
        self
    }

    /// Usage reported so far (the final totals once the stream is complete).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// One SSE `data:` payload of `streamGenerateContent?alt=sse` (a `GenerateContentResponse`)
    /// -> the OpenAI events it makes. Once every choice has finished and the payload carried
    /// usage, the usage-only chunk and `[DONE]` are included: nothing more is coming.
    pub fn push(&mut self, data: &str) -> Result<Vec<StreamEvent>, GatewayError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(Vec::new());
        }
        if data == "[DONE]" {
            return Ok(self.finish());
        }
        let chunk = GenerateContentResponse::parse(data.as_bytes()).map_err(|err| match err {
            GatewayError::UpstreamProtocol { reason, .. } => GatewayError::UpstreamProtocol {
                provider: self.provider.clone(),
                reason,
            },
            other => other,
        })?;
        if let Some(error) = &chunk.error {
            return Err(super::error::from_error_value(&self.provider, None, error));
        }
        if self.done {
            if chunk.candidates.iter().any(has_parts) {
                return Err(GatewayError::UpstreamProtocol {
                    provider: self.provider.clone(),
                    reason: "content arrived after every choice had finished".into(),
                });
            }
            return Ok(Vec::new());
        }
        if let Some(blocked) = chunk.blocked() {
            return Err(blocked);
        }
        if self.ids.is_none() {
            self.ids = Some(ResponseIds::new(chunk.response_id.as_deref()));
        }
        if let Some(metadata) = &chunk.usage_metadata {
            self.usage = Some(usage_from(metadata));
        }

        let mut events = Vec::new();
        for (position, candidate) in chunk.candidates.iter().enumerate() {
            let index = candidate
                .index
                .unwrap_or_else(|| u32::try_from(position).unwrap_or(u32::MAX));
            self.candidate(index, candidate, &mut events)?;
        }
        if chunk.usage_metadata.is_some()
            && !self.choices.is_empty()
            && self.choices.values().all(|choice| choice.finished)
        {
            self.end(&mut events)?;
        }
        Ok(events)
    }

    /// The upstream stream ended: the events not yet sent. A choice Gemini left without a
    /// finish reason is closed as a stop (or a tool-call stop), then come the usage-only chunk
    /// (when usage is known) and `[DONE]`. Nothing once `[DONE]` was sent.
    pub fn finish(&mut self) -> Vec<StreamEvent> {
        if self.done {
            return Vec::new();
        }
        let mut events = Vec::new();
        let open: Vec<(u32, bool)> = self
            .choices
            .iter()
            .filter(|(_, choice)| !choice.finished)
            .map(|(index, choice)| (*index, choice.tool_calls > 0))
            .collect();
        for (index, called) in open {
            let reason = if called { "tool_calls" } else { "stop" };
            // Encoding a `json!` value cannot fail; were it to, the chunk is skipped rather
            // than the end of the stream lost.
            if let Ok(event) = self.delta(index, json!({}), Some(reason), None) {
                events.push(event);
            }
            if let Some(choice) = self.choices.get_mut(&index) {
                choice.finished = true;
            }
        }
        if self.end(&mut events).is_err() {
            self.done = true;
            events.push(StreamEvent::done());
        }
        events
    }

    fn candidate(
        &mut self,
        index: u32,
        candidate: &Candidate,
        events: &mut Vec<StreamEvent>,
    ) -> Result<(), GatewayError> {
        if let Entry::Vacant(slot) = self.choices.entry(index) {
            slot.insert(ChoiceState::default());
            events.push(self.delta(
                index,
                json!({"role": "assistant", "content": ""}),
                None,
                None,
            )?);
        }
        if self
            .choices
            .get(&index)
            .is_some_and(|choice| choice.finished)
        {
            if has_parts(candidate) {
                return Err(GatewayError::UpstreamProtocol {
                    provider: self.provider.clone(),
                    reason: format!("content arrived for candidate {index} after it finished"),
                });
            }
            return Ok(());
        }

        let mut logprobs = candidate.logprobs_result.as_ref().map(logprobs);
        let mut text = String::new();
        for part in candidate.content.iter().flat_map(|content| &content.parts) {
            if part.thought {
                continue;
            }
            if let Some(piece) = &part.text {
                text.push_str(piece);
            }
            if let Some(call) = &part.function_call {
                // Text before a call is sent before it, keeping the parts' order.
                if !text.is_empty() {
                    let content = std::mem::take(&mut text);
                    events.push(self.delta(index, json!({"content": content}), None, None)?);
                }
                let id = self.call_id();
                let position = self
                    .choices
                    .get(&index)
                    .map_or(0, |choice| choice.tool_calls);
                let mut entry = tool_call(id, call, part.thought_signature.as_deref());
                if let Value::Object(map) = &mut entry {
                    map.insert("index".into(), json!(position));
                }
                events.push(self.delta(index, json!({"tool_calls": [entry]}), None, None)?);
                if let Some(choice) = self.choices.get_mut(&index) {
                    choice.tool_calls += 1;
                }
            }
        }
        if !text.is_empty() {
            events.push(self.delta(index, json!({"content": text}), None, logprobs.take())?);
        }

        if let Some(reason) = &candidate.finish_reason {
            let called = self
                .choices
                .get(&index)
                .is_some_and(|choice| choice.tool_calls > 0);
            let reason = finish_reason(reason, called);
            events.push(self.delta(index, json!({}), Some(reason), None)?);
            if let Some(choice) = self.choices.get_mut(&index) {
                choice.finished = true;
            }
        }
        Ok(())
    }

    fn call_id(&mut self) -> String {
        let position = self.calls;
        self.calls += 1;
        self.ids_or_new().call_id(position)
    }

    fn ids_or_new(&mut self) -> &ResponseIds {
        self.ids.get_or_insert_with(|| ResponseIds::new(None))
    }

    fn response_id(&mut self) -> String {
        self.ids_or_new().id.clone()
    }

    fn delta(
        &mut self,
        index: u32,
        delta: Value,
        finish: Option<&str>,
        logprobs: Option<Value>,
    ) -> Result<StreamEvent, GatewayError> {
        let id = self.response_id();
        let mut choice = json!({"index": index, "delta": delta, "finish_reason": finish});
        if let (Some(logprobs), Value::Object(map)) = (logprobs, &mut choice) {
            map.insert("logprobs".into(), logprobs);
        }
        let chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        event(&chunk, StreamEventKind::Delta, None, id)
    }

    /// The usage-only chunk (when usage is known) and `[DONE]`.
    fn end(&mut self, events: &mut Vec<StreamEvent>) -> Result<(), GatewayError> {
        if let Some(usage) = self.usage {
            let id = self.response_id();
            let chunk = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            });
            events.push(event(&chunk, StreamEventKind::UsageOnly, Some(usage), id)?);
        }
        events.push(StreamEvent::done());
        self.done = true;
        Ok(())
    }
}

fn has_parts(candidate: &Candidate) -> bool {
    candidate
        .content
        .as_ref()
        .is_some_and(|content| !content.parts.is_empty())
}

fn event(
    chunk: &Value,
    kind: StreamEventKind,
    usage: Option<Usage>,
    id: String,
) -> Result<StreamEvent, GatewayError> {
    let data = serde_json::to_vec(chunk)
        .map_err(|err| GatewayError::Internal(format!("encoding a stream chunk: {err}")))?;
    Ok(StreamEvent {
        data: Bytes::from(data),
        kind,
        usage,
        response_id: Some(id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(value: Value) -> String {
        value.to_string()
    }

    fn parsed(event: &StreamEvent) -> Value {
        serde_json::from_slice(&event.data).unwrap()
    }

    #[test]
    fn finish_without_usage_waits_for_the_end_of_the_stream() {
        let mut stream = GeminiToOpenAi::new("g", 1);
        let events = stream
            .push(&payload(json!({"responseId": "r",
                "candidates": [{"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP"}]})))
            .unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [StreamEventKind::Delta; 3]);
        assert_eq!(parsed(&events[2])["choices"][0]["finish_reason"], "stop");
        // The usage arrives on its own afterwards.
        let events = stream
            .push(&payload(
                json!({"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1}}),
            ))
            .unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [StreamEventKind::UsageOnly, StreamEventKind::Done]);
        assert_eq!(events[0].usage.unwrap().total_tokens, 4);
        assert!(stream.finish().is_empty());
    }

    #[test]
    fn truncated_stream_is_closed_by_finish() {
        let mut stream = GeminiToOpenAi::new("g", 1);
        stream
            .push(&payload(json!({"candidates": [{"content": {"parts": [
                {"functionCall": {"name": "f", "args": {}}}]}}],
                "usageMetadata": {"promptTokenCount": 3}})))
            .unwrap();
        let events = stream.finish();
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                StreamEventKind::Delta,
                StreamEventKind::UsageOnly,
                StreamEventKind::Done
            ]
        );
        assert_eq!(
            parsed(&events[0])["choices"][0]["finish_reason"],
            "tool_calls"
        );
        // Ids are generated and shared by every chunk when Gemini sends no responseId.
        let id = parsed(&events[0])["id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("chatcmpl-gemini-"));
        assert_eq!(parsed(&events[1])["id"], id);
        assert!(stream.finish().is_empty());
    }

    #[test]
    fn empty_stream_still_ends() {
        let mut stream = GeminiToOpenAi::new("g", 1);
        assert!(stream.push("").unwrap().is_empty());
        let events = stream.finish();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, StreamEventKind::Done);
    }

    #[test]
    fn errors_mid_stream() {
        let mut stream = GeminiToOpenAi::new("g", 1).with_provider("google");
        let err = stream
            .push(r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#)
            .unwrap_err();
        assert_eq!(err.status().as_u16(), 503);
        assert!(
            matches!(err, GatewayError::UpstreamStatus { ref provider, .. } if provider == "google")
        );
        let err = stream.push("not json").unwrap_err();
        assert!(
            matches!(err, GatewayError::UpstreamProtocol { ref provider, .. } if provider == "google")
        );
        let err = stream
            .push(&payload(
                json!({"promptFeedback": {"blockReason": "SAFETY"}}),
            ))
            .unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
    }

    #[test]
    fn content_after_the_end_is_refused() {
        let mut stream = GeminiToOpenAi::new("g", 1);
        stream
            .push(&payload(
                json!({"candidates": [{"content": {"parts": [{"text": "a"}]},
                "finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 1}}),
            ))
            .unwrap();
        assert!(
            stream
                .push(&payload(json!({"usageMetadata": {"promptTokenCount": 1}})))
                .unwrap()
                .is_empty()
        );
        assert!(
            stream
                .push(&payload(
                    json!({"candidates": [{"content": {"parts": [{"text": "b"}]}}]})
                ))
                .is_err()
        );
    }
}
