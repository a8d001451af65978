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
    with_trace,
};
use crate::responses;
use crate::rotation::{BaseUrls, Key, Keys, send};
use crate::sse::openai_events;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use gateway_core::config::ConfigError;
use gateway_core::openai::{
    ChatCompletionRequest, CompletionSummary, MessageContent, OPENAI_CHAT_PARAMS,
};
use gateway_core::provider::{
    ChatCall, ChatProvider, ChatReply, CompleteReply, EmbeddingsCall, ForwardBody, ForwardCall,
    ForwardReply, NativeApi, StreamReply,
};
use gateway_core::trace::TraceHeaders;
use gateway_core::{GatewayError, RequestId};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::sync::Arc;
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
    /// The vendor keys, to mask them in relayed error bodies (`Secret`'s `Debug` hides them).
    secrets: Vec<crate::Secret>,
    /// Top-level fields beyond OpenAI's own that this vendor receives; `None`: all of them.
    extra_fields: Option<std::collections::HashSet<String>>,
    flavour: Flavour,
    /// OpenAI: the chat completions URLs. Azure: the base URLs (the deployment is per call).
    endpoints: BaseUrls<Endpoint>,
    /// Ready-made auth header values (`Bearer KEY`, or Azure's bare key), marked sensitive so
    /// hyper never logs them.
    authorizations: Keys,
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
        let endpoints = endpoints(config, path, "", &mut errors)
            .into_iter()
            .filter_map(|base| Endpoint::new(&base))
            .collect();
        let authorizations = Keys::from_config(
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
                secrets: config
                    .api_keys
                    .iter()
                    .filter(|key| key.expose().len() >= 8)
                    .cloned()
                    .collect(),
                extra_fields: (!config.extra_fields.iter().any(|field| field == "*"))
                    .then(|| config.extra_fields.iter().cloned().collect()),
                flavour,
                endpoints: BaseUrls::new(endpoints, config.base_url_cooldown()),
                authorizations,
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

    fn embeddings(
        &self,
        call: EmbeddingsCall,
    ) -> BoxFuture<'static, Result<CompleteReply, GatewayError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.embeddings(call).await })
    }

    fn native_apis(&self) -> &'static [NativeApi] {
        &NATIVE_APIS
    }

    fn forward(&self, call: ForwardCall) -> BoxFuture<'static, Result<ForwardReply, GatewayError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.forward(call).await })
    }
}

/// The OpenAI APIs forwarded unchanged (beyond chat and embeddings, which are typed).
const NATIVE_APIS: [NativeApi; 4] = [
    NativeApi::OpenAiResponses,
    NativeApi::OpenAiImages,
    NativeApi::OpenAiSpeech,
    NativeApi::OpenAiTranscriptions,
];

/// What names a call upstream: our request id and the W3C trace context.
#[derive(Debug, Clone, Copy)]
struct CallIds<'a> {
    request_id: RequestId,
    trace: Option<&'a TraceHeaders>,
}

impl Inner {
    /// Sends one request to the first reachable base URL, with one of the keys.
    async fn post(
        &self,
        operation: Operation,
        model: &str,
        body: Bytes,
        content_type: Option<&HeaderValue>,
        stream: bool,
        ids: CallIds<'_>,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, Option<Key>), GatewayError> {
        // The deployment comes from the routing config, never from the client, but a name
        // that would change the URL's shape is still refused.
        if matches!(self.flavour, Flavour::Azure { .. }) && !is_url_safe(model) {
            return Err(GatewayError::Internal(format!(
                "azure deployment name `{model}` is not URL-safe"
            )));
        }
        let auth_header = match self.flavour {
            Flavour::OpenAi => AUTHORIZATION,
            Flavour::Azure { .. } => http::header::HeaderName::from_static("api-key"),
        };
        let key = self.authorizations.pick();
        let response = send(&self.name, &self.client, &self.endpoints, |endpoint| {
            let mut builder = Request::builder()
                .method(Method::POST)
                .uri(endpoint.uri(&self.flavour, operation, model)?)
                .header(
                    CONTENT_TYPE,
                    content_type
                        .cloned()
                        .unwrap_or_else(|| HeaderValue::from_static("application/json")),
                )
                .header(
                    ACCEPT,
                    HeaderValue::from_static(if stream {
                        "text/event-stream"
                    } else {
                        "application/json"
                    }),
                )
                // OpenAI's header for a caller-chosen id: lets a vendor ticket be matched to ours.
                .header("x-client-request-id", ids.request_id.to_header_value());
            builder = with_trace(builder, ids.trace);
            if let Some(key) = &key {
                builder = builder.header(auth_header.clone(), key.value.clone());
            }
            builder
                .body(Full::new(body.clone()))
                .map_err(|err| GatewayError::Internal(format!("building the request: {err}")))
        })
        .await?;
        Ok((response, key))
    }

