//! The admin listener (`server.admin_listen`): the operator's API (`docs/admin-api.yaml`).
//!
//! - `GET /healthz`: 200 while the process serves; the only route open to anyone.
//! - `GET /config`: `{"version", "loaded_at", "reloads", "failed_reloads"}` of the config in
//!   force, so a deploy can check that its change went live (or was refused).
//! - `GET /policy`: the policy layer's counters and states, and the access layer's (database
//!   key cache, auth-failure throttle).
//! - `/admin/projects`, `/admin/keys` (list, create, revoke, rotate), `/admin/budgets`,
//!   `/admin/usage`: JSON over the config and the database.
//! - `GET /metrics`: Prometheus metrics (OpenMetrics text, see `metrics.rs`). It needs no
//!   token: scrapers are configured with a URL, not a secret, and nothing in it is secret.
//!
//! Every route but `/healthz` needs `Authorization: Bearer <[server] admin_token>`. Tokens are
//! compared as SHA-256 digests in constant time. A project key is refused even when it is
//! valid on the data plane: project keys grant model access, not operations. With no token
//! configured the protected routes answer 403 saying how to set one. Errors use OpenAI's
//! envelope, like the data plane's.

use crate::keys::{self, Refused};
use crate::reload::ReloadStatus;
use crate::service::AppState;
use arc_swap::ArcSwap;
use bytes::Bytes;
use gateway_access::AdminToken;
use gateway_business::budget::BudgetPeriod;
use gateway_business::report::{self, Dimension, ReportQuery};
use gateway_business::{KeyError, UsageStore};
use gateway_policy::Policy;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Admin requests are tiny and local; a stuck one must not hold shutdown for the data plane's
/// whole grace period.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Largest admin request body: a key request is a few hundred bytes.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Routes served without the admin token (probes and scrapers).
const PUBLIC_PATHS: &[&str] = &["/healthz", "/metrics"];

/// What the admin routes read and change.
#[derive(Clone)]
pub(crate) struct Admin {
    status: Arc<ArcSwap<ReloadStatus>>,
    state: Arc<AppState>,
    /// SHA-256 of the admin token; `None`: no token configured, the API is closed.
    token_digest: Option<[u8; 32]>,
}

impl Admin {
    pub(crate) fn new(
        status: Arc<ArcSwap<ReloadStatus>>,
        state: Arc<AppState>,
        token: Option<AdminToken>,
    ) -> Self {
        let token_digest = token
            .filter(|token| !token.expose().trim().is_empty())
            .map(|token| Sha256::digest(token.expose().trim().as_bytes()).into());
        Self {
            status,
            state,
            token_digest,
        }
    }
}

/// Serves the admin API on `listener` until `stopped` changes.
pub(crate) async fn serve(listener: TcpListener, admin: Admin, mut stopped: watch::Receiver<bool>) {
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
                let admin = admin.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(request).await) }
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

/// An admin error: its status and OpenAI's `type`, `code`, `param` and message.
#[derive(Debug)]
struct AdminError {
    status: StatusCode,
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

impl AdminError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
        }
    }

    fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            param,
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    fn response(&self) -> Response<Full<Bytes>> {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "authentication_error",
            status if status.is_server_error() => "api_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }});
        json(self.status, &body)
    }
}

impl From<Refused> for AdminError {
    fn from(refused: Refused) -> Self {
        Self::bad_request(refused.message, Some(refused.param))
    }
}

impl From<KeyError> for AdminError {
    fn from(err: KeyError) -> Self {
        match err {
            KeyError::NotFound(_) => {
                Self::new(StatusCode::NOT_FOUND, "key_not_found", err.to_string())
            }
            KeyError::Revoked(_) => Self::new(StatusCode::CONFLICT, "key_revoked", err.to_string()),
            KeyError::Random(_) | KeyError::Store(_) => {
                tracing::warn!(error = %err, "admin key operation failed");
                database_unavailable()
            }
        }
    }
}

fn database_unavailable() -> AdminError {
    AdminError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
        "the database is unavailable; retry shortly",
    )
}

type Routed = Result<(StatusCode, Value), AdminError>;

