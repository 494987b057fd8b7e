//! stdio streams: the listener on the stdio port that parks attached
//! streams, and per-process copying between pipes/ptys and streams.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use moat_protocol::agent::Stdio;
use moat_protocol::stream::{write_reply, Request, StreamHeader, StreamKind};

use crate::error::{AgentError, IoContext, Result};
use crate::process::{pipe, ChildStdio};
use crate::transport::Listener;

type Key = (String, String, StreamKind);

/// Streams attached by the host and not yet claimed by a process.
#[derive(Default)]
pub struct StreamRegistry {
    parked: Mutex<HashMap<Key, (UnixStream, Instant)>>,
    cv: Condvar,
}

impl StreamRegistry {
    fn park(&self, h: StreamHeader, s: UnixStream) {
        let mut p = self.parked.lock().unwrap();
        let now = Instant::now();
        // Unclaimed streams expire; dropping closes them.
        p.retain(|_, (_, t)| now.duration_since(*t) < moat_protocol::STREAM_ATTACH_TIMEOUT * 2);
        p.insert((h.container_id, h.exec_id, h.kind), (s, now));
        self.cv.notify_all();
    }

    /// Waits until the stream is attached or `deadline` passes.
    pub fn take(
        &self,
        cid: &str,
        eid: &str,
        kind: StreamKind,
        deadline: Instant,
    ) -> Option<UnixStream> {
        let key = (cid.to_owned(), eid.to_owned(), kind);
        let mut p = self.parked.lock().unwrap();
        loop {
            if let Some((s, _)) = p.remove(&key) {
                return Some(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            p = self.cv.wait_timeout(p, deadline - now).unwrap().0;
        }
    }

    /// Drops streams parked for a container (on removal).
    pub fn forget(&self, cid: &str) {
        self.parked.lock().unwrap().retain(|k, _| k.0 != cid);
    }
}

/// Serves the stdio port forever. `known` says whether a container exists.
pub fn serve(
    listener: Listener,
    registry: Arc<StreamRegistry>,
    known: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("stdio accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let registry = registry.clone();
        let known = known.clone();
        // The header read must not hold up other connections.
        let _ = std::thread::Builder::new()
            .name("stdio-handshake".into())
            .spawn(move || handshake(stream, &registry, &*known));
    }
}

fn handshake(mut s: UnixStream, registry: &StreamRegistry, known: &dyn Fn(&str) -> bool) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let request = Request::read_from(&mut s);
    let _ = s.set_read_timeout(None);
    let header = match request {
        Ok(Request::Stdio(h)) => h,
        Ok(Request::Forward { port }) => return crate::port_forward::serve(s, port),
        Ok(Request::Share { tag }) => return crate::share::serve(s, &tag),
        Err(e) => {
            log::warn!("stdio handshake: {e}");
            let _ = write_reply(&mut s, Err(&e.to_string()));
            return;
        }
    };
    if !known(&header.container_id) {
        let msg = format!("container {:?} not found", header.container_id);
        let _ = write_reply(&mut s, Err(&msg));
        return;
    }
    if write_reply(&mut s, Ok(())).is_ok() {
        log::debug!("stdio {:?} attached", header);
        registry.park(header, s);
    }
}

/// Count of running output copiers plus a progress counter, so the exit can
/// be reported once output is drained.
#[derive(Default)]
struct Drain {
    running: Mutex<usize>,
    cv: Condvar,
    progress: AtomicU64,
}

/// The agent's ends of one process's stdio.
pub struct ProcessIo {
    stdio: Stdio,
    stdin: Arc<Mutex<Option<File>>>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    /// The terminal's master, once the child has opened it.
    pty: OnceLock<Arc<File>>,
    /// The attached input stream, shut down once the process exited.
    stdin_stream: Mutex<Option<UnixStream>>,
    /// Made when an input stream is attached (a process without one, or
    /// with a terminal, never needs it) and raised by CloseStdin: the
    /// input copy forwards what has arrived, then closes the process's
    /// stdin.
    stdin_closing: OnceLock<Arc<CloseSignal>>,
    drain: Arc<Drain>,
}

impl ProcessIo {
    /// Creates pipes or a pty as `stdio` announces; returns the child's ends.
    pub fn new(stdio: &Stdio, size: Option<(u16, u16)>) -> Result<(ProcessIo, ChildStdio)> {
        let mut child = ChildStdio::default();
        let io = ProcessIo {
            stdio: stdio.clone(),
            stdin: Arc::new(Mutex::new(None)),
            stdout: Mutex::new(None),
            stderr: Mutex::new(None),
            pty: OnceLock::new(),
            stdin_stream: Mutex::new(None),
            stdin_closing: OnceLock::new(),
            drain: Arc::new(Drain::default()),
        };
        if stdio.terminal {
            child.terminal = Some(size.unwrap_or((24, 80)));
            return Ok((io, child));
        }
        if stdio.stdin {
            let (r, w) = pipe(false)?;
            child.stdin = Some(r);
            *io.stdin.lock().unwrap() = Some(File::from(w));
        }
        if stdio.stdout {
            let (r, w) = pipe(true)?;
            child.stdout = Some(w);
            *io.stdout.lock().unwrap() = Some(File::from(r));
        }
        if stdio.stderr {
            let (r, w) = pipe(true)?;
            child.stderr = Some(w);
            *io.stderr.lock().unwrap() = Some(File::from(r));
        }
        Ok((io, child))
    }

