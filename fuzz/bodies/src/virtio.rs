//! Virtqueue handling of the virtio devices: every ring, descriptor and
//! buffer byte comes from the input, and the device code serves the queue
//! as its worker does on a kick.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use moat_vmm::devices::virtio::block::request::{self, Backing};
use moat_vmm::devices::virtio::net::device::{send_frame, NetMetrics};
use moat_vmm::devices::virtio::net::tap::{IfReq, Tap, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR};
use moat_vmm::devices::virtio::net::MAX_FRAME_LEN;
use moat_vmm::devices::virtio::rng::device::fill_chain;
use moat_vmm::devices::virtio::rng::MAX_BYTES_PER_REQUEST;
use moat_vmm::devices::virtio::vsock::device::{handle_tx_chain, MAX_TX_CHAIN_LEN};
use moat_vmm::devices::virtio::vsock::muxer::{Endpoint, Muxer};
use moat_vmm::devices::virtio::vsock::packet::{HDR_LEN, MAX_PAYLOAD};
use moat_vmm::devices::virtio::worker::{drain_queue, ANY_CHAIN_LEN};
use moat_vmm::devices::virtio::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;

use crate::Input;

/// Guest memory: the input's bytes from address 0 on, then zeroes.
/// Descriptors may point past its end, as a hostile guest's may.
const MEM_SIZE: usize = 64 << 10;
/// Sectors of the block device's backing file.
const DISK_SECTORS: u64 = 64;

/// Guest memory holding `image` at address 0.
fn memory(image: &[u8]) -> Option<GuestMemory> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let image = &image[..image.len().min(MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0)).ok()?;
    Some(mem)
}

/// Input bytes that configure one queue: see [`queue`].
const QUEUE_HEADER: usize = 9;

/// A queue as the transport would hand it over, configured from
/// [`QUEUE_HEADER`] input bytes: size, flags (bit 0: event index), and the
/// three ring addresses in 8-byte units. `None` where the transport would
/// have refused to activate it.
fn queue(header: &[u8], mem: &GuestMemory, max_size: u16) -> Option<Queue> {
    let mut input = Input::new(header);
    let size = input.u16();
    let flags = input.u8();
    let mut addr = || u64::from(input.u16()) * 8 % MEM_SIZE as u64;
    let (desc, avail, used) = (addr(), addr(), addr());
    let mut q = Queue::new(max_size).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(avail)).ok()?;
    q.try_set_used_ring_address(GuestAddress(used)).ok()?;
    q.set_event_idx(flags & 1 != 0);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

/// virtio-blk: requests against a small in-memory disk, read-only if the
/// header's first byte says so; then the queue is served again, as after
/// a second kick.
pub fn block(data: &[u8]) {
    let mut input = Input::new(data);
    let read_only = input.u8() & 1 != 0;
    let Some(file) = disk() else { return };
    let backing = Backing {
        file: Some(Arc::new(file)),
        sectors: DISK_SECTORS,
        read_only,
    };
    let serial = *b"fuzz-serial-00000000";
    let header = input.bytes(QUEUE_HEADER);
    let Some(mem) = memory(input.rest()) else {
        return;
    };
    let Some(mut q) = queue(header, &mem, moat_vmm::devices::virtio::block::QUEUE_SIZE) else {
        return;
    };
    // An error puts the device in DEVICE_NEEDS_RESET: it serves no more.
    for _ in 0..2 {
        let served = drain_queue(&mut q, &mem, ANY_CHAIN_LEN, |chain| {
            Some(request::process(chain, &mem, &backing, &serial))
        });
        if served.is_err() {
            break;
        }
    }
}

