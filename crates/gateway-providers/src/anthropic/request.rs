//! OpenAI chat completion request -> Anthropic Messages request.
//!
//! System and developer messages become the top-level `system`; consecutive messages of one
//! Anthropic role are merged because Anthropic requires user and assistant turns to alternate;
//! tool results become `tool_result` blocks of a user turn. Fields OpenAI defines that have no
//! Anthropic equivalent and change the answer are refused with a 400 naming the field. Fields
//! the gateway does not know are forwarded, so Anthropic-only parameters (`top_k`,
//! `thinking`, ...) work, and anything Anthropic does not accept gets its own 400.

use super::{DEFAULT_MAX_TOKENS, invalid, parse_at, split_base64_data_url};
use gateway_core::GatewayError;
use gateway_core::openai::{
    ChatCompletionRequest, ChatMessage, ContentPart, MessageContent, Role, Stop,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Request fields this module reads itself: never forwarded as they are.
const HANDLED: &[&str] = &[
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "audio",
    "modalities",
    "prediction",
    "functions",
    "function_call",
    "web_search_options",
    // Hints without an Anthropic counterpart that leave the answer unchanged: OpenAI's
    // `metadata` and `store` only concern its stored completions, `seed` is best effort even
    // there, and the tier and cache keys only affect OpenAI's scheduling.
    "seed",
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    // Becomes `thinking` (see `thinking_from_effort`).
    "reasoning_effort",
];

/// Builds the Anthropic request body for `request`, sent to `upstream_model`.
pub fn to_anthropic_request(
    request: &ChatCompletionRequest,
    upstream_model: &str,
) -> Result<Value, GatewayError> {
    refuse_unsupported(request)?;
    let mut body = Map::new();
    body.insert("model".into(), upstream_model.into());
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    body.insert("max_tokens".into(), max_tokens.into());

    let (system, messages) = convert_messages(&request.messages)?;
    if let Some(system) = system {
        body.insert("system".into(), system);
    }
    body.insert("messages".into(), Value::Array(messages));

    let stop_sequences = match &request.stop {
        Some(Stop::One(one)) => vec![one.clone()],
        Some(Stop::Many(many)) => many.clone(),
        None => Vec::new(),
    };
    if !stop_sequences.is_empty() {
        body.insert("stop_sequences".into(), stop_sequences.into());
    }
    if let Some(temperature) = request.temperature {
        body.insert("temperature".into(), temperature.into());
    }
    if let Some(top_p) = request.top_p {
        body.insert("top_p".into(), top_p.into());
    }
    if let Some(user) = &request.user {
        body.insert("metadata".into(), json!({ "user_id": user }));
    }
    if let Some(stream) = request.stream {
        body.insert("stream".into(), stream.into());
    }
    if let Some(tools) = present(&request.extra, "tools") {
        body.insert("tools".into(), convert_tools(tools)?);
    }
    if let Some(tool_choice) = convert_tool_choice(&request.extra)? {
        body.insert("tool_choice".into(), tool_choice);
    }
    if let Some(thinking) = thinking_from_effort(&request.extra)? {
        body.insert("thinking".into(), thinking);
    }

    for (key, value) in &request.extra {
        if !value.is_null() && !HANDLED.contains(&key.as_str()) {
            // What the gateway built from the OpenAI fields wins over a same-named extra.
            body.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    Ok(Value::Object(body))
}

/// OpenAI's `reasoning_effort` as Anthropic's extended thinking. The budgets are the inverse of
/// the inbound mapping (below 4096 tokens `low`, below 16384 `medium`, else `high`), so a
/// request that crosses the gateway twice keeps its setting.
fn thinking_from_effort(extra: &Map<String, Value>) -> Result<Option<Value>, GatewayError> {
    let Some(effort) = present(extra, "reasoning_effort") else {
        return Ok(None);
    };
    let budget = match effort.as_str() {
        Some("none" | "minimal") => return Ok(None),
        Some("low") => 1024,
        Some("medium") => 8192,
        Some("high") => 24576,
        _ => {
            return Err(GatewayError::invalid_request(
                "`reasoning_effort` must be one of none, minimal, low, medium, high.",
                Some("reasoning_effort".into()),
            ));
        }
    };
    Ok(Some(json!({"type": "enabled", "budget_tokens": budget})))
}

/// A field of `extra` that is set: absent and `null` mean the same to OpenAI.
fn present<'a>(extra: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    extra.get(key).filter(|value| !value.is_null())
}

fn refuse_unsupported(request: &ChatCompletionRequest) -> Result<(), GatewayError> {
    if request.n.is_some_and(|n| n != 1) {
        return Err(invalid(
            "n",
            "Anthropic models return one choice per request: 'n' must be 1.",
        ));
    }
    let extra = &request.extra;
    if present(extra, "logprobs").is_some_and(|value| value != &Value::Bool(false)) {
        return Err(invalid(
            "logprobs",
            "Anthropic models do not return log probabilities: 'logprobs' is not supported.",
        ));
    }
    if present(extra, "top_logprobs").is_some_and(|value| value != &json!(0)) {
        return Err(invalid(
            "top_logprobs",
            "Anthropic models do not return log probabilities: 'top_logprobs' is not supported.",
        ));
    }
    if let Some(format) = present(extra, "response_format") {
        let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "text" {
            return Err(invalid(
                "response_format",
                format!(
                    "'response_format' of type '{kind}' is not supported for Anthropic models, \
                     which have no native structured-output mode in this API version. Describe \
                     the JSON in the prompt, or define a tool whose parameters are the schema \
                     and force it with 'tool_choice'."
                ),
            ));
        }
    }
    if present(extra, "logit_bias")
        .is_some_and(|bias| bias.as_object().is_none_or(|map| !map.is_empty()))
    {
        return Err(invalid(
            "logit_bias",
            "'logit_bias' is not supported for Anthropic models.",
        ));
    }
    for penalty in ["presence_penalty", "frequency_penalty"] {
        if present(extra, penalty).is_some_and(|value| value.as_f64() != Some(0.0)) {
            return Err(invalid(
                penalty,
                format!("'{penalty}' is not supported for Anthropic models; only 0 is accepted."),
            ));
        }
    }
    if present(extra, "modalities").is_some_and(|value| value != &json!(["text"])) {
        return Err(invalid(
            "modalities",
            "Anthropic models answer with text only: 'modalities' must be [\"text\"].",
        ));
    }
    for (field, why) in [
        ("audio", "Anthropic models do not produce audio"),
        ("prediction", "Anthropic models have no predicted outputs"),
        (
            "web_search_options",
            "use Anthropic's web search tool instead",
        ),
        (
            "functions",
            "use 'tools' instead of the deprecated 'functions'",
        ),
        (
            "function_call",
            "use 'tool_choice' instead of the deprecated 'function_call'",
        ),
    ] {
        if present(extra, field).is_some() {
            return Err(invalid(
                field,
                format!("'{field}' is not supported for Anthropic models: {why}."),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    User,
    Assistant,
}

/// Anthropic's `system` and `messages` for the OpenAI messages.
fn convert_messages(messages: &[ChatMessage]) -> Result<(Option<Value>, Vec<Value>), GatewayError> {
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(Turn, Vec<Value>)> = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        let at = format!("messages[{index}]");
        let (turn, blocks) = match message.role {
            // Anthropic has one system prompt, before the conversation: instructions given
            // mid-conversation are hoisted there, in order, rather than refused.
            Role::System | Role::Developer => {
                system.extend(system_blocks(message, &at)?);
                continue;
            }
            Role::User => (Turn::User, user_blocks(message, &at)?),
            Role::Assistant => (Turn::Assistant, assistant_blocks(message, &at)?),
            Role::Tool => (Turn::User, vec![tool_result_block(message, &at)?]),
            Role::Function => {
                return Err(invalid(
                    &format!("{at}.role"),
                    "The deprecated 'function' role is not supported for Anthropic models; use 'tool'.",
                ));
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, merged)) if *last == turn => merged.extend(blocks),
            _ => turns.push((turn, blocks)),
        }
    }
    let messages = turns
        .into_iter()
        .map(|(turn, blocks)| {
            let role = match turn {
                Turn::User => "user",
                Turn::Assistant => "assistant",
            };
            json!({ "role": role, "content": collapse(blocks) })
        })
        .collect();
    let system = (!system.is_empty()).then(|| collapse(system));
    Ok((system, messages))
}

/// A lone plain text block is sent as a string, the form most Anthropic examples use.
fn collapse(mut blocks: Vec<Value>) -> Value {
    if let [only] = blocks.as_mut_slice()
        && let Some(block) = only.as_object_mut()
        && block.len() == 2
        && block.get("type").and_then(Value::as_str) == Some("text")
        && let Some(text) = block.remove("text")
    {
        return text;
    }
    Value::Array(blocks)
}

fn text_block(text: &str, part: Option<&ContentPart>) -> Value {
    let mut block = json!({ "type": "text", "text": text });
    copy_cache_control(part.map(|part| &part.extra), &mut block);
    block
}

/// Anthropic's prompt-caching marker, which OpenAI-format clients put on content parts and
/// tools for Anthropic models, is carried to the matching block.
fn copy_cache_control(extra: Option<&Map<String, Value>>, block: &mut Value) {
    if let Some(cache_control) = extra.and_then(|extra| present(extra, "cache_control"))
        && let Some(block) = block.as_object_mut()
    {
        block.insert("cache_control".into(), cache_control.clone());
    }
}

/// Anthropic rejects empty text blocks where OpenAI accepts empty strings; an empty text adds
/// nothing to the prompt, so it is left out.
fn is_droppable(text: &str, part: Option<&ContentPart>) -> bool {
    text.is_empty() && part.is_none_or(|part| present(&part.extra, "cache_control").is_none())
}

fn system_blocks(message: &ChatMessage, at: &str) -> Result<Vec<Value>, GatewayError> {
    let mut blocks = Vec::new();
    match &message.content {
        None => {}
        Some(MessageContent::Text(text)) if !is_droppable(text, None) => {
            blocks.push(text_block(text, None));
        }
        Some(MessageContent::Text(_)) => {}
        Some(MessageContent::Parts(parts)) => {
            for (index, part) in parts.iter().enumerate() {
                let at = format!("{at}.content[{index}]");
                if part.r#type != "text" {
                    return Err(invalid(
                        &format!("{at}.type"),
                        format!(
                            "Anthropic system prompts hold text only, not '{}' parts.",
                            part.r#type
                        ),
                    ));
                }
                let text = part_text(part, &at)?;
                if !is_droppable(text, Some(part)) {
                    blocks.push(text_block(text, Some(part)));
                }
            }
        }
    }
    Ok(blocks)
}

fn part_text<'a>(part: &'a ContentPart, at: &str) -> Result<&'a str, GatewayError> {
    part.text
        .as_deref()
        .ok_or_else(|| invalid(&format!("{at}.text"), format!("'{at}.text' is required.")))
}

fn user_blocks(message: &ChatMessage, at: &str) -> Result<Vec<Value>, GatewayError> {
    match &message.content {
        None => Ok(Vec::new()),
        Some(MessageContent::Text(text)) => Ok(if is_droppable(text, None) {
            Vec::new()
        } else {
            vec![text_block(text, None)]
        }),
        Some(MessageContent::Parts(parts)) => {
            let mut blocks = Vec::new();
            for (index, part) in parts.iter().enumerate() {
                let at = format!("{at}.content[{index}]");
                if let Some(block) = user_part(part, &at)? {
                    blocks.push(block);
                }
            }
            Ok(blocks)
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrl {
    Object { url: String },
    // Some clients send the URL itself; OpenAI documents the object form.
    Bare(String),
}

#[derive(Deserialize)]
struct FilePart {
    #[serde(default)]
    file_data: Option<String>,
    #[serde(default)]
    file_id: Option<String>,
    #[serde(default)]
    filename: Option<String>,
}

fn user_part(part: &ContentPart, at: &str) -> Result<Option<Value>, GatewayError> {
    let mut block = match part.r#type.as_str() {
        "text" => {
            let text = part_text(part, at)?;
            if is_droppable(text, Some(part)) {
                return Ok(None);
            }
            json!({ "type": "text", "text": text })
        }
        "image_url" => {
            let field = format!("{at}.image_url");
            let image: ImageUrl =
                parse_at(part.extra.get("image_url").unwrap_or(&Value::Null), &field)?;
            let url = match &image {
                ImageUrl::Object { url } | ImageUrl::Bare(url) => url,
            };
            image_block(url, &field)?
        }
        "file" => {
            let field = format!("{at}.file");
            let file: FilePart = parse_at(part.extra.get("file").unwrap_or(&Value::Null), &field)?;
            document_block(&file, &field)?
        }
        other => {
            return Err(invalid(
                &format!("{at}.type"),
                format!("Content parts of type '{other}' are not supported for Anthropic models."),
            ));
        }
    };
    copy_cache_control(Some(&part.extra), &mut block);
    Ok(Some(block))
}

fn image_block(url: &str, at: &str) -> Result<Value, GatewayError> {
    if url.starts_with("data:") {
        let (media_type, data) = split_base64_data_url(url).ok_or_else(|| {
            invalid(
                &format!("{at}.url"),
                "Image data URLs must be base64-encoded ('data:image/png;base64,...').",
            )
        })?;
        return Ok(json!({
            "type": "image",
            "source": { "type": "base64", "media_type": media_type, "data": data },
        }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({ "type": "image", "source": { "type": "url", "url": url } }));
    }
    Err(invalid(
        &format!("{at}.url"),
        "Image URLs must be http(s) URLs or base64 data URLs.",
    ))
}

fn document_block(file: &FilePart, at: &str) -> Result<Value, GatewayError> {
    if file.file_id.is_some() {
        return Err(invalid(
            &format!("{at}.file_id"),
            "OpenAI file ids cannot be read by Anthropic models; send the file as 'file_data'.",
        ));
    }
    let data_url = file.file_data.as_deref().ok_or_else(|| {
        invalid(
            &format!("{at}.file_data"),
            format!("'{at}.file_data' is required."),
        )
    })?;
    match split_base64_data_url(data_url) {
        Some((media_type @ "application/pdf", data)) => {
            let mut block = json!({
                "type": "document",
                "source": { "type": "base64", "media_type": media_type, "data": data },
            });
            if let (Some(title), Some(block)) = (&file.filename, block.as_object_mut()) {
                block.insert("title".into(), title.as_str().into());
            }
            Ok(block)
        }
        _ => Err(invalid(
            &format!("{at}.file_data"),
            "Anthropic models read PDF files only, as 'data:application/pdf;base64,...'.",
        )),
    }
}

#[derive(Deserialize)]
struct ToolCall {
    id: String,
    function: FunctionCall,
}

#[derive(Deserialize)]
struct FunctionCall {
    name: String,
    #[serde(default)]
    arguments: String,
}

fn assistant_blocks(message: &ChatMessage, at: &str) -> Result<Vec<Value>, GatewayError> {
    if present(&message.extra, "function_call").is_some() {
        return Err(invalid(
            &format!("{at}.function_call"),
            "The deprecated 'function_call' is not supported for Anthropic models; use 'tool_calls'.",
        ));
    }
    let mut blocks = Vec::new();
    match &message.content {
        None => {}
        Some(MessageContent::Text(text)) if !is_droppable(text, None) => {
            blocks.push(text_block(text, None));
        }
        Some(MessageContent::Text(_)) => {}
        Some(MessageContent::Parts(parts)) => {
            for (index, part) in parts.iter().enumerate() {
                let at = format!("{at}.content[{index}]");
                let text = match part.r#type.as_str() {
                    "text" => part_text(part, &at)?,
                    // A refusal the model gave earlier is part of what it said.
                    "refusal" => part
                        .extra
                        .get("refusal")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            invalid(
                                &format!("{at}.refusal"),
                                format!("'{at}.refusal' is required."),
                            )
                        })?,
                    other => {
                        return Err(invalid(
                            &format!("{at}.type"),
                            format!("Assistant content parts of type '{other}' are not supported."),
                        ));
                    }
                };
                if !is_droppable(text, Some(part)) {
                    blocks.push(text_block(text, Some(part)));
                }
            }
        }
    }
    if let Some(calls) = present(&message.extra, "tool_calls") {
        let field = format!("{at}.tool_calls");
        let calls: Vec<ToolCall> = parse_at(calls, &field)?;
        for (index, call) in calls.into_iter().enumerate() {
            let input = tool_input(
                &call.function.arguments,
                &format!("{field}[{index}].function.arguments"),
            )?;
            blocks.push(json!({
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": input,
            }));
        }
    }
    Ok(blocks)
}

/// OpenAI carries tool arguments as a JSON string; Anthropic wants the object itself.
fn tool_input(arguments: &str, at: &str) -> Result<Value, GatewayError> {
    if arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(object @ Value::Object(_)) => Ok(object),
        _ => Err(invalid(
            at,
            format!("'{at}' must be a JSON object encoded as a string."),
        )),
    }
}

