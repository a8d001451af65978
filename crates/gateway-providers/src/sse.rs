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

/// An SSE event written back out as its vendor sent it (`event:` line when named, `data:`),
/// for streams forwarded to a client of the vendor's own format.
pub(crate) fn reframe(event: &eventsource_stream::Event) -> Bytes {
    let mut frame = String::with_capacity(event.event.len() + event.data.len() + 16);
    if !event.event.is_empty() {
        frame.push_str("event: ");
        frame.push_str(&event.event);
        frame.push('\n');
    }
    frame.push_str("data: ");
    frame.push_str(&event.data);
    frame.push_str("\n\n");
    Bytes::from(frame)
}

/// A vendor's stream translator: SSE events in, OpenAI events out.
pub(crate) trait EventTranslator: Send + 'static {
    /// One SSE event (its `event:` name, empty when absent, and its `data:`).
    fn push(&mut self, event: &str, data: &str) -> Result<Vec<StreamEvent>, GatewayError>;

    /// The upstream body ended cleanly: whatever the translator still owes the client.
    fn finish(&mut self) -> Vec<StreamEvent> {
        Vec::new()
    }
}

struct Translating<E, T> {
    provider: String,
    events: E,
    translator: T,
    pending: std::collections::VecDeque<StreamEvent>,
    done: bool,
}

/// Runs a vendor's SSE body through `translator`, yielding OpenAI events as they are produced.
/// A transport failure or a translator error ends the stream with that error.
pub(crate) fn translated_events<S, E, T>(
    provider: String,
    body: S,
    translator: T,
) -> impl Stream<Item = Result<StreamEvent, GatewayError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
    T: EventTranslator,
{
    let state = Translating {
        provider,
        events: Box::pin(body.eventsource()),
        translator,
        pending: std::collections::VecDeque::new(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((Ok(event), state));
            }
            if state.done {
                return None;
            }
            match state.events.next().await {
                Some(Ok(event)) => match state.translator.push(&event.event, &event.data) {
                    Ok(events) => state.pending.extend(events),
                    Err(err) => {
                        state.done = true;
                        return Some((Err(err), state));
                    }
                },
                Some(Err(err)) => {
                    state.done = true;
                    let err = GatewayError::UpstreamUnavailable {
                        provider: state.provider.clone(),
                        reason: format!("stream interrupted: {err}"),
                    };
                    return Some((Err(err), state));
                }
                None => {
                    state.done = true;
                    let rest = state.translator.finish();
                    state.pending.extend(rest);
                }
            }
        }
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

    /// Upper-cases text deltas and says goodbye at the end: enough to see the plumbing.
    struct Shouting;

    impl EventTranslator for Shouting {
        fn push(&mut self, event: &str, data: &str) -> Result<Vec<StreamEvent>, GatewayError> {
            if event == "fail" {
                return Err(GatewayError::Internal("told to fail".into()));
            }
            Ok(vec![StreamEvent {
                data: Bytes::from(data.to_uppercase()),
                kind: StreamEventKind::Delta,
                usage: None,
                response_id: None,
            }])
        }

        fn finish(&mut self) -> Vec<StreamEvent> {
            vec![StreamEvent::done()]
        }
    }

    fn wire(text: &'static str) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        stream::iter(
            text.as_bytes()
                .chunks(5)
                .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn translator_sees_named_events_and_finishes() {
        let events: Vec<_> = translated_events(
            "p".into(),
            wire("event: a\ndata: one\n\ndata: two\n\n"),
            Shouting,
        )
        .map(Result::unwrap)
        .collect()
        .await;
        let data: Vec<_> = events.iter().map(|e| e.data.clone()).collect();
        assert_eq!(data, ["ONE", "TWO", "[DONE]"]);
    }

    #[tokio::test]
    async fn translator_error_ends_the_stream() {
        let events: Vec<_> = translated_events(
            "p".into(),
            wire("data: one\n\nevent: fail\ndata: x\n\ndata: never\n\n"),
            Shouting,
        )
        .collect()
        .await;
        assert_eq!(events.len(), 2);
        assert!(events[1].is_err());
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
