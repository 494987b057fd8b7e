//! Child processes with a deadline, Ctrl-C handling, and what /proc says
//! about a process tree (memory, parents, command lines).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::parse;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM only set a flag: the benchmark stops at the next
/// check and still cleans up.
pub fn catch_signals() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps up to `d`, returning early (false) when interrupted.
pub fn sleep(d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            return false;
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    !interrupted()
}

/// A finished command.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From spawn to the exit being seen.
    pub elapsed: Duration,
    /// Wall-clock time of the spawn.
    pub started: SystemTime,
}

impl Finished {
    /// Stdout, or an error naming the command, its status and stderr.
    pub fn ok(self, what: &str) -> Result<String, String> {
        if self.status.success() {
            Ok(self.stdout)
        } else {
            Err(format!(
                "{what} failed ({}): {}",
                self.status,
                self.stderr.trim()
            ))
        }
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` (stdin from /dev/null, outputs captured) and waits for it;
/// kills it after `timeout` or on Ctrl-C. The exit is seen by a thread
/// blocked in wait(2), so `elapsed` is not rounded to a polling interval.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Finished, String> {
    run_inner(cmd, timeout, &interrupted)
}

/// [`run`] that lets the command finish after Ctrl-C (up to `timeout`):
/// for the cleanup, which runs after it.
pub fn run_to_end(cmd: &mut Command, timeout: Duration) -> Result<Finished, String> {
    run_inner(cmd, timeout, &|| false)
}

/// Runs `cmd`, killing it past `timeout` or once `stop()` says so.
fn run_inner(
    cmd: &mut Command,
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<Finished, String> {
    let what = format!("{:?}", cmd.get_program());
    let started = SystemTime::now();
    let t0 = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send((status, t0.elapsed()));
    });
    let mut killed = None;
    let (status, elapsed) = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(done) => break done,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!("lost the wait for {what}"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if killed.is_none() {
            let why = if stop() {
                Some("interrupted")
            } else if t0.elapsed() > timeout {
                Some("timed out")
            } else {
                None
            };
            if let Some(why) = why {
                // SAFETY: kill(2) on our own child, not reaped yet (no message).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed = Some(why);
            }
        }
    };
    if let Some(why) = killed {
        // Its outputs may stay open in grandchildren: do not wait for them.
        return Err(format!("{what} {why} after {:.1} s", elapsed.as_secs_f64()));
    }
    let status = status.map_err(|e| format!("wait for {what}: {e}"))?;
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    Ok(Finished {
        status,
        stdout,
        stderr,
        elapsed,
        started,
    })
}

/// Every process: pid -> (comm, ppid).
pub fn table() -> BTreeMap<i32, (String, i32)> {
    let mut t = BTreeMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return t;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(entry) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse::stat_comm_ppid(&s))
        {
            t.insert(pid, entry);
        }
    }
    t
}

/// The command line of `pid` (empty when it is gone or a kernel thread).
pub fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `root` and all its descendants in `table`, root first.
pub fn tree(table: &BTreeMap<i32, (String, i32)>, root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            table
                .iter()
                .filter(|(_, (_, ppid))| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    out
}

/// Memory of one process, from smaps_rollup.
#[derive(Debug, Clone, Serialize)]
pub struct ProcMem {
    pub pid: i32,
    pub name: String,
    pub pss_kib: u64,
    pub rss_kib: u64,
}

pub fn mem(pid: i32, name: &str) -> Result<ProcMem, String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    let field = |k| parse::smaps_kib(&text, k).ok_or_else(|| format!("no {k} in {path}"));
    Ok(ProcMem {
        pid,
        name: name.to_owned(),
        pss_kib: field("Pss")?,
        rss_kib: field("Rss")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_walks_descendants_breadth_first() {
        let t: BTreeMap<i32, (String, i32)> = [
            (1, ("init", 0)),
            (10, ("shim", 1)),
            (11, ("vmm", 10)),
            (12, ("sleep", 10)),
            (13, ("child", 11)),
            (20, ("other", 1)),
        ]
        .into_iter()
        .map(|(p, (n, pp))| (p, (n.to_string(), pp)))
        .collect();
        assert_eq!(tree(&t, 10), vec![10, 11, 12, 13]);
        assert_eq!(tree(&t, 20), vec![20]);
    }

    #[test]
    fn run_captures_output_and_status() {
        let f = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(f.stdout, "out\n");
        assert_eq!(f.stderr, "err\n");
        assert_eq!(f.status.code(), Some(3));
        let e = f.ok("sh").unwrap_err();
        assert!(e.contains("sh failed") && e.contains("err"), "{e}");
    }

    #[test]
    fn run_stops_when_told_and_run_to_end_does_not() {
        let e = run_inner(
            Command::new("sleep").arg("30"),
            Duration::from_secs(20),
            &|| true,
        )
        .err()
        .unwrap();
        assert!(e.contains("interrupted"), "{e}");
        let f = run_inner(&mut Command::new("true"), Duration::from_secs(20), &|| {
            false
        })
        .unwrap();
        assert!(f.status.success());
        // run_to_end never asks: a Ctrl-C seen by the bench does not kill its cleanup.
        assert!(run_to_end(&mut Command::new("true"), Duration::from_secs(20)).is_ok());
    }

    #[test]
    fn run_kills_at_the_deadline() {
        let t0 = Instant::now();
        let e = run(Command::new("sleep").arg("30"), Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(e.contains("timed out"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn own_memory_is_readable() {
        let me = std::process::id() as i32;
        let m = mem(me, "self").unwrap();
        assert!(
            m.rss_kib > 0 && m.pss_kib > 0 && m.pss_kib <= m.rss_kib,
            "{m:?}"
        );
        let t = table();
        assert!(t.contains_key(&me));
        assert!(!cmdline(me).is_empty());
    }
}
