//! The keys created in the database, held in memory: the whole active set, replaced whole
//! when the directory's change version moves.
//!
//! Because the cache is the entire active set, a key it does not hold is unknown: a miss never
//! reaches the database, so a flood of made-up keys costs a hash and a map probe each. When
//! the database cannot be read the last good set stays in force (logged and counted) rather
//! than locking every database key out; expiry is still checked per request on the clock, so
//! an expired key stops working even while the database is away.

use crate::keys::{KeyDigest, KeyDigestDebug};
use arc_swap::ArcSwap;
use gateway_core::{DirectoryKey, KeyDirectory, KeySet};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Cached {
    version: Option<i64>,
    by_digest: HashMap<KeyDigestDebug, Arc<DirectoryKey>>,
}

/// Counters of the cache, for the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DbKeyStats {
    /// The directory version the cache holds (`None` before the first successful read).
    pub version: Option<i64>,
    /// Active database keys in the cache.
    pub keys: usize,
    /// Times the key set was reloaded because the version moved.
    pub reloads: u64,
    /// Polls that could not read the database (the last good set stayed in force).
    pub failures: u64,
}

/// The active database keys of the process (shared by every config version).
#[derive(Debug, Default)]
pub struct DbKeys {
    cached: ArcSwap<Cached>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl DbKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole set.
    pub fn apply(&self, set: KeySet) {
        let by_digest = set
            .keys
            .into_iter()
            .map(|key| (KeyDigestDebug(KeyDigest(key.sha256)), Arc::new(key)))
            .collect();
        self.cached.store(Arc::new(Cached {
            version: Some(set.version),
            by_digest,
        }));
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn lookup(&self, digest: [u8; 32]) -> Option<Arc<DirectoryKey>> {
        self.cached
            .load()
            .by_digest
            .get(&KeyDigestDebug(KeyDigest(digest)))
            .cloned()
    }

    /// One poll: reloads the set if the directory's version moved. On an error the set in
    /// force is kept.
    pub async fn refresh(&self, directory: &dyn KeyDirectory) -> bool {
        let known = self.cached.load().version;
        match directory.changed_since(known).await {
            Ok(Some(set)) => {
                self.apply(set);
                true
            }
            Ok(None) => false,
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %err, "reading the database keys failed");
                false
            }
        }
    }

    /// Polls `directory` every `every`, for ever (the caller aborts the task at shutdown).
    /// A failure is logged once it has lasted a few seconds (a fresh database is still being
    /// migrated for a moment at start), then every minute while it lasts, and when it ends.
    pub async fn follow(self: Arc<Self>, directory: Arc<dyn KeyDirectory>, every: Duration) {
        const QUIET: Duration = Duration::from_secs(5);
        let mut failing_since: Option<Instant> = None;
        let mut last_warned: Option<Instant> = None;
        let mut ticker = tokio::time::interval(every.max(Duration::from_millis(50)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let before = self.failures.load(Ordering::Relaxed);
            let changed = self.refresh(&*directory).await;
            if self.failures.load(Ordering::Relaxed) > before {
                let since = *failing_since.get_or_insert_with(Instant::now);
                let due = match last_warned {
                    None => since.elapsed() >= QUIET,
                    Some(at) => at.elapsed() >= Duration::from_secs(60),
                };
                if due {
                    last_warned = Some(Instant::now());
                    tracing::warn!(
                        failing_secs = since.elapsed().as_secs(),
                        keys = self.stats().keys,
                        "cannot read the database keys; serving the last good set"
                    );
                }
            } else if let Some(since) = failing_since.take()
                && last_warned.take().is_some()
            {
                tracing::info!(
                    failed_secs = since.elapsed().as_secs(),
                    "database keys readable again"
                );
            }
            if changed {
                tracing::debug!(keys = self.stats().keys, "database keys reloaded");
            }
        }
    }

    pub fn stats(&self) -> DbKeyStats {
        let cached = self.cached.load();
        DbKeyStats {
            version: cached.version,
            keys: cached.by_digest.len(),
            reloads: self.reloads.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;
    use futures_util::future::BoxFuture;
    use gateway_core::KeyDirectoryError;
    use std::sync::Mutex;

    /// A directory whose answers the test sets: a key set, or an outage.
    #[derive(Default)]
    struct Scripted {
        set: Mutex<Option<KeySet>>,
        down: std::sync::atomic::AtomicBool,
        full_reads: AtomicU64,
    }

    impl KeyDirectory for Scripted {
        fn changed_since(
            &self,
            known: Option<i64>,
        ) -> BoxFuture<'_, Result<Option<KeySet>, KeyDirectoryError>> {
            Box::pin(async move {
                if self.down.load(Ordering::Relaxed) {
                    return Err(KeyDirectoryError("connection refused".into()));
                }
                let set = self.set.lock().unwrap().clone().unwrap_or_default();
                if known == Some(set.version) {
                    return Ok(None);
                }
                self.full_reads.fetch_add(1, Ordering::Relaxed);
                Ok(Some(set))
            })
        }
    }

    fn key(id: &str, digest: u8) -> DirectoryKey {
        DirectoryKey {
            project: "p".into(),
            key_id: id.into(),
            sha256: [digest; 32],
            models: None,
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn reloads_only_when_the_version_moves_and_keeps_the_last_set_when_down() {
        let directory = Scripted::default();
        *directory.set.lock().unwrap() = Some(KeySet {
            version: 1,
            keys: vec![key("a", 1)],
        });
        let cache = DbKeys::new();
        assert!(cache.refresh(&directory).await);
        assert!(!cache.refresh(&directory).await);
        assert_eq!(directory.full_reads.load(Ordering::Relaxed), 1);
        assert_eq!(cache.lookup([1; 32]).unwrap().key_id, "a");
        assert!(cache.lookup([2; 32]).is_none());

        // Revoking `a` and adding `b` is one version step: the whole set is replaced.
        *directory.set.lock().unwrap() = Some(KeySet {
            version: 2,
            keys: vec![key("b", 2)],
        });
        assert!(cache.refresh(&directory).await);
        assert!(cache.lookup([1; 32]).is_none());
        assert!(cache.lookup([2; 32]).is_some());

        directory.down.store(true, Ordering::Relaxed);
        assert!(!cache.refresh(&directory).await);
        assert!(cache.lookup([2; 32]).is_some(), "the last good set stays");
        let stats = cache.stats();
        assert_eq!(
            (stats.version, stats.keys, stats.reloads, stats.failures),
            (Some(2), 1, 2, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn follow_polls_on_its_interval() {
        let directory = Arc::new(Scripted::default());
        *directory.set.lock().unwrap() = Some(KeySet {
            version: 7,
            keys: vec![key("a", 1)],
        });
        let cache = Arc::new(DbKeys::new());
        let task = tokio::spawn(
            cache
                .clone()
                .follow(directory.clone(), Duration::from_secs(1)),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(cache.lookup([1; 32]).is_some());
        *directory.set.lock().unwrap() = Some(KeySet {
            version: 8,
            keys: vec![],
        });
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(cache.lookup([1; 32]).is_none(), "seen within one interval");
        task.abort();
    }
}
