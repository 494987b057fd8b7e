//! Loading the kernel, initramfs and command line into guest memory and
//! writing the Linux zero page of the 64-bit boot protocol.
//!
//! moat enters every kernel (ELF vmlinux or bzImage) at its 64-bit entry
//! point. PVH (32-bit protected-mode entry) is not used: this project's PVM
//! hosts triple-fault on it, and the 64-bit protocol works on both kinds of
//! host.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::regs::EntryPoint;
use crate::devices::virtio::GuestMemory;
use crate::layout::*;

/// Errors of loading the guest's kernel, initramfs and boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initramfs file (path given) cannot be opened or stat'ed.
    #[error("Cannot open {0}")]
    Open(String, #[source] std::io::Error),
    /// The file (path given) is not a kernel this loader understands, or
    /// does not fit in guest memory.
    #[error("{0} is neither an x86_64 ELF vmlinux nor a bzImage")]
    NotAKernel(String, #[source] loader::Error),
    /// Reading the setup header of a bzImage failed.
    #[error("Cannot read the bzImage setup header")]
    SetupHeader(#[source] std::io::Error),
    /// The initramfs does not fit between the kernel's end and the top of
    /// low RAM.
    #[error("Initramfs of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitramfsTooLarge {
        /// Size of the initramfs file in bytes.
        size: u64,
        /// Guest physical address the initramfs had to end below.
        limit: u64,
    },
    /// Copying the initramfs into guest memory failed.
    #[error("Cannot load the initramfs")]
    Initramfs(#[source] vm_memory::GuestMemoryError),
    /// The command line has a bad character or is too long.
    #[error("Kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("Cannot write the kernel command line")]
    LoadCmdline(#[source] loader::Error),
    /// Writing the zero page into guest memory failed.
    #[error("Cannot write boot parameters to guest memory")]
    Params(#[source] vm_memory::GuestMemoryError),
}

/// Guest RAM ranges for `size` bytes of memory, skipping the MMIO gap.
pub fn memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if size > MMIO_GAP_START {
        regions.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    regions
}

/// E820 RAM ranges the kernel may use (type 1), as (start, length).
fn e820_ram(mem: &GuestMemory) -> Vec<(u64, u64)> {
    let mut ram = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIGH_MEMORY_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            ram.push((start, end - start));
        }
    }
    ram
}

/// What a loaded kernel needs from the rest of the boot.
pub struct LoadedKernel {
    /// Guest address of the kernel's 64-bit entry point (`startup_64`).
    pub entry: EntryPoint,
    /// Setup header bytes of a bzImage (copied into the zero page).
    setup_header: Option<Vec<u8>>,
    kernel_end: u64,
}

/// Loads an ELF vmlinux (entry: its ELF entry point, `startup_64`) or a
/// bzImage (64-bit entry 0x200 bytes into the protected-mode kernel).
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|e| BootError::Open(name.clone(), e))?;
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    match Elf::load(mem, None, &mut file, highmem) {
        Ok(res) => {
            let entry = EntryPoint(res.kernel_load.raw_value());
            Ok(LoadedKernel {
                entry,
                setup_header: None,
                kernel_end: res.kernel_end,
            })
        }
        Err(loader::Error::Elf(linux_loader::loader::elf::Error::InvalidElfMagicNumber)) => {
            let res = BzImage::load(mem, None, &mut file, highmem)
                .map_err(|e| BootError::NotAKernel(name, e))?;
            // startup_64 sits 0x200 bytes into the protected-mode kernel.
            let entry = EntryPoint(res.kernel_load.raw_value() + 0x200);
            Ok(LoadedKernel {
                entry,
                setup_header: Some(read_setup_header(&mut file)?),
                kernel_end: res.kernel_end,
            })
        }
        Err(e) => Err(BootError::NotAKernel(name, e)),
    }
}