fn tool_result_block(message: &ChatMessage, at: &str) -> Result<Value, GatewayError> {
    let id = present(&message.extra, "tool_call_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                &format!("{at}.tool_call_id"),
                "Tool messages need a 'tool_call_id' string.",
            )
        })?;
    let mut block = json!({ "type": "tool_result", "tool_use_id": id });
    let content = match &message.content {
        None => None,
        Some(MessageContent::Text(text)) => Some(Value::String(text.clone())),
        Some(MessageContent::Parts(parts)) => {
            let mut blocks = Vec::new();
            for (index, part) in parts.iter().enumerate() {
                let at = format!("{at}.content[{index}]");
                if !matches!(part.r#type.as_str(), "text" | "image_url") {
                    return Err(invalid(
                        &format!("{at}.type"),
                        "Tool results may hold text and images only.",
                    ));
                }
                if let Some(block) = user_part(part, &at)? {
                    blocks.push(block);
                }
            }
            Some(Value::Array(blocks))
        }
    };
    if let (Some(content), Some(block)) = (content, block.as_object_mut()) {
        block.insert("content".into(), content);
    }
    Ok(block)
}

#[derive(Deserialize)]
struct Tool {
    r#type: String,
    #[serde(default)]
    function: Option<FunctionDefinition>,
    #[serde(default)]
    cache_control: Option<Value>,
}

