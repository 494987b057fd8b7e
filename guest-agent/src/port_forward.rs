//! CRI PortForward, guest side. containerd dials `localhost:<port>` in the
//! pod's network namespace on the host; the shim catches that connection
//! and asks for the port on the stdio port ([`Request::Forward`]). The
//! agent runs in the pod's network namespace of the guest, so it connects
//! to `127.0.0.1:<port>` there, answers whether that worked, and relays.
//!
//! [`Request::Forward`]: moat_protocol::stream::Request::Forward

use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use moat_protocol::relay::splice;
use moat_protocol::stream::write_reply;

/// A loopback connect is answered at once; a full backlog is the only wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one port-forward connection from the host to its end.
pub fn serve(mut host: UnixStream, port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(t) => t,
        Err(e) => {
            log::debug!("port forward to {addr}: {e}");
            let _ = write_reply(&mut host, Err(&format!("connect to {addr}: {e}")));
            return;
        }
    };
    if write_reply(&mut host, Ok(())).is_err() {
        return;
    }
    match splice(host, tcp) {
        Ok((to_guest, to_host)) => {
            log::debug!("port forward to {addr}: {to_guest} bytes in, {to_host} out")
        }
        Err(e) => log::warn!("port forward to {addr}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use moat_protocol::stream::{ask, Request};

    #[test]
    fn relays_to_a_loopback_port_and_reports_a_closed_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut req = [0u8; 4];
            c.read_exact(&mut req).unwrap();
            c.write_all(b"pong").unwrap();
            req
        });
        let (mut host, agent) = UnixStream::pair().unwrap();
        let agent_side = std::thread::spawn(move || {
            let req = Request::read_from(&mut &agent).unwrap();
            let Request::Forward { port } = req else {
                panic!("{req:?}")
            };
            serve(agent, port)
        });
        ask(&mut host, &Request::Forward { port }).unwrap();
        host.write_all(b"ping").unwrap();
        let mut answer = [0u8; 4];
        host.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"pong");
        assert_eq!(&server.join().unwrap(), b"ping");
        host.shutdown(std::net::Shutdown::Write).unwrap();
        agent_side.join().unwrap();

        // Nothing listens on a port just given back.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (mut host, agent) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve(agent, closed));
        let err = ask(&mut host, &Request::Forward { port: closed }).unwrap_err();
        assert!(err.to_string().contains("connect to 127.0.0.1"), "{err}");
        t.join().unwrap();
    }
}
