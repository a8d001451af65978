//! The contract between the request path and a vendor adapter.
//!
//! `gateway-providers` implements [`ChatProvider`] for each vendor kind; the composing crate
//! calls it through this trait only, so routing and policy never see a vendor's wire format.

use crate::context::RequestId;
use crate::error::GatewayError;
use crate::openai::{ChatCompletionRequest, EmbeddingsRequest, Usage};
use crate::trace::TraceHeaders;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// One chat completion to send upstream. `request.model` already holds the upstream model name.
#[derive(Debug)]
pub struct ChatCall {
    pub request: ChatCompletionRequest,
    pub request_id: RequestId,
    /// The W3C trace context the upstream request carries (`traceparent`, `tracestate`).
    pub trace: Option<TraceHeaders>,
}

/// One embeddings request to send upstream. `request.model` already holds the upstream model.
#[derive(Debug)]
pub struct EmbeddingsCall {
    pub request: EmbeddingsRequest,
    pub request_id: RequestId,
    /// The W3C trace context the upstream request carries.
    pub trace: Option<TraceHeaders>,
}

/// The vendor's answer, in OpenAI format.
pub enum ChatReply {
    Complete(CompleteReply),
    Stream(StreamReply),
}

impl std::fmt::Debug for ChatReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Complete(reply) => f.debug_tuple("Complete").field(reply).finish(),
            Self::Stream(reply) => f
                .debug_struct("Stream")
                .field("vendor_request_id", &reply.vendor_request_id)
                .finish_non_exhaustive(),
        }
    }
}

#[derive(Debug)]
pub struct CompleteReply {
    /// The OpenAI `chat.completion` JSON, forwarded to the client as is.
    pub body: Bytes,
    pub usage: Option<Usage>,
    pub vendor_response_id: Option<String>,
    pub vendor_request_id: Option<String>,
}

pub struct StreamReply {
    pub vendor_request_id: Option<String>,
    /// Events in arrival order; the stream ends after the `[DONE]` event or an error.
    pub events: BoxStream<'static, Result<StreamEvent, GatewayError>>,
}

/// One server-sent event, already in OpenAI `chat.completion.chunk` format.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// The SSE `data:` payload (a JSON chunk, or `[DONE]`).
    pub data: Bytes,
    pub kind: StreamEventKind,
    pub usage: Option<Usage>,
    pub response_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEventKind {
    /// A chunk with choices (content, role, tool-call or finish deltas).
    Delta,
    /// The usage-only chunk (`choices: []`), sent when `stream_options.include_usage` is set.
    UsageOnly,
    /// The `[DONE]` terminator.
    Done,
}

impl StreamEvent {
    pub fn done() -> Self {
        Self {
            data: Bytes::from_static(b"[DONE]"),
            kind: StreamEventKind::Done,
            usage: None,
            response_id: None,
        }
    }
}

/// An API a vendor speaks natively, for requests forwarded without translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeApi {
    /// Anthropic's `POST /v1/messages`.
    AnthropicMessages,
    /// OpenAI's `POST /v1/responses` (the Codex CLI speaks only this).
    OpenAiResponses,
    /// OpenAI's `POST /v1/images/generations`.
    OpenAiImages,
    /// OpenAI's `POST /v1/audio/speech` (JSON in, audio out).
    OpenAiSpeech,
    /// OpenAI's `POST /v1/audio/transcriptions` (multipart form in).
    OpenAiTranscriptions,
}

impl NativeApi {
    /// The client-facing path of the API.
    pub const fn path(self) -> &'static str {
        match self {
            Self::AnthropicMessages => "/v1/messages",
            Self::OpenAiResponses => "/v1/responses",
            Self::OpenAiImages => "/v1/images/generations",
            Self::OpenAiSpeech => "/v1/audio/speech",
            Self::OpenAiTranscriptions => "/v1/audio/transcriptions",
        }
    }
}

