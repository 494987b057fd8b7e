//! The pod's cgroup on the host, where moat-vmm runs.
//!
//! A pod's CPU time and memory on the host are moat-vmm's: the guest's
//! RAM is the VMM's memory, its vCPUs are the VMM's threads. Kubelet
//! accounts, limits and evicts pods by their cgroups, so the VMM joins the
//! cgroup that the sandbox's spec names (`linux.cgroupsPath`, below the
//! pod's `cgroup_parent`), as runc puts the pause process there: on a
//! cgroup v2 host the one directory, on a v1 (or hybrid) host that path in
//! every mounted hierarchy, as runc does. It joins between fork and exec,
//! so that nothing it allocates is charged to the shim's cgroup first.
//!
//! Both drivers' forms of the path are honoured. The cgroupfs driver's is
//! "/parent/.../name". The systemd driver's is "slice:prefix:name" (what
//! containerd gives when the pod's cgroup_parent is a slice): runc asks
//! systemd over D-Bus for a scope unit there; moat makes the directory
//! where systemd would put that scope (`a-b.slice` lies in
//! `a.slice/a-b.slice`, the scope is `prefix-name.scope`), without D-Bus,
//! so the pod slice's limits and accounting cover the VM. systemd does not
//! know that scope as a unit of its own.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The file in a sandbox's state directory naming its host cgroups (one
/// per line), for `shim delete` after the shim died.
const RECORD_FILE: &str = "host-cgroup";

/// A `linux.cgroupsPath` that moat refuses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CgroupPathError {
    /// A `..` component would leave the cgroup hierarchy.
    #[error("cgroupsPath {0:?} has a '..' component")]
    Escapes(String),
    /// A systemd driver path that is not "slice:prefix:name".
    #[error("cgroupsPath {0:?} is not a systemd slice:prefix:name")]
    BadSystemd(String),
}

/// What a spec's `cgroupsPath` means for the VMM's host cgroup.
#[derive(Debug, PartialEq, Eq)]
pub enum HostCgroupPlan {
    /// The spec names no cgroup.
    None,
    /// This path below each hierarchy's root.
    At(PathBuf),
}

/// Reads `cgroups_path` (`linux.cgroupsPath`).
pub fn plan(cgroups_path: &str) -> Result<HostCgroupPlan, CgroupPathError> {
    if cgroups_path.contains(':') {
        return systemd_path(cgroups_path).map(HostCgroupPlan::At);
    }
    let mut path = PathBuf::new();
    for part in cgroups_path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
    {
        if part == ".." {
            return Err(CgroupPathError::Escapes(cgroups_path.to_owned()));
        }
        path.push(part);
    }
    Ok(if path.as_os_str().is_empty() {
        HostCgroupPlan::None
    } else {
        HostCgroupPlan::At(path)
    })
}

/// Where systemd puts the unit of "slice:prefix:name": the slice's path
/// (each `-` opens a parent slice; `-.slice` is the root; an empty slice
/// means `system.slice`, as for runc), then `prefix-name.scope` (or `name`
/// itself when it is a slice).
fn systemd_path(p: &str) -> Result<PathBuf, CgroupPathError> {
    let bad = || CgroupPathError::BadSystemd(p.to_owned());
    let name_ok = |s: &str| !s.is_empty() && !s.contains('/') && s != "." && s != "..";
    let [slice, prefix, name] = p.split(':').collect::<Vec<_>>()[..] else {
        return Err(bad());
    };
    if !name_ok(prefix) || !name_ok(name) {
        return Err(bad());
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let stem = slice.strip_suffix(".slice").ok_or_else(bad)?;
    let mut path = PathBuf::new();
    if stem != "-" {
        if !name_ok(stem) || stem.split('-').any(str::is_empty) {
            return Err(bad());
        }
        let mut parent = String::new();
        for part in stem.split('-') {
            if !parent.is_empty() {
                parent.push('-');
            }
            parent.push_str(part);
            path.push(format!("{parent}.slice"));
        }
    }
    if name.ends_with(".slice") {
        path.push(name);
    } else {
        path.push(format!("{prefix}-{name}.scope"));
    }
    Ok(path)
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its mount point.
    pub mount: PathBuf,
    /// Whether it has the v1 cpuset controller, whose new cgroups take no
    /// process until their cpus and mems are set.
    pub cpuset: bool,
}

/// The host's hierarchies: the unified one on a cgroup v2 host, else
/// every cgroup (v1) and cgroup2 mount below [`CGROUP_ROOT`].
pub fn hierarchies() -> Vec<Hierarchy> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![Hierarchy {
            mount: root.to_owned(),
            cpuset: false,
        }];
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mountinfo(&mountinfo, root)
}

