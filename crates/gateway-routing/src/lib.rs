//! Routing layer: which provider and upstream model serve a model alias.
//!
//! Owns the `[[models]]` config section and the [`RoutingTable`] built from it. Routes are data:
//! a table is built whole for each config version and read through a snapshot, never mutated.
//! It knows provider *names* only (validated against the configured set), never their clients.

use gateway_core::config::ConfigError;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// One `[[models]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub alias: String,
    /// Where requests for the alias go.
    pub targets: Vec<TargetConfig>,
    /// How a target is chosen. Default: `weighted`.
    #[serde(default)]
    pub strategy: Strategy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Random split proportional to the targets' weights.
    #[default]
    Weighted,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Name of a `[[providers]]` entry.
    pub provider: String,
    /// The model name sent upstream.
    pub model: String,
    /// Relative share of traffic. Default 100; 0 takes the target out of rotation.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

const fn default_weight() -> u32 {
    100
}

/// A resolved upstream for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub provider: Arc<str>,
    pub model: Arc<str>,
    pub weight: u32,
}

/// An alias with its targets, ready to pick from.
#[derive(Debug)]
pub struct Route {
    pub alias: Arc<str>,
    targets: Vec<Target>,
    /// Running sums of the weights: a pick is one random number and a binary search.
    cumulative: Vec<u64>,
}

impl Route {
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Picks a target with probability proportional to its weight.
    pub fn pick(&self) -> &Target {
        let total = self.cumulative.last().copied().unwrap_or(0);
        self.pick_at(fastrand::u64(0..total.max(1)))
    }

    /// The target owning point `at` of the cumulative weight line (`0 <= at < total`).
    pub fn pick_at(&self, at: u64) -> &Target {
        let index = self.cumulative.partition_point(|&end| end <= at);
        // Build guarantees a positive total weight, so `index` is in range; clamping keeps this
        // total even so.
        &self.targets[index.min(self.targets.len() - 1)]
    }
}

/// Every alias of one config version.
#[derive(Debug, Default)]
pub struct RoutingTable {
    routes: HashMap<String, Arc<Route>>,
    /// Aliases in config order, for `GET /v1/models`.
    order: Vec<Arc<str>>,
}

impl RoutingTable {
    /// Builds the table, reporting every problem with its config path.
    pub fn build(
        models: &[ModelConfig],
        providers: &HashSet<&str>,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut routes = HashMap::new();
        let mut order = Vec::new();
        for (index, model) in models.iter().enumerate() {
            let path = format!("models[{index}]");
            if model.alias.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.alias"),
                    "must not be empty",
                ));
            }
            if model.targets.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.targets"),
                    "an alias needs at least one target",
                ));
            }
            let mut targets = Vec::with_capacity(model.targets.len());
            let mut cumulative = Vec::with_capacity(model.targets.len());
            let mut total = 0u64;
            for (target_index, target) in model.targets.iter().enumerate() {
                let target_path = format!("{path}.targets[{target_index}]");
                if !providers.contains(target.provider.as_str()) {
                    errors.push(ConfigError::new(
                        format!("{target_path}.provider"),
                        format!("no provider named `{}`", target.provider),
                    ));
                }
                if target.model.is_empty() {
                    errors.push(ConfigError::new(
                        format!("{target_path}.model"),
                        "must not be empty",
                    ));
                }
                total += u64::from(target.weight);
                cumulative.push(total);
                targets.push(Target {
                    provider: target.provider.as_str().into(),
                    model: target.model.as_str().into(),
                    weight: target.weight,
                });
            }
            if !model.targets.is_empty() && total == 0 {
                errors.push(ConfigError::new(
                    format!("{path}.targets"),
                    "at least one target needs a weight above 0",
                ));
            }
            let alias: Arc<str> = model.alias.as_str().into();
            let route = Arc::new(Route {
                alias: alias.clone(),
                targets,
                cumulative,
            });
            if routes.insert(model.alias.clone(), route).is_some() {
                errors.push(ConfigError::new(
                    format!("{path}.alias"),
                    format!("duplicate alias `{}`", model.alias),
                ));
            } else {
                order.push(alias);
            }
        }
        if errors.is_empty() {
            Ok(Self { routes, order })
        } else {
            Err(errors)
        }
    }

    pub fn resolve(&self, alias: &str) -> Option<&Arc<Route>> {
        self.routes.get(alias)
    }

    /// Aliases in config order.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|alias| &**alias)
    }

    pub fn contains(&self, alias: &str) -> bool {
        self.routes.contains_key(alias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(alias: &str, targets: &[(&str, &str, u32)]) -> ModelConfig {
        ModelConfig {
            alias: alias.into(),
            strategy: Strategy::Weighted,
            targets: targets
                .iter()
                .map(|(provider, model, weight)| TargetConfig {
                    provider: (*provider).into(),
                    model: (*model).into(),
                    weight: *weight,
                })
                .collect(),
        }
    }

    fn providers() -> HashSet<&'static str> {
        HashSet::from(["a", "b"])
    }

    #[test]
    fn weighted_split_follows_weights() {
        let table = RoutingTable::build(
            &[model("chat", &[("a", "m1", 90), ("b", "m2", 10)])],
            &providers(),
        )
        .unwrap();
        let route = table.resolve("chat").unwrap();
        let picks = 20_000;
        let to_b = (0..picks)
            .filter(|_| &*route.pick().provider == "b")
            .count();
        let share = to_b as f64 / picks as f64;
        assert!((share - 0.10).abs() < 0.02, "share to b was {share}");
    }

    #[test]
    fn pick_at_is_exact_at_boundaries() {
        let table = RoutingTable::build(
            &[model(
                "chat",
                &[("a", "m1", 3), ("b", "m2", 0), ("a", "m3", 2)],
            )],
            &providers(),
        )
        .unwrap();
        let route = table.resolve("chat").unwrap();
        let models: Vec<_> = (0..5)
            .map(|at| route.pick_at(at).model.to_string())
            .collect();
        assert_eq!(models, ["m1", "m1", "m1", "m3", "m3"]);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let errors = RoutingTable::build(
            &[
                model("chat", &[("missing", "m", 1)]),
                model("chat", &[("a", "", 0)]),
                model("", &[]),
            ],
            &providers(),
        )
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "models[0].targets[0].provider",
            "models[1].targets[0].model",
            "models[1].targets",
            "models[1].alias",
            "models[2].alias",
            "models[2].targets",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
    }

    #[test]
    fn aliases_keep_config_order() {
        let table = RoutingTable::build(
            &[model("z", &[("a", "m", 1)]), model("a", &[("b", "m", 1)])],
            &providers(),
        )
        .unwrap();
        assert_eq!(table.aliases().collect::<Vec<_>>(), ["z", "a"]);
        assert!(table.resolve("nope").is_none());
    }
}
