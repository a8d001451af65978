//! The `[database]` config section.

use serde::Deserialize;

/// `[database]`: where usage records go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (created if missing; a relative path is resolved against the gateway's
    /// working directory) or `postgres://user@host:5432/db`. Default `sqlite://data/gateway.db`.
    pub url: String,
    /// Connection pool size. Default 4.
    pub max_connections: u32,
    /// Most records written in one statement. Default 500.
    pub batch_size: usize,
    /// Longest a record waits for others to share its write. Grouping keeps a quiet gateway
    /// from paying one database transaction per request. Default 100.
    pub flush_interval_ms: u64,
    /// Records waiting for the database before new ones are dropped (and counted). Default
    /// 100000.
    pub queue_capacity: usize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/gateway.db".into(),
            max_connections: 4,
            batch_size: 500,
            flush_interval_ms: 100,
            queue_capacity: 100_000,
        }
    }
}
