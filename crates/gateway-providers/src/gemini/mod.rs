//! Google Gemini <-> OpenAI translation: chat completions (plain and streamed) and embeddings.
//!
//! Pure functions and one stream state machine, no HTTP: the client that calls
//! `{base}/models/{model}:generateContent`, `:streamGenerateContent?alt=sse` or
//! `:batchEmbedContents` (key in `x-goog-api-key`) feeds them bodies and SSE `data:` payloads.
//!
//! The gateway speaks OpenAI, so every OpenAI parameter either has a faithful Gemini
//! counterpart or is refused with a 400 naming the field: a request is never answered as if a
//! parameter had been honoured when it was silently dropped. The few fields that are accepted
//! and not sent (`user`, `metadata`, `store: false`, image `detail`...) change nothing in what
//! the model generates; they are listed where they are read (`request.rs`).

mod embeddings;
mod error;
mod request;
mod response;
mod schema;
mod stream;

pub use embeddings::{
    EmbeddingEncoding, MAX_EMBEDDING_INPUTS, to_gemini_embeddings_request,
    to_openai_embeddings_response, to_openai_embeddings_response_encoded,
};
pub use error::{error_from_gemini, scrub_secrets};
pub use request::to_gemini_request;
pub use response::to_openai_response;
pub use stream::GeminiToOpenAi;

use bytes::Bytes;
use gateway_core::openai::Usage;

/// The provider name used in errors raised by translation itself (a malformed Gemini body),
/// where the caller's configured provider name is not at hand.
pub(crate) const PROVIDER: &str = "gemini";

/// An OpenAI-format body translated from Gemini's, with what the gateway records about it.
#[derive(Debug, Clone)]
pub struct Translated {
    /// The OpenAI JSON (`chat.completion` or an embeddings `list`), sent to the client as is.
    pub body: Bytes,
    /// Token usage as Gemini reported it; `None` when Gemini reported none.
    pub usage: Option<Usage>,
    /// Gemini's `responseId`, or the id the gateway generated when there was none.
    pub response_id: Option<String>,
}
