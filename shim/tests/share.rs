//! A shared directory end to end on the host: the real `fs-serve` server
//! (the shim binary) on one end of a socket pair, the guest agent's FUSE
//! mount and relay on the other, here mounted in the host's namespace in
//! the guest's place. Needs root and /dev/fuse; skipped loudly without.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

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
    fs::create_dir_all(&mnt).unwrap();
    fs::write(dir.join("sub/hello"), "from the host").unwrap();

    let (guest, host) = UnixStream::pair().unwrap();
    let share = Share {
        tag: "c1-m0".into(),
        dir: dir.clone(),
    };
    let exe = Path::new(env!("CARGO_BIN_EXE_containerd-shim-moat-v1"));
    // A plain file stands in for the pod cgroup's cgroup.procs.
    let procs_path = tmp.join("cgroup.procs");
    let procs = fs::File::create(&procs_path).unwrap();
    let server = ShareServer::spawn(exe, &share, host, vec![procs.as_raw_fd()]).unwrap();
    // It joined the pod's cgroup before exec (spawn returns after the exec).
    assert_eq!(fs::read_to_string(&procs_path).unwrap(), "0");
    let dev = moat_agent::share::mount_fuse(&mnt).unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(&mnt);
    let relay = std::thread::spawn(move || moat_protocol::relay::fuse(dev, guest));

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
    drop(server);
    assert!(fs::read_dir(&mnt).is_err());
    relay.join().unwrap().unwrap();
}
