//! OpenAI `ChatCompletionRequest` -> Gemini `GenerateContentRequest` body.
//!
//! Parameters the gateway does not type (tools, `response_format`, `tool_calls`, image parts...)
//! live in the `extra` maps; each is read into a local serde type here. A field that Gemini
//! cannot honour is a 400 naming it. A few are accepted without being sent because they do not
//! change what the model generates: `user`, `metadata`, `safety_identifier` and
//! `prompt_cache_key` (attribution and cache hints Gemini has no field for), `store: false`,
//! `service_tier` `auto`/`default`, `parallel_tool_calls: true`, an empty `logit_bias`, the
//! `strict` flag of a function or JSON schema (Gemini has no strict mode; it follows the schema
//! it is given), a JSON schema's `name`, an image's `detail` and a message's `name`. `null`
//! always means absent, as OpenAI reads it.

use super::schema::clean_schema;
use gateway_core::GatewayError;
use gateway_core::openai::{ChatCompletionRequest, ChatMessage, ContentPart, MessageContent, Role};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

/// Gemini's limit on `stopSequences`.
const MAX_STOP_SEQUENCES: usize = 5;
/// Gemini's (and OpenAI's) limit on alternatives reported per token.
const MAX_TOP_LOGPROBS: u32 = 20;

/// Translates an OpenAI chat completion request into the body of Gemini's `generateContent`
/// (or `streamGenerateContent`: the body is the same). The model goes in the URL, not here.
pub fn to_gemini_request(request: &ChatCompletionRequest) -> Result<Value, GatewayError> {
    let options = Options::read(request)?;
    let (system, contents) = translate_messages(&request.messages)?;
    if contents.is_empty() {
        return Err(GatewayError::invalid_request(
            "Gemini needs at least one user, assistant or tool message besides the system \
             instructions.",
            Some("messages".into()),
        ));
    }

    let mut body = Map::new();
    body.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    if !options.declarations.is_empty() {
        body.insert(
            "tools".into(),
            json!([{ "functionDeclarations": options.declarations }]),
        );
        if let Some(config) = options.calling_config {
            body.insert(
                "toolConfig".into(),
                json!({ "functionCallingConfig": config }),
            );
        }
    }
    if !options.generation.is_empty() {
        body.insert("generationConfig".into(), Value::Object(options.generation));
    }
    Ok(Value::Object(body))
}

/// Everything outside `messages`, already in Gemini's shape.
struct Options {
    declarations: Vec<Value>,
    calling_config: Option<Value>,
    generation: Map<String, Value>,
}

