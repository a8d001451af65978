//! The shipper: reads what the spool made durable, writes it to the database in batches, and
//! moves the checkpoint only after the commit.
//!
//! The insert skips request ids already present, so everything after the checkpoint can be
//! shipped again after a crash: a record is never lost between commit and checkpoint, and
//! never billed twice. Start markers are matched with their finishes here; the ones still open
//! are carried in the checkpoint, so recovery knows which requests a crash cut off.
//!
//! The shipper also syncs the catalog (prices, projects, keys) the recorder was handed: after
//! connecting, before each batch, and when idle. A failed sync is retried but never holds
//! records back: a batch adds any price row it needs itself.

use crate::codec::{self, Kind};
use crate::prices::PriceConfig;
use crate::record::UsageRecord;
use crate::spool::{self, Checkpoint, OpenStart, OpenStarts, Pos, SEGMENT_HEADER, Tail};
use crate::store::{PriceSync, StoreError, UsageStore};
use crate::writer::{Ctx, RETRY_MAX, RETRY_MIN, Stop, bump, unix_ms};
use std::time::Duration;
use tokio::time::Instant;

/// Most bytes read from a segment at once. Above the largest entry, so every read makes
/// progress.
const READ_CHUNK: u64 = 4 << 20;
/// A start marker still open after this long has lost its finish (refused by a full spool):
/// no request lives this long. Forgetting it keeps the checkpoint small.
const STALE_START_MS: i64 = 6 * 3600 * 1000;

#[derive(Debug, Default)]
struct Batch {
    records: Vec<UsageRecord>,
    interrupted: u64,
    /// Entries read, markers included.
    entries: u64,
    first_spooled_at: Option<i64>,
    last_spooled_at: Option<i64>,
}

struct Shipper<'a> {
    ctx: &'a Ctx,
    store: UsageStore,
    /// Where reading stands; the checkpoint catches up at each commit.
    pos: Pos,
    /// Where the checkpoint stands.
    committed: Pos,
    open: OpenStarts,
    batch_size: usize,
    flush_interval: Duration,
    /// The catalog generation last synced.
    catalog_synced: u64,
    /// Sync again even if the generation did not move: a batch added price rows the last
    /// sync did not know, or the last sync failed.
    catalog_stale: bool,
    /// After a failed sync, none is tried before this: a database that is down is already
    /// being retried by the batches, and each attempt can take the pool's acquire timeout.
    catalog_retry_at: Option<Instant>,
}

pub(crate) async fn ship(ctx: &Ctx, checkpoint: Checkpoint, mut stop: Stop) {
    let Some(store) = connect(ctx, &mut stop).await else {
        return;
    };
    let mut shipper = Shipper {
        ctx,
        store,
        pos: checkpoint.pos,
        committed: checkpoint.pos,
        open: checkpoint.open,
        batch_size: ctx.config.batch_size.max(1),
        flush_interval: Duration::from_millis(ctx.config.flush_interval_ms),
        catalog_synced: 0,
        catalog_stale: false,
        catalog_retry_at: None,
    };
    shipper.sync_catalog().await;
    while let Some(batch) = shipper.gather(&mut stop).await {
        if !shipper.commit(batch, &mut stop).await {
            break;
        }
    }
    shipper.store.close().await;
}

