//! Per-request state shared by every layer of one request.
//!
//! The outermost (observability) layer creates a [`RequestContext`] and puts an `Arc` of it in the
//! request's extensions. Inner layers fill in its [`RequestOutcome`] as they learn things (who the
//! caller is, which alias and provider were chosen, the vendor's usage). When the response body
//! is finished (or dropped because the client went away) the observability layer hands the final
//! outcome to every [`RequestObserver`]: the access log and the usage recorder.

use crate::error::ErrorType;
use crate::openai::Usage;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use uuid::Uuid;

/// Our request id: a UUIDv7 (time-ordered, so usage rows insert in index order), or the caller's
/// own `x-request-id` when it is a valid UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(Uuid);

impl RequestId {
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }

    /// Accepts an inbound header value only if it is a UUID: the id is the usage record's primary
    /// key, and free-form ids would let one caller's id collide with another's format.
    pub fn from_header(value: &[u8]) -> Option<Self> {
        Uuid::try_parse_ascii(value).ok().map(Self)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The id as a header value, formatted without a heap allocation.
    pub fn to_header_value(&self) -> http::HeaderValue {
        let mut buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = self.0.hyphenated().encode_lower(&mut buffer);
        // A hyphenated UUID is 36 ASCII characters, always a valid header value.
        http::HeaderValue::from_str(text).unwrap_or_else(|_| http::HeaderValue::from_static(""))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The address of the connection's peer, put in the request's extensions by the server for
/// every request. The access layer decides which address is the client's (behind a trusted
/// load balancer it is not the peer's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// The client's address as the access layer derived it: the peer's, or, when the peer is a
/// trusted proxy, the one the proxy reported (`X-Forwarded-For`, `Forwarded`). Put in the
/// request's extensions by the server next to [`PeerAddr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub std::net::IpAddr);

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub project: Arc<str>,
    pub key_id: Arc<str>,
    /// Aliases this project may use; `None` means every alias.
    pub allowed_models: Option<Arc<HashSet<String>>>,
    /// Free-form labels (team, business line) copied into every usage record.
    pub tags: Arc<BTreeMap<String, String>>,
    /// `tags` as a JSON object, serialised once per config version rather than per request.
    pub tags_json: Arc<str>,
    /// The project's `rate_limit`, shared by all its keys.
    pub project_rate_limit: Option<crate::RateLimit>,
    /// This key's own `rate_limit`.
    pub key_rate_limit: Option<crate::RateLimit>,
}

impl Principal {
    pub fn may_use(&self, alias: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|allowed| allowed.contains(alias))
    }
}

/// What happened to a request, filled in by the layers as it goes.
#[derive(Debug, Clone, Default)]
pub struct RequestOutcome {
    pub principal: Option<Principal>,
    /// Set once routing resolved an alias: only such requests get a usage record.
    pub routed: bool,
    pub alias: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub upstream_model: Option<Arc<str>>,
    pub attempts: u32,
    /// Calls made again to a target that had just failed (after a back-off).
    pub retries: u32,
    /// Times the request moved on to another target of its plan after a failure.
    pub fallbacks: u32,
    pub streamed: bool,
    pub error_type: Option<ErrorType>,
    pub usage: Option<Usage>,
    pub time_to_first_token: Option<Duration>,
    pub vendor_response_id: Option<String>,
    pub vendor_request_id: Option<String>,
    /// `usage` is the gateway's estimate, not the vendor's count.
    pub usage_estimated: bool,
    /// Prompt size estimated from the request, for when the vendor reports no usage.
    pub estimated_prompt_tokens: u64,
    /// Characters of streamed content seen so far, for the same purpose.
    pub streamed_output_chars: u64,
    /// Headers the response gets whatever its status (the rate-limit quotas).
    pub response_headers: Option<Box<http::HeaderMap>>,
    /// The client's address (see [`ClientIp`]), for the access log.
    pub client_ip: Option<std::net::IpAddr>,
}

