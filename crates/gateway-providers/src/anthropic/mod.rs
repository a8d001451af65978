//! Anthropic Messages API <-> OpenAI chat completions translation, both directions, streaming
//! included. Pure functions and state machines: no HTTP, so the provider wiring and the
//! `/v1/messages` endpoint can share them and the golden tests can pin them down.
//!
//! Outbound (an OpenAI client served by Anthropic): [`to_anthropic_request`],
//! [`to_openai_response`], [`AnthropicToOpenAi`] and [`error_from_anthropic`].
//!
//! Inbound (an Anthropic SDK client served by any vendor through the OpenAI canonical form):
//! [`from_anthropic_request`], [`from_openai_response`], [`OpenAiToAnthropic`] and
//! [`error_response`].
//!
//! What cannot be expressed on the other side is refused with a 400 naming the field rather
//! than dropped, except for hints that do not change what the model answers (OpenAI's `seed`,
//! `store`, `metadata`, `service_tier`, `prompt_cache_key`, `safety_identifier`).

mod error;
mod inbound;
mod request;
mod response;
mod stream;

pub use error::{error_from_anthropic, error_response};
pub use inbound::{OpenAiToAnthropic, from_anthropic_request, from_openai_response};
pub use request::to_anthropic_request;
pub use response::{Translated, to_openai_response};
pub use stream::AnthropicToOpenAi;

use bytes::Bytes;
use gateway_core::GatewayError;
use gateway_core::openai::{PromptTokensDetails, Usage};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Anthropic requires `max_tokens`; used when the client gave none.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The provider name put in errors when the caller did not say which Anthropic provider it is.
const PROVIDER: &str = "anthropic";

/// Anthropic's usage object. Every field is optional because `message_delta` carries only the
/// counts that changed, and some deployments send `null` for the cache counts.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Counts in `later` are cumulative, so each one present replaces the earlier value.
    fn merge(&mut self, later: &Self) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
    }

    /// OpenAI counts cached tokens inside `prompt_tokens`; Anthropic counts them beside
    /// `input_tokens`, so the prompt is the sum of the three.
    fn to_openai(self) -> Usage {
        let input = self.input_tokens.unwrap_or(0);
        let cache_read = self.cache_read_input_tokens.unwrap_or(0);
        let cache_write = self.cache_creation_input_tokens.unwrap_or(0);
        let mut usage = Usage::new(
            input + cache_read + cache_write,
            self.output_tokens.unwrap_or(0),
        );
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: Some(cache_read),
            cache_write_tokens: Some(cache_write),
        });
        usage
    }
}

/// OpenAI usage as Anthropic reports it: cached tokens taken out of the prompt count. A
/// vendor whose cache counts exceed its prompt count is inconsistent; its prompt count is then
/// reported whole as input rather than guessing a split.
fn anthropic_usage_json(usage: &Usage) -> Value {
    let cache_read = usage.cached_tokens();
    let cache_write = usage.cache_write_tokens();
    let (input, cache_read, cache_write) = match usage
        .prompt_tokens
        .checked_sub(cache_read)
        .and_then(|rest| rest.checked_sub(cache_write))
    {
        Some(input) => (input, cache_read, cache_write),
        None => (usage.prompt_tokens, 0, 0),
    };
    json!({
        "input_tokens": input,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_write,
    })
}

fn openai_finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // `end_turn`, `stop_sequence`, `pause_turn` and reasons added later all end the turn.
        _ => "stop",
    }
}

fn anthropic_stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Deserialises `value` with the path of the offending field in the error, prefixed by where
/// `value` sits in the request, so a 400 names the field as the client wrote it.
fn parse_at<T: DeserializeOwned>(value: &Value, at: &str) -> Result<T, GatewayError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let inner_path = err.path().to_string();
        let inner = err.into_inner().to_string();
        let mut path = join_path(at, if inner_path == "." { "" } else { &inner_path });
        // serde reports a missing field at its parent; naming the field itself helps more.
        if let Some(field) = inner
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            path = join_path(&path, field);
        }
        invalid(&path, format!("Invalid value for '{path}': {inner}"))
    })
}

