//! The virtio-net device and its worker thread.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, error, warn};
use seccompiler::BpfProgram;
use virtio_queue::{Queue, QueueOwnedT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, TapError};
use super::{
    MAX_FRAME_LEN, QUEUE_SIZE, RX_INDEX, TX_INDEX, TYPE_NET, VIRTIO_NET_F_MAC, VNET_HDR_LEN,
};
use crate::devices::virtio::device::{
    read_config_bytes, ActivateError, ActivatedQueue, GuestMemory, Interrupt, VirtioDevice,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::devices::virtio::worker::{
    add_used, drain_queue, epoll_on, next_chain, notify_used, reenable_notification, Chain,
    DeviceState, DeviceWorker, RingError, ANY_CHAIN_LEN,
};

/// Where the device's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// An existing (persistent) tap, attached by interface name.
    Name(String),
    /// An inherited fd of an attached tap; the device takes ownership of it.
    Fd(RawFd),
}

/// What a network device is built from.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Device id from the VM configuration, for logs and thread names.
    pub id: String,
    /// The tap that carries the guest's frames.
    pub tap: TapSource,
    /// Guest MAC address; a random locally administered one when absent.
    pub mac: Option<[u8; 6]>,
}

/// Why a network device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap cannot be opened or configured.
    #[error("Cannot open the tap of network device {id}")]
    Tap {
        /// The device's id in the VM configuration.
        id: String,
        /// What went wrong with the tap.
        #[source]
        source: TapError,
    },
    /// The configured MAC has the multicast bit set; holds the device's id.
    #[error("MAC address of network device {0} is a multicast address")]
    MulticastMac(String),
    /// No random bytes for a MAC address.
    #[error("Cannot generate a random MAC address")]
    RandomMac(#[source] io::Error),
}

/// Counters of the device's traffic, shared with its worker.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames written to the guest's rx queue.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames, vnet header excluded.
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap that did not fit the guest's buffer.
    pub rx_dropped: AtomicU64,
    /// Guest frames written to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames, vnet header excluded.
    pub tx_bytes: AtomicU64,
    /// Guest frames the tap rejected, or too short to be frames.
    pub tx_dropped: AtomicU64,
    /// Guest frames whose vnet header asks for an offload the device did
    /// not offer (checksum, segmentation); dropped before the tap.
    pub tx_bad_headers: AtomicU64,
    /// Well-formed descriptor chains lacking the buffers a frame needs
    /// (read-only rx buffers, rx buffers shorter than a header); they are
    /// returned to the guest unused. A malformed chain (a loop, a buffer
    /// outside guest memory) puts the device in DEVICE_NEEDS_RESET instead.
    pub invalid_chains: AtomicU64,
}

fn inc(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// virtio-net over a tap.
pub struct Net {
    id: String,
    tap: Arc<Tap>,
    mac: [u8; 6],
    metrics: Arc<NetMetrics>,
    state: DeviceState,
}

impl Net {
    /// Opens the tap and settles the MAC, so a bad configuration fails
    /// before the guest runs.
    pub fn new(config: NetConfig) -> Result<Net, NetError> {
        let tap = match &config.tap {
            TapSource::Name(name) => Tap::open(name),
            TapSource::Fd(fd) => Tap::from_fd(*fd),
        }
        .map_err(|source| NetError::Tap {
            id: config.id.clone(),
            source,
        })?;
        let mac = match config.mac {
            Some(mac) if mac[0] & 1 != 0 => return Err(NetError::MulticastMac(config.id)),
            Some(mac) => mac,
            None => random_mac().map_err(NetError::RandomMac)?,
        };
        Ok(Net {
            id: config.id,
            tap: Arc::new(tap),
            mac,
            metrics: Arc::new(NetMetrics::default()),
            state: DeviceState::default(),
        })
    }

    /// The device's id in the VM configuration.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The MAC address the guest sees.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The traffic counters, shared with the worker.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }
}

/// A random unicast, locally administered MAC address.
fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        return Err(io::Error::last_os_error());
    }
    mac[0] = (mac[0] & !1) | 2;
    Ok(mac)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_NET_F_MAC
    }

    fn set_acked_features(&mut self, features: u64) {
        self.state.ack_features(self.avail_features(), features);
    }

    fn set_seccomp_filter(&mut self, filter: BpfProgram) {
        self.state.set_seccomp_filter(filter);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let [rx, tx] = self.state.begin_activation(queues)?;
        let worker = Worker::new(
            mem,
            interrupt.clone(),
            rx,
            tx,
            self.tap.clone(),
            self.metrics.clone(),
        )
        .map_err(ActivateError::Backend)?;
        self.state
            .start_worker(format!("net-{}", self.id), interrupt, worker)
    }

    fn reset(&mut self) {
        self.state.reset();
    }
}

