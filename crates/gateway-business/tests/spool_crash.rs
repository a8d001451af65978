//! `kill -9` while records are spooled and shipped loses at most the last fsync window.
//!
//! The test runs its own executable again as a child (switched on by an environment
//! variable). The child appends requests as fast as it can, ships them to SQLite, and reports
//! on stderr how many entries are durable; the parent SIGKILLs it mid-flight, recovers the
//! spool with a new writer, and checks that every entry reported durable before the kill is in
//! the database, exactly once, and that the requests cut off became interrupted rows.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use common::*;
use gateway_business::UsageWriter;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use uuid::Uuid;

const CHILD_SPOOL: &str = "GW_SPOOL_CRASH_CHILD_SPOOL";
const CHILD_DB: &str = "GW_SPOOL_CRASH_CHILD_DB";
const CHILD_TAG: &str = "GW_SPOOL_CRASH_CHILD_TAG";

/// Request `i` of a run: the tag keeps runs apart.
fn request_id(tag: u64, i: u64) -> Uuid {
    Uuid::from_u64_pair(tag, i)
}

/// Every tenth request starts and never finishes (as if it were in flight at the crash).
fn finishes(i: u64) -> bool {
    i % 10 != 9
}

/// The entries the child appends, in order: `(request, is_finish)`.
fn entries(count: u64) -> impl Iterator<Item = (u64, bool)> {
    (0..)
        .flat_map(|i| std::iter::once((i, false)).chain(finishes(i).then_some((i, true))))
        .take(usize::try_from(count).unwrap())
}

/// Not a test of its own: the child process of the test below. Without its environment
/// variables it returns at once.
#[test]
fn crash_child() {
    let (Ok(spool), Ok(db), Ok(tag)) = (
        std::env::var(CHILD_SPOOL),
        std::env::var(CHILD_DB),
        std::env::var(CHILD_TAG),
    ) else {
        return;
    };
    let tag: u64 = tag.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut config = config(&db, Path::new(&spool));
        config.spool_fsync_ms = 20;
        // Small segments: the kill also lands while shipped segments are being removed.
        config.spool_segment_bytes = 64 * 1024;
        let (recorder, writer) = UsageWriter::spawn(config);
        let mut stderr = std::io::stderr();
        let mut i = 0;
        let mut reported = 0;
        loop {
            for _ in 0..50 {
                let id = request_id(tag, i);
                assert!(recorder.request_started(&started(id)));
                if finishes(i) {
                    assert!(recorder.record(&record(id)));
                }
                i += 1;
            }
            let stats = writer.stats();
            if stats.durable != reported {
                reported = stats.durable;
                writeln!(
                    stderr,
                    "durable {} written {}",
                    stats.durable, stats.written
                )
                .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
}

fn parse(line: &str) -> Option<(u64, u64)> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("durable"), Some(durable), Some("written"), Some(written)) => {
            Some((durable.parse().ok()?, written.parse().ok()?))
        }
        _ => None,
    }
}

#[test]
fn kill_9_loses_at_most_the_last_fsync_window() {
    if std::env::var(CHILD_SPOOL).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let db = sqlite_url(dir.path());
    let tag = Uuid::now_v7().as_u64_pair().0;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_SPOOL, &spool)
        .env(CHILD_DB, &db)
        .env(CHILD_TAG, tag.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, reports) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    // Let it run until many groups are durable and shipping is under way, then kill it.
    let mut durable = loop {
        let Ok(line) = reports.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            panic!("the child stopped reporting");
        };
        if let Some((reported, written)) = parse(&line)
            && reported >= 20_000
            && written > 0
        {
            break reported;
        }
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    // Reports still in the pipe were made before the kill: they count too.
    for line in reports.try_iter() {
        if let Some((reported, _)) = parse(&line) {
            durable = durable.max(reported);
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stats = runtime.block_on(async {
        let (_recorder, writer) = UsageWriter::spawn(config(&db, &spool));
        wait_for(&writer, "the spool drained", |s| {
            s.spool_open && s.spool_entries == 0
        })
        .await;
        writer.shutdown(Duration::from_secs(10)).await
    });
    let rows = runtime.block_on(rows(&db));
    let by_id: HashMap<Uuid, &Row> = rows
        .iter()
        .map(|row| (row.request_id.parse().unwrap(), row))
        .collect();
    assert_eq!(by_id.len(), rows.len(), "one row per request");
    assert!(by_id.keys().all(|id| id.as_u64_pair().0 == tag));

    let mut finished_durable = HashMap::new();
    for (i, finish) in entries(durable) {
        *finished_durable.entry(i).or_insert(false) |= finish;
    }
    let mut interrupted = 0;
    for (&i, &finished) in &finished_durable {
        let Some(row) = by_id.get(&request_id(tag, i)) else {
            panic!("request {i} was durable before the kill but is not in the database");
        };
        if finished {
            assert_eq!(row.status, 200, "request {i}");
        } else if !finishes(i) {
            interrupted += 1;
            assert_eq!(
                (
                    row.status,
                    row.error_type.as_deref(),
                    row.usage_source.as_deref()
                ),
                (0, Some("interrupted"), None),
                "request {i}"
            );
        }
    }
    assert!(interrupted > 500, "{interrupted}");
    assert!(
        stats.interrupted >= 1,
        "the requests open at the kill were recovered: {stats:?}"
    );
    // What the database holds beyond the durable prefix came from the last window at most.
    let beyond = rows.len() - finished_durable.len();
    eprintln!(
        "durable entries {durable}, rows {}, interrupted {interrupted}, rows past the prefix {beyond}",
        rows.len()
    );
    assert!(
        beyond < 5_000,
        "{beyond} rows past the reported durable prefix"
    );
}
