//! Gemini `GenerateContentResponse` -> OpenAI `chat.completion`, and the pieces of it the
//! stream translation shares: the typed response, usage, finish reasons, tool calls, logprobs.

use super::{PROVIDER, Translated};
use bytes::Bytes;
use gateway_core::GatewayError;
use gateway_core::openai::{CompletionTokensDetails, PromptTokensDetails, Usage};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The fields of a `GenerateContentResponse` (or of one streamed chunk) the translation reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GenerateContentResponse {
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    pub usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    pub response_id: Option<String>,
    /// An error sent in place of a chunk once the stream has started.
    #[serde(default)]
    pub error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Candidate {
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub index: Option<u32>,
    #[serde(default)]
    pub logprobs_result: Option<LogprobsResult>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Content {
    #[serde(default)]
    pub parts: Vec<Part>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Part {
    #[serde(default)]
    pub text: Option<String>,
    /// Thought summaries are the model's reasoning, not its answer.
    #[serde(default)]
    pub thought: bool,
    #[serde(default)]
    pub function_call: Option<FunctionCall>,
    #[serde(default)]
    pub thought_signature: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub args: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PromptFeedback {
    #[serde(default)]
    pub block_reason: Option<String>,
    #[serde(default)]
    pub block_reason_message: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UsageMetadata {
    #[serde(default)]
    pub prompt_token_count: Option<u64>,
    #[serde(default)]
    pub candidates_token_count: Option<u64>,
    #[serde(default)]
    pub cached_content_token_count: Option<u64>,
    #[serde(default)]
    pub thoughts_token_count: Option<u64>,
    #[serde(default)]
    pub tool_use_prompt_token_count: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LogprobsResult {
    #[serde(default)]
    pub top_candidates: Vec<TopCandidates>,
    #[serde(default)]
    pub chosen_candidates: Vec<LogprobCandidate>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct TopCandidates {
    #[serde(default)]
    pub candidates: Vec<LogprobCandidate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LogprobCandidate {
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub log_probability: f64,
}

impl GenerateContentResponse {
    pub(crate) fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        serde_json::from_slice(body).map_err(|err| GatewayError::UpstreamProtocol {
            provider: PROVIDER.into(),
            reason: format!("the Gemini response is not a GenerateContentResponse: {err}"),
        })
    }

    /// A prompt Gemini refused to answer: no candidates and a block reason. That is the
    /// client's content, hence a 400 rather than an upstream failure.
    pub(crate) fn blocked(&self) -> Option<GatewayError> {
        if !self.candidates.is_empty() {
            return None;
        }
        let feedback = self.prompt_feedback.as_ref()?;
        let reason = feedback.block_reason.as_deref()?;
        let mut message = format!("Gemini blocked the prompt (blockReason: {reason}).");
        if let Some(detail) = feedback.block_reason_message.as_deref() {
            message.push(' ');
            message.push_str(detail);
        }
        Some(GatewayError::invalid_request(
            message,
            Some("messages".into()),
        ))
    }
}

/// Gemini's token counts in OpenAI's terms. Thinking tokens are billed as output, so they are
/// completion tokens (and reported again as reasoning tokens, as OpenAI does); tokens of tool
/// results Gemini fetched itself are billed as input, so they are prompt tokens.
pub(crate) fn usage_from(metadata: &UsageMetadata) -> Usage {
    let prompt = metadata.prompt_token_count.unwrap_or(0)
        + metadata.tool_use_prompt_token_count.unwrap_or(0);
    let thoughts = metadata.thoughts_token_count;
    let completion = metadata.candidates_token_count.unwrap_or(0) + thoughts.unwrap_or(0);
    let mut usage = Usage::new(prompt, completion);
    if let Some(cached) = metadata.cached_content_token_count {
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: Some(cached),
            cache_write_tokens: None,
        });
    }
    if let Some(reasoning) = thoughts {
        usage.completion_tokens_details = Some(CompletionTokensDetails {
            reasoning_tokens: Some(reasoning),
        });
    }
    usage
}

/// Gemini's finish reason in OpenAI's vocabulary. Reasons with no OpenAI counterpart
/// (`MALFORMED_FUNCTION_CALL`, `OTHER`...) end the answer like a plain stop.
pub(crate) fn finish_reason(reason: &str, called_functions: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION" => "content_filter",
        _ if called_functions => "tool_calls",
        _ => "stop",
    }
}

/// Ids for a response: Gemini's `responseId` when it sent one, so the client's id matches
/// Google's logs; otherwise a fresh one.
pub(crate) struct ResponseIds {
    pub id: String,
    /// Makes tool call ids unique across the conversation, since clients may key tool
    /// results by id over several turns.
    call_prefix: String,
}

impl ResponseIds {
    pub(crate) fn new(response_id: Option<&str>) -> Self {
        match response_id.filter(|id| !id.is_empty()) {
            Some(id) => Self {
                id: id.to_owned(),
                call_prefix: format!("call_{id}"),
            },
            None => {
                let token = unique_token();
                Self {
                    id: format!("chatcmpl-gemini-{token}"),
                    call_prefix: format!("call_{token}"),
                }
            }
        }
    }

    pub(crate) fn call_id(&self, position: usize) -> String {
        format!("{}_{position}", self.call_prefix)
    }
}

/// 32 hex digits, unique within the process (a counter) and across restarts (the std
/// library's randomly keyed hasher, seeded from the OS).
fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(count);
    let random = hasher.finish();
    format!("{random:016x}{count:016x}")
}

/// One OpenAI tool call. The thought signature Gemini attaches to a call goes where Google's
/// own OpenAI-compatible endpoint puts it, so clients replaying the message send it back.
pub(crate) fn tool_call(id: String, call: &FunctionCall, signature: Option<&str>) -> Value {
    let arguments = match &call.args {
        Some(args) if !args.is_null() => args.to_string(),
        _ => "{}".to_owned(),
    };
    let mut value = json!({
        "id": id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    });
    if let (Some(signature), Value::Object(map)) = (signature, &mut value) {
        map.insert(
            "extra_content".into(),
            json!({"google": {"thought_signature": signature}}),
        );
    }
    value
}

/// Gemini's chosen-token log probabilities as OpenAI's `logprobs.content`.
pub(crate) fn logprobs(result: &LogprobsResult) -> Value {
    let entry = |candidate: &LogprobCandidate| {
        json!({
            "token": candidate.token,
            "logprob": candidate.log_probability,
            "bytes": candidate.token.as_bytes(),
        })
    };
    let content: Vec<Value> = result
        .chosen_candidates
        .iter()
        .enumerate()
        .map(|(position, chosen)| {
            let mut value = entry(chosen);
            let top: Vec<Value> = result
                .top_candidates
                .get(position)
                .map(|top| top.candidates.iter().map(entry).collect())
                .unwrap_or_default();
            if let Value::Object(map) = &mut value {
                map.insert("top_logprobs".into(), Value::Array(top));
            }
            value
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

/// Translates a complete (non-streamed) Gemini answer into an OpenAI `chat.completion` body.
pub fn to_openai_response(
    gemini_body: &[u8],
    model: &str,
    created: i64,
) -> Result<Translated, GatewayError> {
    let response = GenerateContentResponse::parse(gemini_body)?;
    if let Some(error) = response.error.as_ref() {
        return Err(super::error::from_error_value(PROVIDER, None, error));
    }
    if let Some(blocked) = response.blocked() {
        return Err(blocked);
    }
    if response.candidates.is_empty() {
        return Err(GatewayError::UpstreamProtocol {
            provider: PROVIDER.into(),
            reason: "the Gemini response has no candidates and no block reason".into(),
        });
    }
    let ids = ResponseIds::new(response.response_id.as_deref());
    let mut calls = 0;
    let mut candidates: Vec<(u32, &Candidate)> = response
        .candidates
        .iter()
        .enumerate()
        .map(|(position, candidate)| {
            let index = candidate
                .index
                .unwrap_or_else(|| u32::try_from(position).unwrap_or(u32::MAX));
            (index, candidate)
        })
        .collect();
    candidates.sort_by_key(|(index, _)| *index);

    let choices: Vec<Value> = candidates
        .into_iter()
        .map(|(index, candidate)| {
            let mut text: Option<String> = None;
            let mut tool_calls = Vec::new();
            for part in candidate.content.iter().flat_map(|content| &content.parts) {
                if part.thought {
                    continue;
                }
                if let Some(piece) = &part.text {
                    text.get_or_insert_with(String::new).push_str(piece);
                }
                if let Some(call) = &part.function_call {
                    tool_calls.push(tool_call(
                        ids.call_id(calls),
                        call,
                        part.thought_signature.as_deref(),
                    ));
                    calls += 1;
                }
            }
            let finish = finish_reason(
                candidate.finish_reason.as_deref().unwrap_or("STOP"),
                !tool_calls.is_empty(),
            );
            let mut message = Map::new();
            message.insert("role".into(), json!("assistant"));
            message.insert("content".into(), json!(text));
            message.insert("refusal".into(), Value::Null);
            if !tool_calls.is_empty() {
                message.insert("tool_calls".into(), Value::Array(tool_calls));
            }
            json!({
                "index": index,
                "message": message,
                "logprobs": candidate.logprobs_result.as_ref().map(logprobs),
                "finish_reason": finish,
            })
        })
        .collect();

    let usage = response.usage_metadata.as_ref().map(usage_from);
    let mut body = json!({
        "id": ids.id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
    });
    if let (Some(usage), Value::Object(map)) = (usage, &mut body) {
        map.insert("usage".into(), json!(usage));
    }
    let bytes = serde_json::to_vec(&body)
        .map_err(|err| GatewayError::Internal(format!("encoding the completion: {err}")))?;
    Ok(Translated {
        body: Bytes::from(bytes),
        usage,
        response_id: Some(ids.id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> (Value, Translated) {
        let translated = to_openai_response(body.to_string().as_bytes(), "gemini-x", 7).unwrap();
        let value = serde_json::from_slice(&translated.body).unwrap();
        (value, translated)
    }

    #[test]
    fn thoughts_are_not_content_and_count_as_completion() {
        let (body, translated) = translate(json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "thinking...", "thought": true},
                {"text": "Hello"}, {"text": " world"}
            ]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 2,
                              "thoughtsTokenCount": 5, "totalTokenCount": 17}
        }));
        assert_eq!(body["choices"][0]["message"]["content"], "Hello world");
        assert_eq!(body["usage"]["completion_tokens"], 7);
        assert_eq!(body["usage"]["total_tokens"], 17);
        let usage = translated.usage.unwrap();
        assert_eq!(usage.reasoning_tokens(), 5);
        let id = translated.response_id.unwrap();
        assert!(id.starts_with("chatcmpl-gemini-"), "{id}");
        assert_eq!(body["id"], id);
    }

    #[test]
    fn generated_ids_differ_between_responses() {
        let a = ResponseIds::new(None);
        let b = ResponseIds::new(None);
        assert_ne!(a.id, b.id);
        assert_ne!(a.call_id(0), b.call_id(0));
        assert_eq!(ResponseIds::new(Some("r1")).call_id(2), "call_r1_2");
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(finish_reason("STOP", false), "stop");
        assert_eq!(finish_reason("STOP", true), "tool_calls");
        assert_eq!(finish_reason("MAX_TOKENS", true), "length");
        for reason in [
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
        ] {
            assert_eq!(finish_reason(reason, false), "content_filter");
        }
        assert_eq!(finish_reason("MALFORMED_FUNCTION_CALL", false), "stop");
    }

    #[test]
    fn garbage_and_empty_answers_are_protocol_errors() {
        let err = to_openai_response(b"<html>", "m", 0).unwrap_err();
        assert!(
            matches!(err, GatewayError::UpstreamProtocol { .. }),
            "{err:?}"
        );
        let err = to_openai_response(b"{}", "m", 0).unwrap_err();
        assert!(
            matches!(err, GatewayError::UpstreamProtocol { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn logprobs_are_translated() {
        let (body, _) = translate(json!({
            "responseId": "r",
            "candidates": [{"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP",
                "logprobsResult": {
                    "topCandidates": [{"candidates": [
                        {"token": "Hi", "logProbability": -0.1},
                        {"token": "Hey", "logProbability": -2.5}]}],
                    "chosenCandidates": [{"token": "Hi", "logProbability": -0.1}]}}]
        }));
        assert_eq!(
            body["choices"][0]["logprobs"],
            json!({"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                                 {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]}]}],
                   "refusal": null})
        );
    }
}
