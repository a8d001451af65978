//! `kind = "anthropic"`: the Anthropic Messages API, reached through the OpenAI canonical form.
//!
//! Requests are translated by [`crate::anthropic::to_anthropic_request`], answers and streams back to
//! OpenAI format; the key goes in `x-api-key` and the API version in `anthropic-version`.

use crate::anthropic::{
    AnthropicToOpenAi, error_from_anthropic, to_anthropic_request, to_openai_response,
};
use crate::client::{HyperClient, UpstreamClient};
use crate::config::ProviderConfig;
use crate::http::{MAX_ERROR_BYTES, MAX_RESPONSE_BYTES, header_string, read_body};
use crate::rotation::{BaseUrls, Keys, send};
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
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The Messages API version sent when the config names none.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    endpoints: BaseUrls<Uri>,
    keys: Keys,
    version: HeaderValue,
    timeout: Duration,
    client: HyperClient,
}

impl AnthropicProvider {
    pub fn new(
        config: &ProviderConfig,
        client: &UpstreamClient,
        path: &str,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let endpoints = crate::http::endpoints(config, path, "/messages", &mut errors);
        let keys = crate::http::sensitive_values(config, path, |key| key.to_owned(), &mut errors);
        let version = config
            .api_version
            .as_deref()
            .unwrap_or(DEFAULT_ANTHROPIC_VERSION);
        let version = HeaderValue::from_str(version).unwrap_or_else(|_| {
            errors.push(ConfigError::new(
                format!("{path}.api_version"),
                "contains characters not allowed in an HTTP header",
            ));
            HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION)
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                endpoints: BaseUrls::new(endpoints, config.base_url_cooldown()),
                keys: Keys::new(keys, config.key_cooldown(), config.key_revoked_cooldown()),
                version,
                timeout: config.timeout(),
                client: client.client.clone(),
            }),
        })
    }
}

impl ChatProvider for AnthropicProvider {
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

struct Stream(AnthropicToOpenAi);

impl EventTranslator for Stream {
    fn push(&mut self, event: &str, data: &str) -> Result<Vec<StreamEvent>, GatewayError> {
        self.0.push(event, data)
    }
}

impl Inner {
    async fn chat(&self, call: ChatCall) -> Result<ChatReply, GatewayError> {
        let stream = call.request.is_stream();
        let body = to_anthropic_request(&call.request, &call.request.model)?;
        let body = serde_json::to_vec(&body)
            .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))?;
        let key = self.keys.pick();
        let body = Bytes::from(body);
        let response = send(&self.name, &self.client, &self.endpoints, |endpoint| {
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
                .header(
                    HeaderName::from_static("anthropic-version"),
                    self.version.clone(),
                );
            if let Some(key) = &key {
                builder = builder.header(HeaderName::from_static("x-api-key"), key.value.clone());
            }
            builder
                .body(Full::new(body.clone()))
                .map_err(|err| GatewayError::Internal(format!("building the request: {err}")))
        })
        .await?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "request-id");
        let body = response.into_body();
        if !status.is_success() {
            let body = read_body(&self.name, body, MAX_ERROR_BYTES).await;
            self.keys.judge(
                &self.name,
                key.as_ref(),
                status,
                body.as_deref().unwrap_or_default(),
                credit_exhausted,
            );
            let body = body?;
            return Err(error_from_anthropic(&self.name, status, &body));
        }
        let created = time::OffsetDateTime::now_utc().unix_timestamp();
        if stream {
            let events = translated_events(
                self.name.clone(),
                body.into_data_stream(),
                Stream(AnthropicToOpenAi::new(created)),
            )
            .boxed();
            return Ok(ChatReply::Stream(StreamReply {
                vendor_request_id,
                events,
            }));
        }
        let body = read_body(&self.name, body, MAX_RESPONSE_BYTES).await?;
        let translated = to_openai_response(&body, created)?;
        Ok(ChatReply::Complete(CompleteReply {
            body: translated.body,
            usage: translated.usage,
            vendor_response_id: translated.response_id,
            vendor_request_id,
        }))
    }
}

/// Anthropic reports an account out of credit as a `billing_error`, or as an
/// `invalid_request_error` whose message is about the credit balance. Either way no wait of
/// seconds fixes it, unlike a `rate_limit_error`.
fn credit_exhausted(body: &Value) -> bool {
    let Some(error) = body.get("error") else {
        return false;
    };
    error.get("type").and_then(Value::as_str) == Some("billing_error")
        || error
            .get("message")
            .and_then(Value::as_str)
            .is_some_and(|message| message.to_ascii_lowercase().contains("credit balance"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn billing_errors_are_told_from_rate_limits() {
        let billing = json!({"type": "error", "error": {"type": "billing_error",
            "message": "There is an issue with your billing."}});
        assert!(credit_exhausted(&billing));
        let credit = json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}});
        assert!(credit_exhausted(&credit));
        let rate_limit = json!({"type": "error", "error": {"type": "rate_limit_error",
            "message": "Number of request tokens has exceeded your per-minute rate limit"}});
        assert!(!credit_exhausted(&rate_limit));
        let overloaded = json!({"type": "error", "error": {"type": "overloaded_error",
            "message": "Overloaded"}});
        assert!(!credit_exhausted(&overloaded));
    }
}
