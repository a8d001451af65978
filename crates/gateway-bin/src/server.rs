//! Starting and stopping the gateway: listeners, connections, the usage writer, and (when it
//! follows a config file) the reload task and the admin listener.

use crate::admin;
use crate::config::GatewayConfig;
use crate::reload::{self, ReloadStatus, Reloader, Triggers};
use crate::service::{AppState, build_stack};
use crate::state::Snapshot;
use anyhow::Context as _;
use arc_swap::ArcSwap;
use gateway_access::framing::{FramingGuard, FramingVerdict};
use gateway_access::tls::{ALPN_H2, TlsAcceptor};
use gateway_access::{AuthThrottle, DbKeys, ServerConfig, TrustedProxies, proxy_protocol};
use gateway_business::budget::Budgets;
use gateway_business::{UsageWriter, WriterStats};
use gateway_core::{ClientIp, PeerAddr, RequestObserver};
use gateway_observability::{AccessLog, RequestMetrics};
use gateway_policy::Policy;
use gateway_providers::UpstreamClient;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

/// A gateway that is serving. Integration tests start exactly this, as `gateway serve` does.
#[derive(Debug)]
pub struct RunningGateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    state: Arc<AppState>,
    reload_status: Arc<ArcSwap<ReloadStatus>>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    admin: Option<JoinHandle<()>>,
    reloader: Option<JoinHandle<()>>,
    key_follower: Option<JoinHandle<()>>,
    writer: UsageWriter,
    grace: Duration,
    /// OTLP trace export, when `[observability.tracing]` is on.
    tracing: Option<gateway_observability::OtlpTracing>,
    drain_delay: Duration,
    tls_reloader: Option<JoinHandle<()>>,
}

impl RunningGateway {
    /// Binds the listener and starts serving `config` as it is: no reload, no admin listener
    /// (tests start many gateways at once, and the admin port's default would collide).
    /// Returns once requests can be accepted; the usage database is connected in the
    /// background and never delays start-up.
    pub async fn start(config: GatewayConfig) -> anyhow::Result<Self> {
        Self::launch(config, None).await
    }

    /// Loads the config file and serves it as `gateway serve` does: see
    /// [`RunningGateway::start_with_reload`].
    pub async fn start_from_file(path: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let path = path.into();
        let config = GatewayConfig::load(&path).map_err(|err| {
            anyhow::anyhow!(
                "invalid config {}:\n  {}",
                path.display(),
                err.errors().join("\n  ")
            )
        })?;
        Self::start_with_reload(config, path).await
    }

    /// Serves `config`, which was loaded from `path`, and keeps following the file: it is
    /// reloaded when it changes (a watcher on its directory) and on SIGHUP, and the admin
    /// listener (`server.admin_listen`) reports which version is live.
    pub async fn start_with_reload(config: GatewayConfig, path: PathBuf) -> anyhow::Result<Self> {
        Self::launch(config, Some(path)).await
    }

