//! Prompt and response capture on the request path, for the projects that opted in.
//!
//! [`begin`] runs once the body is read: for a project with capture on it keeps the body
//! (a reference-counted `Bytes`, no copy) and registers a finish hook that logs the redacted
//! text when the request is over, with the alias routing settled on and the final status.
//! [`tap`] lets the response body through untouched while [`ResponseText`] collects its text
//! (bounded), so a stream is captured as the client saw it, without buffering it.
//! For every other project both are a map lookup and nothing more.

use crate::service::ResponseBody;
use crate::state::Snapshot;
use bytes::Bytes;
use gateway_core::{Principal, RequestContext};
use gateway_observability::ResponseText;
use gateway_observability::capture::{CaptureLabels, prompt_text};
use http::Response;
use http::header::CONTENT_TYPE;
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

type SharedText = Arc<Mutex<Option<ResponseText>>>;

/// The response side of a capture, handed to [`tap`].
pub(crate) struct CaptureTap {
    text: SharedText,
}

/// Starts capturing a request of `principal`'s project, if it opted in.
pub(crate) fn begin(
    context: &RequestContext,
    principal: &Principal,
    snapshot: &Snapshot,
    body: &Bytes,
) -> Option<CaptureTap> {
    let wanted = snapshot.capture.for_project(&principal.project);
    if !wanted.any() {
        return None;
    }
    let policy = snapshot.capture.clone();
    let prompt = wanted.prompts.then(|| body.clone());
    let text: Option<SharedText> = wanted
        .responses
        .then(|| Arc::new(Mutex::new(Some(policy.response_text()))));
    let collected = text.clone();
    let project = principal.project.clone();
    context.on_finish(move |finished| {
        let prompt = prompt.as_deref().map(prompt_text);
        let response = collected.and_then(|text| {
            text.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .map(ResponseText::finish)
        });
        policy.emit(
            CaptureLabels {
                request_id: finished.context.id,
                project: &project,
                alias: finished.outcome.alias.as_deref(),
                status: finished.status.as_u16(),
            },
            prompt.as_deref(),
            response.as_ref().map(|(text, cut)| (text.as_str(), *cut)),
        );
    });
    text.map(|text| CaptureTap { text })
}

/// The response, its body collected on the way out when `tap` asks for it.
pub(crate) fn tap(
    response: Response<ResponseBody>,
    tap: Option<CaptureTap>,
) -> Response<ResponseBody> {
    let Some(tap) = tap else {
        return response;
    };
    let event_stream = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    if let Some(text) = tap
        .text
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        text.set_stream(event_stream);
    }
    let (parts, body) = response.into_parts();
    let body = TapBody {
        inner: body,
        text: tap.text,
    };
    Response::from_parts(parts, UnsyncBoxBody::new(body))
}

pin_project_lite::pin_project! {
    /// The response body, unchanged, with each data frame shown to the capture.
    struct TapBody {
        #[pin]
        inner: ResponseBody,
        text: SharedText,
    }
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Some(text) = this
                .text
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
        {
            text.push(data);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
