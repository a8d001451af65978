//! The usage write path: the recorder on the request path, the spool's flusher, and the writer
//! handle that starts and stops them.
//!
//! A request hands its entry to an in-memory buffer under a mutex held for the time of a copy;
//! the flusher writes the buffer to the spool and fsyncs it once per `spool_fsync_ms`; the
//! shipper (`shipper.rs`) reads what is durable into the database and moves the checkpoint
//! after each commit. Neither disk nor database is ever waited on by a request.
//!
//! Each record is priced (`cost.rs`) as it is made, with the price table the bin last handed
//! over ([`UsageRecorder::set_prices`]). Handing one over also queues the prices and projects
//! for the shipper to sync into the database, so the request path never waits for that either.

use crate::codec::{self, Kind, StartedRequest};
use crate::config::DatabaseConfig;
use crate::cost;
use crate::prices::PriceTable;
use crate::record::UsageRecord;
use crate::shipper;
use crate::spool::{self, ENTRY_HEADER, MAX_PAYLOAD, Pos, SEGMENT_HEADER, SegmentWriter};
use crate::store::ProjectEntry;
use gateway_core::{FinishedRequest, RequestObserver};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// Counters and gauges of the write path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Usage records accepted into the spool.
    pub queued: u64,
    /// Start markers accepted into the spool.
    pub started: u64,
    /// Of the `queued` records, those with usage but no price for their provider and model on
    /// their UTC day: their rows have a NULL cost (`spend_*.unpriced_requests`).
    pub unpriced: u64,
    /// Rows committed to the database ("shipped"), interrupted ones included. Rows shipped
    /// just before a crash are shipped again after it (the database skips them), so summed
    /// over restarts this can exceed `queued`.
    pub written: u64,
    /// Interrupted rows committed: start markers whose finish never came, found at recovery.
    pub interrupted: u64,
    /// Usage records refused: the spool was full (`spool_full = "drop_newest"`), the memory
    /// buffer was full (disk stalled), the record was over 1 MiB, or the writer had stopped.
    pub dropped: u64,
    /// Start markers refused, for the same reasons.
    pub dropped_markers: u64,
    /// Database writes that failed (and were retried), catalog syncs included.
    pub failed_writes: u64,
    /// Entries (records and markers) this process wrote and fsynced to the spool, in order.
    pub durable: u64,
    /// Spool disk errors, and entries that did not read back and were skipped.
    pub spool_errors: u64,
    /// Spool depth: entries (records and markers) not yet shipped, in memory or on disk.
    pub spool_entries: u64,
    /// Bytes of those entries.
    pub spool_bytes: u64,
    /// Bytes counted against `spool_max_bytes`: segment files not yet removed, plus memory.
    pub spool_total_bytes: u64,
    /// Age in milliseconds of the oldest entry not yet shipped; 0 when none is waiting.
    pub oldest_unshipped_ms: u64,
    /// The spool is open and recovered. Until then entries wait in memory, and `spool_entries`
    /// does not yet count what a previous run left.
    pub spool_open: bool,
}

pub(crate) const RETRY_MIN: Duration = Duration::from_millis(100);
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(5);
/// At most one log line about refused entries per this many milliseconds: an outage must not
/// flood the logs, the counters tell the totals.
const DROP_LOG_EVERY_MS: i64 = 10_000;
/// A buffer this large after a backlog is not kept for reuse.
const SPARE_MAX: usize = 16 << 20;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub queued: AtomicU64,
    pub started: AtomicU64,
    pub unpriced: AtomicU64,
    pub written: AtomicU64,
    pub interrupted: AtomicU64,
    pub dropped: AtomicU64,
    pub dropped_markers: AtomicU64,
    pub failed_writes: AtomicU64,
    pub durable: AtomicU64,
    pub spool_errors: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What the recorder, the flusher and the shipper share. Every critical section is a few
