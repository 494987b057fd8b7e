//! The share server: answers one guest FUSE mount's requests from a host
//! directory with fuse-backend-rs's passthrough filesystem.
//!
//! [`main`] is the `fs-serve` process: it opens what it needs from the
//! host (`/proc/self/fd`, for the passthrough's reopen by descriptor),
//! then enters new mount and network namespaces and pivots into the shared
//! directory, so `/` is that directory and nothing above it is reachable,
//! whatever names the guest sends; then it installs its seccomp filter
//! ([`super::seccomp`]). [`serve`] is the request loop.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use caps::{CapSet, Capability, CapsHashSet};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader, Writer};
use moat_protocol::relay::{read_fuse_message, MAX_FUSE_MESSAGE};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::{CONNECTION_FD, FOLLOW_HOST_MOUNTS};

/// The smallest request: a whole `fuse_in_header`.
const IN_HEADER: usize = 40;

/// The passthrough filesystem for `root`: no cache in the guest beyond a
/// second of attributes, so each side sees the other's writes.
pub fn filesystem(root: &str) -> io::Result<PassthroughFs> {
    PassthroughFs::new(Config {
        root_dir: root.to_owned(),
        do_import: true,
        xattr: false,
        cache_policy: CachePolicy::Never,
        attr_timeout: Duration::from_secs(1),
        entry_timeout: Duration::from_secs(1),
        ..Default::default()
    })
}

/// The `fs-serve` process: `args` is the shared directory, then
/// [`FOLLOW_HOST_MOUNTS`] or nothing. Exits when the guest connection
/// closes.
pub fn main(args: &[OsString]) -> i32 {
    let (dir, follow) = match args {
        [dir] => (dir, false),
        [dir, flag] if flag == FOLLOW_HOST_MOUNTS => (dir, true),
        _ => {
            eprintln!(
                "usage: containerd-shim-moat-v1 {} DIR [{FOLLOW_HOST_MOUNTS}]",
                super::SUBCOMMAND
            );
            return 2;
        }
    };
    // SAFETY: the shim handed this descriptor over for us to own.
    let conn = unsafe { UnixStream::from_raw_fd(CONNECTION_FD) };
    let result = filesystem("/")
        .and_then(|fs| jail(Path::new(dir), follow).map(|()| fs))
        .and_then(|fs| {
            fs.import()?;
            drop_capabilities()?;
            super::seccomp::install()?;
            serve(conn, fs)
        });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fs-serve {}: {e}", Path::new(dir).display());
            1
        }
    }
}

/// Makes `dir` this process's root in new mount and network namespaces.
/// With `follow`, the namespace is a slave of the host's: a mount made on
/// the host below `dir` later appears in it (and so to the guest), while
/// nothing mounted here reaches the host; otherwise it is private.
fn jail(dir: &Path, follow: bool) -> io::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)?;
    let propagation = if follow {
        MsFlags::MS_SLAVE
    } else {
        MsFlags::MS_PRIVATE
    };
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | propagation,
        None::<&str>,
    )?;
    // pivot_root wants a mount point: the directory bound onto itself.
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    nix::unistd::chdir(dir)?;
    nix::unistd::pivot_root(".", ".")?;
    umount2(".", MntFlags::MNT_DETACH)?;
    nix::unistd::chdir("/")?;
    Ok(())
}

/// What the passthrough needs of root's capabilities: acting as each
/// caller (SETUID, SETGID), owners and modes (CHOWN, FOWNER, FSETID),
/// files whatever their mode (DAC_OVERRIDE: the guest kernel checked
/// them), hard links of an open descriptor (DAC_READ_SEARCH: linkat with
/// AT_EMPTY_PATH; the seccomp filter forbids open_by_handle_at, the other
/// use of it), device nodes (MKNOD). Mask 0x80000df.
const KEPT_CAPABILITIES: [Capability; 8] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
];

/// Keeps only [`KEPT_CAPABILITIES`], for good (bounding set too): no
/// CAP_SYS_ADMIN, CAP_NET_*, CAP_SYS_PTRACE or CAP_SYS_MODULE.
fn drop_capabilities() -> io::Result<()> {
    let keep: CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
    let fail = |e: caps::errors::CapsError| io::Error::other(format!("capabilities: {e}"));
    for c in caps::all().difference(&keep) {
        caps::drop(None, CapSet::Bounding, *c).map_err(fail)?;
    }
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(fail)?;
    // Effective first: it must stay within the permitted set.
    caps::set(None, CapSet::Effective, &keep).map_err(fail)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(fail)
}

/// Answers FUSE requests read from `conn` until it closes. A request the
/// filesystem cannot decode is answered with an error by the server, and
/// the loop goes on; a framing the stream cannot carry ends it.
pub fn serve(mut conn: UnixStream, fs: PassthroughFs) -> io::Result<()> {
    let server = Server::new(fs);
    let mut request = vec![0u8; MAX_FUSE_MESSAGE];
    let mut reply = vec![0u8; MAX_FUSE_MESSAGE];
    while let Some(len) = read_fuse_message(&mut conn, &mut request, IN_HEADER)? {
        let init = field_u32(&request, IN_OPCODE) == FUSE_INIT;
        let offered = field_u32(&request, IN_INIT_FLAGS);
        if !init {
            answer(&server, &mut request[..len], conn.as_raw_fd(), &mut reply)?;
            continue;
        }
        // The INIT answer goes through a socket pair to be amended.
        let (out, mut back) = UnixStream::pair()?;
        answer(&server, &mut request[..len], out.as_raw_fd(), &mut reply)?;
        out.shutdown(std::net::Shutdown::Write)?;
        let mut answered = Vec::new();
        back.read_to_end(&mut answered)?;
        amend_init(&mut answered, offered);
        conn.write_all(&answered)?;
    }
    Ok(())
}

