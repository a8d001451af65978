//! Behaviour of plans, feedback and validation through the public API only.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "tests fail loudly by design"
)]

use gateway_core::config::{ConfigError, deserialize_section};
use gateway_routing::{
    Attempt, CanaryConfig, CostLookup, FailureClass, ManualClock, ModelConfig, NoPrices, Outcome,
    RouteInputs, RoutingTable, Sticky, Strategy, TargetConfig,
};
use http::{HeaderMap, HeaderValue};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

fn providers() -> HashSet<&'static str> {
    HashSet::from(["a", "b", "c", "d"])
}

fn target(provider: &str, model: &str, weight: u32) -> TargetConfig {
    TargetConfig {
        weight,
        ..TargetConfig::new(provider, model)
    }
}

fn alias(name: &str, strategy: Strategy, targets: Vec<TargetConfig>) -> ModelConfig {
    ModelConfig {
        alias: name.into(),
        strategy,
        targets,
        ..ModelConfig::default()
    }
}

/// A table on a clock the test moves.
fn table_at(models: &[ModelConfig]) -> (RoutingTable, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let table = RoutingTable::build_with(models, &providers(), &NoPrices, clock.clone()).unwrap();
    (table, clock)
}

fn order(table: &RoutingTable, alias: &str, key: &str, headers: &HeaderMap) -> Vec<String> {
    let inputs = RouteInputs {
        key_id: key,
        user: None,
        headers,
        open_circuits: None,
    };
    table
        .plan(alias, &inputs)
        .unwrap()
        .iter()
        .map(|attempt| format!("{}/{}", attempt.provider(), attempt.model()))
        .collect()
}

fn first(table: &RoutingTable, alias: &str, key: &str, headers: &HeaderMap) -> String {
    order(table, alias, key, headers).swap_remove(0)
}

fn fail(table: &RoutingTable, alias: &str, provider: &str, class: FailureClass, times: usize) {
    let headers = HeaderMap::new();
    let inputs = RouteInputs {
        key_id: "",
        user: None,
        headers: &headers,
        open_circuits: None,
    };
    for _ in 0..times {
        let plan = table.plan(alias, &inputs).unwrap();
        let attempt = plan
            .iter()
            .find(|a| &**a.provider() == provider)
            .unwrap()
            .clone();
        table.report(&attempt, Outcome::Failure { class });
    }
}

fn succeed(table: &RoutingTable, alias: &str, provider: &str, ttft_ms: u64, times: usize) {
    let headers = HeaderMap::new();
    let inputs = RouteInputs {
        key_id: "",
        user: None,
        headers: &headers,
        open_circuits: None,
    };
    for _ in 0..times {
        let plan = table.plan(alias, &inputs).unwrap();
        let Some(attempt) = plan.iter().find(|a| &**a.provider() == provider) else {
            panic!("{provider} not in plan");
        };
        let ttft = Duration::from_millis(ttft_ms);
        table.report(
            attempt,
            Outcome::Success {
                ttft,
                latency: ttft * 2,
            },
        );
    }
}

fn paths(errors: &[ConfigError]) -> Vec<&str> {
    errors.iter().map(|e| e.path.as_str()).collect()
}

#[test]
fn weighted_split_is_within_two_points_of_the_weights() {
    let (table, _) = table_at(&[alias(
        "chat",
        Strategy::Weighted,
        vec![
            target("a", "m", 70),
            target("b", "m", 20),
            target("c", "m", 10),
        ],
    )]);
    let headers = HeaderMap::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let plans = 10_000;
    for _ in 0..plans {
        *counts
            .entry(first(&table, "chat", "k", &headers))
            .or_default() += 1;
    }
    for (name, weight) in [("a/m", 0.70), ("b/m", 0.20), ("c/m", 0.10)] {
        let share = counts.get(name).copied().unwrap_or(0) as f64 / plans as f64;
        assert!((share - weight).abs() < 0.02, "{name}: {share} vs {weight}");
    }
}

