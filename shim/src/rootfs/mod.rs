//! Turns the rootfs mounts containerd hands the shim into block devices for
//! the VM: a cached erofs image of the read-only layers (one per layer for
//! a single-layer image, one of their merged view for more: `merge`), a
//! per-container erofs image for content already in the writable layer,
//! and a fresh writable upper (sparse ext4 image or guest tmpfs).
//! Block-device mounts pass through.
//!
//! Nothing is mounted in the host's mount namespace.

pub mod cache;
mod merge;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

pub use cache::LayerCache;

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error("failed to {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot run {tool} (is it installed?): {source}")]
    Spawn {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    #[error("layer {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("unsupported rootfs mount: {0}")]
    Unsupported(String),
    #[error("overlay rootfs mount has no lowerdir option")]
    NoLowerdir,
    #[error("more than one rootfs mount is not supported ({0} given)")]
    TooManyMounts(usize),
    #[error(
        "a {size_mib} MiB upper would take the sandbox's uppers past pod_upper_limit_mib \
         ({limit_mib} MiB; {used_mib} MiB in use)"
    )]
    PodUpperLimit {
        size_mib: u64,
        used_mib: u64,
        limit_mib: u64,
    },
}

/// A rootfs mount as containerd passes it (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// What the container's root filesystem is made of, before any conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsPlan {
    /// Directories joined by overlayfs.
    Layers {
        /// Read-only layers, top-most first; cached images.
        lowers: Vec<PathBuf>,
        /// Content already in the writable layer (containerd's upperdir, or a
        /// writable bind-mounted root); becomes a per-container read-only
        /// layer on top of `lowers`, when not empty.
        seed: Option<PathBuf>,
    },
    /// A block device with a filesystem (block and devmapper snapshotters).
    Block {
        device: PathBuf,
        fs_type: String,
        read_only: bool,
    },
}

fn has_opt(options: &[String], name: &str) -> bool {
    options.iter().any(|o| o == name)
}

fn opt_value<'a>(options: &'a [String], key: &str) -> Option<&'a str> {
    options
        .iter()
        .find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Whether `source` names something under /dev: `/dev/../x` does not.
fn is_device_path(source: &str) -> bool {
    use std::path::Component;
    let mut parts = Path::new(source).components();
    parts.next() == Some(Component::RootDir)
        && parts.next() == Some(Component::Normal("dev".as_ref()))
        && parts.clone().next().is_some()
        && parts.all(|c| matches!(c, Component::Normal(_)))
}

/// Reads the plan from containerd's mounts; no mounts means the bundle's
/// `rootfs/` directory is the root (e.g. `ctr run --rootfs`).
pub fn plan(mounts: &[MountSpec], bundle: &Path) -> Result<RootfsPlan, RootfsError> {
    let m = match mounts {
        [] => {
            return Ok(RootfsPlan::Layers {
                lowers: Vec::new(),
                seed: Some(bundle.join("rootfs")),
            })
        }
        [m] => m,
        _ => return Err(RootfsError::TooManyMounts(mounts.len())),
    };
    match m.kind.as_str() {
        "overlay" => {
            let lowers: Vec<PathBuf> = opt_value(&m.options, "lowerdir")
                .ok_or(RootfsError::NoLowerdir)?
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
            if lowers.is_empty() {
                return Err(RootfsError::NoLowerdir);
            }
            let seed = opt_value(&m.options, "upperdir").map(PathBuf::from);
            Ok(RootfsPlan::Layers { lowers, seed })
        }
        "bind" | "rbind" => {
            let dir = PathBuf::from(&m.source);
            if has_opt(&m.options, "ro") {
                Ok(RootfsPlan::Layers {
                    lowers: vec![dir],
                    seed: None,
                })
            } else {
                Ok(RootfsPlan::Layers {
                    lowers: Vec::new(),
                    seed: Some(dir),
                })
            }
        }
        fs_type if is_device_path(&m.source) => Ok(RootfsPlan::Block {
            device: PathBuf::from(&m.source),
            fs_type: fs_type.to_owned(),
            read_only: has_opt(&m.options, "ro"),
        }),
        other => Err(RootfsError::Unsupported(format!(
            "type {other:?} from {:?}",
            m.source
        ))),
    }
}