impl Admin {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        if !PUBLIC_PATHS.contains(&path.as_str())
            && let Err(err) = self.authorize(request.headers())
        {
            return err.response();
        }
        if path == "/metrics" {
            return metrics(&request, &self.state, &self.status.load());
        }
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return AdminError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    format!("admin request bodies are limited to {MAX_BODY_BYTES} bytes"),
                )
                .response();
            }
        };
        let query = parts.uri.query().unwrap_or("");
        match self.route(&parts.method, &path, query, &body).await {
            Ok((status, value)) => json(status, &value),
            Err(err) => err.response(),
        }
    }

    /// The routing table: method and path to handler. Add routes here.
    async fn route(&self, method: &Method, path: &str, query: &str, body: &Bytes) -> Routed {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (&Method::GET, ["healthz"]) => Ok((StatusCode::OK, json!({"status": "ok"}))),
            (&Method::GET, ["config"]) => Ok((StatusCode::OK, json!(&**self.status.load()))),
            (&Method::GET, ["policy"]) => Ok((StatusCode::OK, self.policy_report())),
            (&Method::GET, ["admin", "projects"]) => self.projects().await,
            (&Method::GET, ["admin", "keys"]) => self.list_keys(query).await,
            (&Method::POST, ["admin", "keys"]) => self.create_key(body).await,
            (&Method::POST, ["admin", "keys", id, "revoke"]) => self.revoke_key(id).await,
            (&Method::POST, ["admin", "keys", id, "rotate"]) => self.rotate_key(id, body).await,
            (&Method::GET, ["admin", "budgets"]) => self.budgets().await,
            (&Method::GET, ["admin", "usage"]) => self.usage(query).await,
            _ => Err(AdminError::new(
                StatusCode::NOT_FOUND,
                "unknown_url",
                format!("no admin route for {method} {path} (see docs/admin-api.yaml)"),
            )),
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), AdminError> {
        let Some(expected) = &self.token_digest else {
            return Err(AdminError::new(
                StatusCode::FORBIDDEN,
                "admin_api_disabled",
                "the admin API is disabled: set `admin_token = \"${GATEWAY_ADMIN_TOKEN}\"` \
                 under [server] and export GATEWAY_ADMIN_TOKEN",
            ));
        };
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .get(..7)
                    .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                    .map(|_| value[7..].trim())
            })
            .filter(|token| !token.is_empty());
        let Some(presented) = presented else {
            return Err(AdminError::new(
                StatusCode::UNAUTHORIZED,
                "missing_admin_token",
                "send the admin token as `Authorization: Bearer TOKEN`",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if bool::from(digest.ct_eq(expected)) {
            return Ok(());
        }
        let snapshot = self.state.snapshot.load();
        // The presented token came from these headers' `Authorization`, which the data plane
        // reads first too.
        if snapshot
            .keys
            .authenticate_with(headers, Some(&self.state.db_keys), SystemTime::now())
            .is_ok()
        {
            return Err(AdminError::new(
                StatusCode::FORBIDDEN,
                "project_key_refused",
                "project API keys are not accepted on the admin API; use the admin token",
            ));
        }
        Err(AdminError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
            "incorrect admin token",
        ))
    }

    fn store(&self) -> Result<&UsageStore, AdminError> {
        self.state.store.as_ref().ok_or_else(|| {
            AdminError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_database",
                "this gateway has no shared database ([database] url is in-memory)",
            )
        })
    }

    fn policy_report(&self) -> Value {
        let mut report = policy_report(&self.state.policy);
        report["auth"] = json!({
            "database_keys": self.state.db_keys.stats(),
            "failure_throttle": self.state.auth_throttle.stats(),
        });
        report
    }

    async fn projects(&self) -> Routed {
        let snapshot = self.state.snapshot.load();
        // Database keys are counted when the database answers; the list still comes from the
        // config when it does not.
        let mut database_keys: Option<BTreeMap<String, usize>> = None;
        if let Some(store) = &self.state.store {
            match store.list_keys(None).await {
                Ok(keys) => {
                    let mut counts = BTreeMap::new();
                    for key in keys
                        .iter()
                        .filter(|k| k.source == "database" && k.status == "active")
                    {
                        *counts.entry(key.project.clone()).or_insert(0) += 1;
                    }
                    database_keys = Some(counts);
                }
                Err(err) => tracing::warn!(error = %err, "counting database keys"),
            }
        }
        let projects: Vec<Value> = snapshot
            .keys
            .projects()
            .iter()
            .map(|project| {
                json!({
                    "name": project.name,
                    "config_keys": project.config_keys,
                    "database_keys": database_keys
                        .as_ref()
                        .map(|counts| counts.get(&project.name).copied().unwrap_or(0)),
                    "models": project.models,
                    "tags": project.tags,
                })
            })
            .collect();
        Ok((StatusCode::OK, json!({"projects": projects})))
    }

    async fn list_keys(&self, query: &str) -> Routed {
        let params = parse_query(query)?;
        let project = params.get("project").map(String::as_str);
        let keys = self.store()?.list_keys(project).await?;
        Ok((StatusCode::OK, json!({"keys": keys})))
    }

    async fn create_key(&self, body: &Bytes) -> Routed {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Create {
            project: String,
            #[serde(default)]
            name: Option<String>,
            #[serde(default)]
            models: Option<Vec<String>>,
            /// `90d`, `24h`...
            #[serde(default)]
            expires: Option<String>,
        }
        let create: Create = parse_body(body)?;
        let expires = create
            .expires
            .as_deref()
            .map(keys::parse_span)
            .transpose()
            .map_err(|message| AdminError::bad_request(message, Some("expires")))?;
        let snapshot = self.state.snapshot.load();
        let new = keys::new_key(
            &snapshot.keys,
            |alias| snapshot.routes.contains(alias),
            &create.project,
            create.name,
            create.models,
            expires,
            "admin",
        )?;
        let created = self.store()?.create_key(&new).await?;
        tracing::info!(key_id = %created.key.key_id, project = %created.key.project, "key created");
        Ok((
            StatusCode::CREATED,
            json!({"key": created.key, "secret": created.secret}),
        ))
    }

    async fn revoke_key(&self, id: &str) -> Routed {
        let key = self.store()?.revoke_key(id).await?;
        tracing::info!(key_id = %id, "key revoked");
        Ok((StatusCode::OK, json!({"key": key})))
    }

    async fn rotate_key(&self, id: &str, body: &Bytes) -> Routed {
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct Rotate {
            /// How long the old key keeps working: `24h` by default.
            #[serde(default)]
            grace: Option<String>,
        }
        let rotate: Rotate = if body.is_empty() {
            Rotate::default()
        } else {
            parse_body(body)?
        };
        let grace = match rotate.grace.as_deref() {
            Some(text) => keys::parse_span(text)
                .map_err(|message| AdminError::bad_request(message, Some("grace")))?,
            None => Duration::from_secs(86_400),
        };
        let store = self.store()?;
        let created = store.rotate_key(id, grace).await?;
        let old = store.get_key(id).await?;
        tracing::info!(key_id = %id, new_key_id = %created.key.key_id, "key rotated");
        Ok((
            StatusCode::CREATED,
            json!({"key": created.key, "secret": created.secret, "old_key": old}),
        ))
    }

    async fn budgets(&self) -> Routed {
        let snapshot = self.state.snapshot.load();
        let now = OffsetDateTime::now_utc();
        let mut budgets = Vec::new();
        for entry in &snapshot.budgets {
            for (period, limit) in [
                (BudgetPeriod::Day, entry.daily_usd),
                (BudgetPeriod::Month, entry.monthly_usd),
            ] {
                if limit.is_none() {
                    continue;
                }
                let usage = self
                    .state
                    .budgets
                    .usage(&entry.project, entry.key.as_deref(), period, now)
                    .await;
                let (spent, reserved, error) = match usage {
                    Ok(Some(usage)) => (
                        Some(report::money(usage.spent)),
                        Some(report::money(usage.reserved)),
                        None,
                    ),
                    Ok(None) => (None, None, None),
                    Err(err) => (None, None, Some(err.to_string())),
                };
                budgets.push(json!({
                    "project": entry.project,
                    "key": entry.key,
                    "period": period.as_str(),
                    "limit_usd": limit.map(report::money),
                    "spent_usd": spent,
                    "reserved_usd": reserved,
                    "error": error,
                }));
            }
        }
        Ok((StatusCode::OK, json!({"budgets": budgets})))
    }

    async fn usage(&self, query: &str) -> Routed {
        let params = parse_query(query)?;
        let day = |name: &'static str| -> Result<time::Date, AdminError> {
            let text = params.get(name).ok_or_else(|| {
                AdminError::bad_request(format!("`{name}` (YYYY-MM-DD) is required"), Some(name))
            })?;
            time::Date::parse(
                text,
                time::macros::format_description!("[year]-[month]-[day]"),
            )
            .map_err(|_| {
                AdminError::bad_request(format!("`{name}` must be YYYY-MM-DD"), Some(name))
            })
        };
        let (from, to) = (day("from")?, day("to")?);
        let group_by = params
            .get("group_by")
            .map_or("project", String::as_str)
            .split(',')
            .filter(|part| !part.trim().is_empty())
            .map(|part| part.trim().parse::<Dimension>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| AdminError::bad_request(err.to_string(), Some("group_by")))?;
        let query = ReportQuery { from, to, group_by };
        let result = report::report(self.store()?, &query).await;
        let report = result.map_err(|err| match err {
            report::ReportError::EmptyRange { .. } => {
                AdminError::bad_request(err.to_string(), Some("from"))
            }
            other => {
                tracing::warn!(error = %other, "admin usage query failed");
                database_unavailable()
            }
        })?;
        Ok((StatusCode::OK, report.to_json()))
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, AdminError> {
    serde_json::from_slice(body)
        .map_err(|err| AdminError::bad_request(format!("invalid JSON body: {err}"), None))
}

