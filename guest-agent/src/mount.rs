//! Container root filesystems (erofs layers + writable upper, joined by
//! overlayfs), block device lookup, mount option parsing, and path
//! resolution that cannot escape a root.

use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use moat_protocol::agent::{source::Kind, Rootfs, Source, Volume};
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;

use crate::error::{AgentError, IoContext, Result};
use crate::syscall::Syscall;

/// Parsed OCI / fstab style mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// mount(2) flags: `ro`, `nosuid`, `bind`... (later words win over
    /// earlier ones, e.g. `ro,rw` is read-write).
    pub flags: MsFlags,
    /// Propagation change to apply after mounting (MS_PRIVATE, MS_SLAVE, ...).
    pub propagation: MsFlags,
    /// Filesystem-specific options, comma-joined for mount(2) data.
    pub data: Vec<String>,
    /// `bind` or `rbind` was given: bind-mount the source.
    pub bind: bool,
}

impl MountOptions {
    /// Sorts option words into flags, propagation and filesystem data
    /// (every word it does not know). Never fails.
    pub fn parse(options: &[String]) -> MountOptions {
        let mut o = MountOptions {
            flags: MsFlags::empty(),
            propagation: MsFlags::empty(),
            data: Vec::new(),
            bind: false,
        };
        for opt in options {
            let (set, clear, prop) = match opt.as_str() {
                "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), None),
                "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, None),
                "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), None),
                "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, None),
                "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), None),
                "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, None),
                "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), None),
                "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, None),
                "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), None),
                "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), None),
                "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), None),
                "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), None),
                "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), None),
                "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), None),
                "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty(), None),
                "bind" => {
                    o.bind = true;
                    (MsFlags::MS_BIND, MsFlags::empty(), None)
                }
                "rbind" => {
                    o.bind = true;
                    (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty(), None)
                }
                "private" => (
                    MsFlags::empty(),
                    MsFlags::empty(),
                    Some(MsFlags::MS_PRIVATE),
                ),
                "rprivate" => (
                    MsFlags::empty(),
                    MsFlags::empty(),
                    Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
                ),
                "slave" => (MsFlags::empty(), MsFlags::empty(), Some(MsFlags::MS_SLAVE)),
                "rslave" => (
                    MsFlags::empty(),
                    MsFlags::empty(),
                    Some(MsFlags::MS_SLAVE | MsFlags::MS_REC),
                ),
                "shared" => (MsFlags::empty(), MsFlags::empty(), Some(MsFlags::MS_SHARED)),
                "rshared" => (
                    MsFlags::empty(),
                    MsFlags::empty(),
                    Some(MsFlags::MS_SHARED | MsFlags::MS_REC),
                ),
                "unbindable" => (
                    MsFlags::empty(),
                    MsFlags::empty(),
                    Some(MsFlags::MS_UNBINDABLE),
                ),
                "runbindable" => (
                    MsFlags::empty(),
                    MsFlags::empty(),
                    Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
                ),
                "defaults" | "async" | "atime" | "diratime" | "norelatime" | "nostrictatime" => {
                    (MsFlags::empty(), MsFlags::empty(), None)
                }
                other => {
                    o.data.push(other.to_owned());
                    continue;
                }
            };
            o.flags = (o.flags | set) & !clear;
            if let Some(p) = prop {
                o.propagation = p;
            }
        }
        o
    }