fn parse_mountinfo(mountinfo: &str, root: &Path) -> Vec<Hierarchy> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount = PathBuf::from(left.split(' ').nth(4)?);
            let mut fields = right.split(' ');
            let fstype = fields.next()?;
            let options = fields.nth(1).unwrap_or_default();
            let cpuset = options.split(',').any(|o| o == "cpuset");
            ((fstype == "cgroup" || fstype == "cgroup2") && mount.starts_with(root))
                .then_some(Hierarchy { mount, cpuset })
        })
        .collect()
}

/// The cgroup made for a pod's VMM, in each hierarchy. The caller removes
/// it after the VMM is reaped ([`HostCgroup::remove`]).
#[derive(Debug)]
pub struct HostCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
}

impl HostCgroup {
    /// Makes `path` in each of `hierarchies` (with missing parents, as
    /// runc does), records the directories in `sandbox_dir` and opens
    /// their `cgroup.procs`. On error, nothing made is left.
    pub fn create(
        hierarchies: &[Hierarchy],
        path: &Path,
        sandbox_dir: &Path,
    ) -> io::Result<HostCgroup> {
        let mut cg = HostCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let made = cg.make_all(hierarchies, path, sandbox_dir);
        if made.is_err() {
            cg.remove();
        }
        made.map(|()| cg)
    }

    fn make_all(
        &mut self,
        hierarchies: &[Hierarchy],
        path: &Path,
        sandbox_dir: &Path,
    ) -> io::Result<()> {
        for h in hierarchies {
            let dir = h.mount.join(path);
            fs::create_dir_all(&dir)?;
            self.dirs.push(dir.clone());
            if h.cpuset {
                inherit_cpuset(&h.mount, path)?;
            }
            self.procs.push(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))?,
            );
        }
        let record: Vec<String> = self
            .dirs
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        fs::write(sandbox_dir.join(RECORD_FILE), record.join("\n"))
    }

    /// Each hierarchy's `cgroup.procs`, for the VMM and the pod's other
    /// host helpers to join between fork and exec ([`join_from_child`]).
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Removes the cgroup, waiting (bounded) for its last process to be gone.
    pub fn remove(&self) {
        for dir in &self.dirs {
            remove(dir);
        }
    }
}

