//! A circuit breaker per upstream: after repeated recoverable failures an upstream is set
//! aside for a while, so requests fail fast (or fall back) instead of each waiting on a vendor
//! that is down; then a few probe requests decide whether it is back.
//!
//! This is the configurable policy-layer breaker (`[policy.breaker]`). The routing table's
//! own outlier ejection only orders plans; the two are independent.
//!
//! Hot path: in the closed state `try_acquire` is a read-locked map lookup, an `Arc` clone and
//! one atomic load; reporting takes the upstream's own mutex for a few field updates. Nothing
//! is allocated except the registry entry of an upstream seen for the first time.
//!
//! Every state change bumps a generation, and a permit remembers the generation it was given
//! in: an outcome reported after the state moved on (a slow request that started before the
//! breaker opened, a probe overtaken by another probe) is ignored rather than misread.

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// `[policy.breaker]`: when an upstream is set aside and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Off: every upstream is always tried and nothing is recorded. Default true.
    pub enabled: bool,
    /// Recoverable failures in a row that open the breaker; 0 turns this trigger off.
    /// Default 5.
    pub consecutive_failures: u32,
    /// Failures, in percent of the outcomes in the window, that open the breaker once the
    /// window holds at least `min_requests` outcomes. Checked when a failure is reported. 0, or
    /// more than 100, turns this trigger off. Default 50.
    pub failure_rate_percent: u8,
    /// Outcomes the window must hold before the failure rate counts, so a handful of requests
    /// cannot open the breaker by rate. Default 20.
    pub min_requests: u32,
    /// Length of the failure-rate window in seconds, kept in one-second buckets (the current,
    /// partial second included); 0 is taken as 1. Default 30.
    pub window_secs: u64,
    /// How long an opened breaker fails fast before letting probes through. Default 30.
    pub open_secs: u64,
    /// Cap on the open period. Each failed probe doubles the period (30, 60, 120, 240, 300,
    /// 300, ... with the defaults); a success resets it to `open_secs`. At or below `open_secs`
    /// the period stays fixed. Default 300.
    pub max_open_secs: u64,
    /// Probe requests let through at once when the open period is over; 0 is taken as 1.
    /// Default 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 5,
            failure_rate_percent: 50,
            min_requests: 20,
            window_secs: 30,
            open_secs: 30,
            max_open_secs: 300,
            half_open_probes: 1,
        }
    }
}

/// The breaker refused the attempt: the upstream is set aside, or its probes are all in
/// flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker open, retry in {retry_in:?}")]
pub struct BreakerOpen {
    /// Time left until a probe may be let through. While probes are in flight their outcome
    /// is due any moment, so this is then [`PROBE_PENDING_RETRY_IN`].
    pub retry_in: Duration,
}

/// The `retry_in` given while the half-open breaker's probes are all taken.
pub const PROBE_PENDING_RETRY_IN: Duration = Duration::from_secs(1);

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    /// Failing fast. Stays reported as open after the open period ends until the next attempt
    /// turns it half-open.
    Open,
    HalfOpen,
}

/// A breaker as metrics and the admin API see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BreakerState {
    pub circuit: Circuit,
    /// Times the breaker opened, reopenings after a failed probe included.
    pub opened_total: u64,
    /// Attempts refused while open or while the probes were taken.
    pub rejected_total: u64,
}

/// The breakers of every upstream, for the life of the process: a config reload changes the
/// thresholds with [`Breakers::set_config`] but keeps what each breaker has learned. Share it
/// behind an `Arc`.
#[derive(Debug)]
pub struct Breakers {
    registry: RwLock<Registry>,
}

#[derive(Debug)]
struct Registry {
    config: BreakerConfig,
    breakers: HashMap<String, Arc<Breaker>>,
}

impl Default for Breakers {
    fn default() -> Self {
        Self::new(&BreakerConfig::default())
    }
}

impl Breakers {
    pub fn new(config: &BreakerConfig) -> Self {
        Self {
            registry: RwLock::new(Registry {
                config: config.clone(),
                breakers: HashMap::new(),
            }),
        }
    }

