//! Listening sockets: vsock in the guest, unix sockets (`<base>_<port>`) in
//! host tests. Everything above this module is the same for both.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use nix::sys::socket::{bind, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Vsock,
    /// Port P is the unix socket `<base>_P`.
    Unix(PathBuf),
}

pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
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
                Ok(Listener { fd })
            }
            Listen::Unix(base) => {
                let path = moat_protocol::client::unix_port_path(base, port);
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)?;
                Ok(Listener { fd: l.into() })
            }
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Hands the descriptor over (to the ttrpc server).
    pub fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }

    /// Accepts one connection. vsock and unix stream sockets support the
    /// same read/write/shutdown calls, so both come back as a UnixStream.
    pub fn accept(&self) -> io::Result<UnixStream> {
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
