//! OTLP traces end to end: the gateway exports to an in-test collector (OTLP over HTTP/protobuf
//! on a real socket, and over gRPC), and the test decodes what arrives with the OTLP protobuf
//! types: one trace per request, its span tree (root, auth, routing, attempts, stream), the
//! GenAI attributes against the mock upstream's own numbers, W3C `traceparent` in and out,
//! sampling, and a collector that never answers costing requests nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use bytes::Bytes;
use gateway_bin::{GatewayConfig, RunningGateway};
use gateway_test_support::MockUpstream;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

const KEY: &str = "sk-traces-canary-7f3a9c";
const PROMPT: &str = "canary prompt 5d1e";
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const INTERNAL: i32 = 1;

/// One exported span, flattened for assertions.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: i32,
    attrs: HashMap<String, Value>,
    events: Vec<String>,
    error: bool,
}

impl Got {
    fn attr(&self, key: &str) -> &Value {
        self.attrs.get(key).unwrap_or(&Value::Null)
    }
}

fn any_to_json(value: Option<&any_value::Value>) -> Value {
    match value {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::ArrayValue(array)) => Value::Array(
            array
                .values
                .iter()
                .map(|v| any_to_json(v.value.as_ref()))
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// What an in-test collector received.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Got>>>);

impl Received {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| any_to_json(v.value.as_ref()))
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Got {
                        service: service.clone(),
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent: hex::encode(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: span.kind,
                        attrs: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    any_to_json(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                                )
                            })
                            .collect(),
                        events: span.events.iter().map(|e| e.name.clone()).collect(),
                        // STATUS_CODE_ERROR
                        error: span.status.as_ref().is_some_and(|s| s.code == 2),
                    });
                }
            }
        }
    }

    fn all(&self) -> Vec<Got> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until the root span of `request_id` has arrived, then returns its whole trace.
    /// Children end before the root, and spans are exported in the order they end, so the
    /// root's arrival means the trace is complete.
    async fn trace_of(&self, request_id: &str) -> (Got, Vec<Got>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.all();
            if let Some(root) = spans
                .iter()
                .find(|s| s.kind == SERVER && s.attr("gateway.request_id") == request_id)
            {
                let trace = spans
                    .iter()
                    .filter(|s| s.trace_id == root.trace_id && s.span_id != root.span_id)
                    .cloned()
                    .collect();
                return (root.clone(), trace);
            }
            assert!(
                Instant::now() < deadline,
                "no root span for {request_id}; got {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An OTLP/HTTP collector: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
async fn http_collector() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let sink = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let sink = sink.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let sink = sink.clone();
                        async move {
                            let ok = request.method() == http::Method::POST
                                && request.uri().path() == "/v1/traces"
                                && request.headers()["content-type"] == "application/x-protobuf";
                            let body = request.into_body().collect().await?.to_bytes();
                            let status = match ExportTraceServiceRequest::decode(body) {
                                Ok(decoded) if ok => {
                                    sink.add(decoded);
                                    200
                                }
                                _ => 400,
                            };
                            let reply = ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::from(reply)))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ended = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), received)
}

#[derive(Clone)]
struct GrpcSink(Received);

#[tonic::async_trait]
impl TraceService for GrpcSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC collector: the generated `TraceService` server over h2c.
async fn grpc_collector() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let server = TraceServiceServer::new(GrpcSink(received.clone()));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(server.clone());
            tokio::spawn(async move {
                let _ended = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), received)
}

/// A collector that accepts connections and never answers: the worst case for an exporter.
async fn silent_collector() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    format!("http://{addr}")
}

struct Gateway {
    inner: RunningGateway,
    _spool: tempfile::TempDir,
}

/// A gateway in front of `up` (alias `chat` -> provider `up`, model `m`), with `tracing`
/// as the body of `[observability.tracing]` and `extra` appended.
async fn start(up: &MockUpstream, tracing: &str, extra: &str) -> Gateway {
    let spool = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 1
[database]
url = "sqlite::memory:"
spool_dir = "{spool_dir}"
[observability]
log_level = "error"
access_log = false
[observability.tracing]
service_name = "gateway-under-test"
export_interval_ms = 20
{tracing}

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{url}"]
timeout_secs = 5

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[projects]]
name = "p"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]

