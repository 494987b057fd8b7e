//! A user of its own for every VM: moat-vmm's `jail` (see vmm/API.md).
//!
//! Every moat-vmm switches to a uid that no other VM and no host account
//! has, in the range `jail_id_base + 1 ..= jail_id_base + 65536`, and to
//! the group of the same number, as unshared. No file belongs to that user
//! or group: the VMM opens its first disks while still root, and the shim
//! passes it later ones already open. A VMM taken over by its guest thus
//! cannot signal another VM nor open any file but what the world may;
//! where the kernel has Landlock, it opens no file at all.
//!
//! The uid of a sandbox is written to `jail-id` in its state directory; a
//! claim is free again once that directory is gone, so a VM left by a dead
//! shim keeps its uid until `shim delete` cleans up after it.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use moat_vmm_api::JailConfig;

use crate::config::JAIL_IDS;

const JAIL_ID_FILE: &str = "jail-id";

/// Claims a free uid for the sandbox in `sandbox_dir` (a directory right
/// below `state_dir`) and returns the VM's jail: that user and the group
/// of the same number. Claims are serialised by a lock on `state_dir`.
pub fn claim(state_dir: &Path, sandbox_dir: &Path, base: u32) -> io::Result<JailConfig> {
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
    Ok(JailConfig::new(uid, uid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;

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
        assert_eq!(a, JailConfig::new(base + 1, base + 1));
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
}