    /// Applies new thresholds to every breaker. A breaker that is open stays open until the
    /// time it was given; its next open period follows the new config.
    pub fn set_config(&self, config: &BreakerConfig) {
        let mut registry = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        registry.config = config.clone();
        for breaker in registry.breakers.values() {
            breaker.lock().set_config(config);
        }
    }

    /// Asks to send one attempt to `upstream`. The permit must be told how the attempt went;
    /// a permit dropped unreported (the request was cancelled) counts as neither.
    pub fn try_acquire(&self, upstream: &str) -> Result<BreakerPermit, BreakerOpen> {
        match self.breaker(upstream) {
            Some(breaker) => breaker.try_acquire(),
            None => Ok(BreakerPermit { ticket: None }),
        }
    }

    /// Whether `upstream` is set aside right now, for routing to skip it. False once its open
    /// period is over (the next attempt is a probe), and false for an upstream never seen.
    pub fn is_open(&self, upstream: &str) -> bool {
        let registry = self.read();
        registry.config.enabled
            && registry
                .breakers
                .get(upstream)
                .is_some_and(|breaker| breaker.is_open())
    }

    /// Every upstream seen so far with its state, sorted by upstream.
    pub fn states(&self) -> Vec<(String, BreakerState)> {
        let registry = self.read();
        let mut states: Vec<_> = registry
            .breakers
            .iter()
            .map(|(upstream, breaker)| (upstream.clone(), breaker.state()))
            .collect();
        states.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        states
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// `None` when breakers are disabled.
    fn breaker(&self, upstream: &str) -> Option<Arc<Breaker>> {
        {
            let registry = self.read();
            if !registry.config.enabled {
                return None;
            }
            if let Some(breaker) = registry.breakers.get(upstream) {
                return Some(Arc::clone(breaker));
            }
        }
        let mut registry = self
            .registry
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let registry = &mut *registry;
        if !registry.config.enabled {
            return None;
        }
        let breaker = registry
            .breakers
            .entry(upstream.to_owned())
            .or_insert_with(|| Arc::new(Breaker::new(upstream, &registry.config)));
        Some(Arc::clone(breaker))
    }
}

/// Leave to send one attempt. Report it with [`success`](Self::success) or
/// [`failure`](Self::failure); dropping it counts as neither and hands a probe slot back.
#[derive(Debug)]
#[must_use = "report the attempt with success() or failure(); dropping it counts as neither"]
pub struct BreakerPermit {
    /// `None` when breakers are disabled.
    ticket: Option<Ticket>,
}

#[derive(Debug)]
struct Ticket {
    breaker: Arc<Breaker>,
    generation: u64,
    probe: bool,
}

impl BreakerPermit {
    /// The upstream answered. Client errors (4xx) belong here too: the upstream is alive.
    pub fn success(mut self) {
        if let Some(ticket) = self.ticket.take() {
            ticket.breaker.report(&ticket, Outcome::Success);
        }
    }

    /// The attempt failed in a way the caller classifies as recoverable (the upstream's
    /// fault: 5xx, 429, timeout, connection error).
    pub fn failure(mut self) {
        if let Some(ticket) = self.ticket.take() {
            ticket.breaker.report(&ticket, Outcome::Failure);
        }
    }

