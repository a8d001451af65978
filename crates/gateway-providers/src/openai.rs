//! `kind = "openai"`: OpenAI and every OpenAI-compatible API.
//!
//! The request is forwarded as the client sent it, with only `model` replaced (and, for
//! streams, `stream_options.include_usage` switched on so every stream can be billed). The
//! response body is forwarded unchanged; the gateway only reads its `id` and `usage`.

use crate::client::{HyperClient, UpstreamClient};
use crate::config::ProviderConfig;
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
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Largest vendor body read whole (a non-streamed completion or an error).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Error bodies are only relayed; a few kilobytes carry the message.
const MAX_ERROR_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    endpoints: Vec<Uri>,
    /// Ready-made `Bearer KEY` values, marked sensitive so hyper never logs them.
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
        if config.base_urls.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.base_urls"),
                "an openai provider needs at least one base URL",
            ));
        }
        let mut endpoints = Vec::new();
        for (index, base) in config.base_urls.iter().enumerate() {
            let url = format!("{}/chat/completions", base.trim_end_matches('/'));
            match url.parse::<Uri>() {
                Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) => {
                    endpoints.push(uri);
                }
                _ => errors.push(ConfigError::new(
                    format!("{path}.base_urls[{index}]"),
                    format!("`{base}` is not an http(s) URL"),
                )),
            }
        }
        let mut authorizations = Vec::new();
        for (index, key) in config.api_keys.iter().enumerate() {
            match HeaderValue::from_str(&format!("Bearer {}", key.expose())) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    authorizations.push(value);
                }
                Err(_) => errors.push(ConfigError::new(
                    format!("{path}.api_keys[{index}]"),
                    "contains characters not allowed in an HTTP header",
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                name: config.name.clone(),
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
        let endpoint = &self.endpoints[turn % self.endpoints.len()];
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(endpoint.clone())
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
                AUTHORIZATION,
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
            .map_err(|err| self.unavailable(&err))?;
        let status = response.status();
        let vendor_request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body();

        if !status.is_success() {
            let body = self.read_body(body, MAX_ERROR_BYTES).await?;
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
        let body = self.read_body(body, MAX_RESPONSE_BYTES).await?;
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

    async fn read_body(&self, body: Incoming, limit: usize) -> Result<Bytes, GatewayError> {
        Limited::new(body, limit)
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .map_err(|err| GatewayError::UpstreamUnavailable {
                provider: self.name.clone(),
                reason: format!("reading the response: {err}"),
            })
    }

    fn unavailable(&self, err: &hyper_util::client::legacy::Error) -> GatewayError {
        // The legacy client's error hides its cause behind `source()`; the chain says what
        // actually failed (refused, reset, DNS, TLS).
        let mut reason = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        GatewayError::UpstreamUnavailable {
            provider: self.name.clone(),
            reason,
        }
    }
}
