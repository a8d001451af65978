//! Prompt and response capture: off unless a project opts in, redacted, bounded, and logged
//! as its own event (target `gateway::capture`), never in the access log line.
//!
//! The access log has a fixed set of fields so that it can be shipped anywhere; captured text
//! is content a project chose to have logged, so it goes to a target an operator can route to
//! a store with the right retention (or filter out). Secrets are replaced by `[REDACTED]`
//! before anything is written: built-in patterns for common key formats, plus the operator's
//! `[observability] redact_patterns`. Redaction runs on the whole text before it is cut to
//! `capture_max_bytes`, so a secret straddling the cut cannot survive in half.

use crate::config::ObservabilityConfig;
use gateway_core::config::ConfigError;
use regex::{NoExpand, Regex};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;

/// The log target of captured text.
pub const CAPTURE_TARGET: &str = "gateway::capture";

/// What replaces a secret in captured text.
pub const REDACTED: &str = "[REDACTED]";

/// Secrets that are redacted whatever the config says.
const BUILT_IN_PATTERNS: [&str; 7] = [
    // OpenAI (`sk-`, `sk-proj-`), Anthropic (`sk-ant-`) and the gateway's own keys (`gw-`,
    // `gw_`), and keys in the same prefix-dash-token shape.
    r"\b(?:sk|gw|gwk|rk|pk)[-_][A-Za-z0-9_\-]{16,}",
    // Any bearer token, whatever its format.
    r"(?i)\bbearer\s+[A-Za-z0-9._~+/\-]+=*",
    // AWS access key ids.
    r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b",
    // AWS secret access keys, when named.
    r#"(?i)aws_?secret_?access_?key["']?\s*[:=]\s*["']?[A-Za-z0-9/+=]{40}"#,
    // Google API keys.
    r"\bAIza[0-9A-Za-z_\-]{35}\b",
    // GitHub tokens.
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
    // Slack tokens.
    r"\bxox[abposr]-[A-Za-z0-9\-]{10,}",
];

/// Replaces secrets in text: the built-in patterns and the configured ones, as one regex.
#[derive(Debug, Clone)]
pub struct Redactor {
    pattern: Regex,
}

impl Redactor {
    /// `extra` are the operator's patterns; each invalid one is reported with its index.
    pub fn new(extra: &[String]) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        for (index, pattern) in extra.iter().enumerate() {
            if let Err(err) = Regex::new(pattern) {
                errors.push(ConfigError::new(
                    format!("observability.redact_patterns[{index}]"),
                    format!("not a valid regular expression: {err}"),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let joined = BUILT_IN_PATTERNS
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .map(|pattern| format!("(?:{pattern})"))
            .collect::<Vec<_>>()
            .join("|");
        Regex::new(&joined)
            .map(|pattern| Self { pattern })
            .map_err(|err| {
                vec![ConfigError::new(
                    "observability.redact_patterns",
                    format!("the patterns together are too large: {err}"),
                )]
            })
    }

    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        self.pattern.replace_all(text, NoExpand(REDACTED))
    }
}

/// What one project lets the gateway log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProjectCapture {
    pub prompts: bool,
    pub responses: bool,
}

impl ProjectCapture {
    pub fn any(self) -> bool {
        self.prompts || self.responses
    }
}

/// The capture settings of one config version: which projects opted in, the redactor and the
/// size bound.
#[derive(Debug)]
pub struct CapturePolicy {
    redactor: Redactor,
    max_bytes: usize,
    projects: HashMap<String, ProjectCapture>,
}

/// The facts a capture event is labelled with.
#[derive(Debug, Clone, Copy)]
pub struct CaptureLabels<'a> {
    pub request_id: gateway_core::RequestId,
    pub project: &'a str,
    pub alias: Option<&'a str>,
    pub status: u16,
}

impl CapturePolicy {
    pub fn build<'a>(
        config: &ObservabilityConfig,
        projects: impl IntoIterator<Item = (&'a str, ProjectCapture)>,
    ) -> Result<Self, Vec<ConfigError>> {
        let redactor = Redactor::new(&config.redact_patterns)?;
        Ok(Self {
            redactor,
            max_bytes: config.capture_max_bytes,
            projects: projects
                .into_iter()
                .filter(|(_, capture)| capture.any())
                .map(|(name, capture)| (name.to_owned(), capture))
                .collect(),
        })
    }

