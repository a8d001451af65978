//! The background usage writer and the observer that feeds it.

use crate::config::DatabaseConfig;
use crate::record::UsageRecord;
use crate::store::UsageStore;
use gateway_core::{FinishedRequest, RequestObserver};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Counters of the write path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records handed to the writer.
    pub queued: u64,
    /// Records committed to the database.
    pub written: u64,
    /// Records lost because the queue was full or the writer had stopped.
    pub dropped: u64,
    /// Batches whose write failed (and was retried).
    pub failed_writes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    failed_writes: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WriterStats {
        WriterStats {
            queued: self.queued.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed_writes: self.failed_writes.load(Ordering::Relaxed),
        }
    }
}

/// Observer that turns each finished, routed request into a usage record and queues it.
/// Never waits: a full queue drops the record and counts it.
#[derive(Debug, Clone)]
pub struct UsageRecorder {
    sender: mpsc::Sender<UsageRecord>,
    counters: Arc<Counters>,
}

impl RequestObserver for UsageRecorder {
    fn request_finished(&self, finished: &FinishedRequest<'_>) {
        let Some(record) = UsageRecord::from_finished(finished) else {
            return;
        };
        match self.sender.try_send(record) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Log the first loss and then ever more rarely, so an outage cannot flood logs.
                if dropped.is_power_of_two() {
                    let reason = match err {
                        mpsc::error::TrySendError::Full(_) => "queue full",
                        mpsc::error::TrySendError::Closed(_) => "writer stopped",
                    };
                    tracing::error!(dropped, reason, "usage record dropped");
                }
            }
        }
    }
}

/// Handle of the background task that writes usage records.
#[derive(Debug)]
pub struct UsageWriter {
    task: JoinHandle<()>,
    shutdown: Option<oneshot::Sender<()>>,
    counters: Arc<Counters>,
}

impl UsageWriter {
    /// Starts the writer. It connects (and migrates) in the background, retrying until the
    /// database is reachable; records queue meanwhile.
    pub fn spawn(config: DatabaseConfig) -> (UsageRecorder, Self) {
        let (sender, receiver) = mpsc::channel(config.queue_capacity.max(1));
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(config, receiver, shutdown_rx, counters.clone()));
        (
            UsageRecorder {
                sender,
                counters: counters.clone(),
            },
            Self {
                task,
                shutdown: Some(shutdown_tx),
                counters,
            },
        )
    }

    pub fn stats(&self) -> WriterStats {
        self.counters.snapshot()
    }

    /// Stops accepting records, writes what is queued, and returns within `grace`.
    pub async fn shutdown(mut self, grace: Duration) -> WriterStats {
        if let Some(shutdown) = self.shutdown.take() {
            let _ignored = shutdown.send(());
        }
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            self.task.abort();
            tracing::error!(
                queued_unwritten = self.stats().queued.saturating_sub(self.stats().written),
                "usage writer did not finish within the grace period"
            );
        }
        self.counters.snapshot()
    }
}

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

async fn run(
    config: DatabaseConfig,
    mut receiver: mpsc::Receiver<UsageRecord>,
    mut shutdown: oneshot::Receiver<()>,
    counters: Arc<Counters>,
) {
    let mut shutting_down = false;
    let mut delay = RETRY_MIN;
    let store = loop {
        let attempt = async {
            let store = UsageStore::connect(&config).await?;
            store.migrate().await?;
            Ok::<_, crate::store::StoreError>(store)
        };
        match attempt.await {
            Ok(store) => break store,
            Err(err) => {
                tracing::error!(error = %err, retry_in_ms = delay.as_millis() as u64, "usage database unavailable");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = &mut shutdown, if !shutting_down => {
                shutting_down = true;
            }
        }
        if shutting_down {
            // Still no database at shutdown: the queued records cannot be saved.
            receiver.close();
            let mut lost = 0u64;
            while receiver.try_recv().is_ok() {
                lost += 1;
            }
            counters.dropped.fetch_add(lost, Ordering::Relaxed);
            tracing::error!(lost, "usage database unavailable at shutdown; records lost");
            return;
        }
        delay = (delay * 2).min(RETRY_MAX);
    };

    let batch_size = config.batch_size.max(1);
    let flush_interval = Duration::from_millis(config.flush_interval_ms);
    let mut batch = Vec::with_capacity(batch_size);
    let mut open = true;
    while open {
        // Wait for a first record, then gather more until the batch is full or the first one
        // has waited `flush_interval`.
        let mut deadline = None;
        while batch.len() < batch_size {
            let room = batch_size - batch.len();
            let flush_at = deadline.unwrap_or_else(|| tokio::time::Instant::now() + flush_interval);
            tokio::select! {
                received = receiver.recv_many(&mut batch, room) => {
                    if received == 0 {
                        open = false;
                        break;
                    }
                    deadline.get_or_insert(flush_at);
                }
                () = tokio::time::sleep_until(flush_at), if deadline.is_some() && !shutting_down => break,
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    // No new records; the ones already queued are still received, and the
                    // deadline no longer applies: write them as fast as they come.
                    receiver.close();
                }
            }
        }
        if !batch.is_empty() {
            write_batch(&store, &batch, &counters).await;
            batch.clear();
        }
    }
    store.close().await;
}

/// Writes one batch, retrying until it is committed: a database outage delays records, it does
/// not lose them (unless the process stops meanwhile).
async fn write_batch(store: &UsageStore, batch: &[UsageRecord], counters: &Counters) {
    let mut delay = RETRY_MIN;
    loop {
        match store.insert(batch).await {
            Ok(_inserted) => {
                counters
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                return;
            }
            Err(err) => {
                counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, records = batch.len(), retry_in_ms = delay.as_millis() as u64, "writing usage records failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}
