//! Business layer: a usage record for every request that reached routing.
//!
//! Owns the `[database]` and `[[prices]]` config sections, the migrations of both stores (SQLite, the embedded
//! default, and Postgres), and the usage writer. Records are handed over through a bounded
//! channel and written in batches by a background task, so a slow or absent database never
//! delays a response: records wait in memory while the database is down and land when it is
//! back. Past the queue's capacity records are dropped, counted and logged (a durable spool
//! replaces this in the billing ledger work).

mod config;
mod prices;
mod record;
mod store;
mod writer;

pub use config::DatabaseConfig;
pub use prices::{PriceConfig, PriceTable};
pub use record::UsageRecord;
pub use store::{StoreError, UsageStore};
pub use writer::{UsageRecorder, UsageWriter, WriterStats};
