//! Copies bytes both ways between two connected streams, passing each
//! side's end of input on as a write shutdown of the other. Both ends of a
//! port forward use it: the shim between containerd's TCP connection and
//! the vsock stream, the agent between the vsock stream and the guest port.
//!
//! [`fuse`] relays a FUSE device to a stream, message by message: the
//! agent's half of a shared directory (and the host tests' stand-in for it).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

/// A stream that can be split into a reader and a writer and half-closed.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// A second handle on the same connection.
    fn duplicate(&self) -> io::Result<Self>;
    /// Shuts one or both directions down.
    fn shut(&self, how: Shutdown) -> io::Result<()>;
}

impl Duplex for UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

impl Duplex for TcpStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

/// Relays `a` <-> `b` until both directions reached end of input (or
/// failed), in the calling thread and one more. Returns the bytes moved
/// each way, `a` to `b` first.
pub fn splice<A: Duplex, B: Duplex>(a: A, b: B) -> io::Result<(u64, u64)> {
    let (a2, b2) = (a.duplicate()?, b.duplicate()?);
    let back = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || one_way(b2, a2))?;
    let forth = one_way(a, b);
    let back = back.join().unwrap_or(0);
    Ok((forth, back))
}

/// Copies `from` to `to` until end of input, then half-closes: `to` sees
/// the end, and `from` stops reading (so a peer still writing gets an
/// error instead of filling a buffer no one drains).
fn one_way<F: Duplex, T: Duplex>(mut from: F, mut to: T) -> u64 {
    // A reset on either side ends this direction like an end of input.
    let moved = io::copy(&mut from, &mut to).unwrap_or(0);
    let _ = to.shut(Shutdown::Write);
    let _ = from.shut(Shutdown::Read);
    moved
}

/// Largest FUSE message either way: the 1 MiB the host's server reads or
/// writes at most, and room for the headers.
pub const MAX_FUSE_MESSAGE: usize = (1 << 20) + 8192;
/// `fuse_out_header`: length, error, unique.
const FUSE_OUT_HEADER: usize = 16;

/// Relays the FUSE device `dev` (a mount's `/dev/fuse` descriptor) and
/// `stream` until either ends: each request read from the device (one
/// whole message per read) goes to the stream as it is, and each reply
/// read from the stream (framed by the length in its header) is written
/// to the device in one write, as the device requires. Once it returns,
/// `dev` is closed: the kernel aborts the connection, and what still uses
/// the mount gets ENOTCONN instead of waiting for a server that is gone.
pub fn fuse(dev: std::fs::File, stream: UnixStream) -> io::Result<()> {
    let (stop_read, stop_write) = pipe()?;
    let (dev_in, stream_out) = (dev.try_clone()?, stream.try_clone()?);
    let requests = std::thread::Builder::new()
        .name("fuse-requests".into())
        .spawn(move || {
            let r = fuse_requests(dev_in, &stream_out, &stop_read);
            // Unblocks the replies' read when the mount went first.
            let _ = stream_out.shutdown(Shutdown::Both);
            r
        })?;
    let replies = fuse_replies(&stream, &dev);
    drop(stop_write);
    let _ = stream.shutdown(Shutdown::Both);
    let requests = requests.join().unwrap_or(Ok(()));
    replies.and(requests)
}

fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both fds, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nothing else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// Waits until `dev` has a request; false once `stop` was closed.
fn wait_request(dev: &std::fs::File, stop: &std::fs::File) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll reads and writes the two pollfds we own.
    while unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(fds[1].revents == 0)
}

fn fuse_requests(
    mut dev: std::fs::File,
    mut stream: &UnixStream,
    stop: &std::fs::File,
) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_FUSE_MESSAGE];
    while wait_request(&dev, stop)? {
        let n = match dev.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            // An interrupted or aborted request: read the next one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) => continue,
            // ENODEV: the filesystem was unmounted.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            Err(e) => return Err(e),
        };
        match stream.write_all(&buf[..n]) {
            Ok(()) => {}
            // The host closed the share.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn fuse_replies(mut stream: &UnixStream, mut dev: &std::fs::File) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_FUSE_MESSAGE];
    while let Some(len) = read_fuse_message(&mut stream, &mut buf, FUSE_OUT_HEADER)? {
        match dev.write(&buf[..len]) {
            Ok(_) => {}
            // The request was interrupted meanwhile: the kernel drops it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one FUSE message from a stream into `buf`: its first field is
/// its length, which must cover at least its `header` and fit `buf`.
/// `None` at the end of the stream, before a message.
pub fn read_fuse_message(
    stream: &mut impl Read,
    buf: &mut [u8],
    header: usize,
) -> io::Result<Option<usize>> {
    if let Err(e) = stream.read_exact(&mut buf[..4]) {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(e),
        };
    }
    let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(header..=buf.len()).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a FUSE message of {len} bytes"),
        ));
    }
    stream.read_exact(&mut buf[4..len])?;
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn bytes_and_half_closes_cross_both_ways() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp_server, _) = listener.accept().unwrap();
        let (unix_near, mut unix_far) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || splice(tcp_server, unix_near).unwrap());

        let mut client = tcp_client;
        client.write_all(b"request").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        unix_far.read_to_end(&mut got).unwrap_or_default();
        // read_to_end returns at the relayed end of input.
        assert_eq!(got, b"request");
        unix_far.write_all(b"answer").unwrap();
        unix_far.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"answer");
        assert_eq!(relay.join().unwrap(), (7, 6));
    }
}
