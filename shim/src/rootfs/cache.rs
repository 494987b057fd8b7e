//! Read-only layer images: each lower directory becomes an erofs image,
//! built once and shared by every container (of every image) using it.
//!
//! Safe under concurrent creates (an exclusive flock per key) and crashes (an
//! image is built into a temporary file, fsynced, then renamed into place, so
//! a visible `.erofs` is always complete).

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::RootfsError;

const IMAGE_EXT: &str = "erofs";
const TMP_MARK: &str = ".tmp.";

/// FNV-1a: a stable hash (std's hasher may change between Rust releases,
/// which would orphan the cache).
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cache key of a layer directory: the snapshot id containerd's overlayfs
/// snapshotter puts in the path (`.../snapshots/<id>/fs`) for readability,
/// plus a fingerprint of the path and the directory's identity and change
/// time, so another containerd root or a recreated snapshot gets its own key.
pub fn layer_key(dir: &Path) -> Result<String, RootfsError> {
    let md = fs::metadata(dir).map_err(|source| RootfsError::Io {
        what: format!("stat layer {}", dir.display()),
        source,
    })?;
    if !md.is_dir() {
        return Err(RootfsError::NotADirectory(dir.to_owned()));
    }
    let snapshot = if dir.file_name().is_some_and(|n| n == "fs") {
        dir.parent().and_then(Path::file_name)
    } else {
        dir.file_name()
    };
    let mut id: String = snapshot
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(32)
        .collect();
    if id.is_empty() {
        id.push_str("layer");
    }
    let fingerprint = format!(
        "{}\0{}\0{}\0{}\0{}\0{}",
        dir.display(),
        md.dev(),
        md.ino(),
        md.ctime(),
        md.ctime_nsec(),
        md.mtime_nsec()
    );
    Ok(format!("{id}-{:016x}", fnv1a(fingerprint.as_bytes())))
}

/// The shared cache of layer images.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

/// Holds an exclusive flock until dropped (closing the file releases it).
struct KeyLock(#[allow(dead_code)] File);

impl KeyLock {
    fn acquire(path: &Path) -> Result<KeyLock, RootfsError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| RootfsError::Io {
                what: format!("open lock {}", path.display()),
                source,
            })?;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(KeyLock(file));
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(RootfsError::Io {
                    what: format!("lock {}", path.display()),
                    source: err,
                });
            }
        }
    }
}

