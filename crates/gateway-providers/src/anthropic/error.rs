//! Errors across the two formats: Anthropic's error answers as gateway errors (with an
//! OpenAI-shaped body the edge relays unchanged), and any gateway error as the Anthropic
//! error body an Anthropic SDK understands.
//!
//! Vendor messages are relayed because they say what to fix, but anything that looks like an
//! API key is masked first: some error messages quote the key they rejected.

use bytes::Bytes;
use gateway_core::GatewayError;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

/// Anthropic's "overloaded" status, which HTTP clients and proxies do not know.
const OVERLOADED: u16 = 529;

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    r#type: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// The gateway error for an Anthropic error answer. The status is kept, except 529, which
/// becomes 503 so OpenAI SDKs retry it as they retry any unavailable service.
pub fn error_from_anthropic(provider: &str, status: StatusCode, body: &[u8]) -> GatewayError {
    let detail = serde_json::from_slice::<ErrorEnvelope>(body)
        .ok()
        .map(|envelope| envelope.error);
    let (kind, message) = match detail {
        Some(ErrorDetail { r#type, message }) => (r#type, message),
        None => (None, None),
    };
    upstream_status(provider, status, kind.as_deref(), message.as_deref())
}

/// An `error` event in the middle of an Anthropic stream, as the error of the stream.
pub(super) fn stream_error(provider: &str, kind: &str, message: &str) -> GatewayError {
    let status = match kind {
        "invalid_request_error" => StatusCode::BAD_REQUEST,
        "authentication_error" => StatusCode::UNAUTHORIZED,
        "billing_error" => StatusCode::PAYMENT_REQUIRED,
        "permission_error" => StatusCode::FORBIDDEN,
        "not_found_error" => StatusCode::NOT_FOUND,
        "request_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "rate_limit_error" => StatusCode::TOO_MANY_REQUESTS,
        "timeout_error" => StatusCode::GATEWAY_TIMEOUT,
        "overloaded_error" => StatusCode::SERVICE_UNAVAILABLE,
        // `api_error` and kinds added later: the vendor failed.
        _ => StatusCode::BAD_GATEWAY,
    };
    let kind = (!kind.is_empty()).then_some(kind);
    let message = (!message.is_empty()).then_some(message);
    upstream_status(provider, status, kind, message)
}

fn upstream_status(
    provider: &str,
    status: StatusCode,
    kind: Option<&str>,
    message: Option<&str>,
) -> GatewayError {
    let status = if status.as_u16() == OVERLOADED {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        status
    };
    let message = message.map_or_else(
        // A body that is not Anthropic's error JSON (a proxy's HTML page, say) says nothing
        // worth relaying.
        || format!("Provider `{provider}` answered {status}."),
        scrub_keys,
    );
    let body = json!({
        "error": {
            "message": message,
            "type": openai_error_type(status),
            "param": null,
            "code": kind,
        }
    });
    GatewayError::UpstreamStatus {
        retry_after: None,
        provider: provider.to_owned(),
        status,
        body: serde_json::to_vec(&body).map_or_else(|_| Bytes::new(), Bytes::from),
    }
}

/// OpenAI's `type` for an upstream status: what the OpenAI SDKs switch on.
fn openai_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "upstream_error",
    }
}

/// Anthropic's error `type` for a status.
fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | OVERLOADED => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Any gateway error as an Anthropic error response: its status and
/// `{"type":"error","error":{"type","message"}}`.
pub fn error_response(error: &GatewayError) -> (StatusCode, Bytes) {
    let status = error.status();
    let body = anthropic_error_json(error);
    (
        status,
        serde_json::to_vec(&body).map_or_else(
            |_| {
                Bytes::from_static(
                    br#"{"type":"error","error":{"type":"api_error","message":"internal error"}}"#,
                )
            },
            Bytes::from,
        ),
    )
}

pub(super) fn anthropic_error_json(error: &GatewayError) -> Value {
    json!({
        "type": "error",
        "error": {
            "type": anthropic_error_type(error.status()),
            "message": scrub_keys(&error_message(error)),
        }
    })
}

/// The message to show: the vendor's own when it sent an error body the gateway can read.
fn error_message(error: &GatewayError) -> String {
    if let GatewayError::UpstreamStatus { body, .. } = error
        && let Ok(envelope) = serde_json::from_slice::<ErrorEnvelope>(body)
        && let Some(message) = envelope.error.message
    {
        return message;
    }
    error.to_string()
}

