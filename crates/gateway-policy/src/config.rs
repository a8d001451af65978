//! The `[policy]` config section.

use crate::breaker::BreakerConfig;
use crate::idempotency::{self, IdempotencyConfig};
use crate::limits::{Backend, FailureMode, LimiterConfig};
use crate::retry::RetryConfig;
use crate::shed::ShedConfig;
use serde::Deserialize;
use std::time::Duration;

/// `[policy]`: limits on requests and their upstream calls.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// When a client leaves in the middle of a stream, how long the gateway keeps reading the
    /// vendor's stream to learn its final usage (so the request is billed as the vendor bills
    /// it). Past this the upstream request is ended and the usage estimated. 0 ends it at
    /// once. Default 10.
    pub stream_drain_secs: u64,
    /// `[policy.timeouts]`.
    pub timeouts: TimeoutConfig,
    /// `[policy.shed]`.
    pub shed: ShedConfig,
    /// Where the rate limits are counted: `"local"` (this process; each enforces
    /// `limit / replicas`) or `"redis"` (one count shared by every replica). Default
    /// `"local"`. Read at start.
    pub rate_limit_backend: Backend,
    /// Redis for shared rate limits (and `[policy.idempotency] backend = "redis"` unless it
    /// names its own), e.g. `"redis://127.0.0.1:6379"`. Read at start.
    pub redis_url: Option<String>,
    /// When Redis cannot be reached: `"fail-open"` (limit locally to `limit / replicas`) or
    /// `"fail-closed"` (answer 503). Default `"fail-open"`. Read at start.
    pub on_redis_failure: FailureMode,
    /// How many replicas share the limits, for the local share above. Default 1. Read at
    /// start.
    pub replicas: u32,
    /// Deadline of one rate-limit call to Redis, connecting included. Default 50. Read at
    /// start.
    pub redis_timeout_ms: u64,
    /// `[policy.retry]`.
    pub retry: RetryConfig,
    /// `[policy.breaker]`.
    pub breaker: BreakerConfig,
    /// `[policy.idempotency]`. Read at start.
    pub idempotency: IdempotencyConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            stream_drain_secs: 10,
            timeouts: TimeoutConfig::default(),
            shed: ShedConfig::default(),
            rate_limit_backend: Backend::Local,
            redis_url: None,
            on_redis_failure: FailureMode::FailOpen,
            replicas: 1,
            redis_timeout_ms: LimiterConfig::default().redis_timeout_ms,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            idempotency: IdempotencyConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// Keys read once at start, which a reload cannot change, that differ in `new`.
    pub fn frozen_changes(&self, new: &Self) -> Vec<&'static str> {
        [
            (
                "policy.timeouts.connect_ms",
                self.timeouts.connect_ms != new.timeouts.connect_ms,
            ),
            (
                "policy.rate_limit_backend",
                self.rate_limit_backend != new.rate_limit_backend,
            ),
            ("policy.redis_url", self.redis_url != new.redis_url),
            (
                "policy.on_redis_failure",
                self.on_redis_failure != new.on_redis_failure,
            ),
            ("policy.replicas", self.replicas != new.replicas),
            (
                "policy.redis_timeout_ms",
                self.redis_timeout_ms != new.redis_timeout_ms,
            ),
            ("policy.idempotency", self.idempotency != new.idempotency),
        ]
        .into_iter()
        .filter_map(|(key, differs)| differs.then_some(key))
        .collect()
    }

    /// The rate limiter's settings.
    pub fn limiter(&self) -> LimiterConfig {
        LimiterConfig {
            backend: self.rate_limit_backend,
            redis_url: self.redis_url.clone(),
            on_redis_failure: self.on_redis_failure,
            replicas: self.replicas,
            redis_timeout_ms: self.redis_timeout_ms,
            ..LimiterConfig::default()
        }
    }

    /// The idempotency store's settings, with `redis_url` inherited when it names none.
    pub fn idempotency_store(&self) -> IdempotencyConfig {
        let mut config = self.idempotency.clone();
        if config.backend == idempotency::Backend::Redis && config.redis_url.is_none() {
            config.redis_url.clone_from(&self.redis_url);
        }
        config
    }

    /// This (newly loaded) config with the keys a reload cannot change taken from `live`.
    #[must_use]
    pub fn keeping_frozen(mut self, live: &Self) -> Self {
        self.timeouts.connect_ms = live.timeouts.connect_ms;
        self.rate_limit_backend = live.rate_limit_backend;
        self.redis_url.clone_from(&live.redis_url);
        self.on_redis_failure = live.on_redis_failure;
        self.replicas = live.replicas;
        self.redis_timeout_ms = live.redis_timeout_ms;
        self.idempotency.clone_from(&live.idempotency);
        self
    }
}

/// `[policy.timeouts]`. The first-byte deadline is each provider's own `timeout_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// TCP connect to an upstream, in milliseconds. Read at start (the connection pool is
    /// built once). Default 5000.
    pub connect_ms: u64,
    /// Longest silence between two chunks of an upstream stream; past it the stream ends with
    /// an error event and the upstream request is closed. Default 60.
    pub stream_idle_secs: u64,
    /// Whole request, stream included, from arrival to the last byte; 0 = none. Default 600.
    pub total_secs: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            connect_ms: 5_000,
            stream_idle_secs: 60,
            total_secs: 600,
        }
    }
}

impl TimeoutConfig {
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }

    pub fn stream_idle(&self) -> Duration {
        Duration::from_secs(self.stream_idle_secs)
    }

    pub fn total(&self) -> Option<Duration> {
        (self.total_secs > 0).then(|| Duration::from_secs(self.total_secs))
    }
}