/// field updates or one copy into the buffer.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Framed entries not yet handed to the flusher (CRCs not yet filled in).
    pub pending: Vec<u8>,
    pub pending_entries: u64,
    pub pending_oldest: Option<i64>,
    /// The group the flusher is writing.
    pub in_flight_bytes: u64,
    pub in_flight_oldest: Option<i64>,
    /// Oldest durable entry the shipper has not read yet.
    pub durable_oldest: Option<i64>,
    /// Oldest entry the shipper has read but not committed.
    pub shipping_oldest: Option<i64>,
    /// Length of every segment file, as far as it is durable.
    pub segments: BTreeMap<u64, u64>,
    pub disk_bytes: u64,
    /// Entries accepted and not yet shipped.
    pub unshipped: u64,
    /// The checkpoint's position.
    pub shipped: Pos,
    /// No more entries are accepted.
    pub closed: bool,
    /// The flusher wrote its last group.
    pub flusher_done: bool,
    /// Recovery is over.
    pub opened: bool,
}

/// The config's prices and projects, waiting for the shipper to sync them into the database.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub prices: Option<Arc<PriceTable>>,
    pub projects: Option<Arc<[ProjectEntry]>>,
    /// Bumped by every hand-over, so the shipper can tell whether it synced the latest.
    pub generation: u64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// What records are priced with. Read (an `Arc` clone) once per record, written on reload.
    prices: RwLock<Arc<PriceTable>>,
    catalog: Mutex<Catalog>,
    /// A new catalog was handed over.
    pub catalog_changed: Notify,
    /// The buffer went from empty to not empty.
    pub flush_wanted: Notify,
    /// More of the spool is durable (or the flusher is done).
    pub durable_advanced: Notify,
    pub counters: Counters,
    max_bytes: u64,
    max_pending: u64,
    last_drop_log: AtomicI64,
    /// Cost of the priced records so far, by project, alias and currency, for metrics.
    costs: Mutex<CostTotals>,
}

/// Project -> alias -> (currency, total). Names come from the config (an alias reaches a
/// priced record only once routing resolved it), so the map stays small.
type CostTotals = HashMap<Arc<str>, HashMap<Arc<str>, Vec<(String, Decimal)>>>;

/// What the priced records of one project and alias cost so far, in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostTotal {
    pub project: Arc<str>,
    pub alias: Arc<str>,
    pub currency: String,
    /// Exact: the sum of the records' costs (12 decimal places).
    pub amount: Decimal,
}