#[derive(Deserialize)]
struct FunctionDefinition {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

fn convert_tools(tools: &Value) -> Result<Value, GatewayError> {
    let tools: Vec<Tool> = parse_at(tools, "tools")?;
    let mut converted = Vec::with_capacity(tools.len());
    for (index, tool) in tools.into_iter().enumerate() {
        let at = format!("tools[{index}]");
        if tool.r#type != "function" {
            return Err(invalid(
                &format!("{at}.type"),
                format!(
                    "Tools of type '{}' are not supported for Anthropic models; only 'function'.",
                    tool.r#type
                ),
            ));
        }
        let function = tool.function.ok_or_else(|| {
            invalid(
                &format!("{at}.function"),
                format!("'{at}.function' is required."),
            )
        })?;
        let mut out = Map::new();
        out.insert("name".into(), function.name.into());
        if let Some(description) = function.description {
            out.insert("description".into(), description.into());
        }
        // Anthropic requires a schema; OpenAI's default for a tool without one is "no
        // arguments".
        let schema = function
            .parameters
            .filter(|schema| !schema.is_null())
            .unwrap_or_else(|| json!({ "type": "object", "properties": {} }));
        out.insert("input_schema".into(), schema);
        if let Some(cache_control) = tool.cache_control.filter(|value| !value.is_null()) {
            out.insert("cache_control".into(), cache_control);
        }
        converted.push(Value::Object(out));
    }
    Ok(Value::Array(converted))
}

