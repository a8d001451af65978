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
        tracing::info!(
            target: "access",
            request_id = %context.id,
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
