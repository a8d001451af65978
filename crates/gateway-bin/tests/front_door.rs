//! The front door, end to end over real sockets: TLS (ALPN h2 and http/1.1, old versions
//! refused, certificate reload, mTLS), the client IP behind trusted proxies and PROXY protocol,
//! slowloris and smuggling attempts on raw sockets, oversize heads, what never reaches the
//! upstream, and the drain on shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use common::{CLIENT_KEY, UPSTREAM_KEY};
use gateway_bin::{GatewayConfig, RunningGateway};
use gateway_test_support::MockUpstream;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Certificates

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf signed by this CA: (cert PEM, key PEM, cert DER).
    fn leaf(&self, common_name: &str, client: bool) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if client {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

// ---------------------------------------------------------------------------------------------
// A gateway with its own config

/// Access-log lines captured from every gateway in this test binary, found by request id.
fn access_lines() -> &'static Arc<Mutex<Vec<u8>>> {
    static LINES: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LINES.get_or_init(|| {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("access=info"))
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        lines
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The access-log line of `request_id`, waiting for it (it is written when the body ends).
async fn access_line(request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&access_lines().lock().unwrap()).into_owned();
        for line in text.lines() {
            if let Ok(value) = serde_json::from_str::<Value>(line)
                && value["fields"]["request_id"] == request_id
            {
                return value["fields"].clone();
            }
        }
        assert!(Instant::now() < deadline, "no access line for {request_id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Gateway {
    gateway: Option<RunningGateway>,
    addr: SocketAddr,
    upstream: MockUpstream,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// A gateway with `server_extra` appended to its `[server]` section and `tail` after the
    /// rest of the config (more `[server.tls]`, models).
    async fn start(server_extra: &str, tail: &str) -> Self {
        access_lines();
        let upstream = MockUpstream::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = upstream.base_url();
        let root = base.trim_end_matches("/v1").to_owned();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 5
{server_extra}

[database]
url = "sqlite://{db}"
spool_dir = "{spool}"

[[providers]]
name = "mock"
kind = "mock"

[[providers]]
name = "upstream"
kind = "openai"
base_urls = ["{base}"]
api_keys = ["{UPSTREAM_KEY}"]

[[providers]]
name = "claude-upstream"
kind = "anthropic"
base_urls = ["{base}"]
api_keys = ["{UPSTREAM_KEY}"]

[[providers]]
name = "azure-upstream"
kind = "azure"
base_urls = ["{root}"]
api_keys = ["{UPSTREAM_KEY}"]
api_version = "2024-10-21"

[[providers]]
name = "gemini-upstream"
kind = "gemini"
base_urls = ["{root}/v1beta"]
api_keys = ["{UPSTREAM_KEY}"]

[[models]]
alias = "local"
targets = [{{ provider = "mock", model = "mock-1" }}]

[[models]]
alias = "chat"
targets = [{{ provider = "upstream", model = "mock-model" }}]

[[models]]
alias = "claude"
targets = [{{ provider = "claude-upstream", model = "claude-test" }}]

[[models]]
alias = "bad-azure"
targets = [{{ provider = "azure-upstream", model = "../../evil?x=1#" }}]

[[models]]
alias = "bad-gemini"
targets = [{{ provider = "gemini-upstream", model = "models/../../evil:x?y=" }}]

[[projects]]
name = "front"
api_keys = [{{ id = "front-key", sha256 = "{hash}" }}]
{tail}
"#,
            db = dir.path().join("usage.db").display(),
            spool = dir.path().join("spool").display(),
            hash = gateway_access::hash_key(CLIENT_KEY),
        );
        let config = GatewayConfig::parse(&text, &|_| None).unwrap();
        let gateway = RunningGateway::start(config).await.unwrap();
        let addr = gateway.local_addr();
        Self {
            gateway: Some(gateway),
            addr,
            upstream,
            dir,
        }
    }

    async fn stop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown().await;
        }
    }
}

fn write_pair(dir: &Path, (cert, key, _): &(String, String, Vec<u8>)) {
    // Written beside and renamed, as cert-manager and certbot do, so a poll never sees half.
    std::fs::write(dir.join("cert.pem.tmp"), cert).unwrap();
    std::fs::write(dir.join("key.pem.tmp"), key).unwrap();
    std::fs::rename(dir.join("key.pem.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.tmp"), dir.join("cert.pem")).unwrap();
}

