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
    RateLimited,
    BudgetExceeded,
    Overloaded,
    CircuitOpen,
    IdempotencyConflict,
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
            Self::RateLimited => "rate_limited",
            Self::BudgetExceeded => "budget_exceeded",
            Self::Overloaded => "overloaded",
            Self::CircuitOpen => "circuit_open",
            Self::IdempotencyConflict => "idempotency_conflict",
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

    /// A stream went silent mid-way for longer than `[policy.timeouts] stream_idle_secs`.
    #[error("Provider `{provider}` sent nothing for {}s in the middle of the stream.", .idle.as_secs_f64())]
    UpstreamStalled { provider: String, idle: Duration },

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

    /// A rate limit of the gateway (not the vendor's) refused the request. `dimension` is
    /// OpenAI's error `type` for it: `requests` or `tokens`.
    #[error("{message}")]
    RateLimited {
        message: String,
        dimension: &'static str,
        retry_after: Duration,
        /// The `x-ratelimit-*` headers of the limit that refused.
        headers: Box<http::HeaderMap>,
    },

    /// Load shedding: too many requests in flight, globally or for one project.
    #[error("The gateway is overloaded ({scope}); retry shortly.")]
    Overloaded {
        scope: String,
        retry_after: Duration,
    },

    /// A store the policy layer needs (the shared rate limiter or idempotency store) is
    /// unreachable and its configured failure mode is to refuse.
    #[error("{what} is unavailable; retry shortly.")]
    PolicyUnavailable {
        what: &'static str,
        retry_after: Duration,
    },

    /// Every target's circuit breaker is open: failing fast instead of waiting on a vendor
    /// known to be failing.
    #[error("Provider `{provider}` is failing; its circuit breaker is open.")]
    CircuitOpen {
        provider: String,
        retry_after: Duration,
    },

    /// A project's or key's spending budget for the day or month has no room for this request.
    #[error("{message}")]
    BudgetExceeded { message: String },

    #[error("This Idempotency-Key was already used with a different request body.")]
    IdempotencyConflict,

    #[error("A request with this Idempotency-Key is still in progress; retry shortly.")]
    IdempotencyInFlight { retry_after: Duration },

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

    /// The error type to record when this error ends a stream that had started: a timeout
    /// stays a timeout, anything else is a stream error.
    pub fn error_type_in_stream(&self) -> ErrorType {
        match self.error_type() {
            ErrorType::UpstreamTimeout => ErrorType::UpstreamTimeout,
            _ => ErrorType::UpstreamStreamError,
        }
    }

    /// The `Retry-After` header the client should get with this error.
    pub fn retry_after(&self) -> Option<http::HeaderValue> {
        let seconds = |after: &Duration| {
            // Whole seconds, rounded up: a client that waits exactly this long must get in.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            http::HeaderValue::from(secs.max(1))
        };
        match self {
            Self::UpstreamStatus { retry_after, .. } => retry_after.clone(),
            Self::RateLimited { retry_after, .. }
            | Self::Overloaded { retry_after, .. }
            | Self::PolicyUnavailable { retry_after, .. }
            | Self::CircuitOpen { retry_after, .. }
            | Self::IdempotencyInFlight { retry_after } => Some(seconds(retry_after)),
            _ => None,
        }
    }

    /// Headers besides `Retry-After` that belong on this error's response.
    pub fn extra_headers(&self) -> Option<&http::HeaderMap> {
        match self {
            Self::RateLimited { headers, .. } => Some(headers),
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
            Self::UpstreamTimeout { .. } | Self::UpstreamStalled { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::UpstreamUnavailable { .. } | Self::UpstreamProtocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamStatus { status, .. } => *status,
            Self::ShuttingDown
            | Self::Overloaded { .. }
            | Self::PolicyUnavailable { .. }
            | Self::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } | Self::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::IdempotencyConflict => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyInFlight { .. } => StatusCode::CONFLICT,
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
            Self::UpstreamTimeout { .. } | Self::UpstreamStalled { .. } => {
                ErrorType::UpstreamTimeout
            }
            Self::UpstreamUnavailable { .. } => ErrorType::UpstreamUnavailable,
            Self::UpstreamStatus { .. } | Self::UpstreamProtocol { .. } => ErrorType::UpstreamError,
            Self::ShuttingDown | Self::PolicyUnavailable { .. } => ErrorType::Unavailable,
            Self::RateLimited { .. } => ErrorType::RateLimited,
            Self::BudgetExceeded { .. } => ErrorType::BudgetExceeded,
            Self::Overloaded { .. } => ErrorType::Overloaded,
            Self::CircuitOpen { .. } => ErrorType::CircuitOpen,
            Self::IdempotencyConflict | Self::IdempotencyInFlight { .. } => {
                ErrorType::IdempotencyConflict
            }
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
            | Self::MethodNotAllowed { .. }
            | Self::IdempotencyConflict
            | Self::IdempotencyInFlight { .. } => "invalid_request_error",
            Self::RateLimited { dimension, .. } => dimension,
            Self::BudgetExceeded { .. } => "insufficient_quota",
            Self::Overloaded { .. } | Self::PolicyUnavailable { .. } => "service_unavailable",
            Self::CircuitOpen { .. } => "upstream_error",
            Self::UpstreamTimeout { .. } | Self::UpstreamStalled { .. } => "timeout_error",
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
            Self::UpstreamStalled { .. } => "upstream_stream_idle",
            Self::UpstreamUnavailable { .. } => "upstream_unavailable",
            Self::UpstreamStatus { .. } => "upstream_error",
            Self::UpstreamProtocol { .. } => "upstream_invalid_response",
            Self::ShuttingDown => "shutting_down",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::BudgetExceeded { .. } => "insufficient_quota",
            Self::Overloaded { .. } => "overloaded",
            Self::PolicyUnavailable { .. } => "service_unavailable",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::IdempotencyConflict => "idempotency_key_reused",
            Self::IdempotencyInFlight { .. } => "idempotency_key_in_flight",
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
    fn policy_errors_carry_status_code_and_retry_after() {
        let cases = [
            (
                GatewayError::RateLimited {
                    message: "slow down".into(),
                    dimension: "tokens",
                    retry_after: Duration::from_millis(1500),
                    headers: Box::default(),
                },
                429,
                "tokens",
                "rate_limit_exceeded",
                Some("2"),
            ),
            (
                GatewayError::BudgetExceeded {
                    message: "spent".into(),
                },
                429,
                "insufficient_quota",
                "insufficient_quota",
                None,
            ),
            (
                GatewayError::Overloaded {
                    scope: "x".into(),
                    retry_after: Duration::from_secs(1),
                },
                503,
                "service_unavailable",
                "overloaded",
                Some("1"),
            ),
            (
                GatewayError::CircuitOpen {
                    provider: "p".into(),
                    retry_after: Duration::from_secs(30),
                },
                503,
                "upstream_error",
                "circuit_open",
                Some("30"),
            ),
            (
                GatewayError::IdempotencyConflict,
                422,
                "invalid_request_error",
                "idempotency_key_reused",
                None,
            ),
            (
                GatewayError::UpstreamStalled {
                    provider: "p".into(),
                    idle: Duration::from_secs(60),
                },
                504,
                "timeout_error",
                "upstream_stream_idle",
                None,
            ),
        ];
        for (err, status, kind, code, retry_after) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            let body = body_of(&err);
            assert_eq!(body["error"]["type"], kind, "{body}");
            assert_eq!(body["error"]["code"], code, "{body}");
            assert_eq!(
                err.retry_after().map(|v| v.to_str().unwrap().to_owned()),
                retry_after.map(str::to_owned)
            );
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
