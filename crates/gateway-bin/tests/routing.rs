//! Routing through the real gateway: fallback chains, which errors fall back, stickiness, and
//! a canary that rolls itself back when its upstream misbehaves.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use gateway_bin::{GatewayConfig, RunningGateway};
use gateway_test_support::{Behaviour, MockUpstream};
use serde_json::{Value, json};

const KEY: &str = "sk-routing-test";

/// A port that was just free: connecting to it is refused.
fn dead_url() -> String {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    format!("http://{addr}/v1")
}

/// `spool` must outlive the gateway, and be its own: tests run side by side.
async fn start(models: &str, providers: &str, spool: &std::path::Path) -> RunningGateway {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[database]
url = "sqlite::memory:"
spool_dir = "{spool}"
[observability]
log_level = "error"
{providers}
{models}
[[projects]]
name = "p"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]
"#,
        hash = gateway_access::hash_key(KEY),
        spool = spool.display(),
    );
    let config = GatewayConfig::parse(&text, &|_| None).unwrap();
    RunningGateway::start(config).await.unwrap()
}

fn provider(name: &str, url: &str) -> String {
    format!(
        "[[providers]]\nname = \"{name}\"\nkind = \"openai\"\nbase_urls = [\"{url}\"]\ntimeout_secs = 5\n"
    )
}

