//! Request and token rate limits per project, API key and alias, in process or shared across
//! replicas through Redis.
//!
//! A request is checked against every limit that applies to it (its project's, its key's, its
//! alias's; an alias limit is shared by all callers of the alias) at once: either all of them
//! have room and all are charged, or none is charged and the request is rejected. Otherwise a
//! request turned away by its project would still use up its key's allowance.
//!
//! # Algorithm
//! GCRA with a burst equal to the per-minute limit: a fresh limit admits `N` at once, then
//! refills at `N / 60` per second. The arithmetic lives in `limits/gcra.rs` and is repeated
//! in `limits/gcra.lua`, which Redis runs (EVALSHA) to check and charge all limits of a
//! request in one round trip, on the server's clock (`TIME`), so replicas whose clocks differ
//! still agree. Keys expire (`PX`) when their debt is paid off.
//!
//! # Tokens
//! At admission the caller reserves an estimate (prompt estimate + `max_tokens`); a
//! reservation of 0 skips the token check (the token limits are still reported). When the
//! usage is known, [`Admission::settle`] refunds what was not used or charges the excess. An
//! excess is never refused after the fact: it may put a limit into debt, which delays the
//! requests that follow. A reservation larger than a limit's whole minute can never pass: it
//! is rejected at once with `oversized: true` and a `retry_after` of the full minute.
//!
//! # When Redis is unreachable
//! Every Redis call runs under `redis_timeout_ms`, and after a connection failure the link
//! reports itself down for `redis_down_secs` without trying, so a dead Redis never slows a
//! request beyond the timeout. `fail-open` then decides in process with each limit divided
//! by `replicas`; `fail-closed` rejects with [`Rejection::Unavailable`]. Failures are counted
//! in [`LimiterStats`] and logged at the 1st, 2nd, 4th, 8th... failure.
//!
//! # Why not `governor`
//! governor charges on every check, with no way to look before charging or to give back, so
//! it can neither check several scopes all-or-nothing nor refund unused tokens; and the
//! fallback must follow the same rules as the Redis path, or a Redis outage would change
//! which requests pass. Both stores therefore share one GCRA implementation of our own.
//!
//! # Redis keys
//! `<key_prefix><project|key|alias>:<req|tok>:<name>`. One script call touches several keys,
//! so on Redis Cluster they must share a slot: put a hash tag in the prefix (`"{gw}:rl:"`).

mod gcra;
mod local;
mod remote;

use crate::redis_link::{RedisLink, RedisUnavailable};
use gateway_core::RateLimit;
use local::LocalStore;
use remote::RemoteStore;
use serde::Deserialize;
use std::cmp::Reverse;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The length of the window every limit is expressed over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Who a limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitScope {
    Project,
    Key,
    Alias,
}

impl LimitScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Project => "project",
            Self::Key => "key",
            Self::Alias => "alias",
        }
    }
}

impl fmt::Display for LimitScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    Requests,
    Tokens,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }

    fn key_part(self) -> &'static str {
        match self {
            Self::Requests => "req",
            Self::Tokens => "tok",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One limit that applies to a request. Limits come with every call, so a config reload
/// takes effect at once while the state (keyed by scope and name) carries on: what carries
/// over is the share of the minute used (half of 10 per minute becomes 3 of 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitCheck {
    pub scope: LimitScope,
    /// The project name, key id or alias.
    pub name: Arc<str>,
    pub limit: RateLimit,
}

impl LimitCheck {
    pub fn new(scope: LimitScope, name: impl Into<Arc<str>>, limit: RateLimit) -> Self {
        Self {
            scope,
            name: name.into(),
            limit,
        }
    }
}

/// Where limit state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process only.
    #[default]
    Local,
    /// In Redis, shared by every replica.
    Redis,
}

/// What to do when Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureMode {
    /// Decide in process, with each limit divided by `replicas`.
    #[default]
    FailOpen,
    /// Reject every request that has a limit ([`Rejection::Unavailable`]).
    FailClosed,
}

impl FailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailOpen => "fail-open",
            Self::FailClosed => "fail-closed",
        }
    }
}