    /// What `project` opted into; nothing for a project the config does not name.
    pub fn for_project(&self, project: &str) -> ProjectCapture {
        if self.projects.is_empty() {
            return ProjectCapture::default();
        }
        self.projects.get(project).copied().unwrap_or_default()
    }

    /// A new accumulator for a response body, bounded by this policy.
    pub fn response_text(&self) -> ResponseText {
        ResponseText::new(self.max_bytes)
    }

    /// Logs one request's captured text (either may be absent), redacted and truncated.
    /// `response` comes with whether [`ResponseText`] already left some out.
    pub fn emit(
        &self,
        labels: CaptureLabels<'_>,
        prompt: Option<&str>,
        response: Option<(&str, bool)>,
    ) {
        let prompt = prompt.map(|text| self.prepare(text));
        let response = response.map(|(text, cut_before)| {
            let (text, cut) = self.prepare(text);
            (text, cut || cut_before)
        });
        tracing::info!(
            target: CAPTURE_TARGET,
            request_id = %labels.request_id,
            project = labels.project,
            alias = labels.alias,
            status = labels.status,
            prompt = prompt.as_ref().map(|(text, _)| text.as_str()),
            prompt_truncated = prompt.as_ref().map(|(_, cut)| *cut),
            response = response.as_ref().map(|(text, _)| text.as_str()),
            response_truncated = response.as_ref().map(|(_, cut)| *cut),
            "captured"
        );
    }

    /// Redacted, then cut to `max_bytes` on a character boundary; `true` if it was cut.
    fn prepare(&self, text: &str) -> (String, bool) {
        let redacted = self.redactor.redact(text);
        let cut = redacted.floor_char_boundary(self.max_bytes);
        (redacted[..cut].to_owned(), cut < redacted.len())
    }
}

/// The conversation part of a request body, as the client sent it: OpenAI's `messages`,
/// Anthropic's `system` and `messages`, the Responses API's `instructions` and `input`, or a
/// completion `prompt`. The whole body when it has none of these (or is not JSON).
pub fn prompt_text(body: &[u8]) -> Cow<'_, str> {
    #[derive(Deserialize)]
    struct Fields<'a> {
        #[serde(borrow, default)]
        system: Option<&'a RawValue>,
        #[serde(borrow, default)]
        instructions: Option<&'a RawValue>,
        #[serde(borrow, default)]
        messages: Option<&'a RawValue>,
        #[serde(borrow, default)]
        input: Option<&'a RawValue>,
        #[serde(borrow, default)]
        prompt: Option<&'a RawValue>,
    }
    let Ok(fields) = serde_json::from_slice::<Fields<'_>>(body) else {
        return String::from_utf8_lossy(body);
    };
    let parts: Vec<&str> = [
        fields.system,
        fields.instructions,
        fields.messages,
        fields.input,
        fields.prompt,
    ]
    .into_iter()
    .flatten()
    .map(RawValue::get)
    .collect();
    if parts.is_empty() {
        String::from_utf8_lossy(body)
    } else {
        Cow::Owned(parts.join("\n"))
    }
}

/// Collects the text of a response as it streams to the client: the content deltas of an SSE
/// stream (OpenAI's `choices[].delta.content`, Anthropic's `delta.text`), or the content of a
/// complete JSON answer. Holds at most a few times `max_bytes`, so a long answer costs bounded
/// memory; the rest is counted as cut.
#[derive(Debug)]
pub struct ResponseText {
    max_bytes: usize,
    /// The complete text so far (SSE), or the raw body (JSON).
    text: String,
    raw: Vec<u8>,
    /// An SSE line not yet complete.
    partial: Vec<u8>,
    stream: Option<bool>,
    cut: bool,
}

