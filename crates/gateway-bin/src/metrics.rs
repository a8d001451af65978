//! `GET /metrics` of the admin listener: the request-side metrics of the observability layer,
//! then the state the other layers keep, read at scrape time.
//!
//! Breakers, limiters, the usage spool and the budgets already count what they do (the admin
//! API's `/policy` shows the same numbers); copying every change into metric instruments on
//! the request path would cost each request for the benefit of a scrape every 15 s. So they
//! are read once per scrape into a throw-away registry and encoded after the request metrics,
//! in one OpenMetrics exposition. Every name and label here is documented in
//! `docs/observability.md`.

use crate::reload::ReloadStatus;
use crate::service::AppState;
use gateway_observability::metrics::finish_exposition;
use gateway_policy::breaker::Circuit;
use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use rust_decimal::prelude::ToPrimitive;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// The whole exposition: request metrics, then the layers' state, then `# EOF`.
pub(crate) fn render(state: &AppState, status: &ReloadStatus) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    state.metrics.encode(&mut out)?;
    encode_registry(&mut out, &scrape(state, status))?;
    finish_exposition(&mut out)?;
    Ok(out)
}

/// A registry filled with what the layers report right now.
fn scrape(state: &AppState, status: &ReloadStatus) -> Registry {
    let mut r = Scrape::default();
    breakers(&mut r, state);
    policy(&mut r, state);
    reloads(&mut r, status);
    usage(&mut r, state);
    budgets(&mut r, state);
    r.registry
}

fn breakers(r: &mut Scrape, state: &AppState) {
    let mut circuits: BTreeMap<String, (i64, u64, u64)> = state
        .snapshot
        .load()
        .providers
        .keys()
        .map(|name| (name.clone(), (0, 0, 0)))
        .collect();
    for (provider, breaker) in state.policy.breakers.states() {
        let circuit = match breaker.circuit {
            Circuit::Closed => 0,
            Circuit::HalfOpen => 1,
            Circuit::Open => 2,
        };
        circuits.insert(
            provider,
            (circuit, breaker.opened_total, breaker.rejected_total),
        );
    }
    let by = |pick: fn(&(i64, u64, u64)) -> u64| {
        circuits
            .iter()
            .map(move |(provider, value)| (vec![("provider", provider.clone())], pick(value)))
    };
    r.gauges(
        "gateway_circuit_breaker_state",
        "Circuit breaker of each provider: 0 closed, 1 half-open, 2 open",
        circuits
            .iter()
            .map(|(provider, (circuit, _, _))| (vec![("provider", provider.clone())], *circuit)),
    );
    r.counters(
        "gateway_circuit_breaker_opens",
        "Times each provider's breaker opened (reopenings after a failed probe included)",
        by(|value| value.1),
    );
    r.counters(
        "gateway_circuit_breaker_rejections",
        "Attempts refused by an open breaker",
        by(|value| value.2),
    );
}