/// One block device of a prepared rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub fs_type: String,
    pub read_only: bool,
}

/// A rootfs ready for the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Read-only layers, top-most first (a passed-through block device is
    /// the single entry, read-write unless mounted `ro`).
    pub layers: Vec<Disk>,
    /// The writable upper image; `None` with a guest tmpfs upper or a block device.
    pub upper: Option<Disk>,
    /// Files created for this container only, removed on delete.
    pub owned: Vec<PathBuf>,
}

impl Prepared {
    /// Removes this container's own files (never cached layers).
    pub fn remove_owned(&self) {
        for p in &self.owned {
            let _ = fs::remove_file(p);
        }
    }
}

/// How to build the writable upper.
#[derive(Debug, Clone)]
pub enum UpperSpec {
    /// A sparse ext4 image at `image`, on disk. The apparent sizes of the
    /// images in its directory (the sandbox's) stay within `pod_limit_mib`.
    Ext4 {
        size_mib: u64,
        image: PathBuf,
        pod_limit_mib: u64,
    },
    Tmpfs,
}

fn dir_has_entries(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Converts `plan` into disks, with per-container files under `work_dir`.
pub fn prepare(
    plan: &RootfsPlan,
    cache: &LayerCache,
    work_dir: &Path,
    upper: &UpperSpec,
) -> Result<Prepared, RootfsError> {
    let mut prepared = Prepared {
        layers: Vec::new(),
        upper: None,
        owned: Vec::new(),
    };
    let result = prepare_into(plan, cache, work_dir, upper, &mut prepared);
    if result.is_err() {
        prepared.remove_owned();
    }
    result.map(|()| prepared)
}

fn prepare_into(
    plan: &RootfsPlan,
    cache: &LayerCache,
    work_dir: &Path,
    upper: &UpperSpec,
    out: &mut Prepared,
) -> Result<(), RootfsError> {
    match plan {
        RootfsPlan::Block {
            device,
            fs_type,
            read_only,
        } => {
            out.layers.push(Disk {
                path: device.clone(),
                fs_type: fs_type.clone(),
                read_only: *read_only,
            });
            return Ok(());
        }
        RootfsPlan::Layers { lowers, seed } => {
            fs::create_dir_all(work_dir).map_err(|source| RootfsError::Io {
                what: format!("create {}", work_dir.display()),
                source,
            })?;
            if let Some(seed) = seed.as_deref().filter(|s| dir_has_entries(s)) {
                let img = work_dir.join("seed.erofs");
                out.owned.push(img.clone());
                cache::build_erofs(seed, &img)?;
                out.layers.push(Disk {
                    path: img,
                    fs_type: "erofs".into(),
                    read_only: true,
                });
            }
            // Many layers reach the guest as one disk (see `merge`).
            let image = match lowers.as_slice() {
                [] => None,
                [one] => Some(cache.get_or_build(one)?),
                many => Some(cache.get_or_build_merged(many)?),
            };
            if let Some(path) = image {
                out.layers.push(Disk {
                    path,
                    fs_type: "erofs".into(),
                    read_only: true,
                });
            }
            if out.layers.is_empty() {
                // An empty root still needs a lower layer for overlayfs.
                let empty = work_dir.join("empty");
                fs::create_dir_all(&empty).map_err(|source| RootfsError::Io {
                    what: format!("create {}", empty.display()),
                    source,
                })?;
                let img = work_dir.join("seed.erofs");
                out.owned.push(img.clone());
                cache::build_erofs(&empty, &img)?;
                let _ = fs::remove_dir(&empty);
                out.layers.push(Disk {
                    path: img,
                    fs_type: "erofs".into(),
                    read_only: true,
                });
            }
        }
    }
    if let UpperSpec::Ext4 {
        size_mib,
        image,
        pod_limit_mib,
    } = upper
    {
        let dir = image.parent().unwrap_or(Path::new("/"));
        // What the guest writes is for root's eyes only.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| RootfsError::Io {
                what: format!("create {}", dir.display()),
                source,
            })?;
        let used_mib = apparent_size(dir)? >> 20;
        if used_mib + size_mib > *pod_limit_mib {
            return Err(RootfsError::PodUpperLimit {
                size_mib: *size_mib,
                used_mib,
                limit_mib: *pod_limit_mib,
            });
        }
        out.owned.push(image.clone());
        make_ext4(image, *size_mib)?;
        out.upper = Some(Disk {
            path: image.clone(),
            fs_type: "ext4".into(),
            read_only: false,
        });
    }
    Ok(())
}

