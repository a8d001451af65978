//! The inbound direction: an Anthropic SDK client (`POST /v1/messages`) served by any vendor,
//! through the gateway's canonical OpenAI form.
//!
//! The request is translated to a [`ChatCompletionRequest`](gateway_core::openai::ChatCompletionRequest)
//! so routing, policy and every provider see one format; the vendor's OpenAI answer (whole or
//! streamed) is translated back into the Anthropic message and event shapes.

mod request;
mod response;
mod stream;

pub use request::from_anthropic_request;
pub use response::from_openai_response;
pub use stream::OpenAiToAnthropic;

/// The provider name put in errors about a vendor's OpenAI answer: these functions are not
/// told which provider answered.
const UPSTREAM: &str = "upstream";
