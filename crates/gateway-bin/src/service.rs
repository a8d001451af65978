//! The request path: the tower stack and the endpoint handlers.
//!
//! ```text
//! ObserveLayer      request id, x-request-id, access log + usage record when the body ends
//!  └ EdgeService    reads the config snapshot once; turns every error into an OpenAI error
//!     └ AuthLayer   project key -> Principal (public paths excepted)
//!        └ Dispatch endpoints: chat completions (routing -> policy -> provider), models, health
//! ```
//! Observe is outermost so that every response, auth failures included, is logged and carries
//! the request id. The edge sits inside it so the observers see the final status and error
//! type. Auth runs after the snapshot is read, so one request uses one config version.

use crate::state::Snapshot;
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use gateway_access::AuthLayer;
use gateway_business::budget::BudgetError;
use gateway_core::openai::{
    ChatCompletionRequest, EmbeddingsRequest, ModelEntry, ModelList, delta_content_chars,
};
use gateway_core::provider::{
    ChatCall, ChatReply, EmbeddingsCall, ForwardBody, ForwardCall, ForwardChunk, ForwardReply,
    NativeApi, StreamEvent, StreamEventKind,
};
use gateway_core::trace::attr;
use gateway_core::trace::otel::KeyValue;
use gateway_core::trace::otel::trace::{Span as _, SpanKind, Status};
use gateway_core::{
    ErrorType, FinishHold, GatewayError, Principal, RequestContext, RequestObserver,
};
use gateway_observability::ObserveLayer;
use gateway_policy::idempotency::{
    Claim, ClaimGuard, IdempotencyError, IdempotencyStore, StoredResponse,
};
use gateway_policy::limits::{self, LimitCheck, LimitScope, Quota, Rejection};
use gateway_policy::{Policy, retry};
use gateway_providers::DynProvider;
use gateway_providers::anthropic;
use gateway_routing::{Attempt, FailureClass, Outcome, RouteInputs, RoutePlan};
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use rust_decimal::Decimal;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// What every request needs, shared by all connections.
#[derive(Debug)]
pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub ready: AtomicBool,
    pub max_body_bytes: usize,
    /// Rate limits, breakers, retry budget, idempotency, in-flight caps: process-wide state
    /// that outlives config versions.
    pub policy: Policy,
    /// `[[budgets]]`: spending reserved at admission and settled at the end, shared by
    /// replicas through the database or Redis.
    pub budgets: gateway_business::budget::Budgets,
    /// Start markers go to the usage spool, so a request cut off by a crash is still found.
    pub usage: gateway_business::UsageRecorder,
    /// The keys created in the database, cached whole (refreshed by a task of the server).
    pub db_keys: Arc<gateway_access::DbKeys>,
    /// Client IPs that keep presenting bad keys are refused for a while.
    pub auth_throttle: Arc<gateway_access::AuthThrottle>,
    /// The database of keys, usage and budgets, for the admin API and the key cache (`None`
    /// for an in-memory SQLite, which no other connection could see).
    pub store: Option<gateway_business::UsageStore>,
    /// The request-side Prometheus metrics (also an observer); upstream attempts are counted
    /// here as they happen.
    pub metrics: Arc<gateway_observability::RequestMetrics>,
}

/// Builds the whole stack, outermost first (see the module docs for why in this order).
pub fn build_stack(
    state: Arc<AppState>,
    observers: Vec<Arc<dyn RequestObserver>>,
    tracer: Option<Arc<gateway_core::trace::Tracer>>,
) -> gateway_observability::ObserveService<EdgeService<gateway_access::AuthService<Dispatch>>> {
    let dispatch = Dispatch {
        state: state.clone(),
    };
    let auth = AuthLayer::new(PUBLIC_PATHS)
        .with_db_keys(state.db_keys.clone())
        .with_throttle(state.auth_throttle.clone())
        .layer(dispatch);
    let edge = EdgeService { inner: auth, state };
    ObserveLayer::new(observers).with_tracer(tracer).layer(edge)
}

const PUBLIC_PATHS: &[&str] = &["/healthz", "/readyz"];
const ANTHROPIC_MESSAGES_PATH: &str = "/v1/messages";

/// Reads the snapshot once per request and converts errors into responses.
#[derive(Clone)]
pub struct EdgeService<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S> Service<Request<Incoming>> for EdgeService<S>
where
    S: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let snapshot = self.state.snapshot.load_full();
        request.extensions_mut().insert(snapshot.keys.clone());
        request.extensions_mut().insert(snapshot);
        let context = request.extensions().get::<Arc<RequestContext>>().cloned();
        // Clients get errors in their own format: Anthropic SDKs parse only Anthropic's.
        let anthropic_client = request.uri().path() == ANTHROPIC_MESSAGES_PATH;
        // Cloning keeps `poll_ready`'s contract: the inner service is always ready.
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let mut response = match inner.call(request).await {
                Ok(response) => response,
                Err(err) => {
                    if let Some(context) = &context {
                        context.outcome().error_type = Some(err.error_type());
                    }
                    let mut response = if anthropic_client {
                        let (status, body) = anthropic::error_response(&err);
                        json_response(status, body)
                    } else {
                        error_response(&err)
                    };
                    if let Some(retry_after) = err.retry_after() {
                        response
                            .headers_mut()
                            .insert(http::header::RETRY_AFTER, retry_after);
                    }
                    if let Some(extra) = err.extra_headers() {
                        response.headers_mut().extend(extra.clone());
                    }
                    response
                }
            };
            if let Some(context) = &context {
                add_response_headers(context, &mut response);
            }
            Ok(response)
        })
    }
}

/// The headers the layers asked every response of this request to carry.
fn add_response_headers(context: &RequestContext, response: &mut Response<ResponseBody>) {
    let extra = context.outcome().response_headers.take();
    if let Some(extra) = extra {
        for (name, value) in extra.iter() {
            if !response.headers().contains_key(name) {
                response.headers_mut().insert(name, value.clone());
            }
        }
    }
}

pub fn error_response(err: &GatewayError) -> Response<ResponseBody> {
    json_response(err.status(), err.to_json())
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn full(body: Bytes) -> ResponseBody {
    UnsyncBoxBody::new(Full::new(body))
}

/// Routes a request to its endpoint.
#[derive(Clone)]
pub struct Dispatch {
    state: Arc<AppState>,
}

impl Service<Request<Incoming>> for Dispatch {
    type Response = Response<ResponseBody>;
    type Error = GatewayError;
    type Future = BoxFuture<'static, Result<Self::Response, GatewayError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            let method = request.method().clone();
            if method == Method::POST
                && let Some(endpoint) = Endpoint::of(request.uri().path())
            {
                return post(&state, request, endpoint).await;
            }
            match (method, request.uri().path()) {
                (Method::GET, "/v1/models") => list_models(&request),
                (Method::GET, "/healthz") => Ok(json_response(
                    StatusCode::OK,
                    Bytes::from_static(br#"{"status":"ok"}"#),
                )),
                (Method::GET, "/readyz") => Ok(readiness(&state)),
                (method, path) => Err(unknown_route(&method, path)),
            }
        })
    }
}

/// The endpoints that take a request body and call a vendor.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    ChatCompletions,
    AnthropicMessages,
    Embeddings,
    Passthrough(NativeApi),
    Transcriptions,
}

impl Endpoint {
    fn of(path: &str) -> Option<Self> {
        Some(match path {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/messages" => Self::AnthropicMessages,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/responses" => Self::Passthrough(NativeApi::OpenAiResponses),
            "/v1/images/generations" => Self::Passthrough(NativeApi::OpenAiImages),
            "/v1/audio/speech" => Self::Passthrough(NativeApi::OpenAiSpeech),
            "/v1/audio/transcriptions" => Self::Transcriptions,
            _ => return None,
        })
    }
}

