//! No import cycles between the modules of a crate: for each crate, the
//! graph of `crate::`/`super::` references between its source files (a
//! module and its ancestors aside; test code at a file's end, after
//! `#[cfg(test)]`, aside) has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Module paths of the files under `src` (`a.rs`, `a/mod.rs`: `a`;
/// `a/b.rs`: `a::b`), with the code of each; the crate root and `src/bin`
/// aside.
fn modules(src: &Path, dir: &Path, out: &mut BTreeMap<Module, String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(src).unwrap();
        if path.is_dir() {
            if rel != Path::new("bin") {
                modules(src, &path, out);
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let mut module: Module = rel
            .with_extension("")
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        if matches!(module.last().map(String::as_str), Some("mod")) {
            module.pop();
        }
        if module == ["lib"] || module == ["main"] {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: Vec<&str> = code
            .lines()
            .map(|l| l.split("//").next().unwrap())
            .collect();
        out.insert(module, code.join("\n"));
    }
}

/// The paths of a use tree that starts at `s` (after `crate::`/`super::`):
/// `a::b::{c, d::e}` gives `a::b::c` and `a::b::d::e`.
fn use_tree(s: &str, prefix: &[String], out: &mut Vec<Module>) -> usize {
    let mut path = prefix.to_vec();
    let mut i = 0;
    let b = s.as_bytes();
    loop {
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i > start {
            path.push(s[start..i].to_owned());
        }
        let rest = &s[i..];
        let group = match rest {
            _ if rest.starts_with("::{") => 3,
            _ if rest.starts_with('{') => 1,
            _ => 0,
        };
        if group > 0 {
            i += group;
            loop {
                i += rest_ws(&s[i..]);
                if s[i..].starts_with('}') {
                    return i + 1;
                }
                i += use_tree(&s[i..], &path, out);
                i += rest_ws(&s[i..]);
                if s[i..].starts_with(',') {
                    i += 1;
                }
            }
        } else if rest.starts_with("::") {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

fn rest_ws(s: &str) -> usize {
    s.len() - s.trim_start().len()
}

/// The modules `code` of module `me` refers to.
fn references(me: &Module, code: &str) -> Vec<Module> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if !code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$') {
            use_tree(&code[at + 7..], &[], &mut out);
        }
    }
    for (at, _) in code.match_indices("super::") {
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut base = me.clone();
        let mut rest = &code[at..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        use_tree(rest, &base, &mut out);
    }
    out
}

/// The module cycles of the crate in `dir`, each as its members.
fn cycles(dir: &str) -> Vec<Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir)
        .join("src");
    let mut mods = BTreeMap::new();
    modules(&src, &src, &mut mods);
    graph_cycles(&mods)
}

/// The cycles of the reference graph of `mods` (module -> its code).
fn graph_cycles(mods: &BTreeMap<Module, String>) -> Vec<Vec<String>> {
    let mut edges: BTreeMap<&Module, BTreeSet<&Module>> = BTreeMap::new();
    for (me, code) in mods {
        for r in references(me, code) {
            let target = (1..=r.len())
                .rev()
                .find_map(|n| mods.get_key_value(&r[..n]).map(|(k, _)| k));
            let Some(t) = target else { continue };
            let related = t.starts_with(me) || me.starts_with(t);
            if !related {
                edges.entry(me).or_default().insert(t);
            }
        }
    }
    // A module is in a cycle with every module that reaches it and that it reaches.
    let reach = |from: &Module| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from];
        while let Some(m) = todo.pop() {
            for &n in edges.get(m).into_iter().flatten() {
                if seen.insert(n) {
                    todo.push(n);
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&Module, BTreeSet<&Module>> =
        mods.keys().map(|m| (m, reach(m))).collect();
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    for (m, r) in &reaches {
        if r.contains(m) {
            let cycle = r
                .iter()
                .filter(|n| reaches[*n].contains(m))
                .map(|n| n.join("::"));
            found.insert(cycle.collect());
        }
    }
    found.into_iter().collect()
}

#[test]
fn finds_a_cycle_through_use_groups_and_super() {
    let me: Module = vec!["a".into(), "b".into()];
    let refs = references(&me, "use crate::{x::Y, z};\nsuper::super::w::f();");
    let refs: Vec<String> = refs.iter().map(|r| r.join("::")).collect();
    assert_eq!(refs, ["x::Y", "z", "w::f"]);
}

#[test]
fn finds_a_cycle_between_siblings_only() {
    let mods: BTreeMap<Module, String> = [
        (vec!["a".into()], "use crate::b::X;".into()),
        (vec!["b".into()], "fn f() { crate::a::g() }".into()),
        (vec!["c".into()], "use crate::c::d::Y;".into()),
        (vec!["c".into(), "d".into()], "use super::Z;".into()),
    ]
    .into();
    assert_eq!(graph_cycles(&mods), [["a", "b"]]);
}

#[test]
fn guest_agent_has_no_module_cycle() {
    assert_eq!(cycles("guest-agent"), Vec::<Vec<String>>::new());
}

#[test]
fn protocol_has_no_module_cycle() {
    assert_eq!(cycles("protocol"), Vec::<Vec<String>>::new());
}

#[test]
fn bench_has_no_module_cycle() {
    assert_eq!(cycles("bench"), Vec::<Vec<String>>::new());
}

#[test]
fn tests_and_crash_have_no_module_cycle() {
    assert_eq!(cycles("tests"), Vec::<Vec<String>>::new());
    assert_eq!(cycles("crash"), Vec::<Vec<String>>::new());
}

#[test]
fn shim_vmm_and_vmm_api_have_no_module_cycle() {
    assert_eq!(cycles("shim"), Vec::<Vec<String>>::new());
    assert_eq!(cycles("vmm"), Vec::<Vec<String>>::new());
    assert_eq!(cycles("vmm-api"), Vec::<Vec<String>>::new());
}