/// A request in the vendor's own format, forwarded with only the model replaced, so fields and
/// beta features the gateway does not know survive.
#[derive(Debug)]
pub struct ForwardCall {
    pub api: NativeApi,
    /// The upstream model, also in `body`; some vendors need it in the URL too (Azure).
    pub model: String,
    pub body: Bytes,
    /// The body's type when it is not JSON (a multipart form, with its boundary).
    pub content_type: Option<http::HeaderValue>,
    /// Anthropic's `?beta=true`, which its SDKs add for beta features. No other client query
    /// is forwarded: a client must not be able to shape the upstream URL.
    pub beta: bool,
    /// The client's headers the vendor should see (e.g. `anthropic-beta`); nothing else of the
    /// client's is forwarded, its key least of all.
    pub headers: http::HeaderMap,
    pub stream: bool,
    pub request_id: RequestId,
    /// The W3C trace context the upstream request carries.
    pub trace: Option<TraceHeaders>,
}

/// The vendor's answer, in its own format. An error status is relayed as it is: a native
/// client understands its vendor's errors (and recovers from feature errors by reading them).
pub struct ForwardReply {
    pub status: http::StatusCode,
    pub content_type: Option<http::HeaderValue>,
    /// The vendor's `Retry-After`, relayed with an error status.
    pub retry_after: Option<http::HeaderValue>,
    pub vendor_request_id: Option<String>,
    pub body: ForwardBody,
}

pub enum ForwardBody {
    Complete {
        bytes: Bytes,
        usage: Option<Usage>,
        response_id: Option<String>,
    },
    Stream(BoxStream<'static, Result<ForwardChunk, GatewayError>>),
}

/// One piece of a forwarded stream (a whole SSE event), with what it tells about usage.
#[derive(Debug, Clone)]
pub struct ForwardChunk {
    pub bytes: Bytes,
    /// The usage known so far, once the vendor has reported any.
    pub usage: Option<Usage>,
    pub response_id: Option<String>,
    /// The first piece of generated output: time to first token is measured here.
    pub first_output: bool,
    /// The vendor's last event: nothing follows.
    pub last: bool,
}

/// A configured upstream (one `[[providers]]` entry) able to serve chat completions.
pub trait ChatProvider: Send + Sync + 'static {
    /// The provider's configured name (used in logs, records and errors).
    fn name(&self) -> &str;

    /// Deadline for one call (the `timeout_secs` of the provider's config).
    fn timeout(&self) -> std::time::Duration;

    /// Sends the call and resolves once the vendor's response headers (or its whole body, when
    /// not streaming) arrived. The future owns everything it needs, so the caller may race it
    /// against a deadline and drop it to cancel the upstream request.
    fn chat(&self, call: ChatCall) -> BoxFuture<'static, Result<ChatReply, GatewayError>>;

    /// The APIs this provider can take requests in unchanged (see [`ChatProvider::forward`]).
    fn native_apis(&self) -> &'static [NativeApi] {
        &[]
    }

    /// Forwards a request in one of [`ChatProvider::native_apis`] without translation.
    fn forward(&self, call: ForwardCall) -> BoxFuture<'static, Result<ForwardReply, GatewayError>> {
        let message = format!(
            "provider `{}` cannot forward {:?} requests",
            self.name(),
            call.api
        );
        Box::pin(std::future::ready(Err(GatewayError::Internal(message))))
    }

    /// Embeddings, answered in OpenAI's format. Kinds whose vendor has no embeddings API keep
    /// this default: a clear 400 rather than a request the vendor would refuse.
    fn embeddings(
        &self,
        call: EmbeddingsCall,
    ) -> BoxFuture<'static, Result<CompleteReply, GatewayError>> {
        let _upstream_model = call.request.model;
        let message = format!(
            "This model is served by provider `{}`, which does not offer embeddings.",
            self.name()
        );
        Box::pin(std::future::ready(Err(GatewayError::invalid_request(
            message,
            Some("model".into()),
        ))))
    }
}

impl std::fmt::Debug for dyn ChatProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatProvider({})", self.name())
    }
}

/// What the policy layer tells routing about upstream health: an upstream whose circuit
/// breaker is open should be tried last, if at all.
pub trait UpstreamHealth: Send + Sync + std::fmt::Debug {
    /// True while the breaker of this provider is open and not yet due for a probe.
    fn is_open(&self, provider: &str) -> bool;
}
