//! OpenAI's image generation, text to speech and transcription endpoints, which the gateway
//! passes through.
//!
//! Their answers are fixed or derived from the input by documented formulas, so a test can
//! check that the gateway forwarded the bytes unchanged and accounted the usage OpenAI reports
//! (images and transcriptions report tokens; speech reports none).

use crate::behaviour::Behaviour;
use crate::reply::{Reply, ToolRequest, fnv1a, tokens_for_chars, unix_now};
use crate::server::{Body, Shared, json_response};
use crate::stream::{Script, stream_response};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;

/// A 1×1 transparent PNG, base64: every generated image. Tests compare against it.
pub const IMAGE_PNG_BASE64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAAC0lEQVR42mNgAAIAAAUAAen63NgAAAAASUVORK5CYII=";

/// What one generated image costs in output tokens (gpt-image-1, 1024×1024, medium quality).
pub(crate) const IMAGE_OUTPUT_TOKENS: u64 = 1056;
/// Input tokens of every transcription, whatever the audio: the mock does not decode audio.
pub(crate) const TRANSCRIPTION_AUDIO_TOKENS: u64 = 50;
/// Size of every speech answer.
pub(crate) const SPEECH_BYTES: usize = 1024;
/// The speech answer is sent in this many body frames, which are the "chunks" that
/// `chunk_delay_ms` and `reset_after_chunks` count.
pub(crate) const SPEECH_FRAMES: usize = 4;

/// Speech formats and the content type OpenAI answers each with.
const SPEECH_FORMATS: [(&str, &str); 6] = [
    ("mp3", "audio/mpeg"),
    ("opus", "audio/opus"),
    ("aac", "audio/aac"),
    ("flac", "audio/flac"),
    ("wav", "audio/wav"),
    ("pcm", "audio/pcm"),
];

fn str_field<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    body.get(key).and_then(Value::as_str)
}

fn unsupported(what: &str) -> Option<String> {
    Some(format!("{what} is not supported by the mock upstream."))
}

/// Why OpenAI (or the mock, for what it does not imitate) would refuse an image request.
pub(crate) fn images_refusal(body: &Value) -> Option<String> {
    if str_field(body, "prompt").is_none() {
        return Some("Missing required parameter: 'prompt'.".to_owned());
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return unsupported("Streaming image generation");
    }
    None
}

pub(crate) fn speech_refusal(body: &Value) -> Option<String> {
    if str_field(body, "input").is_none() {
        return Some("Missing required parameter: 'input'.".to_owned());
    }
    if let Some(format) = str_field(body, "response_format")
        && speech_content_type(Some(format)).is_none()
    {
        return Some(format!(
            "Invalid value: '{format}'. Supported values are: 'mp3', 'opus', 'aac', 'flac', \
             'wav', and 'pcm'."
        ));
    }
    if str_field(body, "stream_format") == Some("sse") {
        return unsupported("stream_format sse");
    }
    None
}

/// `body` is the form as recorded (see the multipart module): the file part is an object.
pub(crate) fn transcription_refusal(body: &Value) -> Option<String> {
    if !body.get("file").is_some_and(Value::is_object) {
        return Some("Missing required parameter: 'file' (one file part).".to_owned());
    }
    match str_field(body, "response_format") {
        None | Some("json" | "text") => {}
        Some(format) => return unsupported(&format!("response_format {format:?}")),
    }
    if str_field(body, "stream") == Some("true") {
        return unsupported("Streaming transcription");
    }
    None
}

/// `data` holds `n` copies (default 1, at most 10, as OpenAI allows) of the fixed PNG.
pub(crate) fn images(body: &Value) -> Response<Body> {
    let count = body
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 10);
    let prompt_tokens =
        tokens_for_chars(str_field(body, "prompt").map_or(0, |p| p.chars().count()));
    let output_tokens = IMAGE_OUTPUT_TOKENS * count;
    let data: Vec<Value> = (0..count)
        .map(|_| json!({"b64_json": IMAGE_PNG_BASE64}))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "created": unix_now(),
            "data": data,
            "usage": {
                "input_tokens": prompt_tokens,
                "output_tokens": output_tokens,
                "total_tokens": prompt_tokens + output_tokens,
                "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
            },
        }),
    )
}

fn speech_content_type(format: Option<&str>) -> Option<&'static str> {
    let format = format.unwrap_or("mp3");
    SPEECH_FORMATS
        .iter()
        .find(|(name, _)| *name == format)
        .map(|(_, content_type)| *content_type)
}

/// 1024 bytes from `input`: a 64-bit state starting at the FNV-1a hash of the text, stepped
/// by Knuth's MMIX LCG before each 8 bytes, written little-endian.
pub(crate) fn speech_bytes(input: &str) -> Vec<u8> {
    let mut state = fnv1a(input);
    (0..SPEECH_BYTES / 8)
        .flat_map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state.to_le_bytes()
        })
        .collect()
}

