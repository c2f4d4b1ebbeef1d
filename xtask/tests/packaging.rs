//! Repository rules for publishing and installing, checked by ordinary
//! tests (as rust-analyzer's `xtask/src/tidy.rs` does): what `cargo
//! publish` needs in every publishable crate, the license files, no
//! placeholder URL, a release profile without debug info, and a README
//! whose layout names every example.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The workspace root (xtask lives in it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `cargo metadata --no-deps`: the workspace's own packages.
fn packages() -> Vec<Value> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    metadata["packages"].as_array().unwrap().clone()
}

/// A package `cargo publish` would upload (`publish = false` gives `[]`).
fn publishable(package: &Value) -> bool {
    package["publish"] != Value::Array(vec![])
}

/// The crates.io categories pgdn's crates may use (slugs from
/// crates.io's category list; a wrong slug fails `cargo publish`).
const CATEGORIES: &[&str] = &[
    "asynchronous",
    "command-line-utilities",
    "database",
    "network-programming",
    "web-programming",
    "web-programming::http-client",
    "web-programming::http-server",
    "web-programming::websocket",
];

#[test]
fn publishable_crates_have_what_crates_io_needs() {
    let packages = packages();
    let published: Vec<&Value> = packages.iter().filter(|p| publishable(p)).collect();
    let mut names: Vec<&str> = published
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["pgdn-client", "pgdn-core", "pgdn-redis", "pgdn-server"],
        "the crates meant for crates.io (others say publish = false)"
    );
    for package in published {
        let name = package["name"].as_str().unwrap();
        let dir = Path::new(package["manifest_path"].as_str().unwrap())
            .parent()
            .unwrap()
            .to_path_buf();
        assert!(
            package["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{name}: description"
        );
        assert_eq!(package["license"], "MIT OR Apache-2.0", "{name}: license");
        // The license texts travel in the package (as links to the root's).
        for file in ["LICENSE-MIT", "LICENSE-APACHE"] {
            let text = std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("{name}: {file}: {e}"));
            assert_eq!(
                text,
                std::fs::read_to_string(root().join(file)).unwrap(),
                "{name}: {file} is the root's"
            );
        }
        let readme = package["readme"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: readme"));
        assert!(dir.join(readme).is_file(), "{name}: readme {readme}");
        let keywords = package["keywords"].as_array().unwrap();
        assert!(
            (1..=5).contains(&keywords.len()),
            "{name}: 1 to 5 keywords, not {keywords:?}"
        );
        for keyword in keywords {
            let k = keyword.as_str().unwrap();
            assert!(
                k.len() <= 20
                    && k.starts_with(|c: char| c.is_ascii_alphabetic())
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{name}: keyword {k:?} is not one crates.io takes"
            );
        }
        let categories = package["categories"].as_array().unwrap();
        assert!(
            (1..=5).contains(&categories.len()),
            "{name}: 1 to 5 categories"
        );
        for category in categories {
            assert!(
                CATEGORIES.contains(&category.as_str().unwrap()),
                "{name}: category {category} is not a crates.io slug"
            );
        }
        // No made-up address: pgdn has no public URL yet.
        for key in ["repository", "homepage", "documentation"] {
            assert!(
                package[key].is_null(),
                "{name}: {key} = {} (pgdn has no public URL)",
                package[key]
            );
        }
        // A path dependency on another crate of ours needs a version too.
        for dep in package["dependencies"].as_array().unwrap() {
            if dep["path"].is_string() && dep["kind"].is_null() {
                assert_ne!(
                    dep["req"], "*",
                    "{name}: dependency {} needs a version",
                    dep["name"]
                );
            }
        }
    }
}

#[test]
fn no_placeholder_address_anywhere() {
    // Spelled in two halves so that this file does not match itself.
    let placeholder = ["example", ".invalid"].concat();
    let mut found = Vec::new();
    let mut dirs = vec![root()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if (name != "target" && !name.starts_with('.')) || name == ".ci" || name == ".cargo"
                {
                    dirs.push(path);
                }
            } else if let Ok(text) = std::fs::read_to_string(&path)
                && text.contains(&placeholder)
            {
                found.push(path);
            }
        }
    }
    assert!(found.is_empty(), "{placeholder} in {found:?}");
}

#[test]
fn the_release_binary_has_no_debug_info_and_profiling_keeps_it() {
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let profiles = manifest["profile"].as_table().unwrap();
    let release = profiles["release"].as_table().unwrap();
    // cargo install and deployments: 65 MB with `debug = 1`.
    assert!(
        matches!(
            release.get("debug"),
            None | Some(toml::Value::Boolean(false))
        ) || release.get("debug").and_then(|d| d.as_integer()) == Some(0)
            || release.get("debug").and_then(|d| d.as_str()) == Some("none"),
        "[profile.release] debug: {:?}",
        release.get("debug")
    );
    assert!(
        matches!(
            release.get("strip").and_then(|s| s.as_str()),
            Some("debuginfo" | "symbols")
        ) || release.get("strip").and_then(|s| s.as_bool()) == Some(true),
        "[profile.release] strips what dependencies bring"
    );
    let profiling = profiles["profiling"].as_table().unwrap();
    assert_eq!(profiling["inherits"].as_str(), Some("release"));
    assert!(
        !matches!(
            profiling.get("debug"),
            None | Some(toml::Value::Boolean(false))
        ),
        "[profile.profiling] keeps symbols for perf"
    );
}

#[test]
fn the_readme_layout_names_every_example() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let layout = &readme[readme.find("## Layout").expect("a Layout section")..];
    let row = layout
        .lines()
        .find(|l| l.starts_with("| `examples/`"))
        .expect("a row for examples/");
    let examples: Vec<String> = packages()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .filter(|t| t["kind"].as_array().unwrap().contains(&"example".into()))
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!examples.is_empty());
    for example in examples {
        assert!(
            row.contains(&format!("`{example}`")),
            "README's layout misses the example {example}: {row}"
        );
        assert!(
            readme.contains(&format!("--example {example}")),
            "README's Examples section misses `--example {example}`"
        );
    }
}