impl Shared {
    /// A poisoned lock still guards consistent data (no critical section can panic halfway),
    /// so it is recovered, never a panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self) {
        self.lock().closed = true;
    }

    pub(crate) fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue_catalog(&self, change: impl FnOnce(&mut Catalog)) {
        let mut catalog = self.catalog();
        change(&mut catalog);
        catalog.generation += 1;
        drop(catalog);
        self.catalog_changed.notify_one();
    }

    /// Counts what is left in the buffer as lost and empties it.
    fn discard_pending(&self, reason: &'static str) {
        let mut state = self.lock();
        let (records, markers) = spool::count_kinds(&state.pending);
        state.unshipped = state.unshipped.saturating_sub(state.pending_entries);
        state.pending = Vec::new();
        state.pending_entries = 0;
        state.pending_oldest = None;
        drop(state);
        if records + markers > 0 {
            bump(&self.counters.dropped, records);
            bump(&self.counters.dropped_markers, markers);
            tracing::error!(records, markers, reason, "usage entries lost");
        }
    }

    /// `unpriced`: the entry is a record with usage and no cost, counted once accepted.
    fn append(&self, marker: bool, unpriced: bool, encode: impl FnOnce(&mut Vec<u8>, i64)) -> bool {
        let now = unix_ms();
        let mut state = self.lock();
        let used = state.disk_bytes + state.in_flight_bytes + state.pending.len() as u64;
        let refused = if state.closed {
            Some("writer stopped")
        } else if state.pending_entries >= self.max_pending {
            Some("spool buffer full (disk stalled)")
        } else if used >= self.max_bytes {
            Some("spool full")
        } else {
            let start = state.pending.len();
            spool::frame(&mut state.pending, |buf| encode(buf, now));
            let len = state.pending.len() - start;
            if len > ENTRY_HEADER + MAX_PAYLOAD {
                state.pending.truncate(start);
                Some("entry too large")
            } else if used + len as u64 > self.max_bytes {
                state.pending.truncate(start);
                Some("spool full")
            } else {
                None
            }
        };
        let Some(reason) = refused else {
            state.pending_entries += 1;
            state.unshipped += 1;
            let first = state.pending_oldest.is_none();
            if first {
                state.pending_oldest = Some(now);
            }
            drop(state);
            bump(
                if marker {
                    &self.counters.started
                } else {
                    &self.counters.queued
                },
                1,
            );
            if unpriced {
                bump(&self.counters.unpriced, 1);
            }
            if first {
                self.flush_wanted.notify_one();
            }
            return true;
        };
        drop(state);
        bump(
            if marker {
                &self.counters.dropped_markers
            } else {
                &self.counters.dropped
            },
            1,
        );
        let last = self.last_drop_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= DROP_LOG_EVERY_MS
            && self
                .last_drop_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(
                dropped = self.counters.dropped.load(Ordering::Relaxed),
                dropped_markers = self.counters.dropped_markers.load(Ordering::Relaxed),
                reason,
                "usage entries refused by the spool"
            );
        }
        false
    }

    fn add_cost(&self, record: &UsageRecord) {
        let (Some(cost), Some(project), Some(alias)) =
            (&record.cost, &record.project, &record.alias)
        else {
            return;
        };
        let mut costs = self.costs.lock().unwrap_or_else(PoisonError::into_inner);
        let currencies = costs
            .entry(project.clone())
            .or_default()
            .entry(alias.clone())
            .or_default();
        match currencies
            .iter_mut()
            .find(|(currency, _)| currency == cost.currency())
        {
            Some((_, total)) => *total += cost.amount(),
            None => currencies.push((cost.currency().to_owned(), cost.amount())),
        }
    }

    fn cost_totals(&self) -> Vec<CostTotal> {
        let costs = self.costs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut totals: Vec<CostTotal> = costs
            .iter()
            .flat_map(|(project, aliases)| {
                aliases.iter().flat_map(move |(alias, currencies)| {
                    currencies.iter().map(move |(currency, amount)| CostTotal {
                        project: project.clone(),
                        alias: alias.clone(),
                        currency: currency.clone(),
                        amount: *amount,
                    })
                })
            })
            .collect();
        totals.sort_unstable_by(|a, b| {
            (&a.project, &a.alias, &a.currency).cmp(&(&b.project, &b.alias, &b.currency))
        });
        totals
    }

    fn snapshot(&self) -> WriterStats {
        let now = unix_ms();
        let state = self.lock();
        let unsynced = state.pending.len() as u64 + state.in_flight_bytes;
        let shipped = state.shipped;
        let on_disk: u64 = state
            .segments
            .range(shipped.seq..)
            .map(|(&seq, &len)| {
                let from = if seq == shipped.seq {
                    shipped.off.max(SEGMENT_HEADER)
                } else {
                    SEGMENT_HEADER
                };
                len.saturating_sub(from)
            })
            .sum();
        let oldest = [
            state.pending_oldest,
            state.in_flight_oldest,
            state.durable_oldest,
            state.shipping_oldest,
        ]
        .into_iter()
        .flatten()
        .min();
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        WriterStats {
            queued: load(&c.queued),
            started: load(&c.started),
            unpriced: load(&c.unpriced),
            written: load(&c.written),
            interrupted: load(&c.interrupted),
            dropped: load(&c.dropped),
            dropped_markers: load(&c.dropped_markers),
            failed_writes: load(&c.failed_writes),
            durable: load(&c.durable),
            spool_errors: load(&c.spool_errors),
            spool_entries: state.unshipped,
            spool_bytes: on_disk + unsynced,
            spool_total_bytes: state.disk_bytes + unsynced,
            oldest_unshipped_ms: oldest.map_or(0, |at| u64::try_from(now - at).unwrap_or(0)),
            spool_open: state.opened,
        }
    }
}

pub(crate) fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Whether the writer was told to stop.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    signal: watch::Receiver<bool>,
    pub stopping: bool,
}

impl Stop {
    /// Resolves when the writer is told to stop (or its handle is gone). Once stopping it never
    /// resolves again, so a `select!` on it waits for its other branches.
    pub(crate) async fn requested(&mut self) {
        if self.stopping {
            std::future::pending::<()>().await;
        }
        let _stopped = self.signal.wait_for(|stop| *stop).await.is_ok();
        self.stopping = true;
    }

