//! Policy layer: what limits a request and its upstream calls.
//!
//! Owns the `[policy]` config section and, as separate modules:
//! - [`limits`]: request and token rate limits per project, key and alias, in process or
//!   shared across replicas through Redis;
//! - [`breaker`]: a circuit breaker per upstream;
//! - [`retry`]: which errors are retried, the back-off between attempts and the retry budget;
//! - [`idempotency`]: `Idempotency-Key` replay, in process or through Redis;
//! - [`shed`]: caps on in-flight requests;
//! - deadlines ([`with_deadline`]): a call that has not answered in time is dropped (which
//!   cancels the upstream request) and becomes a 504.
//!
//! Time comes from tokio, so the tests run with paused time.

pub mod breaker;
mod config;
pub mod idempotency;
pub mod limits;
mod redis_link;
pub mod retry;
pub mod shed;

pub use config::PolicyConfig;
pub use redis_link::{RedisLink, RedisUnavailable};

use breaker::Breakers;
use idempotency::IdempotencyStore;
use limits::Limiter;
use retry::RetryBudget;
use shed::InFlight;

/// The policy state of one process: it outlives config versions (a reload re-tunes it), so
/// counts, breaker states and idempotency claims survive reloads.
#[derive(Debug)]
pub struct Policy {
    pub limiter: Limiter,
    pub breakers: Breakers,
    pub retry_budget: RetryBudget,
    pub idempotency: IdempotencyStore,
    pub in_flight: InFlight,
}

/// A `[policy]` that cannot be put to work.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy rate limits: {0}")]
    Limits(#[from] limits::LimitError),
    #[error("policy.idempotency: {0}")]
    Idempotency(#[from] idempotency::IdempotencyError),
}

impl Policy {
    /// Builds the policy state. Call it inside the tokio runtime: the Redis links are made
    /// there (lazily: a Redis that is down at start is not an error).
    pub fn new(config: &PolicyConfig) -> Result<Self, PolicyError> {
        Ok(Self {
            limiter: Limiter::new(&config.limiter())?,
            breakers: Breakers::new(&config.breaker),
            retry_budget: RetryBudget::new(&config.retry),
            idempotency: IdempotencyStore::new(&config.idempotency_store())?,
            in_flight: InFlight::new(),
        })
    }

    /// Applies a reloaded config's tunable settings (the rest is read per request from the
    /// config snapshot, or fixed at start).
    pub fn apply(&self, config: &PolicyConfig) {
        self.breakers.set_config(&config.breaker);
        self.retry_budget.set_config(&config.retry);
    }
}

impl gateway_core::UpstreamHealth for Breakers {
    fn is_open(&self, provider: &str) -> bool {
        Breakers::is_open(self, provider)
    }
}

use gateway_core::GatewayError;
use std::future::Future;
use std::time::Duration;

/// Runs `call` with a deadline. On expiry the call's future is dropped, ending the upstream
/// request, and the caller gets [`GatewayError::UpstreamTimeout`].
pub async fn with_deadline<T, F>(
    provider: &str,
    deadline: Duration,
    call: F,
) -> Result<T, GatewayError>
where
    F: Future<Output = Result<T, GatewayError>>,
{
    match tokio::time::timeout(deadline, call).await {
        Ok(result) => result,
        Err(_elapsed) => Err(GatewayError::UpstreamTimeout {
            provider: provider.to_string(),
            after: deadline,
        }),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test(start_paused = true)]
    async fn slow_call_times_out_and_is_cancelled() {
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = SetOnDrop(dropped.clone());
        let result: Result<(), _> = with_deadline("p", Duration::from_secs(60), async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(61)).await;
            Ok(())
        })
        .await;
        let err = result.unwrap_err();
        assert_eq!(err.status().as_u16(), 504);
        assert!(
            dropped.load(Ordering::SeqCst),
            "upstream call must be dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fast_call_passes_through() {
        let result = with_deadline("p", Duration::from_secs(60), async {
            tokio::time::sleep(Duration::from_secs(59)).await;
            Ok::<_, GatewayError>(7)
        })
        .await;
        assert_eq!(result.unwrap(), 7);
    }
}
