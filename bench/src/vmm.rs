//! `moat-bench vmm`: starts moat-vmm N times and reports p50/p90 of
//! - time from process start to the first guest instruction (VMM setup,
//!   from moat-vmm's own log),
//! - time to the guest's boot-timer write (port 0x3f0), when it makes one,
//! - time to a marker on the serial console (`--ready-marker`, e.g.
//!   `moat-agent: ready`), after which the VM is stopped with SIGTERM,
//! - time to the VMM's exit,
//! - the VMM's peak RSS.
//!
//! On a PVM host the guest's own boot runs in the host's instruction
//! emulator, so "to boot timer" minus "to first instruction" says nothing
//! about hardware KVM; "to first instruction" and RSS do.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use moat_vmm_api::VmConfig;
use serde::Serialize;
use serde_json::json;

use crate::args;
use crate::parse::logged_us;
use crate::proc;
use crate::stats::Summary;
use crate::timestamp;

const USAGE: &str = "usage: moat-bench vmm --kernel PATH [--initramfs PATH] [--cmdline STR]
         [--memory-mib N] [--vcpus N] [--vsock cid=N,uds=PATH] [--rng] [--block SPEC]...
         [--ready-marker TEXT] [--timeout SECS] [--runs N] [--vmm PATH] [--json OUT]";

#[derive(Debug, Clone, PartialEq)]
pub struct Opts {
    pub vmm: String,
    pub runs: usize,
    pub json: Option<String>,
    pub vm_args: Vec<String>,
    /// The VM `vm_args` describe, as moat-vmm reads them.
    pub vm: VmConfig,
    pub ready_marker: Option<String>,
    pub timeout: Duration,
}

pub fn parse_args(args: &[String], default_vmm: String) -> Result<Opts, String> {
    let mut o = Opts {
        vmm: default_vmm,
        runs: 5,
        json: None,
        vm_args: vec![],
        vm: VmConfig::new(Default::default()),
        ready_marker: None,
        timeout: Duration::from_secs(300),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || args::value(&mut it, a);
        match a.as_str() {
            "--runs" => o.runs = args::runs(&val()?)?,
            "--vmm" => o.vmm = val()?,
            "--json" => o.json = Some(val()?),
            "--ready-marker" => o.ready_marker = Some(val()?).filter(|m| !m.is_empty()),
            "--timeout" => o.timeout = args::seconds(a, &val()?, false)?,
            "--kernel" | "--initramfs" | "--cmdline" | "--memory-mib" | "--vcpus" | "--vsock"
            | "--block" | "--jail" => {
                let v = val()?;
                o.vm_args.push(a.clone());
                o.vm_args.push(v);
            }
            "--rng" => o.vm_args.push(a.clone()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !o.vm_args.iter().any(|a| a == "--kernel") {
        return Err("--kernel is required".into());
    }
    // A VM moat-vmm would refuse fails here, before any run.
    o.vm = VmConfig::from_args(o.vm_args.clone()).map_err(|e| e.to_string())?;
    o.vm.check_limits().map_err(|e| e.to_string())?;
    Ok(o)
}

/// The vsock socket: a stale one from a killed run would make the next
/// one fail.
fn vsock_path(o: &Opts) -> Option<&Path> {
    o.vm.vsock.as_ref().map(|v| v.uds_path.as_path())
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub first_instruction_ms: Option<f64>,
    pub boot_timer_ms: Option<f64>,
    pub ready_ms: Option<f64>,
    /// moat-vmm's PSS when the ready marker appeared (an idle, booted VM).
    pub pss_at_ready_kib: Option<u64>,
    pub exit_ms: f64,
    pub peak_rss_kib: i64,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

enum Msg {
    Ready(Duration),
    Exited(i32, Box<libc::rusage>, Duration),
}

/// Does `text` hold `marker`? Split out for the serial reader.
fn has_marker(text: &[u8], marker: &[u8]) -> bool {
    !marker.is_empty() && text.windows(marker.len()).any(|w| w == marker)
}

fn one_run(o: &Opts) -> Result<Run, String> {
    if let Some(p) = vsock_path(o) {
        let _ = std::fs::remove_file(p);
    }
    let t0 = Instant::now();
    let mut cmd = Command::new(&o.vmm);
    cmd.args(&o.vm_args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if o.ready_marker.is_some() {
        cmd.args(["--serial", "stdout"]).stdout(Stdio::piped());
    } else {
        cmd.args(["--serial", "off"]).stdout(Stdio::null());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", o.vmm))?;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    let mut stderr = child.stderr.take();
    let log = std::thread::spawn(move || {
        let mut log = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_string(&mut log);
        }
        log
    });
    if let (Some(mut out), Some(marker)) = (child.stdout.take(), o.ready_marker.clone()) {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let mut sent = false;
            while let Ok(n @ 1..) = out.read(&mut buf) {
                if !sent {
                    seen.extend_from_slice(&buf[..n]);
                    if has_marker(&seen, marker.as_bytes()) {
                        let _ = tx.send(Msg::Ready(t0.elapsed()));
                        sent = true;
                    }
                }
            }
        });
    }
    // Reaped here with wait4 (for the rusage), not through `child`.
    drop(child);
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid out-parameter for wait4.
        let mut usage: Box<libc::rusage> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: waiting for our own child, with valid out-pointers.
        unsafe { libc::wait4(pid, &mut status, 0, &mut *usage) };
        let _ = tx.send(Msg::Exited(status, usage, t0.elapsed()));
    });
    let mut ready = None;
    let mut pss_at_ready = None;
    let mut timed_out = false;
    let (status, usage, exit) = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Msg::Ready(t)) => {
                ready = Some(t);
                pss_at_ready = proc::mem(pid, "moat-vmm").ok().map(|m| m.pss_kib);
                // SAFETY: kill(2) on our own, not yet reaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            Ok(Msg::Exited(s, u, t)) => break (s, u, t),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !timed_out && (t0.elapsed() > o.timeout || proc::interrupted()) {
                    timed_out = true;
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("lost the wait for moat-vmm".into())
            }
        }
    };
    let log = log.join().unwrap_or_default();
    let status = std::process::ExitStatus::from_raw(status);
    Ok(Run {
        first_instruction_ms: logged_us(&log, "Guest started after").map(|us| us / 1e3),
        boot_timer_ms: logged_us(&log, "Guest boot completed after").map(|us| us / 1e3),
        ready_ms: ready.map(|d| d.as_secs_f64() * 1e3),
        pss_at_ready_kib: pss_at_ready,
        exit_ms: exit.as_secs_f64() * 1e3,
        peak_rss_kib: usage.ru_maxrss,
        code: status.code(),
        signal: status.signal(),
        timed_out,
    })
}