    /// Whether the writer was told to stop, without waiting.
    pub(crate) fn check(&mut self) -> bool {
        if !self.stopping {
            self.stopping = *self.signal.borrow() || self.signal.has_changed().is_err();
        }
        self.stopping
    }
}

/// What the flusher and the shipper work with.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub shared: Arc<Shared>,
    pub dir: PathBuf,
    /// The spool's lock. Every blocking job on the spool holds a clone, so an aborted writer
    /// keeps the directory until its last write is over.
    pub lock: Arc<File>,
    pub config: DatabaseConfig,
}

/// Observer that spools each finished, routed request's usage record (and, through
/// [`UsageRecorder::request_started`], a marker when it starts). Never waits: the entry is
/// copied into a memory buffer that the writer fsyncs within `spool_fsync_ms`; past the
/// spool's limits it is refused and counted.
#[derive(Debug, Clone)]
pub struct UsageRecorder {
    shared: Arc<Shared>,
}

impl UsageRecorder {
    /// Spools a record as it is (see [`UsageRecorder::price`]). `false` when it was refused
    /// (and counted in [`WriterStats::dropped`]); one accepted with usage and no cost is
    /// counted in [`WriterStats::unpriced`].
    pub fn record(&self, record: &UsageRecord) -> bool {
        let unpriced = record.cost.is_none() && record.has_usage();
        self.shared.append(false, unpriced, |buf, now| {
            codec::encode_record(buf, Kind::Finished, now, record);
        })
    }

    /// Sets the record's cost from the prices in force (the last [`UsageRecorder::set_prices`]);
    /// `None` when it has no usage or its target has no price on its UTC day. Returns whether
    /// it is priced.
    pub fn price(&self, record: &mut UsageRecord) -> bool {
        let prices = self
            .shared
            .prices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        record.cost = cost::cost_of(record, &prices);
        record.cost.is_some()
    }

    /// Makes `prices` the ones records are priced with from now on, and queues them for the
    /// database's `prices` table (synced by the shipper, in the background). Call it at start
    /// and after every reload; until the first call nothing is priced.
    pub fn set_prices(&self, prices: Arc<PriceTable>) {
        // Queued before it is used: a record priced with a row is spooled after the shipper was
        // told about the row, so the sync comes first.
        self.shared
            .queue_catalog(|catalog| catalog.prices = Some(prices.clone()));
        *self
            .shared
            .prices
            .write()
            .unwrap_or_else(PoisonError::into_inner) = prices;
    }

    /// Queues the config's projects and keys for the database's `projects` and `api_keys`
    /// tables (synced by the shipper, in the background). Call it at start and after every
    /// reload.
    pub fn set_projects(&self, projects: Vec<ProjectEntry>) {
        let projects: Arc<[ProjectEntry]> = projects.into();
        self.shared
            .queue_catalog(|catalog| catalog.projects = Some(projects));
    }

    /// The write path's counters and spool gauges (as [`UsageWriter::stats`]).
    pub fn stats(&self) -> WriterStats {
        self.shared.snapshot()
    }

    /// What the requests recorded so far cost, by project, alias and currency (records that
    /// were priced; counted even when the spool refused the record). Sorted.
    pub fn cost_totals(&self) -> Vec<CostTotal> {
        self.shared.cost_totals()
    }

    /// Spools the start of a request that reached routing. If the gateway dies before the
    /// request's record is spooled, the next start writes an interrupted row for it (status 0,
    /// `error_type` `interrupted`). Call it at most once per request, before its finish.
    /// `false` when it was refused (and counted in [`WriterStats::dropped_markers`]).
    pub fn request_started(&self, started: &StartedRequest<'_>) -> bool {
        self.shared.append(true, false, |buf, now| {
            codec::encode_started(buf, now, started);
        })
    }
}

impl RequestObserver for UsageRecorder {
    fn request_finished(&self, finished: &FinishedRequest<'_>) {
        if let Some(mut record) = UsageRecord::from_finished(finished) {
            self.price(&mut record);
            self.shared.add_cost(&record);
            self.record(&record);
        }
    }
}