impl ResponseText {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            text: String::new(),
            raw: Vec::new(),
            partial: Vec::new(),
            stream: None,
            cut: false,
        }
    }

    /// Raw JSON is kept until the end to be parsed whole; beyond this it is only counted.
    fn raw_limit(&self) -> usize {
        self.max_bytes.saturating_mul(4).max(64 * 1024)
    }

    /// `event_stream`: the response is `text/event-stream`.
    pub fn set_stream(&mut self, event_stream: bool) {
        self.stream = Some(event_stream);
    }

    pub fn push(&mut self, chunk: &[u8]) {
        if self.stream == Some(true) {
            self.push_sse(chunk);
        } else if self.raw.len() + chunk.len() <= self.raw_limit() {
            self.raw.extend_from_slice(chunk);
        } else {
            self.cut = true;
        }
    }

    fn push_sse(&mut self, chunk: &[u8]) {
        self.partial.extend_from_slice(chunk);
        let Some(last_newline) = self.partial.iter().rposition(|&byte| byte == b'\n') else {
            if self.partial.len() > self.raw_limit() {
                // One line this long is no event a client reads; stop holding it.
                self.partial.clear();
                self.cut = true;
            }
            return;
        };
        let rest = self.partial.split_off(last_newline + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        for line in complete.split(|&byte| byte == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            if let Some(delta) = sse_delta_text(data.trim_ascii()) {
                self.append(&delta);
            }
        }
    }

    fn append(&mut self, text: &str) {
        if self.text.len() + text.len() <= self.max_bytes {
            self.text.push_str(text);
        } else {
            let room = self.max_bytes.saturating_sub(self.text.len());
            let cut = text.floor_char_boundary(room);
            self.text.push_str(&text[..cut]);
            self.cut = true;
        }
    }

    /// The text collected: the assembled stream, or the content of the JSON answer (its raw
    /// body when it has no content field, an error body for instance); and whether some was
    /// left out for size.
    pub fn finish(mut self) -> (String, bool) {
        if self.stream == Some(true) {
            let partial = std::mem::take(&mut self.partial);
            if let Some(data) = partial.strip_prefix(b"data:")
                && let Some(delta) = sse_delta_text(data.trim_ascii())
            {
                self.append(&delta);
            }
            return (self.text, self.cut);
        }
        let text = complete_text(&self.raw)
            .unwrap_or_else(|| String::from_utf8_lossy(&self.raw).into_owned());
        (text, self.cut)
    }
}

