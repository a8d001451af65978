//! The `[server]` and `[[projects]]` config sections.

use gateway_core::RateLimit;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// `[server]`: listeners and request limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data-plane listener (the OpenAI-compatible API). Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Admin listener (metrics and the admin API). Default `127.0.0.1:9090`.
    pub admin_listen: SocketAddr,
    /// Largest accepted request body; bigger ones get 413. Default 8 MiB.
    pub max_body_bytes: usize,
    /// How long in-flight requests may take to finish on shutdown. Default 30 s.
    pub shutdown_grace_secs: u64,
    /// Bearer token of the admin API (`admin_listen`), usually `"${GATEWAY_ADMIN_TOKEN}"`.
    /// Unset or empty: every admin route but `/healthz` answers 403. Default: unset.
    pub admin_token: Option<AdminToken>,
    /// How often the keys created in the database are re-read (one cheap version query; the
    /// keys themselves only when it moved). A revoked key is refused by every replica within
    /// about this long. Default 1000.
    pub key_refresh_ms: u64,
    /// `[server.auth_failures]`: slowing down clients that keep presenting bad keys.
    pub auth_failures: AuthFailureConfig,
}

/// The admin API's token. Its `Debug` never prints it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct AdminToken(String);

impl AdminToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// `[server.auth_failures]`: after `max_failures` refused keys from one client IP within
/// `window_secs`, that IP gets 429 (with `Retry-After`) without its key being looked at, until
/// the window that began with its first failure ends. A success does not reset the count.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFailureConfig {
    /// Failures allowed per window; 0 turns the throttle off. Default 10.
    pub max_failures: u32,
    /// Length of the window. Default 60.
    pub window_secs: u64,
    /// Most client IPs remembered at once; past it, IPs whose window ended are forgotten
    /// first, and new IPs are not counted until there is room. Default 100000.
    pub max_tracked_ips: usize,
}

impl Default for AuthFailureConfig {
    fn default() -> Self {
        Self {
            max_failures: 10,
            window_secs: 60,
            max_tracked_ips: 100_000,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_body_bytes: 8 * 1024 * 1024,
            shutdown_grace_secs: 30,
            admin_token: None,
            key_refresh_ms: 1000,
            auth_failures: AuthFailureConfig::default(),
        }
    }
}

/// One `[[projects]]` entry: a tenant with its keys, allowed aliases and billing tags.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    pub name: String,
    /// Keys as SHA-256 hashes (`gateway keys hash KEY`); the secrets never sit in the config.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Aliases this project may use. Omitted: every alias.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Labels copied to every usage record of the project (team, business line, ...).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// `[projects.rate_limit]`: requests and tokens per minute for the whole project (every
    /// key together). Default: none.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Log this project's prompts (redacted, as `gateway::capture` events). Default false.
    #[serde(default)]
    pub capture_prompts: bool,
    /// Log this project's responses, streams assembled (redacted, as `gateway::capture`
    /// events). Default false.
    #[serde(default)]
    pub capture_responses: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A stable, non-secret name for the key, recorded with each request.
    pub id: String,
    /// Lower- or upper-case hex SHA-256 of the secret key.
    pub sha256: String,
    /// `[projects.api_keys.rate_limit]`: a limit for this key alone, on top of the
    /// project's. Default: none.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}