impl Options {
    fn read(request: &ChatCompletionRequest) -> Result<Self, GatewayError> {
        let mut generation = Map::new();
        let mut tools = None;
        let mut tool_choice = None;
        let mut logprobs = false;
        let mut top_logprobs = None;

        if let Some(stop) = &request.stop {
            let sequences: Vec<String> = match stop {
                gateway_core::openai::Stop::One(one) => vec![one.clone()],
                gateway_core::openai::Stop::Many(many) => many.clone(),
            };
            if sequences.len() > MAX_STOP_SEQUENCES {
                return Err(GatewayError::invalid_request(
                    format!(
                        "Gemini accepts at most {MAX_STOP_SEQUENCES} stop sequences, got {}.",
                        sequences.len()
                    ),
                    Some("stop".into()),
                ));
            }
            if !sequences.is_empty() {
                generation.insert("stopSequences".into(), json!(sequences));
            }
        }
        // `max_completion_tokens` replaced `max_tokens` at OpenAI; when both are sent the newer
        // one is what the client meant.
        if let Some(max) = request.max_completion_tokens.or(request.max_tokens) {
            generation.insert("maxOutputTokens".into(), json!(max));
        }
        if let Some(temperature) = request.temperature {
            generation.insert("temperature".into(), json!(temperature));
        }
        if let Some(top_p) = request.top_p {
            generation.insert("topP".into(), json!(top_p));
        }
        match request.n {
            Some(0) => {
                return Err(GatewayError::invalid_request(
                    "'n' must be at least 1.",
                    Some("n".into()),
                ));
            }
            Some(n) if n > 1 => {
                generation.insert("candidateCount".into(), json!(n));
            }
            _ => {}
        }

        for (key, value) in &request.extra {
            if value.is_null() {
                continue;
            }
            match key.as_str() {
                "tools" => tools = Some(parse::<Vec<Value>>(value, "tools")?),
                "tool_choice" => tool_choice = Some(parse::<ToolChoiceSpec>(value, "tool_choice")?),
                "response_format" => {
                    apply_response_format(value, &mut generation)?;
                }
                "seed" => {
                    let seed: i64 = parse(value, "seed")?;
                    // Gemini's seed is an int32.
                    let seed = i32::try_from(seed).map_err(|_| {
                        GatewayError::invalid_request(
                            "Gemini's 'seed' must fit in a 32-bit signed integer.",
                            Some("seed".into()),
                        )
                    })?;
                    generation.insert("seed".into(), json!(seed));
                }
                "presence_penalty" | "frequency_penalty" => {
                    let penalty: f64 = parse(value, key)?;
                    // Zero is the default, and models without penalty support refuse the
                    // field even then.
                    if penalty != 0.0 {
                        let name = if key == "presence_penalty" {
                            "presencePenalty"
                        } else {
                            "frequencyPenalty"
                        };
                        generation.insert(name.into(), json!(penalty));
                    }
                }
                "logprobs" => logprobs = parse(value, "logprobs")?,
                "top_logprobs" => top_logprobs = Some(parse::<u32>(value, "top_logprobs")?),
                // Not OpenAI, but sent by clients written for vLLM-style servers; Gemini has it.
                "top_k" => {
                    let top_k: u32 = parse(value, "top_k")?;
                    generation.insert("topK".into(), json!(top_k));
                }
                "reasoning_effort" => {
                    let effort: String = parse(value, "reasoning_effort")?;
                    generation.insert(
                        "thinkingConfig".into(),
                        json!({ "thinkingBudget": thinking_budget(&effort)? }),
                    );
                }
                "parallel_tool_calls" => {
                    if !parse::<bool>(value, "parallel_tool_calls")? {
                        return Err(unsupported(
                            "parallel_tool_calls",
                            "Gemini may return several function calls in one answer and cannot \
                             be limited to one; 'parallel_tool_calls: false'",
                        ));
                    }
                }
                "store" => {
                    if parse::<bool>(value, "store")? {
                        return Err(unsupported(
                            "store",
                            "Completions are not stored through Gemini; 'store: true'",
                        ));
                    }
                }
                "service_tier" => {
                    let tier: String = parse(value, "service_tier")?;
                    if tier != "auto" && tier != "default" {
                        return Err(unsupported(
                            "service_tier",
                            &format!("Gemini has no service tier `{tier}`; 'service_tier'"),
                        ));
                    }
                }
                "logit_bias" => {
                    if value.as_object().is_none_or(|bias| !bias.is_empty()) {
                        return Err(unsupported(
                            "logit_bias",
                            "Gemini cannot bias token probabilities; 'logit_bias'",
                        ));
                    }
                }
                "metadata" | "safety_identifier" | "prompt_cache_key" => {}
                "functions" | "function_call" => {
                    return Err(unsupported(
                        key,
                        &format!(
                            "The deprecated '{key}' is not translated for Gemini (use 'tools' and 'tool_choice'); '{key}'"
                        ),
                    ));
                }
                other => {
                    return Err(unsupported(other, &format!("'{other}'")));
                }
            }
        }

        if let Some(top) = top_logprobs {
            if !logprobs {
                return Err(GatewayError::invalid_request(
                    "'top_logprobs' requires 'logprobs' to be true.",
                    Some("top_logprobs".into()),
                ));
            }
            if top > MAX_TOP_LOGPROBS {
                return Err(GatewayError::invalid_request(
                    format!(
                        "Gemini reports at most {MAX_TOP_LOGPROBS} alternatives per token; \
                         'top_logprobs' is {top}."
                    ),
                    Some("top_logprobs".into()),
                ));
            }
        }
        if logprobs {
            generation.insert("responseLogprobs".into(), Value::Bool(true));
            if let Some(top) = top_logprobs.filter(|top| *top > 0) {
                generation.insert("logprobs".into(), json!(top));
            }
        }

        let mut declarations = match tools {
            Some(tools) => function_declarations(&tools)?,
            None => Vec::new(),
        };
        let calling_config = match tool_choice {
            Some(choice) => calling_config(&choice, &mut declarations)?,
            None => None,
        };
        Ok(Self {
            declarations,
            calling_config,
            generation,
        })
    }
}

fn parse<T: DeserializeOwned>(value: &Value, param: &str) -> Result<T, GatewayError> {
    T::deserialize(value).map_err(|err| {
        GatewayError::invalid_request(
            format!("Invalid value for '{param}': {err}"),
            Some(param.to_owned()),
        )
    })
}

/// `what` ends with the quoted field name, so the message reads "... 'x' is not supported...".
fn unsupported(param: &str, what: &str) -> GatewayError {
    GatewayError::invalid_request(
        format!("{what} is not supported by Gemini models."),
        Some(param.to_owned()),
    )
}

