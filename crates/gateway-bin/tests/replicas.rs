//! Three `gateway` processes sharing one Redis enforce one rate limit between them, within 2 %
//! of the configured rate; with that Redis stopped, each falls back to its share of the limit
//! (fail-open), and a fail-closed gateway refuses with 503.
//!
//! The test runs its own `redis-server` on a free port, so it can stop it without disturbing
//! anything else that uses the machine's Redis.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "a test that cannot go on should fail on the spot; the measured rates are printed"
)]

mod process;

use gateway_test_support::MockUpstream;
use process::{GatewayProcess, KillOnDrop, free_port};
use serde_json::json;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const KEY: &str = "sk-replica-test";
/// Requests per minute for the project, shared by every replica.
const LIMIT: u64 = 600;

async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_redis() -> (KillOnDrop, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/services.sh starts the machine's)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until("redis-server", || TcpStream::connect(addr).is_ok()).await;
    (KillOnDrop(child), port)
}

struct Replica {
    _process: GatewayProcess,
    url: String,
    _dir: tempfile::TempDir,
}

async fn start_replica(upstream: &MockUpstream, redis_port: u16, failure_mode: &str) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
[database]
url = "sqlite::memory:"
[observability]
log_level = "error"
access_log = false
[policy]
rate_limit_backend = "redis"
redis_url = "redis://127.0.0.1:{redis_port}"
on_redis_failure = "{failure_mode}"
replicas = 3
# A loaded 2-core CI machine runs three debug builds here: give Redis room to answer.
redis_timeout_ms = 250

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{upstream}"]

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[projects]]
name = "shared"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]
rate_limit = {{ requests_per_minute = {LIMIT} }}
"#,
        upstream = upstream.base_url(),
        hash = gateway_access::hash_key(KEY),
    );
    let process = GatewayProcess::start(dir.path(), port, &config).await;
    Replica {
        url: process.url.clone(),
        _process: process,
        _dir: dir,
    }
}

#[derive(Debug, Default)]
struct Tally {
    admitted: AtomicU64,
    limited: AtomicU64,
    unavailable: AtomicU64,
    other: AtomicU64,
}

/// Drives every replica at once, `per_replica` requests each over 8 connections, and returns
/// the tally and how long the run took from the first request to the last.
async fn drive(replicas: &[Replica], per_replica: u64) -> (Arc<Tally>, Duration) {
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for replica in replicas {
        let remaining = Arc::new(AtomicU64::new(per_replica));
        for _ in 0..8 {
            let (tally, remaining) = (tally.clone(), remaining.clone());
            let url = format!("{}/v1/chat/completions", replica.url);
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let body =
                    json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]});
                while remaining
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let response = client
                        .post(&url)
                        .bearer_auth(KEY)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    let counter = match response.status().as_u16() {
                        200 => &tally.admitted,
                        429 => &tally.limited,
                        503 => &tally.unavailable,
                        _ => &tally.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    response.bytes().await.unwrap();
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    (tally, started.elapsed())
}

/// What a GCRA limit of `LIMIT` per minute with a burst of `LIMIT` admits over `elapsed`.
fn expected(elapsed: Duration) -> f64 {
    LIMIT as f64 + elapsed.as_secs_f64() * LIMIT as f64 / 60.0
}

fn assert_within_2_percent(what: &str, admitted: u64, elapsed: Duration) {
    let expected = expected(elapsed);
    let error = (admitted as f64 - expected).abs() / expected;
    println!(
        "{what}: admitted {admitted}, expected {expected:.1} over {elapsed:?} ({:.2} % off)",
        error * 100.0
    );
    assert!(
        error <= 0.02,
        "{what}: admitted {admitted}, expected {expected:.1} over {elapsed:?} ({:.2} % off)",
        error * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_limit_and_fall_back_when_redis_stops() {
    let upstream = MockUpstream::start().await.unwrap();
    let (redis, redis_port) = start_redis().await;
    let replicas = [
        start_replica(&upstream, redis_port, "fail-open").await,
        start_replica(&upstream, redis_port, "fail-open").await,
        start_replica(&upstream, redis_port, "fail-open").await,
    ];

    // Shared: one limit for all three, whichever replica a request lands on.
    let (tally, elapsed) = drive(&replicas, 500).await;
    let admitted = tally.admitted.load(Ordering::Relaxed);
    assert_eq!(tally.other.load(Ordering::Relaxed), 0, "{tally:?}");
    assert_eq!(tally.unavailable.load(Ordering::Relaxed), 0, "{tally:?}");
    assert_within_2_percent("shared through redis", admitted, elapsed);
    assert_eq!(upstream.stats().chat_requests, admitted);

    // Redis stops: fail-open, each replica enforces its third of the limit on its own.
    drop(redis);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (tally, elapsed) = drive(&replicas, 500).await;
    assert_eq!(tally.other.load(Ordering::Relaxed), 0, "{tally:?}");
    assert_eq!(tally.unavailable.load(Ordering::Relaxed), 0, "{tally:?}");
    assert_within_2_percent(
        "fail-open local shares",
        tally.admitted.load(Ordering::Relaxed),
        elapsed,
    );

    // Fail-closed: with its Redis gone, a gateway refuses rather than admit unchecked.
    let closed = [start_replica(&upstream, redis_port, "fail-closed").await];
    let (tally, _) = drive(&closed, 40).await;
    assert_eq!(tally.unavailable.load(Ordering::Relaxed), 40, "{tally:?}");
}