#[test]
fn weighted_plan_tries_the_rest_by_descending_weight() {
    let (table, _) = table_at(&[alias(
        "chat",
        Strategy::Weighted,
        vec![
            target("a", "m", 10),
            target("b", "m", 50),
            target("c", "m", 30),
            target("d", "m", 0),
        ],
    )]);
    let headers = HeaderMap::new();
    let weight = |name: &str| match name {
        "a/m" => 10,
        "b/m" => 50,
        "c/m" => 30,
        other => panic!("unexpected {other}"),
    };
    for _ in 0..200 {
        let plan = order(&table, "chat", "k", &headers);
        assert_eq!(plan.len(), 3, "weight 0 is never planned: {plan:?}");
        let rest: Vec<u32> = plan[1..].iter().map(|n| weight(n)).collect();
        assert!(rest.windows(2).all(|w| w[0] >= w[1]), "{plan:?}");
    }
}

#[test]
fn sticky_key_keeps_a_caller_on_one_target_and_spreads_callers() {
    let mut model = alias(
        "chat",
        Strategy::Weighted,
        vec![target("a", "m", 50), target("b", "m", 50)],
    );
    model.sticky = Some(Sticky::Key);
    let (table, _) = table_at(&[model]);
    let headers = HeaderMap::new();
    let chosen = first(&table, "chat", "key-1", &headers);
    for _ in 0..1_000 {
        assert_eq!(first(&table, "chat", "key-1", &headers), chosen);
    }
    let to_a = (0..1_000)
        .filter(|i| first(&table, "chat", &format!("key-{i}"), &headers) == "a/m")
        .count();
    assert!((400..=600).contains(&to_a), "{to_a} of 1000 keys on a");
}

#[test]
fn sticky_header_and_user_fall_back_to_random_when_absent() {
    let mut by_header = alias(
        "h",
        Strategy::Weighted,
        vec![target("a", "m", 50), target("b", "m", 50)],
    );
    by_header.sticky = Some(Sticky::try_from("header:X-Session".to_string()).unwrap());
    let mut by_user = by_header.clone();
    by_user.alias = "u".into();
    by_user.sticky = Some(Sticky::User);
    let (table, _) = table_at(&[by_header, by_user]);

    let mut headers = HeaderMap::new();
    headers.insert("x-session", HeaderValue::from_static("s-42"));
    let chosen = first(&table, "h", "any", &headers);
    assert!((0..500).all(|i| first(&table, "h", &format!("k{i}"), &headers) == chosen));

    let empty = HeaderMap::new();
    let inputs = |user| RouteInputs {
        key_id: "same-key",
        user,
        headers: &empty,
        open_circuits: None,
    };
    let plan_first = |user| {
        table
            .plan("u", &inputs(user))
            .unwrap()
            .first()
            .unwrap()
            .provider()
            .to_string()
    };
    let user_choice = plan_first(Some("alice"));
    assert!((0..500).all(|_| plan_first(Some("alice")) == user_choice));
    let random: HashSet<String> = (0..200).map(|_| plan_first(None)).collect();
    assert_eq!(random.len(), 2, "no user: random split");
    let random: HashSet<String> = (0..200).map(|_| first(&table, "h", "k", &empty)).collect();
    assert_eq!(random.len(), 2, "no header: random split");
}