/// Every body-carrying endpoint: an in-flight slot and the body (see [`receive`]), then the
/// `Idempotency-Key` check, then the endpoint. The response of a request that owns its key is
/// stored as it streams out and replayed to the key's repeats.
async fn post(
    state: &AppState,
    request: Request<Incoming>,
    endpoint: Endpoint,
) -> Result<Response<ResponseBody>, GatewayError> {
    let received = receive(state, request).await?;
    let capture = crate::capture::begin(
        &received.context,
        &received.principal,
        &received.snapshot,
        &received.body,
    );
    let guard = match claim_idempotency_key(state, &received).await? {
        None => None,
        Some(Claim::Owner(guard)) => Some(guard),
        Some(Claim::Replay(stored)) => return Ok(replayed(stored)),
        Some(Claim::Conflict) => return Err(GatewayError::IdempotencyConflict),
        Some(Claim::StillInFlight { retry_after }) => {
            return Err(GatewayError::IdempotencyInFlight { retry_after });
        }
    };
    let context = received.context.clone();
    let store_limit = received.snapshot.policy.idempotency.max_body_bytes;
    let result = match endpoint {
        Endpoint::ChatCompletions => chat_completions(state, received).await,
        Endpoint::AnthropicMessages => anthropic_messages(state, received).await,
        Endpoint::Embeddings => embeddings(state, received).await,
        Endpoint::Passthrough(api) => openai_passthrough(state, received, api).await,
        Endpoint::Transcriptions => transcriptions(state, received).await,
    };
    let result = match (guard, result) {
        (Some(guard), Ok(response)) if response.status().is_success() => {
            Ok(store_when_complete(response, guard, context, store_limit))
        }
        // Any failure releases the key (the guard drops): nothing was billed, so the
        // client's retry must reach the vendor.
        (_guard, result) => result,
    };
    result.map(|response| crate::capture::tap(response, capture))
}

/// The request's `Idempotency-Key` claim, or `None` when it has no key (or the store is off).
async fn claim_idempotency_key(
    state: &AppState,
    received: &Received,
) -> Result<Option<Claim>, GatewayError> {
    let store = &state.policy.idempotency;
    let Some(value) = received.parts.headers.get("idempotency-key") else {
        return Ok(None);
    };
    if !store.is_enabled() {
        return Ok(None);
    }
    let invalid_key = || {
        GatewayError::invalid_request(
            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
            None,
        )
    };
    // The store checks the key's form itself (`IdempotencyError::InvalidKey`).
    let key = value.to_str().map_err(|_| invalid_key())?;
    let fingerprint = IdempotencyStore::fingerprint(
        received.parts.method.as_str(),
        received.parts.uri.path(),
        &received.body,
    );
    match store
        .claim(&received.principal.project, key, fingerprint)
        .await
    {
        Ok(claim) => Ok(Some(claim)),
        Err(IdempotencyError::InvalidKey) => Err(invalid_key()),
        Err(err) => {
            tracing::error!(request_id = %received.context.id, error = %err, "idempotency store refused");
            Err(GatewayError::PolicyUnavailable {
                what: "The idempotency store",
                retry_after: Duration::from_secs(1),
            })
        }
    }
}

/// A stored response, sent again to a repeat of its request.
fn replayed(stored: StoredResponse) -> Response<ResponseBody> {
    let mut response = Response::new(full(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for (name, value) in &stored.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    if let Ok(original) = HeaderValue::from_str(&stored.request_id) {
        headers.insert("x-original-request-id", original);
    }
    response
}

/// Passes the response through while keeping a copy; when it has ended well (a stream without
/// an error event), the copy is stored under the key. A client that leaves early, an error
/// mid-stream or a body past `limit` releases the key instead.
fn store_when_complete(
    response: Response<ResponseBody>,
    guard: ClaimGuard,
    context: Arc<RequestContext>,
    limit: usize,
) -> Response<ResponseBody> {
    let (parts, body) = response.into_parts();
    let headers = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| vec![(CONTENT_TYPE.as_str().to_owned(), value.to_owned())])
        .unwrap_or_default();
    let tee = StoringBody {
        inner: body,
        copy: Some(BytesMut::new()),
        limit,
        pending: Some(PendingStore {
            guard,
            context,
            status: parts.status.as_u16(),
            headers,
        }),
    };
    Response::from_parts(parts, UnsyncBoxBody::new(tee))
}

/// Stores a body that ended well under its key; releases the key otherwise.
fn store_copy(pending: Option<PendingStore>, copy: Option<BytesMut>) {
    let Some(pending) = pending else { return };
    let failed = pending.context.outcome().error_type.is_some();
    match copy {
        Some(copy) if !failed => {
            let stored = StoredResponse {
                status: pending.status,
                headers: pending.headers,
                body: copy.freeze(),
                request_id: pending.context.id.to_string(),
            };
            let guard = pending.guard;
            tokio::spawn(async move {
                guard.complete(stored).await;
            });
        }
        _ => pending.guard.release(),
    }
}

struct PendingStore {
    guard: ClaimGuard,
    context: Arc<RequestContext>,
    status: u16,
    headers: Vec<(String, String)>,
}

pin_project_lite::pin_project! {
    /// The response body and a copy of it, for [`store_when_complete`].
    struct StoringBody {
        #[pin]
        inner: ResponseBody,
        // `None` once the body outgrew the limit.
        copy: Option<BytesMut>,
        limit: usize,
        pending: Option<PendingStore>,
    }
}

impl http_body::Body for StoringBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut this = self.project();
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let fits = this
                        .copy
                        .as_ref()
                        .is_some_and(|copy| copy.len() + data.len() <= *this.limit);
                    if fits {
                        if let Some(copy) = this.copy.as_mut() {
                            copy.extend_from_slice(data);
                        }
                    } else {
                        *this.copy = None;
                    }
                }
                // hyper stops polling a body that says it has ended, so a complete body
                // (one data frame) is stored here rather than at the `None` that never comes.
                if this.inner.is_end_stream() {
                    store_copy(this.pending.take(), this.copy.take());
                }
            }
            Some(Err(never)) => match *never {},
            None => store_copy(this.pending.take(), this.copy.take()),
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

fn unknown_route(method: &Method, path: &str) -> GatewayError {
    if gateway_core::SERVED_PATHS.contains(&path) {
        GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
        }
    } else {
        GatewayError::RouteNotFound {
            method: method.to_string(),
            path: path.to_owned(),
        }
    }
}

fn readiness(state: &AppState) -> Response<ResponseBody> {
    if state.ready.load(Ordering::Acquire) {
        json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(br#"{"status":"not ready"}"#),
        )
    }
}

fn request_parts(
    extensions: &http::Extensions,
) -> Result<(Arc<RequestContext>, Principal, Arc<Snapshot>), GatewayError> {
    let missing = |what: &str| GatewayError::Internal(format!("request has no {what}"));
    Ok((
        extensions
            .get::<Arc<RequestContext>>()
            .cloned()
            .ok_or_else(|| missing("context"))?,
        extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| missing("principal"))?,
        extensions
            .get::<Arc<Snapshot>>()
            .cloned()
            .ok_or_else(|| missing("config snapshot"))?,
    ))
}

fn list_models(request: &Request<Incoming>) -> Result<Response<ResponseBody>, GatewayError> {
    let (_context, principal, snapshot) = request_parts(request.extensions())?;
    let data = snapshot
        .routes
        .aliases()
        .filter(|alias| principal.may_use(alias))
        .map(|alias| ModelEntry {
            id: alias.to_owned(),
            object: "model".into(),
            created: 0,
            owned_by: "gateway".into(),
        })
        .collect();
    let list = ModelList {
        object: "list".into(),
        data,
    };
    let body = serde_json::to_vec(&list)
        .map_err(|err| GatewayError::Internal(format!("encoding the model list: {err}")))?;
    Ok(json_response(StatusCode::OK, Bytes::from(body)))
}

async fn read_body(
    headers: &http::HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let too_large = GatewayError::PayloadTooLarge { limit_bytes: limit };
    // Refuse a declared oversize body before reading a byte of it.
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large),
        Err(err) => Err(GatewayError::invalid_request(
            format!("Could not read the request body: {err}"),
            None,
        )),
    }
}

/// What every body-carrying endpoint starts from: the request's parts (headers for routing),
/// its per-request state, and the body read within the limit.
struct Received {
    parts: http::request::Parts,
    body: Bytes,
    context: Arc<RequestContext>,
    principal: Principal,
    snapshot: Arc<Snapshot>,
}

