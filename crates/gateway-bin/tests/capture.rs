//! Prompt and response capture through the real gateway: a project that opted in has its
//! prompt and its response (plain and streamed) logged as `gateway::capture` events, with
//! secrets redacted; a project that did not never has its prompt logged. A canary secret used
//! both as the client's key and inside the prompt appears nowhere: not in the logs, not in the
//! metrics, not in an error body.
//!
//! The logs are read from a JSON subscriber installed for this test binary (the gateway
//! library never installs one; `gateway serve` does).

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use gateway_bin::RunningGateway;
use gateway_test_support::MockUpstream;
use serde_json::{Value, json};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The client key of the capturing project, also pasted into its prompts.
const CANARY: &str = "sk-canary-7f3a9c2e51d84b60aa19";
const QUIET_KEY: &str = "sk-quiet-project-key-00000000";

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn events(&self) -> Vec<Value> {
        self.text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The first event of `target` about `request_id`, waiting for it to be written.
    async fn wait_for(&self, target: &str, request_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(event) = self
                .events()
                .into_iter()
                .find(|e| e["target"] == target && e["request_id"] == request_id)
            {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "no {target} event for {request_id}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
}

struct Setup {
    gateway: RunningGateway,
    base: String,
    admin: String,
    client: reqwest::Client,
    _upstream: MockUpstream,
    _dir: tempfile::TempDir,
}

async fn start() -> Setup {
    let upstream = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_secs = 5

[database]
url = "sqlite::memory:"
spool_dir = "{spool}"

[observability]
access_log = true
redact_patterns = ['\b\d{{3}}-\d{{2}}-\d{{4}}\b']
capture_max_bytes = 4096

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{url}"]
timeout_secs = 5

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[projects]]
name = "cap"
api_keys = [{{ id = "cap-key", sha256 = "{canary}" }}]
capture_prompts = true
capture_responses = true

[[projects]]
name = "quiet"
api_keys = [{{ id = "quiet-key", sha256 = "{quiet}" }}]
"#,
        spool = dir.path().join("spool").display(),
        url = upstream.base_url(),
        canary = gateway_access::hash_key(CANARY),
        quiet = gateway_access::hash_key(QUIET_KEY),
    );
    std::fs::write(&path, text).unwrap();
    let gateway = RunningGateway::start_from_file(&path).await.unwrap();
    Setup {
        base: format!("http://{}", gateway.local_addr()),
        admin: format!("http://{}", gateway.admin_addr().unwrap()),
        gateway,
        client: reqwest::Client::new(),
        _upstream: upstream,
        _dir: dir,
    }
}

impl Setup {
    /// Sends `body` with `key`; returns the request id, the status and the body text.
    async fn chat(&self, key: &str, body: Value) -> (String, u16, String) {
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let status = response.status().as_u16();
        (id, status, response.text().await.unwrap())
    }
}

fn prompt(text: &str) -> Value {
    json!({"model": "chat", "messages": [{"role": "user", "content": text}]})
}

#[tokio::test]
async fn an_opted_in_project_gets_redacted_prompts_and_responses() {
    let logs = logs();
    let setup = start().await;
    let secret_prompt = format!("my key is {CANARY} and my ssn is 123-45-6789, say hi");

    let (id, status, _) = setup.chat(CANARY, prompt(&secret_prompt)).await;
    assert_eq!(status, 200);
    let event = logs.wait_for("gateway::capture", &id).await;
    assert_eq!(event["project"], "cap");
    assert_eq!(event["alias"], "chat");
    assert_eq!(event["status"], 200);
    let captured = event["prompt"].as_str().unwrap();
    assert!(
        captured.contains("my key is [REDACTED] and my ssn is [REDACTED], say hi"),
        "{captured}"
    );
    assert_eq!(event["prompt_truncated"], false);
    assert_eq!(event["response"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(event["response_truncated"], false);

    // A stream: the text as the client received it, assembled.
    let mut body = prompt("stream it");
    body["stream"] = json!(true);
    let (id, status, text) = setup.chat(CANARY, body).await;
    assert_eq!(status, 200);
    assert!(text.contains("data: [DONE]"));
    let event = logs.wait_for("gateway::capture", &id).await;
    assert_eq!(event["response"], "tok0 tok1 tok2 tok3 tok4 ");
    assert!(event["prompt"].as_str().unwrap().contains("stream it"));

    // A failed request still has its prompt captured, with its error status.
    let (id, status, error_body) = setup
        .chat(
            CANARY,
            json!({"model": "nope", "messages": [{"role": "user",
            "content": format!("again {CANARY}")}]}),
        )
        .await;
    assert_eq!(status, 404);
    assert!(!error_body.contains(CANARY), "{error_body}");
    let event = logs.wait_for("gateway::capture", &id).await;
    assert_eq!(event["status"], 404);
    let messages: Value = serde_json::from_str(event["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(
        messages,
        json!([{"role": "user", "content": "again [REDACTED]"}])
    );

    // Never in the access log line itself, and the canary nowhere at all.
    let access = logs.wait_for("access", &id).await;
    assert!(access.get("prompt").is_none() && access.get("response").is_none());
    let metrics = setup
        .client
        .get(format!("{}/metrics", setup.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("gateway_requests_total"));
    assert!(!metrics.contains(CANARY) && !metrics.contains("123-45-6789"));
    setup.gateway.shutdown().await;
    let all = logs.text();
    assert!(!all.contains(CANARY), "the canary reached the logs");
    assert!(
        !all.contains("123-45-6789"),
        "a configured pattern reached the logs"
    );
}

#[tokio::test]
async fn a_project_without_capture_never_has_its_prompt_logged() {
    let logs = logs();
    let setup = start().await;
    let marker = "quiet-prompt-marker-5d1e";
    let mut body = prompt(marker);
    let (id, status, _) = setup.chat(QUIET_KEY, body.clone()).await;
    assert_eq!(status, 200);
    body["stream"] = json!(true);
    let (stream_id, status, _) = setup.chat(QUIET_KEY, body).await;
    assert_eq!(status, 200);
    // Capture would run before the access log (finish hooks precede observers), so once the
    // access lines are there, a capture event would be too.
    logs.wait_for("access", &id).await;
    logs.wait_for("access", &stream_id).await;
    let captured: Vec<Value> = logs
        .events()
        .into_iter()
        .filter(|e| {
            e["target"] == "gateway::capture"
                && (e["request_id"] == id || e["request_id"] == stream_id)
        })
        .collect();
    assert!(captured.is_empty(), "{captured:?}");
    assert!(!logs.text().contains(marker), "the prompt reached the logs");
    setup.gateway.shutdown().await;
}