#[test]
fn priority_follows_config_order_and_skips_unhealthy() {
    let (table, clock) = table_at(&[alias(
        "chat",
        Strategy::Priority,
        vec![
            target("a", "m", 1),
            target("b", "m", 1),
            target("c", "m", 1),
        ],
    )]);
    let headers = HeaderMap::new();
    assert_eq!(order(&table, "chat", "k", &headers), ["a/m", "b/m", "c/m"]);

    fail(&table, "chat", "a", FailureClass::Timeout, 2);
    assert_eq!(
        first(&table, "chat", "k", &headers),
        "a/m",
        "2 failures are not enough"
    );
    fail(&table, "chat", "a", FailureClass::Client, 5);
    assert_eq!(
        first(&table, "chat", "k", &headers),
        "a/m",
        "client errors don't count"
    );
    fail(&table, "chat", "a", FailureClass::ServerError, 1);
    assert_eq!(order(&table, "chat", "k", &headers), ["b/m", "c/m"]);
    assert_eq!(table.stats().unhealthy_upstreams, 1);
    assert_eq!(table.stats().health_ejections, 1);

    // Cool-down over: exactly one plan probes `a`.
    clock.advance(Duration::from_secs(29));
    assert_eq!(first(&table, "chat", "k", &headers), "b/m");
    clock.advance(Duration::from_secs(1));
    let inputs = RouteInputs {
        key_id: "k",
        user: None,
        headers: &headers,
        open_circuits: None,
    };
    let probe = table.plan("chat", &inputs).unwrap();
    assert_eq!(&**probe.first().unwrap().provider(), "a");
    assert_eq!(order(&table, "chat", "k", &headers), ["b/m", "c/m"]);
    // The probe failed: set aside for another cool-down.
    table.report(
        probe.first().unwrap(),
        Outcome::Failure {
            class: FailureClass::Connect,
        },
    );
    clock.advance(Duration::from_secs(29));
    assert_eq!(order(&table, "chat", "k", &headers), ["b/m", "c/m"]);
    clock.advance(Duration::from_secs(2));
    let probe = table.plan("chat", &inputs).unwrap();
    assert_eq!(&**probe.first().unwrap().provider(), "a", "second probe");
    table.report(
        probe.first().unwrap(),
        Outcome::Success {
            ttft: Duration::from_millis(5),
            latency: Duration::from_millis(9),
        },
    );
    for _ in 0..10 {
        assert_eq!(order(&table, "chat", "k", &headers), ["a/m", "b/m", "c/m"]);
    }
    assert_eq!(table.stats().unhealthy_upstreams, 0);
}

#[test]
fn all_unhealthy_priority_targets_come_least_recently_failed_first() {
    let (table, clock) = table_at(&[alias(
        "chat",
        Strategy::Priority,
        vec![target("a", "m", 1), target("b", "m", 1)],
    )]);
    let headers = HeaderMap::new();
    fail(&table, "chat", "a", FailureClass::Connect, 3);
    clock.advance(Duration::from_secs(1));
    fail(&table, "chat", "b", FailureClass::RateLimit, 2);
    // `b` is still healthy and alone in the plan until its third failure.
    clock.advance(Duration::from_secs(1));
    fail(&table, "chat", "b", FailureClass::RateLimit, 1);
    assert_eq!(order(&table, "chat", "k", &headers), ["a/m", "b/m"]);
    clock.advance(Duration::from_secs(1));
    // A later failure of `a` (reported by a request still in flight) moves it behind `b`.
    let route = table.resolve("chat").unwrap();
    assert_eq!(route.strategy(), Strategy::Priority);
    let inputs = RouteInputs {
        key_id: "k",
        user: None,
        headers: &headers,
        open_circuits: None,
    };
    let plan = table.plan("chat", &inputs).unwrap();
    let a = plan.iter().find(|x| &**x.provider() == "a").unwrap();
    table.report(
        a,
        Outcome::Failure {
            class: FailureClass::Timeout,
        },
    );
    assert_eq!(order(&table, "chat", "k", &headers), ["b/m", "a/m"]);
}

#[test]
fn least_latency_measures_new_targets_first_then_fastest_healthy() {
    let (table, _) = table_at(&[alias(
        "chat",
        Strategy::LeastLatency,
        vec![
            target("a", "m", 1),
            target("b", "m", 1),
            target("c", "m", 1),
        ],
    )]);
    let headers = HeaderMap::new();
    assert_eq!(order(&table, "chat", "k", &headers), ["a/m", "b/m", "c/m"]);
    succeed(&table, "chat", "a", 300, 3);
    succeed(&table, "chat", "b", 100, 3);
    assert_eq!(order(&table, "chat", "k", &headers), ["c/m", "b/m", "a/m"]);
    succeed(&table, "chat", "c", 200, 1);
    assert_eq!(order(&table, "chat", "k", &headers), ["b/m", "c/m", "a/m"]);
    // `b` slows down: the moving average follows within a few samples.
    succeed(&table, "chat", "b", 1_000, 4);
    assert_eq!(order(&table, "chat", "k", &headers), ["c/m", "a/m", "b/m"]);
    fail(&table, "chat", "c", FailureClass::ServerError, 3);
    assert_eq!(order(&table, "chat", "k", &headers), ["a/m", "b/m", "c/m"]);
}

