//! Usage accounting for OpenAI APIs that are forwarded rather than translated: the Responses
//! API (plain and streamed) and image generation, which report usage in the Responses shape
//! (`input_tokens`, `output_tokens`, `*_details`).

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use gateway_core::GatewayError;
use gateway_core::openai::{CompletionTokensDetails, PromptTokensDetails, Usage};
use gateway_core::provider::ForwardChunk;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
struct ResponsesUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    input_tokens_details: Option<InputDetails>,
    #[serde(default)]
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct InputDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct OutputDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<ResponsesUsage> for Usage {
    fn from(usage: ResponsesUsage) -> Self {
        let mut converted = Usage::new(usage.input_tokens, usage.output_tokens);
        if let Some(cached) = usage.input_tokens_details.and_then(|d| d.cached_tokens) {
            converted.prompt_tokens_details = Some(PromptTokensDetails {
                cached_tokens: Some(cached),
                cache_write_tokens: None,
            });
        }
        if let Some(reasoning) = usage.output_tokens_details.and_then(|d| d.reasoning_tokens) {
            converted.completion_tokens_details = Some(CompletionTokensDetails {
                reasoning_tokens: Some(reasoning),
            });
        }
        converted
    }
}

#[derive(Debug, Default, Deserialize)]
struct Summary {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    usage: Option<ResponsesUsage>,
}

/// The id and usage of a Responses object or an image generation answer.
pub(crate) fn summary(body: &[u8]) -> (Option<String>, Option<Usage>) {
    serde_json::from_slice::<Summary>(body)
        .map(|summary| (summary.id, summary.usage.map(Usage::from)))
        .unwrap_or_default()
}

/// The final events of a Responses stream; the response object they carry has the usage.
const FINAL_EVENTS: [&str; 3] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
];

#[derive(Debug, Deserialize)]
struct ResponseEvent {
    #[serde(default)]
    response: Option<Summary>,
}

/// Re-frames each Responses stream event unchanged, reading the final usage on the way.
pub(crate) fn forwarded_events<S, E>(
    provider: String,
    body: S,
) -> impl Stream<Item = Result<ForwardChunk, GatewayError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut response_id: Option<String> = None;
    body.eventsource().map(move |event| {
        let event = event.map_err(|err| GatewayError::UpstreamUnavailable {
            provider: provider.clone(),
            reason: format!("stream interrupted: {err}"),
        })?;
        let name = event.event.as_str();
        let last = FINAL_EVENTS.contains(&name);
        let mut usage = None;
        if (name == "response.created" || last)
            && let Ok(ResponseEvent {
                response: Some(summary),
            }) = serde_json::from_str::<ResponseEvent>(&event.data)
        {
            if response_id.is_none() {
                response_id = summary.id;
            }
            usage = summary.usage.map(Usage::from);
        }
        Ok(ForwardChunk {
            bytes: crate::sse::reframe(&event),
            usage,
            response_id: response_id.clone(),
            first_output: name == "response.output_text.delta",
            last,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    #[test]
    fn reads_responses_usage_with_details() {
        let (id, usage) = summary(
            br#"{"id":"resp_1","object":"response","usage":{"input_tokens":10,
                "input_tokens_details":{"cached_tokens":4},"output_tokens":7,
                "output_tokens_details":{"reasoning_tokens":3},"total_tokens":17}}"#,
        );
        assert_eq!(id.as_deref(), Some("resp_1"));
        let usage = usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (10, 7));
        assert_eq!(usage.cached_tokens(), 4);
        assert_eq!(usage.reasoning_tokens(), 3);
        assert_eq!(summary(b"not json"), (None, None));
    }

    #[tokio::test]
    async fn stream_usage_comes_from_the_completed_event() {
        let wire = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_9\"}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_9\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n"
        );
        let chunks: Vec<ForwardChunk> = forwarded_events(
            "p".into(),
            stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from_static(
                wire.as_bytes(),
            ))]),
        )
        .map(Result::unwrap)
        .collect()
        .await;
        assert_eq!(chunks.len(), 3);
        assert!(chunks[1].first_output);
        assert!(chunks[2].last);
        assert_eq!(chunks[2].usage, Some(Usage::new(3, 1)));
        assert_eq!(chunks[2].response_id.as_deref(), Some("resp_9"));
        // Forwarded byte for byte (one event a frame).
        let joined: String = chunks
            .iter()
            .map(|c| String::from_utf8(c.bytes.to_vec()).unwrap())
            .collect();
        assert_eq!(joined, wire);
    }
}
