//! Listening sockets: vsock in the guest, unix sockets (`<base>_<port>`) in
//! host tests. Everything above this module is the same for both.
//!
//! Over vsock only the host may connect: a connection from any other CID
//! (the guest itself, should a workload reach vsock at all) is closed
//! before a byte of it is read.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use nix::sys::socket::{
    bind, getpeername, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike,
    SockaddrStorage, VsockAddr,
};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// AF_VSOCK, any CID (only the host is accepted).
    Vsock,
    /// Port P is the unix socket `<base>_P`.
    Unix(PathBuf),
}

/// A bound, listening socket for the ttrpc server.
pub struct Listener {
    fd: OwnedFd,
    /// Peers must be the host (vsock listeners).
    host_only: bool,
}

/// Refuses a vsock peer other than the host (CID 2). Other socket
/// families (unix sockets of host tests) pass.
pub fn check_peer(fd: RawFd) -> io::Result<()> {
    let peer: SockaddrStorage = getpeername(fd)?;
    match peer.as_vsock_addr() {
        Some(v) => host_cid_only(v.cid()),
        None if peer.family() == Some(AddressFamily::Vsock) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "vsock peer without an address",
        )),
        None => Ok(()),
    }
}

fn host_cid_only(cid: u32) -> io::Result<()> {
    if cid == libc::VMADDR_CID_HOST {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("vsock peer CID {cid} is not the host"),
    ))
}

/// The ttrpc server's check of every accepted connection.
#[derive(Debug)]
pub struct HostOnly;

impl ttrpc::AcceptHook for HostOnly {
    fn on_accept(&self, fd: RawFd) -> Result<ttrpc::HookOutput, ttrpc::HookError> {
        check_peer(fd).map_err(|e| ttrpc::HookError::Rejected(e.to_string()))?;
        Ok(ttrpc::HookOutput {
            data: Default::default(),
            payload_transform: None,
        })
    }
}

impl Listener {
    /// Binds and listens on `port` (see [`Listen`]); a stale unix socket
    /// file is replaced.
    pub fn bind(listen: &Listen, port: u32) -> io::Result<Listener> {
        match listen {
            Listen::Vsock => {
                let fd = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
                nix::sys::socket::listen(&fd, Backlog::new(64).map_err(io::Error::from)?)?;
                Ok(Listener {
                    fd,
                    host_only: true,
                })
            }
            Listen::Unix(base) => {
                let path = moat_protocol::client::unix_port_path(base, port);
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)?;
                Ok(Listener {
                    fd: l.into(),
                    host_only: false,
                })
            }
        }
    }

    /// The listening socket's fd.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether connections must come from the host (see [`HostOnly`]).
    pub fn host_only(&self) -> bool {
        self.host_only
    }

    /// Hands the descriptor over (to the ttrpc server).
    pub fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }

    /// Accepts one connection from an allowed peer; others are closed and
    /// logged. vsock and unix stream sockets support the same
    /// read/write/shutdown calls, so both come back as a UnixStream.
    pub fn accept(&self) -> io::Result<UnixStream> {
        loop {
            let stream = self.accept_any()?;
            if !self.host_only {
                return Ok(stream);
            }
            match check_peer(stream.as_raw_fd()) {
                Ok(()) => return Ok(stream),
                Err(e) => log::warn!("refused a connection: {e}"),
            }
        }
    }

    fn accept_any(&self) -> io::Result<UnixStream> {
        loop {
            // SAFETY: accept4 on our listening socket; null address pointers
            // are allowed.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a fresh descriptor we now own.
                return Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_cid_passes() {
        assert!(host_cid_only(libc::VMADDR_CID_HOST).is_ok());
        for cid in [0, 1, 3, 4, libc::VMADDR_CID_ANY] {
            let e = host_cid_only(cid).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains(&cid.to_string()), "{e}");
        }
    }

    #[test]
    fn unix_peers_pass_the_check() {
        let (a, _b) = UnixStream::pair().unwrap();
        check_peer(a.as_raw_fd()).unwrap();
    }
}
