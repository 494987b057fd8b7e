//! From the probe's raw observations to the matrix: blocked, visible or
//! escaped. A kernel interface that works inside the container counts as
//! reaching the host only when the container runs on the host's kernel
//! (runc, crun); under another kernel (moat's guest, gVisor's Sentry) it
//! reaches that kernel's own and is blocked for the host.

use std::path::Path;

use serde_json::Value;

use super::result::{Cell, RuntimeResult, Surface};
use super::runtime::Runtime;
use super::HostFacts;

/// Environment variable the runsc wrapper reads (bench/wrappers/runsc).
pub const RUNSC_DEBUG_ENV: &str = "MOAT_BENCH_RUNSC_DEBUG_DIR";
/// gVisor's debug log spells the filter's allow action as this hex string ("allow").
const RUNSC_ALLOW: &str = "0x616c6c6f77";

/// The word in the neighbour's argv that the well-behaved probe looks for.
pub fn neighbour_marker(prefix: &str) -> String {
    format!("neighbour-{prefix}")
}

fn cell(result: &'static str, detail: impl Into<String>) -> Cell {
    Cell {
        result,
        detail: detail.into(),
    }
}

/// A kernel file: readable on the host kernel is `hit`; anything else blocked.
fn kernel_file(v: &Value, host_kernel: bool, hit: &'static str) -> Cell {
    let s = v.as_str().unwrap_or("?");
    match (
        s == "readable" || s == "writable" || s == "written" || s == "read",
        host_kernel,
    ) {
        (true, true) => cell(hit, s),
        (true, false) => cell("blocked", format!("{s}, but the container's own kernel")),
        (false, _) => cell("blocked", s),
    }
}

fn plain_probes(p: &Value, host: &HostFacts, res: &mut RuntimeResult) -> bool {
    let release = p["kernel_release"].as_str().unwrap_or("?");
    let hk = release == host.kernel_release;
    let probes = &mut res.security.probes;
    probes.insert(
        "kernel".into(),
        if hk {
            cell("visible", format!("the host's: {release}"))
        } else {
            cell("blocked", format!("another: {release}"))
        },
    );
    probes.insert("kcore".into(), kernel_file(&p["kcore"], hk, "escaped"));
    probes.insert("kmsg".into(), kernel_file(&p["kmsg"], hk, "visible"));
    probes.insert("dev_mem".into(), kernel_file(&p["mem"], hk, "escaped"));
    let dbg = p["debugfs"].as_str().unwrap_or("?");
    probes.insert(
        "debugfs".into(),
        match (dbg.starts_with("readable"), hk) {
            (true, true) => cell("visible", dbg),
            (true, false) => cell("blocked", format!("{dbg}, the container's own kernel")),
            _ => cell("blocked", dbg),
        },
    );
    probes.insert("sysrq".into(), kernel_file(&p["sysrq"], hk, "escaped"));
    let procs = &p["processes"];
    let daemons: Vec<&str> = procs["host_daemons"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let count = procs["count"].as_u64().unwrap_or(0);
    probes.insert(
        "host_processes".into(),
        if daemons.is_empty() {
            cell(
                "blocked",
                format!("{count} other processes, none of the host's"),
            )
        } else {
            cell("visible", format!("sees {}", daemons.join(", ")))
        },
    );
    probes.insert(
        "neighbour_processes".into(),
        if procs["neighbour_seen"].as_bool() == Some(true) {
            cell("visible", "the neighbour's process is listed")
        } else {
            cell("blocked", "not listed")
        },
    );
    probes.insert(
        "host_mounts".into(),
        if p["host_mounts_seen"].as_bool() == Some(true) {
            cell("visible", format!("mountinfo names {}", host.dir.display()))
        } else {
            cell(
                "blocked",
                format!("{} mounts, no host path", p["mount_count"]),
            )
        },
    );
    let vs = p["vsock"].as_str().unwrap_or("?");
    let answered = vs.contains("reset") || vs.contains("refused");
    probes.insert(
        "vsock".into(),
        if vs.starts_with("connected") {
            cell("escaped", vs)
        } else if answered {
            cell("visible", format!("{vs} (the host answered)"))
        } else {
            cell("blocked", vs)
        },
    );
    probes.insert("netlink".into(), netlink(&p["netlink"], hk, host));
    let raw = p["raw_socket"].as_str().unwrap_or("?");
    probes.insert(
        "raw_socket".into(),
        match (raw == "opened", hk) {
            (true, true) => cell("visible", "opened on the host kernel"),
            (true, false) => cell("blocked", "opened, on the container's own kernel"),
            _ => cell("blocked", raw),
        },
    );
    hk
}

fn netlink(v: &Value, host_kernel: bool, host: &HostFacts) -> Cell {
    let Some(links) = v.as_array() else {
        return cell("blocked", v.as_str().unwrap_or("?"));
    };
    let names: Vec<&str> = links.iter().filter_map(Value::as_str).collect();
    let host_links: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| *n != "lo" && host.links.iter().any(|h| h == n))
        .collect();
    let detail = format!("links: {}", names.join(", "));
    match (host_links.is_empty(), host_kernel) {
        (false, true) => cell("escaped", format!("{detail} (the host's)")),
        (true, true) => cell("visible", format!("{detail}; the host kernel answers")),
        _ => cell("blocked", format!("{detail}; the container's own kernel")),
    }
}