async fn receive(state: &AppState, request: Request<Incoming>) -> Result<Received, GatewayError> {
    let (parts, body) = request.into_parts();
    let (context, principal, snapshot) = request_parts(&parts.extensions)?;
    // Shed before reading the body: an overloaded gateway should not spend on it.
    let shed = &snapshot.policy.shed;
    let slot = state
        .policy
        .in_flight
        .try_enter(&principal.project, shed)
        .map_err(|refused| GatewayError::Overloaded {
            scope: refused.to_string(),
            retry_after: Duration::from_secs(shed.retry_after_secs),
        })?;
    // Held until the response (stream and drain included) has ended.
    context.on_finish(move |_| drop(slot));
    let body = read_body(&parts.headers, body, state.max_body_bytes).await?;
    Ok(Received {
        parts,
        body,
        context,
        principal,
        snapshot,
    })
}

async fn chat_completions(
    state: &AppState,
    received: Received,
) -> Result<Response<ResponseBody>, GatewayError> {
    let chat = ChatCompletionRequest::from_json(&received.body)?;
    let client_wants_usage = chat.client_wants_stream_usage();
    let plan = plan_route(
        state,
        &received,
        RouteRequest {
            alias: &chat.model,
            stream: chat.is_stream(),
            prompt_tokens: chat.estimate_prompt_tokens(),
            max_output_tokens: chat
                .max_completion_tokens
                .or(chat.max_tokens)
                .map(u64::from),
            user: chat.user.as_deref(),
        },
    )
    .await?;
    let Received {
        context, snapshot, ..
    } = received;
    // Moved into the last attempt; earlier attempts (fallbacks pending) get a copy.
    let mut chat = Some(chat);
    let reply = walk_plan(
        state,
        &context,
        &snapshot,
        &plan,
        |attempt, provider, last| {
            let mut request = if last { chat.take() } else { chat.clone() }
                .ok_or_else(|| GatewayError::Internal("request already sent".into()))?;
            request.model = attempt.model().to_string();
            Ok(provider.chat(ChatCall {
                request,
                request_id: context.id,
                trace: context.trace().upstream_headers(),
            }))
        },
    )
    .await?;
    match reply {
        ChatReply::Complete(reply) => {
            note_complete(&context, &reply);
            Ok(json_response(StatusCode::OK, reply.body))
        }
        ChatReply::Stream(reply) => {
            context.outcome().vendor_request_id = reply.vendor_request_id;
            let encoder = OpenAiFrames { client_wants_usage };
            let limits = StreamLimits::of(&snapshot);
            let frames = SseFrames::new(reply.events, encoder, context, limits);
            Ok(sse_response(UnsyncBoxBody::new(StreamBody::new(frames))))
        }
    }
}

/// What a `/v1/messages` attempt got back: the vendor's own answer, or an OpenAI one to
/// translate.
enum MessagesReply {
    Native(ForwardReply),
    Translated(ChatReply),
}

/// `POST /v1/messages`: the Anthropic Messages format. A vendor that speaks it natively gets
/// the body as the client sent it (model replaced), so fields and betas the gateway does not
/// know survive; any other vendor is reached through the OpenAI canonical form.
async fn anthropic_messages(
    state: &AppState,
    received: Received,
) -> Result<Response<ResponseBody>, GatewayError> {
    let head = RequestHead::parse(&received.body)?;
    // Anthropic clients read input tokens from `message_start`, before any vendor has counted
    // them: they get an estimate there, and the vendor's count in the final `message_delta`.
    let estimated_input_tokens = (received.body.len() as u64).div_ceil(4);
    let plan = plan_route(
        state,
        &received,
        RouteRequest {
            alias: &head.model,
            stream: head.stream,
            prompt_tokens: estimated_input_tokens,
            max_output_tokens: head.max_output_tokens.or(head.max_tokens),
            user: None,
        },
    )
    .await?;
    let Received {
        parts,
        body,
        context,
        snapshot,
        ..
    } = received;
    let client_headers = anthropic_headers(&parts.headers);
    let beta = parts
        .uri
        .query()
        .is_some_and(|query| query.split('&').any(|pair| pair == "beta=true"));
    // Translated once, and only if some attempt needs it.
    let mut translated: Option<ChatCompletionRequest> = None;
    let reply = walk_plan(
        state,
        &context,
        &snapshot,
        &plan,
        |attempt, provider, _last| {
            if provider
                .native_apis()
                .contains(&NativeApi::AnthropicMessages)
            {
                let call = ForwardCall {
                    api: NativeApi::AnthropicMessages,
                    model: attempt.model().to_string(),
                    body: replace_model(&body, attempt.model())?,
                    headers: client_headers.clone(),
                    content_type: None,
                    beta,
                    stream: head.stream,
                    request_id: context.id,
                    trace: context.trace().upstream_headers(),
                };
                return Ok(provider
                    .forward(call)
                    .map(|reply| reply.map(MessagesReply::Native))
                    .boxed());
            }
            if translated.is_none() {
                translated = Some(anthropic::from_anthropic_request(&body)?);
            }
            let mut request = translated
                .clone()
                .ok_or_else(|| GatewayError::Internal("translation missing".into()))?;
            request.model = attempt.model().to_string();
            let call = ChatCall {
                request,
                request_id: context.id,
                trace: context.trace().upstream_headers(),
            };
            Ok(provider
                .chat(call)
                .map(|reply| reply.map(MessagesReply::Translated))
                .boxed())
        },
    )
    .await?;
    match reply {
        MessagesReply::Native(reply) => Ok(forwarded_response(
            context,
            reply,
            NativeApi::AnthropicMessages,
            StreamLimits::of(&snapshot),
        )),
        MessagesReply::Translated(ChatReply::Complete(reply)) => {
            note_complete(&context, &reply);
            let body = anthropic::from_openai_response(&reply.body)?;
            Ok(json_response(StatusCode::OK, body))
        }
        MessagesReply::Translated(ChatReply::Stream(reply)) => {
            context.outcome().vendor_request_id = reply.vendor_request_id;
            let encoder = AnthropicFrames(anthropic::OpenAiToAnthropic::new(
                &head.model,
                estimated_input_tokens,
            ));
            let limits = StreamLimits::of(&snapshot);
            let frames = SseFrames::new(reply.events, encoder, context, limits);
            Ok(sse_response(UnsyncBoxBody::new(StreamBody::new(frames))))
        }
    }
}

/// What routing needs from a request forwarded in its vendor's format; the rest is the
/// vendor's (or the translator's) business.
#[derive(serde::Deserialize)]
struct RequestHead {
    model: String,
    #[serde(default)]
    stream: bool,
    /// Anthropic Messages and OpenAI chat: the output cap, reserved against token limits.
    #[serde(default)]
    max_tokens: Option<u64>,
    /// OpenAI Responses' output cap.
    #[serde(default)]
    max_output_tokens: Option<u64>,
}

impl RequestHead {
    fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                GatewayError::invalid_request(
                    format!("We could not parse the JSON body of your request: {inner}"),
                    None,
                )
            } else {
                let param = (path != ".").then_some(path);
                GatewayError::invalid_request(format!("Invalid request: {inner}"), param)
            }
        })
    }
}

/// The client headers a native Anthropic vendor should see: its API version and the beta
/// features it asked for (Claude Code depends on them). Nothing else, its key least of all.
fn anthropic_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    let mut forwarded = http::HeaderMap::new();
    for name in ["anthropic-version", "anthropic-beta"] {
        for value in headers.get_all(name) {
            forwarded.append(http::HeaderName::from_static(name), value.clone());
        }
    }
    forwarded
}

/// The body with its top-level `model` replaced, every other value copied byte for byte and
/// the fields kept in the client's order.
fn replace_model(body: &[u8], model: &str) -> Result<Bytes, GatewayError> {
    let mut fields: indexmap::IndexMap<String, &serde_json::value::RawValue> =
        serde_json::from_slice(body).map_err(|err| {
            GatewayError::invalid_request(format!("The body must be a JSON object: {err}"), None)
        })?;
    let model = serde_json::value::to_raw_value(model)
        .map_err(|err| GatewayError::Internal(format!("encoding the model: {err}")))?;
    fields.insert("model".to_owned(), &model);
    serde_json::to_vec(&fields)
        .map(Bytes::from)
        .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))
}

