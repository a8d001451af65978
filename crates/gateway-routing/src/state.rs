//! Per-target runtime state fed by [`crate::RoutingTable::report`]: health, the latency moving
//! average and the canary windows. Plans read it with plain atomic loads; only canary
//! bookkeeping takes a (short, per-alias) mutex.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Consecutive recoverable failures after which a target is set aside.
pub const UNHEALTHY_AFTER: u32 = 3;
/// How long an unhealthy target is set aside before one request may probe it.
pub const COOL_DOWN: Duration = Duration::from_secs(30);
/// Latency samples kept per canary window (canary and the rest of the alias each).
pub const CANARY_SAMPLES: usize = 512;

/// Where the table reads the time, so tests can move it by hand.
pub trait Clock: Send + Sync + Debug {
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    offset_nanos: AtomicU64,
}

impl ManualClock {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            offset_nanos: AtomicU64::new(0),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.offset_nanos.fetch_add(nanos(by), Ordering::Relaxed);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset_nanos.load(Ordering::Relaxed))
    }
}

pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Health and speed of one distinct provider + model of a table, shared by every alias that
/// routes to it: an upstream that is down is down for all of them.
#[derive(Debug)]
pub(crate) struct Upstream {
    consecutive_failures: AtomicU32,
    /// Table time (see `Shared::now`) until which the upstream is set aside; 0 = healthy.
    unhealthy_until: AtomicU64,
    last_failure: AtomicU64,
    /// Moving average of time to first token in nanoseconds; `NO_SAMPLE` until the first.
    ewma_ttft: AtomicU64,
}

const NO_SAMPLE: u64 = u64::MAX;

/// What a plan sees of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    Healthy,
    /// Set aside; carries the time of its last failure.
    Unhealthy(u64),
}

impl Upstream {
    pub(crate) fn new() -> Self {
        Self {
            consecutive_failures: AtomicU32::new(0),
            unhealthy_until: AtomicU64::new(0),
            last_failure: AtomicU64::new(0),
            ewma_ttft: AtomicU64::new(NO_SAMPLE),
        }
    }

    /// The health as a plan sees it. When the cool-down is over, exactly one caller wins the
    /// swap that pushes the deadline a cool-down further and sees the upstream healthy: that is
    /// the probe. Its report decides; a probe that never reports just waits another cool-down.
    pub(crate) fn health(&self, now: impl FnOnce() -> u64) -> Health {
        let until = self.unhealthy_until.load(Ordering::Acquire);
        if until == 0 {
            return Health::Healthy;
        }
        let now = now();
        if now >= until
            && self
                .unhealthy_until
                .compare_exchange(
                    until,
                    now.saturating_add(nanos(COOL_DOWN)),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return Health::Healthy;
        }
        Health::Unhealthy(self.last_failure.load(Ordering::Relaxed))
    }

    pub(crate) fn is_set_aside(&self, now: u64) -> bool {
        let until = self.unhealthy_until.load(Ordering::Acquire);
        until != 0 && now < until
    }

    /// `None` until the first success has been reported.
    pub(crate) fn ewma_ttft(&self) -> Option<u64> {
        let value = self.ewma_ttft.load(Ordering::Relaxed);
        (value != NO_SAMPLE).then_some(value)
    }

    /// Records a success: healthy again, and the moving average takes a quarter of the new
    /// sample (alpha = 0.25, so a sample's weight halves about every 2.4 samples: fast enough to
    /// follow a vendor slowing down, smooth enough to ignore one slow answer).
    pub(crate) fn succeeded(&self, ttft: Duration) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.unhealthy_until.store(0, Ordering::Release);
        let sample = nanos(ttft).min(NO_SAMPLE - 1);
        // The closure always returns `Some`, so the update cannot fail.
        let _ = self
            .ewma_ttft
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == NO_SAMPLE {
                    sample
                } else {
                    old - old / 4 + sample / 4
                })
            });
    }

    /// Records a recoverable failure; true when it is the one that set the upstream aside.
    pub(crate) fn failed(&self, now: u64) -> bool {
        self.last_failure.store(now, Ordering::Relaxed);
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < UNHEALTHY_AFTER {
            return false;
        }
        let previous = self
            .unhealthy_until
            .swap(now.saturating_add(nanos(COOL_DOWN)), Ordering::AcqRel);
        previous == 0
    }
}

/// One request's result in a canary window: `None` latency is a failure.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: u64,
    latency: Option<u64>,
}

/// The last [`CANARY_SAMPLES`] results of a group of targets.
#[derive(Debug, Default)]
struct Ring(VecDeque<Sample>);

impl Ring {
    fn push(&mut self, sample: Sample) {
        if self.0.len() >= CANARY_SAMPLES {
            self.0.pop_front();
        }
        self.0.push_back(sample);
    }