fn privileged_probes(p: &Value, hk: bool, res: &mut RuntimeResult) {
    let probes = &mut res.security.probes;
    probes.insert(
        "host_disk".into(),
        kernel_file(&p["host_disk"], hk, "escaped"),
    );
    probes.insert(
        "core_pattern".into(),
        kernel_file(&p["core_pattern"], hk, "escaped"),
    );
    probes.insert(
        "host_sysctl".into(),
        kernel_file(&p["sysctl_vm_swappiness"], hk, "escaped"),
    );
}

fn avx(v: &Value) -> Cell {
    if v["avx"].as_bool() != Some(true) {
        return cell("n/a", "no AVX on this CPU");
    }
    let (checks, bad) = (
        v["checks"].as_u64().unwrap_or(0),
        v["mismatches"].as_u64().unwrap_or(0),
    );
    let detail = format!(
        "{bad} of {checks} checks after a context switch found another value ({} processes)",
        v["procs"]
    );
    if bad > 0 {
        cell("escaped", detail)
    } else {
        cell("blocked", detail)
    }
}

/// The default seccomp profile the runtime got in its OCI spec: the
/// names of the calls whose rule allows them (some only with arguments).
fn spec_allow_list(spec: &Value) -> Surface {
    let sc = &spec["linux"]["seccomp"];
    if sc.is_null() {
        return Surface {
            count: None,
            source: "no seccomp profile in the spec: every host syscall".into(),
            syscalls: vec![],
        };
    }
    let mut names: Vec<String> = sc["syscalls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
        .flat_map(|r| {
            r["names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(String::from)
        })
        .collect();
    names.sort();
    names.dedup();
    Surface {
        count: Some(names.len()),
        source: format!(
            "containerd's default seccomp profile in the container's OCI spec (default action {})",
            sc["defaultAction"].as_str().unwrap_or("?")
        ),
        syscalls: names,
    }
}

/// The Sentry's filter as runsc logged it when it installed it.
pub fn runsc_allow_list(debug_dir: &Path) -> Surface {
    let mut best: Option<Surface> = None;
    for e in std::fs::read_dir(debug_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.contains(".boot.") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        // The last filter the sandbox installed is the one it runs under.
        let Some(start) = text.rfind("Installing seccomp filters for ") else {
            continue;
        };
        let tail = &text[start..];
        let mut names: Vec<String> = tail
            .lines()
            .take_while(|l| !l.contains("Seccomp program dump"))
            .filter_map(|l| {
                let rest = l.split("syscall filter ").nth(1)?;
                let (name, _) = rest.split_once(':')?;
                l.trim_end()
                    .ends_with(RUNSC_ALLOW)
                    .then(|| name.to_string())
            })
            .collect();
        names.sort();
        names.dedup();
        if !names.is_empty() {
            best = Some(Surface {
                count: Some(names.len()),
                source: "measured: the Sentry's seccomp filter as runsc --debug logged it when installing it".into(),
                syscalls: names,
            });
        }
    }
    best.unwrap_or_else(|| Surface {
        count: None,
        source: format!(
            "not measured: no Sentry filter in runsc's debug log ({} unset or empty)",
            RUNSC_DEBUG_ENV
        ),
        syscalls: vec![],
    })
}

fn moat_allow_list() -> Surface {
    let nrs = moat_vmm::seccomp::union_allowed_syscalls();
    Surface {
        count: Some(nrs.len()),
        source: "moat_vmm::seccomp::union_allowed_syscalls(): the union of moat-vmm's per-thread filters (x86_64 numbers); the guest reaches the host only through moat-vmm".into(),
        syscalls: nrs.iter().map(|n| format!("nr {n}")).collect(),
    }
}

fn attack_surface(rt: &Runtime, host: &HostFacts, spec: Result<Value, String>) -> Surface {
    match rt.name.as_str() {
        "moat" => moat_allow_list(),
        "runsc" => runsc_allow_list(&host.runsc_debug_dir),
        _ => match spec {
            Ok(s) => spec_allow_list(&s),
            Err(e) => Surface {
                count: None,
                source: format!("not measured: {e}"),
                syscalls: vec![],
            },
        },
    }
}

/// Fills the matrix and the attack surface of `res`.
pub fn security(
    rt: &Runtime,
    host: &HostFacts,
    plain: Result<Value, String>,
    privileged: Option<Result<Value, String>>,
    avx_result: Result<Value, String>,
    spec: Result<Value, String>,
    res: &mut RuntimeResult,
) {
    let mut host_kernel = true;
    match &plain {
        Ok(p) => {
            host_kernel = plain_probes(p, host, res);
            res.security.raw.insert("unprivileged".into(), p.clone());
        }
        Err(e) => res.errors.push(format!("security probe: {e}")),
    }
    match privileged {
        Some(Ok(p)) => {
            privileged_probes(&p, host_kernel, res);
            res.security.raw.insert("privileged".into(), p);
        }
        Some(Err(e)) => res.errors.push(format!("privileged security probe: {e}")),
        None => {
            let why = res
                .security
                .privileged_unavailable
                .clone()
                .unwrap_or_default();
            for k in ["host_disk", "core_pattern", "host_sysctl"] {
                res.security.probes.insert(
                    k.into(),
                    cell("n/a", format!("no privileged container: {why}")),
                );
            }
        }
    }
    match avx_result {
        Ok(v) => {
            res.security.probes.insert("avx_state".into(), avx(&v));
            res.security.raw.insert("avx".into(), v);
        }
        Err(e) => res.errors.push(format!("AVX check: {e}")),
    }
    res.security.attack_surface = attack_surface(rt, host, spec);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn host() -> HostFacts {
        HostFacts {
            dir: "/tmp/mb".into(),
            kernel_release: "6.1.0-host".into(),
            root_disk: "254:0".into(),
            links: vec!["eth0".into()],
            runsc_debug_dir: "/nonexistent".into(),
        }
    }

    #[test]
    fn host_kernel_reads_count_and_guest_kernel_reads_do_not() {
        let p = |release: &str| {
            json!({"kernel_release": release, "kcore": "readable", "kmsg": "absent", "mem": "denied: x",
                   "debugfs": "empty", "sysrq": "writable", "processes": {"count": 3, "neighbour_seen": true, "host_daemons": ["containerd"]},
                   "host_mounts_seen": false, "mount_count": 9, "vsock": "socket ok, host connect: Connection reset by peer",
                   "netlink": ["lo", "eth0"], "raw_socket": "opened"})
        };
        let mut on_host = RuntimeResult::default();
        assert!(plain_probes(&p("6.1.0-host"), &host(), &mut on_host));
        let r = |res: &RuntimeResult, k: &str| res.security.probes[k].result;
        assert_eq!(r(&on_host, "kernel"), "visible");
        assert_eq!(r(&on_host, "kcore"), "escaped");
        assert_eq!(r(&on_host, "kmsg"), "blocked");
        assert_eq!(r(&on_host, "sysrq"), "escaped");
        assert_eq!(r(&on_host, "netlink"), "escaped");
        assert_eq!(r(&on_host, "host_processes"), "visible");
        assert_eq!(r(&on_host, "vsock"), "visible");
        let mut guest = RuntimeResult::default();
        assert!(!plain_probes(&p("6.12.0-guest"), &host(), &mut guest));
        for k in ["kernel", "kcore", "sysrq", "netlink", "raw_socket"] {
            assert_eq!(r(&guest, k), "blocked", "{k}");
        }
        // What the probe saw of processes is the probe's, whatever the kernel.
        assert_eq!(r(&guest, "neighbour_processes"), "visible");
    }

    #[test]
    fn avx_mismatch_is_an_escape() {
        assert_eq!(
            avx(&json!({"avx": true, "procs": 4, "checks": 100, "mismatches": 0})).result,
            "blocked"
        );
        assert_eq!(
            avx(&json!({"avx": true, "procs": 4, "checks": 100, "mismatches": 2})).result,
            "escaped"
        );
        assert_eq!(avx(&json!({"avx": false})).result, "n/a");
    }

    #[test]
    fn allow_lists_from_a_spec_and_from_runsc_log() {
        let spec = json!({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["write", "clone"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0}]},
            {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}]}}});
        let s = spec_allow_list(&spec);
        assert_eq!(s.syscalls, ["clone", "read", "write"]);
        assert_eq!(spec_allow_list(&json!({"linux": {}})).count, None);

        let dir = std::env::temp_dir().join(format!("mb-runsc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("runsc.log.1.boot.txt"),
            "I seccomp.go:60] Installing seccomp filters for 9 syscalls\n\
             D seccomp.go:174] syscall filter early: [] => 0x616c6c6f77\n\
             I seccomp.go:60] Installing seccomp filters for 2 syscalls\n\
             D seccomp.go:174] syscall filter read: [] => 0x616c6c6f77\n\
             D seccomp.go:174] syscall filter mmap: [( * * & 0x4 == 0x4 )] => 0x6b696c6c2070726f63657373\n\
             D seccomp.go:174] syscall filter mmap: [( * * * == 0x1 )] => 0x616c6c6f77\n\
             D seccomp.go:77] Seccomp program dump:\n\
             D seccomp.go:174] syscall filter later: [] => 0x616c6c6f77\n",
        )
        .unwrap();
        let r = runsc_allow_list(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(r.syscalls, ["mmap", "read"]);
        assert_eq!(
            moat_allow_list().count,
            Some(moat_vmm::seccomp::union_allowed_syscalls().len())
        );
    }
}
