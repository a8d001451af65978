//! Prometheus metrics of the request path: what every finished request adds to the counters
//! and histograms, recorded by [`RequestMetrics`] as one more [`RequestObserver`].
//!
//! Recording is an atomic increment on a series found in a map (prometheus-client's
//! `Family`): no allocation once a label set has been seen, no lock held across requests.
//! Labels are low-cardinality by construction: aliases only when the config defines them
//! (anything a client made up is `unknown`), providers only as routing chose them, projects
//! only as authentication found them, status as a class, errors as the fixed [`ErrorType`].
//! The state other layers keep (breakers, limiters, the usage spool) is not copied here: the
//! composing crate reads it when `/metrics` is scraped and appends it to [`RequestMetrics::encode`].

use arc_swap::ArcSwap;
use gateway_core::{ErrorType, FinishedRequest, RequestObserver};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// The `Content-Type` of [`RequestMetrics::encode`]'s output (OpenMetrics text, which
/// Prometheus negotiates and also reads as its own text format).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The label value for a name the config does not define (an alias a client made up).
pub const UNKNOWN: &str = "unknown";
/// The label value for a request that never got that far (no alias, no provider, no project).
pub const NONE: &str = "none";

static UNKNOWN_LABEL: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(UNKNOWN));
static NONE_LABEL: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(NONE));

/// Request latency, from the request's arrival to its body's end: a cached answer takes a
/// few milliseconds, a long generation minutes.
const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];
/// Time to first token: what a chat user waits before anything appears.
const TTFT_BUCKETS: [f64; 13] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    alias: Arc<str>,
    provider: Arc<str>,
    status_class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    alias: Arc<str>,
    provider: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    project: Arc<str>,
    alias: Arc<str>,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AttemptLabels {
    provider: Arc<str>,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AliasLabels {
    alias: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    error_type: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS)
}

/// The request-side instruments and the registry they are exported from. One per process,
/// shared by the observer list, the request path (upstream attempts) and the admin listener.
#[derive(Debug)]
pub struct RequestMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RequestLabels>,
    ttft: HistogramFamily<RouteLabels>,
    tokens: Family<TokenLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    retries: Family<AliasLabels, Counter>,
    fallbacks: Family<AliasLabels, Counter>,
    client_aborted: Counter,
    errors: Family<ErrorLabels, Counter>,
    /// The aliases of the config in force: the only alias label values besides `unknown` and
    /// `none`. Replaced whole on reload.
    aliases: ArcSwap<HashSet<Arc<str>>>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = HistogramFamily::<RequestLabels>::new_with_constructor(duration_histogram);
        let ttft = HistogramFamily::<RouteLabels>::new_with_constructor(ttft_histogram);
        let tokens = Family::<TokenLabels, Counter>::default();
        let attempts = Family::<AttemptLabels, Counter>::default();
        let retries = Family::<AliasLabels, Counter>::default();
        let fallbacks = Family::<AliasLabels, Counter>::default();
        let client_aborted = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "gateway_requests",
            "Finished requests by alias, provider and HTTP status class",
            requests.clone(),
        );
        registry.register_with_unit(
            "gateway_request_duration",
            "Time from a request's arrival to the end of its response body",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register_with_unit(
            "gateway_time_to_first_token",
            "Time from a request's arrival to its first content (streams)",
            Unit::Seconds,
            ttft.clone(),
        );
        registry.register(
            "gateway_tokens",
            "Tokens billed by project, alias and kind (input, output, cached, reasoning)",
            tokens.clone(),
        );
        registry.register(
            "gateway_upstream_attempts",
            "Calls to upstream providers by outcome (success, client_error, connect, timeout, \
             rate_limit, server_error)",
            attempts.clone(),
        );
        registry.register(
            "gateway_retries",
            "Calls made again to a target that had just failed",
            retries.clone(),
        );
        registry.register(
            "gateway_fallbacks",
            "Moves to another target of the plan after a failure",
            fallbacks.clone(),
        );
        registry.register(
            "gateway_client_aborted",
            "Requests whose client went away before the response body ended",
            client_aborted.clone(),
        );
        registry.register(
            "gateway_errors",
            "Failed requests by error type",
            errors.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            ttft,
            tokens,
            attempts,
            retries,
            fallbacks,
            client_aborted,
            errors,
            aliases: ArcSwap::from_pointee(HashSet::new()),
        }
    }

    /// Sets the aliases that may appear as label values: call it at start and after every
    /// reload with the aliases of the config in force.
    pub fn set_aliases<'a>(&self, aliases: impl IntoIterator<Item = &'a str>) {
        let aliases: HashSet<Arc<str>> = aliases.into_iter().map(Arc::from).collect();
        self.aliases.store(Arc::new(aliases));
    }

    /// Counts one call to `provider`; `outcome` is `success`, `client_error` or the failure
    /// class (`connect`, `timeout`, `rate_limit`, `server_error`). Called by the request path
    /// for each call, since a request's outcome keeps only the last.
    pub fn upstream_attempt(&self, provider: &Arc<str>, outcome: &'static str) {
        self.attempts
            .get_or_create(&AttemptLabels {
                provider: provider.clone(),
                outcome,
            })
            .inc();
    }

    /// The request-side metrics in OpenMetrics text, without the closing `# EOF` so that the
    /// caller can append the metrics it gathers at scrape time (then [`finish_exposition`]).
    pub fn encode(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
    }

    /// The alias as a label value: a configured alias, `unknown` for anything else, `none`
    /// for a request that named none.
    fn alias_label(&self, alias: Option<&Arc<str>>) -> Arc<str> {
        match alias {
            None => NONE_LABEL.clone(),
            Some(alias) => self
                .aliases
                .load()
                .get(&**alias)
                .cloned()
                .unwrap_or_else(|| UNKNOWN_LABEL.clone()),
        }
    }
}