/// The apparent size of the regular files in `dir` together, in bytes.
fn apparent_size(dir: &Path) -> Result<u64, RootfsError> {
    let io = |source| RootfsError::Io {
        what: format!("read {}", dir.display()),
        source,
    };
    let mut total = 0u64;
    for entry in fs::read_dir(dir).map_err(io)? {
        let md = entry.and_then(|e| e.metadata()).map_err(io)?;
        if md.is_file() {
            total = total.saturating_add(md.len());
        }
    }
    Ok(total)
}

/// Guest mount options for a disk of `fs_type`. The ext4 upper is made
/// with lazy inode tables (so the image stays sparse); `noinit_itable`
/// keeps the guest kernel from zeroing them in the background, which costs
/// minutes of guest CPU where the guest kernel runs in an emulator and is
/// useless for a scratch layer that is thrown away with the container.
pub fn mount_options(fs_type: &str) -> Vec<String> {
    match fs_type {
        "ext4" => vec!["noinit_itable".to_owned()],
        _ => Vec::new(),
    }
}

/// Creates a sparse ext4 image of `size_mib` MiB (only metadata takes
/// space), readable by its owner only.
pub fn make_ext4(path: &Path, size_mib: u64) -> Result<(), RootfsError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| RootfsError::Io {
            what: format!("create {}", path.display()),
            source,
        })?;
    file.set_len(size_mib << 20)
        .map_err(|source| RootfsError::Io {
            what: format!("size {}", path.display()),
            source,
        })?;
    drop(file);
    cache::run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
            .args(["-E", "lazy_itable_init=1,root_owner=0:0"])
            .arg(path),
        "mkfs.ext4",
    )
}