fn policy(r: &mut Scrape, state: &AppState) {
    let limits = state.policy.limiter.stats();
    r.counters(
        "gateway_rate_limit_decisions",
        "Rate-limit admissions by decision",
        [
            (vec![("decision", "admitted".to_owned())], limits.admitted),
            (vec![("decision", "rejected".to_owned())], limits.rejected),
        ],
    );
    r.counters(
        "gateway_rate_limit_rejections",
        "Requests refused with 429 by the scope of the limit that refused them",
        [
            ("project", limits.rejected_project),
            ("key", limits.rejected_key),
            ("alias", limits.rejected_alias),
        ]
        .map(|(scope, value)| (vec![("scope", scope.to_owned())], value)),
    );
    r.counter(
        "gateway_rate_limit_redis_failures",
        "Rate-limit Redis calls that got no answer",
        limits.redis_failures,
    );
    r.counter(
        "gateway_rate_limit_fail_open",
        "Admissions decided in process because Redis could not be reached",
        limits.fail_open_decisions,
    );
    r.counter(
        "gateway_rate_limit_fail_closed",
        "Requests refused because Redis could not be reached (fail-closed)",
        limits.fail_closed_rejections,
    );

    let shed = state.policy.in_flight.stats();
    r.gauge(
        "gateway_requests_in_flight",
        "Requests holding an in-flight slot (streams and drains included)",
        i64::try_from(shed.in_flight).unwrap_or(i64::MAX),
    );
    r.counters(
        "gateway_requests_shed",
        "Requests refused with 503 because an in-flight cap was full",
        [
            (vec![("scope", "global".to_owned())], shed.shed_global),
            (vec![("scope", "project".to_owned())], shed.shed_project),
        ],
    );

    let retry = state.policy.retry_budget.stats();
    r.counter(
        "gateway_retry_budget_withdrawals",
        "Retries and fallback calls the retry budget granted",
        retry.retries,
    );
    r.counter(
        "gateway_retry_budget_exhausted",
        "Retries and fallback calls refused because the retry budget was spent",
        retry.exhausted,
    );
    r.gauge(
        "gateway_retry_budget_available",
        "Retries the budget's window would grant right now",
        i64::try_from(retry.available).unwrap_or(i64::MAX),
    );

    let idempotency = state.policy.idempotency.stats();
    r.counters(
        "gateway_idempotency",
        "Idempotency-Key outcomes: owner claims, replays of a stored response, conflicts \
         (same key, other body), duplicates that gave up waiting",
        [
            ("claim", idempotency.claims),
            ("replay", idempotency.replays),
            ("conflict", idempotency.conflicts),
            ("still_in_flight", idempotency.still_in_flight),
        ]
        .map(|(outcome, value)| (vec![("outcome", outcome.to_owned())], value)),
    );
}

fn reloads(r: &mut Scrape, status: &ReloadStatus) {
    r.counters(
        "gateway_config_reloads",
        "Config reloads by result (failed: the file was invalid, the previous config stayed)",
        [
            (vec![("result", "ok".to_owned())], status.reloads),
            (vec![("result", "failed".to_owned())], status.failed_reloads),
        ],
    );
    // The version is one hash at a time: an info metric, as Prometheus' build_info.
    r.gauges(
        "gateway_config_info",
        "The config version in force (SHA-256 of the file), always 1",
        [(vec![("version", status.version.clone())], 1)],
    );
    if let Ok(loaded) = time::OffsetDateTime::parse(
        &status.loaded_at,
        &time::format_description::well_known::Rfc3339,
    ) {
        r.gauge_f64(
            "gateway_config_loaded_timestamp_seconds",
            "When the config in force went live (Unix time)",
            loaded.unix_timestamp_nanos() as f64 / 1e9,
        );
    }
}

