//! Bind mounts of host paths in a container's spec (Kubernetes' hosts,
//! resolv.conf and hostname files, configmaps, secrets, `ctr run --mount`):
//! the guest cannot see host paths, so their content is copied into the
//! agent's shared directory (CopyFile) and the spec's source is rewritten to
//! the copy. While the container lives, the sources are checked every
//! [`SYNC_INTERVAL`]: what was added or changed is copied again and what
//! was deleted is removed (so a Kubernetes configmap update, a new
//! timestamped directory, a swapped `..data` symlink and the old directory
//! gone, reaches the guest). The pod's /dev/shm (a bind of the sandbox's
//! shm directory) becomes a bind of the guest's /dev/shm, which all the
//! pod's containers share, as they share the sandbox's on the host.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_protocol::agent::CopyFileRequest;
use moat_protocol::AgentClient;
use serde_json::{json, Value};
use thiserror::Error;

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
        host: PathBuf,
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

fn is_bind(m: &Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// A container's host bind sources and what the guest has of them.
#[derive(Debug, Default)]
pub struct Volumes {
    /// (host source, path below the shared dir, spec destination).
    sources: Vec<(PathBuf, String, String)>,
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
        let src = PathBuf::from(m["source"].as_str().unwrap_or_default());
        let rel = format!("{container_id}/m{i}");
        m["source"] = json!(format!("{}/{rel}", moat_protocol::GUEST_SHARED_DIR));
        v.sources.push((src, rel, dest));
    }
    let items = v.changes()?;
    Ok((v, items))
}

impl Volumes {
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
        for (src, rel, dest) in &self.sources {
            walk(src, rel, dest, true, &mut found, &mut total)?;
        }
        let present: HashSet<&str> = found.iter().map(|(i, _)| i.rel()).collect();
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

fn walk(
    src: &Path,
    rel: &str,
    dest: &str,
    top: bool,
    items: &mut Vec<(Item, Stamp)>,
    total: &mut u64,
) -> Result<(), VolumeError> {
    let err = |source| VolumeError::Source {
        path: src.to_owned(),
        dest: dest.to_owned(),
        source,
    };
    // The top follows symlinks, as a bind mount does; below it they are kept.
    let md = if top {
        fs::metadata(src)
    } else {
        fs::symlink_metadata(src)
    }
    .map_err(err)?;
    let (mode, uid, gid) = (md.permissions().mode() & 0o7777, md.uid(), md.gid());
    let stamp = Stamp {
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
        size: md.len(),
        mode: md.mode(),
        ino: md.ino(),
    };
    let ft = md.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(err)?;
        items.push((
            Item::Symlink {
                rel: rel.to_owned(),
                target: target.to_string_lossy().into_owned(),
            },
            stamp,
        ));
    } else if ft.is_file() {
        *total += md.len();
        if *total > MAX_COPY_BYTES {
            return Err(VolumeError::TooLarge);
        }
        items.push((
            Item::File {
                rel: rel.to_owned(),
                host: src.to_owned(),
                len: md.len(),
                mode,
                uid,
                gid,
            },
            stamp,
        ));
    } else if ft.is_dir() {
        items.push((
            Item::Dir {
                rel: rel.to_owned(),
                mode,
                uid,
                gid,
            },
            stamp,
        ));
        let mut entries: Vec<_> = fs::read_dir(src)
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            walk(
                &e.path(),
                &format!("{rel}/{name}"),
                dest,
                false,
                items,
                total,
            )?;
        }
    } else if top {
        return Err(VolumeError::Special {
            path: src.to_owned(),
            dest: dest.to_owned(),
        });
    } else {
        log::warn!("not copying {} into the guest: not a file", src.display());
    }
    Ok(())
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
                len,
                mode,
                uid,
                gid,
            } => {
                let read_err = |e: std::io::Error| VolumeError::Copy {
                    path: rel.clone(),
                    detail: format!("reading {}: {e}", host.display()),
                };
                let mut f = fs::File::open(host).map_err(read_err)?.take(*len);
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
            {"destination": "/cfg", "type": "none", "source": t.join("cfg"), "options": ["bind"]},
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
