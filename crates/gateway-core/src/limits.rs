//! The `rate_limit` table shared by projects and keys (access) and aliases (routing); the
//! policy layer enforces it.

use serde::Deserialize;

/// `rate_limit = { requests_per_minute = N, tokens_per_minute = N }`. A missing field is no
/// limit on that dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens. Reserved at admission (prompt estimate + `max_tokens`)
    /// and corrected when the vendor's usage is known.
    pub tokens_per_minute: Option<u64>,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }
}