fn usage(r: &mut Scrape, state: &AppState) {
    let stats = state.usage.stats();
    r.gauge(
        "gateway_usage_spool_entries",
        "Usage entries (records and start markers) not yet shipped to the database",
        i64::try_from(stats.spool_entries).unwrap_or(i64::MAX),
    );
    r.gauge(
        "gateway_usage_spool_bytes",
        "Bytes of the entries not yet shipped",
        i64::try_from(stats.spool_bytes).unwrap_or(i64::MAX),
    );
    r.gauge_f64(
        "gateway_usage_spool_oldest_age_seconds",
        "Age of the oldest entry not yet shipped (0 when none waits)",
        stats.oldest_unshipped_ms as f64 / 1000.0,
    );
    r.counter(
        "gateway_usage_records_queued",
        "Usage records accepted into the spool",
        stats.queued,
    );
    r.counter(
        "gateway_usage_records_shipped",
        "Usage rows committed to the database (interrupted ones included)",
        stats.written,
    );
    r.counters(
        "gateway_usage_dropped",
        "Usage entries refused (spool full, buffer full, writer stopped)",
        [
            (vec![("kind", "record".to_owned())], stats.dropped),
            (
                vec![("kind", "start_marker".to_owned())],
                stats.dropped_markers,
            ),
        ],
    );
    r.counter(
        "gateway_usage_db_write_errors",
        "Database writes of the usage shipper that failed (and were retried)",
        stats.failed_writes,
    );
    r.counter(
        "gateway_usage_spool_errors",
        "Spool disk errors, and entries that did not read back",
        stats.spool_errors,
    );
    r.counter(
        "gateway_usage_unpriced",
        "Usage records with tokens but no price for their target (cost unknown)",
        stats.unpriced,
    );
    let costs = Family::<Labels, FloatCounter>::default();
    for total in state.usage.cost_totals() {
        // Money stays decimal until here: the exposition format only has floats.
        if let Some(amount) = total.amount.to_f64() {
            costs
                .get_or_create(&vec![
                    ("project", total.project.to_string()),
                    ("alias", total.alias.to_string()),
                    ("currency", total.currency.clone()),
                ])
                .inc_by(amount);
        }
    }
    r.registry.register(
        "gateway_cost",
        "Cost of the priced requests, in each price row's currency",
        costs,
    );
}

fn budgets(r: &mut Scrape, state: &AppState) {
    let stats = state.budgets.stats();
    r.counters(
        "gateway_budget_reservations",
        "Budget reservations at admission by result (rejected: 429 insufficient_quota)",
        [
            ("admitted", stats.admitted),
            ("rejected", stats.rejected),
            ("fail_open", stats.fail_open_admissions),
            ("fail_closed", stats.fail_closed_rejections),
        ]
        .map(|(result, value)| (vec![("result", result.to_owned())], value)),
    );
    r.counters(
        "gateway_budget_alerts",
        "Budget alerts fired by this instance, by threshold (percent of the budget)",
        state
            .budgets
            .alerts_by_threshold()
            .into_iter()
            .map(|(percent, value)| (vec![("threshold", percent.to_string())], value)),
    );
    r.counter(
        "gateway_budget_backend_failures",
        "Budget backend calls (reservations and settlements) that got no answer",
        stats.backend_failures,
    );
    r.counter(
        "gateway_budget_settle_failures",
        "Budget settlements whose cost could not be counted",
        stats.settle_failures,
    );
    r.counters(
        "gateway_budget_webhooks",
        "Budget alert webhooks by result",
        [
            (vec![("result", "sent".to_owned())], stats.webhooks_sent),
            (
                vec![("result", "failed".to_owned())],
                stats.webhook_failures,
            ),
        ],
    );
}

/// A registry and the shorthand to fill it with values read elsewhere.
#[derive(Default)]
struct Scrape {
    registry: Registry,
}

impl Scrape {
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        self.registry.register(name, help, counter);
    }

    fn counters(
        &mut self,
        name: &str,
        help: &str,
        values: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let family = Family::<Labels, Counter>::default();
        for (labels, value) in values {
            family.get_or_create(&labels).inc_by(value);
        }
        self.registry.register(name, help, family);
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        self.registry.register(name, help, gauge);
    }

    fn gauges(&mut self, name: &str, help: &str, values: impl IntoIterator<Item = (Labels, i64)>) {
        let family = Family::<Labels, Gauge>::default();
        for (labels, value) in values {
            family.get_or_create(&labels).set(value);
        }
        self.registry.register(name, help, family);
    }

    /// `name` carries its unit suffix already (`_seconds`).
    fn gauge_f64(&mut self, name: &str, help: &str, value: f64) {
        let gauge = FloatGauge::default();
        gauge.set(value);
        match name.strip_suffix("_seconds") {
            Some(stem) => self
                .registry
                .register_with_unit(stem, help, Unit::Seconds, gauge),
            None => self.registry.register(name, help, gauge),
        }
    }
}
