//! The server: socket, connections, routing, and the state tests inspect.

use crate::behaviour::Behaviour;
use crate::endpoint::{self, Endpoint};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Not `Sync`: stream bodies hold futures, and hyper never shares a body between threads.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How many requests [`MockUpstream::requests`] keeps.
const MAX_RECORDED: usize = 1000;
/// Request bodies above this are refused: a runaway test should fail, not eat the memory.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Counters since start (or the last reset).
///
/// Every stream that started ends in exactly one of `streams_completed`, `streams_aborted`,
/// `resets` or `stream_errors`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MockStats {
    /// Every request except those to the `/mock/*` control endpoints, which would otherwise
    /// count themselves when a test reads the stats over HTTP.
    pub requests: u64,
    /// Chat requests in every format (OpenAI and Azure chat completions, Anthropic messages,
    /// Gemini `generateContent` and `streamGenerateContent`), rejected and malformed ones
    /// included.
    pub chat_requests: u64,
    pub streams_started: u64,
    /// Streams whose last event (`data: [DONE]`, `message_stop`, Gemini's finishing payload)
    /// was handed to the connection.
    pub streams_completed: u64,
    /// Streams dropped before the end: the client went away (or the server was shut down).
    pub streams_aborted: u64,
    /// Streams the mock deliberately aborted (`reset_after_chunks`).
    pub resets: u64,
    /// Embedding requests in every format (OpenAI, Azure, Gemini), rejected and malformed
    /// ones included.
    pub embedding_requests: u64,
    /// Image inputs seen in well-formed requests: OpenAI `image_url` parts, Anthropic `image`
    /// blocks, Gemini `inlineData` and `fileData` parts.
    pub images_seen: u64,
    /// Answers that were a tool call, plain or streamed.
    pub tool_calls: u64,
    /// Streams ended with the vendor's in-band error event (`stream_error_after_chunks`).
    pub stream_errors: u64,
    /// Requests to OpenAI's pass-through endpoints (Responses, image generations, speech,
    /// transcriptions; OpenAI and Azure), rejected and malformed ones included.
    pub passthrough_requests: u64,
    /// Ground truth for billing tests: the `prompt_tokens` the mock reported, summed over the
    /// OpenAI and Azure chat completions whose usage it handed to the connection (see
    /// [`BilledUsage`] for exactly what counts). Other formats are not counted.
    pub prompt_tokens_billed: u64,
    /// The `completion_tokens` counterpart of [`MockStats::prompt_tokens_billed`].
    pub completion_tokens_billed: u64,
}

/// How many entries [`MockUpstream::billed`] keeps.
const MAX_BILLED: usize = 100_000;

/// One usage report the mock handed to the connection: what a vendor would bill.
///
/// Only OpenAI and Azure chat completions are counted (the other formats, embeddings and the
/// pass-through endpoints are not). Counted are:
/// - a plain (JSON) answer, when its response is built (after `delay_ms`; injected errors and
///   refusals report no usage and are not counted);
/// - a stream, when its usage chunk (asked with `stream_options.include_usage`) is handed to
///   the connection. A stream without that option, one cut by `reset_after_chunks` or
///   `stream_error_after_chunks`, or one the client dropped before the usage chunk was
///   reached reports nothing and is not counted. A usage chunk handed to the connection is
///   counted even if the client goes away before reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BilledUsage {
    /// The mock's own id, also its `x-request-id` answer header: `req-up-<n>`.
    pub upstream_request_id: String,
    /// The `x-client-request-id` header of the request (the gateway sends its own request
    /// id there), if any.
    pub client_request_id: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub streamed: bool,
}

/// One request to a vendor endpoint as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// The path without the query, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The raw query string (`api-version=...`, `alt=sse`), if the URL had one.
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The parsed JSON body; `Value::Null` when the body was not valid JSON. A multipart form
    /// (transcriptions) is recorded as a JSON object: each text field a string, each file part
    /// `{"filename": ..., "bytes": N}`, a repeated name an array of its values; `Value::Null`
    /// when the form could not be read.
    pub body: Value,
}

/// State shared by the handle and every connection.
pub(crate) struct Shared {
    stats: Mutex<MockStats>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    billed: Mutex<VecDeque<BilledUsage>>,
    behaviour: Mutex<Behaviour>,
    /// What [`MockUpstream::reset`] returns to.
    initial_behaviour: Behaviour,
    /// Source of `chatcmpl-up-<n>`, `msg_up_<n>`, `req-up-<n>` and the like. Never reset, so ids stay unique for the
    /// server's lifetime even across resets (the gateway stores them in usage rows).
    next_id: AtomicU64,
}

/// A lock that survives a panicking holder: the data are plain counters, never half-updated.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn update_stats(&self, update: impl FnOnce(&mut MockStats)) {
        update(&mut lock(&self.stats));
    }

    pub(crate) fn behaviour(&self) -> Behaviour {
        lock(&self.behaviour).clone()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        let mut requests = lock(&self.requests);
        if requests.len() >= MAX_RECORDED {
            requests.pop_front();
        }
        requests.push_back(request);
    }

    /// Counts one usage report in the stats and the billing log.
    pub(crate) fn bill(&self, usage: BilledUsage) {
        self.update_stats(|stats| {
            stats.prompt_tokens_billed += usage.prompt_tokens;
            stats.completion_tokens_billed += usage.completion_tokens;
        });
        let mut billed = lock(&self.billed);
        if billed.len() >= MAX_BILLED {
            billed.pop_front();
        }
        billed.push_back(usage);
    }

    fn reset(&self) {
        *lock(&self.stats) = MockStats::default();
        lock(&self.requests).clear();
        lock(&self.billed).clear();
        *lock(&self.behaviour) = self.initial_behaviour.clone();
    }
}

