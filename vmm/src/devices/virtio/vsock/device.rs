//! The virtio-vsock device and its worker thread.

use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::error;
use moat_vmm_api::limits::MAX_SOCKET_PATH;
use seccompiler::BpfProgram;
use virtio_queue::{Queue, QueueOwnedT};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::CONNECT_TIMEOUT;
use super::muxer::{Endpoint, Muxer, TOKEN_LISTENER};
use super::packet::{Header, HDR_LEN, MAX_PAYLOAD};
use super::{QUEUE_SIZE, RX_INDEX, TX_INDEX, TYPE_VSOCK};
use crate::devices::virtio::device::{
    read_config_bytes, ActivateError, ActivatedQueue, GuestMemory, Interrupt, VirtioDevice,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::devices::virtio::worker::{
    add_used, drain_queue, epoll_on, next_chain, notify_used, reenable_notification, Chain,
    DeviceState, DeviceWorker, RingError, ANY_CHAIN_LEN,
};

/// The longest tx chain: a header and the largest payload.
pub const MAX_TX_CHAIN_LEN: u32 = (HDR_LEN + MAX_PAYLOAD) as u32;

/// Why a vsock device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is below 3 or above 2^32 - 2.
    #[error("Guest CID {0} is reserved or out of range (3 to 2^32 - 2)")]
    InvalidCid(u64),
    /// The socket path is longer than a unix socket path may be.
    #[error("Socket path {0:?} is longer than {MAX_SOCKET_PATH} bytes")]
    PathTooLong(PathBuf),
    /// The socket cannot be bound or made non-blocking.
    #[error("Cannot listen on {path:?}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error of bind or fcntl.
        #[source]
        source: io::Error,
    },
}

/// virtio-vsock with a unix socket backend on `uds_path`.
pub struct Vsock {
    endpoint: Endpoint,
    state: DeviceState,
    /// The next activation resumes a template: the guest is told that
    /// every connection it had is gone (a transport reset event).
    restoring: bool,
}

impl Vsock {
    /// Validates the CID and starts listening on `uds_path` (which must not
    /// exist yet), so a bad configuration fails before the guest runs.
    /// Host processes that connect before the guest driver is up wait in the
    /// listen backlog.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        // Guest connections go to `<uds_path>_<port>`; those longer than
        // sun_path simply fail, like any other missing listener.
        if uds_path.as_os_str().as_bytes().len() > MAX_SOCKET_PATH {
            return Err(VsockError::PathTooLong(uds_path));
        }
        let listener = UnixListener::bind(&uds_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| VsockError::Bind {
                path: uds_path.clone(),
                source,
            })?;
        Ok(Vsock {
            endpoint: Endpoint {
                guest_cid,
                uds_path,
                listener: Arc::new(listener),
                connect_timeout: CONNECT_TIMEOUT,
            },
            state: DeviceState::default(),
            restoring: false,
        })
    }

    /// How long a guest may take to answer a host connection request
    /// (from the next activation on).
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.endpoint.connect_timeout = timeout;
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.endpoint.guest_cid
    }

    /// Where host processes connect to reach the guest; guest connections to
    /// port P go to `<uds_path>_P`.
    pub fn uds_path(&self) -> &Path {
        &self.endpoint.uds_path
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.state.ack_features(self.avail_features(), features);
    }

    fn set_seccomp_filter(&mut self, filter: BpfProgram) {
        self.state.set_seccomp_filter(filter);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.endpoint.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let queues = self.state.begin_activation(queues)?;
        let mut worker = Worker::new(mem, interrupt.clone(), queues, self.endpoint.clone())
            .map_err(ActivateError::Backend)?;
        if std::mem::take(&mut self.restoring) {
            worker.announce_reset().map_err(ActivateError::Backend)?;
        }
        let name = format!("vsock-{}", self.endpoint.guest_cid);
        self.state.start_worker(name, interrupt, worker)
    }

    /// Stops the worker; every connection is closed with it.
    fn reset(&mut self) {
        self.state.reset();
    }

    /// The template's connections were to another VMM's sockets: the
    /// guest drops them on the transport reset event (its listeners stay).
    fn restoring(&mut self) {
        self.restoring = true;
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.state.stop_worker();
        if let Err(err) = std::fs::remove_file(&self.endpoint.uds_path) {
            error!("vsock: cannot remove {:?}: {err}", self.endpoint.uds_path);
        }
    }
}

/// `virtio_vsock_event_id`: the host's side of every connection is gone.
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_EVT: u64 = 3;

struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    rx: Queue,
    tx: Queue,
    /// Used only for a transport reset after a restore.
    evt: Queue,
    /// A transport reset event waits for an event buffer.
    reset_pending: bool,
    rx_evt: EventFd,
    tx_evt: EventFd,
    evt_evt: EventFd,
    muxer: Muxer,
    payload: Vec<u8>,
}

