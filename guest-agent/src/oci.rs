//! The subset of the OCI runtime spec the agent applies, as serde types.
//!
//! Hand-written instead of the `oci-spec` crate: that crate pulls `regex`,
//! whose memchr dependency then dispatches to AVX2 at run time, and the guest
//! must not run AVX code. Unknown fields are ignored, as the spec requires.

use std::collections::HashMap;

use serde::Deserialize;

/// An OCI runtime `config.json`: the container the host asks the agent to create.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Spec {
    /// The spec version the bundle was written for (not checked).
    pub oci_version: String,
    /// The container's init process; required.
    pub process: Option<Process>,
    /// The root filesystem entry; the agent honours only `readonly` (the
    /// rootfs itself comes with the create request).
    pub root: Option<Root>,
    /// Hostname set in the container's new UTS namespace (ignored when it
    /// joins an existing one).
    pub hostname: Option<String>,
    /// Mounts made inside the rootfs, in order, after the rootfs is set up.
    pub mounts: Vec<Mount>,
    /// The Linux-specific part; required.
    pub linux: Option<Linux>,
}

/// The `root` section of the spec.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Root {
    /// Path of the bundle's rootfs (ignored: the host sends the rootfs device).
    pub path: String,
    /// Remount the rootfs read-only once the container's mounts are made.
    pub readonly: bool,
}

/// A process to run: the spec's init process, or the body of an exec request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Process {
    /// Give the process a pty instead of pipes for its stdio.
    pub terminal: bool,
    /// Initial pty size; only meaningful with `terminal`.
    pub console_size: Option<ConsoleSize>,
    /// Ids and umask the process runs with.
    pub user: User,
    /// argv; `args[0]` (non-empty) is the program, looked up in the
    /// process's `PATH` if it has no slash.
    pub args: Vec<String>,
    /// Environment as `KEY=value` strings.
    pub env: Vec<String>,
    /// Working directory inside the container; must be absolute.
    pub cwd: String,
    /// Capability sets (names like `CAP_NET_ADMIN`); `None` leaves the
    /// capabilities the process gets from the agent (PID 1, as root).
    pub capabilities: Option<Capabilities>,
    /// Resource limits set before exec.
    pub rlimits: Vec<Rlimit>,
    /// Set `PR_SET_NO_NEW_PRIVS` before exec.
    pub no_new_privileges: bool,
    /// Written to `/proc/self/oom_score_adj` of the process (-1000..1000).
    pub oom_score_adj: Option<i32>,
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct ConsoleSize {
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// The identity a process runs as (numeric ids only: no name lookup).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// File mode creation mask; `None` means 0o022.
    pub umask: Option<u32>,
    /// Supplementary group ids.
    pub additional_gids: Vec<u32>,
}

/// The five Linux capability sets of a process, as `CAP_*` names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// Bounding set: every capability not listed is dropped for good.
    pub bounding: Vec<String>,
    /// Effective set: the capabilities checked by the kernel.
    pub effective: Vec<String>,
    /// Inheritable set: kept across exec for file capabilities.
    pub inheritable: Vec<String>,
    /// Permitted set: the limit of the effective set.
    pub permitted: Vec<String>,
    /// Ambient set: kept across exec of unprivileged programs.
    pub ambient: Vec<String>,
}

/// One `setrlimit` call.
#[derive(Debug, Clone, Deserialize)]
pub struct Rlimit {
    /// The resource, e.g. `RLIMIT_NOFILE`.
    #[serde(rename = "type")]
    pub typ: String,
    /// Hard limit (the ceiling for the soft one).
    pub hard: u64,
    /// Soft limit (the one enforced).
    pub soft: u64,
}

/// One entry of the spec's `mounts`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Mount {
    /// Absolute path inside the container; may not contain `..`.
    pub destination: String,
    /// Filesystem type; `bind` (or a `bind`/`rbind` option) makes a bind
    /// mount, and `cgroup` is mounted as `cgroup2`.
    #[serde(rename = "type")]
    pub typ: Option<String>,
    /// Device, directory (bind mounts) or pseudo-filesystem name.
    pub source: Option<String>,
    /// mount(8)-style options: flags such as `ro`, `nosuid`, `rbind`,
    /// propagation words, the rest passed to the filesystem as data.
    pub options: Vec<String>,
}

