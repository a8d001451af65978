//! Business layer: a usage record for every request that reached routing.
//!
//! Owns the `[database]` and `[[prices]]` config sections, the migrations of both stores (SQLite,
//! the embedded default, and Postgres), and the usage write path. Every record is first
//! appended to a local spool (segment files of CRC-checked entries, fsynced in groups every
//! `spool_fsync_ms`), then shipped to the database in batches by a background task that moves
//! a checkpoint only after each commit. So a slow or absent database never delays a response,
//! and a database outage, a restart or a `kill -9` loses nothing but the last fsync window.
//! Requests also spool a start marker; one whose finish never came (the process died) becomes
//! an `interrupted` row at the next start.

mod codec;
mod config;
mod prices;
pub mod reconcile;
mod record;
pub mod report;
mod shipper;
mod spool;
mod store;
mod writer;

pub use codec::{INTERRUPTED, StartedRequest};
pub use config::{DatabaseConfig, SpoolFullPolicy};
pub use prices::{PriceConfig, PriceTable};
pub use record::UsageRecord;
pub use store::{StoreError, UsageStore};
pub use writer::{UsageRecorder, UsageWriter, WriterStats};
