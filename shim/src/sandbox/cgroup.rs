//! The pod's cgroup on the host, where moat-vmm runs.
//!
//! A pod's CPU time and memory on the host are moat-vmm's: the guest's
//! RAM is the VMM's memory, its vCPUs are the VMM's threads. Kubelet
//! accounts, limits and evicts pods by their cgroups, so the VMM joins the
//! cgroup that the sandbox's spec names (`linux.cgroupsPath`, below the
//! pod's `cgroup_parent`), as runc puts the pause process there. It joins
//! between fork and exec, so that nothing it allocates is charged to the
//! shim's cgroup first (cgroup v2 charges memory where it was first used).
//!
//! Only the cgroupfs driver's form of the path ("/parent/.../name") on a
//! cgroup v2 host is honoured. The systemd driver's "slice:prefix:name"
//! names a unit that systemd makes over D-Bus, and a cgroup v1 host has a
//! hierarchy per controller; in both cases the VMM stays in the shim's
//! cgroup, and the shim logs it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where the cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The file in a sandbox's state directory naming its host cgroup, for
/// `shim delete` after the shim died.
const RECORD_FILE: &str = "host-cgroup";

/// A `linux.cgroupsPath` that moat refuses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CgroupPathError {
    /// A `..` component would leave the cgroup hierarchy.
    #[error("cgroupsPath {0:?} has a '..' component")]
    Escapes(String),
}

/// What a spec's `cgroupsPath` means for the VMM's host cgroup.
#[derive(Debug, PartialEq, Eq)]
pub enum HostCgroupPlan {
    /// The spec names no cgroup.
    None,
    /// This directory below `root`.
    At(PathBuf),
    /// A form moat does not place the VMM by (see the module's docs).
    Unsupported(String),
}

/// Reads `cgroups_path` (`linux.cgroupsPath`) against the hierarchy at `root`.
pub fn plan(root: &Path, cgroups_path: &str) -> Result<HostCgroupPlan, CgroupPathError> {
    if cgroups_path.contains(':') {
        return Ok(HostCgroupPlan::Unsupported(format!(
            "the systemd cgroup driver's {cgroups_path:?}"
        )));
    }
    let mut path = root.to_owned();
    for part in cgroups_path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
    {
        if part == ".." {
            return Err(CgroupPathError::Escapes(cgroups_path.to_owned()));
        }
        path.push(part);
    }
    if path == root {
        return Ok(HostCgroupPlan::None);
    }
    if !root.join("cgroup.controllers").exists() {
        return Ok(HostCgroupPlan::Unsupported(format!(
            "{cgroups_path:?} on a host without cgroup v2 at {}",
            root.display()
        )));
    }
    Ok(HostCgroupPlan::At(path))
}

/// A cgroup made for a pod's VMM. The caller removes it after the VMM is
/// reaped ([`HostCgroup::remove`]).
#[derive(Debug)]
pub struct HostCgroup {
    path: PathBuf,
    procs: File,
}

impl HostCgroup {
    /// Makes the cgroup at `path` (with missing parents, as runc does),
    /// records it in `sandbox_dir` and opens its `cgroup.procs`.
    pub fn create(path: &Path, sandbox_dir: &Path) -> io::Result<HostCgroup> {
        fs::create_dir_all(path)?;
        let opened = fs::write(
            sandbox_dir.join(RECORD_FILE),
            path.as_os_str().as_encoded_bytes(),
        )
        .and_then(|()| {
            OpenOptions::new()
                .write(true)
                .open(path.join("cgroup.procs"))
        });
        match opened {
            Ok(procs) => Ok(HostCgroup {
                path: path.to_owned(),
                procs,
            }),
            Err(e) => {
                let _ = fs::remove_dir(path);
                Err(e)
            }
        }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, for the VMM to write "0" to between fork and exec.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Removes the cgroup, waiting (bounded) for its last process to be gone.
    pub fn remove(&self) {
        remove(&self.path);
    }
}

/// Removes `path` once it holds no process (rmdir fails with EBUSY until
/// then); gives up after 5 s, logging it.
fn remove(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                log::warn!("cannot remove cgroup {}: {e}", path.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removes the host cgroup recorded in `sandbox_dir`, after a dead shim.
pub fn remove_recorded(sandbox_dir: &Path) {
    let Ok(recorded) = fs::read_to_string(sandbox_dir.join(RECORD_FILE)) else {
        return;
    };
    let path = PathBuf::from(recorded);
    // Only ever a directory below the hierarchy (the file is ours, but a
    // state directory is not worth trusting further than that).
    if path.starts_with(CGROUP_ROOT) && !path.components().any(|c| c.as_os_str() == "..") {
        remove(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;

    fn v2_root() -> TempDir {
        let t = TempDir::new("cgroot");
        fs::write(t.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        t
    }

    #[test]
    fn cgroupfs_paths_land_below_the_root() {
        let t = v2_root();
        let root = t.path();
        let at = |p: &str| plan(root, p).unwrap();
        assert_eq!(
            at("/kubepods/pod1/abc"),
            HostCgroupPlan::At(root.join("kubepods/pod1/abc"))
        );
        assert_eq!(
            at("default/abc"),
            HostCgroupPlan::At(root.join("default/abc"))
        );
        assert_eq!(at("//a/./b/"), HostCgroupPlan::At(root.join("a/b")));
        assert_eq!(at(""), HostCgroupPlan::None);
        assert_eq!(at("/"), HostCgroupPlan::None);
    }

    #[test]
    fn escaping_and_unsupported_forms() {
        let t = v2_root();
        assert_eq!(
            plan(t.path(), "/a/../../etc"),
            Err(CgroupPathError::Escapes("/a/../../etc".into()))
        );
        let systemd = plan(t.path(), "kubepods-pod1.slice:cri-containerd:abc").unwrap();
        assert!(matches!(systemd, HostCgroupPlan::Unsupported(m) if m.contains("systemd")));
        let v1 = TempDir::new("cgroot-v1");
        let old = plan(v1.path(), "/a/b").unwrap();
        assert!(matches!(old, HostCgroupPlan::Unsupported(m) if m.contains("cgroup v2")));
    }

    #[test]
    fn create_records_and_remove_undoes() {
        let t = TempDir::new("cg");
        let sandbox = t.path().join("sandbox");
        fs::create_dir(&sandbox).unwrap();
        let path = t.path().join("parent/pod");
        fs::create_dir_all(&path).unwrap();
        // A plain directory stands in for the cgroup: cgroup.procs is a file.
        fs::write(path.join("cgroup.procs"), "").unwrap();
        let cg = HostCgroup::create(&path, &sandbox).unwrap();
        assert_eq!(
            fs::read_to_string(sandbox.join(RECORD_FILE)).unwrap(),
            path.to_string_lossy()
        );
        assert!(cg.procs_fd() >= 0);
        fs::remove_file(path.join("cgroup.procs")).unwrap();
        cg.remove();
        assert!(!path.exists() && t.path().join("parent").exists());
    }

    #[test]
    fn a_recorded_path_outside_the_hierarchy_is_left_alone() {
        let t = TempDir::new("cg-rec");
        let victim = t.path().join("victim");
        fs::create_dir(&victim).unwrap();
        fs::write(
            t.path().join(RECORD_FILE),
            victim.to_string_lossy().as_bytes(),
        )
        .unwrap();
        remove_recorded(t.path());
        assert!(victim.exists());
    }
}
