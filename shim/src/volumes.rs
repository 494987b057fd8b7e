//! Bind mounts of host paths in a container's spec (Kubernetes' hosts,
//! resolv.conf and hostname files, configmaps, secrets, `ctr run --mount`).
//! A read-write directory (hostPath, PVC) is shared live ([`crate::share`]).
//! Everything else is read-only or a file: the guest cannot see host
//! paths, so their content is copied into the
//! agent's shared directory (CopyFile) and the spec's source is rewritten to
//! the copy. While the container lives, the sources are checked every
//! [`SYNC_INTERVAL`]: what was added or changed is copied again and what
//! was deleted is removed (so a Kubernetes configmap update, a new
//! timestamped directory, a swapped `..data` symlink and the old directory
//! gone, reaches the guest). The pod's /dev/shm (a bind of the sandbox's
//! shm directory) becomes a bind of the guest's /dev/shm, which all the
//! pod's containers share, as they share the sandbox's on the host.
//!
//! Propagation: with the CRI default (`rprivate`) a mount made on the host
//! below a source after the container was created is not followed (its
//! directory keeps what the guest last had), as with a private bind;
//! with `rslave` or `rshared` it is copied in, or, for a share, served
//! (its server's jail is a slave of the host's mounts).
//!
//! The shim runs as root and reads paths that others may control, so:
//! - a source is resolved once, when the container is created (a symlink
//!   at the top is followed then, as a bind mount does), and every later
//!   check reads that same file or directory through a descriptor;
//! - below it, nothing is resolved by path: directories are opened from
//!   their parent's descriptor without following symlinks (symlinks are
//!   copied as symlinks), so a component swapped for a symlink redirects
//!   nothing;
//! - a file is opened only after it was pinned (`O_PATH`) and found to be
//!   the regular file that was planned: never a FIFO, socket or device.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use moat_protocol::agent::CopyFileRequest;
use moat_protocol::AgentClient;
use serde_json::{json, Value};
use thiserror::Error;

use crate::share::Share;

/// Total bytes one container may have copied in: volumes live in guest RAM.
pub const MAX_COPY_BYTES: u64 = 64 << 20;
/// How often a running container's bind sources are checked for changes.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("bind mount source {} (for {dest}) cannot be read: {source}", path.display())]
    Source {
        path: PathBuf,
        dest: String,
        source: std::io::Error,
    },
    #[error("bind mount source {} (for {dest}) is a device, socket or fifo; only files and directories can be copied into the VM", path.display())]
    Special { path: PathBuf, dest: String },
    #[error("bind mounts hold more than {} MiB; volumes are copied into guest memory", MAX_COPY_BYTES >> 20)]
    TooLarge,
    #[error("copying {path} into the guest: {detail}")]
    Copy { path: String, detail: String },
}

/// One thing to create below the guest's shared directory.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Dir {
        rel: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    File {
        rel: String,
        /// The host path, for messages only.
        host: PathBuf,
        /// The source it lies in, and its path below it (empty for a file
        /// source itself).
        root: Root,
        inner: PathBuf,
        /// The inode planned: a file swapped since is not read.
        ino: u64,
        /// Bytes to copy: the size when planned (a file that grows since is
        /// cut there, so the limit holds).
        len: u64,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        rel: String,
        target: String,
    },
    /// Gone from the host (with everything below it).
    Remove {
        rel: String,
    },
}

impl Item {
    fn rel(&self) -> &str {
        match self {
            Item::Dir { rel, .. }
            | Item::File { rel, .. }
            | Item::Symlink { rel, .. }
            | Item::Remove { rel } => rel,
        }
    }
}

fn read_only(m: &Value) -> bool {
    m["options"]
        .as_array()
        .is_some_and(|o| o.iter().any(|x| x == "ro"))
}