impl RequestOutcome {
    /// Fills in an estimate when the vendor reported no usage (some relays ignore
    /// `stream_options.include_usage`; an abandoned stream may end before its usage chunk).
    pub fn settle_usage(&mut self) {
        if self.usage.is_none() && self.routed && self.provider.is_some() {
            self.usage = Some(Usage::new(
                self.estimated_prompt_tokens,
                self.streamed_output_chars.div_ceil(4),
            ));
            self.usage_estimated = true;
        }
    }
}

/// Whether the observers may run when the response ends, or must wait for work that outlives
/// the response (reading the rest of an abandoned stream for its usage).
enum FinishGate {
    Open,
    Held,
    Parked(Box<dyn FnOnce() + Send>),
}

impl std::fmt::Debug for FinishGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Open => "Open",
            Self::Held => "Held",
            Self::Parked(_) => "Parked",
        })
    }
}

/// Keeps the observers of a request waiting; dropping it runs them if they were parked.
#[derive(Debug)]
pub struct FinishHold {
    context: std::sync::Arc<RequestContext>,
}

impl Drop for FinishHold {
    fn drop(&mut self) {
        let parked = std::mem::replace(&mut *self.context.gate(), FinishGate::Open);
        if let FinishGate::Parked(finish) = parked {
            finish();
        }
    }
}

/// Everything the layers share about one request.
#[derive(Debug)]
pub struct RequestContext {
    pub id: RequestId,
    /// Wall-clock time the request arrived, for records.
    pub received_at: OffsetDateTime,
    /// Monotonic start, for latencies.
    pub started: Instant,
    pub method: http::Method,
    pub path: String,
    outcome: Mutex<RequestOutcome>,
    gate: Mutex<FinishGate>,
    hooks: FinishHooks,
    trace: crate::trace::RequestTrace,
}

/// Per-request work to run when the request is finished, before the observers: settling a
/// rate-limit reservation, freeing an in-flight slot, storing an idempotent result.
pub type FinishHook = Box<dyn FnOnce(&FinishedRequest<'_>) + Send>;

#[derive(Default)]
struct FinishHooks(Mutex<Vec<FinishHook>>);

impl std::fmt::Debug for FinishHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.0.lock().map_or(0, |hooks| hooks.len());
        write!(f, "FinishHooks({count})")
    }
}

impl RequestContext {
    pub fn new(id: RequestId, method: http::Method, path: String) -> Self {
        Self {
            id,
            received_at: OffsetDateTime::now_utc(),
            started: Instant::now(),
            method,
            path,
            outcome: Mutex::new(RequestOutcome::default()),
            gate: Mutex::new(FinishGate::Open),
            hooks: FinishHooks::default(),
            trace: crate::trace::RequestTrace::Off,
        }
    }

    /// Sets the request's trace (the observability layer does, before sharing the context).
    pub fn with_trace(mut self, trace: crate::trace::RequestTrace) -> Self {
        self.trace = trace;
        self
    }

    pub fn trace(&self) -> &crate::trace::RequestTrace {
        &self.trace
    }

    /// A child span of the request's root span; `None` (and no work) when tracing is off.
    pub fn start_span(
        &self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: crate::trace::otel::trace::SpanKind,
    ) -> Option<crate::trace::Span> {
        self.trace.start_span(name, kind)
    }

    fn gate(&self) -> MutexGuard<'_, FinishGate> {
        self.gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds the observers until the returned guard is dropped. Taken before the response
    /// ends, by work that must update the outcome after it.
    pub fn hold_finish(self: &std::sync::Arc<Self>) -> FinishHold {
        *self.gate() = FinishGate::Held;
        FinishHold {
            context: self.clone(),
        }
    }

    /// Runs `finish` now, or, while a [`FinishHold`] exists, when it is dropped.
    pub fn finish_when_released(&self, finish: impl FnOnce() + Send + 'static) {
        let mut gate = self.gate();
        if matches!(*gate, FinishGate::Held) {
            *gate = FinishGate::Parked(Box::new(finish));
        } else {
            drop(gate);
            finish();
        }
    }

