//! `moat-bench isolation --quick` with runc and moat through a private
//! containerd: results.json validates against bench/isolation.schema.json,
//! every plot is a real PNG, and report.md has its shape (summary, plots,
//! details). It checks shapes, not numbers. Skipped, loudly, only when
//! something it needs is missing (root, containerd, /dev/kvm, a guest
//! kernel and initramfs, the musl target for the probe).

#[path = "../src/isolation/schema.rs"]
#[allow(dead_code)]
mod schema;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

const TEST: &str = "isolation_quick";
const MUSL: &str = "x86_64-unknown-linux-musl";

/// Builds the static probe; Err if the musl target is not installed.
fn build_probe() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(moat_tests::workspace())
        .args(["build", "--release", "--target", MUSL, "-p", "moat-probe"])
        .output()
        .expect("run cargo build");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("target may not be installed") || err.contains("can't find crate for `std`")
        {
            return Err(format!(
                "the {MUSL} target is not installed (rustup target add {MUSL})"
            ));
        }
        panic!("building moat-probe failed:\n{err}");
    }
    Ok(moat_tests::target_dir()
        .join(MUSL)
        .join("release/moat-probe"))
}

fn prerequisites() -> Result<(PathBuf, PathBuf, PathBuf), String> {
    moat_tests::host_tools()?;
    let (kernel, initramfs) = moat_tests::guest_assets()?;
    Ok((kernel, initramfs, build_probe()?))
}

fn assert_png(path: &Path) {
    let b = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        b.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&b[12..16], b"IHDR", "{}: no IHDR chunk", path.display());
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    assert!(w >= 400 && h >= 300, "{}: {w}x{h}", path.display());
    // The chunk after IHDR onwards holds the pixels: a blank image compresses to almost nothing.
    assert!(
        b.len() > 10_000,
        "{}: {} bytes, nearly empty",
        path.display(),
        b.len()
    );
}

fn assert_results(j: &Value) {
    let s: Value = serde_json::from_str(schema::SCHEMA).unwrap();
    let errs = schema::validate(&s, j);
    assert!(errs.is_empty(), "results.json breaks its schema: {errs:#?}");
    assert_eq!(j["mode"], "quick");
    let names: Vec<&str> = j["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["runc", "moat"]);
    let stressors = j["stressors"].as_array().unwrap().len();
    let probes: Vec<&str> = j["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    for r in j["runtimes"].as_array().unwrap() {
        let name = &r["name"];
        assert_eq!(r["available"], true, "{name}: {}", r["reason"]);
        assert_eq!(
            r["errors"].as_array().unwrap().len(),
            0,
            "{name}: {:#}",
            r["errors"]
        );
        assert_eq!(
            r["performance"]["stressors"].as_object().unwrap().len(),
            stressors,
            "{name}"
        );
        assert_eq!(
            r["performance"]["baseline"].as_object().unwrap().len(),
            4,
            "{name}"
        );
        let matrix = r["security"]["probes"].as_object().unwrap();
        for p in &probes {
            assert!(matrix.contains_key(*p), "{name}: no {p} in the matrix");
        }
        assert!(
            r["security"]["attack_surface"]["count"].as_u64().unwrap() > 0,
            "{name}"
        );
        for k in [
            "start_ms",
            "storm_wall_ms",
            "idle_pss_mib",
            "getpid_ns",
            "rootfs_write_mb_s",
            "net_loopback_mb_s",
        ] {
            assert!(r["cost"][k].is_object(), "{name}: cost {k} not measured");
        }
    }
    assert!(j["ratios_vs_runc"]["moat"]["idle_pss_mib"].is_number());
}

fn assert_report(md: &str) {
    let at = |s: &str| {
        md.find(s)
            .unwrap_or_else(|| panic!("report.md has no {s:?}:\n{md}"))
    };
    assert!(md.starts_with("# Isolation benchmark: runc, moat"));
    assert!(at("## Summary") < at("## Plots") && at("## Plots") < at("## Details"));
    let summary = &md[at("## Summary")..at("## Plots")];
    for rt in ["| runc | ran", "| moat | ran"] {
        assert!(
            summary.contains(rt),
            "summary has no {rt:?} row:\n{summary}"
        );
    }
    let plots = &md[at("## Plots")..at("## Details")];
    for f in ["performance.png", "security.png", "cost.png"] {
        assert!(
            plots.contains(&format!("]({f})")),
            "no plot {f} in the plots section"
        );
    }
    for s in [
        "### Performance isolation",
        "### Security isolation",
        "### Cost of isolation",
    ] {
        assert!(md[at("## Details")..].contains(s), "details have no {s:?}");
    }
}

// On this project's PVM hosts it takes about 8.5 min (498 s measured on
// 2026-12-05): each of moat's ~20 `ctr task exec` costs ~6.5 s of emulated
// guest kernel, the workloads at scale 0.05 a few seconds each. The 900 s
// bound only stops a wedged run.
#[test]
fn quick_mode_writes_a_valid_report() {
    let (kernel, initramfs, probe) = match prerequisites() {
        Ok(p) => p,
        Err(why) => return moat_tests::skip(TEST, &why),
    };
    let bin = moat_tests::binaries();
    let dir = std::env::temp_dir().join(format!("mb-isoq-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let config = dir.join("moat.toml");
    fs::write(
        &config,
        format!(
            "kernel = \"{}\"\ninitramfs = \"{}\"\nvmm = \"{}\"\nstate_dir = \"{d}/run\"\nlayer_cache_dir = \"{d}/layers\"\n\
             template_dir = \"{d}/templates\"\n\
             boot_timeout_secs = 900\nagent_timeout_secs = 900\n",
            kernel.display(),
            initramfs.display(),
            bin.join("moat-vmm").display(),
            d = dir.display()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let started = Instant::now();
    let status = Command::new("timeout")
        .args(["-s", "INT", "-k", "60", "900"])
        .arg(env!("CARGO_BIN_EXE_moat-bench"))
        .args(["isolation", "--quick", "--out"])
        .arg(&out)
        .arg("--probe")
        .arg(&probe)
        .arg("--moat-bin")
        .arg(&bin)
        .arg("--moat-config")
        .arg(&config)
        .status()
        .expect("run moat-bench");
    let took = started.elapsed();
    eprintln!(
        "moat-bench isolation --quick took {:.0} s",
        took.as_secs_f64()
    );
    let j: Value =
        serde_json::from_str(&fs::read_to_string(out.join("results.json")).expect("results.json"))
            .expect("results.json is JSON");
    assert_results(&j);
    assert!(status.success(), "moat-bench isolation --quick: {status}");
    for f in ["performance.png", "security.png", "cost.png"] {
        assert_png(&out.join(f));
    }
    assert_report(&fs::read_to_string(out.join("report.md")).unwrap());
    assert!(took < Duration::from_secs(900));
    fs::remove_dir_all(&dir).unwrap();
}
