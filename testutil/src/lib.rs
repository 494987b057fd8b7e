//! Helpers shared by the tests of every moat crate (a dev-dependency only).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory under the system's temporary directory, removed with
/// its contents on drop. Its path is short (`/tmp/moat-TAG-PID-N`), so unix
/// socket paths inside fit `sun_path`.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates the directory; what an earlier run of the same pid left
    /// there is removed first.
    pub fn new(tag: &str) -> TempDir {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("moat-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }

    /// The names of the directory's entries, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.0.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_distinct_and_removed_on_drop() {
        let a = TempDir::new("t");
        let b = TempDir::new("t");
        assert_ne!(a.path(), b.path());
        assert!(a.path().as_os_str().len() < 40, "{}", a.path().display());
        std::fs::create_dir(a.join("sub")).unwrap();
        std::fs::write(a.join("sub/f"), "x").unwrap();
        std::fs::write(a.join("g"), "y").unwrap();
        assert_eq!(a.entries(), ["g", "sub"]);
        let kept = a.path().to_owned();
        drop(a);
        assert!(!kept.exists());
        assert!(b.entries().is_empty());
    }
}