#[cfg(test)]
mod mount_option_tests {
    #[test]
    fn ext4_uppers_skip_inode_table_zeroing_and_layers_get_no_options() {
        assert_eq!(super::mount_options("ext4"), ["noinit_itable"]);
        assert!(super::mount_options("erofs").is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    fn m(kind: &str, source: &str, options: &[&str]) -> MountSpec {
        MountSpec {
            kind: kind.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn overlay_from_the_overlayfs_snapshotter() {
        let p = plan(
            &[m(
                "overlay",
                "overlay",
                &[
                    "index=off",
                    "workdir=/s/snapshots/3/work",
                    "upperdir=/s/snapshots/3/fs",
                    "lowerdir=/s/snapshots/2/fs:/s/snapshots/1/fs",
                ],
            )],
            Path::new("/b"),
        )
        .unwrap();
        assert_eq!(
            p,
            RootfsPlan::Layers {
                lowers: vec!["/s/snapshots/2/fs".into(), "/s/snapshots/1/fs".into()],
                seed: Some("/s/snapshots/3/fs".into()),
            }
        );
    }

    #[test]
    fn bind_block_and_empty() {
        let t = TempDir::new("plan");
        let src = t.path().to_str().unwrap();
        assert_eq!(
            plan(&[m("bind", src, &["ro", "rbind"])], Path::new("/b")).unwrap(),
            RootfsPlan::Layers {
                lowers: vec![t.path().into()],
                seed: None
            }
        );
        assert_eq!(
            plan(&[m("bind", src, &["rw", "rbind"])], Path::new("/b")).unwrap(),
            RootfsPlan::Layers {
                lowers: vec![],
                seed: Some(t.path().into())
            }
        );
        assert_eq!(
            plan(&[m("ext4", "/dev/dm-3", &[])], Path::new("/b")).unwrap(),
            RootfsPlan::Block {
                device: "/dev/dm-3".into(),
                fs_type: "ext4".into(),
                read_only: false
            }
        );
        assert_eq!(
            plan(&[], Path::new("/b")).unwrap(),
            RootfsPlan::Layers {
                lowers: vec![],
                seed: Some("/b/rootfs".into())
            }
        );
    }

    #[test]
    fn bad_mounts_are_refused() {
        let e = plan(
            &[m("overlay", "overlay", &["upperdir=/u"])],
            Path::new("/b"),
        );
        assert!(matches!(e, Err(RootfsError::NoLowerdir)));
        let e = plan(&[m("nfs", "host:/x", &[])], Path::new("/b")).unwrap_err();
        assert!(e.to_string().contains("nfs"), "{e}");
        // Issue 10 (11): a block device must lie under /dev.
        for source in ["/dev/../etc/shadow", "/dev/", "/dev/./../x"] {
            let e = plan(&[m("ext4", source, &[])], Path::new("/b")).unwrap_err();
            assert!(e.to_string().contains(source), "{e}");
        }
        assert!(plan(&[m("ext4", "/dev/vdb", &[])], Path::new("/b")).is_ok());
        let two = [m("bind", "/", &[]), m("bind", "/", &[])];
        assert!(matches!(
            plan(&two, Path::new("/b")),
            Err(RootfsError::TooManyMounts(2))
        ));
    }

    pub(super) fn extract(img: &Path, to: &Path) {
        let out = Command::new("fsck.erofs")
            .arg(format!("--extract={}", to.display()))
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn prepare_converts_layers_seed_and_upper() {
        let t = TempDir::new("prepare");
        let lower = t.path().join("snapshots/1/fs");
        let upper = t.path().join("snapshots/2/fs");
        fs::create_dir_all(lower.join("bin")).unwrap();
        fs::write(lower.join("bin/tool"), "lower").unwrap();
        fs::write(lower.join("gone"), "x").unwrap();
        fs::create_dir_all(&upper).unwrap();
        fs::write(upper.join("written-by-containerd"), "seed").unwrap();
        // An overlay whiteout: a 0:0 character device.
        nix::sys::stat::mknod(
            &upper.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o000),
            0,
        )
        .unwrap();
        let cache = LayerCache::new(t.path().join("cache"));
        let plan = RootfsPlan::Layers {
            lowers: vec![lower.clone()],
            seed: Some(upper.clone()),
        };
        let work = t.path().join("ctr");
        let image = t.path().join("uppers/pod/ctr.ext4");
        let p = prepare(&plan, &cache, &work, &ext4(&image, 64, 1024)).unwrap();
        assert_eq!(p.layers.len(), 2);
        assert_eq!(p.layers[0].path, work.join("seed.erofs"));
        assert!(p.layers[1].path.starts_with(cache.dir()));
        let up = p.upper.clone().unwrap();
        assert_eq!(up.fs_type, "ext4");
        // Where it was asked to be, not in the (tmpfs) work dir.
        assert_eq!(up.path, image);
        // Sparse: 64 MiB apparent, far less allocated.
        let md = fs::metadata(&up.path).unwrap();
        assert_eq!(md.len(), 64 << 20);
        assert!(std::os::unix::fs::MetadataExt::blocks(&md) * 512 < 16 << 20);

        let seed_out = t.path().join("seed-out");
        extract(&p.layers[0].path, &seed_out);
        assert_eq!(
            fs::read_to_string(seed_out.join("written-by-containerd")).unwrap(),
            "seed"
        );
        assert!(fs::symlink_metadata(seed_out.join("gone"))
            .unwrap()
            .file_type()
            .is_char_device());
        let lower_out = t.path().join("lower-out");
        extract(&p.layers[1].path, &lower_out);
        assert_eq!(
            fs::read_to_string(lower_out.join("bin/tool")).unwrap(),
            "lower"
        );

        p.remove_owned();
        assert!(!work.join("seed.erofs").exists() && !up.path.exists());
        // The cached layer stays for the next container.
        assert!(p.layers[1].path.exists());
    }

    #[test]
    fn empty_upper_makes_no_seed_and_tmpfs_makes_no_image() {
        let t = TempDir::new("noseed");
        let lower = t.path().join("snapshots/1/fs");
        let upper = t.path().join("snapshots/2/fs");
        fs::create_dir_all(&lower).unwrap();
        fs::create_dir_all(&upper).unwrap();
        let cache = LayerCache::new(t.path().join("cache"));
        let plan = RootfsPlan::Layers {
            lowers: vec![lower],
            seed: Some(upper),
        };
        let p = prepare(&plan, &cache, &t.path().join("c"), &UpperSpec::Tmpfs).unwrap();
        assert_eq!(p.layers.len(), 1);
        assert!(p.upper.is_none() && p.owned.is_empty());
    }

    #[test]
    fn failure_removes_what_was_made() {
        let t = TempDir::new("prepfail");
        let seed = t.path().join("seed");
        fs::create_dir_all(&seed).unwrap();
        fs::write(seed.join("f"), "x").unwrap();
        let cache = LayerCache::new(t.path().join("cache"));
        let plan = RootfsPlan::Layers {
            lowers: vec![t.path().join("no-such-layer")],
            seed: Some(seed),
        };
        let work = t.path().join("c");
        let image = t.path().join("uppers/c.ext4");
        assert!(prepare(&plan, &cache, &work, &ext4(&image, 16, 1024)).is_err());
        assert!(!work.join("seed.erofs").exists());
        assert!(!image.exists());
    }

    fn ext4(image: &Path, size_mib: u64, pod_limit_mib: u64) -> UpperSpec {
        UpperSpec::Ext4 {
            size_mib,
            image: image.to_owned(),
            pod_limit_mib,
        }
    }

    #[test]
    fn a_sandboxs_uppers_stay_within_its_cap() {
        let t = TempDir::new("podcap");
        let lower = t.path().join("lower");
        fs::create_dir_all(lower.join("bin")).unwrap();
        let cache = LayerCache::new(t.path().join("cache"));
        let plan = RootfsPlan::Layers {
            lowers: vec![lower],
            seed: None,
        };
        let pod = t.path().join("uppers/pod");
        let prep = |n: &str| {
            let work = t.path().join(n);
            prepare(
                &plan,
                &cache,
                &work,
                &ext4(&pod.join(format!("{n}.ext4")), 40, 100),
            )
        };
        let a = prep("a").unwrap();
        let b = prep("b").unwrap();
        for p in [pod.clone(), pod.join("a.ext4")] {
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{} is open to others: {mode:o}",
                p.display()
            );
        }
        // 80 MiB in use: a third 40 MiB upper is refused, naming the cap,
        // and leaves no file.
        let e = prep("c").unwrap_err();
        assert!(
            matches!(e, RootfsError::PodUpperLimit { used_mib: 80, .. }),
            "{e}"
        );
        assert!(
            e.to_string().contains("pod_upper_limit_mib (100 MiB"),
            "{e}"
        );
        assert!(!pod.join("c.ext4").exists());
        // Room again once a container is gone.
        a.remove_owned();
        let c = prep("c").unwrap();
        b.remove_owned();
        c.remove_owned();
        assert_eq!(fs::read_dir(&pod).unwrap().count(), 0);
    }
}
