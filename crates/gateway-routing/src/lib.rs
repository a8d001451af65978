//! Routing layer: which provider and upstream model serve a model alias, and in which order the
//! alternatives are tried.
//!
//! Owns the `[[models]]` config section and the [`RoutingTable`] built from it. The table's
//! shape (aliases, targets, fallback chains) is built whole for each config version and never
//! changes; what it learns from [`RoutingTable::report`] (health, latency, canary verdicts) lives
//! in atomics beside it and is dropped with it, so a new config starts from a clean slate.
//! It knows provider *names* only (validated against the configured set), never their clients,
//! and prices only through the [`CostLookup`] it is given.

mod config;
mod state;
mod table;

pub use config::{
    CanaryConfig, FailureClass, FailureClasses, ModelConfig, Sticky, Strategy, TargetConfig,
};
pub use state::{CANARY_SAMPLES, COOL_DOWN, Clock, ManualClock, SystemClock, UNHEALTHY_AFTER};
pub use table::{
    Attempt, CostLookup, NoPrices, Outcome, Route, RouteInputs, RoutePlan, RoutingStats,
    RoutingTable, Target,
};
