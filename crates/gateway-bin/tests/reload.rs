//! Config hot reload end to end: the real gateway following a config file in a temp dir, in
//! front of the mock upstream, which echoes the upstream model it was sent. Each config version
//! maps the alias `chat` to its own upstream model (`v-N`), so a response names the version
//! that served it.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use common::{CLIENT_KEY, UPSTREAM_KEY};
use gateway_bin::{GatewayConfig, ReloadStatus, RunningGateway};
use gateway_test_support::MockUpstream;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The admin API needs a token; this one is only ever used on loopback by this test.
const ADMIN_TOKEN: &str = "reload-test-admin-token";
/// Comfortably above the 200 ms debounce plus a reload, yet short enough for a failing test to
/// say so quickly.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);

struct Version<'a> {
    model: &'a str,
    provider: &'a str,
    listen: &'a str,
    max_body_bytes: usize,
}

impl<'a> Version<'a> {
    fn new(model: &'a str) -> Self {
        Self {
            model,
            provider: "upstream",
            listen: "127.0.0.1:0",
            max_body_bytes: 8 * 1024 * 1024,
        }
    }
}

struct Gw {
    gateway: Option<RunningGateway>,
    base: String,
    admin: String,
    upstream_url: String,
    database_url: String,
    path: PathBuf,
    client: reqwest::Client,
    _upstream: MockUpstream,
    _dir: tempfile::TempDir,
}

