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
    /// `{base}/chat/completions`. The first is preferred; the next ones are tried in order only
    /// when connecting fails (refused, DNS, connect timeout, TLS handshake), so that a request
    /// is never sent twice.
    #[serde(default)]
    pub base_urls: Vec<String>,
    /// Vendor keys, spread round-robin over those not set aside (after a 401/403 or a quota
    /// error). Usually `${ENV_VAR}` references.
    #[serde(default)]
    pub api_keys: Vec<Secret>,
    /// `openai`/`azure`: request fields beyond OpenAI's own parameters that this vendor
    /// understands and should receive (OpenRouter's `provider` and `transforms`, vLLM's
    /// `top_k`, ...). `["*"]` forwards every field. Any other unknown field is refused with a
    /// 400 naming it, rather than sent to a vendor that would reject or ignore it. Default none.
    #[serde(default)]
    pub extra_fields: Vec<String>,
    /// Azure: the `api-version` query parameter (e.g. `2024-10-21`), required. Anthropic: the
    /// `anthropic-version` header (default `2023-06-01`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Deadline for one upstream call: the whole response, or the response headers of a
    /// stream. Default 60.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// How long a base URL that could not be connected to goes to the back of the preference
    /// order before it is preferred again. Default 30.
    #[serde(default = "default_base_url_cooldown_secs")]
    pub base_url_cooldown_secs: u64,
    /// How long a key whose quota or credit is exhausted is set aside. An ordinary rate limit
    /// (429) does not set a key aside. Default 60.
    #[serde(default = "default_key_cooldown_secs")]
    pub key_cooldown_secs: u64,
    /// How long a key refused as invalid or revoked (401, 403) is set aside. Default 300.
    #[serde(default = "default_key_revoked_cooldown_secs")]
    pub key_revoked_cooldown_secs: u64,
}

impl ProviderConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    pub fn base_url_cooldown(&self) -> Duration {
        Duration::from_secs(self.base_url_cooldown_secs)
    }

    pub fn key_cooldown(&self) -> Duration {
        Duration::from_secs(self.key_cooldown_secs)
    }

    pub fn key_revoked_cooldown(&self) -> Duration {
        Duration::from_secs(self.key_revoked_cooldown_secs)
    }
}

const fn default_timeout_secs() -> u64 {
    60
}

const fn default_base_url_cooldown_secs() -> u64 {
    30
}

const fn default_key_cooldown_secs() -> u64 {
    60
}

const fn default_key_revoked_cooldown_secs() -> u64 {
    300
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

    #[test]
    fn cooldowns_default_and_parse() {
        let config: ProviderConfig = toml::from_str(
            r#"name = "openai"
               kind = "openai""#,
        )
        .unwrap();
        assert_eq!(config.base_url_cooldown(), Duration::from_secs(30));
        assert_eq!(config.key_cooldown(), Duration::from_secs(60));
        assert_eq!(config.key_revoked_cooldown(), Duration::from_secs(300));
        let config: ProviderConfig = toml::from_str(
            r#"name = "openai"
               kind = "openai"
               base_url_cooldown_secs = 5
               key_cooldown_secs = 6
               key_revoked_cooldown_secs = 7"#,
        )
        .unwrap();
        assert_eq!(
            (
                config.base_url_cooldown_secs,
                config.key_cooldown_secs,
                config.key_revoked_cooldown_secs
            ),
            (5, 6, 7)
        );
        let typo = toml::from_str::<ProviderConfig>(
            r#"name = "openai"
               kind = "openai"
               key_cooldown = 6"#,
        );
        assert!(typo.is_err(), "unknown fields are refused");
    }
}
