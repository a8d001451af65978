//! The one per-request error type and its mapping to an HTTP status and an OpenAI error body.
//!
//! Every layer returns [`GatewayError`]; the edge turns it into a response in exactly one place
//! ([`GatewayError::status`] + [`GatewayError::to_json`]), so clients always see the OpenAI
//! error shape `{"error":{"message","type","param","code"}}` that their SDKs understand.

use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use std::time::Duration;

/// A fixed, low-cardinality classification used in logs, metrics and usage records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    Authentication,
    PermissionDenied,
    ModelNotFound,
    InvalidRequest,
    PayloadTooLarge,
    NotFound,
    MethodNotAllowed,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamError,
    UpstreamStreamError,
    ClientAborted,
    Unavailable,
    Internal,
}

impl ErrorType {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Authentication => "authentication",
            Self::PermissionDenied => "permission_denied",
            Self::ModelNotFound => "model_not_found",
            Self::InvalidRequest => "invalid_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamStreamError => "upstream_stream_error",
            Self::ClientAborted => "client_aborted",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong while serving one request.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    Unauthorized { message: &'static str },

    #[error("The model `{model}` does not exist or you do not have access to it.")]
    ModelNotFound { model: String },

    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },

    #[error("Request body is larger than the limit of {limit_bytes} bytes.")]
    PayloadTooLarge { limit_bytes: usize },

    #[error("No route for {method} {path}.")]
    RouteNotFound { method: String, path: String },

    #[error("Method {method} is not allowed on {path}.")]
    MethodNotAllowed { method: String, path: String },

    #[error("Provider `{provider}` did not answer within {}s.", .after.as_secs_f64())]
    UpstreamTimeout { provider: String, after: Duration },

    #[error("Provider `{provider}` is unreachable: {reason}")]
    UpstreamUnavailable { provider: String, reason: String },

    /// The vendor answered with an error status. Its body is returned to the client unchanged
    /// when it already is an OpenAI-style error, so the caller sees the vendor's own message.
    #[error("Provider `{provider}` answered {status}.")]
    UpstreamStatus {
        provider: String,
        status: StatusCode,
        body: Bytes,
        /// The vendor's `Retry-After`, relayed so clients back off as the vendor asked.
        retry_after: Option<http::HeaderValue>,
    },

    #[error("Provider `{provider}` sent an invalid response: {reason}")]
    UpstreamProtocol { provider: String, reason: String },

    #[error("The gateway is shutting down.")]
    ShuttingDown,

    #[error("Internal error: {0}")]
    Internal(String),
}