/// `a=1&b=x%2Cy` as a map; a key given twice is refused rather than guessed at.
fn parse_query(query: &str) -> Result<BTreeMap<String, String>, AdminError> {
    let mut params = BTreeMap::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)
            .ok_or_else(|| AdminError::bad_request(format!("bad escape in `{name}`"), None))?;
        if params.insert(name.to_owned(), value).is_some() {
            return Err(AdminError::bad_request(
                format!("`{name}` is given twice"),
                None,
            ));
        }
    }
    Ok(params)
}

/// `GET /metrics`.
fn metrics<B>(
    request: &Request<B>,
    state: &AppState,
    status: &ReloadStatus,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return AdminError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "GET /metrics",
        )
        .response();
    }
    match crate::metrics::render(state, status) {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(gateway_observability::metrics::OPENMETRICS_CONTENT_TYPE),
            );
            response
        }
        Err(err) => {
            tracing::error!(error = %err, "encoding the metrics");
            AdminError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the metrics could not be encoded",
            )
            .response()
        }
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = text.get(index + 1..index + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                index += 3;
            }
            b'+' => {
                out.push(b' ');
                index += 1;
            }
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn policy_report(policy: &Policy) -> Value {
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

fn json(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|err| {
        tracing::error!(error = %err, "encoding an admin response");
        br#"{"error":{"message":"internal","type":"api_error","param":null,"code":"internal_error"}}"#
            .to_vec()
    });
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;

    #[test]
    fn queries_decode_and_refuse_repeats() {
        let params = parse_query("project=a%20b&group_by=project%2Cmodel&x=1+2").unwrap();
        assert_eq!(params["project"], "a b");
        assert_eq!(params["group_by"], "project,model");
        assert_eq!(params["x"], "1 2");
        assert!(parse_query("a=1&a=2").is_err());
        assert!(parse_query("a=%zz").is_err());
        assert!(parse_query("a=%4").is_err());
    }

    #[test]
    fn errors_use_the_openai_envelope() {
        let response = AdminError::bad_request("nope", Some("project")).response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let forbidden = AdminError::new(StatusCode::FORBIDDEN, "x", "no");
        assert_eq!(forbidden.response().status(), StatusCode::FORBIDDEN);
    }
}
