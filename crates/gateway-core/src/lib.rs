//! The shared vocabulary every layer speaks.
//!
//! Layer crates (access, routing, policy, providers, observability, business) depend on this
//! crate and never on each other; `gateway-bin` is the only crate that knows them all. Anything
//! two layers must agree on (the request context, the OpenAI wire model, the error that becomes
//! an HTTP response, the provider and observer contracts) lives here.

pub mod config;
pub mod context;
pub mod error;
pub mod keys;
pub mod limits;
pub mod openai;
pub mod provider;
pub mod trace;

pub use context::{
    ClientIp, FinishHold, FinishHook, FinishedRequest, PeerAddr, Principal, RequestContext,
    RequestId, RequestObserver, RequestOutcome,
};
pub use error::{ErrorType, GatewayError};
pub use keys::{DirectoryKey, KeyDirectory, KeyDirectoryError, KeySet};
pub use limits::RateLimit;
pub use provider::UpstreamHealth;

/// Every path the data-plane listener serves. The request path answers 405 (not 404) to any
/// other method on them; traces use them as `http.route` and in span names, while any other
/// path is named by its method alone (a client-chosen path must not become a label).
pub const SERVED_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/models",
    "/healthz",
    "/readyz",
];