/// A vendor's own answer, relayed with its status; usage and timing noted on the way.
fn forwarded_response(
    context: Arc<RequestContext>,
    reply: ForwardReply,
    api: NativeApi,
    limits: StreamLimits,
) -> Response<ResponseBody> {
    let status = reply.status;
    let content_type = reply.content_type;
    let retry_after = reply.retry_after;
    context.outcome().vendor_request_id = reply.vendor_request_id;
    let mut response = match reply.body {
        ForwardBody::Complete {
            bytes,
            usage,
            response_id,
        } => {
            let mut outcome = context.outcome();
            outcome.usage = usage;
            outcome.vendor_response_id = response_id;
            outcome.time_to_first_token = Some(context.elapsed());
            if !status.is_success() {
                outcome.error_type = Some(ErrorType::UpstreamError);
            }
            drop(outcome);
            let mut response = json_response(status, bytes);
            *response.status_mut() = status;
            response
        }
        ForwardBody::Stream(chunks) => {
            let frames = SseFrames::new(chunks, Relay(api), context, limits);
            sse_response(UnsyncBoxBody::new(StreamBody::new(frames)))
        }
    };
    if let Some(content_type) = content_type {
        response.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    if let Some(retry_after) = retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, retry_after);
    }
    response
}

/// OpenAI endpoints served by forwarding (`/v1/responses`, images, speech): the body goes to an
/// `openai`/`azure` provider with only `model` replaced, the answer comes back unchanged, and
/// usage is read where the API reports it.
async fn openai_passthrough(
    state: &AppState,
    received: Received,
    api: NativeApi,
) -> Result<Response<ResponseBody>, GatewayError> {
    let head = RequestHead::parse(&received.body)?;
    let plan = plan_route(
        state,
        &received,
        RouteRequest {
            alias: &head.model,
            stream: head.stream,
            prompt_tokens: (received.body.len() as u64).div_ceil(4),
            max_output_tokens: head.max_output_tokens.or(head.max_tokens),
            user: None,
        },
    )
    .await?;
    let Received {
        body,
        context,
        snapshot,
        ..
    } = received;
    let reply = walk_plan(
        state,
        &context,
        &snapshot,
        &plan,
        |attempt, provider, _last| {
            offers(provider, api)?;
            Ok(provider.forward(ForwardCall {
                api,
                model: attempt.model().to_string(),
                body: replace_model(&body, attempt.model())?,
                headers: http::HeaderMap::new(),
                content_type: None,
                beta: false,
                stream: head.stream,
                request_id: context.id,
                trace: context.trace().upstream_headers(),
            }))
        },
    )
    .await?;
    Ok(forwarded_response(
        context,
        reply,
        api,
        StreamLimits::of(&snapshot),
    ))
}

/// A clear 400 when the provider chosen for the alias has no such API.
fn offers(provider: &DynProvider, api: NativeApi) -> Result<(), GatewayError> {
    if provider.native_apis().contains(&api) {
        Ok(())
    } else {
        Err(GatewayError::invalid_request(
            format!(
                "This model is served by provider `{}`, which does not offer {}.",
                provider.name(),
                api.path()
            ),
            Some("model".into()),
        ))
    }
}

/// `POST /v1/audio/transcriptions`: a multipart form whose `model` field names the alias. The
/// form is re-encoded with the upstream model, every other part byte for byte.
async fn transcriptions(
    state: &AppState,
    received: Received,
) -> Result<Response<ResponseBody>, GatewayError> {
    let content_type = received
        .parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let boundary = multer::parse_boundary(&content_type).map_err(|_| {
        GatewayError::invalid_request(
            "Send the audio as multipart/form-data with a boundary.",
            None,
        )
    })?;
    let form = form_parts(received.body.clone(), &boundary).await?;
    let model = form
        .iter()
        .find(|part| part.name == "model" && part.filename.is_none())
        .map(|part| String::from_utf8_lossy(&part.data).trim().to_owned())
        .filter(|model| !model.is_empty())
        .ok_or_else(|| {
            GatewayError::invalid_request("The form needs a `model` field.", Some("model".into()))
        })?;
    let plan = plan_route(
        state,
        &received,
        RouteRequest {
            alias: &model,
            stream: false,
            prompt_tokens: 0,
            max_output_tokens: None,
            user: None,
        },
    )
    .await?;
    let Received {
        context, snapshot, ..
    } = received;
    let api = NativeApi::OpenAiTranscriptions;
    let reply = walk_plan(
        state,
        &context,
        &snapshot,
        &plan,
        |attempt, provider, _last| {
            offers(provider, api)?;
            Ok(provider.forward(ForwardCall {
                api,
                model: attempt.model().to_string(),
                body: encode_form(&form, &boundary, attempt.model()),
                headers: http::HeaderMap::new(),
                content_type: HeaderValue::from_str(&content_type).ok(),
                beta: false,
                stream: false,
                request_id: context.id,
                trace: context.trace().upstream_headers(),
            }))
        },
    )
    .await?;
    Ok(forwarded_response(
        context,
        reply,
        api,
        StreamLimits::of(&snapshot),
    ))
}

/// One part of a multipart form, as received.
struct FormPart {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    data: Bytes,
}

async fn form_parts(body: Bytes, boundary: &str) -> Result<Vec<FormPart>, GatewayError> {
    let malformed = |err: multer::Error| {
        GatewayError::invalid_request(format!("Malformed multipart form: {err}"), None)
    };
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = form.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(ToString::to_string);
        let data = field.bytes().await.map_err(malformed)?;
        parts.push(FormPart {
            name,
            filename,
            content_type,
            data,
        });
    }
    Ok(parts)
}

/// The form again, with the same boundary, the `model` field set to the upstream model.
fn encode_form(parts: &[FormPart], boundary: &str, model: &str) -> Bytes {
    let mut out = BytesMut::new();
    for part in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let name = part.name.replace('"', "%22");
        match &part.filename {
            Some(filename) => out.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{}\"\r\n",
                    filename.replace('"', "%22")
                )
                .as_bytes(),
            ),
            None => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
            ),
        }
        if let Some(content_type) = &part.content_type {
            out.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if part.name == "model" && part.filename.is_none() {
            out.extend_from_slice(model.as_bytes());
        } else {
            out.extend_from_slice(&part.data);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out.freeze()
}

/// What an endpoint read from its request that routing and the rate limits need.
struct RouteRequest<'a> {
    alias: &'a str,
    stream: bool,
    /// Estimated from the request, for token limits and for when the vendor reports no usage.
    prompt_tokens: u64,
    /// The request's output cap, reserved against token limits until the real usage is known.
    max_output_tokens: Option<u64>,
    user: Option<&'a str>,
}

/// [`plan_route_untraced`] under the request's `routing` span, which names the alias asked
/// for and the plan made (or why there is none).
async fn plan_route(
    state: &AppState,
    received: &Received,
    route: RouteRequest<'_>,
) -> Result<RoutePlan, GatewayError> {
    let Some(mut span) = received.context.start_span("routing", SpanKind::Internal) else {
        return plan_route_untraced(state, received, route).await;
    };
    // The alias asked for; the outcome's alias may become a fallback's.
    let asked = KeyValue::new(attr::GEN_AI_REQUEST_MODEL, route.alias.to_owned());
    if let Some(trace) = received.context.trace().active() {
        trace.root().set_attribute(asked.clone());
    }
    span.set_attribute(asked);
    let result = plan_route_untraced(state, received, route).await;
    match &result {
        Ok(plan) => {
            span.set_attribute(KeyValue::new(
                attr::GATEWAY_ROUTE_TARGETS,
                i64::try_from(plan.len()).unwrap_or(i64::MAX),
            ));
            if let Some(first) = plan.attempts().first() {
                span.set_attributes([
                    KeyValue::new(attr::GEN_AI_PROVIDER_NAME, first.provider().to_string()),
                    KeyValue::new(attr::GEN_AI_RESPONSE_MODEL, first.model().to_string()),
                ]);
            }
        }
        Err(err) => {
            span.set_attribute(KeyValue::new(attr::ERROR_TYPE, err.error_type().as_str()));
            span.set_status(Status::error(err.error_type().as_str()));
        }
    }
    span.end();
    result
}

