//! A lazily connected Redis link, as the limiter and the idempotency store each use one.
//!
//! A dead Redis must never slow a request: every command runs under a short timeout, and
//! after a failure the link reports itself down at once for a back-off period instead of
//! making each request wait for its own connect attempt. The callers then apply their
//! configured failure mode (fail-open to a local limit, or fail-closed).

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a Redis command did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisUnavailable {
    #[error("redis is marked down after a recent failure")]
    MarkedDown,
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A shared, cheaply cloned handle to one Redis server.
#[derive(Clone)]
pub struct RedisLink {
    inner: Arc<Inner>,
}

struct Inner {
    manager: ConnectionManager,
    command_timeout: Duration,
    down_for: Duration,
    origin: Instant,
    /// Nanoseconds since `origin` until which the link is considered down; 0 = up.
    down_until: AtomicU64,
    failures: AtomicU64,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("command_timeout", &self.inner.command_timeout)
            .field("failures", &self.inner.failures.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// Parses the URL and prepares the link; nothing is connected until the first command,
    /// so a gateway starts even when Redis is down.
    pub fn new(
        url: &str,
        command_timeout: Duration,
        down_for: Duration,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(command_timeout))
            .set_response_timeout(Some(command_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let manager = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            inner: Arc::new(Inner {
                manager,
                command_timeout,
                down_for,
                origin: Instant::now(),
                down_until: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        })
    }

    /// Runs one command (or script invocation) on the shared connection.
    pub async fn run<T, F, Fut>(&self, command: F) -> Result<T, RedisUnavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let now = self.now_nanos();
        let until = self.inner.down_until.load(Ordering::Acquire);
        if until != 0 && now < until {
            return Err(RedisUnavailable::MarkedDown);
        }
        let timeout = self.inner.command_timeout;
        let result = match tokio::time::timeout(timeout, command(self.inner.manager.clone())).await
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(RedisUnavailable::Redis(err)),
            Err(_elapsed) => Err(RedisUnavailable::Timeout(timeout)),
        };
        match &result {
            Ok(_) => {
                if until != 0 {
                    self.inner.down_until.store(0, Ordering::Release);
                }
            }
            Err(RedisUnavailable::Redis(err)) if !is_connection_problem(err) => {}
            Err(_) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                let down_for = u64::try_from(self.inner.down_for.as_nanos()).unwrap_or(u64::MAX);
                self.inner
                    .down_until
                    .store(now.saturating_add(down_for).max(1), Ordering::Release);
            }
        }
        result
    }

    /// Connection-level failures counted since start.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.inner.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Errors that say the server could not be reached (as opposed to a script or type error,
/// which is a bug to report, not a reason to mark the link down).
fn is_connection_problem(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
}
