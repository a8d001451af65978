//! `ObserveLayer`: request id, `x-request-id` on every response, observers at the body's end.

use bytes::Buf;
use gateway_core::trace::Tracer;
use gateway_core::{ClientIp, FinishedRequest, RequestContext, RequestId, RequestObserver};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tower::{Layer, Service};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

type Observers = Arc<[Arc<dyn RequestObserver>]>;

/// The outermost layer. Inner services must not fail (errors are already responses by then),
/// so every request, successful or not, ends in the observers exactly once.
#[derive(Clone)]
pub struct ObserveLayer {
    observers: Observers,
    tracer: Option<Arc<Tracer>>,
}

impl ObserveLayer {
    pub fn new(observers: Vec<Arc<dyn RequestObserver>>) -> Self {
        Self {
            observers: observers.into(),
            tracer: None,
        }
    }

    /// Records a span tree per request with `tracer` (see [`crate::OtlpTracing`]).
    pub fn with_tracer(mut self, tracer: Option<Arc<Tracer>>) -> Self {
        self.tracer = tracer;
        self
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService {
            inner,
            observers: self.observers.clone(),
            tracer: self.tracer.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    observers: Observers,
    tracer: Option<Arc<Tracer>>,
}

impl<S, B, RB> Service<Request<B>> for ObserveService<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    RB: Body,
{
    type Response = Response<FinishBody<RB>>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|value| RequestId::from_header(value.as_bytes()))
            .unwrap_or_else(RequestId::new_v7);
        let trace = crate::spans::request_trace(self.tracer.as_ref(), &request, id);
        let context = Arc::new(
            RequestContext::new(
                id,
                request.method().clone(),
                request.uri().path().to_owned(),
            )
            .with_trace(trace),
        );
        if let Some(client) = request.extensions().get::<ClientIp>() {
            context.outcome().client_ip = Some(client.0);
        }
        request.extensions_mut().insert(context.clone());
        ObserveFuture {
            inner: self.inner.call(request),
            finisher: Some(Finisher {
                context,
                observers: self.observers.clone(),
                status: StatusCode::OK,
                done: false,
            }),
        }
    }
}

pin_project! {
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        finisher: Option<Finisher>,
    }
}

impl<F, RB> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: Body,
{
    type Output = Result<Response<FinishBody<RB>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.inner.poll(cx));
        let (mut parts, body) = response.into_parts();
        let mut finisher = this.finisher.take();
        if let Some(finisher) = finisher.as_mut() {
            finisher.status = parts.status;
            parts
                .headers
                .insert(REQUEST_ID_HEADER, finisher.context.id.to_header_value());
        }
        // An empty body may never be polled: it is complete as soon as the headers are.
        if body.is_end_stream()
            && let Some(mut finisher) = finisher.take()
        {
            finisher.finish(false);
        }
        Poll::Ready(Ok(Response::from_parts(
            parts,
            FinishBody {
                inner: body,
                finisher,
            },
        )))
    }
}

/// Runs the observers exactly once: when the body ends, or, if it is dropped before its end
/// was seen (the connection went away mid-response), from `Drop` with `client_aborted` set.
struct Finisher {
    context: Arc<RequestContext>,
    observers: Observers,
    status: StatusCode,
    done: bool,
}

impl Finisher {
    fn finish(&mut self, client_aborted: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // Latency is what the client saw, even if a drain keeps the observers waiting.
        let elapsed = self.context.elapsed();
        let context = self.context.clone();
        let observers = self.observers.clone();
        let status = self.status;
        self.context.finish_when_released(move || {
            let outcome = {
                let mut outcome = context.outcome();
                // Only a served request has usage to bill; a failed one is not estimated.
                if status.is_success() {
                    outcome.settle_usage();
                }
                outcome.clone()
            };
            let finished = FinishedRequest {
                context: &context,
                outcome: &outcome,
                status,
                elapsed,
                client_aborted,
            };
            for hook in context.take_finish_hooks() {
                hook(&finished);
            }
            for observer in observers.iter() {
                observer.request_finished(&finished);
            }
            crate::spans::end_root(&finished);
        });
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        self.finish(true);
    }
}