/// Masks everything that looks like an API key: `sk-` (OpenAI and Anthropic's `sk-ant-`)
/// followed by enough key characters, at the start of a word so that `task-list` survives.
fn scrub_keys(message: &str) -> String {
    const MIN_SECRET_LEN: usize = 8;
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::with_capacity(message.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = message[search..].find("sk-") {
        let at = search + found;
        let starts_word = message[..at]
            .chars()
            .next_back()
            .is_none_or(|before| !before.is_ascii_alphanumeric());
        let after = &message[at + 3..];
        let secret_len = after.find(|c: char| !is_key_char(c)).unwrap_or(after.len());
        if starts_word && secret_len >= MIN_SECRET_LEN {
            out.push_str(&message[copied..at]);
            out.push_str("sk-***");
            copied = at + 3 + secret_len;
            search = copied;
        } else {
            search = at + 3;
        }
    }
    out.push_str(&message[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai_body(err: &GatewayError) -> Value {
        serde_json::from_slice(&err.to_json()).unwrap()
    }

    #[test]
    fn overloaded_becomes_503_with_the_vendor_message() {
        let status = StatusCode::from_u16(529).unwrap();
        let err = error_from_anthropic(
            "claude",
            status,
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#,
        );
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = openai_body(&err);
        assert_eq!(body["error"]["message"], "Overloaded");
        assert_eq!(body["error"]["code"], "overloaded_error");
        assert_eq!(body["error"]["param"], Value::Null);
        assert!(
            matches!(err, GatewayError::UpstreamStatus { ref provider, .. } if provider == "claude")
        );
    }

    #[test]
    fn client_errors_keep_their_status() {
        for (status, kind, openai_type) in [
            (400, "invalid_request_error", "invalid_request_error"),
            (401, "authentication_error", "authentication_error"),
            (403, "permission_error", "permission_error"),
            (404, "not_found_error", "not_found_error"),
            (429, "rate_limit_error", "rate_limit_error"),
        ] {
            let body = format!(
                r#"{{"type":"error","error":{{"type":"{kind}","message":"vendor says {status}"}}}}"#
            );
            let err = error_from_anthropic(
                "claude",
                StatusCode::from_u16(status).unwrap(),
                body.as_bytes(),
            );
            assert_eq!(err.status().as_u16(), status);
            let body = openai_body(&err);
            assert_eq!(body["error"]["message"], format!("vendor says {status}"));
            assert_eq!(body["error"]["type"], openai_type);
            assert_eq!(body["error"]["code"], kind);
        }
    }

    #[test]
    fn keys_are_scrubbed() {
        let err = error_from_anthropic(
            "claude",
            StatusCode::UNAUTHORIZED,
            br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key sk-ant-api03-AbCdEf_123-xyz, also sk-proj-1234567890abcdef."}}"#,
        );
        let message = openai_body(&err)["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(message, "invalid x-api-key sk-***, also sk-***.");
        assert_eq!(scrub_keys("task-list sk-short ok"), "task-list sk-short ok");
        assert_eq!(scrub_keys("risk-abcdefghijk"), "risk-abcdefghijk");
        assert_eq!(scrub_keys("(sk-abcdefghij)"), "(sk-***)");
        assert_eq!(scrub_keys("ends with sk-"), "ends with sk-");
        assert_eq!(scrub_keys("task-sk-abcdefghij"), "task-sk-***");
    }

    #[test]
    fn html_bodies_are_not_relayed() {
        let err = error_from_anthropic("claude", StatusCode::BAD_GATEWAY, b"<html>oops</html>");
        let body = openai_body(&err);
        assert_eq!(
            body["error"]["message"],
            "Provider `claude` answered 502 Bad Gateway."
        );
        assert_eq!(body["error"]["type"], "upstream_error");
        assert_eq!(body["error"]["code"], Value::Null);
    }

    #[test]
    fn stream_error_kinds_map_to_statuses() {
        assert_eq!(
            stream_error("p", "overloaded_error", "busy").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            stream_error("p", "rate_limit_error", "slow").status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            stream_error("p", "api_error", "boom").status(),
            StatusCode::BAD_GATEWAY
        );
        let body = openai_body(&stream_error("p", "", ""));
        assert_eq!(
            body["error"]["message"],
            "Provider `p` answered 502 Bad Gateway."
        );
    }

    #[test]
    fn gateway_errors_as_anthropic_errors() {
        let (status, body) = error_response(&GatewayError::invalid_request(
            "bad 'messages'",
            Some("messages".into()),
        ));
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad 'messages'"}})
        );

        let overloaded = error_from_anthropic(
            "claude",
            StatusCode::from_u16(529).unwrap(),
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        let (status, body) = error_response(&overloaded);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["error"],
            json!({"type": "overloaded_error", "message": "Overloaded"})
        );

        let openai_vendor = GatewayError::UpstreamStatus {
            retry_after: None,
            provider: "openai".into(),
            status: StatusCode::UNAUTHORIZED,
            body: Bytes::from_static(br#"{"error":{"message":"Incorrect API key provided: sk-abcdefghijklmnop","type":"invalid_request_error"}}"#),
        };
        let (status, body) = error_response(&openai_vendor);
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["error"],
            json!({"type": "authentication_error", "message": "Incorrect API key provided: sk-***"})
        );

        for (err, kind) in [
            (
                GatewayError::Unauthorized { message: "bad key" },
                "authentication_error",
            ),
            (
                GatewayError::ModelNotFound { model: "m".into() },
                "not_found_error",
            ),
            (
                GatewayError::PayloadTooLarge { limit_bytes: 1 },
                "request_too_large",
            ),
            (
                GatewayError::UpstreamTimeout {
                    provider: "p".into(),
                    after: std::time::Duration::from_secs(1),
                },
                "timeout_error",
            ),
            (GatewayError::Internal("x".into()), "api_error"),
            (GatewayError::ShuttingDown, "overloaded_error"),
        ] {
            let (status, body) = error_response(&err);
            assert_eq!(status, err.status());
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"]["type"], kind, "{err:?}");
        }
    }
}
