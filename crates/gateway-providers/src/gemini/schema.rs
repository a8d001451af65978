//! JSON Schema (as OpenAI clients write it) -> the OpenAPI 3.0 subset Gemini's `Schema` accepts.
//!
//! Gemini rejects the whole request on a keyword it does not know (`additionalProperties`,
//! `$schema`, `$defs`...), on `properties` under a non-object type, on an empty `properties`
//! map, and on string formats other than `enum` and `date-time`. Tool and response schemas come
//! from generators (Pydantic, Zod, MCP servers) that emit all of these, so the schema is
//! rebuilt from an allow-list rather than patched: local `$ref`s are inlined, `allOf` merged,
//! `oneOf` read as `anyOf`, and JSON Schema's `null` type turned into Gemini's `nullable`.

use gateway_core::GatewayError;
use serde_json::{Map, Value};

/// Deeper than any hand-written schema; stops a pathological one from exhausting the stack.
const MAX_DEPTH: usize = 64;

/// Keywords copied as they are when their value has the expected JSON type.
const COPIED_STRINGS: [&str; 3] = ["title", "description", "pattern"];
const COPIED_NUMBERS: [&str; 8] = [
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minProperties",
    "maxProperties",
];

/// Cleans `schema` for Gemini. `param` names the schema in error messages
/// (`tools[0].function.parameters`).
pub(crate) fn clean_schema(
    schema: &Value,
    param: &str,
) -> Result<Map<String, Value>, GatewayError> {
    let mut cleaner = Cleaner {
        root: schema,
        param,
        expanding: Vec::new(),
    };
    cleaner.clean(schema, 0)
}

struct Cleaner<'a> {
    root: &'a Value,
    param: &'a str,
    /// The `$ref`s being inlined on the current path: meeting one again means recursion, which
    /// inlining cannot express.
    expanding: Vec<String>,
}