const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_TAP: u64 = 3;

struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    rx: Queue,
    rx_evt: EventFd,
    tx: Queue,
    tx_evt: EventFd,
    tap: Arc<Tap>,
    epoll: Epoll,
    metrics: Arc<NetMetrics>,
    /// A frame read from the tap, waiting for a guest rx buffer.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    tx_frame: Vec<u8>,
    /// Whether the tap is in the epoll set: it leaves it while the guest has
    /// no rx buffers, so a readable tap does not wake us in a loop.
    tap_polled: bool,
    /// Events since the last [`DeviceWorker::process`] call.
    rx_work: bool,
    tx_work: bool,
}

impl Worker {
    fn new(
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        rx: ActivatedQueue,
        tx: ActivatedQueue,
        tap: Arc<Tap>,
        metrics: Arc<NetMetrics>,
    ) -> io::Result<Self> {
        let epoll = epoll_on(&[(&rx.notify, TOKEN_RX), (&tx.notify, TOKEN_TX)])?;
        let mut worker = Worker {
            mem,
            interrupt,
            rx: rx.queue,
            rx_evt: rx.notify,
            tx: tx.queue,
            tx_evt: tx.notify,
            tap,
            epoll,
            metrics,
            rx_frame: vec![0u8; MAX_FRAME_LEN],
            rx_pending: None,
            tx_frame: vec![0u8; MAX_FRAME_LEN],
            tap_polled: false,
            rx_work: false,
            tx_work: false,
        };
        worker.set_tap_polled(true)?;
        Ok(worker)
    }

    fn set_tap_polled(&mut self, polled: bool) -> io::Result<()> {
        if polled == self.tap_polled {
            return Ok(());
        }
        let op = if polled {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.epoll.ctl(
            op,
            self.tap.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TAP),
        )?;
        self.tap_polled = polled;
        Ok(())
    }

    fn signal(&mut self, which: usize) {
        let queue = if which == RX_INDEX {
            &mut self.rx
        } else {
            &mut self.tx
        };
        let what = format_args!("net {}", self.tap.name());
        notify_used(queue, &self.mem, &self.interrupt, what);
    }