    /// Takes the terminal master the child opened (see `ChildStdio`).
    pub fn set_pty(&self, master: Option<OwnedFd>) {
        if let Some(m) = master {
            let _ = self.pty.set(Arc::new(File::from(m)));
        }
    }

    /// The streams this process expects.
    fn kinds(&self) -> Vec<StreamKind> {
        if self.stdio.terminal {
            return vec![StreamKind::Pty];
        }
        let mut k = Vec::new();
        if self.stdio.stdin {
            k.push(StreamKind::Stdin);
        }
        if self.stdio.stdout {
            k.push(StreamKind::Stdout);
        }
        if self.stdio.stderr {
            k.push(StreamKind::Stderr);
        }
        k
    }

    /// Waits for every announced stream, then starts copying. On timeout
    /// the streams taken so far are put back so a retry can find them.
    pub fn attach(
        &self,
        reg: &StreamRegistry,
        cid: &str,
        eid: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        for kind in self.kinds() {
            match reg.take(cid, eid, kind, deadline) {
                Some(s) => got.push((kind, s)),
                None => {
                    for (k, s) in got {
                        reg.park(StreamHeader::new(cid, eid, k), s);
                    }
                    return Err(AgentError::Timeout(format!(
                        "the {} stream of {cid}/{eid} was not attached within {}s",
                        kind.as_str(),
                        timeout.as_secs()
                    )));
                }
            }
        }
        for (kind, s) in got {
            self.start_copy(kind, s)?;
        }
        Ok(())
    }

    fn start_copy(&self, kind: StreamKind, s: UnixStream) -> Result<()> {
        match kind {
            StreamKind::Stdin => {
                let close = Arc::new(CloseSignal::new()?);
                let close = self.stdin_closing.get_or_init(|| close).clone();
                *self.stdin_stream.lock().unwrap() = Some(s.try_clone().ctx(|| "dup".into())?);
                let sink = self.stdin.clone();
                spawn_named("stdin", move || copy_in(s, &sink, Some(&close)));
            }
            StreamKind::Stdout | StreamKind::Stderr => {
                let src = if kind == StreamKind::Stdout {
                    self.stdout.lock().unwrap().take()
                } else {
                    self.stderr.lock().unwrap().take()
                };
                let Some(src) = src else { return Ok(()) };
                self.copy_out(src, s);
            }
            StreamKind::Pty => {
                let master = self.pty.get().cloned().ok_or_else(|| {
                    AgentError::FailedPrecondition("the process has no terminal yet".into())
                })?;
                let input = s.try_clone().ctx(|| "dup".into())?;
                *self.stdin_stream.lock().unwrap() = Some(s.try_clone().ctx(|| "dup".into())?);
                let m = master.try_clone().ctx(|| "dup".into())?;
                let sink = Arc::new(Mutex::new(Some(m)));
                // A terminal's input is never closed (see `close_stdin`).
                spawn_named("pty-in", move || copy_in(input, &sink, None));
                let out = master.try_clone().ctx(|| "dup".into())?;
                self.copy_out(out, s);
            }
        }
        Ok(())
    }

    fn copy_out(&self, src: File, dst: UnixStream) {
        *self.drain.running.lock().unwrap() += 1;
        let drain = self.drain.clone();
        spawn_named("stdout", move || {
            copy_out(src, dst, &drain.progress);
            *drain.running.lock().unwrap() -= 1;
            drain.cv.notify_all();
        });
    }