/// Ends an exposition started with [`RequestMetrics::encode`].
pub fn finish_exposition(out: &mut String) -> std::fmt::Result {
    prometheus_client::encoding::text::encode_eof(out)
}

fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl RequestObserver for RequestMetrics {
    fn request_finished(&self, finished: &FinishedRequest<'_>) {
        let outcome = finished.outcome;
        let alias = self.alias_label(outcome.alias.as_ref());
        let provider = outcome
            .provider
            .clone()
            .unwrap_or_else(|| NONE_LABEL.clone());
        let labels = RequestLabels {
            alias: alias.clone(),
            provider: provider.clone(),
            status_class: status_class(finished.status),
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(seconds(finished.elapsed));
        if outcome.streamed
            && let Some(ttft) = outcome.time_to_first_token
        {
            self.ttft
                .get_or_create(&RouteLabels {
                    alias: alias.clone(),
                    provider,
                })
                .observe(seconds(ttft));
        }
        if let Some(usage) = &outcome.usage {
            let project = outcome
                .principal
                .as_ref()
                .map_or_else(|| NONE_LABEL.clone(), |p| p.project.clone());
            for (kind, count) in [
                ("input", usage.prompt_tokens),
                ("output", usage.completion_tokens),
                ("cached", usage.cached_tokens()),
                ("reasoning", usage.reasoning_tokens()),
            ] {
                // A zero would still create the series; kinds a vendor never reports stay
                // absent rather than flat.
                if count > 0 {
                    self.tokens
                        .get_or_create(&TokenLabels {
                            project: project.clone(),
                            alias: alias.clone(),
                            kind,
                        })
                        .inc_by(count);
                }
            }
        }
        if outcome.retries > 0 {
            self.retries
                .get_or_create(&AliasLabels {
                    alias: alias.clone(),
                })
                .inc_by(u64::from(outcome.retries));
        }
        if outcome.fallbacks > 0 {
            self.fallbacks
                .get_or_create(&AliasLabels { alias })
                .inc_by(u64::from(outcome.fallbacks));
        }
        if finished.client_aborted {
            self.client_aborted.inc();
        }
        let error = outcome
            .error_type
            .or(finished.client_aborted.then_some(ErrorType::ClientAborted));
        if let Some(error) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    error_type: error.as_str(),
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::openai::{CompletionTokensDetails, Usage};
    use gateway_core::{Principal, RequestContext, RequestId, RequestOutcome};

    fn finish(metrics: &RequestMetrics, outcome: RequestOutcome, status: u16, aborted: bool) {
        let context = RequestContext::new(RequestId::new_v7(), http::Method::POST, "/".into());
        metrics.request_finished(&FinishedRequest {
            context: &context,
            outcome: &outcome,
            status: http::StatusCode::from_u16(status).unwrap(),
            elapsed: Duration::from_millis(30),
            client_aborted: aborted,
        });
    }

    fn principal(project: &str) -> Principal {
        Principal {
            project: project.into(),
            key_id: "k".into(),
            allowed_models: None,
            tags: Arc::default(),
            tags_json: "{}".into(),
            project_rate_limit: None,
            key_rate_limit: None,
        }
    }

    fn text(metrics: &RequestMetrics) -> String {
        let mut out = String::new();
        metrics.encode(&mut out).unwrap();
        finish_exposition(&mut out).unwrap();
        out
    }

    #[test]
    fn records_requests_tokens_and_errors_with_bounded_labels() {
        let metrics = RequestMetrics::new();
        metrics.set_aliases(["chat"]);
        let mut usage = Usage::new(10, 5);
        usage.completion_tokens_details = Some(CompletionTokensDetails {
            reasoning_tokens: Some(2),
        });
        finish(
            &metrics,
            RequestOutcome {
                principal: Some(principal("team-a")),
                routed: true,
                alias: Some("chat".into()),
                provider: Some("mock".into()),
                usage: Some(usage),
                streamed: true,
                time_to_first_token: Some(Duration::from_millis(7)),
                retries: 1,
                fallbacks: 2,
                ..RequestOutcome::default()
            },
            200,
            false,
        );
        finish(
            &metrics,
            RequestOutcome {
                routed: true,
                alias: Some("secret-made-up-name".into()),
                error_type: Some(ErrorType::ModelNotFound),
                ..RequestOutcome::default()
            },
            404,
            false,
        );
        finish(&metrics, RequestOutcome::default(), 200, true);
        let out = text(&metrics);
        for line in [
            r#"gateway_requests_total{alias="chat",provider="mock",status_class="2xx"} 1"#,
            r#"gateway_requests_total{alias="unknown",provider="none",status_class="4xx"} 1"#,
            r#"gateway_requests_total{alias="none",provider="none",status_class="2xx"} 1"#,
            r#"gateway_tokens_total{project="team-a",alias="chat",kind="input"} 10"#,
            r#"gateway_tokens_total{project="team-a",alias="chat",kind="output"} 5"#,
            r#"gateway_tokens_total{project="team-a",alias="chat",kind="reasoning"} 2"#,
            r#"gateway_time_to_first_token_seconds_count{alias="chat",provider="mock"} 1"#,
            r#"gateway_retries_total{alias="chat"} 1"#,
            r#"gateway_fallbacks_total{alias="chat"} 2"#,
            r#"gateway_errors_total{error_type="model_not_found"} 1"#,
            r#"gateway_errors_total{error_type="client_aborted"} 1"#,
            "gateway_client_aborted_total 1",
            "# EOF",
        ] {
            assert!(out.contains(line), "missing {line} in\n{out}");
        }
        assert!(!out.contains("secret-made-up-name"));
        assert!(
            !out.contains(r#"kind="cached""#),
            "zero counts create no series"
        );
    }

    #[test]
    fn attempts_are_counted_by_provider_and_outcome() {
        let metrics = RequestMetrics::new();
        let provider: Arc<str> = "a".into();
        metrics.upstream_attempt(&provider, "server_error");
        metrics.upstream_attempt(&provider, "server_error");
        metrics.upstream_attempt(&provider, "success");
        let out = text(&metrics);
        assert!(
            out.contains(
                r#"gateway_upstream_attempts_total{provider="a",outcome="server_error"} 2"#
            )
        );
        assert!(
            out.contains(r#"gateway_upstream_attempts_total{provider="a",outcome="success"} 1"#)
        );
    }

    #[test]
    fn a_reload_changes_which_aliases_are_labels() {
        let metrics = RequestMetrics::new();
        let chat: Arc<str> = "chat".into();
        assert_eq!(&*metrics.alias_label(Some(&chat)), UNKNOWN);
        metrics.set_aliases(["chat"]);
        assert_eq!(&*metrics.alias_label(Some(&chat)), "chat");
        assert_eq!(&*metrics.alias_label(None), NONE);
    }
}
