//! The `[policy]` config section.

use serde::Deserialize;

/// `[policy]`: limits on upstream calls.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// When a client leaves in the middle of a stream, how long the gateway keeps reading the
    /// vendor's stream to learn its final usage (so the request is billed as the vendor bills
    /// it). Past this the upstream request is ended and the usage estimated. 0 ends it at
    /// once. Default 10.
    pub stream_drain_secs: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            stream_drain_secs: 10,
        }
    }
}