/// Moves the calling process into the cgroups whose open `cgroup.procs`
/// are `procs`. Only write(2): safe between fork and exec.
pub fn join_from_child(procs: &[RawFd]) -> io::Result<()> {
    for fd in procs {
        // "0": the writing process itself.
        // SAFETY: writes one byte from a static buffer to an open descriptor.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Gives every cgroup of `path` below a v1 cpuset hierarchy's `mount`
/// whose cpus or mems are unset its parent's (a new cpuset cgroup starts
/// with none, and takes no process until both are set).
fn inherit_cpuset(mount: &Path, path: &Path) -> io::Result<()> {
    let mut dir = mount.to_owned();
    for part in path.iter() {
        let parent = dir.clone();
        dir.push(part);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own = fs::read_to_string(dir.join(file)).unwrap_or_default();
            if own.trim().is_empty() {
                fs::write(dir.join(file), fs::read_to_string(parent.join(file))?)?;
            }
        }
    }
    Ok(())
}

/// Removes `dir` once it holds no process (rmdir fails with EBUSY until
/// then); gives up after 5 s, logging it.
fn remove(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                log::warn!("cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removes the host cgroups recorded in `sandbox_dir`, after a dead shim.
pub fn remove_recorded(sandbox_dir: &Path) {
    let Ok(recorded) = fs::read_to_string(sandbox_dir.join(RECORD_FILE)) else {
        return;
    };
    for dir in recorded.lines().map(PathBuf::from) {
        // Only ever a directory below the hierarchies (the file is ours,
        // but a state directory is not worth trusting further than that).
        if dir.starts_with(CGROUP_ROOT) && !dir.components().any(|c| c.as_os_str() == "..") {
            remove(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;

    #[test]
    fn cgroupfs_paths_are_relative_and_checked() {
        let at = |p: &str| plan(p).unwrap();
        assert_eq!(
            at("/kubepods/pod1/abc"),
            HostCgroupPlan::At("kubepods/pod1/abc".into())
        );
        assert_eq!(at("default/abc"), HostCgroupPlan::At("default/abc".into()));
        assert_eq!(at("//a/./b/"), HostCgroupPlan::At("a/b".into()));
        assert_eq!(at(""), HostCgroupPlan::None);
        assert_eq!(at("/"), HostCgroupPlan::None);
        assert_eq!(
            plan("/a/../../etc"),
            Err(CgroupPathError::Escapes("/a/../../etc".into()))
        );
    }

    /// The systemd driver's "slice:prefix:name" lands where systemd puts
    /// the scope; anything else of that form is refused.
    #[test]
    fn systemd_paths_are_where_systemd_puts_the_scope() {
        let at = |p: &str| match plan(p).unwrap() {
            HostCgroupPlan::At(path) => path.to_string_lossy().into_owned(),
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(
            at("kubepods-burstable-pod1.slice:cri-containerd:abc"),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
        );
        assert_eq!(at("-.slice:moat:x"), "moat-x.scope");
        assert_eq!(at(":docker:x"), "system.slice/docker-x.scope");
        assert_eq!(at("a.slice:p:a-b.slice"), "a.slice/a-b.slice");
        for bad in [
            "a:b",
            "a.slice:b:c:d",
            "a.scope:p:x",
            "a--b.slice:p:x",
            "-a.slice:p:x",
            "a.slice:p:..",
            "a.slice:p:x/y",
            "a/b.slice:p:x",
            "a.slice::x",
        ] {
            assert_eq!(
                plan(bad),
                Err(CgroupPathError::BadSystemd(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn v1_and_hybrid_hierarchies_from_mountinfo() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
31 25 0:27 / /sys/fs/cgroup/cpuset rw,nosuid shared:11 - cgroup cgroup rw,cpuset
32 25 0:28 / /sys/fs/cgroup/memory rw,nosuid shared:12 - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/systemd rw shared:13 - cgroup cgroup rw,xattr,name=systemd
40 22 0:5 / /proc rw - proc proc rw
41 22 0:30 / /elsewhere rw - cgroup cgroup rw,pids";
        let h = parse_mountinfo(mountinfo, Path::new(CGROUP_ROOT));
        let mounts: Vec<(&str, bool)> = h
            .iter()
            .map(|h| (h.mount.to_str().unwrap(), h.cpuset))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/sys/fs/cgroup/unified", false),
                ("/sys/fs/cgroup/cpuset", true),
                ("/sys/fs/cgroup/memory", false),
                ("/sys/fs/cgroup/systemd", false),
            ]
        );
    }

    /// Plain directories stand in for the hierarchies: cgroup.procs and
    /// the cpuset files are files.
    #[test]
    fn create_in_every_hierarchy_records_and_remove_undoes() {
        let t = TempDir::new("cg");
        let sandbox = t.path().join("sandbox");
        fs::create_dir(&sandbox).unwrap();
        let hier = |name: &str, cpuset| Hierarchy {
            mount: t.path().join(name),
            cpuset,
        };
        let hs = [hier("memory", false), hier("cpuset", true)];
        fs::create_dir_all(t.path().join("cpuset/pod/vm")).unwrap();
        fs::write(t.path().join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        fs::write(t.path().join("cpuset/cpuset.mems"), "0\n").unwrap();
        for h in &hs {
            let leaf = h.mount.join("pod/vm");
            fs::create_dir_all(&leaf).unwrap();
            fs::write(leaf.join("cgroup.procs"), "").unwrap();
        }
        let cg = HostCgroup::create(&hs, Path::new("pod/vm"), &sandbox).unwrap();
        assert_eq!(cg.procs_fds().len(), 2);
        let cpus = fs::read_to_string(t.path().join("cpuset/pod/vm/cpuset.cpus")).unwrap();
        assert_eq!(cpus, "0-1\n", "a new cpuset cgroup takes its parent's cpus");
        let record = fs::read_to_string(sandbox.join(RECORD_FILE)).unwrap();
        assert_eq!(record.lines().count(), 2);
        for h in &hs {
            let leaf = h.mount.join("pod/vm");
            for f in ["cgroup.procs", "cpuset.cpus", "cpuset.mems"] {
                let _ = fs::remove_file(leaf.join(f));
            }
        }
        cg.remove();
        for h in &hs {
            assert!(!h.mount.join("pod/vm").exists() && h.mount.join("pod").exists());
        }
    }

    #[test]
    fn a_failed_create_leaves_nothing() {
        let t = TempDir::new("cg-fail");
        let good = Hierarchy {
            mount: t.path().join("memory"),
            cpuset: false,
        };
        let bad = Hierarchy {
            mount: t.path().join("no-procs"),
            cpuset: false,
        };
        fs::create_dir_all(good.mount.join("p")).unwrap();
        fs::write(good.mount.join("p/cgroup.procs"), "").unwrap();
        fs::remove_file(good.mount.join("p/cgroup.procs")).unwrap();
        // Neither has a cgroup.procs: the first open fails, and the
        // directory made for it goes again.
        let e = HostCgroup::create(&[bad.clone(), good], Path::new("p"), t.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!bad.mount.join("p").exists());
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
