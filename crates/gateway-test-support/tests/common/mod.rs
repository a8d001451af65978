//! Helpers shared by the per-format tests: reading SSE bodies as a client would, waiting for
//! stats, and the documented formulas computed independently of the mock.
// Each test crate uses a different subset; `cfg(test)` puts the helpers under clippy's
// allow-unwrap-in-tests, like the tests they serve.
#![cfg(test)]
#![allow(dead_code)]

use futures_util::StreamExt;
use gateway_test_support::{MockStats, MockUpstream};
use serde_json::Value;
use std::time::{Duration, Instant};

/// One server-sent event: its `event:` name (if any) and its `data:` payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.data))
    }
}

/// Reads a whole SSE body, returning its events and the body frames they arrived in.
pub async fn read_sse(response: reqwest::Response) -> (Vec<Event>, Vec<String>) {
    let mut frames = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(frame) = stream.next().await {
        frames.push(String::from_utf8(frame.unwrap().to_vec()).unwrap());
    }
    let events = frames
        .concat()
        .split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let mut name = None;
            let mut data = None;
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "one data line per event: {event:?}");
                    data = Some(value.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?} in {event:?}");
                }
            }
            Event {
                name,
                data: data.unwrap_or_else(|| panic!("no data in {event:?}")),
            }
        })
        .collect();
    (events, frames)
}

/// Stats change when the server notices something; give it a moment.
pub async fn wait_for_stats(
    upstream: &MockUpstream,
    done: impl Fn(&MockStats) -> bool,
) -> MockStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = upstream.stats();
        if done(&stats) || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `ceil(chars / 4) + 1`, the documented prompt token formula.
pub fn prompt_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4) + 1
}

/// The documented embedding: byte `j` (least significant first) of the 64-bit FNV-1a hash of
/// the text, as `(byte - 128) / 128`.
pub fn expected_embedding(text: &str) -> Vec<f64> {
    let mut hash: u64 = 0xcbf29ce484222325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    (0..8)
        .map(|j| ((hash >> (8 * j)) & 0xff) as f64 / 128.0 - 1.0)
        .collect()
}

/// The embedding vector as the JSON a test compares with.
pub fn embedding_json(text: &str) -> Value {
    serde_json::json!(expected_embedding(text))
}
