//! The vendor endpoints and the pipeline every request to them goes through: numbering,
//! recording, the vendor's own header and query checks, directives, injected faults, and the
//! error bodies in each vendor's shape.
//!
//! One pipeline for all formats is what makes a fault behave the same whichever vendor the
//! gateway is talking to; only the answer itself is per format.

use crate::server::{Body, MockStats, RecordedRequest, Shared, json_response};
use crate::{anthropic, gemini, media, multipart, openai, responses};
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Whose error shapes an endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vendor {
    /// OpenAI, and Azure OpenAI, which answers in the same shapes.
    OpenAi,
    Anthropic,
    Gemini,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    OpenAiChat,
    OpenAiEmbeddings,
    AzureChat {
        deployment: String,
    },
    AzureEmbeddings {
        deployment: String,
    },
    AnthropicMessages,
    GeminiGenerate {
        model: String,
        stream: bool,
    },
    GeminiEmbed {
        model: String,
        batch: bool,
    },
    /// OpenAI's endpoints beyond chat and embeddings, which the gateway passes through.
    Passthrough {
        api: Api,
        host: Host,
    },
}

/// The pass-through endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    Responses,
    ImageGenerations,
    Speech,
    Transcriptions,
}

impl Api {
    /// The API at `operation`, the path after `/v1/` (OpenAI) or after the deployment (Azure).
    fn from_operation(operation: &str) -> Option<Self> {
        match operation {
            "responses" => Some(Self::Responses),
            "images/generations" => Some(Self::ImageGenerations),
            "audio/speech" => Some(Self::Speech),
            "audio/transcriptions" => Some(Self::Transcriptions),
            _ => None,
        }
    }
}

/// Who serves a pass-through endpoint: Azure adds its `api-version` and `api-key` checks.
/// None of these answers names the model, so an Azure deployment matters only for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Host {
    OpenAi,
    Azure,
}

impl Endpoint {
    /// The vendor endpoint at `path` (query excluded), whatever the method.
    pub(crate) fn from_path(path: &str) -> Option<Self> {
        let route = path.strip_prefix("/v1").unwrap_or(path);
        match route {
            "/chat/completions" => return Some(Self::OpenAiChat),
            "/embeddings" => return Some(Self::OpenAiEmbeddings),
            "/messages" => return Some(Self::AnthropicMessages),
            _ => {}
        }
        if let Some(api) = route.strip_prefix('/').and_then(Api::from_operation) {
            return Some(Self::Passthrough {
                api,
                host: Host::OpenAi,
            });
        }
        if path == "/openai/responses" {
            return Some(Self::Passthrough {
                api: Api::Responses,
                host: Host::Azure,
            });
        }
        if let Some(rest) = path.strip_prefix("/openai/deployments/") {
            let (deployment, operation) = rest.split_once('/')?;
            if deployment.is_empty() {
                return None;
            }
            let deployment = deployment.to_owned();
            return match operation {
                "chat/completions" => Some(Self::AzureChat { deployment }),
                "embeddings" => Some(Self::AzureEmbeddings { deployment }),
                // Azure serves the Responses API per resource, not per deployment.
                "responses" => None,
                operation => Api::from_operation(operation).map(|api| Self::Passthrough {
                    api,
                    host: Host::Azure,
                }),
            };
        }
        let rest = path
            .strip_prefix("/v1beta/models/")
            .or_else(|| path.strip_prefix("/v1/models/"))?;
        // Some clients percent-encode the colon of `{model}:{method}`.
        let rest = rest.replace("%3A", ":").replace("%3a", ":");
        let (model, method) = rest.rsplit_once(':')?;
        if model.is_empty() || model.contains('/') {
            return None;
        }
        let model = model.to_owned();
        match method {
            "generateContent" => Some(Self::GeminiGenerate {
                model,
                stream: false,
            }),
            "streamGenerateContent" => Some(Self::GeminiGenerate {
                model,
                stream: true,
            }),
            "embedContent" => Some(Self::GeminiEmbed {
                model,
                batch: false,
            }),
            "batchEmbedContents" => Some(Self::GeminiEmbed { model, batch: true }),
            _ => None,
        }
    }

