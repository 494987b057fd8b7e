//! The share server: answers one guest FUSE mount's requests from a host
//! directory with fuse-backend-rs's passthrough filesystem.
//!
//! [`main`] is the `fs-serve` process: it opens what it needs from the
//! host (`/proc/self/fd`, for the passthrough's reopen by descriptor),
//! then enters new mount and network namespaces and pivots into the shared
//! directory, so `/` is that directory and nothing above it is reachable,
//! whatever names the guest sends. [`serve`] is the request loop.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader, Writer};
use moat_protocol::relay::MAX_FUSE_MESSAGE;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::CONNECTION_FD;

/// `fuse_in_header`'s length field comes first.
const LEN_FIELD: usize = 4;
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

/// The `fs-serve` process: `args` is the shared directory. Exits when the
/// guest connection closes.
pub fn main(args: &[OsString]) -> i32 {
    let [dir] = args else {
        eprintln!("usage: containerd-shim-moat-v1 {} DIR", super::SUBCOMMAND);
        return 2;
    };
    // SAFETY: the shim handed this descriptor over for us to own.
    let conn = unsafe { UnixStream::from_raw_fd(CONNECTION_FD) };
    let result = filesystem("/")
        .and_then(|fs| jail(Path::new(dir)).map(|()| fs))
        .and_then(|fs| {
            fs.import()?;
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
fn jail(dir: &Path) -> io::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
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

/// Answers FUSE requests read from `conn` until it closes. A request the
/// filesystem cannot decode is answered with an error by the server, and
/// the loop goes on; a framing the stream cannot carry ends it.
pub fn serve(mut conn: UnixStream, fs: PassthroughFs) -> io::Result<()> {
    let server = Server::new(fs);
    let mut request = vec![0u8; MAX_FUSE_MESSAGE];
    let mut reply = vec![0u8; MAX_FUSE_MESSAGE];
    loop {
        if let Err(e) = conn.read_exact(&mut request[..LEN_FIELD]) {
            return match e.kind() {
                io::ErrorKind::UnexpectedEof => Ok(()),
                _ => Err(e),
            };
        }
        let len = u32::from_ne_bytes([request[0], request[1], request[2], request[3]]) as usize;
        if !(IN_HEADER..=MAX_FUSE_MESSAGE).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a FUSE request of {len} bytes"),
            ));
        }
        conn.read_exact(&mut request[LEN_FIELD..len])?;
        let reader = Reader::<()>::from_fuse_buffer(FuseBuf::new(&mut request[..len]))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let writer = FuseDevWriter::<()>::new(conn.as_raw_fd(), &mut reply)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if let Err(e) = server.handle_message(reader, Writer::FuseDev(writer), None, None) {
            log::debug!("fs-serve: {e:?}");
        }
    }
}