/// Rate-limit settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimiterConfig {
    /// `"local"` or `"redis"`. Default `"local"`.
    pub backend: Backend,
    /// Required with `backend = "redis"`, e.g. `"redis://127.0.0.1:6379"`. Default none.
    pub redis_url: Option<String>,
    /// `"fail-open"` or `"fail-closed"`. Default `"fail-open"`.
    pub on_redis_failure: FailureMode,
    /// How many gateway processes share the limits. Whenever a process enforces limits on its
    /// own (`backend = "local"`, or fail-open while Redis is down) it allows `limit /
    /// replicas`, at least 1. Default 1.
    pub replicas: u32,
    /// Deadline of one Redis call, connecting included. Default 50.
    pub redis_timeout_ms: u64,
    /// After a connection failure, how long Redis is taken as down without trying. Default 1.
    pub redis_down_secs: u64,
    /// Prefix of every Redis key. Default `"gw:rl:"`.
    pub key_prefix: String,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Local,
            redis_url: None,
            on_redis_failure: FailureMode::FailOpen,
            replicas: 1,
            redis_timeout_ms: 50,
            redis_down_secs: 1,
            key_prefix: "gw:rl:".to_string(),
        }
    }
}

/// Why a [`LimiterConfig`] cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("rate limits: backend \"redis\" needs redis_url")]
    MissingRedisUrl,
    // The URL itself is left out: it may hold a password.
    #[error("rate limits: redis_url is not usable: {0}")]
    BadRedisUrl(#[source] redis::RedisError),
    #[error("rate limits: replicas must be at least 1")]
    ZeroReplicas,
    #[error("rate limits: redis_timeout_ms must be at least 1")]
    ZeroTimeout,
    #[error("rate limits: the redis backend must be set up inside a tokio runtime")]
    NoRuntime,
}

/// The state of the tightest limit of one dimension, for OpenAI's
/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    /// Time until the limit is back to a full burst.
    pub reset: Duration,
}

/// A request that was let through. Pass it the real usage with [`Admission::settle`] (or
/// [`Admission::settle_in_background`]); dropped unsettled, the whole reservation stays
/// charged.
pub struct Admission {
    /// `None` when no request limit applies.
    pub requests: Option<Quota>,
    /// `None` when no token limit applies.
    pub tokens: Option<Quota>,
    reserved_tokens: u64,
    settlement: Option<Settlement>,
}

/// What settling needs: the token limits exactly as they were charged (a reload in between
/// must not change the correction), and where they were charged.
struct Settlement {
    inner: Arc<Inner>,
    via: Via,
    lines: Vec<Line>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Local,
    Redis,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("requests", &self.requests)
            .field("tokens", &self.tokens)
            .field("reserved_tokens", &self.reserved_tokens)
            .field("via", &self.settlement.as_ref().map(|s| s.via))
            .finish()
    }
}

impl Admission {
    pub fn reserved_tokens(&self) -> u64 {
        self.reserved_tokens
    }

    /// Corrects the token reservation to `actual_tokens`: refunds the difference or charges
    /// the excess (which may leave the limit in debt).
    pub async fn settle(self, actual_tokens: u64) {
        if let Some(pending) = self.settle_locally(actual_tokens) {
            pending.run().await;
        }
    }

    /// [`Admission::settle`] for places that cannot wait, such as `Drop`: an in-process
    /// correction happens at once, a Redis one in a spawned task. Outside a tokio runtime a
    /// Redis correction is dropped (logged) and the reservation stays charged.
    pub fn settle_in_background(self, actual_tokens: u64) {
        if let Some(pending) = self.settle_locally(actual_tokens) {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(pending.run());
                }
                Err(_) => tracing::warn!(
                    "rate limits: no tokio runtime to settle tokens in; the reservation stays"
                ),
            }
        }
    }

    /// Applies an in-process correction; returns a Redis one still to be sent.
    fn settle_locally(self, actual_tokens: u64) -> Option<PendingSettle> {
        let settlement = self.settlement?;
        let delta = i128::from(actual_tokens) - i128::from(self.reserved_tokens);
        let delta = i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
        if delta == 0 {
            return None;
        }
        let lines: Vec<Line> = settlement
            .lines
            .into_iter()
            .map(|line| Line {
                units: delta,
                ..line
            })
            .collect();
        match settlement.via {
            Via::Local => {
                settlement.inner.local.apply(&lines, false);
                None
            }
            Via::Redis => Some(PendingSettle {
                inner: settlement.inner,
                lines,
            }),
        }
    }
}

struct PendingSettle {
    inner: Arc<Inner>,
    lines: Vec<Line>,
}

