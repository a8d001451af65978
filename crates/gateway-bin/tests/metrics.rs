//! `/metrics` end to end: a gateway following a config file (so its admin listener exists) in
//! front of two mock upstreams and a closed port, a known mix of requests (plain, streamed,
//! unknown alias, a vendor 500 retried, a connect failure that falls back, an upstream that
//! keeps failing until its breaker opens), then the admin listener scraped over HTTP and the
//! OpenMetrics text parsed: every count, label and token total must be exactly what was sent,
//! and every metric the Grafana dashboard (`deploy/grafana`) queries must be exported.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use gateway_bin::{GatewayConfig, RunningGateway};
use gateway_test_support::{Behaviour, MockUpstream};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const KEY: &str = "sk-metrics-test-client-key";

/// One parsed exposition: `name{sorted labels}` -> value.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    /// A small parser for the text format: `name{k="v",...} value` lines, `#` lines skipped.
    fn parse(text: String) -> Self {
        let mut samples = BTreeMap::new();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let mut pairs: Vec<(String, String)> = inner
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once("=\"").unwrap();
                            (key.to_owned(), value.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    pairs.sort();
                    (name, pairs)
                }
                None => (series, Vec::new()),
            };
            let previous = samples.insert(key(name, &labels), value);
            assert!(previous.is_none(), "series twice: {line}");
        }
        assert!(text.trim_end().ends_with("# EOF"), "no EOF marker");
        Self { samples, text }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        labels.sort();
        self.samples.get(&key(name, &labels)).copied()
    }

    /// The value, which must exist.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    /// Sum over every series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| {
                series.split('{').next() == Some(name)
                    && labels
                        .iter()
                        .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, value)| value)
            .sum()
    }
}

