//! Routes packets between the guest and host unix streams (Firecracker's
//! "hybrid vsock" convention).
//!
//! Host-initiated: a host process connects to `uds_path` and writes
//! `CONNECT <port>\n`; the guest is asked to accept on `<port>` and, once it
//! does, the process reads `OK <host port>\n` and then the byte stream.
//! Guest-initiated: a guest connection to host port P is forwarded to the
//! unix socket `<uds_path>_P`.
//!
//! Every socket is non-blocking and polled by the device worker's epoll, so
//! a slow host process never stalls the guest's other connections.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, Emitted};
use super::packet::{
    Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};

/// Most connections (pending CONNECT lines included) served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most RSTs queued for the guest before guest packets wait for it to
/// drain them.
const MAX_RST_BACKLOG: usize = 256;
/// `CONNECT 4294967295\n` with room to spare.
const CONNECT_LINE_MAX: usize = 32;
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// Host-side ports of host-initiated connections, as Firecracker picks them.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Epoll token of the listening socket; the worker owns tokens below it.
pub const TOKEN_LISTENER: u64 = 4;
const FIRST_STREAM_TOKEN: u64 = 16;

/// A connection's (host port, guest port).
type Key = (u32, u32);

/// An accepted host stream that has not finished its `CONNECT` line.
struct PendingStream {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// The host side of one vsock device, which outlives every activation's
/// muxer (the listener stays bound across guest driver resets).
#[derive(Clone)]
pub struct Endpoint {
    /// The guest's context ID.
    pub guest_cid: u64,
    /// The listening socket's path; guest connections to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Where host processes connect, then send `CONNECT <port>` and a newline.
    pub listener: Arc<UnixListener>,
    /// How long a guest may take to answer a host connection request.
    pub connect_timeout: Duration,
}

/// The connections of one activation: routes packets between the guest's queues
/// and host unix streams, all polled on one epoll.
pub struct Muxer {
    endpoint: Endpoint,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    tokens: HashMap<u64, Key>,
    pending: HashMap<u64, PendingStream>,
    next_token: u64,
    next_local_port: u32,
    /// RSTs for packets that belong to no connection.
    rst_queue: VecDeque<Header>,
    /// Connections with something for the guest, served round-robin.
    rx_list: VecDeque<Key>,
    scratch: Vec<u8>,
}

/// Connects to the unix socket at `path` without ever blocking: a listener
/// with a full backlog is a refusal.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation, checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un for the length passed.
    let ret = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl Muxer {
    /// A muxer that polls the endpoint's listener on `epoll`.
    pub fn new(endpoint: Endpoint, epoll: Epoll) -> io::Result<Self> {
        epoll.ctl(
            ControlOperation::Add,
            endpoint.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Muxer {
            endpoint,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            rst_queue: VecDeque::new(),
            rx_list: VecDeque::new(),
            scratch: vec![0u8; MAX_PAYLOAD],
        })
    }

    /// The epoll of the listener and every stream, for the worker to wait on.
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Number of live connections (pending CONNECT lines excluded).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether packets for the guest may be waiting.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_list.is_empty()
    }

    /// Whether guest packets should wait until the guest takes our RSTs.
    pub fn rx_backlog_full(&self) -> bool {
        self.rst_queue.len() >= MAX_RST_BACKLOG
    }