    fn vendor(&self) -> Vendor {
        match self {
            Self::OpenAiChat
            | Self::OpenAiEmbeddings
            | Self::AzureChat { .. }
            | Self::AzureEmbeddings { .. }
            | Self::Passthrough { .. } => Vendor::OpenAi,
            Self::AnthropicMessages => Vendor::Anthropic,
            Self::GeminiGenerate { .. } | Self::GeminiEmbed { .. } => Vendor::Gemini,
        }
    }

    /// The counter of [`MockStats`] this endpoint's requests go to.
    fn count(&self, stats: &mut MockStats) {
        match self {
            Self::OpenAiChat
            | Self::AzureChat { .. }
            | Self::AnthropicMessages
            | Self::GeminiGenerate { .. } => stats.chat_requests += 1,
            Self::OpenAiEmbeddings | Self::AzureEmbeddings { .. } | Self::GeminiEmbed { .. } => {
                stats.embedding_requests += 1;
            }
            Self::Passthrough { .. } => stats.passthrough_requests += 1,
        }
    }

    /// The body as the mock reads and records it: JSON, or for transcriptions the multipart
    /// form as JSON. The error is the message of the 400 that refuses it.
    fn parse_body(&self, headers: &HeaderMap, bytes: &[u8]) -> Result<Value, String> {
        if let Self::Passthrough {
            api: Api::Transcriptions,
            ..
        } = self
        {
            let content_type = headers
                .get(CONTENT_TYPE)
                .and_then(|value| value.to_str().ok());
            return multipart::parse_form(content_type, bytes);
        }
        serde_json::from_slice(bytes)
            .map_err(|err| format!("We could not parse the JSON body of your request: {err}"))
    }

    /// What the vendor would refuse in a well-formed body: the pass-through endpoints' required
    /// fields, and what the mock does not imitate (so a test does not mistake it for an answer).
    fn body_refusal(&self, body: &Value) -> Option<String> {
        match self {
            Self::Passthrough { api, .. } => match api {
                Api::Responses => None,
                Api::ImageGenerations => media::images_refusal(body),
                Api::Speech => media::speech_refusal(body),
                Api::Transcriptions => media::transcription_refusal(body),
            },
            _ => None,
        }
    }

    /// What the vendor would refuse before looking at the body: missing version or key
    /// headers, and for Gemini a key in the URL, which the gateway must never send (URLs end
    /// up in logs).
    fn rejection(&self, headers: &HeaderMap, query: Option<&str>) -> Option<(StatusCode, String)> {
        match self {
            Self::OpenAiChat
            | Self::OpenAiEmbeddings
            | Self::Passthrough {
                host: Host::OpenAi, ..
            } => None,
            Self::AzureChat { .. }
            | Self::AzureEmbeddings { .. }
            | Self::Passthrough {
                host: Host::Azure, ..
            } => azure_rejection(headers, query),
            Self::AnthropicMessages => (!has_header(headers, "anthropic-version")).then(|| {
                (
                    StatusCode::BAD_REQUEST,
                    "anthropic-version: header is required".to_owned(),
                )
            }),
            Self::GeminiGenerate { .. } | Self::GeminiEmbed { .. } => {
                if query_param(query, "key").is_some() {
                    return Some((
                        StatusCode::BAD_REQUEST,
                        "API key passed in the URL (key=): the mock upstream only accepts the \
                         x-goog-api-key header."
                            .to_owned(),
                    ));
                }
                if !has_header(headers, "x-goog-api-key") {
                    return Some((
                        StatusCode::FORBIDDEN,
                        "Method doesn't allow unregistered callers (callers without established \
                         identity). Please use API Key or other form of API consumer identity \
                         to call this API."
                            .to_owned(),
                    ));
                }
                if matches!(self, Self::GeminiGenerate { stream: true, .. })
                    && query_param(query, "alt") != Some("sse")
                {
                    return Some((
                        StatusCode::BAD_REQUEST,
                        "streamGenerateContent without alt=sse: the mock upstream only streams \
                         server-sent events."
                            .to_owned(),
                    ));
                }
                None
            }
        }
    }
}