    /// Whether this attempt is a half-open probe, whose outcome closes or reopens the breaker.
    pub fn is_probe(&self) -> bool {
        self.ticket.as_ref().is_some_and(|ticket| ticket.probe)
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take()
            && ticket.probe
        {
            ticket.breaker.release_probe(ticket.generation);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
}

/// Why a breaker opened, for the log line.
#[derive(Debug, Clone, Copy)]
enum Trip {
    Consecutive(u32),
    Rate { failures: u64, outcomes: u64 },
    ProbeFailed,
}

#[derive(Debug)]
struct Breaker {
    upstream: Box<str>,
    origin: Instant,
    /// Mirrors the mutex-held generation and circuit (`generation << 2 | circuit`) so the
    /// closed and open states are answered without the lock.
    phase: AtomicU64,
    /// Mirrors `Inner::open_until`.
    open_until: AtomicU64,
    opened_total: AtomicU64,
    rejected_total: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: BreakerConfig,
    circuit: Circuit,
    generation: u64,
    consecutive_failures: u32,
    window: Window,
    /// The current open period; doubles on each failed probe.
    open_for: Duration,
    /// Nanoseconds since `origin` at which the open breaker lets a probe through.
    open_until: u64,
    probes_in_flight: u32,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;

fn pack_phase(generation: u64, circuit: Circuit) -> u64 {
    let circuit = match circuit {
        Circuit::Closed => CLOSED,
        Circuit::Open => OPEN,
        Circuit::HalfOpen => HALF_OPEN,
    };
    generation << 2 | circuit
}

fn unpack_phase(phase: u64) -> (u64, Circuit) {
    let circuit = match phase & 3 {
        CLOSED => Circuit::Closed,
        OPEN => Circuit::Open,
        _ => Circuit::HalfOpen,
    };
    (phase >> 2, circuit)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Breaker {
    fn new(upstream: &str, config: &BreakerConfig) -> Self {
        Self {
            upstream: upstream.into(),
            origin: Instant::now(),
            phase: AtomicU64::new(pack_phase(0, Circuit::Closed)),
            open_until: AtomicU64::new(0),
            opened_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                config: config.clone(),
                circuit: Circuit::Closed,
                generation: 0,
                consecutive_failures: 0,
                window: Window::new(config.window_secs),
                open_for: Duration::ZERO,
                open_until: 0,
                probes_in_flight: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.origin))
    }

    fn try_acquire(self: &Arc<Self>) -> Result<BreakerPermit, BreakerOpen> {
        let (generation, circuit) = unpack_phase(self.phase.load(Ordering::Acquire));
        match circuit {
            Circuit::Closed => Ok(self.permit(generation, false)),
            Circuit::Open => {
                let now = self.now();
                let until = self.open_until.load(Ordering::Acquire);
                if now < until {
                    return Err(self.reject(until - now));
                }
                self.try_acquire_locked()
            }
            Circuit::HalfOpen => self.try_acquire_locked(),
        }
    }

    /// The slow path: the open period may be over, or probes are being handed out.
    fn try_acquire_locked(self: &Arc<Self>) -> Result<BreakerPermit, BreakerOpen> {
        let mut inner = self.lock();
        let now = self.now();
        match inner.circuit {
            Circuit::Closed => Ok(self.permit(inner.generation, false)),
            Circuit::Open if now < inner.open_until => Err(self.reject(inner.open_until - now)),
            Circuit::Open => {
                self.half_open(&mut inner);
                inner.probes_in_flight = 1;
                Ok(self.permit(inner.generation, true))
            }
            Circuit::HalfOpen if inner.probes_in_flight < inner.config.half_open_probes.max(1) => {
                inner.probes_in_flight += 1;
                Ok(self.permit(inner.generation, true))
            }
            Circuit::HalfOpen => Err(self.reject(nanos(PROBE_PENDING_RETRY_IN))),
        }
    }

    fn permit(self: &Arc<Self>, generation: u64, probe: bool) -> BreakerPermit {
        BreakerPermit {
            ticket: Some(Ticket {
                breaker: Arc::clone(self),
                generation,
                probe,
            }),
        }
    }

    fn reject(&self, retry_in_nanos: u64) -> BreakerOpen {
        self.rejected_total.fetch_add(1, Ordering::Relaxed);
        BreakerOpen {
            retry_in: Duration::from_nanos(retry_in_nanos),
        }
    }

    fn is_open(&self) -> bool {
        let (_, circuit) = unpack_phase(self.phase.load(Ordering::Acquire));
        circuit == Circuit::Open && self.now() < self.open_until.load(Ordering::Acquire)
    }

    fn state(&self) -> BreakerState {
        let (_, circuit) = unpack_phase(self.phase.load(Ordering::Acquire));
        BreakerState {
            circuit,
            opened_total: self.opened_total.load(Ordering::Relaxed),
            rejected_total: self.rejected_total.load(Ordering::Relaxed),
        }
    }

    fn report(&self, ticket: &Ticket, outcome: Outcome) {
        let mut inner = self.lock();
        if inner.generation != ticket.generation {
            return;
        }
        let now = self.now();
        match (inner.circuit, ticket.probe) {
            (Circuit::Closed, false) => {
                let second = now / 1_000_000_000;
                inner.window.record(second, outcome);
                if outcome == Outcome::Success {
                    inner.consecutive_failures = 0;
                    return;
                }
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                if let Some(trip) = inner.trip(second) {
                    self.open(&mut inner, now, trip);
                }
            }
            (Circuit::HalfOpen, true) => {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Success => self.close(&mut inner),
                    Outcome::Failure => self.open(&mut inner, now, Trip::ProbeFailed),
                }
            }
            // A generation has one circuit and hands out one kind of permit.
            _ => {}
        }
    }

    fn release_probe(&self, generation: u64) {
        let mut inner = self.lock();
        if inner.generation == generation && inner.circuit == Circuit::HalfOpen {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
    }

    fn open(&self, inner: &mut Inner, now: u64, trip: Trip) {
        let base = Duration::from_secs(inner.config.open_secs);
        inner.open_for = match trip {
            Trip::ProbeFailed => {
                let cap = base.max(Duration::from_secs(inner.config.max_open_secs));
                inner.open_for.saturating_mul(2).clamp(base, cap)
            }
            Trip::Consecutive(_) | Trip::Rate { .. } => base,
        };
        inner.open_until = now.saturating_add(nanos(inner.open_for));
        inner.consecutive_failures = 0;
        inner.window.clear();
        self.open_until.store(inner.open_until, Ordering::Release);
        self.transition(inner, Circuit::Open);
        self.opened_total.fetch_add(1, Ordering::Relaxed);
        let open_secs = inner.open_for.as_secs();
        match trip {
            Trip::Consecutive(failures) => tracing::warn!(
                upstream = &*self.upstream,
                failures,
                open_secs,
                "circuit breaker opened after consecutive failures"
            ),
            Trip::Rate { failures, outcomes } => tracing::warn!(
                upstream = &*self.upstream,
                failures,
                outcomes,
                window_secs = inner.config.window_secs,
                open_secs,
                "circuit breaker opened on failure rate"
            ),
            Trip::ProbeFailed => tracing::warn!(
                upstream = &*self.upstream,
                open_secs,
                "circuit breaker reopened after a failed probe"
            ),
        }
    }

    fn half_open(&self, inner: &mut Inner) {
        inner.probes_in_flight = 0;
        self.transition(inner, Circuit::HalfOpen);
        tracing::debug!(
            upstream = &*self.upstream,
            "circuit breaker half-open, probing"
        );
    }

    fn close(&self, inner: &mut Inner) {
        inner.open_for = Duration::ZERO;
        inner.consecutive_failures = 0;
        inner.probes_in_flight = 0;
        inner.window.clear();
        self.transition(inner, Circuit::Closed);
        tracing::info!(upstream = &*self.upstream, "circuit breaker closed");
    }

    fn transition(&self, inner: &mut Inner, circuit: Circuit) {
        inner.generation += 1;
        inner.circuit = circuit;
        self.phase
            .store(pack_phase(inner.generation, circuit), Ordering::Release);
    }
}

impl Inner {
    fn set_config(&mut self, config: &BreakerConfig) {
        if self.config.window_secs != config.window_secs {
            self.window = Window::new(config.window_secs);
        }
        self.config = config.clone();
    }

    /// Whether the failure just recorded opens the breaker.
    fn trip(&self, second: u64) -> Option<Trip> {
        let threshold = self.config.consecutive_failures;
        if threshold > 0 && self.consecutive_failures >= threshold {
            return Some(Trip::Consecutive(self.consecutive_failures));
        }
        let percent = u64::from(self.config.failure_rate_percent);
        if percent == 0 || percent > 100 {
            return None;
        }
        let (outcomes, failures) = self.window.totals(second);
        (outcomes >= u64::from(self.config.min_requests) && failures * 100 >= outcomes * percent)
            .then_some(Trip::Rate { failures, outcomes })
    }
}

/// Outcomes of the last few seconds, one bucket per second in a ring.
#[derive(Debug)]
struct Window {
    buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    successes: u32,
    failures: u32,
}

impl Window {
    fn new(window_secs: u64) -> Self {
        let len = usize::try_from(window_secs.max(1)).unwrap_or(usize::MAX);
        Self {
            buckets: vec![Bucket::default(); len],
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn record(&mut self, second: u64, outcome: Outcome) {
        let len = self.len();
        let Some(bucket) = usize::try_from(second % len)
            .ok()
            .and_then(|index| self.buckets.get_mut(index))
        else {
            return;
        };
        if bucket.second != second {
            *bucket = Bucket {
                second,
                ..Bucket::default()
            };
        }
        match outcome {
            Outcome::Success => bucket.successes = bucket.successes.saturating_add(1),
            Outcome::Failure => bucket.failures = bucket.failures.saturating_add(1),
        }
    }

    /// Outcomes and failures in the window ending at `second`.
    fn totals(&self, second: u64) -> (u64, u64) {
        let len = self.len();
        self.buckets
            .iter()
            .filter(|bucket| {
                second
                    .checked_sub(bucket.second)
                    .is_some_and(|age| age < len)
            })
            .fold((0, 0), |(outcomes, failures), bucket| {
                (
                    outcomes + u64::from(bucket.successes) + u64::from(bucket.failures),
                    failures + u64::from(bucket.failures),
                )
            })
    }

    fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const UP: &str = "openai|https://api.openai.com";

    fn config() -> BreakerConfig {
        BreakerConfig::default()
    }

    fn fail(breakers: &Breakers, upstream: &str, times: u32) {
        for _ in 0..times {
            breakers.try_acquire(upstream).unwrap().failure();
        }
    }

    fn succeed(breakers: &Breakers, upstream: &str, times: u32) {
        for _ in 0..times {
            breakers.try_acquire(upstream).unwrap().success();
        }
    }

    fn circuit(breakers: &Breakers, upstream: &str) -> Circuit {
        breakers
            .states()
            .into_iter()
            .find(|(key, _)| key == upstream)
            .map(|(_, state)| state.circuit)
            .unwrap()
    }

    /// Opens `UP` through consecutive failures, with the default threshold.
    fn opened(config: &BreakerConfig) -> Breakers {
        let breakers = Breakers::new(config);
        fail(&breakers, UP, config.consecutive_failures);
        assert!(breakers.is_open(UP));
        breakers
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures() {
        let breakers = Breakers::new(&config());
        fail(&breakers, UP, 4);
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
        assert!(!breakers.is_open(UP));
        fail(&breakers, UP, 1);
        assert_eq!(circuit(&breakers, UP), Circuit::Open);
        assert!(breakers.try_acquire(UP).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let breakers = Breakers::new(&config());
        fail(&breakers, UP, 4);
        succeed(&breakers, UP, 1);
        fail(&breakers, UP, 4);
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_below_min_requests_even_at_full_failure_rate() {
        let breakers = Breakers::new(&BreakerConfig {
            consecutive_failures: 0,
            ..config()
        });
        fail(&breakers, UP, 19);
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
        fail(&breakers, UP, 1);
        assert_eq!(circuit(&breakers, UP), Circuit::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_threshold_opens_below_min_requests() {
        let breakers = Breakers::new(&BreakerConfig {
            min_requests: 1000,
            ..config()
        });
        fail(&breakers, UP, 5);
        assert_eq!(circuit(&breakers, UP), Circuit::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_error_rate_with_interleaved_successes() {
        let breakers = Breakers::new(&config());
        // Failure, success, ...: never two failures in a row, exactly 50%.
        for _ in 0..10 {
            fail(&breakers, UP, 1);
            succeed(&breakers, UP, 1);
        }
        // 20 outcomes at 50%, but the rate is checked on failures and the last was a success.
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
        fail(&breakers, UP, 1);
        assert_eq!(circuit(&breakers, UP), Circuit::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_under_the_failure_rate() {
        let breakers = Breakers::new(&config());
        for _ in 0..50 {
            fail(&breakers, UP, 1);
            succeed(&breakers, UP, 2);
        }
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_are_forgotten() {
        let breakers = Breakers::new(&BreakerConfig {
            consecutive_failures: 0,
            ..config()
        });
        fail(&breakers, UP, 15);
        advance(Duration::from_secs(30)).await;
        fail(&breakers, UP, 15);
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
        advance(Duration::from_secs(29)).await;
        fail(&breakers, UP, 5);
        assert_eq!(circuit(&breakers, UP), Circuit::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn fails_fast_while_open_with_the_remaining_time() {
        let breakers = opened(&config());
        assert_eq!(
            breakers.try_acquire(UP).unwrap_err().retry_in,
            Duration::from_secs(30)
        );
        advance(Duration::from_secs(10)).await;
        assert_eq!(
            breakers.try_acquire(UP).unwrap_err(),
            BreakerOpen {
                retry_in: Duration::from_secs(20)
            }
        );
        let state = breakers.states()[0].1;
        assert_eq!(state.opened_total, 1);
        assert_eq!(state.rejected_total, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_gives_out_one_probe_only() {
        let breakers = opened(&config());
        advance(Duration::from_secs(30)).await;
        assert!(!breakers.is_open(UP));
        let probe = breakers.try_acquire(UP).unwrap();
        assert!(probe.is_probe());
        assert_eq!(circuit(&breakers, UP), Circuit::HalfOpen);
        assert_eq!(
            breakers.try_acquire(UP).unwrap_err().retry_in,
            PROBE_PENDING_RETRY_IN
        );
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probes_setting_allows_that_many() {
        let breakers = opened(&BreakerConfig {
            half_open_probes: 3,
            ..config()
        });
        advance(Duration::from_secs(30)).await;
        let probes: Vec<_> = (0..3).map(|_| breakers.try_acquire(UP).unwrap()).collect();
        assert!(breakers.try_acquire(UP).is_err());
        drop(probes);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_success_closes_and_resets_counters() {
        let breakers = opened(&config());
        advance(Duration::from_secs(30)).await;
        breakers.try_acquire(UP).unwrap().success();
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
        assert!(!breakers.is_open(UP));
        let permit = breakers.try_acquire(UP).unwrap();
        assert!(!permit.is_probe());
        permit.success();
        fail(&breakers, UP, 4);
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
        fail(&breakers, UP, 1);
        // Back to the base open period after a close.
        assert_eq!(
            breakers.try_acquire(UP).unwrap_err().retry_in,
            Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_with_growing_period() {
        let breakers = opened(&BreakerConfig {
            max_open_secs: 100,
            ..config()
        });
        for expected in [60, 100, 100] {
            advance(Duration::from_secs(300)).await;
            breakers.try_acquire(UP).unwrap().failure();
            assert!(breakers.is_open(UP));
            assert_eq!(
                breakers.try_acquire(UP).unwrap_err().retry_in,
                Duration::from_secs(expected)
            );
        }
        assert_eq!(breakers.states()[0].1.opened_total, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn open_period_is_fixed_when_max_is_not_above_open() {
        let breakers = opened(&BreakerConfig {
            max_open_secs: 30,
            ..config()
        });
        advance(Duration::from_secs(30)).await;
        breakers.try_acquire(UP).unwrap().failure();
        assert_eq!(
            breakers.try_acquire(UP).unwrap_err().retry_in,
            Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_probe_permit_frees_the_slot_and_counts_as_neither() {
        let breakers = opened(&config());
        advance(Duration::from_secs(30)).await;
        drop(breakers.try_acquire(UP).unwrap());
        assert_eq!(circuit(&breakers, UP), Circuit::HalfOpen);
        let probe = breakers.try_acquire(UP).unwrap();
        assert!(probe.is_probe());
        probe.success();
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_closed_permit_counts_as_neither() {
        let breakers = Breakers::new(&config());
        fail(&breakers, UP, 4);
        drop(breakers.try_acquire(UP).unwrap());
        fail(&breakers, UP, 1);
        assert_eq!(circuit(&breakers, UP), Circuit::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn outcome_of_an_attempt_started_before_opening_is_ignored() {
        let breakers = Breakers::new(&config());
        let slow = breakers.try_acquire(UP).unwrap();
        fail(&breakers, UP, 5);
        advance(Duration::from_secs(30)).await;
        let probe = breakers.try_acquire(UP).unwrap();
        slow.success();
        assert_eq!(circuit(&breakers, UP), Circuit::HalfOpen);
        assert!(breakers.try_acquire(UP).is_err());
        probe.failure();
        assert!(breakers.is_open(UP));
    }

    #[tokio::test(start_paused = true)]
    async fn outcome_from_before_a_reopen_and_close_is_ignored() {
        let breakers = Breakers::new(&config());
        let slow = breakers.try_acquire(UP).unwrap();
        fail(&breakers, UP, 5);
        advance(Duration::from_secs(30)).await;
        breakers.try_acquire(UP).unwrap().success();
        fail(&breakers, UP, 4);
        slow.failure();
        assert_eq!(circuit(&breakers, UP), Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn is_open_tracks_the_open_period() {
        let breakers = Breakers::new(&config());
        assert!(!breakers.is_open(UP));
        fail(&breakers, UP, 5);
        assert!(breakers.is_open(UP));
        advance(Duration::from_secs(29)).await;
        assert!(breakers.is_open(UP));
        advance(Duration::from_secs(1)).await;
        assert!(!breakers.is_open(UP));
    }

    #[tokio::test(start_paused = true)]
    async fn upstreams_are_independent() {
        let breakers = Breakers::new(&config());
        fail(&breakers, "a", 5);
        fail(&breakers, "b", 4);
        assert!(breakers.is_open("a"));
        assert!(!breakers.is_open("b"));
        succeed(&breakers, "b", 1);
        let states = breakers.states();
        let keys: Vec<_> = states.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(states[0].1.circuit, Circuit::Open);
        assert_eq!(states[1].1.circuit, Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn set_config_changes_thresholds() {
        let breakers = Breakers::new(&config());
        fail(&breakers, UP, 2);
        breakers.set_config(&BreakerConfig {
            consecutive_failures: 3,
            open_secs: 7,
            ..config()
        });
        fail(&breakers, UP, 1);
        assert_eq!(
            breakers.try_acquire(UP).unwrap_err().retry_in,
            Duration::from_secs(7)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn set_config_keeps_an_open_breaker_open() {
        let breakers = opened(&config());
        breakers.set_config(&BreakerConfig {
            window_secs: 5,
            ..config()
        });
        assert!(breakers.is_open(UP));
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_breakers_let_everything_through() {
        let breakers = opened(&config());
        breakers.set_config(&BreakerConfig {
            enabled: false,
            ..config()
        });
        assert!(!breakers.is_open(UP));
        fail(&breakers, "other", 100);
        assert!(!breakers.is_open("other"));
        assert_eq!(breakers.states().len(), 1);
    }

    #[test]
    fn one_probe_among_racing_threads() {
        // Open for no time at all: the next attempts race for the probe at once.
        let breakers = Arc::new(Breakers::new(&BreakerConfig {
            open_secs: 0,
            ..config()
        }));
        fail(&breakers, UP, 5);
        assert_eq!(circuit(&breakers, UP), Circuit::Open);
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let breakers = Arc::clone(&breakers);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    breakers.try_acquire(UP).ok()
                })
            })
            .collect();
        let permits: Vec<_> = handles
            .into_iter()
            .filter_map(|handle| handle.join().unwrap())
            .collect();
        assert_eq!(permits.len(), 1);
        assert!(permits[0].is_probe());
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_unknown_keys() {
        let parsed: BreakerConfig = serde_json::from_str(r#"{"open_secs": 10}"#).unwrap();
        assert_eq!(
            parsed,
            BreakerConfig {
                open_secs: 10,
                ..config()
            }
        );
        assert!(serde_json::from_str::<BreakerConfig>(r#"{"open_sec": 10}"#).is_err());
    }
}
