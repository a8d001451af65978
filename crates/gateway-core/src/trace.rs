//! A request's trace: W3C trace context in and out, the request's spans, and the names of
//! their attributes (the OpenTelemetry GenAI semantic conventions, in [`attr`]).
//!
//! The observability layer decides per request what [`RequestTrace`] it carries: nothing,
//! the client's context forwarded as it came (tracing off), or a live root span (tracing on).
//! Inner layers only ask the [`RequestContext`](crate::RequestContext) for a child span, which
//! is `None` unless tracing is on, so a gateway without tracing pays one branch per span site.
//! The OpenTelemetry API is re-exported as [`otel`] so that layers name one version of it.

pub use opentelemetry as otel;

use http::{HeaderMap, HeaderValue};
use otel::trace::{Span as _, SpanContext, SpanKind, TraceContextExt as _, Tracer as _};
use std::borrow::Cow;
use std::sync::{Arc, Mutex};

/// A span of the request's trace (boxed, so no layer names the SDK's types).
pub type Span = otel::global::BoxedSpan;
/// The process's tracer, built by the observability layer from `[observability.tracing]`.
pub type Tracer = otel::global::BoxedTracer;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The attribute names the gateway's spans use: the OpenTelemetry GenAI and HTTP semantic
/// conventions where one exists, `gateway.*` for the rest. One list, so the root span, the
/// attempts and the stream agree on every name.
pub mod attr {
    pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
    pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
    pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
    pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
    pub const GEN_AI_RESPONSE_ID: &str = "gen_ai.response.id";
    pub const GEN_AI_RESPONSE_FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
    pub const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    pub const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    pub const HTTP_ROUTE: &str = "http.route";
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    pub const ERROR_TYPE: &str = "error.type";
    pub const GATEWAY_REQUEST_ID: &str = "gateway.request_id";
    pub const GATEWAY_PROJECT: &str = "gateway.project";
    pub const GATEWAY_KEY_ID: &str = "gateway.key_id";
    pub const GATEWAY_ALIAS: &str = "gateway.alias";
    pub const GATEWAY_ATTEMPTS: &str = "gateway.attempts";
    /// The attempt's number within the request, from 1.
    pub const GATEWAY_ATTEMPT: &str = "gateway.attempt";
    /// Why this attempt was made: `retry` (the same target again) or `fallback` (the next).
    pub const GATEWAY_ATTEMPT_REASON: &str = "gateway.attempt.reason";
    /// The failure class of the attempt before (`timeout`, `server_error`, ...).
    pub const GATEWAY_ATTEMPT_AFTER: &str = "gateway.attempt.after";
    pub const GATEWAY_ROUTE_TARGETS: &str = "gateway.route.targets";
    pub const GATEWAY_STREAMED: &str = "gateway.streamed";
    pub const GATEWAY_TTFT_MS: &str = "gateway.time_to_first_token_ms";
    /// Events relayed to the client by the `stream` span.
    pub const GATEWAY_STREAM_EVENTS: &str = "gateway.stream.events";
    pub const GATEWAY_CLIENT_ABORTED: &str = "gateway.client_aborted";
    pub const GATEWAY_USAGE_ESTIMATED: &str = "gateway.usage_estimated";
}

/// The GenAI operation (`gen_ai.operation.name`) an endpoint performs.
pub fn operation_name(path: &str) -> &'static str {
    match path {
        "/v1/embeddings" => "embeddings",
        "/v1/images/generations" | "/v1/audio/speech" | "/v1/audio/transcriptions" => {
            "generate_content"
        }
        _ => "chat",
    }
}

