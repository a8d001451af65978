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
