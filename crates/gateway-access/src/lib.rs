//! Access layer: who may call the gateway, and the front door's settings.
//!
//! Owns the `[server]` and `[[projects]]` config sections, the [`KeyStore`] built from them,
//! [`DbKeys`] (the keys created in the database, cached whole and refreshed by polling a
//! [`gateway_core::KeyDirectory`]), [`AuthThrottle`] (clients that keep failing are slowed
//! down) and [`AuthLayer`], the tower middleware that turns the presented key into a
//! [`gateway_core::Principal`]. It knows nothing of routing, vendors or billing.

mod auth;
mod config;
mod directory;
mod keys;
mod throttle;

pub use auth::{AuthLayer, AuthService};
pub use config::{AdminToken, ApiKeyConfig, AuthFailureConfig, ProjectConfig, ServerConfig};
pub use directory::{DbKeyStats, DbKeys};
pub use keys::{KeyStore, ProjectSummary, hash_key};
pub use throttle::{AuthThrottle, ThrottleStats, client_ip};
