//! `moat-bench isolation`: the isolation benchmark suite (performance
//! isolation, security isolation, cost of isolation) on any containerd
//! runtimes, moat one row among runc, crun and gVisor. See bench/README.md.

mod classify;
mod measure;
pub mod plot;
mod report;
mod result;
mod runtime;
pub mod schema;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::args;
use crate::ctr::{self, Cleanup};
use crate::proc;
use runtime::{Ctr, Limits, Runtime};

const USAGE: &str =
    "usage: moat-bench isolation --out DIR [--runtimes runc,crun,runsc,moat] [--quick]
         [--address SOCK] [--reps N] [--scale X] [--cold N] [--storm N] [--stress-secs S]
         [--timeout SECS] [--probe PATH] [--repo DIR] [--moat-bin DIR] [--moat-config FILE]";

/// How much of everything: `--quick` or the full defaults, then flags.
#[derive(Debug, Clone)]
pub struct Params {
    pub quick: bool,
    /// Repetitions of each workload, micro workload, I/O and network run.
    pub reps: u32,
    /// Size of each workload and micro workload, a factor of the probe's
    /// unit size (see bench/README.md).
    pub scale: f64,
    /// The stressor's head start before the workload begins.
    pub stress_seconds: f64,
    /// Sequential cold starts (0: the storm's starts are the samples).
    pub cold_runs: usize,
    /// Containers started at once (at least the two shared ones).
    pub storm: usize,
    pub avx_seconds: f64,
    pub io_mib: u32,
    pub net_seconds: f64,
    pub limits: Limits,
    pub density_budget_mib: u64,
    /// Per container start or probe run.
    pub timeout: Duration,
}

impl Params {
    fn new(quick: bool) -> Params {
        let mem_total_mib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let l = m.lines().find(|l| l.starts_with("MemTotal:"))?;
                l.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kib| kib / 1024);
        Params {
            quick,
            reps: if quick { 1 } else { 3 },
            // Quick: a twentieth of the unit. A moat guest's kernel is
            // emulated on PVM hosts, where a page fault or syscall costs
            // milliseconds: at scale 1 the workload alone takes 90 s there.
            scale: if quick { 0.05 } else { 2.0 },
            stress_seconds: if quick { 1.0 } else { 2.0 },
            cold_runs: if quick { 0 } else { 3 },
            storm: if quick { 2 } else { 4 },
            avx_seconds: if quick { 2.0 } else { 5.0 },
            io_mib: if quick { 1 } else { 32 },
            net_seconds: if quick { 1.0 } else { 2.0 },
            limits: Limits {
                cpus: 1.0,
                memory_bytes: 256 << 20,
            },
            density_budget_mib: mem_total_mib,
            timeout: Duration::from_secs(300),
        }
    }

    /// Past this the well-behaved workload beside a stressor is DNR.
    pub fn workload_timeout(&self) -> Duration {
        self.timeout
    }
}

#[derive(Debug, Clone)]
pub struct Opts {
    pub runtimes: Vec<String>,
    pub out: PathBuf,
    pub address: Option<String>,
    pub probe: Option<PathBuf>,
    pub repo: Option<PathBuf>,
    pub moat_bin: Option<PathBuf>,
    pub moat_config: Option<PathBuf>,
    pub params: Params,
}

fn count(flag: &str, v: &str) -> Result<usize, String> {
    v.parse()
        .map_err(|_| format!("{flag}: not a number: {v:?}"))
}

