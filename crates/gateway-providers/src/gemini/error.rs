//! Gemini error bodies (`{"error":{"code","message","status"}}`) -> OpenAI-shaped upstream
//! errors, with anything that looks like a credential scrubbed from the vendor's message.

use bytes::Bytes;
use gateway_core::GatewayError;
use http::StatusCode;
use serde_json::{Value, json};

/// Longest piece of a non-JSON error body quoted back (an HTML error page is mostly markup).
const MAX_QUOTED_BODY: usize = 200;

/// Translates a Gemini error response into the error the client sees.
///
/// The status is kept (429 stays 429, so SDKs back off; 400 stays 400...) except where it
/// would blame the wrong party: a Gemini 500 is the vendor's failure, so 502; and a rejected
/// Gemini key (401, or Gemini's 400 `API_KEY_INVALID`) is the gateway's configuration, not the
/// client's request, so 502 too.
pub fn error_from_gemini(provider: &str, status: StatusCode, body: &[u8]) -> GatewayError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    // Streaming endpoints without `alt=sse` wrap the error in an array.
    let error = match &parsed {
        Some(Value::Array(items)) => items.first().and_then(|item| item.get("error")),
        Some(value) => value.get("error"),
        None => None,
    };
    match error {
        Some(error) => from_error_value(provider, Some(status), error),
        None => {
            let mut message = format!("Provider `{provider}` answered {status}");
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if !text.is_empty() {
                let quoted: String = text.chars().take(MAX_QUOTED_BODY).collect();
                message.push_str(": ");
                message.push_str(&scrub_secrets(&quoted));
            }
            let status = client_status(status, false);
            upstream(provider, status, &message, None)
        }
    }
}

/// Translates the `error` object of a Gemini body. Without an HTTP status (an error sent as a
/// stream chunk, or in a 200 body) the status comes from the error's own `code`.
pub(crate) fn from_error_value(
    provider: &str,
    status: Option<StatusCode>,
    error: &Value,
) -> GatewayError {
    let status = status
        .or_else(|| {
            error
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|code| u16::try_from(code).ok())
                .and_then(|code| StatusCode::from_u16(code).ok())
        })
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let vendor_status = error.get("status").and_then(Value::as_str);
    let bad_key = status == StatusCode::UNAUTHORIZED
        || vendor_status == Some("UNAUTHENTICATED")
        || error
            .get("details")
            .and_then(Value::as_array)
            .is_some_and(|details| {
                details.iter().any(|detail| {
                    detail.get("reason").and_then(Value::as_str) == Some("API_KEY_INVALID")
                })
            });
    let message = match error.get("message").and_then(Value::as_str) {
        Some(message) if !message.is_empty() => scrub_secrets(message),
        _ => format!("Provider `{provider}` answered {status}"),
    };
    let message = if bad_key {
        format!("Provider `{provider}` rejected the gateway's credentials: {message}")
    } else {
        message
    };
    let code = if bad_key {
        Some("upstream_authentication_failed".to_owned())
    } else {
        vendor_status.map(str::to_ascii_lowercase)
    };
    upstream(provider, client_status(status, bad_key), &message, code)
}

fn client_status(status: StatusCode, bad_key: bool) -> StatusCode {
    if bad_key
        || status == StatusCode::INTERNAL_SERVER_ERROR
        || status == StatusCode::NOT_IMPLEMENTED
    {
        return StatusCode::BAD_GATEWAY;
    }
    if status.is_client_error() || status.is_server_error() {
        status
    } else {
        // An error body with a success status is the vendor misbehaving.
        StatusCode::BAD_GATEWAY
    }
}

/// OpenAI's `type` for a status, so SDKs classify the error as they would OpenAI's own.
fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        403 => "permission_error",
        408 | 504 => "timeout_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "upstream_error",
    }
}

fn upstream(
    provider: &str,
    status: StatusCode,
    message: &str,
    code: Option<String>,
) -> GatewayError {
    let body = json!({
        "error": {
            "message": message,
            "type": openai_type(status),
            "param": null,
            "code": code.unwrap_or_else(|| "upstream_error".to_owned()),
        }
    });
    GatewayError::UpstreamStatus {
        retry_after: None,
        provider: provider.to_owned(),
        status,
        body: Bytes::from(body.to_string()),
    }
}

