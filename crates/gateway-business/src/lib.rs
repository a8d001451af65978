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
//!
//! Each record is priced when it is made, from the `[[prices]]` row in force on its UTC day,
//! in exact decimals; the row that priced it goes with it. The database keeps every price row
//! the gateway was configured with, the projects and keys of the config, and the views finance
//! reads (`spend_daily`, `spend_monthly`). `docs/billing.md` describes the ledger.

pub mod budget;
mod codec;
mod config;
mod cost;
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
pub use cost::{BilledTokens, COST_SCALE, Cost, cost_of};
pub use prices::{PriceConfig, PriceTable};
pub use record::UsageRecord;
pub use store::{
    CreatedKey, KeyEntry, KeyError, NewKey, PriceSync, ProjectEntry, SECRET_PREFIX, StoreError,
    StoredKey, StoredPrice, UsageStore,
};
pub use writer::{CostTotal, UsageRecorder, UsageWriter, WriterStats};
