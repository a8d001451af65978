//! Project keys: SHA-256 digests looked up with a constant-time comparison, the config's
//! first, then the database's (`DbKeys`), which take their project's settings from here.

use crate::config::ProjectConfig;
use crate::directory::DbKeys;
use gateway_core::config::ConfigError;
use gateway_core::{GatewayError, Principal};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::SystemTime;
use subtle::ConstantTimeEq;

/// Hex SHA-256 of a secret key, as written in `[[projects]].api_keys[].sha256`.
pub fn hash_key(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A key digest whose equality is constant-time, so even the hash-map probe that finds a key
/// compares digests without an early exit.
#[derive(Clone, Copy)]
pub(crate) struct KeyDigest(pub(crate) [u8; 32]);

impl PartialEq for KeyDigest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for KeyDigest {}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// Every project key, by digest. Built once per config version.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_digest: HashMap<KeyDigestDebug, Principal>,
    /// Each project's principal without a key: what a database key of the project starts from.
    projects: HashMap<Arc<str>, Principal>,
    summaries: Vec<ProjectSummary>,
}

/// A project as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProjectSummary {
    pub name: String,
    /// Keys in the config (database keys are counted by the database).
    pub config_keys: usize,
    /// Aliases the project may use; `None`: every alias.
    pub models: Option<Vec<String>>,
    pub tags: std::collections::BTreeMap<String, String>,
}

/// `KeyDigest` with a `Debug` that never prints the digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KeyDigestDebug(pub(crate) KeyDigest);

impl std::fmt::Debug for KeyDigestDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDigest(..)")
    }
}

impl KeyStore {
    /// Builds the store, reporting every invalid or duplicated key with its config path.
    pub fn build(projects: &[ProjectConfig]) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut by_digest = HashMap::new();
        let mut names = HashSet::new();
        let mut templates = HashMap::new();
        for (index, project) in projects.iter().enumerate() {
            let path = format!("projects[{index}]");
            if project.name.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.name"),
                    "must not be empty",
                ));
            }
            if !names.insert(project.name.as_str()) {
                errors.push(ConfigError::new(
                    format!("{path}.name"),
                    format!("duplicate project name `{}`", project.name),
                ));
            }
            let allowed_models = project
                .models
                .as_ref()
                .map(|models| Arc::new(models.iter().cloned().collect::<HashSet<_>>()));
            let tags = Arc::new(project.tags.clone());
            let tags_json: Arc<str> = serde_json::to_string(&project.tags)
                .unwrap_or_else(|_| "{}".into())
                .into();
            let project_name: Arc<str> = project.name.as_str().into();
            // What every key of the project shares; database keys are made from it too.
            let template = Principal {
                project: project_name.clone(),
                key_id: "".into(),
                allowed_models,
                tags,
                tags_json,
                project_rate_limit: project.rate_limit,
                key_rate_limit: None,
            };
            let mut key_ids = HashSet::new();
            for (key_index, key) in project.api_keys.iter().enumerate() {
                let key_path = format!("{path}.api_keys[{key_index}]");
                if !key_ids.insert(key.id.as_str()) {
                    errors.push(ConfigError::new(
                        format!("{key_path}.id"),
                        format!(
                            "duplicate key id `{}` in project `{}`",
                            key.id, project.name
                        ),
                    ));
                }
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(key.sha256.trim(), &mut digest).is_err() {
                    errors.push(ConfigError::new(
                        format!("{key_path}.sha256"),
                        "must be 64 hex characters (the output of `gateway keys hash KEY`)",
                    ));
                    continue;
                }
                let principal = Principal {
                    key_id: key.id.as_str().into(),
                    key_rate_limit: key.rate_limit,
                    ..template.clone()
                };
                if by_digest
                    .insert(KeyDigestDebug(KeyDigest(digest)), principal)
                    .is_some()
                {
                    errors.push(ConfigError::new(
                        format!("{key_path}.sha256"),
                        "the same key is configured twice",
                    ));
                }
            }
            templates.insert(project_name, template);
        }
        if errors.is_empty() {
            let summaries = projects
                .iter()
                .map(|project| ProjectSummary {
                    name: project.name.clone(),
                    config_keys: project.api_keys.len(),
                    models: project.models.clone(),
                    tags: project.tags.clone(),
                })
                .collect();
            Ok(Self {
                by_digest,
                projects: templates,
                summaries,
            })
        } else {
            Err(errors)
        }
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    pub fn project_count(&self) -> usize {
        self.summaries.len()
    }

    /// The config's projects, in config order.
    pub fn projects(&self) -> &[ProjectSummary] {
        &self.summaries
    }

    /// Finds the caller of a request from the key it presents, among the config's keys only.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, GatewayError> {
        self.authenticate_with(headers, None, SystemTime::now())
    }

    /// Finds the caller among the config's keys, then the database's (`db`). A database key
    /// works only while its project is in the config, and until its `expires_at` (checked
    /// against `now` on every request, so an expiry needs no refresh to take effect).
    pub fn authenticate_with(
        &self,
        headers: &http::HeaderMap,
        db: Option<&DbKeys>,
        now: SystemTime,
    ) -> Result<Principal, GatewayError> {
        let secret = presented_key(headers)?;
        let digest: [u8; 32] = Sha256::digest(secret).into();
        if let Some(principal) = self.by_digest.get(&KeyDigestDebug(KeyDigest(digest))) {
            return Ok(principal.clone());
        }
        let unknown = GatewayError::Unauthorized {
            message: "Incorrect API key provided.",
        };
        let Some(key) = db.and_then(|db| db.lookup(digest)) else {
            return Err(unknown);
        };
        if key.expires_at.is_some_and(|at| at <= now) {
            return Err(GatewayError::Unauthorized {
                message: "This API key has expired.",
            });
        }
        let Some(template) = self.projects.get(key.project.as_str()) else {
            return Err(unknown);
        };
        let mut principal = template.clone();
        principal.key_id = key.key_id.as_str().into();
        if let Some(models) = &key.models {
            let allowed: HashSet<String> = models
                .iter()
                .filter(|alias| template.may_use(alias))
                .cloned()
                .collect();
            principal.allowed_models = Some(Arc::new(allowed));
        }
        Ok(principal)
    }
}