/// The `linux` section of the spec.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Linux {
    /// Namespaces of the container: a new one per entry without a path,
    /// the existing one at `path` otherwise. A mount namespace is required;
    /// user namespaces are refused.
    pub namespaces: Vec<Namespace>,
    /// User-namespace id mappings; only checked to be empty (user
    /// namespaces are not supported).
    pub uid_mappings: Vec<serde_json::Value>,
    /// Limits applied to the container's cgroup at create (and again by
    /// UpdateContainer with new values).
    pub resources: Option<Resources>,
    /// The runtime's cgroup path (ignored: the agent puts each container
    /// in its own cgroup named after its id).
    pub cgroups_path: Option<String>,
    /// Paths hidden from the container: files covered by /dev/null,
    /// directories by an empty read-only tmpfs; missing paths are skipped.
    pub masked_paths: Vec<String>,
    /// Paths bind-remounted read-only inside the container; missing paths
    /// are skipped.
    pub readonly_paths: Vec<String>,
    /// The syscall filter the container process installs before it
    /// execs, if any.
    pub seccomp: Option<Seccomp>,
    /// Device nodes created in the container's /dev (an existing node is
    /// kept).
    pub devices: Vec<Device>,
    /// Namespaced sysctls, by dotted name (e.g. `net.ipv4.ip_forward`),
    /// written under /proc/sys.
    pub sysctl: HashMap<String, String>,
    /// Mount propagation of the root: `shared`, `slave` or (default)
    /// `private`, and their `r` forms.
    pub rootfs_propagation: Option<String>,
}

/// One namespace of the container.
#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    /// `pid`, `network`, `mount`, `ipc`, `uts`, `cgroup` or `time`.
    #[serde(rename = "type")]
    pub typ: String,
    /// A namespace file (e.g. `/proc/<pid>/ns/net`) to join instead of
    /// creating a new namespace; empty means new.
    #[serde(default)]
    pub path: Option<String>,
}

/// cgroup limits of a container, in OCI (cgroup v1) terms; the agent
/// maps them to cgroup v2 files (see [`crate::cgroup::Cgroup::apply_oci`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Resources {
    /// Memory limits.
    pub memory: Option<Memory>,
    /// CPU weight and bandwidth.
    pub cpu: Option<Cpu>,
    /// Process-count limit.
    pub pids: Option<Pids>,
    /// Raw cgroup v2 files to write, by file name (e.g. `memory.high`).
    pub unified: HashMap<String, String>,
}

/// Memory limits in bytes; negative means unlimited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Memory {
    /// Hard limit (`memory.max`).
    pub limit: Option<i64>,
    /// Soft guarantee (`memory.low`).
    pub reservation: Option<i64>,
    /// Memory plus swap limit; the agent writes `swap - limit` to
    /// `memory.swap.max`.
    pub swap: Option<i64>,
}

/// CPU controls.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Cpu {
    /// Relative weight (2..262144), converted to `cpu.weight`.
    pub shares: Option<u64>,
    /// CPU time in microseconds the group may use per `period`; negative
    /// means unlimited.
    pub quota: Option<i64>,
    /// Length of a quota period in microseconds (default 100000).
    pub period: Option<u64>,
    /// cpuset CPU list (ignored by the agent).
    pub cpus: Option<String>,
    /// cpuset memory-node list (ignored by the agent).
    pub mems: Option<String>,
}

/// Process-count limit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Pids {
    /// Most tasks in the cgroup (`pids.max`); negative means unlimited.
    pub limit: i64,
}

/// An OCI seccomp profile, compiled by [`crate::seccomp::compile`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Seccomp {
    /// Action for calls no rule matches, e.g. `SCMP_ACT_ERRNO`.
    pub default_action: String,
    /// errno returned by the default action when it is `SCMP_ACT_ERRNO`
    /// (default EPERM).
    pub default_errno_ret: Option<u32>,
    /// `SCMP_ARCH_*` names; if any are given, x86_64 must be one.
    pub architectures: Vec<String>,
    /// `SECCOMP_FILTER_FLAG_*` names (ignored by the agent).
    pub flags: Vec<String>,
    /// Rules: calls by name and the action for them.
    pub syscalls: Vec<SeccompSyscall>,
}

/// One rule of a seccomp profile.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SeccompSyscall {
    /// Syscall names; names unknown on x86_64 are skipped.
    pub names: Vec<String>,
    /// Action for matching calls, e.g. `SCMP_ACT_ALLOW`.
    pub action: String,
    /// errno for `SCMP_ACT_ERRNO` (default EPERM).
    pub errno_ret: Option<u32>,
    /// Conditions on the arguments, all of which must hold.
    pub args: Vec<SeccompArg>,
}