/// Has the passthrough filesystem answer one request, writing to `fd`.
fn answer(
    server: &Server<PassthroughFs>,
    request: &mut [u8],
    fd: i32,
    reply: &mut [u8],
) -> io::Result<()> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let reader = Reader::<()>::from_fuse_buffer(FuseBuf::new(request))
        .map_err(|e| invalid(e.to_string()))?;
    let writer = FuseDevWriter::<()>::new(fd, reply).map_err(|e| invalid(e.to_string()))?;
    if let Err(e) = server.handle_message(reader, Writer::FuseDev(writer), None, None) {
        log::debug!("fs-serve: {e:?}");
    }
    Ok(())
}

/// `fuse_in_header.opcode`, and `fuse_init_in.flags` after the header.
const IN_OPCODE: usize = 4;
const IN_INIT_FLAGS: usize = IN_HEADER + 12;
/// `fuse_init_out` after the 16-byte `fuse_out_header`: flags, max_write
/// and max_pages.
const OUT_ERROR: usize = 4;
const OUT_INIT_FLAGS: usize = 16 + 12;
const OUT_MAX_WRITE: usize = 16 + 20;
const OUT_MAX_PAGES: usize = 16 + 28;
const FUSE_INIT: u32 = 26;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_MAX_PAGES: u32 = 1 << 22;
/// 1 MiB writes: 256 pages, what the request buffers hold.
const MAX_PAGES: u16 = 256;

fn field_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |f| u32::from_ne_bytes([f[0], f[1], f[2], f[3]]))
}

/// The passthrough filesystem does not ask for big writes, so the guest
/// would send 4 KiB at a time (a round trip through the guest kernel and
/// vsock each): its INIT answer is amended to take 1 MiB writes where
/// the guest kernel offers them.
fn amend_init(answer: &mut [u8], offered: u32) {
    if answer.len() < OUT_MAX_PAGES + 2 || field_u32(answer, OUT_ERROR) != 0 {
        return;
    }
    let mut flags = field_u32(answer, OUT_INIT_FLAGS);
    flags |= offered & (FUSE_BIG_WRITES | FUSE_MAX_PAGES);
    answer[OUT_INIT_FLAGS..OUT_INIT_FLAGS + 4].copy_from_slice(&flags.to_ne_bytes());
    if flags & FUSE_BIG_WRITES != 0 {
        let max_write = u32::from(MAX_PAGES) * 4096;
        answer[OUT_MAX_WRITE..OUT_MAX_WRITE + 4].copy_from_slice(&max_write.to_ne_bytes());
    }
    if flags & FUSE_MAX_PAGES != 0 {
        answer[OUT_MAX_PAGES..OUT_MAX_PAGES + 2].copy_from_slice(&MAX_PAGES.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_answer(error: i32, flags: u32) -> Vec<u8> {
        let mut a = vec![0u8; 16 + 64];
        let len = a.len() as u32;
        a[..4].copy_from_slice(&len.to_ne_bytes());
        a[OUT_ERROR..OUT_ERROR + 4].copy_from_slice(&error.to_ne_bytes());
        a[OUT_INIT_FLAGS..OUT_INIT_FLAGS + 4].copy_from_slice(&flags.to_ne_bytes());
        a[OUT_MAX_WRITE..OUT_MAX_WRITE + 4].copy_from_slice(&4096u32.to_ne_bytes());
        a
    }

    /// Big writes are taken where the kernel offers them, and only then;
    /// an error answer stays as it is.
    #[test]
    fn init_answers_take_big_writes_the_kernel_offers() {
        let mut a = init_answer(0, 0x1);
        amend_init(&mut a, FUSE_BIG_WRITES | FUSE_MAX_PAGES | 0x8);
        assert_eq!(
            field_u32(&a, OUT_INIT_FLAGS),
            0x1 | FUSE_BIG_WRITES | FUSE_MAX_PAGES
        );
        assert_eq!(field_u32(&a, OUT_MAX_WRITE), 1 << 20);
        assert_eq!(
            u16::from_ne_bytes([a[OUT_MAX_PAGES], a[OUT_MAX_PAGES + 1]]),
            256
        );

        let mut a = init_answer(0, 0x1);
        amend_init(&mut a, 0);
        assert_eq!(field_u32(&a, OUT_INIT_FLAGS), 0x1);
        assert_eq!(field_u32(&a, OUT_MAX_WRITE), 4096);

        let mut failed = init_answer(-libc::EPROTO, 0);
        let before = failed.clone();
        amend_init(&mut failed, FUSE_BIG_WRITES);
        assert_eq!(failed, before);
    }
}