fn convert_tool_choice(extra: &Map<String, Value>) -> Result<Option<Value>, GatewayError> {
    let no_parallel = match present(extra, "parallel_tool_calls") {
        None => false,
        Some(Value::Bool(parallel)) => !parallel,
        Some(_) => {
            return Err(invalid(
                "parallel_tool_calls",
                "'parallel_tool_calls' must be a boolean.",
            ));
        }
    };
    let mut choice = match present(extra, "tool_choice") {
        None if no_parallel => json!({ "type": "auto" }),
        None => return Ok(None),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => json!({ "type": "auto" }),
            "none" => json!({ "type": "none" }),
            "required" => json!({ "type": "any" }),
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!(
                        "'tool_choice' must be 'auto', 'none', 'required' or a named function, not '{other}'."
                    ),
                ));
            }
        },
        Some(named) => {
            let name = (named.get("type").and_then(Value::as_str) == Some("function"))
                .then(|| named.pointer("/function/name").and_then(Value::as_str))
                .flatten()
                .ok_or_else(|| {
                    invalid(
                        "tool_choice",
                        "A 'tool_choice' object must be {\"type\":\"function\",\"function\":{\"name\":...}}.",
                    )
                })?;
            json!({ "type": "tool", "name": name })
        }
    };
    // Anthropic puts the parallel switch inside tool_choice, and rejects it with "none".
    if no_parallel
        && choice["type"] != "none"
        && let Some(choice) = choice.as_object_mut()
    {
        choice.insert("disable_parallel_tool_use".into(), true.into());
    }
    Ok(Some(choice))
}

