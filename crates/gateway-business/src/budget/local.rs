//! The in-process budget store (`backend = "local"`): the rules of the shared backends, under
//! one mutex.

use super::{LineKey, ReserveRequest, SettleOutcome, SettleRequest, Verdict, fits, period_end};
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Default)]
pub(super) struct LocalStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    lines: HashMap<LineKey, LineState>,
    last_prune: Option<OffsetDateTime>,
}

#[derive(Default)]
struct LineState {
    spent: i64,
    /// Live reservations: amount and expiry.
    reservations: HashMap<Uuid, (i64, OffsetDateTime)>,
    fired: HashSet<u32>,
}

impl LineState {
    fn reserved(&mut self, now: OffsetDateTime) -> i64 {
        self.reservations.retain(|_, (_, expires)| *expires > now);
        self.reservations.values().map(|(amount, _)| amount).sum()
    }
}

impl LocalStore {
    pub fn reserve(&self, request: &ReserveRequest<'_>) -> Verdict {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.prune(request.now);
        let mut verdict = Verdict::Admitted;
        for (index, line) in request.lines.iter().enumerate() {
            let entry = state.lines.entry(line.key.clone()).or_default();
            let reserved = entry.reserved(request.now);
            if !fits(entry.spent, reserved, request.amount, line.limit) {
                verdict = Verdict::Exceeded {
                    index,
                    spent: entry.spent,
                    reserved,
                };
                break;
            }
        }
        if verdict == Verdict::Admitted && request.amount > 0 {
            for line in request.lines {
                state
                    .lines
                    .entry(line.key.clone())
                    .or_default()
                    .reservations
                    .insert(request.id, (request.amount, request.expires));
            }
        }
        verdict
    }

    pub fn settle(&self, request: &SettleRequest<'_>) -> SettleOutcome {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut outcome = SettleOutcome {
            spent: Vec::with_capacity(request.lines.len()),
            fired: Vec::new(),
        };
        for (index, (line, thresholds)) in request.lines.iter().zip(&request.thresholds).enumerate()
        {
            let entry = state.lines.entry(line.key.clone()).or_default();
            entry.reservations.remove(&request.id);
            entry.spent = entry.spent.saturating_add(request.actual);
            for threshold in thresholds {
                if threshold.at.is_some_and(|at| entry.spent >= at)
                    && entry.fired.insert(threshold.percent)
                {
                    outcome.fired.push((index, threshold.percent));
                }
            }
            outcome.spent.push(entry.spent);
        }
        outcome
    }

    pub fn usage(&self, key: &LineKey, now: OffsetDateTime) -> (i64, i64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .lines
            .get_mut(key)
            .map_or((0, 0), |line| (line.spent, line.reserved(now)))
    }
}

impl State {
    /// Forgets periods that ended over a day ago, once a minute: nothing checks them any more,
    /// and a settlement that still arrives for one starts it afresh at its own cost only.
    fn prune(&mut self, now: OffsetDateTime) {
        if self
            .last_prune
            .is_some_and(|last| now - last < time::Duration::MINUTE && now >= last)
        {
            return;
        }
        self.last_prune = Some(now);
        let today = now.to_offset(time::UtcOffset::UTC).date();
        let keep_from = today.previous_day().unwrap_or(today);
        self.lines
            .retain(|key, _| period_end(key.period, key.start) >= keep_from);
    }
}
