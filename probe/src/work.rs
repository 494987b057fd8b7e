//! Workloads: the well-behaved container's fixed work (CPU, memory, disk
//! with fsync, request latency over loopback), the micro workloads, I/O
//! throughput and loopback network throughput.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// `base` operations at size `scale` (1 = the unit size; `--quick` runs
/// a small fraction of it): at least one.
fn count(base: u64, scale: f64) -> u64 {
    ((base as f64 * scale).round() as u64).max(1)
}

/// A pure integer loop (no memory, no syscalls): `n` steps of an LCG.
fn int_loop(n: u64) -> u64 {
    let mut x = 1u64;
    for i in 0..n {
        x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
    }
    x
}

fn cpu_ms(scale: f64) -> f64 {
    let t = Instant::now();
    black_box(int_loop(count(20_000_000, scale)));
    ms(t)
}

/// Streams through a 32 MiB buffer (larger than any cache here), 4 passes
/// at scale 1. Below scale 1 the buffer shrinks instead: faulting its pages
/// in (before the clock starts) is what costs on an emulated guest kernel.
fn mem_ms(scale: f64) -> f64 {
    let mut a = vec![1u64; count(4 << 20, scale.min(1.0)) as usize];
    let t = Instant::now();
    for pass in 0..count(4, scale.max(1.0)) {
        for v in a.iter_mut() {
            *v = v.wrapping_add(pass);
        }
        black_box(&a);
    }
    ms(t)
}

/// 4 KiB writes, each made durable with fdatasync, on the rootfs.
fn disk_ms(scale: f64) -> Result<f64, String> {
    let path = "/tmp/moat-probe-fsync.dat";
    let mut f = std::fs::File::create(path).map_err(|e| format!("create {path}: {e}"))?;
    let block = [7u8; 4096];
    let t = Instant::now();
    for _ in 0..count(50, scale) {
        f.write_all(&block).map_err(|e| format!("write: {e}"))?;
        f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    }
    let took = ms(t);
    let _ = std::fs::remove_file(path);
    Ok(took)
}

/// An echo server on loopback and `n` 64-byte request/replies: the p50
/// round trip in microseconds.
fn latency_us(n: u64) -> Result<f64, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let server = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
        }
    });
    let mut c = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut rtts = Vec::with_capacity(n as usize);
    let mut buf = [1u8; 64];
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&buf).map_err(|e| format!("send: {e}"))?;
        c.read_exact(&mut buf)
            .map_err(|e| format!("receive: {e}"))?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    let _ = server.join();
    rtts.sort_by(f64::total_cmp);
    Ok(rtts[rtts.len() / 2])
}

/// The well-behaved container's fixed work, `reps` times.
pub fn workload(reps: u32, scale: f64) -> Value {
    let (mut cpu, mut mem, mut disk, mut lat) = (vec![], vec![], vec![], vec![]);
    let mut errors = vec![];
    for _ in 0..reps {
        cpu.push(cpu_ms(scale));
        mem.push(mem_ms(scale));
        match disk_ms(scale) {
            Ok(v) => disk.push(v),
            Err(e) => errors.push(e),
        }
        match latency_us(count(500, scale)) {
            Ok(v) => lat.push(v),
            Err(e) => errors.push(e),
        }
    }
    json!({ "cpu_ms": cpu, "mem_ms": mem, "disk_fsync_ms": disk, "net_rtt_p50_us": lat, "errors": errors })
}

fn per_op(t: Instant, n: u64, unit: f64) -> f64 {
    t.elapsed().as_secs_f64() * unit / n as f64
}

fn fork_exec(n: u64) -> Result<f64, String> {
    let t = Instant::now();
    for _ in 0..n {
        let st = std::process::Command::new("/bin/true")
            .status()
            .map_err(|e| format!("fork+exec /bin/true: {e}"))?;
        if !st.success() {
            return Err(format!("/bin/true: {st}"));
        }
    }
    Ok(per_op(t, n, 1e6))
}

fn create_delete(n: u64) -> Result<f64, String> {
    let t = Instant::now();
    for i in 0..n {
        let p = format!("/tmp/moat-probe-f{i}");
        std::fs::File::create(&p).map_err(|e| format!("create {p}: {e}"))?;
        std::fs::remove_file(&p).map_err(|e| format!("remove {p}: {e}"))?;
    }
    Ok(per_op(t, n, 1e6))
}

/// Syscall-heavy and CPU-bound micro workloads, `reps` times each.
pub fn micro(reps: u32, scale: f64) -> Value {
    let (mut getpid, mut files, mut forks, mut ints) = (vec![], vec![], vec![], vec![]);
    let mut errors = vec![];
    for _ in 0..reps {
        let n = count(200_000, scale);
        let t = Instant::now();
        for _ in 0..n {
            // SAFETY: getpid takes no arguments; raw, so libc cannot cache it.
            black_box(unsafe { libc::syscall(libc::SYS_getpid) });
        }
        getpid.push(per_op(t, n, 1e9));
        match create_delete(count(500, scale)) {
            Ok(v) => files.push(v),
            Err(e) => errors.push(e),
        }
        match fork_exec(count(20, scale)) {
            Ok(v) => forks.push(v),
            Err(e) => errors.push(e),
        }
        let t = Instant::now();
        black_box(int_loop(count(50_000_000, scale)));
        ints.push(ms(t));
    }
    json!({
        "getpid_ns": getpid, "file_create_delete_us": files,
        "fork_exec_us": forks, "int_loop_ms": ints, "errors": errors,
    })
}

/// Sequential write (then fsync) and read-back throughput in `dir`.
pub fn io(dir: &str, mib: u32) -> Result<Value, String> {
    let path = format!("{dir}/moat-probe-io.dat");
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).map_err(|e| format!("create {path}: {e}"))?;
    for _ in 0..mib {
        f.write_all(&chunk)
            .map_err(|e| format!("write {path}: {e}"))?;
    }
    f.sync_all().map_err(|e| format!("fsync {path}: {e}"))?;
    let write_s = t.elapsed().as_secs_f64();
    drop(f);
    let t = Instant::now();
    let mut f = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => return Err(format!("read {path}: {e}")),
        }
    }
    let read_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    let mb = f64::from(mib) * 1.048_576;
    Ok(json!({
        "mib": mib,
        "write_fsync_mb_s": mb / write_s,
        "read_mb_s": total as f64 / 1e6 / read_s,
    }))
}

/// The size of one write, and of one read, of a loopback TCP stream.
pub const CHUNK: usize = 64 << 10;

/// Reads `s` to its end (or first error); returns the bytes read.
pub fn drain(s: &mut impl Read) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total
}

/// One TCP stream over loopback for `seconds`: MB/s received.
pub fn net(seconds: f64) -> Result<Value, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let mut c = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let chunk = vec![1u8; CHUNK];
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < until {
            c.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
        }
        Ok(())
    });
    let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    let t = Instant::now();
    let total = drain(&mut s);
    let secs = t.elapsed().as_secs_f64();
    sender.join().map_err(|_| "sender panicked".to_string())??;
    Ok(json!({ "seconds": secs, "mb_s": total as f64 / 1e6 / secs }))
}
