//! Parsing and serving one virtio-blk request.
//!
//! The worker only hands over chains that are well formed (they end within
//! the queue size and lie in guest memory; see `worker::next_chain`); a
//! malformed one puts the device in DEVICE_NEEDS_RESET instead. What the
//! request says is checked here: the request against the capacity, the
//! data direction against the request type, the buffer layout. A request
//! that fails a check gets `VIRTIO_BLK_S_IOERR` (`VIRTIO_BLK_S_UNSUPP` for
//! an unknown type) when its status byte can be written; a chain without
//! one is handed back untouched, with length 0. Guest memory is checked
//! again on use, as the guest may rewrite a chain after it was checked.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::{
    QUEUE_SIZE, SECTOR_SHIFT, SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use crate::devices::virtio::device::GuestMemory;

/// Size of `virtio_blk_outhdr`: type, reserved, sector.
const HEADER_LEN: u32 = 16;

/// The backing a request is served from: a snapshot, so that a replacement
/// in the middle of a request does not mix two files.
#[derive(Clone, Debug, Default)]
pub struct Backing {
    /// None: an empty slot, every I/O fails.
    pub file: Option<Arc<File>>,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// The device is read-only: writes fail with IOERR.
    pub read_only: bool,
}

/// Part of a descriptor, already checked to lie in guest memory.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segments` after `at` bytes; None when they hold fewer bytes.
fn split_segments(segments: &[Segment], at: u32) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut head = Vec::new();
    let mut left = at;
    for (i, s) in segments.iter().enumerate() {
        if left == 0 {
            return Some((head, segments[i..].to_vec()));
        }
        if s.len > left {
            head.push(Segment {
                addr: s.addr,
                len: left,
            });
            let mut tail = vec![Segment {
                // Cannot wrap: the whole descriptor is in guest memory.
                addr: s.addr.unchecked_add(u64::from(left)),
                len: s.len - left,
            }];
            tail.extend_from_slice(&segments[i + 1..]);
            return Some((head, tail));
        }
        head.push(*s);
        left -= s.len;
    }
    (left == 0).then_some((head, Vec::new()))
}

/// A parsed request: its header and its data buffers, status byte excluded.
#[derive(Debug)]
struct Request {
    kind: u32,
    sector: u64,
    /// Device-readable data after the header.
    out_data: Vec<Segment>,
    /// Device-writable data before the status byte.
    in_data: Vec<Segment>,
}

fn in_memory(mem: &GuestMemory, desc: &Descriptor) -> bool {
    GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize)
}

