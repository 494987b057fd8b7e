//! The virtio-blk device, its worker thread and the handle that replaces
//! its backing file.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use log::error;
use seccompiler::BpfProgram;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Backing};
use super::{
    QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, TYPE_BLOCK, VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use crate::devices::virtio::device::{
    read_config_bytes, ActivateError, ActivatedQueue, GuestMemory, Interrupt, VirtioDevice,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::devices::virtio::worker::{
    drain_queue, epoll_on, notify_used, DeviceState, DeviceWorker, RingError, ANY_CHAIN_LEN,
};

/// Why a block device could not be set up, or its backing file replaced.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("Cannot open the backing file {} of block device {id}", path.display())]
    Open {
        /// The device's id in the VM configuration.
        id: String,
        /// The backing file's path.
        path: PathBuf,
        /// The error of the open.
        #[source]
        source: io::Error,
    },
    /// The size of the backing file cannot be read.
    #[error("Cannot get the size of {what}, the backing file of block device {id}")]
    Size {
        /// The device's id in the VM configuration.
        id: String,
        /// The backing file, as a path or a descriptor number.
        what: String,
        /// The error of the seek to its end.
        #[source]
        source: io::Error,
    },
    /// A descriptor passed for a writable device is open read-only; holds the
    /// device's id.
    #[error("The file descriptor given for block device {0} is open read-only, but the device is writable")]
    ReadOnlyDescriptor(String),
    /// The access mode of a passed descriptor cannot be read.
    #[error("Cannot read the flags of the file descriptor given for block device {id}")]
    DescriptorFlags {
        /// The device's id in the VM configuration.
        id: String,
        /// The error of `fcntl(F_GETFL)`.
        #[source]
        source: io::Error,
    },
    /// The device's id does not fit the GET_ID answer; holds the id.
    #[error("Serial of block device {0} is longer than {VIRTIO_BLK_ID_BYTES} bytes")]
    SerialTooLong(String),
}

/// Where a replacement backing file comes from.
#[derive(Debug)]
pub enum BlockSource {
    /// Opened by the VMM, with the VMM's privileges at that time.
    Path(PathBuf),
    /// Already open: passed over the API socket by a caller that may open
    /// what a jailed VMM cannot.
    Fd(OwnedFd),
}

impl From<&Path> for BlockSource {
    fn from(path: &Path) -> Self {
        BlockSource::Path(path.to_owned())
    }
}

impl fmt::Display for BlockSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockSource::Path(p) => write!(f, "{}", p.display()),
            BlockSource::Fd(_) => f.write_str("a passed file descriptor"),
        }
    }
}

/// What the device, its worker and its handles share.
struct Shared {
    id: String,
    /// Read-only as offered to the driver: the backing is then never written,
    /// whatever a replacement asks for.
    read_only: bool,
    state: Mutex<SharedState>,
}

struct SharedState {
    backing: Backing,
    /// Set while the device is activated, for config-change interrupts.
    interrupt: Option<Arc<Interrupt>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // The state is plain data, consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn backing(&self) -> Backing {
        self.lock().backing.clone()
    }

    fn open(&self, source: BlockSource, read_only: bool) -> Result<Backing, BlockError> {
        let read_only = read_only || self.read_only;
        let what = source.to_string();
        let file = match source {
            BlockSource::Path(path) => OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(&path)
                .map_err(|source| BlockError::Open {
                    id: self.id.clone(),
                    path,
                    source,
                })?,
            BlockSource::Fd(fd) => {
                // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
                let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
                if flags < 0 {
                    return Err(BlockError::DescriptorFlags {
                        id: self.id.clone(),
                        source: io::Error::last_os_error(),
                    });
                }
                // Found now rather than as I/O errors in the guest later.
                if !read_only && flags & libc::O_ACCMODE == libc::O_RDONLY {
                    return Err(BlockError::ReadOnlyDescriptor(self.id.clone()));
                }
                File::from(fd)
            }
        };
        // Seeking also sizes block devices, whose metadata says 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                id: self.id.clone(),
                what,
                source,
            })?;
        Ok(Backing {
            file: Some(Arc::new(file)),
            // A partial last sector is not addressable.
            sectors: size >> SECTOR_SHIFT,
            read_only,
        })
    }
}

/// Replaces the backing file of a block device, from any thread, whether or
/// not the guest drives the device.
#[derive(Clone)]
pub struct BlockHandle {
    shared: Arc<Shared>,
}

