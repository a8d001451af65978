//! The `[policy]` config section.

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
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            stream_drain_secs: 10,
            timeouts: TimeoutConfig::default(),
            shed: ShedConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// Keys read once at start, which a reload cannot change, that differ in `new`.
    pub fn frozen_changes(&self, new: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.timeouts.connect_ms != new.timeouts.connect_ms {
            changed.push("policy.timeouts.connect_ms");
        }
        changed
    }

    /// This (newly loaded) config with the keys a reload cannot change taken from `live`.
    #[must_use]
    pub fn keeping_frozen(mut self, live: &Self) -> Self {
        self.timeouts.connect_ms = live.timeouts.connect_ms;
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
