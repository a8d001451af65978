//! Observability layer: one request id end to end, and one access-log line per request.
//!
//! Owns the `[observability]` config section, tracing set-up ([`init_tracing`]), and
//! [`ObserveLayer`], the outermost middleware: it gives each request its id and
//! [`RequestContext`](gateway_core::RequestContext), stamps `x-request-id` on every response
//! (errors included), and when the response body has been sent — or the client went away — hands
//! the request's final outcome to every [`RequestObserver`](gateway_core::RequestObserver).
//! [`AccessLog`] is one such observer; the usage recorder of the business layer is another.
//! The access log never has an API key or a prompt: only the outcome's fixed fields.
//! [`RequestMetrics`] is the observer behind the Prometheus `/metrics` of the admin listener;
//! [`CapturePolicy`] logs prompts and responses, redacted, for the projects that opted in, as
//! separate `gateway::capture` events.
//!
//! With `[observability.tracing]` on, [`OtlpTracing`] exports a span tree per request over
//! OTLP: [`ObserveLayer`] starts the root span (a child of the client's `traceparent`) and ends
//! it with the outcome's GenAI attributes when the observers run.

mod access_log;
pub mod capture;
mod config;
mod layer;
pub mod metrics;
mod otlp;
mod spans;
mod writer;

pub use access_log::AccessLog;
pub use capture::{CapturePolicy, ProjectCapture, Redactor, ResponseText};
pub use config::{LogFormat, ObservabilityConfig, OtlpProtocol, TracingConfig};
pub use layer::{FinishBody, ObserveFuture, ObserveLayer, ObserveService, REQUEST_ID_HEADER};
pub use metrics::RequestMetrics;
pub use otlp::{ExportStats, OtlpTracing, TracingError};
pub use writer::{BatchedWriter, LogGuard};

use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber writing to stdout in batches from a background
/// thread ([`BatchedWriter`]), so logging never makes a request wait for a write or a thread
/// wake-up. Keep the guard alive until exit: dropping it writes the lines still buffered.
/// `RUST_LOG`, when set, overrides `config.log_level`.
pub fn init_tracing(config: &ObservabilityConfig) -> LogGuard {
    let (writer, guard) = BatchedWriter::new(
        std::io::stdout(),
        Duration::from_millis(config.log_flush_interval_ms.max(1)),
    );
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.log_level.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // A second init (tests starting several gateways in one process) is harmless: the first
    // subscriber stays.
    let _already_set = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}
