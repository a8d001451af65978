//! Structure rules that code review alone would let slip.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const LAYERS: [&str; 6] = [
    "gateway-access",
    "gateway-routing",
    "gateway-policy",
    "gateway-providers",
    "gateway-observability",
    "gateway-business",
];

/// Architecture invariant: layers depend on `gateway-core`, never on each other (not even for
/// tests); only `gateway-bin` composes them. The mock upstream (`gateway-test-support`) is a
/// test tool that depends on no layer, so any crate's tests may use it.
#[test]
fn layers_depend_only_on_core() {
    for layer in LAYERS.iter().chain(["gateway-core"].iter()) {
        let manifest: toml::Table =
            std::fs::read_to_string(crates_dir().join(layer).join("Cargo.toml"))
                .unwrap()
                .parse()
                .unwrap();
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for name in deps.keys() {
                let allowed = (name == "gateway-core" && *layer != "gateway-core")
                    || (name == "gateway-test-support" && section == "dev-dependencies");
                assert!(
                    !name.starts_with("gateway-") || allowed,
                    "{layer} must not depend on {name} ({section}): layers meet only in gateway-core"
                );
            }
        }
    }
}

/// Every source file starts with a `//!` comment saying what it is for.
/// The mock upstream must stay independent of the gateway, or using it in a layer's tests
/// would smuggle in a dependency on another layer.
#[test]
fn test_support_depends_on_no_gateway_crate() {
    let manifest: toml::Table =
        std::fs::read_to_string(crates_dir().join("gateway-test-support/Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) {
            assert!(
                deps.keys().all(|name| !name.starts_with("gateway-")),
                "gateway-test-support must not depend on gateway crates ({section})"
            );
        }
    }
}

#[test]
fn every_module_has_a_doc_comment() {
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let src = entry.unwrap().path().join("src");
        if src.is_dir() {
            collect_undocumented(&src, &mut missing);
        }
    }
    assert!(
        missing.is_empty(),
        "files without a //! doc comment: {missing:#?}"
    );
}

fn collect_undocumented(dir: &Path, missing: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_undocumented(&path, missing);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            if !text.trim_start().starts_with("//!") {
                missing.push(path);
            }
        }
    }
}
