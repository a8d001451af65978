//! `Idempotency-Key` support: a repeated request gets the first one's response instead of a
//! second upstream call (and a second charge).
//!
//! The OpenAI SDKs retry a 5xx or a timeout with the same `Idempotency-Key`; without this the
//! retry of a request the vendor did complete is billed twice. A request is identified by
//! (project, key) and fingerprinted by method, path and body, so a key reused for a different
//! request is a conflict instead of a wrong replay.
//!
//! [`IdempotencyStore::claim`] makes the caller the owner (it does the work and then
//! [`ClaimGuard::complete`]s or [`ClaimGuard::release`]s), or hands back the stored response,
//! or waits for an owner still in flight. Two backends: in process ([`Backend::Local`]) and
//! Redis ([`Backend::Redis`]) for several replicas. A pending claim expires after
//! `in_flight_ttl_secs`, so a crashed owner cannot block its key for longer than that.
//!
//! Mapping for the edge: [`IdempotencyError::InvalidKey`] is a 400,
//! [`IdempotencyError::Unavailable`] a 503, [`Claim::Conflict`] a 422 and
//! [`Claim::StillInFlight`] a 409 with `Retry-After`.

mod codec;
mod local;
mod shared;

use crate::redis_link::{RedisLink, RedisUnavailable};
use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a Redis command may take before the request goes on without it. Redis answers
/// in well under a millisecond on a working network, so this only bounds a sick one.
const DEFAULT_REDIS_TIMEOUT_MS: u64 = 250;
/// After a Redis connection failure, how long requests skip Redis instead of each paying for
/// its own failed connect.
const REDIS_DOWN_FOR: Duration = Duration::from_secs(2);
/// `Retry-After` for a duplicate that gave up waiting: long enough not to hammer, short
/// enough that the SDK's retry usually finds the finished response.
const STILL_IN_FLIGHT_RETRY_AFTER: Duration = Duration::from_secs(2);

/// `[policy.idempotency]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// Honour `Idempotency-Key`. When off the header is ignored. Default true.
    pub enabled: bool,
    /// How long a completed response is replayed. Default 86400 (24 h).
    pub ttl_secs: u64,
    /// How long a claim whose owner has neither completed nor released holds its key (an
    /// owner that crashed). Must exceed the longest request. Default 600.
    pub in_flight_ttl_secs: u64,
    /// How long a duplicate waits for the in-flight first request before answering 409.
    /// Default 60.
    pub wait_secs: u64,
    /// Larger response bodies are not stored (the claim is released, so a retry goes
    /// upstream again). Default 4 MiB.
    pub max_body_bytes: usize,
    /// Local backend: most keys held at once; the oldest completed ones are evicted first.
    /// Default 100000.
    pub max_entries: usize,
    /// Local backend: most response bytes held at once. Default 256 MiB.
    pub max_stored_bytes: usize,
    /// `"local"` (in process, default) or `"redis"` (shared by replicas).
    pub backend: Backend,
    /// Required with `backend = "redis"`, e.g. `redis://127.0.0.1:6379`.
    pub redis_url: Option<String>,
    /// Per-command Redis timeout in milliseconds. Default 250.
    pub redis_timeout_ms: u64,
    /// `"fail-open"` (default: go on without idempotency) or `"fail-closed"` (answer 503)
    /// when Redis cannot be reached.
    pub on_redis_failure: OnRedisFailure,
    /// Prefix of every Redis key. Default `"gw:idem:"`.
    pub key_prefix: String,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_secs: 86_400,
            in_flight_ttl_secs: 600,
            wait_secs: 60,
            max_body_bytes: 4 * 1024 * 1024,
            max_entries: 100_000,
            max_stored_bytes: 256 * 1024 * 1024,
            backend: Backend::Local,
            redis_url: None,
            redis_timeout_ms: DEFAULT_REDIS_TIMEOUT_MS,
            on_redis_failure: OnRedisFailure::FailOpen,
            key_prefix: "gw:idem:".to_string(),
        }
    }
}

