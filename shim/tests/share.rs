//! A shared directory end to end on the host: the real `fs-serve` server
//! (the shim binary) on one end of a socket pair, the guest agent's FUSE
//! mount and relay on the other, here mounted in the host's namespace in
//! the guest's place. Needs root and /dev/fuse; skipped loudly without.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use containerd_shim_moat_v1::share::{Share, ShareServer};
use moat_testutil::TempDir;

fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root to mount");
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse");
    }
    None
}

/// Unmounts (lazily) when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A share server for `dir` and the guest's side of it: the FUSE mount at
/// `mnt` and its relay. Dropping it unmounts.
struct Served {
    server: ShareServer,
    relay: JoinHandle<std::io::Result<()>>,
    _unmount: Unmount,
}

fn serve(dir: &Path, mnt: &Path, follow_host_mounts: bool, cgroup_procs: Vec<i32>) -> Served {
    fs::create_dir_all(mnt).unwrap();
    let (guest, host) = UnixStream::pair().unwrap();
    let share = Share {
        tag: "c1-m0".into(),
        dir: dir.to_owned(),
        follow_host_mounts,
    };
    let exe = Path::new(env!("CARGO_BIN_EXE_containerd-shim-moat-v1"));
    let server = ShareServer::spawn(exe, &share, host, cgroup_procs).unwrap();
    let dev = moat_agent::share::mount_fuse(mnt).unwrap();
    let unmount = Unmount(mnt.to_owned());
    let relay = std::thread::spawn(move || moat_protocol::relay::fuse(dev, guest));
    // Answered once the server is jailed and serving (the root only: no
    // name below it is looked up, and so cached, yet).
    fs::metadata(mnt).unwrap();
    Served {
        server,
        relay,
        _unmount: unmount,
    }
}