    /// The filesystem options as mount(2) `data`; `None` when there are none.
    pub fn data_string(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

/// Finds the block device whose virtio-blk serial is `serial`, waiting a
/// little for devices that are still being probed.
pub fn find_by_serial(sysfs_block: &Path, serial: &str) -> Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(entries) = fs::read_dir(sysfs_block) {
            for entry in entries.flatten() {
                if let Ok(s) = fs::read_to_string(entry.path().join("serial")) {
                    if s.trim_end_matches(['\n', '\0', ' ']) == serial {
                        return Ok(Path::new("/dev").join(entry.file_name()));
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(AgentError::InvalidArgument(format!(
                "no block device with serial {serial:?} under {}",
                sysfs_block.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a [`Source`] refers to in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A block device node to mount, e.g. `/dev/vdc`.
    Device(PathBuf),
    /// A guest directory to bind-mount as it is.
    Directory(PathBuf),
}

/// Turns a volume's source into a guest path: a serial is looked up with
/// [`find_by_serial`]; paths must be absolute and free of `,`, `:` and `\`
/// (they end up in overlayfs options).
pub fn resolve_source(source: Option<&Source>, sysfs_block: &Path) -> Result<Resolved> {
    let kind = source
        .and_then(|s| s.kind.as_ref())
        .ok_or_else(|| AgentError::InvalidArgument("volume has no source".into()))?;
    let check = |p: &str| -> Result<PathBuf> {
        if !p.starts_with('/') || p.contains([',', ':', '\\']) {
            return Err(AgentError::InvalidArgument(format!(
                "source path {p:?} must be absolute and free of ',', ':' and '\\'"
            )));
        }
        Ok(PathBuf::from(p))
    };
    Ok(match kind {
        Kind::Serial(s) => Resolved::Device(find_by_serial(sysfs_block, s)?),
        Kind::DevicePath(p) => Resolved::Device(check(p)?),
        Kind::Directory(p) => Resolved::Directory(check(p)?),
        _ => return Err(AgentError::InvalidArgument("unknown volume source".into())),
    })
}

/// The mounts that make up one container's root, for teardown.
#[derive(Debug, Default)]
pub struct RootfsMounts {
    /// The container's root directory (the overlayfs mount point,
    /// `<container dir>/rootfs`).
    pub rootfs: PathBuf,
    /// Mount points in mount order; unmounted in reverse.
    pub mounted: Vec<PathBuf>,
}

impl RootfsMounts {
    /// Unmounts everything (lazily, so a busy mount cannot wedge removal).
    pub fn unmount(&mut self, sys: &dyn Syscall) {
        while let Some(p) = self.mounted.pop() {
            if let Err(e) = sys.umount(&p, MntFlags::MNT_DETACH) {
                log::warn!("unmounting {}: {e}", p.display());
            }
        }
    }
}

fn mount_volume(sys: &dyn Syscall, volume: &Volume, device: &Path, target: &Path) -> Result<()> {
    if volume.fs_type.is_empty() || volume.fs_type.contains(',') {
        return Err(AgentError::InvalidArgument(format!(
            "volume {} needs a file system type",
            device.display()
        )));
    }
    let opts: Vec<String> = volume.options.clone();
    let opts = MountOptions::parse(&opts);
    sys.mount(
        Some(device),
        target,
        Some(&volume.fs_type),
        opts.flags,
        opts.data_string().as_deref(),
    )
    .ctx(|| {
        format!(
            "mounting {} ({}) on {}",
            device.display(),
            volume.fs_type,
            target.display()
        )
    })
}

/// Mounts `rootfs` under `base` (`base/layers/N`, `base/upper`, `base/rootfs`)
/// and returns the mounts; on error everything mounted so far is undone.
/// The overlay's upper and work directories are `<upper>/<name of base>/`.
pub fn mount_rootfs(
    sys: &dyn Syscall,
    base: &Path,
    rootfs: &Rootfs,
    sysfs_block: &Path,
) -> Result<RootfsMounts> {
    let mut mounts = RootfsMounts {
        rootfs: base.join("rootfs"),
        mounted: Vec::new(),
    };
    let result = mount_rootfs_inner(sys, base, rootfs, sysfs_block, &mut mounts);
    if result.is_err() {
        mounts.unmount(sys);
    }
    result.map(|()| mounts)
}

fn mount_rootfs_inner(
    sys: &dyn Syscall,
    base: &Path,
    rootfs: &Rootfs,
    sysfs_block: &Path,
    mounts: &mut RootfsMounts,
) -> Result<()> {
    if rootfs.layers.is_empty() {
        return Err(AgentError::InvalidArgument("rootfs has no layers".into()));
    }
    let mut lowers = Vec::with_capacity(rootfs.layers.len());
    for (i, layer) in rootfs.layers.iter().enumerate() {
        match resolve_source(layer.source.as_ref(), sysfs_block)? {
            Resolved::Directory(dir) => lowers.push(dir),
            Resolved::Device(dev) => {
                let target = base.join("layers").join(i.to_string());
                fs::create_dir_all(&target).ctx(|| format!("creating {}", target.display()))?;
                let mut ro = layer.clone();
                if !ro.options.iter().any(|o| o == "ro") {
                    ro.options.push("ro".into());
                }
                mount_volume(sys, &ro, &dev, &target)?;
                mounts.mounted.push(target.clone());
                lowers.push(target);
            }
        }
    }

    let upper_root = match rootfs.upper.as_ref() {
        None => {
            let target = base.join("upper");
            fs::create_dir_all(&target).ctx(|| format!("creating {}", target.display()))?;
            sys.mount(
                Some(Path::new("tmpfs")),
                &target,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("mode=0755"),
            )
            .ctx(|| format!("mounting tmpfs upper on {}", target.display()))?;
            mounts.mounted.push(target.clone());
            target
        }
        Some(upper) => match resolve_source(upper.source.as_ref(), sysfs_block)? {
            Resolved::Directory(dir) => dir,
            Resolved::Device(dev) => {
                let target = base.join("upper");
                fs::create_dir_all(&target).ctx(|| format!("creating {}", target.display()))?;
                mount_volume(sys, upper, &dev, &target)?;
                mounts.mounted.push(target.clone());
                target
            }
        },
    };
    // A directory of the container's own on the upper volume: containers
    // that share a volume never share overlay upper or work directories.
    let own = upper_root.join(base.file_name().unwrap_or("rootfs".as_ref()));
    let upperdir = own.join("upper");
    let workdir = own.join("work");
    for d in [&upperdir, &workdir, &mounts.rootfs] {
        fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
    }
    let lowerdir = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upperdir.display(),
        workdir.display()
    );
    sys.mount(
        Some(Path::new("overlay")),
        &mounts.rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(&data),
    )
    .ctx(|| format!("mounting overlay on {} ({data})", mounts.rootfs.display()))?;
    mounts.mounted.push(mounts.rootfs.clone());
    Ok(())
}

/// Checks that `path` is a plain path: no `..`, no empty or NUL bytes.
pub fn check_no_dotdot(path: &str) -> Result<()> {
    if path.is_empty() || path.contains('\0') {
        return Err(AgentError::InvalidArgument(format!("bad path {path:?}")));
    }
    if Path::new(path)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(AgentError::PathEscape(path.to_owned()));
    }
    Ok(())
}

fn how(resolve: ResolveFlag, flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(resolve | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

fn escape_err(path: &str, e: Errno) -> AgentError {
    if e == Errno::EXDEV || e == Errno::ELOOP {
        AgentError::PathEscape(path.to_owned())
    } else {
        AgentError::Io {
            context: format!("resolving {path:?}"),
            source: e.into(),
        }
    }
}

/// Opens (O_PATH) `path` inside `root` as the container would see it: `/`
/// and `..` stop at `root`, absolute symlinks are taken relative to it.
/// Missing components are created: directories, and for the last one a
/// directory or an empty file as `dir` says.
pub fn ensure_in_root(root: &OwnedFd, path: &str, dir: bool) -> Result<OwnedFd> {
    check_no_dotdot(path)?;
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return openat2(
            root.as_fd(),
            ".",
            how(ResolveFlag::RESOLVE_IN_ROOT, OFlag::O_PATH),
        )
        .map_err(|e| escape_err(path, e));
    }
    create_in(
        root,
        rel,
        dir,
        ResolveFlag::RESOLVE_IN_ROOT,
        Mode::from_bits_truncate(0o755),
    )
    .map_err(|e| escape_err(path, e))
}

/// Creates (if missing) and opens `rel` beneath `dir` without following any
/// symlink; used for host-supplied paths (CopyFile).
pub fn create_beneath(dir: &OwnedFd, rel: &str, last_is_dir: bool) -> Result<OwnedFd> {
    check_no_dotdot(rel)?;
    if rel.starts_with('/') {
        return Err(AgentError::PathEscape(rel.to_owned()));
    }
    create_in(
        dir,
        rel,
        last_is_dir,
        ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS,
        Mode::from_bits_truncate(0o755),
    )
    .map_err(|e| escape_err(rel, e))
}

fn create_in(
    root: &OwnedFd,
    rel: &str,
    last_is_dir: bool,
    resolve: ResolveFlag,
    mode: Mode,
) -> nix::Result<OwnedFd> {
    match openat2(root.as_fd(), rel, how(resolve, OFlag::O_PATH)) {
        Err(Errno::ENOENT) => {}
        other => return other,
    }
    let p = Path::new(rel);
    let parent = match p.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => create_in(root, &parent.to_string_lossy(), true, resolve, mode)?,
        None => openat2(root.as_fd(), ".", how(resolve, OFlag::O_PATH))?,
    };
    // The parent is an O_PATH fd: creating relative to it needs a real dir fd.
    let parent_dir = openat2(
        parent.as_fd(),
        ".",
        how(resolve, OFlag::O_RDONLY | OFlag::O_DIRECTORY),
    )?;
    let name = p.file_name().ok_or(Errno::EINVAL)?;
    if last_is_dir {
        match nix::sys::stat::mkdirat(parent_dir.as_fd(), name, mode) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e),
        }
    } else {
        let fd = openat2(
            parent_dir.as_fd(),
            name,
            OpenHow::new()
                .flags(OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
                .mode(Mode::from_bits_truncate(0o644))
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS),
        )?;
        drop(fd);
    }
    openat2(parent_dir.as_fd(), name, how(resolve, OFlag::O_PATH))
}

/// `/proc/self/fd/N` for an fd: mounting there acts on what the fd resolved.
pub fn fd_path(fd: &impl std::os::fd::AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The mount point of the mount that holds `path`, from a mountinfo
/// table (`/proc/self/mountinfo`): the longest mount point that is
/// `path` or one of its ancestors. `path` must be absolute and free of
/// symlinks and `..`.
pub fn mount_point_of(mountinfo: &str, path: &Path) -> Option<PathBuf> {
    mountinfo
        .lines()
        // Field 5 is the mount point, with space, tab, newline and
        // backslash escaped as octal.
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|mp| path.starts_with(mp))
        .max_by_key(|mp| mp.components().count())
}

fn unescape_mountinfo(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let b = field.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::test::{Call, RecordingSyscall};

    #[test]
    fn mount_point_of_finds_the_innermost_mount() {
        let info = "22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n\
                    30 22 0:5 / /run rw shared:2 - tmpfs tmpfs rw\n\
                    31 30 0:6 / /run/moat/a\\040b rw - overlay overlay rw\n\
                    32 30 0:7 / /run/moatx rw - tmpfs tmpfs rw\n";
        let mp = |p: &str| mount_point_of(info, Path::new(p)).unwrap();
        assert_eq!(mp("/run/moat/a b/rootfs"), Path::new("/run/moat/a b"));
        assert_eq!(mp("/run/moat/a b"), Path::new("/run/moat/a b"));
        // A sibling whose name shares a prefix is not a parent.
        assert_eq!(mp("/run/moat/c"), Path::new("/run"));
        assert_eq!(mp("/var/lib"), Path::new("/"));
        assert_eq!(mount_point_of("", Path::new("/x")), None);
    }
    use moat_protocol::agent::Volume;
    use moat_testutil::TempDir;

    fn vol(kind: Kind, fs: &str) -> Volume {
        Volume {
            source: protobuf::MessageField::some(Source {
                kind: Some(kind),
                ..Default::default()
            }),
            fs_type: fs.into(),
            ..Default::default()
        }
    }

    #[test]
    fn options_split_flags_and_data() {
        let o = MountOptions::parse(&[
            "nosuid".into(),
            "ro".into(),
            "rbind".into(),
            "rslave".into(),
            "mode=755".into(),
            "size=65536k".into(),
        ]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC
        );
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(o.data_string().as_deref(), Some("mode=755,size=65536k"));
        assert!(o.bind);
        let rw = MountOptions::parse(&["ro".into(), "rw".into()]);
        assert!(!rw.flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn erofs_layers_and_ext4_upper_become_overlay() {
        let base_tmp = TempDir::new("mount-overlay");
        let base = base_tmp.path();
        let sys = RecordingSyscall::default();
        let rootfs = Rootfs {
            layers: vec![
                vol(Kind::DevicePath("/dev/vdc".into()), "erofs"),
                vol(Kind::DevicePath("/dev/vdb".into()), "erofs"),
            ],
            upper: protobuf::MessageField::some(vol(Kind::DevicePath("/dev/vdd".into()), "ext4")),
            ..Default::default()
        };
        let m = mount_rootfs(&sys, base, &rootfs, Path::new("/nonexistent")).unwrap();
        let calls = sys.take();
        assert_eq!(calls.len(), 4);
        let b = base.display();
        let n = base.file_name().unwrap().to_str().unwrap();
        match &calls[0] {
            Call::Mount {
                source,
                target,
                fstype,
                flags,
                ..
            } => {
                assert_eq!(source.as_deref(), Some("/dev/vdc"));
                assert_eq!(target, &format!("{b}/layers/0"));
                assert_eq!(fstype.as_deref(), Some("erofs"));
                assert!(flags.contains(MsFlags::MS_RDONLY));
            }
            c => panic!("unexpected {c:?}"),
        }
        match &calls[3] {
            Call::Mount { data, target, .. } => {
                assert_eq!(target, &format!("{b}/rootfs"));
                assert_eq!(
                    data.as_deref().unwrap(),
                    format!("lowerdir={b}/layers/0:{b}/layers/1,upperdir={b}/upper/{n}/upper,workdir={b}/upper/{n}/work")
                );
            }
            c => panic!("unexpected {c:?}"),
        }
        assert_eq!(m.mounted.len(), 4);
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn directory_layer_gets_tmpfs_upper() {
        let base_tmp = TempDir::new("mount-dir");
        let base = base_tmp.path();
        let sys = RecordingSyscall::default();
        let rootfs = Rootfs {
            layers: vec![vol(Kind::Directory("/srv/rootfs".into()), "")],
            ..Default::default()
        };
        let mut m = mount_rootfs(&sys, base, &rootfs, Path::new("/nonexistent")).unwrap();
        let calls = sys.take();
        assert!(matches!(&calls[0], Call::Mount { fstype: Some(t), .. } if t == "tmpfs"));
        assert!(
            matches!(&calls[1], Call::Mount { data: Some(d), .. } if d.starts_with("lowerdir=/srv/rootfs,"))
        );
        m.unmount(&sys);
        assert_eq!(sys.take().len(), 2);
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn bad_sources_are_refused() {
        let sys = RecordingSyscall::default();
        let base_tmp = TempDir::new("mount-bad");
        let base = base_tmp.path();
        for kind in [
            Kind::DevicePath("relative".into()),
            Kind::Directory("/a:b".into()),
            Kind::Serial("no-such-serial".into()),
        ] {
            let rootfs = Rootfs {
                layers: vec![vol(kind, "erofs")],
                ..Default::default()
            };
            let dir_tmp = TempDir::new("mount-sysfs");
            let dir = dir_tmp.path();
            assert!(mount_rootfs(&sys, base, &rootfs, dir).is_err());
        }
        assert!(mount_rootfs(&sys, base, &Rootfs::default(), base).is_err());
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn serial_lookup_reads_sysfs() {
        let sysfs_tmp = TempDir::new("mount-serial");
        let sysfs = sysfs_tmp.path();
        fs::create_dir_all(sysfs.join("vda")).unwrap();
        fs::create_dir_all(sysfs.join("vdb")).unwrap();
        fs::write(sysfs.join("vda/serial"), "other\n").unwrap();
        fs::write(sysfs.join("vdb/serial"), "layer-abc").unwrap();
        assert_eq!(
            find_by_serial(sysfs, "layer-abc").unwrap(),
            PathBuf::from("/dev/vdb")
        );
        fs::remove_dir_all(sysfs).unwrap();
    }

    #[test]
    fn resolution_stays_in_root() {
        let root_tmp = TempDir::new("mount-resolve");
        let root = root_tmp.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        std::os::unix::fs::symlink("/", root.join("etc/up")).unwrap();
        std::os::unix::fs::symlink("/../../../../tmp", root.join("escape")).unwrap();
        let rfd: OwnedFd = fs::File::open(root).unwrap().into();
        // An absolute symlink stays inside the root: creates root/tmp/x.
        let fd = ensure_in_root(&rfd, "/escape/x", true).unwrap();
        drop(fd);
        assert!(root.join("tmp/x").is_dir());
        let fd = ensure_in_root(&rfd, "/etc/up/file", false).unwrap();
        drop(fd);
        assert!(root.join("file").is_file());
        assert!(matches!(
            ensure_in_root(&rfd, "/a/../../b", true),
            Err(AgentError::PathEscape(_))
        ));
        // Host paths refuse symlinks altogether.
        assert!(matches!(
            create_beneath(&rfd, "escape/y", false),
            Err(AgentError::PathEscape(_))
        ));
        assert!(matches!(
            create_beneath(&rfd, "/abs", false),
            Err(AgentError::PathEscape(_))
        ));
        let fd = create_beneath(&rfd, "vol/..data/key", false).unwrap();
        drop(fd);
        assert!(root.join("vol/..data/key").is_file());
        fs::remove_dir_all(root).unwrap();
    }
}