    async fn launch(config: GatewayConfig, path: Option<PathBuf>) -> anyhow::Result<Self> {
        let client = UpstreamClient::new(config.policy.timeouts.connect())
            .context("building the upstream HTTP client")?;
        let snapshot = Snapshot::build(&config, &client)?;
        let policy = Policy::new(&config.policy).context("starting the policy layer")?;
        let budgets = Budgets::new(&config.budget, &config.budgets, &config.database)
            .context("starting the budgets")?;
        let tls = config
            .server
            .tls
            .as_ref()
            .map(TlsAcceptor::new)
            .transpose()
            .context("loading [server.tls]")?;
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let addr = listener.local_addr()?;
        // Everything that can fail comes before anything is spawned, so a failed start leaves
        // no task behind.
        let reload = match &path {
            Some(path) => {
                let admin = TcpListener::bind(config.server.admin_listen)
                    .await
                    .with_context(|| format!("binding {}", config.server.admin_listen))?;
                let triggers = Triggers::install(path)?;
                Some((path.clone(), admin, triggers))
            }
            None => None,
        };

        let tracing = gateway_observability::OtlpTracing::start(&config.observability.tracing)
            .context("starting trace export")?;
        let (recorder, writer) = UsageWriter::spawn(config.database.clone());
        recorder.set_prices(snapshot.prices.clone());
        recorder.set_projects(crate::state::project_entries(&config.projects));
        let mut observers: Vec<Arc<dyn RequestObserver>> = Vec::new();
        if config.observability.access_log {
            observers.push(Arc::new(AccessLog));
        }
        observers.push(Arc::new(recorder.clone()));
        let metrics = Arc::new(RequestMetrics::new());
        metrics.set_aliases(snapshot.routes.aliases());
        observers.push(metrics.clone());

        let store = key_store(&config);
        let state = Arc::new(AppState {
            snapshot: ArcSwap::from_pointee(snapshot),
            ready: false.into(),
            max_body_bytes: config.server.max_body_bytes,
            policy,
            budgets,
            usage: recorder,
            metrics,
            db_keys: Arc::new(DbKeys::new()),
            auth_throttle: Arc::new(AuthThrottle::new(&config.server.auth_failures)),
            store,
        });
        let key_follower = state.store.clone().map(|store| {
            tokio::spawn(state.db_keys.clone().follow(
                Arc::new(store),
                Duration::from_millis(config.server.key_refresh_ms),
            ))
        });
        let reload_status = Arc::new(ArcSwap::from_pointee(ReloadStatus::new(&config.version)));
        let (stop, stopped) = watch::channel(false);
        let stack = build_stack(
            state.clone(),
            observers,
            tracing
                .as_ref()
                .map(gateway_observability::OtlpTracing::tracer),
        );
        let tls_reloader = tls.as_ref().map(TlsAcceptor::spawn_reloader);
        let front = Arc::new(FrontDoor {
            tls,
            trusted: TrustedProxies::new(&config.server.trusted_proxies),
            proxy_protocol: config.server.proxy_protocol,
            handshake_timeout: config.server.handshake_timeout(),
            max_header_bytes: config.server.max_header_bytes,
        });
        let server = tokio::spawn(accept_loop(
            listener,
            stack,
            front,
            http_builder(&config.server),
            stopped.clone(),
            Duration::from_secs(config.server.shutdown_grace_secs),
        ));
        let grace = Duration::from_secs(config.server.shutdown_grace_secs);
        let drain_delay = Duration::from_secs(config.server.drain_delay_secs);
        let summary = (
            config.version.clone(),
            config.models.len(),
            config.providers.len(),
            config.projects.len(),
        );
        let (admin_addr, admin, reloader) = match reload {
            Some((path, admin_listener, triggers)) => {
                let admin_addr = admin_listener.local_addr()?;
                let admin = tokio::spawn(admin::serve(
                    admin_listener,
                    admin::Admin::new(
                        reload_status.clone(),
                        state.clone(),
                        config.server.admin_token.clone(),
                    ),
                    stopped.clone(),
                ));
                let reloader =
                    Reloader::new(path, state.clone(), client, config, reload_status.clone());
                let reloader = reload::spawn(reloader, triggers, stopped);
                (Some(admin_addr), Some(admin), Some(reloader))
            }
            None => (None, None, None),
        };
        state.ready.store(true, Ordering::Release);
        let (config_version, aliases, providers, projects) = summary;
        tracing::info!(
            %addr,
            admin_addr = ?admin_addr,
            config_version = %config_version,
            aliases,
            providers,
            projects,
            "gateway listening"
        );
        Ok(Self {
            addr,
            admin_addr,
            state,
            reload_status,
            stop,
            server,
            admin,
            reloader,
            key_follower,
            writer,
            grace,
            tracing,
            drain_delay,
            tls_reloader,
        })
    }

