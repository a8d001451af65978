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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            max_body_bytes: 8 * 1024 * 1024,
            shutdown_grace_secs: 30,
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