/// Handle of the background task that spools usage records and ships them to the database.
///
/// Dropping it without [`UsageWriter::shutdown`] stops it at once, as a crash would: what was
/// fsynced stays in the spool and is shipped by the next writer on the same `spool_dir`.
#[derive(Debug)]
pub struct UsageWriter {
    task: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    shared: Arc<Shared>,
}

impl UsageWriter {
    /// Starts the writer. It opens (and recovers) the spool and connects to the database in
    /// the background, retrying both until they work; records are accepted at once.
    pub fn spawn(config: DatabaseConfig) -> (UsageRecorder, Self) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            prices: RwLock::new(Arc::new(PriceTable::default())),
            catalog: Mutex::new(Catalog::default()),
            catalog_changed: Notify::new(),
            flush_wanted: Notify::new(),
            durable_advanced: Notify::new(),
            counters: Counters::default(),
            max_bytes: config.spool_max_bytes,
            max_pending: u64::try_from(config.queue_capacity.max(1)).unwrap_or(u64::MAX),
            last_drop_log: AtomicI64::new(0),
            costs: Mutex::new(HashMap::new()),
        });
        let (stop, signal) = watch::channel(false);
        let stop_rx = Stop {
            signal,
            stopping: false,
        };
        let task = tokio::spawn(run(config, shared.clone(), stop_rx));
        (
            UsageRecorder {
                shared: shared.clone(),
            },
            Self {
                task: Some(task),
                stop,
                shared,
            },
        )
    }

    pub fn stats(&self) -> WriterStats {
        self.shared.snapshot()
    }

    /// Stops accepting records, makes the buffered ones durable, ships what the database takes
    /// (without retrying: what it refuses stays spooled for the next start), and returns within
    /// `grace`.
    pub async fn shutdown(mut self, grace: Duration) -> WriterStats {
        self.shared.close();
        let _ignored = self.stop.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            task.abort();
            tracing::error!(
                grace_ms = grace.as_millis() as u64,
                "usage writer did not finish within the grace period"
            );
        }
        self.shared
            .discard_pending("writer stopped before the spool took them");
        let stats = self.shared.snapshot();
        if stats.spool_entries > 0 {
            tracing::warn!(
                entries = stats.spool_entries,
                bytes = stats.spool_bytes,
                "usage entries remain spooled; the next start ships them"
            );
        }
        stats
    }
}

impl Drop for UsageWriter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            self.shared.close();
            task.abort();
            self.shared
                .discard_pending("usage writer dropped without shutdown");
        }
    }
}

async fn run(config: DatabaseConfig, shared: Arc<Shared>, mut stop: Stop) {
    let Some(recovered) = open(&config, &mut stop).await else {
        shared.discard_pending("the spool could not be opened before shutdown");
        return;
    };
    {
        let mut state = shared.lock();
        state.disk_bytes = recovered.segments.values().sum();
        state.segments = recovered.segments;
        state.unshipped += recovered.unshipped;
        state.durable_oldest = recovered.oldest;
        state.shipped = recovered.checkpoint.pos;
        state.opened = true;
    }
    if recovered.unshipped > 0 || recovered.truncated > 0 {
        tracing::info!(
            unshipped = recovered.unshipped,
            interrupted = recovered.interrupted,
            truncated_bytes = recovered.truncated,
            "usage spool recovered"
        );
    }
    let ctx = Ctx {
        shared,
        dir: config.spool_dir.clone(),
        lock: Arc::new(recovered.lock),
        config,
    };
    tokio::join!(
        flush_loop(&ctx, recovered.writer, stop.clone()),
        shipper::ship(&ctx, recovered.checkpoint, stop),
    );
}

