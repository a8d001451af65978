//! The usage record: one row of `usage_events`, made from a finished request's outcome and
//! priced (`cost.rs`) before it is spooled.

use crate::cost::Cost;
use gateway_core::FinishedRequest;
use std::borrow::Cow;
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// One row of `usage_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub request_id: Uuid,
    pub created_at: OffsetDateTime,
    pub project: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    /// The project's tags as a JSON object.
    pub tags: Arc<str>,
    pub alias: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub upstream_model: Option<Arc<str>>,
    pub attempts: i32,
    pub status: i32,
    pub error_type: Option<Cow<'static, str>>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
    /// Prompt tokens written to the vendor's cache; like `cached_tokens`, part of
    /// `input_tokens`.
    pub cache_write_tokens: Option<i64>,
    /// `vendor` or `estimate`; `None` when no usage is known.
    pub usage_source: Option<Cow<'static, str>>,
    pub elapsed_ms: f64,
    pub ttft_ms: Option<f64>,
    pub streamed: bool,
    pub client_aborted: bool,
    pub vendor_response_id: Option<String>,
    pub vendor_request_id: Option<String>,
    /// What the request cost and the price row that made it. `None`: unknown (no usage, or no
    /// price for the target on the request's UTC day), never a silent zero.
    pub cost: Option<Cost>,
}

impl UsageRecord {
    /// The record of a finished request, or `None` if it never reached routing (rejected at
    /// the door: no alias, nothing to bill).
    pub fn from_finished(finished: &FinishedRequest<'_>) -> Option<Self> {
        let outcome = finished.outcome;
        if !outcome.routed {
            return None;
        }
        let principal = outcome.principal.as_ref();
        let usage = outcome.usage.as_ref();
        let tokens = |count: u64| i64::try_from(count).unwrap_or(i64::MAX);
        let error_type = outcome
            .error_type
            .map(|e| Cow::Borrowed(e.as_str()))
            .or(finished.client_aborted.then_some(Cow::Borrowed(
                gateway_core::ErrorType::ClientAborted.as_str(),
            )));
        Some(Self {
            request_id: finished.context.id.as_uuid(),
            created_at: finished.context.received_at,
            project: principal.map(|p| p.project.clone()),
            key_id: principal.map(|p| p.key_id.clone()),
            tags: principal.map_or_else(|| "{}".into(), |p| p.tags_json.clone()),
            alias: outcome.alias.clone(),
            provider: outcome.provider.clone(),
            upstream_model: outcome.upstream_model.clone(),
            attempts: i32::try_from(outcome.attempts.max(1)).unwrap_or(i32::MAX),
            status: i32::from(finished.status.as_u16()),
            error_type,
            input_tokens: usage.map(|u| tokens(u.prompt_tokens)),
            output_tokens: usage.map(|u| tokens(u.completion_tokens)),
            cached_tokens: usage.map(|u| tokens(u.cached_tokens())),
            reasoning_tokens: usage.map(|u| tokens(u.reasoning_tokens())),
            cache_write_tokens: usage.map(|u| tokens(u.cache_write_tokens())),
            usage_source: usage.map(|_| {
                Cow::Borrowed(if outcome.usage_estimated {
                    "estimate"
                } else {
                    "vendor"
                })
            }),
            elapsed_ms: millis(finished.elapsed),
            ttft_ms: outcome.time_to_first_token.map(millis),
            streamed: outcome.streamed,
            client_aborted: finished.client_aborted,
            vendor_response_id: outcome.vendor_response_id.clone(),
            vendor_request_id: outcome.vendor_request_id.clone(),
            cost: None,
        })
    }

    /// Whether the vendor (or the gateway's estimate) reported token counts.
    pub fn has_usage(&self) -> bool {
        self.input_tokens.is_some() || self.output_tokens.is_some()
    }
}

fn millis(duration: std::time::Duration) -> f64 {
    (duration.as_micros() as f64) / 1000.0
}