impl BlockHandle {
    /// The device's id in the VM configuration.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.shared.lock().backing.sectors
    }

    /// Serves the device from `source` from now on (a request in flight
    /// completes on the old file) and tells an active driver that the
    /// capacity changed. A device created read-only stays read-only.
    pub fn replace_backing(&self, source: BlockSource, read_only: bool) -> Result<(), BlockError> {
        let backing = self.shared.open(source, read_only)?;
        let interrupt = {
            let mut state = self.shared.lock();
            state.backing = backing;
            state.interrupt.clone()
        };
        if let Some(interrupt) = interrupt {
            if let Err(err) = interrupt.signal_config_change() {
                error!("block {}: cannot signal the new capacity: {err}", self.id());
            }
        }
        Ok(())
    }
}

/// virtio-blk over a raw file.
pub struct Block {
    shared: Arc<Shared>,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    state: DeviceState,
    /// The next activation resumes a template, whose disk here may have
    /// had another size: the driver is told to read the capacity again.
    restoring: bool,
}

impl Block {
    /// Opens the backing file, if any, so that a bad configuration fails
    /// before the guest runs. Without `path` the device is an empty slot of
    /// capacity 0 that a [`BlockHandle`] can fill later. `serial` is what
    /// the guest reads with GET_ID.
    pub fn new(
        id: &str,
        path: Option<&Path>,
        read_only: bool,
        serial: Option<&str>,
    ) -> Result<Block, BlockError> {
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        if let Some(serial) = serial {
            let bytes = serial.as_bytes();
            if bytes.len() > VIRTIO_BLK_ID_BYTES {
                return Err(BlockError::SerialTooLong(id.to_owned()));
            }
            id_bytes[..bytes.len()].copy_from_slice(bytes);
        }
        let shared = Arc::new(Shared {
            id: id.to_owned(),
            read_only,
            state: Mutex::new(SharedState {
                backing: Backing {
                    read_only,
                    ..Backing::default()
                },
                interrupt: None,
            }),
        });
        if let Some(path) = path {
            let backing = shared.open(path.into(), read_only)?;
            shared.lock().backing = backing;
        }
        Ok(Block {
            shared,
            serial: id_bytes,
            state: DeviceState::default(),
            restoring: false,
        })
    }

