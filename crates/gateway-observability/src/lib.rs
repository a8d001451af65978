//! Observability layer: request ids, the per-request access log, tracing setup.
