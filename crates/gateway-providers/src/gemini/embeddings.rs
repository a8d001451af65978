//! OpenAI `POST /v1/embeddings` <-> Gemini `batchEmbedContents`.
//!
//! Gemini embeds text only and reports no token usage for embeddings, so token-array inputs
//! are refused and the OpenAI `usage` is zero (with [`Translated::usage`] `None`: unknown, not
//! free). OpenAI's Python SDK asks for `encoding_format: "base64"` by default, so both
//! encodings are produced.

use super::{PROVIDER, Translated};
use bytes::Bytes;
use gateway_core::GatewayError;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Gemini's limit on requests in one `batchEmbedContents` call.
pub const MAX_EMBEDDING_INPUTS: usize = 100;

/// How the client wants each vector encoded (`encoding_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EmbeddingEncoding {
    /// A JSON array of numbers.
    #[default]
    Float,
    /// Little-endian `f32`s, base64-encoded, as OpenAI sends them.
    Base64,
}

impl EmbeddingEncoding {
    /// The `encoding_format` of an OpenAI embeddings request body (`float` when absent).
    pub fn from_request(openai_body: &Value) -> Result<Self, GatewayError> {
        match openai_body.get("encoding_format") {
            None | Some(Value::Null) => Ok(Self::Float),
            Some(Value::String(format)) if format == "float" => Ok(Self::Float),
            Some(Value::String(format)) if format == "base64" => Ok(Self::Base64),
            Some(other) => Err(GatewayError::invalid_request(
                format!("Invalid value for 'encoding_format': {other} (expected float or base64)."),
                Some("encoding_format".into()),
            )),
        }
    }
}

/// Translates an OpenAI embeddings request into a Gemini `batchEmbedContents` body for
/// `upstream_model` (with or without its `models/` prefix).
pub fn to_gemini_embeddings_request(
    openai_body: &Value,
    upstream_model: &str,
) -> Result<Value, GatewayError> {
    let Value::Object(body) = openai_body else {
        return Err(GatewayError::invalid_request(
            "The embeddings request body must be a JSON object.",
            None,
        ));
    };
    let mut dimensions = None;
    for (key, value) in body {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            // The alias; the upstream model is chosen by routing.
            "model" | "input" | "user" => {}
            "encoding_format" => {
                EmbeddingEncoding::from_request(openai_body)?;
            }
            "dimensions" => match value.as_u64().filter(|d| *d > 0) {
                Some(d) => dimensions = Some(d),
                None => {
                    return Err(GatewayError::invalid_request(
                        "'dimensions' must be a positive integer.",
                        Some("dimensions".into()),
                    ));
                }
            },
            other => {
                return Err(GatewayError::invalid_request(
                    format!("'{other}' is not supported by Gemini embedding models."),
                    Some(other.to_owned()),
                ));
            }
        }
    }

    let texts = inputs(body.get("input"))?;
    let model = if upstream_model.starts_with("models/") {
        upstream_model.to_owned()
    } else {
        format!("models/{upstream_model}")
    };
    let requests: Vec<Value> = texts
        .into_iter()
        .map(|text| {
            let mut request = Map::new();
            request.insert("model".into(), json!(model));
            request.insert("content".into(), json!({"parts": [{"text": text}]}));
            if let Some(dimensions) = dimensions {
                request.insert("outputDimensionality".into(), json!(dimensions));
            }
            Value::Object(request)
        })
        .collect();
    Ok(json!({ "requests": requests }))
}

fn inputs(input: Option<&Value>) -> Result<Vec<&str>, GatewayError> {
    let invalid =
        |message: String, param: String| GatewayError::invalid_request(message, Some(param));
    let texts: Vec<&str> = match input {
        None | Some(Value::Null) => {
            return Err(invalid("'input' is required.".into(), "input".into()));
        }
        Some(Value::String(text)) => vec![text.as_str()],
        Some(Value::Array(items)) => {
            let mut texts = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                match item {
                    Value::String(text) => texts.push(text.as_str()),
                    Value::Number(_) | Value::Array(_) => {
                        return Err(invalid(
                            "Gemini embeds text only; token arrays in 'input' are not supported."
                                .into(),
                            format!("input[{index}]"),
                        ));
                    }
                    other => {
                        return Err(invalid(
                            format!("'input[{index}]' must be a string, found `{other}`."),
                            format!("input[{index}]"),
                        ));
                    }
                }
            }
            texts
        }
        Some(other) => {
            return Err(invalid(
                format!("'input' must be a string or an array of strings, found `{other}`."),
                "input".into(),
            ));
        }
    };
    if texts.is_empty() {
        return Err(invalid("'input' must not be empty.".into(), "input".into()));
    }
    if texts.len() > MAX_EMBEDDING_INPUTS {
        return Err(invalid(
            format!(
                "Gemini embeds at most {MAX_EMBEDDING_INPUTS} inputs per request, got {}.",
                texts.len()
            ),
            "input".into(),
        ));
    }
    if let Some(index) = texts.iter().position(|text| text.is_empty()) {
        let param = if matches!(input, Some(Value::String(_))) {
            "input".to_owned()
        } else {
            format!("input[{index}]")
        };
        return Err(invalid(format!("'{param}' must not be empty."), param));
    }
    Ok(texts)
}

