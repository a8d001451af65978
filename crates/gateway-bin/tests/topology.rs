//! The deployment topology of `deploy/`, on this machine without containers: nginx (the Debian
//! package) in front of two `gateway` processes on loopback that share Postgres and Redis. A
//! rolling restart of both replicas under load fails no request, the ledger in the shared
//! Postgres has every request the clients saw answered, and a key revoked in the shared
//! database is refused by both replicas (and so through nginx) within 5 s.
//!
//! nginx runs with the proxy settings of `deploy/nginx/nginx.conf` (its `location /` block is
//! copied from that file, so the test exercises what is shipped).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]
#![allow(
    clippy::print_stdout,
    reason = "the test prints its figures so a run can be compared with the next"
)]

mod common;
mod process;

use common::fresh_postgres_database;
use gateway_test_support::MockUpstream;
use process::{GatewayProcess, free_port, gateway_cli, output_field};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEY: &str = "sk-topology-test";
const WORKERS: usize = 8;

fn gateway_config(port: u16, admin: u16, database: &str, spool: &Path, upstream: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
shutdown_grace_secs = 20
# Every client here, nginx included, is 127.0.0.1: the polls for the new and the revoked key
# would be throttled as one attacker's failures.
[server.auth_failures]
max_failures = 0
[database]
url = "{database}"
spool_dir = "{spool}"
[observability]
log_level = "warn"
access_log = false
[policy]
rate_limit_backend = "redis"
redis_url = "redis://127.0.0.1:6379"

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{upstream}"]

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[projects]]
name = "topology"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]
# Shared through Redis by both replicas; high enough never to refuse this test's load.
rate_limit = {{ requests_per_minute = 1000000 }}
"#,
        spool = spool.display(),
        hash = gateway_access::hash_key(KEY),
    )
}

