//! The spooled write path against real SQLite and Postgres: outages, restarts, torn tails,
//! a full spool, interrupted requests, and a checkpoint that waits for the commit.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use common::*;
use gateway_business::{UsageStore, UsageWriter};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use uuid::Uuid;

const GRACE: Duration = Duration::from_secs(10);

/// Appends `count` requests (a start and a finish each) and returns their ids; the time the
/// whole run took is checked by the callers that care.
fn produce(recorder: &gateway_business::UsageRecorder, count: usize) -> Vec<Uuid> {
    (0..count)
        .map(|_| {
            let id = Uuid::now_v7();
            assert!(recorder.request_started(&started(id)));
            assert!(recorder.record(&record(id)));
            id
        })
        .collect()
}

fn ids(rows: &[Row]) -> HashSet<Uuid> {
    rows.iter()
        .map(|row| row.request_id.parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_created_later_receives_every_record() {
    // The database does not exist while records are produced: nothing may wait for it, and
    // every record lands once it is there.
    let (url, name) = unborn_postgres_database();
    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(&url, spool.path()));
    let started_at = Instant::now();
    let produced = produce(&recorder, 500);
    assert!(
        started_at.elapsed() < Duration::from_millis(500),
        "producing 1000 entries took {:?}",
        started_at.elapsed()
    );
    wait_for(&writer, "everything durable", |s| s.durable == 1000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = writer.stats();
    assert_eq!((stats.written, stats.spool_entries), (0, 1000), "{stats:?}");
    assert!(stats.oldest_unshipped_ms >= 300, "{stats:?}");
    assert!(stats.spool_bytes > 0);

    create_postgres_database(&name).await;
    wait_for(&writer, "everything shipped", |s| {
        s.spool_open && s.spool_entries == 0
    })
    .await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!(stats.written, 500);
    assert_eq!(
        (stats.dropped, stats.dropped_markers, stats.interrupted),
        (0, 0, 0)
    );
    assert_eq!((stats.spool_bytes, stats.oldest_unshipped_ms), (0, 0));
    let rows = rows(&url).await;
    assert_eq!(rows.len(), 500);
    assert_eq!(ids(&rows), produced.into_iter().collect());
    assert!(
        rows.iter()
            .all(|r| r.status == 200 && r.output_tokens == Some(5))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_spooled_against_a_closed_port_ship_to_the_real_database_after_a_restart() {
    let spool = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: every connection attempt fails at once.
    let (recorder, writer) =
        UsageWriter::spawn(config("postgres://postgres@127.0.0.1:1/none", spool.path()));
    let produced = produce(&recorder, 300);
    wait_for(&writer, "everything durable", |s| s.durable == 600).await;
    let stopping = Instant::now();
    let stats = writer.shutdown(GRACE).await;
    // At most the connection attempt under way (the pool gives up after 5 s), not the grace.
    assert!(
        stopping.elapsed() < Duration::from_secs(7),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(
        (stats.written, stats.dropped),
        (0, 0),
        "nothing is lost at shutdown"
    );
    assert_eq!(stats.spool_entries, 600);
    assert!(
        !recorder.record(&record(Uuid::now_v7())),
        "a stopped writer refuses"
    );

    let url = fresh_postgres_database().await;
    let (_recorder, writer) = UsageWriter::spawn(config(&url, spool.path()));
    wait_for(&writer, "the backlog shipped", |s| {
        s.spool_open && s.spool_entries == 0
    })
    .await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!((stats.written, stats.interrupted), (300, 0));
    assert_eq!(ids(&rows(&url).await), produced.into_iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_that_becomes_reachable_receives_every_record() {
    let dir = tempfile::tempdir().unwrap();
    // The database's directory cannot be created while a file stands in its place.
    let blocker = dir.path().join("db");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let url = sqlite_url(&blocker);
    let (recorder, writer) = UsageWriter::spawn(config(&url, &dir.path().join("spool")));
    let produced = produce(&recorder, 200);
    wait_for(&writer, "failed connects", |s| s.durable == 400).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(writer.stats().written, 0);
    std::fs::remove_file(&blocker).unwrap();
    wait_for(&writer, "everything shipped", |s| {
        s.spool_open && s.spool_entries == 0
    })
    .await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!(stats.written, 200);
    assert_eq!(ids(&rows(&url).await), produced.into_iter().collect());
}

/// A writer dropped without shutdown (a crash), then a new one on the same spool: every record
/// lands exactly once. Then a crash that lost the checkpoint too: everything is shipped again,
/// and the database still keeps one row per request.
async fn restart_ships_exactly_once(url: &str) {
    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    let mut produced = produce(&recorder, 300);
    wait_for(&writer, "first half shipped", |s| {
        s.written == 300 && s.spool_entries == 0
    })
    .await;
    produced.extend(produce(&recorder, 300));
    wait_for(&writer, "second half durable", |s| s.durable == 1200).await;
    drop(writer);

    let (_recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    wait_for(&writer, "the rest shipped", |s| {
        s.spool_open && s.spool_entries == 0
    })
    .await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!(
        stats.interrupted, 0,
        "every start had its finish: {stats:?}"
    );
    assert!(
        stats.written <= 300,
        "the first half is not shipped again: {stats:?}"
    );
    let shipped = rows(url).await;
    assert_eq!(shipped.len(), 600);
    assert_eq!(ids(&shipped), produced.iter().copied().collect());

    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    produced.extend(produce(&recorder, 100));
    wait_for(&writer, "shipped", |s| {
        s.written == 100 && s.spool_entries == 0
    })
    .await;
    drop(writer);
    std::fs::remove_file(spool.path().join("checkpoint")).unwrap();
    let (_recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    wait_for(&writer, "reshipped", |s| {
        s.spool_open && s.spool_entries == 0 && s.written == 100
    })
    .await;
    writer.shutdown(GRACE).await;
    let rows = rows(url).await;
    assert_eq!(rows.len(), 700);
    assert_eq!(ids(&rows), produced.into_iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_ships_exactly_once_to_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    restart_ships_exactly_once(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_ships_exactly_once_to_postgres() {
    restart_ships_exactly_once(&fresh_postgres_database().await).await;
}

/// Requests that started but never finished before a crash become interrupted rows, once.
async fn interrupted_requests_become_rows(url: &str) {
    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    // Shipped before the crash: their open starts travel in the checkpoint.
    let early: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    for (i, id) in early.iter().enumerate() {
        recorder.request_started(&started(*id));
        if i % 3 != 0 {
            recorder.record(&record(*id));
        }
    }
    wait_for(&writer, "early shipped", |s| {
        s.written == 6 && s.spool_entries == 0
    })
    .await;
    // Still in the spool at the crash.
    let late: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    for id in &late {
        recorder.request_started(&started(*id));
    }
    recorder.record(&record(late[0]));
    wait_for(&writer, "late durable", |s| s.durable == 10 + 6 + 5 + 1).await;
    drop(writer);

    let (_recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    wait_for(&writer, "recovered", |s| {
        s.spool_open && s.spool_entries == 0 && s.interrupted == 8
    })
    .await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!(stats.interrupted, 4 + 4, "{stats:?}");
    let rows = rows(url).await;
    assert_eq!(rows.len(), 15);
    let interrupted: HashSet<Uuid> = rows
        .iter()
        .filter(|r| r.status == 0)
        .inspect(|r| {
            assert_eq!(r.error_type.as_deref(), Some("interrupted"));
            assert_eq!((r.usage_source.as_deref(), r.output_tokens), (None, None));
        })
        .map(|r| r.request_id.parse().unwrap())
        .collect();
    let expected: HashSet<Uuid> = early.iter().step_by(3).chain(&late[1..]).copied().collect();
    assert_eq!(interrupted, expected);

    // Recovered once: a further restart finds nothing open.
    let (_recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    wait_for(&writer, "opened", |s| s.spool_open).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!((stats.interrupted, stats.written), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_requests_become_rows_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    interrupted_requests_become_rows(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_requests_become_rows_in_postgres() {
    interrupted_requests_become_rows(&fresh_postgres_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_truncated_and_everything_before_it_ships() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let closed = "postgres://postgres@127.0.0.1:1/none";
    let (recorder, writer) = UsageWriter::spawn(config(closed, &spool));
    let produced = produce(&recorder, 100);
    wait_for(&writer, "durable", |s| s.durable == 200).await;
    drop(writer);
    // A crash in the middle of a group write: half an entry, then the zeros a filesystem may
    // show for blocks it allocated but never wrote.
    let last = segments(&spool).pop().unwrap();
    let intact = std::fs::metadata(&last).unwrap().len();
    let data = std::fs::read(&last).unwrap();
    let mut torn = data[data.len() - 200..data.len() - 100].to_vec();
    torn.extend_from_slice(&[0; 4096]);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut file, &torn).unwrap();
    drop(file);

    // Recovery with the database still away: the tail is cut, the entries before it counted.
    let (_recorder, writer) = UsageWriter::spawn(config(closed, &spool));
    wait_for(&writer, "recovered", |s| {
        s.spool_open && s.spool_entries == 200
    })
    .await;
    assert_eq!(
        std::fs::metadata(&last).unwrap().len(),
        intact,
        "tail truncated"
    );
    writer.shutdown(GRACE).await;

    let url = sqlite_url(dir.path());
    let (_recorder, writer) = UsageWriter::spawn(config(&url, &spool));
    wait_for(&writer, "shipped", |s| s.spool_open && s.spool_entries == 0).await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!((stats.written, stats.spool_errors), (100, 0), "{stats:?}");
    assert_eq!(ids(&rows(&url).await), produced.into_iter().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_drops_the_newest_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let closed = "postgres://postgres@127.0.0.1:1/none";
    let mut small = config(closed, &spool);
    small.spool_max_bytes = 64 * 1024;
    small.spool_segment_bytes = 16 * 1024;
    let (recorder, writer) = UsageWriter::spawn(small.clone());
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut recording = Duration::ZERO;
    for _ in 0..20 {
        for _ in 0..100 {
            let id = Uuid::now_v7();
            let started_at = Instant::now();
            let taken = recorder.record(&record(id));
            recording += started_at.elapsed();
            if taken {
                accepted.push(id);
            } else {
                refused += 1;
            }
        }
        // Separate fsync groups, so the spool rotates segments.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert!(
        recording < Duration::from_millis(500),
        "a full spool never blocks: {recording:?}"
    );
    assert!(refused > 0 && accepted.len() > 50, "{refused} refused");
    wait_for(&writer, "durable", |s| s.durable == accepted.len() as u64).await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!(stats.dropped, refused);
    assert_eq!(stats.queued, accepted.len() as u64);
    // Within the cap, give or take the 8-byte headers of the segments it started.
    assert!(
        stats.spool_total_bytes <= small.spool_max_bytes + 64,
        "{stats:?}"
    );
    assert!(segments(&spool).len() > 1, "the spool rotated segments");

    // What was accepted (the oldest) ships; the refused newest never existed.
    let url = sqlite_url(dir.path());
    small.url = url.clone();
    let (_recorder, writer) = UsageWriter::spawn(small);
    wait_for(&writer, "shipped", |s| s.spool_open && s.spool_entries == 0).await;
    let stats = writer.shutdown(GRACE).await;
    assert_eq!(stats.written, accepted.len() as u64);
    assert_eq!(ids(&rows(&url).await), accepted.into_iter().collect());
    assert_eq!(segments(&spool).len(), 1, "shipped segments are removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_moves_only_after_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let url = sqlite_url(dir.path());
    let checkpoint = spool.join("checkpoint");
    // A database that is up but refuses every insert, until the trigger is dropped.
    let store = UsageStore::connect(&config(&url, &spool)).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse BEFORE INSERT ON usage_events \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(&pool)
    .await
    .unwrap();

    let (recorder, writer) = UsageWriter::spawn(config(&url, &spool));
    let produced = produce(&recorder, 50);
    wait_for(&writer, "failed writes", |s| {
        s.durable == 100 && s.failed_writes >= 2
    })
    .await;
    assert!(!checkpoint.exists(), "no checkpoint before a commit");
    assert_eq!(
        (writer.stats().written, writer.stats().spool_entries),
        (0, 100)
    );
    drop(writer);

    // The next start finds every entry still after the checkpoint.
    let (_recorder, writer) = UsageWriter::spawn(config(&url, &spool));
    wait_for(&writer, "a failed write", |s| {
        s.spool_open && s.failed_writes >= 1
    })
    .await;
    assert_eq!(writer.stats().spool_entries, 100);
    assert!(!checkpoint.exists());

    sqlx::query("DROP TRIGGER refuse")
        .execute(&pool)
        .await
        .unwrap();
    wait_for(&writer, "shipped", |s| s.spool_open && s.spool_entries == 0).await;
    assert!(checkpoint.exists(), "the checkpoint follows the commit");
    let stats = writer.shutdown(GRACE).await;
    assert_eq!(stats.written, 50);
    assert_eq!(ids(&rows(&url).await), produced.into_iter().collect());
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_waits_for_the_spool_lock() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let url = sqlite_url(dir.path());
    let (first_recorder, first) = UsageWriter::spawn(config(&url, &spool));
    let early = produce(&first_recorder, 20);
    wait_for(&first, "first shipped", |s| s.written == 20).await;
    let (second_recorder, second) = UsageWriter::spawn(config(&url, &spool));
    let late = produce(&second_recorder, 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(second.stats().durable, 0, "the spool is the first writer's");
    first.shutdown(GRACE).await;
    wait_for(&second, "second shipped", |s| {
        s.written == 20 && s.spool_entries == 0
    })
    .await;
    second.shutdown(GRACE).await;
    assert_eq!(
        ids(&rows(&url).await),
        early.into_iter().chain(late).collect()
    );
}
