//! The `[server]` and `[[projects]]` config sections.

use crate::tls::TlsConfig;
use gateway_core::RateLimit;
use gateway_core::config::ConfigError;
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// On shutdown, how long the listener keeps accepting after `/readyz` turned false, so a
    /// load balancer's health check sees the drain and stops sending before connections are
    /// refused. Default 0.
    pub drain_delay_secs: u64,
    /// `[server.tls]`: serve HTTPS (and h2 through ALPN). Default: none, plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Peers (CIDRs) whose `X-Forwarded-For`/`Forwarded` and PROXY headers are believed: the
    /// load balancers. Default: none, the client IP is always the TCP peer.
    pub trusted_proxies: Vec<IpNet>,
    /// Every connection starts with a PROXY protocol header (v1 or v2), and only peers within
    /// `trusted_proxies` may connect. Default false.
    pub proxy_protocol: bool,
    /// How long a connection may take for its TLS handshake and PROXY header. Default 10 s.
    pub handshake_timeout_secs: u64,
    /// How long a client may take to send a request's headers (slowloris); an HTTP/1.1
    /// keep-alive connection idle this long is closed too. Default 10 s.
    pub header_read_timeout_secs: u64,
    /// Largest request head (HTTP/1.1 buffer, h2 header list); bigger ones get 431 or a
    /// closed connection. At least 8192. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Streams one h2 connection may have open at once. Default 256.
    pub h2_max_concurrent_streams: u32,
    /// h2 streams reset by the client before they were served that a connection may hold
    /// (rapid reset, CVE-2023-44487); past it the connection is closed. Default 20.
    pub h2_max_pending_accept_reset_streams: usize,
    /// h2 streams the server may reset for protocol errors on one connection before it is
    /// closed (CVE-2024-27316 class). Default 256.
    pub h2_max_local_error_reset_streams: usize,
    /// Interval of the h2 keep-alive PING; a peer that does not answer within
    /// `h2_keep_alive_timeout_secs` is disconnected. 0 turns it off. Default 30 s.
    pub h2_keep_alive_interval_secs: u64,
    /// See `h2_keep_alive_interval_secs`. Default 20 s.
    pub h2_keep_alive_timeout_secs: u64,
}

/// hyper refuses a smaller HTTP/1.1 buffer (it asserts), so the config must too.
const MIN_HEADER_BYTES: usize = 8192;

impl ServerConfig {
    /// The checks serde cannot express.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if self.max_header_bytes < MIN_HEADER_BYTES {
            errors.push(ConfigError::new(
                "server.max_header_bytes",
                format!("must be at least {MIN_HEADER_BYTES}"),
            ));
        }
        if u32::try_from(self.max_header_bytes).is_err() {
            errors.push(ConfigError::new(
                "server.max_header_bytes",
                "must fit in 32 bits",
            ));
        }
        if self.proxy_protocol && self.trusted_proxies.is_empty() {
            errors.push(ConfigError::new(
                "server.proxy_protocol",
                "needs server.trusted_proxies: only those peers may send PROXY headers",
            ));
        }
        for (key, value) in [
            ("server.handshake_timeout_secs", self.handshake_timeout_secs),
            (
                "server.header_read_timeout_secs",
                self.header_read_timeout_secs,
            ),
        ] {
            if value == 0 {
                errors.push(ConfigError::new(key, "must be at least 1"));
            }
        }
        if let Some(tls) = &self.tls {
            errors.extend(tls.validate());
        }
        errors
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }
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
            drain_delay_secs: 0,
            tls: None,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            handshake_timeout_secs: 10,
            header_read_timeout_secs: 10,
            max_header_bytes: 64 * 1024,
            h2_max_concurrent_streams: 256,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
            h2_keep_alive_interval_secs: 30,
            h2_keep_alive_timeout_secs: 20,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn server(json: serde_json::Value) -> Result<ServerConfig, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn defaults_are_valid_and_front_door_keys_parse() {
        assert!(ServerConfig::default().validate().is_empty());
        let config = server(serde_json::json!({
            "trusted_proxies": ["10.0.0.0/8", "fd00::/8"],
            "proxy_protocol": true,
            "drain_delay_secs": 5,
            "tls": {"cert": "/c.pem", "key": "/k.pem", "client_ca": "/ca.pem", "client_auth": "required"}
        }))
        .unwrap();
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        assert_eq!(config.trusted_proxies.len(), 2);
        assert_eq!(
            config.tls.map(|tls| tls.client_auth),
            Some(crate::tls::ClientAuth::Required)
        );
    }

    #[test]
    fn bad_front_door_settings_are_refused() {
        assert!(server(serde_json::json!({"trusted_proxies": ["not-a-cidr"]})).is_err());
        assert!(server(serde_json::json!({"tls": {"cert": "/c", "key": "/k", "pin": 1}})).is_err());
        assert!(
            server(
                serde_json::json!({"tls": {"cert": "/c", "key": "/k", "client_auth": "sometimes"}})
            )
            .is_err()
        );
        let paths = |config: ServerConfig| {
            config
                .validate()
                .into_iter()
                .map(|error| error.path)
                .collect::<Vec<_>>()
        };
        let config = server(serde_json::json!({"max_header_bytes": 1024})).unwrap();
        assert_eq!(paths(config), ["server.max_header_bytes"]);
        let config = server(serde_json::json!({"proxy_protocol": true})).unwrap();
        assert_eq!(paths(config), ["server.proxy_protocol"]);
        let config = server(serde_json::json!({"header_read_timeout_secs": 0})).unwrap();
        assert_eq!(paths(config), ["server.header_read_timeout_secs"]);
    }
}
