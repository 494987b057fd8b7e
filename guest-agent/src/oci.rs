//! The subset of the OCI runtime spec the agent applies, as serde types.
//!
//! Hand-written instead of the `oci-spec` crate: that crate pulls `regex`,
//! whose memchr dependency then dispatches to AVX2 at run time, and the guest
//! must not run AVX code. Unknown fields are ignored, as the spec requires.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Spec {
    pub oci_version: String,
    pub process: Option<Process>,
    pub root: Option<Root>,
    pub hostname: Option<String>,
    pub mounts: Vec<Mount>,
    pub linux: Option<Linux>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Root {
    pub path: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Process {
    pub terminal: bool,
    pub console_size: Option<ConsoleSize>,
    pub user: User,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub capabilities: Option<Capabilities>,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct ConsoleSize {
    pub height: u32,
    pub width: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub umask: Option<u32>,
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub inheritable: Vec<String>,
    pub permitted: Vec<String>,
    pub ambient: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub typ: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub typ: Option<String>,
    pub source: Option<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Linux {
    pub namespaces: Vec<Namespace>,
    pub uid_mappings: Vec<serde_json::Value>,
    pub resources: Option<Resources>,
    pub cgroups_path: Option<String>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub seccomp: Option<Seccomp>,
    pub devices: Vec<Device>,
    pub sysctl: HashMap<String, String>,
    pub rootfs_propagation: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub typ: String,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Resources {
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub pids: Option<Pids>,
    pub unified: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Memory {
    pub limit: Option<i64>,
    pub reservation: Option<i64>,
    pub swap: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Cpu {
    pub shares: Option<u64>,
    pub quota: Option<i64>,
    pub period: Option<u64>,
    pub cpus: Option<String>,
    pub mems: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Pids {
    pub limit: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Seccomp {
    pub default_action: String,
    pub default_errno_ret: Option<u32>,
    pub architectures: Vec<String>,
    pub flags: Vec<String>,
    pub syscalls: Vec<SeccompSyscall>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SeccompSyscall {
    pub names: Vec<String>,
    pub action: String,
    pub errno_ret: Option<u32>,
    pub args: Vec<SeccompArg>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SeccompArg {
    pub index: u32,
    pub value: u64,
    pub value_two: u64,
    pub op: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Device {
    #[serde(rename = "type")]
    pub typ: String,
    pub path: String,
    pub major: i64,
    pub minor: i64,
    pub file_mode: Option<u32>,
    pub uid: Option<u32>,
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
