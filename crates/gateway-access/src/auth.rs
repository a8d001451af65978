//! `AuthLayer`: authenticates every request except the configured public paths.
//!
//! The key store is read from the request's extensions, where the composing crate put the
//! config snapshot's store when the request arrived: one request, one config version. The
//! database keys and the failure throttle belong to the process and are given at build time.
//!
//! A client IP that failed too often is refused before its key is even hashed, so a guessing
//! flood costs a map probe per request.

use crate::directory::DbKeys;
use crate::keys::KeyStore;
use crate::throttle::{AuthThrottle, throttle_key};
use futures_util::future::{Either, Ready, ready};
use gateway_core::trace::otel::KeyValue;
use gateway_core::trace::otel::trace::{Span as _, SpanKind, Status};
use gateway_core::trace::{Span, attr};
use gateway_core::{GatewayError, Principal, RequestContext};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};
use tower::{Layer, Service};

#[derive(Debug, Clone)]
pub struct AuthLayer {
    public_paths: Arc<[&'static str]>,
    db_keys: Option<Arc<DbKeys>>,
    throttle: Option<Arc<AuthThrottle>>,
}

impl AuthLayer {
    /// `public_paths` are served without a key (health checks).
    pub fn new(public_paths: &[&'static str]) -> Self {
        Self {
            public_paths: public_paths.into(),
            db_keys: None,
            throttle: None,
        }
    }

    /// Also accepts the keys of the database, looked up after the config's.
    #[must_use]
    pub fn with_db_keys(mut self, db_keys: Arc<DbKeys>) -> Self {
        self.db_keys = Some(db_keys);
        self
    }

    /// Counts refused keys per client IP and refuses IPs that failed too often.
    #[must_use]
    pub fn with_throttle(mut self, throttle: Arc<AuthThrottle>) -> Self {
        self.throttle = Some(throttle);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            public_paths: self.public_paths.clone(),
            db_keys: self.db_keys.clone(),
            throttle: self.throttle.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    public_paths: Arc<[&'static str]>,
    db_keys: Option<Arc<DbKeys>>,
    throttle: Option<Arc<AuthThrottle>>,
}

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Error = GatewayError>,
{
    type Response = S::Response;
    type Error = GatewayError;
    type Future = Either<S::Future, Ready<Result<S::Response, GatewayError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if self.public_paths.contains(&request.uri().path()) {
            return Either::Left(self.inner.call(request));
        }
        let Some(store) = request.extensions().get::<Arc<KeyStore>>() else {
            return Either::Right(ready(Err(GatewayError::Internal(
                "no key store for this request".into(),
            ))));
        };
        let ip = throttle_key(&request);
        if let (Some(throttle), Some(ip)) = (&self.throttle, ip)
            && let Some(wait) = throttle.check(ip, Instant::now())
        {
            return Either::Right(ready(Err(GatewayError::RateLimited {
                message: "Too many requests with invalid API keys from this address; retry later."
                    .into(),
                dimension: "requests",
                retry_after: wait,
                headers: Box::default(),
            })));
        }
        let context = request.extensions().get::<Arc<RequestContext>>().cloned();
        let span = context
            .as_ref()
            .and_then(|context| context.start_span("auth", SpanKind::Internal));
        let result = store.authenticate_with(
            request.headers(),
            self.db_keys.as_deref(),
            SystemTime::now(),
        );
        if let Some(span) = span {
            end_auth_span(span, &result);
        }
        match result {
            Ok(principal) => {
                if let Some(context) = context {
                    context.outcome().principal = Some(principal.clone());
                }
                request.extensions_mut().insert(principal);
                Either::Left(self.inner.call(request))
            }
            Err(err) => {
                if let (Some(throttle), Some(ip)) = (&self.throttle, ip) {
                    throttle.record_failure(ip, Instant::now());
                }
                Either::Right(ready(Err(err)))
            }
        }
    }
}

/// The auth span says who the caller is (project and key id, never the key) or why not.
fn end_auth_span(mut span: Span, result: &Result<Principal, GatewayError>) {
    match result {
        Ok(principal) => span.set_attributes([
            KeyValue::new(attr::GATEWAY_PROJECT, principal.project.to_string()),
            KeyValue::new(attr::GATEWAY_KEY_ID, principal.key_id.to_string()),
        ]),
        Err(err) => {
            span.set_attribute(KeyValue::new(attr::ERROR_TYPE, err.error_type().as_str()));
            span.set_status(Status::error(err.error_type().as_str()));
        }
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApiKeyConfig, ProjectConfig};
    use crate::keys::hash_key;
    use tower::{ServiceExt, service_fn};

    fn store() -> Arc<KeyStore> {
        Arc::new(
            KeyStore::build(&[ProjectConfig {
                name: "p".into(),
                api_keys: vec![ApiKeyConfig {
                    id: "k".into(),
                    sha256: hash_key("sk-good"),
                    rate_limit: None,
                }],
                models: None,
                tags: Default::default(),
                rate_limit: None,
                capture_prompts: false,
                capture_responses: false,
            }])
            .unwrap(),
        )
    }

    fn request(path: &str, key: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(path);
        if let Some(key) = key {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        let mut request = builder.body(()).unwrap();
        request.extensions_mut().insert(store());
        request
    }

    async fn call(request: http::Request<()>) -> Result<Option<String>, GatewayError> {
        let service = AuthLayer::new(&["/healthz"]).layer(service_fn(
            |request: http::Request<()>| async move {
                Ok::<_, GatewayError>(
                    request
                        .extensions()
                        .get::<Principal>()
                        .map(|p| p.project.to_string()),
                )
            },
        ));
        service.oneshot(request).await
    }

    #[tokio::test]
    async fn good_key_reaches_inner_service_with_principal() {
        let seen = call(request("/v1/models", Some("sk-good"))).await.unwrap();
        assert_eq!(seen.as_deref(), Some("p"));
    }

    #[tokio::test]
    async fn bad_key_never_reaches_inner_service() {
        let err = call(request("/v1/models", Some("sk-bad")))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        let err = call(request("/v1/models", None)).await.unwrap_err();
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn public_paths_need_no_key() {
        assert_eq!(call(request("/healthz", None)).await.unwrap(), None);
    }

    fn db_keys(expires_at: Option<SystemTime>, models: Option<Vec<String>>) -> Arc<DbKeys> {
        let keys = DbKeys::new();
        keys.apply(gateway_core::KeySet {
            version: 1,
            keys: vec![gateway_core::DirectoryKey {
                project: "p".into(),
                key_id: "key_db".into(),
                sha256: sha2::Sha256::digest(b"sk-gw-db").into(),
                models,
                expires_at,
            }],
        });
        Arc::new(keys)
    }

    async fn call_with(
        layer: &AuthLayer,
        request: http::Request<()>,
    ) -> Result<Principal, GatewayError> {
        let service = layer.layer(service_fn(|request: http::Request<()>| async move {
            Ok::<_, GatewayError>(request.extensions().get::<Principal>().unwrap().clone())
        }));
        service.oneshot(request).await
    }

    fn with_header(name: &str, value: &str) -> http::Request<()> {
        let mut request = http::Request::builder()
            .uri("/v1/models")
            .header(name, value)
            .body(())
            .unwrap();
        request.extensions_mut().insert(store());
        request
    }

    use sha2::Digest as _;
    use std::time::Duration;

    #[tokio::test]
    async fn database_keys_work_through_every_key_header() {
        let layer = AuthLayer::new(&[]).with_db_keys(db_keys(None, None));
        for (name, value) in [
            ("authorization", "Bearer sk-gw-db"),
            ("x-api-key", "sk-gw-db"),
            ("api-key", "sk-gw-db"),
        ] {
            let principal = call_with(&layer, with_header(name, value)).await.unwrap();
            assert_eq!(&*principal.key_id, "key_db", "{name}");
            assert_eq!(&*principal.project, "p");
        }
        // Config keys still work next to them; unknown keys still fail.
        let principal = call_with(&layer, with_header("x-api-key", "sk-good"))
            .await
            .unwrap();
        assert_eq!(&*principal.key_id, "k");
        assert!(
            call_with(&layer, with_header("x-api-key", "sk-gw-nope"))
                .await
                .is_err()
        );
        // Without the cache a database key is unknown.
        assert!(
            call_with(&AuthLayer::new(&[]), with_header("x-api-key", "sk-gw-db"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn expiry_is_checked_per_request_and_models_narrow_the_project() {
        let past = SystemTime::now() - Duration::from_secs(1);
        let layer = AuthLayer::new(&[]).with_db_keys(db_keys(Some(past), None));
        let err = call_with(&layer, with_header("api-key", "sk-gw-db"))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        assert!(err.to_string().contains("expired"), "{err}");

        let future = SystemTime::now() + Duration::from_secs(60);
        let layer =
            AuthLayer::new(&[]).with_db_keys(db_keys(Some(future), Some(vec!["chat".into()])));
        let principal = call_with(&layer, with_header("api-key", "sk-gw-db"))
            .await
            .unwrap();
        assert!(principal.may_use("chat"));
        assert!(!principal.may_use("other"));
    }

    #[tokio::test]
    async fn an_ip_that_keeps_failing_gets_429_even_with_a_good_key() {
        let throttle = Arc::new(AuthThrottle::new(&crate::AuthFailureConfig {
            max_failures: 3,
            window_secs: 60,
            max_tracked_ips: 100,
        }));
        let layer = AuthLayer::new(&["/healthz"]).with_throttle(throttle.clone());
        let from = |ip: [u8; 4], key: &str| {
            let mut request = with_header("authorization", &format!("Bearer {key}"));
            request
                .extensions_mut()
                .insert(gateway_core::PeerAddr((ip, 4000).into()));
            request
        };
        for _ in 0..3 {
            let err = call_with(&layer, from([10, 0, 0, 1], "sk-bad"))
                .await
                .unwrap_err();
            assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        }
        let err = call_with(&layer, from([10, 0, 0, 1], "sk-good"))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = err
            .retry_after()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((59..=60).contains(&retry_after), "{retry_after}");
        // Another address is not affected.
        assert!(
            call_with(&layer, from([10, 0, 0, 2], "sk-good"))
                .await
                .is_ok()
        );
        assert_eq!(throttle.stats().throttled, 1);
    }
}