/// Azure's refusals: a missing or malformed `api-version`, then a missing `api-key`.
fn azure_rejection(headers: &HeaderMap, query: Option<&str>) -> Option<(StatusCode, String)> {
    match query_param(query, "api-version") {
        None => {
            return Some((
                StatusCode::BAD_REQUEST,
                "Missing the api-version query parameter.".to_owned(),
            ));
        }
        Some(version) if !is_azure_api_version(version) => {
            return Some((
                StatusCode::BAD_REQUEST,
                format!(
                    "Unsupported api-version {version:?}: expected YYYY-MM-DD or YYYY-MM-DD-preview."
                ),
            ));
        }
        Some(_) => {}
    }
    (!has_header(headers, "api-key")).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            "Access denied: the api-key header is missing.".to_owned(),
        )
    })
}

/// The value of `name` in a query string, undecoded (the values the mock reads never need it).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

fn has_header(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|value| !value.as_bytes().is_empty())
}

/// `YYYY-MM-DD` or `YYYY-MM-DD-preview`.
fn is_azure_api_version(version: &str) -> bool {
    let date = version.strip_suffix("-preview").unwrap_or(version);
    let bytes = date.as_bytes();
    bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, byte)| match i {
            4 | 7 => *byte == b'-',
            _ => byte.is_ascii_digit(),
        })
}