#[derive(Deserialize)]
struct BatchEmbedContentsResponse {
    #[serde(default)]
    embeddings: Vec<ContentEmbedding>,
}

#[derive(Deserialize)]
struct ContentEmbedding {
    #[serde(default)]
    values: Vec<f64>,
}

/// Translates a Gemini `batchEmbedContents` answer into an OpenAI embeddings list, vectors as
/// JSON numbers.
pub fn to_openai_embeddings_response(
    gemini_body: &[u8],
    model: &str,
) -> Result<Translated, GatewayError> {
    to_openai_embeddings_response_encoded(gemini_body, model, EmbeddingEncoding::Float)
}

/// [`to_openai_embeddings_response`] in the encoding the client asked for
/// ([`EmbeddingEncoding::from_request`]).
pub fn to_openai_embeddings_response_encoded(
    gemini_body: &[u8],
    model: &str,
    encoding: EmbeddingEncoding,
) -> Result<Translated, GatewayError> {
    let response: BatchEmbedContentsResponse =
        serde_json::from_slice(gemini_body).map_err(|err| GatewayError::UpstreamProtocol {
            provider: PROVIDER.into(),
            reason: format!("the Gemini response is not a BatchEmbedContentsResponse: {err}"),
        })?;
    let data: Vec<Value> = response
        .embeddings
        .iter()
        .enumerate()
        .map(|(index, embedding)| {
            let vector = match encoding {
                EmbeddingEncoding::Float => json!(embedding.values),
                EmbeddingEncoding::Base64 => Value::String(base64_f32(&embedding.values)),
            };
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    });
    let bytes = serde_json::to_vec(&body)
        .map_err(|err| GatewayError::Internal(format!("encoding the embeddings: {err}")))?;
    Ok(Translated {
        body: Bytes::from(bytes),
        usage: None,
        response_id: None,
    })
}

/// OpenAI's base64 embedding: the vector as little-endian `f32`s, standard base64 with padding.
fn base64_f32(values: &[f64]) -> String {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "narrowing to f32 is the format's definition"
    )]
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|value| (*value as f32).to_le_bytes())
        .collect();
    base64(&bytes)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b0 = group[0];
        let b1 = group.get(1).copied().unwrap_or(0);
        let b2 = group.get(2).copied().unwrap_or(0);
        let sextets = [
            b0 >> 2,
            (b0 & 0x03) << 4 | b1 >> 4,
            (b1 & 0x0f) << 2 | b2 >> 6,
            b2 & 0x3f,
        ];
        let kept = group.len() + 1;
        for (position, sextet) in sextets.into_iter().enumerate() {
            if position < kept {
                out.push(char::from(ALPHABET[usize::from(sextet)]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        // 1.0f32 is 0x3f800000, little-endian 00 00 80 3f.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
    }

    #[test]
    fn encoding_format_is_read_and_checked() {
        assert_eq!(
            EmbeddingEncoding::from_request(&json!({"encoding_format": "base64"})).unwrap(),
            EmbeddingEncoding::Base64
        );
        assert_eq!(
            EmbeddingEncoding::from_request(&json!({})).unwrap(),
            EmbeddingEncoding::Float
        );
        assert!(EmbeddingEncoding::from_request(&json!({"encoding_format": "int8"})).is_err());
        let request = json!({"model": "e", "input": "x", "encoding_format": "hex"});
        assert!(to_gemini_embeddings_request(&request, "m").is_err());
    }

    #[test]
    fn base64_response() {
        let translated = to_openai_embeddings_response_encoded(
            br#"{"embeddings":[{"values":[1.0]}]}"#,
            "emb",
            EmbeddingEncoding::Base64,
        )
        .unwrap();
        let body: Value = serde_json::from_slice(&translated.body).unwrap();
        assert_eq!(body["data"][0]["embedding"], "AACAPw==");
        assert!(translated.usage.is_none());
    }

    #[test]
    fn limits() {
        let many: Vec<String> = (0..=MAX_EMBEDDING_INPUTS).map(|i| i.to_string()).collect();
        let err = to_gemini_embeddings_request(&json!({"input": many}), "m").unwrap_err();
        assert!(err.to_string().contains("at most 100"), "{err}");
        let err = to_gemini_embeddings_request(&json!({"input": ["a", ""]}), "m").unwrap_err();
        assert!(
            matches!(err, GatewayError::InvalidRequest { param: Some(ref p), .. } if p == "input[1]")
        );
        let err = to_gemini_embeddings_request(&json!({"input": []}), "m").unwrap_err();
        assert!(
            matches!(err, GatewayError::InvalidRequest { param: Some(ref p), .. } if p == "input")
        );
        let ok = to_gemini_embeddings_request(&json!({"input": "a"}), "models/m").unwrap();
        assert_eq!(ok["requests"][0]["model"], "models/m");
    }
}
