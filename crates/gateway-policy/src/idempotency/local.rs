//! The in-process backend: one map behind a mutex, never held across an await.
//!
//! Memory stays bounded: expired entries are swept from the front of two expiry-ordered
//! indexes whenever an entry is added, and when the map is still full (or the stored bytes
//! over their cap) the entry closest to expiry is evicted, completed ones before in-flight
//! ones, because evicting an in-flight claim is what could let a duplicate through.
//!
//! Waiters hold a `watch::Receiver` whose sender lives in the pending slot: completing,
//! releasing, expiring or evicting the slot drops the sender, which wakes every waiter at
//! once without any notify bookkeeping.

use super::{Counters, Fingerprint, Lease, Outcome, StoredResponse, retry_after};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

type Key = (String, String);
/// Expiry, then a sequence number that makes index keys unique and doubles as owner token.
type IndexKey = (Instant, u64);

#[derive(Debug)]
pub(super) struct LocalStore {
    state: Mutex<State>,
    ttl: Duration,
    in_flight_ttl: Duration,
    max_entries: usize,
    max_stored_bytes: usize,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<Key, Slot>,
    pending_by_expiry: BTreeMap<IndexKey, Key>,
    done_by_expiry: BTreeMap<IndexKey, Key>,
    stored_bytes: usize,
    next_seq: u64,
}

#[derive(Debug)]
struct Slot {
    fingerprint: Fingerprint,
    index: IndexKey,
    kind: SlotKind,
}

#[derive(Debug)]
enum SlotKind {
    /// Held only to be dropped: that is the wake-up for waiters.
    Pending { _wake: watch::Sender<()> },
    Done {
        response: StoredResponse,
        size: usize,
    },
}

/// What one look at the map decided.
enum Step {
    Decided(Outcome),
    Wait {
        wake: watch::Receiver<()>,
        expires_at: Instant,
    },
}

impl LocalStore {
    pub(super) fn new(
        ttl: Duration,
        in_flight_ttl: Duration,
        max_entries: usize,
        max_stored_bytes: usize,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ttl,
            in_flight_ttl,
            max_entries,
            max_stored_bytes,
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent before anything that could panic, so a
        // poisoned lock still guards a usable map.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) async fn claim(
        self: &Arc<Self>,
        project: &str,
        key: &str,
        fingerprint: Fingerprint,
        deadline: Instant,
    ) -> Outcome {
        let key: Key = (project.to_owned(), key.to_owned());
        loop {
            let (mut wake, expires_at) = match self.step(&key, fingerprint, deadline) {
                Step::Decided(outcome) => return outcome,
                Step::Wait { wake, expires_at } => (wake, expires_at),
            };
            // Woken by the slot changing (its sender dropped), by the claim expiring, or by
            // the end of the wait; the next step looks again in every case.
            tokio::select! {
                _ = wake.changed() => {}
                () = tokio::time::sleep_until(expires_at.min(deadline)) => {}
            }
        }
    }

    fn step(self: &Arc<Self>, key: &Key, fingerprint: Fingerprint, deadline: Instant) -> Step {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(slot) = state.slots.get(key) {
            if slot.index.0 > now {
                if slot.fingerprint != fingerprint {
                    return Step::Decided(Outcome::Conflict);
                }
                return match &slot.kind {
                    SlotKind::Done { response, .. } => {
                        Step::Decided(Outcome::Replay(response.clone()))
                    }
                    SlotKind::Pending { _wake: sender } if now < deadline => Step::Wait {
                        wake: sender.subscribe(),
                        expires_at: slot.index.0,
                    },
                    SlotKind::Pending { .. } => Step::Decided(Outcome::StillInFlight {
                        retry_after: retry_after(slot.index.0 - now),
                    }),
                };
            }
            state.remove(key);
        }
        self.make_room(&mut state, now, 0);
        let (sender, _) = watch::channel(());
        let index = state.index_for(now + self.in_flight_ttl);
        state.pending_by_expiry.insert(index, key.clone());
        state.slots.insert(
            key.clone(),
            Slot {
                fingerprint,
                index,
                kind: SlotKind::Pending { _wake: sender },
            },
        );
        Step::Decided(Outcome::Owner(Lease::Local(LocalLease {
            store: self.clone(),
            key: key.clone(),
            token: index.1,
            fingerprint,
        })))
    }

