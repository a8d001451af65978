//! The `[observability]` config section.

use serde::Deserialize;

/// `[observability]`: logging.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilityConfig {
    /// `json` (one object per line, for log pipelines) or `text` (for people). Default `json`.
    pub log_format: LogFormat,
    /// A tracing filter (`info`, `warn,access=info`, ...). `RUST_LOG` overrides it. Default
    /// `info`.
    pub log_level: String,
    /// Write one `access` line per request. Default true.
    pub access_log: bool,
    /// How often buffered log lines are written out. Lines are batched so that logging never
    /// costs a request a thread wake-up; a crash loses at most this window. Default 100.
    pub log_flush_interval_ms: u64,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            access_log: true,
            log_flush_interval_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}