/// Routing for every endpoint: the caller's plan for the alias (first choice, the alias's other
/// usable targets, then its fallbacks), noted in the request's outcome, and admission by the
/// rate limits of the project, the key and the alias. From here on the request is billable or
/// auditable: it gets a usage record even if the alias turns out not to exist.
async fn plan_route_untraced(
    state: &AppState,
    received: &Received,
    route: RouteRequest<'_>,
) -> Result<RoutePlan, GatewayError> {
    let Received {
        parts,
        context,
        principal,
        snapshot,
        ..
    } = received;
    let headers = &parts.headers;
    let alias = route.alias;
    {
        let mut outcome = context.outcome();
        outcome.routed = true;
        outcome.alias = Some(alias.into());
        outcome.streamed = route.stream;
        outcome.estimated_prompt_tokens = route.prompt_tokens;
    }
    // An alias the project may not use is reported exactly like a missing one, so a caller
    // cannot probe which aliases exist.
    let inputs = RouteInputs {
        key_id: &principal.key_id,
        user: route.user,
        headers,
        open_circuits: Some(&state.policy.breakers),
    };
    let plan = principal
        .may_use(alias)
        .then(|| snapshot.routes.plan(alias, &inputs))
        .flatten()
        .ok_or_else(|| GatewayError::ModelNotFound {
            model: alias.to_owned(),
        })?;
    if plan.is_empty() {
        return Err(GatewayError::UpstreamUnavailable {
            provider: alias.to_owned(),
            reason: "no target of this alias is usable".into(),
        });
    }
    let reserve = route
        .prompt_tokens
        .saturating_add(route.max_output_tokens.unwrap_or(0));
    admit(state, received, alias, reserve).await?;
    reserve_budget(state, received, &plan, &route).await?;
    state
        .usage
        .request_started(&gateway_business::StartedRequest::new(
            context,
            Some(principal),
            alias,
            route.stream,
        ));
    Ok(plan)
}

/// Checks the project's, the key's and the alias's rate limits at once. An admitted request
/// carries OpenAI's `x-ratelimit-*` headers of its tightest limits, and its token reservation
/// is corrected to the real usage when it finishes.
async fn admit(
    state: &AppState,
    received: &Received,
    alias: &str,
    reserve_tokens: u64,
) -> Result<(), GatewayError> {
    let Received {
        context,
        principal,
        snapshot,
        ..
    } = received;
    let mut checks = Vec::new();
    if let Some(limit) = principal.project_rate_limit {
        checks.push(LimitCheck::new(
            LimitScope::Project,
            principal.project.clone(),
            limit,
        ));
    }
    if let Some(limit) = principal.key_rate_limit {
        // Key ids are unique within a project only.
        let name = format!("{}/{}", principal.project, principal.key_id);
        checks.push(LimitCheck::new(LimitScope::Key, name, limit));
    }
    if let Some(limit) = snapshot.routes.resolve(alias).and_then(|r| r.rate_limit()) {
        checks.push(LimitCheck::new(LimitScope::Alias, alias, limit));
    }
    if checks.is_empty() {
        return Ok(());
    }
    match state.policy.limiter.admit(&checks, reserve_tokens).await {
        Ok(admission) => {
            let headers = rate_limit_headers(admission.requests, admission.tokens);
            context.outcome().response_headers = Some(Box::new(headers));
            context.on_finish(move |finished| {
                let used = finished
                    .outcome
                    .usage
                    .map_or(0, |usage| usage.prompt_tokens + usage.completion_tokens);
                admission.settle_in_background(used);
            });
            Ok(())
        }
        Err(Rejection::Limited {
            scope,
            name,
            dimension,
            retry_after,
            oversized,
            requests,
            tokens,
        }) => {
            let message = if oversized {
                format!(
                    "This request needs more {dimension} than the {scope} `{name}` may use in a minute."
                )
            } else {
                format!(
                    "Rate limit reached for {dimension} per minute of the {scope} `{name}`. Retry after {}.",
                    limits::openai_reset(retry_after)
                )
            };
            Err(GatewayError::RateLimited {
                message,
                dimension: dimension.as_str(),
                retry_after,
                headers: Box::new(rate_limit_headers(requests, tokens)),
            })
        }
        Err(Rejection::Unavailable) => Err(GatewayError::PolicyUnavailable {
            what: "The shared rate limiter",
            retry_after: Duration::from_secs(1),
        }),
    }
}

/// Reserves the request's most it could cost against the project's and the key's budgets:
/// the prompt estimate at the input price plus `max_tokens` (or [`DEFAULT_OUTPUT_RESERVE`])
/// at the output price, of the dearest target the plan may use. The reservation is settled to
/// the real cost when the request finishes.
async fn reserve_budget(
    state: &AppState,
    received: &Received,
    plan: &RoutePlan,
    route: &RouteRequest<'_>,
) -> Result<(), GatewayError> {
    let Received {
        context,
        principal,
        snapshot,
        ..
    } = received;
    if !state.budgets.applies(&principal.project, &principal.key_id) {
        return Ok(());
    }
    let now = time::OffsetDateTime::now_utc();
    let million = Decimal::from(1_000_000u32);
    let output_tokens = route.max_output_tokens.unwrap_or(DEFAULT_OUTPUT_RESERVE);
    let max_cost = plan
        .iter()
        .filter_map(|attempt| {
            snapshot
                .prices
                .price_on(attempt.provider(), attempt.model(), now.date())
        })
        .map(|price| {
            (Decimal::from(route.prompt_tokens) * price.input_per_million
                + Decimal::from(output_tokens) * price.output_per_million)
                / million
        })
        .max()
        .unwrap_or(Decimal::ZERO);
    let reservation = state
        .budgets
        .reserve(&principal.project, &principal.key_id, max_cost, now)
        .await
        .map_err(|err| match err {
            BudgetError::Exceeded { .. } => GatewayError::BudgetExceeded {
                message: format!("Budget exceeded: {err}."),
            },
            BudgetError::Unavailable => GatewayError::PolicyUnavailable {
                what: "The budget store",
                retry_after: Duration::from_secs(1),
            },
        })?;
    let prices = snapshot.prices.clone();
    context.on_finish(move |finished| {
        let cost = gateway_business::UsageRecord::from_finished(finished)
            .and_then(|record| gateway_business::cost_of(&record, &prices))
            .map_or(Decimal::ZERO, |cost| cost.amount());
        reservation.settle_in_background(cost);
    });
    Ok(())
}

/// Output tokens reserved against a budget when the request sets no `max_tokens`.
const DEFAULT_OUTPUT_RESERVE: u64 = 4096;

/// OpenAI's rate-limit headers for the tightest request and token quotas.
fn rate_limit_headers(requests: Option<Quota>, tokens: Option<Quota>) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    for (quota, limit, remaining, reset) in [
        (
            requests,
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ),
        (
            tokens,
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ),
    ] {
        let Some(quota) = quota else { continue };
        headers.insert(limit, HeaderValue::from(quota.limit));
        headers.insert(remaining, HeaderValue::from(quota.remaining));
        if let Ok(value) = HeaderValue::from_str(&limits::openai_reset(quota.reset)) {
            headers.insert(reset, value);
        }
    }
    headers
}