    /// Sweeps what has expired, then evicts until one more entry of `extra_bytes` fits.
    fn make_room(&self, state: &mut State, now: Instant, extra_bytes: usize) {
        state.sweep(now);
        let mut evicted = 0;
        while state.slots.len() >= self.max_entries
            || state.stored_bytes.saturating_add(extra_bytes) > self.max_stored_bytes
        {
            // Completed entries go first; claims go only to free a slot, as they hold no bytes.
            let freed = state.pop_first(false, None)
                || (state.slots.len() >= self.max_entries && state.pop_first(true, None));
            if !freed {
                break;
            }
            evicted += 1;
        }
        if evicted > 0 {
            self.counters
                .evicted
                .fetch_add(evicted, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(
                evicted,
                "idempotency store full; evicted the oldest entries"
            );
        }
    }

    fn complete(&self, lease: &LocalLease, response: StoredResponse) -> bool {
        let size = response.approx_size() + lease.key.0.len() + lease.key.1.len();
        if size > self.max_stored_bytes {
            return false;
        }
        let now = Instant::now();
        let mut state = self.lock();
        // Store when the claim is still ours, or when it lapsed and nobody took the key since:
        // the response is right for this fingerprint either way, and a later retry replays it
        // instead of going upstream a second time.
        match state.slots.get(&lease.key) {
            Some(slot) if slot.index.1 == lease.token => {}
            Some(slot) if slot.index.0 <= now => {}
            None => {}
            Some(_) => return false,
        }
        state.remove(&lease.key);
        self.make_room(&mut state, now, size);
        let index = state.index_for(now + self.ttl);
        state.done_by_expiry.insert(index, lease.key.clone());
        state.stored_bytes += size;
        state.slots.insert(
            lease.key.clone(),
            Slot {
                fingerprint: lease.fingerprint,
                index,
                kind: SlotKind::Done { response, size },
            },
        );
        true
    }

    fn release(&self, lease: &LocalLease) {
        let mut state = self.lock();
        if state
            .slots
            .get(&lease.key)
            .is_some_and(|slot| slot.index.1 == lease.token)
        {
            state.remove(&lease.key);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().slots.len()
    }
}

impl State {
    fn index_for(&mut self, expires_at: Instant) -> IndexKey {
        self.next_seq += 1;
        (expires_at, self.next_seq)
    }

    fn remove(&mut self, key: &Key) {
        let Some(slot) = self.slots.remove(key) else {
            return;
        };
        match slot.kind {
            SlotKind::Pending { .. } => {
                self.pending_by_expiry.remove(&slot.index);
            }
            SlotKind::Done { size, .. } => {
                self.done_by_expiry.remove(&slot.index);
                self.stored_bytes = self.stored_bytes.saturating_sub(size);
            }
        }
    }

    /// Drops the entry at the front of one index (the next to expire) with its slot.
    fn pop_first(&mut self, pending: bool, expired_by: Option<Instant>) -> bool {
        let index = if pending {
            &mut self.pending_by_expiry
        } else {
            &mut self.done_by_expiry
        };
        let Some(entry) = index.first_entry() else {
            return false;
        };
        if expired_by.is_some_and(|now| entry.key().0 > now) {
            return false;
        }
        let (popped, key) = entry.remove_entry();
        // The slot is checked against the index entry so a stale entry can never take a
        // newer slot of the same key with it.
        if self
            .slots
            .get(&key)
            .is_some_and(|slot| slot.index == popped)
        {
            self.remove(&key);
        }
        true
    }

    fn sweep(&mut self, now: Instant) {
        while self.pop_first(true, Some(now)) {}
        while self.pop_first(false, Some(now)) {}
    }
}

/// An owner's handle on its local claim.
#[derive(Debug)]
pub(super) struct LocalLease {
    store: Arc<LocalStore>,
    key: Key,
    token: u64,
    fingerprint: Fingerprint,
}

impl LocalLease {
    pub(super) fn complete(self, response: StoredResponse) -> bool {
        let stored = self.store.complete(&self, response);
        if !stored {
            // Not stored means the key may still hold our claim; give it up so a retry can go.
            self.store.release(&self);
        }
        stored
    }

    pub(super) fn release(self) {
        self.store.release(&self);
    }
}
