//! One version of each dependency across the workspace: no two workspace
//! crates depend directly on two versions of one crate (shared ones are
//! declared once, in the root Cargo.toml's `[workspace.dependencies]`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

#[test]
fn direct_dependencies_have_one_version() {
    let root = moat_tests::workspace();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", "x86_64-unknown-linux-gnu"])
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let version_of: BTreeMap<&str, (&str, &str)> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap();
            (s("id"), (s("name"), s("version")))
        })
        .collect();
    // name -> version -> the workspace crates that use it
    let mut used: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let id = node["id"].as_str().unwrap();
        if !members.contains(id) {
            continue;
        }
        for dep in node["dependencies"].as_array().unwrap() {
            let (name, version) = version_of[dep.as_str().unwrap()];
            let users = used.entry(name).or_default().entry(version).or_default();
            users.push(version_of[id].0);
        }
    }
    let split: Vec<_> = used.into_iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(split.is_empty(), "several versions: {split:?}");
}
