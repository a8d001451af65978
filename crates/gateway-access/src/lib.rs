//! Access layer: who may call the gateway, and the front door's settings.
//!
//! Owns the `[server]` and `[[projects]]` config sections, the [`KeyStore`] built from them,
//! [`DbKeys`] (the keys created in the database, cached whole and refreshed by polling a
//! [`gateway_core::KeyDirectory`]), [`AuthThrottle`] (clients that keep failing are slowed
//! down) and [`AuthLayer`], the tower middleware that turns the presented key into a
//! [`gateway_core::Principal`]. It knows nothing of routing, vendors or billing.
//!
//! The front door's pieces that sit below HTTP live here too: [`tls`] (the acceptor and its
//! reloading certificate), [`proxy_protocol`] (PROXY v1/v2 from trusted load balancers),
//! [`framing`] (ambiguous HTTP/1.1 framing rejected before hyper can act on it) and
//! [`TrustedProxies`] (the client IP behind load balancers).

mod auth;
mod client_ip;
mod config;
mod directory;
pub mod framing;
mod keys;
pub mod proxy_protocol;
mod throttle;
pub mod tls;

pub use auth::{AuthLayer, AuthService};
pub use client_ip::TrustedProxies;
pub use config::{AdminToken, ApiKeyConfig, AuthFailureConfig, ProjectConfig, ServerConfig};
pub use directory::{DbKeyStats, DbKeys};
pub use keys::{KeyStore, ProjectSummary, hash_key};
pub use throttle::{AuthThrottle, ThrottleStats};
