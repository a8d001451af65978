//! Anthropic Messages request -> the canonical OpenAI chat completion request.
//!
//! `system` becomes a leading system message, `tool_result` blocks become `tool` messages
//! (placed before the rest of their user turn, as OpenAI wants tool answers right after the
//! assistant's calls), `tool_use` blocks become `tool_calls`, and `max_tokens` becomes
//! `max_completion_tokens`, which OpenAI's reasoning models require. Fields with no OpenAI
//! counterpart (`top_k`, ...) are kept in `extra` and forwarded like any unknown field
//! (`thinking` becomes `reasoning_effort`, `context_management` is left out); `cache_control` markers stay on their content parts and tools so a request routed
//! back to Anthropic keeps its prompt caching.

use crate::anthropic::{invalid, join_path, parse_at};
use gateway_core::GatewayError;
use gateway_core::openai::{
    ChatCompletionRequest, ChatMessage, ContentPart, MessageContent, Role, Stop, StreamOptions,
};
use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};
use std::marker::PhantomData;

/// Anthropic's content: a string, or a list of blocks.
enum Content<T> {
    Text(String),
    Blocks(Vec<T>),
}

/// Written by hand rather than `#[serde(untagged)]` so an error inside a block keeps its path
/// (`messages[0].content[2]`) instead of "did not match any variant".
impl<'de, T: Deserialize<'de>> Deserialize<'de> for Content<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ContentVisitor<T> {
            type Value = Content<T>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a string or a list of content blocks")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Content::Text(text.to_owned()))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(Content::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut blocks = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(block) = seq.next_element()? {
                    blocks.push(block);
                }
                Ok(Content::Blocks(blocks))
            }
        }

        deserializer.deserialize_any(ContentVisitor(PhantomData))
    }
}

#[derive(Deserialize)]
struct Message {
    role: MessageRole,
    /// Blocks stay JSON until [`parse_block`] reads them, so an error deep inside one (an
    /// image's `source.data`) keeps its full path: serde's tagged enums buffer their input
    /// and lose it.
    content: Content<Value>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum MessageRole {
    User,
    Assistant,
    /// A system turn in the conversation (Claude Code sends these with a beta), not only the
    /// top-level `system`.
    System,
}

enum Block {
    Text(TextBlock),
    Image(ImageBlock),
    Document(DocumentBlock),
    ToolUse(ToolUseBlock),
    ToolResult(ToolResultBlock),
    Thinking,
}

#[derive(Deserialize)]
struct TextBlock {
    text: String,
    #[serde(default)]
    cache_control: Option<Value>,
}

#[derive(Deserialize)]
struct ImageBlock {
    source: Source,
    #[serde(default)]
    cache_control: Option<Value>,
}

#[derive(Deserialize)]
struct DocumentBlock {
    source: Source,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    cache_control: Option<Value>,
}

#[derive(Deserialize)]
struct ToolUseBlock {
    id: String,
    name: String,
    #[serde(default)]
    input: Value,
}

#[derive(Deserialize)]
struct ToolResultBlock {
    tool_use_id: String,
    #[serde(default)]
    content: Option<Content<Value>>,
}

fn parse_block(value: &Value, at: &str) -> Result<Block, GatewayError> {
    let kind = value.get("type").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            &format!("{at}.type"),
            format!("'{at}.type' must be a string."),
        )
    })?;
    Ok(match kind {
        "text" => Block::Text(parse_at(value, at)?),
        "image" => Block::Image(parse_at(value, at)?),
        "document" => Block::Document(parse_at(value, at)?),
        "tool_use" => Block::ToolUse(parse_at(value, at)?),
        "tool_result" => Block::ToolResult(parse_at(value, at)?),
        "thinking" | "redacted_thinking" => Block::Thinking,
        other => {
            return Err(invalid(
                &format!("{at}.type"),
                format!("Content blocks of type '{other}' are not supported by this endpoint."),
            ));
        }
    })
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Source {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Deserialize)]
struct SystemBlock {
    r#type: String,
    text: String,
    #[serde(default)]
    cache_control: Option<Value>,
}