impl Worker {
    fn new(
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: [ActivatedQueue; 3],
        endpoint: Endpoint,
    ) -> io::Result<Self> {
        let [rx, tx, evt] = queues;
        let epoll = epoll_on(&[
            (&rx.notify, TOKEN_RX),
            (&tx.notify, TOKEN_TX),
            (&evt.notify, TOKEN_EVT),
        ])?;
        let muxer = Muxer::new(endpoint, epoll)?;
        Ok(Worker {
            mem,
            interrupt,
            rx: rx.queue,
            tx: tx.queue,
            evt: evt.queue,
            reset_pending: false,
            rx_evt: rx.notify,
            tx_evt: tx.notify,
            evt_evt: evt.notify,
            muxer,
            payload: vec![0u8; MAX_PAYLOAD],
        })
    }

    /// Queues a transport reset event for the guest and wakes the worker
    /// to send it.
    fn announce_reset(&mut self) -> io::Result<()> {
        self.reset_pending = true;
        self.evt_evt.write(1)
    }

    /// Sends the pending transport reset event, if the guest has given an
    /// event buffer: `struct virtio_vsock_event { le32 id }`, id 0.
    fn send_reset_event(&mut self) -> Result<(), RingError> {
        use std::io::Write as _;
        let mem = self.mem.clone();
        let Some(chain) = next_chain(&mut self.evt, &mem, ANY_CHAIN_LEN)? else {
            return Ok(());
        };
        let head = chain.head_index();
        let written = match chain.writer(&mem) {
            Ok(mut writer) if writer.available_bytes() >= 4 => writer
                .write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes())
                .map_or(0, |()| 4),
            _ => 0,
        };
        add_used(&mut self.evt, &mem, head, written)?;
        notify_used(&mut self.evt, &mem, &self.interrupt, "vsock");
        self.reset_pending = written == 0;
        Ok(())
    }

    /// Serves both queues until neither can make progress. Guest packets
    /// wait while too many RSTs are queued for it, and go again once rx
    /// drained some.
    fn process_queues(&mut self) -> Result<(), RingError> {
        let mut rx_used = false;
        let mut tx_used = false;
        loop {
            let (tx_progress, tx_throttled) = self.process_tx()?;
            tx_used |= tx_progress;
            let rx_progress = self.process_rx()?;
            rx_used |= rx_progress;
            if !(tx_throttled && rx_progress) {
                break;
            }
        }
        if rx_used {
            self.signal(RX_INDEX);
        }
        if tx_used {
            self.signal(TX_INDEX);
        }
        Ok(())
    }

    fn signal(&mut self, which: usize) {
        let queue = match which {
            RX_INDEX => &mut self.rx,
            TX_INDEX => &mut self.tx,
            _ => return,
        };
        notify_used(queue, &self.mem, &self.interrupt, "vsock");
    }

    /// Returns (whether chains were used, whether it stopped on a full RST
    /// backlog).
    fn process_tx(&mut self) -> Result<(bool, bool), RingError> {
        // Chains borrow the memory while `self` changes; the clone is a few
        // reference counts.
        let mem = self.mem.clone();
        // A packet is a header and at most MAX_PAYLOAD bytes: a longer
        // chain is malformed; a header whose length disagrees with its chain
        // is answered with an RST.
        let drained = drain_queue(&mut self.tx, &mem, MAX_TX_CHAIN_LEN, |chain| {
            if self.muxer.rx_backlog_full() {
                return None;
            }
            handle_tx_chain(&mut self.muxer, &mut self.payload, &mem, chain);
            // The device writes nothing into tx buffers.
            Some(0)
        })?;
        Ok((drained.used, drained.paused))
    }

    /// Fills guest rx buffers while the muxer has packets. Returns whether
    /// chains were used.
    fn process_rx(&mut self) -> Result<bool, RingError> {
        let mem = self.mem.clone();
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = next_chain(&mut self.rx, &mem, ANY_CHAIN_LEN)? else {
                // New buffers may have raced with re-enabling the kick.
                if reenable_notification(&mut self.rx, &mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            match chain.writer(&mem) {
                Ok(mut writer) if writer.available_bytes() >= HDR_LEN => {
                    match self.muxer.fill_rx(&mut writer) {
                        Some(len) => {
                            add_used(&mut self.rx, &mem, head, len as u32)?;
                            used = true;
                        }
                        None => {
                            self.rx.go_to_previous_position();
                            break;
                        }
                    }
                }
                _ => {
                    // Well formed but useless for any packet (read-only, or
                    // shorter than a header): hand it back empty.
                    add_used(&mut self.rx, &mem, head, 0)?;
                    used = true;
                }
            }
        }
        Ok(used)
    }
}

impl DeviceWorker for Worker {
    fn epoll(&self) -> &Epoll {
        self.muxer.epoll()
    }