pin_project! {
    /// The response body, unchanged, with the request's observers run at its end.
    pub struct FinishBody<B> {
        #[pin]
        inner: B,
        finisher: Option<Finisher>,
    }
}

impl<B> Body for FinishBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        // hyper stops polling once `is_end_stream` is true, so the end is detected here rather
        // than waiting for a `None` that may never be asked for.
        let ended = match &polled {
            None => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) => true,
        };
        if ended && let Some(mut finisher) = this.finisher.take() {
            finisher.finish(false);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use gateway_core::ErrorType;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::Mutex;
    use tower::{ServiceExt, service_fn};

    /// request id, status, client aborted, error type
    type Seen = (String, u16, bool, Option<ErrorType>);

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Seen>>);

    impl RequestObserver for Recorder {
        fn request_finished(&self, finished: &FinishedRequest<'_>) {
            self.0.lock().unwrap().push((
                finished.context.id.to_string(),
                finished.status.as_u16(),
                finished.client_aborted,
                finished.outcome.error_type,
            ));
        }
    }

    fn stack(
        recorder: Arc<Recorder>,
    ) -> impl Service<
        Request<()>,
        Response = Response<FinishBody<Full<Bytes>>>,
        Error = Infallible,
        Future = impl Send,
    > {
        ObserveLayer::new(vec![recorder]).layer(service_fn(|request: Request<()>| async move {
            let context = request.extensions().get::<Arc<RequestContext>>().unwrap();
            context.outcome().error_type = Some(ErrorType::ModelNotFound);
            Ok::<_, Infallible>(
                Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap(),
            )
        }))
    }

    #[tokio::test]
    async fn stamps_request_id_and_reports_once_at_body_end() {
        let recorder = Arc::new(Recorder::default());
        let response = stack(recorder.clone())
            .oneshot(Request::new(()))
            .await
            .unwrap();
        let id = response.headers()[REQUEST_ID_HEADER]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
        assert!(
            recorder.0.lock().unwrap().is_empty(),
            "not before the body is sent"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}");
        let seen = recorder.0.lock().unwrap().clone();
        assert_eq!(seen, [(id, 404, false, Some(ErrorType::ModelNotFound))]);
    }

    #[tokio::test]
    async fn keeps_a_valid_inbound_id_and_replaces_an_invalid_one() {
        let recorder = Arc::new(Recorder::default());
        let inbound = uuid::Uuid::now_v7().to_string();
        let request = Request::builder()
            .header(REQUEST_ID_HEADER, &inbound)
            .body(())
            .unwrap();
        let response = stack(recorder.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.headers()[REQUEST_ID_HEADER], inbound.as_str());
        let request = Request::builder()
            .header(REQUEST_ID_HEADER, "../../etc/passwd")
            .body(())
            .unwrap();
        let response = stack(recorder).oneshot(request).await.unwrap();
        assert_ne!(response.headers()[REQUEST_ID_HEADER], "../../etc/passwd");
    }

    #[tokio::test]
    async fn dropping_an_unfinished_stream_reports_an_abort() {
        let recorder = Arc::new(Recorder::default());
        let service = ObserveLayer::new(vec![recorder.clone() as Arc<dyn RequestObserver>]).layer(
            service_fn(|_request: Request<()>| async move {
                let chunks = futures_util::stream::iter(vec![
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"a"))),
                    Ok(Frame::data(Bytes::from_static(b"b"))),
                ]);
                Ok::<_, Infallible>(Response::new(StreamBody::new(chunks)))
            }),
        );
        let response = service.oneshot(Request::new(())).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"a"));
        drop(body);
        let seen = recorder.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].2, "client_aborted must be set");
    }
}