#[derive(Deserialize)]
struct Tool {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
    #[serde(default)]
    cache_control: Option<Value>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToolChoice {
    Auto {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    Any {
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    Tool {
        name: String,
        #[serde(default)]
        disable_parallel_tool_use: Option<bool>,
    },
    None {},
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    user_id: Option<String>,
}

/// Parses an Anthropic Messages request body into the canonical OpenAI request. Errors are
/// 400s naming the offending field.
pub fn from_anthropic_request(body: &[u8]) -> Result<ChatCompletionRequest, GatewayError> {
    let mut fields: Map<String, Value> = serde_json::from_slice(body).map_err(|err| {
        GatewayError::invalid_request(
            format!("We could not parse the JSON body of your request: {err}"),
            None,
        )
    })?;
    let model: String = required(&mut fields, "model")?;
    if model.is_empty() {
        return Err(invalid("model", "'model' must not be empty."));
    }
    let max_tokens: u32 = required(&mut fields, "max_tokens")?;
    let anthropic_messages: Vec<Message> = required(&mut fields, "messages")?;
    if anthropic_messages.is_empty() {
        return Err(invalid(
            "messages",
            "'messages' must contain at least one message.",
        ));
    }

    let mut messages = Vec::new();
    if let Some(system) = take::<Content<SystemBlock>>(&mut fields, "system")?
        && let Some(content) = system_content(system)?
    {
        messages.push(message(Role::System, Some(content), Map::new()));
    }
    for (index, anthropic) in anthropic_messages.into_iter().enumerate() {
        let at = format!("messages[{index}]");
        match anthropic.role {
            MessageRole::User => user_messages(anthropic.content, &at, &mut messages)?,
            MessageRole::Assistant => messages.push(assistant_message(anthropic.content, &at)?),
            MessageRole::System => {
                let content = match anthropic.content {
                    Content::Text(text) => Content::Text(text),
                    Content::Blocks(blocks) => Content::Blocks(
                        blocks
                            .into_iter()
                            .enumerate()
                            .map(|(block_index, block)| {
                                serde_json::from_value::<SystemBlock>(block).map_err(|err| {
                                    invalid(
                                        &format!("{at}.content[{block_index}]"),
                                        format!("A system turn may only hold text blocks: {err}"),
                                    )
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                    ),
                };
                if let Some(content) = system_content(content)? {
                    messages.push(message(Role::System, Some(content), Map::new()));
                }
            }
        }
    }

    let mut extra = Map::new();
    if let Some(tools) = take::<Vec<Tool>>(&mut fields, "tools")? {
        extra.insert("tools".into(), convert_tools(tools)?);
    }
    if let Some(choice) = take::<ToolChoice>(&mut fields, "tool_choice")? {
        let (choice, disable_parallel) = convert_tool_choice(choice);
        extra.insert("tool_choice".into(), choice);
        if disable_parallel {
            extra.insert("parallel_tool_calls".into(), false.into());
        }
    }
    let user = take::<Metadata>(&mut fields, "metadata")?.and_then(|metadata| metadata.user_id);
    let stop = take::<Vec<String>>(&mut fields, "stop_sequences")?
        .filter(|sequences| !sequences.is_empty())
        .map(Stop::Many);
    let temperature = take(&mut fields, "temperature")?;
    let top_p = take(&mut fields, "top_p")?;
    let stream: Option<bool> = take(&mut fields, "stream")?;
    // The final Anthropic `message_delta` reports the usage, so every stream asks for it.
    let stream_options = (stream == Some(true)).then(|| StreamOptions {
        include_usage: Some(true),
        extra: Map::new(),
    });
    extra.append(&mut fields);
    adapt_anthropic_only_fields(&mut extra)?;

    Ok(ChatCompletionRequest {
        model,
        messages,
        stream,
        stream_options,
        max_tokens: None,
        max_completion_tokens: Some(max_tokens),
        temperature,
        top_p,
        n: None,
        stop,
        user,
        extra,
    })
}

/// Removes `key` from the request and parses it; absent and `null` are `None`.
fn take<T: DeserializeOwned>(
    fields: &mut Map<String, Value>,
    key: &str,
) -> Result<Option<T>, GatewayError> {
    match fields.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => parse_at(&value, key).map(Some),
    }
}

fn required<T: DeserializeOwned>(
    fields: &mut Map<String, Value>,
    key: &str,
) -> Result<T, GatewayError> {
    take(fields, key)?.ok_or_else(|| invalid(key, format!("'{key}' is required.")))
}

/// Anthropic settings with an OpenAI counterpart are mapped to it; server-side context editing
/// (`context_management`), which no other vendor has, is left out: the client still sends the
/// whole context, so skipping it changes cost, not answers. Without this, Claude Code could use
/// no vendor but Anthropic.
fn adapt_anthropic_only_fields(extra: &mut Map<String, Value>) -> Result<(), GatewayError> {
    // `output_config` is how current Anthropic clients set effort and structured output.
    if let Some(config) = extra.remove("output_config")
        && let Value::Object(config) = config
    {
        for (key, value) in config {
            match key.as_str() {
                "effort" => {
                    let effort = match value.as_str() {
                        Some("low") => "low",
                        Some("medium") => "medium",
                        Some("high" | "max") => "high",
                        _ => {
                            return Err(invalid(
                                "output_config.effort",
                                "'output_config.effort' must be low, medium, high or max.",
                            ));
                        }
                    };
                    extra.insert("reasoning_effort".into(), effort.into());
                }
                "format" => {
                    let schema = value.get("schema").cloned().ok_or_else(|| {
                        invalid(
                            "output_config.format.schema",
                            "'output_config.format' needs a JSON 'schema'.",
                        )
                    })?;
                    extra.insert(
                        "response_format".into(),
                        json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}}),
                    );
                }
                other => {
                    return Err(invalid(
                        &format!("output_config.{other}"),
                        format!("'output_config.{other}' cannot be served by this model's vendor."),
                    ));
                }
            }
        }
    }
    if let Some(thinking) = extra.remove("thinking")
        && thinking.get("type").and_then(Value::as_str) == Some("enabled")
    {
        let budget = thinking
            .get("budget_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let effort = match budget {
            0..4096 => "low",
            4096..16384 => "medium",
            _ => "high",
        };
        extra
            .entry("reasoning_effort")
            .or_insert_with(|| effort.into());
    }
    // `adaptive` thinking leaves the effort to the model: the vendor's default does the same.
    extra.remove("context_management");
    Ok(())
}

fn message(role: Role, content: Option<MessageContent>, extra: Map<String, Value>) -> ChatMessage {
    ChatMessage {
        role,
        content,
        name: None,
        extra,
    }
}

fn text_part(text: String, cache_control: Option<Value>) -> ContentPart {
    let mut extra = Map::new();
    if let Some(cache_control) = cache_control.filter(|value| !value.is_null()) {
        extra.insert("cache_control".into(), cache_control);
    }
    ContentPart {
        r#type: "text".into(),
        text: Some(text),
        extra,
    }
}

/// A lone plain text part is sent as a string, which every OpenAI-compatible vendor accepts.
fn collapse(mut parts: Vec<ContentPart>) -> MessageContent {
    if let [only] = parts.as_slice()
        && only.r#type == "text"
        && only.extra.is_empty()
        && let Some(part) = parts.pop()
        && let Some(text) = part.text
    {
        return MessageContent::Text(text);
    }
    MessageContent::Parts(parts)
}

fn system_content(system: Content<SystemBlock>) -> Result<Option<MessageContent>, GatewayError> {
    match system {
        Content::Text(text) if text.is_empty() => Ok(None),
        Content::Text(text) => Ok(Some(MessageContent::Text(text))),
        Content::Blocks(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (index, block) in blocks.into_iter().enumerate() {
                if block.r#type != "text" {
                    return Err(invalid(
                        &format!("system[{index}].type"),
                        "System prompt blocks must be of type 'text'.",
                    ));
                }
                parts.push(text_part(block.text, block.cache_control));
            }
            Ok((!parts.is_empty()).then(|| collapse(parts)))
        }
    }
}

fn image_part(source: Source, cache_control: Option<Value>) -> ContentPart {
    let url = match source {
        Source::Url { url } => url,
        Source::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
    };
    let mut part = text_part(String::new(), cache_control);
    part.r#type = "image_url".into();
    part.text = None;
    part.extra.insert("image_url".into(), json!({ "url": url }));
    part
}

fn document_part(
    source: Source,
    title: Option<String>,
    cache_control: Option<Value>,
    at: &str,
) -> Result<ContentPart, GatewayError> {
    let Source::Base64 { media_type, data } = source else {
        return Err(invalid(
            &format!("{at}.source"),
            "Documents must be sent as base64 PDF data to be served by this model.",
        ));
    };
    let mut file = json!({ "file_data": format!("data:{media_type};base64,{data}") });
    if let Some(title) = title {
        file["filename"] = title.into();
    }
    let mut part = text_part(String::new(), cache_control);
    part.r#type = "file".into();
    part.text = None;
    part.extra.insert("file".into(), file);
    Ok(part)
}

fn user_messages(
    content: Content<Value>,
    at: &str,
    out: &mut Vec<ChatMessage>,
) -> Result<(), GatewayError> {
    let blocks = match content {
        Content::Text(text) => {
            out.push(message(
                Role::User,
                Some(MessageContent::Text(text)),
                Map::new(),
            ));
            return Ok(());
        }
        Content::Blocks(blocks) => blocks,
    };
    // OpenAI tool messages hold text only: images a tool returned are shown to the model in
    // the user turn that follows the tool answers.
    let mut tool_images = Vec::new();
    let mut parts = Vec::new();
    for (index, block) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{index}]");
        match parse_block(block, &at)? {
            Block::Text(TextBlock {
                text,
                cache_control,
            }) => parts.push(text_part(text, cache_control)),
            Block::Image(ImageBlock {
                source,
                cache_control,
            }) => parts.push(image_part(source, cache_control)),
            Block::Document(DocumentBlock {
                source,
                title,
                cache_control,
            }) => parts.push(document_part(source, title, cache_control, &at)?),
            Block::ToolResult(ToolResultBlock {
                tool_use_id,
                content,
            }) => {
                let content = tool_result_content(content, &at, &mut tool_images)?;
                let mut extra = Map::new();
                extra.insert("tool_call_id".into(), tool_use_id.into());
                out.push(message(Role::Tool, Some(content), extra));
            }
            Block::ToolUse(_) | Block::Thinking => {
                return Err(invalid(
                    &format!("{at}.type"),
                    "User messages may not contain tool_use or thinking blocks.",
                ));
            }
        }
    }
    tool_images.append(&mut parts);
    if !tool_images.is_empty() {
        out.push(message(Role::User, Some(collapse(tool_images)), Map::new()));
    }
    Ok(())
}