/// Tries the plan's attempts in order until one succeeds or fails with an error its alias
/// does not fall back on. Only errors before the first byte reach this point, so moving on
/// never repeats anything the client has seen.
///
/// Policy on each attempt: a target whose circuit breaker is open is skipped without a call;
/// a recoverable failure moves on to the next target at once, and the last target is retried
/// after a jittered back-off (or the vendor's `Retry-After`, up to a cap), up to
/// `max_attempts` calls on it. Every call after the first spends from the process-wide retry
/// budget, so a vendor outage adds at most `budget_percent` more calls. Each call runs under
/// its provider's deadline, cut to what is left of the request's total. Every outcome is
/// reported to routing (health, latency, canary windows) and to the breaker.
async fn walk_plan<T: AttemptReply>(
    state: &AppState,
    context: &RequestContext,
    snapshot: &Snapshot,
    plan: &RoutePlan,
    mut call: impl FnMut(
        &Attempt,
        &DynProvider,
        bool,
    ) -> Result<BoxFuture<'static, Result<T, GatewayError>>, GatewayError>,
) -> Result<T, GatewayError> {
    let policy = &state.policy;
    let retry = &snapshot.policy.retry;
    policy.retry_budget.record_request();
    let attempts = plan.attempts();
    let mut calls: u32 = 0;
    let mut last_error: Option<GatewayError> = None;
    let mut last_reply: Option<T> = None;
    let mut previous_failure: Option<FailureClass> = None;
    for (index, attempt) in attempts.iter().enumerate() {
        let provider = snapshot
            .providers
            .get(&**attempt.provider())
            .ok_or_else(|| {
                GatewayError::Internal(format!("provider `{}` is not built", attempt.provider()))
            })?;
        let last = index + 1 == attempts.len();
        let mut calls_here: u32 = 0;
        loop {
            let permit = match policy.breakers.try_acquire(attempt.provider()) {
                Ok(permit) => permit,
                Err(open) => {
                    // A vendor error already seen says more than "the breaker is open".
                    last_error.get_or_insert_with(|| GatewayError::CircuitOpen {
                        provider: attempt.provider().to_string(),
                        retry_after: open.retry_in,
                    });
                    break;
                }
            };
            if calls > 0 && !policy.retry_budget.try_withdraw() {
                tracing::warn!(
                    request_id = %context.id,
                    alias = %attempt.alias(),
                    "retry budget exhausted; not trying again"
                );
                if let Some(reply) = last_reply {
                    return Ok(reply);
                }
                return Err(last_error.unwrap_or_else(|| {
                    GatewayError::Internal("retry budget exhausted before any call".into())
                }));
            }
            calls = calls.saturating_add(1);
            calls_here += 1;
            {
                let mut outcome = context.outcome();
                outcome.alias = Some(attempt.alias().clone());
                outcome.provider = Some(attempt.provider().clone());
                outcome.upstream_model = Some(attempt.model().clone());
                outcome.attempts = calls;
                if calls_here > 1 {
                    outcome.retries += 1;
                } else if index > 0 {
                    outcome.fallbacks += 1;
                }
            }
            let mut span = attempt_span(context, attempt, calls, calls_here, previous_failure);
            if let Some(span) = &span {
                context.trace().set_upstream_span(span);
            }
            let started = std::time::Instant::now();
            // Only a call that cannot be followed by another may consume the request.
            let final_call = last && calls_here >= retry.max_attempts.max(1);
            let result = match call(attempt, provider, final_call) {
                Ok(future) => {
                    let deadline = call_deadline(context, provider.timeout(), &snapshot.policy);
                    gateway_policy::with_deadline(provider.name(), deadline, future).await
                }
                Err(err) => Err(err),
            };
            // A vendor error relayed as a reply: judged like an error, and if nothing better
            // comes of the rest of the plan, the client gets it as the vendor sent it.
            // `refused`: a vendor 4xx relayed as the vendor sent it, a success for the plan.
            let (result, refused) = match result {
                Ok(reply) => match reply.as_failure(attempt.provider()) {
                    Some(err) if failure_class(&err) != FailureClass::Client => {
                        last_reply = Some(reply);
                        (Err(err), false)
                    }
                    failure => (Ok(reply), failure.is_some()),
                },
                Err(err) => {
                    last_reply = None;
                    (Err(err), false)
                }
            };
            if let Some(span) = span.take() {
                end_attempt_span(span, &result);
            }
            let err = match result {
                Ok(reply) => {
                    permit.success();
                    let label = if refused { "client_error" } else { "success" };
                    state.metrics.upstream_attempt(attempt.provider(), label);
                    let elapsed = started.elapsed();
                    snapshot.routes.report(
                        attempt,
                        Outcome::Success {
                            ttft: elapsed,
                            latency: elapsed,
                        },
                    );
                    return Ok(reply);
                }
                Err(err) => err,
            };
            let class = failure_class(&err);
            if class == FailureClass::Client {
                // The vendor is up and said no: that is not the breaker's business.
                permit.success();
                // Only a vendor's refusal was a call; a request the provider cannot take
                // never left.
                if matches!(err, GatewayError::UpstreamStatus { .. }) {
                    state
                        .metrics
                        .upstream_attempt(attempt.provider(), "client_error");
                }
                return Err(err);
            }
            permit.failure();
            previous_failure = Some(class);
            state
                .metrics
                .upstream_attempt(attempt.provider(), class.as_str());
            snapshot.routes.report(attempt, Outcome::Failure { class });
            tracing::warn!(
                request_id = %context.id,
                alias = %attempt.alias(),
                provider = %attempt.provider(),
                attempt = calls,
                error_class = class.as_str(),
                error = %err,
                "upstream attempt failed"
            );
            if !attempt.may_continue(class) {
                return last_reply.ok_or(err);
            }
            let vendor_wait = err
                .retry_after()
                .and_then(|value| value.to_str().ok().and_then(retry::parse_retry_after));
            last_error = Some(err);
            // Another target is a fresh chance: go there at once. The last one is retried.
            if !last || calls_here >= retry.max_attempts.max(1) {
                break;
            }
            let Some(delay) = retry::delay_before_retry(retry, calls_here, vendor_wait) else {
                break;
            };
            if context.elapsed() + delay >= total_or_max(&snapshot.policy) {
                break;
            }
            tokio::time::sleep(delay).await;
        }
    }
    if let Some(reply) = last_reply {
        return Ok(reply);
    }
    Err(last_error.unwrap_or_else(|| GatewayError::Internal("empty routing plan".into())))
}

/// The client span of one upstream call: which target, which attempt of the request, and
/// why it is made (`retry` of the same target, `fallback` to the next, after which failure).
fn attempt_span(
    context: &RequestContext,
    attempt: &Attempt,
    calls: u32,
    calls_here: u32,
    previous_failure: Option<FailureClass>,
) -> Option<gateway_core::trace::Span> {
    // Checked first so that an untraced request does not even format the name.
    let trace = context.trace().active()?;
    let operation = gateway_core::trace::operation_name(&context.path);
    let mut span = trace.child(format!("{operation} {}", attempt.model()), SpanKind::Client);
    span.set_attributes([
        KeyValue::new(attr::GEN_AI_OPERATION_NAME, operation),
        KeyValue::new(attr::GEN_AI_PROVIDER_NAME, attempt.provider().to_string()),
        KeyValue::new(attr::GEN_AI_REQUEST_MODEL, attempt.model().to_string()),
        KeyValue::new(attr::GATEWAY_ALIAS, attempt.alias().to_string()),
        KeyValue::new(attr::GATEWAY_ATTEMPT, i64::from(calls)),
    ]);
    if calls > 1 {
        let reason = if calls_here > 1 { "retry" } else { "fallback" };
        span.set_attribute(KeyValue::new(attr::GATEWAY_ATTEMPT_REASON, reason));
        if let Some(class) = previous_failure {
            span.set_attribute(KeyValue::new(attr::GATEWAY_ATTEMPT_AFTER, class.as_str()));
        }
    }
    Some(span)
}

/// Ends an attempt's span with the vendor's status, or the error the call came to.
fn end_attempt_span<T: AttemptReply>(
    mut span: gateway_core::trace::Span,
    result: &Result<T, GatewayError>,
) {
    match result {
        Ok(reply) => span.set_attribute(KeyValue::new(
            attr::HTTP_RESPONSE_STATUS_CODE,
            i64::from(reply.status()),
        )),
        Err(err) => {
            if let GatewayError::UpstreamStatus { status, .. } = err {
                span.set_attribute(KeyValue::new(
                    attr::HTTP_RESPONSE_STATUS_CODE,
                    i64::from(status.as_u16()),
                ));
            }
            span.set_attribute(KeyValue::new(attr::ERROR_TYPE, err.error_type().as_str()));
            span.set_status(Status::error(err.error_type().as_str()));
        }
    }
    span.end();
}

/// What a successful call can still say about failure: a forwarded vendor error arrives as a
/// reply (so the client gets the vendor's own error body), yet a 429 or 5xx must count for
/// the breaker, the retries and the fallbacks like any other upstream error.
trait AttemptReply {
    /// The error this reply stands for, if it is one (translated replies never are).
    fn as_failure(&self, _provider: &str) -> Option<GatewayError> {
        None
    }