/// The OpenAI error envelope.
#[derive(Debug, Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    message: String,
    r#type: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl GatewayError {
    pub fn invalid_request(message: impl Into<String>, param: Option<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param,
        }
    }

    /// Sets the vendor's `Retry-After` on a vendor error (other errors have none).
    #[must_use]
    pub fn with_retry_after(mut self, value: Option<&http::HeaderValue>) -> Self {
        if let Self::UpstreamStatus { retry_after, .. } = &mut self {
            retry_after.clone_from(&value.cloned());
        }
        self
    }

    pub fn retry_after(&self) -> Option<&http::HeaderValue> {
        match self {
            Self::UpstreamStatus { retry_after, .. } => retry_after.as_ref(),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnavailable { .. } | Self::UpstreamProtocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamStatus { status, .. } => *status,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn error_type(&self) -> ErrorType {
        match self {
            Self::Unauthorized { .. } => ErrorType::Authentication,
            Self::ModelNotFound { .. } => ErrorType::ModelNotFound,
            Self::InvalidRequest { .. } => ErrorType::InvalidRequest,
            Self::PayloadTooLarge { .. } => ErrorType::PayloadTooLarge,
            Self::RouteNotFound { .. } => ErrorType::NotFound,
            Self::MethodNotAllowed { .. } => ErrorType::MethodNotAllowed,
            Self::UpstreamTimeout { .. } => ErrorType::UpstreamTimeout,
            Self::UpstreamUnavailable { .. } => ErrorType::UpstreamUnavailable,
            Self::UpstreamStatus { .. } | Self::UpstreamProtocol { .. } => ErrorType::UpstreamError,
            Self::ShuttingDown => ErrorType::Unavailable,
            Self::Internal(_) => ErrorType::Internal,
        }
    }

    /// OpenAI's `type` field: what kind of failure the SDK should report.
    fn openai_type(&self) -> &'static str {
        match self {
            Self::Unauthorized { .. }
            | Self::ModelNotFound { .. }
            | Self::InvalidRequest { .. }
            | Self::PayloadTooLarge { .. }
            | Self::RouteNotFound { .. }
            | Self::MethodNotAllowed { .. } => "invalid_request_error",
            Self::UpstreamTimeout { .. } => "timeout_error",
            Self::UpstreamUnavailable { .. }
            | Self::UpstreamStatus { .. }
            | Self::UpstreamProtocol { .. } => "upstream_error",
            Self::ShuttingDown => "service_unavailable",
            Self::Internal(_) => "api_error",
        }
    }

    /// OpenAI's machine-readable `code` field.
    fn openai_code(&self) -> Option<&'static str> {
        Some(match self {
            Self::Unauthorized { .. } => "invalid_api_key",
            Self::ModelNotFound { .. } => "model_not_found",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::PayloadTooLarge { .. } => "request_too_large",
            Self::RouteNotFound { .. } => "unknown_url",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamUnavailable { .. } => "upstream_unavailable",
            Self::UpstreamStatus { .. } => "upstream_error",
            Self::UpstreamProtocol { .. } => "upstream_invalid_response",
            Self::ShuttingDown => "shutting_down",
            Self::Internal(_) => "internal_error",
        })
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// The response body. A vendor's own OpenAI-shaped error passes through unchanged.
    pub fn to_json(&self) -> Bytes {
        if let Self::UpstreamStatus { body, .. } = self
            && is_openai_error_body(body)
        {
            return body.clone();
        }
        let envelope = ErrorEnvelope {
            error: ErrorBody {
                message: self.to_string(),
                r#type: self.openai_type(),
                param: self.param(),
                code: self.openai_code(),
            },
        };
        // Serialising a struct of strings cannot fail; the fallback keeps the edge panic-free.
        serde_json::to_vec(&envelope).map_or_else(
            |_| Bytes::from_static(br#"{"error":{"message":"internal error","type":"api_error","param":null,"code":"internal_error"}}"#),
            Bytes::from,
        )
    }
}

fn is_openai_error_body(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        error: serde_json::Map<String, serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(body).is_ok_and(|probe| probe.error.contains_key("message"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(err: &GatewayError) -> serde_json::Value {
        serde_json::from_slice(&err.to_json()).unwrap()
    }

    #[test]
    fn every_error_is_an_openai_envelope() {
        let errors = [
            GatewayError::Unauthorized { message: "bad key" },
            GatewayError::ModelNotFound { model: "x".into() },
            GatewayError::invalid_request("nope", Some("messages".into())),
            GatewayError::PayloadTooLarge { limit_bytes: 10 },
            GatewayError::UpstreamTimeout {
                provider: "p".into(),
                after: Duration::from_secs(1),
            },
            GatewayError::Internal("boom".into()),
        ];
        for err in &errors {
            let body = body_of(err);
            let inner = &body["error"];
            assert!(inner["message"].is_string(), "{body}");
            assert!(inner["type"].is_string(), "{body}");
            assert!(inner["code"].is_string(), "{body}");
        }
    }

    #[test]
    fn statuses_match_openai() {
        assert_eq!(
            GatewayError::Unauthorized { message: "x" }.status(),
            StatusCode::UNAUTHORIZED
        );
        let not_found = GatewayError::ModelNotFound { model: "m".into() };
        assert_eq!(not_found.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_of(&not_found)["error"]["code"], "model_not_found");
        assert_eq!(
            GatewayError::PayloadTooLarge { limit_bytes: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            GatewayError::UpstreamTimeout {
                provider: "p".into(),
                after: Duration::from_secs(1)
            }
            .status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }

    #[test]
    fn vendor_error_body_passes_through_unchanged() {
        let vendor = Bytes::from_static(
            br#"{"error":{"message":"vendor says no","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
        );
        let err = GatewayError::UpstreamStatus {
            retry_after: None,
            provider: "openai".into(),
            status: StatusCode::BAD_REQUEST,
            body: vendor.clone(),
        };
        assert_eq!(err.to_json(), vendor);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn non_json_vendor_error_is_wrapped() {
        let err = GatewayError::UpstreamStatus {
            retry_after: None,
            provider: "openai".into(),
            status: StatusCode::BAD_GATEWAY,
            body: Bytes::from_static(b"<html>bad gateway</html>"),
        };
        let body = body_of(&err);
        assert_eq!(body["error"]["code"], "upstream_error");
    }
}
