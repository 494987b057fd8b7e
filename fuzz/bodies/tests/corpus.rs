//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`) and its
//! regression inputs (`fuzz/regressions/<target>/`: what crashed or hung
//! before a fix, kept out of corpus merges) through the same body the
//! cargo-fuzz target runs, so CI checks on stable that none fails.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use moat_fuzz_bodies::TARGETS;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus")
}

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../regressions")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = files_in(&corpus_dir().join(target));
    let regressions = regressions_dir().join(target);
    if regressions.exists() {
        files.extend(files_in(&regressions));
    }
    files
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn every_target_has_a_corpus_and_every_corpus_a_target() {
    let targets: BTreeSet<String> = TARGETS.iter().map(|t| t.name.to_owned()).collect();
    assert_eq!(names(&corpus_dir()), targets);
    assert!(names(&regressions_dir()).is_subset(&targets));
    for t in TARGETS {
        assert!(
            !inputs(t.name).is_empty(),
            "the corpus of {} is empty",
            t.name
        );
    }
}

#[test]
fn corpus_inputs_run_cleanly() {
    if !moat_fuzz_bodies::virtio::net_available() {
        println!("SKIPPED virtio_net inputs run to no tap because creating one needs root");
    }
    let mut failed = Vec::new();
    let mut count = 0;
    for t in TARGETS {
        for path in inputs(t.name) {
            let data = std::fs::read(&path).unwrap();
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| (t.body)(&data))).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    println!(
        "replayed {count} corpus inputs of {} targets",
        TARGETS.len()
    );
    assert!(failed.is_empty(), "inputs that fail: {failed:#?}");
}