pub fn parse_args(a: &[String]) -> Result<Opts, String> {
    let quick = a.iter().any(|x| x == "--quick");
    let mut o = Opts {
        runtimes: if quick {
            vec!["runc".into(), "moat".into()]
        } else {
            ["runc", "crun", "runsc", "moat"].map(String::from).to_vec()
        },
        out: PathBuf::new(),
        address: None,
        probe: None,
        repo: None,
        moat_bin: None,
        moat_config: None,
        params: Params::new(quick),
    };
    let mut it = a.iter();
    while let Some(f) = it.next() {
        let mut val = || args::value(&mut it, f);
        let p = &mut o.params;
        match f.as_str() {
            "--quick" => {}
            "--runtimes" => {
                o.runtimes = val()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "--out" => o.out = val()?.into(),
            "--address" => o.address = Some(val()?),
            "--probe" => o.probe = Some(val()?.into()),
            "--repo" => o.repo = Some(val()?.into()),
            "--moat-bin" => o.moat_bin = Some(val()?.into()),
            "--moat-config" => o.moat_config = Some(val()?.into()),
            "--reps" => p.reps = args::runs(&val()?)? as u32,
            "--scale" => p.scale = args::positive(f, &val()?)?,
            "--cold" => p.cold_runs = count(f, &val()?)?,
            "--storm" => p.storm = count(f, &val()?)?.max(2),
            "--stress-secs" => p.stress_seconds = args::seconds(f, &val()?, false)?.as_secs_f64(),
            "--timeout" => p.timeout = args::seconds(f, &val()?, false)?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.out.as_os_str().is_empty() {
        return Err("--out DIR is required".into());
    }
    if o.runtimes.is_empty() {
        return Err("--runtimes: no runtime named".into());
    }
    Ok(o)
}

/// What the classification needs to know of the host.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// The bench's directory (containerd's root lives under it).
    pub dir: PathBuf,
    pub kernel_release: String,
    /// The host's first disk, `MAJ:MIN`.
    pub root_disk: String,
    pub links: Vec<String>,
    pub runsc_debug_dir: PathBuf,
}

impl HostFacts {
    fn read(dir: &Path) -> HostFacts {
        let names = |d: &str| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let root_disk = names("/sys/block")
            .into_iter()
            .filter(|n| {
                !["loop", "ram", "zram", "nbd"]
                    .iter()
                    .any(|p| n.starts_with(p))
            })
            .find_map(|n| fs::read_to_string(format!("/sys/block/{n}/dev")).ok())
            .map_or_else(|| "8:0".to_string(), |s| s.trim().to_string());
        HostFacts {
            dir: dir.to_path_buf(),
            kernel_release: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            root_disk,
            links: names("/sys/class/net"),
            runsc_debug_dir: dir.join("runsc-debug"),
        }
    }

    pub fn volume_dir(&self, runtime: &str) -> PathBuf {
        self.dir.join("volumes").join(runtime)
    }
}

/// The static probe: `--probe`, else the musl release build in the target dir.
fn find_probe(opt: Option<&PathBuf>, repo: &Path) -> Result<PathBuf, String> {
    let p = match opt {
        Some(p) => p.clone(),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target"))
            .join("x86_64-unknown-linux-musl/release/moat-probe"),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "no probe binary at {} (cargo build --release --target x86_64-unknown-linux-musl -p moat-probe, or --probe PATH)",
            p.display()
        ))
    }
}

