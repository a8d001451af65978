//! How the mock answers: the default behaviour and the per-request `[[mock ...]]` directive.
//!
//! The directive lets one test request misbehave without touching shared state, so tests that
//! share one server (or run in parallel against it) do not step on each other.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Content pieces in an answer when [`Behaviour::chunks`] is not set.
pub(crate) const DEFAULT_CHUNKS: usize = 5;

/// What the mock does with a request, in any format. The default is a prompt, well-formed
/// answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Behaviour {
    /// Wait this long before sending the response headers (a slow first byte).
    pub delay_ms: u64,
    /// Answer with this status and an error body in the vendor's shape instead of an answer.
    /// A success status (2xx) is ignored; a number that is not an HTTP status becomes 500.
    pub status: Option<u16>,
    /// Adds `Retry-After: <secs>` to error answers (those with [`Behaviour::status`]).
    pub retry_after_secs: Option<u64>,
    /// Number of content pieces in the answer (default 5); also the completion token count,
    /// tool calls included.
    pub chunks: Option<usize>,
    /// Pause between two SSE events of a stream.
    pub chunk_delay_ms: u64,
    /// Streams only: after this many content chunks, end the body with an error so the
    /// connection is aborted. A value above `chunks` aborts after the last content chunk.
    /// Wins over [`Behaviour::stream_error_after_chunks`] when both are set.
    pub reset_after_chunks: Option<usize>,
    /// Streams only: after this many content chunks, send the vendor's in-band error event and
    /// end the stream cleanly (no `[DONE]`, no `message_stop`, no finishing chunk), which is how
    /// vendors report a failure once the 200 is on the wire. A value above `chunks` sends the
    /// error after the last content chunk.
    pub stream_error_after_chunks: Option<usize>,
    /// Whether a request that defines tools gets a tool call back. `None` (the default) calls
    /// the first tool unless the last message is a tool result or the request's tool choice is
    /// "none"; `Some(false)` never calls; `Some(true)` calls whenever the request has a tool.
    pub tool_call: Option<bool>,
}

impl Behaviour {
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunks.unwrap_or(DEFAULT_CHUNKS)
    }

    /// This behaviour with an OpenAI request's directives (if any) applied on top.
    #[cfg(test)]
    pub(crate) fn for_request(&self, body: &Value) -> Self {
        self.with_directives(openai_directive_carrier(body))
    }

    /// This behaviour with the directives in `carrier` (the text a format designates) applied.
    pub(crate) fn with_directives(&self, carrier: Option<&str>) -> Self {
        let mut behaviour = self.clone();
        if let Some(text) = carrier {
            behaviour.apply_directives(text);
        }
        behaviour
    }

    /// Applies every `[[mock key=value ...]]` in `text`, in order. Parsing is lenient: unknown
    /// keys and values that do not parse are skipped, so a typo degrades to the default rather
    /// than to a confusing failure inside the mock.
    pub(crate) fn apply_directives(&mut self, text: &str) {
        let mut rest = text;
        while let Some(start) = rest.find("[[mock") {
            let after = &rest[start + "[[mock".len()..];
            let Some(end) = after.find("]]") else {
                break;
            };
            for pair in after[..end].split_whitespace() {
                if let Some((key, value)) = pair.split_once('=') {
                    self.apply(key.trim(), value.trim());
                }
            }
            rest = &after[end + 2..];
        }
    }

    fn apply(&mut self, key: &str, value: &str) {
        match key {
            "delay_ms" => set_number(&mut self.delay_ms, value),
            "status" => set_optional(&mut self.status, value),
            "retry_after_secs" => set_optional(&mut self.retry_after_secs, value),
            "chunks" => set_optional(&mut self.chunks, value),
            "chunk_delay_ms" => set_number(&mut self.chunk_delay_ms, value),
            "reset_after_chunks" => set_optional(&mut self.reset_after_chunks, value),
            "stream_error_after_chunks" => {
                set_optional(&mut self.stream_error_after_chunks, value);
            }
            "tool_call" => set_optional(&mut self.tool_call, value),
            _ => {}
        }
    }
}

fn set_number<T: std::str::FromStr>(field: &mut T, value: &str) {
    if let Ok(parsed) = value.parse() {
        *field = parsed;
    }
}

