//! The Postgres ledger against ground truth through a 30 s database outage: a gateway under a
//! mixed load (plain and streamed answers, abandoned streams, fallbacks, retries, errors)
//! loses no usage row, duplicates none, and bills to the token what the mock vendors reported.

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

use common::fresh_postgres_database;
use futures_util::StreamExt;
use gateway_bin::{GatewayConfig, RunningGateway};
use gateway_test_support::{Behaviour, BilledUsage, MockStats, MockUpstream};
use serde_json::{Value, json};
use sqlx::Row;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const KEY: &str = "sk-ledger-truth";
/// The outage the issue asks for.
const OUTAGE: Duration = Duration::from_secs(30);
const WORKERS: usize = 8;

/// A TCP proxy in front of Postgres that can be "stopped": live connections are cut and new
/// ones are accepted and dropped at once, which the client sees as a dead server.
struct DbProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Bumped on each stop; every connection task watches it and cuts itself.
    generation: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DbProxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0_u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (up, generation) = (up.clone(), generation.clone());
            let (accepted, refused, cut) = (accepted.clone(), refused.clone(), cut.clone());
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    if !up.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::Relaxed);
                        drop(client);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let mut stopped = generation.subscribe();
                    let cut = cut.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = stopped.changed() => {
                                cut.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Both sockets drop here: the gateway's connection dies mid-whatever.
                    });
                }
            }
        });
        Self {
            addr,
            up,
            generation,
            accepted,
            refused,
            cut,
            task,
        }
    }

    fn stop(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|generation| *generation += 1);
    }

    fn start_again(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// What the test asks for, and so what the ledger row must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// JSON on `chat` (served by the primary).
    Plain,
    /// JSON on `shaky`: its first target always answers 503, so it falls back.
    PlainFallback,
    /// A stream read to the end, with `include_usage`.
    StreamUsage,
    /// A stream read to the end without `include_usage`, on `fallback` (a dead port first).
    StreamNoUsage,
    /// A stream on `shaky` (503 then fallback), with `include_usage`.
    StreamFallback,
    /// A slow stream the client drops after its first chunk; the gateway drains it.
    Abandoned,
    /// A slow stream the client drops after its first chunk, which the vendor then resets: the
    /// vendor never sends its usage.
    AbandonedReset,
    /// A stream the vendor resets after two chunks while the client reads.
    Reset,
    /// A vendor 400: no retry, no fallback, no usage.
    BadRequest,
    /// 503 from every target, retried until it fails for good.
    Unavailable,
}

/// One slot per kind, the common ones more often; every worker walks it from its own offset.
const MIX: [Kind; 16] = [
    Kind::Plain,
    Kind::StreamUsage,
    Kind::PlainFallback,
    Kind::StreamNoUsage,
    Kind::Abandoned,
    Kind::Plain,
    Kind::StreamFallback,
    Kind::Reset,
    Kind::StreamUsage,
    Kind::BadRequest,
    Kind::Plain,
    Kind::AbandonedReset,
    Kind::StreamNoUsage,
    Kind::PlainFallback,
    Kind::Abandoned,
    Kind::Unavailable,
];

#[derive(Debug)]
struct Sent {
    request_id: String,
    kind: Kind,
    status: u16,
}

fn body(kind: Kind, worker: usize, i: usize) -> Value {
    // Varied lengths, so the prompt tokens differ from request to request.
    let text = format!(
        "worker {worker} request {i} {}",
        "x".repeat((worker * 7 + i) % 40)
    );
    let (model, stream, usage, directive) = match kind {
        Kind::Plain => ("chat", false, false, ""),
        Kind::PlainFallback => ("shaky", false, false, ""),
        Kind::StreamUsage => ("chat", true, true, ""),
        Kind::StreamNoUsage => ("fallback", true, false, ""),
        Kind::StreamFallback => ("shaky", true, true, ""),
        Kind::Abandoned => (
            "chat",
            true,
            i.is_multiple_of(2),
            "[[mock chunks=12 chunk_delay_ms=15]]",
        ),
        Kind::AbandonedReset => (
            "chat",
            true,
            true,
            "[[mock chunks=12 chunk_delay_ms=15 reset_after_chunks=6]]",
        ),
        Kind::Reset => ("chat", true, true, "[[mock chunks=6 reset_after_chunks=2]]"),
        Kind::BadRequest => ("chat", false, false, "[[mock status=400]]"),
        Kind::Unavailable => ("chat", false, false, "[[mock status=503]]"),
    };
    let mut body = json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": format!("{text} {directive}")}],
    });
    if usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn send(client: &reqwest::Client, url: &str, kind: Kind, worker: usize, i: usize) -> Sent {
    let response = client
        .post(url)
        .bearer_auth(KEY)
        .json(&body(kind, worker, i))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{kind:?}: no x-request-id"))
        .to_str()
        .unwrap()
        .to_owned();
    match kind {
        Kind::Abandoned | Kind::AbandonedReset if status == 200 => {
            let mut chunks = response.bytes_stream();
            let _first = chunks.next().await;
            // Dropping the body here closes the connection: the client has gone away.
        }
        // A stream the vendor resets ends with an error event: the body still ends cleanly.
        _ => {
            let _ignored = response.bytes().await;
        }
    }
    Sent {
        request_id,
        kind,
        status,
    }
}

