//! Streaming shared by every format: an event script, the faults cut into it, and the body that
//! plays it one frame at a time while counting how the stream ended.
//!
//! Formats differ only in the bytes of their events, so each builds a [`Script`] and the
//! injected faults (`reset_after_chunks`, `stream_error_after_chunks`) and the stats behave the
//! same whatever the vendor.

use crate::behaviour::Behaviour;
use crate::server::{BilledUsage, Body, BoxError, Shared};
use bytes::Bytes;
use http::Response;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// A stream's events, split where faults may cut it.
pub(crate) struct Script {
    /// Events before the first content event (role chunk, `message_start`, ...).
    pub(crate) prelude: Vec<Bytes>,
    /// The events that count as chunks for `reset_after_chunks` / `stream_error_after_chunks`.
    pub(crate) content: Vec<Bytes>,
    /// Events after the content, the last of which completes the stream.
    pub(crate) trailer: Vec<Bytes>,
    /// What `stream_error_after_chunks` sends in place of the rest.
    pub(crate) error_event: Bytes,
    /// The index in `trailer` of the event that reports the usage, and that usage: counted
    /// (see [`BilledUsage`]) when the event is handed to the connection. `None`: the stream
    /// reports no usage the mock counts.
    pub(crate) billing: Option<(usize, BilledUsage)>,
}

pub(crate) enum Step {
    Event(Bytes),
    /// An event that reports the usage, counted when it is handed to the connection.
    Billed(Bytes, BilledUsage),
    /// The event that completes the stream.
    Last(Bytes),
    /// The in-band error event; the stream ends cleanly after it.
    Failure(Bytes),
    Reset,
}

impl Script {
    /// The events in order, with the fault the behaviour asks for (if any) in its place.
    pub(crate) fn steps(self, behaviour: &Behaviour) -> VecDeque<Step> {
        let mut steps: VecDeque<Step> = self.prelude.into_iter().map(Step::Event).collect();
        let fault = match (
            behaviour.reset_after_chunks,
            behaviour.stream_error_after_chunks,
        ) {
            (Some(after), _) => Some((after, Step::Reset)),
            (None, Some(after)) => Some((after, Step::Failure(self.error_event))),
            (None, None) => None,
        };
        if let Some((after, fault)) = fault {
            steps.extend(self.content.into_iter().take(after).map(Step::Event));
            steps.push_back(fault);
            return steps;
        }
        steps.extend(self.content.into_iter().map(Step::Event));
        let mut billing = self.billing;
        for (index, event) in self.trailer.into_iter().enumerate() {
            match billing.take_if(|(at, _)| *at == index) {
                Some((_, usage)) => steps.push_back(Step::Billed(event, usage)),
                None => steps.push_back(Step::Event(event)),
            }
        }
        if let Some(Step::Event(last)) = steps.pop_back() {
            steps.push_back(Step::Last(last));
        }
        steps
    }
}

/// `data: <json>\n\n`, the only line OpenAI and Gemini streams use.
pub(crate) fn data_event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// `event: <name>\ndata: <json>\n\n`, as Anthropic names every event.
pub(crate) fn named_event(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

/// Counts how a stream ended. It lives inside the body, so hyper dropping the body early
/// (the client went away) is what makes it count an abort.
struct StreamGuard {
    shared: Arc<Shared>,
    ended: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.shared.update_stats(|stats| stats.streams_aborted += 1);
        }
    }
}

struct StreamState {
    steps: VecDeque<Step>,
    pause: Duration,
    first: bool,
    guard: StreamGuard,
}

#[derive(Debug)]
struct DeliberateReset;

impl std::fmt::Display for DeliberateReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock upstream reset the stream on purpose")
    }
}

impl std::error::Error for DeliberateReset {}