struct Prices(HashMap<(&'static str, &'static str), u64>);

impl CostLookup for Prices {
    fn cost(&self, provider: &str, model: &str) -> Option<u64> {
        self.0
            .iter()
            .find(|((p, m), _)| *p == provider && *m == model)
            .map(|(_, cost)| *cost)
    }
}

#[test]
fn lowest_cost_orders_by_price_and_needs_every_price() {
    let models = [alias(
        "cheap",
        Strategy::LowestCost,
        vec![
            target("a", "m", 1),
            target("b", "m", 1),
            target("c", "m", 1),
        ],
    )];
    let prices = Prices(HashMap::from([
        (("a", "m"), 3_000),
        (("b", "m"), 1_000),
        (("c", "m"), 2_000),
    ]));
    let clock = Arc::new(ManualClock::new());
    let table = RoutingTable::build_with(&models, &providers(), &prices, clock).unwrap();
    let headers = HeaderMap::new();
    assert_eq!(order(&table, "cheap", "k", &headers), ["b/m", "c/m", "a/m"]);
    fail(&table, "cheap", "b", FailureClass::Timeout, 3);
    assert_eq!(order(&table, "cheap", "k", &headers), ["c/m", "a/m", "b/m"]);

    let partial = Prices(HashMap::from([(("a", "m"), 1)]));
    let errors = RoutingTable::build_with(
        &models,
        &providers(),
        &partial,
        Arc::new(ManualClock::new()),
    )
    .unwrap_err();
    assert_eq!(
        paths(&errors),
        ["models[0].targets[1]", "models[0].targets[2]"]
    );
    let errors = RoutingTable::build(&models, &providers()).unwrap_err();
    assert_eq!(errors.len(), 3);
}

fn chain_config() -> Vec<ModelConfig> {
    let mut chat = alias(
        "chat",
        Strategy::Priority,
        vec![target("a", "m1", 1), target("b", "m2", 1)],
    );
    chat.fallbacks = vec!["backup".into(), "other".into()];
    let mut backup = alias(
        "backup",
        Strategy::Priority,
        vec![target("b", "m2", 1), target("c", "m3", 1)],
    );
    backup.fallbacks = vec!["deep".into()];
    backup.fallback_on = vec![FailureClass::Timeout];
    let mut other = alias("other", Strategy::Weighted, vec![target("d", "m4", 1)]);
    other.fallbacks = vec!["deep".into()];
    let deep = alias("deep", Strategy::LeastLatency, vec![target("a", "m5", 1)]);
    vec![chat, backup, other, deep]
}

#[test]
fn fallbacks_follow_the_chain_depth_first_without_repeats() {
    let (table, _) = table_at(&chain_config());
    let headers = HeaderMap::new();
    assert_eq!(
        order(&table, "chat", "k", &headers),
        ["a/m1", "b/m2", "c/m3", "a/m5", "d/m4"]
    );
    // `deep` is reached through `backup` first and not again through `other`.
    assert_eq!(order(&table, "other", "k", &headers), ["d/m4", "a/m5"]);
    let inputs = RouteInputs {
        key_id: "k",
        user: None,
        headers: &headers,
        open_circuits: None,
    };
    let plan = table.plan("chat", &inputs).unwrap();
    let aliases: Vec<&str> = plan.iter().map(|a| &**a.alias()).collect();
    assert_eq!(aliases, ["chat", "chat", "backup", "deep", "other"]);
    let backup = &plan.attempts()[2];
    assert!(backup.may_continue(FailureClass::Timeout));
    assert!(!backup.may_continue(FailureClass::Connect));
    let own = plan.first().unwrap();
    for class in FailureClass::RECOVERABLE {
        assert!(own.fallback_on().contains(class));
    }
    assert!(!own.may_continue(FailureClass::Client));
    assert!(table.plan("missing", &inputs).is_none());
}

