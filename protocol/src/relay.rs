//! Copies bytes both ways between two connected streams, passing each
//! side's end of input on as a write shutdown of the other. Both ends of a
//! port forward use it: the shim between containerd's TCP connection and
//! the vsock stream, the agent between the vsock stream and the guest port.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
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
