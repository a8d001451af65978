//! The admin listener (`server.admin_listen`): the operator's view of the running config.
//!
//! - `GET /config`: `{"version", "loaded_at", "reloads", "failed_reloads"}` of the config in
//!   force, so a deploy can check that its change went live (or was refused).
//! - `GET /policy`: the policy layer's counters and states: rate-limit decisions (and how many
//!   were made locally because Redis was down), each upstream's circuit breaker, the retry
//!   budget, in-flight requests and shed ones, idempotency replays and conflicts.
//! - `GET /healthz`: 200 while the process serves.
//!
//! It is kept off the data-plane listener so it can be firewalled apart, and it takes no client
//! keys: project keys grant model access, not operations. Until the admin token arrives (a
//! later issue) it answers anyone who can reach it, which is why the default binds loopback and
//! why nothing here reveals secrets or changes state.

use crate::reload::ReloadStatus;
use crate::service::AppState;
use arc_swap::ArcSwap;
use bytes::Bytes;
use gateway_policy::Policy;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Admin requests are tiny and local; a stuck one must not hold shutdown for the data plane's
/// whole grace period.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves the admin API on `listener` until `stopped` changes.
pub(crate) async fn serve(
    listener: TcpListener,
    status: Arc<ArcSwap<ReloadStatus>>,
    state: Arc<AppState>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(err) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %err, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (status, state) = (status.clone(), state.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let response = handle(&request, &status.load(), &state.policy);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(error = %err, "admin connection ended with an error");
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin connections did not close within the grace period");
    }
}

fn handle<B>(
    request: &Request<B>,
    status: &ReloadStatus,
    policy: &Policy,
) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/policy") => json(
            StatusCode::OK,
            Bytes::from(policy_report(policy).to_string()),
        ),
        (&Method::GET, "/config") => match serde_json::to_vec(status) {
            Ok(body) => json(StatusCode::OK, Bytes::from(body)),
            Err(err) => {
                tracing::error!(error = %err, "encoding the reload status");
                json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Bytes::from_static(br#"{"error":"internal"}"#),
                )
            }
        },
        (&Method::GET, "/healthz") => {
            json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#))
        }
        _ => json(
            StatusCode::NOT_FOUND,
            Bytes::from_static(br#"{"error":"not found: GET /config, /policy or /healthz"}"#),
        ),
    }
}

fn policy_report(policy: &Policy) -> serde_json::Value {
    let breakers: Vec<_> = policy
        .breakers
        .states()
        .into_iter()
        .map(|(upstream, state)| json!({"upstream": upstream, "state": state}))
        .collect();
    json!({
        "rate_limits": policy.limiter.stats(),
        "breakers": breakers,
        "retry_budget": policy.retry_budget.stats(),
        "in_flight": policy.in_flight.stats(),
        "idempotency": policy.idempotency.stats(),
    })
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn config_reports_the_reload_status() {
        let status = ReloadStatus {
            version: "abc".into(),
            loaded_at: "2026-01-01T00:00:00Z".into(),
            reloads: 3,
            failed_reloads: 1,
        };
        let policy = Policy::new(&gateway_policy::PolicyConfig::default()).unwrap();
        let response = handle(&get("/config"), &status, &policy);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            handle(&get("/healthz"), &status, &policy).status(),
            StatusCode::OK
        );
        assert_eq!(
            handle(&get("/nope"), &status, &policy).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/config").body(()).unwrap();
        assert_eq!(
            handle(&post, &status, &policy).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            handle(&get("/policy"), &status, &policy).status(),
            StatusCode::OK
        );
    }
}