impl LayerCache {
    pub fn new(dir: impl Into<PathBuf>) -> LayerCache {
        LayerCache { dir: dir.into() }
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image of `layer`, building it first unless it is cached.
    pub fn get_or_build(&self, layer: &Path) -> Result<PathBuf, RootfsError> {
        let key = layer_key(layer)?;
        self.get_or_build_keyed(&key, |tmp| build_erofs(layer, tmp))
    }

    /// One image of all of `lowers` (top-most first; at least two), their
    /// overlay merged ([`super::merge`]), building it unless it is cached.
    pub fn get_or_build_merged(&self, lowers: &[PathBuf]) -> Result<PathBuf, RootfsError> {
        let keys = lowers
            .iter()
            .map(|l| layer_key(l))
            .collect::<Result<Vec<_>, _>>()?;
        let key = format!(
            "merged{}-{:016x}",
            lowers.len(),
            fnv1a(keys.join("\0").as_bytes())
        );
        self.get_or_build_keyed(&key, |tmp| super::merge::build_merged_erofs(lowers, tmp))
    }

    /// The image of `key`; `build` makes it (at the temporary path it is
    /// given) unless it is cached. One builder per key at a time.
    fn get_or_build_keyed(
        &self,
        key: &str,
        build: impl FnOnce(&Path) -> Result<(), RootfsError>,
    ) -> Result<PathBuf, RootfsError> {
        fs::create_dir_all(&self.dir).map_err(|source| RootfsError::Io {
            what: format!("create layer cache {}", self.dir.display()),
            source,
        })?;
        let image = self.dir.join(format!("{key}.{IMAGE_EXT}"));
        // Fast path without the lock: a visible image is always complete.
        if image.exists() {
            return Ok(image);
        }
        let _lock = KeyLock::acquire(&self.dir.join(format!("{key}.lock")))?;
        if image.exists() {
            return Ok(image);
        }
        // Leftovers of a build that crashed while holding this lock.
        self.remove_temporaries(key);
        let tmp = self
            .dir
            .join(format!("{key}.{IMAGE_EXT}{TMP_MARK}{}", std::process::id()));
        let result = build(&tmp).and_then(|()| {
            fs::rename(&tmp, &image).map_err(|source| RootfsError::Io {
                what: format!("rename {} into place", tmp.display()),
                source,
            })?;
            sync_dir(&self.dir)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| image)
    }

    fn remove_temporaries(&self, key: &str) {
        let prefix = format!("{key}.{IMAGE_EXT}{TMP_MARK}");
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), RootfsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| RootfsError::Io {
            what: format!("sync {}", dir.display()),
            source,
        })
}

/// Runs a tool, turning a failure into an error carrying its stderr.
pub(crate) fn run_tool(cmd: &mut Command, tool: &'static str) -> Result<(), RootfsError> {
    let out = cmd
        .output()
        .map_err(|source| RootfsError::Spawn { tool, source })?;
    if !out.status.success() {
        return Err(RootfsError::Tool {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Builds an uncompressed erofs image of `dir` at `out` and fsyncs it.
/// Overlay whiteouts (0:0 char devices) and opaque-dir xattrs are kept,
/// so the guest's overlayfs interprets the layer as containerd's would.
pub fn build_erofs(dir: &Path, out: &Path) -> Result<(), RootfsError> {
    build_erofs_with(dir, out, |_| {})
}

/// [`build_erofs`], with `prepare` adjusting the mkfs.erofs command first
/// (a merged view's mount namespace, [`super::merge`]). A failed build
/// leaves no file at `out`.
pub(crate) fn build_erofs_with(
    dir: &Path,
    out: &Path,
    prepare: impl FnOnce(&mut Command),
) -> Result<(), RootfsError> {
    let _ = fs::remove_file(out);
    let mut cmd = Command::new("mkfs.erofs");
    cmd.arg("--quiet").arg(out).arg(dir);
    prepare(&mut cmd);
    let result = run_tool(&mut cmd, "mkfs.erofs").and_then(|()| {
        File::open(out)
            .and_then(|f| f.sync_all())
            .map_err(|source| RootfsError::Io {
                what: format!("sync {}", out.display()),
                source,
            })
    });
    if result.is_err() {
        let _ = fs::remove_file(out);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;
    use std::sync::Arc;

    fn layer(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = root.join("snapshots").join(name).join("fs");
        fs::create_dir_all(&dir).unwrap();
        for (p, content) in files {
            fs::write(dir.join(p), content).unwrap();
        }
        dir
    }

    fn images(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn key_names_the_snapshot_and_differs_per_layer() {
        let t = TempDir::new("key");
        let a = layer(t.path(), "17", &[]);
        let b = layer(t.path(), "18", &[]);
        let ka = layer_key(&a).unwrap();
        assert!(ka.starts_with("17-"), "{ka}");
        assert_eq!(ka, layer_key(&a).unwrap());
        assert_ne!(ka, layer_key(&b).unwrap());
        assert!(matches!(
            layer_key(&t.path().join("missing")),
            Err(RootfsError::Io { .. })
        ));
    }

    #[test]
    fn builds_once_and_reuses() {
        let t = TempDir::new("reuse");
        let l = layer(t.path(), "1", &[("hello", "world")]);
        let cache = LayerCache::new(t.path().join("cache"));
        let img = cache.get_or_build(&l).unwrap();
        let md = fs::metadata(&img).unwrap();
        assert!(md.len() > 0);
        // Second call returns the same file without rebuilding it.
        let again = cache.get_or_build(&l).unwrap();
        assert_eq!(img, again);
        assert_eq!(fs::metadata(&again).unwrap().ino(), md.ino());
        assert_eq!(images(cache.dir()).len(), 1);
    }

    #[test]
    fn concurrent_builds_make_one_image() {
        let t = TempDir::new("concurrent");
        let l = layer(t.path(), "2", &[("a", "1"), ("b", "2")]);
        let cache = Arc::new(LayerCache::new(t.path().join("cache")));
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let (cache, l) = (cache.clone(), l.clone());
                std::thread::spawn(move || cache.get_or_build(&l).unwrap())
            })
            .collect();
        let paths: Vec<PathBuf> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(paths.windows(2).all(|w| w[0] == w[1]));
        // Exactly one image, no temporaries.
        assert_eq!(images(cache.dir()).len(), 1, "{:?}", images(cache.dir()));
    }

    #[test]
    fn crash_leftovers_are_ignored_and_removed() {
        let t = TempDir::new("crash");
        let l = layer(t.path(), "3", &[("x", "y")]);
        let cache = LayerCache::new(t.path().join("cache"));
        fs::create_dir_all(cache.dir()).unwrap();
        let key = layer_key(&l).unwrap();
        // What a build killed half-way leaves: a partial temporary file.
        let partial = cache.dir().join(format!("{key}.erofs.tmp.99999"));
        fs::write(&partial, b"half an image").unwrap();
        let img = cache.get_or_build(&l).unwrap();
        assert!(!partial.exists());
        assert_eq!(images(cache.dir()), vec![format!("{key}.erofs")]);
        assert_ne!(fs::read(&img).unwrap(), b"half an image");
    }

    /// A chain of layers is one cached image; another order is another.
    #[test]
    fn merged_chains_build_once() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED merged_chains_build_once: needs root (mount namespace)");
            return;
        }
        let t = TempDir::new("merged");
        let a = layer(t.path(), "4", &[("a", "1")]);
        let b = layer(t.path(), "5", &[("b", "2")]);
        let cache = LayerCache::new(t.path().join("cache"));
        let ab = cache.get_or_build_merged(&[a.clone(), b.clone()]).unwrap();
        assert!(ab
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("merged2-"));
        assert_eq!(
            cache.get_or_build_merged(&[a.clone(), b.clone()]).unwrap(),
            ab
        );
        assert_ne!(cache.get_or_build_merged(&[b, a]).unwrap(), ab);
        assert_eq!(images(cache.dir()).len(), 2, "{:?}", images(cache.dir()));
    }

    #[test]
    fn failed_build_leaves_nothing() {
        let t = TempDir::new("fail");
        let out = t.path().join("x.erofs");
        let err = build_erofs(&t.path().join("missing"), &out).unwrap_err();
        assert!(err.to_string().contains("mkfs.erofs"), "{err}");
        assert!(!out.exists());
    }
}