    /// The outcome is only touched by the task serving this request, so the lock is never
    /// contended; a poisoned lock still holds valid data, so it is recovered, never a panic.
    pub fn outcome(&self) -> MutexGuard<'_, RequestOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Registers `hook` to run once when the request is finished (after any drain), whatever
    /// its outcome, before the observers.
    pub fn on_finish(&self, hook: impl FnOnce(&FinishedRequest<'_>) + Send + 'static) {
        self.hooks
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(hook));
    }

    /// The hooks registered so far, for the finisher to run; each runs at most once.
    pub fn take_finish_hooks(&self) -> Vec<FinishHook> {
        std::mem::take(
            &mut *self
                .hooks
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// The final facts about a finished request, handed to every observer.
#[derive(Debug)]
pub struct FinishedRequest<'a> {
    pub context: &'a RequestContext,
    pub outcome: &'a RequestOutcome,
    pub status: http::StatusCode,
    pub elapsed: Duration,
    /// The client went away before the response body was completely sent.
    pub client_aborted: bool,
}

/// Something that wants to know about every finished request (access log, usage recorder).
///
/// Called on the serving task when the response body ends: implementations must not block
/// (hand work to a channel instead).
pub trait RequestObserver: Send + Sync + 'static {
    fn request_finished(&self, finished: &FinishedRequest<'_>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_request_id_must_be_a_uuid() {
        let id = Uuid::now_v7().to_string();
        assert_eq!(
            RequestId::from_header(id.as_bytes()).unwrap().to_string(),
            id
        );
        assert!(RequestId::from_header(b"not-a-uuid").is_none());
        assert!(RequestId::from_header(b"").is_none());
    }

    #[test]
    fn held_finish_runs_when_released_and_only_then() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let context = Arc::new(RequestContext::new(
            RequestId::new_v7(),
            http::Method::POST,
            "/".into(),
        ));
        let ran = Arc::new(AtomicBool::new(false));
        let hold = context.hold_finish();
        let flag = ran.clone();
        context.finish_when_released(move || flag.store(true, Ordering::SeqCst));
        assert!(!ran.load(Ordering::SeqCst), "ran while held");
        drop(hold);
        assert!(ran.load(Ordering::SeqCst), "did not run on release");

        // Released before the finish arrives: it runs at once.
        let ran = Arc::new(AtomicBool::new(false));
        drop(context.hold_finish());
        let flag = ran.clone();
        context.finish_when_released(move || flag.store(true, Ordering::SeqCst));
        assert!(ran.load(Ordering::SeqCst));
    }

    #[test]
    fn usage_is_estimated_only_when_the_vendor_sent_none() {
        let mut outcome = RequestOutcome {
            routed: true,
            provider: Some("p".into()),
            estimated_prompt_tokens: 10,
            streamed_output_chars: 9,
            ..RequestOutcome::default()
        };
        outcome.settle_usage();
        assert_eq!(outcome.usage, Some(Usage::new(10, 3)));
        assert!(outcome.usage_estimated);
        let mut vendor = RequestOutcome {
            routed: true,
            provider: Some("p".into()),
            usage: Some(Usage::new(1, 1)),
            ..RequestOutcome::default()
        };
        vendor.settle_usage();
        assert!(!vendor.usage_estimated);
    }

    #[test]
    fn generated_ids_are_v7() {
        assert_eq!(RequestId::new_v7().as_uuid().get_version_num(), 7);
    }

    #[test]
    fn allow_list() {
        let mut principal = Principal {
            project: "p".into(),
            key_id: "k".into(),
            allowed_models: None,
            tags: Arc::default(),
            tags_json: "{}".into(),
            project_rate_limit: None,
            key_rate_limit: None,
        };
        assert!(principal.may_use("anything"));
        principal.allowed_models = Some(Arc::new(HashSet::from(["chat".to_string()])));
        assert!(principal.may_use("chat"));
        assert!(!principal.may_use("other"));
    }
}
