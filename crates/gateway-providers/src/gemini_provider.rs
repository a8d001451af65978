//! `kind = "gemini"`: Google's Gemini API (`generateContent`, `streamGenerateContent?alt=sse`),
//! reached through the OpenAI canonical form.
//!
//! The key goes in the `x-goog-api-key` header, never in the URL, where proxies and access
//! logs would keep it.

use crate::client::{HyperClient, UpstreamClient};
use crate::config::ProviderConfig;
use crate::gemini::{
    EmbeddingEncoding, GeminiToOpenAi, error_from_gemini, to_gemini_embeddings_request,
    to_gemini_request, to_openai_embeddings_response_encoded, to_openai_response,
};
use crate::http::{
    MAX_ERROR_BYTES, MAX_RESPONSE_BYTES, endpoints, header_string, is_url_safe, read_body,
    with_trace,
};
use crate::rotation::{BaseUrls, Keys, send};
use crate::sse::{EventTranslator, translated_events};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use gateway_core::GatewayError;
use gateway_core::config::ConfigError;
use gateway_core::provider::{
    ChatCall, ChatProvider, ChatReply, CompleteReply, EmbeddingsCall, StreamEvent, StreamReply,
};
use gateway_core::trace::TraceHeaders;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct GeminiProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    /// Base URLs ending in the API version (`.../v1beta`); the model and method are per call.
    bases: BaseUrls<String>,
    keys: Keys,
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
        let bases: Vec<String> = valid
            .iter()
            .map(|uri| uri.to_string().trim_end_matches('/').to_owned())
            .collect();
        let keys = Keys::from_config(config, path, str::to_owned, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                bases: BaseUrls::new(bases, config.base_url_cooldown()),
                keys,
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

    fn embeddings(
        &self,
        call: EmbeddingsCall,
    ) -> BoxFuture<'static, Result<CompleteReply, GatewayError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.embeddings(call).await })
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
    /// The model as it goes in the URL (Gemini names may be given as `models/NAME`).
    fn url_model(model: &str) -> Result<String, GatewayError> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        if is_url_safe(model) {
            Ok(model.to_owned())
        } else {
            Err(GatewayError::Internal(format!(
                "gemini model name `{model}` is not URL-safe"
            )))
        }
    }

    /// Sends `body` to `{base}/models/{model}:{method}` on the first reachable base URL. A
    /// vendor error comes back as the gateway error it maps to, after noting whether it
    /// condemns the key.
    async fn post(
        &self,
        model: &str,
        method: &str,
        body: &serde_json::Value,
        stream: bool,
        trace: Option<&TraceHeaders>,
    ) -> Result<(Option<String>, hyper::body::Incoming), GatewayError> {
        let body = serde_json::to_vec(body)
            .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))?;
        let key = self.keys.pick();
        let body = Bytes::from(body);
        let response = send(&self.name, &self.client, &self.bases, |base| {
            let uri = format!("{base}/models/{model}:{method}")
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
            builder = with_trace(builder, trace);
            if let Some(key) = &key {
                builder =
                    builder.header(HeaderName::from_static("x-goog-api-key"), key.value.clone());
            }
            builder
                .body(Full::new(body.clone()))
                .map_err(|err| GatewayError::Internal(format!("building the request: {err}")))
        })
        .await?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "x-goog-request-id");
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = response.into_body();
        if !status.is_success() {
            let body = read_body(&self.name, body, MAX_ERROR_BYTES).await;
            self.keys.judge(
                &self.name,
                key.as_ref(),
                status,
                body.as_deref().unwrap_or_default(),
                quota_exhausted,
            );
            let body = body?;
            return Err(
                error_from_gemini(&self.name, status, &body).with_retry_after(retry_after.as_ref())
            );
        }
        Ok((vendor_request_id, body))
    }

    async fn chat(&self, call: ChatCall) -> Result<ChatReply, GatewayError> {
        let stream = call.request.is_stream();
        let model = Self::url_model(&call.request.model)?;
        let request = to_gemini_request(&call.request)?;
        let method = if stream {
            "streamGenerateContent?alt=sse"
        } else {
            "generateContent"
        };
        let (vendor_request_id, body) = self
            .post(&model, method, &request, stream, call.trace.as_ref())
            .await?;
        let created = time::OffsetDateTime::now_utc().unix_timestamp();
        if stream {
            let events = translated_events(
                self.name.clone(),
                body.into_data_stream(),
                Stream(GeminiToOpenAi::new(&model, created).with_provider(&self.name)),
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

    async fn embeddings(&self, call: EmbeddingsCall) -> Result<CompleteReply, GatewayError> {
        let model = Self::url_model(&call.request.model)?;
        let openai_body = serde_json::to_value(&call.request)
            .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))?;
        let request = to_gemini_embeddings_request(&openai_body, &model)?;
        let (vendor_request_id, body) = self
            .post(
                &model,
                "batchEmbedContents",
                &request,
                false,
                call.trace.as_ref(),
            )
            .await?;
        let body = read_body(&self.name, body, MAX_RESPONSE_BYTES).await?;
        // The OpenAI SDKs ask for base64 by default; the answer must be in the encoding asked.
        let encoding = EmbeddingEncoding::from_request(&openai_body)?;
        let translated = to_openai_embeddings_response_encoded(&body, &model, encoding)?;
        Ok(CompleteReply {
            body: translated.body,
            usage: translated.usage,
            vendor_response_id: translated.response_id,
            vendor_request_id,
        })
    }
}

/// Gemini says `RESOURCE_EXHAUSTED` both for a quota used up and for a burst of requests; only
/// a `google.rpc.QuotaFailure` detail names a quota, which then stays exhausted for a while.
fn quota_exhausted(body: &Value) -> bool {
    // Streaming endpoints without `alt=sse` wrap the error in an array.
    let error = match body {
        Value::Array(items) => items.first().and_then(|item| item.get("error")),
        value => value.get("error"),
    };
    let Some(error) = error else {
        return false;
    };
    error.get("status").and_then(Value::as_str) == Some("RESOURCE_EXHAUSTED")
        && error
            .get("details")
            .and_then(Value::as_array)
            .is_some_and(|details| {
                details.iter().any(|detail| {
                    detail
                        .get("@type")
                        .and_then(Value::as_str)
                        .is_some_and(|kind| kind.ends_with("google.rpc.QuotaFailure"))
                })
            })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quota_failures_are_told_from_bursts() {
        let quota = json!({"error": {"code": 429,
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                 "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                                 "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "21s"}]}});
        assert!(quota_exhausted(&quota));
        assert!(quota_exhausted(&json!([quota])), "the array-wrapped form");
        let burst = json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
            "status": "RESOURCE_EXHAUSTED"}});
        assert!(!quota_exhausted(&burst));
        let retry_only = json!({"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"}]}});
        assert!(!quota_exhausted(&retry_only));
        let unavailable = json!({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE",
            "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure"}]}});
        assert!(!quota_exhausted(&unavailable));
    }
}
