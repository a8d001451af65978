//! Helpers every crate's config section uses: `${ENV_VAR}` interpolation and deserialisation
//! that reports errors with their full path (`providers[1].timeout_secs: invalid type ...`).

use serde::de::DeserializeOwned;

/// One problem in a config file, with the path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Replaces `${NAME}` in every string value with the environment variable `NAME`.
///
/// Interpolation runs on parsed values, not on the file's text, so a secret containing quotes or
/// newlines cannot change the file's structure. `$${` escapes a literal `${`. A missing variable
/// is an error naming both the variable and the config path.
pub fn interpolate_env(
    value: &mut toml::Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    match value {
        toml::Value::String(text) if text.contains('$') => match interpolate_str(text, lookup) {
            Ok(replaced) => *text = replaced,
            Err(message) => errors.push(ConfigError::new(path, message)),
        },
        toml::Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                interpolate_env(item, &format!("{path}[{index}]"), lookup, errors);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                interpolate_env(item, &child, lookup, errors);
            }
        }
        _ => {}
    }
}

fn interpolate_str(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(open) = after.strip_prefix("${") {
            let end = open
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in {text:?}"))?;
            let name = &open[..end];
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("invalid environment variable name {name:?}"));
            }
            let value =
                lookup(name).ok_or_else(|| format!("environment variable `{name}` is not set"))?;
            out.push_str(&value);
            rest = &open[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserialises one config section, reporting the failing field by its full path.
pub fn deserialize_section<T: DeserializeOwned>(
    value: toml::Value,
    path: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let inner = err.path().to_string();
        let full = match (path.is_empty(), inner.as_str()) {
            (true, _) => inner.clone(),
            (false, ".") => path.to_string(),
            (false, _) if inner.starts_with('[') => format!("{path}{inner}"),
            (false, _) => format!("{path}.{inner}"),
        };
        ConfigError::new(full, err.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("s3cr\"et".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolates_nested_values() {
        let mut value: toml::Value = toml::from_str(
            r#"
            [[providers]]
            api_keys = ["${KEY}", "plain", "a-$${literal}"]
            name = "x${EMPTY}y"
            "#,
        )
        .unwrap();
        let mut errors = Vec::new();
        interpolate_env(&mut value, "", &env, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let provider = &value["providers"][0];
        assert_eq!(provider["api_keys"][0].as_str(), Some("s3cr\"et"));
        assert_eq!(provider["api_keys"][2].as_str(), Some("a-${literal}"));
        assert_eq!(provider["name"].as_str(), Some("xy"));
    }

    #[test]
    fn missing_variable_names_path_and_variable() {
        let mut value: toml::Value =
            toml::from_str(r#"providers = [{ api_keys = ["${NOPE}"] }]"#).unwrap();
        let mut errors = Vec::new();
        interpolate_env(&mut value, "", &env, &mut errors);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "providers[0].api_keys[0]");
        assert!(errors[0].message.contains("NOPE"));
    }

    #[test]
    fn section_errors_carry_full_path() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Section {
            timeout_secs: u64,
        }
        let value: toml::Value = toml::from_str(r#"timeout_secs = "slow""#).unwrap();
        let err = deserialize_section::<Section>(value, "providers[1]").unwrap_err();
        assert_eq!(err.path, "providers[1].timeout_secs");
        let value: toml::Value = toml::from_str("bogus = 1\ntimeout_secs = 1").unwrap();
        let err = deserialize_section::<Section>(value, "server").unwrap_err();
        assert!(err.message.contains("bogus"), "{err}");
    }
}