fn key(name: &str, labels: &[(String, String)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

struct Setup {
    gateway: RunningGateway,
    base: String,
    admin: String,
    path: std::path::PathBuf,
    client: reqwest::Client,
    good: MockUpstream,
    bad: MockUpstream,
    _dir: tempfile::TempDir,
}

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn config_text(dir: &Path, good: &str, bad: &str, down_port: u16, extra_alias: bool) -> String {
    let extra = if extra_alias {
        "[[models]]\nalias = \"extra\"\ntargets = [{ provider = \"up\", model = \"m\" }]\n"
    } else {
        ""
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_secs = 5

[database]
url = "sqlite://{db}"
spool_dir = "{spool}"

[observability]
log_level = "error"
access_log = false

[policy.retry]
max_attempts = 2
backoff_base_ms = 1
backoff_max_ms = 2
budget_min_retries_per_sec = 1000

[policy.breaker]
consecutive_failures = 3
failure_rate_percent = 0
open_secs = 600

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{good}"]
timeout_secs = 5

[[providers]]
name = "bad"
kind = "openai"
base_urls = ["{bad}"]
timeout_secs = 5

[[providers]]
name = "down"
kind = "openai"
base_urls = ["http://127.0.0.1:{down_port}/v1"]
timeout_secs = 5

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[models]]
alias = "primary"
targets = [{{ provider = "down", model = "m" }}]
fallbacks = ["chat"]

[[models]]
alias = "brk"
targets = [{{ provider = "bad", model = "m" }}]

{extra}

[[prices]]
provider = "up"
model = "m"
input_per_million = "1.50"
output_per_million = "2.25"

[[projects]]
name = "team-a"
api_keys = [{{ id = "k1", sha256 = "{hash}" }}]
"#,
        db = dir.join("usage.db").display(),
        spool = dir.join("spool").display(),
        hash = gateway_access::hash_key(KEY),
    )
}

impl Setup {
    async fn start() -> Self {
        let good = MockUpstream::start().await.unwrap();
        let bad = MockUpstream::start().await.unwrap();
        bad.set_behaviour(Behaviour {
            status: Some(500),
            ..Behaviour::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        let down = closed_port();
        std::fs::write(
            &path,
            config_text(dir.path(), &good.base_url(), &bad.base_url(), down, false),
        )
        .unwrap();
        let gateway = RunningGateway::start_from_file(&path).await.unwrap();
        Self {
            base: format!("http://{}", gateway.local_addr()),
            admin: format!("http://{}", gateway.admin_addr().unwrap()),
            gateway,
            path,
            client: reqwest::Client::new(),
            good,
            bad,
            _dir: dir,
        }
    }

    async fn chat(&self, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// A plain request that must succeed; returns its (prompt, completion) tokens.
    async fn ok(&self, alias: &str, text: &str) -> (u64, u64) {
        let response = self
            .chat(json!({"model": alias, "messages": [{"role": "user", "content": text}]}))
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        (
            body["usage"]["prompt_tokens"].as_u64().unwrap(),
            body["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    }

    async fn scrape(&self) -> Scrape {
        let response = self
            .client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        Scrape::parse(response.text().await.unwrap())
    }

    /// Replaces the config file whole, as deploy tools do.
    fn replace(&self, text: &str) {
        let tmp = self.path.with_file_name(".gateway.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&RunningGateway) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&self.gateway) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The (prompt, completion) tokens of a streamed answer, read from its usage chunk.
async fn stream_usage(response: reqwest::Response) -> (u64, u64) {
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let usage = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .find(|event| event["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk in {text}"));
    (
        usage["usage"]["prompt_tokens"].as_u64().unwrap(),
        usage["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn metrics_count_exactly_what_was_sent() {
    let setup = Setup::start().await;
    let mut input = 0;
    let mut output = 0;

    // Three plain requests and one stream, all served by `up`.
    for text in ["one", "two two", "three three three"] {
        let (p, c) = setup.ok("chat", text).await;
        input += p;
        output += c;
    }
    let stream = setup
        .chat(json!({"model": "chat", "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "stream please"}]}))
        .await;
    let (p, c) = stream_usage(stream).await;
    input += p;
    output += c;

    // An alias nobody configured: a 404, and its name never becomes a label.
    let response = setup
        .chat(json!({"model": "made-up-alias-x9", "messages": [{"role": "user", "content": "x"}]}))
        .await;
    assert_eq!(response.status(), 404);

    // A vendor 500 on the only target: retried once (max_attempts = 2), then relayed.
    let response = setup
        .chat(json!({"model": "chat",
            "messages": [{"role": "user", "content": "[[mock status=500]]"}]}))
        .await;
    assert_eq!(response.status(), 500);

    // `primary` goes to a closed port, then falls back to `chat`.
    let (p, c) = setup.ok("primary", "fall back").await;
    input += p;
    output += c;

    // `brk` always gets 500s: two calls, one more opens the breaker (3 in a row), then the
    // alias has no usable target at all.
    let brk = json!({"model": "brk", "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(setup.chat(brk.clone()).await.status(), 500);
    assert_eq!(setup.chat(brk.clone()).await.status(), 500);
    let refused = setup.chat(brk.clone()).await;
    assert_eq!(refused.status(), 503, "{:?}", refused.text().await);

    // Usage rows: every routed request (the unknown alias too) lands in the database.
    let routed = 10;
    setup
        .wait_until("the usage rows to ship", |gateway| {
            let stats = gateway.usage_stats();
            stats.written >= routed && stats.spool_entries == 0
        })
        .await;

    let m = setup.scrape().await;
    let requests = "gateway_requests_total";
    let class = |alias, provider, class| {
        m.value(
            requests,
            &[
                ("alias", alias),
                ("provider", provider),
                ("status_class", class),
            ],
        )
    };
    assert_eq!(
        class("chat", "up", "2xx"),
        5.0,
        "3 plain, 1 stream, 1 fallback"
    );
    assert_eq!(class("chat", "up", "5xx"), 1.0);
    assert_eq!(class("unknown", "none", "4xx"), 1.0);
    assert_eq!(class("brk", "bad", "5xx"), 2.0);
    assert_eq!(
        class("brk", "none", "5xx"),
        1.0,
        "refused before any target"
    );
    assert_eq!(m.sum(requests, &[]), 10.0);
    assert!(
        !m.text.contains("made-up-alias-x9"),
        "client text became a label"
    );
    assert!(!m.text.contains(KEY));

    // Histograms: one observation per request, TTFT for the stream only.
    assert_eq!(
        m.value(
            "gateway_request_duration_seconds_count",
            &[
                ("alias", "chat"),
                ("provider", "up"),
                ("status_class", "2xx")
            ]
        ),
        5.0
    );
    assert_eq!(
        m.value(
            "gateway_time_to_first_token_seconds_count",
            &[("alias", "chat"), ("provider", "up")]
        ),
        1.0
    );

    // Tokens are what the mock reported, to the token.
    let tokens = |kind| {
        m.value(
            "gateway_tokens_total",
            &[("project", "team-a"), ("alias", "chat"), ("kind", kind)],
        )
    };
    assert_eq!(tokens("input"), input as f64);
    assert_eq!(tokens("output"), output as f64);
    let billed: u64 = setup.good.billed().iter().map(|b| b.prompt_tokens).sum();
    assert_eq!(billed, input, "the mock's own count agrees");

    // Cost: priced in decimals at record time, 1.50 in and 2.25 out per million tokens.
    let expected = (Decimal::from(input) * Decimal::new(150, 2)
        + Decimal::from(output) * Decimal::new(225, 2))
        / Decimal::from(1_000_000);
    let cost = m.value(
        "gateway_cost_total",
        &[
            ("project", "team-a"),
            ("alias", "chat"),
            ("currency", "USD"),
        ],
    );
    assert!(
        (cost - expected.to_f64().unwrap()).abs() < 1e-12,
        "{cost} != {expected}"
    );

    // Attempts, retries and fallbacks.
    let attempts = |provider, outcome| {
        m.value(
            "gateway_upstream_attempts_total",
            &[("provider", provider), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("up", "success"), 5.0);
    assert_eq!(attempts("up", "server_error"), 2.0);
    assert_eq!(attempts("down", "connect"), 1.0);
    assert_eq!(attempts("bad", "server_error"), 3.0);
    assert_eq!(m.value("gateway_retries_total", &[("alias", "chat")]), 1.0);
    assert_eq!(m.value("gateway_retries_total", &[("alias", "brk")]), 1.0);
    assert_eq!(
        m.value("gateway_fallbacks_total", &[("alias", "chat")]),
        1.0
    );
    assert_eq!(m.sum("gateway_fallbacks_total", &[]), 1.0);

    // Errors by their fixed type.
    let errors = |error_type| m.value("gateway_errors_total", &[("error_type", error_type)]);
    assert_eq!(errors("model_not_found"), 1.0);
    assert_eq!(errors("upstream_error"), 3.0);
    assert_eq!(m.sum("gateway_errors_total", &[]), 5.0);

    // Breakers: `bad` open after one opening, the others closed.
    let breaker = |provider| m.value("gateway_circuit_breaker_state", &[("provider", provider)]);
    assert_eq!(breaker("bad"), 2.0);
    assert_eq!(breaker("up"), 0.0);
    assert_eq!(
        m.value(
            "gateway_circuit_breaker_opens_total",
            &[("provider", "bad")]
        ),
        1.0
    );

    // The usage spool: every record queued and shipped, nothing waiting or dropped.
    assert_eq!(
        m.value("gateway_usage_records_queued_total", &[]),
        routed as f64
    );
    assert_eq!(
        m.value("gateway_usage_records_shipped_total", &[]),
        routed as f64
    );
    assert_eq!(m.value("gateway_usage_spool_entries", &[]), 0.0);
    assert_eq!(m.value("gateway_usage_spool_oldest_age_seconds", &[]), 0.0);
    assert_eq!(
        m.value("gateway_usage_dropped_total", &[("kind", "record")]),
        0.0
    );
    assert_eq!(m.value("gateway_requests_in_flight", &[]), 0.0);

    // Config: the version in force, no reload yet.
    let version = setup.gateway.reload_status().version;
    assert_eq!(
        m.value("gateway_config_info", &[("version", &version)]),
        1.0
    );
    assert_eq!(
        m.value("gateway_config_reloads_total", &[("result", "ok")]),
        0.0
    );

    // A reload that adds an alias: counted, and the new alias becomes a label.
    let dir = setup.path.parent().unwrap().to_owned();
    let text = config_text(
        &dir,
        &setup.good.base_url(),
        &setup.bad.base_url(),
        closed_port(),
        true,
    );
    setup.replace(&text);
    setup
        .wait_until("the reload", |gateway| gateway.reload_status().reloads == 1)
        .await;
    setup.ok("extra", "new alias").await;
    // An invalid file is refused and counted.
    setup.replace("[server]\nnot valid toml = = =");
    setup
        .wait_until("the refused reload", |gateway| {
            gateway.reload_status().failed_reloads == 1
        })
        .await;
    let m = setup.scrape().await;
    assert_eq!(
        m.value("gateway_config_reloads_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        m.value("gateway_config_reloads_total", &[("result", "failed")]),
        1.0
    );
    let version = GatewayConfig::parse(&text, &|_| None).unwrap().version;
    assert_eq!(
        m.value("gateway_config_info", &[("version", &version)]),
        1.0
    );
    assert_eq!(
        m.value(
            requests,
            &[
                ("alias", "extra"),
                ("provider", "up"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );
    assert_dashboard_covered(&m);
    setup.gateway.shutdown().await;
}

#[tokio::test]
async fn metrics_answers_only_get() {
    let setup = Setup::start().await;
    let response = setup
        .client
        .post(format!("{}/metrics", setup.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    // Before any request the exposition is still complete and parseable.
    let m = setup.scrape().await;
    assert_eq!(m.sum("gateway_requests_total", &[]), 0.0);
    assert_eq!(
        m.value("gateway_circuit_breaker_state", &[("provider", "up")]),
        0.0
    );
    setup.gateway.shutdown().await;
}

/// Every metric the Grafana dashboard queries is one the gateway exports (a family shows in
/// the exposition once it has a series, so `m` must come after traffic).
fn assert_dashboard_covered(m: &Scrape) {
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/gateway-dashboard.json"),
    )
    .unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "{exprs:?}");
    for expr in &exprs {
        for (start, _) in expr.match_indices("gateway_") {
            let name: String = expr[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name)
                .to_owned();
            assert!(
                m.text.contains(&format!("# TYPE {base} ")),
                "the dashboard queries {name}, which is not exported"
            );
        }
    }
}

/// Every `expr` string in a Grafana dashboard (panel targets, annotations).
fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}
