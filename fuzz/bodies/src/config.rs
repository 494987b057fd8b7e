//! Configuration and annotation parsers: moat-vmm's JSON config and flags,
//! the shim's config.toml and annotations, the agent's command line, and the
//! OCI spec as the agent reads it.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use containerd_shim_moat_v1::{annotations, config::Config as ShimConfig};
use moat_agent::config::Config as AgentConfig;
use moat_agent::mount::MountOptions;
use moat_agent::oci::{Process, Spec};
use moat_vmm_api::VmConfig;

/// A file every fuzzed path is replaced with before a check opens it: the
/// fuzzer must never make the host open a path of its choosing
/// (`/dev/watchdog` starts a watchdog).
const SAFE_FILE: &str = "/proc/self/exe";

/// moat-vmm's JSON config, read as `--config FILE` reads it, then checked;
/// and the same bytes as NUL-separated command-line flags. The shim writes
/// the `vm.json` that moat-vmm reads, so a config must read back as itself.
pub fn vmm_config(data: &[u8]) {
    if let Some(file) = memfd(data) {
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if let Ok(cfg) = VmConfig::from_file(&path) {
            check(cfg);
        }
    }
    let args = data
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    if let Ok(cfg) = VmConfig::from_args(args) {
        check(cfg);
    }
}

fn check(cfg: VmConfig) {
    let json = serde_json::to_string(&cfg).expect("a config serializes");
    let again: VmConfig = serde_json::from_str(&json).expect("a written config reads back");
    assert_eq!(cfg, again);
    validate_safely(cfg);
}

fn validate_safely(mut cfg: VmConfig) {
    if !cfg.kernel.as_os_str().is_empty() {
        cfg.kernel = PathBuf::from(SAFE_FILE);
    }
    if cfg.initramfs.is_some() {
        cfg.initramfs = Some(PathBuf::from(SAFE_FILE));
    }
    let _ = cfg.validate(1 << 20);
}

/// An anonymous file holding `data`.
fn memfd(data: &[u8]) -> Option<std::fs::File> {
    // SAFETY: the name is a NUL-terminated literal; the result is checked.
    let fd = unsafe { libc::memfd_create(c"moat-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    Some(file)
}

/// The shim's `/etc/moat/config.toml`.
pub fn shim_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = ShimConfig::parse(text, Path::new("/etc/moat/config.toml")) {
        let _ = (cfg.boot_timeout(), cfg.agent_timeout());
    }
}

/// A container's annotations, one `key=value` per line, sized against the
/// default config.
pub fn shim_annotations(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let map: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let cfg = ShimConfig::default();
    let _ = annotations::check_known(&map);
    let _ = annotations::vm_size(&cfg, &map);
    let _ = annotations::grouping(&map, "fuzz");
}

/// The guest agent's kernel command line (first line) and flags (the rest,
/// one per line).
pub fn agent_cmdline(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (cmdline, args) = text.split_once('\n').unwrap_or((&text, ""));
    let mut cfg = AgentConfig::default();
    let _ = cfg.apply_cmdline(cmdline);
    let args: Vec<String> = args.lines().map(str::to_owned).collect();
    let _ = cfg.apply_args(&args);
}

/// An OCI spec as the agent reads it from CreateContainer, and what it then
/// derives from it without touching the system: mount options and the
/// seccomp filters. Also an exec's process JSON.
pub fn agent_oci(data: &[u8]) {
    if let Ok(spec) = Spec::from_json(data) {
        for m in &spec.mounts {
            let o = MountOptions::parse(&m.options);
            let _ = o.data_string();
        }
        if let Some(seccomp) = spec.linux.as_ref().and_then(|l| l.seccomp.as_ref()) {
            let _ = moat_agent::seccomp::compile(seccomp);
        }
    }
    let _ = Process::from_json(data);
}
