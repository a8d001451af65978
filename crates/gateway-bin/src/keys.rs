//! What the command line and the admin API share about database keys: reading a time span
//! (`90d`, `24h`) and checking a key request against the config (its project must be there,
//! its models must be aliases the project may use).

use gateway_access::KeyStore;
use gateway_business::NewKey;
use std::time::Duration;
use time::OffsetDateTime;

/// A key request the config refuses, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub message: String,
    pub param: &'static str,
}

/// `30s`, `15m`, `24h`, `90d` or `2w`: a whole number and one unit.
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit: s, m, h, d or w (as in 90d)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} should start with a whole number (as in 90d)"))?;
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}: use s, m, h, d or w"
            ));
        }
    };
    // Ten years is past any sensible key lifetime and keeps the arithmetic far from overflow.
    let secs = number
        .checked_mul(unit_secs)
        .filter(|secs| *secs <= 10 * 366 * 86_400)
        .ok_or_else(|| format!("{text:?} is longer than ten years"))?;
    Ok(Duration::from_secs(secs))
}

/// A key of `project` checked against the config in force.
pub fn new_key(
    keys: &KeyStore,
    alias_exists: impl Fn(&str) -> bool,
    project: &str,
    name: Option<String>,
    models: Option<Vec<String>>,
    expires_in: Option<Duration>,
    created_by: &str,
) -> Result<NewKey, Refused> {
    let Some(summary) = keys.projects().iter().find(|p| p.name == project) else {
        return Err(Refused {
            message: format!("no project named `{project}` in the config's [[projects]]"),
            param: "project",
        });
    };
    if let Some(models) = &models {
        if models.is_empty() {
            return Err(Refused {
                message: "models must name at least one alias (omit it for the project's)".into(),
                param: "models",
            });
        }
        for alias in models {
            let allowed = summary
                .models
                .as_ref()
                .is_none_or(|allowed| allowed.contains(alias));
            if !alias_exists(alias) || !allowed {
                return Err(Refused {
                    message: format!("project `{project}` has no alias `{alias}`"),
                    param: "models",
                });
            }
        }
    }
    let expires_at = match expires_in {
        Some(span) if span.is_zero() => {
            return Err(Refused {
                message: "expiry must be in the future".into(),
                param: "expires",
            });
        }
        Some(span) => Some(OffsetDateTime::now_utc() + span),
        None => None,
    };
    Ok(NewKey {
        project: project.to_owned(),
        project_tags_json: serde_json::to_string(&summary.tags).unwrap_or_else(|_| "{}".into()),
        name: name.filter(|name| !name.trim().is_empty()),
        models,
        expires_at,
        created_by: created_by.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;
    use gateway_access::ProjectConfig;

    #[test]
    fn spans_parse_with_one_unit() {
        assert_eq!(parse_span("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert_eq!(parse_span("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_span("2w").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(parse_span("5s").unwrap(), Duration::from_secs(5));
        for bad in [
            "90",
            "d",
            "1.5h",
            "3y",
            "-1d",
            "99999999999999999999d",
            "4000d",
        ] {
            assert!(parse_span(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_must_fit_their_project() {
        let keys = KeyStore::build(&[ProjectConfig {
            name: "p".into(),
            api_keys: vec![],
            models: Some(vec!["chat".into()]),
            tags: Default::default(),
            rate_limit: None,
            capture_prompts: false,
            capture_responses: false,
        }])
        .unwrap();
        let exists = |alias: &str| ["chat", "embed"].contains(&alias);
        let ok = new_key(
            &keys,
            exists,
            "p",
            None,
            Some(vec!["chat".into()]),
            None,
            "cli",
        );
        assert_eq!(ok.unwrap().models, Some(vec!["chat".to_string()]));
        let refused = |project, models: Option<Vec<String>>, expires| {
            new_key(&keys, exists, project, None, models, expires, "cli")
                .unwrap_err()
                .param
        };
        assert_eq!(refused("nope", None, None), "project");
        assert_eq!(refused("p", Some(vec!["embed".into()]), None), "models");
        assert_eq!(refused("p", Some(vec!["ghost".into()]), None), "models");
        assert_eq!(refused("p", Some(vec![]), None), "models");
        assert_eq!(refused("p", None, Some(Duration::ZERO)), "expires");
    }
}