    /// Counters of the active config version's routing table (canary rollbacks, ejections).
    pub fn routing_stats(&self) -> gateway_routing::RoutingStats {
        self.state.snapshot.load().routes.stats()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener's address, when the gateway follows a config file.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The config version in force and the reload counts.
    pub fn reload_status(&self) -> ReloadStatus {
        ReloadStatus::clone(&self.reload_status.load())
    }

    pub fn usage_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// Spans exported, dropped and lost so far, when trace export is on.
    pub fn trace_export_stats(&self) -> Option<gateway_observability::ExportStats> {
        self.tracing
            .as_ref()
            .map(gateway_observability::OtlpTracing::stats)
    }

    /// Turns `/readyz` false, keeps accepting for `drain_delay_secs` (so a load balancer sees
    /// the drain before connections are refused), stops accepting, lets in-flight requests
    /// finish within the grace period, then writes the queued usage records.
    pub async fn shutdown(self) -> WriterStats {
        self.state.ready.store(false, Ordering::Release);
        if !self.drain_delay.is_zero() {
            tracing::info!(
                drain_delay_secs = self.drain_delay.as_secs(),
                "draining: not ready, still accepting"
            );
            tokio::time::sleep(self.drain_delay).await;
        }
        if let Some(follower) = &self.key_follower {
            follower.abort();
        }
        let _ignored = self.stop.send(true);
        if let Some(reloader) = &self.tls_reloader {
            reloader.abort();
        }
        if let Err(err) = self.server.await {
            tracing::error!(error = %err, "server task failed");
        }
        for (task, name) in [(self.admin, "admin"), (self.reloader, "reload")] {
            if let Some(task) = task
                && let Err(err) = task.await
            {
                tracing::error!(error = %err, task = name, "task failed");
            }
        }
        // Connections are closed, but a stream the client abandoned may still be read in the
        // background for its usage (bounded by `stream_drain_secs`). Its in-flight slot is
        // freed only when its record is made, so wait for the slots before closing the writer,
        // or those records would be lost.
        let drained = tokio::time::timeout(self.grace, async {
            while self.state.policy.in_flight.stats().in_flight > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                in_flight = self.state.policy.in_flight.stats().in_flight,
                "requests still finishing after the grace period; their records may be lost"
            );
        }
        let stats = self
            .writer
            .shutdown(self.grace.max(Duration::from_secs(5)))
            .await;
        // Last, so the spans of the requests just finished are among those flushed.
        if let Some(tracing) = self.tracing {
            tracing.shutdown(self.grace).await;
        }
        tracing::info!(
            written = stats.written,
            dropped = stats.dropped,
            "gateway stopped"
        );
        stats
    }
}

/// The database the key cache polls and the admin API uses, opened lazily so the gateway
/// starts without it. An in-memory SQLite is private to each connection: nothing to share.
fn key_store(config: &GatewayConfig) -> Option<gateway_business::UsageStore> {
    if config.database.url.contains(":memory:") {
        return None;
    }
    match gateway_business::UsageStore::connect_lazy(&config.database, 2) {
        Ok(store) => Some(store),
        Err(err) => {
            tracing::warn!(error = %err, "database keys and the admin API's data are unavailable");
            None
        }
    }
}

/// What the connection tasks need to know about the front door.
struct FrontDoor {
    tls: Option<TlsAcceptor>,
    trusted: TrustedProxies,
    proxy_protocol: bool,
    handshake_timeout: Duration,
    max_header_bytes: usize,
}

/// The HTTP/1.1 and h2 settings of the data-plane listener (`[server]` hardening keys).
fn http_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout())
        .max_buf_size(server.max_header_bytes);
    let keep_alive = (server.h2_keep_alive_interval_secs > 0)
        .then(|| Duration::from_secs(server.h2_keep_alive_interval_secs));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(server.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(server.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(server.h2_max_local_error_reset_streams)
        .keep_alive_interval(keep_alive)
        .keep_alive_timeout(Duration::from_secs(server.h2_keep_alive_timeout_secs));
    builder
}

/// The stack's response, or the front door's own refusal of an ambiguously framed request.
type ConnResponse = http::Response<
    http_body_util::Either<
        gateway_observability::FinishBody<crate::service::ResponseBody>,
        http_body_util::Full<bytes::Bytes>,
    >,
>;

/// What the listener serves: the tower stack `build_stack` composes, as each connection task
/// needs it (one name for the bounds the accept loop and the connection tasks share).
trait DataPlane:
    tower::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<gateway_observability::FinishBody<crate::service::ResponseBody>>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> DataPlane for S where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<
                gateway_observability::FinishBody<crate::service::ResponseBody>,
            >,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

async fn accept_loop<S>(
    listener: TcpListener,
    stack: S,
    front: Arc<FrontDoor>,
    builder: auto::Builder<TokioExecutor>,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
) where
    S: DataPlane,
{
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Headers and body go out in separate writes; without TCP_NODELAY the second
                // waits for the client's delayed ACK (about 40 ms) on keep-alive connections.
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "could not set TCP_NODELAY");
                }
                // The PROXY header and the TLS handshake run in the connection's task: a slow
                // or silent client must never hold up the accept loop.
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    front.clone(),
                    builder.clone(),
                    stack.clone(),
                    graceful.watcher(),
                ));
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "in-flight requests did not finish within the grace period"
        );
    }
}