/// The audio in [`SPEECH_FRAMES`] frames, played like a stream so that `chunk_delay_ms` and
/// `reset_after_chunks` reach a binary body too. An in-band error has no place in audio, so
/// `stream_error_after_chunks` does not apply.
pub(crate) fn speech(shared: &Arc<Shared>, body: &Value, behaviour: &Behaviour) -> Response<Body> {
    let audio = speech_bytes(str_field(body, "input").unwrap_or_default());
    let content_type =
        speech_content_type(str_field(body, "response_format")).unwrap_or("audio/mpeg");
    let behaviour = Behaviour {
        stream_error_after_chunks: None,
        ..behaviour.clone()
    };
    let script = Script {
        billing: None,
        prelude: Vec::new(),
        content: audio
            .chunks(SPEECH_BYTES / SPEECH_FRAMES)
            .map(Bytes::copy_from_slice)
            .collect(),
        trailer: Vec::new(),
        error_event: Bytes::new(),
    };
    let mut response = stream_response(shared, script.steps(&behaviour), &behaviour);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The usual `tok0 tok1 ...` text with a fixed audio input cost, as JSON or plain text.
pub(crate) fn transcription(
    shared: &Arc<Shared>,
    n: u64,
    body: &Value,
    behaviour: &Behaviour,
) -> Response<Body> {
    let no_tools = ToolRequest {
        first_tool: None,
        last_is_tool_result: false,
        choice_none: false,
    };
    let reply = Reply::new(shared, n, behaviour, TRANSCRIPTION_AUDIO_TOKENS, no_tools);
    if str_field(body, "response_format") == Some("text") {
        let mut response = Response::new(crate::server::full_body(reply.text()));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return response;
    }
    let output_tokens = reply.completion_tokens();
    json_response(
        StatusCode::OK,
        &json!({
            "text": reply.text(),
            "usage": {
                "type": "tokens",
                "input_tokens": TRANSCRIPTION_AUDIO_TOKENS,
                "input_token_details": {
                    "audio_tokens": TRANSCRIPTION_AUDIO_TOKENS,
                    "text_tokens": 0,
                },
                "output_tokens": output_tokens,
                "total_tokens": TRANSCRIPTION_AUDIO_TOKENS + output_tokens,
            },
        }),
    )
}

/// Images and transcriptions carry directives in `prompt`, speech in `input`.
pub(crate) fn directive_carrier(body: &Value, key: &str) -> Option<String> {
    str_field(body, key).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard base64, the inverse of what OpenAI puts in `b64_json`.
    fn decode_base64(text: &str) -> Vec<u8> {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0_u32;
        let mut held = 0;
        let mut out = Vec::new();
        for byte in text.bytes().filter(|byte| *byte != b'=') {
            let value = alphabet.iter().position(|c| *c == byte).unwrap() as u32;
            bits = (bits << 6) | value;
            held += 6;
            if held >= 8 {
                held -= 8;
                out.push((bits >> held) as u8);
                bits &= (1 << held) - 1;
            }
        }
        out
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0_u32;
        for byte in bytes {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn the_image_is_a_valid_one_pixel_png() {
        let png = decode_base64(IMAGE_PNG_BASE64);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut rest = &png[8..];
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let (kind_and_data, tail) = rest[4..].split_at(4 + len);
            let crc = u32::from_be_bytes(tail[..4].try_into().unwrap());
            assert_eq!(crc, crc32(kind_and_data), "bad CRC");
            kinds.push(String::from_utf8(kind_and_data[..4].to_vec()).unwrap());
            if kinds.len() == 1 {
                assert_eq!(&kind_and_data[4..12], &[0, 0, 0, 1, 0, 0, 0, 1], "1×1");
            }
            rest = &tail[4..];
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
    }

    #[test]
    fn speech_bytes_follow_the_documented_formula() {
        let audio = speech_bytes("");
        assert_eq!(audio.len(), SPEECH_BYTES);
        let first = 0xcbf2_9ce4_8422_2325_u64
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        assert_eq!(audio[..8], first.to_le_bytes());
        assert_eq!(speech_bytes("hi"), speech_bytes("hi"));
        assert_ne!(speech_bytes("hi"), speech_bytes("ho"));
    }

    #[test]
    fn refusals() {
        assert!(images_refusal(&json!({"prompt": "a cat"})).is_none());
        assert!(images_refusal(&json!({"prompt": 1})).is_some());
        assert!(images_refusal(&json!({"prompt": "a", "stream": true})).is_some());
        assert!(speech_refusal(&json!({"input": "hi", "response_format": "wav"})).is_none());
        assert!(speech_refusal(&json!({"input": "hi", "response_format": "ogg"})).is_some());
        assert!(speech_refusal(&json!({"voice": "alloy"})).is_some());
        let file = json!({"filename": "a.mp3", "bytes": 3});
        assert!(transcription_refusal(&json!({"file": file})).is_none());
        assert!(transcription_refusal(&json!({"file": file, "response_format": "text"})).is_none());
        assert!(transcription_refusal(&json!({"file": "text field"})).is_some());
        assert!(transcription_refusal(&json!({"file": [file, file]})).is_some());
        assert!(transcription_refusal(&json!({"file": file, "response_format": "srt"})).is_some());
        assert!(transcription_refusal(&json!({"file": file, "stream": "true"})).is_some());
    }
}
