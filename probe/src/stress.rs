//! The neighbour's stressors (the Isolation Benchmark Suite's six), each
//! bounded so that a runtime that does not contain it still leaves this
//! shared machine usable: the memory bomb stops at 384 MiB, the fork bomb
//! at 256 live processes, the disk hog rewrites one 128 MiB file, and the
//! network stressors stay on loopback.

use std::io::Write;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::work::{drain, CHUNK};

const MEMORY_CAP_MIB: usize = 384;
const FORK_CAP: usize = 256;
const DISK_FILE_MIB: u64 = 128;

fn memory(until: Instant) -> Value {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    while Instant::now() < until {
        if chunks.len() * 16 < MEMORY_CAP_MIB {
            chunks.push(vec![1u8; 16 << 20]);
        }
        // Keep every page in use.
        for c in chunks.iter_mut() {
            for p in c.iter_mut().step_by(4096) {
                *p = p.wrapping_add(1);
            }
        }
    }
    json!({ "held_mib": chunks.len() * 16 })
}

fn fork(until: Instant) -> Value {
    let mut live = Vec::new();
    let mut forks = 0u64;
    while Instant::now() < until {
        // SAFETY: the child sleeps and exits without touching shared state.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let left = until.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(200)));
            // SAFETY: leave at once, without the parent's exit work.
            unsafe { libc::_exit(0) };
        }
        if pid > 0 {
            forks += 1;
            live.push(pid);
        }
        if pid < 0 || live.len() >= FORK_CAP {
            // SAFETY: reaping any of our children.
            let done = unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
            live.retain(|p| *p != done);
        }
    }
    for p in live {
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(p, std::ptr::null_mut(), 0) };
    }
    json!({ "forks": forks })
}

fn cpu(until: Instant) -> Value {
    let n = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let mut x = 0u64;
                while Instant::now() < until {
                    for i in 0..100_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    json!({ "threads": n })
}

fn disk(until: Instant) -> Result<Value, String> {
    let path = "/tmp/moat-probe-hog.dat";
    let mut f = std::fs::File::create(path).map_err(|e| format!("create {path}: {e}"))?;
    let chunk = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    while Instant::now() < until {
        if written.is_multiple_of(DISK_FILE_MIB) {
            f.set_len(0).map_err(|e| format!("truncate: {e}"))?;
            std::io::Seek::rewind(&mut f).map_err(|e| format!("seek: {e}"))?;
        }
        f.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
        f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        written += 1;
    }
    let _ = std::fs::remove_file(path);
    Ok(json!({ "written_mib": written }))
}

/// UDP datagrams to a closed loopback port, as fast as they go.
fn net_send(until: Instant) -> Result<Value, String> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let buf = [0u8; 1400];
    let mut sent = 0u64;
    while Instant::now() < until {
        for _ in 0..1000 {
            if s.send_to(&buf, "127.0.0.1:9").is_ok() {
                sent += 1;
            }
        }
    }
    Ok(json!({ "datagrams": sent }))
}

/// A TCP stream on loopback, received as fast as it comes.
fn net_recv(until: Instant) -> Result<Value, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || {
        if let Ok(mut c) = TcpStream::connect(addr) {
            let chunk = vec![1u8; CHUNK];
            while Instant::now() < until && c.write_all(&chunk).is_ok() {}
        }
    });
    let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    let total = drain(&mut s);
    let _ = sender.join();
    Ok(json!({ "received_mb": total as f64 / 1e6 }))
}

/// Runs stressor `kind` for `seconds`.
pub fn run(kind: &str, seconds: f64) -> Result<Value, String> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    // Tells the bench the stressor runs: it starts the workload then.
    println!("{}", json!({ "started": kind }));
    let v = match kind {
        "memory" => memory(until),
        "fork" => fork(until),
        "cpu" => cpu(until),
        "disk" => disk(until)?,
        "net-send" => net_send(until)?,
        "net-recv" => net_recv(until)?,
        _ => return Err(format!("unknown stressor {kind:?}")),
    };
    Ok(json!({ "stressor": kind, "seconds": seconds, "result": v }))
}