impl Gw {
    async fn start(model: &str) -> Self {
        let upstream = MockUpstream::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("usage.db").display());
        let path = dir.path().join("gateway.toml");
        let mut gw = Self {
            gateway: None,
            base: String::new(),
            admin: String::new(),
            upstream_url: upstream.base_url(),
            database_url,
            path,
            client: reqwest::Client::new(),
            _upstream: upstream,
            _dir: dir,
        };
        std::fs::write(&gw.path, gw.text(&Version::new(model))).unwrap();
        let gateway = RunningGateway::start_from_file(&gw.path).await.unwrap();
        gw.base = format!("http://{}", gateway.local_addr());
        gw.admin = format!("http://{}", gateway.admin_addr().unwrap());
        gw.gateway = Some(gateway);
        gw
    }

    /// Sections in the order that makes any prefix of the file either invalid or routed like
    /// the whole file: projects name the alias, so a file cut before the alias's last line
    /// fails; what follows (server, database, logging) cannot change live anyway. A reload
    /// racing an in-place write reads such a prefix.
    fn text(&self, version: &Version<'_>) -> String {
        let spool = format!(
            "{}.spool",
            self.database_url.trim_start_matches("sqlite://")
        );
        format!(
            r#"
[[projects]]
name = "team-a"
api_keys = [{{ id = "a-key", sha256 = "{hash}" }}]
models = ["chat"]

[[providers]]
name = "upstream"
kind = "openai"
base_urls = ["{upstream}"]
api_keys = ["{UPSTREAM_KEY}"]
timeout_secs = 5

[[models]]
alias = "chat"
targets = [{{ provider = "{provider}", model = "{model}" }}]

[server]
listen = "{listen}"
admin_listen = "127.0.0.1:0"
admin_token = "{ADMIN_TOKEN}"
max_body_bytes = {max_body}
shutdown_grace_secs = 5

[database]
url = "{database}"
spool_dir = "{spool}"

[observability]
log_format = "text"
log_level = "warn"
"#,
            hash = gateway_access::hash_key(CLIENT_KEY),
            upstream = self.upstream_url,
            provider = version.provider,
            model = version.model,
            listen = version.listen,
            max_body = version.max_body_bytes,
            database = self.database_url,
            spool = spool,
        )
    }

    fn gateway(&self) -> &RunningGateway {
        self.gateway.as_ref().unwrap()
    }

    /// Writes a temp file in the same directory and renames it over the config, as editors
    /// and deploy tools do: the config file is replaced whole, with a new inode.
    fn replace(&self, text: &str) {
        let tmp = self.path.with_file_name(".gateway.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// Truncates and rewrites the config file in place (same inode).
    fn overwrite(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    async fn chat_model(&self) -> String {
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(CLIENT_KEY)
            .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["model"].as_str().unwrap().to_owned()
    }

    async fn admin_config(&self) -> Value {
        let response = self
            .client
            .get(format!("{}/config", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn wait_for_model(&self, model: &str) {
        let deadline = Instant::now() + APPLY_TIMEOUT;
        loop {
            let served = self.chat_model().await;
            if served == model {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still serving {served}, not {model}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_for_status(&self, what: &str, done: impl Fn(&ReloadStatus) -> bool) {
        let deadline = Instant::now() + APPLY_TIMEOUT;
        loop {
            let status = self.gateway().reload_status();
            if done(&status) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }
}

fn version_of(text: &str) -> String {
    GatewayConfig::parse(text, &|_| None).unwrap().version
}

#[tokio::test]
async fn a_renamed_file_switches_the_alias_and_the_admin_version() {
    let gw = Gw::start("v-1").await;
    let first = gw.text(&Version::new("v-1"));
    assert_eq!(gw.chat_model().await, "v-1");
    let admin = gw.admin_config().await;
    assert_eq!(admin["version"], version_of(&first));
    assert_eq!(admin["reloads"], 0);
    assert_eq!(admin["failed_reloads"], 0);
    let loaded_at = admin["loaded_at"].as_str().unwrap().to_owned();
    assert!(loaded_at.ends_with('Z'), "{loaded_at}");
    let health = gw
        .client
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let second = gw.text(&Version::new("v-2"));
    let started = Instant::now();
    gw.replace(&second);
    gw.wait_for_model("v-2").await;
    assert!(started.elapsed() < Duration::from_secs(2), "{started:?}");

    let admin = gw.admin_config().await;
    assert_eq!(admin["version"], version_of(&second));
    assert_eq!(admin["reloads"], 1);
    assert_eq!(admin["failed_reloads"], 0);
    assert_ne!(admin["loaded_at"], loaded_at.as_str());
    assert_eq!(
        gw.gateway().reload_status().version,
        version_of(&second),
        "the method and the admin API agree"
    );

    // In-place writes are followed too.
    gw.overwrite(&gw.text(&Version::new("v-3")));
    gw.wait_for_model("v-3").await;
    gw.stop().await;
}

#[tokio::test]
async fn invalid_files_keep_the_last_good_config() {
    let gw = Gw::start("v-1").await;
    let good = gw.text(&Version::new("v-1"));
    let good_version = version_of(&good);

    let bad = |model: &'static str| gw.text(&Version::new(model));
    let syntax = format!("{}\n[[models]\nalias = ", bad("bad-syntax"));
    let unknown_key = format!("{}colour = \"blue\"\n", bad("bad-unknown-key"));
    let missing_provider = gw.text(&Version {
        provider: "nowhere",
        ..Version::new("bad-missing-provider")
    });
    let whole = bad("bad-truncated");
    // Cut inside the model's string: what a reader sees halfway through a write.
    let truncated = whole[..whole.find("bad-trunc").unwrap() + 3].to_owned();
    let cases: [(&str, String, bool); 5] = [
        ("syntax error", syntax, true),
        ("unknown key", unknown_key, false),
        ("alias to a missing provider", missing_provider, true),
        ("truncated file", truncated, false),
        ("empty file", String::new(), true),
    ];

    for (expected_failures, (case, text, by_rename)) in (1..).zip(cases) {
        if by_rename {
            gw.replace(&text);
        } else {
            gw.overwrite(&text);
        }
        gw.wait_for_status(case, |status| status.failed_reloads >= expected_failures)
            .await;
        assert_eq!(gw.chat_model().await, "v-1", "{case}: still the last good");
        let admin = gw.admin_config().await;
        assert_eq!(admin["version"], good_version.as_str(), "{case}");
        assert_eq!(admin["reloads"], 0, "{case}");
    }
    // Late events of the bad writes must not have applied anything either.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gw.chat_model().await, "v-1");
    let status = gw.gateway().reload_status();
    assert_eq!(status.version, good_version);
    assert!(status.failed_reloads >= 5, "{status:?}");

    // And the gateway still follows the file once it is valid again.
    gw.replace(&gw.text(&Version::new("v-2")));
    gw.wait_for_model("v-2").await;
    gw.stop().await;
}

#[tokio::test]
async fn settings_fixed_at_start_are_refused_and_the_rest_applied() {
    let gw = Gw::start("v-1").await;
    let text = gw.text(&Version {
        listen: "127.0.0.1:1",
        max_body_bytes: 16,
        ..Version::new("v-2")
    });
    gw.replace(&text);
    // Served on the old address, with the old body limit (the request is far above 16 bytes),
    // by the new route.
    gw.wait_for_model("v-2").await;
    let status = gw.gateway().reload_status();
    assert_eq!(status.version, version_of(&text));
    assert_eq!((status.reloads, status.failed_reloads), (1, 0));
    gw.stop().await;
}

/// SIGHUP is sent with the system's `kill` to this very process: it exercises the real signal
/// wiring, which a test-only trigger would bypass. Safe because the gateway registered its
/// handler before `start_from_file` returned, and tokio keeps it for the process's life.
#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads() {
    let gw = Gw::start("v-1").await;
    let before = gw.gateway().reload_status();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    gw.wait_for_status("SIGHUP reload", |status| status.reloads > before.reloads)
        .await;
    let after = gw.gateway().reload_status();
    assert_eq!(after.version, before.version, "the file did not change");
    assert_eq!(after.failed_reloads, 0);
    assert_eq!(gw.chat_model().await, "v-1");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_never_fail_or_mix_requests() {
    const REWRITES: usize = 100;
    const CLIENTS: usize = 4;
    let gw = Arc::new(Gw::start("v-0").await);
    let mut valid_models: HashSet<String> = HashSet::from(["v-0".to_owned()]);
    let mut invalid_written = 0;

    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let gw = gw.clone();
        let running = running.clone();
        clients.push(tokio::spawn(async move {
            let mut served: BTreeMap<String, usize> = BTreeMap::new();
            let mut failures = Vec::new();
            while running.load(Ordering::Relaxed) {
                let response = gw
                    .client
                    .post(format!("{}/v1/chat/completions", gw.base))
                    .bearer_auth(CLIENT_KEY)
                    .json(
                        &json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
                    )
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status() == 200 => {
                        let body: Value = response.json().await.unwrap();
                        let model = body["model"].as_str().unwrap_or("<none>").to_owned();
                        *served.entry(model).or_default() += 1;
                    }
                    Ok(response) => {
                        let status = response.status();
                        failures.push(format!("{status}: {}", response.text().await.unwrap()));
                    }
                    Err(err) => failures.push(err.to_string()),
                }
            }
            (served, failures)
        }));
    }

    let started = Instant::now();
    let mut last_valid = String::new();
    for i in 1..=REWRITES {
        let model = format!("v-{i}");
        let full = gw.text(&Version::new(&model));
        let text = match i % 10 {
            3 => {
                invalid_written += 1;
                gw.text(&Version {
                    provider: "nowhere",
                    ..Version::new("bad-provider")
                })
            }
            6 => {
                invalid_written += 1;
                full[..full.find("\"v-").unwrap() + 2].to_owned()
            }
            9 => {
                invalid_written += 1;
                format!("{full}\n[[[broken")
            }
            _ => {
                valid_models.insert(model.clone());
                last_valid = model;
                full
            }
        };
        let before = gw.gateway().reload_status();
        if i % 2 == 0 {
            gw.replace(&text);
        } else {
            gw.overwrite(&text);
        }
        // The debounce reads whatever the file holds ~200 ms after a burst, so at full speed
        // which versions it sees is luck of timing. The first 40 rewrites are therefore each
        // waited for (applied or refused) while the load flows; the other 60 come in bursts.
        if i <= 40 {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let now = gw.gateway().reload_status();
                if (now.reloads, now.failed_reloads) != (before.reloads, before.failed_reloads) {
                    break;
                }
                assert!(Instant::now() < deadline, "rewrite {i} was never read");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last_valid, format!("v-{REWRITES}"));
    gw.wait_for_model(&last_valid).await;
    let written_for = started.elapsed();
    // Keep the load on a little longer, across the final reload's aftermath.
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.store(false, Ordering::Relaxed);

    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for client in clients {
        let (client_served, client_failures) = client.await.unwrap();
        for (model, count) in client_served {
            *served.entry(model).or_default() += count;
        }
        failures.extend(client_failures);
    }
    let total: usize = served.values().sum();
    let status = gw.gateway().reload_status();
    eprintln!(
        "{total} requests, {} versions served ({served:?}), {status:?}, rewrites took {written_for:?}",
        served.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total + failures.len(),
        &failures[..failures.len().min(5)]
    );
    for model in served.keys() {
        assert!(
            valid_models.contains(model),
            "served {model}, which no valid version routes to: {served:?}"
        );
    }
    assert_eq!(
        status.version,
        version_of(&gw.text(&Version::new(&last_valid)))
    );
    // Several versions went live while requests were flowing, and bad files were refused.
    assert!(served.len() >= 3, "{served:?}");
    assert!(status.reloads >= 3, "{status:?}");
    assert!(
        status.failed_reloads >= 1,
        "{status:?} ({invalid_written} invalid written)"
    );
    assert!(total >= 100, "only {total} requests in {written_for:?}");
    let gw = Arc::try_unwrap(gw).ok().unwrap();
    gw.stop().await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_configmap_symlink_swap_is_followed() {
    let upstream = MockUpstream::start().await.unwrap();
    let upstream_url = upstream.base_url();
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("usage.db");
    // Built as the kubelet does: gateway.toml -> ..data/gateway.toml, ..data -> ..v1.
    let gw_text = |model: &str| {
        format!(
            r#"
[[projects]]
name = "team-a"
api_keys = [{{ id = "a-key", sha256 = "{hash}" }}]

[[providers]]
name = "upstream"
kind = "openai"
base_urls = ["{upstream}"]
api_keys = ["{UPSTREAM_KEY}"]

[[models]]
alias = "chat"
targets = [{{ provider = "upstream", model = "{model}" }}]

[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[database]
url = "sqlite://{db}"
spool_dir = "{db}.spool"
"#,
            hash = gateway_access::hash_key(CLIENT_KEY),
            upstream = upstream_url,
            db = database.display(),
        )
    };
    let publish = |generation: &str, model: &str| {
        let data = dir.path().join(generation);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("gateway.toml"), gw_text(model)).unwrap();
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(generation, &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
    };
    publish("..v1", "cm-1");
    let config = dir.path().join("gateway.toml");
    std::os::unix::fs::symlink(Path::new("..data").join("gateway.toml"), &config).unwrap();

    let gateway = RunningGateway::start_from_file(&config).await.unwrap();
    let gw = Gw {
        base: format!("http://{}", gateway.local_addr()),
        admin: format!("http://{}", gateway.admin_addr().unwrap()),
        gateway: Some(gateway),
        upstream_url: upstream_url.clone(),
        database_url: String::new(),
        path: config,
        client: reqwest::Client::new(),
        _upstream: upstream,
        _dir: tempfile::tempdir().unwrap(),
    };
    assert_eq!(gw.chat_model().await, "cm-1");
    publish("..v2", "cm-2");
    gw.wait_for_model("cm-2").await;
    gw.stop().await;
    drop(dir);
}