/// A running mock upstream. Dropping it closes the listener and every open connection.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl MockUpstream {
    /// Starts on an ephemeral port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(addr, Behaviour::default()).await
    }

    /// Starts with `behaviour` as the default, which [`MockUpstream::reset`] then returns to.
    pub async fn start_with(addr: SocketAddr, behaviour: Behaviour) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            stats: Mutex::default(),
            requests: Mutex::default(),
            billed: Mutex::default(),
            behaviour: Mutex::new(behaviour.clone()),
            initial_behaviour: behaviour,
            next_id: AtomicU64::new(0),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, what an OpenAI client takes as its base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1beta`, what a Gemini client takes as its base URL.
    pub fn gemini_base_url(&self) -> String {
        format!("http://{}/v1beta", self.addr)
    }

    /// `http://127.0.0.1:PORT`, what an Azure OpenAI client takes as its resource endpoint
    /// (it appends `/openai/deployments/...`).
    pub fn azure_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT`, what an Anthropic client takes as its base URL (it appends
    /// `/v1/messages`).
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> MockStats {
        *lock(&self.shared.stats)
    }

    /// The last 1000 requests to vendor endpoints (chat and embeddings in every format, and
    /// the pass-through endpoints; rejected ones included), oldest first. `/models`, `/health` and `/mock/*` are not kept.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// The last 100,000 usage reports (see [`BilledUsage`]), in the order they were counted;
    /// their sums are [`MockStats::prompt_tokens_billed`] and
    /// [`MockStats::completion_tokens_billed`] (until the log wraps).
    pub fn billed(&self) -> Vec<BilledUsage> {
        lock(&self.shared.billed).iter().cloned().collect()
    }

    /// The behaviour of every following request (a request's own directive still wins).
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    /// Clears stats and recorded requests and restores the starting behaviour.
    pub fn reset(&self) {
        self.shared.reset();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.server.abort();
    }
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Without it, small SSE frames wait for the previous one's ACK (Nagle),
                    // which would hide whether the gateway forwards chunks as they come.
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| handle(shared.clone(), request));
                        // Errors here are clients going away or our own deliberate resets.
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Out of file descriptors and the like: back off rather than spin or die.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let route = path.strip_prefix("/v1").unwrap_or(&path);
    if !path.starts_with("/mock/") {
        shared.update_stats(|stats| stats.requests += 1);
    }
    let method = request.method().clone();
    if let Some(endpoint) = Endpoint::from_path(&path) {
        if method != Method::POST {
            return Ok(method_not_allowed(&method, &path));
        }
        let (parts, body) = request.into_parts();
        let response = match read_body(body).await {
            Ok(bytes) => endpoint::handle(&shared, endpoint, parts, path, &bytes).await,
            Err(response) => response,
        };
        return Ok(response);
    }
    let response = match (&method, route) {
        (&Method::GET, "/models") => json_response(
            StatusCode::OK,
            &json!({
                "object": "list",
                "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}],
            }),
        ),
        (&Method::GET, "/health") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/mock/stats") => {
            json_response(StatusCode::OK, &json!(*lock(&shared.stats)))
        }
        (&Method::POST, "/mock/reset") => {
            shared.reset();
            json_response(StatusCode::OK, &json!({"status": "ok"}))
        }
        (&Method::POST, "/mock/config") => match read_body(request.into_body()).await {
            Ok(bytes) => match serde_json::from_slice::<Behaviour>(&bytes) {
                Ok(behaviour) => {
                    *lock(&shared.behaviour) = behaviour.clone();
                    json_response(StatusCode::OK, &json!(behaviour))
                }
                Err(err) => error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid mock behaviour: {err}"),
                    "invalid_request_error",
                ),
            },
            Err(response) => response,
        },
        (_, "/models" | "/health" | "/mock/stats" | "/mock/reset" | "/mock/config") => {
            method_not_allowed(&method, &path)
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            &format!("no route for {method} {path}"),
            "invalid_request_error",
        ),
    };
    Ok(response)
}

fn method_not_allowed(method: &Method, path: &str) -> Response<Body> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} is not allowed on {path}"),
        "invalid_request_error",
    )
}

async fn read_body(body: Incoming) -> Result<Bytes, Response<Body>> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) => Err(error_response(
            StatusCode::BAD_REQUEST,
            &format!("could not read the request body: {err}"),
            "invalid_request_error",
        )),
    }
}

pub(crate) fn full_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full_body(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The mock's own errors (routing, control endpoints) are in OpenAI's shape.
fn error_response(status: StatusCode, message: &str, kind: &str) -> Response<Body> {
    endpoint::openai_error(status, message, kind)
}
