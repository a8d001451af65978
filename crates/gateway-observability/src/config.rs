//! The `[observability]` config section.

use serde::Deserialize;

/// `[observability]`: logging, traces, and how captured prompts and responses are redacted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// `[observability.tracing]`: OpenTelemetry traces exported over OTLP.
    pub tracing: TracingConfig,
    /// Extra regular expressions (Rust `regex` syntax) whose matches are replaced by
    /// `[REDACTED]` in captured prompts and responses, on top of the built-in patterns (`sk-...`,
    /// `Bearer ...`, AWS, Google, GitHub and Slack keys, the gateway's `gw-...` keys). Capture
    /// itself is switched on per project (`[[projects]] capture_prompts`,
    /// `capture_responses`). Default: none.
    pub redact_patterns: Vec<String>,
    /// Captured prompts and responses are cut to this many bytes each (after redaction).
    /// Default 16384.
    pub capture_max_bytes: usize,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            access_log: true,
            log_flush_interval_ms: 100,
            tracing: TracingConfig::default(),
            redact_patterns: Vec::new(),
            capture_max_bytes: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// `[observability.tracing]`: a span tree per request, exported to an OpenTelemetry collector
/// over OTLP. Read at start; a reload that changes it is refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Record and export spans. Off, an inbound `traceparent` is still forwarded upstream
    /// unchanged. Default false.
    pub enabled: bool,
    /// The collector: `http://host:4318` for `http/protobuf` (`/v1/traces` is added unless
    /// the URL already ends with it), `http://host:4317` for `grpc`; plain HTTP only. Default:
    /// the local collector's standard port for the protocol.
    pub endpoint: Option<String>,
    /// `http/protobuf` or `grpc`. Default `http/protobuf`.
    pub protocol: OtlpProtocol,
    /// Share of new traces recorded, 0.0 to 1.0 (parent-based: a request whose client sent a
    /// sampled `traceparent` is always recorded, an unsampled one never). Default 1.0.
    pub sample_ratio: f64,
    /// The `service.name` resource attribute. Default `llm-gateway`.
    pub service_name: String,
    /// Longest one export may take before it is abandoned (its spans are lost), and longest
    /// shutdown waits for the last export. Default 10000.
    pub export_timeout_ms: u64,
    /// Finished spans waiting for export; when full (a slow or dead collector) new spans are
    /// dropped and counted, never waited for. Default 2048.
    pub max_queue_size: usize,
    /// Most spans sent in one export. Default 512.
    pub max_export_batch_size: usize,
    /// How often queued spans are exported when a batch is not yet full. Default 1000.
    pub export_interval_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: None,
            protocol: OtlpProtocol::HttpProtobuf,
            sample_ratio: 1.0,
            service_name: "llm-gateway".into(),
            export_timeout_ms: 10_000,
            max_queue_size: 2048,
            max_export_batch_size: 512,
            export_interval_ms: 1000,
        }
    }
}

impl TracingConfig {
    /// Problems with the section, each as `(key, message)`.
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errors = Vec::new();
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            errors.push(("sample_ratio", "must be between 0.0 and 1.0".to_owned()));
        }
        if self.service_name.trim().is_empty() {
            errors.push(("service_name", "must not be empty".to_owned()));
        }
        for (key, value) in [
            ("export_timeout_ms", self.export_timeout_ms),
            ("max_queue_size", self.max_queue_size as u64),
            ("max_export_batch_size", self.max_export_batch_size as u64),
            ("export_interval_ms", self.export_interval_ms),
        ] {
            if value == 0 {
                errors.push((key, "must be greater than 0".to_owned()));
            }
        }
        // The exporters are built without TLS (no second TLS stack for telemetry): export
        // to a collector or agent reachable over plain HTTP, usually on the same host or pod.
        if let Some(endpoint) = &self.endpoint {
            let uri = endpoint.parse::<http::Uri>().ok();
            let plain_http = uri
                .as_ref()
                .is_some_and(|uri| uri.scheme_str() == Some("http") && uri.host().is_some());
            if !plain_http {
                errors.push((
                    "endpoint",
                    format!("`{endpoint}` is not an http:// URL (https is not supported)"),
                ));
            }
        }
        errors
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ObservabilityConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn tracing_is_off_by_default_with_documented_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.tracing, TracingConfig::default());
        assert!(!config.tracing.enabled);
        assert_eq!(config.tracing.protocol, OtlpProtocol::HttpProtobuf);
        assert!(config.tracing.validate().is_empty());
    }

    #[test]
    fn tracing_keys_are_checked() {
        let config =
            parse("[tracing]\nenabled = true\nprotocol = \"grpc\"\nendpoint = \"http://c:4317\"")
                .unwrap();
        assert_eq!(config.tracing.protocol, OtlpProtocol::Grpc);
        assert!(config.tracing.validate().is_empty());
        assert!(
            parse("[tracing]\nsample_rate = 0.5").is_err(),
            "unknown key"
        );
        assert!(parse("[tracing]\nprotocol = \"http/json\"").is_err());
        let bad =
            parse("[tracing]\nsample_ratio = 1.5\nendpoint = \"https://c\"\nmax_queue_size = 0")
                .unwrap();
        let keys: Vec<&str> = bad.tracing.validate().iter().map(|(key, _)| *key).collect();
        assert_eq!(keys, ["sample_ratio", "max_queue_size", "endpoint"]);
    }
}