/// `none`, `null` or an empty value clear the field, so a directive can undo a default.
fn set_optional<T: std::str::FromStr>(field: &mut Option<T>, value: &str) {
    if value.is_empty() || value.eq_ignore_ascii_case("none") || value.eq_ignore_ascii_case("null")
    {
        *field = None;
    } else if let Ok(parsed) = value.parse() {
        *field = Some(parsed);
    }
}

/// The content of the last message whose content is a string (OpenAI and Azure requests).
pub(crate) fn openai_directive_carrier(body: &Value) -> Option<&str> {
    body.get("messages")?
        .as_array()?
        .iter()
        .rev()
        .find_map(|message| message.get("content")?.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn directive_overrides_only_named_keys() {
        let base = Behaviour {
            chunk_delay_ms: 7,
            chunks: Some(9),
            ..Behaviour::default()
        };
        let body = json!({"messages": [
            {"role": "user", "content": "[[mock status=500]]"},
            {"role": "user", "content": "hello [[mock delay_ms=200 status=429 retry_after_secs=3 chunks=3 reset_after_chunks=2 bogus=1]]"},
            {"role": "user", "content": [{"type": "text", "text": "[[mock status=503]]"}]},
        ]});
        let got = base.for_request(&body);
        assert_eq!(
            got,
            Behaviour {
                delay_ms: 200,
                status: Some(429),
                retry_after_secs: Some(3),
                chunks: Some(3),
                chunk_delay_ms: 7,
                reset_after_chunks: Some(2),
                stream_error_after_chunks: None,
                tool_call: None,
            }
        );
    }

    #[test]
    fn lenient_values() {
        let mut behaviour = Behaviour {
            status: Some(500),
            ..Behaviour::default()
        };
        behaviour.apply_directives("[[mock delay_ms=soon status=none chunks=2]] [[mock chunks=4");
        assert_eq!(behaviour.delay_ms, 0);
        assert_eq!(behaviour.status, None);
        assert_eq!(
            behaviour.chunks,
            Some(2),
            "an unterminated directive is ignored"
        );
        behaviour.apply_directives("[[mock chunks=1]][[mock chunk_delay_ms=3]]");
        assert_eq!(behaviour.chunks, Some(1));
        assert_eq!(behaviour.chunk_delay_ms, 3);
    }

    #[test]
    fn stream_error_and_tool_call_keys() {
        let mut behaviour = Behaviour::default();
        behaviour.apply_directives("[[mock stream_error_after_chunks=2 tool_call=false]]");
        assert_eq!(behaviour.stream_error_after_chunks, Some(2));
        assert_eq!(behaviour.tool_call, Some(false));
        behaviour.apply_directives("[[mock tool_call=yes stream_error_after_chunks=none]]");
        assert_eq!(behaviour.tool_call, Some(false), "not a bool: unchanged");
        assert_eq!(behaviour.stream_error_after_chunks, None);
        behaviour.apply_directives("[[mock tool_call=true]]");
        assert_eq!(behaviour.tool_call, Some(true));
        // Older configs, without the new fields, still parse.
        let parsed: Behaviour = serde_json::from_str(r#"{"chunks":2}"#).unwrap();
        assert_eq!(parsed.tool_call, None);
        let parsed: Behaviour =
            serde_json::from_str(r#"{"tool_call":false,"stream_error_after_chunks":1}"#).unwrap();
        assert_eq!(parsed.tool_call, Some(false));
        assert_eq!(parsed.stream_error_after_chunks, Some(1));
    }

    #[test]
    fn no_messages_no_change() {
        let base = Behaviour::default();
        assert_eq!(base.for_request(&json!({"model": "x"})), base);
        assert_eq!(
            base.for_request(&json!({"messages": "[[mock status=500]]"})),
            base
        );
    }

    #[test]
    fn config_json_rejects_unknown_fields() {
        let parsed: Behaviour = serde_json::from_str(r#"{"status":429}"#).unwrap();
        assert_eq!(parsed.status, Some(429));
        assert!(serde_json::from_str::<Behaviour>(r#"{"statuss":429}"#).is_err());
    }
}