impl PendingSettle {
    async fn run(self) {
        if let Some(remote) = &self.inner.remote
            && let Err(err) = remote.apply(&self.lines, false).await
        {
            self.inner.redis_failed(&err, "settle");
        }
    }
}

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{dimension} limit of {scope} {name:?} reached; retry after {retry_after:?}")]
    Limited {
        /// The limit that holds the request back longest (an oversized one first).
        scope: LimitScope,
        name: Arc<str>,
        dimension: Dimension,
        /// When the request would fit; with `oversized`, the full window.
        retry_after: Duration,
        /// The request alone needs more than the limit allows in a whole minute: waiting
        /// cannot help.
        oversized: bool,
        /// The tightest limits as they stand (nothing was charged).
        requests: Option<Quota>,
        tokens: Option<Quota>,
    },
    /// `fail-closed` and Redis cannot be reached.
    #[error("rate limits cannot be checked: redis is unavailable")]
    Unavailable,
}

impl Rejection {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Limited { retry_after, .. } => Some(*retry_after),
            Self::Unavailable => None,
        }
    }
}

/// Counters since the limiter was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct LimiterStats {
    pub admitted: u64,
    /// Rejections by a limit ([`Rejection::Limited`]).
    pub rejected: u64,
    /// Of `rejected`, those whose limit was a project's, a key's or an alias's.
    pub rejected_project: u64,
    pub rejected_key: u64,
    pub rejected_alias: u64,
    /// Redis calls (admissions and settlements) that got no answer.
    pub redis_failures: u64,
    /// Admissions decided in process because Redis could not be reached.
    pub fail_open_decisions: u64,
    /// [`Rejection::Unavailable`] answers.
    pub fail_closed_rejections: u64,
}

/// The rate limiter. Cheap to clone; keep one for the life of the process, since it holds
/// the in-process limit state.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    remote: Option<RemoteStore>,
    /// The whole store with `backend = "local"`; the fail-open fallback with Redis.
    local: LocalStore,
    replicas: u64,
    on_redis_failure: FailureMode,
    admitted: AtomicU64,
    /// Rejections by [`LimitScope`]: project, key, alias (their sum is the total).
    rejected_by_scope: [AtomicU64; 3],
    redis_failures: AtomicU64,
    fail_open_decisions: AtomicU64,
    fail_closed_rejections: AtomicU64,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("redis", &self.inner.remote.is_some())
            .field("replicas", &self.inner.replicas)
            .field("on_redis_failure", &self.inner.on_redis_failure)
            .finish_non_exhaustive()
    }
}

/// One limit of one request as the stores see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    scope: LimitScope,
    name: Arc<str>,
    dimension: Dimension,
    /// Per minute, at least 1 by the time a store sees it.
    limit: u64,
    /// To charge: 1 request, the reserved tokens, or a signed correction when settling.
    units: i64,
}

impl Line {
    fn charge(&self) -> gcra::Charge {
        gcra::Charge {
            limit: self.limit,
            units: self.units,
        }
    }

    /// Asks for more than the limit allows in a whole minute, so it can never fit.
    fn oversized(&self) -> bool {
        u64::try_from(self.units).is_ok_and(|units| units > self.limit)
    }

    fn quota(&self, verdict: &gcra::Verdict) -> Quota {
        Quota {
            limit: self.limit,
            remaining: verdict.remaining,
            reset: Duration::from_micros(verdict.reset_us),
        }
    }
}

/// What a store answers for one request: the verdicts are in the order of its lines.
struct Outcome {
    admitted: bool,
    verdicts: Vec<gcra::Verdict>,
}

