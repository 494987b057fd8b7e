//! A log file that never grows past a size cap: the console and vmm.log
//! are written with what a guest chooses to print, and usually live on a
//! tmpfs (host RAM).
//!
//! When a write would take the file past its cap, the file is rotated in
//! place: its newest half (from a line start) moves to the front and the
//! rest is cut off. In place, because a jailed moat-vmm can neither create
//! nor rename files. A file opened write-only cannot be read back: it then
//! starts over empty instead.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use moat_vmm_api::limits::MIN_LOG_MAX_BYTES as MIN_CAP;

/// Bytes copied at a time while rotating.
const CHUNK: usize = 64 * 1024;

/// A file written at its end, at most `cap` bytes long.
pub struct CappedFile {
    file: File,
    cap: u64,
}

impl CappedFile {
    /// Caps `file` at `cap` bytes (at least [`MIN_CAP`]). Writes go to its
    /// end, wherever other writers (O_APPEND) left it; the file's own
    /// O_APPEND is cleared, since rotation writes at its start.
    pub fn new(file: File, cap: u64) -> io::Result<Self> {
        // SAFETY: fcntl on an fd we own; return values are checked.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags < 0
                || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_APPEND) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self {
            file,
            cap: cap.max(MIN_CAP),
        })
    }

    /// Keeps the newest half of the file's `size` bytes, from the first
    /// line start in it; returns the new size.
    fn rotate(&self, size: u64) -> io::Result<u64> {
        let keep = (self.cap / 2).min(size);
        let from = size - keep;
        let mut chunk = vec![0u8; CHUNK.min(keep as usize)];
        let n = match self.file.read_at(&mut chunk, from) {
            Ok(n) => n,
            // Write-only: nothing can be kept.
            Err(err) if err.raw_os_error() == Some(libc::EBADF) => {
                self.file.set_len(0)?;
                return Ok(0);
            }
            Err(err) => return Err(err),
        };
        let skip = chunk[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(0, |i| i + 1) as u64;
        let (mut src, mut dst) = (from + skip, 0u64);
        while src < size {
            let len = chunk.len().min((size - src) as usize);
            self.file.read_exact_at(&mut chunk[..len], src)?;
            self.file.write_all_at(&chunk[..len], dst)?;
            src += len as u64;
            dst += len as u64;
        }
        self.file.set_len(dst)?;
        Ok(dst)
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut size = self.file.metadata()?.len();
        if size + buf.len() as u64 > self.cap {
            size = self.rotate(size)?;
        }
        // What does not fit goes with the next call (write_all loops).
        let room = (self.cap - size) as usize;
        let buf = &buf[..buf.len().min(room)];
        self.file.write_at(buf, size)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    #[test]
    fn rotation_keeps_the_newest_whole_lines_under_the_cap() {
        let tmp = TempFile::new().unwrap();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(tmp.as_path())
            .unwrap();
        let mut capped = CappedFile::new(file, MIN_CAP).unwrap();
        for i in 0..2000 {
            writeln!(capped, "line {i:05} of the console").unwrap();
            let len = std::fs::metadata(tmp.as_path()).unwrap().len();
            assert!(len <= MIN_CAP, "{len} bytes after line {i}");
        }
        let text = std::fs::read_to_string(tmp.as_path()).unwrap();
        assert!(text.starts_with("line "), "{text:.40}");
        assert!(text.ends_with("line 01999 of the console\n"));
        assert!(text.len() as u64 > MIN_CAP / 2 - 100);
        // One write larger than the cap is cut to fit.
        capped.write_all(&vec![b'x'; 3 * MIN_CAP as usize]).unwrap();
        assert!(std::fs::metadata(tmp.as_path()).unwrap().len() <= MIN_CAP);
    }

    #[test]
    fn a_write_only_file_starts_over() {
        let tmp = TempFile::new().unwrap();
        let file = OpenOptions::new().write(true).open(tmp.as_path()).unwrap();
        let mut capped = CappedFile::new(file, MIN_CAP).unwrap();
        for i in 0..1000 {
            writeln!(capped, "line {i:05} of the log").unwrap();
        }
        let len = std::fs::metadata(tmp.as_path()).unwrap().len();
        assert!(len <= MIN_CAP, "{len}");
        let text = std::fs::read_to_string(tmp.as_path()).unwrap();
        assert!(text.ends_with("line 00999 of the log\n"));
    }
}
