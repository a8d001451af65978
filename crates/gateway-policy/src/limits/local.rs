//! The in-process limit store: the whole limiter with `backend = "local"`, and the fail-open
//! fallback while Redis is unreachable.
//!
//! One mutex over all limits makes a request's check-and-charge across its scopes atomic, as
//! the Redis script does; the critical section is a few map lookups and float operations.

use super::gcra::{self, State};
use super::{Dimension, LimitScope, Line, Outcome};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

/// Paid-off limits are dropped every this many writes, so names seen once (a deleted key, a
/// renamed alias) do not stay in memory for the life of the process.
const SWEEP_EVERY: u64 = 4096;

type LimitKey = (LimitScope, Dimension, Arc<str>);

pub(super) struct LocalStore {
    /// tokio's clock, so that tests with paused time drive the limits.
    origin: Instant,
    map: Mutex<Map>,
}

#[derive(Default)]
struct Map {
    states: HashMap<LimitKey, State>,
    writes: u64,
}

impl LocalStore {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            map: Mutex::new(Map::default()),
        }
    }

    /// Same contract as the Redis script: with `checking`, all lines are charged or none.
    pub fn apply(&self, lines: &[Line], checking: bool) -> Outcome {
        let now = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        let keys: Vec<LimitKey> = lines
            .iter()
            .map(|line| (line.scope, line.dimension, line.name.clone()))
            .collect();
        let charges: Vec<gcra::Charge> = lines.iter().map(Line::charge).collect();
        // A panic while holding the lock leaves the map consistent (every write is a single
        // insert or remove), so a poisoned lock is still safe to use.
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let debts: Vec<f64> = keys
            .iter()
            .map(|key| map.states.get(key).map_or(0.0, |state| state.debt_at(now)))
            .collect();
        let decision = gcra::decide(&charges, &debts, checking);
        if decision.admitted {
            for ((key, line), &debt) in keys.into_iter().zip(lines).zip(&decision.debts) {
                if line.units == 0 {
                    continue;
                }
                if debt > 0.0 {
                    map.states.insert(
                        key,
                        State {
                            at_us: now,
                            debt_us: debt,
                        },
                    );
                } else {
                    map.states.remove(&key);
                }
            }
            map.writes = map.writes.wrapping_add(1);
            if map.writes.is_multiple_of(SWEEP_EVERY) {
                map.states.retain(|_, state| state.debt_at(now) > 0.0);
            }
        }
        Outcome {
            admitted: decision.admitted,
            verdicts: decision.verdicts,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .states
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(name: &str) -> Line {
        Line {
            scope: LimitScope::Key,
            name: name.into(),
            dimension: Dimension::Requests,
            limit: 60,
            units: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn paid_off_limits_are_swept() {
        let store = LocalStore::new();
        for i in 0..100 {
            store.apply(&[line(&format!("once-{i}"))], true);
        }
        assert_eq!(store.len(), 100);
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..SWEEP_EVERY {
            store.apply(&[line("busy")], false);
        }
        assert_eq!(store.len(), 1, "only the busy limit still has debt");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_refund_forgets_the_limit() {
        let store = LocalStore::new();
        store.apply(&[line("k")], true);
        assert_eq!(store.len(), 1);
        store.apply(
            &[Line {
                units: -1,
                ..line("k")
            }],
            false,
        );
        assert_eq!(store.len(), 0);
    }
}