    fn prune(&mut self, oldest: u64) {
        while self.0.front().is_some_and(|sample| sample.at < oldest) {
            self.0.pop_front();
        }
    }

    /// Nearest-rank p95 of the successful samples.
    fn p95(&self) -> Option<u64> {
        let mut latencies: Vec<u64> = self.0.iter().filter_map(|s| s.latency).collect();
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_unstable();
        let rank = (latencies.len() * 95).div_ceil(100).max(1);
        latencies.get(rank - 1).copied()
    }
}

/// The thresholds of one alias's canaries, in table units.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CanaryLimits {
    pub(crate) max_error_rate: f64,
    pub(crate) max_p95_ratio: f64,
    pub(crate) window: u64,
    pub(crate) min_requests: usize,
}

/// The figures that condemned a canary, for the log line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verdict {
    pub(crate) requests: usize,
    pub(crate) error_rate: f64,
    pub(crate) p95: Option<u64>,
    pub(crate) others_p95: Option<u64>,
}

/// The windows of one alias that has canaries: one ring per canary, one for the rest.
#[derive(Debug)]
pub(crate) struct CanaryWatch {
    pub(crate) limits: CanaryLimits,
    windows: Mutex<Windows>,
}

#[derive(Debug)]
struct Windows {
    canaries: Vec<Ring>,
    others: Ring,
}

impl CanaryWatch {
    pub(crate) fn new(limits: CanaryLimits, canaries: usize) -> Self {
        Self {
            limits,
            windows: Mutex::new(Windows {
                canaries: (0..canaries).map(|_| Ring::default()).collect(),
                others: Ring::default(),
            }),
        }
    }

    /// Bookkeeping never leaves the windows inconsistent, so a poisoned lock is still usable.
    fn windows(&self) -> MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a result of a non-canary target of the alias.
    pub(crate) fn record_other(&self, at: u64, latency: Option<Duration>) {
        self.windows().others.push(Sample {
            at,
            latency: latency.map(nanos),
        });
    }

    /// Records a result of canary `slot` and judges it: `Some` when a threshold is breached.
    pub(crate) fn record_canary(
        &self,
        slot: usize,
        at: u64,
        latency: Option<Duration>,
    ) -> Option<Verdict> {
        let limits = self.limits;
        let oldest = at.saturating_sub(limits.window);
        let mut windows = self.windows();
        let Windows { canaries, others } = &mut *windows;
        let ring = canaries.get_mut(slot)?;
        ring.push(Sample {
            at,
            latency: latency.map(nanos),
        });
        ring.prune(oldest);
        let requests = ring.0.len();
        if requests < limits.min_requests {
            return None;
        }
        others.prune(oldest);
        let failures = ring.0.iter().filter(|s| s.latency.is_none()).count();
        let error_rate = failures as f64 / requests as f64;
        let p95 = ring.p95();
        let others_p95 = others.p95();
        let slow = match (p95, others_p95) {
            (Some(mine), Some(theirs)) => mine as f64 > theirs as f64 * limits.max_p95_ratio,
            _ => false,
        };
        (error_rate > limits.max_error_rate || slow).then_some(Verdict {
            requests,
            error_rate,
            p95,
            others_p95,
        })
    }
}

/// FNV-1a (64-bit) over `bytes`, continuing from `state`. Chosen because it is stable across
/// processes, Rust versions and platforms, so a caller stays on its variant across restarts and
/// replicas; `std`'s `DefaultHasher` promises none of that.
pub(crate) fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        state ^= u64::from(byte);
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
    }
    state
}

pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The splitmix64 finaliser: FNV-1a's high bits depend weakly on the last bytes, and the point
/// on the weight line is taken from the high bits.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Maps a uniform 64-bit hash onto `0..total` without the bias of `%`.
pub(crate) fn scale(hash: u64, total: u64) -> u64 {
    u64::try_from((u128::from(hash) * u128::from(total)) >> 64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn p95_is_nearest_rank() {
        let mut ring = Ring::default();
        for latency in 1..=100 {
            ring.push(Sample {
                at: 1,
                latency: Some(latency),
            });
        }
        ring.push(Sample {
            at: 1,
            latency: None,
        });
        assert_eq!(ring.p95(), Some(95));
    }

    #[test]
    fn ring_is_bounded() {
        let mut ring = Ring::default();
        for at in 0..2_000 {
            ring.push(Sample { at, latency: None });
        }
        assert_eq!(ring.0.len(), CANARY_SAMPLES);
    }

    #[test]
    fn ewma_takes_a_quarter_of_each_sample() {
        let upstream = Upstream::new();
        assert_eq!(upstream.ewma_ttft(), None);
        upstream.succeeded(Duration::from_nanos(1_000));
        upstream.succeeded(Duration::from_nanos(2_000));
        assert_eq!(upstream.ewma_ttft(), Some(1_250));
    }
}
