//! Keys kept in the database, across two real `gateway` processes sharing one Postgres: a key
//! made with the CLI works on both, through every key header, limited to its models; revoked,
//! both refuse it within 5 s (the time is measured and printed); rotated, old and new both
//! work until the grace ends; expired, it is refused. The admin API takes its own token only
//! (a project key is refused there) and creates, lists and revokes keys over HTTP. A client
//! that keeps presenting bad keys gets 429. The CLI is also run against SQLite, the default
//! store, and a gateway without an admin token keeps its admin API closed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a test that cannot go on should fail on the spot; measured times are printed"
)]

mod common;
mod process;

use common::fresh_postgres_database;
use gateway_test_support::MockUpstream;
use process::{GatewayProcess, free_port, gateway_cli, gateway_cli_status, output_field};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "keys-test-admin-token";
const CONFIG_KEY: &str = "sk-config-key-of-team-a";
/// The bar: a revoked key is refused by every replica within this long.
const REVOCATION_BAR: Duration = Duration::from_secs(5);

/// `max_failures` bounds the refused keys per client IP and minute; the replicas test sees
/// many refusals on purpose (waiting for a revocation), so it sets it high.
fn config_text(
    upstream: &str,
    database_url: &str,
    port: u16,
    admin: u16,
    max_failures: u32,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
admin_token = "${{GATEWAY_ADMIN_TOKEN}}"
key_refresh_ms = 500
[server.auth_failures]
max_failures = {max_failures}
window_secs = 60
[database]
url = "{database_url}"
spool_dir = "spool"
[observability]
log_level = "error"
access_log = false

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{upstream}"]

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[models]]
alias = "other"
targets = [{{ provider = "up", model = "m2" }}]

[[projects]]
name = "team-a"
api_keys = [{{ id = "cfg", sha256 = "{hash}" }}]
"#,
        hash = gateway_access::hash_key(CONFIG_KEY),
    )
}