/// Numbers, records and answers one request to a vendor endpoint.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    endpoint: Endpoint,
    parts: Parts,
    path: String,
    bytes: &[u8],
) -> Response<Body> {
    let parsed = endpoint.parse_body(&parts.headers, bytes);
    let n = shared.next_id();
    shared.update_stats(|stats| endpoint.count(stats));
    let query = parts.uri.query().map(str::to_owned);
    let client_request_id = parts
        .headers
        .get("x-client-request-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let rejection = endpoint.rejection(&parts.headers, query.as_deref());
    shared.record(RecordedRequest {
        method: parts.method,
        path,
        query,
        headers: parts.headers,
        body: parsed.as_ref().map_or(Value::Null, Clone::clone),
    });

    let vendor = endpoint.vendor();
    let mut response = match (rejection, parsed) {
        (Some((status, message)), _) => rejection_error(vendor, status, &message),
        (None, Ok(body)) => match endpoint.body_refusal(&body) {
            Some(message) => rejection_error(vendor, StatusCode::BAD_REQUEST, &message),
            None => answer(shared, &endpoint, n, &body, client_request_id).await,
        },
        (None, Err(message)) => rejection_error(vendor, StatusCode::BAD_REQUEST, &message),
    };
    if let Ok(value) = HeaderValue::from_str(&format!("req-up-{n}")) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn answer(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    n: u64,
    body: &Value,
    client_request_id: Option<String>,
) -> Response<Body> {
    let vendor = endpoint.vendor();
    let carrier = match endpoint {
        Endpoint::OpenAiChat | Endpoint::AzureChat { .. } => {
            crate::behaviour::openai_directive_carrier(body).map(str::to_owned)
        }
        Endpoint::OpenAiEmbeddings | Endpoint::AzureEmbeddings { .. } => {
            openai::embeddings_directive_carrier(body)
        }
        Endpoint::AnthropicMessages => anthropic::directive_carrier(body),
        Endpoint::GeminiGenerate { .. } => gemini::directive_carrier(body),
        Endpoint::GeminiEmbed { .. } => gemini::embeddings_directive_carrier(body),
        Endpoint::Passthrough { api, .. } => match api {
            Api::Responses => responses::directive_carrier(body),
            Api::ImageGenerations | Api::Transcriptions => media::directive_carrier(body, "prompt"),
            Api::Speech => media::directive_carrier(body, "input"),
        },
    };
    let behaviour = shared.behaviour().with_directives(carrier.as_deref());

    let images = match endpoint {
        Endpoint::Passthrough {
            api: Api::Responses,
            ..
        } => responses::images(body),
        Endpoint::Passthrough { .. } => 0,
        _ => match vendor {
            Vendor::OpenAi => openai::images(body),
            Vendor::Anthropic => anthropic::images(body),
            Vendor::Gemini => gemini::images(body),
        },
    };
    if images > 0 {
        shared.update_stats(|stats| stats.images_seen += images);
    }

    if behaviour.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behaviour.delay_ms)).await;
    }
    if let Some(status) = behaviour.status {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if !status.is_success() {
            return injected_error(vendor, status, behaviour.retry_after_secs);
        }
    }

    match endpoint {
        Endpoint::OpenAiChat => openai::chat(shared, n, body, &behaviour, None, client_request_id),
        Endpoint::AzureChat { deployment } => openai::chat(
            shared,
            n,
            body,
            &behaviour,
            Some(deployment),
            client_request_id,
        ),
        Endpoint::OpenAiEmbeddings => openai::embeddings(body, None),
        Endpoint::AzureEmbeddings { deployment } => openai::embeddings(body, Some(deployment)),
        Endpoint::AnthropicMessages => anthropic::messages(shared, n, body, &behaviour),
        Endpoint::GeminiGenerate { model, stream } => {
            gemini::generate(shared, n, body, &behaviour, model, *stream)
        }
        Endpoint::GeminiEmbed { batch, .. } => gemini::embed(body, *batch),
        Endpoint::Passthrough { api, .. } => match api {
            Api::Responses => responses::respond(shared, n, body, &behaviour),
            Api::ImageGenerations => media::images(body),
            Api::Speech => media::speech(shared, body, &behaviour),
            Api::Transcriptions => media::transcription(shared, n, body, &behaviour),
        },
    }
}

