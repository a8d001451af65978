//! The runtime state built from one config version.
//!
//! Built whole (fallibly), then published with one atomic store: a request reads one snapshot
//! when it arrives and keeps it to the end, so it never sees half of one config and half of
//! another.

use crate::config::{ConfigLoadError, GatewayConfig};
use gateway_access::KeyStore;
use gateway_business::{KeyEntry, PriceTable, ProjectEntry};
use gateway_core::config::ConfigError;
use gateway_observability::{CapturePolicy, ProjectCapture};
use gateway_policy::PolicyConfig;
use gateway_providers::{DynProvider, UpstreamClient, build_providers};
use gateway_routing::{CostLookup, RoutingTable, SystemClock};
use rust_decimal::prelude::ToPrimitive;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

#[derive(Debug)]
pub struct Snapshot {
    pub keys: Arc<KeyStore>,
    pub routes: RoutingTable,
    pub providers: HashMap<String, DynProvider>,
    /// `[policy]` of this version: limits, retries, timeouts (a reload changes them for the
    /// requests that arrive after it).
    pub policy: PolicyConfig,
    /// `[[prices]]` of this version: billing and budget reservations price requests with it.
    pub prices: Arc<PriceTable>,
    /// `[[budgets]]` of this version, for the admin API's view of them.
    pub budgets: Vec<gateway_business::budget::BudgetEntry>,
    /// Which projects have their prompts and responses logged, and how they are redacted.
    pub capture: Arc<CapturePolicy>,
    pub version: String,
}

impl Snapshot {
    /// Builds everything a config version needs, reporting every problem with its path.
    pub fn build(config: &GatewayConfig, client: &UpstreamClient) -> Result<Self, ConfigLoadError> {
        let mut errors = Vec::new();
        let keys = KeyStore::build(&config.projects)
            .map_err(|mut problems| errors.append(&mut problems))
            .ok();
        let providers = build_providers(&config.providers, client)
            .map_err(|mut problems| errors.append(&mut problems))
            .ok();
        let names: HashSet<&str> = config.providers.iter().map(|p| p.name.as_str()).collect();
        let prices = PriceTable::build(&config.prices)
            .map_err(|mut problems| errors.append(&mut problems))
            .unwrap_or_default();
        let routes = RoutingTable::build_with(
            &config.models,
            &names,
            &PriceCosts(&prices),
            Arc::new(SystemClock),
        )
        .map_err(|mut problems| errors.append(&mut problems))
        .ok();
        let aliases: HashSet<&str> = config.models.iter().map(|m| m.alias.as_str()).collect();
        for (index, project) in config.projects.iter().enumerate() {
            for (model_index, alias) in project.models.iter().flatten().enumerate() {
                if !aliases.contains(alias.as_str()) {
                    errors.push(ConfigError::new(
                        format!("projects[{index}].models[{model_index}]"),
                        format!("no alias named `{alias}` in [[models]]"),
                    ));
                }
            }
        }
        errors.extend(gateway_business::budget::check_settings(&config.budget));
        if let Err(mut problems) = gateway_business::budget::BudgetTable::build(&config.budgets) {
            errors.append(&mut problems);
        }
        for (index, budget) in config.budgets.iter().enumerate() {
            let Some(project) = config.projects.iter().find(|p| p.name == budget.project) else {
                errors.push(ConfigError::new(
                    format!("budgets[{index}].project"),
                    format!("no project named `{}` in [[projects]]", budget.project),
                ));
                continue;
            };
            if let Some(key) = &budget.key
                && !project.api_keys.iter().any(|k| &k.id == key)
            {
                errors.push(ConfigError::new(
                    format!("budgets[{index}].key"),
                    format!("project `{}` has no key with id `{key}`", project.name),
                ));
            }
        }
        let capture = CapturePolicy::build(
            &config.observability,
            config.projects.iter().map(|project| {
                let capture = ProjectCapture {
                    prompts: project.capture_prompts,
                    responses: project.capture_responses,
                };
                (project.name.as_str(), capture)
            }),
        )
        .map_err(|mut problems| errors.append(&mut problems))
        .ok();
        if config.server.max_body_bytes == 0 {
            errors.push(ConfigError::new("server.max_body_bytes", "must be above 0"));
        }
        match (keys, providers, routes, capture) {
            (Some(keys), Some(providers), Some(routes), Some(capture)) if errors.is_empty() => {
                Ok(Self {
                    keys: Arc::new(keys),
                    routes,
                    providers,
                    policy: config.policy.clone(),
                    prices: Arc::new(prices),
                    budgets: config.budgets.clone(),
                    capture: Arc::new(capture),
                    version: config.version.clone(),
                })
            }
            _ => Err(ConfigLoadError::Invalid(errors)),
        }
    }
}

/// Routing's view of the price table: input plus output per million tokens, in micro-units,
/// enough to rank targets (the billing itself stays in decimals).
struct PriceCosts<'a>(&'a PriceTable);

impl CostLookup for PriceCosts<'_> {
    fn cost(&self, provider: &str, model: &str) -> Option<u64> {
        let per_million = self.0.blended_per_million(provider, model)?;
        (per_million * rust_decimal::Decimal::from(1_000_000u32))
            .round()
            .to_u64()
    }
}

/// The projects and key hashes of the config, for the billing tables (`projects`, `api_keys`).
pub fn project_entries(projects: &[gateway_access::ProjectConfig]) -> Vec<ProjectEntry> {
    projects
        .iter()
        .map(|project| ProjectEntry {
            name: project.name.clone(),
            tags_json: serde_json::to_string(&project.tags).unwrap_or_else(|_| "{}".into()),
            keys: project
                .api_keys
                .iter()
                .map(|key| KeyEntry {
                    key_id: key.id.clone(),
                    sha256: key.sha256.clone(),
                })
                .collect(),
        })
        .collect()
}
