//! Read-write host directories shared live with the guest: hostPath and
//! PVC volumes, `ctr run --mount` read-write binds. The guest mounts a
//! FUSE filesystem (`guest-agent/src/share.rs`) whose requests come over
//! vsock to one `fs-serve` child of the shim per share ([`server`]). What
//! the container writes lands in the host directory at once, and what the
//! host writes there is what the container reads.
//!
//! The child is the shim's own binary: it enters mount and network
//! namespaces of its own and makes the shared directory its root, so a
//! hostile guest's requests can name nothing outside it.

pub mod seccomp;
pub mod server;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// The shim's first argument that makes it a share server.
pub const SUBCOMMAND: &str = "fs-serve";
/// The server's flag for [`Share::follow_host_mounts`].
pub const FOLLOW_HOST_MOUNTS: &str = "--follow-host-mounts";
/// The descriptor the server finds its guest connection on.
pub const CONNECTION_FD: i32 = 3;

/// A host directory to share, from a container's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The guest mount's name (`GUEST_SHARES_DIR/<tag>`).
    pub tag: String,
    /// The directory, resolved when the container was created.
    pub dir: PathBuf,
    /// Whether mounts made on the host below `dir` later are served too
    /// (`rslave`, `rshared`), or hidden (`rprivate`, the default).
    pub follow_host_mounts: bool,
}

/// One running share server; dropping it stops it (the guest's mount then
/// fails its users with ENOTCONN).
pub struct ShareServer {
    tag: String,
    child: Mutex<Child>,
}

impl ShareServer {
    /// Serves `share` on `conn`, the guest connection the agent answered
    /// for it, in a child of the shim binary `exe` that joins the cgroups
    /// whose open `cgroup.procs` are `cgroup_procs` (the pod's, beside its
    /// VMM: kubelet then accounts the server's memory and CPU to the pod).
    pub fn spawn(
        exe: &Path,
        share: &Share,
        conn: UnixStream,
        cgroup_procs: Vec<RawFd>,
    ) -> io::Result<ShareServer> {
        let fd = conn.as_raw_fd();
        let mut cmd = Command::new(exe);
        cmd.arg(SUBCOMMAND).arg(&share.dir);
        if share.follow_host_mounts {
            cmd.arg(FOLLOW_HOST_MOUNTS);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // No PR_SET_PDEATHSIG: it follows the thread that forked (a ttrpc
        // worker that may end long before the container), not the shim.
        // The server ends with its connection, which closes when the
        // container is deleted or the VM is gone.
        // SAFETY: between fork and exec only write and dup2 (both
        // async-signal-safe; dup2 clears close-on-exec on the copy). The
        // caller keeps `cgroup_procs` open until this returns.
        unsafe {
            cmd.pre_exec(move || {
                crate::sandbox::cgroup::join_from_child(&cgroup_procs)?;
                if libc::dup2(fd, CONNECTION_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(conn);
        log::info!(
            "share {}: {} served by pid {}",
            share.tag,
            share.dir.display(),
            child.id()
        );
        Ok(ShareServer {
            tag: share.tag.clone(),
            child: Mutex::new(child),
        })
    }
}

impl ShareServer {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }
}

impl Drop for ShareServer {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        match child.wait() {
            Ok(s) => log::debug!("share {}: server ended: {s}", self.tag),
            Err(e) => log::warn!("share {}: reaping its server: {e}", self.tag),
        }
    }
}
