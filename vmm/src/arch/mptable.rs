//! Intel MultiProcessor Specification 1.4 table.
//!
//! With no ACPI, the guest kernel finds its CPUs and the IOAPIC (and so the
//! routing of the virtio-mmio IRQs) only through this table.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestMemory;
use crate::layout::{EBDA_START, IRQ_MAX};

const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
// Stepping, model, family of a generic x86_64 part; the kernel only logs it.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 1;
// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
const MP_INT: u8 = 0;
const MP_EXTINT: u8 = 3;
const MP_NMI: u8 = 1;

/// Errors of [`setup_mptable`].
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The vCPUs and the IOAPIC need more than the 254 APIC ids the table
    /// can hold; holds the vCPU count asked for.
    #[error("Too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
    /// Guest memory has no room for the table at [`EBDA_START`].
    #[error("Cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table bytes for
/// `num_cpus` CPUs, to be placed at `base`.
fn build(num_cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = num_cpus + 1;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    // One ISA bus.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entry_count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    entry_count += 1;
    // ISA IRQ n is IOAPIC pin n, conforming polarity and trigger (edge high).
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
        entry_count += 1;
    }
    // Local interrupt lines: ExtINT on LINT0, NMI on LINT1, to all APICs.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    const FLOAT_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = base + FLOAT_LEN as u64;
    let table_len = (HEADER_LEN + entries.len()) as u16;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, set below
    header.extend_from_slice(b"MOAT    ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut float = Vec::with_capacity(FLOAT_LEN);
    float.extend_from_slice(b"_MP_");
    float.extend_from_slice(&(table_addr as u32).to_le_bytes());
    float.push(1); // length in 16-byte units
    float.push(4); // spec revision
    float.push(0); // checksum
    float.extend_from_slice(&[0; 5]); // feature bytes: 0 = table present
    float[10] = checksum(&float);

    float.extend_from_slice(&table);
    float
}

/// Writes the MP table at the start of the EBDA, where the kernel scans.
pub fn setup_mptable(mem: &GuestMemory, num_cpus: u8) -> Result<(), MptableError> {
    if u32::from(num_cpus) + 1 > 0xfe {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let bytes = build(num_cpus, EBDA_START);
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let bytes = build(4, EBDA_START);
        let float = &bytes[..16];
        assert_eq!(&float[..4], b"_MP_");
        assert_eq!(float.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &bytes[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 4 CPUs, a bus, an IOAPIC, 24 IRQs, 2 local lines.
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        let addr = u32::from_le_bytes([float[4], float[5], float[6], float[7]]);
        assert_eq!(u64::from(addr), EBDA_START + 16);
    }

    #[test]
    fn writes_into_guest_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