/// (key, row label, value of a run).
type Metric = (&'static str, &'static str, fn(&Run) -> Option<f64>);

const METRICS: &[Metric] = &[
    (
        "to_first_guest_instruction_ms",
        "VMM start → first guest instruction (ms)",
        |r| r.first_instruction_ms,
    ),
    (
        "to_boot_timer_ms",
        "VMM start → guest boot-timer write (ms)",
        |r| r.boot_timer_ms,
    ),
    (
        "to_ready_marker_ms",
        "VMM start → ready marker on the console (ms)",
        |r| r.ready_ms,
    ),
    ("to_exit_ms", "VMM start → exit (ms)", |r| Some(r.exit_ms)),
    ("peak_rss_mib", "VMM peak RSS (MiB)", |r| {
        Some(r.peak_rss_kib as f64 / 1024.0)
    }),
    (
        "pss_at_ready_mib",
        "VMM PSS at the ready marker (MiB)",
        |r| r.pss_at_ready_kib.map(|k| k as f64 / 1024.0),
    ),
];

pub fn summaries(results: &[Run]) -> Vec<(&'static str, &'static str, Option<Summary>)> {
    METRICS
        .iter()
        .map(|(k, label, f)| {
            let v: Vec<f64> = results
                .iter()
                .filter(|r| !r.timed_out)
                .filter_map(f)
                .collect();
            (*k, *label, Summary::of(&v))
        })
        .collect()
}

