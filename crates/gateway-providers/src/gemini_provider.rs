//! `kind = "gemini"`: Google's Gemini API (`generateContent`, `streamGenerateContent?alt=sse`),
//! reached through the OpenAI canonical form.
//!
//! The key goes in the `x-goog-api-key` header, never in the URL, where proxies and access
//! logs would keep it.

use crate::client::{HyperClient, UpstreamClient};
use crate::config::ProviderConfig;
use crate::gemini::{GeminiToOpenAi, error_from_gemini, to_gemini_request, to_openai_response};
use crate::http::{
    MAX_ERROR_BYTES, MAX_RESPONSE_BYTES, endpoints, header_string, is_url_safe, read_body,
    sensitive_values, unavailable,
};
use crate::sse::{EventTranslator, translated_events};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use gateway_core::GatewayError;
use gateway_core::config::ConfigError;
use gateway_core::provider::{
    ChatCall, ChatProvider, ChatReply, CompleteReply, StreamEvent, StreamReply,
};
use http::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct GeminiProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    /// Base URLs ending in the API version (`.../v1beta`); the model and method are per call.
    bases: Vec<String>,
    keys: Vec<HeaderValue>,
    next: AtomicUsize,
    timeout: Duration,
    client: HyperClient,
}

impl GeminiProvider {
    pub fn new(
        config: &ProviderConfig,
        client: &UpstreamClient,
        path: &str,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        // Parsed for validation only: the URL is completed per call with the model.
        let valid = endpoints(config, path, "", &mut errors);
        let bases = valid
            .iter()
            .map(|uri| uri.to_string().trim_end_matches('/').to_owned())
            .collect();
        let keys = sensitive_values(config, path, str::to_owned, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                bases,
                keys,
                next: AtomicUsize::new(0),
                timeout: config.timeout(),
                client: client.client.clone(),
            }),
        })
    }
}

impl ChatProvider for GeminiProvider {
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

struct Stream(GeminiToOpenAi);

impl EventTranslator for Stream {
    fn push(&mut self, _event: &str, data: &str) -> Result<Vec<StreamEvent>, GatewayError> {
        self.0.push(data)
    }

    fn finish(&mut self) -> Vec<StreamEvent> {
        self.0.finish()
    }
}

impl Inner {
    async fn chat(&self, call: ChatCall) -> Result<ChatReply, GatewayError> {
        let stream = call.request.is_stream();
        let model = call
            .request
            .model
            .strip_prefix("models/")
            .unwrap_or(&call.request.model)
            .to_owned();
        if !is_url_safe(&model) {
            return Err(GatewayError::Internal(format!(
                "gemini model name `{model}` is not URL-safe"
            )));
        }
        let body = to_gemini_request(&call.request)?;
        let body = serde_json::to_vec(&body)
            .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))?;
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let base = &self.bases[turn % self.bases.len()];
        let url = if stream {
            format!("{base}/models/{model}:streamGenerateContent?alt=sse")
        } else {
            format!("{base}/models/{model}:generateContent")
        };
        let uri = url
            .parse::<Uri>()
            .map_err(|err| GatewayError::Internal(format!("gemini URL: {err}")))?;
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                ACCEPT,
                HeaderValue::from_static(if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                }),
            );
        if !self.keys.is_empty() {
            builder = builder.header(
                HeaderName::from_static("x-goog-api-key"),
                self.keys[turn % self.keys.len()].clone(),
            );
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|err| GatewayError::Internal(format!("building the request: {err}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| unavailable(&self.name, &err))?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "x-goog-request-id");
        let body = response.into_body();
        if !status.is_success() {
            let body = read_body(&self.name, body, MAX_ERROR_BYTES).await?;
            return Err(error_from_gemini(&self.name, status, &body));
        }
        let created = time::OffsetDateTime::now_utc().unix_timestamp();
        if stream {
            let events = translated_events(
                self.name.clone(),
                body.into_data_stream(),
                Stream(GeminiToOpenAi::new(&model, created)),
            )
            .boxed();
            return Ok(ChatReply::Stream(StreamReply {
                vendor_request_id,
                events,
            }));
        }
        let body = read_body(&self.name, body, MAX_RESPONSE_BYTES).await?;
        let translated = to_openai_response(&body, &model, created)?;
        Ok(ChatReply::Complete(CompleteReply {
            body: translated.body,
            usage: translated.usage,
            vendor_response_id: translated.response_id,
            vendor_request_id,
        }))
    }
}