    /// Waits until all output was copied. Output held open by a leftover
    /// descendant would never end: give up once it stays quiet for `idle`.
    pub fn drain(&self, idle: Duration) {
        let mut running = self.drain.running.lock().unwrap();
        let mut last = self.drain.progress.load(Ordering::Relaxed);
        while *running > 0 {
            let (g, t) = self.drain.cv.wait_timeout(running, idle).unwrap();
            running = g;
            if t.timed_out() {
                let now = self.drain.progress.load(Ordering::Relaxed);
                if now == last {
                    log::debug!("output still open after exit; not waiting further");
                    break;
                }
                last = now;
            }
        }
    }

    /// Closes the process's stdin (EOF for it). Input that reached the
    /// guest before the call is still delivered: with a stream attached the
    /// copy closes stdin once the stream has gone quiet (a pty has no EOF,
    /// so its input stays open).
    pub fn close_stdin(&self) {
        if self.stdio.terminal {
            return;
        }
        if let Some(close) = self.stdin_closing.get() {
            close.raise();
        } else {
            self.stdin.lock().unwrap().take();
        }
    }

    /// Ends the input side after the process exited.
    pub fn finish(&self) {
        self.stdin.lock().unwrap().take();
        if let Some(s) = self.stdin_stream.lock().unwrap().take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Sets the size of the process's terminal, in character cells;
    /// fails with `FailedPrecondition` if it has none.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let pty = self
            .pty
            .get()
            .ok_or_else(|| AgentError::FailedPrecondition("process has no terminal".into()))?;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct we own.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(io::Error::last_os_error()).ctx(|| "TIOCSWINSZ".into());
        }
        Ok(())
    }
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        log::error!("spawning {name} thread: {e}");
    }
}

const BUF: usize = 128 * 1024;

/// Host -> process, until the stream ends (EOF from the host closes the
/// process's stdin), or, once `close` is raised, until no more input is
/// waiting.
fn copy_in(mut src: UnixStream, sink: &Mutex<Option<File>>, close: Option<&CloseSignal>) {
    let mut buf = vec![0u8; BUF];
    let mut closing = false;
    loop {
        if let (false, Some(close)) = (closing, close) {
            closing = wait_input_or_close(&src, close);
        }
        if closing && !readable_within(&src, CLOSE_POLL) {
            break;
        }
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut g = sink.lock().unwrap();
        let Some(f) = g.as_mut() else { break };
        if f.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    sink.lock().unwrap().take();
}

/// After CloseStdin, how long the input stream may stay quiet before the
/// copy takes it as drained.
const CLOSE_POLL: Duration = Duration::from_millis(100);

/// CloseStdin's word to an input copy: a byte in a pipe. The copy sleeps
/// in poll(2) on its stream and this pipe, rather than waking every so
/// often to look at a flag: in a guest whose kernel is emulated, every
/// idle wakeup of every process's input copy costs host CPU. (A byte, not
/// closing the write end: a child forked meanwhile, such as a created
/// container waiting for its start, holds a copy of that end until it
/// execs.)
struct CloseSignal {
    read: OwnedFd,
    write: OwnedFd,
}

impl CloseSignal {
    fn new() -> Result<CloseSignal> {
        // Non-blocking: a raise never waits on a full pipe.
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .ctx(|| "pipe".into())?;
        Ok(CloseSignal { read, write })
    }

    fn raise(&self) {
        // The pipe is never read: one byte keeps it readable for good, and
        // a full one (EAGAIN, after 64 KiB of raises) is readable already.
        let _ = nix::unistd::write(&self.write, &[1]);
    }
}

/// Sleeps until `s` has data, EOF or an error to read, or `close` is
/// raised; returns whether it was raised.
fn wait_input_or_close(s: &UnixStream, close: &CloseSignal) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = [
            PollFd::new(s.as_fd(), PollFlags::POLLIN),
            PollFd::new(close.read.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            // The read that follows reports the stream's error.
            Err(_) => return false,
            Ok(_) => return fds[1].any().unwrap_or(false),
        }
    }
}

/// Whether `s` has data or EOF (or an error) to read within `timeout`.
fn readable_within(s: &UnixStream, timeout: Duration) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        s.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match nix::poll::poll(&mut fds, ms) {
        Ok(0) => false,
        Ok(_) => true,
        Err(nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// Process -> host, until EOF (pipe) or EIO (pty with no slave left).
fn copy_out(mut src: File, mut dst: UnixStream, progress: &AtomicU64) {
    let mut buf = vec![0u8; BUF];
    let mut host_gone = false;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        progress.fetch_add(n as u64, Ordering::Relaxed);
        // Keep draining when the host went away so the process never
        // blocks on a full pipe.
        if !host_gone && dst.write_all(&buf[..n]).is_err() {
            host_gone = true;
        }
    }
    let _ = dst.shutdown(Shutdown::Write);
}
