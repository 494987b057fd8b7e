//! What the guest and moat-vmm agree on beyond the VM's configuration.

/// Boot-timer port (Firecracker's convention): the guest writes
/// [`BOOT_TIMER_MAGIC`] there once booted, and moat-vmm logs the time since
/// its own start.
pub const BOOT_TIMER_PORT: u64 = 0x3f0;
/// The byte the guest writes to [`BOOT_TIMER_PORT`] when it has booted.
pub const BOOT_TIMER_MAGIC: u8 = 123;
