//! What an answer says before a format dresses it: the text pieces, the tool call, the token
//! counts and the embedding vectors. Every format shares them so that one test expectation
//! (documented in the crate docs) holds whichever vendor the gateway talks to.

use crate::behaviour::Behaviour;
use crate::server::Shared;
use serde_json::{Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

/// The tool call's arguments, streamed in these two pieces; joined they are
/// `{"location":"Paris"}`.
pub(crate) const TOOL_ARGUMENT_FRAGMENTS: [&str; 2] = [r#"{"location":"#, r#""Paris"}"#];

/// Length of every embedding vector.
pub(crate) const EMBEDDING_DIMENSIONS: usize = 8;

pub(crate) fn tool_arguments() -> Value {
    json!({"location": "Paris"})
}

/// Seconds since the Unix epoch, for `created` fields (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// `ceil(chars / 4) + 1`: the prompt token formula of every format.
pub(crate) fn tokens_for_chars(chars: usize) -> u64 {
    (chars as u64).div_ceil(4) + 1
}

/// What decides whether an answer is a tool call, as read from one request.
pub(crate) struct ToolRequest {
    /// The name of the request's first tool, if it defines any.
    pub(crate) first_tool: Option<String>,
    /// The last message carries a tool result, so the model has what it asked for.
    pub(crate) last_is_tool_result: bool,
    /// The request's tool choice forbids calling.
    pub(crate) choice_none: bool,
}

/// The answer to one chat request in any format.
pub(crate) struct Reply {
    /// The per-server request number behind every id of the answer.
    pub(crate) n: u64,
    pub(crate) pieces: Vec<String>,
    /// The tool the answer calls instead of answering text.
    pub(crate) tool: Option<String>,
    pub(crate) prompt_tokens: u64,
}

impl Reply {
    /// Counts a tool call in the stats when the answer is one.
    pub(crate) fn new(
        shared: &Shared,
        n: u64,
        behaviour: &Behaviour,
        prompt_tokens: u64,
        tools: ToolRequest,
    ) -> Self {
        let tool = match behaviour.tool_call {
            Some(false) => None,
            Some(true) => tools.first_tool,
            None if tools.last_is_tool_result || tools.choice_none => None,
            None => tools.first_tool,
        };
        if tool.is_some() {
            shared.update_stats(|stats| stats.tool_calls += 1);
        }
        Self {
            n,
            pieces: (0..behaviour.chunk_count())
                .map(|i| format!("tok{i} "))
                .collect(),
            tool,
            prompt_tokens,
        }
    }

    pub(crate) fn text(&self) -> String {
        self.pieces.concat()
    }

    /// The chunk count, whether the answer is text or a tool call.
    pub(crate) fn completion_tokens(&self) -> u64 {
        self.pieces.len() as u64
    }
}

/// A deterministic vector for `text`: byte `j` (least significant first) of the 64-bit FNV-1a
/// hash of its UTF-8 bytes, mapped to `(byte - 128) / 128`. Multiples of 1/128 print exactly
/// in JSON, so tests can compare vectors with `==`.
pub(crate) fn embedding(text: &str) -> Vec<f64> {
    let hash = fnv1a(text);
    (0..EMBEDDING_DIMENSIONS)
        .map(|j| (f64::from(((hash >> (8 * j)) & 0xff) as u8) - 128.0) / 128.0)
        .collect()
}

/// The 64-bit FNV-1a hash of `text`'s UTF-8 bytes: simple enough for tests in any language to
/// recompute what the mock derives from it.
pub(crate) fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The value at the first of `keys` that `value` has: Gemini accepts both camelCase and
/// snake_case field names.
pub(crate) fn field<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|key| value.get(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_formula() {
        assert_eq!(tokens_for_chars(0), 1);
        assert_eq!(tokens_for_chars(4), 2);
        assert_eq!(tokens_for_chars(5), 3);
    }

    #[test]
    fn embeddings_are_deterministic_and_differ_by_text() {
        let a = embedding("hello");
        assert_eq!(a.len(), EMBEDDING_DIMENSIONS);
        assert_eq!(a, embedding("hello"));
        assert_ne!(a, embedding("hello!"));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        // FNV-1a of "" is the offset basis 0xcbf29ce484222325; its low byte 0x25 is 37.
        assert_eq!(embedding("")[0], (37.0 - 128.0) / 128.0);
    }

    #[test]
    fn tool_arguments_are_the_joined_fragments() {
        let joined: Value = serde_json::from_str(&TOOL_ARGUMENT_FRAGMENTS.concat()).unwrap();
        assert_eq!(joined, tool_arguments());
    }
}