{extra}
"#,
        url = up.base_url(),
        hash = gateway_access::hash_key(KEY),
        spool_dir = spool.path().display(),
    );
    let config = GatewayConfig::parse(&text, &|_| None).unwrap();
    Gateway {
        inner: RunningGateway::start(config).await.unwrap(),
        _spool: spool,
    }
}

async fn chat(gateway: &Gateway, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let url = format!("http://{}/v1/chat/completions", gateway.inner.local_addr());
    let mut request = reqwest::Client::new().post(url).bearer_auth(KEY);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.json(&body).send().await.unwrap()
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

fn named<'a>(spans: &'a [Got], name: &str) -> Vec<&'a Got> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// The `traceparent` the mock upstream received with its last request, split in its fields.
fn upstream_traceparent(up: &MockUpstream) -> (String, String, String) {
    let requests = up.requests();
    let last = requests.last().expect("the upstream saw no request");
    let value = last.headers["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test]
async fn a_streamed_chat_is_one_trace_with_its_span_tree_and_genai_attributes() {
    let up = MockUpstream::start().await.unwrap();
    let (endpoint, collector) = http_collector().await;
    let gateway = start(
        &up,
        &format!("enabled = true\nendpoint = \"{endpoint}\""),
        "",
    )
    .await;
    let body = json!({"model": "chat", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": PROMPT}]});
    let response = chat(&gateway, body, &[]).await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let text = response.text().await.unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let usage = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .map(|c| c["usage"].clone())
        .expect("a usage chunk");
    let response_id = chunks[0]["id"].as_str().unwrap().to_owned();

    let (root, children) = collector.trace_of(&id).await;
    assert_eq!(root.service, "gateway-under-test");
    assert_eq!(root.name, "POST /v1/chat/completions");
    assert!(
        root.parent.is_empty(),
        "a new trace: the root has no parent"
    );
    for (key, expected) in [
        ("gen_ai.operation.name", json!("chat")),
        ("gen_ai.request.model", json!("chat")),
        ("gen_ai.provider.name", json!("up")),
        ("gen_ai.response.model", json!("m")),
        ("gen_ai.response.id", json!(response_id)),
        ("gen_ai.response.finish_reasons", json!(["stop"])),
        ("gen_ai.usage.input_tokens", usage["prompt_tokens"].clone()),
        (
            "gen_ai.usage.output_tokens",
            usage["completion_tokens"].clone(),
        ),
        ("gateway.project", json!("p")),
        ("gateway.key_id", json!("k")),
        ("gateway.request_id", json!(id)),
        ("gateway.streamed", json!(true)),
        ("gateway.attempts", json!(1)),
        ("http.response.status_code", json!(200)),
        ("http.request.method", json!("POST")),
    ] {
        assert_eq!(root.attr(key), &expected, "root {key}");
    }
    assert!(!root.error);

    // Every child hangs from the root: auth, routing, one attempt, the stream.
    assert_eq!(children.len(), 4, "{children:#?}");
    assert!(children.iter().all(|s| s.parent == root.span_id));
    let auth = named(&children, "auth");
    assert_eq!(auth.len(), 1);
    assert_eq!(auth[0].kind, INTERNAL);
    assert_eq!(auth[0].attr("gateway.project"), "p");
    let routing = named(&children, "routing");
    assert_eq!(routing.len(), 1);
    assert_eq!(routing[0].attr("gen_ai.request.model"), "chat");
    assert_eq!(routing[0].attr("gateway.route.targets"), 1);
    let attempt = named(&children, "chat m");
    assert_eq!(attempt.len(), 1);
    let attempt = attempt[0];
    assert_eq!(attempt.kind, CLIENT);
    assert_eq!(attempt.attr("gateway.attempt"), 1);
    assert_eq!(attempt.attr("gen_ai.provider.name"), "up");
    assert_eq!(attempt.attr("gen_ai.request.model"), "m");
    assert_eq!(attempt.attr("http.response.status_code"), 200);
    assert_eq!(attempt.attr("gateway.attempt.reason"), &Value::Null);
    let stream = named(&children, "stream");
    assert_eq!(stream.len(), 1);
    assert!(
        stream[0]
            .attr("gateway.time_to_first_token_ms")
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(stream[0].events, ["first_token"]);
    assert_eq!(stream[0].attr("gateway.client_aborted"), false);

    // The vendor call carried the attempt's context.
    let (trace_id, parent_id, flags) = upstream_traceparent(&up);
    assert_eq!(trace_id, root.trace_id);
    assert_eq!(parent_id, attempt.span_id);
    assert_eq!(flags, "01");

    // Neither the key nor the prompt is in any span.
    let everything = format!("{:?}", collector.all());
    assert!(!everything.contains(KEY) && !everything.contains(PROMPT));
    gateway.inner.shutdown().await;
}

#[tokio::test]
async fn an_inbound_traceparent_is_the_parent_and_reaches_the_upstream() {
    let up = MockUpstream::start().await.unwrap();
    let (endpoint, collector) = http_collector().await;
    let gateway = start(
        &up,
        &format!("enabled = true\nendpoint = \"{endpoint}\""),
        "",
    )
    .await;
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{client_trace}-{client_span}-01");
    let response = chat(
        &gateway,
        json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
        &[("traceparent", &traceparent), ("tracestate", "vendor=abc")],
    )
    .await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let (root, children) = collector.trace_of(&id).await;
    assert_eq!(root.trace_id, client_trace);
    assert_eq!(root.parent, client_span);
    assert_eq!(
        root.attr("gen_ai.response.finish_reasons"),
        &json!(["stop"])
    );
    assert_eq!(root.attr("gateway.streamed"), false);
    assert_eq!(children.len(), 3, "auth, routing, attempt: {children:#?}");
    let attempt = named(&children, "chat m")[0];
    let (trace_id, parent_id, _) = upstream_traceparent(&up);
    assert_eq!(trace_id, client_trace);
    assert_eq!(parent_id, attempt.span_id);
    let requests = up.requests();
    assert_eq!(requests.last().unwrap().headers["tracestate"], "vendor=abc");

    // An invalid traceparent starts a new trace instead.
    let response = chat(
        &gateway,
        json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
        &[("traceparent", "00-zz-nonsense-01")],
    )
    .await;
    let (root, _) = collector.trace_of(&request_id(&response)).await;
    assert!(root.parent.is_empty());
    assert_ne!(root.trace_id, client_trace);
    gateway.inner.shutdown().await;
}

#[tokio::test]
async fn retries_and_fallbacks_are_attempt_spans_with_their_reason() {
    let up = MockUpstream::start().await.unwrap();
    let (endpoint, collector) = http_collector().await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let extra = format!(
        r#"
[policy.retry]
max_attempts = 2
backoff_base_ms = 1
backoff_max_ms = 2

[[providers]]
name = "dead"
kind = "openai"
base_urls = ["{dead_url}"]
timeout_secs = 5

[[models]]
alias = "resilient"
targets = [{{ provider = "dead", model = "first" }}]
fallbacks = ["chat"]
"#
    );
    let gateway = start(
        &up,
        &format!("enabled = true\nendpoint = \"{endpoint}\""),
        &extra,
    )
    .await;

    // The mock fails every call of this request: attempt 1, then its retry.
    let response = chat(
        &gateway,
        json!({"model": "chat",
            "messages": [{"role": "user", "content": "[[mock status=503]] hi"}]}),
        &[],
    )
    .await;
    let status = response.status().as_u16();
    assert!(status >= 500, "{status}");
    let (root, children) = collector.trace_of(&request_id(&response)).await;
    let mut attempts = named(&children, "chat m");
    attempts.sort_by_key(|s| s.attr("gateway.attempt").as_i64());
    assert_eq!(attempts.len(), 2, "{children:#?}");
    assert_eq!(attempts[0].attr("gateway.attempt"), 1);
    assert_eq!(attempts[1].attr("gateway.attempt"), 2);
    assert_eq!(attempts[1].attr("gateway.attempt.reason"), "retry");
    assert_eq!(attempts[1].attr("gateway.attempt.after"), "server_error");
    for attempt in &attempts {
        assert_eq!(attempt.attr("http.response.status_code"), 503);
        assert!(attempt.error);
        assert!(attempt.attr("error.type").is_string());
        assert_eq!(attempt.parent, root.span_id);
    }
    assert_eq!(root.attr("http.response.status_code"), i64::from(status));
    assert_eq!(root.attr("gateway.attempts"), 2);
    assert!(root.error, "a 5xx marks the root span as an error");

    // The dead target fails to connect; its alias falls back to `chat`.
    let response = chat(
        &gateway,
        json!({"model": "resilient", "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let (root, children) = collector.trace_of(&request_id(&response)).await;
    let first = named(&children, "chat first");
    let second = named(&children, "chat m");
    assert_eq!((first.len(), second.len()), (1, 1), "{children:#?}");
    assert_eq!(first[0].attr("gateway.attempt"), 1);
    assert!(first[0].error);
    assert_eq!(second[0].attr("gateway.attempt"), 2);
    assert_eq!(second[0].attr("gateway.attempt.reason"), "fallback");
    assert_eq!(second[0].attr("gateway.attempt.after"), "connect");
    assert_eq!(root.attr("gen_ai.request.model"), "resilient");
    assert_eq!(root.attr("gateway.alias"), "chat");
    assert_eq!(root.attr("gen_ai.provider.name"), "up");
    assert!(!root.error);
    gateway.inner.shutdown().await;
}

#[tokio::test]
async fn grpc_export_carries_the_same_tree() {
    let up = MockUpstream::start().await.unwrap();
    let (endpoint, collector) = grpc_collector().await;
    let gateway = start(
        &up,
        &format!("enabled = true\nprotocol = \"grpc\"\nendpoint = \"{endpoint}\""),
        "",
    )
    .await;
    let response = chat(
        &gateway,
        json!({"model": "chat", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let _body = response.text().await.unwrap();
    let (root, children) = collector.trace_of(&id).await;
    assert_eq!(root.attr("gen_ai.response.model"), "m");
    let mut names: Vec<&str> = children.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["auth", "chat m", "routing", "stream"]);
    assert!(children.iter().all(|s| s.parent == root.span_id));
    gateway.inner.shutdown().await;
}

#[tokio::test]
async fn sample_ratio_zero_exports_nothing_but_still_propagates() {
    let up = MockUpstream::start().await.unwrap();
    let (endpoint, collector) = http_collector().await;
    let gateway = start(
        &up,
        &format!("enabled = true\nsample_ratio = 0.0\nendpoint = \"{endpoint}\""),
        "",
    )
    .await;
    for _ in 0..5 {
        let response = chat(
            &gateway,
            json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
            &[],
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let (_, _, flags) = upstream_traceparent(&up);
    assert_eq!(flags, "00", "the upstream is told the trace is not sampled");
    // Shutdown flushes whatever was queued: nothing was.
    let stats = gateway.inner.trace_export_stats().unwrap();
    gateway.inner.shutdown().await;
    assert!(collector.all().is_empty(), "{:#?}", collector.all());
    assert_eq!((stats.exported, stats.dropped), (0, 0));
}

#[tokio::test]
async fn with_tracing_off_an_inbound_traceparent_is_forwarded_unchanged() {
    let up = MockUpstream::start().await.unwrap();
    let gateway = start(&up, "enabled = false", "").await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = chat(
        &gateway,
        json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
        &[("traceparent", traceparent)],
    )
    .await;
    assert_eq!(response.status(), 200);
    let requests = up.requests();
    assert_eq!(requests.last().unwrap().headers["traceparent"], traceparent);
    assert!(gateway.inner.trace_export_stats().is_none());

    // Without one, nothing is made up.
    let response = chat(
        &gateway,
        json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(response.status(), 200);
    let requests = up.requests();
    assert!(!requests.last().unwrap().headers.contains_key("traceparent"));
    gateway.inner.shutdown().await;
}

#[tokio::test]
async fn a_silent_collector_slows_no_request_and_no_shutdown() {
    let up = MockUpstream::start().await.unwrap();
    let endpoint = silent_collector().await;
    let export_timeout = Duration::from_secs(5);
    let gateway = start(
        &up,
        &format!(
            "enabled = true\nendpoint = \"{endpoint}\"\nexport_timeout_ms = {}\n\
             max_queue_size = 16\nmax_export_batch_size = 4",
            export_timeout.as_millis()
        ),
        "",
    )
    .await;
    // Each request ends 4 spans; the first batch is stuck in an export the collector never
    // answers, so the queue fills and later spans must be dropped, not waited for.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let one = Instant::now();
        let response = chat(
            &gateway,
            json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
            &[],
        )
        .await;
        assert_eq!(response.status(), 200);
        slowest = slowest.max(one.elapsed());
    }
    let all = started.elapsed();
    assert!(
        all < export_timeout,
        "40 requests took {all:?} against a silent collector"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "slowest request {slowest:?}"
    );
    // The observers (and span ends) run after the body: give the last ones a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = gateway.inner.trace_export_stats().unwrap();
    assert!(stats.dropped > 0, "{stats:?}");
    assert_eq!(stats.exported, 0);
    // Shutdown waits for the stuck export at most the grace period (1 s), not its timeout.
    let stopping = Instant::now();
    gateway.inner.shutdown().await;
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

#[tokio::test]
async fn every_provider_kind_and_endpoint_sends_its_attempt_context_upstream() {
    let up = MockUpstream::start().await.unwrap();
    let (endpoint, collector) = http_collector().await;
    let root_url = up.base_url().trim_end_matches("/v1").to_owned();
    let extra = format!(
        r#"
[[providers]]
name = "claude-up"
kind = "anthropic"
base_urls = ["{openai}"]
api_keys = ["sk-up"]

[[providers]]
name = "gemini-up"
kind = "gemini"
base_urls = ["{root_url}/v1beta"]
api_keys = ["sk-up"]

[[models]]
alias = "claude"
targets = [{{ provider = "claude-up", model = "claude-test" }}]

[[models]]
alias = "gem"
targets = [{{ provider = "gemini-up", model = "gemini-test" }}]
"#,
        openai = up.base_url(),
    );
    let gateway = start(
        &up,
        &format!("enabled = true\nendpoint = \"{endpoint}\""),
        &extra,
    )
    .await;
    let base = format!("http://{}", gateway.inner.local_addr());
    let client = reqwest::Client::new();
    let hi = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let calls = [
        ("/v1/chat/completions", hi("claude"), "chat claude-test"),
        ("/v1/chat/completions", hi("gem"), "chat gemini-test"),
        // An Anthropic client to an Anthropic vendor: forwarded natively.
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}]}),
            "chat claude-test",
        ),
        (
            "/v1/embeddings",
            json!({"model": "chat", "input": "hi"}),
            "embeddings m",
        ),
    ];
    for (path, body, attempt_name) in calls {
        let response = client
            .post(format!("{base}{path}"))
            .bearer_auth(KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path} {body}");
        let id = request_id(&response);
        let (root, children) = collector.trace_of(&id).await;
        let attempt = named(&children, attempt_name);
        assert_eq!(attempt.len(), 1, "{path}: {children:#?}");
        let (trace_id, parent_id, _) = upstream_traceparent(&up);
        assert_eq!(
            (trace_id, parent_id),
            (root.trace_id.clone(), attempt[0].span_id.clone())
        );
    }
    gateway.inner.shutdown().await;
}
