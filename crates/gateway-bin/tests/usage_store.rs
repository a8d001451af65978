//! Usage records in Postgres, and a database that is down never delays a response.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use common::{Harness, Options, directive, fresh_postgres_database};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn usage_rows_land_in_postgres() {
    let database_url = fresh_postgres_database().await;
    let mut h = Harness::start_with(Options {
        database_url: Some(database_url),
        ..Options::default()
    })
    .await;
    let mut ids = Vec::new();
    for stream in [false, true] {
        let response = h
            .chat(json!({"model": "chat", "stream": stream, "messages": directive("hi")}))
            .await;
        assert_eq!(response.status(), 200);
        ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        response.bytes().await.unwrap();
    }
    let rows = h.finish().await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, stream) in ids
        .iter()
        .zip([false, true])
        .map(|(id, stream)| (rows.iter().find(|r| &r.request_id == id).unwrap(), stream))
    {
        assert_eq!(row.project.as_deref(), Some("team-a"));
        assert_eq!(row.output_tokens, Some(5));
        assert_eq!(row.streamed, stream);
        assert!(row.tags.contains("\"team\""));
    }
}

#[tokio::test]
async fn an_unreachable_database_never_delays_responses() {
    // Nothing listens on port 1: every connection attempt fails at once, over and over.
    let mut h = Harness::start_with(Options {
        database_url: Some("postgres://postgres@127.0.0.1:1/none".into()),
        ..Options::default()
    })
    .await;
    let started = Instant::now();
    for _ in 0..20 {
        let response = h
            .chat(json!({"model": "local", "messages": directive("hi")}))
            .await;
        assert_eq!(response.status(), 200);
    }
    // Generous bound: the point is that no response waited for a database timeout (5 s).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let gateway = h.gateway.take().unwrap();
    assert_eq!(gateway.usage_stats().queued, 20);
    let stats = gateway.shutdown().await;
    assert_eq!(stats.written, 0);
    assert_eq!(stats.dropped, 0, "records stay spooled at shutdown");
    assert_eq!(
        stats.spool_entries, 40,
        "20 records and their start markers"
    );
}

#[tokio::test]
async fn records_wait_for_a_database_that_comes_back() {
    // The database does not exist yet when the gateway starts; it is created while requests
    // flow, and the queued records land once the writer's retry connects.
    let admin_url = std::env::var("GATEWAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("gw_late_{}", uuid::Uuid::now_v7().simple());
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let database_url = format!("{base}/{name}");
    let mut h = Harness::start_with(Options {
        database_url: Some(database_url.clone()),
        ..Options::default()
    })
    .await;
    for _ in 0..5 {
        let response = h
            .chat(json!({"model": "local", "messages": directive("hi")}))
            .await;
        assert_eq!(response.status(), 200);
    }
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while h.gateway.as_ref().unwrap().usage_stats().written < 5 {
        assert!(Instant::now() < deadline, "records never landed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = h.finish().await;
    assert_eq!(rows.len(), 5);
}
