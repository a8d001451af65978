//! The access log: one structured line per finished request.

use gateway_core::{FinishedRequest, RequestObserver};

/// Writes one structured `access` event per finished request.
///
/// Fields are a fixed set taken from the outcome: ids, names, numbers and the error class.
/// Nothing from the request body or headers is logged, so keys and prompts cannot leak here.
#[derive(Debug, Default, Clone, Copy)]
pub struct AccessLog;

impl RequestObserver for AccessLog {
    fn request_finished(&self, finished: &FinishedRequest<'_>) {
        let context = finished.context;
        let outcome = finished.outcome;
        let principal = outcome.principal.as_ref();
        let usage = outcome.usage.as_ref();
        // Set whenever the request belongs to a trace, recorded here or only forwarded.
        let trace_id = context.trace().trace_id();
        tracing::info!(
            target: "access",
            request_id = %context.id,
            trace_id = trace_id.as_deref(),
            client_ip = outcome.client_ip.map(tracing::field::display),
            method = %context.method,
            path = %context.path,
            status = finished.status.as_u16(),
            project = principal.map(|p| &*p.project),
            key_id = principal.map(|p| &*p.key_id),
            alias = outcome.alias.as_deref(),
            provider = outcome.provider.as_deref(),
            model = outcome.upstream_model.as_deref(),
            streamed = outcome.streamed,
            elapsed_ms = millis(finished.elapsed),
            ttft_ms = outcome.time_to_first_token.map(millis),
            input_tokens = usage.map(|u| u.prompt_tokens),
            output_tokens = usage.map(|u| u.completion_tokens),
            error_type = outcome.error_type.map(|e| e.as_str()),
            client_aborted = finished.client_aborted,
            "request finished"
        );
    }
}

/// Milliseconds with microsecond resolution: sub-millisecond overheads stay visible.
fn millis(duration: std::time::Duration) -> f64 {
    (duration.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_core::trace::{RequestTrace, TraceHeaders};
    use gateway_core::{RequestContext, RequestId, RequestOutcome};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The access line of one finished request with `trace`.
    fn line(trace: RequestTrace) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let context = RequestContext::new(RequestId::new_v7(), http::Method::POST, "/".into())
            .with_trace(trace);
        let outcome = RequestOutcome::default();
        tracing::subscriber::with_default(subscriber, || {
            AccessLog.request_finished(&FinishedRequest {
                context: &context,
                outcome: &outcome,
                status: http::StatusCode::OK,
                elapsed: std::time::Duration::from_millis(1),
                client_aborted: false,
            });
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_trace_id_is_logged_whenever_the_request_has_one() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        let (parent, headers) = TraceHeaders::from_request(&headers).unwrap();
        let logged = line(RequestTrace::Forward { parent, headers });
        assert!(
            logged.contains(r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736""#),
            "{logged}"
        );
        let logged = line(RequestTrace::Off);
        assert!(logged.contains("request finished"), "{logged}");
        assert!(!logged.contains("trace_id"), "{logged}");
    }
}
