//! Shared host directories (read-write volumes), guest side. The shim asks
//! on the stdio port for a share ([`Request::Share`]); the agent mounts a
//! FUSE filesystem at `GUEST_SHARES_DIR/<tag>` and relays its requests to
//! the host over that connection, where a jailed server answers them from
//! the host directory. Containers bind the mount like any guest directory.
//! The mount goes when the host closes the connection.
//!
//! [`Request::Share`]: moat_protocol::stream::Request::Share

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use moat_protocol::relay;
use moat_protocol::stream::write_reply;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Serves one share until the host closes it.
pub fn serve(mut host: UnixStream, tag: &str) {
    let target = Path::new(moat_protocol::GUEST_SHARES_DIR).join(tag);
    let dev = match mount_fuse(&target) {
        Ok(d) => d,
        Err(e) => {
            log::warn!("share {}: {e}", target.display());
            let _ = write_reply(
                &mut host,
                Err(&format!("mounting {}: {e}", target.display())),
            );
            return;
        }
    };
    let _unmount = Unmount(target.clone());
    if write_reply(&mut host, Ok(())).is_err() {
        return;
    }
    if let Err(e) = relay::fuse(dev, host) {
        log::warn!("share {}: {e}", target.display());
    }
}

/// Detaches the mount (its connection is aborted already) and removes
/// the empty mount point.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.0, MntFlags::MNT_DETACH) {
            log::warn!("unmounting share {}: {e}", self.0.display());
        }
        let _ = fs::remove_dir(&self.0);
    }
}

/// Mounts a FUSE filesystem at `target` and returns its device. The
/// kernel checks permissions by mode and owner (`default_permissions`),
/// as on a local filesystem; every guest user may enter it (`allow_other`).
pub fn mount_fuse(target: &Path) -> std::io::Result<File> {
    fs::create_dir_all(target)?;
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let options = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        dev.as_raw_fd()
    );
    mount(
        Some("moat-share"),
        target,
        Some("fuse.moat"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )?;
    Ok(dev)
}