    /// A vendor error body with this provider's own keys masked: some vendors and relays quote
    /// the key they were given, and the client must never see ours.
    fn scrub(&self, body: Bytes) -> Bytes {
        let text = String::from_utf8_lossy(&body);
        if !self
            .secrets
            .iter()
            .any(|secret| text.contains(secret.expose()))
        {
            return body;
        }
        let mut text = text.into_owned();
        for secret in &self.secrets {
            text = text.replace(secret.expose(), "***");
        }
        Bytes::from(text)
    }

    /// A vendor's error answer: relayed as it is, after noting whether it condemns the key.
    async fn vendor_error(
        &self,
        status: http::StatusCode,
        body: hyper::body::Incoming,
        key: Option<&Key>,
    ) -> GatewayError {
        let body = read_body(&self.name, body, MAX_ERROR_BYTES).await;
        self.authorizations.judge(
            &self.name,
            key,
            status,
            body.as_deref().unwrap_or_default(),
            quota_exhausted,
        );
        match body {
            Ok(body) => GatewayError::UpstreamStatus {
                provider: self.name.clone(),
                status,
                body: self.scrub(body),
                retry_after: None,
            },
            Err(err) => err,
        }
    }

    async fn embeddings(&self, call: EmbeddingsCall) -> Result<CompleteReply, GatewayError> {
        let body = serde_json::to_vec(&call.request)
            .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))?;
        let (response, key) = self
            .post(
                Operation::Embeddings,
                &call.request.model,
                Bytes::from(body),
                None,
                false,
                CallIds {
                    request_id: call.request_id,
                    trace: call.trace.as_ref(),
                },
            )
            .await?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "x-request-id");
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = response.into_body();
        if !status.is_success() {
            let err = self.vendor_error(status, body, key.as_ref()).await;
            return Err(err.with_retry_after(retry_after.as_ref()));
        }
        let body = read_body(&self.name, body, MAX_RESPONSE_BYTES).await?;
        let summary =
            CompletionSummary::parse(&body).ok_or_else(|| GatewayError::UpstreamProtocol {
                provider: self.name.clone(),
                reason: "the embeddings answer is not valid JSON".into(),
            })?;
        Ok(CompleteReply {
            body,
            usage: summary.usage,
            vendor_response_id: summary.id,
            vendor_request_id,
        })
    }

    /// An OpenAI request of another kind than chat, sent as it came (model replaced) and its
    /// answer relayed unchanged; usage is read where the API reports it.
    async fn forward(&self, call: ForwardCall) -> Result<ForwardReply, GatewayError> {
        if !NATIVE_APIS.contains(&call.api) {
            return Err(GatewayError::Internal(format!(
                "provider `{}` cannot forward {:?} requests",
                self.name, call.api
            )));
        }
        let (response, key) = self
            .post(
                Operation::Native(call.api),
                &call.model,
                call.body,
                call.content_type.as_ref(),
                call.stream,
                CallIds {
                    request_id: call.request_id,
                    trace: call.trace.as_ref(),
                },
            )
            .await?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "x-request-id");
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = response.into_body();
        if !status.is_success() {
            let bytes = read_body(&self.name, body, MAX_ERROR_BYTES).await;
            self.authorizations.judge(
                &self.name,
                key.as_ref(),
                status,
                bytes.as_deref().unwrap_or_default(),
                quota_exhausted,
            );
            return Ok(ForwardReply {
                status,
                content_type,
                retry_after,
                vendor_request_id,
                body: ForwardBody::Complete {
                    bytes: self.scrub(bytes?),
                    usage: None,
                    response_id: None,
                },
            });
        }
        if call.stream && call.api == NativeApi::OpenAiResponses {
            let chunks = responses::forwarded_events(self.name.clone(), body.into_data_stream());
            return Ok(ForwardReply {
                status,
                content_type,
                retry_after: None,
                vendor_request_id,
                body: ForwardBody::Stream(chunks.boxed()),
            });
        }
        let bytes = read_body(&self.name, body, MAX_RESPONSE_BYTES).await?;
        // Speech answers are audio and report no usage; the others use the Responses shape.
        let (response_id, usage) = match call.api {
            NativeApi::OpenAiSpeech => (None, None),
            _ => responses::summary(&bytes),
        };
        Ok(ForwardReply {
            status,
            content_type,
            retry_after: None,
            vendor_request_id,
            body: ForwardBody::Complete {
                bytes,
                usage,
                response_id,
            },
        })
    }

    /// Refuses vendor extensions this provider is not configured for, and drops Anthropic's
    /// `cache_control` hints, which have no OpenAI counterpart (OpenAI caches on its own).
    fn prepare(&self, request: &mut ChatCompletionRequest) -> Result<(), GatewayError> {
        if let Some(allowed) = &self.extra_fields
            && let Some(field) = request.extra.keys().find(|field| {
                !OPENAI_CHAT_PARAMS.contains(&field.as_str()) && !allowed.contains(*field)
            })
        {
            return Err(GatewayError::invalid_request(
                format!(
                    "`{field}` is not an OpenAI parameter, and provider `{}` is not configured \
                     to receive it (list it in the provider's `extra_fields`).",
                    self.name
                ),
                Some(field.clone()),
            ));
        }
        for message in &mut request.messages {
            if let Some(MessageContent::Parts(parts)) = &mut message.content {
                for part in parts {
                    part.extra.remove("cache_control");
                }
            }
        }
        if let Some(Value::Array(tools)) = request.extra.get_mut("tools") {
            for tool in tools.iter_mut().filter_map(Value::as_object_mut) {
                tool.remove("cache_control");
            }
        }
        Ok(())
    }

    async fn chat(&self, call: ChatCall) -> Result<ChatReply, GatewayError> {
        let ChatCall {
            mut request,
            request_id,
            trace,
        } = call;
        self.prepare(&mut request)?;
        let stream = request.is_stream();
        if stream {
            request
                .stream_options
                .get_or_insert_with(Default::default)
                .include_usage = Some(true);
        }
        let body = serde_json::to_vec(&request)
            .map_err(|err| GatewayError::Internal(format!("encoding the request: {err}")))?;

        let (response, key) = self
            .post(
                Operation::Chat,
                &request.model,
                Bytes::from(body),
                None,
                stream,
                CallIds {
                    request_id,
                    trace: trace.as_ref(),
                },
            )
            .await?;
        let status = response.status();
        let vendor_request_id = header_string(response.headers(), "x-request-id");
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = response.into_body();

        if !status.is_success() {
            let err = self.vendor_error(status, body, key.as_ref()).await;
            return Err(err.with_retry_after(retry_after.as_ref()));
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

/// One base URL and the OpenAI URLs under it, parsed once rather than per request.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The base without its trailing slash, for Azure's per-deployment paths.
    base: String,
    chat: Uri,
    embeddings: Uri,
}

impl Endpoint {
    /// `base` is an already validated http(s) URL, so the derived ones parse too.
    fn new(base: &Uri) -> Option<Self> {
        let base = base.to_string().trim_end_matches('/').to_owned();
        Some(Self {
            chat: format!("{base}/chat/completions").parse().ok()?,
            embeddings: format!("{base}/embeddings").parse().ok()?,
            base,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Operation {
    Chat,
    Embeddings,
    Native(NativeApi),
}

impl Endpoint {
    fn uri(
        &self,
        flavour: &Flavour,
        operation: Operation,
        model: &str,
    ) -> Result<Uri, GatewayError> {
        match flavour {
            Flavour::OpenAi => match operation {
                Operation::Chat => Ok(self.chat.clone()),
                Operation::Embeddings => Ok(self.embeddings.clone()),
                Operation::Native(api) => {
                    // The client-facing path minus `/v1`, under the configured base.
                    let path = api.path().trim_start_matches("/v1");
                    format!("{}{path}", self.base)
                        .parse()
                        .map_err(|err| GatewayError::Internal(format!("URL: {err}")))
                }
            },
            Flavour::Azure { api_version } => {
                let url = match operation {
                    // Azure's Responses API is per resource, not per deployment.
                    Operation::Native(NativeApi::OpenAiResponses) => {
                        format!("{}/openai/responses?api-version={api_version}", self.base)
                    }
                    _ => {
                        let path = match operation {
                            Operation::Chat => "chat/completions",
                            Operation::Embeddings => "embeddings",
                            Operation::Native(api) => api.path().trim_start_matches("/v1/"),
                        };
                        format!(
                            "{}/openai/deployments/{model}/{path}?api-version={api_version}",
                            self.base
                        )
                    }
                };
                url.parse()
                    .map_err(|err| GatewayError::Internal(format!("azure URL: {err}")))
            }
        }
    }
}

/// OpenAI's error codes for an account out of quota or credit, which (unlike an ordinary rate
/// limit, also a 429) no wait of seconds fixes. Relays copying OpenAI's errors use them too.
const QUOTA_CODES: [&str; 3] = [
    "insufficient_quota",
    "billing_hard_limit_reached",
    "billing_not_active",
];

fn quota_exhausted(body: &Value) -> bool {
    let Some(error) = body.get("error") else {
        return false;
    };
    ["code", "type"]
        .iter()
        .filter_map(|field| error.get(field)?.as_str())
        .any(|code| QUOTA_CODES.contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_keys_are_masked_in_relayed_errors() {
        let client = UpstreamClient::new(Duration::from_secs(1)).unwrap();
        let config = ProviderConfig {
            name: "relay".into(),
            kind: ProviderKind::Openai,
            base_urls: vec!["https://relay.example/v1".into()],
            api_keys: vec![crate::Secret::new("sk-relay-secret-123")],
            extra_fields: Vec::new(),
            api_version: None,
            timeout_secs: 60,
            base_url_cooldown_secs: 30,
            key_cooldown_secs: 60,
            key_revoked_cooldown_secs: 300,
        };
        let provider = OpenAiProvider::new(&config, &client, "p").unwrap();
        let body = Bytes::from_static(
            br#"{"error":{"message":"Incorrect API key provided: sk-relay-secret-123."}}"#,
        );
        let scrubbed = provider.inner.scrub(body);
        assert_eq!(
            &scrubbed[..],
            br#"{"error":{"message":"Incorrect API key provided: ***."}}"#
        );
        assert!(!format!("{provider:?}").contains("sk-relay-secret-123"));
    }

    #[test]
    fn azure_needs_a_url_safe_api_version() {
        let client = UpstreamClient::new(Duration::from_secs(1)).unwrap();
        let config = |version: Option<&str>| ProviderConfig {
            name: "az".into(),
            kind: ProviderKind::Azure,
            base_urls: vec!["https://example.openai.azure.com".into()],
            api_keys: vec![crate::Secret::new("k")],
            api_version: version.map(str::to_owned),
            extra_fields: Vec::new(),
            timeout_secs: 60,
            base_url_cooldown_secs: 30,
            key_cooldown_secs: 60,
            key_revoked_cooldown_secs: 300,
        };
        assert!(OpenAiProvider::new(&config(Some("2024-10-21")), &client, "p").is_ok());
        for bad in [None, Some("2024&x=1")] {
            let errors = OpenAiProvider::new(&config(bad), &client, "providers[0]").unwrap_err();
            assert_eq!(errors[0].path, "providers[0].api_version");
        }
    }

    #[test]
    fn quota_errors_are_told_from_rate_limits() {
        let quota = serde_json::json!({"error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}});
        assert!(quota_exhausted(&quota));
        let hard_limit = serde_json::json!({"error": {"message": "Billing hard limit has been reached",
            "type": "invalid_request_error", "code": "billing_hard_limit_reached"}});
        assert!(quota_exhausted(&hard_limit));
        let rate_limit = serde_json::json!({"error": {
            "message": "Rate limit reached for gpt-4o on requests per min (RPM): Limit 500.",
            "type": "requests", "param": null, "code": "rate_limit_exceeded"}});
        assert!(!quota_exhausted(&rate_limit));
        assert!(!quota_exhausted(&serde_json::json!({"error": "quota"})));
        assert!(!quota_exhausted(&serde_json::json!([])));
    }
}
