//! Access layer: who may call the gateway, and the front door's settings.
//!
//! Owns the `[server]` and `[[projects]]` config sections, the [`KeyStore`] built from them, and
//! [`AuthLayer`], the tower middleware that turns an `Authorization: Bearer` header into a
//! [`Principal`]. It knows nothing of routing, vendors or billing.

mod auth;
mod config;
mod keys;

pub use auth::{AuthLayer, AuthService};
pub use config::{ApiKeyConfig, ProjectConfig, ServerConfig};
pub use keys::{KeyStore, hash_key};
