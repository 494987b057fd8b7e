//! Guest physical address map (x86_64) and interrupt numbering.

use moat_vmm_api::limits::MAX_VIRTIO_DEVICES;

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty; the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` (the "zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables for 64-bit entry: the PML4 page (one entry used).
pub const PML4_START: u64 = 0x9000;
/// The page-directory-pointer table (four entries: the first 4 GiB).
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages, one page each, from here.
pub const PDE_START: u64 = 0xb000;
/// The BIOS data area word Linux writes just before it resets the machine:
/// [`WARM_RESET_MARK`] for a warm reset, 0 for a cold one. moat-vmm gives
/// the guest `reboot=k reboot=panic_warm`, so only a panic asks for a
/// warm one.
pub const RESET_MODE_ADDR: u64 = 0x472;
/// What Linux writes at [`RESET_MODE_ADDR`] before a warm reset.
pub const WARM_RESET_MARK: u16 = 0x1234;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line in bytes, its NUL terminator included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// End of the low RAM the BIOS era reserved; E820 RAM restarts at 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// Where RAM resumes above the legacy hole (1 MiB); the kernel and initrd
/// are loaded at or above it.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM above it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO hole (4 GiB): RAM beyond the first
/// [`MMIO_GAP_START`] bytes is mapped from here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one page each, from the start of the gap.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size in bytes of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC pins for virtio-mmio devices (legacy ISA IRQs end below 5 here).
pub const IRQ_BASE: u32 = 5;
/// Last IOAPIC pin for virtio-mmio devices (inclusive; the IOAPIC has 24).
pub const IRQ_MAX: u32 = 23;
// The contract's device limit is one device per pin from IRQ_BASE on.
const _: () = assert!(IRQ_MAX - IRQ_BASE + 1 == MAX_VIRTIO_DEVICES as u32);
/// 8250 serial (COM1) base I/O port.
pub const SERIAL_PORT: u64 = 0x3f8;
/// IRQ of the COM1 serial port.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 controller data and command ports.
pub const I8042_PORT: u64 = 0x60;
pub use moat_vmm_api::guest::{BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};
/// Where KVM keeps its TSS (three pages, inside the MMIO gap, so no RAM).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Where KVM keeps its identity-map page table, the page below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Base address of the `index`-th virtio-mmio device.
pub fn virtio_mmio_base(index: u32) -> u64 {
    VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE
}