fn config(
    database_url: &str,
    spool: &std::path::Path,
    primary: &MockUpstream,
    secondary: &MockUpstream,
    flaky: &MockUpstream,
    dead_port: u16,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 10
[database]
url = "{database_url}"
spool_dir = "{spool}"
flush_interval_ms = 50
[observability]
log_level = "off"
access_log = false
[policy]
stream_drain_secs = 10
[policy.retry]
backoff_base_ms = 10
backoff_max_ms = 50
budget_percent = 100
# The injected 503s would open the breakers of the good providers too, and the load would turn
# into local 503 `circuit_open` answers: this test is about the ledger, so every call goes out.
[policy.breaker]
enabled = false

[[providers]]
name = "primary"
kind = "openai"
base_urls = ["{primary}"]
timeout_secs = 10

[[providers]]
name = "secondary"
kind = "openai"
base_urls = ["{secondary}"]
timeout_secs = 10

[[providers]]
name = "flaky"
kind = "openai"
base_urls = ["{flaky}"]
timeout_secs = 10

[[providers]]
name = "dead"
kind = "openai"
base_urls = ["http://127.0.0.1:{dead_port}/v1"]
timeout_secs = 10

[[models]]
alias = "chat"
strategy = "priority"
targets = [{{ provider = "primary", model = "m" }}, {{ provider = "secondary", model = "m" }}]

[[models]]
alias = "shaky"
strategy = "priority"
targets = [{{ provider = "flaky", model = "m" }}, {{ provider = "secondary", model = "m" }}]

[[models]]
alias = "fallback"
strategy = "priority"
targets = [{{ provider = "dead", model = "m" }}, {{ provider = "secondary", model = "m" }}]

[[prices]]
provider = "primary"
model = "m"
input_per_million = "1"
output_per_million = "2"

[[prices]]
provider = "secondary"
model = "m"
input_per_million = "1"
output_per_million = "2"

[[projects]]
name = "p"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]
"#,
        spool = spool.display(),
        primary = primary.base_url(),
        secondary = secondary.base_url(),
        flaky = flaky.base_url(),
        hash = gateway_access::hash_key(KEY),
    )
}

struct LedgerRow {
    request_id: String,
    status: i64,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    usage_source: Option<String>,
}

async fn ledger(pool: &sqlx::PgPool) -> Vec<LedgerRow> {
    sqlx::query(
        "SELECT request_id::text AS request_id, status::bigint AS status, \
         input_tokens::bigint AS input_tokens, output_tokens::bigint AS output_tokens, \
         usage_source FROM usage_events",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|row| LedgerRow {
        request_id: row.get("request_id"),
        status: row.get("status"),
        input_tokens: row.get("input_tokens"),
        output_tokens: row.get("output_tokens"),
        usage_source: row.get("usage_source"),
    })
    .collect()
}