/// The shipped `location / { ... }` block of deploy/nginx/nginx.conf.
fn shipped_location_block() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx/nginx.conf");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text
        .find("location / {")
        .expect("nginx.conf has a `location /` block");
    let mut depth = 0;
    for (offset, char) in text[start..].char_indices() {
        match char {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return text[start..=start + offset].to_owned();
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces in {}", path.display());
}

/// nginx in the foreground with everything (pid, logs, temp files) in `dir`.
struct Nginx {
    child: Child,
    url: String,
}

impl Nginx {
    async fn start(dir: &Path, backends: &[u16]) -> Self {
        let binary = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
            .expect("nginx is required (Debian package nginx-light; .ci/run installs it)");
        let port = free_port();
        let servers: String = backends
            .iter()
            .map(|port| format!("        server 127.0.0.1:{port} max_fails=0;\n"))
            .collect();
        let prefix = dir.display();
        let config = format!(
            r#"
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream gateway {{
{servers}        keepalive 64;
        keepalive_timeout 5s;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 8m;
        {location}
    }}
}}
"#,
            location = shipped_location_block(),
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nginx did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, url }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until every base URL answers `want` to a chat request with `key`; returns how long.
async fn until_every(urls: &[&str], key: &str, want: u16, limit: Duration) -> Duration {
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let mut all = true;
        let mut seen = Vec::new();
        for url in urls {
            let status = client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status();
            all &= status.as_u16() == want;
            seen.push(status.as_u16());
        }
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not every replica answered {want} within {limit:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failures: BTreeMap<String, u64>,
    request_ids: Vec<String>,
}

fn body(worker: usize, i: usize) -> serde_json::Value {
    let content = format!("worker {worker} request {i}");
    if i.is_multiple_of(2) {
        json!({"model": "chat", "messages": [{"role": "user", "content": content}]})
    } else {
        // Streams long enough to be in flight when a replica is told to stop.
        json!({"model": "chat", "stream": true, "messages": [{"role": "user",
            "content": format!("{content} [[mock chunks=6 chunk_delay_ms=30]]")}]})
    }
}

async fn drive(url: String, worker: usize, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let client = reqwest::Client::new();
    let mut i = 0;
    while !stop.load(Ordering::Acquire) {
        let outcome = async {
            let response = client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(KEY)
                .json(&body(worker, i))
                .send()
                .await
                .map_err(|err| format!("send: {err}"))?;
            let status = response.status();
            let id = response
                .headers()
                .get("x-request-id")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let bytes = response
                .bytes()
                .await
                .map_err(|err| format!("body: {err}"))?;
            if status != 200 {
                return Err(format!("status {status}"));
            }
            let text = String::from_utf8_lossy(&bytes);
            if text.starts_with("data:") && !text.ends_with("data: [DONE]\n\n") {
                return Err("stream cut short".to_owned());
            }
            if text.contains("\"error\"") {
                return Err(format!("error in body: {text}"));
            }
            id.ok_or_else(|| "no x-request-id".to_owned())
        }
        .await;
        i += 1;
        let mut tally = tally.lock().unwrap();
        match outcome {
            Ok(id) => {
                tally.ok += 1;
                tally.request_ids.push(id);
            }
            Err(failure) => *tally.failures.entry(failure).or_default() += 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_behind_nginx_fails_no_request() {
    let upstream = MockUpstream::start().await.unwrap();
    let database = fresh_postgres_database().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<(u16, u16)> = (0..2).map(|_| (free_port(), free_port())).collect();
    let configs: Vec<String> = ports
        .iter()
        .zip(&dirs)
        .map(|((port, admin), dir)| {
            gateway_config(
                *port,
                *admin,
                &database,
                &dir.path().join("spool"),
                &upstream.base_url(),
            )
        })
        .collect();
    let mut replicas = Vec::new();
    for ((port, _), (dir, config)) in ports.iter().zip(dirs.iter().zip(&configs)) {
        replicas.push(GatewayProcess::start(dir.path(), *port, config).await);
    }
    let nginx = Nginx::start(dirs[2].path(), &[ports[0].0, ports[1].0]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|worker| {
            tokio::spawn(drive(
                nginx.url.clone(),
                worker,
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The rolling restart: one replica at a time is stopped (SIGTERM: drain) and started
    // again on the same port, while the other carries the load.
    for (index, replica) in replicas.iter_mut().enumerate() {
        let before = tally.lock().unwrap().ok;
        replica.stop().await;
        let (dir, config) = (&dirs[index], &configs[index]);
        *replica = GatewayProcess::start(dir.path(), ports[index].0, config).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = tally.lock().unwrap().ok;
        assert!(
            after > before,
            "no request was served while replica {index} restarted"
        );
    }
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();

    // A key made in the shared database works on both replicas behind nginx; revoked, it is
    // refused by both within the 5 s the issue allows.
    let created = gateway_cli(
        &replicas[0].config,
        &[],
        &["keys", "create", "--project", "topology"],
    );
    let (key_id, secret) = (
        output_field(&created, "key_id"),
        output_field(&created, "secret"),
    );
    let urls = [
        replicas[0].url.as_str(),
        replicas[1].url.as_str(),
        nginx.url.as_str(),
    ];
    until_every(&urls, &secret, 200, Duration::from_secs(10)).await;
    gateway_cli(&replicas[1].config, &[], &["keys", "revoke", &key_id]);
    let revoked_in = until_every(&urls, &secret, 401, Duration::from_secs(5)).await;
    println!("a revoked key was refused by both replicas and through nginx after {revoked_in:.2?}");

    for replica in &mut replicas {
        replica.stop().await;
    }
    drop(nginx);
    // What nginx saw go wrong, summarised, for when the assertion below fails.
    let nginx_log = std::fs::read_to_string(dirs[2].path().join("error.log")).unwrap_or_default();
    let mut nginx_errors: BTreeMap<String, u64> = BTreeMap::new();
    for line in nginx_log.lines() {
        // "2026/11/21 12:00:00 [error] 1#1: *5 connect() failed (111: ...) while ..., client: ..."
        let message = line.split_once(": *").map_or(line, |(_, rest)| rest);
        let message = message.split_once(' ').map_or(message, |(_, rest)| rest);
        let message = message.split(", client:").next().unwrap_or(message);
        *nginx_errors.entry(message.to_owned()).or_default() += 1;
    }

    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let ledger = common::read_usage(&database).await;
    let recorded: std::collections::HashSet<&str> =
        ledger.iter().map(|row| row.request_id.as_str()).collect();
    let missing = tally
        .request_ids
        .iter()
        .filter(|id| !recorded.contains(id.as_str()))
        .count();
    println!(
        "rolling restart behind nginx: {} requests answered in {elapsed:.1?}, failures {:?}, \
         {} ledger rows, {missing} answered requests missing from the ledger; nginx logged \
         {nginx_errors:?}",
        tally.ok,
        tally.failures,
        ledger.len()
    );
    assert!(tally.ok > 200, "only {} requests went through", tally.ok);
    assert!(
        tally.failures.is_empty(),
        "requests failed during the rolling restart: {:?}",
        tally.failures
    );
    assert_eq!(
        missing, 0,
        "answered requests missing from the shared ledger"
    );
}