/// Where claims and responses are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    #[default]
    Local,
    Redis,
}

/// What a request does when Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRedisFailure {
    /// Proceed as if the request had no key: availability over duplicate protection.
    #[default]
    FailOpen,
    /// Refuse the request with a 503.
    FailClosed,
}

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// The header value is not 1..=255 visible ASCII characters (400).
    #[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
    InvalidKey,
    /// Redis is unreachable and the config says fail-closed (503).
    #[error("the idempotency store is unavailable: {0}")]
    Unavailable(#[source] RedisUnavailable),
    #[error("invalid idempotency config: {0}")]
    Config(String),
}

/// A response worth replaying to a repeat of its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// Headers to replay; the caller leaves out hop-by-hop and per-attempt ones.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The id of the request that produced the response, so a replay can point at it.
    pub request_id: String,
}

impl StoredResponse {
    fn approx_size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len() + 8)
            .sum();
        self.body.len() + self.request_id.len() + headers
    }
}

/// SHA-256 over method, path and body: what makes two requests with one key "the same".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

/// The outcome of [`IdempotencyStore::claim`].
#[derive(Debug)]
pub enum Claim {
    /// The caller does the work, then completes or releases the guard.
    Owner(ClaimGuard),
    /// The same request completed before: answer with this.
    Replay(StoredResponse),
    /// The key was used for a different request (in flight or completed): 422.
    Conflict,
    /// The first request was still running when the wait ran out: 409 with `Retry-After`.
    StillInFlight { retry_after: Duration },
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IdempotencyStats {
    /// Claims that made the caller the owner of a tracked key.
    pub claims: u64,
    pub replays: u64,
    pub conflicts: u64,
    /// Duplicates that gave up waiting for the first request.
    pub still_in_flight: u64,
    /// Responses not stored because the body exceeded `max_body_bytes`.
    pub too_large: u64,
    /// Redis commands that failed (claims let through or refused, completions and releases
    /// lost).
    pub redis_failures: u64,
    /// Local entries evicted to stay within `max_entries` / `max_stored_bytes`.
    pub evicted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    claims: AtomicU64,
    replays: AtomicU64,
    conflicts: AtomicU64,
    still_in_flight: AtomicU64,
    too_large: AtomicU64,
    redis_failures: AtomicU64,
    evicted: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The process-wide idempotency store; clones share it.
#[derive(Debug, Clone)]
pub struct IdempotencyStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    enabled: bool,
    wait: Duration,
    max_body_bytes: usize,
    backend: BackendImpl,
    counters: Arc<Counters>,
}

#[derive(Debug)]
enum BackendImpl {
    Local(Arc<local::LocalStore>),
    Redis(Arc<shared::RedisBackend>),
}

impl IdempotencyStore {
    /// Builds the store; with `backend = "redis"` it opens its own lazily connected link, so
    /// this succeeds while Redis is down.
    pub fn new(config: &IdempotencyConfig) -> Result<Self, IdempotencyError> {
        let link = match config.backend {
            Backend::Local => None,
            Backend::Redis => {
                let url = config.redis_url.as_deref().ok_or_else(|| {
                    IdempotencyError::Config("backend = \"redis\" needs redis_url".into())
                })?;
                let timeout = Duration::from_millis(config.redis_timeout_ms.max(1));
                let link = RedisLink::new(url, timeout, REDIS_DOWN_FOR)
                    .map_err(|err| IdempotencyError::Config(format!("redis_url: {err}")))?;
                Some(link)
            }
        };
        Self::build(config, link)
    }

    /// Like [`Self::new`] but on a link shared with other Redis users (the rate limiter);
    /// `redis_url` and `redis_timeout_ms` are then not used.
    pub fn with_redis_link(
        config: &IdempotencyConfig,
        link: RedisLink,
    ) -> Result<Self, IdempotencyError> {
        Self::build(config, Some(link))
    }