async fn ledger_count(pool: &sqlx::PgPool) -> i64 {
    // Before the migrations ran the table does not exist yet: count that as empty.
    sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

fn add(total: &mut MockStats, stats: MockStats) {
    total.prompt_tokens_billed += stats.prompt_tokens_billed;
    total.completion_tokens_billed += stats.completion_tokens_billed;
    total.chat_requests += stats.chat_requests;
    total.streams_completed += stats.streams_completed;
    total.streams_aborted += stats.streams_aborted;
    total.resets += stats.resets;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_matches_vendor_usage_through_a_database_outage() {
    let database_url = fresh_postgres_database().await;
    let (server_url, database) = database_url.rsplit_once('/').unwrap();
    let authority = server_url
        .rsplit_once('@')
        .map_or(server_url, |(_, host)| host);
    let pg_addr: SocketAddr = tokio::net::lookup_host(authority)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = DbProxy::start(pg_addr).await;
    let (user, _) = server_url.rsplit_once('@').unwrap();
    let proxied_url = format!("{user}@{}/{database}", proxy.addr);

    let primary = MockUpstream::start().await.unwrap();
    let secondary = MockUpstream::start().await.unwrap();
    let flaky = MockUpstream::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Behaviour {
            status: Some(503),
            ..Behaviour::default()
        },
    )
    .await
    .unwrap();
    // A port nothing listens on: bound, then released.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spool = tempfile::tempdir().unwrap();
    let text = config(
        &proxied_url,
        spool.path(),
        &primary,
        &secondary,
        &flaky,
        dead_port,
    );
    let gateway = RunningGateway::start(GatewayConfig::parse(&text, &|_| None).unwrap())
        .await
        .unwrap();
    let url = format!("http://{}/v1/chat/completions", gateway.local_addr());
    let direct = sqlx::PgPool::connect(&database_url).await.unwrap();

    // The load: every worker sends until told to stop, a short pause between requests.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (stop, sent, url) = (stop.clone(), sent.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let kind = MIX[(worker + i) % MIX.len()];
                let record = send(&client, &url, kind, worker, i).await;
                sent.lock().unwrap().push(record);
                i += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_outage = ledger_count(&direct).await;
    proxy.stop();
    let stopped_at = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    let during_outage = ledger_count(&direct).await;
    proxy.start_again();
    println!(
        "outage {:?}: ledger {before_outage} rows before, {during_outage} at its end",
        stopped_at.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    // Shut down at once: abandoned streams may still be drained in the background for their
    // usage, and a graceful shutdown must wait for them before it closes the writer.
    let shutdown_started = Instant::now();
    let writer = gateway.shutdown().await;
    println!("shutdown took {:?}", shutdown_started.elapsed());

    // The ledger stops growing: two equal counts in a row (and the expected one, or 15 s).
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = -1;
    loop {
        let count = ledger_count(&direct).await;
        if count == last && (count == sent.len() as i64 || Instant::now() > deadline) {
            break;
        }
        last = count;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows = ledger(&direct).await;
    direct.close().await;

    // The spool lost nothing and shipped everything at shutdown.
    assert_eq!(writer.dropped, 0, "{writer:?}");
    assert_eq!(writer.dropped_markers, 0, "{writer:?}");
    assert_eq!(writer.spool_errors, 0, "{writer:?}");
    assert_eq!(
        writer.spool_entries, 0,
        "nothing left unshipped: {writer:?}"
    );
    assert!(
        writer.failed_writes > 0,
        "the outage never reached the shipper: {writer:?}"
    );

    // 0 lost, 0 duplicated: one row per request sent, under the id the client got.
    let mut sent_ids = HashMap::new();
    for record in &sent {
        assert!(
            sent_ids
                .insert(record.request_id.as_str(), record)
                .is_none(),
            "the gateway gave two requests the id {}",
            record.request_id
        );
    }
    let mut row_ids = HashSet::new();
    for row in &rows {
        assert!(
            row_ids.insert(row.request_id.as_str()),
            "duplicate row {}",
            row.request_id
        );
        let record = sent_ids
            .get(row.request_id.as_str())
            .unwrap_or_else(|| panic!("row {} was never sent", row.request_id));
        assert_eq!(
            row.status,
            i64::from(record.status),
            "{:?} {}",
            record.kind,
            row.request_id
        );
    }
    let lost: Vec<_> = sent
        .iter()
        .filter(|record| !row_ids.contains(record.request_id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} requests without a row: {lost:?}",
        lost.len()
    );
    assert_eq!(rows.len(), sent.len());
    assert_eq!(writer.queued, sent.len() as u64, "{writer:?}");

    // Ground truth: what the vendors reported, request by request. The gateway sends its
    // request id upstream as `x-client-request-id`, which the mock logs with each report.
    let mut vendor_total = MockStats::default();
    let mut billed: HashMap<String, BilledUsage> = HashMap::new();
    for mock in [&primary, &secondary, &flaky] {
        add(&mut vendor_total, mock.stats());
        for usage in mock.billed() {
            let id = usage.client_request_id.clone().unwrap();
            assert!(
                !billed.contains_key(&id),
                "the vendors billed request {id} twice"
            );
            billed.insert(id, usage);
        }
    }
    let (mut vendor_input, mut vendor_output) = (0_i64, 0_i64);
    let mut estimates = 0;
    for row in &rows {
        let kind = sent_ids[row.request_id.as_str()].kind;
        match row.usage_source.as_deref() {
            Some("vendor") => {
                let usage = billed.get(&row.request_id).unwrap_or_else(|| {
                    panic!("{kind:?} {}: vendor usage no vendor sent", row.request_id)
                });
                assert_eq!(
                    (row.input_tokens, row.output_tokens),
                    (
                        Some(usage.prompt_tokens as i64),
                        Some(usage.completion_tokens as i64)
                    ),
                    "{kind:?} {}",
                    row.request_id
                );
                vendor_input += row.input_tokens.unwrap();
                vendor_output += row.output_tokens.unwrap();
            }
            // The gateway's own count, for a stream whose usage chunk never came: here the
            // vendor reset the stream (the client had read part of it, or had already gone and
            // the gateway was draining it), so the gateway bills the prompt estimate and the
            // completion it saw, flagged 'estimate'.
            Some("estimate") => {
                estimates += 1;
                assert!(
                    matches!(kind, Kind::Reset | Kind::AbandonedReset),
                    "{kind:?} {}: estimated although the vendor reported usage",
                    row.request_id
                );
                assert!(
                    !billed.contains_key(&row.request_id),
                    "{kind:?} {}: estimated although the vendor billed it",
                    row.request_id
                );
            }
            other => {
                assert_eq!(other, None);
                assert_ne!(
                    row.status, 200,
                    "{kind:?} {}: served, no usage",
                    row.request_id
                );
                assert!(
                    !billed.contains_key(&row.request_id),
                    "{kind:?} {}",
                    row.request_id
                );
            }
        }
    }
    assert_eq!(
        billed.len(),
        rows.iter()
            .filter(|row| row.usage_source.as_deref() == Some("vendor"))
            .count(),
        "every vendor report has its vendor row"
    );
    assert_eq!(
        (vendor_input, vendor_output),
        (
            vendor_total.prompt_tokens_billed as i64,
            vendor_total.completion_tokens_billed as i64
        ),
        "ledger vs vendor tokens"
    );

    // The mix really happened: every kind got the answer it was made for, at least once.
    for kind in MIX {
        let expected = match kind {
            Kind::BadRequest => 400,
            Kind::Unavailable => 503,
            _ => 200,
        };
        assert!(
            sent.iter()
                .any(|record| record.kind == kind && record.status == expected),
            "no {kind:?} request got {expected}"
        );
    }

    let mut by_kind: BTreeMap<String, (usize, BTreeMap<u16, usize>)> = BTreeMap::new();
    for record in &sent {
        let entry = by_kind.entry(format!("{:?}", record.kind)).or_default();
        entry.0 += 1;
        *entry.1.entry(record.status).or_default() += 1;
    }
    println!(
        "sent {} requests, {} rows ({} vendor, {estimates} estimate, {} without usage)",
        sent.len(),
        rows.len(),
        billed.len(),
        rows.len() - billed.len() - estimates
    );
    for (kind, (count, statuses)) in &by_kind {
        println!("  {kind}: {count} {statuses:?}");
    }
    println!(
        "tokens: ledger vendor input {vendor_input} output {vendor_output} = mock billed {} / {}",
        vendor_total.prompt_tokens_billed, vendor_total.completion_tokens_billed
    );
    println!(
        "mock: {} chat requests, {} streams completed, {} aborted, {} resets",
        vendor_total.chat_requests,
        vendor_total.streams_completed,
        vendor_total.streams_aborted,
        vendor_total.resets
    );
    println!("writer: {writer:?}");
    println!(
        "proxy: {} connections, {} cut, {} refused",
        proxy.accepted.load(Ordering::Relaxed),
        proxy.cut.load(Ordering::Relaxed),
        proxy.refused.load(Ordering::Relaxed)
    );
}
