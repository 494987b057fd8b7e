//! Who owns a pod's shim socket.
//!
//! Several `start`s of one pod's containers may each spawn a daemon at
//! once, and a new daemon may start while the pod's last one is exiting.
//! Exactly one daemon must serve the socket path, and a daemon must never
//! lose its path to another while it serves: a daemon whose file was
//! replaced serves an unlinked socket that containerd never reaches, so it
//! is never told to shut down and lives on (issue 10's load test found
//! one). Liveness is "something accepts a connection on the path", which
//! is false for a moment between a socket's bind and its listen; so every
//! check of it that leads to removing or claiming the path is made under
//! one lock, an advisory lock on the socket directory, and a socket
//! appears at the path only listening.

use std::fs::File;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Whether a daemon accepts connections on `path`.
pub fn alive(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Holds the lock on the directory of `path` while `f` runs.
fn locked<T>(path: &Path, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let lock = File::open(dir)?;
    lock.lock()?;
    // Released when `lock` is closed.
    f()
}

/// Binds `path` for this daemon, replacing a dead daemon's file; `None`
/// when a live daemon already serves it.
pub fn claim(path: &Path) -> io::Result<Option<UnixListener>> {
    locked(path, || {
        if alive(path) {
            return Ok(None);
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        UnixListener::bind(path).map(Some)
    })
}

/// Gives up the path of a daemon that is about to stop serving. Called
/// while it still listens, so the file is still its own.
pub fn release(path: &Path) {
    let _ = locked(path, || std::fs::remove_file(path));
}

/// Removes the file a dead daemon left (one killed by a signal); one that
/// a daemon serves meanwhile stays.
pub fn remove_if_dead(path: &Path) {
    let _ = locked(path, || {
        if !alive(path) {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("moat-sock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Daemons that start at once: one serves, and every other sees it alive.
    #[test]
    fn one_of_many_racing_daemons_serves() {
        let dir = tmp("race");
        for round in 0..200 {
            let path = dir.join(format!("s{round}"));
            let barrier = Arc::new(Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let got = claim(&path).unwrap();
                        assert!(alive(&path), "a loser saw nobody serve");
                        got
                    })
                })
                .collect();
            let winners: Vec<UnixListener> = handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            assert_eq!(winners.len(), 1, "round {round}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dead_daemons_file_is_replaced_and_a_live_one_kept() {
        let dir = tmp("stale");
        let path = dir.join("s");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists() && !alive(&path));
        let live = claim(&path).unwrap().expect("the stale file is replaced");
        assert!(claim(&path).unwrap().is_none());
        remove_if_dead(&path);
        assert!(alive(&path), "a served socket was removed");
        release(&path);
        assert!(!path.exists());
        drop(live);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