#[test]
fn fallback_names_must_exist_differ_and_not_loop() {
    let mut models = chain_config();
    models[3].fallbacks = vec!["chat".into()];
    models[0].fallbacks.push("chat".into());
    models[0].fallbacks.push("nowhere".into());
    models[0].fallbacks.push("backup".into());
    let errors = RoutingTable::build(&models, &providers()).unwrap_err();
    let found = paths(&errors);
    for expected in [
        "models[0].fallbacks[2]",
        "models[0].fallbacks[3]",
        "models[0].fallbacks[4]",
        "models[3].fallbacks[0]",
    ] {
        assert!(
            found.contains(&expected),
            "{expected} missing from {errors:?}"
        );
    }
    assert_eq!(found.len(), 4, "{errors:?}");
    let cycle = errors
        .iter()
        .find(|e| e.path == "models[3].fallbacks[0]")
        .unwrap();
    assert_eq!(
        cycle.message,
        "fallback cycle: chat -> backup -> deep -> chat"
    );
}

fn canary_alias(config: CanaryConfig) -> ModelConfig {
    let mut canary = target("b", "new", 10);
    canary.canary = true;
    let mut model = alias(
        "chat",
        Strategy::Weighted,
        vec![target("a", "old", 90), canary],
    );
    model.canary = Some(config);
    model
}

/// Reports `failures` failures spread evenly among `failures + successes` results.
fn report_canary(
    table: &RoutingTable,
    attempt: &Attempt,
    latency_ms: u64,
    failures: usize,
    successes: usize,
) {
    let total = failures + successes;
    for i in 0..total {
        let outcome = if (i * failures) / total != ((i + 1) * failures) / total {
            Outcome::Failure {
                class: FailureClass::ServerError,
            }
        } else {
            Outcome::Success {
                ttft: Duration::from_millis(latency_ms / 2),
                latency: Duration::from_millis(latency_ms),
            }
        };
        table.report(attempt, outcome);
    }
}

/// Handles on the stable and the canary target, taken while both are planned: a handle stays
/// valid for reporting after its target has been rolled back.
fn canary_handles(table: &RoutingTable) -> (Attempt, Attempt) {
    let headers = HeaderMap::new();
    let inputs = RouteInputs {
        key_id: "",
        user: None,
        headers: &headers,
        open_circuits: None,
    };
    let plan = table.plan("chat", &inputs).unwrap();
    let find = |provider: &str| {
        plan.iter()
            .find(|a| &**a.provider() == provider)
            .unwrap()
            .clone()
    };
    (find("a"), find("b"))
}

fn canary_planned(table: &RoutingTable) -> bool {
    let headers = HeaderMap::new();
    (0..500).any(|_| {
        order(table, "chat", "k", &headers)
            .iter()
            .any(|n| n == "b/new")
    })
}

fn small_window() -> CanaryConfig {
    CanaryConfig {
        min_requests: 40,
        ..CanaryConfig::default()
    }
}

#[test]
fn failing_canary_is_rolled_back_for_good() {
    let (table, _) = table_at(&[canary_alias(small_window())]);
    let (stable, canary) = canary_handles(&table);
    report_canary(&table, &stable, 100, 0, 100);
    assert!(canary_planned(&table));
    // 4 failures in 40 is 10 %, above the 5 % limit.
    report_canary(&table, &canary, 100, 4, 36);
    assert_eq!(table.stats().canary_rollbacks, 1);
    assert!(!canary_planned(&table));
    let route = table.resolve("chat").unwrap();
    assert!(
        route
            .targets()
            .iter()
            .any(|t| t.canary && t.is_rolled_back())
    );
    // More bad news does not count it twice; good news does not bring it back.
    report_canary(&table, &canary, 100, 10, 0);
    report_canary(&table, &canary, 100, 0, 200);
    assert_eq!(table.stats().canary_rollbacks, 1);
    assert!(!canary_planned(&table));
}