    /// Moves frames from the tap into guest rx buffers until one side runs dry.
    fn process_rx(&mut self) -> Result<(), RingError> {
        // Chains borrow the memory while `self` changes; the clone is a few
        // reference counts.
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) if len >= VNET_HDR_LEN => {
                        self.rx_pending = Some(len);
                        len
                    }
                    Ok(_) => {
                        inc(&self.metrics.rx_dropped, 1);
                        continue;
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        if err.kind() != io::ErrorKind::WouldBlock {
                            warn!("net {}: tap read failed: {err}", self.tap.name());
                        }
                        if let Err(err) = self.set_tap_polled(true) {
                            error!("net {}: cannot poll the tap: {err}", self.tap.name());
                        }
                        break;
                    }
                },
            };
            // Rx buffers of any size are fine; a frame too big for them is
            // dropped.
            match next_chain(&mut self.rx, &mem, ANY_CHAIN_LEN)? {
                Some(chain) => used |= self.deliver(&mem, chain, len)?,
                None => {
                    // New buffers may have raced with re-enabling the kick.
                    if reenable_notification(&mut self.rx, &mem)? {
                        continue;
                    }
                    // Park the frame; the guest's rx kick resumes us.
                    if let Err(err) = self.set_tap_polled(false) {
                        error!(
                            "net {}: cannot stop polling the tap: {err}",
                            self.tap.name()
                        );
                    }
                    break;
                }
            }
        }
        if used {
            self.signal(RX_INDEX);
        }
        Ok(())
    }

    /// Writes the pending frame of `len` bytes into `chain`. Returns whether
    /// the chain went to the used ring.
    fn deliver(
        &mut self,
        mem: &GuestMemory,
        chain: Chain<'_>,
        len: usize,
    ) -> Result<bool, RingError> {
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(writer) if writer.available_bytes() >= VNET_HDR_LEN => writer,
            _ => {
                // Well formed but useless for any frame (read-only, or
                // shorter than a header): hand it back empty, keep the frame.
                inc(&self.metrics.invalid_chains, 1);
                add_used(&mut self.rx, mem, head, 0)?;
                return Ok(true);
            }
        };
        if writer.available_bytes() < len {
            // Too big for the guest's buffers: drop the frame, but keep the
            // chain for the next one.
            inc(&self.metrics.rx_dropped, 1);
            self.rx_pending = None;
            self.rx.go_to_previous_position();
            return Ok(false);
        }
        // Without MRG_RXBUF every frame takes exactly one buffer; the tap
        // leaves `num_buffers` untouched.
        self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        self.rx_pending = None;
        if writer.write_all(&self.rx_frame[..len]).is_err() {
            // The guest rewrote the chain after it was checked.
            inc(&self.metrics.invalid_chains, 1);
            add_used(&mut self.rx, mem, head, 0)?;
            return Ok(true);
        }
        add_used(&mut self.rx, mem, head, len as u32)?;
        inc(&self.metrics.rx_frames, 1);
        inc(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Ok(true)
    }

    /// Sends every frame the guest queued to the tap.
    fn process_tx(&mut self) -> Result<(), RingError> {
        let mem = self.mem.clone();
        // Without offloads no frame is longer than MAX_FRAME_LEN: a longer
        // chain is malformed, a shorter one is dropped on its own.
        let drained = drain_queue(&mut self.tx, &mem, MAX_FRAME_LEN as u32, |chain| {
            send_frame(&self.tap, &self.metrics, &mut self.tx_frame, &mem, chain);
            // The device writes nothing into tx buffers.
            Some(0)
        })?;
        if drained.used {
            self.signal(TX_INDEX);
        }
        Ok(())
    }
}

impl DeviceWorker for Worker {
    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn handle_event(&mut self, token: u64, events: EventSet) -> Result<(), RingError> {
        match token {
            TOKEN_RX => {
                let _ = self.rx_evt.read();
                self.rx_work = true;
            }
            TOKEN_TX => {
                let _ = self.tx_evt.read();
                self.tx_work = true;
            }
            TOKEN_TAP if events.contains(EventSet::ERROR) => {
                // The tap was deleted under us: nothing more will come, and
                // its error would wake us forever.
                error!("net {}: tap failed, no more rx", self.tap.name());
                let _ = self.set_tap_polled(false);
            }
            TOKEN_TAP => self.rx_work = true,
            _ => {}
        }
        Ok(())
    }

    fn process(&mut self) -> Result<(), RingError> {
        if std::mem::take(&mut self.tx_work) {
            self.process_tx()?;
        }
        if std::mem::take(&mut self.rx_work) {
            self.process_rx()?;
        }
        Ok(())
    }
}

/// Sends the frame in `chain` to the tap, through `frame` (of
/// [`MAX_FRAME_LEN`] bytes).
pub fn send_frame(
    tap: &Tap,
    metrics: &NetMetrics,
    frame: &mut [u8],
    mem: &GuestMemory,
    chain: Chain<'_>,
) {
    let Ok(mut reader) = chain.reader(mem) else {
        inc(&metrics.invalid_chains, 1);
        return;
    };
    let len = reader.available_bytes();
    if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
        inc(&metrics.tx_dropped, 1);
        return;
    }
    if reader.read_exact(&mut frame[..len]).is_err() {
        inc(&metrics.invalid_chains, 1);
        return;
    }
    if !sanitize_tx_header(&mut frame[..VNET_HDR_LEN]) {
        inc(&metrics.tx_bad_headers, 1);
        return;
    }
    match tap.write_frame(&frame[..len]) {
        Ok(_) => {
            inc(&metrics.tx_frames, 1);
            inc(&metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
        }
        Err(err) => {
            // A full tap queue or a header the kernel rejects: the frame
            // is lost, as on a real wire.
            inc(&metrics.tx_dropped, 1);
            debug!("net {}: tap write failed: {err}", tap.name());
        }
    }
}