fn tool_result_content(
    content: Option<Content<Value>>,
    at: &str,
    images: &mut Vec<ContentPart>,
) -> Result<MessageContent, GatewayError> {
    let blocks = match content {
        None => return Ok(MessageContent::Text(String::new())),
        Some(Content::Text(text)) => return Ok(MessageContent::Text(text)),
        Some(Content::Blocks(blocks)) => blocks,
    };
    let mut parts = Vec::new();
    for (index, block) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{index}]");
        match parse_block(block, &at)? {
            Block::Text(TextBlock {
                text,
                cache_control,
            }) => parts.push(text_part(text, cache_control)),
            Block::Image(ImageBlock {
                source,
                cache_control,
            }) => images.push(image_part(source, cache_control)),
            _ => {
                return Err(invalid(
                    &format!("{at}.type"),
                    "Tool results may hold text and images only.",
                ));
            }
        }
    }
    Ok(if parts.is_empty() {
        MessageContent::Text(String::new())
    } else {
        collapse(parts)
    })
}

fn assistant_message(content: Content<Value>, at: &str) -> Result<ChatMessage, GatewayError> {
    let blocks = match content {
        Content::Text(text) => {
            return Ok(message(
                Role::Assistant,
                Some(MessageContent::Text(text)),
                Map::new(),
            ));
        }
        Content::Blocks(blocks) => blocks,
    };
    let mut parts = Vec::new();
    let mut tool_calls = Vec::new();
    for (index, block) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{index}]");
        match parse_block(block, &at)? {
            Block::Text(TextBlock {
                text,
                cache_control,
            }) => parts.push(text_part(text, cache_control)),
            Block::ToolUse(ToolUseBlock { id, name, input }) => tool_calls.push(json!({
                "id": id,
                "type": "function",
                "function": { "name": name, "arguments": crate::anthropic::response::arguments(&input) },
            })),
            // Thinking is signed by Anthropic for Anthropic; other vendors cannot take it
            // back, and OpenAI has no field for it.
            Block::Thinking => {}
            Block::Image(_) | Block::Document(_) | Block::ToolResult(_) => {
                return Err(invalid(
                    &format!("{at}.type"),
                    "Assistant messages may hold text, tool_use and thinking blocks only.",
                ));
            }
        }
    }
    let mut extra = Map::new();
    let content = if parts.is_empty() {
        // OpenAI's own form for an assistant turn that only called tools.
        (tool_calls.is_empty()).then(|| MessageContent::Text(String::new()))
    } else {
        Some(collapse(parts))
    };
    if !tool_calls.is_empty() {
        extra.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    Ok(message(Role::Assistant, content, extra))
}

