//! Test harness: the real gateway (as `gateway serve` builds it) in front of the mock upstream.

#![allow(
    dead_code,
    reason = "each test crate uses a different part of the harness"
)]

use futures_util::StreamExt;
use gateway_bin::{GatewayConfig, RunningGateway};
use gateway_test_support::MockUpstream;
use std::path::PathBuf;

pub const CLIENT_KEY: &str = "sk-test-client";
pub const UPSTREAM_KEY: &str = "sk-upstream-secret";

pub struct Harness {
    pub gateway: Option<RunningGateway>,
    pub base: String,
    pub upstream: MockUpstream,
    pub database_url: String,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

pub struct Options {
    pub database_url: Option<String>,
    pub max_body_bytes: usize,
    pub timeout_secs: u64,
    pub stream_drain_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            database_url: None,
            max_body_bytes: 8 * 1024 * 1024,
            timeout_secs: 5,
            stream_drain_secs: 10,
        }
    }
}

/// The gateway config of the harness. `upstream` is the mock's OpenAI base URL
/// (`http://HOST:PORT/v1`); the Gemini and Azure bases are derived from it. `spool_dir` must be
/// the gateway's own: tests run side by side, and a spool serves one gateway at a time.
pub fn config_text(
    upstream: &str,
    database_url: &str,
    spool_dir: &std::path::Path,
    options: &Options,
) -> String {
    let root = upstream.trim_end_matches("/v1");
    let gemini = format!("{root}/v1beta");
    let azure = root;
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = {max_body}
shutdown_grace_secs = 5

[database]
url = "{database_url}"
spool_dir = "{spool_dir}"

[observability]
log_format = "text"
log_level = "warn"

[policy]
stream_drain_secs = {drain}

[[providers]]
name = "upstream"
kind = "openai"
base_urls = ["{upstream}"]
api_keys = ["{UPSTREAM_KEY}"]
timeout_secs = {timeout}
extra_fields = ["provider"]

[[providers]]
name = "mock"
kind = "mock"

[[providers]]
name = "claude-upstream"
kind = "anthropic"
base_urls = ["{upstream}"]
api_keys = ["{UPSTREAM_KEY}"]
timeout_secs = {timeout}

[[providers]]
name = "gemini-upstream"
kind = "gemini"
base_urls = ["{gemini}"]
api_keys = ["{UPSTREAM_KEY}"]
timeout_secs = {timeout}

[[providers]]
name = "azure-upstream"
kind = "azure"
base_urls = ["{azure}"]
api_keys = ["{UPSTREAM_KEY}"]
api_version = "2024-10-21"
timeout_secs = {timeout}

[[models]]
alias = "chat"
targets = [{{ provider = "upstream", model = "mock-model" }}]

[[models]]
alias = "claude"
targets = [{{ provider = "claude-upstream", model = "claude-test" }}]

[[models]]
alias = "gem"
targets = [{{ provider = "gemini-upstream", model = "gemini-test" }}]

[[models]]
alias = "az"
targets = [{{ provider = "azure-upstream", model = "dep-1" }}]

[[models]]
alias = "local"
targets = [{{ provider = "mock", model = "mock-1" }}]

[[models]]
alias = "hidden"
targets = [{{ provider = "mock", model = "mock-1" }}]

[[projects]]
name = "team-a"
api_keys = [{{ id = "a-key", sha256 = "{hash}" }}]
models = ["chat", "local", "claude", "gem", "az"]
tags = {{ team = "a", business_line = "search" }}
"#,
        max_body = options.max_body_bytes,
        timeout = options.timeout_secs,
        drain = options.stream_drain_secs,
        spool_dir = spool_dir.display(),
        hash = gateway_access::hash_key(CLIENT_KEY),
    )
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let upstream = MockUpstream::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let database_url = options
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("usage.db").display()));
        let text = config_text(
            &upstream.base_url(),
            &database_url,
            &dir.path().join("spool"),
            &options,
        );
        let config = GatewayConfig::parse(&text, &|_| None).unwrap();
        let gateway = RunningGateway::start(config).await.unwrap();
        let base = format!("http://{}", gateway.local_addr());
        Self {
            gateway: Some(gateway),
            base,
            upstream,
            database_url,
            client: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(CLIENT_KEY)
    }

    pub async fn chat(&self, body: serde_json::Value) -> reqwest::Response {
        self.post("/v1/chat/completions")
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Stops the gateway, which writes every queued usage record, and returns the rows.
    pub async fn finish(&mut self) -> Vec<UsageRow> {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
        read_usage(&self.database_url).await
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UsageRow {
    pub request_id: String,
    pub project: Option<String>,
    pub key_id: Option<String>,
    pub tags: String,
    pub alias: Option<String>,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub status: i64,
    pub error_type: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub usage_source: Option<String>,
    pub ttft_ms: Option<f64>,
    pub streamed: bool,
    pub client_aborted: bool,
    pub vendor_response_id: Option<String>,
    pub vendor_request_id: Option<String>,
}

const SELECT: &str = "SELECT request_id, project, key_id, tags, alias, provider, upstream_model, \
    status, error_type, input_tokens, output_tokens, usage_source, ttft_ms, streamed, client_aborted, \
    vendor_response_id, vendor_request_id FROM usage_events";

pub async fn read_usage(database_url: &str) -> Vec<UsageRow> {
    // Postgres decodes strictly by type; casting there lets one row type serve both stores.
    if database_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(database_url).await.unwrap();
        let rows = sqlx::query_as(SELECT).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    } else {
        let query = SELECT
            .replace("request_id,", "request_id::text,")
            .replace("tags,", "tags::text,")
            .replace("status,", "status::bigint,");
        let pool = sqlx::PgPool::connect(database_url).await.unwrap();
        let rows = sqlx::query_as(&query).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    }
}

/// Postgres for tests: `GATEWAY_TEST_POSTGRES_URL` or the machine's local server. Each caller
/// gets a database of its own, so tests never see each other's rows.
pub async fn fresh_postgres_database() -> String {
    let admin_url = std::env::var("GATEWAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("gw_test_{}", uuid::Uuid::now_v7().simple());
    let pool = sqlx::PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (base, _db) = admin_url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// Reads an SSE response event by event; returns the `data:` payloads.
pub async fn sse_events(response: reqwest::Response) -> Vec<String> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.trim_end().strip_prefix("data: ") {
                events.push(data.to_owned());
            }
        }
    }
    events
}

pub fn directive(text: &str) -> serde_json::Value {
    serde_json::json!([{ "role": "user", "content": text }])
}

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
