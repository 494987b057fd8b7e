//! One erofs image of all of an image's read-only layers.
//!
//! Every disk costs the VM a virtio slot, and a pod's VM has at most
//! [`MAX_BLOCK_SLOTS`](crate::sandbox::MAX_BLOCK_SLOTS) for the layers and
//! uppers of all its containers: one image of thirty layers, or a pod of
//! a few images of several layers each, would run out. So an image of more
//! than one layer reaches the guest as a single disk of its merged view.
//!
//! The merged view is what overlayfs shows of the layers, whiteouts and
//! opaque directories applied. A child process mounts them as a lower-only
//! (read-only) overlay in a mount namespace of its own and execs
//! mkfs.erofs on it; the mount ends with that process, so nothing is ever
//! mounted in the host's namespace. The layers are the directories that
//! containerd's snapshotter already extracted, and runc mounts the same
//! overlay of them.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::cache::build_erofs_with;
use super::RootfsError;

/// Characters overlayfs's mount options cannot carry in a layer path.
const OPTION_SEPARATORS: &[u8] = b",:\\";

fn cstring(what: &str, bytes: &[u8]) -> Result<CString, RootfsError> {
    CString::new(bytes).map_err(|_| RootfsError::Unsupported(format!("{what} with a NUL byte")))
}

/// The deepest directory holding all of `paths`.
fn common_ancestor(paths: &[PathBuf]) -> PathBuf {
    let mut base = paths.first().cloned().unwrap_or_default();
    while !paths.iter().all(|p| p.starts_with(&base)) {
        if !base.pop() {
            break;
        }
    }
    base
}