fn convert_tools(tools: Vec<Tool>) -> Result<Value, GatewayError> {
    let mut converted = Vec::with_capacity(tools.len());
    for (index, tool) in tools.into_iter().enumerate() {
        let at = format!("tools[{index}]");
        if let Some(kind) = tool.kind.as_deref().filter(|kind| *kind != "custom") {
            return Err(invalid(
                &join_path(&at, "type"),
                format!(
                    "Anthropic server tools ('{kind}') run inside Anthropic's API and cannot be \
                     translated; define a custom tool with an 'input_schema'."
                ),
            ));
        }
        let schema = tool.input_schema.ok_or_else(|| {
            invalid(
                &join_path(&at, "input_schema"),
                format!("'{at}.input_schema' is required."),
            )
        })?;
        let mut function = json!({ "name": tool.name, "parameters": schema });
        if let Some(description) = tool.description {
            function["description"] = description.into();
        }
        let mut converted_tool = json!({ "type": "function", "function": function });
        if let Some(cache_control) = tool.cache_control.filter(|value| !value.is_null()) {
            converted_tool["cache_control"] = cache_control;
        }
        converted.push(converted_tool);
    }
    Ok(Value::Array(converted))
}

/// OpenAI's `tool_choice`, and whether parallel tool calls are switched off.
fn convert_tool_choice(choice: ToolChoice) -> (Value, bool) {
    match choice {
        ToolChoice::Auto {
            disable_parallel_tool_use,
        } => (json!("auto"), disable_parallel_tool_use == Some(true)),
        ToolChoice::Any {
            disable_parallel_tool_use,
        } => (json!("required"), disable_parallel_tool_use == Some(true)),
        ToolChoice::Tool {
            name,
            disable_parallel_tool_use,
        } => (
            json!({ "type": "function", "function": { "name": name } }),
            disable_parallel_tool_use == Some(true),
        ),
        ToolChoice::None {} => (json!("none"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> Result<Value, GatewayError> {
        from_anthropic_request(body.to_string().as_bytes())
            .map(|request| serde_json::to_value(&request).unwrap())
    }

    fn param_of(err: &GatewayError) -> Option<&str> {
        match err {
            GatewayError::InvalidRequest { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn plain_request() {
        let out = translate(json!({"model": "claude-x", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
        assert_eq!(
            out,
            json!({"model": "claude-x", "max_completion_tokens": 100,
                   "messages": [{"role": "user", "content": "hi"}]})
        );
    }

    #[test]
    fn system_turns_and_output_config_have_openai_counterparts() {
        let out = translate(json!({
            "model": "m", "max_tokens": 100,
            "thinking": {"type": "adaptive", "display": "omitted"},
            "output_config": {"effort": "max", "format": {"type": "json_schema", "schema": {"type": "object"}}},
            "context_management": {"edits": []},
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": [{"type": "text", "text": "tools changed"}]},
                {"role": "user", "content": "go on"}
            ]
        }))
        .unwrap();
        assert_eq!(
            out["messages"][1],
            json!({"role": "system", "content": "tools changed"})
        );
        assert_eq!(out["reasoning_effort"], "high");
        assert_eq!(
            out["response_format"]["json_schema"]["schema"],
            json!({"type": "object"})
        );
        for gone in ["thinking", "output_config", "context_management"] {
            assert!(out.get(gone).is_none(), "{gone} left in {out}");
        }
    }

    #[test]
    fn system_metadata_stop_and_stream() {
        let out = translate(json!({"model": "m", "max_tokens": 1, "system": "be brief",
            "metadata": {"user_id": "u"}, "stop_sequences": ["X"], "stream": true,
            "temperature": 0.5, "top_k": 3,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}))
        .unwrap();
        assert_eq!(
            out["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert_eq!(out["messages"][1], json!({"role": "user", "content": "hi"}));
        assert_eq!(out["user"], "u");
        assert_eq!(out["stop"], json!(["X"]));
        assert_eq!(out["stream"], true);
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
        assert_eq!(out["temperature"], 0.5);
        assert_eq!(out["top_k"], 3);
    }

    #[test]
    fn tool_results_come_first_and_images_follow() {
        let out = translate(json!({"model": "m", "max_tokens": 1, "messages": [
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "t", "signature": "s"},
                {"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [
                    {"type": "text", "text": "done"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]},
                {"type": "text", "text": "what now?"}]},
        ]}))
        .unwrap();
        assert_eq!(
            out["messages"],
            json!([
                {"role": "assistant", "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "done"},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    {"type": "text", "text": "what now?"}]},
            ])
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "max_tokens": "lots", "messages": [{"role": "user", "content": "x"}]}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": []}),
                "messages",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "output_config": {"mystery": 1}, "messages": [{"role": "user", "content": "x"}]}),
                "output_config.mystery",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}]}),
                "messages[0].content[1].type",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"name": "f"}]}),
                "tools[0].input_schema",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                    "tool_choice": {"type": "tool"}}),
                "tool_choice.name",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
                    {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}]}]}),
                "messages[0].content[0].source",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png"}}]}]}),
                "messages[0].content[0].source.data",
            ),
        ];
        for (body, field) in cases {
            let err = translate(body.clone()).unwrap_err();
            assert_eq!(param_of(&err), Some(field), "{body} -> {err:?}");
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
        }
        let err = from_anthropic_request(b"{nope").unwrap_err();
        assert!(matches!(
            err,
            GatewayError::InvalidRequest { param: None, .. }
        ));
    }

    #[test]
    fn tool_choice_and_parallel_switch() {
        let choice = |value: Value| {
            translate(json!({"model": "m", "max_tokens": 1, "tool_choice": value,
                "messages": [{"role": "user", "content": "x"}]}))
            .unwrap()
        };
        assert_eq!(choice(json!({"type": "auto"}))["tool_choice"], "auto");
        assert_eq!(choice(json!({"type": "none"}))["tool_choice"], "none");
        let any = choice(json!({"type": "any", "disable_parallel_tool_use": true}));
        assert_eq!(any["tool_choice"], "required");
        assert_eq!(any["parallel_tool_calls"], false);
        assert_eq!(
            choice(json!({"type": "tool", "name": "f"}))["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
    }
}
