//! Turning an upstream OpenAI SSE body into [`StreamEvent`]s.

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use gateway_core::GatewayError;
use gateway_core::openai::CompletionSummary;
use gateway_core::provider::{StreamEvent, StreamEventKind};

/// Parses an OpenAI chat-completion event stream. Each event is classified (delta, usage-only,
/// done) and its usage read, without re-encoding the vendor's JSON.
pub(crate) fn openai_events<S, E>(
    provider: String,
    body: S,
) -> impl Stream<Item = Result<StreamEvent, GatewayError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    body.eventsource().filter_map(move |event| {
        let item = match event {
            Ok(event) if event.data.is_empty() => None,
            Ok(event) if event.data == "[DONE]" => Some(Ok(StreamEvent::done())),
            Ok(event) => {
                let summary = CompletionSummary::parse(event.data.as_bytes()).unwrap_or_default();
                let kind = if summary.is_usage_only_chunk() {
                    StreamEventKind::UsageOnly
                } else {
                    StreamEventKind::Delta
                };
                Some(Ok(StreamEvent {
                    data: Bytes::from(event.data),
                    kind,
                    usage: summary.usage,
                    response_id: summary.id,
                }))
            }
            Err(err) => Some(Err(GatewayError::UpstreamUnavailable {
                provider: provider.clone(),
                reason: format!("stream interrupted: {err}"),
            })),
        };
        std::future::ready(item)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    #[tokio::test]
    async fn splits_events_across_arbitrary_chunk_boundaries() {
        let wire = concat!(
            "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            ": keep-alive comment\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\n",
            "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3,\"total_tokens\":5}}\n\n",
            "data: [DONE]\n\n"
        );
        // Feed it three bytes at a time, as a slow network might.
        let pieces: Vec<Result<Bytes, std::io::Error>> = wire
            .as_bytes()
            .chunks(3)
            .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
            .collect();
        let events: Vec<_> = openai_events("p".into(), stream::iter(pieces))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                StreamEventKind::Delta,
                StreamEventKind::Delta,
                StreamEventKind::UsageOnly,
                StreamEventKind::Done
            ]
        );
        assert_eq!(events[2].usage.unwrap().completion_tokens, 3);
        assert_eq!(events[0].response_id.as_deref(), Some("c1"));
    }

    #[tokio::test]
    async fn transport_error_becomes_an_upstream_error() {
        let pieces: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"data: {\"choices\":[{}]}\n\n")),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset",
            )),
        ];
        let events: Vec<_> = openai_events("p".into(), stream::iter(pieces))
            .collect()
            .await;
        assert!(events[0].is_ok());
        assert!(matches!(
            events[1],
            Err(GatewayError::UpstreamUnavailable { .. })
        ));
    }
}
