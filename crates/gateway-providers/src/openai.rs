//! `kind = "openai"`: OpenAI and every OpenAI-compatible API; `kind = "azure"`: Azure OpenAI,
//! the same wire format behind deployment URLs and an `api-key` header.
//!
//! The request is forwarded as the client sent it, with only `model` replaced (and, for
//! streams, `stream_options.include_usage` switched on so every stream can be billed). The
//! response body is forwarded unchanged; the gateway only reads its `id` and `usage`.

use crate::client::{HyperClient, UpstreamClient};
use crate::config::{ProviderConfig, ProviderKind};
use crate::http::{
    MAX_ERROR_BYTES, MAX_RESPONSE_BYTES, endpoints, header_string, is_url_safe, read_body,
    sensitive_values, unavailable,
};
use crate::sse::openai_events;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use gateway_core::GatewayError;
use gateway_core::config::ConfigError;
use gateway_core::openai::CompletionSummary;
use gateway_core::provider::{ChatCall, ChatProvider, ChatReply, CompleteReply, StreamReply};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Flavour {
    OpenAi,
    Azure { api_version: String },
}

#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    flavour: Flavour,
    /// OpenAI: the chat completions URLs. Azure: the base URLs (the deployment is per call).
    endpoints: Vec<Uri>,
    /// Ready-made auth header values (`Bearer KEY`, or Azure's bare key), marked sensitive so
    /// hyper never logs them.
    authorizations: Vec<HeaderValue>,
    next: AtomicUsize,
    timeout: Duration,
    client: HyperClient,
}

impl OpenAiProvider {
    pub fn new(
        config: &ProviderConfig,
        client: &UpstreamClient,
        path: &str,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let flavour = match config.kind {
            ProviderKind::Azure => match config.api_version.as_deref() {
                Some(version) if is_url_safe(version) => Flavour::Azure {
                    api_version: version.to_owned(),
                },
                Some(_) => {
                    errors.push(ConfigError::new(
                        format!("{path}.api_version"),
                        "may only contain letters, digits, `-`, `_` and `.`",
                    ));
                    Flavour::OpenAi
                }
                None => {
                    errors.push(ConfigError::new(
                        format!("{path}.api_version"),
                        "an azure provider needs an api_version (e.g. \"2024-10-21\")",
                    ));
                    Flavour::OpenAi
                }
            },
            _ => Flavour::OpenAi,
        };
        let suffix = match flavour {
            Flavour::OpenAi => "/chat/completions",
            // The deployment is part of the path, so the rest is built per call.
            Flavour::Azure { .. } => "",
        };
        let endpoints = endpoints(config, path, suffix, &mut errors);
        let authorizations = sensitive_values(
            config,
            path,
            |key| match flavour {
                Flavour::OpenAi => format!("Bearer {key}"),
                Flavour::Azure { .. } => key.to_owned(),
            },
            &mut errors,
        );
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                flavour,
                endpoints,
                authorizations,
                next: AtomicUsize::new(0),
                timeout: config.timeout(),
                client: client.client.clone(),
            }),
        })
    }
}

impl ChatProvider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn chat(&self, call: ChatCall) -> BoxFuture<'static, Result<ChatReply, GatewayError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.chat(call).await })
    }
}

impl Inner {
    async fn chat(&self, call: ChatCall) -> Result<ChatReply, GatewayError> {
        let ChatCall {
            mut request,
            request_id,
        } = call;
        let stream = request.is_stream();
        if stream {
            request
                .stream_options
                .get_or_insert_with(Default::default)
                .include_usage = Some(true);
        }
        let body = serde_json::to_vec(&request)
            .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))?;

        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let base = &self.endpoints[turn % self.endpoints.len()];
        let endpoint = match &self.flavour {
            Flavour::OpenAi => base.clone(),
            Flavour::Azure { api_version } => {
                // The deployment comes from the routing config, never from the client, but a
                // name that would change the URL's shape is still refused.
                if !is_url_safe(&request.model) {
                    return Err(GatewayError::Internal(format!(
                        "azure deployment name `{}` is not URL-safe",
                        request.model
                    )));
                }
                format!(
                    "{}/openai/deployments/{}/chat/completions?api-version={api_version}",
                    base.to_string().trim_end_matches('/'),
                    request.model
                )
                .parse::<Uri>()
                .map_err(|err| GatewayError::Internal(format!("azure URL: {err}")))?
            }
        };
        let auth_header = match self.flavour {
            Flavour::OpenAi => AUTHORIZATION,
            Flavour::Azure { .. } => http::header::HeaderName::from_static("api-key"),
        };
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(endpoint)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                ACCEPT,
                HeaderValue::from_static(if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                }),
            )
            // OpenAI's header for a caller-chosen id: lets a vendor ticket be matched to ours.
            .header("x-client-request-id", request_id.to_header_value());
        if !self.authorizations.is_empty() {
            builder = builder.header(
                auth_header,
                self.authorizations[turn % self.authorizations.len()].clone(),
            );
        }
        let upstream_request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|err| GatewayError::Internal(format!("building the request: {err}")))?;

        let response = self
            .client
            .request(upstream_request)
            .await
            .map_err(|err| unavailable(&self.name, &err))?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "x-request-id");
        let body = response.into_body();

        if !status.is_success() {
            let body = read_body(&self.name, body, MAX_ERROR_BYTES).await?;
            return Err(GatewayError::UpstreamStatus {
                provider: self.name.clone(),
                status,
                body,
            });
        }
        if stream {
            let events = openai_events(self.name.clone(), body.into_data_stream()).boxed();
            return Ok(ChatReply::Stream(StreamReply {
                vendor_request_id,
                events,
            }));
        }
        let body = read_body(&self.name, body, MAX_RESPONSE_BYTES).await?;
        let summary =
            CompletionSummary::parse(&body).ok_or_else(|| GatewayError::UpstreamProtocol {
                provider: self.name.clone(),
                reason: "the completion is not valid JSON".into(),
            })?;
        Ok(ChatReply::Complete(CompleteReply {
            body,
            usage: summary.usage,
            vendor_response_id: summary.id,
            vendor_request_id,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_needs_a_url_safe_api_version() {
        let client = UpstreamClient::new(Duration::from_secs(1)).unwrap();
        let config = |version: Option<&str>| ProviderConfig {
            name: "az".into(),
            kind: ProviderKind::Azure,
            base_urls: vec!["https://example.openai.azure.com".into()],
            api_keys: vec![crate::Secret::new("k")],
            api_version: version.map(str::to_owned),
            timeout_secs: 60,
        };
        assert!(OpenAiProvider::new(&config(Some("2024-10-21")), &client, "p").is_ok());
        for bad in [None, Some("2024&x=1")] {
            let errors = OpenAiProvider::new(&config(bad), &client, "providers[0]").unwrap_err();
            assert_eq!(errors[0].path, "providers[0].api_version");
        }
    }
}
