//! Vendor adapters: turn a [`ChatCall`](gateway_core::provider::ChatCall) into a vendor request
//! and the vendor's answer back into OpenAI format.
//!
//! Owns the `[[providers]]` config section, the shared upstream HTTP client (one keep-alive
//! pool with rustls and `TCP_NODELAY`, kept across config reloads), the redundancy every HTTP
//! provider kind shares (base URLs tried in order on connect errors, keys set aside after a
//! 401/403 or an exhausted quota: `rotation`) and one module per provider kind. It knows
//! nothing of aliases, projects or billing.

pub mod anthropic;
mod anthropic_provider;
mod client;
mod config;
pub mod gemini;
mod gemini_provider;
mod http;
mod mock;
mod openai;
mod responses;
mod rotation;
mod sse;

pub use anthropic_provider::AnthropicProvider;
pub use client::UpstreamClient;
pub use config::{ProviderConfig, ProviderKind, Secret};
pub use gemini_provider::GeminiProvider;
pub use mock::MockProvider;
pub use openai::OpenAiProvider;

use gateway_core::config::ConfigError;
use gateway_core::provider::ChatProvider;
use std::collections::HashMap;
use std::sync::Arc;

/// A configured provider, ready to serve.
pub type DynProvider = Arc<dyn ChatProvider>;

/// Builds every configured provider, reporting every invalid entry with its config path.
pub fn build_providers(
    configs: &[ProviderConfig],
    client: &UpstreamClient,
) -> Result<HashMap<String, DynProvider>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut providers: HashMap<String, DynProvider> = HashMap::new();
    for (index, config) in configs.iter().enumerate() {
        let path = format!("providers[{index}]");
        if config.name.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                "must not be empty",
            ));
            continue;
        }
        let built: Result<DynProvider, Vec<ConfigError>> = match config.kind {
            ProviderKind::Mock => Ok(Arc::new(MockProvider::new(config))),
            ProviderKind::Openai | ProviderKind::Azure => {
                OpenAiProvider::new(config, client, &path)
                    .map(|provider| Arc::new(provider) as DynProvider)
            }
            ProviderKind::Anthropic => AnthropicProvider::new(config, client, &path)
                .map(|provider| Arc::new(provider) as DynProvider),
            ProviderKind::Gemini => GeminiProvider::new(config, client, &path)
                .map(|provider| Arc::new(provider) as DynProvider),
        };
        match built {
            Ok(provider) => {
                if providers.insert(config.name.clone(), provider).is_some() {
                    errors.push(ConfigError::new(
                        format!("{path}.name"),
                        format!("duplicate provider name `{}`", config.name),
                    ));
                }
            }
            Err(mut problems) => errors.append(&mut problems),
        }
    }
    if errors.is_empty() {
        Ok(providers)
    } else {
        Err(errors)
    }
}