pub fn main(args: &[String]) {
    let opts = ctr::begin("isolation", USAGE, parse_args(args));
    match run(&opts) {
        Ok(failed) => {
            eprintln!("moat-bench isolation: wrote {}", opts.out.display());
            if failed || proc::interrupted() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("moat-bench isolation: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs the suite; Ok(true) if a runnable runtime had errors.
fn run(o: &Opts) -> Result<bool, String> {
    let repo = ctr::find_repo(o.repo.as_ref())?;
    let mut path_env = std::env::var("PATH").unwrap_or_default();
    if let Some(b) = &o.moat_bin {
        let b = fs::canonicalize(b).map_err(|e| format!("--moat-bin {}: {e}", b.display()))?;
        path_env = format!("{}:{path_env}", b.display());
    }
    for tool in ["containerd", "ctr"] {
        if !ctr::on_path(&path_env, tool) {
            return Err(format!("{tool} is not installed"));
        }
    }
    let probe = find_probe(o.probe.as_ref(), &repo)?;
    let prefix = format!("mi{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("moat-bench-{prefix}"));
    if dir.exists() {
        return Err(format!("{} exists", dir.display()));
    }
    fs::create_dir_all(&o.out).map_err(|e| format!("create {}: {e}", o.out.display()))?;
    let host = HostFacts::read(&dir);
    let mut cleanup = Cleanup {
        repo: repo.clone(),
        dir: dir.clone(),
        sock: String::new(),
        events_pid: None,
        state_dir: PathBuf::from("/nonexistent"),
        id_prefix: prefix.clone(),
    };
    let result = (|| -> Result<Vec<result::RuntimeResult>, String> {
        let sock = match &o.address {
            Some(a) => a.clone(),
            None => {
                // The runsc wrapper logs where this says; the shims inherit containerd's environment.
                fs::create_dir_all(&host.runsc_debug_dir)
                    .map_err(|e| format!("create {}: {e}", host.runsc_debug_dir.display()))?;
                std::env::set_var(classify::RUNSC_DEBUG_ENV, &host.runsc_debug_dir);
                cleanup.start_containerd(&path_env, o.moat_config.as_deref())?;
                cleanup.sock.clone()
            }
        };
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let c = Ctr {
            sock,
            path_env: path_env.clone(),
        };
        eprintln!("moat-bench isolation: building and importing the probe image");
        runtime::import_probe_image(&repo, &c, &probe, &dir)?;
        let cx = measure::Ctx {
            ctr: &c,
            params: &o.params,
            host: &host,
            prefix: &prefix,
        };
        let mut results = Vec::new();
        for name in &o.runtimes {
            let rt = Runtime::resolve(name, &repo, &path_env);
            results.push(measure::runtime(&cx, &rt));
        }
        Ok(results)
    })();
    let mut notes = if o.address.is_none() {
        ctr::take_cleanup().map(|c| c.run()).unwrap_or_default()
    } else {
        Vec::new()
    };
    let _ = fs::remove_dir_all(&dir);
    let results = result?;
    if proc::interrupted() {
        notes.push("interrupted".into());
    }
    let failed = results.iter().any(|r| r.available && !r.errors.is_empty());
    report::write(&o.out, &o.params, &results, &notes)?;
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args_quick_and_full() {
        let q = parse_args(&s(&["--quick", "--out", "/tmp/x"])).unwrap();
        assert_eq!(q.runtimes, ["runc", "moat"]);
        assert!(q.params.quick && q.params.cold_runs == 0 && q.params.storm == 2);
        let f = parse_args(&s(&[
            "--out",
            "o",
            "--runtimes",
            "runc,crun",
            "--reps",
            "5",
            "--storm",
            "1",
            "--scale",
            "0.5",
        ]))
        .unwrap();
        assert_eq!(f.params.scale, 0.5);
        assert!(parse_args(&s(&["--out", "o", "--scale", "0"])).is_err());
        assert_eq!(f.runtimes, ["runc", "crun"]);
        assert_eq!((f.params.reps, f.params.storm), (5, 2));
        assert!(
            parse_args(&s(&["--runtimes", "runc"])).is_err(),
            "--out is required"
        );
        assert!(parse_args(&s(&["--out", "o", "--bogus"])).is_err());
        assert!(parse_args(&s(&["--out", "o", "--runtimes", ","])).is_err());
    }

    #[test]
    fn runtimes_resolve_to_ctr_flags() {
        let repo = Path::new("/repo");
        let crun = Runtime::resolve("crun", repo, "/nonexistent");
        assert_eq!(
            crun.ctr_args,
            [
                "--runtime",
                "io.containerd.runc.v2",
                "--runc-binary",
                "/repo/bench/wrappers/crun"
            ]
        );
        assert!(crun
            .missing
            .as_deref()
            .unwrap()
            .contains("crun is not installed"));
        let moat = Runtime::resolve("moat", repo, "/nonexistent");
        assert_eq!(moat.ctr_args, ["--runtime", "io.containerd.moat.v1"]);
        assert_eq!(moat.shim, "containerd-shim-moat-v1");
        let kata = Runtime::resolve("io.containerd.kata.v2", repo, "/nonexistent");
        assert_eq!(kata.shim, "containerd-shim-kata-v2");
        assert!(Runtime::resolve("bogus", repo, "/nonexistent")
            .missing
            .is_some());
    }
}