/// The text of one SSE event's data: OpenAI chat deltas, Anthropic text deltas, or the
/// Responses API's `output_text` deltas.
fn sse_delta_text(data: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Event {
        #[serde(default)]
        choices: Vec<Choice>,
        #[serde(default)]
        delta: Option<Delta>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
    }
    #[derive(Deserialize)]
    struct Choice {
        #[serde(default)]
        delta: Option<Delta>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Delta {
        Object {
            #[serde(default)]
            content: Option<String>,
            #[serde(default)]
            text: Option<String>,
        },
        Text(String),
    }
    impl Delta {
        fn text(self) -> Option<String> {
            match self {
                Self::Object { content, text } => content.or(text),
                Self::Text(text) => Some(text),
            }
        }
    }
    if data == b"[DONE]" || data.is_empty() {
        return None;
    }
    let event: Event = serde_json::from_slice(data).ok()?;
    let mut text = String::new();
    for choice in event.choices {
        if let Some(delta) = choice.delta.and_then(Delta::text) {
            text.push_str(&delta);
        }
    }
    let own_delta = match event.kind.as_deref() {
        Some("content_block_delta" | "response.output_text.delta") | None => event.delta,
        _ => None,
    };
    if let Some(delta) = own_delta.and_then(Delta::text) {
        text.push_str(&delta);
    }
    (!text.is_empty()).then_some(text)
}

/// The content of a complete answer: OpenAI's `choices[].message.content`, Anthropic's
/// `content[].text`.
fn complete_text(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        choices: Vec<Choice>,
        #[serde(default)]
        content: Option<Vec<Block>>,
    }
    #[derive(Deserialize)]
    struct Choice {
        #[serde(default)]
        message: Option<Message>,
    }
    #[derive(Deserialize)]
    struct Message {
        #[serde(default)]
        content: Option<String>,
    }
    #[derive(Deserialize)]
    struct Block {
        #[serde(default)]
        text: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    let mut parts: Vec<String> = answer
        .choices
        .into_iter()
        .filter_map(|choice| choice.message.and_then(|message| message.content))
        .collect();
    parts.extend(
        answer
            .content
            .into_iter()
            .flatten()
            .filter_map(|block| block.text),
    );
    (!parts.is_empty()).then(|| parts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(extra: &[&str]) -> Redactor {
        Redactor::new(&extra.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn built_in_patterns_redact_common_secrets() {
        let redactor = redactor(&[]);
        for secret in [
            "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
            "sk-ant-api03-abcdefghijklmnopqrstuv",
            "gw-0123456789abcdef0123456789",
            "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
            "AKIAIOSFODNN7EXAMPLE",
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "AIzaSyA-abcdefghijklmnopqrstuvwxyz01234",
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        ] {
            let text = format!("my key is {secret} ok");
            let redacted = redactor.redact(&text);
            assert!(!redacted.contains(secret), "{secret} survived: {redacted}");
            assert!(redacted.contains(REDACTED), "{redacted}");
            assert!(redacted.starts_with("my key is ") && redacted.ends_with(" ok"));
        }
        assert_eq!(
            redactor.redact("nothing secret here, skill-set"),
            "nothing secret here, skill-set"
        );
    }

    #[test]
    fn configured_patterns_are_added_and_invalid_ones_reported() {
        let redactor = redactor(&[r"\b\d{3}-\d{2}-\d{4}\b"]);
        assert_eq!(redactor.redact("ssn 123-45-6789."), "ssn [REDACTED].");
        let errors = Redactor::new(&["ok".into(), "(unclosed".into()]).unwrap_err();
        assert_eq!(errors[0].path, "observability.redact_patterns[1]");
    }

    #[test]
    fn projects_opt_in_and_unknown_ones_capture_nothing() {
        let config = ObservabilityConfig::default();
        let policy = CapturePolicy::build(
            &config,
            [
                (
                    "on",
                    ProjectCapture {
                        prompts: true,
                        responses: false,
                    },
                ),
                ("off", ProjectCapture::default()),
            ],
        )
        .unwrap();
        assert!(policy.for_project("on").prompts);
        assert!(!policy.for_project("on").responses);
        assert!(!policy.for_project("off").any());
        assert!(!policy.for_project("nobody").any());
    }

    #[test]
    fn prepare_redacts_before_cutting_on_a_char_boundary() {
        let config = ObservabilityConfig {
            capture_max_bytes: 12,
            ..ObservabilityConfig::default()
        };
        let policy = CapturePolicy::build(&config, []).unwrap();
        let (text, cut) = policy.prepare("ab sk-abcdefghijklmnopqrstuvwxyz");
        assert_eq!(text, "ab [REDACTED");
        assert!(cut);
        let (text, cut) = policy.prepare("ééééééé");
        assert_eq!(text, "éééééé");
        assert!(cut);
    }

    #[test]
    fn prompt_text_takes_the_conversation() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":1}"#;
        assert_eq!(prompt_text(body), r#"[{"role":"user","content":"hi"}]"#);
        let anthropic = br#"{"model":"m","system":"be brief","messages":[]}"#;
        assert_eq!(prompt_text(anthropic), "\"be brief\"\n[]");
        assert_eq!(prompt_text(b"not json"), "not json");
    }

    #[test]
    fn streamed_text_is_assembled_across_split_chunks() {
        let mut text = ResponseText::new(1024);
        text.set_stream(true);
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n",
            "data: [DONE]\n\n",
        );
        for chunk in stream.as_bytes().chunks(7) {
            text.push(chunk);
        }
        assert_eq!(text.finish(), ("Hello!".to_owned(), false));
    }

    #[test]
    fn streamed_text_is_bounded() {
        let mut text = ResponseText::new(4);
        text.set_stream(true);
        for _ in 0..100 {
            text.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"abc\"}}]}\n\n");
        }
        assert_eq!(text.finish(), ("abca".to_owned(), true));
    }

    #[test]
    fn complete_answers_give_their_content() {
        let mut text = ResponseText::new(1024);
        text.set_stream(false);
        text.push(br#"{"choices":[{"message":{"role":"assistant","content":"Hi there"}}]}"#);
        assert_eq!(text.finish().0, "Hi there");
        let mut text = ResponseText::new(1024);
        text.push(br#"{"error":{"message":"nope"}}"#);
        assert_eq!(text.finish().0, r#"{"error":{"message":"nope"}}"#);
    }
}