#[test]
fn a_share_reads_and_writes_the_host_directory_from_a_jail() {
    if let Some(why) = skip_reason() {
        eprintln!("!!! SKIPPED a_share_reads_and_writes_the_host_directory_from_a_jail: {why}");
        return;
    }
    // SAFETY: umask has no preconditions; the modes below assume 022.
    unsafe { libc::umask(0o022) };
    let tmp = TempDir::new("share");
    let dir = tmp.join("shared");
    let mnt = tmp.join("mnt");
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("sub/hello"), "from the host").unwrap();

    // A plain file stands in for the pod cgroup's cgroup.procs.
    let procs_path = tmp.join("cgroup.procs");
    let procs = fs::File::create(&procs_path).unwrap();
    let served = serve(&dir, &mnt, false, vec![procs.as_raw_fd()]);
    let server = &served.server;
    // It joined the pod's cgroup before exec (spawn returns after the exec).
    assert_eq!(fs::read_to_string(&procs_path).unwrap(), "0");

    // Reads, writes, directories, renames and removals cross both ways.
    assert_eq!(
        fs::read_to_string(mnt.join("sub/hello")).unwrap(),
        "from the host"
    );
    fs::write(mnt.join("sub/new"), "from the guest").unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("sub/new")).unwrap(),
        "from the guest"
    );
    let mode = fs::metadata(dir.join("sub/new")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o644, "{mode:o}: the umask applies");
    fs::create_dir(mnt.join("made")).unwrap();
    fs::rename(mnt.join("sub/new"), mnt.join("made/moved")).unwrap();
    assert!(dir.join("made/moved").is_file());
    fs::remove_file(mnt.join("sub/hello")).unwrap();
    assert!(!dir.join("sub/hello").exists());
    // A large write and read back (1 MiB requests, the INIT answer amended).
    let big: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
    fs::write(mnt.join("big"), &big).unwrap();
    assert_eq!(fs::read(dir.join("big")).unwrap(), big);
    assert_eq!(fs::read(mnt.join("big")).unwrap(), big);
    fs::write(dir.join("later"), "written on the host").unwrap();
    assert_eq!(
        fs::read_to_string(mnt.join("later")).unwrap(),
        "written on the host"
    );
    // A file made as another user belongs to that user on the host.
    fs::set_permissions(mnt.join("made"), fs::Permissions::from_mode(0o777)).unwrap();
    let made = std::process::Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "touch"])
        .arg(mnt.join("made/by-1000"))
        .status()
        .expect("run setpriv (util-linux)");
    assert!(made.success());
    let owner = fs::metadata(dir.join("made/by-1000")).unwrap();
    assert_eq!((owner.uid(), owner.gid()), (1000, 1000));
    // And the kernel checks modes: that user may not write root's file.
    let denied = std::process::Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c"])
        .arg(format!("echo x > {}", mnt.join("later").display()))
        .status()
        .unwrap();
    assert!(!denied.success());

    // The rest of what the passthrough does, under the server's seccomp
    // filter: listing, links, truncation, sync, modes, times, statfs.
    let mut names: Vec<String> = fs::read_dir(mnt.join("made"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["by-1000", "moved"]);
    std::os::unix::fs::symlink("moved", mnt.join("made/link")).unwrap();
    assert_eq!(
        fs::read_link(dir.join("made/link")).unwrap(),
        Path::new("moved")
    );
    fs::hard_link(mnt.join("big"), mnt.join("big-too")).unwrap();
    assert_eq!(fs::metadata(dir.join("big")).unwrap().nlink(), 2);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big-too"))
        .unwrap();
    f.set_len(5).unwrap();
    f.sync_all().unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30))
        .unwrap();
    drop(f);
    let big = fs::metadata(dir.join("big")).unwrap();
    assert_eq!((big.len(), big.mtime()), (5, 1 << 30));
    fs::set_permissions(mnt.join("big"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(dir.join("big")).unwrap().mode() & 0o777, 0o600);
    let df = std::process::Command::new("stat")
        .args(["-f", "-c", "%b"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(df.status.success(), "statfs: {df:?}");
    let status = fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    assert!(status.contains("Seccomp:\t2"), "no filter:\n{status}");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert!(
            status.contains(&format!("{set}:\t00000000080000df")),
            "{set}: not only the kept capabilities:\n{status}"
        );
    }

    // The server's root is the shared directory itself (the same inode).
    let root = fs::metadata(format!("/proc/{}/root", server.pid())).unwrap();
    let shared = fs::metadata(&dir).unwrap();
    assert_eq!((root.dev(), root.ino()), (shared.dev(), shared.ino()));

    // Stopping the server fails the mount's users at once.
    let Served {
        server,
        relay,
        _unmount,
    } = served;
    drop(server);
    assert!(fs::read_dir(&mnt).is_err());
    relay.join().unwrap().unwrap();
}

/// A mount made on the host below a shared directory after its server
/// started reaches the guest only when the volume asked for it (`rslave`,
/// `rshared`), never with the default `rprivate`.
#[test]
fn a_share_follows_host_mounts_only_when_asked() {
    if let Some(why) = skip_reason() {
        eprintln!("!!! SKIPPED a_share_follows_host_mounts_only_when_asked: {why}");
        return;
    }
    use nix::mount::{mount, MsFlags};
    let tmp = TempDir::new("share-mounts");
    let dir = tmp.join("shared");
    fs::create_dir_all(dir.join("m")).unwrap();
    // The directory as a shared mount of its own, as / is under systemd.
    mount(
        Some(&dir),
        &dir,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let _shared = Unmount(dir.clone());
    mount(
        None::<&str>,
        &dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap();
    let private = serve(&dir, &tmp.join("private"), false, Vec::new());
    let slave = serve(&dir, &tmp.join("slave"), true, Vec::new());

    mount(
        Some("tmpfs"),
        &dir.join("m"),
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let _tmpfs = Unmount(dir.join("m"));
    fs::write(dir.join("m/new"), "on a later mount").unwrap();
    assert_eq!(
        fs::read_to_string(tmp.join("slave/m/new")).unwrap(),
        "on a later mount"
    );
    assert!(!tmp.join("private/m/new").exists());
    drop((private, slave));
}
