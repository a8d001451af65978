//! `plan()` cost with 1,000 aliases of mixed strategies, 3 targets each, every tenth with
//! fallbacks: the routing work on the path of every request.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use gateway_routing::{
    CostLookup, ManualClock, ModelConfig, RouteInputs, RoutingTable, Sticky, Strategy, TargetConfig,
};
use http::HeaderMap;
use std::collections::HashSet;
use std::sync::Arc;

const ALIASES: usize = 1_000;

/// Every model has a price, so any alias may be `lowest-cost`.
struct FlatPrices;

impl CostLookup for FlatPrices {
    fn cost(&self, _provider: &str, model: &str) -> Option<u64> {
        Some(model.len() as u64 * 1_000)
    }
}

fn models() -> Vec<ModelConfig> {
    let strategies = [
        Strategy::Weighted,
        Strategy::Priority,
        Strategy::LeastLatency,
        Strategy::LowestCost,
    ];
    (0..ALIASES)
        .map(|i| {
            let strategy = strategies[i % strategies.len()];
            let targets = (0..3)
                .map(|t| TargetConfig {
                    weight: 10 * (t + 1),
                    canary: t == 2 && i % 7 == 0,
                    ..TargetConfig::new(format!("p{}", (i + t as usize) % 5), format!("m{i}-{t}"))
                })
                .collect();
            // Fallbacks point forward only, so the config is acyclic.
            let fallbacks = if i % 10 == 0 && i + 2 < ALIASES {
                vec![format!("alias-{}", i + 1), format!("alias-{}", i + 2)]
            } else {
                Vec::new()
            };
            ModelConfig {
                alias: format!("alias-{i}"),
                targets,
                strategy,
                sticky: (strategy == Strategy::Weighted && i % 8 == 0).then_some(Sticky::Key),
                fallbacks,
                ..ModelConfig::default()
            }
        })
        .collect()
}

fn plan(c: &mut Criterion) {
    let models = models();
    let providers: HashSet<&str> = ["p0", "p1", "p2", "p3", "p4"].into();
    let Ok(table) = RoutingTable::build_with(
        &models,
        &providers,
        &FlatPrices,
        Arc::new(ManualClock::new()),
    ) else {
        return;
    };
    let aliases: Vec<String> = models.iter().map(|m| m.alias.clone()).collect();
    let headers = HeaderMap::new();
    let inputs = RouteInputs {
        key_id: "key-0123456789",
        user: Some("user-42"),
        headers: &headers,
        open_circuits: None,
    };
    let mut next = 0usize;
    c.bench_function("plan_random_alias_of_1000", |b| {
        b.iter(|| {
            // A cheap LCG step rather than an RNG call, so the figure is the plan's own cost.
            next = next.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let alias = &aliases[(next >> 33) % ALIASES];
            black_box(table.plan(black_box(alias), black_box(&inputs)))
        });
    });
}

criterion_group!(benches, plan);
criterion_main!(benches);