impl Request {
    /// Parses the descriptors before the status one; `status` is the last
    /// descriptor, whose final byte is the status.
    fn parse(mem: &GuestMemory, descs: &[Descriptor], status: &Descriptor) -> Option<Self> {
        // A header descriptor and at most SEG_MAX data ones.
        if descs.len() > SEG_MAX as usize + 1 || !in_memory(mem, status) {
            return None;
        }
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        for desc in descs {
            if !in_memory(mem, desc) {
                return None;
            }
            if desc.len() == 0 {
                continue;
            }
            let segment = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                writable.push(segment);
            } else if writable.is_empty() {
                readable.push(segment);
            } else {
                // The spec puts all device-readable buffers first.
                return None;
            }
        }
        if status.len() > 1 {
            writable.push(Segment {
                addr: status.addr(),
                len: status.len() - 1,
            });
        }
        let (header, out_data) = split_segments(&readable, HEADER_LEN)?;
        let mut raw = [0u8; HEADER_LEN as usize];
        let mut filled = 0;
        for s in header {
            let end = filled + s.len as usize;
            mem.read_slice(&mut raw[filled..end], s.addr).ok()?;
            filled = end;
        }
        let kind = u32::from_le_bytes(raw[..4].try_into().unwrap());
        let sector = u64::from_le_bytes(raw[8..].try_into().unwrap());
        Some(Request {
            kind,
            sector,
            out_data,
            in_data: writable,
        })
    }

    /// Serves the request. Returns how many data bytes it wrote into the
    /// guest's buffers, or the failure status.
    fn execute(&self, mem: &GuestMemory, backing: &Backing, id: &[u8]) -> Result<u32, u8> {
        let in_len = total_len(&self.in_data);
        let out_len = total_len(&self.out_data);
        match self.kind {
            VIRTIO_BLK_T_IN => {
                if out_len != 0 {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let (file, offset) = io_target(backing, self.sector, in_len)?;
                for_each_slice(mem, &self.in_data, offset, |slice, offset| {
                    pread_exact(file, slice, offset)
                })?;
                // At most the chain's length, which virtio-queue caps at 4 GiB.
                u32::try_from(in_len).map_err(|_| VIRTIO_BLK_S_IOERR)
            }
            VIRTIO_BLK_T_OUT => {
                if in_len != 0 || backing.read_only {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let (file, offset) = io_target(backing, self.sector, out_len)?;
                for_each_slice(mem, &self.out_data, offset, |slice, offset| {
                    pwrite_all(file, slice, offset)
                })?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if in_len != 0 || out_len != 0 {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let file = backing.file.as_ref().ok_or(VIRTIO_BLK_S_IOERR)?;
                // Nothing was written through a read-only backing.
                if !backing.read_only {
                    file.sync_data().map_err(|_| VIRTIO_BLK_S_IOERR)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if out_len != 0 {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let mut left = &id[..id.len().min(in_len as usize)];
                let written = left.len() as u32;
                for s in &self.in_data {
                    if left.is_empty() {
                        break;
                    }
                    let n = left.len().min(s.len as usize);
                    mem.write_slice(&left[..n], s.addr)
                        .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                    left = &left[n..];
                }
                Ok(written)
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }
}

/// The file and byte offset of a `len`-byte transfer at `sector`, when the
/// backing exists and holds the whole range.
fn io_target(backing: &Backing, sector: u64, len: u64) -> Result<(&File, u64), u8> {
    let file = backing.file.as_deref().ok_or(VIRTIO_BLK_S_IOERR)?;
    if !len.is_multiple_of(super::SECTOR_SIZE) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let offset = sector
        .checked_mul(1 << SECTOR_SHIFT)
        .ok_or(VIRTIO_BLK_S_IOERR)?;
    let end = offset.checked_add(len).ok_or(VIRTIO_BLK_S_IOERR)?;
    if end > backing.sectors << SECTOR_SHIFT {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    Ok((file, offset))
}

/// Calls `f` on each host mapping of `segments`, with the file offset that
/// goes with it, starting at `offset`.
fn for_each_slice<F>(
    mem: &GuestMemory,
    segments: &[Segment],
    mut offset: u64,
    mut f: F,
) -> Result<(), u8>
where
    F: FnMut(&VolatileSlice<'_, ()>, u64) -> io::Result<()>,
{
    for s in segments {
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = slice.map_err(|_| VIRTIO_BLK_S_IOERR)?;
            if let Err(err) = f(&slice, offset) {
                log::warn!("block: I/O at offset {offset} failed: {err}");
                return Err(VIRTIO_BLK_S_IOERR);
            }
            offset += slice.len() as u64;
        }
    }
    Ok(())
}

fn file_offset(offset: u64) -> io::Result<libc::off64_t> {
    libc::off64_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Reads `slice.len()` bytes at `offset` of `file` straight into guest memory.
fn pread_exact(file: &File, slice: &VolatileSlice<'_, ()>, offset: u64) -> io::Result<()> {
    let guard = slice.ptr_guard_mut();
    let mut done = 0;
    while done < slice.len() {
        // SAFETY: `guard` points to `slice.len()` bytes of mapped guest
        // memory that stay mapped while `slice` borrows the guest memory;
        // the kernel writes at most `slice.len() - done` bytes from `done` on.
        let ret = unsafe {
            libc::pread64(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                slice.len() - done,
                file_offset(offset + done as u64)?,
            )
        };
        match ret {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    slice.bitmap().mark_dirty(0, slice.len());
    Ok(())
}

/// Writes the guest memory of `slice` to `file` at `offset`.
fn pwrite_all(file: &File, slice: &VolatileSlice<'_, ()>, offset: u64) -> io::Result<()> {
    let guard = slice.ptr_guard();
    let mut done = 0;
    while done < slice.len() {
        // SAFETY: `guard` points to `slice.len()` bytes of mapped guest
        // memory that stay mapped while `slice` borrows the guest memory;
        // the kernel only reads them.
        let ret = unsafe {
            libc::pwrite64(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                slice.len() - done,
                file_offset(offset + done as u64)?,
            )
        };
        match ret {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => done += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// Serves the request in `chain` and writes its status byte. Returns the
/// length to put in the used ring: how many bytes from the start of the
/// device-writable buffers the device wrote.
pub fn process(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    backing: &Backing,
    id: &[u8; VIRTIO_BLK_ID_BYTES],
) -> u32 {
    let mut descs = Vec::new();
    let mut complete = false;
    // A checked chain is at most a queue long; one the guest lengthened
    // since (an indirect table can hold 64 Ki entries) is cut there.
    for desc in chain {
        if descs.len() == usize::from(QUEUE_SIZE) {
            break;
        }
        let last = !desc.has_next();
        descs.push(desc);
        if last {
            complete = true;
            break;
        }
    }
    // Otherwise the guest broke the chain after it was checked: it has no
    // last descriptor to hold the status.
    if !complete {
        return 0;
    }
    let Some((status, descs)) = descs.split_last() else {
        return 0;
    };
    if !status.is_write_only() || status.len() == 0 {
        return 0;
    }
    let Some(status_addr) = status.addr().checked_add(u64::from(status.len() - 1)) else {
        return 0;
    };
    if !GuestMemoryBackend::address_in_range(mem, status_addr) {
        return 0;
    }
    // Device-writable bytes before the status byte.
    let writable_before: u64 = descs
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum::<u64>()
        + u64::from(status.len() - 1);
    let result = match Request::parse(mem, descs, status) {
        Some(request) => request.execute(mem, backing, id),
        None => Err(VIRTIO_BLK_S_IOERR),
    };
    let (status_byte, used) = match result {
        // When the data filled every buffer, the status byte follows it.
        Ok(n) if u64::from(n) == writable_before => (VIRTIO_BLK_S_OK, n.saturating_add(1)),
        Ok(n) => (VIRTIO_BLK_S_OK, n),
        // Only the status byte was surely written: it counts when it is the
        // first writable byte.
        Err(status) => (status, u32::from(writable_before == 0)),
    };
    if mem.write_obj(status_byte, status_addr).is_err() {
        return 0;
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn split_segments_at_boundaries() {
        let segs = [seg(0x1000, 10), seg(0x2000, 10)];
        let (h, t) = split_segments(&segs, 10).unwrap();
        assert_eq!((h.len(), t.len()), (1, 1));
        assert_eq!(t[0].addr, GuestAddress(0x2000));
        let (h, t) = split_segments(&segs, 16).unwrap();
        assert_eq!(total_len(&h), 16);
        assert_eq!((t[0].addr, t[0].len), (GuestAddress(0x2006), 4));
        let (h, t) = split_segments(&segs, 20).unwrap();
        assert_eq!((total_len(&h), t.len()), (20, 0));
        assert!(split_segments(&segs, 21).is_none());
    }

    #[test]
    fn io_target_checks_range_and_alignment() {
        let backing = Backing {
            file: Some(Arc::new(
                vmm_sys_util::tempfile::TempFile::new().unwrap().into_file(),
            )),
            sectors: 8,
            read_only: false,
        };
        assert_eq!(io_target(&backing, 7, 512).unwrap().1, 7 * 512);
        assert_eq!(io_target(&backing, 8, 0).unwrap().1, 8 * 512);
        assert_eq!(
            io_target(&backing, 7, 1024).unwrap_err(),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(io_target(&backing, 0, 100).unwrap_err(), VIRTIO_BLK_S_IOERR);
        assert_eq!(
            io_target(&backing, u64::MAX, 512).unwrap_err(),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            io_target(&backing, 1 << 55, 512).unwrap_err(),
            VIRTIO_BLK_S_IOERR
        );
        let empty = Backing::default();
        assert_eq!(io_target(&empty, 0, 0).unwrap_err(), VIRTIO_BLK_S_IOERR);
    }
}
