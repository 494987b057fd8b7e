//! CRI PortForward, host side.
//!
//! containerd 1.6 serves a PortForward by entering the pod's network
//! namespace on the host and dialling `localhost:<port>`: a runc pod's
//! workload listens there. A moat pod's workload listens inside the VM,
//! and the namespace's own stack never sees the guest's sockets (tc hands
//! every frame straight to the tap). So in that namespace a netfilter rule
//! sends every TCP connection to 127.0.0.1 to one listener of the shim's.
//! The shim reads each connection's original port (`SO_ORIGINAL_DST`) and
//! relays it over vsock to the agent, which connects to that port on the
//! guest's loopback ([`moat_protocol::open_forward`]).
//!
//! Only processes in the pod's host namespace can reach the listener: the
//! guest's own packets leave through the veth and never enter that stack.
//! A port nothing listens on in the guest gets a reset where runc's gives
//! "connection refused".

use std::io;
use std::mem;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use moat_protocol::relay::splice;

use super::{in_netns, run_with_input, NetworkError};

/// The nat chain that holds the redirect, so that teardown finds it
/// without knowing the listener's port.
const CHAIN: &str = "MOAT-PORT-FORWARD";

/// Connects to a TCP port on the guest's loopback.
pub type Dial = Arc<dyn Fn(u16) -> Result<UnixStream, String> + Send + Sync>;

/// The listener of one pod and its accept thread.
pub struct PortForward {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl PortForward {
    /// Listens in the namespace at `netns` and redirects its loopback TCP
    /// connections there; each one is relayed through `dial`. On error
    /// the namespace is left as it was.
    pub fn start(netns: &Path, dial: Dial) -> Result<PortForward, NetworkError> {
        let listener = in_netns(netns, || {
            let l = TcpListener::bind("127.0.0.1:0").map_err(listen_error)?;
            let port = l.local_addr().map_err(listen_error)?.port();
            add_redirect(port)?;
            Ok(l)
        })?;
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let accept = {
            let (listener, stopping) = (listener.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("port-forward".into())
                .spawn(move || accept_loop(&listener, &stopping, &dial))
                .map_err(listen_error)?
        };
        Ok(PortForward {
            listener,
            stopping,
            accept: Mutex::new(Some(accept)),
        })
    }

    /// Stops accepting and closes the listener (which also lets the
    /// namespace go once CNI deletes it). Relays in flight end with the VM.
    /// The redirect goes with the network's teardown ([`remove_redirect`]).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on a socket fd we own; it wakes the blocked
        // accept, which then sees `stopping`.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let handle = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop();
    }
}

fn listen_error(e: io::Error) -> NetworkError {
    NetworkError::Command {
        command: "port-forward listener".into(),
        detail: e.to_string(),
    }
}

fn accept_loop(listener: &TcpListener, stopping: &AtomicBool, dial: &Dial) {
    loop {
        let conn = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let (conn, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                log::warn!("port forward: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let dial = dial.clone();
        let spawned = std::thread::Builder::new()
            .name("port-forward-relay".into())
            .spawn(move || relay(conn, &dial));
        if let Err(e) = spawned {
            log::warn!("port forward: no thread for a connection: {e}");
        }
    }
}

/// Relays one redirected connection to the port it was meant for.
fn relay(conn: TcpStream, dial: &Dial) {
    let port = match original_port(&conn) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("port forward: no original destination: {e}");
            return reset(conn);
        }
    };
    match dial(port) {
        Ok(guest) => {
            log::debug!("port forward: relaying to guest port {port}");
            if let Err(e) = splice(conn, guest) {
                log::warn!("port forward to guest port {port}: {e}");
            }
        }
        Err(e) => {
            log::info!("port forward to guest port {port}: {e}");
            reset(conn);
        }
    }
}

/// The port the client dialled: the redirect rewrote it to the listener's,
/// and conntrack keeps the original. A connection made straight to the
/// listener's own port has no rewrite: its port is the one dialled.
fn original_port(conn: &TcpStream) -> io::Result<u16> {
    // SAFETY: an all-zero sockaddr_in is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: SO_ORIGINAL_DST writes at most `len` bytes into `addr`, which
    // we own, and sets `len`.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if r == 0 {
        return Ok(u16::from_be(addr.sin_port));
    }
    let e = io::Error::last_os_error();
    match conn.local_addr()? {
        std::net::SocketAddr::V4(a) if e.raw_os_error() == Some(libc::ENOENT) => Ok(a.port()),
        _ => Err(e),
    }
}

/// Closes with a reset, the nearest a listener can come to "refused".
fn reset(conn: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads a linger struct we own, of the size given.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    let _ = conn.shutdown(Shutdown::Read);
}

