//! The shared upstream HTTP client: one keep-alive pool with rustls for every provider.

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::time::Duration;

pub(crate) type HyperClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The one upstream connection pool, shared by every provider and every config version, so a
/// reload does not throw away warm connections.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    pub(crate) client: HyperClient,
}

impl UpstreamClient {
    /// `connect_timeout` bounds TCP connect; TLS and the request itself are bounded by each
    /// provider's deadline.
    pub fn new(connect_timeout: Duration) -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        // Without TCP_NODELAY a request written in two segments waits for the peer's delayed
        // ACK (about 40 ms) on every keep-alive request.
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(https);
        Ok(Self { client })
    }
}