    fn handle_event(&mut self, token: u64, events: EventSet) -> Result<(), RingError> {
        match token {
            TOKEN_RX => {
                let _ = self.rx_evt.read();
            }
            TOKEN_TX => {
                let _ = self.tx_evt.read();
            }
            TOKEN_EVT => {
                let _ = self.evt_evt.read();
            }
            token if token >= TOKEN_LISTENER => self.muxer.handle_event(token, events),
            _ => {}
        }
        Ok(())
    }

    fn process(&mut self) -> Result<(), RingError> {
        if self.reset_pending {
            self.send_reset_event()?;
        }
        self.muxer.check_deadlines(Instant::now());
        self.process_queues()
    }

    fn poll_timeout_ms(&self) -> i32 {
        self.muxer.poll_timeout_ms(Instant::now())
    }
}

/// Passes the guest packet in `chain` to the muxer, read through `payload`
/// (of [`MAX_PAYLOAD`] bytes).
pub fn handle_tx_chain(muxer: &mut Muxer, payload: &mut [u8], mem: &GuestMemory, chain: Chain<'_>) {
    let Ok(mut reader) = chain.reader(mem) else {
        return;
    };
    let mut raw = [0u8; HDR_LEN];
    if reader.read_exact(&mut raw).is_err() {
        // Not even a header: nobody to answer.
        return;
    }
    let hdr = Header::from_bytes(&raw);
    let len = hdr.len as usize;
    if len > MAX_PAYLOAD || len > reader.available_bytes() {
        muxer.reject(&hdr);
        return;
    }
    if reader.read_exact(&mut payload[..len]).is_err() {
        muxer.reject(&hdr);
        return;
    }
    muxer.handle_guest_packet(&hdr, &payload[..len]);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::test_driver::{
        guest_memory, interrupt, wait_needs_reset, Desc, TestQueue, VRING_DESC_F_NEXT,
        VRING_DESC_F_WRITE,
    };
    use crate::devices::virtio::vsock::connection::CONN_BUF_SIZE;
    use crate::devices::virtio::vsock::packet::*;

    const CID: u64 = 3;
    const WAIT: Duration = Duration::from_secs(5);
    const RX_BUF: u32 = 4096 + HDR_LEN as u32;

    struct Guest {
        dev: Option<Vsock>,
        rxq: TestQueue,
        txq: TestQueue,
        _evq: TestQueue,
        rx_bufs: HashMap<u16, Desc>,
        dir: PathBuf,
        uds: PathBuf,
        irq: Arc<Interrupt>,
    }

    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mv-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    impl Guest {
        fn start(name: &str) -> Guest {
            let mut guest = Self::start_bare(name);
            guest.post_rx(16);
            guest
        }

        /// Activated, with no rx buffers posted yet.
        fn start_bare(name: &str) -> Guest {
            let dir = test_dir(name);
            let uds = dir.join("v.sock");
            let mut dev = Vsock::new(CID, uds.clone()).unwrap();
            // host_connect_refused_or_unanswered waits for it to expire.
            dev.set_connect_timeout(Duration::from_secs(2));
            let mem = guest_memory();
            let mut guest = Guest {
                dev: Some(dev),
                rxq: TestQueue::new(&mem, 0, 64),
                txq: TestQueue::new(&mem, 1, 64),
                _evq: TestQueue::new(&mem, 2, 64),
                rx_bufs: HashMap::new(),
                dir,
                uds,
                irq: interrupt().0,
            };
            guest.activate();
            guest
        }

        /// Activates the device on fresh rings with no rx buffers, as a
        /// driver does after a reset.
        fn activate(&mut self) {
            let mem = guest_memory();
            self.rxq = TestQueue::new(&mem, 0, 64);
            self.txq = TestQueue::new(&mem, 1, 64);
            self._evq = TestQueue::new(&mem, 2, 64);
            self.rx_bufs.clear();
            let (irq, _) = interrupt();
            let dev = self.dev.as_mut().unwrap();
            dev.set_acked_features(dev.avail_features());
            dev.activate(
                mem,
                irq.clone(),
                vec![
                    self.rxq.activated(true),
                    self.txq.activated(true),
                    self._evq.activated(true),
                ],
            )
            .unwrap();
            self.irq = irq;
        }

        /// Publishes a chain that `build` writes on the tx (`tx`) or rx
        /// queue, checks that it puts the device in DEVICE_NEEDS_RESET
        /// without being returned, then resets the device and activates it
        /// again.
        fn expect_fault(&mut self, what: &str, tx: bool, build: impl FnOnce(&mut TestQueue)) {
            build(if tx { &mut self.txq } else { &mut self.rxq });
            let dev = self.dev.as_mut().unwrap();
            wait_needs_reset(&self.irq, WAIT, || !dev.state.has_worker());
            assert_eq!(self.txq.next_used(), None, "{what}: tx chain returned");
            assert_eq!(self.rxq.next_used(), None, "{what}: rx chain returned");
            let t = std::time::Instant::now();
            dev.reset();
            assert!(t.elapsed() < Duration::from_secs(1), "{what}");
            self.activate();
        }

        fn post_rx(&mut self, n: usize) {
            for _ in 0..n {
                let buf = self.rxq.writable(RX_BUF);
                let head = self.rxq.add_chain(&[buf]);
                self.rx_bufs.insert(head, buf);
            }
        }

        /// Sends one packet, header and payload in separate descriptors.
        fn send(&mut self, hdr: Header, payload: &[u8]) {
            let mut hdr = hdr;
            hdr.len = payload.len() as u32;
            let h = self.txq.readable(&hdr.to_bytes());
            let head = if payload.is_empty() {
                self.txq.add_chain(&[h])
            } else {
                let p = self.txq.readable(payload);
                self.txq.add_chain(&[h, p])
            };
            assert_eq!(self.txq.wait_used(WAIT), Some((head, 0)));
        }

        fn recv_within(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
            let (id, len) = self.rxq.wait_used(timeout)?;
            let buf = self.rx_bufs.remove(&id).expect("unknown rx buffer");
            assert!(len as usize >= HDR_LEN, "short rx packet: {len}");
            let data = self.rxq.read(buf.addr, len as usize);
            let hdr = Header::from_bytes(data[..HDR_LEN].try_into().unwrap());
            assert_eq!(hdr.len as usize, len as usize - HDR_LEN);
            assert_eq!(
                (hdr.src_cid, hdr.dst_cid, hdr.type_),
                (HOST_CID, CID, TYPE_STREAM)
            );
            self.post_rx(1);
            Some((hdr, data[HDR_LEN..].to_vec()))
        }

        fn recv(&mut self) -> (Header, Vec<u8>) {
            self.recv_within(WAIT).expect("no packet for the guest")
        }

        /// Host side: connect to the device and go through the handshake.
        /// Returns the stream and (host port, guest port).
        fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
            let mut host = UnixStream::connect(&self.uds).unwrap();
            host.set_read_timeout(Some(WAIT)).unwrap();
            host.write_all(format!("CONNECT {guest_port}\n").as_bytes())
                .unwrap();
            let (req, _) = self.recv();
            assert_eq!(req.op, OP_REQUEST);
            assert_eq!(req.dst_port, guest_port);
            assert!(req.src_port >= 1 << 30);
            assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
            self.send(pkt(OP_RESPONSE, guest_port, req.src_port), &[]);
            let line = read_line(&mut host);
            assert_eq!(line, format!("OK {}", req.src_port));
            (host, req.src_port)
        }
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            drop(self.dev.take());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A guest packet from `src_port` to host port `dst_port`.
    fn pkt(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    fn read_line(stream: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            assert_eq!(stream.read(&mut b).unwrap(), 1, "stream closed");
            if b[0] == b'\n' {
                return String::from_utf8(line).unwrap();
            }
            line.push(b[0]);
        }
    }

    fn read_exactly(stream: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn pattern(seed: usize, len: usize) -> Vec<u8> {
        (0..len).map(|i| ((seed + i) % 251) as u8).collect()
    }

    #[test]
    fn config_and_validation() {
        let dir = test_dir("cfg");
        let uds = dir.join("v.sock");
        let dev = Vsock::new(0x1_2345_6789 & 0xffff_ffff, uds.clone()).unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        let mut cfg = [0xffu8; 10];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x89, 0x67, 0x45, 0x23, 0, 0, 0, 0, 0, 0]);
        let mut cfg = [0xffu8; 4];
        dev.read_config(2, &mut cfg);
        assert_eq!(cfg, [0x45, 0x23, 0, 0]);
        dev.read_config(8, &mut cfg);
        assert_eq!(cfg, [0; 4]);
        // The path is taken while the device lives.
        assert!(matches!(
            Vsock::new(4, uds.clone()),
            Err(VsockError::Bind { .. })
        ));
        drop(dev);
        assert!(!uds.exists(), "socket file left behind");
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            assert!(matches!(
                Vsock::new(cid, dir.join("c.sock")),
                Err(VsockError::InvalidCid(_))
            ));
        }
        let long = dir.join("x".repeat(108));
        assert!(matches!(
            Vsock::new(3, long),
            Err(VsockError::PathTooLong(_))
        ));
        // The limit is the one moat-vmm's config checks, which leaves room
        // for the `_<port>` of guest-initiated connections.
        let over = format!("/{}", "x".repeat(MAX_SOCKET_PATH));
        let err = Vsock::new(3, over.into()).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "Socket path \"/{}\" is longer than 100 bytes",
                "x".repeat(100)
            )
        );
        assert!(matches!(
            Vsock::new(3, dir.join("no/such/dir.sock")),
            Err(VsockError::Bind { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_queue_count() {
        let dir = test_dir("qc");
        let mut dev = Vsock::new(3, dir.join("v.sock")).unwrap();
        let mem = guest_memory();
        let q = TestQueue::new(&mem, 0, 16);
        let (irq, _) = interrupt();
        assert!(matches!(
            dev.activate(mem, irq, vec![q.activated(false)]),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 1
            })
        ));
        drop(dev);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_connect_and_data_both_ways() {
        let mut g = Guest::start("hc");
        let (mut host, hport) = g.host_connect(52);
        host.write_all(b"hello guest").unwrap();
        let (rw, data) = g.recv();
        assert_eq!((rw.op, rw.src_port, rw.dst_port), (OP_RW, hport, 52));
        assert_eq!(data, b"hello guest");
        g.send(pkt(OP_RW, 52, hport), b"hello host");
        assert_eq!(read_exactly(&mut host, 10), b"hello host");

        // Data written right behind the CONNECT line is not lost.
        let mut host2 = UnixStream::connect(&g.uds).unwrap();
        host2.set_read_timeout(Some(WAIT)).unwrap();
        host2.write_all(b"CONNECT 53\nearly bytes").unwrap();
        let (req, _) = g.recv();
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 53));
        g.send(pkt(OP_RESPONSE, 53, req.src_port), &[]);
        assert_eq!(read_line(&mut host2), format!("OK {}", req.src_port));
        assert_ne!(req.src_port, hport);
        let (rw, data) = g.recv();
        assert_eq!((rw.op, rw.dst_port), (OP_RW, 53));
        assert_eq!(data, b"early bytes");

        // The guest closes: the host sees EOF, the guest gets its RST.
        let mut sd = pkt(OP_SHUTDOWN, 52, hport);
        sd.flags = SHUTDOWN_BOTH;
        g.send(sd, &[]);
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        let (rst, _) = g.recv();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, hport, 52));
        // The other connection is unaffected.
        g.send(pkt(OP_RW, 53, req.src_port), b"still here");
        assert_eq!(read_exactly(&mut host2, 10), b"still here");
    }

    #[test]
    fn host_connect_refused_or_unanswered() {
        let mut g = Guest::start("hr");
        let mut host = UnixStream::connect(&g.uds).unwrap();
        host.set_read_timeout(Some(WAIT)).unwrap();
        host.write_all(b"CONNECT 99\n").unwrap();
        let (req, _) = g.recv();
        g.send(pkt(OP_RST, 99, req.src_port), &[]);
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap(), 0, "stream not closed on RST");

        // Malformed CONNECT lines close the stream without bothering the guest.
        for line in [&b"CONNECT x\n"[..], b"HELLO 5\n", &[b'C'; 40]] {
            let mut bad = UnixStream::connect(&g.uds).unwrap();
            bad.set_read_timeout(Some(WAIT)).unwrap();
            bad.write_all(line).unwrap();
            // Closing with the line's rest unread resets the stream.
            match bad.read(&mut buf) {
                Ok(0) => {}
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("stream not closed: {other:?}"),
            }
        }
        assert!(g.recv_within(Duration::from_millis(100)).is_none());

        // A guest that never answers: the host is closed after the timeout
        // and the guest told with an RST.
        let mut slow = UnixStream::connect(&g.uds).unwrap();
        slow.set_read_timeout(Some(WAIT)).unwrap();
        slow.write_all(b"CONNECT 98\n").unwrap();
        let (req, _) = g.recv();
        let start = Instant::now();
        assert_eq!(slow.read(&mut buf).unwrap(), 0);
        assert!(start.elapsed() >= Duration::from_millis(1500));
        let (rst, _) = g.recv();
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port),
            (OP_RST, req.src_port, 98)
        );
    }

    #[test]
    fn guest_connect_to_host_listener() {
        let mut g = Guest::start("gc");
        let listener = UnixListener::bind(format!("{}_5000", g.uds.display())).unwrap();
        g.send(pkt(OP_REQUEST, 1111, 5000), &[]);
        let (resp, _) = g.recv();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (OP_RESPONSE, 5000, 1111)
        );
        assert_eq!(resp.buf_alloc, CONN_BUF_SIZE);
        let (mut host, _) = listener.accept().unwrap();
        host.set_read_timeout(Some(WAIT)).unwrap();
        g.send(pkt(OP_RW, 1111, 5000), b"ping");
        assert_eq!(read_exactly(&mut host, 4), b"ping");
        host.write_all(b"pong").unwrap();
        let (rw, data) = g.recv();
        assert_eq!((rw.op, rw.dst_port), (OP_RW, 1111));
        assert_eq!(data, b"pong");

        // The guest half-closes: the host reads EOF but can still send.
        let mut sd = pkt(OP_SHUTDOWN, 1111, 5000);
        sd.flags = SHUTDOWN_SEND;
        g.send(sd, &[]);
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        host.write_all(b"more").unwrap();
        let (rw, data) = g.recv();
        assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"more"[..]));
        // The host closes: the guest gets both shutdown flags, then answers RST.
        drop(host);
        let (sd, _) = g.recv();
        assert_eq!((sd.op, sd.flags), (OP_SHUTDOWN, SHUTDOWN_BOTH));
        g.send(pkt(OP_RST, 1111, 5000), &[]);
        // The connection is gone: more data is refused.
        g.send(pkt(OP_RW, 1111, 5000), b"late");
        let (rst, _) = g.recv();
        assert_eq!((rst.op, rst.dst_port), (OP_RST, 1111));

        // No listener on the port: RST.
        g.send(pkt(OP_REQUEST, 1112, 6000), &[]);
        let (rst, _) = g.recv();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 6000, 1112));
    }

    #[test]
    fn host_half_close_and_credit_request() {
        let mut g = Guest::start("hh");
        let (mut host, hport) = g.host_connect(70);
        host.write_all(b"last words").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let (rw, data) = g.recv();
        assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"last words"[..]));
        let (sd, _) = g.recv();
        assert_eq!((sd.op, sd.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        // The guest can still talk to the host.
        g.send(pkt(OP_RW, 70, hport), b"reply");
        assert_eq!(read_exactly(&mut host, 5), b"reply");
        g.send(pkt(OP_CREDIT_REQUEST, 70, hport), &[]);
        let (cu, _) = g.recv();
        assert_eq!(cu.op, OP_CREDIT_UPDATE);
        assert_eq!((cu.buf_alloc, cu.fwd_cnt), (CONN_BUF_SIZE, 5));
    }

    #[test]
    fn host_to_guest_respects_guest_credit() {
        let mut g = Guest::start("cr");
        let (host, hport) = g.host_connect(80);
        const TOTAL: usize = 1 << 20;
        const GUEST_BUF: u32 = 64 * 1024;
        // Tell the device our small buffer.
        let mut cu = pkt(OP_CREDIT_UPDATE, 80, hport);
        cu.buf_alloc = GUEST_BUF;
        g.send(cu, &[]);
        let mut writer = host.try_clone().unwrap();
        let feeder = std::thread::spawn(move || writer.write_all(&pattern(0, TOTAL)));
        let mut received = Vec::new();
        let mut fwd_cnt = 0u32;
        let mut stalled_once = false;
        while received.len() < TOTAL {
            match g.recv_within(Duration::from_millis(300)) {
                Some((hdr, data)) => {
                    assert_eq!(hdr.op, OP_RW);
                    received.extend_from_slice(&data);
                    let in_flight = received.len() as u32 - fwd_cnt;
                    assert!(in_flight <= GUEST_BUF, "device overran credit: {in_flight}");
                }
                None => {
                    // Out of credit: the device must have sent exactly our
                    // buffer's worth. Consume it and say so.
                    assert_eq!(received.len() as u32 - fwd_cnt, GUEST_BUF);
                    stalled_once = true;
                    fwd_cnt = received.len() as u32;
                    let mut cu = pkt(OP_CREDIT_UPDATE, 80, hport);
                    cu.buf_alloc = GUEST_BUF;
                    cu.fwd_cnt = fwd_cnt;
                    g.send(cu, &[]);
                }
            }
        }
        assert!(stalled_once);
        assert!(received == pattern(0, TOTAL), "data corrupted");
        feeder.join().unwrap().unwrap();
    }

    #[test]
    fn guest_to_host_large_transfer_with_credit_updates() {
        let mut g = Guest::start("gt");
        let (mut host, hport) = g.host_connect(81);
        const TOTAL: usize = 2 << 20;
        const CHUNK: usize = 16 * 1024;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::with_capacity(TOTAL);
            let mut buf = vec![0u8; 8192];
            while got.len() < TOTAL {
                // A slow reader, so the device has to buffer and throttle.
                std::thread::sleep(Duration::from_micros(200));
                let n = host.read(&mut buf).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let data = pattern(7, TOTAL);
        let mut sent = 0usize;
        let (mut peer_buf, mut peer_fwd) = (CONN_BUF_SIZE, 0u32);
        let mut updates = 0;
        while sent < TOTAL {
            let credit = peer_buf - (sent as u32 - peer_fwd);
            if (credit as usize) < CHUNK.min(TOTAL - sent) {
                // Wait for the device to free room.
                let (hdr, _) = g.recv();
                assert_eq!(hdr.op, OP_CREDIT_UPDATE);
                assert!(hdr.fwd_cnt as usize <= sent);
                (peer_buf, peer_fwd) = (hdr.buf_alloc, hdr.fwd_cnt);
                updates += 1;
                continue;
            }
            let n = CHUNK.min(TOTAL - sent);
            g.send(pkt(OP_RW, 81, hport), &data[sent..sent + n]);
            sent += n;
        }
        assert!(updates > 0);
        assert!(reader.join().unwrap() == data, "data corrupted");
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let mut g = Guest::start("ov");
        let (mut host, hport) = g.host_connect(82);
        // The host never reads; the guest ignores the credit it was given.
        let chunk = vec![0x5au8; 64 * 1024];
        let mut reset = None;
        for _ in 0..64 {
            g.send(pkt(OP_RW, 82, hport), &chunk);
            // Credit updates come while the socket buffer takes data.
            while let Some((hdr, _)) = g.recv_within(Duration::from_millis(1)) {
                if hdr.op != OP_CREDIT_UPDATE {
                    reset = Some(hdr);
                }
            }
            if reset.is_some() {
                break;
            }
        }
        let rst = reset.expect("no reset for a guest ignoring credit");
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, hport, 82));
        // The host stream is closed after what the socket had taken.
        host.set_read_timeout(Some(WAIT)).unwrap();
        let mut sink = Vec::new();
        host.read_to_end(&mut sink).unwrap();
        assert!(sink.len() < 64 * 64 * 1024);
    }

    #[test]
    fn malformed_packets_are_dropped_or_reset() {
        let mut g = Guest::start("mp");
        let quiet = Duration::from_millis(50);
        // Wrong CIDs: dropped silently.
        let mut p = pkt(OP_REQUEST, 1, 2);
        p.dst_cid = 7;
        g.send(p, &[]);
        let mut p = pkt(OP_REQUEST, 1, 2);
        p.src_cid = 4;
        g.send(p, &[]);
        assert!(g.recv_within(quiet).is_none());
        // RST for an unknown connection: nothing to answer.
        g.send(pkt(OP_RST, 1, 2), &[]);
        assert!(g.recv_within(quiet).is_none());
        // Unknown op, wrong type, data for no connection: RST.
        for (op, type_) in [(99, TYPE_STREAM), (OP_REQUEST, 2), (OP_RW, TYPE_STREAM)] {
            let mut p = pkt(op, 10, 20);
            p.type_ = type_;
            g.send(p, b"x");
            let (rst, _) = g.recv();
            assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 20, 10));
        }
        // Length larger than the chain, and larger than any packet.
        for len in [100u32, (MAX_PAYLOAD + 1) as u32] {
            let mut p = pkt(OP_RW, 11, 21);
            p.len = len;
            let h = g.txq.readable(&p.to_bytes());
            let head = g.txq.add_chain(&[h]);
            assert_eq!(g.txq.wait_used(WAIT), Some((head, 0)));
            let (rst, _) = g.recv();
            assert_eq!((rst.op, rst.dst_port), (OP_RST, 11));
        }
        let q = &mut g.txq;
        // Shorter than a header, zero length, writable-only: well formed,
        // nobody to answer.
        let d = q.readable(&[0u8; 20]);
        q.write_desc(0, d.addr, 20, 0, 0);
        q.publish(0);
        assert_eq!(q.wait_used(WAIT), Some((0, 0)));
        q.write_desc(2, d.addr, 0, 0, 0);
        q.publish(2);
        assert_eq!(q.wait_used(WAIT), Some((2, 0)));
        q.write_desc(4, d.addr, 64, VRING_DESC_F_WRITE, 0);
        q.publish(4);
        assert_eq!(q.wait_used(WAIT), Some((4, 0)));
        assert!(g.recv_within(quiet).is_none());
        // Everything still works.
        let (mut host, hport) = g.host_connect(90);
        g.send(pkt(OP_RW, 90, hport), b"alive");
        assert_eq!(read_exactly(&mut host, 5), b"alive");
        assert!(!g.irq.needs_reset());
    }

    // The issue changed the spec: malformed tx chains used to be returned
    // empty; they now need a device reset.
    #[test]
    fn malformed_tx_chains_need_a_reset_and_stop_the_device() {
        let mut g = Guest::start_bare("mt");
        type Build = fn(&mut TestQueue);
        let cases: [(&str, Build); 5] = [
            ("out of guest memory", |q| {
                q.write_desc(1, 1 << 40, 64, 0, 0);
                q.publish(1);
            }),
            ("a loop", |q| {
                let d = q.readable(&[0u8; 64]);
                q.write_desc(3, d.addr, 8, VRING_DESC_F_NEXT, 3);
                q.publish(3);
            }),
            ("a next index past the table", |q| {
                let d = q.readable(&[0u8; 64]);
                q.write_desc(5, d.addr, 8, VRING_DESC_F_NEXT, 500);
                q.publish(5);
            }),
            ("longer than any packet", |q| {
                let len = MAX_TX_CHAIN_LEN + 1;
                let big = q.alloc(len);
                q.write_desc(6, big, len, 0, 0);
                q.publish(6);
            }),
            ("a head past the queue", |q| q.publish(300)),
        ];
        for (what, build) in cases {
            g.expect_fault(what, true, build);
        }
        // The device serves the guest again.
        g.post_rx(4);
        let (mut host, hport) = g.host_connect(91);
        g.send(pkt(OP_RW, 91, hport), b"alive");
        assert_eq!(read_exactly(&mut host, 5), b"alive");
    }

    #[test]
    fn rx_buffers_without_room_for_a_header_come_back_empty() {
        let mut g = Guest::start_bare("rb");
        // The RST is queued before any buffer exists.
        g.send(pkt(OP_RW, 12, 22), b"x");
        let q = &mut g.rxq;
        let d = q.writable(64);
        q.write_desc(1, d.addr, HDR_LEN as u32 - 1, VRING_DESC_F_WRITE, 0);
        q.publish(1);
        assert_eq!(q.wait_used(WAIT), Some((1, 0)));
        q.write_desc(2, d.addr, 64, 0, 0);
        q.publish(2);
        assert_eq!(q.wait_used(WAIT), Some((2, 0)));
        // The RST still waits for a usable buffer.
        g.post_rx(1);
        let (rst, _) = g.recv();
        assert_eq!((rst.op, rst.dst_port), (OP_RST, 12));
        assert!(!g.irq.needs_reset());
    }

    // The issue changed the spec: malformed rx chains used to be returned
    // empty (or, when looping, filled); they now need a device reset.
    #[test]
    fn malformed_rx_chains_need_a_reset_and_stop_the_device() {
        let mut g = Guest::start_bare("mr");
        type Build = fn(&mut TestQueue);
        let cases: [(&str, Build); 3] = [
            ("out of guest memory", |q| {
                q.write_desc(0, 1 << 40, 4096, VRING_DESC_F_WRITE, 0);
                q.publish(0);
            }),
            ("a loop of 8-byte buffers", |q| {
                let d = q.writable(64);
                q.write_desc(3, d.addr, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3);
                q.publish(3);
            }),
            ("a next index past the table", |q| {
                let d = q.writable(64);
                q.write_desc(4, d.addr, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 64);
                q.publish(4);
            }),
        ];
        for (what, build) in cases {
            // An RST waits for an rx buffer.
            g.send(pkt(OP_RW, 12, 22), b"x");
            g.expect_fault(what, false, build);
        }
        // The device serves the guest again.
        g.post_rx(1);
        g.send(pkt(OP_RW, 13, 23), b"x");
        let (rst, _) = g.recv();
        assert_eq!((rst.op, rst.dst_port), (OP_RST, 13));
    }

    #[test]
    fn corrupt_rx_avail_index_needs_a_reset_without_spinning() {
        let mut g = Guest::start_bare("ring");
        // An RST waits for an rx buffer while the rx ring claims more
        // chains than it has.
        g.send(pkt(OP_RW, 12, 22), b"x");
        g.rxq.set_avail_idx(65);
        let deadline = std::time::Instant::now() + WAIT;
        while !g.irq.needs_reset() || g.dev.as_ref().unwrap().state.has_worker() {
            assert!(std::time::Instant::now() < deadline, "worker still runs");
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = std::time::Instant::now();
        g.dev.as_mut().unwrap().reset();
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn connection_count_is_bounded() {
        use crate::devices::virtio::vsock::muxer::MAX_CONNECTIONS;
        // Both ends of every stream live in this process.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write a valid rlimit.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
        assert!(
            lim.rlim_cur as usize > 2 * MAX_CONNECTIONS + 200,
            "the hard limit on open files is too low for this test"
        );
        let mut g = Guest::start("lim");
        let listener = UnixListener::bind(format!("{}_7000", g.uds.display())).unwrap();
        // Streams that never send their CONNECT line still count.
        let mut streams: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&g.uds).unwrap())
            .collect();
        let mut extra = UnixStream::connect(&g.uds).unwrap();
        extra.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            extra.read(&mut buf).unwrap(),
            0,
            "connection over the limit kept"
        );
        g.send(pkt(OP_REQUEST, 2000, 7000), &[]);
        let (rst, _) = g.recv();
        assert_eq!((rst.op, rst.dst_port), (OP_RST, 2000));
        // Closing one makes room again.
        drop(streams.pop());
        let deadline = Instant::now() + WAIT;
        loop {
            g.send(pkt(OP_REQUEST, 2001, 7000), &[]);
            let (hdr, _) = g.recv();
            if hdr.op == OP_RESPONSE {
                break;
            }
            assert_eq!(hdr.op, OP_RST);
            assert!(Instant::now() < deadline, "room never freed");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(listener);
    }

    #[test]
    fn reset_and_drop_close_everything() {
        let mut g = Guest::start("rd");
        let (mut host, _) = g.host_connect(60);
        let mut dev = g.dev.take().unwrap();
        dev.reset();
        let mut buf = [0u8; 4];
        assert_eq!(
            host.read(&mut buf).unwrap(),
            0,
            "reset left the stream open"
        );
        // The listener survives a reset.
        let mut again = UnixStream::connect(&g.uds).unwrap();
        again.write_all(b"CONNECT 61\n").unwrap();
        drop(dev);
        assert!(!g.uds.exists(), "socket file left behind");
        again.set_read_timeout(Some(WAIT)).unwrap();
        assert_eq!(again.read(&mut buf).unwrap_or(0), 0);
    }
}
