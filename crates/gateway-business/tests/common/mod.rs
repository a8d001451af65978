//! Shared by the spool tests: throwaway databases, records, and waiting for the writer.

#![allow(
    dead_code,
    reason = "each test crate uses a different part of the helpers"
)]

use gateway_business::{DatabaseConfig, StartedRequest, UsageRecord, UsageWriter, WriterStats};
use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use uuid::Uuid;

/// The Postgres server tests use: `GATEWAY_TEST_POSTGRES_URL` or the machine's local one.
pub fn postgres_admin_url() -> String {
    std::env::var("GATEWAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The URL of a database named `gw_test_...` that does not exist yet, and its name.
pub fn unborn_postgres_database() -> (String, String) {
    let admin = postgres_admin_url();
    let name = format!("gw_test_{}", Uuid::now_v7().simple());
    let (base, _) = admin.rsplit_once('/').unwrap();
    (format!("{base}/{name}"), name)
}

pub async fn create_postgres_database(name: &str) {
    let pool = sqlx::PgPool::connect(&postgres_admin_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

/// A fresh, empty Postgres database of its own, as the gateway-bin tests make them.
pub async fn fresh_postgres_database() -> String {
    let (url, name) = unborn_postgres_database();
    create_postgres_database(&name).await;
    url
}

pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("usage.db").display())
}

/// A writer config for tests: short windows, so tests run fast.
pub fn config(url: &str, spool: &Path) -> DatabaseConfig {
    DatabaseConfig {
        url: url.to_owned(),
        spool_dir: spool.to_owned(),
        spool_fsync_ms: 10,
        flush_interval_ms: 10,
        batch_size: 100,
        ..DatabaseConfig::default()
    }
}

pub fn record(id: Uuid) -> UsageRecord {
    UsageRecord {
        request_id: id,
        created_at: OffsetDateTime::now_utc(),
        project: Some("team-a".into()),
        key_id: Some("a-key".into()),
        tags: r#"{"team":"a"}"#.into(),
        alias: Some("chat".into()),
        provider: Some("upstream".into()),
        upstream_model: Some("mock-model".into()),
        attempts: 1,
        status: 200,
        error_type: None,
        input_tokens: Some(10),
        output_tokens: Some(5),
        cached_tokens: Some(0),
        reasoning_tokens: Some(0),
        usage_source: Some(Cow::Borrowed("vendor")),
        elapsed_ms: 12.5,
        ttft_ms: Some(3.0),
        streamed: false,
        client_aborted: false,
        vendor_response_id: Some(format!("resp-{id}")),
        vendor_request_id: None,
        cache_write_tokens: Some(0),
        cost: None,
    }
}

pub fn started(id: Uuid) -> StartedRequest<'static> {
    StartedRequest {
        request_id: id,
        received_at: OffsetDateTime::now_utc(),
        project: Some("team-a"),
        key_id: Some("a-key"),
        tags: r#"{"team":"a"}"#,
        alias: Some("chat"),
        streamed: true,
    }
}

/// Polls the writer's stats until `done` holds; fails after 30 s.
pub async fn wait_for(writer: &UsageWriter, what: &str, done: impl Fn(&WriterStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = writer.stats();
        if done(&stats) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One row of `usage_events`, the columns these tests look at.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Row {
    pub request_id: String,
    pub status: i32,
    pub error_type: Option<String>,
    pub usage_source: Option<String>,
    pub output_tokens: Option<i64>,
}

pub async fn rows(url: &str) -> Vec<Row> {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let rows = sqlx::query_as(
            "SELECT request_id, status, error_type, usage_source, output_tokens FROM usage_events",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows = sqlx::query_as(
            "SELECT request_id::text AS request_id, status, error_type, usage_source, output_tokens \
             FROM usage_events",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows
    }
}

/// Segment files in the spool directory.
pub fn segments(spool: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(spool)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    files.sort();
    files
}