/// OpenAI's effort levels as Gemini thinking budgets (tokens), the mapping Google's own
/// OpenAI-compatible endpoint uses. A budget rather than Gemini 3's `thinkingLevel`, because
/// every thinking model accepts a budget and the model's generation is not known here.
fn thinking_budget(effort: &str) -> Result<u32, GatewayError> {
    match effort {
        "none" => Ok(0),
        "minimal" | "low" => Ok(1024),
        "medium" => Ok(8192),
        "high" => Ok(24576),
        other => Err(GatewayError::invalid_request(
            format!(
                "Invalid value for 'reasoning_effort': `{other}` (expected none, minimal, low, \
                 medium or high)."
            ),
            Some("reasoning_effort".into()),
        )),
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormatSpec {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaSpec },
}

#[derive(Deserialize)]
struct JsonSchemaSpec {
    #[serde(default)]
    schema: Option<Value>,
    /// Tells the model what the format is for; Gemini reads that from the schema's own
    /// description.
    #[serde(default)]
    description: Option<String>,
}

fn apply_response_format(
    value: &Value,
    generation: &mut Map<String, Value>,
) -> Result<(), GatewayError> {
    match parse::<ResponseFormatSpec>(value, "response_format")? {
        ResponseFormatSpec::Text => {}
        ResponseFormatSpec::JsonObject => {
            generation.insert("responseMimeType".into(), json!("application/json"));
        }
        ResponseFormatSpec::JsonSchema { json_schema } => {
            generation.insert("responseMimeType".into(), json!("application/json"));
            if let Some(schema) = json_schema.schema.filter(|schema| !schema.is_null()) {
                let mut schema = clean_schema(&schema, "response_format.json_schema.schema")?;
                if let Some(description) = json_schema.description {
                    schema
                        .entry("description")
                        .or_insert(Value::String(description));
                }
                generation.insert("responseSchema".into(), Value::Object(schema));
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct ToolSpec {
    r#type: String,
    #[serde(default)]
    function: Option<FunctionSpec>,
}

#[derive(Deserialize)]
struct FunctionSpec {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
}

fn function_declarations(tools: &[Value]) -> Result<Vec<Value>, GatewayError> {
    let mut declarations = Vec::with_capacity(tools.len());
    let mut names: Vec<String> = Vec::with_capacity(tools.len());
    for (index, tool) in tools.iter().enumerate() {
        let at = format!("tools[{index}]");
        let tool: ToolSpec = parse(tool, &at)?;
        if tool.r#type != "function" {
            return Err(unsupported(
                &format!("{at}.type"),
                &format!("The tool type `{}` in '{at}.type'", tool.r#type),
            ));
        }
        let Some(function) = tool.function else {
            return Err(GatewayError::invalid_request(
                format!("'{at}.function' is required for a function tool."),
                Some(format!("{at}.function")),
            ));
        };
        if names.contains(&function.name) {
            return Err(GatewayError::invalid_request(
                format!("The function name `{}` is declared twice.", function.name),
                Some(format!("{at}.function.name")),
            ));
        }
        let mut declaration = Map::new();
        declaration.insert("name".into(), Value::String(function.name.clone()));
        if let Some(description) = function.description {
            declaration.insert("description".into(), Value::String(description));
        }
        if let Some(parameters) = function.parameters.filter(|p| !p.is_null()) {
            let param = format!("{at}.function.parameters");
            let mut parameters = clean_schema(&parameters, &param)?;
            let kind = parameters
                .entry("type")
                .or_insert_with(|| Value::String("object".into()));
            if !kind
                .as_str()
                .is_some_and(|kind| kind.eq_ignore_ascii_case("object"))
            {
                return Err(GatewayError::invalid_request(
                    format!("'{param}' must be an object schema."),
                    Some(param),
                ));
            }
            // Gemini refuses an object schema with empty `properties`; a function without
            // arguments is declared without `parameters` instead.
            if parameters.contains_key("properties") {
                declaration.insert("parameters".into(), Value::Object(parameters));
            }
        }
        names.push(function.name);
        declarations.push(Value::Object(declaration));
    }
    Ok(declarations)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ToolChoiceSpec {
    Mode(String),
    Object(ToolChoiceObject),
}

#[derive(Deserialize)]
struct ToolChoiceObject {
    r#type: String,
    #[serde(default)]
    function: Option<FunctionName>,
    #[serde(default)]
    allowed_tools: Option<AllowedTools>,
}

#[derive(Deserialize)]
struct FunctionName {
    name: String,
}

#[derive(Deserialize)]
struct AllowedTools {
    mode: String,
    tools: Vec<ToolChoiceObject>,
}

/// `tool_choice` -> `functionCallingConfig`. `allowed_tools` in `auto` mode has no Gemini
/// counterpart (`allowedFunctionNames` needs mode ANY), so the declarations themselves are
/// narrowed to the allowed functions, which is what the client asked for.
fn calling_config(
    choice: &ToolChoiceSpec,
    declarations: &mut Vec<Value>,
) -> Result<Option<Value>, GatewayError> {
    let declared = |name: &str| {
        declarations
            .iter()
            .any(|declaration| declaration["name"] == name)
    };
    let unknown = |name: &str, param: &str| {
        GatewayError::invalid_request(
            format!("'{param}' names the function `{name}`, which is not among 'tools'."),
            Some(param.to_owned()),
        )
    };
    let needs_tools = |param: &str| {
        GatewayError::invalid_request(
            format!("'{param}' requires a function call but no 'tools' were given."),
            Some(param.to_owned()),
        )
    };

    let (mode, allowed): (&str, Option<Vec<String>>) = match choice {
        ToolChoiceSpec::Mode(mode) => match mode.as_str() {
            "auto" => ("AUTO", None),
            "none" => ("NONE", None),
            "required" => ("ANY", None),
            other => {
                return Err(GatewayError::invalid_request(
                    format!(
                        "Invalid value for 'tool_choice': `{other}` (expected auto, none or \
                         required)."
                    ),
                    Some("tool_choice".into()),
                ));
            }
        },
        ToolChoiceSpec::Object(object) => match object.r#type.as_str() {
            "function" => {
                let Some(function) = &object.function else {
                    return Err(GatewayError::invalid_request(
                        "'tool_choice.function' is required when its type is `function`.",
                        Some("tool_choice.function".into()),
                    ));
                };
                if !declared(&function.name) {
                    return Err(unknown(&function.name, "tool_choice.function.name"));
                }
                ("ANY", Some(vec![function.name.clone()]))
            }
            "allowed_tools" => {
                let Some(allowed) = &object.allowed_tools else {
                    return Err(GatewayError::invalid_request(
                        "'tool_choice.allowed_tools' is required when its type is \
                         `allowed_tools`.",
                        Some("tool_choice.allowed_tools".into()),
                    ));
                };
                let mut names = Vec::with_capacity(allowed.tools.len());
                for (index, tool) in allowed.tools.iter().enumerate() {
                    let param = format!("tool_choice.allowed_tools.tools[{index}]");
                    let name = match (&*tool.r#type, &tool.function) {
                        ("function", Some(function)) => &function.name,
                        _ => {
                            return Err(unsupported(
                                &param,
                                &format!("Only function tools in '{param}'"),
                            ));
                        }
                    };
                    if !declared(name) {
                        return Err(unknown(name, &format!("{param}.function.name")));
                    }
                    names.push(name.clone());
                }
                match allowed.mode.as_str() {
                    "auto" => {
                        declarations.retain(|declaration| {
                            declaration["name"]
                                .as_str()
                                .is_some_and(|name| names.iter().any(|allowed| allowed == name))
                        });
                        ("AUTO", None)
                    }
                    "required" => ("ANY", Some(names)),
                    other => {
                        return Err(GatewayError::invalid_request(
                            format!(
                                "Invalid value for 'tool_choice.allowed_tools.mode': `{other}` \
                                 (expected auto or required)."
                            ),
                            Some("tool_choice.allowed_tools.mode".into()),
                        ));
                    }
                }
            }
            other => {
                return Err(unsupported(
                    "tool_choice.type",
                    &format!("The tool choice type `{other}` in 'tool_choice.type'"),
                ));
            }
        },
    };

    if declarations.is_empty() {
        return if mode == "ANY" {
            Err(needs_tools("tool_choice"))
        } else {
            // No functions: nothing to call or to refrain from calling.
            Ok(None)
        };
    }
    let mut config = Map::new();
    config.insert("mode".into(), Value::String(mode.into()));
    if let Some(allowed) = allowed {
        config.insert("allowedFunctionNames".into(), json!(allowed));
    }
    Ok(Some(Value::Object(config)))
}

/// Consecutive turns of one role, merged: Gemini wants user and model turns to alternate, and
/// a model turn's function calls answered together in the next user turn.
#[derive(Default)]
struct Turns {
    turns: Vec<(&'static str, Vec<Value>)>,
}

impl Turns {
    fn push(&mut self, role: &'static str, parts: Vec<Value>) {
        if parts.is_empty() {
            return;
        }
        match self.turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(parts),
            _ => self.turns.push((role, parts)),
        }
    }

    fn into_contents(self) -> Vec<Value> {
        self.turns
            .into_iter()
            .map(|(role, parts)| json!({ "role": role, "parts": parts }))
            .collect()
    }
}

#[derive(Deserialize)]
struct ToolCallSpec {
    id: String,
    #[serde(default)]
    r#type: Option<String>,
    function: CalledFunction,
    #[serde(default)]
    extra_content: Option<ExtraContent>,
}

#[derive(Deserialize)]
struct CalledFunction {
    name: String,
    #[serde(default)]
    arguments: Option<String>,
}

/// Where Google's OpenAI-compatible endpoint (and this gateway's responses) carry a function
/// call's thought signature, which Gemini 3 requires back with the call.
#[derive(Deserialize)]
struct ExtraContent {
    #[serde(default)]
    google: Option<GoogleExtra>,
}

#[derive(Deserialize)]
struct GoogleExtra {
    #[serde(default)]
    thought_signature: Option<String>,
}

/// Returns the system instruction's parts and the `contents`.
fn translate_messages(messages: &[ChatMessage]) -> Result<(Vec<Value>, Vec<Value>), GatewayError> {
    let mut system = Vec::new();
    let mut turns = Turns::default();
    // Tool call id -> function name, for the `functionResponse` of a later tool message. Later
    // calls override earlier ones, so a client reusing ids per turn still resolves correctly.
    let mut call_names: HashMap<&str, &str> = HashMap::new();

    for (index, message) in messages.iter().enumerate() {
        let at = format!("messages[{index}]");
        match message.role {
            // Gemini has one system instruction, so every system or developer message joins
            // it, in order.
            Role::System | Role::Developer => {
                reject_extras(message, &at, &[])?;
                system.extend(text_only_parts(message.content.as_ref(), &at)?);
            }
            Role::User => {
                reject_extras(message, &at, &[])?;
                turns.push("user", user_parts(message.content.as_ref(), &at)?);
            }
            Role::Assistant => {
                reject_extras(message, &at, &["tool_calls", "refusal"])?;
                let mut parts = assistant_text_parts(message.content.as_ref(), &at)?;
                match message.extra.get("refusal") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(refusal)) => push_text(&mut parts, refusal),
                    Some(_) => {
                        return Err(GatewayError::invalid_request(
                            format!("'{at}.refusal' must be a string."),
                            Some(format!("{at}.refusal")),
                        ));
                    }
                }
                if let Some(calls) = message.extra.get("tool_calls").filter(|c| !c.is_null()) {
                    let calls_at = format!("{at}.tool_calls");
                    let calls = calls.as_array().ok_or_else(|| {
                        GatewayError::invalid_request(
                            format!("'{calls_at}' must be an array."),
                            Some(calls_at.clone()),
                        )
                    })?;
                    for (position, call) in calls.iter().enumerate() {
                        let call_at = format!("{calls_at}[{position}]");
                        let spec: ToolCallSpec = parse(call, &call_at)?;
                        parts.push(function_call_part(&spec, &call_at)?);
                        // Borrow the id and name from the message itself (it outlives the map).
                        if let (Some(id), Some(name)) = (
                            call.get("id").and_then(Value::as_str),
                            call.pointer("/function/name").and_then(Value::as_str),
                        ) {
                            call_names.insert(id, name);
                        }
                    }
                }
                turns.push("model", parts);
            }
            Role::Tool => {
                reject_extras(message, &at, &["tool_call_id"])?;
                let id_at = format!("{at}.tool_call_id");
                let Some(id) = message.extra.get("tool_call_id").and_then(Value::as_str) else {
                    return Err(GatewayError::invalid_request(
                        format!("'{id_at}' is required for a tool message."),
                        Some(id_at),
                    ));
                };
                let Some(name) = call_names.get(id) else {
                    return Err(GatewayError::invalid_request(
                        format!(
                            "'{id_at}' is `{id}`, which no earlier assistant tool call has; \
                             Gemini needs the function's name, found through that call."
                        ),
                        Some(id_at),
                    ));
                };
                let result = tool_result_text(message.content.as_ref(), &at)?;
                turns.push(
                    "user",
                    vec![json!({
                        "functionResponse": {"name": name, "response": {"content": result}}
                    })],
                );
            }
            Role::Function => {
                return Err(unsupported(
                    &format!("{at}.role"),
                    &format!(
                        "The deprecated `function` role is not translated for Gemini (use \
                         `tool` messages); '{at}.role'"
                    ),
                ));
            }
        }
    }
    Ok((system, turns.into_contents()))
}

fn reject_extras(message: &ChatMessage, at: &str, allowed: &[&str]) -> Result<(), GatewayError> {
    for (key, value) in &message.extra {
        if value.is_null() || allowed.contains(&key.as_str()) {
            continue;
        }
        let param = format!("{at}.{key}");
        return Err(unsupported(&param, &format!("'{param}'")));
    }
    Ok(())
}

/// Gemini refuses empty text parts, and an empty one carries nothing.
fn push_text(parts: &mut Vec<Value>, text: &str) {
    if !text.is_empty() {
        parts.push(json!({ "text": text }));
    }
}

fn part_text<'a>(part: &'a ContentPart, at: &str) -> Result<&'a str, GatewayError> {
    part.text.as_deref().ok_or_else(|| {
        GatewayError::invalid_request(
            format!("'{at}.text' is required for a text part."),
            Some(format!("{at}.text")),
        )
    })
}

fn wrong_part(at: &str, kind: &str, allowed: &str) -> GatewayError {
    GatewayError::invalid_request(
        format!("The content part type `{kind}` is not supported here by Gemini ({allowed})."),
        Some(format!("{at}.type")),
    )
}

fn text_only_parts(content: Option<&MessageContent>, at: &str) -> Result<Vec<Value>, GatewayError> {
    let mut parts = Vec::new();
    match content {
        None => {}
        Some(MessageContent::Text(text)) => push_text(&mut parts, text),
        Some(MessageContent::Parts(items)) => {
            for (index, part) in items.iter().enumerate() {
                let part_at = format!("{at}.content[{index}]");
                if part.r#type != "text" {
                    return Err(wrong_part(&part_at, &part.r#type, "text only"));
                }
                push_text(&mut parts, part_text(part, &part_at)?);
            }
        }
    }
    Ok(parts)
}

fn assistant_text_parts(
    content: Option<&MessageContent>,
    at: &str,
) -> Result<Vec<Value>, GatewayError> {
    let mut parts = Vec::new();
    match content {
        None => {}
        Some(MessageContent::Text(text)) => push_text(&mut parts, text),
        Some(MessageContent::Parts(items)) => {
            for (index, part) in items.iter().enumerate() {
                let part_at = format!("{at}.content[{index}]");
                match part.r#type.as_str() {
                    "text" => push_text(&mut parts, part_text(part, &part_at)?),
                    "refusal" => {
                        let refusal = part.extra.get("refusal").and_then(Value::as_str);
                        let Some(refusal) = refusal else {
                            return Err(GatewayError::invalid_request(
                                format!("'{part_at}.refusal' is required for a refusal part."),
                                Some(format!("{part_at}.refusal")),
                            ));
                        };
                        push_text(&mut parts, refusal);
                    }
                    other => return Err(wrong_part(&part_at, other, "text or refusal")),
                }
            }
        }
    }
    Ok(parts)
}

/// A function result is one value for Gemini; text parts are joined.
fn tool_result_text(content: Option<&MessageContent>, at: &str) -> Result<String, GatewayError> {
    match content {
        None => Ok(String::new()),
        Some(MessageContent::Text(text)) => Ok(text.clone()),
        Some(MessageContent::Parts(items)) => {
            let mut texts = Vec::with_capacity(items.len());
            for (index, part) in items.iter().enumerate() {
                let part_at = format!("{at}.content[{index}]");
                if part.r#type != "text" {
                    return Err(wrong_part(&part_at, &part.r#type, "text only"));
                }
                texts.push(part_text(part, &part_at)?);
            }
            Ok(texts.join("\n"))
        }
    }
}

fn function_call_part(call: &ToolCallSpec, at: &str) -> Result<Value, GatewayError> {
    if let Some(kind) = call.r#type.as_deref()
        && kind != "function"
    {
        return Err(unsupported(
            &format!("{at}.type"),
            &format!("The tool call type `{kind}` in '{at}.type'"),
        ));
    }
    if call.id.is_empty() {
        return Err(GatewayError::invalid_request(
            format!("'{at}.id' must not be empty."),
            Some(format!("{at}.id")),
        ));
    }
    let arguments_at = format!("{at}.function.arguments");
    let arguments = call.function.arguments.as_deref().unwrap_or("").trim();
    // Some clients send "" for a call without arguments.
    let args = if arguments.is_empty() {
        Value::Object(Map::new())
    } else {
        match serde_json::from_str::<Value>(arguments) {
            Ok(object @ Value::Object(_)) => object,
            Ok(other) => {
                return Err(GatewayError::invalid_request(
                    format!(
                        "'{arguments_at}' must encode a JSON object for Gemini, found `{other}`."
                    ),
                    Some(arguments_at),
                ));
            }
            Err(err) => {
                return Err(GatewayError::invalid_request(
                    format!("'{arguments_at}' is not valid JSON: {err}."),
                    Some(arguments_at),
                ));
            }
        }
    };
    let mut part = Map::new();
    part.insert(
        "functionCall".into(),
        json!({ "name": call.function.name, "args": args }),
    );
    if let Some(signature) = call
        .extra_content
        .as_ref()
        .and_then(|extra| extra.google.as_ref())
        .and_then(|google| google.thought_signature.clone())
    {
        part.insert("thoughtSignature".into(), Value::String(signature));
    }
    Ok(Value::Object(part))
}

fn user_parts(content: Option<&MessageContent>, at: &str) -> Result<Vec<Value>, GatewayError> {
    let mut parts = Vec::new();
    match content {
        None => {}
        Some(MessageContent::Text(text)) => push_text(&mut parts, text),
        Some(MessageContent::Parts(items)) => {
            for (index, part) in items.iter().enumerate() {
                let part_at = format!("{at}.content[{index}]");
                match part.r#type.as_str() {
                    "text" => push_text(&mut parts, part_text(part, &part_at)?),
                    "image_url" => parts.push(image_part(part, &part_at)?),
                    "input_audio" => parts.push(audio_part(part, &part_at)?),
                    "file" => parts.push(file_part(part, &part_at)?),
                    other => {
                        return Err(wrong_part(
                            &part_at,
                            other,
                            "text, image_url, input_audio or file",
                        ));
                    }
                }
            }
        }
    }
    Ok(parts)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrlSpec {
    Url(String),
    Object { url: String },
}

fn image_part(part: &ContentPart, at: &str) -> Result<Value, GatewayError> {
    let spec_at = format!("{at}.image_url");
    let Some(spec) = part.extra.get("image_url") else {
        return Err(GatewayError::invalid_request(
            format!("'{spec_at}' is required for an image_url part."),
            Some(spec_at),
        ));
    };
    let url = match parse::<ImageUrlSpec>(spec, &spec_at)? {
        ImageUrlSpec::Url(url) | ImageUrlSpec::Object { url } => url,
    };
    let url_at = format!("{spec_at}.url");
    if url.starts_with("data:") {
        return inline_data(&url, &url_at);
    }
    let lower = url.get(..8).unwrap_or(&url).to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        return Ok(json!({
            "fileData": {"mimeType": image_mime_from_url(&url), "fileUri": url}
        }));
    }
    Err(GatewayError::invalid_request(
        format!("'{url_at}' must be an http(s) URL or a base64 `data:` URL."),
        Some(url_at),
    ))
}

/// Gemini needs a media type with a file URI; the extension is the only hint without fetching
/// the file, and JPEG is the likeliest image when there is none.
fn image_mime_from_url(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let last = path.rsplit('/').next().unwrap_or(path);
    let extension = last
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase());
    match extension.as_deref() {
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("heic") => "image/heic",
        Some("heif") => "image/heif",
        _ => "image/jpeg",
    }
}