    /// The vendor's HTTP status, for the attempt's span.
    fn status(&self) -> u16 {
        200
    }
}

impl AttemptReply for ChatReply {}

impl AttemptReply for gateway_core::provider::CompleteReply {}

impl AttemptReply for ForwardReply {
    fn status(&self) -> u16 {
        self.status.as_u16()
    }

    fn as_failure(&self, provider: &str) -> Option<GatewayError> {
        if self.status.is_success() {
            return None;
        }
        let body = match &self.body {
            ForwardBody::Complete { bytes, .. } => bytes.clone(),
            ForwardBody::Stream(_) => Bytes::new(),
        };
        Some(GatewayError::UpstreamStatus {
            provider: provider.to_owned(),
            status: self.status,
            body,
            retry_after: self.retry_after.clone(),
        })
    }
}

impl AttemptReply for MessagesReply {
    fn status(&self) -> u16 {
        match self {
            Self::Native(reply) => reply.status(),
            Self::Translated(reply) => reply.status(),
        }
    }

    fn as_failure(&self, provider: &str) -> Option<GatewayError> {
        match self {
            Self::Native(reply) => reply.as_failure(provider),
            Self::Translated(reply) => reply.as_failure(provider),
        }
    }
}

/// A call's deadline: its provider's, cut to what is left of the request's total.
fn call_deadline(
    context: &RequestContext,
    provider_timeout: Duration,
    policy: &gateway_policy::PolicyConfig,
) -> Duration {
    let left = total_or_max(policy).saturating_sub(context.elapsed());
    provider_timeout.min(left)
}

fn total_or_max(policy: &gateway_policy::PolicyConfig) -> Duration {
    policy.timeouts.total().unwrap_or(Duration::MAX)
}

/// The routing class of an error: what may move a request on to another target.
fn failure_class(err: &GatewayError) -> FailureClass {
    match err {
        GatewayError::UpstreamUnavailable { .. } => FailureClass::Connect,
        GatewayError::UpstreamTimeout { .. } => FailureClass::Timeout,
        GatewayError::UpstreamStatus { status, .. } if status.as_u16() == 429 => {
            FailureClass::RateLimit
        }
        GatewayError::UpstreamStatus { status, .. } if status.is_server_error() => {
            FailureClass::ServerError
        }
        GatewayError::UpstreamProtocol { .. } => FailureClass::ServerError,
        _ => FailureClass::Client,
    }
}

/// `POST /v1/embeddings`, served by the `openai`, `azure` and `gemini` kinds.
async fn embeddings(
    state: &AppState,
    received: Received,
) -> Result<Response<ResponseBody>, GatewayError> {
    let embeddings = EmbeddingsRequest::from_json(&received.body)?;
    let plan = plan_route(
        state,
        &received,
        RouteRequest {
            alias: &embeddings.model,
            stream: false,
            prompt_tokens: embeddings.estimate_prompt_tokens(),
            max_output_tokens: None,
            user: None,
        },
    )
    .await?;
    let Received {
        context, snapshot, ..
    } = received;
    let reply = walk_plan(
        state,
        &context,
        &snapshot,
        &plan,
        |attempt, provider, _last| {
            let mut request = embeddings.clone();
            request.model = attempt.model().to_string();
            Ok(provider.embeddings(EmbeddingsCall {
                request,
                request_id: context.id,
                trace: context.trace().upstream_headers(),
            }))
        },
    )
    .await?;
    note_complete(&context, &reply);
    Ok(json_response(StatusCode::OK, reply.body))
}

fn note_complete(context: &RequestContext, reply: &gateway_core::provider::CompleteReply) {
    context.trace().note_finish_reasons(&reply.body);
    let mut outcome = context.outcome();
    outcome.usage = reply.usage;
    outcome
        .vendor_response_id
        .clone_from(&reply.vendor_response_id);
    outcome
        .vendor_request_id
        .clone_from(&reply.vendor_request_id);
    outcome.time_to_first_token = Some(context.elapsed());
}

/// Notes what a stream event tells about the request: time to first token, usage, the
/// vendor's response id.
fn note_event(context: &RequestContext, event: &StreamEvent) {
    if event.kind == StreamEventKind::Delta {
        context.trace().note_finish_reasons(&event.data);
    }
    let mut outcome = context.outcome();
    if outcome.time_to_first_token.is_none() && event.kind == StreamEventKind::Delta {
        outcome.time_to_first_token = Some(context.elapsed());
    }
    if event.usage.is_some() {
        outcome.usage = event.usage;
    }
    if outcome.vendor_response_id.is_none() {
        outcome.vendor_response_id.clone_from(&event.response_id);
    }
    if event.kind == StreamEventKind::Delta && outcome.usage.is_none() {
        outcome.streamed_output_chars += delta_content_chars(&event.data);
    }
}

fn sse_response(body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies in front of us not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// What the request path reads from one item of an upstream stream.
trait StreamItem: Send + 'static {
    /// Notes what the item tells about the request (usage, timing, ids).
    fn note(&self, context: &RequestContext);
    /// The vendor's last item: nothing follows.
    fn is_last(&self) -> bool;
}

impl StreamItem for StreamEvent {
    fn note(&self, context: &RequestContext) {
        note_event(context, self);
    }

    fn is_last(&self) -> bool {
        self.kind == StreamEventKind::Done
    }
}

impl StreamItem for ForwardChunk {
    fn note(&self, context: &RequestContext) {
        let mut outcome = context.outcome();
        if self.first_output && outcome.time_to_first_token.is_none() {
            outcome.time_to_first_token = Some(context.elapsed());
        }
        if self.usage.is_some() {
            outcome.usage = self.usage;
        }
        if outcome.vendor_response_id.is_none() {
            outcome.vendor_response_id.clone_from(&self.response_id);
        }
    }

    fn is_last(&self) -> bool {
        self.last
    }
}

/// How stream items become the client's SSE frames.
trait FrameEncoder<I>: Send + Unpin + 'static {
    fn encode(&mut self, item: &I) -> Result<Vec<Bytes>, GatewayError>;
    /// An error after the status line went out: it can only be an event in the stream.
    fn error(&mut self, error: &GatewayError) -> Bytes;
}

/// OpenAI clients get the vendor's events as they are, minus the usage-only chunk the
/// gateway asked for when the client did not.
struct OpenAiFrames {
    client_wants_usage: bool,
}

impl FrameEncoder<StreamEvent> for OpenAiFrames {
    fn encode(&mut self, event: &StreamEvent) -> Result<Vec<Bytes>, GatewayError> {
        let forward = event.kind != StreamEventKind::UsageOnly || self.client_wants_usage;
        Ok(if forward {
            vec![sse_frame(&event.data)]
        } else {
            Vec::new()
        })
    }

    fn error(&mut self, error: &GatewayError) -> Bytes {
        sse_frame(&error.to_json())
    }
}

/// Anthropic clients get each OpenAI event as the Anthropic events it implies.
struct AnthropicFrames(anthropic::OpenAiToAnthropic);

/// A native client gets its vendor's events byte for byte; a failure of the gateway's own is an
/// `error` event in that API's shape.
struct Relay(NativeApi);

impl FrameEncoder<ForwardChunk> for Relay {
    fn encode(&mut self, chunk: &ForwardChunk) -> Result<Vec<Bytes>, GatewayError> {
        Ok(vec![chunk.bytes.clone()])
    }

    fn error(&mut self, error: &GatewayError) -> Bytes {
        let body = match self.0 {
            NativeApi::AnthropicMessages => anthropic::error_response(error).1,
            // The Responses API's own stream error event.
            _ => Bytes::from(
                serde_json::json!({
                    "type": "error",
                    "code": error.error_type().as_str(),
                    "message": error.to_string(),
                })
                .to_string(),
            ),
        };
        let mut frame = BytesMut::with_capacity(body.len() + 24);
        frame.extend_from_slice(b"event: error\ndata: ");
        frame.extend_from_slice(&body);
        frame.extend_from_slice(b"\n\n");
        frame.freeze()
    }
}

impl FrameEncoder<StreamEvent> for AnthropicFrames {
    fn encode(&mut self, event: &StreamEvent) -> Result<Vec<Bytes>, GatewayError> {
        self.0.push(event)
    }

