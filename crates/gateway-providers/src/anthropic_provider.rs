//! `kind = "anthropic"`: the Anthropic Messages API, reached through the OpenAI canonical form.
//!
//! Requests are translated by [`crate::anthropic::to_anthropic_request`], answers and streams back to
//! OpenAI format; the key goes in `x-api-key` and the API version in `anthropic-version`.

use crate::anthropic::{
    AnthropicToOpenAi, error_from_anthropic, to_anthropic_request, to_openai_response,
};
use crate::client::{HyperClient, UpstreamClient};
use crate::config::ProviderConfig;
use crate::http::{MAX_ERROR_BYTES, MAX_RESPONSE_BYTES, header_string, read_body, with_trace};
use crate::rotation::{BaseUrls, Key, Keys, send};
use crate::sse::{EventTranslator, translated_events};
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use gateway_core::GatewayError;
use gateway_core::config::ConfigError;
use gateway_core::provider::{
    ChatCall, ChatProvider, ChatReply, CompleteReply, ForwardBody, ForwardCall, ForwardChunk,
    ForwardReply, NativeApi, StreamEvent, StreamReply,
};
use gateway_core::trace::TraceHeaders;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
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
        let keys = Keys::from_config(config, path, str::to_owned, &mut errors);
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
                keys,
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

    fn native_apis(&self) -> &'static [NativeApi] {
        &[NativeApi::AnthropicMessages]
    }

    fn forward(&self, call: ForwardCall) -> BoxFuture<'static, Result<ForwardReply, GatewayError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.forward(call).await })
    }
}

struct Stream(AnthropicToOpenAi);

impl EventTranslator for Stream {
    fn push(&mut self, event: &str, data: &str) -> Result<Vec<StreamEvent>, GatewayError> {
        self.0.push(event, data)
    }
}

impl Inner {
    /// Sends a Messages API body to the first reachable base URL with one of the keys. `client`
    /// holds the client headers to pass on (`anthropic-beta`, and `anthropic-version` when the
    /// client chose one).
    async fn post(
        &self,
        body: Bytes,
        stream: bool,
        client: &http::HeaderMap,
        beta: bool,
        trace: Option<&TraceHeaders>,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, Option<Key>), GatewayError> {
        let key = self.keys.pick();
        let version = client
            .get("anthropic-version")
            .cloned()
            .unwrap_or_else(|| self.version.clone());
        let response = send(&self.name, &self.client, &self.endpoints, |endpoint| {
            let mut builder = Request::builder()
                .method(Method::POST)
                .uri(if beta {
                    format!("{endpoint}?beta=true")
                        .parse::<Uri>()
                        .map_err(|err| GatewayError::Internal(format!("URL: {err}")))?
                } else {
                    endpoint.clone()
                })
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
                    version.clone(),
                );
            builder = with_trace(builder, trace);
            for beta in client.get_all("anthropic-beta") {
                builder = builder.header(HeaderName::from_static("anthropic-beta"), beta.clone());
            }
            if let Some(key) = &key {
                builder = builder.header(HeaderName::from_static("x-api-key"), key.value.clone());
            }
            builder
                .body(Full::new(body.clone()))
                .map_err(|err| GatewayError::Internal(format!("building the request: {err}")))
        })
        .await?;
        Ok((response, key))
    }

    /// Reads an error answer and notes whether it condemns the key.
    async fn error_body(
        &self,
        status: http::StatusCode,
        body: hyper::body::Incoming,
        key: Option<&Key>,
    ) -> Result<Bytes, GatewayError> {
        let body = read_body(&self.name, body, MAX_ERROR_BYTES).await;
        self.keys.judge(
            &self.name,
            key,
            status,
            body.as_deref().unwrap_or_default(),
            credit_exhausted,
        );
        body
    }

    async fn chat(&self, call: ChatCall) -> Result<ChatReply, GatewayError> {
        let stream = call.request.is_stream();
        let body = to_anthropic_request(&call.request, &call.request.model)?;
        let body = serde_json::to_vec(&body)
            .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))?;
        let (response, key) = self
            .post(
                Bytes::from(body),
                stream,
                &http::HeaderMap::new(),
                false,
                call.trace.as_ref(),
            )
            .await?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "request-id");
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = response.into_body();
        if !status.is_success() {
            let body = self.error_body(status, body, key.as_ref()).await?;
            return Err(error_from_anthropic(&self.name, status, &body)
                .with_retry_after(retry_after.as_ref()));
        }
        let created = time::OffsetDateTime::now_utc().unix_timestamp();
        if stream {
            let events = translated_events(
                self.name.clone(),
                body.into_data_stream(),
                Stream(AnthropicToOpenAi::new(created).with_provider(&self.name)),
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

    /// A Messages API request from an Anthropic client, sent as it came (model replaced). The
    /// answer goes back unchanged; the translator only reads it, for usage.
    async fn forward(&self, call: ForwardCall) -> Result<ForwardReply, GatewayError> {
        let (response, key) = self
            .post(
                call.body,
                call.stream,
                &call.headers,
                call.beta,
                call.trace.as_ref(),
            )
            .await?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "request-id");
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = response.into_body();
        if !status.is_success() {
            let bytes = self.error_body(status, body, key.as_ref()).await?;
            return Ok(ForwardReply {
                status,
                content_type,
                retry_after,
                vendor_request_id,
                body: ForwardBody::Complete {
                    bytes,
                    usage: None,
                    response_id: None,
                },
            });
        }
        if call.stream {
            let chunks = forwarded_events(self.name.clone(), body.into_data_stream()).boxed();
            return Ok(ForwardReply {
                status,
                content_type,
                retry_after: None,
                vendor_request_id,
                body: ForwardBody::Stream(chunks),
            });
        }
        let bytes = read_body(&self.name, body, MAX_RESPONSE_BYTES).await?;
        let translated = to_openai_response(&bytes, 0).ok();
        Ok(ForwardReply {
            status,
            content_type,
            retry_after: None,
            vendor_request_id,
            body: ForwardBody::Complete {
                usage: translated.as_ref().and_then(|t| t.usage),
                response_id: translated.and_then(|t| t.response_id),
                bytes,
            },
        })
    }
}

/// Re-frames each vendor event unchanged, reading its usage on the way.
fn forwarded_events<S, E>(
    provider: String,
    body: S,
) -> impl futures_util::Stream<Item = Result<ForwardChunk, GatewayError>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut accounting = AnthropicToOpenAi::new(0).with_provider(&provider);
    let mut response_id = None;
    body.eventsource().map(move |event| {
        let event = event.map_err(|err| GatewayError::UpstreamUnavailable {
            provider: provider.clone(),
            reason: format!("stream interrupted: {err}"),
        })?;
        // Translation errors (a vendor `error` event among them) do not stop the forwarding:
        // the client gets the vendor's own event and handles it as it would from the vendor.
        if let Ok(translated) = accounting.push(&event.event, &event.data)
            && response_id.is_none()
        {
            response_id = translated.iter().find_map(|e| e.response_id.clone());
        }
        let usage_known = matches!(event.event.as_str(), "message_delta" | "message_stop");
        Ok(ForwardChunk {
            bytes: crate::sse::reframe(&event),
            usage: usage_known.then(|| accounting.usage()),
            response_id: response_id.clone(),
            first_output: event.event == "content_block_delta",
            last: event.event == "message_stop",
        })
    })
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
