//! The OpenAI wire model: what clients send and what the gateway answers.
//!
//! Fields the gateway acts on are typed (so a wrong type is a 400 naming the field); every other
//! field is kept in `extra` and forwarded unchanged, so new vendor parameters work without a
//! gateway release.

use crate::error::GatewayError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatCompletionRequest {
    /// Parses and validates a request body. Errors name the offending field, as OpenAI does.
    pub fn from_json(body: &[u8]) -> Result<Self, GatewayError> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let request: Self = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let (message, param) = if inner.is_syntax() || inner.is_eof() || path == "." {
                (
                    format!("We could not parse the JSON body of your request: {inner}"),
                    None,
                )
            } else {
                (format!("Invalid value for '{path}': {inner}"), Some(path))
            };
            GatewayError::invalid_request(message, param)
        })?;
        deserializer.end().map_err(|err| {
            GatewayError::invalid_request(
                format!("We could not parse the JSON body of your request: {err}"),
                None,
            )
        })?;
        request.validate()?;
        Ok(request)
    }

    fn validate(&self) -> Result<(), GatewayError> {
        if self.model.is_empty() {
            return Err(GatewayError::invalid_request(
                "'model' must not be empty.",
                Some("model".into()),
            ));
        }
        if self.messages.is_empty() {
            return Err(GatewayError::invalid_request(
                "'messages' must contain at least one message.",
                Some("messages".into()),
            ));
        }
        Ok(())
    }

    /// A rough prompt size (about four characters a token plus OpenAI's per-message framing),
    /// used only when a vendor reports no usage.
    pub fn estimate_prompt_tokens(&self) -> u64 {
        self.messages
            .iter()
            .map(|message| {
                let chars = message
                    .content
                    .as_ref()
                    .map_or(0, |content| content.text().chars().count());
                (chars as u64).div_ceil(4) + 4
            })
            .sum()
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the client itself asked for the final usage chunk of a stream.
    pub fn client_wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|options| options.include_usage)
            .unwrap_or(false)
    }
}

/// Chat-completion parameters of OpenAI's own API beyond the typed fields of
/// [`ChatCompletionRequest`]. Any other top-level field is a vendor extension, forwarded only to
/// providers whose config allows it.
pub const OPENAI_CHAT_PARAMS: &[&str] = &[
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "metadata",
    "modalities",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "store",
    "tool_choice",
    "tools",
    "top_logprobs",
    "verbosity",
    "web_search_options",
];

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text of the message, parts joined; images and other parts are skipped.
    pub fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|part| part.text.as_deref())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ContentPart {
    pub r#type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Token usage as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
            completion_tokens_details: None,
        }
    }

    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .and_then(|details| details.cached_tokens)
            .unwrap_or(0)
    }

    pub fn cache_write_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .and_then(|details| details.cache_write_tokens)
            .unwrap_or(0)
    }

    pub fn reasoning_tokens(&self) -> u64 {
        self.completion_tokens_details
            .and_then(|details| details.reasoning_tokens)
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens read from the vendor's cache (billed at the cached-input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Prompt tokens written to the vendor's cache (Anthropic's `cache_creation_input_tokens`,
    /// billed at the cache-write price). Not an OpenAI field; OpenAI clients ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct CompletionTokensDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
}

/// The few fields of a completion (or of one stream chunk) the gateway reads; everything else
/// in the vendor's body is skipped without being materialised.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionSummary {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub choices: Option<Vec<serde::de::IgnoredAny>>,
}

impl CompletionSummary {
    pub fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }

    /// The usage-only chunk OpenAI sends last when `stream_options.include_usage` is set.
    pub fn is_usage_only_chunk(&self) -> bool {
        self.usage.is_some() && self.choices.as_ref().is_some_and(Vec::is_empty)
    }
}

/// `POST /v1/embeddings` request. `input` is typed so that a malformed one is a 400 naming it;
/// everything else (`encoding_format`, `dimensions`, `user`, ...) is forwarded as it is.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

impl EmbeddingsRequest {
    pub fn from_json(body: &[u8]) -> Result<Self, GatewayError> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let request: Self = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() || path == "." {
                GatewayError::invalid_request(
                    format!("We could not parse the JSON body of your request: {inner}"),
                    None,
                )
            } else {
                GatewayError::invalid_request(
                    format!(
                        "Invalid value for '{path}': expected a string, an array of strings, or \
                         an array of token arrays ({inner})"
                    ),
                    Some(path),
                )
            }
        })?;
        let empty = match &request.input {
            EmbeddingInput::Text(text) => text.is_empty(),
            EmbeddingInput::Texts(texts) => texts.is_empty() || texts.iter().any(String::is_empty),
            EmbeddingInput::Tokens(tokens) => tokens.is_empty(),
            EmbeddingInput::TokenBatches(batches) => {
                batches.is_empty() || batches.iter().any(Vec::is_empty)
            }
        };
        if empty {
            return Err(GatewayError::invalid_request(
                "'input' must not be empty.",
                Some("input".into()),
            ));
        }
        if request.model.is_empty() {
            return Err(GatewayError::invalid_request(
                "'model' must not be empty.",
                Some("model".into()),
            ));
        }
        Ok(request)
    }

    /// Input size in tokens, roughly, for when a vendor reports no usage.
    pub fn estimate_prompt_tokens(&self) -> u64 {
        match &self.input {
            EmbeddingInput::Text(text) => (text.chars().count() as u64).div_ceil(4),
            EmbeddingInput::Texts(texts) => texts
                .iter()
                .map(|text| (text.chars().count() as u64).div_ceil(4))
                .sum(),
            EmbeddingInput::Tokens(tokens) => tokens.len() as u64,
            EmbeddingInput::TokenBatches(batches) => batches.iter().map(|b| b.len() as u64).sum(),
        }
    }
}