/// Offsets in `virtio_net_hdr` of the fields that ask for an offload.
const HDR_FLAGS: usize = 0;
const HDR_GSO_TYPE: usize = 1;

/// Checks a guest's tx header before it reaches the host's checksum and
/// segmentation paths. The device offers neither offload, so a header that
/// asks for one (any flag, such as NEEDS_CSUM, or a GSO type) is refused;
/// the other fields (hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers) then mean nothing and are zeroed, so the tap sees a plain
/// header whatever the guest wrote. Returns whether the frame may go.
fn sanitize_tx_header(hdr: &mut [u8]) -> bool {
    if hdr[HDR_FLAGS] != 0 || hdr[HDR_GSO_TYPE] != 0 {
        return false;
    }
    hdr.fill(0);
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::net::test_utils::{
        create_tap, in_netns, test_frame, thread_ticks, PacketSocket,
    };
    use crate::devices::virtio::test_driver::{
        guest_memory, interrupt, wait_needs_reset, Desc, TestQueue, VRING_DESC_F_NEXT,
        VRING_DESC_F_WRITE,
    };

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    const WAIT: Duration = Duration::from_secs(5);

    struct Harness {
        net: Net,
        rxq: TestQueue,
        txq: TestQueue,
        sock: PacketSocket,
        irq: Arc<Interrupt>,
    }

    /// A tap `name` in the current namespace with an activated device on it.
    fn start(name: &str, id: &str) -> Harness {
        create_tap(name);
        let mut net = Net::new(NetConfig {
            id: id.to_string(),
            tap: TapSource::Name(name.to_string()),
            mac: Some(MAC),
        })
        .unwrap();
        let mem = guest_memory();
        let rxq = TestQueue::new(&mem, 0, 16);
        let txq = TestQueue::new(&mem, 1, 16);
        net.set_acked_features(net.avail_features());
        let (irq, _) = interrupt();
        net.activate(
            mem,
            irq.clone(),
            vec![rxq.activated(true), txq.activated(true)],
        )
        .unwrap();
        let sock = PacketSocket::bind(name);
        Harness {
            net,
            rxq,
            txq,
            sock,
            irq,
        }
    }

    fn vnet_hdr() -> [u8; VNET_HDR_LEN] {
        [0u8; VNET_HDR_LEN]
    }

    impl Harness {
        /// Activates the device on fresh rings, as a driver does after a
        /// reset.
        fn reactivate(&mut self) {
            let mem = guest_memory();
            self.rxq = TestQueue::new(&mem, 0, 16);
            self.txq = TestQueue::new(&mem, 1, 16);
            let (irq, _) = interrupt();
            self.net.set_acked_features(self.net.avail_features());
            self.net
                .activate(
                    mem,
                    irq.clone(),
                    vec![self.rxq.activated(true), self.txq.activated(true)],
                )
                .unwrap();
            self.irq = irq;
        }

        fn send_from_guest(&mut self, descs: &[Desc]) {
            let head = self.txq.add_chain(descs);
            assert_eq!(self.txq.wait_used(WAIT), Some((head, 0)));
        }

        /// Sends a test frame (`len` payload bytes from `seed`) from the guest,
        /// header and frame in separate descriptors; waits for it on the tap.
        fn tx_reaches_the_host(&mut self, seed: u8, len: usize) {
            let frame = test_frame([0xff; 6], seed, len);
            let hdr = self.txq.readable(&vnet_hdr());
            let body = self.txq.readable(&frame);
            self.send_from_guest(&[hdr, body]);
            assert_eq!(self.sock.recv_test_frame(WAIT).unwrap(), frame);
        }

        /// Waits for a frame of the test ethertype in an rx buffer, skipping
        /// (and re-posting) anything else the host stack sent.
        fn recv_in_guest(&mut self, buf: Desc) -> Vec<u8> {
            loop {
                let (id, len) = self.rxq.wait_used(WAIT).expect("no rx frame");
                let _ = id;
                let data = self.rxq.read(buf.addr, len as usize);
                if data.len() >= VNET_HDR_LEN + 14 && data[VNET_HDR_LEN + 12..][..2] == [0x88, 0xb5]
                {
                    return data;
                }
                self.rxq.add_chain(&[buf]);
            }
        }
    }

    #[test]
    fn config_space_and_features() {
        in_netns(|| {
            create_tap("mcfg0");
            let net = Net::new(NetConfig {
                id: "n".into(),
                tap: TapSource::Name("mcfg0".into()),
                mac: Some(MAC),
            })
            .unwrap();
            assert_eq!(net.device_type(), 1);
            assert_eq!(net.queue_max_sizes().len(), 2);
            let f = net.avail_features();
            assert_ne!(f & VIRTIO_F_VERSION_1, 0);
            assert_ne!(f & VIRTIO_NET_F_MAC, 0);
            assert_ne!(f & VIRTIO_F_RING_EVENT_IDX, 0);
            let mut cfg = [0xffu8; 8];
            net.read_config(0, &mut cfg);
            assert_eq!(cfg, [0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0, 0]);
            let mut cfg = [0xffu8; 2];
            net.read_config(4, &mut cfg);
            assert_eq!(cfg, [0x44, 0x55]);
            net.read_config(100, &mut cfg);
            assert_eq!(cfg, [0, 0]);
            net.read_config(u64::MAX, &mut cfg);
            assert_eq!(cfg, [0, 0]);
            drop(net);

            // Random MAC: unicast, locally administered.
            let net = Net::new(NetConfig {
                id: "n".into(),
                tap: TapSource::Name("mcfg0".into()),
                mac: None,
            })
            .unwrap();
            assert_eq!(net.mac()[0] & 3, 2);
            drop(net);

            let err = Net::new(NetConfig {
                id: "n".into(),
                tap: TapSource::Name("mcfg0".into()),
                mac: Some([1, 0, 0x5e, 0, 0, 1]),
            });
            assert!(matches!(err, Err(NetError::MulticastMac(_))));
        });
    }

    #[test]
    fn missing_tap_is_an_error() {
        in_netns(|| {
            let err = Net::new(NetConfig {
                id: "eth0".into(),
                tap: TapSource::Name("nosuchtap".into()),
                mac: None,
            })
            .err()
            .unwrap();
            assert!(matches!(
                err,
                NetError::Tap {
                    source: TapError::NotFound(_),
                    ..
                }
            ));
            assert_eq!(
                err.to_string(),
                "Cannot open the tap of network device eth0"
            );
        });
    }

    #[test]
    fn wrong_queue_count() {
        in_netns(|| {
            create_tap("mq0");
            let mut net = Net::new(NetConfig {
                id: "n".into(),
                tap: TapSource::Name("mq0".into()),
                mac: None,
            })
            .unwrap();
            let mem = guest_memory();
            let q = TestQueue::new(&mem, 0, 16);
            let (irq, _) = interrupt();
            assert!(matches!(
                net.activate(mem, irq, vec![q.activated(false)]),
                Err(ActivateError::QueueCount {
                    expected: 2,
                    got: 1
                })
            ));
        });
    }

    #[test]
    fn tx_reaches_the_tap() {
        in_netns(|| {
            let mut h = start("mtx0", "tx");
            // Header and frame in separate descriptors, the frame split too.
            let frame = test_frame([0xff; 6], 7, 300);
            let hdr = h.txq.readable(&vnet_hdr());
            let a = h.txq.readable(&frame[..100]);
            let b = h.txq.readable(&frame[100..]);
            h.send_from_guest(&[hdr, a, b]);
            assert_eq!(h.sock.recv_test_frame(WAIT).unwrap(), frame);
            // Header and frame in one descriptor.
            let frame = test_frame([0xff; 6], 9, 60);
            let mut both = vnet_hdr().to_vec();
            both.extend_from_slice(&frame);
            let d = h.txq.readable(&both);
            h.send_from_guest(&[d]);
            assert_eq!(h.sock.recv_test_frame(WAIT).unwrap(), frame);
            assert_eq!(h.net.metrics().tx_frames.load(Ordering::Relaxed), 2);
            assert_eq!(h.net.metrics().tx_bytes.load(Ordering::Relaxed), 314 + 74);
        });
    }

    #[test]
    fn tx_headers_asking_for_offloads_are_refused() {
        // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
        // num_buffers, all little-endian.
        fn header(flags: u8, gso: u8, csum_start: u16, csum_offset: u16) -> Vec<u8> {
            let mut h = vec![flags, gso];
            for v in [54u16, 1400, csum_start, csum_offset, 0] {
                h.extend_from_slice(&v.to_le_bytes());
            }
            h
        }
        let mut plain = header(0, 0, 999, 77);
        assert!(sanitize_tx_header(&mut plain));
        assert_eq!(plain, [0; VNET_HDR_LEN]);
        in_netns(|| {
            let mut h = start("mhdr0", "hdr");
            // NEEDS_CSUM with offsets inside the frame, then a TCPv4 GSO
            // header, then a header with garbage beside zero flags and type.
            let cases = [
                (header(1, 0, 14, 6), false),
                (header(0, 1, 0, 0), false),
                (header(2, 0, 0, 0), false),
                (header(0, 0, 60_000, 60_000), true),
            ];
            for (i, (hdr, goes)) in cases.into_iter().enumerate() {
                let frame = test_frame([0xff; 6], i as u8, 80);
                let hdr = h.txq.readable(&hdr);
                let body = h.txq.readable(&frame);
                h.send_from_guest(&[hdr, body]);
                let seen = h.sock.recv_test_frame(Duration::from_millis(300));
                assert_eq!(seen.is_some(), goes, "case {i}");
            }
            let m = h.net.metrics();
            assert_eq!(m.tx_bad_headers.load(Ordering::Relaxed), 3);
            assert_eq!(m.tx_frames.load(Ordering::Relaxed), 1);
        });
    }

    #[test]
    fn rx_reaches_the_guest() {
        in_netns(|| {
            let mut h = start("mrx0", "rx");
            let buf = h.rxq.writable(2048);
            h.rxq.add_chain(&[buf]);
            let frame = test_frame(MAC, 3, 500);
            h.sock.send(&frame);
            let data = h.recv_in_guest(buf);
            assert_eq!(data.len(), VNET_HDR_LEN + frame.len());
            // num_buffers is 1, the rest of the header zero (no offloads).
            assert_eq!(&data[10..12], &[1, 0]);
            assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);

            // A chain of several writable buffers, after a readable one the
            // device must skip.
            let ro = h.rxq.readable(&[0xaa; 32]);
            let w1 = h.rxq.writable(10);
            let w2 = h.rxq.writable(1000);
            let head = h.rxq.add_chain(&[ro, w1, w2]);
            let frame = test_frame(MAC, 5, 700);
            h.sock.send(&frame);
            let (id, len) = h.rxq.wait_used(WAIT).unwrap();
            assert_eq!((id, len as usize), (head, VNET_HDR_LEN + frame.len()));
            let mut data = h.rxq.read(w1.addr, 10);
            data.extend(h.rxq.read(w2.addr, len as usize - 10));
            assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);
        });
    }

    #[test]
    fn rx_waits_for_buffers_without_spinning() {
        in_netns(|| {
            let mut h = start("mwait0", "wait");
            // Frames arrive while the guest has no buffers.
            let frames: Vec<_> = (0..3).map(|i| test_frame(MAC, i, 100)).collect();
            for f in &frames {
                h.sock.send(f);
            }
            std::thread::sleep(Duration::from_millis(100));
            let before = thread_ticks("net-wait").expect("worker thread");
            std::thread::sleep(Duration::from_millis(500));
            let after = thread_ticks("net-wait").unwrap();
            // A busy loop would burn ~50 ticks here.
            assert!(after - before <= 5, "worker spun: {} ticks", after - before);
            assert_eq!(h.rxq.next_used(), None);
            // Buffers arrive one at a time; frames follow in order.
            for f in &frames {
                let buf = h.rxq.writable(2048);
                h.rxq.add_chain(&[buf]);
                let data = h.recv_in_guest(buf);
                assert_eq!(&data[VNET_HDR_LEN..], &f[..]);
            }
            assert_eq!(h.net.metrics().rx_frames.load(Ordering::Relaxed), 3);
        });
    }

    #[test]
    fn corrupt_rx_avail_index_needs_a_reset_without_spinning() {
        in_netns(|| {
            let mut h = start("mring0", "ring");
            // A frame waits for a buffer while the rx ring claims more
            // chains than it has.
            h.sock.send(&test_frame(MAC, 1, 100));
            h.rxq.set_avail_idx(QUEUE_SIZE + 1);
            let deadline = std::time::Instant::now() + WAIT;
            while !h.irq.needs_reset() || h.net.state.has_worker() {
                assert!(std::time::Instant::now() < deadline, "worker still runs");
                std::thread::sleep(Duration::from_millis(5));
            }
            let t = std::time::Instant::now();
            h.net.reset();
            assert!(t.elapsed() < Duration::from_secs(1));
        });
    }

    #[test]
    fn oversized_rx_frame_is_dropped_and_buffer_reused() {
        in_netns(|| {
            let mut h = start("mbig0", "big");
            let small = h.rxq.writable(200);
            h.rxq.add_chain(&[small]);
            h.sock.send(&test_frame(MAC, 1, 1000));
            // The frame is dropped, the buffer stays with the device.
            let deadline = std::time::Instant::now() + WAIT;
            while h.net.metrics().rx_dropped.load(Ordering::Relaxed) == 0 {
                assert!(std::time::Instant::now() < deadline, "frame not dropped");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(h.rxq.next_used(), None);
            let frame = test_frame(MAC, 2, 100);
            h.sock.send(&frame);
            let data = h.recv_in_guest(small);
            assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);
        });
    }

    /// Publishes a chain that `build` writes on the tx (`tx`) or rx queue,
    /// checks that it puts the device in DEVICE_NEEDS_RESET without being
    /// returned, then resets the device and brings it back on fresh rings.
    fn expect_fault(h: &mut Harness, what: &str, tx: bool, build: impl FnOnce(&mut TestQueue)) {
        build(if tx { &mut h.txq } else { &mut h.rxq });
        wait_needs_reset(&h.irq, WAIT, || !h.net.state.has_worker());
        assert_eq!(h.txq.next_used(), None, "{what}: tx chain returned");
        assert_eq!(h.rxq.next_used(), None, "{what}: rx chain returned");
        let t = std::time::Instant::now();
        h.net.reset();
        assert!(t.elapsed() < Duration::from_secs(1), "{what}");
        h.reactivate();
    }

    // The issue changed the spec: malformed tx chains used to be returned
    // empty; they now need a device reset.
    #[test]
    fn malformed_tx_chains_need_a_reset_and_stop_the_device() {
        in_netns(|| {
            let mut h = start("mbad0", "badtx");
            expect_fault(&mut h, "out of guest memory", true, |q| {
                q.write_desc(0, 1 << 40, 100, 0, 0);
                q.publish(0);
            });
            expect_fault(&mut h, "across the end of memory", true, |q| {
                q.write_desc(0, (32 << 20) - 8, 100, 0, 0);
                q.publish(0);
            });
            expect_fault(&mut h, "a loop", true, |q| {
                let d = q.readable(&[0u8; 64]);
                q.write_desc(1, d.addr, 64, VRING_DESC_F_NEXT, 2);
                q.write_desc(2, d.addr, 64, VRING_DESC_F_NEXT, 1);
                q.publish(1);
            });
            expect_fault(&mut h, "a next index past the table", true, |q| {
                let d = q.readable(&[0u8; 64]);
                q.write_desc(3, d.addr, 64, VRING_DESC_F_NEXT, 999);
                q.publish(3);
            });
            expect_fault(&mut h, "larger than any frame", true, |q| {
                let big = q.alloc(MAX_FRAME_LEN as u32 + 100);
                q.write_desc(7, big, MAX_FRAME_LEN as u32 + 100, 0, 0);
                q.publish(7);
            });
            expect_fault(&mut h, "a head past the queue", true, |q| q.publish(200));
            // After each reset a good frame goes out.
            h.tx_reaches_the_host(42, 80);
            assert!(!h.irq.needs_reset());
        });
    }

    #[test]
    fn well_formed_chains_without_a_frame_are_dropped() {
        in_netns(|| {
            let mut h = start("mdrop0", "droptx");
            let q = &mut h.txq;
            let d = q.readable(&[0u8; 64]);
            // Zero-length descriptors only.
            q.write_desc(4, d.addr, 0, VRING_DESC_F_NEXT, 5);
            q.write_desc(5, d.addr, 0, 0, 0);
            q.publish(4);
            assert_eq!(q.wait_used(WAIT), Some((4, 0)));
            // Shorter than a vnet header.
            q.write_desc(6, d.addr, 5, 0, 0);
            q.publish(6);
            assert_eq!(q.wait_used(WAIT), Some((6, 0)));
            // Device-writable only: nothing to send.
            q.write_desc(8, d.addr, 64, VRING_DESC_F_WRITE, 0);
            q.publish(8);
            assert_eq!(q.wait_used(WAIT), Some((8, 0)));
            assert!(h.net.metrics().tx_dropped.load(Ordering::Relaxed) >= 3);
            // A good frame still goes out.
            h.tx_reaches_the_host(43, 80);
            assert!(!h.irq.needs_reset());
        });
    }

    // The issue changed the spec: malformed rx chains used to be returned
    // empty (or, when looping, filled); they now need a device reset.
    #[test]
    fn malformed_rx_chains_need_a_reset_and_stop_the_device() {
        in_netns(|| {
            let mut h = start("mbadrx0", "badrx");
            type Build = fn(&mut TestQueue);
            let cases: [(&str, Build); 3] = [
                ("writable buffer outside memory", |q| {
                    q.write_desc(0, 1 << 40, 2048, VRING_DESC_F_WRITE, 0);
                    q.publish(0);
                }),
                ("a looping writable chain", |q| {
                    let d = q.writable(64);
                    q.write_desc(3, d.addr, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3);
                    q.publish(3);
                }),
                ("a next index past the table", |q| {
                    let d = q.writable(64);
                    q.write_desc(4, d.addr, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 300);
                    q.publish(4);
                }),
            ];
            for (what, build) in cases {
                // A frame waits for the buffer.
                h.sock.send(&test_frame(MAC, 8, 64));
                expect_fault(&mut h, what, false, build);
            }
            // Frames reach the guest again.
            let buf = h.rxq.writable(2048);
            h.rxq.add_chain(&[buf]);
            let frame = test_frame(MAC, 9, 64);
            h.sock.send(&frame);
            let data = h.recv_in_guest(buf);
            assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);
        });
    }

    #[test]
    fn rx_buffers_without_room_for_a_frame_come_back_empty() {
        in_netns(|| {
            let mut h = start("mshortrx0", "shortrx");
            let frame = test_frame(MAC, 8, 64);
            h.sock.send(&frame);
            let q = &mut h.rxq;
            // Read-only buffer: nowhere to write.
            let d = q.readable(&[0u8; 2048]);
            q.write_desc(1, d.addr, 2048, 0, 0);
            q.publish(1);
            assert_eq!(q.wait_used(WAIT), Some((1, 0)));
            // Too small for even the header.
            q.write_desc(2, d.addr, 4, VRING_DESC_F_WRITE, 0);
            q.publish(2);
            assert_eq!(q.wait_used(WAIT), Some((2, 0)));
            assert!(h.net.metrics().invalid_chains.load(Ordering::Relaxed) >= 2);
            // The frame that waited through all this arrives intact.
            let buf = h.rxq.writable(2048);
            h.rxq.add_chain(&[buf]);
            let data = h.recv_in_guest(buf);
            assert_eq!(&data[VNET_HDR_LEN..], &frame[..]);
            assert!(!h.irq.needs_reset());
        });
    }

    #[test]
    fn reset_joins_the_worker_and_reactivates() {
        in_netns(|| {
            let mut h = start("mreset0", "reset");
            assert!(thread_ticks("net-reset").is_some());
            h.net.reset();
            assert!(thread_ticks("net-reset").is_none(), "worker still running");
            let mem = guest_memory();
            h.rxq = TestQueue::new(&mem, 0, 16);
            h.txq = TestQueue::new(&mem, 1, 16);
            let (irq, irq_watch) = interrupt();
            h.net
                .set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
            h.net
                .activate(
                    mem,
                    irq,
                    vec![h.rxq.activated(false), h.txq.activated(false)],
                )
                .unwrap();
            h.tx_reaches_the_host(1, 60);
            // Without EVENT_IDX every used buffer interrupts.
            assert!(irq_watch.read().unwrap() >= 1);
            drop(h);
            assert!(
                thread_ticks("net-reset").is_none(),
                "worker outlived the device"
            );
        });
    }
}
