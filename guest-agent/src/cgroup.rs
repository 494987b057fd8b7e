//! cgroup v2: one leaf cgroup per container under the agent's cgroup root.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_protocol::agent::{
    CpuStats, IoEntry, MemoryStats, PidsStats, Resources as ProtoResources, StatsResponse,
};

use crate::error::{AgentError, IoContext, Result};
use crate::oci;

const CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

/// Prepares `root` (creating it and enabling the controllers on the way
/// down from the cgroup2 mount) so containers can get leaf cgroups in it.
pub fn init_root(mount: &Path, root: &Path) -> Result<()> {
    let rel = root.strip_prefix(mount).map_err(|_| {
        AgentError::InvalidArgument(format!(
            "cgroup root {} is not under {}",
            root.display(),
            mount.display()
        ))
    })?;
    let mut dir = mount.to_path_buf();
    enable_controllers(&dir);
    for c in rel.components() {
        dir.push(c);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx(|| format!("creating cgroup {}", dir.display())),
        }
        enable_controllers(&dir);
    }
    Ok(())
}

fn enable_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let want: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if !want.is_empty() {
        // One write enables all; a failure (e.g. "no internal processes")
        // only costs limits, so it is logged, not fatal.
        if let Err(e) = fs::write(dir.join("cgroup.subtree_control"), want.join(" ")) {
            log::debug!("enabling controllers in {}: {e}", dir.display());
        }
    }
}

/// A container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    /// The cgroup's directory: `<cgroup root>/<container id>`.
    pub path: PathBuf,
}

fn write(path: &Path, file: &str, value: &str) -> Result<()> {
    fs::write(path.join(file), value)
        .ctx(|| format!("writing {value:?} to {}/{file}", path.display()))
}

fn read(path: &Path, file: &str) -> Option<String> {
    fs::read_to_string(path.join(file)).ok()
}

fn flat_keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

fn parse_max(s: Option<String>) -> u64 {
    match s.as_deref().map(str::trim) {
        Some("max") | None => u64::MAX,
        Some(v) => v.parse().unwrap_or(u64::MAX),
    }
}

