//! Test support: a real mock upstream server speaking OpenAI JSON and SSE, with faults on demand.
//!
//! [`MockUpstream`] is an HTTP server on a real socket (HTTP/1.1 and HTTP/2 prior knowledge), so
//! the gateway's own client, connection pooling and streaming are exercised exactly as against a
//! vendor. The `mock-upstream` binary wraps the same server for tests written in other languages.
//!
//! # Endpoints
//!
//! Every endpoint is also accepted without the `/v1` prefix.
//!
//! - `POST /v1/chat/completions`: an OpenAI chat completion, plain or streamed (`"stream": true`).
//! - `GET /v1/models`: one model, `mock-model`.
//! - `GET /mock/stats`: [`MockStats`] as JSON.
//! - `POST /mock/reset`: same as [`MockUpstream::reset`].
//! - `POST /mock/config`: a [`Behaviour`] JSON body becomes the default behaviour.
//! - `GET /health`: 200.
//!
//! # What a chat completion answers
//!
//! Request number `n` (a per-server counter starting at 1, never reset, counting chat requests
//! only) answers with id `chatcmpl-up-<n>` and header `x-request-id: req-up-<n>`; the header is on
//! error answers too. The request's `model` is echoed back.
//!
//! The text is `C` pieces `"tok0 "`, `"tok1 "`, ... concatenated (`C` = [`Behaviour::chunks`],
//! default 5), so with the defaults it is `"tok0 tok1 tok2 tok3 tok4 "`. Usage is
//!
//! ```text
//! completion_tokens = C
//! prompt_tokens     = ceil(S / 4) + 1
//! total_tokens      = prompt_tokens + completion_tokens
//! ```
//!
//! where `S` is the total number of characters (Unicode scalar values, Python's `len`) of every
//! message whose `content` is a JSON string; array contents count nothing. A `[[mock ...]]`
//! directive is part of the content, so it counts too.
//!
//! A stream sends `data: <json>\n\n` events, each as its own body frame: a role chunk, `C` content
//! chunks, a finish chunk (`finish_reason: "stop"`), then only if `stream_options.include_usage`
//! is true a usage chunk (`"choices": []`), and finally `data: [DONE]`. As OpenAI does, when
//! usage was asked for every other chunk carries `"usage": null`.
//!
//! # Faults
//!
//! See [`Behaviour`] for what can be injected, and [`MockUpstream::set_behaviour`] or the
//! per-request directive `[[mock status=429 retry_after_secs=3]]` (parsed from the last message
//! whose content is a string) for how.

mod behaviour;
mod chat;
mod server;

pub use behaviour::Behaviour;
pub use server::{MockStats, MockUpstream, RecordedRequest};
