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