fn join_path(prefix: &str, suffix: &str) -> String {
    match (prefix.is_empty(), suffix.is_empty()) {
        (_, true) => prefix.to_owned(),
        (true, false) => suffix.to_owned(),
        (false, false) if suffix.starts_with('[') => format!("{prefix}{suffix}"),
        (false, false) => format!("{prefix}.{suffix}"),
    }
}

fn invalid(param: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid_request(message, Some(param.to_owned()))
}

fn encode(value: &Value) -> Result<Bytes, GatewayError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|err| GatewayError::Internal(format!("encoding a translated body: {err}")))
}

/// A data URL's media type and base64 payload; `None` when it is not a base64 data URL.
fn split_base64_data_url(url: &str) -> Option<(&str, &str)> {
    let (meta, data) = url.strip_prefix("data:")?.split_once(',')?;
    let mut params = meta.split(';');
    let media_type = params.next()?;
    params
        .any(|param| param.eq_ignore_ascii_case("base64"))
        .then_some((media_type, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_sums_cache_into_the_prompt() {
        let usage = AnthropicUsage {
            input_tokens: Some(10),
            output_tokens: Some(5),
            cache_read_input_tokens: Some(100),
            cache_creation_input_tokens: Some(20),
        }
        .to_openai();
        assert_eq!(usage.prompt_tokens, 130);
        assert_eq!(usage.completion_tokens, 5);
        assert_eq!(usage.total_tokens, 135);
        assert_eq!(usage.cached_tokens(), 100);
        assert_eq!(usage.cache_write_tokens(), 20);
        assert_eq!(
            anthropic_usage_json(&usage),
            json!({"input_tokens": 10, "output_tokens": 5,
                   "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20})
        );
    }

    #[test]
    fn inconsistent_cache_counts_are_not_split() {
        let mut usage = Usage::new(5, 1);
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: Some(9),
            cache_write_tokens: None,
        });
        assert_eq!(anthropic_usage_json(&usage)["input_tokens"], 5);
        assert_eq!(anthropic_usage_json(&usage)["cache_read_input_tokens"], 0);
    }

    #[test]
    fn later_usage_replaces_only_what_it_carries() {
        let mut usage = AnthropicUsage {
            input_tokens: Some(10),
            output_tokens: Some(1),
            cache_read_input_tokens: Some(3),
            cache_creation_input_tokens: None,
        };
        usage.merge(&AnthropicUsage {
            output_tokens: Some(42),
            ..AnthropicUsage::default()
        });
        assert_eq!(usage.input_tokens, Some(10));
        assert_eq!(usage.output_tokens, Some(42));
        assert_eq!(usage.cache_read_input_tokens, Some(3));
    }

    #[test]
    fn finish_reasons_map_both_ways() {
        for (anthropic, openai) in [
            ("end_turn", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(openai_finish_reason(anthropic), openai);
            assert_eq!(anthropic_stop_reason(openai), anthropic);
        }
        assert_eq!(openai_finish_reason("stop_sequence"), "stop");
    }

    #[test]
    fn parse_errors_name_the_field() {
        #[derive(Debug, Deserialize)]
        struct Tool {
            #[allow(dead_code, reason = "only the error matters here")]
            name: String,
        }
        let err = parse_at::<Vec<Tool>>(&json!([{"name": 1}]), "tools").unwrap_err();
        assert!(
            matches!(&err, GatewayError::InvalidRequest { param: Some(p), .. } if p == "tools[0].name"),
            "{err:?}"
        );
        let err = parse_at::<Tool>(&json!({}), "tools[2]").unwrap_err();
        assert!(
            matches!(&err, GatewayError::InvalidRequest { param: Some(p), .. } if p == "tools[2].name"),
            "{err:?}"
        );
    }

    #[test]
    fn data_urls() {
        assert_eq!(
            split_base64_data_url("data:image/png;base64,AAAA"),
            Some(("image/png", "AAAA"))
        );
        assert_eq!(split_base64_data_url("data:text/plain,hello"), None);
        assert_eq!(split_base64_data_url("https://x/y.png"), None);
    }
}
