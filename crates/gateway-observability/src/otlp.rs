//! OTLP trace export: the tracer the request path records with, and the queue that carries
//! finished spans to the collector off the request path.
//!
//! The SDK's batch processors either export from a plain thread (where the async HTTP and
//! gRPC clients cannot run) or hide how many spans they dropped, so finished spans go through
//! [`ExportQueue`]: a bounded channel that a span end never waits on (a full queue drops the
//! span and counts it) and one tokio task that exports batches, each under the export timeout.
//! A dead or slow collector therefore costs requests nothing: it only fills the queue.

use crate::config::{OtlpProtocol, TracingConfig};
use gateway_core::trace::{Tracer, otel};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Start-up errors of `[observability.tracing]`.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("building the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("OTLP export needs a tokio runtime")]
    NoRuntime,
}

/// Counts of spans handed to the export queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
    /// Spans lost with an export that failed or timed out.
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ExportStats {
        ExportStats {
            exported: self.exported.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// The running trace pipeline: keep it until shutdown, then call [`OtlpTracing::shutdown`].
#[derive(Debug)]
pub struct OtlpTracing {
    provider: SdkTracerProvider,
    tracer: Arc<Tracer>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    worker: JoinHandle<()>,
    export_timeout: Duration,
}

impl OtlpTracing {
    /// Builds the exporter and starts the export task, or returns `None` when tracing is
    /// disabled. Must run inside the tokio runtime that will serve requests.
    pub fn start(config: &TracingConfig) -> Result<Option<Self>, TracingError> {
        if !config.enabled {
            return Ok(None);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TracingError::NoRuntime)?;
        let export_timeout = Duration::from_millis(config.export_timeout_ms.max(1));
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let mut exporter = match config.protocol {
            OtlpProtocol::HttpProtobuf => {
                let base = config
                    .endpoint
                    .as_deref()
                    .unwrap_or("http://127.0.0.1:4318");
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(traces_url(base))
                    .with_timeout(export_timeout)
                    .build()?
            }
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(
                    config
                        .endpoint
                        .clone()
                        .unwrap_or_else(|| "http://127.0.0.1:4317".into()),
                )
                .with_timeout(export_timeout)
                .build()?,
        };
        exporter.set_resource(&resource);
        let counters = Arc::new(Counters::default());
        let (spans, queued) = mpsc::channel(config.max_queue_size.max(1));
        let (stop, stopped) = watch::channel(false);
        let worker = runtime.spawn(export_loop(
            exporter,
            queued,
            stopped,
            counters.clone(),
            Batching {
                max_batch: config.max_export_batch_size.max(1),
                interval: Duration::from_millis(config.export_interval_ms.max(1)),
                timeout: export_timeout,
            },
        ));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(ExportQueue {
                spans,
                counters: counters.clone(),
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = otel::trace::TracerProvider::tracer(&provider, "llm-gateway");
        Ok(Some(Self {
            provider,
            tracer: Arc::new(Tracer::new(Box::new(tracer))),
            counters,
            stop,
            worker,
            export_timeout,
        }))
    }

    /// The tracer every request's spans are recorded with.
    pub fn tracer(&self) -> Arc<Tracer> {
        self.tracer.clone()
    }

    pub fn stats(&self) -> ExportStats {
        self.counters.snapshot()
    }

    /// Exports the spans still queued, waiting at most `limit` (and never longer than one
    /// export timeout), then stops the export task.
    pub async fn shutdown(self, limit: Duration) -> ExportStats {
        let _ignored = self.stop.send(true);
        let mut worker = self.worker;
        let limit = limit.min(self.export_timeout);
        if tokio::time::timeout(limit, &mut worker).await.is_err() {
            tracing::warn!(
                limit_ms = limit.as_millis() as u64,
                "trace export did not finish in time; queued spans are lost"
            );
            worker.abort();
        }
        // The processor does nothing on shutdown; this only marks the provider shut.
        let _ignored = self.provider.shutdown();
        let stats = self.counters.snapshot();
        tracing::info!(
            exported = stats.exported,
            dropped = stats.dropped,
            failed = stats.failed,
            "trace export stopped"
        );
        stats
    }
}

/// `{base}/v1/traces`, unless `base` already names the traces path.
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// The span processor: hands each finished, sampled span to the export task without waiting.
#[derive(Debug)]
struct ExportQueue {
    spans: mpsc::Sender<SpanData>,
    counters: Arc<Counters>,
}

impl SpanProcessor for ExportQueue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &otel::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Flushing is the export task's job, on its interval and at shutdown; nothing on the
    /// request path may wait for the collector.
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Batching {
    max_batch: usize,
    interval: Duration,
    timeout: Duration,
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queued: mpsc::Receiver<SpanData>,
    mut stopped: watch::Receiver<bool>,
    counters: Arc<Counters>,
    batching: Batching,
) {
    let mut batch = Vec::with_capacity(batching.max_batch);
    let mut ticker = tokio::time::interval(batching.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            span = queued.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= batching.max_batch {
                        export(&exporter, &mut batch, &counters, batching.timeout).await;
                    }
                }
                None => break,
            },
            _ = ticker.tick() => export(&exporter, &mut batch, &counters, batching.timeout).await,
            _ = stopped.changed() => break,
        }
    }
    // Shutting down: what is queued now goes out, in full batches, then the rest.
    while let Ok(span) = queued.try_recv() {
        batch.push(span);
        if batch.len() >= batching.max_batch {
            export(&exporter, &mut batch, &counters, batching.timeout).await;
        }
    }
    export(&exporter, &mut batch, &counters, batching.timeout).await;
    let _ignored = exporter.shutdown();
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    counters: &Counters,
    timeout: Duration,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let count = spans.len() as u64;
    match tokio::time::timeout(timeout, exporter.export(spans)).await {
        Ok(Ok(())) => {
            counters.exported.fetch_add(count, Ordering::Relaxed);
        }
        Ok(Err(err)) => {
            counters.failed.fetch_add(count, Ordering::Relaxed);
            tracing::warn!(spans = count, error = %err, "trace export failed");
        }
        Err(_) => {
            counters.failed.fetch_add(count, Ordering::Relaxed);
            tracing::warn!(
                spans = count,
                timeout_ms = timeout.as_millis() as u64,
                "trace export timed out"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