    /// The device's id in the VM configuration.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// A handle for replacing the backing file while the VM runs.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            shared: self.shared.clone(),
        }
    }

    /// The `virtio_blk_config` prefix the device fills: capacity, size_max,
    /// seg_max, geometry, blk_size.
    fn config_space(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[..8].copy_from_slice(&self.shared.lock().backing.sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let ro = if self.shared.read_only {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | ro
    }

    fn set_acked_features(&mut self, features: u64) {
        self.state.ack_features(self.avail_features(), features);
    }

    fn set_seccomp_filter(&mut self, filter: BpfProgram) {
        self.state.set_seccomp_filter(filter);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let [queue] = self.state.begin_activation(queues)?;
        // No config-change interrupts until the new worker runs.
        self.shared.lock().interrupt = None;
        let worker = Worker {
            epoll: epoll_on(&[(&queue.notify, 0)]).map_err(ActivateError::Backend)?,
            mem,
            interrupt: interrupt.clone(),
            queue: queue.queue,
            notify: queue.notify,
            shared: self.shared.clone(),
            serial: self.serial,
        };
        let name = format!("blk-{}", self.id());
        self.state.start_worker(name, interrupt.clone(), worker)?;
        if std::mem::take(&mut self.restoring) {
            if let Err(err) = interrupt.signal_config_change() {
                error!("block {}: cannot signal a config change: {err}", self.id());
            }
        }
        self.shared.lock().interrupt = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        self.shared.lock().interrupt = None;
    }

    fn restoring(&mut self) {
        self.restoring = true;
    }
}

/// Serves the request queue on the worker thread.
struct Worker {
    /// Watches `notify` (token 0).
    epoll: Epoll,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue: Queue,
    notify: EventFd,
    shared: Arc<Shared>,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
}

impl DeviceWorker for Worker {
    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn handle_event(&mut self, _token: u64, _events: EventSet) -> Result<(), RingError> {
        // Drains the kick; the queue itself says what is pending.
        let _ = self.notify.read();
        Ok(())
    }

    fn process(&mut self) -> Result<(), RingError> {
        // Chains borrow the memory while the queue changes; the clone is a
        // few reference counts.
        let mem = self.mem.clone();
        // A request past the disk's end is the request's failure (IOERR),
        // not a malformed chain.
        let drained = drain_queue(&mut self.queue, &mem, ANY_CHAIN_LEN, |chain| {
            let backing = self.shared.backing();
            Some(request::process(chain, &mem, &backing, &self.serial))
        })?;
        if drained.used {
            notify_used(&mut self.queue, &mem, &self.interrupt, "block");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    use vmm_sys_util::tempfile::TempFile;

    use super::super::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use super::*;
    use crate::devices::virtio::device::INT_CONFIG_CHANGE;
    use crate::devices::virtio::net::test_utils::thread_ticks;
    use crate::devices::virtio::test_driver::{
        guest_memory, interrupt, readable_within, wait_needs_reset, Desc, TestQueue, MEM_SIZE,
        VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    const WAIT: Duration = Duration::from_secs(5);

    struct Harness {
        block: Block,
        queue: TestQueue,
        irq: Arc<Interrupt>,
        irqfd: EventFd,
    }

    /// A temp file of `sectors` sectors, each filled with its sector number.
    fn disk(sectors: u64) -> TempFile {
        let file = TempFile::new().unwrap();
        for s in 0..sectors {
            file.as_file()
                .write_all_at(&[s as u8; 512], s * 512)
                .unwrap();
        }
        file
    }

    fn start(block: Block) -> Harness {
        let mem = guest_memory();
        let queue = TestQueue::new(&mem, 0, QUEUE_SIZE);
        let (irq, irqfd) = interrupt();
        let mut block = block;
        block.set_acked_features(block.avail_features());
        block
            .activate(mem, irq.clone(), vec![queue.activated(true)])
            .unwrap();
        Harness {
            block,
            queue,
            irq,
            irqfd,
        }
    }

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    const VRING_DESC_F_INDIRECT: u16 = 4;

    /// Writes an indirect descriptor table: `hdr`, `zeros` zero-length
    /// writable descriptors, `status`. Returns its address and length.
    fn indirect_table(queue: &mut TestQueue, hdr: Desc, zeros: usize, status: Desc) -> (u64, u32) {
        let mut entries = vec![(hdr.addr, hdr.len, 0)];
        entries.extend(std::iter::repeat_n((0x8000, 0, VRING_DESC_F_WRITE), zeros));
        entries.push((status.addr, status.len, VRING_DESC_F_WRITE));
        let n = entries.len();
        let mut raw = Vec::new();
        for (i, (addr, len, flags)) in entries.into_iter().enumerate() {
            let last = i + 1 == n;
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            raw.extend_from_slice(&u64::to_le_bytes(addr));
            raw.extend_from_slice(&u32::to_le_bytes(len));
            raw.extend_from_slice(&flags.to_le_bytes());
            raw.extend_from_slice(&((i + 1) as u16).to_le_bytes());
        }
        let table = queue.readable(&raw);
        (table.addr, table.len)
    }

    impl Harness {
        /// Activates the device again on fresh rings, as a driver does
        /// after a reset (VIRTIO_F_VERSION_1 only: no EVENT_IDX).
        fn reactivate(&mut self) {
            let mem = guest_memory();
            self.queue = TestQueue::new(&mem, 1, 16);
            self.block.set_acked_features(VIRTIO_F_VERSION_1);
            self.block
                .activate(mem, self.irq.clone(), vec![self.queue.activated(false)])
                .unwrap();
        }

        /// Submits `descs` and waits for the device to return the chain:
        /// (used length, status byte at `status`).
        fn submit(&mut self, descs: &[Desc], status: Desc) -> (u32, u8) {
            let head = self.queue.add_chain(descs);
            let (id, len) = self.queue.wait_used(WAIT).expect("request completes");
            assert_eq!(id, head);
            let byte = self.queue.read(status.addr + u64::from(status.len) - 1, 1)[0];
            (len, byte)
        }

        fn request(&mut self, kind: u32, sector: u64, data: Option<Desc>) -> (u32, u8) {
            let hdr = self.queue.readable(&header(kind, sector));
            let status = self.queue.writable(1);
            let mut descs = vec![hdr];
            descs.extend(data);
            descs.push(status);
            self.submit(&descs, status)
        }

        fn read_sectors(&mut self, sector: u64, count: u32) -> (u32, u8, Vec<u8>) {
            let buf = self.queue.writable(count * 512);
            let (len, status) = self.request(VIRTIO_BLK_T_IN, sector, Some(buf));
            (len, status, self.queue.read(buf.addr, buf.len as usize))
        }
    }

    #[test]
    fn features_and_config_space() {
        let file = disk(8);
        let rw = Block::new("a", Some(file.as_path()), false, None).unwrap();
        assert_eq!(rw.device_type(), TYPE_BLOCK);
        assert_eq!(rw.queue_max_sizes(), &[QUEUE_SIZE]);
        assert_eq!(rw.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert_ne!(rw.avail_features() & VIRTIO_F_VERSION_1, 0);
        assert_ne!(rw.avail_features() & VIRTIO_BLK_F_FLUSH, 0);
        let mut config = [0u8; 24];
        rw.read_config(0, &mut config);
        assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), 8);
        assert_eq!(
            u32::from_le_bytes(config[12..16].try_into().unwrap()),
            SEG_MAX
        );
        assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);
        // Reads past the end are zeroes.
        let mut past = [0xffu8; 8];
        rw.read_config(20, &mut past);
        assert_eq!(past, [0, 2, 0, 0, 0, 0, 0, 0]);
        rw.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 8]);
        let ro = Block::new("b", Some(file.as_path()), true, None).unwrap();
        assert_ne!(ro.avail_features() & VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn bad_configuration_fails_early() {
        let err = Block::new("a", Some(Path::new("/nonexistent/disk")), false, None);
        assert!(matches!(err, Err(BlockError::Open { .. })));
        let err = Block::new("a", None, false, Some("123456789012345678901"));
        assert!(matches!(err, Err(BlockError::SerialTooLong(_))));
    }

    #[test]
    fn read_write_round_trip() {
        let file = disk(16);
        let mut h = start(Block::new("rw", Some(file.as_path()), false, None).unwrap());
        let (len, status, data) = h.read_sectors(3, 2);
        assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK));
        assert!(data[..512].iter().all(|&b| b == 3));
        assert!(data[512..].iter().all(|&b| b == 4));

        let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        let buf = h.queue.readable(&payload);
        let (len, status) = h.request(VIRTIO_BLK_T_OUT, 10, Some(buf));
        assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
        let mut on_disk = vec![0u8; 1024];
        file.as_file()
            .read_exact_at(&mut on_disk, 10 * 512)
            .unwrap();
        assert_eq!(on_disk, payload);
        let (_, status, back) = h.read_sectors(10, 2);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(back, payload);
        // The guest was interrupted for used buffers.
        assert!(readable_within(&h.irqfd, WAIT));
        assert_ne!(
            h.irq.status().load(std::sync::atomic::Ordering::SeqCst) & 1,
            0
        );
    }

    #[test]
    fn chained_request_with_split_header_and_data() {
        let file = disk(8);
        let mut h = start(Block::new("chain", Some(file.as_path()), false, None).unwrap());
        let hdr = header(VIRTIO_BLK_T_IN, 1);
        let h1 = h.queue.readable(&hdr[..5]);
        let h2 = h.queue.readable(&hdr[5..]);
        let d1 = h.queue.writable(100);
        let zero = h.queue.writable(0);
        let d2 = h.queue.writable(924);
        // Status shares the last data descriptor.
        let d3 = h.queue.writable(512 + 1);
        let (len, status) = h.submit(&[h1, h2, d1, zero, d2, d3], d3);
        assert_eq!((len, status), (1537, VIRTIO_BLK_S_OK));
        let mut data = h.queue.read(d1.addr, 100);
        data.extend(h.queue.read(d2.addr, 924));
        data.extend(h.queue.read(d3.addr, 512));
        assert!(data[..512].iter().all(|&b| b == 1));
        assert!(data[512..1024].iter().all(|&b| b == 2));
        assert!(data[1024..].iter().all(|&b| b == 3));
    }

    #[test]
    fn flush_and_get_id() {
        let file = disk(8);
        let mut h = start(Block::new("f", Some(file.as_path()), false, Some("layer0")).unwrap());
        assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None), (1, VIRTIO_BLK_S_OK));
        // Data buffers on a flush are a malformed request.
        let buf = h.queue.writable(512);
        assert_eq!(
            h.request(VIRTIO_BLK_T_FLUSH, 0, Some(buf)),
            (0, VIRTIO_BLK_S_IOERR)
        );

        let id = h.queue.writable(20);
        assert_eq!(
            h.request(VIRTIO_BLK_T_GET_ID, 0, Some(id)),
            (21, VIRTIO_BLK_S_OK)
        );
        let mut want = b"layer0".to_vec();
        want.resize(20, 0);
        assert_eq!(h.queue.read(id.addr, 20), want);
        // A larger buffer gets the 20 bytes; the status byte does not follow them.
        let id = h.queue.writable(64);
        assert_eq!(
            h.request(VIRTIO_BLK_T_GET_ID, 0, Some(id)),
            (20, VIRTIO_BLK_S_OK)
        );
        assert_eq!(h.queue.read(id.addr, 20), want);
        assert_eq!(h.request(77, 0, None), (1, VIRTIO_BLK_S_UNSUPP));
    }

    #[test]
    fn read_only_rejects_writes() {
        let file = disk(8);
        let mut h = start(Block::new("ro", Some(file.as_path()), true, None).unwrap());
        let buf = h.queue.readable(&[0xaa; 512]);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, Some(buf)),
            (1, VIRTIO_BLK_S_IOERR)
        );
        let mut sector = [0u8; 512];
        file.as_file().read_exact_at(&mut sector, 0).unwrap();
        assert_eq!(sector, [0; 512]);
        // Reads and flushes still work.
        assert_eq!(h.read_sectors(1, 1).1, VIRTIO_BLK_S_OK);
        assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None).1, VIRTIO_BLK_S_OK);
        // A replacement cannot make the device writable.
        let other = disk(4);
        h.block
            .handle()
            .replace_backing(other.as_path().into(), false)
            .unwrap();
        let buf = h.queue.readable(&[0xaa; 512]);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, Some(buf)),
            (1, VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn out_of_range_and_misaligned_requests_fail() {
        let file = disk(8);
        let mut h = start(Block::new("range", Some(file.as_path()), false, None).unwrap());
        // The last sector is fine, one past it is not.
        assert_eq!(h.read_sectors(7, 1).1, VIRTIO_BLK_S_OK);
        let (len, status, data) = h.read_sectors(7, 2);
        assert_eq!((len, status), (0, VIRTIO_BLK_S_IOERR));
        assert!(data.iter().all(|&b| b == 0), "nothing read");
        assert_eq!(h.read_sectors(8, 1).1, VIRTIO_BLK_S_IOERR);
        // sector * 512 overflows; sector + len overflows.
        assert_eq!(h.read_sectors(u64::MAX, 1).1, VIRTIO_BLK_S_IOERR);
        assert_eq!(h.read_sectors((u64::MAX >> 9) - 1, 4).1, VIRTIO_BLK_S_IOERR);
        let buf = h.queue.readable(&[1; 512]);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 8, Some(buf)).1,
            VIRTIO_BLK_S_IOERR
        );
        // Not a whole number of sectors.
        let buf = h.queue.writable(100);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, Some(buf)),
            (0, VIRTIO_BLK_S_IOERR)
        );
        let buf = h.queue.readable(&[1; 513]);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, Some(buf)).1,
            VIRTIO_BLK_S_IOERR
        );
        // Wrong direction: a read into a device-readable buffer, a write
        // from a device-writable one.
        let buf = h.queue.readable(&[0; 512]);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, Some(buf)).1,
            VIRTIO_BLK_S_IOERR
        );
        let buf = h.queue.writable(512);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, Some(buf)).1,
            VIRTIO_BLK_S_IOERR
        );
        let mut sector = [0u8; 512];
        file.as_file().read_exact_at(&mut sector, 0).unwrap();
        assert_eq!(sector, [0; 512], "nothing written");
        // Header too short.
        let hdr = h.queue.readable(&header(VIRTIO_BLK_T_IN, 0)[..8]);
        let status = h.queue.writable(1);
        assert_eq!(h.submit(&[hdr, status], status), (1, VIRTIO_BLK_S_IOERR));
    }

    /// Publishes a malformed chain on a queue.
    type BuildChain = Box<dyn Fn(&mut TestQueue)>;

    /// Structural faults of a chain; each must stop the device.
    fn malformed_chains(hdr: Desc) -> Vec<(&'static str, BuildChain)> {
        let chain = |descs: Vec<Desc>| -> BuildChain {
            Box::new(move |q: &mut TestQueue| {
                q.add_chain(&descs);
            })
        };
        let status = Desc {
            addr: 0x8000,
            len: 1,
            write: true,
        };
        let data_at = |addr| Desc {
            addr,
            len: 512,
            write: true,
        };
        vec![
            (
                "data outside memory",
                chain(vec![hdr, data_at(MEM_SIZE as u64 - 256), status]),
            ),
            (
                "data wrapping the address space",
                chain(vec![hdr, data_at(u64::MAX - 100), status]),
            ),
            (
                "status outside memory",
                chain(vec![
                    hdr,
                    Desc {
                        addr: MEM_SIZE as u64,
                        ..status
                    },
                ]),
            ),
            (
                "a loop",
                Box::new(move |q: &mut TestQueue| {
                    q.write_desc(200, hdr.addr, 16, VRING_DESC_F_NEXT, 201);
                    q.write_desc(201, 0x8000, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 200);
                    q.publish(200);
                }),
            ),
            (
                "a next index past the table",
                Box::new(move |q: &mut TestQueue| {
                    q.write_desc(202, hdr.addr, 16, VRING_DESC_F_NEXT, QUEUE_SIZE + 5);
                    q.publish(202);
                }),
            ),
            (
                "more segments than SEG_MAX, past the queue size",
                Box::new(move |q: &mut TestQueue| {
                    let (table, len) = indirect_table(q, hdr, SEG_MAX as usize + 1, status);
                    q.write_desc(203, table, len, VRING_DESC_F_INDIRECT, 0);
                    q.publish(203);
                }),
            ),
            (
                "an indirect table of 2000 entries",
                Box::new(move |q: &mut TestQueue| {
                    let (table, len) = indirect_table(q, hdr, 2000, status);
                    q.write_desc(204, table, len, VRING_DESC_F_INDIRECT, 0);
                    q.publish(204);
                }),
            ),
        ]
    }

    // The issue changed the spec: a malformed chain used to be answered on
    // its own (IOERR, or returned empty); it now needs a device reset.
    #[test]
    fn malformed_chains_need_a_reset_and_stop_the_device() {
        let file = disk(8);
        let mut h = start(Block::new("bad", Some(file.as_path()), false, None).unwrap());
        let hdr = h.queue.readable(&header(VIRTIO_BLK_T_IN, 0));
        for (what, build) in malformed_chains(hdr) {
            h.queue.write_raw(0x8000, &[0xee]);
            build(&mut h.queue);
            wait_needs_reset(&h.irq, WAIT, || !h.block.state.has_worker());
            assert_eq!(h.queue.next_used(), None, "{what}: chain returned");
            assert_eq!(h.queue.read(0x8000, 1), [0xee], "{what}: status written");
            // The reset does not wait on a busy worker, and the device
            // serves fresh rings again.
            let t = std::time::Instant::now();
            h.block.reset();
            assert!(t.elapsed() < Duration::from_secs(1), "{what}");
            h.irq.reset();
            let mem = guest_memory();
            h.queue = TestQueue::new(&mem, 0, QUEUE_SIZE);
            h.block.set_acked_features(h.block.avail_features());
            h.block
                .activate(mem, h.irq.clone(), vec![h.queue.activated(true)])
                .unwrap();
            let (len, status, data) = h.read_sectors(5, 1);
            assert_eq!((len, status), (513, VIRTIO_BLK_S_OK), "{what}");
            assert!(data.iter().all(|&b| b == 5));
            assert!(!h.irq.needs_reset());
        }
    }

    #[test]
    fn bad_requests_in_well_formed_chains_do_not_stop_the_device() {
        let file = disk(8);
        let mut h = start(Block::new("badreq", Some(file.as_path()), false, None).unwrap());
        let hdr = h.queue.readable(&header(VIRTIO_BLK_T_IN, 0));

        // Status descriptor read-only, or missing (chain of the header
        // only), or empty: no status byte to answer with, returned empty.
        let ro_status = h.queue.readable(&[0xee]);
        let head = h.queue.add_chain(&[hdr, ro_status]);
        assert_eq!(h.queue.wait_used(WAIT), Some((head, 0)));
        assert_eq!(h.queue.read(ro_status.addr, 1), [0xee]);
        let head = h.queue.add_chain(&[hdr]);
        assert_eq!(h.queue.wait_used(WAIT), Some((head, 0)));
        let empty_status = h.queue.writable(0);
        let head = h.queue.add_chain(&[hdr, empty_status]);
        assert_eq!(h.queue.wait_used(WAIT), Some((head, 0)));

        // Zero-length data descriptors, SEG_MAX of them: the whole queue.
        let zero = Desc {
            addr: 0x8000,
            len: 0,
            write: true,
        };
        let mut descs = vec![hdr];
        descs.extend(std::iter::repeat_n(zero, SEG_MAX as usize));
        let status = h.queue.writable(1);
        descs.push(status);
        assert_eq!(descs.len(), QUEUE_SIZE as usize);
        assert_eq!(h.submit(&descs, status), (1, VIRTIO_BLK_S_OK));

        // Readable after writable.
        let data = h.queue.writable(512);
        let late = h.queue.readable(&[0; 16]);
        let status = h.queue.writable(1);
        assert_eq!(
            h.submit(&[hdr, data, late, status], status).1,
            VIRTIO_BLK_S_IOERR
        );

        // The device still serves good requests.
        let (len, status, data) = h.read_sectors(5, 1);
        assert_eq!((len, status), (513, VIRTIO_BLK_S_OK));
        assert!(data.iter().all(|&b| b == 5));
        assert!(!h.irq.needs_reset());
    }

    #[test]
    fn spare_slot_fails_io_until_filled() {
        let mut h = start(Block::new("spare", None, false, Some("spare")).unwrap());
        let handle = h.block.handle();
        assert_eq!(handle.capacity(), 0);
        let mut cap = [0xffu8; 8];
        h.block.read_config(0, &mut cap);
        assert_eq!(cap, [0; 8]);
        assert_eq!(h.read_sectors(0, 1).1, VIRTIO_BLK_S_IOERR);
        let empty = h.queue.writable(0);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, 0, Some(empty)).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, None).1, VIRTIO_BLK_S_IOERR);
        let buf = h.queue.readable(&[1; 512]);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, Some(buf)).1,
            VIRTIO_BLK_S_IOERR
        );
        // GET_ID is not I/O.
        let id = h.queue.writable(20);
        assert_eq!(
            h.request(VIRTIO_BLK_T_GET_ID, 0, Some(id)).1,
            VIRTIO_BLK_S_OK
        );

        // Drain the interrupts so far.
        while readable_within(&h.irqfd, Duration::ZERO) {
            h.irqfd.read().unwrap();
        }
        h.irq.status().store(0, std::sync::atomic::Ordering::SeqCst);

        let file = disk(6);
        handle
            .replace_backing(file.as_path().into(), false)
            .unwrap();
        assert!(readable_within(&h.irqfd, Duration::ZERO));
        assert_eq!(
            h.irq.status().load(std::sync::atomic::Ordering::SeqCst),
            INT_CONFIG_CHANGE
        );
        assert_eq!(handle.capacity(), 6);
        h.block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 6);
        let (len, status, data) = h.read_sectors(5, 1);
        assert_eq!((len, status), (513, VIRTIO_BLK_S_OK));
        assert!(data.iter().all(|&b| b == 5));
        let buf = h.queue.readable(&[9; 512]);
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, Some(buf)).1, VIRTIO_BLK_S_OK);
        let mut sector = [0u8; 512];
        file.as_file().read_exact_at(&mut sector, 0).unwrap();
        assert_eq!(sector, [9; 512]);

        // Read-only replacement: reads work, writes do not.
        let ro = disk(2);
        handle.replace_backing(ro.as_path().into(), true).unwrap();
        assert_eq!(h.read_sectors(1, 1).1, VIRTIO_BLK_S_OK);
        let buf = h.queue.readable(&[9; 512]);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, 0, Some(buf)).1,
            VIRTIO_BLK_S_IOERR
        );
        assert!(matches!(
            handle.replace_backing(Path::new("/nonexistent/x").into(), true),
            Err(BlockError::Open { .. })
        ));
        assert_eq!(handle.capacity(), 2, "a failed replacement changes nothing");

        // A passed descriptor serves as it is; one open read-only cannot
        // back a writable device.
        let fd_disk = disk(7);
        let read_only_fd = OwnedFd::from(File::open(fd_disk.as_path()).unwrap());
        assert!(matches!(
            handle.replace_backing(BlockSource::Fd(read_only_fd), false),
            Err(BlockError::ReadOnlyDescriptor(_))
        ));
        assert_eq!(handle.capacity(), 2);
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(fd_disk.as_path())
            .unwrap();
        handle
            .replace_backing(BlockSource::Fd(rw.into()), false)
            .unwrap();
        assert_eq!(handle.capacity(), 7);
        let buf = h.queue.readable(&[4; 512]);
        assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, Some(buf)).1, VIRTIO_BLK_S_OK);
        fd_disk.as_file().read_exact_at(&mut sector, 0).unwrap();
        assert_eq!(sector, [4; 512]);
    }

    #[test]
    fn replace_without_driver_does_not_interrupt() {
        let block = Block::new("idle", None, false, None).unwrap();
        let file = disk(3);
        block
            .handle()
            .replace_backing(file.as_path().into(), false)
            .unwrap();
        assert_eq!(block.handle().capacity(), 3);
        // A partial last sector is not part of the capacity.
        file.as_file().write_all_at(&[1; 100], 3 * 512).unwrap();
        block
            .handle()
            .replace_backing(file.as_path().into(), false)
            .unwrap();
        assert_eq!(block.handle().capacity(), 3);
    }

    #[test]
    fn corrupt_avail_index_needs_a_reset_and_stops_the_worker() {
        let file = disk(4);
        let mut h = start(Block::new("ring", Some(file.as_path()), false, None).unwrap());
        assert_eq!(h.read_sectors(1, 1).1, VIRTIO_BLK_S_OK);
        // Once the worker thread ends its name is gone from /proc.
        assert!(h.block.state.has_worker());
        h.queue
            .set_avail_idx(h.queue.used_idx().wrapping_add(QUEUE_SIZE + 1));
        let deadline = std::time::Instant::now() + WAIT;
        while !h.irq.needs_reset() || h.block.state.has_worker() {
            assert!(std::time::Instant::now() < deadline, "device still running");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(
            h.irq.status().load(std::sync::atomic::Ordering::SeqCst) & INT_CONFIG_CHANGE,
            0
        );
        // The reset does not wait on a busy worker.
        let t = std::time::Instant::now();
        h.block.reset();
        assert!(t.elapsed() < Duration::from_secs(1));
        h.irq.reset();
        // And the device works again on fresh rings.
        h.reactivate();
        assert_eq!(h.read_sectors(2, 1).1, VIRTIO_BLK_S_OK);
        assert!(!h.irq.needs_reset());
    }

    #[test]
    fn reset_stops_the_worker_and_reactivates() {
        let file = disk(4);
        let mut h = start(Block::new("reset", Some(file.as_path()), false, None).unwrap());
        assert_eq!(h.read_sectors(2, 1).1, VIRTIO_BLK_S_OK);
        h.block.reset();
        assert!(!h.block.state.has_worker());
        // Requests now stay pending.
        let hdr = h.queue.readable(&header(VIRTIO_BLK_T_IN, 0));
        let status = h.queue.writable(1);
        h.queue.add_chain(&[hdr, status]);
        assert_eq!(h.queue.wait_used(Duration::from_millis(100)), None);
        // A config change after reset does not interrupt.
        while readable_within(&h.irqfd, Duration::ZERO) {
            h.irqfd.read().unwrap();
        }
        h.block
            .handle()
            .replace_backing(file.as_path().into(), false)
            .unwrap();
        assert!(!readable_within(&h.irqfd, Duration::from_millis(50)));

        // A fresh activation on fresh rings serves requests again.
        h.reactivate();
        let (len, status, data) = h.read_sectors(3, 1);
        assert_eq!((len, status), (513, VIRTIO_BLK_S_OK));
        assert!(data.iter().all(|&b| b == 3));
        assert!(matches!(
            h.block.activate(guest_memory(), h.irq.clone(), vec![]),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
    }

    #[test]
    fn idle_worker_sleeps_and_drop_joins_it() {
        let file = disk(2);
        let mut h = start(Block::new("blkidle", Some(file.as_path()), false, None).unwrap());
        assert_eq!(h.read_sectors(1, 1).1, VIRTIO_BLK_S_OK);
        let before = thread_ticks("blk-blkidle").expect("worker thread");
        std::thread::sleep(Duration::from_millis(300));
        let after = thread_ticks("blk-blkidle").expect("worker thread");
        // One tick is 10 ms: a spinning worker would use about 30.
        assert!(after - before <= 2, "worker busy while idle");
        drop(h);
        assert!(
            thread_ticks("blk-blkidle").is_none(),
            "worker outlived the device"
        );
    }
}