impl Limiter {
    /// Prepares the limiter. Redis is not contacted until the first request, so the gateway
    /// starts while Redis is down. With `backend = "redis"` this must run inside a tokio
    /// runtime (the connection manager spawns its task here).
    pub fn new(config: &LimiterConfig) -> Result<Self, LimitError> {
        if config.replicas == 0 {
            return Err(LimitError::ZeroReplicas);
        }
        if config.redis_timeout_ms == 0 {
            return Err(LimitError::ZeroTimeout);
        }
        let remote = match config.backend {
            Backend::Local => None,
            Backend::Redis => {
                let url = config
                    .redis_url
                    .as_deref()
                    .ok_or(LimitError::MissingRedisUrl)?;
                redis::Client::open(url).map_err(LimitError::BadRedisUrl)?;
                // The redis crate would panic instead.
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(LimitError::NoRuntime);
                }
                let link = RedisLink::new(
                    url,
                    Duration::from_millis(config.redis_timeout_ms),
                    Duration::from_secs(config.redis_down_secs),
                )
                .map_err(LimitError::BadRedisUrl)?;
                Some(RemoteStore::new(link, config.key_prefix.clone()))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                remote,
                local: LocalStore::new(),
                replicas: u64::from(config.replicas),
                on_redis_failure: config.on_redis_failure,
                admitted: AtomicU64::new(0),
                rejected_by_scope: Default::default(),
                redis_failures: AtomicU64::new(0),
                fail_open_decisions: AtomicU64::new(0),
                fail_closed_rejections: AtomicU64::new(0),
            }),
        })
    }

    /// Checks one request against all `checks` and charges them all, or none. Charges one
    /// request and `reserve_tokens` tokens (0 skips the token check).
    pub async fn admit(
        &self,
        checks: &[LimitCheck],
        reserve_tokens: u64,
    ) -> Result<Admission, Rejection> {
        let inner = &self.inner;
        let reserve = i64::try_from(reserve_tokens).unwrap_or(i64::MAX);
        let mut lines = lines_for(checks, reserve);
        if let Some(zero) = lines.iter().find(|line| line.limit == 0 && line.units > 0) {
            // A limit of 0 admits nothing ever; it never reaches a store (it would divide
            // by zero there).
            let quota = Some(Quota {
                limit: 0,
                remaining: 0,
                reset: Duration::ZERO,
            });
            inner.count_rejection(zero.scope);
            return Err(Rejection::Limited {
                scope: zero.scope,
                name: zero.name.clone(),
                dimension: zero.dimension,
                retry_after: WINDOW,
                oversized: true,
                requests: quota.filter(|_| zero.dimension == Dimension::Requests),
                tokens: quota.filter(|_| zero.dimension == Dimension::Tokens),
            });
        }
        lines.retain(|line| line.limit > 0);
        if lines.is_empty() {
            inner.admitted.fetch_add(1, Ordering::Relaxed);
            return Ok(Admission {
                requests: None,
                tokens: None,
                reserved_tokens: reserve_tokens,
                settlement: None,
            });
        }
        let (via, lines, outcome) = match &inner.remote {
            None => inner.decide_locally(lines),
            Some(remote) => match remote.apply(&lines, true).await {
                Ok(outcome) => (Via::Redis, lines, outcome),
                Err(err) => {
                    inner.redis_failed(&err, "admit");
                    match inner.on_redis_failure {
                        FailureMode::FailClosed => {
                            inner.fail_closed_rejections.fetch_add(1, Ordering::Relaxed);
                            return Err(Rejection::Unavailable);
                        }
                        FailureMode::FailOpen => {
                            inner.fail_open_decisions.fetch_add(1, Ordering::Relaxed);
                            inner.decide_locally(lines)
                        }
                    }
                }
            },
        };
        let requests = tightest(&lines, &outcome.verdicts, Dimension::Requests);
        let tokens = tightest(&lines, &outcome.verdicts, Dimension::Tokens);
        if outcome.admitted {
            inner.admitted.fetch_add(1, Ordering::Relaxed);
            let token_lines: Vec<Line> = lines
                .into_iter()
                .filter(|line| line.dimension == Dimension::Tokens)
                .collect();
            let settlement = (!token_lines.is_empty()).then(|| Settlement {
                inner: self.inner.clone(),
                via,
                lines: token_lines,
            });
            return Ok(Admission {
                requests,
                tokens,
                reserved_tokens: reserve_tokens,
                settlement,
            });
        }
        // The limit that holds the request back: one it can never fit first, else the
        // longest wait, since the request passes only when every limit has room.
        let reason = lines
            .iter()
            .zip(&outcome.verdicts)
            .filter(|(_, verdict)| verdict.retry_us > 0)
            .max_by_key(|(line, verdict)| (line.oversized(), verdict.retry_us));
        let Some((line, verdict)) = reason else {
            // Both stores name a reason with every rejection (remote replies are checked).
            return Err(Rejection::Unavailable);
        };
        let oversized = line.oversized();
        inner.count_rejection(line.scope);
        Err(Rejection::Limited {
            scope: line.scope,
            name: line.name.clone(),
            dimension: line.dimension,
            retry_after: if oversized {
                WINDOW
            } else {
                Duration::from_micros(verdict.retry_us)
            },
            oversized,
            requests,
            tokens,
        })
    }

    pub fn stats(&self) -> LimiterStats {
        let inner = &self.inner;
        LimiterStats {
            admitted: inner.admitted.load(Ordering::Relaxed),
            rejected: inner
                .rejected_by_scope
                .iter()
                .map(|count| count.load(Ordering::Relaxed))
                .sum(),
            rejected_project: inner.rejected_by_scope[0].load(Ordering::Relaxed),
            rejected_key: inner.rejected_by_scope[1].load(Ordering::Relaxed),
            rejected_alias: inner.rejected_by_scope[2].load(Ordering::Relaxed),
            redis_failures: inner.redis_failures.load(Ordering::Relaxed),
            fail_open_decisions: inner.fail_open_decisions.load(Ordering::Relaxed),
            fail_closed_rejections: inner.fail_closed_rejections.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn count_rejection(&self, scope: LimitScope) {
        let index = match scope {
            LimitScope::Project => 0,
            LimitScope::Key => 1,
            LimitScope::Alias => 2,
        };
        self.rejected_by_scope[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Decides in process, with this replica's share of each limit.
    fn decide_locally(&self, lines: Vec<Line>) -> (Via, Vec<Line>, Outcome) {
        let lines: Vec<Line> = lines
            .into_iter()
            .map(|line| Line {
                limit: (line.limit / self.replicas).max(1),
                ..line
            })
            .collect();
        let outcome = self.local.apply(&lines, true);
        (Via::Local, lines, outcome)
    }

    fn redis_failed(&self, err: &RedisUnavailable, during: &'static str) {
        let failures = self.redis_failures.fetch_add(1, Ordering::Relaxed) + 1;
        // An outage fails every request; logging each would flood the log.
        if failures.is_power_of_two() {
            tracing::warn!(
                failures,
                during,
                error = %err,
                on_redis_failure = self.on_redis_failure.as_str(),
                "rate limits: redis unavailable (logged at the 1st, 2nd, 4th, 8th... failure)"
            );
        }
    }
}

/// The limits of one request, one per scope, name and dimension: the same limit named twice
/// must be charged once, at the stricter value.
fn lines_for(checks: &[LimitCheck], reserve: i64) -> Vec<Line> {
    let mut lines: Vec<Line> = Vec::new();
    for check in checks {
        let dimensions = [
            (Dimension::Requests, check.limit.requests_per_minute, 1),
            (Dimension::Tokens, check.limit.tokens_per_minute, reserve),
        ];
        for (dimension, limit, units) in dimensions {
            let Some(limit) = limit else { continue };
            let same = lines.iter_mut().find(|line| {
                line.scope == check.scope && line.dimension == dimension && line.name == check.name
            });
            match same {
                Some(line) => line.limit = line.limit.min(limit),
                None => lines.push(Line {
                    scope: check.scope,
                    name: check.name.clone(),
                    dimension,
                    limit,
                    units,
                }),
            }
        }
    }
    lines
}

/// The limit of `dimension` with the least room left (the later reset on a tie).
fn tightest(lines: &[Line], verdicts: &[gcra::Verdict], dimension: Dimension) -> Option<Quota> {
    lines
        .iter()
        .zip(verdicts)
        .filter(|(line, _)| line.dimension == dimension)
        .map(|(line, verdict)| line.quota(verdict))
        .min_by_key(|quota| (quota.remaining, Reverse(quota.reset)))
}

/// Formats a duration as OpenAI's `x-ratelimit-reset-*` headers do (Go's duration syntax):
/// `"20ms"`, `"1s"`, `"8.64s"`, `"6m0s"`, `"1h2m3s"`. Rounded up to the millisecond, so a
/// client that waits that long is never early.
pub fn openai_reset(d: Duration) -> String {
    use std::fmt::Write as _;
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = ms / 60_000 % 60;
    let secs = ms / 1000 % 60;
    let frac = ms % 1000;
    let mut out = String::new();
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    if frac > 0 {
        let frac = format!("{frac:03}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn rpm(n: u64) -> RateLimit {
        RateLimit {
            requests_per_minute: Some(n),
            tokens_per_minute: None,
        }
    }

    fn tpm(n: u64) -> RateLimit {
        RateLimit {
            requests_per_minute: None,
            tokens_per_minute: Some(n),
        }
    }

    fn local() -> Limiter {
        Limiter::new(&LimiterConfig::default()).unwrap()
    }

    fn key(limit: RateLimit) -> LimitCheck {
        LimitCheck::new(LimitScope::Key, "k1", limit)
    }

    fn project(limit: RateLimit) -> LimitCheck {
        LimitCheck::new(LimitScope::Project, "p1", limit)
    }

    fn limited(rejection: Rejection) -> (LimitScope, Dimension, Duration, bool) {
        match rejection {
            Rejection::Limited {
                scope,
                dimension,
                retry_after,
                oversized,
                ..
            } => (scope, dimension, retry_after, oversized),
            Rejection::Unavailable => panic!("expected a limit rejection"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_of_n_then_rejected_with_retry_after() {
        let limiter = local();
        let checks = [key(rpm(10))];
        for i in 0..10 {
            let admission = limiter.admit(&checks, 0).await.unwrap();
            assert_eq!(admission.requests.unwrap().remaining, 9 - i);
        }
        let rejection = limiter.admit(&checks, 0).await.unwrap_err();
        assert_eq!(
            limited(rejection),
            (
                LimitScope::Key,
                Dimension::Requests,
                Duration::from_secs(6),
                false
            )
        );
        let stats = limiter.stats();
        assert_eq!((stats.admitted, stats.rejected), (10, 1));
        assert_eq!(
            (
                stats.rejected_project,
                stats.rejected_key,
                stats.rejected_alias
            ),
            (0, 1, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refills_as_time_advances() {
        let limiter = local();
        let checks = [key(rpm(10))];
        for _ in 0..10 {
            limiter.admit(&checks, 0).await.unwrap();
        }
        advance(Duration::from_millis(5_999)).await;
        let retry = limiter.admit(&checks, 0).await.unwrap_err().retry_after();
        assert_eq!(retry, Some(Duration::from_millis(1)));
        advance(Duration::from_millis(1)).await;
        let admission = limiter.admit(&checks, 0).await.unwrap();
        assert_eq!(admission.requests.unwrap().remaining, 0);
        assert!(limiter.admit(&checks, 0).await.is_err());
        advance(Duration::from_secs(60)).await;
        for _ in 0..10 {
            limiter.admit(&checks, 0).await.unwrap();
        }
        assert!(limiter.admit(&checks, 0).await.is_err(), "burst stays N");
    }

    #[tokio::test(start_paused = true)]
    async fn all_or_nothing_across_scopes() {
        let limiter = local();
        let both = [key(rpm(10)), project(rpm(2))];
        limiter.admit(&both, 0).await.unwrap();
        limiter.admit(&both, 0).await.unwrap();
        for _ in 0..5 {
            let (scope, dimension, _, _) = limited(limiter.admit(&both, 0).await.unwrap_err());
            assert_eq!(
                (scope, dimension),
                (LimitScope::Project, Dimension::Requests)
            );
        }
        // The key was charged for the two admitted requests only.
        let key_only = limiter.admit(&[key(rpm(10))], 0).await.unwrap();
        assert_eq!(key_only.requests.unwrap().remaining, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn rejection_names_the_longest_wait_and_reports_uncharged_quotas() {
        let limiter = local();
        let both = [key(rpm(4)), project(rpm(2))];
        limiter.admit(&both, 0).await.unwrap();
        limiter.admit(&both, 0).await.unwrap();
        limiter.admit(&[key(rpm(4))], 0).await.unwrap();
        limiter.admit(&[key(rpm(4))], 0).await.unwrap();
        let Rejection::Limited {
            scope,
            retry_after,
            requests,
            ..
        } = limiter.admit(&both, 0).await.unwrap_err()
        else {
            panic!("expected a limit rejection")
        };
        // Key: 15 s until one more fits; project: 30 s.
        assert_eq!(scope, LimitScope::Project);
        assert_eq!(retry_after, Duration::from_secs(30));
        let requests = requests.unwrap();
        assert_eq!(requests.remaining, 0);
        assert_eq!(requests.reset, Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_and_reset_follow_the_tightest_scope() {
        let limiter = local();
        let checks = [
            key(RateLimit {
                requests_per_minute: Some(100),
                tokens_per_minute: Some(1_000),
            }),
            project(RateLimit {
                requests_per_minute: Some(3),
                tokens_per_minute: Some(100_000),
            }),
        ];
        let admission = limiter.admit(&checks, 400).await.unwrap();
        assert_eq!(
            admission.requests,
            Some(Quota {
                limit: 3,
                remaining: 2,
                reset: Duration::from_secs(20)
            })
        );
        assert_eq!(
            admission.tokens,
            Some(Quota {
                limit: 1_000,
                remaining: 600,
                reset: Duration::from_secs(24)
            })
        );
        advance(Duration::from_secs(12)).await;
        let admission = limiter.admit(&checks, 0).await.unwrap();
        let tokens = admission.tokens.unwrap();
        assert_eq!(
            (tokens.remaining, tokens.reset),
            (800, Duration::from_secs(12))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unused_tokens_are_refunded() {
        let limiter = local();
        let checks = [key(tpm(1_000))];
        let admission = limiter.admit(&checks, 900).await.unwrap();
        assert_eq!(admission.tokens.unwrap().remaining, 100);
        assert!(limiter.admit(&checks, 200).await.is_err());
        admission.settle(300).await;
        let admission = limiter.admit(&checks, 200).await.unwrap();
        assert_eq!(admission.tokens.unwrap().remaining, 500);
    }

    #[tokio::test(start_paused = true)]
    async fn extra_tokens_are_charged_into_debt() {
        let limiter = local();
        let checks = [key(tpm(1_000))];
        let admission = limiter.admit(&checks, 500).await.unwrap();
        admission.settle(1_500).await;
        // 1 500 tokens of a 1 000 per minute limit: a 30 s debt on top of the window, plus 6 s
        // for the 100 asked.
        let (_, dimension, retry_after, oversized) =
            limited(limiter.admit(&checks, 100).await.unwrap_err());
        assert_eq!(dimension, Dimension::Tokens);
        assert_eq!(retry_after, Duration::from_secs(36));
        assert!(!oversized);
        // A request without a reservation skips the token check even in debt.
        let admission = limiter.admit(&checks, 0).await.unwrap();
        let tokens = admission.tokens.unwrap();
        assert_eq!(
            (tokens.remaining, tokens.reset),
            (0, Duration::from_secs(90))
        );
        advance(Duration::from_secs(36)).await;
        limiter.admit(&checks, 100).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn unreserved_request_is_charged_when_settled() {
        let limiter = local();
        let checks = [key(tpm(1_000))];
        limiter.admit(&checks, 0).await.unwrap().settle(250).await;
        let admission = limiter.admit(&checks, 0).await.unwrap();
        assert_eq!(admission.tokens.unwrap().remaining, 750);
    }

    #[tokio::test(start_paused = true)]
    async fn settle_in_background_applies_local_corrections_at_once() {
        let limiter = local();
        let checks = [key(tpm(1_000))];
        limiter
            .admit(&checks, 800)
            .await
            .unwrap()
            .settle_in_background(100);
        let admission = limiter.admit(&checks, 0).await.unwrap();
        assert_eq!(admission.tokens.unwrap().remaining, 900);
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_reservation_is_rejected_for_good_without_charging() {
        let limiter = local();
        let checks = [key(RateLimit {
            requests_per_minute: Some(5),
            tokens_per_minute: Some(1_000),
        })];
        let rejection = limiter.admit(&checks, 1_001).await.unwrap_err();
        let Rejection::Limited { requests, .. } = &rejection else {
            panic!("expected a limit rejection")
        };
        assert_eq!(requests.unwrap().remaining, 5, "nothing charged");
        assert_eq!(
            limited(rejection),
            (LimitScope::Key, Dimension::Tokens, WINDOW, true)
        );
        // A whole minute's worth fits in an empty limit.
        limiter.admit(&checks, 1_000).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn zero_limit_admits_nothing() {
        let limiter = local();
        let (_, dimension, retry_after, oversized) =
            limited(limiter.admit(&[key(rpm(0))], 0).await.unwrap_err());
        assert_eq!(
            (dimension, retry_after, oversized),
            (Dimension::Requests, WINDOW, true)
        );
        // A token limit of 0 with nothing reserved is skipped like any token check.
        let admission = limiter.admit(&[key(tpm(0))], 0).await.unwrap();
        assert_eq!(admission.tokens, None);
    }

    #[tokio::test(start_paused = true)]
    async fn same_limit_named_twice_is_charged_once_at_the_stricter_value() {
        let limiter = local();
        let checks = [key(rpm(10)), key(rpm(4))];
        let admission = limiter.admit(&checks, 0).await.unwrap();
        assert_eq!(admission.requests.unwrap().limit, 4);
        assert_eq!(admission.requests.unwrap().remaining, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn no_limits_admit_everything() {
        let limiter = local();
        let checks = [key(RateLimit::default())];
        for _ in 0..1_000 {
            let admission = limiter.admit(&checks, 10).await.unwrap();
            assert_eq!((admission.requests, admission.tokens), (None, None));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_changes_the_limit_but_keeps_the_state() {
        let limiter = local();
        for _ in 0..5 {
            limiter.admit(&[key(rpm(10))], 0).await.unwrap();
        }
        // Half the minute is used; lowered to 6 per minute, that is 3 of 6, and this one
        // makes 4.
        let admission = limiter.admit(&[key(rpm(6))], 0).await.unwrap();
        assert_eq!(admission.requests.unwrap().remaining, 2);
        limiter.admit(&[key(rpm(6))], 0).await.unwrap();
        limiter.admit(&[key(rpm(6))], 0).await.unwrap();
        assert!(limiter.admit(&[key(rpm(6))], 0).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn local_backend_enforces_this_replicas_share() {
        let config = LimiterConfig {
            replicas: 3,
            ..LimiterConfig::default()
        };
        let limiter = Limiter::new(&config).unwrap();
        let checks = [key(rpm(10)), project(rpm(2))];
        let admission = limiter.admit(&checks, 0).await.unwrap();
        // 10 / 3 = 3 for the key; 2 / 3 rounds up to the floor of 1 for the project.
        assert_eq!(admission.requests.unwrap().limit, 1);
        assert!(limiter.admit(&checks, 0).await.is_err());
        for _ in 0..2 {
            limiter.admit(&[key(rpm(10))], 0).await.unwrap();
        }
        assert!(limiter.admit(&[key(rpm(10))], 0).await.is_err());
    }

    #[test]
    fn config_defaults_and_names() {
        let config: LimiterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, LimiterConfig::default());
        assert_eq!(config.replicas, 1);
        assert_eq!(config.redis_timeout_ms, 50);
        assert_eq!(config.redis_down_secs, 1);
        assert_eq!(config.key_prefix, "gw:rl:");
        assert_eq!(config.on_redis_failure, FailureMode::FailOpen);
        let config: LimiterConfig = serde_json::from_str(
            r#"{"backend": "redis", "redis_url": "redis://127.0.0.1:6379",
                "on_redis_failure": "fail-closed", "replicas": 3}"#,
        )
        .unwrap();
        assert_eq!(config.backend, Backend::Redis);
        assert_eq!(config.on_redis_failure, FailureMode::FailClosed);
        assert!(serde_json::from_str::<LimiterConfig>(r#"{"replica": 3}"#).is_err());
        assert!(serde_json::from_str::<LimiterConfig>(r#"{"backend": "memcached"}"#).is_err());
    }

    #[test]
    fn bad_configs_are_refused() {
        let redis = LimiterConfig {
            backend: Backend::Redis,
            ..LimiterConfig::default()
        };
        assert!(matches!(
            Limiter::new(&redis),
            Err(LimitError::MissingRedisUrl)
        ));
        let bad_url = LimiterConfig {
            redis_url: Some("not a url".into()),
            ..redis.clone()
        };
        assert!(matches!(
            Limiter::new(&bad_url),
            Err(LimitError::BadRedisUrl(_))
        ));
        let zero = LimiterConfig {
            replicas: 0,
            ..LimiterConfig::default()
        };
        assert!(matches!(Limiter::new(&zero), Err(LimitError::ZeroReplicas)));
    }

    #[test]
    fn reset_is_formatted_like_openai() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_micros(1), "1ms"),
            (Duration::from_millis(20), "20ms"),
            (Duration::from_micros(20_001), "21ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(8_640), "8.64s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(86_400), "1m26.4s"),
            (Duration::from_secs(3_723), "1h2m3s"),
            (Duration::from_secs(3_600), "1h0m0s"),
        ];
        for (duration, text) in cases {
            assert_eq!(openai_reset(duration), text, "{duration:?}");
        }
    }
}