async fn chat(gateway: &RunningGateway, alias: &str, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/chat/completions",
            gateway.local_addr()
        ))
        .bearer_auth(KEY);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request
        .json(&json!({"model": alias, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn fallback_chain_rescues_a_dead_provider() {
    let up = MockUpstream::start().await.unwrap();
    let providers = provider("dead", &dead_url()) + &provider("live", &up.base_url());
    let models = r#"
[[models]]
alias = "resilient"
targets = [{ provider = "dead", model = "first" }]
fallbacks = ["backup"]

[[models]]
alias = "backup"
targets = [{ provider = "live", model = "second" }]

[[models]]
alias = "strict"
targets = [{ provider = "dead", model = "first" }]
fallbacks = ["backup"]
fallback_on = ["timeout"]
"#;
    let spool = tempfile::tempdir().unwrap();
    let gateway = start(models, &providers, spool.path()).await;
    let response = chat(&gateway, "resilient", &[]).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "second", "served by the fallback");

    // `strict` falls back on timeouts only: a refused connection is the client's answer.
    let response = chat(&gateway, "strict", &[]).await;
    assert_eq!(response.status(), 502);
    assert_eq!(up.stats().chat_requests, 1);
    gateway.shutdown().await;
}

#[tokio::test]
async fn client_errors_never_fall_back() {
    let up = MockUpstream::start().await.unwrap();
    let providers = provider("live", &up.base_url());
    let models = r#"
[[models]]
alias = "a"
targets = [{ provider = "live", model = "one" }, { provider = "live", model = "two" }]
fallbacks = ["b"]

[[models]]
alias = "b"
targets = [{ provider = "live", model = "three" }]
"#;
    let spool = tempfile::tempdir().unwrap();
    let gateway = start(models, &providers, spool.path()).await;
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", gateway.local_addr()))
        .bearer_auth(KEY)
        .json(&json!({"model": "a", "messages": [{"role": "user", "content": "[[mock status=400]]"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        up.stats().chat_requests,
        1,
        "a 400 is not retried elsewhere"
    );
    // A 503 moves on: the other target of the alias, then the fallback, all answer 503; the
    // last target is then retried until it has had `max_attempts` (3) calls.
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", gateway.local_addr()))
        .bearer_auth(KEY)
        .json(&json!({"model": "a", "messages": [{"role": "user", "content": "[[mock status=503]]"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        up.stats().chat_requests,
        1 + 5,
        "three targets, the last of them called three times, for the 503"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn sticky_callers_stay_on_one_variant() {
    let up = MockUpstream::start().await.unwrap();
    let providers = provider("live", &up.base_url());
    let models = r#"
[[models]]
alias = "split"
sticky = "header:x-session"
targets = [{ provider = "live", model = "blue", weight = 50 }, { provider = "live", model = "green", weight = 50 }]
"#;
    let spool = tempfile::tempdir().unwrap();
    let gateway = start(models, &providers, spool.path()).await;
    let mut seen = std::collections::HashSet::new();
    for session in 0..20 {
        let session = format!("s-{session}");
        let mut models = std::collections::HashSet::new();
        for _ in 0..5 {
            let body: Value = chat(&gateway, "split", &[("x-session", &session)])
                .await
                .json()
                .await
                .unwrap();
            models.insert(body["model"].as_str().unwrap().to_owned());
        }
        assert_eq!(models.len(), 1, "session {session} moved between variants");
        seen.extend(models);
    }
    assert_eq!(seen.len(), 2, "20 sessions all on one variant: not a split");
    gateway.shutdown().await;
}

#[tokio::test]
async fn misbehaving_canary_rolls_itself_back() {
    let stable = MockUpstream::start().await.unwrap();
    let canary = MockUpstream::start().await.unwrap();
    canary.set_behaviour(Behaviour {
        status: Some(500),
        ..Behaviour::default()
    });
    let providers =
        provider("stable", &stable.base_url()) + &provider("canary", &canary.base_url());
    let models = r#"
[[models]]
alias = "release"
targets = [
  { provider = "stable", model = "v1", weight = 50 },
  { provider = "canary", model = "v2", weight = 50, canary = true },
]
[models.canary]
min_requests = 2
max_error_rate = 0.2
window_secs = 60
"#;
    let spool = tempfile::tempdir().unwrap();
    let gateway = start(models, &providers, spool.path()).await;
    for _ in 0..40 {
        // A failed canary attempt moves on to the stable target: clients never see it.
        let response = chat(&gateway, "release", &[]).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["model"], "v1");
    }
    assert_eq!(gateway.routing_stats().canary_rollbacks, 1);
    // Rolled back after its second failure: health ejection alone would have let a third
    // request through.
    assert_eq!(canary.stats().chat_requests, 2);
    gateway.shutdown().await;
}

#[tokio::test]
async fn lowest_cost_follows_the_price_table() {
    let up = MockUpstream::start().await.unwrap();
    let providers = provider("dear", &up.base_url())
        + &provider("cheap", &up.base_url())
        + r#"
[[prices]]
provider = "dear"
model = "big"
input_per_million = "2.50"
output_per_million = "10.00"

[[prices]]
provider = "cheap"
model = "small"
input_per_million = "0.15"
output_per_million = "0.60"
"#;
    let models = r#"
[[models]]
alias = "thrifty"
strategy = "lowest-cost"
targets = [{ provider = "dear", model = "big" }, { provider = "cheap", model = "small" }]
"#;
    let spool = tempfile::tempdir().unwrap();
    let gateway = start(models, &providers, spool.path()).await;
    for _ in 0..5 {
        let body: Value = chat(&gateway, "thrifty", &[]).await.json().await.unwrap();
        assert_eq!(body["model"], "small");
    }
    gateway.shutdown().await;

    // Money is never a float: a TOML number for a price is refused with its path.
    let bad = provider("cheap", &up.base_url())
        + "[[prices]]\nprovider = \"cheap\"\nmodel = \"small\"\ninput_per_million = 0.15\noutput_per_million = \"0.6\"\n";
    let text = format!(
        "{bad}\n[[models]]\nalias = \"x\"\ntargets = [{{ provider = \"cheap\", model = \"small\" }}]\n"
    );
    let err = GatewayConfig::parse(&text, &|_| None).unwrap_err();
    assert!(
        err.errors()
            .iter()
            .any(|e| e.starts_with("prices[0].input_per_million")),
        "{:?}",
        err.errors()
    );
}