fn limit_str(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// OCI cpu shares (2..262144) to cgroup v2 cpu.weight (1..10000), the
/// conversion runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

impl Cgroup {
    /// The cgroup of `container_id` under `root` (see [`init_root`]),
    /// created if it does not exist yet.
    pub fn create(root: &Path, container_id: &str) -> Result<Cgroup> {
        let path = root.join(container_id);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx(|| format!("creating cgroup {}", path.display())),
        }
        Ok(Cgroup { path })
    }

    /// Its `cgroup.procs` file: writing a pid there moves that process in.
    pub fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Sets pids.max to `limit` (0: leaves it unlimited), where the pids
    /// controller is enabled (bare cgroup2 of host tests: not).
    pub fn default_pids_limit(&self, limit: u32) -> Result<()> {
        if limit == 0 || !self.path.join("pids.max").exists() {
            return Ok(());
        }
        write(&self.path, "pids.max", &limit.to_string())
    }

    /// Applies the OCI resources.
    pub fn apply_oci(&self, r: &oci::Resources) -> Result<()> {
        if let Some(m) = &r.memory {
            if let Some(l) = m.limit {
                write(&self.path, "memory.max", &limit_str(l))?;
            }
            if let Some(l) = m.reservation {
                write(&self.path, "memory.low", &limit_str(l))?;
            }
            if let (Some(swap), Some(limit)) = (m.swap, m.limit) {
                // OCI swap is memory+swap; v2 swap.max is swap alone.
                let v = if swap < 0 { -1 } else { (swap - limit).max(0) };
                if let Err(e) = write(&self.path, "memory.swap.max", &limit_str(v)) {
                    log::debug!("{e} (no swap accounting)");
                }
            }
        }
        if let Some(c) = &r.cpu {
            if let Some(s) = c.shares {
                write(&self.path, "cpu.weight", &shares_to_weight(s).to_string())?;
            }
            if c.quota.is_some() || c.period.is_some() {
                let quota = c.quota.map(limit_str).unwrap_or_else(|| "max".into());
                let period = c.period.unwrap_or(100_000);
                write(&self.path, "cpu.max", &format!("{quota} {period}"))?;
            }
        }
        if let Some(p) = &r.pids {
            write(&self.path, "pids.max", &limit_str(p.limit))?;
        }
        for (k, v) in &r.unified {
            if k.contains('/') || k.starts_with('.') {
                return Err(AgentError::InvalidSpec(format!("bad unified key {k:?}")));
            }
            write(&self.path, k, v)?;
        }
        Ok(())
    }

    /// Applies the protocol's resource message (unset fields unchanged).
    pub fn apply(&self, r: &ProtoResources) -> Result<()> {
        if let Some(l) = r.memory_limit {
            write(&self.path, "memory.max", &limit_str(l))?;
        }
        if let Some(l) = r.memory_swap_limit {
            write(&self.path, "memory.swap.max", &limit_str(l))?;
        }
        if r.cpu_quota.is_some() || r.cpu_period.is_some() {
            let cur = read(&self.path, "cpu.max").unwrap_or_default();
            let mut it = cur.split_whitespace();
            let (cq, cp) = (it.next().unwrap_or("max"), it.next().unwrap_or("100000"));
            let q = r.cpu_quota.map(limit_str).unwrap_or_else(|| cq.to_owned());
            let p = r
                .cpu_period
                .map(|p| p.to_string())
                .unwrap_or_else(|| cp.to_owned());
            write(&self.path, "cpu.max", &format!("{q} {p}"))?;
        }
        if let Some(s) = r.cpu_shares {
            write(&self.path, "cpu.weight", &shares_to_weight(s).to_string())?;
        }
        if let Some(l) = r.pids_limit {
            write(&self.path, "pids.max", &limit_str(l))?;
        }
        Ok(())
    }

    /// Pids of the processes in the cgroup now; empty if it cannot be read.
    pub fn pids(&self) -> Vec<u32> {
        read(&self.path, "cgroup.procs")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// How many processes the OOM killer has killed in the cgroup so far
    /// (`oom_kill` of `memory.events`).
    pub fn oom_kills(&self) -> u64 {
        flat_keyed(
            &read(&self.path, "memory.events").unwrap_or_default(),
            "oom_kill",
        )
    }

    /// Freezes (pause) or thaws (resume) every process in the cgroup. The
    /// kernel completes the freeze asynchronously.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        write(&self.path, "cgroup.freeze", if frozen { "1" } else { "0" })
    }

    /// Kills every process in the cgroup and waits (bounded) until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        if write(&self.path, "cgroup.kill", "1").is_err() {
            // Kernels before 5.14: signal one by one.
            for pid in self.pids() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Generous: on hosts whose guest kernel runs in an instruction
        // emulator, tearing down a process takes seconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.pids().is_empty() {
            if Instant::now() > deadline {
                return Err(AgentError::Timeout(format!(
                    "processes of {} did not die",
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Removes the (empty) cgroup, retrying EBUSY for up to 30 s while
    /// the last exits finish; a cgroup already gone is fine.
    pub fn remove(&self) -> Result<()> {
        // The last exits may still be in flight: retry EBUSY briefly.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).ctx(|| format!("removing cgroup {}", self.path.display())),
            }
        }
    }

    /// CPU, memory, pids and I/O statistics from the cgroup's files, as the
    /// protocol's message; a file that cannot be read gives zeros.
    pub fn stats(&self) -> StatsResponse {
        let cpu = read(&self.path, "cpu.stat").unwrap_or_default();
        let mem_stat = read(&self.path, "memory.stat").unwrap_or_default();
        let events = read(&self.path, "memory.events").unwrap_or_default();
        let parse = |f: &str| {
            read(&self.path, f)
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut resp = StatsResponse::new();
        resp.cpu = protobuf::MessageField::some(CpuStats {
            usage_usec: flat_keyed(&cpu, "usage_usec"),
            user_usec: flat_keyed(&cpu, "user_usec"),
            system_usec: flat_keyed(&cpu, "system_usec"),
            nr_periods: flat_keyed(&cpu, "nr_periods"),
            nr_throttled: flat_keyed(&cpu, "nr_throttled"),
            throttled_usec: flat_keyed(&cpu, "throttled_usec"),
            ..Default::default()
        });
        resp.memory = protobuf::MessageField::some(MemoryStats {
            usage: parse("memory.current"),
            limit: parse_max(read(&self.path, "memory.max")),
            swap_usage: parse("memory.swap.current"),
            anon: flat_keyed(&mem_stat, "anon"),
            file: flat_keyed(&mem_stat, "file"),
            oom_events: flat_keyed(&events, "oom"),
            oom_kill_events: flat_keyed(&events, "oom_kill"),
            max_events: flat_keyed(&events, "max"),
            ..Default::default()
        });
        resp.pids = protobuf::MessageField::some(PidsStats {
            current: parse("pids.current"),
            limit: parse_max(read(&self.path, "pids.max")),
            ..Default::default()
        });
        resp.io = read(&self.path, "io.stat")
            .unwrap_or_default()
            .lines()
            .filter_map(parse_io_line)
            .collect();
        resp
    }
}

fn parse_io_line(line: &str) -> Option<IoEntry> {
    let mut it = line.split_whitespace();
    let (major, minor) = it.next()?.split_once(':')?;
    let mut e = IoEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        ..Default::default()
    };
    for kv in it {
        let (k, v) = kv.split_once('=')?;
        let v = v.parse().unwrap_or(0);
        match k {
            "rbytes" => e.rbytes = v,
            "wbytes" => e.wbytes = v,
            "rios" => e.rios = v,
            "wios" => e.wios = v,
            _ => {}
        }
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_conversion_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn parsers() {
        assert_eq!(flat_keyed("low 0\noom 2\noom_kill 1\n", "oom_kill"), 1);
        assert_eq!(flat_keyed("oom 2", "oom_kill"), 0);
        assert_eq!(parse_max(Some("max\n".into())), u64::MAX);
        assert_eq!(parse_max(Some("4096\n".into())), 4096);
        let e = parse_io_line("254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0").unwrap();
        assert_eq!(
            (e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios),
            (254, 0, 10, 20, 1, 2)
        );
    }
}