/// Setup header of a bzImage: from 0x1f1 to the end given by the byte at 0x201.
fn read_setup_header(file: &mut File) -> Result<Vec<u8>, BootError> {
    let mut len = [0u8; 1];
    file.seek(SeekFrom::Start(0x201))
        .map_err(BootError::SetupHeader)?;
    file.read_exact(&mut len).map_err(BootError::SetupHeader)?;
    let mut hdr = vec![0u8; 0x202 + usize::from(len[0]) - 0x1f1];
    file.seek(SeekFrom::Start(0x1f1))
        .map_err(BootError::SetupHeader)?;
    file.read_exact(&mut hdr).map_err(BootError::SetupHeader)?;
    Ok(hdr)
}

/// Places the initramfs at the top of low RAM, page aligned, above the kernel.
/// Returns (address, size).
pub fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::Open(path.display().to_string(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::Open(path.display().to_string(), e))?
        .len();
    let low_end = mem.iter().next().map_or(0, |r| r.len());
    let limit = low_end.min(MMIO_GAP_START);
    let addr = limit.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel.kernel_end && a >= HIGH_MEMORY_START => a,
        _ => return Err(BootError::InitramfsTooLarge { size, limit }),
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::Initramfs)?;
    Ok((addr, size))
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::LoadCmdline)?;
    let cmdline_len = cmdline.len() as u32 + 1;
    write_zero_page(mem, kernel, cmdline_len, initramfs)
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn write_zero_page(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: u32,
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    // Offsets are those of `struct boot_params` (Documentation/arch/x86/zero-page.rst).
    let mut zp = vec![0u8; 4096];
    if let Some(hdr) = &kernel.setup_header {
        put(&mut zp, 0x1f1, hdr);
    }
    put(&mut zp, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut zp, 0x202, &0x5372_6448u32.to_le_bytes()); // "HdrS"
    zp[0x210] = 0xff; // type_of_loader: undefined
    zp[0x211] |= 0x01; // loadflags: LOADED_HIGH
    put(&mut zp, 0x228, &(CMDLINE_START as u32).to_le_bytes());
    put(&mut zp, 0x230, &0x0100_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut zp, 0x238, &cmdline_len.to_le_bytes());
    if let Some((addr, size)) = initramfs {
        put(&mut zp, 0x218, &(addr as u32).to_le_bytes());
        put(&mut zp, 0x21c, &(size as u32).to_le_bytes());
    }
    let ram = e820_ram(mem);
    zp[0x1e8] = ram.len() as u8;
    for (i, (start, len)) in ram.iter().enumerate() {
        let off = 0x2d0 + i * 20;
        put(&mut zp, off, &start.to_le_bytes());
        put(&mut zp, off + 8, &len.to_le_bytes());
        put(&mut zp, off + 16, &1u32.to_le_bytes());
    }
    mem.write_slice(&zp, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::Params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_mmio_gap() {
        assert_eq!(
            memory_regions(256 << 20),
            vec![(GuestAddress(0), 256 << 20)]
        );
        let r = memory_regions(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(MMIO_GAP_END),
                ((4u64 << 30) - MMIO_GAP_START) as usize
            )
        );
    }

    #[test]
    fn rejects_a_file_that_is_no_kernel() {
        let mem = GuestMemory::from_ranges(&memory_regions(64 << 20)).unwrap();
        let dir = moat_testutil::TempDir::new("boot");
        let file = dir.join("not-a-kernel");
        std::fs::write(&file, b"#!/bin/sh\necho not a kernel\n").unwrap();
        let err = load_kernel(&mem, &file).err().unwrap();
        assert!(err.to_string().contains("neither"), "{err}");
    }

    #[test]
    fn zero_page_fields() {
        let mem = GuestMemory::from_ranges(&memory_regions(64 << 20)).unwrap();
        let k = LoadedKernel {
            entry: EntryPoint(0x100_0000),
            setup_header: None,
            kernel_end: 0x200_0000,
        };
        write_boot_params(&mem, &k, "console=ttyS0", Some((0x300_0000, 0x1000))).unwrap();
        let ptr: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!(u64::from(ptr), CMDLINE_START);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(entries, 2);
        let rd: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x218)).unwrap();
        assert_eq!(rd, 0x300_0000);
        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
    }
}