#[cfg(test)]
mod effort_tests {
    use super::*;

    #[test]
    fn reasoning_effort_becomes_a_thinking_budget() {
        let extra = |effort: &str| {
            let mut extra = Map::new();
            extra.insert("reasoning_effort".into(), effort.into());
            extra
        };
        assert_eq!(
            thinking_from_effort(&extra("medium")).unwrap(),
            Some(json!({"type": "enabled", "budget_tokens": 8192}))
        );
        assert_eq!(thinking_from_effort(&extra("minimal")).unwrap(), None);
        assert!(thinking_from_effort(&extra("extreme")).is_err());
        assert_eq!(thinking_from_effort(&Map::new()).unwrap(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> Result<Value, GatewayError> {
        let request = ChatCompletionRequest::from_json(body.to_string().as_bytes()).unwrap();
        to_anthropic_request(&request, "claude-test")
    }

    fn param_of(err: &GatewayError) -> Option<&str> {
        match err {
            GatewayError::InvalidRequest { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn plain_request_gets_the_default_max_tokens_and_the_upstream_model() {
        let out =
            translate(json!({"model": "alias", "messages": [{"role": "user", "content": "hi"}]}))
                .unwrap();
        assert_eq!(
            out,
            json!({"model": "claude-test", "max_tokens": DEFAULT_MAX_TOKENS,
                   "messages": [{"role": "user", "content": "hi"}]})
        );
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let out = translate(
            json!({"model": "m", "max_tokens": 10, "max_completion_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(out["max_tokens"], 20);
        let out = translate(json!({"model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
        assert_eq!(out["max_tokens"], 10);
    }

    #[test]
    fn consecutive_turns_merge_and_system_is_hoisted() {
        let out = translate(json!({"model": "m", "messages": [
            {"role": "system", "content": "a"},
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "developer", "content": "b"},
            {"role": "assistant", "content": "three"},
        ]}))
        .unwrap();
        assert_eq!(
            out["system"],
            json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
        );
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": "three"},
            ])
        );
    }

    #[test]
    fn stop_string_becomes_a_list_and_user_becomes_metadata() {
        let out = translate(
            json!({"model": "m", "stop": "END", "user": "u-1", "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["metadata"], json!({"user_id": "u-1"}));
        assert_eq!(out["stream"], true);
        assert!(out.get("stream_options").is_none());
    }

    #[test]
    fn refusals_name_their_field() {
        let base = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            for (key, value) in extra.as_object().unwrap() {
                body[key] = value.clone();
            }
            translate(body)
        };
        for (extra, field) in [
            (json!({"n": 2}), "n"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"top_logprobs": 3}), "top_logprobs"),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
        ] {
            let err = base(extra.clone()).unwrap_err();
            assert_eq!(param_of(&err), Some(field), "{extra} -> {err:?}");
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
            assert!(err.to_string().contains(field), "{err}");
        }
        for neutral in [
            json!({"n": 1}),
            json!({"logprobs": false}),
            json!({"response_format": {"type": "text"}}),
            json!({"frequency_penalty": 0}),
            json!({"logit_bias": {}}),
            json!({"seed": 7, "store": false, "metadata": {"a": "b"}}),
        ] {
            let out = base(neutral.clone()).unwrap();
            for key in neutral.as_object().unwrap().keys() {
                assert!(
                    out.get(key).is_none() || key == "metadata",
                    "{key} leaked: {out}"
                );
            }
            assert!(
                out.get("metadata").is_none(),
                "OpenAI metadata is not Anthropic's: {out}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_forwarded_but_never_override() {
        let out = translate(json!({"model": "m", "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024},
            "system": "sneaky", "messages": [{"role": "system", "content": "real"}, {"role": "user", "content": "hi"}]}))
        .unwrap();
        assert_eq!(out["top_k"], 5);
        assert_eq!(out["thinking"]["budget_tokens"], 1024);
        assert_eq!(out["system"], "real");
        let out = translate(
            json!({"model": "m", "top_k": null, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert!(out.get("top_k").is_none(), "{out}");
    }

    #[test]
    fn images_from_urls_and_data_urls() {
        let out = translate(json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AA=="}},
        ]}]}))
        .unwrap();
        assert_eq!(
            out["messages"][0]["content"],
            json!([
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/AA=="}},
            ])
        );
        let err = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]}),
        )
        .unwrap_err();
        assert_eq!(param_of(&err), Some("messages[0].content[0].image_url.url"));
        let err = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url"}]}]}),
        )
        .unwrap_err();
        assert_eq!(param_of(&err), Some("messages[0].content[0].image_url"));
    }

    #[test]
    fn pdf_files_become_documents() {
        let out = translate(json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
        ]}]}))
        .unwrap();
        assert_eq!(
            out["messages"][0]["content"][0],
            json!({"type": "document", "title": "a.pdf",
                   "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}})
        );
        let err = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-1"}}]}]}),
        )
        .unwrap_err();
        assert_eq!(param_of(&err), Some("messages[0].content[0].file.file_id"));
    }

    #[test]
    fn tool_calls_and_results() {
        let out = translate(json!({"model": "m", "parallel_tool_calls": false, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                    {"id": "c2", "type": "function", "function": {"name": "f", "arguments": ""}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "one"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "two"}]},
            ]}))
        .unwrap();
        assert_eq!(
            out["tools"],
            json!([{"name": "f", "input_schema": {"type": "object", "properties": {}}}])
        );
        assert_eq!(
            out["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            out["messages"][1]["content"],
            json!([
                {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
                {"type": "tool_use", "id": "c2", "name": "f", "input": {}},
            ])
        );
        assert_eq!(
            out["messages"][2],
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "one"},
                {"type": "tool_result", "tool_use_id": "c2", "content": [{"type": "text", "text": "two"}]},
            ]})
        );
    }

    #[test]
    fn tool_choice_forms() {
        let choice = |value: Value| {
            let mut extra = Map::new();
            extra.insert("tool_choice".into(), value);
            convert_tool_choice(&extra)
        };
        assert_eq!(
            choice(json!("auto")).unwrap(),
            Some(json!({"type": "auto"}))
        );
        assert_eq!(
            choice(json!("none")).unwrap(),
            Some(json!({"type": "none"}))
        );
        assert_eq!(
            choice(json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            Some(json!({"type": "tool", "name": "f"}))
        );
        assert!(choice(json!("sometimes")).is_err());
        assert!(choice(json!({"type": "allowed_tools"})).is_err());
        assert_eq!(convert_tool_choice(&Map::new()).unwrap(), None);
    }

    #[test]
    fn bad_tool_arguments_and_missing_ids_are_400s() {
        let err = translate(json!({"model": "m", "messages": [
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}))
        .unwrap_err();
        assert_eq!(
            param_of(&err),
            Some("messages[0].tool_calls[0].function.arguments")
        );
        let err = translate(json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}))
            .unwrap_err();
        assert_eq!(param_of(&err), Some("messages[0].tool_call_id"));
        let err = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "custom", "custom": {"name": "x"}}]}),
        )
        .unwrap_err();
        assert_eq!(param_of(&err), Some("tools[0].type"));
        let err = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"description": "no name"}}]}),
        )
        .unwrap_err();
        assert_eq!(param_of(&err), Some("tools[0].function.name"));
    }

    #[test]
    fn cache_control_and_empty_texts() {
        let out = translate(json!({"model": "m", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "long", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": ""},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""},
        ]}))
        .unwrap();
        assert_eq!(
            out["system"],
            json!([{"type": "text", "text": "long", "cache_control": {"type": "ephemeral"}}])
        );
        assert_eq!(out["messages"], json!([{"role": "user", "content": "hi"}]));
    }
}