    fn build(
        config: &IdempotencyConfig,
        link: Option<RedisLink>,
    ) -> Result<Self, IdempotencyError> {
        if config.ttl_secs == 0 || config.in_flight_ttl_secs == 0 {
            return Err(IdempotencyError::Config(
                "ttl_secs and in_flight_ttl_secs must be positive".into(),
            ));
        }
        if config.max_entries == 0 {
            return Err(IdempotencyError::Config(
                "max_entries must be positive".into(),
            ));
        }
        let counters = Arc::new(Counters::default());
        let ttl = Duration::from_secs(config.ttl_secs);
        let in_flight_ttl = Duration::from_secs(config.in_flight_ttl_secs);
        let backend = match (config.backend, link) {
            (Backend::Redis, Some(link)) => {
                BackendImpl::Redis(Arc::new(shared::RedisBackend::new(
                    link,
                    config.key_prefix.clone(),
                    ttl,
                    in_flight_ttl,
                    config.on_redis_failure,
                    counters.clone(),
                )))
            }
            (Backend::Redis, None) => {
                return Err(IdempotencyError::Config(
                    "backend = \"redis\" needs a redis link".into(),
                ));
            }
            (Backend::Local, _) => BackendImpl::Local(Arc::new(local::LocalStore::new(
                ttl,
                in_flight_ttl,
                config.max_entries,
                config.max_stored_bytes,
                counters.clone(),
            ))),
        };
        Ok(Self {
            inner: Arc::new(StoreInner {
                enabled: config.enabled,
                wait: Duration::from_secs(config.wait_secs),
                max_body_bytes: config.max_body_bytes,
                backend,
                counters,
            }),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.enabled
    }

    /// The fingerprint of a request. Method and path are part of it so one key sent to two
    /// endpoints with one body is still a conflict.
    pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> Fingerprint {
        let mut hasher = Sha256::new();
        // NUL cannot occur in a method or a path, so the fields cannot run into each other.
        hasher.update(method.as_bytes());
        hasher.update([0]);
        hasher.update(path.as_bytes());
        hasher.update([0]);
        hasher.update(body);
        Fingerprint(hasher.finalize().into())
    }

    /// Checks an `Idempotency-Key` value without claiming it.
    pub fn validate_key(key: &str) -> Result<(), IdempotencyError> {
        let visible = key.bytes().all(|b| b.is_ascii_graphic());
        if key.is_empty() || key.len() > 255 || !visible {
            return Err(IdempotencyError::InvalidKey);
        }
        Ok(())
    }

    /// Claims (project, key) for a request with `fingerprint`, waiting up to `wait_secs` for
    /// an owner still in flight. With the store disabled every caller is an untracked owner.
    pub async fn claim(
        &self,
        project: &str,
        key: &str,
        fingerprint: Fingerprint,
    ) -> Result<Claim, IdempotencyError> {
        self.claim_waiting(project, key, fingerprint, self.inner.wait)
            .await
    }

    /// [`Self::claim`] with an explicit wait (0 answers at once).
    pub async fn claim_waiting(
        &self,
        project: &str,
        key: &str,
        fingerprint: Fingerprint,
        wait: Duration,
    ) -> Result<Claim, IdempotencyError> {
        if !self.inner.enabled {
            return Ok(Claim::Owner(self.noop_guard()));
        }
        Self::validate_key(key)?;
        let deadline = tokio::time::Instant::now() + wait;
        let outcome = match &self.inner.backend {
            BackendImpl::Local(store) => store.claim(project, key, fingerprint, deadline).await,
            BackendImpl::Redis(backend) => {
                backend.claim(project, key, fingerprint, deadline).await?
            }
        };
        let counters = &self.inner.counters;
        Ok(match outcome {
            Outcome::Owner(lease) => {
                if !matches!(lease, Lease::Noop) {
                    Counters::bump(&counters.claims);
                }
                Claim::Owner(ClaimGuard {
                    lease: Some(lease),
                    max_body_bytes: self.inner.max_body_bytes,
                    counters: counters.clone(),
                })
            }
            Outcome::Replay(response) => {
                Counters::bump(&counters.replays);
                Claim::Replay(response)
            }
            Outcome::Conflict => {
                Counters::bump(&counters.conflicts);
                Claim::Conflict
            }
            Outcome::StillInFlight { retry_after } => {
                Counters::bump(&counters.still_in_flight);
                Claim::StillInFlight { retry_after }
            }
        })
    }

    pub fn stats(&self) -> IdempotencyStats {
        let c = &self.inner.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        IdempotencyStats {
            claims: get(&c.claims),
            replays: get(&c.replays),
            conflicts: get(&c.conflicts),
            still_in_flight: get(&c.still_in_flight),
            too_large: get(&c.too_large),
            redis_failures: get(&c.redis_failures),
            evicted: get(&c.evicted),
        }
    }

    fn noop_guard(&self) -> ClaimGuard {
        ClaimGuard {
            lease: Some(Lease::Noop),
            max_body_bytes: self.inner.max_body_bytes,
            counters: self.inner.counters.clone(),
        }
    }
}

/// `Retry-After` for a duplicate that gave up: when the claim will have expired, if that is
/// sooner than the usual pause. Whole seconds, since that is what the header can say.
fn retry_after(claim_left: Duration) -> Duration {
    let secs = claim_left
        .min(STILL_IN_FLIGHT_RETRY_AFTER)
        .as_secs_f64()
        .ceil();
    Duration::from_secs_f64(secs.max(1.0))
}

/// What a backend answers before the store turns it into a [`Claim`].
enum Outcome {
    Owner(Lease),
    Replay(StoredResponse),
    Conflict,
    StillInFlight { retry_after: Duration },
}

/// What an owner holds: enough to complete or release exactly its own claim.
#[derive(Debug)]
enum Lease {
    /// Nothing is tracked (store disabled, or Redis down and failing open).
    Noop,
    Local(local::LocalLease),
    Redis(shared::RedisLease),
}

/// Ownership of a claimed key. Dropping it without [`Self::complete`] releases the claim, so
/// an error path or a cancelled request never leaves the key blocked.
#[derive(Debug)]
pub struct ClaimGuard {
    /// `None` once completed or released.
    lease: Option<Lease>,
    max_body_bytes: usize,
    counters: Arc<Counters>,
}

impl ClaimGuard {
    /// False when nothing is tracked (store disabled, or Redis unreachable with fail-open):
    /// the response will not be replayed.
    pub fn is_tracked(&self) -> bool {
        !matches!(self.lease, Some(Lease::Noop) | None)
    }

    /// Stores the response for replay and wakes the waiting duplicates. Returns whether it
    /// was stored; a body over `max_body_bytes` is not, and the claim is released instead.
    pub async fn complete(mut self, response: StoredResponse) -> bool {
        let Some(lease) = self.lease.take() else {
            return false;
        };
        if response.body.len() > self.max_body_bytes {
            Counters::bump(&self.counters.too_large);
            tracing::debug!(
                body_bytes = response.body.len(),
                limit = self.max_body_bytes,
                "idempotent response too large to store; releasing the key"
            );
            lease.release();
            return false;
        }
        match lease {
            Lease::Noop => false,
            Lease::Local(lease) => lease.complete(response),
            Lease::Redis(lease) => lease.complete(response).await,
        }
    }

    /// Gives the key up without a response (the upstream failed, or the client left before a
    /// full answer), so the next retry goes upstream.
    pub fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Lease {
    fn release(self) {
        match self {
            Self::Noop => {}
            Self::Local(lease) => lease.release(),
            Self::Redis(lease) => lease.release_in_background(),
        }
    }
}

#[cfg(test)]
mod tests;
