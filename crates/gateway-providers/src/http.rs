//! What every HTTP provider kind does the same way: reading bounded bodies, describing
//! transport failures and validating base URLs and keys. Choosing among several base URLs and
//! keys is in [`crate::rotation`].

use crate::config::ProviderConfig;
use bytes::Bytes;
use gateway_core::GatewayError;
use gateway_core::config::ConfigError;
use http::{HeaderValue, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

/// Largest vendor body read whole (a non-streamed completion).
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Error bodies are only relayed; a few kilobytes carry the message.
pub(crate) const MAX_ERROR_BYTES: usize = 1024 * 1024;

pub(crate) async fn read_body(
    provider: &str,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|err| GatewayError::UpstreamUnavailable {
            provider: provider.to_owned(),
            reason: format!("reading the response: {err}"),
        })
}

/// A failed upstream request as a 502. The legacy client's error hides its cause behind
/// `source()`; the chain says what actually failed (refused, reset, DNS, TLS).
pub(crate) fn unavailable(provider: &str, err: &hyper_util::client::legacy::Error) -> GatewayError {
    GatewayError::UpstreamUnavailable {
        provider: provider.to_owned(),
        reason: error_chain(err),
    }
}

pub(crate) fn error_chain(err: &hyper_util::client::legacy::Error) -> String {
    let mut reason = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    reason
}

/// Adds the call's W3C trace context (`traceparent`, `tracestate`) to an upstream request.
pub(crate) fn with_trace(
    mut builder: http::request::Builder,
    trace: Option<&gateway_core::trace::TraceHeaders>,
) -> http::request::Builder {
    if let Some(trace) = trace
        && let Some(headers) = builder.headers_mut()
    {
        trace.insert_into(headers);
    }
    builder
}

pub(crate) fn header_string(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// Letters, digits, `-`, `_` and `.`: safe to put in a URL path or query without encoding.
pub(crate) fn is_url_safe(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `{base}{suffix}` for each configured base URL, reporting every one that is not http(s).
pub(crate) fn endpoints(
    config: &ProviderConfig,
    path: &str,
    suffix: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<Uri> {
    if config.base_urls.is_empty() {
        errors.push(ConfigError::new(
            format!("{path}.base_urls"),
            format!(
                "a {} provider needs at least one base URL",
                config.kind.as_str()
            ),
        ));
    }
    let mut endpoints = Vec::new();
    for (index, base) in config.base_urls.iter().enumerate() {
        let url = format!("{}{suffix}", base.trim_end_matches('/'));
        match url.parse::<Uri>() {
            Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) => endpoints.push(uri),
            _ => errors.push(ConfigError::new(
                format!("{path}.base_urls[{index}]"),
                format!("`{base}` is not an http(s) URL"),
            )),
        }
    }
    endpoints
}

/// The configured keys as header values (shaped by `format`), marked sensitive so that no
/// debug output or HTTP/2 header table ever exposes them.
pub(crate) fn sensitive_values(
    config: &ProviderConfig,
    path: &str,
    format: impl Fn(&str) -> String,
    errors: &mut Vec<ConfigError>,
) -> Vec<HeaderValue> {
    let mut values = Vec::new();
    for (index, key) in config.api_keys.iter().enumerate() {
        match HeaderValue::from_str(&format(key.expose())) {
            Ok(mut value) => {
                value.set_sensitive(true);
                values.push(value);
            }
            Err(_) => errors.push(ConfigError::new(
                format!("{path}.api_keys[{index}]"),
                "contains characters not allowed in an HTTP header",
            )),
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_safety() {
        assert!(is_url_safe("gpt-4o_mini.2024"));
        for bad in ["", "a/b", "a?b", "a b", "../x", "a%2f"] {
            assert!(!is_url_safe(bad), "{bad}");
        }
    }
}
