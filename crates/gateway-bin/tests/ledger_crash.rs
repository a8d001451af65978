//! `kill -9` of a real `gateway` process under HTTP load, then a restart on the same spool:
//! every request finished before the last fsync window is in the Postgres ledger, billed to
//! the token as the mock vendor reported it, none twice, and the requests cut off in flight
//! are there as `interrupted` rows rather than missing.

#![allow(
    clippy::unwrap_used,
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
use process::{GatewayProcess, free_port};
use serde_json::json;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

const KEY: &str = "sk-ledger-crash";
const WORKERS: usize = 12;
/// The spool's group-commit interval in this test: the most a `kill -9` may lose.
const FSYNC_MS: u64 = 50;
/// Scheduling room on a loaded 2-core machine between the client seeing the end of a
/// response and the gateway handing its record to the spool writer.
const SLACK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// The whole response arrived, at this instant.
    Completed(Instant, u16),
    /// The connection broke: the process was killed under it.
    Broken,
}

fn config(
    port: u16,
    admin: u16,
    database: &str,
    spool: &std::path::Path,
    upstream: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
shutdown_grace_secs = 10
[database]
url = "{database}"
spool_dir = "{spool}"
spool_fsync_ms = {FSYNC_MS}
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

[[projects]]
name = "crash"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]
"#,
        spool = spool.display(),
        hash = gateway_access::hash_key(KEY),
    )
}

/// Plain answers and slow streams, so that the kill finds requests in every phase.
fn body(worker: usize, i: usize) -> serde_json::Value {
    let text = format!("worker {worker} request {i} {}", "y".repeat(i % 30));
    match i % 3 {
        0 => json!({"model": "chat", "messages": [{"role": "user", "content": text}]}),
        1 => json!({"model": "chat", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": format!("{text} [[mock chunks=8 chunk_delay_ms=25]]")}]}),
        _ => json!({"model": "chat", "stream": true,
            "messages": [{"role": "user", "content": text}]}),
    }
}

async fn drive(
    url: String,
    worker: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<HashMap<Uuid, Outcome>>>,
) {
    let client = reqwest::Client::new();
    let mut i = 0;
    while !stop.load(Ordering::Acquire) {
        let id = Uuid::now_v7();
        sent.lock().unwrap().insert(id, Outcome::Broken);
        let response = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("x-request-id", id.to_string())
            .json(&body(worker, i))
            .send()
            .await;
        i += 1;
        let Ok(response) = response else { continue };
        let status = response.status().as_u16();
        // A stream cut by the kill ends without its [DONE]: only a whole answer counts.
        let Ok(bytes) = response.bytes().await else {
            continue;
        };
        let whole =
            status != 200 || !bytes.starts_with(b"data:") || bytes.ends_with(b"data: [DONE]\n\n");
        if whole {
            sent.lock()
                .unwrap()
                .insert(id, Outcome::Completed(Instant::now(), status));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_only_the_fsync_window_and_counts_nothing_twice() {
    let upstream = MockUpstream::start().await.unwrap();
    let database = fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (port, admin) = (free_port(), free_port());
    let text = config(port, admin, &database, &spool, &upstream.base_url());
    let mut gateway = GatewayProcess::start(dir.path(), port, &text).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(HashMap::new()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|worker| {
            tokio::spawn(drive(
                gateway.url.clone(),
                worker,
                stop.clone(),
                sent.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    gateway.kill_hard();
    let killed_at = Instant::now();
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await.unwrap();
    }
    let sent = std::mem::take(&mut *sent.lock().unwrap());

    // The same spool, a new process: it recovers the spool and ships what the first left.
    let mut restarted = GatewayProcess::start(dir.path(), port, &text).await;
    restarted.stop().await;

    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let rows = sqlx::query(
        "SELECT request_id::text AS id, status::bigint AS status, error_type, \
         input_tokens, output_tokens, usage_source FROM usage_events",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let distinct: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT request_id) FROM usage_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_eq!(usize::try_from(distinct).unwrap(), rows.len());

    let billed: HashMap<String, (u64, u64)> = upstream
        .billed()
        .into_iter()
        .filter_map(|usage| {
            Some((
                usage.client_request_id?,
                (usage.prompt_tokens, usage.completion_tokens),
            ))
        })
        .collect();
    let mut ledger = HashMap::new();
    for row in &rows {
        let id: String = row.get("id");
        let id = Uuid::parse_str(&id).unwrap();
        assert!(sent.contains_key(&id), "a ledger row no client sent: {id}");
        ledger.insert(id, row);
    }

    let (mut completed, mut old_enough, mut lost_young, mut interrupted, mut broken) =
        (0, 0, 0, 0, 0);
    let mut youngest_lost: Option<Duration> = None;
    for (id, outcome) in &sent {
        let row = ledger.get(id);
        match outcome {
            Outcome::Completed(at, status) => {
                completed += 1;
                let age = killed_at.duration_since(*at);
                let finished_row = row.filter(|row| {
                    row.get::<Option<String>, _>("error_type").as_deref() != Some("interrupted")
                });
                let Some(row) = finished_row else {
                    // Finished within the last fsync window (and scheduling slack) of the kill:
                    // the one loss a crash is allowed. Its start marker may have made it to
                    // disk, and then it is in the ledger as interrupted, not missing.
                    assert!(
                        age <= Duration::from_millis(FSYNC_MS) + SLACK,
                        "request {id} finished {age:?} before the kill and is not in the ledger"
                    );
                    lost_young += 1;
                    youngest_lost = Some(youngest_lost.map_or(age, |old| old.max(age)));
                    continue;
                };
                old_enough += 1;
                assert_eq!(row.get::<i64, _>("status"), i64::from(*status), "{id}");
                if *status == 200 {
                    let (prompt, completion) = billed[&id.to_string()];
                    assert_eq!(
                        row.get::<Option<String>, _>("usage_source").as_deref(),
                        Some("vendor"),
                        "{id}"
                    );
                    assert_eq!(
                        row.get::<Option<i64>, _>("input_tokens"),
                        Some(i64::try_from(prompt).unwrap()),
                        "{id}"
                    );
                    assert_eq!(
                        row.get::<Option<i64>, _>("output_tokens"),
                        Some(i64::try_from(completion).unwrap()),
                        "{id}"
                    );
                }
            }
            Outcome::Broken => {
                broken += 1;
                if let Some(row) = row
                    && row.get::<Option<String>, _>("error_type").as_deref() == Some("interrupted")
                {
                    interrupted += 1;
                }
            }
        }
    }
    println!(
        "kill -9 under load: {} requests sent, {completed} completed ({old_enough} in the ledger, \
         {lost_young} finished within {FSYNC_MS} ms + slack of the kill and lost, the oldest of \
         them {youngest_lost:?} before it), {broken} cut off ({interrupted} recorded as interrupted), \
         {} ledger rows",
        sent.len(),
        rows.len()
    );
    assert!(
        completed > 100,
        "only {completed} requests completed before the kill"
    );
    assert!(
        broken > 0 && interrupted > 0,
        "the kill should have cut off requests in flight, recorded as interrupted \
         ({broken} cut off, {interrupted} interrupted rows)"
    );
}