/// Builds at `out` an erofs image of the overlay of `lowers` (top-most
/// first, as in overlayfs's `lowerdir`; at least two) and fsyncs it.
pub fn build_merged_erofs(lowers: &[PathBuf], out: &Path) -> Result<(), RootfsError> {
    if lowers.len() < 2 {
        return Err(RootfsError::Unsupported(
            "merging fewer than two layers".into(),
        ));
    }
    for l in lowers {
        let bytes = l.as_os_str().as_bytes();
        if bytes.iter().any(|b| OPTION_SEPARATORS.contains(b)) {
            return Err(RootfsError::Unsupported(format!(
                "layer path {} (overlayfs cannot name it)",
                l.display()
            )));
        }
    }
    // Paths relative to their common directory keep the mount options
    // within one page for many layers (as containerd's snapshotter does).
    let base = common_ancestor(lowers);
    let relative: Vec<&Path> = lowers
        .iter()
        .map(|l| l.strip_prefix(&base).unwrap_or(l))
        .map(|l| {
            if l.as_os_str().is_empty() {
                Path::new(".")
            } else {
                l
            }
        })
        .collect();
    let lowerdir = relative
        .iter()
        .map(|l| l.as_os_str().as_bytes())
        .collect::<Vec<_>>()
        .join(&b':');
    let options = cstring("layer path", &[b"lowerdir=".as_slice(), &lowerdir].concat())?;
    let mountpoint = out.with_extension("mnt");
    let _ = fs::remove_dir(&mountpoint);
    fs::create_dir(&mountpoint).map_err(|source| RootfsError::Io {
        what: format!("create {}", mountpoint.display()),
        source,
    })?;
    let target = cstring("mount point", mountpoint.as_os_str().as_bytes())?;
    let base_c = cstring("layer directory", base.as_os_str().as_bytes())?;
    // SAFETY: between fork and exec only syscalls (unshare, mount, chdir)
    // on strings built before the fork; nothing allocates or locks.
    let mount_layers = |cmd: &mut std::process::Command| unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            // Nothing this process mounts may propagate to the host.
            let root = c"/".as_ptr();
            let flags = libc::MS_REC | libc::MS_PRIVATE;
            let none = std::ptr::null();
            if libc::mount(none, root, none, flags, std::ptr::null()) != 0 {
                return fail();
            }
            if libc::chdir(base_c.as_ptr()) != 0 {
                return fail();
            }
            let overlay = c"overlay".as_ptr();
            let data = options.as_ptr().cast();
            if libc::mount(overlay, target.as_ptr(), overlay, libc::MS_RDONLY, data) != 0 {
                return fail();
            }
            Ok(())
        });
    };
    let result = build_erofs_with(&mountpoint, out, mount_layers);
    let _ = fs::remove_dir(&mountpoint);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;

    #[test]
    fn common_ancestor_of_snapshot_dirs() {
        let p = |s: &str| PathBuf::from(s);
        let got = common_ancestor(&[p("/s/snapshots/2/fs"), p("/s/snapshots/1/fs")]);
        assert_eq!(got, p("/s/snapshots"));
        assert_eq!(common_ancestor(&[p("/a/b"), p("/c")]), p("/"));
    }

    #[test]
    fn unmountable_layer_paths_are_refused() {
        let t = TempDir::new("merge-bad");
        let out = t.path().join("x.erofs");
        let bad = [t.path().join("a:b"), t.path().join("c")];
        let e = build_merged_erofs(&bad, &out).unwrap_err();
        assert!(e.to_string().contains("overlayfs cannot name it"), "{e}");
        let e = build_merged_erofs(&bad[1..], &out).unwrap_err();
        assert!(e.to_string().contains("fewer than two"), "{e}");
        assert!(!out.exists());
    }

    /// Whiteouts and opaque directories of upper layers apply; nothing
    /// stays mounted.
    #[test]
    fn the_image_is_the_overlay_of_the_layers() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIPPED the_image_is_the_overlay_of_the_layers: needs root (mount namespace)"
            );
            return;
        }
        let t = TempDir::new("merge");
        let layer = |n: &str| {
            let d = t.path().join("snapshots").join(n).join("fs");
            fs::create_dir_all(&d).unwrap();
            d
        };
        let (bottom, middle, top) = (layer("1"), layer("2"), layer("3"));
        fs::write(bottom.join("kept"), "bottom").unwrap();
        fs::write(bottom.join("gone"), "bottom").unwrap();
        fs::create_dir(bottom.join("dir")).unwrap();
        fs::write(bottom.join("dir/old"), "bottom").unwrap();
        fs::write(middle.join("kept"), "middle").unwrap();
        // Overlay's whiteout (a 0:0 character device) and opaque directory.
        let whiteout = CString::new(top.join("gone").as_os_str().as_bytes()).unwrap();
        // SAFETY: mknod of a path we own, with a valid C string.
        let rc = unsafe { libc::mknod(whiteout.as_ptr(), libc::S_IFCHR, 0) };
        assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
        fs::create_dir(top.join("dir")).unwrap();
        xattr_set(&top.join("dir"), "trusted.overlay.opaque", b"y");
        fs::write(top.join("dir/new"), "top").unwrap();

        let out = t.path().join("merged.erofs");
        let mounts_before = fs::read_to_string("/proc/self/mounts").unwrap();
        build_merged_erofs(&[top, middle, bottom], &out).unwrap();
        assert_eq!(
            fs::read_to_string("/proc/self/mounts").unwrap(),
            mounts_before
        );
        assert!(!out.with_extension("mnt").exists());
        let x = t.path().join("x");
        super::super::tests::extract(&out, &x);
        assert_eq!(fs::read_to_string(x.join("kept")).unwrap(), "middle");
        assert!(!x.join("gone").exists());
        assert!(!x.join("dir/old").exists());
        assert_eq!(fs::read_to_string(x.join("dir/new")).unwrap(), "top");
    }

    fn xattr_set(path: &Path, name: &str, value: &[u8]) {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: valid C strings and a value buffer of the given length.
        let rc = unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            rc,
            0,
            "setxattr {name}: {}",
            std::io::Error::last_os_error()
        );
    }
}