/// Runs `gateway --config CONFIG ARGS...`; returns stdout, or panics with stderr on failure.
fn cli(config: &Path, args: &[&str]) -> String {
    gateway_cli(config, &[("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)], args)
}

fn cli_status(config: &Path, args: &[&str]) -> (bool, String, String) {
    gateway_cli_status(config, &[("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)], args)
}

fn field(output: &str, name: &str) -> String {
    output_field(output, name)
}

struct Replica {
    _process: GatewayProcess,
    url: String,
    admin: String,
}

async fn start_replica(dir: &Path, upstream: &str, database_url: &str) -> Replica {
    let (port, admin) = (free_port(), free_port());
    let config = config_text(upstream, database_url, port, admin, 1_000_000);
    let process =
        GatewayProcess::start_with_env(dir, port, &config, &[("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)])
            .await;
    Replica {
        url: process.url.clone(),
        _process: process,
        admin: format!("http://127.0.0.1:{admin}"),
    }
}

/// The status of a chat request with `key` sent in `header` (`authorization` gets `Bearer`).
async fn chat_status(url: &str, header: &str, key: &str, model: &str) -> u16 {
    let value = if header == "authorization" {
        format!("Bearer {key}")
    } else {
        key.to_owned()
    };
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header(header, value)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn status_with(url: &str, key: &str) -> u16 {
    chat_status(url, "authorization", key, "chat").await
}

/// Waits until every replica answers `want` for `key`; returns how long that took.
async fn until_all(replicas: &[&Replica], key: &str, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for replica in replicas {
            all &= status_with(&replica.url, key).await == want;
        }
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "replicas did not all answer {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn admin_call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_keys_across_two_replicas_on_postgres() {
    let database_url = fresh_postgres_database().await;
    let upstream = MockUpstream::start().await.unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // The CLI runs with the first replica's config (same database).
    std::fs::write(
        dirs[0].path().join("gateway.toml"),
        config_text(&upstream.base_url(), &database_url, 1, 2, 1_000_000),
    )
    .unwrap();
    let config = dirs[0].path().join("gateway.toml");
    let created = cli(
        &config,
        &[
            "keys",
            "create",
            "--project",
            "team-a",
            "--models",
            "chat",
            "--name",
            "ci",
        ],
    );
    let (key_id, secret) = (field(&created, "key_id"), field(&created, "secret"));
    assert!(
        secret.starts_with("sk-gw-") && secret.len() >= 6 + 32,
        "{secret}"
    );

    let a = start_replica(dirs[0].path(), &upstream.base_url(), &database_url).await;
    let b = start_replica(dirs[1].path(), &upstream.base_url(), &database_url).await;
    let both = [&a, &b];
    until_all(&both, &secret, 200, Duration::from_secs(10)).await;

    // Every key header, on both replicas; the key's models narrow the project's.
    for replica in both {
        for header in ["authorization", "x-api-key", "api-key"] {
            assert_eq!(
                chat_status(&replica.url, header, &secret, "chat").await,
                200,
                "{header}"
            );
        }
        assert_eq!(
            chat_status(&replica.url, "authorization", &secret, "other").await,
            404
        );
        assert_eq!(
            chat_status(&replica.url, "authorization", CONFIG_KEY, "other").await,
            200
        );
        let models: Value = reqwest::Client::new()
            .get(format!("{}/v1/models", replica.url))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["chat"]);
    }

    // The list shows the key, never its secret.
    let listed = cli(
        &config,
        &["keys", "list", "--project", "team-a", "--format", "json"],
    );
    assert!(listed.contains(&key_id), "{listed}");
    assert!(
        !listed.contains(&secret[6..]),
        "the secret leaked into the list"
    );
    let table = cli(&config, &["keys", "list"]);
    assert!(table.contains(&key_id) && table.contains("cfg"), "{table}");

    // Revoked with the CLI: both replicas refuse it within the bar.
    cli(&config, &["keys", "revoke", &key_id]);
    let took = until_all(&both, &secret, 401, REVOCATION_BAR).await;
    println!("revoked key refused by both replicas after {took:?} (key_refresh_ms = 500)");
    assert!(took < REVOCATION_BAR);

    // Rotated with a grace: old and new both work, then only the new one.
    let first = cli(&config, &["keys", "create", "--project", "team-a"]);
    let (old_id, old_secret) = (field(&first, "key_id"), field(&first, "secret"));
    until_all(&both, &old_secret, 200, Duration::from_secs(5)).await;
    let rotated = cli(&config, &["keys", "rotate", &old_id, "--grace", "4s"]);
    let rotated_at = Instant::now();
    let new_secret = field(&rotated, "secret");
    assert_ne!(new_secret, old_secret);
    until_all(&both, &new_secret, 200, Duration::from_secs(5)).await;
    if rotated_at.elapsed() < Duration::from_secs(3) {
        for replica in both {
            assert_eq!(status_with(&replica.url, &old_secret).await, 200);
        }
    }
    let took = until_all(&both, &old_secret, 401, Duration::from_secs(10)).await;
    let grace_end = rotated_at.elapsed();
    println!("rotated key refused {grace_end:?} after rotation (grace 4 s; waited {took:?})");
    assert!(
        grace_end >= Duration::from_secs(3),
        "refused before its grace ended: {grace_end:?}"
    );
    until_all(&both, &new_secret, 200, Duration::from_secs(1)).await;

    // Expired: refused on the clock, with no change in the database.
    let expiring = cli(
        &config,
        &["keys", "create", "--project", "team-a", "--expires", "3s"],
    );
    let expiring_secret = field(&expiring, "secret");
    let made = Instant::now();
    until_all(&both, &expiring_secret, 200, Duration::from_secs(3)).await;
    until_all(&both, &expiring_secret, 401, Duration::from_secs(10)).await;
    // The expiry was set inside the CLI, a little before `made`.
    assert!(
        made.elapsed() >= Duration::from_secs(1),
        "refused before expiry"
    );

    // The admin API: its own token only.
    let keys_url = format!("{}/admin/keys", a.admin);
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    assert_eq!(
        admin_call(get.clone(), format!("{}/healthz", a.admin), None, None)
            .await
            .0,
        200
    );
    let (status, body) = admin_call(get.clone(), keys_url.clone(), None, None).await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"].is_string(), "{body}");
    let (status, body) = admin_call(get.clone(), keys_url.clone(), Some(CONFIG_KEY), None).await;
    assert_eq!(status, 403, "a project key is refused: {body}");
    assert_eq!(body["error"]["code"], "project_key_refused");
    let (status, _) = admin_call(get.clone(), keys_url.clone(), Some(&new_secret), None).await;
    assert_eq!(status, 403, "a database project key is refused too");
    let (status, _) = admin_call(get.clone(), keys_url.clone(), Some("wrong"), None).await;
    assert_eq!(status, 401);
    let (status, body) = admin_call(
        get.clone(),
        format!("{}/config", a.admin),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body["version"].is_string(), "{body}");
    let (status, body) = admin_call(
        get.clone(),
        format!("{}/policy", a.admin),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        body["auth"]["database_keys"]["keys"].as_u64().unwrap() >= 1,
        "{body}"
    );

    // Create, list, revoke over HTTP.
    let (status, created) = admin_call(
        post.clone(),
        keys_url.clone(),
        Some(ADMIN_TOKEN),
        Some(json!({"project": "team-a", "name": "http", "models": ["chat"], "expires": "1d"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let http_secret = created["secret"].as_str().unwrap().to_owned();
    let http_id = created["key"]["key_id"].as_str().unwrap().to_owned();
    assert_eq!(created["key"]["status"], "active");
    until_all(&both, &http_secret, 200, Duration::from_secs(5)).await;
    let (status, listed) = admin_call(
        get.clone(),
        format!("{keys_url}?project=team-a"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let text = listed.to_string();
    assert!(text.contains(&http_id), "{text}");
    assert!(
        !text.contains(&http_secret[6..]),
        "a secret leaked into the list"
    );
    let (status, projects) = admin_call(
        get.clone(),
        format!("{}/admin/projects", a.admin),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(projects["projects"][0]["name"], "team-a");
    assert_eq!(projects["projects"][0]["config_keys"], 1);
    assert_eq!(projects["projects"][0]["database_keys"], 2, "{projects}");
    let (status, revoked) = admin_call(
        post.clone(),
        format!("{keys_url}/{http_id}/revoke"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["key"]["status"], "revoked");
    let took = until_all(&both, &http_secret, 401, REVOCATION_BAR).await;
    println!("key revoked over the admin API refused by both replicas after {took:?}");

    // Bad input: 400 in OpenAI's format; unknown ids 404; a second revoke 409.
    for (body, param) in [
        (json!({"project": "nope"}), "project"),
        (json!({"project": "team-a", "models": ["ghost"]}), "models"),
        (json!({"project": "team-a", "expires": "soon"}), "expires"),
    ] {
        let (status, error) = admin_call(
            post.clone(),
            keys_url.clone(),
            Some(ADMIN_TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param);
    }
    let (status, _) = admin_call(
        post.clone(),
        keys_url.clone(),
        Some(ADMIN_TOKEN),
        Some(json!({"project": "team-a", "colour": "red"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = admin_call(
        post.clone(),
        format!("{keys_url}/key_nope/revoke"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = admin_call(
        post.clone(),
        format!("{keys_url}/{http_id}/revoke"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 409);

    // Rotation over HTTP.
    let (status, rotated) = admin_call(
        post.clone(),
        format!("{keys_url}/{}/rotate", field(&rotated, "key_id")),
        Some(ADMIN_TOKEN),
        Some(json!({"grace": "1h"})),
    )
    .await;
    assert_eq!(status, 201, "{rotated}");
    let newest = rotated["secret"].as_str().unwrap().to_owned();
    until_all(&both, &newest, 200, Duration::from_secs(5)).await;
    until_all(&both, &new_secret, 200, Duration::from_secs(1)).await;

    // Usage and budgets read the database.
    let today = time::OffsetDateTime::now_utc().date();
    let (status, usage) = admin_call(
        get.clone(),
        format!(
            "{}/admin/usage?from={today}&to={today}&group_by=project,model",
            a.admin
        ),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{usage}");
    let (status, _) = admin_call(
        get.clone(),
        format!("{}/admin/usage?from=yesterday&to={today}", a.admin),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, budgets) = admin_call(
        get.clone(),
        format!("{}/admin/budgets", a.admin),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(budgets["budgets"].is_array());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_keys_on_sqlite_and_a_closed_admin_api() {
    let upstream = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("gateway.db").display());
    let spool = format!("spool_dir = \"{}\"", dir.path().join("spool").display());
    let text = config_text(&upstream.base_url(), &database_url, 0, 0, 1_000_000)
        .replace("admin_token = \"${GATEWAY_ADMIN_TOKEN}\"\n", "")
        .replace("spool_dir = \"spool\"", &spool);
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, &text).unwrap();

    let (ok, _, stderr) = cli_status(&config, &["keys", "create", "--project", "nope"]);
    assert!(
        !ok && stderr.contains("no project named `nope`"),
        "{stderr}"
    );
    let (ok, _, stderr) = cli_status(
        &config,
        &["keys", "create", "--project", "team-a", "--models", "ghost"],
    );
    assert!(!ok && stderr.contains("ghost"), "{stderr}");

    let created = cli(
        &config,
        &["keys", "create", "--project", "team-a", "--expires", "90d"],
    );
    let (key_id, secret) = (field(&created, "key_id"), field(&created, "secret"));
    let rotated = cli(&config, &["keys", "rotate", &key_id, "--grace", "1h"]);
    let new_id = field(&rotated, "key_id");
    let listed: Value =
        serde_json::from_str(&cli(&config, &["keys", "list", "--format", "json"])).unwrap();
    let keys = listed.as_array().unwrap();
    assert_eq!(
        keys.len(),
        3,
        "the config key and two database keys: {listed}"
    );
    let old = keys
        .iter()
        .find(|k| k["key_id"] == key_id.as_str())
        .unwrap();
    assert_eq!(old["rotated_to"], new_id.as_str());
    assert_eq!(old["status"], "active");
    assert!(
        old["display_prefix"]
            .as_str()
            .unwrap()
            .starts_with("sk-gw-")
    );
    assert!(!listed.to_string().contains(&secret[6..]));

    // A gateway on the same SQLite file accepts the rotated pair, then refuses the revoked one.
    let gateway = gateway_bin::RunningGateway::start_from_file(&config)
        .await
        .unwrap();
    let url = format!("http://{}", gateway.local_addr());
    let new_secret = field(&rotated, "secret");
    let started = Instant::now();
    while status_with(&url, &new_secret).await != 200 || status_with(&url, &secret).await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "keys never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cli(&config, &["keys", "revoke", &key_id]);
    let (ok, _, stderr) = cli_status(&config, &["keys", "revoke", &key_id]);
    assert!(!ok && stderr.contains("already revoked"), "{stderr}");
    let started = Instant::now();
    while status_with(&url, &secret).await != 401 {
        assert!(
            started.elapsed() < REVOCATION_BAR,
            "revoked key still served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_with(&url, &new_secret).await, 200);

    // No admin token configured: every admin route but /healthz is closed, and says why.
    let admin = format!("http://{}", gateway.admin_addr().unwrap());
    let (status, body) = admin_call(
        reqwest::Method::GET,
        format!("{admin}/config"),
        Some("anything"),
        None,
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("admin_token"),
        "{body}"
    );
    let (status, _) =
        admin_call(reqwest::Method::GET, format!("{admin}/healthz"), None, None).await;
    assert_eq!(status, 200);
    gateway.shutdown().await;
}

#[tokio::test]
async fn repeated_auth_failures_from_one_ip_get_429() {
    let upstream = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("gateway.db").display());
    let spool = format!("spool_dir = \"{}\"", dir.path().join("spool").display());
    let text = config_text(&upstream.base_url(), &database_url, 0, 0, 5)
        .replace("admin_token = \"${GATEWAY_ADMIN_TOKEN}\"\n", "")
        .replace("spool_dir = \"spool\"", &spool);
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, &text).unwrap();
    let gateway = gateway_bin::RunningGateway::start_from_file(&config)
        .await
        .unwrap();
    let url = format!("http://{}", gateway.local_addr());
    for _ in 0..5 {
        assert_eq!(status_with(&url, "sk-gw-made-up").await, 401);
    }
    // A good key from the same address is not even looked at until the window ends.
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CONFIG_KEY)
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((55..=60).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid API keys")
    );
    // Public paths stay open to it.
    let health = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    gateway.shutdown().await;
}
