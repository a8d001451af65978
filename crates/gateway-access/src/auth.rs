//! `AuthLayer`: authenticates every request except the configured public paths.
//!
//! The key store is read from the request's extensions, where the composing crate put the
//! config snapshot's store when the request arrived: one request, one config version.

use crate::keys::KeyStore;
use futures_util::future::{Either, Ready, ready};
use gateway_core::{GatewayError, RequestContext};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

#[derive(Debug, Clone)]
pub struct AuthLayer {
    public_paths: Arc<[&'static str]>,
}

impl AuthLayer {
    /// `public_paths` are served without a key (health checks).
    pub fn new(public_paths: &[&'static str]) -> Self {
        Self {
            public_paths: public_paths.into(),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            public_paths: self.public_paths.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    public_paths: Arc<[&'static str]>,
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
        match store.authenticate(request.headers()) {
            Ok(principal) => {
                if let Some(context) = request.extensions().get::<Arc<RequestContext>>() {
                    context.outcome().principal = Some(principal.clone());
                }
                request.extensions_mut().insert(principal);
                Either::Left(self.inner.call(request))
            }
            Err(err) => Either::Right(ready(Err(err))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApiKeyConfig, ProjectConfig};
    use crate::keys::hash_key;
    use gateway_core::Principal;
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
}