/// Characters of content in one `chat.completion.chunk` (all choices), read without
/// materialising the rest of the chunk. Used to estimate output tokens.
pub fn delta_content_chars(chunk: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct Chunk<'a> {
        #[serde(default, borrow)]
        choices: Vec<Choice<'a>>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(default, borrow)]
        delta: Option<Delta<'a>>,
    }
    #[derive(Deserialize)]
    struct Delta<'a> {
        #[serde(default, borrow)]
        content: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Chunk<'_>>(chunk).map_or(0, |chunk| {
        chunk
            .choices
            .iter()
            .filter_map(|choice| choice.delta.as_ref()?.content.as_ref())
            .map(|text| text.chars().count() as u64)
            .sum()
    })
}

/// `GET /v1/models` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let body = br#"{"model":"chat","messages":[{"role":"user","content":"hi","x_custom":1}],
            "provider":{"order":["a"]},"seed":7}"#;
        let request = ChatCompletionRequest::from_json(body).unwrap();
        let out = serde_json::to_value(&request).unwrap();
        assert_eq!(out["provider"]["order"][0], "a");
        assert_eq!(out["seed"], 7);
        assert_eq!(out["messages"][0]["x_custom"], 1);
        assert!(out.get("stream").is_none());
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err =
            ChatCompletionRequest::from_json(br#"{"model":"chat","messages":"hi"}"#).unwrap_err();
        match err {
            GatewayError::InvalidRequest { param, message } => {
                assert_eq!(param.as_deref(), Some("messages"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = ChatCompletionRequest::from_json(
            br#"{"model":"chat","messages":[{"role":"wizard","content":"x"}]}"#,
        )
        .unwrap_err();
        match err {
            GatewayError::InvalidRequest { param, .. } => {
                assert_eq!(param.as_deref(), Some("messages[0].role"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = ChatCompletionRequest::from_json(
            br#"{"model":"chat","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(err, GatewayError::InvalidRequest { param: Some(ref p), .. } if p == "max_tokens")
        );
    }

    #[test]
    fn missing_and_malformed() {
        let err = ChatCompletionRequest::from_json(br#"{"messages":[]}"#).unwrap_err();
        assert!(err.to_string().contains("model"), "{err}");
        let err = ChatCompletionRequest::from_json(b"{not json").unwrap_err();
        assert!(matches!(
            err,
            GatewayError::InvalidRequest { param: None, .. }
        ));
        let err =
            ChatCompletionRequest::from_json(br#"{"model":"chat","messages":[]}"#).unwrap_err();
        assert!(
            matches!(err, GatewayError::InvalidRequest { param: Some(ref p), .. } if p == "messages")
        );
        let err = ChatCompletionRequest::from_json(
            br#"{"model":"c","messages":[{"role":"user","content":"x"}]} trailing"#,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            GatewayError::InvalidRequest { param: None, .. }
        ));
    }

    #[test]
    fn usage_only_chunk_is_recognised() {
        let chunk = CompletionSummary::parse(
            br#"{"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#,
        )
        .unwrap();
        assert!(chunk.is_usage_only_chunk());
        assert_eq!(chunk.usage.unwrap().completion_tokens, 5);
        let content = CompletionSummary::parse(
            br#"{"id":"c1","choices":[{"delta":{"content":"hi"}}],"usage":null}"#,
        )
        .unwrap();
        assert!(!content.is_usage_only_chunk());
    }

    #[test]
    fn embeddings_input_is_validated() {
        for ok in [
            r#"{"model":"e","input":"hi"}"#,
            r#"{"model":"e","input":["a","b"],"dimensions":8}"#,
            r#"{"model":"e","input":[1,2,3]}"#,
            r#"{"model":"e","input":[[1],[2,3]]}"#,
        ] {
            EmbeddingsRequest::from_json(ok.as_bytes()).unwrap();
        }
        for (bad, param) in [
            (r#"{"model":"e","input":""}"#, Some("input")),
            (r#"{"model":"e","input":[]}"#, Some("input")),
            (r#"{"model":"e","input":{"x":1}}"#, Some("input")),
            (r#"{"input":"x"}"#, None),
        ] {
            match EmbeddingsRequest::from_json(bad.as_bytes()).unwrap_err() {
                GatewayError::InvalidRequest { param: got, .. } => {
                    assert_eq!(got.as_deref(), param, "{bad}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let request =
            EmbeddingsRequest::from_json(br#"{"model":"e","input":["abcd","ef"]}"#).unwrap();
        assert_eq!(request.estimate_prompt_tokens(), 2);
    }

    #[test]
    fn counts_streamed_content() {
        assert_eq!(
            delta_content_chars(br#"{"choices":[{"index":0,"delta":{"content":"h\u00e9llo"}}]}"#),
            5
        );
        assert_eq!(
            delta_content_chars(br#"{"choices":[{"delta":{"role":"assistant"}}]}"#),
            0
        );
        assert_eq!(delta_content_chars(b"[DONE]"), 0);
    }

    #[test]
    fn usage_details() {
        let usage: Usage = serde_json::from_str(
            r#"{"prompt_tokens":10,"completion_tokens":4,"total_tokens":14,
               "prompt_tokens_details":{"cached_tokens":6},"completion_tokens_details":{"reasoning_tokens":2}}"#,
        )
        .unwrap();
        assert_eq!(usage.cached_tokens(), 6);
        assert_eq!(usage.reasoning_tokens(), 2);
    }
}
