//! The `[database]` config section.

use serde::Deserialize;
use std::path::PathBuf;

/// `[database]`: where usage records go, and the local spool that holds them until they are
/// there.
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
    /// Longest a spooled record waits for others to share its database write. Grouping keeps a
    /// quiet gateway from paying one database transaction per request. Default 100.
    pub flush_interval_ms: u64,
    /// Spool entries waiting in memory for their disk write; past it new ones are dropped (and
    /// counted). Only reached when the disk stalls: the spool drains this buffer every
    /// `spool_fsync_ms`. Default 100000.
    pub queue_capacity: usize,
    /// Directory of the spool: every record is appended here (and fsynced) before it is shipped
    /// to the database, so a crash, a full queue or a database outage loses nothing. Relative
    /// to the working directory. One gateway per directory: a second one waits for the first
    /// to let go of it. Default `data/spool`.
    pub spool_dir: PathBuf,
    /// Longest an accepted record stays in memory before it is written and fsynced: the most a
    /// `kill -9` or power loss can lose. Appends are grouped into one write and one fsync per
    /// window. Default 100.
    pub spool_fsync_ms: u64,
    /// Most bytes the spool may hold (on disk and waiting in memory); see `spool_full` for what
    /// happens past it. Default 1 GiB (1073741824).
    pub spool_max_bytes: u64,
    /// What happens to a record that does not fit in the spool. Default `drop_newest`.
    pub spool_full: SpoolFullPolicy,
    /// Size at which the spool starts a new segment file. Shipped space is freed a segment at a
    /// time, so smaller segments free it sooner; larger ones mean fewer files. Default 8 MiB
    /// (8388608).
    pub spool_segment_bytes: u64,
}

/// What the spool does with a record when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolFullPolicy {
    /// Refuse the new record: count it (`WriterStats::dropped`) and log, at most every few
    /// seconds. Never blocking is deliberate: a full spool means the database has been away
    /// for a long time, and making requests wait for disk space would turn a billing outage
    /// into an outage of the whole gateway. Dropping the newest rather than the oldest keeps
    /// what is spooled append-only, so nothing already fsynced is ever rewritten.
    #[default]
    DropNewest,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/gateway.db".into(),
            max_connections: 4,
            batch_size: 500,
            flush_interval_ms: 100,
            queue_capacity: 100_000,
            spool_dir: PathBuf::from("data/spool"),
            spool_fsync_ms: 100,
            spool_max_bytes: 1 << 30,
            spool_full: SpoolFullPolicy::DropNewest,
            spool_segment_bytes: 8 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;

    #[test]
    fn spool_keys_parse_and_default() {
        let config: DatabaseConfig = toml::from_str(
            "spool_dir = \"/var/spool/gw\"\nspool_fsync_ms = 5\nspool_max_bytes = 1024\n\
             spool_full = \"drop_newest\"\nspool_segment_bytes = 4096\n",
        )
        .unwrap();
        assert_eq!(config.spool_dir, PathBuf::from("/var/spool/gw"));
        assert_eq!(
            (
                config.spool_fsync_ms,
                config.spool_max_bytes,
                config.spool_segment_bytes
            ),
            (5, 1024, 4096)
        );
        let defaults: DatabaseConfig = toml::from_str("").unwrap();
        assert_eq!(defaults, DatabaseConfig::default());
        assert_eq!(defaults.spool_dir, PathBuf::from("data/spool"));
        assert_eq!(defaults.spool_max_bytes, 1 << 30);
        assert!(toml::from_str::<DatabaseConfig>("spool_full = \"block\"").is_err());
        assert!(toml::from_str::<DatabaseConfig>("spool_size = 1").is_err());
    }
}