/// The answer to `status` injected by a behaviour or directive, with `Retry-After` if asked.
fn injected_error(
    vendor: Vendor,
    status: StatusCode,
    retry_after_secs: Option<u64>,
) -> Response<Body> {
    let message = format!("mock upstream error {}", status.as_u16());
    let mut response = match vendor {
        // The types OpenAI answers have always been: only 429 is special.
        Vendor::OpenAi => openai_error(
            status,
            &message,
            if status == StatusCode::TOO_MANY_REQUESTS {
                "rate_limit_error"
            } else {
                "server_error"
            },
        ),
        Vendor::Anthropic => anthropic_error(status, &message),
        Vendor::Gemini => gemini_error(status, &message, retry_after_secs),
    };
    if let Some(secs) = retry_after_secs {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// The mock's own refusal of a request (bad headers, bad JSON), in the vendor's shape.
fn rejection_error(vendor: Vendor, status: StatusCode, message: &str) -> Response<Body> {
    match vendor {
        Vendor::OpenAi => openai_error(status, message, "invalid_request_error"),
        Vendor::Anthropic => anthropic_error(status, message),
        Vendor::Gemini => gemini_error(status, message, None),
    }
}

/// An answer in OpenAI's error shape, so clients parse it as they would a vendor's.
pub(crate) fn openai_error(status: StatusCode, message: &str, kind: &str) -> Response<Body> {
    json_response(status, &openai_error_body(message, kind))
}

pub(crate) fn openai_error_body(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

/// `{"type":"error","error":{"type":...,"message":...}}` with Anthropic's type for `status`.
fn anthropic_error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(
        status,
        &anthropic_error_body(anthropic_error_type(status), message),
    )
}

pub(crate) fn anthropic_error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"error":{"code":...,"message":...,"status":...}}`, Google's RPC status shape; a retry
/// delay travels as a `RetryInfo` detail, as Gemini sends it.
fn gemini_error(
    status: StatusCode,
    message: &str,
    retry_after_secs: Option<u64>,
) -> Response<Body> {
    let mut body = gemini_error_body(status, message);
    if let (Some(secs), Some(error)) = (retry_after_secs, body.get_mut("error")) {
        error["details"] = json!([{
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{secs}s"),
        }]);
    }
    json_response(status, &body)
}

pub(crate) fn gemini_error_body(status: StatusCode, message: &str) -> Value {
    json!({"error": {
        "code": status.as_u16(),
        "message": message,
        "status": google_status(status),
    }})
}

fn google_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        500..=599 => "INTERNAL",
        _ => "UNKNOWN",
    }
}

/// `true` for a JSON `type` field equal to `kind`.
pub(crate) fn has_type(value: &Value, kind: &str) -> bool {
    value.get("type").and_then(Value::as_str) == Some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::OpenAiChat)
        );
        assert_eq!(
            Endpoint::from_path("/messages"),
            Some(Endpoint::AnthropicMessages)
        );
        assert_eq!(
            Endpoint::from_path("/openai/deployments/gpt4o-prod/chat/completions"),
            Some(Endpoint::AzureChat {
                deployment: "gpt4o-prod".into()
            })
        );
        assert_eq!(Endpoint::from_path("/openai/deployments//embeddings"), None);
        assert_eq!(
            Endpoint::from_path("/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
            Some(Endpoint::GeminiGenerate {
                model: "gemini-2.0-flash".into(),
                stream: true
            })
        );
        assert_eq!(
            Endpoint::from_path("/v1beta/models/text-embedding-004%3AbatchEmbedContents"),
            Some(Endpoint::GeminiEmbed {
                model: "text-embedding-004".into(),
                batch: true
            })
        );
        assert_eq!(Endpoint::from_path("/v1beta/models/m:countTokens"), None);
        assert_eq!(Endpoint::from_path("/v1/models"), None);

        let openai = |api| {
            Some(Endpoint::Passthrough {
                api,
                host: Host::OpenAi,
            })
        };
        assert_eq!(Endpoint::from_path("/v1/responses"), openai(Api::Responses));
        assert_eq!(Endpoint::from_path("/responses"), openai(Api::Responses));
        assert_eq!(
            Endpoint::from_path("/v1/images/generations"),
            openai(Api::ImageGenerations)
        );
        assert_eq!(Endpoint::from_path("/audio/speech"), openai(Api::Speech));
        assert_eq!(
            Endpoint::from_path("/v1/audio/transcriptions"),
            openai(Api::Transcriptions)
        );
        assert_eq!(Endpoint::from_path("/v1/audio/translations"), None);
        assert_eq!(
            Endpoint::from_path("/openai/deployments/tts/audio/speech"),
            Some(Endpoint::Passthrough {
                api: Api::Speech,
                host: Host::Azure,
            })
        );
        assert_eq!(
            Endpoint::from_path("/openai/responses"),
            Some(Endpoint::Passthrough {
                api: Api::Responses,
                host: Host::Azure,
            })
        );
        assert_eq!(Endpoint::from_path("/openai/deployments/d/responses"), None);
    }

    #[test]
    fn query_and_versions() {
        assert_eq!(query_param(Some("alt=sse&key=abc"), "key"), Some("abc"));
        assert_eq!(query_param(Some("keys=1"), "key"), None);
        assert_eq!(query_param(None, "key"), None);
        assert!(is_azure_api_version("2024-10-21"));
        assert!(is_azure_api_version("2025-01-01-preview"));
        assert!(!is_azure_api_version("2024-1-21"));
        assert!(!is_azure_api_version("latest"));
    }
}
