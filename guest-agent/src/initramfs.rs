//! A reproducible newc (SVR4 "070701") cpio writer for the guest initramfs:
//! fixed inode numbers, mtime 0, uid/gid 0, entries in the order given.
//! Writing the archive directly avoids needing root for /dev/console.

use std::io::{self, Write};

/// One archive member.
///
/// Paths are relative to the archive root, without a leading slash (e.g.
/// `dev/console`); a member's parent directories must come before it.
/// Modes are permission bits only: the file type is added from the variant.
pub enum Entry<'a> {
    /// A directory.
    Dir {
        /// Where it goes.
        path: &'a str,
        /// Permission bits, e.g. 0o755.
        mode: u32,
    },
    /// A regular file with its contents.
    File {
        /// Where it goes.
        path: &'a str,
        /// Permission bits, e.g. 0o755.
        mode: u32,
        /// The file's bytes.
        data: &'a [u8],
    },
    /// A character device node.
    CharDev {
        /// Where it goes.
        path: &'a str,
        /// Permission bits, e.g. 0o600.
        mode: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

fn pad4(w: &mut impl Write, len: usize) -> io::Result<()> {
    w.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        size as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize as u32,
        0,
    ];
    let mut h = String::from("070701");
    for f in fields {
        h.push_str(&format!("{f:08x}"));
    }
    w.write_all(h.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + namesize)
}

/// Writes `entries` and the trailer.
pub fn write(w: &mut impl Write, entries: &[Entry<'_>]) -> io::Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir { path, mode } => header(w, ino, 0o040000 | mode, 0, (0, 0), path)?,
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => header(w, ino, 0o020000 | mode, 0, (*major, *minor), path)?,
            Entry::File { path, mode, data } => {
                header(w, ino, 0o100000 | mode, data.len(), (0, 0), path)?;
                w.write_all(data)?;
                pad4(w, data.len())?;
            }
        }
    }
    header(w, 0, 0, 0, (0, 0), "TRAILER!!!")
}

/// The guest initramfs: /dev, /dev/console and the agent as /init.
pub fn guest_initramfs(agent: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(agent.len() + 1024);
    write(
        &mut out,
        &[
            Entry::Dir {
                path: "dev",
                mode: 0o755,
            },
            Entry::CharDev {
                path: "dev/console",
                mode: 0o600,
                major: 5,
                minor: 1,
            },
            Entry::File {
                path: "init",
                mode: 0o755,
                data: agent,
            },
        ],
    )
    .expect("writing to a Vec cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let a = guest_initramfs(b"ELF!x");
        assert_eq!(a, guest_initramfs(b"ELF!x"), "reproducible");
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        // dev/console: char device 5:1, mode 0600.
        let i = text.find("dev/console").unwrap();
        let h = &text[i - 110..i];
        assert_eq!(&h[14..22], "00002180");
        assert_eq!(&h[78..86], "00000005");
        assert_eq!(&h[86..94], "00000001");
        assert!(text.contains("init\0"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
    }
}