#[test]
fn slow_canary_is_rolled_back() {
    let (table, _) = table_at(&[canary_alias(small_window())]);
    let (stable, canary) = canary_handles(&table);
    report_canary(&table, &stable, 100, 0, 100);
    report_canary(&table, &canary, 160, 0, 39);
    assert_eq!(table.stats().canary_rollbacks, 0, "below min_requests");
    report_canary(&table, &canary, 160, 0, 1);
    assert_eq!(
        table.stats().canary_rollbacks,
        1,
        "p95 160 ms > 1.5 x 100 ms"
    );
    assert!(!canary_planned(&table));
}

#[test]
fn healthy_canary_or_too_few_requests_stay() {
    let (table, _) = table_at(&[canary_alias(small_window())]);
    let (stable, canary) = canary_handles(&table);
    report_canary(&table, &stable, 100, 0, 300);
    // 2 % errors and p95 1.4x: within both limits.
    report_canary(&table, &canary, 140, 4, 196);
    assert_eq!(table.stats().canary_rollbacks, 0);
    assert!(canary_planned(&table));

    let (table, _) = table_at(&[canary_alias(small_window())]);
    report_canary(&table, &canary, 100, 39, 0);
    assert_eq!(
        table.stats().canary_rollbacks,
        0,
        "39 of 40 needed requests"
    );
    assert!(canary_planned(&table) || table.stats().unhealthy_upstreams == 1);
}

#[test]
fn canary_failures_age_out_of_the_window() {
    let config = CanaryConfig {
        window_secs: 60,
        ..small_window()
    };
    let (table, clock) = table_at(&[canary_alias(config)]);
    let (_, canary) = canary_handles(&table);
    report_canary(&table, &canary, 100, 30, 0);
    clock.advance(Duration::from_secs(61));
    report_canary(&table, &canary, 100, 0, 60);
    assert_eq!(table.stats().canary_rollbacks, 0);
}

#[test]
fn every_config_problem_is_reported_with_its_path() {
    let text = r#"
        [[models]]
        alias = "chat"
        targets = [{ provider = "missing", model = "m" }, { provider = "a", model = "" }]

        [[models]]
        alias = "chat"
        strategy = "priority"
        sticky = "key"
        targets = [{ provider = "a", model = "m", weight = 0 }, { provider = "a", model = "m" }]
        fallback_on = ["timeout", "client"]

        [[models]]
        alias = ""
        targets = []

        [[models]]
        alias = "canary"
        targets = [{ provider = "a", model = "m", canary = true }, { provider = "b", model = "m", weight = 0 }]
        [models.canary]
        max_error_rate = 1.5
        max_p95_ratio = -1.0
        window_secs = 0
        min_requests = 600

        [[models]]
        alias = "lonely-canary-table"
        targets = [{ provider = "a", model = "m" }]
        canary = {}
    "#;
    let value: toml::Value = toml::from_str(text).unwrap();
    let models: Vec<ModelConfig> =
        deserialize_section(value.get("models").unwrap().clone(), "models").unwrap();
    let errors = RoutingTable::build(&models, &providers()).unwrap_err();
    let mut found = paths(&errors);
    found.sort_unstable();
    let mut expected = vec![
        "models[0].targets[0].provider",
        "models[0].targets[1].model",
        "models[1].alias",
        "models[1].sticky",
        "models[1].targets[1]",
        "models[1].fallback_on[1]",
        "models[2].alias",
        "models[2].targets",
        "models[3].targets",
        "models[3].canary.max_error_rate",
        "models[3].canary.max_p95_ratio",
        "models[3].canary.window_secs",
        "models[3].canary.min_requests",
        "models[4].canary",
    ];
    expected.sort_unstable();
    assert_eq!(found, expected, "{errors:#?}");
}

