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
    pub streamed: bool,
    pub error_type: Option<ErrorType>,
    pub usage: Option<Usage>,
    pub time_to_first_token: Option<Duration>,
    pub vendor_response_id: Option<String>,
    pub vendor_request_id: Option<String>,
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
        };
        assert!(principal.may_use("anything"));
        principal.allowed_models = Some(Arc::new(HashSet::from(["chat".to_string()])));
        assert!(principal.may_use("chat"));
        assert!(!principal.may_use("other"));
    }
}
