//! Host side of Firecracker-style hybrid vsock: the VMM exposes the guest's
//! vsock as a unix socket; the host writes `CONNECT <port>\n` and reads
//! `OK <host port>\n`, after which the socket is a byte stream to the guest.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest reply line accepted from the VMM.
const MAX_REPLY: usize = 64;

/// Connects to guest vsock `port` through the VMM's hybrid vsock socket at
/// `uds_path`.
///
/// The returned stream is blocking with no timeouts set. The reply is read one
/// byte at a time so no guest data after it is consumed.
pub fn connect_hybrid_vsock(uds_path: impl AsRef<Path>, port: u32) -> io::Result<UnixStream> {
    connect_hybrid_vsock_timeout(uds_path, port, HYBRID_CONNECT_TIMEOUT)
}

/// Longer than moat-vmm's own wait for the guest's answer (30 s), so that
/// the VMM's verdict (OK, or a refusal once the guest missed its deadline)
/// decides rather than this side giving up on a guest that was only slow.
pub const HYBRID_CONNECT_TIMEOUT: Duration = Duration::from_secs(45);

/// [`connect_hybrid_vsock`] with a bound on how long the VMM may take to
/// answer (it answers only once the guest accepted or refused).
pub fn connect_hybrid_vsock_timeout(
    uds_path: impl AsRef<Path>,
    port: u32,
    timeout: Duration,
) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds_path.as_ref())?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_line(&mut stream, MAX_REPLY)?;
    let Some(rest) = line.strip_prefix("OK ") else {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock connect to port {port} refused: {line:?}"),
        ));
    };
    rest.trim().parse::<u32>().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hybrid vsock: malformed reply {line:?}"),
        )
    })?;
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Reads one `\n`-terminated line byte by byte (without the newline).
pub(crate) fn read_line(r: &mut impl Read, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the reply line ended",
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                if line.len() >= max {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "reply line too long",
                    ));
                }
                line.push(byte[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no reply line within the timeout",
                ))
            }
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "reply line is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    use moat_testutil::TempDir;

    fn fake_vmm(reply: &'static str) -> (TempDir, std::thread::JoinHandle<String>) {
        let dir = TempDir::new("proto");
        let listener = UnixListener::bind(dir.path().join("v.sock")).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req = read_line(&mut s, 64).unwrap();
            s.write_all(reply.as_bytes()).unwrap();
            // A client that was refused may have hung up already.
            let _ = s.write_all(b"guest-bytes");
            req
        });
        (dir, handle)
    }

    #[test]
    fn connect_sends_port_and_keeps_following_bytes() {
        let (dir, vmm) = fake_vmm("OK 1073741824\n");
        let mut s = connect_hybrid_vsock(dir.path().join("v.sock"), 1025).unwrap();
        assert_eq!(vmm.join().unwrap(), "CONNECT 1025");
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "guest-bytes");
    }

    #[test]
    fn refusal_is_an_error() {
        let (dir, vmm) = fake_vmm("NO\n");
        let err = connect_hybrid_vsock(dir.path().join("v.sock"), 7).unwrap_err();
        vmm.join().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn a_silent_vmm_times_out() {
        let dir = TempDir::new("proto");
        let _listener = UnixListener::bind(dir.path().join("v.sock")).unwrap();
        let err = connect_hybrid_vsock_timeout(
            dir.path().join("v.sock"),
            7,
            std::time::Duration::from_millis(100),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }
}