fn tls_section(dir: &Path, mtls: Option<&str>) -> String {
    let mut text = format!(
        "\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval_secs = 1\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    if let Some(mode) = mtls {
        text.push_str(&format!(
            "client_ca = \"{}\"\nclient_auth = \"{mode}\"\n",
            dir.join("client-ca.pem").display()
        ));
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Clients

fn client_config(
    ca: &Ca,
    alpn: &[&[u8]],
    client_cert: Option<&(String, String, Vec<u8>)>,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.cert.der().to_vec()))
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((cert, key, _)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn chat_request(model: &str) -> http::Request<Full<Bytes>> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hello"}]});
    http::Request::builder()
        .method("POST")
        .uri("https://localhost/v1/chat/completions")
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Sends one request over `stream` with the protocol its ALPN chose: (status, version, body).
async fn send_over(
    stream: TlsStream,
    request: http::Request<Full<Bytes>>,
) -> hyper::Result<(http::StatusCode, http::Version, Value)> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        let (mut parts, body) = request.into_parts();
        // h2 carries the authority in the URI; a `host` header is not allowed there.
        parts.headers.remove("host");
        sender
            .send_request(http::Request::from_parts(parts, body))
            .await?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(connection);
        let (mut parts, body) = request.into_parts();
        parts.uri = parts.uri.path().parse().unwrap();
        sender
            .send_request(http::Request::from_parts(parts, body))
            .await?
    };
    let status = response.status();
    let version = response.version();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, version, value))
}

/// Writes `bytes` on a fresh plain connection and reads until the server closes it (or 5 s).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(5)).await
}

/// (everything read, whether the server closed the connection in time).
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> (String, bool) {
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&seen).into_owned(), closed)
}

/// Every status line in a raw exchange, even one glued to the end of a previous body.
fn status_lines(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.")
        .map(|(at, _)| text[at..].lines().next().unwrap_or(""))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// TLS

async fn tls_gateway(mtls: Option<&str>) -> (Gateway, Ca, tempfile::TempDir) {
    let ca = Ca::new("front-door test CA");
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), &ca.leaf("gateway one", false));
    if mtls.is_some() {
        std::fs::write(certs.path().join("client-ca.pem"), Ca::new("unused").pem()).unwrap();
    }
    let gateway = Gateway::start(
        "handshake_timeout_secs = 1",
        &tls_section(certs.path(), mtls),
    )
    .await;
    (gateway, ca, certs)
}

#[tokio::test]
async fn tls_serves_chat_completions_over_h2_and_http11() {
    let (mut gateway, ca, _certs) = tls_gateway(None).await;
    for (alpn, expected) in [
        (&[b"h2".as_slice()][..], http::Version::HTTP_2),
        (&[b"http/1.1".as_slice()][..], http::Version::HTTP_11),
    ] {
        let stream = tls_connect(gateway.addr, client_config(&ca, alpn, None))
            .await
            .unwrap();
        let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(negotiated.as_deref(), Some(alpn[0]));
        let (status, version, body) = send_over(stream, chat_request("local")).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(version, expected);
        assert_eq!(body["object"], "chat.completion", "{body}");
        assert!(
            body["choices"][0]["message"]["content"].is_string(),
            "{body}"
        );
    }
    // Plain HTTP on the TLS port gets nowhere.
    let (text, closed) =
        raw_exchange(gateway.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(closed);
    assert!(status_lines(&text).is_empty(), "{text}");
    gateway.stop().await;
}

/// `openssl s_client` with the given protocol flag against the gateway: (succeeded, output).
fn s_client(addr: SocketAddr, flag: &str) -> Option<(bool, String)> {
    let mut child = match std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
            flag,
            // OpenSSL 3 refuses TLS < 1.2 itself at the default security level; lowering it
            // makes sure a refusal comes from the gateway.
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => panic!("running openssl: {err}"),
    };
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some((output.status.success(), text))
}

