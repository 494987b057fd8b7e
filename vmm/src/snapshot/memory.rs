//! Guest memory in a template file: written once, sparse (pages of zeroes
//! stay holes), and mapped by every VM restored from it copy-on-write
//! (MAP_PRIVATE), so VMs share the pages none of them has written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::devices::virtio::GuestMemory;

/// The unit of the zero-page check.
const PAGE: usize = 4096;

/// Why guest memory could not be saved or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Writing the template file failed.
    #[error("Cannot write guest memory to the template")]
    Write(#[source] std::io::Error),
    /// The template file is shorter than the memory it should hold.
    #[error("The template holds {found} bytes of guest memory, not {expected}")]
    Size {
        /// Bytes the VM's memory size needs.
        expected: u64,
        /// Bytes the file holds past the memory's offset.
        found: u64,
    },
    /// Mapping a region of the template failed.
    #[error("Cannot map the template's guest memory")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The mapped regions do not form a guest memory.
    #[error("Cannot build guest memory from the template")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// Writes every region of `mem`, in order, to `file` from `offset` on,
/// skipping pages of zeroes, and sets the file's length to the end.
pub fn save(mem: &GuestMemory, file: &File, offset: u64) -> Result<(), MemoryError> {
    let mut at = offset;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .expect("an mmap region has a host address");
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem`; the vCPUs are paused and the device workers stopped, so
        // nothing writes it while it is read here.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        write_sparse(file, bytes, at)?;
        at += len as u64;
    }
    file.set_len(at).map_err(MemoryError::Write)
}

/// Writes the runs of non-zero pages of `bytes` at `at`.
fn write_sparse(file: &File, bytes: &[u8], at: u64) -> Result<(), MemoryError> {
    let mut run_start = None;
    for (index, page) in bytes.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(index),
            (true, Some(start)) => {
                write_run(file, bytes, start, index, at)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        write_run(file, bytes, start, bytes.len().div_ceil(PAGE), at)?;
    }
    Ok(())
}

fn write_run(
    file: &File,
    bytes: &[u8],
    from: usize,
    to: usize,
    at: u64,
) -> Result<(), MemoryError> {
    let end = (to * PAGE).min(bytes.len());
    file.write_all_at(&bytes[from * PAGE..end], at + (from * PAGE) as u64)
        .map_err(MemoryError::Write)
}

/// Guest memory at `regions` (guest address, size), mapped copy-on-write
/// from `file` starting at `offset`, regions back to back.
pub fn map_private(
    file: File,
    offset: u64,
    regions: &[(GuestAddress, usize)],
) -> Result<GuestMemory, MemoryError> {
    let expected: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let len = file.metadata().map_err(MemoryError::Write)?.len();
    let found = len.saturating_sub(offset);
    if found < expected {
        return Err(MemoryError::Size { expected, found });
    }
    let file = Arc::new(file);
    let mut at = offset;
    let mut mapped = Vec::with_capacity(regions.len());
    for &(guest, size) in regions {
        let region = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::from_arc(file.clone(), at))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Map)?;
        mapped.push(GuestRegionMmap::new(region, guest).expect("regions do not wrap"));
        at += size as u64;
    }
    GuestMemory::from_regions(mapped).map_err(MemoryError::Regions)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn memory_comes_back_private_and_sparse() {
        let dir = moat_testutil::TempDir::new("snapshot-memory");
        let regions = [
            (GuestAddress(0), 64 * PAGE),
            (GuestAddress(1 << 20), 8 * PAGE),
        ];
        let mem = GuestMemory::from_ranges(&regions).unwrap();
        mem.write_obj(0xabu8, GuestAddress(5 * PAGE as u64 + 7))
            .unwrap();
        mem.write_obj(0xcdu8, GuestAddress((1 << 20) + 3 * PAGE as u64))
            .unwrap();
        let path = dir.path().join("t");
        let file = File::create(&path).unwrap();
        save(&mem, &file, PAGE as u64).unwrap();
        assert_eq!(file.metadata().unwrap().len(), (73 * PAGE) as u64);

        let open = || File::options().read(true).write(true).open(&path).unwrap();
        let a = map_private(open(), PAGE as u64, &regions).unwrap();
        let b = map_private(open(), PAGE as u64, &regions).unwrap();
        assert_eq!(
            a.read_obj::<u8>(GuestAddress(5 * PAGE as u64 + 7)).unwrap(),
            0xab
        );
        assert_eq!(
            a.read_obj::<u8>(GuestAddress((1 << 20) + 3 * PAGE as u64))
                .unwrap(),
            0xcd
        );
        // A write stays in its VM: neither the other VM nor the file sees it.
        a.write_obj(0x11u8, GuestAddress(5 * PAGE as u64 + 7))
            .unwrap();
        assert_eq!(
            b.read_obj::<u8>(GuestAddress(5 * PAGE as u64 + 7)).unwrap(),
            0xab
        );
        let c = map_private(open(), PAGE as u64, &regions).unwrap();
        assert_eq!(
            c.read_obj::<u8>(GuestAddress(5 * PAGE as u64 + 7)).unwrap(),
            0xab
        );

        let short = map_private(open(), PAGE as u64, &[(GuestAddress(0), 128 * PAGE)]);
        assert!(matches!(short, Err(MemoryError::Size { .. })));
    }
}
