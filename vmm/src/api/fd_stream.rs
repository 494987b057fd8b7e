//! A unix stream that keeps the file descriptors its peer passes along with
//! the bytes (SCM_RIGHTS), so that a request can hand over an open file: a
//! jailed VMM may not open the file itself.

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

// Descriptors kept at once, so a client cannot fill the VMM's descriptor
// table: more in one message fail the read (ENOBUFS), more over several
// messages are closed as they arrive.
use moat_vmm_api::limits::MAX_API_FDS as MAX_FDS;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub struct FdStream {
    stream: UnixStream,
    fds: Vec<OwnedFd>,
}

impl FdStream {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            fds: Vec::new(),
        }
    }

    /// The descriptors received since the last call.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }
}

impl Read for FdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut raw = [-1; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec covers exactly `buf`, which is borrowed mutably
        // for the call and may take any bytes.
        let (n, received) = unsafe { self.stream.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        for &fd in &raw[..received] {
            // SAFETY: recvmsg has just installed this descriptor in our table
            // and nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if self.fds.len() < MAX_FDS {
                self.fds.push(fd);
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn keeps_passed_descriptors_and_refuses_too_many() {
        let (a, b) = UnixStream::pair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        a.send_with_fds(&[&b"head"[..]], &[null.as_raw_fd()])
            .unwrap();
        (&a).write_all(b"tail").unwrap();
        drop(a);
        let mut s = FdStream::new(b);
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert_eq!(text, "headtail");
        assert_eq!(s.take_fds().len(), 1);
        assert!(s.take_fds().is_empty());

        // More than fit in one message: the read fails (and the kernel and
        // vmm-sys-util close them all).
        let (a, b) = UnixStream::pair().unwrap();
        let raw = vec![null.as_raw_fd(); MAX_FDS + 1];
        a.send_with_fds(&[&b"x"[..]], &raw).unwrap();
        let mut s = FdStream::new(b);
        let err = s.read(&mut [0; 8]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS));
        assert!(s.take_fds().is_empty());
    }
}