/// A condition on one syscall argument.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SeccompArg {
    /// Argument position, 0..=5.
    pub index: u32,
    /// Value compared against (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// Value the masked argument must equal (`SCMP_CMP_MASKED_EQ` only).
    pub value_two: u64,
    /// Comparison: `SCMP_CMP_EQ`, `_NE`, `_LT`, `_LE`, `_GT`, `_GE` or
    /// `_MASKED_EQ`.
    pub op: String,
}

/// A device node to create in the container's /dev.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Device {
    /// `c` or `u` (character), `b` (block) or `p` (FIFO).
    #[serde(rename = "type")]
    pub typ: String,
    /// Where to create it; must be under /dev/.
    pub path: String,
    /// Major device number.
    pub major: i64,
    /// Minor device number.
    pub minor: i64,
    /// Permission bits (default 0o666).
    pub file_mode: Option<u32>,
    /// Owner user id.
    pub uid: Option<u32>,
    /// Owner group id.
    pub gid: Option<u32>,
}

impl Spec {
    /// Parses and checks the parts the agent relies on.
    pub fn from_json(bytes: &[u8]) -> Result<Spec, String> {
        let spec: Spec = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let process = spec.process.as_ref().ok_or("spec has no process")?;
        process.validate()?;
        let linux = spec.linux.as_ref().ok_or("spec has no linux section")?;
        if !linux.uid_mappings.is_empty() || linux.namespaces.iter().any(|n| n.typ == "user") {
            return Err("user namespaces are not supported".into());
        }
        for ns in &linux.namespaces {
            if !matches!(
                ns.typ.as_str(),
                "pid" | "network" | "mount" | "ipc" | "uts" | "cgroup" | "time"
            ) {
                return Err(format!("unknown namespace type {:?}", ns.typ));
            }
        }
        if !linux.namespaces.iter().any(|n| n.typ == "mount") {
            return Err("a mount namespace is required".into());
        }
        for m in &spec.mounts {
            if m.destination.split('/').any(|c| c == "..") {
                return Err(format!(
                    "mount destination {:?} escapes the root",
                    m.destination
                ));
            }
            if !m.destination.starts_with('/') {
                return Err(format!(
                    "mount destination {:?} is not absolute",
                    m.destination
                ));
            }
        }
        Ok(spec)
    }
}

impl Process {
    /// Parses an exec request's process and checks it like the init
    /// process (non-empty args, absolute cwd, no NUL bytes).
    pub fn from_json(bytes: &[u8]) -> Result<Process, String> {
        let p: Process = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        p.validate()?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), String> {
        if self.args.is_empty() || self.args[0].is_empty() {
            return Err("process.args is empty".into());
        }
        if !self.cwd.starts_with('/') {
            return Err(format!("process.cwd {:?} is not absolute", self.cwd));
        }
        if self.args.iter().chain(&self.env).any(|s| s.contains('\0')) {
            return Err("process args or env contain a NUL byte".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/"},
        "linux":{"namespaces":[{"type":"mount"},{"type":"pid","path":"/proc/1/ns/pid"}]},
        "unknownField":1}"#;

    #[test]
    fn minimal_spec_parses() {
        let s = Spec::from_json(MIN.as_bytes()).unwrap();
        assert_eq!(s.process.unwrap().args, ["sh"]);
        let ns = &s.linux.unwrap().namespaces;
        assert_eq!(ns[1].path.as_deref(), Some("/proc/1/ns/pid"));
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            "not json",
            r#"{"linux":{"namespaces":[{"type":"mount"}]}}"#,
            r#"{"process":{"args":[],"cwd":"/"},"linux":{"namespaces":[{"type":"mount"}]}}"#,
            r#"{"process":{"args":["x"],"cwd":"rel"},"linux":{"namespaces":[{"type":"mount"}]}}"#,
            r#"{"process":{"args":["x"],"cwd":"/"},"linux":{"namespaces":[{"type":"user"},{"type":"mount"}]}}"#,
            r#"{"process":{"args":["x"],"cwd":"/"},"linux":{"namespaces":[]}}"#,
            r#"{"process":{"args":["x"],"cwd":"/"},"mounts":[{"destination":"rel"}],"linux":{"namespaces":[{"type":"mount"}]}}"#,
        ] {
            assert!(Spec::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
