//! The `[[providers]]` config section, and `Secret`, which never prints its value.

use serde::Deserialize;
use std::time::Duration;

/// One `[[providers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name that `[[models]].targets[].provider` refers to.
    pub name: String,
    pub kind: ProviderKind,
    /// Base URLs ending in the API version (`https://api.openai.com/v1`); requests go to
    /// `{base}/chat/completions`, spread round-robin over the list.
    #[serde(default)]
    pub base_urls: Vec<String>,
    /// Vendor keys, used round-robin. Usually `${ENV_VAR}` references.
    #[serde(default)]
    pub api_keys: Vec<Secret>,
    /// Azure: the `api-version` query parameter (e.g. `2024-10-21`), required. Anthropic: the
    /// `anthropic-version` header (default `2023-06-01`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Deadline for one upstream call: the whole response, or the response headers of a
    /// stream. Default 60.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

impl ProviderConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

const fn default_timeout_secs() -> u64 {
    60
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Answers locally with a canned completion: no network, no key.
    Mock,
    /// Any OpenAI-compatible API (OpenAI, OpenRouter, vLLM, Ollama, relays...).
    Openai,
    /// Azure OpenAI: `{base}/openai/deployments/{model}/...?api-version=..`, `api-key` header.
    /// A target's `model` is the deployment name.
    Azure,
    /// The Anthropic Messages API (`{base}/messages`, `x-api-key`, `anthropic-version`).
    Anthropic,
    /// Google's Gemini API (`{base}/models/{model}:generateContent`, `x-goog-api-key`).
    Gemini,
}

impl ProviderKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Mock => "mock",
            Self::Openai => "openai",
            Self::Azure => "azure",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
        }
    }
}

/// A secret string whose `Debug` never shows it, so it cannot leak into a log by accident.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let config: ProviderConfig = toml::from_str(
            r#"name = "openai"
               kind = "openai"
               api_keys = ["sk-very-secret"]"#,
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("sk-very-secret"));
        assert_eq!(config.timeout_secs, 60);
    }
}