/// A `text/event-stream` answer that plays `steps`, pausing `chunk_delay_ms` between events.
pub(crate) fn stream_response(
    shared: &Arc<Shared>,
    steps: VecDeque<Step>,
    behaviour: &Behaviour,
) -> Response<Body> {
    shared.update_stats(|stats| stats.streams_started += 1);
    let state = StreamState {
        steps,
        pause: Duration::from_millis(behaviour.chunk_delay_ms),
        first: true,
        guard: StreamGuard {
            shared: shared.clone(),
            ended: false,
        },
    };
    let frames = futures_util::stream::unfold(state, next_frame);
    let body = BodyExt::boxed_unsync(StreamBody::new(frames));

    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn next_frame(
    mut state: StreamState,
) -> Option<(Result<Frame<Bytes>, BoxError>, StreamState)> {
    let step = state.steps.pop_front()?;
    if !state.first && !state.pause.is_zero() {
        tokio::time::sleep(state.pause).await;
    }
    state.first = false;
    match step {
        Step::Event(bytes) => Some((Ok(Frame::data(bytes)), state)),
        Step::Billed(bytes, usage) => {
            state.guard.shared.bill(usage);
            Some((Ok(Frame::data(bytes)), state))
        }
        Step::Last(bytes) => {
            state.guard.ended = true;
            state
                .guard
                .shared
                .update_stats(|stats| stats.streams_completed += 1);
            Some((Ok(Frame::data(bytes)), state))
        }
        Step::Failure(bytes) => {
            state.guard.ended = true;
            state
                .guard
                .shared
                .update_stats(|stats| stats.stream_errors += 1);
            state.steps.clear();
            Some((Ok(Frame::data(bytes)), state))
        }
        Step::Reset => {
            // One pending poll makes hyper flush the chunks already written, so the client
            // sees them before the connection dies, as it would with a real mid-stream failure.
            tokio::task::yield_now().await;
            state.guard.ended = true;
            state.guard.shared.update_stats(|stats| stats.resets += 1);
            state.steps.clear();
            Some((Err(Box::new(DeliberateReset) as BoxError), state))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(content: usize) -> Script {
        Script {
            prelude: vec![Bytes::from_static(b"role")],
            content: (0..content).map(|i| Bytes::from(format!("c{i}"))).collect(),
            trailer: vec![Bytes::from_static(b"finish"), Bytes::from_static(b"done")],
            error_event: Bytes::from_static(b"error"),
            billing: None,
        }
    }

    fn describe(steps: &VecDeque<Step>) -> Vec<String> {
        steps
            .iter()
            .map(|step| match step {
                Step::Event(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Step::Billed(bytes, _) => format!("billed:{}", String::from_utf8_lossy(bytes)),
                Step::Last(bytes) => format!("last:{}", String::from_utf8_lossy(bytes)),
                Step::Failure(bytes) => format!("failure:{}", String::from_utf8_lossy(bytes)),
                Step::Reset => "reset".to_owned(),
            })
            .collect()
    }

    #[test]
    fn faults_cut_after_content_chunks() {
        let plain = Behaviour::default();
        assert_eq!(
            describe(&script(3).steps(&plain)),
            ["role", "c0", "c1", "c2", "finish", "last:done"]
        );
        let reset = Behaviour {
            reset_after_chunks: Some(2),
            ..Behaviour::default()
        };
        assert_eq!(
            describe(&script(3).steps(&reset)),
            ["role", "c0", "c1", "reset"]
        );
        let late_error = Behaviour {
            stream_error_after_chunks: Some(10),
            ..Behaviour::default()
        };
        assert_eq!(
            describe(&script(2).steps(&late_error)),
            ["role", "c0", "c1", "failure:error"]
        );
        let both = Behaviour {
            reset_after_chunks: Some(0),
            stream_error_after_chunks: Some(1),
            ..Behaviour::default()
        };
        assert_eq!(describe(&script(2).steps(&both)), ["role", "reset"]);
    }

    #[test]
    fn the_usage_event_is_billed_unless_a_fault_cuts_it() {
        let usage = BilledUsage {
            upstream_request_id: "req-up-1".to_owned(),
            client_request_id: None,
            prompt_tokens: 3,
            completion_tokens: 2,
            streamed: true,
        };
        let billed = || Script {
            billing: Some((0, usage.clone())),
            ..script(2)
        };
        assert_eq!(
            describe(&billed().steps(&Behaviour::default())),
            ["role", "c0", "c1", "billed:finish", "last:done"]
        );
        let reset = Behaviour {
            reset_after_chunks: Some(1),
            ..Behaviour::default()
        };
        assert_eq!(describe(&billed().steps(&reset)), ["role", "c0", "reset"]);
    }
}