/// `data:<mime>;base64,<data>` -> `inlineData`. Gemini takes the base64 as is, so it is only
/// checked, not decoded.
fn inline_data(url: &str, at: &str) -> Result<Value, GatewayError> {
    let invalid = |why: &str| {
        GatewayError::invalid_request(
            format!("'{at}' is not a usable data URL: {why}."),
            Some(at.to_owned()),
        )
    };
    let rest = url.strip_prefix("data:").unwrap_or(url);
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(invalid("it has no `,` before the data"));
    };
    let mut meta = meta.split(';');
    let mime = meta.next().unwrap_or("").trim();
    if !meta.any(|flag| flag.trim().eq_ignore_ascii_case("base64")) {
        return Err(invalid("only base64 data URLs are supported"));
    }
    if mime.is_empty() {
        return Err(invalid("it does not name its media type"));
    }
    base64_data(data).map_err(|why| invalid(&why))?;
    Ok(json!({ "inlineData": {"mimeType": mime, "data": data} }))
}

fn base64_data(data: &str) -> Result<(), String> {
    if data.is_empty() {
        return Err("the data is empty".into());
    }
    match data.bytes().find(|byte| {
        !(byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/' | b'=' | b'-' | b'_'))
    }) {
        Some(byte) => Err(format!(
            "the data is not base64 (found {:?})",
            char::from(byte)
        )),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
struct InputAudio {
    data: String,
    format: String,
}

fn audio_part(part: &ContentPart, at: &str) -> Result<Value, GatewayError> {
    let audio_at = format!("{at}.input_audio");
    let Some(audio) = part.extra.get("input_audio") else {
        return Err(GatewayError::invalid_request(
            format!("'{audio_at}' is required for an input_audio part."),
            Some(audio_at),
        ));
    };
    let audio: InputAudio = parse(audio, &audio_at)?;
    let mime = match audio.format.as_str() {
        "wav" => "audio/wav",
        "mp3" => "audio/mp3",
        "aiff" => "audio/aiff",
        "aac" => "audio/aac",
        "ogg" => "audio/ogg",
        "flac" => "audio/flac",
        other => {
            return Err(unsupported(
                &format!("{audio_at}.format"),
                &format!("The audio format `{other}` in '{audio_at}.format'"),
            ));
        }
    };
    let data_at = format!("{audio_at}.data");
    base64_data(&audio.data).map_err(|why| {
        GatewayError::invalid_request(format!("'{data_at}': {why}."), Some(data_at.clone()))
    })?;
    Ok(json!({ "inlineData": {"mimeType": mime, "data": audio.data} }))
}

#[derive(Deserialize)]
struct FileSpec {
    #[serde(default)]
    file_data: Option<String>,
    #[serde(default)]
    file_id: Option<String>,
    #[serde(default)]
    filename: Option<String>,
}

fn file_part(part: &ContentPart, at: &str) -> Result<Value, GatewayError> {
    let file_at = format!("{at}.file");
    let Some(file) = part.extra.get("file") else {
        return Err(GatewayError::invalid_request(
            format!("'{file_at}' is required for a file part."),
            Some(file_at),
        ));
    };
    let file: FileSpec = parse(file, &file_at)?;
    if file.file_id.is_some() {
        return Err(unsupported(
            &format!("{file_at}.file_id"),
            &format!(
                "An OpenAI file id cannot be read by Gemini (send 'file_data'); '{file_at}.file_id'"
            ),
        ));
    }
    let data_at = format!("{file_at}.file_data");
    let Some(data) = file.file_data else {
        return Err(GatewayError::invalid_request(
            format!("'{data_at}' is required for a file part."),
            Some(data_at),
        ));
    };
    if data.starts_with("data:") {
        return inline_data(&data, &data_at);
    }
    // Plain base64: the file name's extension is the only hint of its type.
    let mime = file
        .filename
        .as_deref()
        .and_then(|name| name.rsplit_once('.'))
        .and_then(|(_, ext)| match ext.to_ascii_lowercase().as_str() {
            "pdf" => Some("application/pdf"),
            "txt" => Some("text/plain"),
            "md" => Some("text/markdown"),
            "csv" => Some("text/csv"),
            "html" | "htm" => Some("text/html"),
            "png" => Some("image/png"),
            "jpg" | "jpeg" => Some("image/jpeg"),
            "webp" => Some("image/webp"),
            _ => None,
        });
    let Some(mime) = mime else {
        return Err(GatewayError::invalid_request(
            format!(
                "'{data_at}' is plain base64 and its type cannot be told from 'filename'; send \
                 a `data:<media type>;base64,...` URL."
            ),
            Some(data_at),
        ));
    };
    base64_data(&data).map_err(|why| {
        GatewayError::invalid_request(format!("'{data_at}': {why}."), Some(data_at.clone()))
    })?;
    Ok(json!({ "inlineData": {"mimeType": mime, "data": data} }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(request: Value) -> Result<Value, GatewayError> {
        let request = ChatCompletionRequest::from_json(request.to_string().as_bytes()).unwrap();
        to_gemini_request(&request)
    }

    fn param_of(err: &GatewayError) -> Option<&str> {
        match err {
            GatewayError::InvalidRequest { param, .. } => param.as_deref(),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "a", "parameters":
                {"properties": {"x": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "b"}}
        ])
    }

    fn with_choice(choice: Value) -> Value {
        translate(
            json!({"model": "g", "messages": [{"role": "user", "content": "hi"}],
            "tools": tools(), "tool_choice": choice}),
        )
        .unwrap()
    }

    #[test]
    fn tool_choice_modes() {
        let config = |body: &Value| body["toolConfig"]["functionCallingConfig"].clone();
        assert_eq!(config(&with_choice(json!("auto"))), json!({"mode": "AUTO"}));
        assert_eq!(config(&with_choice(json!("none"))), json!({"mode": "NONE"}));
        assert_eq!(
            config(&with_choice(json!("required"))),
            json!({"mode": "ANY"})
        );

        let allowed = |mode: &str| {
            with_choice(
                json!({"type": "allowed_tools", "allowed_tools": {"mode": mode,
                "tools": [{"type": "function", "function": {"name": "b"}}]}}),
            )
        };
        let auto = allowed("auto");
        assert_eq!(config(&auto), json!({"mode": "AUTO"}));
        assert_eq!(
            auto["tools"],
            json!([{"functionDeclarations": [{"name": "b"}]}])
        );
        let required = allowed("required");
        assert_eq!(
            config(&required),
            json!({"mode": "ANY", "allowedFunctionNames": ["b"]})
        );
        assert_eq!(
            required["tools"][0]["functionDeclarations"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        // A schema with properties but no type is an object schema.
        assert_eq!(
            required["tools"][0]["functionDeclarations"][0]["parameters"]["type"],
            "object"
        );
    }

    #[test]
    fn tool_choice_without_tools() {
        let body = translate(
            json!({"model": "g", "messages": [{"role": "user", "content": "hi"}],
            "tool_choice": "none"}),
        )
        .unwrap();
        assert!(body.get("toolConfig").is_none());
        assert!(body.get("tools").is_none());
    }

    #[test]
    fn bad_function_declarations() {
        let request = |tools: Value| {
            translate(
                json!({"model": "g", "messages": [{"role": "user", "content": "hi"}],
                "tools": tools}),
            )
        };
        let err = request(json!([{"type": "function", "function":
            {"name": "a", "parameters": {"type": "string"}}}]))
        .unwrap_err();
        assert_eq!(param_of(&err), Some("tools[0].function.parameters"));
        let err = request(json!([{"type": "function", "function": {"name": "a"}},
            {"type": "function", "function": {"name": "a"}}]))
        .unwrap_err();
        assert_eq!(param_of(&err), Some("tools[1].function.name"));
        let err = request(json!([{"type": "function"}])).unwrap_err();
        assert_eq!(param_of(&err), Some("tools[0].function"));
    }

    #[test]
    fn reused_tool_call_ids_resolve_to_the_latest_call() {
        let call = |name: &str| {
            json!({"role": "assistant", "content": "", "function_call": null, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": name, "arguments": ""}}]})
        };
        let body = translate(json!({"model": "g", "messages": [
            {"role": "user", "content": "go"},
            call("first"),
            {"role": "tool", "tool_call_id": "call_0", "content": "1"},
            call("second"),
            {"role": "tool", "tool_call_id": "call_0", "content": "2"}
        ]}))
        .unwrap();
        let contents = body["contents"].as_array().unwrap();
        assert_eq!(contents.len(), 5);
        assert_eq!(
            contents[1]["parts"][0],
            json!({"functionCall": {"name": "first", "args": {}}})
        );
        assert_eq!(
            contents[4]["parts"][0]["functionResponse"]["name"],
            "second"
        );
    }

    #[test]
    fn empty_turns_vanish_and_neighbours_merge() {
        let body = translate(json!({"model": "g", "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": [{"type": "image_url", "image_url": "https://x.test/i.gif"}]}
        ]}))
        .unwrap();
        assert_eq!(
            body["contents"],
            json!([{"role": "user", "parts": [
                {"text": "a"},
                {"fileData": {"mimeType": "image/gif", "fileUri": "https://x.test/i.gif"}}
            ]}])
        );
    }

    #[test]
    fn reasoning_effort_and_penalties() {
        let body = translate(
            json!({"model": "g", "messages": [{"role": "user", "content": "hi"}],
            "reasoning_effort": "none", "frequency_penalty": -0.5, "top_k": 40,
            "logprobs": true, "top_logprobs": 0}),
        )
        .unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"thinkingConfig": {"thinkingBudget": 0}, "frequencyPenalty": -0.5,
                   "topK": 40, "responseLogprobs": true})
        );
    }

    #[test]
    fn data_urls_are_checked() {
        let image = |url: &str| {
            translate(
                json!({"model": "g", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}]}),
            )
        };
        assert!(image("data:;base64,AAAA").is_err());
        assert!(image("data:image/png;base64,not base64!").is_err());
        assert!(image("data:image/png;base64,").is_err());
        let body = image("data:image/png;charset=x;base64,iVBORw0KGgo=").unwrap();
        assert_eq!(
            body["contents"][0]["parts"][0]["inlineData"]["mimeType"],
            "image/png"
        );
    }

    #[test]
    fn plain_base64_files_need_a_known_extension() {
        let file = |name: &str| {
            translate(
                json!({"model": "g", "messages": [{"role": "user", "content": [
                {"type": "file", "file": {"filename": name, "file_data": "JVBERi0="}}]}]}),
            )
        };
        let body = file("report.PDF").unwrap();
        assert_eq!(
            body["contents"][0]["parts"][0],
            json!({"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}})
        );
        let err = file("blob.bin").unwrap_err();
        assert_eq!(
            param_of(&err),
            Some("messages[0].content[0].file.file_data")
        );
    }
}
