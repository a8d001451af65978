//! The composing crate: the only one that knows every layer.
//!
//! `main.rs` parses the command line and calls [`cli::run`]; everything else lives here so the
//! integration tests start exactly the gateway users run ([`RunningGateway::start`]).

mod admin;
mod capture;
pub mod cli;
pub mod config;
mod keys;
mod metrics;
pub mod reload;
pub mod server;
pub mod service;
pub mod state;

pub use config::{ConfigLoadError, GatewayConfig};
pub use reload::ReloadStatus;
pub use server::RunningGateway;