#[test]
fn config_parse_errors_carry_their_path() {
    for (text, path) in [
        (
            r#"[{ alias = "x", targets = [], sticky = "header:bad name" }]"#,
            "models[0].sticky",
        ),
        (
            r#"[{ alias = "x", targets = [], sticky = "ip" }]"#,
            "models[0].sticky",
        ),
        (
            r#"[{ alias = "x", targets = [], strategy = "fastest" }]"#,
            "models[0].strategy",
        ),
        (
            r#"[{ alias = "x", targets = [], fallback_on = ["oops"] }]"#,
            "models[0].fallback_on[0]",
        ),
        (
            r#"[{ alias = "x", targets = [{ provider = "a", model = "m", wieght = 1 }] }]"#,
            "models[0].targets[0].wieght",
        ),
        (
            r#"[{ alias = "x", targets = [], canary = { window = 1 } }]"#,
            "models[0].canary.window",
        ),
    ] {
        let value: toml::Value = toml::from_str(&format!("models = {text}")).unwrap();
        let err =
            deserialize_section::<Vec<ModelConfig>>(value.get("models").unwrap().clone(), "models")
                .unwrap_err();
        assert_eq!(err.path, path, "{text}: {err}");
    }
}

#[test]
fn defaults_match_the_documentation() {
    let value: toml::Value = toml::from_str(
        r#"models = [{ alias = "x", targets = [{ provider = "a", model = "m" }], canary = {} }]"#,
    )
    .unwrap();
    let models: Vec<ModelConfig> =
        deserialize_section(value.get("models").unwrap().clone(), "models").unwrap();
    let model = &models[0];
    assert_eq!(model.strategy, Strategy::Weighted);
    assert_eq!(model.sticky, None);
    assert!(model.fallbacks.is_empty());
    assert_eq!(model.fallback_on, FailureClass::RECOVERABLE);
    assert_eq!(model.targets[0].weight, 100);
    assert!(!model.targets[0].canary);
    let canary = model.canary.unwrap();
    assert_eq!(canary, CanaryConfig::default());
    assert_eq!(
        (
            canary.max_error_rate,
            canary.max_p95_ratio,
            canary.window_secs,
            canary.min_requests
        ),
        (0.05, 1.5, 300, 50)
    );
    let header = Sticky::try_from("header:X-Tenant".to_string()).unwrap();
    assert_eq!(
        header,
        Sticky::Header(http::HeaderName::from_static("x-tenant"))
    );
}

#[test]
fn aliases_resolve_and_pick() {
    let (table, _) = table_at(&chain_config());
    assert_eq!(
        table.aliases().collect::<Vec<_>>(),
        ["chat", "backup", "other", "deep"]
    );
    assert!(table.contains("deep"));
    assert!(!table.contains("nope"));
    let route = table.resolve("chat").unwrap();
    assert_eq!(&*route.alias, "chat");
    assert_eq!(&*route.pick().provider, "a");
    fail(&table, "chat", "a", FailureClass::Connect, 3);
    assert_eq!(&*route.pick().provider, "b");
}

/// The policy layer's breakers, as routing sees them.
#[derive(Debug)]
struct OpenCircuits(&'static [&'static str]);

impl gateway_core::UpstreamHealth for OpenCircuits {
    fn is_open(&self, provider: &str) -> bool {
        self.0.contains(&provider)
    }
}

#[test]
fn a_target_whose_circuit_is_open_is_tried_last() {
    let models = [alias(
        "chat",
        Strategy::Priority,
        vec![TargetConfig::new("a", "m"), TargetConfig::new("b", "m")],
    )];
    let (table, _clock) = table_at(&models);
    let headers = HeaderMap::new();
    let plan_with = |open: &'static [&'static str]| {
        let circuits = OpenCircuits(open);
        let inputs = RouteInputs {
            key_id: "k",
            user: None,
            headers: &headers,
            open_circuits: Some(&circuits),
        };
        table
            .plan("chat", &inputs)
            .unwrap()
            .iter()
            .map(|attempt| attempt.provider().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(plan_with(&[]), ["a", "b"]);
    // Priority keeps only the usable targets while there are some.
    assert_eq!(plan_with(&["a"]), ["b"]);
    // Every circuit open: the plan still holds every target, so the breakers decide.
    assert_eq!(plan_with(&["a", "b"]), ["a", "b"]);
}
