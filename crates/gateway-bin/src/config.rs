//! The whole config file: each section deserialised by the crate that owns it, then the
//! cross-section checks only the composing crate can make.

use gateway_access::{ProjectConfig, ServerConfig};
use gateway_business::budget::{BudgetEntry, BudgetSettings};
use gateway_business::{DatabaseConfig, PriceConfig};
use gateway_core::config::{ConfigError, deserialize_section, interpolate_env};
use gateway_observability::ObservabilityConfig;
use gateway_policy::PolicyConfig;
use gateway_providers::ProviderConfig;
use gateway_routing::ModelConfig;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::path::Path;

/// A parsed, validated config file.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub observability: ObservabilityConfig,
    pub policy: PolicyConfig,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelConfig>,
    pub prices: Vec<PriceConfig>,
    pub projects: Vec<ProjectConfig>,
    /// `[[budgets]]`: daily and monthly spending limits per project or key (hot-reloaded).
    pub budgets: Vec<BudgetEntry>,
    /// `[budget]`: where budgets are counted; read at start.
    pub budget: BudgetSettings,
    /// Hex SHA-256 of the file's bytes: names this config version in logs.
    pub version: String,
}

/// Every problem found in a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", format_errors(.0))]
    Invalid(Vec<ConfigError>),
}

impl ConfigLoadError {
    pub fn errors(&self) -> Vec<String> {
        match self {
            Self::Read { .. } => vec![self.to_string()],
            Self::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }
}

fn format_errors(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

const SECTIONS: [&str; 10] = [
    "budget",
    "budgets",
    "prices",
    "server",
    "database",
    "observability",
    "policy",
    "providers",
    "models",
    "projects",
];

impl GatewayConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigLoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &|name| std::env::var(name).ok())
    }

    /// Parses every section; `env` resolves `${VAR}` references. The checks that span sections
    /// run when the runtime state is built ([`crate::state::Snapshot::build`]).
    pub fn parse(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigLoadError> {
        let version = hex::encode(Sha256::digest(text.as_bytes()));
        let mut root: toml::Table = toml::from_str(text).map_err(|err| {
            let message = err.message().to_string();
            let location = err
                .span()
                .map(|span| {
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "file".into());
            ConfigLoadError::Invalid(vec![ConfigError::new(location, message)])
        })?;

        let mut errors = Vec::new();
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                errors.push(ConfigError::new(
                    key.clone(),
                    format!("unknown section, expected one of {}", SECTIONS.join(", ")),
                ));
            }
        }
        let mut root_value = toml::Value::Table(std::mem::take(&mut root));
        interpolate_env(&mut root_value, "", env, &mut errors);
        let toml::Value::Table(mut root) = root_value else {
            return Err(ConfigLoadError::Invalid(errors));
        };

        let server: Option<ServerConfig> = table_section(&mut root, "server", &mut errors);
        if let Some(server) = &server {
            errors.extend(server.validate());
        }
        let database = table_section(&mut root, "database", &mut errors);
        let observability: Option<ObservabilityConfig> =
            table_section(&mut root, "observability", &mut errors);
        let policy = table_section(&mut root, "policy", &mut errors);
        let providers = array_section(&mut root, "providers", &mut errors);
        let models = array_section(&mut root, "models", &mut errors);
        let prices = array_section(&mut root, "prices", &mut errors);
        let projects = array_section(&mut root, "projects", &mut errors);
        let budgets = array_section(&mut root, "budgets", &mut errors);
        let budget = table_section(&mut root, "budget", &mut errors);
        if let Some(observability) = &observability {
            for (key, message) in observability.tracing.validate() {
                errors.push(ConfigError::new(
                    format!("observability.tracing.{key}"),
                    message,
                ));
            }
        }

        if !errors.is_empty() {
            return Err(ConfigLoadError::Invalid(errors));
        }
        Ok(Self {
            server: server.unwrap_or_default(),
            database: database.unwrap_or_default(),
            observability: observability.unwrap_or_default(),
            policy: policy.unwrap_or_default(),
            providers,
            models,
            prices,
            projects,
            budgets,
            budget: budget.unwrap_or_default(),
            version,
        })
    }
}

fn table_section<T: DeserializeOwned>(
    root: &mut toml::Table,
    name: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let value = root.remove(name)?;
    deserialize_section(value, name)
        .map_err(|err| errors.push(err))
        .ok()
}

/// Arrays are deserialised entry by entry so that every bad entry is reported, not only the
/// first.
fn array_section<T: DeserializeOwned>(
    root: &mut toml::Table,
    name: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<T> {
    let Some(value) = root.remove(name) else {
        return Vec::new();
    };
    let toml::Value::Array(items) = value else {
        errors.push(ConfigError::new(
            name,
            format!("expected an array of tables ([[{name}]])"),
        ));
        return Vec::new();
    };
    items
        .into_iter()
        .enumerate()
        .filter_map(|(index, item)| {
            deserialize_section(item, &format!("{name}[{index}]"))
                .map_err(|err| errors.push(err))
                .ok()
        })
        .collect()
}