/// Replaces what looks like a Google credential with `[REDACTED]`: API keys (`AIza...`),
/// OAuth access tokens (`ya29....`) and the value of any `key=` parameter. Vendor messages
/// sometimes quote the request URL or the key itself, and they are shown to clients and logs.
pub fn scrub_secrets(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let prefix_len = if rest.starts_with(b"AIza") || rest.starts_with(b"ya29.") {
            // The prefix is part of the secret.
            Some(0)
        } else if rest.len() >= 4
            && rest[..4].eq_ignore_ascii_case(b"key=")
            && (at == 0 || !bytes[at - 1].is_ascii_alphanumeric())
        {
            Some(4)
        } else {
            None
        };
        if let Some(keep) = prefix_len {
            let start = at + keep;
            let end = start
                + bytes[start..]
                    .iter()
                    .take_while(|byte| is_secret_byte(**byte))
                    .count();
            if end > start {
                // Every boundary here is next to an ASCII byte, so slicing is on char bounds.
                out.push_str(&text[copied..start]);
                out.push_str("[REDACTED]");
                copied = end;
                at = end;
                continue;
            }
        }
        at += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// Bytes a key or token is made of; anything else (space, quote, `&`, `,`...) ends it.
fn is_secret_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'%' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(err: &GatewayError) -> Value {
        match err {
            GatewayError::UpstreamStatus { body, .. } => serde_json::from_slice(body).unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn scrubs_keys_and_tokens() {
        assert_eq!(
            scrub_secrets("bad key AIzaSyA-1234567890abcdefghijklmnopqrstu, try again"),
            "bad key [REDACTED], try again"
        );
        assert_eq!(
            scrub_secrets("GET /v1beta/models/x?alt=sse&key=sk_live.1 failed; api_key=zzz"),
            "GET /v1beta/models/x?alt=sse&key=[REDACTED] failed; api_key=[REDACTED]"
        );
        assert_eq!(scrub_secrets("Bearer ya29.a0AfH6SM"), "Bearer [REDACTED]");
        // Ordinary words are not keys.
        assert_eq!(
            scrub_secrets("monkey=1, API key not valid, é key= x"),
            "monkey=1, API key not valid, é key= x"
        );
    }

    #[test]
    fn statuses() {
        let cases = [
            (429, "RESOURCE_EXHAUSTED", 429),
            (400, "INVALID_ARGUMENT", 400),
            (403, "PERMISSION_DENIED", 403),
            (404, "NOT_FOUND", 404),
            (503, "UNAVAILABLE", 503),
            (500, "INTERNAL", 502),
            (401, "UNAUTHENTICATED", 502),
        ];
        for (status, name, expected) in cases {
            let body = json!({"error": {"code": status, "message": "m", "status": name}});
            let err = error_from_gemini(
                "g",
                StatusCode::from_u16(status).unwrap(),
                body.to_string().as_bytes(),
            );
            assert_eq!(err.status().as_u16(), expected, "{name}");
        }
    }

    #[test]
    fn invalid_gemini_key_is_the_gateways_problem() {
        let body = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        let err = error_from_gemini("gem", StatusCode::BAD_REQUEST, body);
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        let body = body_of(&err);
        assert_eq!(body["error"]["code"], "upstream_authentication_failed");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("API key not valid")
        );
    }

    #[test]
    fn non_json_and_array_bodies() {
        let err = error_from_gemini(
            "gem",
            StatusCode::INTERNAL_SERVER_ERROR,
            b"<html>oops key=AIzaSECRETSECRET</html>",
        );
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        let message = body_of(&err)["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(!message.contains("SECRET"), "{message}");
        assert!(message.contains("oops"), "{message}");

        let err = error_from_gemini(
            "gem",
            StatusCode::TOO_MANY_REQUESTS,
            br#"[{"error":{"code":429,"message":"slow down","status":"RESOURCE_EXHAUSTED"}}]"#,
        );
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body_of(&err)["error"]["message"], "slow down");
    }
}