fn is_bind(m: &Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// A bind source, opened (`O_PATH`) once when the container is created.
#[derive(Debug, Clone)]
pub struct Root(Arc<OwnedFd>);

impl PartialEq for Root {
    fn eq(&self, other: &Root) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Root {}

/// One host bind source of a container.
#[derive(Debug)]
struct Source {
    root: Root,
    /// The host path, for messages only.
    host: PathBuf,
    /// Path below the shared dir.
    rel: String,
    /// The spec's destination.
    dest: String,
    /// Mounts made below the source later are followed (`rslave`,
    /// `rshared`), not hidden (`rprivate`).
    follows_new_mounts: bool,
    /// The mounts below the source when the container was created.
    mounts: HashSet<u64>,
}

/// Whether a bind's options let host mounts made later reach it.
fn follows_new_mounts(m: &Value) -> bool {
    m["options"].as_array().is_some_and(|o| {
        o.iter()
            .any(|x| ["rslave", "slave", "rshared", "shared"].contains(&x.as_str().unwrap_or("")))
    })
}

/// A container's host bind sources and what the guest has of them.
#[derive(Debug, Default)]
pub struct Volumes {
    /// Read-write directories, shared live instead of copied.
    pub shares: Vec<Share>,
    sources: Vec<Source>,
    /// What was last copied, by path below the shared dir.
    seen: HashMap<String, Stamp>,
}

/// What tells a copied entry apart from a changed one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    mtime_ns: i128,
    ctime_ns: i128,
    size: u64,
    mode: u32,
    ino: u64,
}

/// Rewrites the spec's host bind mounts to copies in the guest and returns
/// them, with everything still to copy. `container_id` keeps containers'
/// copies apart.
pub fn plan(spec: &mut Value, container_id: &str) -> Result<(Volumes, Vec<Item>), VolumeError> {
    let mut v = Volumes::default();
    let Some(mounts) = spec["mounts"].as_array_mut() else {
        return Ok((v, Vec::new()));
    };
    let mut empty_dirs = Vec::new();
    for (i, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let dest = m["destination"].as_str().unwrap_or_default().to_owned();
        if dest == "/dev/shm" {
            *m = json!({
                "destination": "/dev/shm", "type": "bind",
                "source": moat_protocol::GUEST_POD_SHM,
                "options": ["rbind", "nosuid", "noexec", "nodev"]
            });
            continue;
        }
        let host = PathBuf::from(m["source"].as_str().unwrap_or_default());
        if let Some(name) = kubelet_empty_dir(&host) {
            // One guest directory for the whole pod, never copied: the
            // pod's containers share it live, as on the host.
            let rel = format!("{POD_EMPTY_DIRS}/{name}");
            m["source"] = json!(format!("{}/{rel}", moat_protocol::GUEST_SHARED_DIR));
            empty_dirs.push(Item::Dir {
                rel,
                mode: 0o777,
                uid: 0,
                gid: 0,
            });
            continue;
        }
        // The one resolution of the path, following symlinks as a bind does.
        let source_err = |e: nix::Error| VolumeError::Source {
            path: host.clone(),
            dest: dest.clone(),
            source: e.into(),
        };
        let root = nix::fcntl::open(&host, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(source_err)?;
        if !read_only(m) && file_type(&fstat(&root).map_err(source_err)?) == SFlag::S_IFDIR {
            let tag = format!("{container_id}-m{i}");
            m["source"] = json!(format!("{}/{tag}", moat_protocol::GUEST_SHARES_DIR));
            // The directory the descriptor holds, whatever the path is now.
            let dir =
                fs::read_link(format!("/proc/self/fd/{}", root.as_raw_fd())).map_err(|e| {
                    VolumeError::Source {
                        path: host.clone(),
                        dest: dest.clone(),
                        source: e,
                    }
                })?;
            v.shares.push(Share {
                tag,
                dir,
                follow_host_mounts: follows_new_mounts(m),
            });
            continue;
        }
        let rel = format!("{container_id}/m{i}");
        m["source"] = json!(format!("{}/{rel}", moat_protocol::GUEST_SHARED_DIR));
        v.sources.push(Source {
            root: Root(Arc::new(root)),
            host,
            rel,
            dest,
            follows_new_mounts: follows_new_mounts(m),
            mounts: HashSet::new(),
        });
    }
    let mut items = v.changes()?;
    if !empty_dirs.is_empty() {
        let parent = Item::Dir {
            rel: POD_EMPTY_DIRS.into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        items.splice(0..0, std::iter::once(parent).chain(empty_dirs));
    }
    Ok((v, items))
}

/// Below the guest's shared directory: the pod's emptyDir volumes.
const POD_EMPTY_DIRS: &str = "pod-empty-dirs";

/// The volume name of a kubelet emptyDir path
/// (`<kubelet root>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/<name>`).
fn kubelet_empty_dir(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    let plugin = path.parent()?;
    let volumes = plugin.parent()?;
    let pods = volumes.parent()?.parent()?;
    let named = |p: &Path, n: &str| p.file_name().is_some_and(|f| f == n);
    let valid = !name.is_empty() && name != "." && name != "..";
    (valid
        && named(plugin, "kubernetes.io~empty-dir")
        && named(volumes, "volumes")
        && named(pods, "pods"))
    .then_some(name)
}

impl Volumes {
    /// Whether there is nothing to keep in sync (shares need no sync).
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// After a failed copy: the next `changes` sends everything again.
    pub fn forget(&mut self) {
        self.seen.clear();
    }

    /// What was added, changed or removed on the host since the last call
    /// (all of it the first time), in an order the guest can apply it in.
    pub fn changes(&mut self) -> Result<Vec<Item>, VolumeError> {
        let mut found = Vec::new();
        let mut total = 0;
        let mut hidden = Vec::new();
        for s in &mut self.sources {
            let mut walk = Walk {
                items: &mut found,
                total: &mut total,
                hidden: &mut hidden,
                mounts: MountRule::of(s),
            };
            walk_source(s, &mut walk)?;
            if let MountRule::Record(seen) = walk.mounts {
                s.mounts = seen;
            }
        }
        // What lies below a hidden new mount stays as the guest has it.
        let kept = |rel: &str| {
            hidden
                .iter()
                .any(|h: &String| rel == h || rel.starts_with(&format!("{h}/")))
        };
        let present: HashSet<&str> = found
            .iter()
            .map(|(i, _)| i.rel())
            .chain(self.seen.keys().map(String::as_str).filter(|k| kept(k)))
            .collect();
        // Removals first, top-most only (a directory takes its contents).
        let mut gone: Vec<String> = self
            .seen
            .keys()
            .filter(|k| !present.contains(k.as_str()))
            .cloned()
            .collect();
        gone.sort();
        let mut items: Vec<Item> = Vec::new();
        for rel in gone {
            self.seen.remove(&rel);
            let under_removed = items
                .iter()
                .any(|i| rel.starts_with(&format!("{}/", i.rel())));
            if !under_removed {
                items.push(Item::Remove { rel });
            }
        }
        for (item, stamp) in found {
            let rel = item.rel().to_owned();
            match self.seen.get(&rel) {
                Some(old) if *old == stamp => continue,
                // A file that became a directory (or the like) goes first.
                Some(old) if old.mode & libc::S_IFMT != stamp.mode & libc::S_IFMT => {
                    items.push(Item::Remove { rel: rel.clone() });
                }
                _ => {}
            }
            self.seen.insert(rel, stamp);
            items.push(item);
        }
        Ok(items)
    }
}

fn stamp(st: &FileStat) -> Stamp {
    Stamp {
        mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
        ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        size: st.st_size as u64,
        mode: st.st_mode,
        ino: st.st_ino,
    }
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Resolution below a source: no symlink, nothing outside it.
fn beneath(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
}

/// Where the walk is: the source, and the entry's host path (messages)
/// and paths below the source and below the shared dir.
struct At<'a> {
    source: &'a Source,
    host: PathBuf,
    inner: PathBuf,
    rel: String,
}

impl At<'_> {
    fn err(&self, e: impl Into<std::io::Error>) -> VolumeError {
        VolumeError::Source {
            path: self.host.clone(),
            dest: self.source.dest.clone(),
            source: e.into(),
        }
    }

    fn child(&self, name: &OsStr) -> Self {
        let name_str = name.to_string_lossy();
        At {
            source: self.source,
            host: self.host.join(name),
            inner: self.inner.join(name),
            rel: format!("{}/{name_str}", self.rel),
        }
    }
}

/// One walk over the sources: what it found, the bytes so far, and the
/// directories it left alone (new private mounts).
struct Walk<'a> {
    items: &'a mut Vec<(Item, Stamp)>,
    total: &'a mut u64,
    hidden: &'a mut Vec<String>,
    mounts: MountRule,
}

/// What mounts below a source mean to a walk of it.
enum MountRule {
    /// The first walk: every mount found is the container's.
    Record(HashSet<u64>),
    /// A private source: a directory on another mount is not walked.
    Known(HashSet<u64>),
    /// A source that follows host mounts: walk everything.
    Follow,
}

impl MountRule {
    fn of(s: &Source) -> MountRule {
        if s.follows_new_mounts {
            MountRule::Follow
        } else if s.mounts.is_empty() {
            MountRule::Record(HashSet::new())
        } else {
            MountRule::Known(s.mounts.clone())
        }
    }
}

/// The id of the mount `dir` lies on; 0 on kernels without `STATX_MNT_ID`
/// (every mount then looks the same, and all are followed).
fn mount_id(dir: &OwnedFd) -> std::io::Result<u64> {
    // SAFETY: an all-zero statx is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx of the descriptor itself (empty path, AT_EMPTY_PATH)
    // writes into `stx`, which we own.
    let r = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(if stx.stx_mask & libc::STATX_MNT_ID != 0 {
        stx.stx_mnt_id
    } else {
        0
    })
}

/// Walks one source from its descriptor: a file, or a directory tree.
fn walk_source(source: &Source, walk: &mut Walk) -> Result<(), VolumeError> {
    let at = At {
        source,
        host: source.host.clone(),
        inner: PathBuf::new(),
        rel: source.rel.clone(),
    };
    let root = source.root.0.as_fd();
    let st = fstat(root).map_err(|e| at.err(e))?;
    match file_type(&st) {
        SFlag::S_IFREG => add_file(&at, &st, walk),
        SFlag::S_IFDIR => {
            let dir = openat2(root, ".", beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
                .map_err(|e| at.err(e))?;
            walk_dir(&at, dir, walk)
        }
        _ => Err(VolumeError::Special {
            path: source.host.clone(),
            dest: source.dest.clone(),
        }),
    }
}

fn add_file(at: &At, st: &FileStat, walk: &mut Walk) -> Result<(), VolumeError> {
    let len = st.st_size as u64;
    *walk.total += len;
    if *walk.total > MAX_COPY_BYTES {
        return Err(VolumeError::TooLarge);
    }
    walk.items.push((
        Item::File {
            rel: at.rel.clone(),
            host: at.host.clone(),
            root: at.source.root.clone(),
            inner: at.inner.clone(),
            ino: st.st_ino,
            len,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        },
        stamp(st),
    ));
    Ok(())
}

/// Adds the directory open at `dir` and, sorted, what is in it.
fn walk_dir(at: &At, dir: OwnedFd, walk: &mut Walk) -> Result<(), VolumeError> {
    let mount = mount_id(&dir).map_err(|e| at.err(e))?;
    match &mut walk.mounts {
        MountRule::Record(seen) => {
            seen.insert(mount);
        }
        MountRule::Known(known) if !known.contains(&mount) => {
            walk.hidden.push(at.rel.clone());
            return Ok(());
        }
        _ => {}
    }
    let st = fstat(&dir).map_err(|e| at.err(e))?;
    walk.items.push((
        Item::Dir {
            rel: at.rel.clone(),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        },
        stamp(&st),
    ));
    // Lists the directory the descriptor holds, whatever its path is now.
    let mut names: Vec<_> = fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(|e| at.err(e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| at.err(e))?;
    names.sort();
    for name in names {
        walk_entry(&at.child(&name), dir.as_fd(), &name, walk)?;
    }
    Ok(())
}

fn walk_entry(at: &At, dir: BorrowedFd, name: &OsStr, walk: &mut Walk) -> Result<(), VolumeError> {
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| at.err(e))?;
    match file_type(&st) {
        SFlag::S_IFLNK => {
            let target = nix::fcntl::readlinkat(dir, name).map_err(|e| at.err(e))?;
            walk.items.push((
                Item::Symlink {
                    rel: at.rel.clone(),
                    target: target.to_string_lossy().into_owned(),
                },
                stamp(&st),
            ));
            Ok(())
        }
        SFlag::S_IFREG => add_file(at, &st, walk),
        SFlag::S_IFDIR => {
            let sub = openat2(dir, name, beneath(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
                .map_err(|e| at.err(e))?;
            walk_dir(at, sub, walk)
        }
        _ => {
            log::warn!(
                "not copying {} into the guest: not a file",
                at.host.display()
            );
            Ok(())
        }
    }
}

/// Opens for reading the regular file `inner` below `root` if it is still
/// the inode `ino`; `None` if it is gone or was swapped (for a symlink, a
/// FIFO, a device or another file) since it was planned. Nothing but a
/// regular file of the source is ever opened for reading.
pub fn open_planned(root: &Root, inner: &Path, ino: u64) -> Option<fs::File> {
    let pinned = if inner.as_os_str().is_empty() {
        root.0.try_clone().ok()?
    } else {
        openat2(root.0.as_fd(), inner, beneath(OFlag::O_PATH)).ok()?
    };
    let st = fstat(&pinned).ok()?;
    if file_type(&st) != SFlag::S_IFREG || st.st_ino != ino {
        return None;
    }
    // An O_PATH descriptor cannot be read: reopen the inode it holds.
    fs::File::open(format!("/proc/self/fd/{}", pinned.as_raw_fd())).ok()
}

/// Creates `items` in the guest.
pub fn copy(agent: &AgentClient, items: &[Item], timeout: Duration) -> Result<(), VolumeError> {
    let send = |req: CopyFileRequest| {
        let path = req.path.clone();
        agent
            .copy_file(agent.ctx_timeout(timeout), &req)
            .map(drop)
            .map_err(|e| VolumeError::Copy {
                path,
                detail: e.to_string(),
            })
    };
    for item in items {
        match item {
            Item::Dir {
                rel,
                mode,
                uid,
                gid,
            } => send(CopyFileRequest {
                path: rel.clone(),
                mode: *mode,
                uid: *uid,
                gid: *gid,
                directory: true,
                ..Default::default()
            })?,
            Item::Symlink { rel, target } => send(CopyFileRequest {
                path: rel.clone(),
                symlink_target: target.clone(),
                ..Default::default()
            })?,
            Item::Remove { rel } => send(CopyFileRequest {
                path: rel.clone(),
                remove: true,
                ..Default::default()
            })?,
            Item::File {
                rel,
                host,
                root,
                inner,
                ino,
                len,
                mode,
                uid,
                gid,
            } => {
                let read_err = |e: std::io::Error| VolumeError::Copy {
                    path: rel.clone(),
                    detail: format!("reading {}: {e}", host.display()),
                };
                let Some(f) = open_planned(root, inner, *ino) else {
                    // Its new self shows in the next check's changes.
                    log::info!("{} changed while it was copied", host.display());
                    continue;
                };
                let mut f = f.take(*len);
                let mut offset = 0u64;
                // One request even for an empty file; chunks after that.
                loop {
                    let mut data = Vec::with_capacity(moat_protocol::MAX_COPY_CHUNK);
                    (&mut f)
                        .take(moat_protocol::MAX_COPY_CHUNK as u64)
                        .read_to_end(&mut data)
                        .map_err(read_err)?;
                    let n = data.len() as u64;
                    send(CopyFileRequest {
                        path: rel.clone(),
                        mode: *mode,
                        uid: *uid,
                        gid: *gid,
                        data,
                        offset,
                        ..Default::default()
                    })?;
                    offset += n;
                    if n < moat_protocol::MAX_COPY_CHUNK as u64 {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kubelet emptyDir is one guest directory of the pod, made (0777)
    /// and never copied; its host path need not even exist.
    #[test]
    fn empty_dirs_become_the_pods_guest_directories() {
        let src = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache";
        let mut spec = json!({"mounts": [
            {"destination": "/cache", "type": "bind", "source": src, "options": ["rbind"]}
        ]});
        let (vols, items) = plan(&mut spec, "c1").unwrap();
        assert!(vols.is_empty(), "nothing to sync");
        assert_eq!(
            spec["mounts"][0]["source"],
            "/run/moat/shared/pod-empty-dirs/cache"
        );
        let dirs: Vec<(&str, u32)> = items
            .iter()
            .map(|i| match i {
                Item::Dir { rel, mode, .. } => (rel.as_str(), *mode),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            dirs,
            [("pod-empty-dirs", 0o755), ("pod-empty-dirs/cache", 0o777)]
        );
        let p = |s: &str| kubelet_empty_dir(Path::new(s)).map(str::to_owned);
        assert_eq!(
            p("/k/pods/u/volumes/kubernetes.io~empty-dir/x"),
            Some("x".into())
        );
        assert_eq!(p("/k/pods/u/volumes/kubernetes.io~configmap/x"), None);
        assert_eq!(p("/k/pods/u/volumes/kubernetes.io~empty-dir/.."), None);
        assert_eq!(p("/k/other/u/volumes/kubernetes.io~empty-dir/x"), None);
    }

    /// A read-write directory is shared (its source becomes the guest's
    /// mount of it); a read-only one and a file are copied.
    #[test]
    fn read_write_directories_are_shared_the_rest_copied() {
        let t = tempdir("share");
        fs::create_dir_all(t.join("rw")).unwrap();
        fs::create_dir_all(t.join("ro")).unwrap();
        fs::write(t.join("file"), "f").unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/rw", "type": "bind", "source": t.join("rw"), "options": ["rbind", "rw"]},
            {"destination": "/ro", "type": "bind", "source": t.join("ro"), "options": ["rbind", "ro"]},
            {"destination": "/file", "type": "bind", "source": t.join("file"), "options": ["rbind", "rw"]},
            {"destination": "/slave", "type": "bind", "source": t.join("rw"), "options": ["rbind", "rslave", "rw"]}
        ]});
        let (vols, items) = plan(&mut spec, "c1").unwrap();
        assert_eq!(
            vols.shares,
            [
                Share {
                    tag: "c1-m0".into(),
                    dir: t.join("rw"),
                    follow_host_mounts: false,
                },
                Share {
                    tag: "c1-m3".into(),
                    dir: t.join("rw"),
                    follow_host_mounts: true,
                }
            ]
        );
        let m = &spec["mounts"];
        assert_eq!(m[0]["source"], "/run/moat/shares/c1-m0");
        assert_eq!(m[1]["source"], "/run/moat/shared/c1/m1");
        assert_eq!(m[2]["source"], "/run/moat/shared/c1/m2");
        let rels: Vec<&str> = items.iter().map(Item::rel).collect();
        assert_eq!(rels, ["c1/m1", "c1/m2"]);
        let _ = fs::remove_dir_all(&t);
    }

    /// A mount made on the host below a private (`rprivate`) source after
    /// the container was created is not copied, and what the guest had
    /// there stays; an `rslave` source copies it in.
    #[test]
    fn new_host_mounts_reach_only_sources_that_follow_them() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("!!! SKIPPED new_host_mounts_reach_only_sources_that_follow_them: needs root to mount");
            return;
        }
        let t = tempdir("prop");
        fs::create_dir_all(t.join("vol/sub")).unwrap();
        fs::write(t.join("vol/sub/old"), "old").unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/private", "type": "bind", "source": t.join("vol"), "options": ["rbind", "rprivate", "ro"]},
            {"destination": "/slave", "type": "bind", "source": t.join("vol"), "options": ["rbind", "rslave", "ro"]}
        ]});
        let (mut vols, items) = plan(&mut spec, "c1").unwrap();
        assert_eq!(files(&items), ["c1/m0/sub/old", "c1/m1/sub/old"]);

        let sub = t.join("vol/sub");
        nix::mount::mount(
            Some("tmpfs"),
            &sub,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(sub.clone());
        fs::write(sub.join("new"), "new").unwrap();
        let changed: Vec<String> = vols
            .changes()
            .unwrap()
            .iter()
            .map(|i| match i {
                Item::Remove { rel } => format!("-{rel}"),
                i => i.rel().to_owned(),
            })
            .collect();
        assert_eq!(changed, ["-c1/m1/sub/old", "c1/m1/sub", "c1/m1/sub/new"]);
        assert_eq!(vols.changes().unwrap(), []);
        let _ = fs::remove_dir_all(&t);
    }

    #[test]
    fn binds_are_rewritten_and_listed_and_shm_becomes_the_guests() {
        let t = std::env::temp_dir().join(format!("moat-vol-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        fs::create_dir_all(t.join("cfg/sub")).unwrap();
        fs::write(t.join("cfg/sub/a"), "A").unwrap();
        fs::write(t.join("hosts"), "127.0.0.1 x\n").unwrap();
        std::os::unix::fs::symlink("sub/a", t.join("cfg/link")).unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": t.join("hosts"), "options": ["rbind", "ro"]},
            {"destination": "/cfg", "type": "none", "source": t.join("cfg"), "options": ["bind", "ro"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/nonexistent/shm", "options": ["rbind"]}
        ]});
        let (mut vols, items) = plan(&mut spec, "c1").unwrap();
        let m = &spec["mounts"];
        assert_eq!(m[0]["source"], "proc");
        assert_eq!(m[1]["source"], "/run/moat/shared/c1/m1");
        assert_eq!(m[2]["source"], "/run/moat/shared/c1/m2");
        assert_eq!(m[3]["type"], "bind");
        assert_eq!(m[3]["source"], "/dev/shm");
        let rels: Vec<&str> = items.iter().map(Item::rel).collect();
        assert_eq!(
            rels,
            ["c1/m1", "c1/m2", "c1/m2/link", "c1/m2/sub", "c1/m2/sub/a"]
        );
        assert!(matches!(&items[2], Item::Symlink { target, .. } if target == "sub/a"));

        // Nothing changed: nothing to copy. Then a changed file, a new one
        // and a swapped symlink (as a configmap update) are found.
        assert_eq!(vols.changes().unwrap(), []);
        std::thread::sleep(Duration::from_millis(20));
        fs::write(t.join("hosts"), "127.0.0.1 y\n").unwrap();
        fs::write(t.join("cfg/sub/b"), "B").unwrap();
        fs::remove_file(t.join("cfg/link")).unwrap();
        std::os::unix::fs::symlink("sub/b", t.join("cfg/link")).unwrap();
        let rels = |items: Vec<Item>| -> Vec<String> {
            items
                .iter()
                .map(|i| match i {
                    Item::Remove { rel } => format!("-{rel}"),
                    i => i.rel().to_owned(),
                })
                .collect()
        };
        assert_eq!(
            rels(vols.changes().unwrap()),
            ["c1/m1", "c1/m2", "c1/m2/link", "c1/m2/sub", "c1/m2/sub/b"]
        );
        // Deletions: a directory goes whole; a symlink that becomes a
        // directory is removed before it is made again.
        std::thread::sleep(Duration::from_millis(20));
        fs::remove_dir_all(t.join("cfg/sub")).unwrap();
        fs::remove_file(t.join("cfg/link")).unwrap();
        fs::create_dir(t.join("cfg/link")).unwrap();
        assert_eq!(
            rels(vols.changes().unwrap()),
            ["-c1/m2/sub", "c1/m2", "-c1/m2/link", "c1/m2/link"]
        );
        assert_eq!(vols.changes().unwrap(), []);
        let _ = fs::remove_dir_all(&t);
    }

    fn tempdir(name: &str) -> PathBuf {
        let t = std::env::temp_dir().join(format!("moat-vol-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        fs::create_dir_all(&t).unwrap();
        t
    }

    fn files(items: &[Item]) -> Vec<&str> {
        items
            .iter()
            .filter(|i| matches!(i, Item::File { .. }))
            .map(Item::rel)
            .collect()
    }

    fn read(item: &Item) -> Option<String> {
        let Item::File {
            root, inner, ino, ..
        } = item
        else {
            panic!("{item:?} is not a file");
        };
        let mut s = String::new();
        open_planned(root, inner, *ino)?
            .read_to_string(&mut s)
            .unwrap();
        Some(s)
    }

    /// A source is resolved when the container is created, as a bind mount
    /// is: repointing a symlink on its path later changes nothing.
    #[test]
    fn a_source_path_is_resolved_once() {
        let t = tempdir("once");
        for (d, f) in [("a", "x"), ("b", "y")] {
            fs::create_dir_all(t.join(d)).unwrap();
            fs::write(t.join(d).join(f), d).unwrap();
        }
        std::os::unix::fs::symlink("a", t.join("src")).unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/v", "type": "bind", "source": t.join("src"), "options": ["ro"]}
        ]});
        let (mut vols, items) = plan(&mut spec, "c1").unwrap();
        assert_eq!(files(&items), ["c1/m0/x"]);
        fs::remove_file(t.join("src")).unwrap();
        std::os::unix::fs::symlink("b", t.join("src")).unwrap();
        assert_eq!(vols.changes().unwrap(), []);
        let _ = fs::remove_dir_all(&t);
    }

    /// A directory or file below a source swapped for a symlink between
    /// the check and the copy redirects nothing: the copy is skipped (the
    /// next check sends the symlink itself).
    #[test]
    fn swapped_components_redirect_no_copy() {
        let t = tempdir("swap");
        fs::create_dir_all(t.join("cfg/sub")).unwrap();
        fs::write(t.join("cfg/sub/a"), "A").unwrap();
        fs::write(t.join("cfg/b"), "B").unwrap();
        fs::create_dir_all(t.join("secret")).unwrap();
        fs::write(t.join("secret/a"), "SECRET").unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/v", "type": "bind", "source": t.join("cfg"), "options": ["ro"]}
        ]});
        let (_, items) = plan(&mut spec, "c1").unwrap();
        assert_eq!(files(&items), ["c1/m0/b", "c1/m0/sub/a"]);
        let (b, a) = (&items[1], &items[3]);
        assert_eq!(read(a).as_deref(), Some("A"));

        fs::rename(t.join("cfg/sub"), t.join("sub.old")).unwrap();
        std::os::unix::fs::symlink(t.join("secret"), t.join("cfg/sub")).unwrap();
        fs::remove_file(t.join("cfg/b")).unwrap();
        std::os::unix::fs::symlink(t.join("secret/a"), t.join("cfg/b")).unwrap();
        assert_eq!(read(a), None);
        assert_eq!(read(b), None);
        let _ = fs::remove_dir_all(&t);
    }

    /// A FIFO (or device) swapped in for a planned file is never opened:
    /// opening a FIFO for reading would block until a writer came.
    #[test]
    fn fifos_are_never_opened() {
        let t = tempdir("fifo");
        fs::create_dir_all(t.join("cfg")).unwrap();
        fs::write(t.join("cfg/f"), "F").unwrap();
        let mut spec = json!({"mounts": [
            {"destination": "/v", "type": "bind", "source": t.join("cfg"), "options": ["ro"]}
        ]});
        let (mut vols, items) = plan(&mut spec, "c1").unwrap();
        let f = items.into_iter().nth(1).unwrap();
        fs::remove_file(t.join("cfg/f")).unwrap();
        nix::unistd::mkfifo(&t.join("cfg/f"), Mode::from_bits_truncate(0o644)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(read(&f)).unwrap());
        let got = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(got, Ok(None), "the FIFO was opened");
        // Below a source a FIFO is left out; as the source, it is refused.
        assert!(files(&vols.changes().unwrap()).is_empty());
        let mut spec = json!({"mounts": [
            {"destination": "/v", "type": "bind", "source": t.join("cfg/f")}
        ]});
        let e = plan(&mut spec, "c1").unwrap_err().to_string();
        assert!(e.contains("is a device, socket or fifo"), "{e}");
        let _ = fs::remove_dir_all(&t);
    }

    #[test]
    fn missing_sources_and_devices_are_clear_errors() {
        let mut spec = json!({"mounts": [
            {"destination": "/x", "type": "bind", "source": "/nonexistent/x"}
        ]});
        let e = plan(&mut spec, "c1").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x (for /x) cannot be read"), "{e}");
        let mut spec = json!({"mounts": [
            {"destination": "/n", "type": "bind", "source": "/dev/null"}
        ]});
        let e = plan(&mut spec, "c1").unwrap_err().to_string();
        assert!(e.contains("is a device"), "{e}");
    }
}