/// A parsed W3C `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value as W3C Trace Context level 1 says: version `00` exactly 55
    /// characters; a later version at least that, its extra fields ignored; version `ff`, an
    /// all-zero trace or parent id, or upper-case hex refused.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < 55 || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        if version == 0xff || (version == 0 && value.len() != 55) {
            return None;
        }
        if version != 0 && value.len() > 55 && value[55] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, byte) in trace_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, byte) in parent_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The version `00` header value (re-encoded, never the client's bytes).
    pub fn to_header_value(&self) -> HeaderValue {
        let mut text = String::with_capacity(55);
        text.push_str("00-");
        push_hex(&mut text, &self.trace_id);
        text.push('-');
        push_hex(&mut text, &self.parent_id);
        text.push('-');
        push_hex(&mut text, &[self.flags]);
        // Only hex digits and dashes: always a valid header value.
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    pub fn trace_id_hex(&self) -> String {
        let mut text = String::with_capacity(32);
        push_hex(&mut text, &self.trace_id);
        text
    }

    fn of(span: &SpanContext) -> Self {
        Self {
            trace_id: span.trace_id().to_bytes(),
            parent_id: span.span_id().to_bytes(),
            flags: span.trace_flags().to_u8(),
        }
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

fn push_hex(text: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
}

/// The trace context an upstream call carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
}

/// `tracestate` is at most 32 list members; 512 characters is what W3C asks to propagate.
const MAX_TRACESTATE_BYTES: usize = 512;

impl TraceHeaders {
    /// The client's valid `traceparent` (re-encoded) and its `tracestate` (kept only if short
    /// and printable), or `None`.
    pub fn from_request(headers: &HeaderMap) -> Option<(TraceParent, Self)> {
        let parent = TraceParent::parse(headers.get(TRACEPARENT)?.as_bytes())?;
        let tracestate = headers
            .get(TRACESTATE)
            .filter(|value| {
                let bytes = value.as_bytes();
                !bytes.is_empty()
                    && bytes.len() <= MAX_TRACESTATE_BYTES
                    && bytes.iter().all(|b| (0x20..0x7f).contains(b))
            })
            .cloned();
        Some((
            parent,
            Self {
                traceparent: parent.to_header_value(),
                tracestate,
            },
        ))
    }

    /// Adds the headers to an upstream request's.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent.clone());
        if let Some(state) = &self.tracestate {
            headers.insert(TRACESTATE, state.clone());
        }
    }

    fn of(span: &SpanContext) -> Self {
        let state = span.trace_state().header();
        Self {
            traceparent: TraceParent::of(span).to_header_value(),
            tracestate: (!state.is_empty())
                .then(|| HeaderValue::from_str(&state).ok())
                .flatten(),
        }
    }
}

/// What a request's trace is.
#[derive(Debug, Default)]
pub enum RequestTrace {
    /// Tracing is off and the client sent no trace context.
    #[default]
    Off,
    /// Tracing is off: the client's context goes upstream unchanged, so the vendor's spans
    /// still join the client's trace.
    Forward {
        parent: TraceParent,
        headers: TraceHeaders,
    },
    /// Tracing is on: a root span (sampled or not) whose children are the layers' spans.
    On(Box<ActiveTrace>),
}

/// A live trace: the tracer, the root span (in its OpenTelemetry context) and what the
/// request path learns for it along the way.
#[derive(Debug)]
pub struct ActiveTrace {
    tracer: Arc<Tracer>,
    root: otel::Context,
    /// The context the next upstream call carries: the current attempt's span.
    upstream: Mutex<Option<TraceHeaders>>,
    finish_reasons: Mutex<Vec<String>>,
}

impl ActiveTrace {
    /// Starts the request's root span (server kind), a child of `parent` when the client sent
    /// a trace context.
    pub fn start(
        tracer: Arc<Tracer>,
        name: impl Into<Cow<'static, str>>,
        parent: Option<(TraceParent, &TraceHeaders)>,
        attributes: Vec<otel::KeyValue>,
    ) -> Self {
        let parent_cx = match parent {
            Some((parent, headers)) => {
                let state = headers
                    .tracestate
                    .as_ref()
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse().ok())
                    .unwrap_or_default();
                otel::Context::new().with_remote_span_context(SpanContext::new(
                    otel::trace::TraceId::from_bytes(parent.trace_id),
                    otel::trace::SpanId::from_bytes(parent.parent_id),
                    otel::trace::TraceFlags::new(parent.flags),
                    true,
                    state,
                ))
            }
            None => otel::Context::new(),
        };
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&*tracer, &parent_cx);
        Self {
            tracer,
            root: parent_cx.with_span(span),
            upstream: Mutex::new(None),
            finish_reasons: Mutex::new(Vec::new()),
        }
    }

    /// The root span, to add attributes to and end.
    pub fn root(&self) -> otel::trace::SpanRef<'_> {
        self.root.span()
    }

    pub fn child(&self, name: impl Into<Cow<'static, str>>, kind: SpanKind) -> Span {
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&*self.tracer, &self.root)
    }

    /// The finish reasons seen in the answer, in order, once each.
    pub fn finish_reasons(&self) -> Vec<String> {
        lock(&self.finish_reasons).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RequestTrace {
    /// A child span of the root, or `None` when tracing is off.
    pub fn start_span(&self, name: impl Into<Cow<'static, str>>, kind: SpanKind) -> Option<Span> {
        match self {
            Self::On(trace) => Some(trace.child(name, kind)),
            _ => None,
        }
    }

    pub fn active(&self) -> Option<&ActiveTrace> {
        match self {
            Self::On(trace) => Some(trace),
            _ => None,
        }
    }

    /// The trace id in hex, for log lines, whenever the request belongs to a trace.
    pub fn trace_id(&self) -> Option<String> {
        match self {
            Self::Off => None,
            Self::Forward { parent, .. } => Some(parent.trace_id_hex()),
            Self::On(trace) => {
                Some(TraceParent::of(trace.root.span().span_context()).trace_id_hex())
            }
        }
    }

    /// Makes `span` (an upstream attempt) the parent the next upstream call names.
    pub fn set_upstream_span(&self, span: &Span) {
        if let Self::On(trace) = self {
            *lock(&trace.upstream) = Some(TraceHeaders::of(span.span_context()));
        }
    }

    /// The trace headers an upstream call carries: its attempt's span context (or the root's)
    /// when tracing is on, the client's own when tracing is off.
    pub fn upstream_headers(&self) -> Option<TraceHeaders> {
        match self {
            Self::Off => None,
            Self::Forward { headers, .. } => Some(headers.clone()),
            Self::On(trace) => Some(
                lock(&trace.upstream)
                    .clone()
                    .unwrap_or_else(|| TraceHeaders::of(trace.root.span().span_context())),
            ),
        }
    }

    /// Notes the finish reasons of an OpenAI `chat.completion` or chunk, when tracing is on.
    pub fn note_finish_reasons(&self, json: &[u8]) {
        let Self::On(trace) = self else { return };
        // Most chunks carry no finish reason: skip them without parsing.
        const NEEDLE: &[u8] = b"\"finish_reason\":\"";
        if !json.windows(NEEDLE.len()).any(|window| window == NEEDLE) {
            return;
        }
        #[derive(serde::Deserialize)]
        struct Choices {
            #[serde(default)]
            choices: Vec<Choice>,
        }
        #[derive(serde::Deserialize)]
        struct Choice {
            finish_reason: Option<String>,
        }
        let Ok(parsed) = serde_json::from_slice::<Choices>(json) else {
            return;
        };
        let mut reasons = lock(&trace.finish_reasons);
        for reason in parsed.choices.into_iter().filter_map(|c| c.finish_reason) {
            if !reasons.contains(&reason) {
                reasons.push(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_re_encodes_a_valid_traceparent() {
        let parent = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.flags, 1);
        assert_eq!(parent.to_header_value(), VALID);
    }

    #[test]
    fn refuses_invalid_traceparents() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad.as_bytes()).is_none(), "{bad}");
        }
        // A later version may append fields; they are ignored.
        let future = format!("01{}-more", &VALID[2..]);
        assert!(TraceParent::parse(future.as_bytes()).is_some());
    }

    #[test]
    fn a_long_or_unprintable_tracestate_is_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        headers.insert(TRACESTATE, HeaderValue::from_static("vendor=abc"));
        let (_, forwarded) = TraceHeaders::from_request(&headers).unwrap();
        assert_eq!(forwarded.tracestate.unwrap(), "vendor=abc");
        headers.insert(TRACESTATE, HeaderValue::from_str(&"a".repeat(600)).unwrap());
        let (_, forwarded) = TraceHeaders::from_request(&headers).unwrap();
        assert!(forwarded.tracestate.is_none());
    }

    #[test]
    fn with_tracing_off_the_clients_context_is_forwarded_and_logged() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let (parent, forwarded) = TraceHeaders::from_request(&headers).unwrap();
        let trace = RequestTrace::Forward {
            parent,
            headers: forwarded.clone(),
        };
        assert_eq!(
            trace.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace.upstream_headers(), Some(forwarded));
        assert!(trace.start_span("x", SpanKind::Internal).is_none());
        assert!(RequestTrace::Off.trace_id().is_none());
        assert!(RequestTrace::Off.upstream_headers().is_none());
    }

    #[test]
    fn operations_follow_the_genai_names() {
        assert_eq!(operation_name("/v1/chat/completions"), "chat");
        assert_eq!(operation_name("/v1/messages"), "chat");
        assert_eq!(operation_name("/v1/embeddings"), "embeddings");
    }
}
