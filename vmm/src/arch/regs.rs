//! Initial x86_64 vCPU state for the Linux 64-bit boot protocol: long
//! mode, identity-mapped page tables, RSI pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestMemory;
use crate::layout::*;

/// Errors of setting up the boot vCPU's initial state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("Cannot write boot structures to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// A KVM vCPU ioctl failed; holds the name of the call (e.g. `set_sregs`).
    #[error("Cannot set vCPU registers ({0})")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// Where the boot vCPU starts executing, in 64-bit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint(pub u64);

// GDT slots; the Linux boot protocol wants __BOOT_CS = 0x10, __BOOT_DS = 0x18.
const GDT_CODE: usize = 2;
const GDT_DATA: usize = 3;
const GDT_TSS: usize = 4;

/// Packs a GDT descriptor from flags (access byte and granularity nibble as
/// in the Intel SDM layout `0xGF_AA`), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment(entry: u64, index: usize) -> kvm_segment {
    let get = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: (entry >> 16) & 0xff_ffff | ((entry >> 32) & 0xff00_0000),
        limit: ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32,
        selector: (index * 8) as u16,
        type_: get(40, 0xf),
        present: get(47, 1),
        dpl: get(45, 3),
        db: get(54, 1),
        s: get(44, 1),
        l: get(53, 1),
        g: get(55, 1),
        avl: get(52, 1),
        unusable: u8::from(get(47, 1) == 0),
        padding: 0,
    }
}

fn gdt() -> [u64; 5] {
    [
        0,
        0,
        // 64-bit code: L set, D clear.
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Identity map of the first 4 GiB with 2 MiB pages, so that both RAM and
/// the virtio-mmio windows below 4 GiB are reachable before the kernel
/// installs its own tables.
fn write_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(RegsError::Memory)
    };
    w(PDPTE_START | 0x03, PML4_START)?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        w(pd | 0x03, PDPTE_START + gib * 8)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            w(((gib << 30) | (i << 21)) | 0x83, pd + i * 8)?;
        }
    }
    Ok(())
}

/// Sets up GDT, page tables and segment/control registers of the boot vCPU.
pub fn setup_sregs(mem: &GuestMemory, vcpu: &VcpuFd) -> Result<(), RegsError> {
    let table = gdt();
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Memory)?;

    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("get_sregs", e))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment(table[GDT_CODE], GDT_CODE);
    let data = segment(table[GDT_DATA], GDT_DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[GDT_TSS], GDT_TSS);

    const CR0_PE: u64 = 1;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    write_page_tables(mem)?;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("set_sregs", e))
}

/// General-purpose registers of the boot vCPU.
pub fn setup_regs(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("set_regs", e))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("set_fpu", e))
}

/// Boot MSRs. Deliberately few: a PVM host refuses some (IA32_ARCH_CAPABILITIES
/// among them), and the kernel programs the syscall MSRs itself.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .expect("one MSR entry always fits");
    vcpu.set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("set_msrs", e))?;
    Ok(())
}

/// Routes LINT0 as ExtINT and LINT1 as NMI, as firmware would.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("get_lapic", e))?;
    let mut set_mode = |reg: usize, mode: u32| {
        let bytes: &mut [u8] =
            // SAFETY: `regs` is a plain byte array of 1024 i8; viewing it as
            // u8 of the same length is sound.
            unsafe { std::slice::from_raw_parts_mut(lapic.regs.as_mut_ptr().cast::<u8>(), lapic.regs.len()) };
        let mut v = u32::from_le_bytes(bytes[reg..reg + 4].try_into().unwrap());
        v = (v & !0x700) | (mode << 8);
        bytes[reg..reg + 4].copy_from_slice(&v.to_le_bytes());
    };
    set_mode(APIC_LVT0, MODE_EXTINT);
    set_mode(APIC_LVT1, MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("set_lapic", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let t = gdt();
        let cs = segment(t[GDT_CODE], GDT_CODE);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.type_, cs.present),
            (0x10, 1, 0, 0xb, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xfffff, 1));
        let ds = segment(t[GDT_DATA], GDT_DATA);
        assert_eq!((ds.selector, ds.db, ds.type_), (0x18, 1, 3));
        let null = segment(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpte3, (PDE_START + 0x3000) | 3);
        // 0xd000_0000 is GiB 3, entry 0x80.
        let pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + 0x3000 + 0x80 * 8))
            .unwrap();
        assert_eq!(pde, 0xd000_0000 | 0x83);
    }
}