/// Opens the spool, retrying: the directory may be held by a gateway that is still stopping,
/// or be unwritable for a while.
async fn open(config: &DatabaseConfig, stop: &mut Stop) -> Option<spool::Recovered> {
    let mut delay = RETRY_MIN;
    loop {
        let dir = config.spool_dir.clone();
        let result = tokio::task::spawn_blocking(move || spool::recover(&dir, unix_ms())).await;
        match result {
            Ok(Ok(recovered)) => return Some(recovered),
            Ok(Err(err)) => {
                tracing::error!(error = %err, retry_in_ms = delay.as_millis() as u64, "usage spool unavailable");
            }
            Err(err) => {
                tracing::error!(error = %err, "opening the usage spool failed");
            }
        }
        if stop.check() {
            return None;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.requested() => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Writes the buffer to the spool and fsyncs it, one group per `spool_fsync_ms`.
async fn flush_loop(ctx: &Ctx, writer: SegmentWriter, mut stop: Stop) {
    let window = Duration::from_millis(ctx.config.spool_fsync_ms);
    let writer = Arc::new(Mutex::new(writer));
    let mut spare = Vec::new();
    loop {
        // Wait for a first entry, then for the window, so entries arriving meanwhile share the
        // write and the fsync.
        tokio::select! {
            () = ctx.shared.flush_wanted.notified() => {}
            () = stop.requested() => {}
        }
        if !window.is_zero() && !stop.stopping {
            tokio::select! {
                () = tokio::time::sleep(window) => {}
                () = stop.requested() => {}
            }
        }
        flush(ctx, &writer, &mut spare, &mut stop).await;
        if stop.check() {
            break;
        }
    }
    // `shutdown` closes the buffer before it signals the stop, so once the stop is seen, one
    // more flush takes everything that was accepted.
    flush(ctx, &writer, &mut spare, &mut stop).await;
    ctx.shared.lock().flusher_done = true;
    ctx.shared.durable_advanced.notify_one();
}

async fn flush(
    ctx: &Ctx,
    writer: &Arc<Mutex<SegmentWriter>>,
    spare: &mut Vec<u8>,
    stop: &mut Stop,
) {
    let (group, entries, oldest) = {
        let mut state = ctx.shared.lock();
        if state.pending.is_empty() {
            return;
        }
        let group = std::mem::replace(&mut state.pending, std::mem::take(spare));
        let entries = std::mem::take(&mut state.pending_entries);
        state.in_flight_bytes = group.len() as u64;
        state.in_flight_oldest = state.pending_oldest.take();
        (group, entries, state.in_flight_oldest)
    };
    let mut group = Arc::new(group);
    if let Some(group) = Arc::get_mut(&mut group) {
        spool::seal(group);
    }
    let mut delay = RETRY_MIN;
    loop {
        let job = {
            let lock = ctx.lock.clone();
            let writer = writer.clone();
            let group = group.clone();
            let segment_bytes = ctx.config.spool_segment_bytes;
            tokio::task::spawn_blocking(move || {
                let _lock = lock;
                let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
                writer
                    .append(&group, segment_bytes)
                    .map(|()| (writer.seq, writer.len))
            })
        };
        let error = match job.await {
            Ok(Ok((seq, len))) => {
                let mut state = ctx.shared.lock();
                let before = state.segments.insert(seq, len).unwrap_or(0);
                state.disk_bytes += len.saturating_sub(before);
                state.in_flight_bytes = 0;
                state.in_flight_oldest = None;
                if state.durable_oldest.is_none() {
                    state.durable_oldest = oldest;
                }
                drop(state);
                bump(&ctx.shared.counters.durable, entries);
                ctx.shared.durable_advanced.notify_one();
                if let Ok(mut group) = Arc::try_unwrap(group)
                    && group.capacity() <= SPARE_MAX
                {
                    group.clear();
                    *spare = group;
                }
                return;
            }
            Ok(Err(err)) => err.to_string(),
            Err(err) => err.to_string(),
        };
        bump(&ctx.shared.counters.spool_errors, 1);
        if stop.check() {
            let (records, markers) = spool::count_kinds(&group);
            let mut state = ctx.shared.lock();
            state.in_flight_bytes = 0;
            state.in_flight_oldest = None;
            state.unshipped = state.unshipped.saturating_sub(entries);
            drop(state);
            bump(&ctx.shared.counters.dropped, records);
            bump(&ctx.shared.counters.dropped_markers, markers);
            tracing::error!(
                error,
                records,
                markers,
                "usage spool write failed at shutdown; entries lost"
            );
            return;
        }
        tracing::error!(
            error,
            retry_in_ms = delay.as_millis() as u64,
            "usage spool write failed"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.requested() => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}