/// One connection: PROXY header (when configured), TLS handshake (when configured), then HTTP.
async fn serve_connection<S>(
    mut stream: TcpStream,
    tcp_peer: SocketAddr,
    front: Arc<FrontDoor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stack: S,
    watcher: Watcher,
) where
    S: DataPlane,
{
    let mut peer = tcp_peer;
    if front.proxy_protocol {
        // Anyone else could claim any address.
        if !front.trusted.contains(tcp_peer.ip()) {
            tracing::warn!(peer = %tcp_peer, "PROXY protocol connection from an untrusted peer refused");
            return;
        }
        match proxy_protocol::read_header(&mut stream, front.handshake_timeout).await {
            Ok(Some(source)) => peer = source,
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(peer = %tcp_peer, error = %err, "connection without a valid PROXY header closed");
                return;
            }
        }
    }
    let Some(tls) = &front.tls else {
        serve_http(stream, peer, true, &front, &builder, stack, watcher).await;
        return;
    };
    let stream = match tokio::time::timeout(front.handshake_timeout, tls.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::debug!(peer = %peer, error = %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "TLS handshake timed out");
            return;
        }
    };
    // h2 frames its own messages: only HTTP/1.1 needs its framing watched.
    let h1 = stream.get_ref().1.alpn_protocol() != Some(ALPN_H2);
    serve_http(stream, peer, h1, &front, &builder, stack, watcher).await;
}

async fn serve_http<IO, S>(
    io: IO,
    peer: SocketAddr,
    h1: bool,
    front: &FrontDoor,
    builder: &auto::Builder<TokioExecutor>,
    stack: S,
    watcher: Watcher,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: DataPlane,
{
    let verdict = Arc::new(FramingVerdict::default());
    let trusted = front.trusted.clone();
    let service = hyper::service::service_fn({
        let verdict = verdict.clone();
        move |mut request: http::Request<hyper::body::Incoming>| {
            let client = trusted.client_ip(peer.ip(), request.headers());
            let admitted = verdict.admit();
            request.extensions_mut().insert(PeerAddr(peer));
            request.extensions_mut().insert(ClientIp(client));
            let stack = stack.clone();
            async move {
                if !admitted {
                    tracing::warn!(peer = %peer, client_ip = %client, "ambiguous request framing refused");
                    return Ok::<ConnResponse, std::convert::Infallible>(ambiguous_framing());
                }
                let Ok(response) = stack.oneshot(request).await;
                Ok(response.map(http_body_util::Either::Left))
            }
        }
    });
    let result = if h1 {
        let guarded = FramingGuard::new(io, verdict, front.max_header_bytes);
        watcher
            .watch(
                builder
                    .serve_connection(TokioIo::new(guarded), service)
                    .into_owned(),
            )
            .await
    } else {
        watcher
            .watch(
                builder
                    .serve_connection(TokioIo::new(io), service)
                    .into_owned(),
            )
            .await
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

/// 400 and `Connection: close`: hyper then closes the connection, so nothing the client sent
/// after this request is read as a request.
fn ambiguous_framing() -> ConnResponse {
    let body = gateway_core::GatewayError::invalid_request(
        "Ambiguous request framing: Content-Length with Transfer-Encoding, or Content-Length repeated",
        None,
    )
    .to_json();
    let mut response = http::Response::new(http_body_util::Either::Right(
        http_body_util::Full::new(body),
    ));
    *response.status_mut() = http::StatusCode::BAD_REQUEST;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}
