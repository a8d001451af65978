//! `POST /v1/chat/completions`: the plain answer, the SSE stream, and injected faults.

use crate::behaviour::Behaviour;
use crate::server::{Body, BoxError, RecordedRequest, Shared, error_response, json_response};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) async fn handle(
    shared: &Arc<Shared>,
    parts: Parts,
    path: String,
    bytes: &[u8],
) -> Response<Body> {
    let parsed = serde_json::from_slice::<Value>(bytes);
    let n = shared.next_id();
    shared.update_stats(|stats| stats.chat_requests += 1);
    shared.record(RecordedRequest {
        method: parts.method,
        path,
        headers: parts.headers,
        body: parsed.as_ref().map_or(Value::Null, Clone::clone),
    });

    let mut response = match parsed {
        Ok(body) => answer(shared, n, &body).await,
        Err(err) => error_response(
            StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request: {err}"),
            "invalid_request_error",
        ),
    };
    if let Ok(value) = HeaderValue::from_str(&format!("req-up-{n}")) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn answer(shared: &Arc<Shared>, n: u64, body: &Value) -> Response<Body> {
    let behaviour = shared.behaviour().for_request(body);
    if behaviour.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behaviour.delay_ms)).await;
    }

    if let Some(status) = behaviour.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if !status.is_success() {
            let kind = if status == StatusCode::TOO_MANY_REQUESTS {
                "rate_limit_error"
            } else {
                "server_error"
            };
            let mut response = error_response(
                status,
                &format!("mock upstream error {}", status.as_u16()),
                kind,
            );
            if let Some(secs) = behaviour.retry_after_secs {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            return response;
        }
    }

    let completion = Completion::new(n, body, &behaviour);
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        stream_response(shared, &completion, &behaviour, include_usage)
    } else {
        json_response(StatusCode::OK, &completion.plain())
    }
}

/// Everything an answer to one request is made of, plain or streamed.
struct Completion {
    id: String,
    created: u64,
    model: Value,
    pieces: Vec<String>,
    usage: Value,
}

impl Completion {
    fn new(n: u64, body: &Value, behaviour: &Behaviour) -> Self {
        let pieces: Vec<String> = (0..behaviour.chunk_count())
            .map(|i| format!("tok{i} "))
            .collect();
        let prompt_tokens = prompt_tokens(body);
        let completion_tokens = pieces.len() as u64;
        Self {
            id: format!("chatcmpl-up-{n}"),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs()),
            model: body.get("model").cloned().unwrap_or(Value::Null),
            pieces,
            usage: json!({
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }),
        }
    }

    fn plain(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.pieces.concat()},
                "finish_reason": "stop",
            }],
            "usage": self.usage,
        })
    }

    fn chunk(&self, choices: Value, usage: Option<&Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let (Some(usage), Some(object)) = (usage, chunk.as_object_mut()) {
            object.insert("usage".into(), usage.clone());
        }
        chunk
    }

    /// The stream's events in order, with the deliberate reset (if any) in its place.
    fn events(&self, include_usage: bool, reset_after: Option<usize>) -> VecDeque<Step> {
        // OpenAI puts `"usage": null` on every chunk once usage was asked for.
        let null_usage = include_usage.then_some(&Value::Null);
        let delta = |delta: Value, finish: Value| {
            let choices = json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
            Step::Event(sse(&self.chunk(choices, null_usage)))
        };
        let mut steps = VecDeque::new();
        steps.push_back(delta(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        ));
        for piece in &self.pieces {
            steps.push_back(delta(json!({"content": piece}), Value::Null));
        }
        if let Some(after) = reset_after {
            // Role chunk first, then `after` content chunks, then the reset.
            steps.truncate(1 + after.min(self.pieces.len()));
            steps.push_back(Step::Reset);
            return steps;
        }
        steps.push_back(delta(json!({}), json!("stop")));
        if include_usage {
            steps.push_back(Step::Event(sse(&self.chunk(json!([]), Some(&self.usage)))));
        }
        steps.push_back(Step::Done);
        steps
    }
}

/// `ceil(chars / 4) + 1` over every string content; documented in the crate docs because tests
/// compute it independently.
fn prompt_tokens(body: &Value) -> u64 {
    let chars: usize = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|messages| {
            messages
                .iter()
                .filter_map(|message| message.get("content")?.as_str())
                .map(|text| text.chars().count())
                .sum()
        })
        .unwrap_or(0);
    (chars as u64).div_ceil(4) + 1
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

enum Step {
    Event(Bytes),
    Done,
    Reset,
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

fn stream_response(
    shared: &Arc<Shared>,
    completion: &Completion,
    behaviour: &Behaviour,
    include_usage: bool,
) -> Response<Body> {
    shared.update_stats(|stats| stats.streams_started += 1);
    let state = StreamState {
        steps: completion.events(include_usage, behaviour.reset_after_chunks),
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
        Step::Done => {
            state.guard.ended = true;
            state
                .guard
                .shared
                .update_stats(|stats| stats.streams_completed += 1);
            Some((
                Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))),
                state,
            ))
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

    #[test]
    fn prompt_token_formula() {
        let body = json!({"messages": [
            {"role": "system", "content": "abcd"},
            {"role": "user", "content": "é"},
            {"role": "user", "content": [{"type": "text", "text": "ignored"}]},
        ]});
        // 5 characters: ceil(5 / 4) + 1.
        assert_eq!(prompt_tokens(&body), 3);
        assert_eq!(prompt_tokens(&json!({})), 1);
    }

    #[test]
    fn reset_truncates_after_content_chunks() {
        let behaviour = Behaviour {
            chunks: Some(3),
            ..Behaviour::default()
        };
        let completion = Completion::new(1, &json!({"model": "m"}), &behaviour);
        let steps = completion.events(true, Some(2));
        assert_eq!(steps.len(), 4);
        assert!(matches!(steps.back(), Some(Step::Reset)));
        let steps = completion.events(false, Some(10));
        assert_eq!(steps.len(), 5);
        let steps = completion.events(true, None);
        // role, 3 content, finish, usage, done
        assert_eq!(steps.len(), 7);
    }
}
