//! What moat-vmm accepts. Every caller that sizes a VM checks against
//! these, never against copies of its own.

/// Most vCPUs one VM may have.
pub const MAX_VCPUS: u8 = 32;

/// Least guest memory, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Most guest memory, in MiB (1 TiB), whatever the host has; the VMM also
/// refuses more than the host's memory.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Most virtio-mmio devices (block, net, vsock and rng together) in one
/// VM: each takes one of the IOAPIC pins 5 to 23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Longest block device serial: virtio-blk's GET_ID returns at most 20
/// bytes.
pub const BLOCK_SERIAL_MAX: usize = 20;

/// Longest socket path (API and vsock sockets), in bytes. `sun_path` holds
/// 107 bytes and a NUL; the vsock muxer appends `_<port>` to the vsock
/// path for guest-initiated connections, which needs room of its own.
pub const MAX_SOCKET_PATH: usize = 100;

/// Lowest guest vsock CID: 0 to 2 are the hypervisor, local and host.
pub const MIN_GUEST_CID: u64 = 3;

/// Most file descriptors a client may pass with one API request.
pub const MAX_API_FDS: usize = 4;

/// Largest request body the API reads.
pub const MAX_API_REQUEST_BODY: usize = 64 * 1024;

/// Largest response (head and body) a client reads; moat-vmm's answers are
/// a few hundred bytes.
pub const MAX_API_RESPONSE: usize = 64 * 1024;

/// Least size cap of the console file and of moat-vmm's log: room for a
/// few lines.
pub const MIN_LOG_MAX_BYTES: u64 = 4096;

/// The size cap of the console file and of moat-vmm's log when the
/// configuration names none.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 4 << 20;
