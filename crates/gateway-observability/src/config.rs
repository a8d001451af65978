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
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}