    /// Milliseconds until the next connection deadline, -1 for none.
    pub fn poll_timeout_ms(&self, now: Instant) -> i32 {
        let next = self
            .conns
            .values()
            .filter_map(Connection::deadline)
            .chain(self.pending.values().map(|p| p.deadline))
            .min();
        match next {
            None => -1,
            Some(deadline) => {
                let ms = deadline.saturating_duration_since(now).as_millis() + 1;
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }

    fn new_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Adds a new host stream to the epoll set, waiting for `events`, under
    /// a token of its own. None if epoll refuses it.
    fn watch(&mut self, stream: &impl AsRawFd, events: EventSet) -> Option<u64> {
        let token = self.new_token();
        self.epoll
            .ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(events, token),
            )
            .ok()
            .map(|()| token)
    }

    /// Handles readiness of the listener or of a host stream.
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == TOKEN_LISTENER {
            self.accept();
            return;
        }
        if self.pending.contains_key(&token) {
            self.read_connect_line(token);
            return;
        }
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            if conn.is_connecting() {
                // The host process gave up before the guest answered.
                self.kill(key);
                return;
            }
            conn.on_hup();
            // A hung-up stream stays readable for ever: reading it to its
            // EOF is driven by the guest's buffers from now on.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            conn.interest = None;
        } else {
            if events.contains(EventSet::IN) {
                conn.on_readable();
            }
            if events.contains(EventSet::OUT) && conn.flush().is_err() {
                self.kill(key);
                return;
            }
        }
        self.refresh(key, Instant::now());
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.endpoint.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    warn!("vsock: accept failed: {err}");
                    return;
                }
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
                warn!("vsock: too many connections, refusing one");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Some(token) = self.watch(&stream, EventSet::IN) else {
                continue;
            };
            self.pending.insert(
                token,
                PendingStream {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + CONNECT_LINE_TIMEOUT,
                },
            );
        }
    }

    /// Reads a pending stream's `CONNECT <port>\n` byte by byte, so data the
    /// host sends after it stays in the stream for the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(pending) = self.pending.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match (&pending.stream).read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&pending.line),
                Ok(_) if pending.line.len() < CONNECT_LINE_MAX => pending.line.push(byte[0]),
                Ok(_) => break None,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        let Some(peer_port) = port else {
            debug!("vsock: bad CONNECT line, closing the stream");
            return;
        };
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            return;
        };
        // The stream stays silent until the guest answers.
        if self
            .epoll
            .ctl(
                ControlOperation::Modify,
                pending.stream.as_raw_fd(),
                EpollEvent::new(EventSet::empty(), token),
            )
            .is_err()
        {
            return;
        }
        let mut conn = Connection::host_initiated(
            pending.stream,
            token,
            local_port,
            peer_port,
            Instant::now() + self.endpoint.connect_timeout,
        );
        conn.interest = Some(EventSet::empty());
        let key = (local_port, peer_port);
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.refresh(key, Instant::now());
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|&(local, _)| local == port)
                && !self.conns.contains_key(&(port, peer_port))
            {
                return Some(port);
            }
        }
        None
    }

    /// A packet from the guest's tx queue; `payload` is `hdr.len` bytes.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.endpoint.guest_cid || hdr.dst_cid != HOST_CID {
            debug!("vsock: dropping packet {} -> {}", hdr.src_cid, hdr.dst_cid);
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.reply_rst(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(hdr),
                OP_RST => {}
                _ => self.reply_rst(hdr),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        let result = match hdr.op {
            OP_RESPONSE => conn.on_response(),
            OP_RW => conn.on_data(payload),
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                conn.on_credit_request();
                Ok(())
            }
            OP_SHUTDOWN => {
                conn.on_peer_shutdown(hdr.flags);
                Ok(())
            }
            OP_RST => {
                self.remove(key);
                return;
            }
            // A second REQUEST, or an op we do not know.
            _ => Err(super::connection::Reset),
        };
        match result {
            Ok(()) => self.refresh(key, Instant::now()),
            Err(_) => self.kill(key),
        }
    }

    /// A guest packet too malformed to route: refuse it.
    pub fn reject(&mut self, hdr: &Header) {
        if hdr.src_cid == self.endpoint.guest_cid && hdr.dst_cid == HOST_CID {
            let key = (hdr.dst_port, hdr.src_port);
            if self.conns.contains_key(&key) && hdr.op != OP_RST {
                self.kill(key);
                return;
            }
            self.reply_rst(hdr);
        }
    }

    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != OP_RST && self.rst_queue.len() < MAX_RST_BACKLOG {
            self.rst_queue.push_back(hdr.reset_reply());
        }
    }

    fn guest_connect(&mut self, req: &Header) {
        if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
            warn!("vsock: too many connections, refusing one");
            self.reply_rst(req);
            return;
        }
        let mut path = OsString::from(self.endpoint.uds_path.as_os_str());
        path.push(format!("_{}", req.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(err) => {
                debug!("vsock: guest connection to port {}: {err}", req.dst_port);
                self.reply_rst(req);
                return;
            }
        };
        let Some(token) = self.watch(&stream, EventSet::empty()) else {
            self.reply_rst(req);
            return;
        };
        let mut conn = Connection::guest_initiated(stream, token, req);
        conn.interest = Some(EventSet::empty());
        let key = (req.dst_port, req.src_port);
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.refresh(key, Instant::now());
    }

    /// Drops a connection, closing its stream.
    fn remove(&mut self, key: Key) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        self.tokens.remove(&conn.token);
        Some(conn)
    }

    /// Drops a connection and tells the guest with an RST.
    fn kill(&mut self, key: Key) {
        if let Some(conn) = self.remove(key) {
            self.rst_queue.push_back(Header {
                src_cid: HOST_CID,
                dst_cid: self.endpoint.guest_cid,
                src_port: conn.local_port,
                dst_port: conn.peer_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Default::default()
            });
        }
    }

    /// Brings a connection's polling and rx scheduling up to date.
    fn refresh(&mut self, key: Key, now: Instant) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.settle(now).is_err() {
            self.kill(key);
            return;
        }
        if let Some(current) = conn.interest {
            let wanted = conn.desired_interest();
            if wanted != current {
                match self.epoll.ctl(
                    ControlOperation::Modify,
                    conn.stream.as_raw_fd(),
                    EpollEvent::new(wanted, conn.token),
                ) {
                    Ok(()) => conn.interest = Some(wanted),
                    Err(err) => {
                        warn!("vsock: cannot poll a stream: {err}");
                        self.kill(key);
                        return;
                    }
                }
            }
        }
        if conn.wants_rx() && !conn.in_rx_list {
            conn.in_rx_list = true;
            self.rx_list.push_back(key);
        }
    }

    /// Fills one guest rx buffer (at least a header's worth of room) with the
    /// next packet; `None` when there is nothing to send.
    pub fn fill_rx(&mut self, writer: &mut virtio_queue::Writer<'_>) -> Option<usize> {
        if let Some(hdr) = self.rst_queue.pop_front() {
            return match writer.write_all(&hdr.to_bytes()) {
                Ok(()) => Some(HDR_LEN),
                Err(_) => None,
            };
        }
        let now = Instant::now();
        for _ in 0..self.rx_list.len() {
            let key = self.rx_list.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_list = false;
            match conn.next_packet(writer, &mut self.scratch, self.endpoint.guest_cid, now) {
                Ok(Emitted::Packet(len)) => {
                    self.refresh(key, now);
                    return Some(len);
                }
                Ok(Emitted::Nothing) => self.refresh(key, now),
                Err(_) => {
                    // The buffer may hold a partial packet: let the caller
                    // retry it for the RST.
                    self.kill(key);
                    return None;
                }
            }
        }
        None
    }

    /// Ends connections and pending streams whose time is up.
    pub fn check_deadlines(&mut self, now: Instant) {
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.kill(key);
        }
        self.pending.retain(|_, p| p.deadline > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"CONNECT +5"), None);
        assert_eq!(parse_connect_line(b"connect 5"), None);
        assert_eq!(parse_connect_line(b"CONNECT 5 6"), None);
        assert_eq!(parse_connect_line(&[0xff, 0xfe]), None);
    }

    #[test]
    fn nonblocking_connect_refusals() {
        let dir = std::env::temp_dir().join(format!("moat-vsock-c-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let missing = dir.join("missing");
        assert!(connect_nonblocking(&missing).is_err());
        let long = dir.join("x".repeat(120));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let path = dir.join("ok");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let stream = connect_nonblocking(&path).unwrap();
        drop(listener);
        drop(stream);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