    fn error(&mut self, error: &GatewayError) -> Bytes {
        self.0.error_frame(error)
    }
}

/// Forwards vendor events to the client as they arrive, one frame per event, never buffering
/// the stream, and notes usage and time to first token on the way. An upstream failure
/// mid-stream becomes an error event, then the stream ends: never a fake normal end.
///
/// If the client disconnects, hyper drops this stream. The rest of the vendor's stream is then
/// read in the background for at most `drain` (`[policy] stream_drain_secs`) to learn the
/// final usage, so an abandoned request is billed as the vendor bills it; the observers wait
/// for it. Past that limit the upstream response is dropped, which closes the connection so
/// the vendor stops generating, and the usage is estimated from what was streamed.
struct SseFrames<I: StreamItem, E> {
    events: Option<BoxStream<'static, Result<I, GatewayError>>>,
    encoder: E,
    context: Arc<RequestContext>,
    pending: std::collections::VecDeque<Bytes>,
    /// `[DONE]`, an error, or the end of the upstream body was reached.
    ended: bool,
    limits: StreamLimits,
    /// Fires at the idle gap or the total deadline, whichever is first; re-armed per item.
    timer: Pin<Box<tokio::time::Sleep>>,
    total_deadline: Option<tokio::time::Instant>,
    /// The `stream` span, from the vendor's response headers to the stream's end.
    span: Option<StreamSpan>,
}

/// The `stream` span and what it notes on the way: time to first token and events relayed.
struct StreamSpan {
    span: gateway_core::trace::Span,
    first_token_seen: bool,
    events: u64,
}

impl StreamSpan {
    fn start(context: &RequestContext) -> Option<Self> {
        Some(Self {
            span: context.start_span("stream", SpanKind::Internal)?,
            first_token_seen: false,
            events: 0,
        })
    }

    fn item(&mut self, context: &RequestContext) {
        self.events += 1;
        if self.first_token_seen {
            return;
        }
        let ttft = context.outcome().time_to_first_token;
        if let Some(ttft) = ttft {
            self.first_token_seen = true;
            self.span.add_event("first_token", Vec::new());
            self.span.set_attribute(KeyValue::new(
                attr::GATEWAY_TTFT_MS,
                ttft.as_secs_f64() * 1000.0,
            ));
        }
    }

    fn end(mut self, context: &RequestContext, client_aborted: bool) {
        let error = context.outcome().error_type;
        self.span.set_attributes([
            KeyValue::new(
                attr::GATEWAY_STREAM_EVENTS,
                i64::try_from(self.events).unwrap_or(i64::MAX),
            ),
            KeyValue::new(attr::GATEWAY_CLIENT_ABORTED, client_aborted),
        ]);
        if let Some(error) = error {
            self.span
                .set_attribute(KeyValue::new(attr::ERROR_TYPE, error.as_str()));
            self.span.set_status(Status::error(error.as_str()));
        }
        self.span.end();
    }
}

/// The `[policy]` limits on one stream.
#[derive(Debug, Clone, Copy)]
struct StreamLimits {
    drain: Duration,
    idle: Duration,
    total: Option<Duration>,
}

impl StreamLimits {
    fn of(snapshot: &Snapshot) -> Self {
        let policy = &snapshot.policy;
        Self {
            drain: Duration::from_secs(policy.stream_drain_secs),
            idle: policy.timeouts.stream_idle(),
            total: policy.timeouts.total(),
        }
    }
}

impl<I: StreamItem, E: FrameEncoder<I>> SseFrames<I, E> {
    fn new(
        events: BoxStream<'static, Result<I, GatewayError>>,
        encoder: E,
        context: Arc<RequestContext>,
        limits: StreamLimits,
    ) -> Self {
        let total_deadline = limits
            .total
            .map(|total| tokio::time::Instant::from_std(context.started) + total);
        let first = next_deadline(limits.idle, total_deadline);
        let span = StreamSpan::start(&context);
        Self {
            span,
            events: Some(events),
            encoder,
            context,
            pending: std::collections::VecDeque::new(),
            ended: false,
            limits,
            timer: Box::pin(tokio::time::sleep_until(first)),
            total_deadline,
        }
    }

    fn fail(&mut self, error: &GatewayError) {
        self.context.outcome().error_type = Some(error.error_type_in_stream());
        tracing::warn!(request_id = %self.context.id, error = %error, "upstream stream failed");
        self.pending.push_back(self.encoder.error(error));
        self.ended = true;
    }

    /// The idle gap or the total deadline passed: the client gets an error event, and the
    /// upstream request is dropped (closing its connection) rather than drained.
    fn time_out(&mut self) {
        let provider = self
            .context
            .outcome()
            .provider
            .as_deref()
            .unwrap_or("upstream")
            .to_owned();
        let error = match (self.total_deadline, self.limits.total) {
            (Some(deadline), Some(total)) if tokio::time::Instant::now() >= deadline => {
                GatewayError::UpstreamTimeout {
                    provider,
                    after: total,
                }
            }
            _ => GatewayError::UpstreamStalled {
                provider,
                idle: self.limits.idle,
            },
        };
        self.fail(&error);
        self.events = None;
    }
}

/// The earlier of the idle gap from now and the total deadline.
fn next_deadline(
    idle: Duration,
    total_deadline: Option<tokio::time::Instant>,
) -> tokio::time::Instant {
    let idle_deadline = tokio::time::Instant::now() + idle;
    total_deadline.map_or(idle_deadline, |total| total.min(idle_deadline))
}

impl<I: StreamItem, E: FrameEncoder<I>> Stream for SseFrames<I, E> {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
            if this.ended {
                this.events = None;
                if let Some(span) = this.span.take() {
                    span.end(&this.context, false);
                }
                return Poll::Ready(None);
            }
            let Some(events) = this.events.as_mut() else {
                return Poll::Ready(None);
            };
            match events.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(item))) => {
                    item.note(&this.context);
                    if let Some(span) = this.span.as_mut() {
                        span.item(&this.context);
                    }
                    this.ended = item.is_last();
                    match this.encoder.encode(&item) {
                        Ok(frames) => this.pending.extend(frames),
                        Err(err) => this.fail(&err),
                    }
                    let deadline = next_deadline(this.limits.idle, this.total_deadline);
                    this.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Err(err))) => this.fail(&err),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => {
                    std::task::ready!(this.timer.as_mut().poll(cx));
                    this.time_out();
                }
            }
        }
    }
}

impl<I: StreamItem, E> Drop for SseFrames<I, E> {
    fn drop(&mut self) {
        // The client left before the end (when the end was seen, the span is gone already).
        let span = self.span.take();
        let drain = (!self.ended && !self.limits.drain.is_zero())
            .then(|| self.events.take())
            .flatten()
            .zip(tokio::runtime::Handle::try_current().ok());
        let Some((events, runtime)) = drain else {
            if let Some(span) = span {
                span.end(&self.context, !self.ended);
            }
            return;
        };
        let hold = self.context.hold_finish();
        runtime.spawn(drain_stream(
            events,
            self.context.clone(),
            hold,
            self.limits.drain,
            span,
        ));
    }
}

/// Reads what is left of an abandoned stream, for its usage, for at most `limit`.
async fn drain_stream<I: StreamItem>(
    mut events: BoxStream<'static, Result<I, GatewayError>>,
    context: Arc<RequestContext>,
    hold: FinishHold,
    limit: Duration,
    span: Option<StreamSpan>,
) {
    let read_to_end = async {
        while let Some(Ok(item)) = events.next().await {
            item.note(&context);
            if item.is_last() {
                break;
            }
        }
    };
    if tokio::time::timeout(limit, read_to_end).await.is_err() {
        tracing::debug!(request_id = %context.id, "drain limit reached; ending the upstream request");
    }
    // The span covers the drain too: the vendor's stream lasted that long.
    if let Some(span) = span {
        span.end(&context, true);
    }
    // Dropping the rest closes the upstream connection; releasing the hold runs the observers.
    drop(events);
    drop(hold);
}

fn sse_frame(data: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(data.len() + 8);
    frame.extend_from_slice(b"data: ");
    frame.extend_from_slice(data);
    frame.extend_from_slice(b"\n\n");
    frame.freeze()
}