pub fn main(args: &[String]) {
    let default_vmm = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("moat-vmm")))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "moat-vmm".into());
    let o = match parse_args(args, default_vmm) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("moat-bench vmm: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    proc::catch_signals();
    let mut results = vec![];
    for i in 0..o.runs {
        if proc::interrupted() {
            break;
        }
        match one_run(&o) {
            Ok(r) => {
                eprintln!(
                    "run {i}: first instruction {:?} ms, boot timer {:?} ms, ready {:?} ms, exit {:.1} ms, code {:?}{}",
                    r.first_instruction_ms,
                    r.boot_timer_ms,
                    r.ready_ms.map(|v| v.round()),
                    r.exit_ms,
                    r.code,
                    if r.timed_out { " (timed out, killed)" } else { "" }
                );
                results.push(r);
            }
            Err(e) => {
                eprintln!("moat-bench vmm: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Some(p) = vsock_path(&o) {
        let _ = std::fs::remove_file(p);
    }
    let sums = summaries(&results);
    let fmt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
    println!(
        "| metric ({} runs, {}) | p50 | p90 | min | max | n |\n| --- | ---: | ---: | ---: | ---: | ---: |",
        results.len(),
        o.vm
            .kernel
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    );
    for (_, label, s) in &sums {
        if let Some(s) = s {
            println!(
                "| {label} | {} | {} | {} | {} | {} |",
                fmt(Some(s.p50)),
                fmt(Some(s.p90)),
                fmt(Some(s.min)),
                fmt(Some(s.max)),
                s.n
            );
        }
    }
    let codes: Vec<Option<i32>> = results.iter().map(|r| r.code).collect();
    println!("\nexit codes: {codes:?}");
    let timed_out = results.iter().filter(|r| r.timed_out).count();
    if timed_out > 0 {
        println!("{timed_out} run(s) timed out and were killed; they are left out of the figures");
    }
    if let Some(path) = &o.json {
        let summary: serde_json::Map<String, serde_json::Value> = sums
            .iter()
            .map(|(k, _, s)| (k.to_string(), json!(s)))
            .collect();
        let report = json!({
            "benchmark": "moat-vmm boot",
            "date": timestamp::format_utc(timestamp::nanos_of(SystemTime::now())),
            "host": crate::ctr::host_json(),
            "vmm": o.vmm,
            "vmm_args": o.vm_args,
            "ready_marker": o.ready_marker,
            "runs": results,
            "summary": summary,
        });
        let text = serde_json::to_string_pretty(&report).expect("a JSON value always serializes");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("moat-bench vmm: write {path}: {e}");
            std::process::exit(1);
        }
    }
    if timed_out > 0 || proc::interrupted() {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn args() {
        let o = parse_args(
            &s(&[
                "--kernel",
                "/k",
                "--cmdline",
                "moat.test=boottimer",
                "--runs",
                "10",
                "--rng",
                "--vsock",
                "cid=3,uds=/tmp/v.sock",
                "--ready-marker",
                "moat-agent: ready",
                "--timeout",
                "90",
                "--jail",
                "65534:65534",
            ]),
            "moat-vmm".into(),
        )
        .unwrap();
        assert_eq!(o.runs, 10);
        assert_eq!(
            o.vm_args,
            s(&[
                "--kernel",
                "/k",
                "--cmdline",
                "moat.test=boottimer",
                "--rng",
                "--vsock",
                "cid=3,uds=/tmp/v.sock",
                "--jail",
                "65534:65534"
            ])
        );
        assert_eq!(o.ready_marker.as_deref(), Some("moat-agent: ready"));
        assert_eq!(o.timeout, Duration::from_secs(90));
        assert_eq!(vsock_path(&o), Some(Path::new("/tmp/v.sock")));
        assert_eq!(o.vm.jail.as_ref().map(|j| j.uid), Some(65534));
        for bad in [
            &["--runs", "3"][..],
            &["--kernel"],
            &["--kernel", "/k", "--runs", "0"],
            &["--kernel", "/k", "--timeout", "soon"],
            &["--kernel", "/k", "--serial", "stdout"],
            // More vCPUs than moat-vmm takes, and a malformed device.
            &["--kernel", "/k", "--vcpus", "33"],
            &["--kernel", "/k", "--vsock", "cid=3"],
        ] {
            assert!(parse_args(&s(bad), "v".into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn markers() {
        assert!(has_marker(b"x\nmoat-agent: ready\n", b"moat-agent: ready"));
        assert!(!has_marker(b"moat-agent: rea", b"moat-agent: ready"));
        assert!(!has_marker(b"anything", b""));
    }

    #[test]
    fn summaries_skip_timed_out_runs() {
        let run = |first: f64, exit: f64, timed_out| Run {
            first_instruction_ms: Some(first),
            boot_timer_ms: None,
            ready_ms: None,
            pss_at_ready_kib: None,
            exit_ms: exit,
            peak_rss_kib: 2048,
            code: Some(0),
            signal: None,
            timed_out,
        };
        let sums = summaries(&[
            run(20.0, 100.0, false),
            run(30.0, 300.0, false),
            run(1.0, 9e9, true),
        ]);
        let get = |k: &str| sums.iter().find(|(key, _, _)| *key == k).unwrap().2;
        let first = get("to_first_guest_instruction_ms").unwrap();
        assert_eq!((first.n, first.p50, first.p90), (2, 20.0, 30.0));
        assert_eq!(get("to_exit_ms").unwrap().max, 300.0);
        assert_eq!(get("peak_rss_mib").unwrap().p50, 2.0);
        assert!(get("to_boot_timer_ms").is_none());
        assert!(get("pss_at_ready_mib").is_none());
    }

    /// Boots the freestanding test guest when it is built (make -C
    /// vmm/test-guests O=/tmp/tg) and /dev/kvm works; skipped otherwise.
    #[test]
    fn boots_the_test_guest_when_available() {
        let guest = "/tmp/tg/moat-test-guest";
        // target/<profile>/deps/moat_bench-* -> target/<profile>/moat-vmm
        let vmm = std::env::current_exe()
            .ok()
            .and_then(|b| Some(b.parent()?.parent()?.join("moat-vmm")));
        let Some(vmm) = vmm.filter(|v| v.exists()) else {
            eprintln!("SKIPPED: no moat-vmm in the target directory");
            return;
        };
        if !Path::new(guest).exists() || !Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: no {guest} or /dev/kvm");
            return;
        }
        let o = parse_args(
            &s(&[
                "--kernel",
                guest,
                "--cmdline",
                "moat.test=boottimer",
                "--timeout",
                "120",
            ]),
            vmm.display().to_string(),
        )
        .unwrap();
        let r = one_run(&o).unwrap();
        assert!(!r.timed_out);
        assert_eq!(r.code, Some(0));
        let first = r.first_instruction_ms.unwrap();
        let boot = r.boot_timer_ms.unwrap();
        assert!(first > 0.0 && first <= boot && boot <= r.exit_ms, "{r:?}");
        assert!(r.peak_rss_kib > 0);
    }
}