#[tokio::test]
async fn tls_1_0_and_1_1_are_refused_and_1_2_and_1_3_accepted() {
    let (mut gateway, _ca, _certs) = tls_gateway(None).await;
    let addr = gateway.addr;
    let results = tokio::task::spawn_blocking(move || {
        ["-tls1", "-tls1_1", "-tls1_2", "-tls1_3"].map(|flag| (flag, s_client(addr, flag)))
    })
    .await
    .unwrap();
    for (flag, result) in results {
        let Some((ok, text)) = result else {
            eprintln!("NOTICE: openssl binary not found; TLS version check skipped");
            return;
        };
        // `New, TLSv1.3, Cipher is ...`, or `New, (NONE), Cipher is (NONE)` when refused.
        let protocol = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("New, "))
            .and_then(|rest| rest.split(',').next())
            .filter(|protocol| *protocol != "(NONE)")
            .map(str::to_owned);
        match flag {
            "-tls1" | "-tls1_1" => {
                assert!(!ok, "{flag} accepted:\n{text}");
                assert_eq!(protocol, None, "{flag}:\n{text}");
                assert!(
                    text.contains("alert"),
                    "{flag}: no alert from the server:\n{text}"
                );
            }
            _ => {
                let expected = if flag == "-tls1_2" {
                    "TLSv1.2"
                } else {
                    "TLSv1.3"
                };
                assert!(ok, "{flag} refused:\n{text}");
                assert_eq!(protocol.as_deref(), Some(expected), "{flag}:\n{text}");
            }
        }
    }
    gateway.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let (mut gateway, ca, certs) = tls_gateway(None).await;
    let config = client_config(&ca, &[b"http/1.1"], None);
    let first = tls_connect(gateway.addr, config.clone()).await.unwrap();
    let first_der = first.get_ref().1.peer_certificates().unwrap()[0].to_vec();

    // A broken pair is refused: the old certificate keeps being served.
    std::fs::write(certs.path().join("cert.pem"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = tls_connect(gateway.addr, config.clone()).await.unwrap();
    assert_eq!(
        still.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        first_der
    );

    let renewed = ca.leaf("gateway two", false);
    write_pair(certs.path(), &renewed);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = tls_connect(gateway.addr, config.clone()).await.unwrap();
        let served = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        if served == renewed.2 {
            // The connection made before the swap still works on its own certificate.
            let (status, _, _) = send_over(first, chat_request("local")).await.unwrap();
            assert_eq!(status, 200);
            break;
        }
        assert_eq!(served, first_der, "neither the old nor the new certificate");
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gateway.stop().await;
}

#[tokio::test]
async fn mtls_required_refuses_clients_without_a_certificate_from_the_ca() {
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("internal callers CA");
    let other_ca = Ca::new("someone else's CA");
    let certs = tempfile::tempdir().unwrap();
    write_pair(certs.path(), &ca.leaf("gateway", false));
    std::fs::write(certs.path().join("client-ca.pem"), client_ca.pem()).unwrap();
    let mut gateway = Gateway::start("", &tls_section(certs.path(), Some("required"))).await;

    // TLS 1.3 clients learn of the refusal on their first read, so a request must fail.
    let anonymous = client_config(&ca, &[b"http/1.1"], None);
    let refused = match tls_connect(gateway.addr, anonymous).await {
        Err(_) => true,
        Ok(stream) => send_over(stream, chat_request("local")).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    let stranger = other_ca.leaf("stranger", true);
    let config = client_config(&ca, &[b"http/1.1"], Some(&stranger));
    let refused = match tls_connect(gateway.addr, config).await {
        Err(_) => true,
        Ok(stream) => send_over(stream, chat_request("local")).await.is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");

    let caller = client_ca.leaf("billing-service", true);
    for alpn in [b"h2".as_slice(), b"http/1.1".as_slice()] {
        let config = client_config(&ca, &[alpn], Some(&caller));
        let stream = tls_connect(gateway.addr, config).await.unwrap();
        let (status, _, body) = send_over(stream, chat_request("local")).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    gateway.stop().await;
}

#[tokio::test]
async fn a_silent_client_does_not_hold_a_tls_connection() {
    let (mut gateway, _ca, _certs) = tls_gateway(None).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "the handshake never timed out");
    assert!(started.elapsed() >= Duration::from_millis(900));
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Client IP

async fn get_with(addr: SocketAddr, prefix: &[u8], headers: &str) -> (String, String) {
    let request_id = uuid::Uuid::now_v7().to_string();
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nx-request-id: {request_id}\r\nConnection: close\r\n{headers}\r\n"
        )
        .as_bytes(),
    );
    let (text, _) = raw_exchange(addr, &bytes).await;
    (text, request_id)
}

#[tokio::test]
async fn forwarded_headers_name_the_client_only_from_a_trusted_peer() {
    let mut trusting =
        Gateway::start(r#"trusted_proxies = ["10.0.0.0/8", "127.0.0.1/32"]"#, "").await;
    let forged = "X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n";
    let (text, id) = get_with(trusting.addr, b"", forged).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(access_line(&id).await["client_ip"], "203.0.113.7");
    let (_, id) = get_with(
        trusting.addr,
        b"",
        "Forwarded: for=\"[2001:db8::5]:99\"\r\n",
    )
    .await;
    assert_eq!(access_line(&id).await["client_ip"], "2001:db8::5");
    trusting.stop().await;

    let mut wary = Gateway::start(r#"trusted_proxies = ["10.0.0.0/8"]"#, "").await;
    let (text, id) = get_with(wary.addr, b"", forged).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(access_line(&id).await["client_ip"], "127.0.0.1");
    wary.stop().await;
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_carry_the_client_address() {
    let mut gateway = Gateway::start(
        "proxy_protocol = true\nhandshake_timeout_secs = 1\ntrusted_proxies = [\"127.0.0.1/32\"]",
        "",
    )
    .await;
    let (text, id) = get_with(
        gateway.addr,
        b"PROXY TCP4 198.51.100.4 127.0.0.1 5555 8080\r\n",
        "",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(access_line(&id).await["client_ip"], "198.51.100.4");

    let v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::77]:4000".parse::<SocketAddr>().unwrap(),
            "[::1]:8080".parse::<SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap();
    // The PROXY source is the peer: its own forwarding headers are not believed.
    let (text, id) = get_with(gateway.addr, &v2, "X-Forwarded-For: 6.6.6.6\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(access_line(&id).await["client_ip"], "2001:db8::77");

    // No header: closed without a response.
    let (text, id) = get_with(gateway.addr, b"", "").await;
    assert!(status_lines(&text).is_empty(), "{text}");
    let _ = id;
    gateway.stop().await;

    // From a peer outside trusted_proxies, even a valid header is refused.
    let mut strict = Gateway::start(
        "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]",
        "",
    )
    .await;
    let (text, _) = get_with(
        strict.addr,
        b"PROXY TCP4 198.51.100.4 127.0.0.1 5555 8080\r\n",
        "",
    )
    .await;
    assert!(status_lines(&text).is_empty(), "{text}");
    strict.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Hardening

#[tokio::test]
async fn a_slowloris_client_is_disconnected() {
    let mut gateway = Gateway::start("header_read_timeout_secs = 1", "").await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    let mut closed_after = None;
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buffer = [0u8; 256];
        // A short read window per byte: 0 bytes read means the server hung up.
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(150), stream.read(&mut buffer)).await
        {
            let read = read.unwrap_or(0);
            let text = String::from_utf8_lossy(&buffer[..read]).into_owned();
            assert!(!text.starts_with("HTTP/1.1 200"), "served: {text}");
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the slow client was never disconnected");
    assert!(
        closed_after < Duration::from_secs(4),
        "closed only after {closed_after:?}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_nothing_is_smuggled() {
    let mut gateway = Gateway::start("", "").await;
    // The smuggled request: if any of these were read as a second request, a second status
    // line (200 for /healthz) would follow the first.
    let smuggled = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases = [
        (
            "CL then TE",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ),
        (
            "padded TE with CL",
            "Content-Length: 5\r\nTransfer-Encoding:  chunked \r\n",
        ),
        (
            "chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n",
        ),
        (
            "TE identity with CL",
            "Content-Length: 5\r\nTransfer-Encoding: identity\r\n",
        ),
        ("duplicate CL", "Content-Length: 5\r\nContent-Length: 5\r\n"),
        (
            "conflicting CL",
            "Content-Length: 5\r\nContent-Length: 40\r\n",
        ),
        ("CL list", "Content-Length: 5, 5\r\n"),
        (
            "space before colon",
            "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
        ),
    ];
    for (name, framing) in cases {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n{framing}\r\n0\r\n\r\n{smuggled}"
        );
        let (text, closed) = raw_exchange(gateway.addr, request.as_bytes()).await;
        assert!(closed, "{name}: connection left open:\n{text}");
        assert_eq!(
            status_lines(&text),
            ["HTTP/1.1 400 Bad Request"],
            "{name}:\n{text}"
        );
    }
    // HTTP/1.0 with Transfer-Encoding too.
    let (text, closed) = raw_exchange(
        gateway.addr,
        format!("POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}").as_bytes(),
    )
    .await;
    assert!(closed);
    assert_eq!(status_lines(&text), ["HTTP/1.1 400 Bad Request"], "{text}");

    // A well-framed keep-alive pair is still served twice: the guard refuses only ambiguity.
    let body =
        json!({"model": "local", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let good = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let (text, _) = raw_exchange(gateway.addr, good.as_bytes()).await;
    assert_eq!(
        status_lines(&text),
        ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"],
        "{text}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn oversize_heads_are_refused() {
    let mut gateway = Gateway::start("max_header_bytes = 8192", "").await;
    let big = "a".repeat(20_000);
    let (text, closed) = raw_exchange(
        gateway.addr,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(closed);
    let lines = status_lines(&text);
    assert!(
        lines.is_empty() || lines == ["HTTP/1.1 431 Request Header Fields Too Large"],
        "{text}"
    );
    // Within the cap it is served.
    let fits = "a".repeat(4_000);
    let (text, _) = raw_exchange(
        gateway.addr,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {fits}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    gateway.stop().await;
}

#[tokio::test]
async fn client_keys_and_hop_by_hop_headers_never_reach_the_upstream() {
    let mut gateway = Gateway::start("", "").await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", gateway.addr);
    let hostile = [
        ("x-api-key", "sk-client-x-api-key"),
        ("api-key", "sk-client-azure-key"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("trailer", "x-after"),
        ("x-drop-me", "1"),
        ("connection", "x-drop-me"),
        ("x-forwarded-for", "6.6.6.6"),
    ];
    let mut request = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}));
    for (name, value) in hostile {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);

    // An Anthropic client's own key, on the native passthrough path.
    let mut request = client
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", CLIENT_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}));
    for (name, value) in hostile.iter().filter(|(name, _)| *name != "x-api-key") {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);

    let recorded = gateway.upstream.requests();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    for seen in &recorded {
        let headers = &seen.headers;
        for (name, _) in hostile {
            let leaked = headers.get(name).is_some_and(|value| {
                // The vendor key we configured is the only key allowed out.
                value != UPSTREAM_KEY
            });
            assert!(!leaked, "{name} reached the upstream: {headers:?}");
        }
        for value in headers.values() {
            let value = value.to_str().unwrap_or("");
            assert!(
                !value.contains(CLIENT_KEY),
                "client key forwarded: {headers:?}"
            );
            assert!(
                !value.contains("sk-client"),
                "client key forwarded: {headers:?}"
            );
        }
    }
    let chat = recorded
        .iter()
        .find(|r| r.path.ends_with("/chat/completions"))
        .unwrap();
    assert_eq!(
        chat.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    let messages = recorded
        .iter()
        .find(|r| r.path.ends_with("/messages"))
        .unwrap();
    assert_eq!(messages.headers["x-api-key"], UPSTREAM_KEY);
    gateway.stop().await;
}

#[tokio::test]
async fn no_model_or_deployment_name_changes_the_upstream_url() {
    let mut gateway = Gateway::start("", "").await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", gateway.addr);
    for model in [
        "../../x",
        "a?b=c",
        "http://evil/",
        "chat/../../x",
        "chat?x=1",
        "chat#x",
    ] {
        let response = client
            .post(&url)
            .bearer_auth(CLIENT_KEY)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{model}");
    }
    // Hostile names in the routing config itself are refused before any request is sent.
    for alias in ["bad-azure", "bad-gemini"] {
        let response = client
            .post(&url)
            .bearer_auth(CLIENT_KEY)
            .json(&json!({"model": alias, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert!(!response.status().is_success(), "{alias}");
    }
    assert!(
        gateway.upstream.requests().is_empty(),
        "{:?}",
        gateway.upstream.requests()
    );
    gateway.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Drain

#[tokio::test]
async fn shutdown_turns_readiness_off_while_still_accepting_for_the_drain_delay() {
    let mut gateway = Gateway::start("drain_delay_secs = 2", "").await;
    let addr = gateway.addr;
    let (text, _) = raw_exchange(
        addr,
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    let running = gateway.gateway.take().unwrap();
    let stopping = tokio::spawn(running.shutdown());
    let started = Instant::now();
    let mut not_ready_seen = 0;
    let refused_after = loop {
        match TcpStream::connect(addr).await {
            Ok(mut stream) => {
                let _ = stream
                    .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await;
                let (text, _) = read_until_closed(&mut stream, Duration::from_secs(2)).await;
                if text.starts_with("HTTP/1.1 503") {
                    not_ready_seen += 1;
                } else if !text.is_empty() {
                    assert!(
                        started.elapsed() < Duration::from_millis(100),
                        "ready while draining: {text}"
                    );
                }
            }
            Err(_) => break started.elapsed(),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never stopped accepting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(not_ready_seen >= 5, "saw not-ready {not_ready_seen} times");
    assert!(
        refused_after >= Duration::from_millis(1800),
        "{refused_after:?}"
    );
    stopping.await.unwrap();
    let _ = &gateway.dir;
}