/// An anonymous file of [`DISK_SECTORS`] sectors.
fn disk() -> Option<File> {
    // SAFETY: the name is a NUL-terminated literal; the result is checked.
    let fd = unsafe { libc::memfd_create(c"moat-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(DISK_SECTORS * 512).ok()?;
    Some(file)
}

/// virtio-rng: random bytes into whatever the chains offer.
pub fn rng(data: &[u8]) {
    let mut input = Input::new(data);
    let header = input.bytes(QUEUE_HEADER);
    let Some(mem) = memory(input.rest()) else {
        return;
    };
    let Some(mut q) = queue(header, &mem, moat_vmm::devices::virtio::rng::QUEUE_SIZE) else {
        return;
    };
    let mut buf = vec![0u8; MAX_BYTES_PER_REQUEST];
    for _ in 0..2 {
        let served = drain_queue(&mut q, &mem, ANY_CHAIN_LEN, |chain| {
            Some(fill_chain(&mut buf, &mem, chain))
        });
        if served.is_err() {
            break;
        }
    }
}

/// virtio-vsock: guest packets on the tx queue (to a host side with no
/// listener, so every connection request is refused), then the muxer's
/// answers into the rx queue's buffers.
pub fn vsock(data: &[u8]) {
    let mut input = Input::new(data);
    let header = input.bytes(2 * QUEUE_HEADER);
    let Some(mem) = memory(input.rest()) else {
        return;
    };
    let size = moat_vmm::devices::virtio::vsock::QUEUE_SIZE;
    let (Some(mut tx), Some(mut rx)) = (
        queue(&header[..QUEUE_HEADER.min(header.len())], &mem, size),
        queue(header.get(QUEUE_HEADER..).unwrap_or(&[]), &mem, size),
    ) else {
        return;
    };
    let Some(endpoint) = vsock_endpoint() else {
        return;
    };
    let Ok(epoll) = Epoll::new() else { return };
    let Ok(mut muxer) = Muxer::new(endpoint.clone(), epoll) else {
        return;
    };
    let mut payload = vec![0u8; MAX_PAYLOAD];
    let sent = drain_queue(&mut tx, &mem, MAX_TX_CHAIN_LEN, |chain| {
        if muxer.rx_backlog_full() {
            return None;
        }
        handle_tx_chain(&mut muxer, &mut payload, &mem, chain);
        Some(0)
    });
    if sent.is_err() {
        return;
    }
    let _ = drain_queue(&mut rx, &mem, ANY_CHAIN_LEN, |chain| {
        match chain.writer(&mem) {
            Ok(mut w) if w.available_bytes() >= HDR_LEN => muxer.fill_rx(&mut w).map(|n| n as u32),
            _ => Some(0),
        }
    });
}

/// The host side of the vsock device, bound once per process in a private
/// directory: guest connections go to `<path>_<port>`, which never exist.
fn vsock_endpoint() -> Option<&'static Endpoint> {
    static ENDPOINT: OnceLock<Option<Endpoint>> = OnceLock::new();
    ENDPOINT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("moat-fuzz-vsock-{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok()?;
            let uds_path: PathBuf = dir.join("v.sock");
            let _ = std::fs::remove_file(&uds_path);
            let listener = std::os::unix::net::UnixListener::bind(&uds_path).ok()?;
            listener.set_nonblocking(true).ok()?;
            Some(Endpoint {
                guest_cid: 3,
                uds_path,
                listener: Arc::new(listener),
                connect_timeout: std::time::Duration::from_millis(10),
            })
        })
        .as_ref()
}

/// virtio-net tx: guest frames to a tap that is down, in a network
/// namespace of its own, so the host's network stack never sees them.
pub fn net(data: &[u8]) {
    let Some(tap) = tap() else { return };
    let mut input = Input::new(data);
    let header = input.bytes(QUEUE_HEADER);
    let Some(mem) = memory(input.rest()) else {
        return;
    };
    let Some(mut q) = queue(header, &mem, moat_vmm::devices::virtio::net::QUEUE_SIZE) else {
        return;
    };
    let metrics = NetMetrics::default();
    let mut frame = vec![0u8; MAX_FRAME_LEN];
    let _ = drain_queue(&mut q, &mem, MAX_FRAME_LEN as u32, |chain| {
        send_frame(tap, &metrics, &mut frame, &mem, chain);
        Some(0)
    });
}

/// A tap created in a network namespace of its own (by a thread that then
/// ends, leaving the tap reachable only through this fd). `None` without
/// the privileges for it.
fn tap() -> Option<&'static Tap> {
    static TAP: OnceLock<Option<Tap>> = OnceLock::new();
    TAP.get_or_init(|| {
        let fd = std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .ok()?;
            let mut req = IfReq::new("fuzz0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
            // SAFETY: a tun fd and an ifreq the kernel reads and updates.
            let ret = unsafe {
                vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req)
            };
            (ret >= 0).then(|| file.into_raw_fd())
        })
        .join()
        .ok()??;
        Tap::from_fd(fd).ok()
    })
    .as_ref()
}

/// Whether the net target can reach its tap (it needs root): without it,
/// [`net`] returns at once.
pub fn net_available() -> bool {
    tap().is_some()
}
