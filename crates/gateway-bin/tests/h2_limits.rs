//! HTTP/2 limits of the data-plane listener, seen by a real h2 client over h2c: the
//! concurrent-streams cap the gateway advertises, and the rapid-reset defence
//! (CVE-2023-44487): a client that opens streams and cancels them at once is sent a GOAWAY
//! and disconnected, while a well-behaved connection next to it keeps being served.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use bytes::Bytes;
use gateway_bin::{GatewayConfig, RunningGateway};
use h2::client::SendRequest;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

const KEY: &str = "sk-h2-limits";

async fn gateway(dir: &tempfile::TempDir, pending_resets: usize) -> RunningGateway {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2
h2_max_concurrent_streams = 7
h2_max_pending_accept_reset_streams = {pending_resets}

[database]
url = "sqlite://{db}"
spool_dir = "{spool}"

[observability]
log_level = "error"
access_log = false

[[providers]]
name = "mock"
kind = "mock"

[[models]]
alias = "chat"
targets = [{{ provider = "mock", model = "mock-1" }}]

[[projects]]
name = "h2"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]
"#,
        db = dir.path().join("usage.db").display(),
        spool = dir.path().join("spool").display(),
        hash = gateway_access::hash_key(KEY),
    );
    RunningGateway::start(GatewayConfig::parse(&text, &|_| None).unwrap())
        .await
        .unwrap()
}

/// An h2c connection (prior knowledge) and the task driving it; the task's result is how the
/// connection ended.
async fn connect(
    addr: SocketAddr,
) -> (
    SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    (client, tokio::spawn(connection))
}

fn chat(addr: SocketAddr) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap()
}

/// A whole chat completion over `client`; returns the status.
async fn complete(client: SendRequest<Bytes>, addr: SocketAddr) -> u16 {
    let mut client = client.ready().await.unwrap();
    let (response, mut body) = client.send_request(chat(addr), false).unwrap();
    body.send_data(
        Bytes::from_static(br#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#),
        true,
    )
    .unwrap();
    let response = response.await.unwrap();
    let status = response.status().as_u16();
    let mut data = response.into_body();
    while let Some(chunk) = data.data().await {
        let chunk = chunk.unwrap();
        data.flow_control().release_capacity(chunk.len()).unwrap();
    }
    status
}

#[tokio::test]
async fn the_concurrent_streams_cap_is_advertised() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(&dir, 20).await;
    let addr = gateway.local_addr();
    let (client, _connection) = connect(addr).await;
    // One exchange, so the gateway's SETTINGS have been read.
    assert_eq!(complete(client.clone(), addr).await, 200);
    assert_eq!(client.current_max_send_streams(), 7);
    gateway.shutdown().await;
}

/// Opens `count` streams on a new connection and cancels each at once, giving the gateway a
/// moment every few streams so its answer (a GOAWAY) is read before more is written. Returns
/// the connection, and the driver task if the connection is still up after a last
/// exchange-free pause.
async fn rapid_reset(
    addr: SocketAddr,
    count: usize,
) -> (
    SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let (mut client, connection) = connect(addr).await;
    for sent in 0..count {
        if connection.is_finished() {
            break;
        }
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let Ok((_response, mut stream)) = client.send_request(chat(addr), false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        if sent % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    (client, connection)
}

#[tokio::test]
async fn a_rapid_reset_client_is_sent_away_and_others_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(&dir, 5).await;
    let addr = gateway.local_addr();

    let (_client, attack) = rapid_reset(addr, 400).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), attack)
        .await
        .expect("the gateway kept a rapid-reset connection open")
        .unwrap();
    let error = ended.expect_err("the connection ended without an error after the resets");
    assert!(
        error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || error.is_io(),
        "the connection ended with {error}, not a GOAWAY or a closed socket"
    );

    // A well-behaved client is not affected.
    let (client, _connection) = connect(addr).await;
    assert_eq!(complete(client, addr).await, 200);
    gateway.shutdown().await;
}

/// The control: with room for every reset, the same client keeps its connection, so it is
/// the limit that ends the one above.
#[tokio::test]
async fn without_the_limit_the_same_resets_keep_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway(&dir, 100_000).await;
    let addr = gateway.local_addr();
    let (client, connection) = rapid_reset(addr, 400).await;
    assert!(!connection.is_finished(), "{:?}", connection.await);
    assert_eq!(complete(client, addr).await, 200);
    gateway.shutdown().await;
}