impl Cleaner<'_> {
    fn error(&self, message: impl std::fmt::Display) -> GatewayError {
        GatewayError::invalid_request(
            format!("Invalid schema in '{}': {message}", self.param),
            Some(self.param.to_owned()),
        )
    }

    fn clean(&mut self, node: &Value, depth: usize) -> Result<Map<String, Value>, GatewayError> {
        if depth > MAX_DEPTH {
            return Err(self.error(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let node = match node {
            Value::Object(map) => map,
            // `true` is JSON Schema's "anything"; Gemini's closest is a schema with no constraint.
            Value::Bool(true) => return Ok(Map::new()),
            other => {
                return Err(self.error(format!("expected a schema object, found `{other}`")));
            }
        };

        if let Some(reference) = node.get("$ref") {
            return self.inline_ref(node, reference, depth);
        }
        if let Some(all_of) = node.get("allOf") {
            return self.merge_all_of(node, all_of, depth);
        }

        let mut out = Map::new();
        let mut nullable = node.get("nullable").and_then(Value::as_bool) == Some(true);

        match node.get("type") {
            Some(Value::String(kind)) => {
                out.insert("type".into(), Value::String(kind.clone()));
            }
            Some(Value::Array(kinds)) => {
                let mut kinds: Vec<&str> = kinds.iter().filter_map(Value::as_str).collect();
                if kinds.contains(&"null") {
                    nullable = true;
                    kinds.retain(|kind| *kind != "null");
                }
                match kinds.as_slice() {
                    [] => {}
                    [kind] => {
                        out.insert("type".into(), Value::String((*kind).to_owned()));
                    }
                    many => {
                        let alternatives = many
                            .iter()
                            .map(|kind| {
                                let mut one = Map::new();
                                one.insert("type".into(), Value::String((*kind).to_owned()));
                                Value::Object(one)
                            })
                            .collect();
                        out.insert("anyOf".into(), Value::Array(alternatives));
                    }
                }
            }
            _ => {}
        }

        if let Some(format @ Value::String(_)) = node.get("format") {
            out.insert("format".into(), format.clone());
        }
        for key in COPIED_STRINGS {
            if let Some(value @ Value::String(_)) = node.get(key) {
                out.insert(key.into(), value.clone());
            }
        }
        for key in COPIED_NUMBERS {
            if let Some(value @ Value::Number(_)) = node.get(key) {
                out.insert(key.into(), value.clone());
            }
        }
        if let Some(value) = node.get("default") {
            out.insert("default".into(), value.clone());
        }
        if let Some(value) = node.get("example") {
            out.insert("example".into(), value.clone());
        } else if let Some(first) = node
            .get("examples")
            .and_then(Value::as_array)
            .and_then(|examples| examples.first())
        {
            out.insert("example".into(), first.clone());
        }
        if let Some(Value::Array(order)) = node.get("propertyOrdering")
            && order.iter().all(Value::is_string)
        {
            out.insert("propertyOrdering".into(), Value::Array(order.clone()));
        }

        // Gemini's enums are lists of strings; a `null` member is JSON Schema's way to say
        // nullable. A numeric enum cannot be expressed, so it is left to the type alone.
        let members = match (node.get("enum"), node.get("const")) {
            (Some(Value::Array(members)), _) => Some(members.clone()),
            (None, Some(constant)) => Some(vec![constant.clone()]),
            _ => None,
        };
        if let Some(mut members) = members {
            if members.iter().any(Value::is_null) {
                nullable = true;
                members.retain(|member| !member.is_null());
            }
            if !members.is_empty() && members.iter().all(Value::is_string) {
                out.insert("enum".into(), Value::Array(members));
                out.entry("type")
                    .or_insert_with(|| Value::String("string".into()));
            }
        }

        if let Some(properties) = node.get("properties") {
            let Value::Object(properties) = properties else {
                return Err(self.error("'properties' must be an object"));
            };
            let mut cleaned = Map::new();
            for (name, property) in properties {
                cleaned.insert(
                    name.clone(),
                    Value::Object(self.clean(property, depth + 1)?),
                );
            }
            if !cleaned.is_empty() {
                if let Some(Value::Array(required)) = node.get("required") {
                    // Gemini refuses a required name that is not a declared property.
                    let required: Vec<Value> = required
                        .iter()
                        .filter(|name| name.as_str().is_some_and(|n| cleaned.contains_key(n)))
                        .cloned()
                        .collect();
                    if !required.is_empty() {
                        out.insert("required".into(), Value::Array(required));
                    }
                }
                out.insert("properties".into(), Value::Object(cleaned));
            }
        }

        match node.get("items") {
            Some(items @ (Value::Object(_) | Value::Bool(true))) => {
                out.insert("items".into(), Value::Object(self.clean(items, depth + 1)?));
            }
            // Draft-4 tuple form: Gemini has no tuples, so each position may be any of them.
            Some(Value::Array(positions)) if !positions.is_empty() => {
                let items = self.alternatives(positions, depth, &mut nullable)?;
                out.insert("items".into(), items);
            }
            _ => {}
        }

        // `oneOf` differs from `anyOf` only in forbidding several matches, which a generated
        // value never exploits; Gemini knows only `anyOf`.
        let alternatives = match (node.get("anyOf"), node.get("oneOf")) {
            (Some(Value::Array(alternatives)), _) | (None, Some(Value::Array(alternatives))) => {
                Some(alternatives)
            }
            _ => None,
        };
        if let Some(alternatives) = alternatives {
            match self.alternatives(alternatives, depth, &mut nullable)? {
                Value::Object(single) => {
                    // `anyOf: [X, null]` (Pydantic's Optional) is X, nullable; the outer
                    // node's own keys (its description) win.
                    for (key, value) in single {
                        out.entry(key).or_insert(value);
                    }
                }
                several => {
                    out.insert("anyOf".into(), several);
                }
            }
        }

        if nullable {
            out.insert("nullable".into(), Value::Bool(true));
        }
        finish_node(&mut out);
        Ok(out)
    }

    /// Cleans a list of alternatives, dropping `{"type":"null"}` ones (noted in `nullable`).
    /// Returns the single remaining schema as an object, several as an array.
    fn alternatives(
        &mut self,
        alternatives: &[Value],
        depth: usize,
        nullable: &mut bool,
    ) -> Result<Value, GatewayError> {
        let mut cleaned = Vec::new();
        for alternative in alternatives {
            let alternative = self.clean(alternative, depth + 1)?;
            if alternative.get("type").and_then(Value::as_str) == Some("null") {
                *nullable = true;
            } else {
                cleaned.push(alternative);
            }
        }
        Ok(match cleaned.len() {
            0 => Value::Object(Map::new()),
            1 => Value::Object(cleaned.swap_remove(0)),
            _ => Value::Array(cleaned.into_iter().map(Value::Object).collect()),
        })
    }

    fn inline_ref(
        &mut self,
        node: &Map<String, Value>,
        reference: &Value,
        depth: usize,
    ) -> Result<Map<String, Value>, GatewayError> {
        let Some(reference) = reference.as_str() else {
            return Err(self.error("'$ref' must be a string"));
        };
        let Some(pointer) = reference.strip_prefix('#') else {
            return Err(self.error(format!(
                "'$ref' `{reference}` is not local; only references into the schema itself \
                 (`#/$defs/...`) can be inlined for Gemini"
            )));
        };
        if self.expanding.iter().any(|seen| seen == reference) {
            return Err(self.error(format!(
                "'$ref' `{reference}` is recursive, which Gemini schemas cannot express"
            )));
        }
        let root = self.root;
        let Some(target) = root.pointer(pointer) else {
            return Err(self.error(format!("'$ref' `{reference}` points nowhere")));
        };
        self.expanding.push(reference.to_owned());
        let inlined = self.clean(target, depth + 1);
        self.expanding.pop();
        let mut inlined = inlined?;
        // Keywords beside a `$ref` (usually a field's own description) describe this use of
        // the definition, so they override the definition's.
        let mut siblings = node.clone();
        siblings.remove("$ref");
        if !siblings.is_empty() {
            for (key, value) in self.clean(&Value::Object(siblings), depth + 1)? {
                inlined.insert(key, value);
            }
            finish_node(&mut inlined);
        }
        Ok(inlined)
    }

    fn merge_all_of(
        &mut self,
        node: &Map<String, Value>,
        all_of: &Value,
        depth: usize,
    ) -> Result<Map<String, Value>, GatewayError> {
        let Value::Array(parts) = all_of else {
            return Err(self.error("'allOf' must be an array"));
        };
        let mut merged = node.clone();
        merged.remove("allOf");
        for part in parts {
            let part = self.clean(part, depth + 1)?;
            merge_into(&mut merged, part);
        }
        // The merged map holds only cleaned parts and the node's own keys, so cleaning it again
        // converts the latter and leaves the former as they are.
        self.clean(&Value::Object(merged), depth + 1)
    }
}

/// `allOf` semantics for the keywords that can add up (properties, required); for the others
/// the first value seen stays.
fn merge_into(target: &mut Map<String, Value>, part: Map<String, Value>) {
    for (key, value) in part {
        match (key.as_str(), target.get_mut(&key), value) {
            ("properties", Some(Value::Object(existing)), Value::Object(more)) => {
                for (name, property) in more {
                    existing.entry(name).or_insert(property);
                }
            }
            ("required", Some(Value::Array(existing)), Value::Array(more)) => {
                for name in more {
                    if !existing.contains(&name) {
                        existing.push(name);
                    }
                }
            }
            (_, Some(_), _) => {}
            (_, None, value) => {
                target.insert(key, value);
            }
        }
    }
}

/// Makes a node consistent the way Gemini checks it: implied types made explicit, keywords
/// that only belong to another type removed, formats limited to the ones Gemini knows.
fn finish_node(out: &mut Map<String, Value>) {
    if !out.contains_key("type") && !out.contains_key("anyOf") {
        if out.contains_key("properties") {
            out.insert("type".into(), Value::String("object".into()));
        } else if out.contains_key("items") {
            out.insert("type".into(), Value::String("array".into()));
        }
    }
    let kind = out
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase);
    if kind.as_deref() != Some("object") {
        out.remove("properties");
        out.remove("required");
        out.remove("propertyOrdering");
    }
    if kind.as_deref() != Some("array") {
        out.remove("items");
    }
    if out
        .get("format")
        .and_then(Value::as_str)
        .is_some_and(|format| !gemini_format(kind.as_deref(), format))
    {
        out.remove("format");
    }
}

/// The formats Gemini accepts for a type; any other format is a 400 there.
fn gemini_format(kind: Option<&str>, format: &str) -> bool {
    matches!(
        (kind, format),
        (Some("string"), "enum" | "date-time")
            | (Some("integer"), "int32" | "int64")
            | (Some("number"), "float" | "double")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn clean(schema: Value) -> Value {
        Value::Object(clean_schema(&schema, "p").unwrap())
    }

    #[test]
    fn drops_rejected_keywords_recursively_but_keeps_property_names() {
        let out = clean(json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "additionalProperties": {"type": "string", "format": "email"},
                "list": {"type": "array", "uniqueItems": true,
                         "items": {"type": "object", "additionalProperties": false,
                                   "properties": {"x": {"type": "integer", "format": "int64"}}}}
            },
            "required": ["additionalProperties", "missing"]
        }));
        assert_eq!(
            out,
            json!({
                "type": "object",
                "properties": {
                    "additionalProperties": {"type": "string"},
                    "list": {"type": "array",
                             "items": {"type": "object",
                                       "properties": {"x": {"type": "integer", "format": "int64"}}}}
                },
                "required": ["additionalProperties"]
            })
        );
    }

    #[test]
    fn inlines_refs_and_reads_optional_as_nullable() {
        let out = clean(json!({
            "$defs": {"Unit": {"type": "string", "enum": ["c", "f"]}},
            "type": "object",
            "properties": {
                "unit": {"anyOf": [{"$ref": "#/$defs/Unit"}, {"type": "null"}],
                         "default": null, "description": "Unit"},
                "when": {"type": ["string", "null"], "format": "date-time"}
            }
        }));
        assert_eq!(
            out,
            json!({
                "type": "object",
                "properties": {
                    "unit": {"type": "string", "enum": ["c", "f"], "nullable": true,
                             "default": null, "description": "Unit"},
                    "when": {"type": "string", "format": "date-time", "nullable": true}
                }
            })
        );
    }

    #[test]
    fn recursive_and_remote_refs_are_refused() {
        let recursive = json!({
            "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
            "$ref": "#/$defs/Node"
        });
        let err = clean_schema(&recursive, "response_format.json_schema.schema").unwrap_err();
        assert!(err.to_string().contains("recursive"), "{err}");
        assert!(
            matches!(err, GatewayError::InvalidRequest { param: Some(ref p), .. }
            if p == "response_format.json_schema.schema")
        );
        let remote = json!({"$ref": "https://example.com/schema.json"});
        assert!(clean_schema(&remote, "p").is_err());
    }

    #[test]
    fn all_of_merges_and_implied_types_are_explicit() {
        let out = clean(json!({
            "allOf": [
                {"properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"const": "x"}}, "required": ["b"]}
            ],
            "description": "both"
        }));
        assert_eq!(
            out,
            json!({
                "type": "object",
                "description": "both",
                "properties": {"a": {"type": "string"}, "b": {"type": "string", "enum": ["x"]}},
                "required": ["a", "b"]
            })
        );
    }

    #[test]
    fn empty_properties_and_foreign_keywords_go() {
        let out = clean(json!({
            "type": "object",
            "properties": {
                "free": {"type": "object", "properties": {}},
                "n": {"type": "integer", "enum": [1, 2], "properties": {"x": {}}},
                "choice": {"oneOf": [{"type": "string"}, {"type": "integer"}]}
            }
        }));
        assert_eq!(
            out,
            json!({
                "type": "object",
                "properties": {
                    "free": {"type": "object"},
                    "n": {"type": "integer"},
                    "choice": {"anyOf": [{"type": "string"}, {"type": "integer"}]}
                }
            })
        );
    }

    #[test]
    fn non_object_schema_is_refused() {
        let err = clean_schema(&json!({"properties": {"a": "string"}}), "p").unwrap_err();
        assert!(err.to_string().contains("`\"string\"`"), "{err}");
    }
}