/// Resolves at `at`, never when it is `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Connects and migrates, retrying with backoff until told to stop: then the records wait in
/// the spool for the next start. An attempt under way when the stop comes is let finish (the
/// pool's acquire timeout bounds it, the shutdown grace bounds all), so a gateway stopped
/// right after it started still ships what it served.
async fn connect(ctx: &Ctx, stop: &mut Stop) -> Option<UsageStore> {
    let mut delay = RETRY_MIN;
    loop {
        let attempt = async {
            let store = UsageStore::connect(&ctx.config).await?;
            store.migrate().await?;
            Ok::<_, StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Some(store),
            Err(err) => {
                tracing::error!(error = %err, retry_in_ms = delay.as_millis() as u64, "usage database unavailable");
            }
        }
        if stop.check() {
            return None;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.requested() => return None,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

impl Shipper<'_> {
    /// The next batch: up to `batch_size` records, gathered for at most `flush_interval` once
    /// the first is read. `None` when stopping and everything durable is shipped.
    async fn gather(&mut self, stop: &mut Stop) -> Option<Batch> {
        let mut batch = Batch::default();
        let mut deadline = None;
        loop {
            if let Some(range) = self.next_range() {
                self.read(range, &mut batch).await;
                if batch.records.len() >= self.batch_size {
                    return Some(batch);
                }
                continue;
            }
            // Caught up with what is durable. Markers alone, or a move past the end of a
            // segment, need no database: checkpoint them at once (and free the segment).
            if batch.entries > 0 && (stop.check() || batch.records.is_empty()) {
                return Some(batch);
            }
            if batch.entries == 0 && self.passed_a_segment() {
                return Some(batch);
            }
            if batch.entries == 0 && stop.check() && self.ctx.shared.lock().flusher_done {
                return None;
            }
            if batch.records.is_empty() {
                self.sync_catalog().await;
                tokio::select! {
                    () = self.ctx.shared.durable_advanced.notified() => {}
                    () = self.ctx.shared.catalog_changed.notified() => {}
                    () = sleep_until_some(self.catalog_retry_at) => {}
                    () = stop.requested() => {}
                }
                continue;
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.flush_interval);
            tokio::select! {
                () = self.ctx.shared.durable_advanced.notified() => {}
                () = tokio::time::sleep_until(deadline) => return Some(batch),
                () = stop.requested() => {}
            }
        }
    }

    /// Syncs the catalog the recorder was last handed, if it has not been. A failure is logged
    /// and counted, and the sync retried later.
    async fn sync_catalog(&mut self) {
        let (prices, projects, generation) = {
            let catalog = self.ctx.shared.catalog();
            (
                catalog.prices.clone(),
                catalog.projects.clone(),
                catalog.generation,
            )
        };
        if generation == self.catalog_synced && !self.catalog_stale {
            return;
        }
        if self.catalog_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let attempt = async {
            let mut sync = PriceSync::default();
            if let Some(prices) = &prices {
                let rows: Vec<PriceConfig> = prices.rows().cloned().collect();
                sync = self.store.sync_prices(&rows).await?;
            }
            if let Some(projects) = &projects {
                self.store.sync_projects(projects).await?;
            }
            Ok::<_, StoreError>(sync)
        };
        match attempt.await {
            Ok(sync) => {
                if sync != PriceSync::default() {
                    tracing::info!(
                        added = sync.added,
                        updated = sync.updated,
                        "price catalog synced"
                    );
                }
                self.catalog_synced = generation;
                self.catalog_stale = false;
                self.catalog_retry_at = None;
            }
            Err(err) => {
                bump(&self.ctx.shared.counters.failed_writes, 1);
                tracing::error!(error = %err, "syncing prices and projects to the database failed; retrying");
                self.catalog_stale = true;
                self.catalog_retry_at = Some(Instant::now() + RETRY_MAX);
            }
        }
    }

    /// Writes a batch, after the catalog it may have been priced with.
    async fn write(&mut self, records: &[UsageRecord]) -> Result<(), StoreError> {
        self.sync_catalog().await;
        let (_, added) = self.store.insert_batch(records).await?;
        if added > 0 {
            // Rows of a config this database never saw (spooled before a restart): the next
            // sync closes them, so only the current config's rows stay open.
            self.catalog_stale = true;
        }
        Ok(())
    }

    /// Whether reading moved past segments the checkpoint has not: they can be removed.
    fn passed_a_segment(&self) -> bool {
        self.pos.seq > self.committed.seq
            && self
                .ctx
                .shared
                .lock()
                .segments
                .range(..self.pos.seq)
                .next()
                .is_some()
    }

    /// The next durable bytes to read, `(segment, from, to, segment length)`; moves `pos` past
    /// segments read to their end. `None` when everything durable is read.
    fn next_range(&mut self) -> Option<(u64, u64, u64, u64)> {
        let mut state = self.ctx.shared.lock();
        loop {
            let Some((&seq, &len)) = state.segments.range(self.pos.seq..).next() else {
                state.durable_oldest = None;
                return None;
            };
            if seq != self.pos.seq {
                self.pos = Pos {
                    seq,
                    off: SEGMENT_HEADER,
                };
            }
            self.pos.off = self.pos.off.max(SEGMENT_HEADER);
            if self.pos.off < len {
                let to = len.min(self.pos.off + READ_CHUNK);
                return Some((seq, self.pos.off, to, len));
            }
            // Read to its end; a later segment means the flusher has left this one for good.
            let Some(next) = state.segments.range(seq + 1..).next().map(|(&s, _)| s) else {
                state.durable_oldest = None;
                return None;
            };
            self.pos = Pos {
                seq: next,
                off: SEGMENT_HEADER,
            };
        }
    }

    async fn read(&mut self, (seq, from, to, len): (u64, u64, u64, u64), batch: &mut Batch) {
        let ctx = self.ctx;
        let job = {
            let lock = ctx.lock.clone();
            let dir = ctx.dir.clone();
            tokio::task::spawn_blocking(move || {
                let _lock = lock;
                spool::read_range(&dir, seq, from, to)
            })
        };
        let data = match job.await {
            Ok(Ok(data)) => data,
            result => {
                let error = match result {
                    Ok(Err(err)) => err.to_string(),
                    Err(err) => err.to_string(),
                    Ok(Ok(_)) => String::new(),
                };
                bump(&ctx.shared.counters.spool_errors, 1);
                tracing::error!(error, "reading the usage spool failed");
                tokio::time::sleep(RETRY_MAX).await;
                return;
            }
        };
        let first = batch.entries == 0;
        let (entries, _end, tail) = spool::parse(&data);
        for range in entries {
            if batch.records.len() >= self.batch_size {
                break;
            }
            self.apply(&data[range.clone()], batch);
            self.pos.off = from + range.end as u64;
            batch.entries += 1;
        }
        let corrupt = match tail {
            Tail::Clean => false,
            // A cut made by READ_CHUNK; the rest is read next time.
            Tail::Incomplete => to == len && self.pos.off < len,
            Tail::Invalid => true,
        };
        if corrupt && batch.records.len() < self.batch_size {
            // Durable bytes that no longer read back: skip to the end of the segment rather
            // than misread or stall. Only a damaged disk gets here.
            bump(&ctx.shared.counters.spool_errors, 1);
            tracing::error!(
                segment = seq,
                offset = self.pos.off,
                skipped_bytes = len - self.pos.off,
                "corrupt usage spool entries skipped"
            );
            self.pos.off = len;
        }
        if first && let Some(at) = batch.first_spooled_at {
            ctx.shared.lock().shipping_oldest = Some(at);
        }
    }

    fn apply(&mut self, payload: &[u8], batch: &mut Batch) {
        let header = match codec::peek(payload) {
            Ok(header) => header,
            Err(err) => {
                bump(&self.ctx.shared.counters.spool_errors, 1);
                tracing::error!(error = %err, "unreadable usage spool entry skipped");
                return;
            }
        };
        batch.first_spooled_at.get_or_insert(header.spooled_at);
        batch.last_spooled_at = Some(header.spooled_at);
        match header.kind {
            Kind::Started => {
                self.open.insert(
                    header.request_id,
                    OpenStart {
                        spooled_at: header.spooled_at,
                        payload: payload.to_vec(),
                    },
                );
            }
            Kind::Finished | Kind::Interrupted => {
                self.open.remove(&header.request_id);
                match codec::decode_record(payload) {
                    Ok((_, record)) => {
                        if header.kind == Kind::Interrupted {
                            batch.interrupted += 1;
                        }
                        batch.records.push(record);
                    }
                    Err(err) => {
                        bump(&self.ctx.shared.counters.spool_errors, 1);
                        tracing::error!(request_id = %header.request_id, error = %err, "unreadable usage record skipped");
                    }
                }
            }
        }
    }

    /// Writes the batch, then the checkpoint, then removes the segments wholly behind it.
    /// `false` when stopping with the database refusing: the batch stays spooled.
    async fn commit(&mut self, batch: Batch, stop: &mut Stop) -> bool {
        let counters = &self.ctx.shared.counters;
        if !batch.records.is_empty() {
            let mut delay = RETRY_MIN;
            while let Err(err) = self.write(&batch.records).await {
                bump(&counters.failed_writes, 1);
                if stop.check() {
                    tracing::warn!(error = %err, records = batch.records.len(), "usage database refused records at shutdown; they stay spooled");
                    return false;
                }
                tracing::error!(error = %err, records = batch.records.len(), retry_in_ms = delay.as_millis() as u64, "writing usage records failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.requested() => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
            bump(&counters.written, batch.records.len() as u64);
            bump(&counters.interrupted, batch.interrupted);
        }

        let now = unix_ms();
        let before = self.open.len();
        self.open
            .retain(|_, start| now.saturating_sub(start.spooled_at) < STALE_START_MS);
        if self.open.len() < before {
            tracing::warn!(
                forgotten = before - self.open.len(),
                "start markers without a finish for hours forgotten"
            );
        }
        let checkpoint = Checkpoint {
            pos: self.pos,
            open: self.open.clone(),
        };
        let job = {
            let lock = self.ctx.lock.clone();
            let dir = self.ctx.dir.clone();
            tokio::task::spawn_blocking(move || {
                let _lock = lock;
                checkpoint.store(&dir)
            })
        };
        let stored = match job.await {
            Ok(Ok(())) => true,
            Ok(Err(err)) => {
                bump(&counters.spool_errors, 1);
                tracing::error!(error = %err, "writing the usage spool checkpoint failed");
                false
            }
            Err(err) => {
                bump(&counters.spool_errors, 1);
                tracing::error!(error = %err, "writing the usage spool checkpoint failed");
                false
            }
        };
        let behind: Option<Vec<(u64, u64)>> = {
            let mut state = self.ctx.shared.lock();
            state.unshipped = state.unshipped.saturating_sub(batch.entries);
            state.shipping_oldest = None;
            // The next unread entry was spooled no earlier than the last one shipped.
            if let (Some(oldest), Some(last)) = (state.durable_oldest, batch.last_spooled_at) {
                state.durable_oldest = Some(oldest.max(last));
            }
            stored.then(|| {
                state.shipped = self.pos;
                state
                    .segments
                    .range(..self.pos.seq)
                    .map(|(&seq, &len)| (seq, len))
                    .collect()
            })
        };
        let Some(behind) = behind else {
            // The records are in the database; the checkpoint is retried with the next
            // commit. Pausing keeps a failing disk from being hammered.
            tokio::select! {
                () = tokio::time::sleep(RETRY_MAX) => {}
                () = stop.requested() => {}
            }
            return true;
        };
        self.committed = self.pos;
        if behind.is_empty() {
            return true;
        }
        let seqs: Vec<u64> = behind.iter().map(|&(seq, _)| seq).collect();
        let job = {
            let lock = self.ctx.lock.clone();
            let dir = self.ctx.dir.clone();
            let seqs = seqs.clone();
            tokio::task::spawn_blocking(move || {
                let _lock = lock;
                spool::remove_segments(&dir, &seqs)
            })
        };
        match job.await {
            Ok(Ok(())) => {
                let mut state = self.ctx.shared.lock();
                for (seq, len) in behind {
                    state.segments.remove(&seq);
                    state.disk_bytes = state.disk_bytes.saturating_sub(len);
                }
            }
            result => {
                bump(&counters.spool_errors, 1);
                let error = match result {
                    Ok(Err(err)) => err.to_string(),
                    Err(err) => err.to_string(),
                    Ok(Ok(())) => String::new(),
                };
                tracing::error!(error, "removing shipped usage spool segments failed");
            }
        }
        true
    }
}