/// The rule that sends the namespace's TCP connections to 127.0.0.1 into
/// [`CHAIN`], in iptables-restore's words after `-A` or `-D`.
fn jump() -> String {
    format!("OUTPUT -o lo -d 127.0.0.1/32 -p tcp -j {CHAIN}")
}

/// Applies `rules` to the nat table of the calling thread's namespace in
/// one `iptables-restore` transaction: all of them or none.
fn restore_nat(rules: &str) -> Result<(), NetworkError> {
    let input = format!("*nat\n{rules}COMMIT\n");
    run_with_input(&["iptables-restore", "-w", "--noflush"], Some(&input)).map(drop)
}

/// In the calling thread's namespace: redirects loopback TCP connections
/// to `to_port` on 127.0.0.1.
fn add_redirect(to_port: u16) -> Result<(), NetworkError> {
    restore_nat(&format!(
        ":{CHAIN} - [0:0]\n-A {CHAIN} -p tcp -j REDIRECT --to-ports {to_port}\n-A {}\n",
        jump()
    ))
}

/// In the calling thread's namespace: removes what [`add_redirect`] made,
/// if anything. Errors are only logged (there may be nothing to remove).
pub(super) fn remove_redirect() {
    if let Err(e) = restore_nat(&format!("-D {}\n-F {CHAIN}\n-X {CHAIN}\n", jump())) {
        log::debug!("port-forward teardown: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Without a redirect the listener's own port is the one dialled, and
    /// a connection to it is relayed through `dial`; a refusing dial ends
    /// in a reset.
    #[test]
    fn relays_through_dial_and_resets_when_it_fails() {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").unwrap());
        let port = listener.local_addr().unwrap().port();
        let dialled = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicBool::new(false));
        let dial: Dial = {
            let (dialled, refuse) = (dialled.clone(), refuse.clone());
            Arc::new(move |p| {
                dialled.lock().unwrap().push(p);
                if refuse.load(Ordering::SeqCst) {
                    return Err("refused".into());
                }
                let (near, mut far) = UnixStream::pair().unwrap();
                std::thread::spawn(move || {
                    let mut req = [0u8; 5];
                    far.read_exact(&mut req).unwrap();
                    far.write_all(&req.map(|b| b.to_ascii_uppercase())).unwrap();
                });
                Ok(near)
            })
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let accept = {
            let (l, s) = (listener.clone(), stopping.clone());
            std::thread::spawn(move || accept_loop(&l, &s, &dial))
        };

        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"hello").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"HELLO");

        refuse.store(true, Ordering::SeqCst);
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 1];
        let r = c.read(&mut buf);
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert_eq!(*dialled.lock().unwrap(), [port, port]);

        let pf = PortForward {
            listener,
            stopping,
            accept: Mutex::new(Some(accept)),
        };
        pf.stop();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    /// In a real namespace: a connection to any loopback port reaches the
    /// listener with its port, and teardown leaves no rule behind.
    #[test]
    fn redirects_loopback_connections_in_a_real_namespace() {
        let tool = |t: &str| {
            std::process::Command::new(t)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !tool("ip") || !tool("iptables") {
            eprintln!(
                "!!! SKIPPED redirects_loopback_connections_in_a_real_namespace: \
                 needs root, iproute2 and iptables"
            );
            return;
        }
        let ns = format!("moat-pf-{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &self.0])
                    .status();
            }
        }
        assert!(ip(&["netns", "add", &ns]));
        let _del = Del(ns.clone());
        assert!(ip(&["-n", &ns, "link", "set", "lo", "up"]));
        let path = std::path::PathBuf::from("/run/netns").join(&ns);

        let dialled = Arc::new(Mutex::new(Vec::new()));
        let dial: Dial = {
            let dialled = dialled.clone();
            Arc::new(move |p| {
                dialled.lock().unwrap().push(p);
                let (near, mut far) = UnixStream::pair().unwrap();
                std::thread::spawn(move || far.write_all(format!("port {p}").as_bytes()));
                Ok(near)
            })
        };
        let pf = PortForward::start(&path, dial).unwrap();
        let got = in_netns(&path, || {
            let mut c = TcpStream::connect(("127.0.0.1", 8080)).map_err(listen_error)?;
            let mut got = String::new();
            c.read_to_string(&mut got).map_err(listen_error)?;
            Ok(got)
        })
        .unwrap();
        assert_eq!(got, "port 8080");
        assert_eq!(*dialled.lock().unwrap(), [8080]);

        pf.stop();
        in_netns(&path, || {
            remove_redirect();
            Ok(())
        })
        .unwrap();
        let rules = in_netns(&path, || {
            super::super::run(&["iptables", "-t", "nat", "-S", "-w"])
        })
        .unwrap();
        assert!(!rules.contains(CHAIN), "{rules}");
    }
}