/// The caller's key: `Authorization: Bearer KEY` (OpenAI clients), `x-api-key` (Anthropic
/// clients) or `api-key` (Azure OpenAI clients), in that order.
fn presented_key(headers: &http::HeaderMap) -> Result<&[u8], GatewayError> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        return bearer_token(value.as_bytes());
    }
    for name in ["x-api-key", "api-key"] {
        if let Some(value) = headers.get(name) {
            let key = value.as_bytes().trim_ascii();
            if key.is_empty() {
                break;
            }
            return Ok(key);
        }
    }
    Err(GatewayError::Unauthorized {
        message: "You didn't provide an API key. Send it as `Authorization: Bearer KEY` (or `x-api-key: KEY`).",
    })
}

fn bearer_token(value: &[u8]) -> Result<&[u8], GatewayError> {
    let scheme_len = b"bearer ".len();
    (value.len() > scheme_len && value[..scheme_len].eq_ignore_ascii_case(b"bearer "))
        .then(|| value[scheme_len..].trim_ascii())
        .filter(|token| !token.is_empty())
        .ok_or(GatewayError::Unauthorized {
            message: "Malformed Authorization header. Send it as `Authorization: Bearer KEY`.",
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyConfig;
    use std::collections::BTreeMap;

    fn project(name: &str, keys: &[(&str, &str)], models: Option<&[&str]>) -> ProjectConfig {
        ProjectConfig {
            name: name.into(),
            api_keys: keys
                .iter()
                .map(|(id, secret)| ApiKeyConfig {
                    id: (*id).into(),
                    sha256: hash_key(secret),
                    rate_limit: None,
                })
                .collect(),
            models: models.map(|m| m.iter().map(|s| (*s).to_string()).collect()),
            tags: BTreeMap::from([("team".into(), "platform".into())]),
            rate_limit: None,
            capture_prompts: false,
            capture_responses: false,
        }
    }

    fn headers(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn hash_matches_known_vector() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn finds_the_right_project_and_key() {
        let store = KeyStore::build(&[
            project("a", &[("a1", "sk-a1"), ("a2", "sk-a2")], None),
            project("b", &[("b1", "sk-b1")], Some(&["chat"])),
        ])
        .unwrap();
        let principal = store.authenticate(&headers("Bearer sk-a2")).unwrap();
        assert_eq!(&*principal.project, "a");
        assert_eq!(&*principal.key_id, "a2");
        assert!(principal.may_use("anything"));
        let principal = store.authenticate(&headers("bearer  sk-b1 ")).unwrap();
        assert_eq!(&*principal.project, "b");
        assert!(!principal.may_use("other"));
        assert_eq!(
            principal.tags.get("team").map(String::as_str),
            Some("platform")
        );
    }

    #[test]
    fn rejects_wrong_missing_and_malformed_keys() {
        let store = KeyStore::build(&[project("a", &[("a1", "sk-a1")], None)]).unwrap();
        for value in [
            "Bearer sk-wrong",
            "Bearer ",
            "Basic sk-a1",
            "sk-a1",
            "Bearer",
        ] {
            let err = store.authenticate(&headers(value)).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED, "{value}");
        }
        let err = store.authenticate(&http::HeaderMap::new()).unwrap_err();
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn accepts_anthropic_and_azure_key_headers() {
        let store = KeyStore::build(&[project("a", &[("a1", "sk-a1")], None)]).unwrap();
        for name in ["x-api-key", "api-key"] {
            let mut headers = http::HeaderMap::new();
            headers.insert(name, "sk-a1".parse().unwrap());
            assert_eq!(
                &*store.authenticate(&headers).unwrap().key_id,
                "a1",
                "{name}"
            );
            headers.insert(name, "sk-nope".parse().unwrap());
            assert!(store.authenticate(&headers).is_err(), "{name}");
        }
        // An Authorization header wins: a wrong bearer is not rescued by another header.
        let mut headers = headers("Bearer sk-wrong");
        headers.insert("x-api-key", "sk-a1".parse().unwrap());
        assert!(store.authenticate(&headers).is_err());
    }

    #[test]
    fn reports_every_config_error_with_its_path() {
        let mut bad = project("a", &[("k", "s1"), ("k", "s2")], None);
        bad.api_keys.push(ApiKeyConfig {
            id: "short".into(),
            sha256: "abcd".into(),
            rate_limit: None,
        });
        let errors = KeyStore::build(&[bad, project("a", &[("z", "s1")], None)]).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"projects[0].api_keys[1].id"), "{paths:?}");
        assert!(
            paths.contains(&"projects[0].api_keys[2].sha256"),
            "{paths:?}"
        );
        assert!(paths.contains(&"projects[1].name"), "{paths:?}");
        assert!(
            paths.contains(&"projects[1].api_keys[0].sha256"),
            "{paths:?}"
        );
    }
}
