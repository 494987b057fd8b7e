//! A user of its own for every VM: moat-vmm's `jail` (see vmm/API.md).
//!
//! Every moat-vmm switches to a uid that no other VM and no host account
//! has, in the range `jail_id_base + 1 ..= jail_id_base + 65536`, and to
//! the group `jail_id_base`, which all VMs share. A VMM taken over by its
//! guest can then open only what that uid or group may: its own sandbox's
//! writable disks (owned by its uid, mode 0600) and the shared read-only
//! layer images (group-readable, mode 0640). It cannot signal another VM,
//! nor write a file root owns. Where the kernel has Landlock, moat-vmm
//! also opens nothing outside its sandbox directory and the layer cache.
//!
//! The uid of a sandbox is written to `jail-id` in its state directory; a
//! claim is free again once that directory is gone, so a VM left by a dead
//! shim keeps its uid until `shim delete` cleans up after it.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How many VMs can hold a uid at once.
pub const JAIL_IDS: u32 = 65536;
const JAIL_ID_FILE: &str = "jail-id";

/// The credentials one VM runs with (moat-vmm's `jail.uid` and `jail.gid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct JailIds {
    pub uid: u32,
    pub gid: u32,
}

/// Claims a free uid for the sandbox in `sandbox_dir` (a directory right
/// below `state_dir`). Claims are serialised by a lock on `state_dir`.
pub fn claim(state_dir: &Path, sandbox_dir: &Path, base: u32) -> io::Result<JailIds> {
    let root = File::open(state_dir)?;
    // SAFETY: flock on a descriptor we own; released when `root` closes.
    if unsafe { libc::flock(root.as_raw_fd(), libc::LOCK_EX) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let used: HashSet<u32> = fs::read_dir(state_dir)?
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join(JAIL_ID_FILE)).ok())
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    let uid = (1..=JAIL_IDS)
        .map(|i| base + i)
        .find(|uid| !used.contains(uid))
        .ok_or_else(|| io::Error::other(format!("all {JAIL_IDS} VM users are in use")))?;
    fs::write(sandbox_dir.join(JAIL_ID_FILE), uid.to_string())?;
    Ok(JailIds { uid, gid: base })
}

/// Lets the jailed VMM open `disk` (called before it is given a path):
/// files of the sandbox become its own, files of the layer cache readable
/// by the VMs' group. Anything else (a host block device passed through)
/// is left as it is, for the VMM to open only while it is still root.
pub fn grant(disk: &Path, ids: JailIds, sandbox_dir: &Path, layer_cache: &Path) -> io::Result<()> {
    if disk.starts_with(sandbox_dir) {
        std::os::unix::fs::chown(disk, Some(ids.uid), Some(ids.gid))?;
        fs::set_permissions(disk, fs::Permissions::from_mode(0o600))
    } else if disk.starts_with(layer_cache) {
        std::os::unix::fs::chown(disk, None, Some(ids.gid))?;
        fs::set_permissions(disk, fs::Permissions::from_mode(0o640))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::testutil::TempDir;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn claims_are_unique_and_end_with_the_sandbox_directory() {
        let t = TempDir::new("jail");
        let base = 1_879_048_192;
        let dirs: Vec<_> = ["a", "b", "c"].iter().map(|n| t.path().join(n)).collect();
        for d in &dirs {
            fs::create_dir(d).unwrap();
        }
        let a = claim(t.path(), &dirs[0], base).unwrap();
        let b = claim(t.path(), &dirs[1], base).unwrap();
        assert_eq!(
            a,
            JailIds {
                uid: base + 1,
                gid: base
            }
        );
        assert_eq!(b.uid, base + 2);
        // A removed sandbox frees its uid for the next one.
        fs::remove_dir_all(&dirs[0]).unwrap();
        assert_eq!(claim(t.path(), &dirs[2], base).unwrap().uid, base + 1);
    }

    #[test]
    fn concurrent_claims_get_different_users() {
        let t = TempDir::new("jail-race");
        let root = t.path().to_owned();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let root = root.clone();
                std::thread::spawn(move || {
                    let dir = root.join(format!("sb{i}"));
                    fs::create_dir(&dir).unwrap();
                    claim(&root, &dir, 1000).unwrap().uid
                })
            })
            .collect();
        let uids: HashSet<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(uids, (1001..=1008).collect());
    }

    #[test]
    fn grants_own_files_and_shared_layers_only() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("!!! SKIPPED grants_own_files_and_shared_layers_only: chown needs root");
            return;
        }
        let t = TempDir::new("grant");
        let (sb, cache, other) = (
            t.path().join("sb"),
            t.path().join("cache"),
            t.path().join("x"),
        );
        for d in [&sb, &cache, &other] {
            fs::create_dir(d).unwrap();
        }
        let ids = JailIds {
            uid: 1_879_048_199,
            gid: 1_879_048_192,
        };
        let (upper, layer, host) = (sb.join("upper"), cache.join("l.erofs"), other.join("dev"));
        for f in [&upper, &layer, &host] {
            fs::write(f, "").unwrap();
        }
        for f in [&upper, &layer, &host] {
            grant(f, ids, &sb, &cache).unwrap();
        }
        let meta = |p: &Path| {
            let m = fs::metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode() & 0o777)
        };
        assert_eq!(meta(&upper), (ids.uid, ids.gid, 0o600));
        assert_eq!(meta(&layer), (0, ids.gid, 0o640));
        assert_eq!(meta(&host).0, 0);
        assert_eq!(meta(&host).1, 0);
    }
}
