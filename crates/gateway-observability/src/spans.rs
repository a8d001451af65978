//! The request's root span: started when the request arrives, ended with the outcome mapped to
//! the OpenTelemetry GenAI and HTTP conventions when the observers run (after the body, and
//! after any drain of an abandoned stream), so it covers the whole response.

use gateway_core::trace::otel::trace::Status;
use gateway_core::trace::otel::{Array, KeyValue, StringValue, Value};
use gateway_core::trace::{ActiveTrace, RequestTrace, TraceHeaders, Tracer, attr, operation_name};
use gateway_core::{FinishedRequest, RequestId};
use http::{Method, Request};
use std::sync::Arc;

/// The trace of a request arriving: a root span when tracing is on; otherwise the client's
/// valid trace context, forwarded upstream as it came.
pub(crate) fn request_trace<B>(
    tracer: Option<&Arc<Tracer>>,
    request: &Request<B>,
    id: RequestId,
) -> RequestTrace {
    let inbound = TraceHeaders::from_request(request.headers());
    let Some(tracer) = tracer else {
        return match inbound {
            Some((parent, headers)) => RequestTrace::Forward { parent, headers },
            None => RequestTrace::Off,
        };
    };
    let method = known_method(request.method());
    let route = gateway_core::SERVED_PATHS
        .iter()
        .find(|route| **route == request.uri().path())
        .copied();
    let name = match (method, route) {
        (Some(method), Some(route)) => format!("{method} {route}"),
        (Some(method), None) => method.to_owned(),
        (None, _) => "HTTP".to_owned(),
    };
    let mut attributes = vec![
        KeyValue::new(attr::HTTP_REQUEST_METHOD, method.unwrap_or("_OTHER")),
        KeyValue::new(attr::GATEWAY_REQUEST_ID, id.to_string()),
    ];
    if let Some(route) = route {
        attributes.push(KeyValue::new(attr::HTTP_ROUTE, route));
    }
    let parent = inbound.as_ref().map(|(parent, headers)| (*parent, headers));
    RequestTrace::On(Box::new(ActiveTrace::start(
        tracer.clone(),
        name,
        parent,
        attributes,
    )))
}

fn known_method(method: &Method) -> Option<&'static str> {
    Some(match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return None,
    })
}

/// Ends the root span with what the request came to. Only ids, names, numbers and classes:
/// never a key, a header value or a prompt.
pub(crate) fn end_root(finished: &FinishedRequest<'_>) {
    let Some(trace) = finished.context.trace().active() else {
        return;
    };
    let root = trace.root();
    if root.is_recording() {
        let outcome = finished.outcome;
        let status = finished.status.as_u16();
        let mut attributes = vec![
            KeyValue::new(attr::HTTP_RESPONSE_STATUS_CODE, i64::from(status)),
            KeyValue::new(attr::GATEWAY_CLIENT_ABORTED, finished.client_aborted),
        ];
        if let Some(principal) = &outcome.principal {
            attributes.push(KeyValue::new(
                attr::GATEWAY_PROJECT,
                principal.project.to_string(),
            ));
            attributes.push(KeyValue::new(
                attr::GATEWAY_KEY_ID,
                principal.key_id.to_string(),
            ));
        }
        if outcome.routed {
            attributes.push(KeyValue::new(
                attr::GEN_AI_OPERATION_NAME,
                operation_name(&finished.context.path),
            ));
            attributes.push(KeyValue::new(attr::GATEWAY_STREAMED, outcome.streamed));
            attributes.push(KeyValue::new(
                attr::GATEWAY_ATTEMPTS,
                i64::from(outcome.attempts),
            ));
        }
        for (key, value) in [
            // The alias that served, a fallback's when the one asked for fell back. The one
            // asked for is `gen_ai.request.model`, set on the root when routing starts.
            (attr::GATEWAY_ALIAS, &outcome.alias),
            (attr::GEN_AI_PROVIDER_NAME, &outcome.provider),
            (attr::GEN_AI_RESPONSE_MODEL, &outcome.upstream_model),
        ] {
            if let Some(value) = value {
                attributes.push(KeyValue::new(key, value.to_string()));
            }
        }
        if let Some(id) = &outcome.vendor_response_id {
            attributes.push(KeyValue::new(attr::GEN_AI_RESPONSE_ID, id.clone()));
        }
        if let Some(usage) = &outcome.usage {
            attributes.push(KeyValue::new(
                attr::GEN_AI_USAGE_INPUT_TOKENS,
                saturating_i64(usage.prompt_tokens),
            ));
            attributes.push(KeyValue::new(
                attr::GEN_AI_USAGE_OUTPUT_TOKENS,
                saturating_i64(usage.completion_tokens),
            ));
            attributes.push(KeyValue::new(
                attr::GATEWAY_USAGE_ESTIMATED,
                outcome.usage_estimated,
            ));
        }
        if let Some(ttft) = outcome.time_to_first_token {
            attributes.push(KeyValue::new(
                attr::GATEWAY_TTFT_MS,
                ttft.as_secs_f64() * 1000.0,
            ));
        }
        let reasons = trace.finish_reasons();
        if !reasons.is_empty() {
            attributes.push(KeyValue::new(
                attr::GEN_AI_RESPONSE_FINISH_REASONS,
                Value::Array(Array::String(
                    reasons.into_iter().map(StringValue::from).collect(),
                )),
            ));
        }
        if let Some(error) = outcome.error_type {
            attributes.push(KeyValue::new(attr::ERROR_TYPE, error.as_str()));
        }
        root.set_attributes(attributes);
        // A server span is an error only when the server failed; a 4xx is the client's.
        if finished.status.is_server_error() {
            let description = outcome.error_type.map_or("server error", |e| e.as_str());
            root.set_status(Status::error(description));
        }
    }
    root.end();
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
