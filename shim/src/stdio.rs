//! A process's stdio: containerd's FIFOs (or `file://` / `binary://` log
//! URIs) on one side, the agent's vsock streams on the other.
//!
//! Output is copied until the agent closes the stream (after the process's
//! pipe reached EOF); the service waits for those copies before it reports an
//! exit, so no output is lost when a process exits at once.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio as ProcStdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StdioError {
    #[error("invalid stdio URI {0:?}")]
    BadUri(String),
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot start the logging binary {path}: {source}")]
    Binary { path: PathBuf, source: io::Error },
    #[error("stdio pipe: {0}")]
    Pipe(#[source] io::Error),
}

/// Where a process's output goes, from containerd's stdout/stderr strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    None,
    /// A FIFO (or any file) that is opened for writing, as containerd's clients expect.
    Fifo(PathBuf),
    /// `file:///path`: appended to.
    File(PathBuf),
    /// `binary:///path?k=v`: a logging binary reading fds 3 and 4.
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, StdioError> {
        if s.is_empty() {
            return Ok(Target::None);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(Target::Fifo(PathBuf::from(s)));
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') {
            return Err(StdioError::BadUri(s.to_owned()));
        }
        match scheme {
            "fifo" => Ok(Target::Fifo(PathBuf::from(path))),
            "file" => Ok(Target::File(PathBuf::from(path))),
            "binary" => {
                let mut args = Vec::new();
                for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    args.push(k.to_owned());
                    if !v.is_empty() {
                        args.push(v.to_owned());
                    }
                }
                Ok(Target::Binary {
                    path: PathBuf::from(path),
                    args,
                })
            }
            _ => Err(StdioError::BadUri(s.to_owned())),
        }
    }
}

/// containerd's view of a process's stdio.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioSpec {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioSpec {
    /// Which agent streams to announce.
    pub fn agent_stdio(&self) -> moat_protocol::agent::Stdio {
        moat_protocol::agent::Stdio {
            stdin: !self.stdin.is_empty(),
            stdout: !self.terminal && !self.stdout.is_empty(),
            stderr: !self.terminal && !self.stderr.is_empty(),
            terminal: self.terminal,
            ..Default::default()
        }
    }

    /// Checks the URIs before anything is started.
    pub fn validate(&self) -> Result<(), StdioError> {
        Target::parse(&self.stdout)?;
        Target::parse(&self.stderr)?;
        Ok(())
    }
}

type Writer = Box<dyn Write + Send>;

/// Opens containerd's output destinations; the returned writers are used by
/// the copy threads. A logging binary is started here, and waited for.
struct Outputs {
    stdout: Option<Writer>,
    stderr: Option<Writer>,
    binary: Option<Child>,
}

fn open_fifo_for_write(path: &Path) -> Result<File, StdioError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| StdioError::Open {
            path: path.to_owned(),
            source,
        })
}

fn open_append(path: &Path) -> Result<File, StdioError> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|source| StdioError::Open {
            path: path.to_owned(),
            source,
        })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), StdioError> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| StdioError::Pipe(e.into()))?;
    Ok((r, w))
}

/// Starts a containerd logging binary: its stdout and stderr sources are fds
/// 3 and 4, and it closes fd 5 once it is ready.
fn start_binary(
    path: &Path,
    args: &[String],
    container_id: &str,
    namespace: &str,
) -> Result<(Writer, Writer, Child), StdioError> {
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", container_id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(ProcStdio::null())
        .stdout(ProcStdio::null())
        .stderr(ProcStdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2) run.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                // dup2 clears FD_CLOEXEC on the new descriptor.
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| StdioError::Binary {
        path: path.to_owned(),
        source,
    })?;
    drop((out_r, err_r, ready_w));
    // The binary signals readiness by closing fd 5 (or by exiting).
    let mut ready = File::from(ready_r);
    let mut buf = [0u8; 16];
    while matches!(ready.read(&mut buf), Ok(n) if n > 0) {}
    Ok((
        Box::new(File::from(out_w)),
        Box::new(File::from(err_w)),
        child,
    ))
}

impl Outputs {
    fn open(spec: &StdioSpec, container_id: &str, namespace: &str) -> Result<Outputs, StdioError> {
        let out = Target::parse(&spec.stdout)?;
        let err = if spec.terminal {
            Target::None
        } else {
            Target::parse(&spec.stderr)?
        };
        let mut o = Outputs {
            stdout: None,
            stderr: None,
            binary: None,
        };
        match &out {
            Target::Binary { path, args } => {
                let (w_out, w_err, child) = start_binary(path, args, container_id, namespace)?;
                o.stdout = Some(w_out);
                o.stderr = (err == out).then_some(w_err);
                o.binary = Some(child);
            }
            Target::File(p) => {
                let f = open_append(p)?;
                if err == out {
                    o.stderr = Some(Box::new(f.try_clone().map_err(StdioError::Pipe)?));
                }
                o.stdout = Some(Box::new(f));
            }
            Target::Fifo(p) => o.stdout = Some(Box::new(open_fifo_for_write(p)?)),
            Target::None => {}
        }
        if o.stderr.is_none() && err != out {
            o.stderr = match &err {
                Target::Fifo(p) => Some(Box::new(open_fifo_for_write(p)?)),
                Target::File(p) => Some(Box::new(open_append(p)?)),
                Target::Binary { path, args } => {
                    let (_, w_err, child) = start_binary(path, args, container_id, namespace)?;
                    o.binary.get_or_insert(child);
                    Some(w_err)
                }
                Target::None => None,
            };
        }
        Ok(o)
    }
}

/// Copies `src` into `dst` until EOF. A failing destination (the reader went
/// away) is dropped but the source is still drained, so the guest never stalls.
pub fn copy_out(mut src: impl Read, mut dst: Option<Writer>) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        total += n as u64;
        if let Some(w) = dst.as_mut() {
            if w.write_all(&buf[..n]).is_err() {
                dst = None;
            }
        }
    }
    if let Some(mut w) = dst {
        let _ = w.flush();
    }
    total
}

/// The stdin side, kept for CloseIO.
struct StdinState {
    fifo: PathBuf,
    closed: AtomicBool,
    stream: UnixStream,
}

impl StdinState {
    /// Ends the stdin copy: wakes an open() still waiting for a writer, and
    /// gives the process EOF if the copy does not end by itself.
    fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        // A reader blocked in open(O_RDONLY) returns once a writer opens;
        // this writer closes at once, so the reader then sees EOF.
        let _ = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo);
    }
}

fn copy_stdin(state: Arc<StdinState>, mut dst: UnixStream, shutdown_on_eof: bool) {
    let src = OpenOptions::new().read(true).open(&state.fifo);
    if let Ok(mut src) = src {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    if shutdown_on_eof {
        let _ = dst.shutdown(Shutdown::Write);
    }
}

/// The live I/O of one process.
pub struct ProcessIo {
    /// Completion signals of the output copies, and how many arrived so far.
    done_rx: Mutex<(Receiver<()>, usize)>,
    outputs: usize,
    /// The agent streams the output copies read, to cut them once the
    /// process is gone (see `finish`).
    output_streams: Vec<UnixStream>,
    stdin: Option<Arc<StdinState>>,
    binary: Mutex<Option<Child>>,
}

/// The agent streams of one process, opened before it starts.
pub struct Streams {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
    /// With a terminal: input and output on one stream.
    pub pty: Option<UnixStream>,
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), StdioError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(StdioError::Pipe)
}

impl ProcessIo {
    /// Connects containerd's side to the agent streams and starts copying.
    /// Opening the FIFOs happens in the copy threads: a FIFO open blocks
    /// until containerd's client opened the other end.
    pub fn start(
        spec: &StdioSpec,
        streams: Streams,
        container_id: &str,
        namespace: &str,
    ) -> Result<ProcessIo, StdioError> {
        let (done_tx, done_rx): (Sender<()>, Receiver<()>) = mpsc::channel();
        let out_target = Target::parse(&spec.stdout)?;
        let err_target = Target::parse(&spec.stderr)?;
        let needs_early_open = matches!(out_target, Target::File(_) | Target::Binary { .. })
            || matches!(err_target, Target::File(_) | Target::Binary { .. });
        // Files and binaries open at once (and may fail here); FIFOs open in the threads.
        let mut early = if needs_early_open {
            Some(Outputs::open(spec, container_id, namespace)?)
        } else {
            None
        };
        let binary = early.as_mut().and_then(|o| o.binary.take());
        let mut io = ProcessIo {
            done_rx: Mutex::new((done_rx, 0)),
            outputs: 0,
            output_streams: Vec::new(),
            stdin: None,
            binary: Mutex::new(binary),
        };

        let out_src = streams.pty.as_ref().map(|p| p.try_clone()).transpose();
        let out_src = out_src.map_err(StdioError::Pipe)?.or(streams.stdout);
        let outs = [
            (
                out_src,
                spec.stdout.clone(),
                early.as_mut().and_then(|o| o.stdout.take()),
            ),
            (
                streams.stderr,
                spec.stderr.clone(),
                early.as_mut().and_then(|o| o.stderr.take()),
            ),
        ];
        for (src, target, opened) in outs {
            let Some(src) = src else { continue };
            io.output_streams
                .push(src.try_clone().map_err(StdioError::Pipe)?);
            let done = done_tx.clone();
            io.outputs += 1;
            spawn_named("stdio-out", move || {
                let dst: Option<Writer> = match (opened, Target::parse(&target)) {
                    (Some(w), _) => Some(w),
                    (None, Ok(Target::Fifo(p))) => match open_fifo_for_write(&p) {
                        Ok(f) => Some(Box::new(f)),
                        Err(e) => {
                            log::warn!("{e}; output is discarded");
                            None
                        }
                    },
                    _ => None,
                };
                copy_out(src, dst);
                let _ = done.send(());
            })?;
        }

        let stdin_dst = match (streams.pty, streams.stdin) {
            (Some(pty), _) => Some((pty, false)),
            (None, Some(s)) => Some((s, true)),
            (None, None) => None,
        };
        if let (Some((dst, shutdown)), false) = (stdin_dst, spec.stdin.is_empty()) {
            let state = Arc::new(StdinState {
                fifo: PathBuf::from(&spec.stdin),
                closed: AtomicBool::new(false),
                stream: dst.try_clone().map_err(StdioError::Pipe)?,
            });
            io.stdin = Some(state.clone());
            spawn_named("stdio-in", move || copy_stdin(state, dst, shutdown))?;
        }
        Ok(io)
    }

    /// Waits until every output stream reached EOF (bounded: a process that
    /// left children holding its stdout must not block the exit forever).
    pub fn wait_outputs(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.done_rx.lock().unwrap_or_else(|e| e.into_inner());
        let (rx, received) = &mut *guard;
        while *received < self.outputs {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                return false;
            }
            *received += 1;
        }
        true
    }

    /// CloseIO: stdin reaches EOF once the data already written is copied.
    pub fn close_stdin(&self) {
        if let Some(s) = &self.stdin {
            s.close();
            let stream = s.stream.try_clone();
            // If the copy is stuck on a writer that never closes, cut it.
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(2));
                if let Ok(st) = stream {
                    let _ = st.shutdown(Shutdown::Write);
                }
            });
        }
    }

    /// Ends all copying once the process is gone and its output was waited
    /// for: output still open then (a leftover process in the guest, or a
    /// stream that never saw its end) is cut, so containerd's FIFOs close and
    /// its client (`ctr run`) is not left waiting for them forever. Stops the
    /// logging binary, if any.
    pub fn finish(&self) {
        self.close_stdin();
        for s in &self.output_streams {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(mut child) = self.binary.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // The binary exits on EOF of its pipes; reap it without blocking the caller.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        if let Some(s) = &self.stdin {
            s.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;

    fn mkfifo(path: &Path) -> io::Result<()> {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(Into::into)
    }

    #[test]
    fn uris_parse() {
        assert_eq!(Target::parse("").unwrap(), Target::None);
        assert_eq!(
            Target::parse("/run/c/stdout").unwrap(),
            Target::Fifo("/run/c/stdout".into())
        );
        assert_eq!(
            Target::parse("file:///var/log/c.log").unwrap(),
            Target::File("/var/log/c.log".into())
        );
        assert_eq!(
            Target::parse("binary:///usr/bin/logger?id=7&verbose").unwrap(),
            Target::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["id".into(), "7".into(), "verbose".into()]
            }
        );
        assert!(Target::parse("http://x/y").is_err());
        assert!(Target::parse("file://relative").is_err());
    }

    #[test]
    fn agent_stdio_flags() {
        let s = StdioSpec {
            stdin: "/i".into(),
            stdout: "/o".into(),
            stderr: "".into(),
            terminal: false,
        };
        let a = s.agent_stdio();
        assert!(a.stdin && a.stdout && !a.stderr && !a.terminal);
        let t = StdioSpec {
            terminal: true,
            ..s
        };
        let a = t.agent_stdio();
        assert!(a.terminal && !a.stdout && !a.stderr && a.stdin);
    }

    /// The guest side of the streams: a unix socket pair per stream.
    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn fifo_plumbing_copies_everything_before_wait_returns() {
        let t = TempDir::new("fifo");
        let (i, o, e) = (
            t.path().join("stdin"),
            t.path().join("stdout"),
            t.path().join("stderr"),
        );
        for p in [&i, &o, &e] {
            mkfifo(p).unwrap();
        }
        // containerd's client: reads stdout/stderr, writes stdin.
        let (o2, e2, i2) = (o.clone(), e.clone(), i.clone());
        let reader_out = std::thread::spawn(move || std::fs::read(o2).unwrap());
        let reader_err = std::thread::spawn(move || std::fs::read(e2).unwrap());
        let writer_in = std::thread::spawn(move || {
            std::fs::write(i2, b"input line\n").unwrap();
        });

        let (host_out, mut guest_out) = pair();
        let (host_err, mut guest_err) = pair();
        let (host_in, mut guest_in) = pair();
        let spec = StdioSpec {
            stdin: i.to_str().unwrap().into(),
            stdout: o.to_str().unwrap().into(),
            stderr: e.to_str().unwrap().into(),
            terminal: false,
        };
        let io = ProcessIo::start(
            &spec,
            Streams {
                stdin: Some(host_in),
                stdout: Some(host_out),
                stderr: Some(host_err),
                pty: None,
            },
            "c1",
            "ns",
        )
        .unwrap();
        // The "process": echoes stdin to stdout, writes a big stderr, exits.
        let mut got = String::new();
        guest_in.read_to_string(&mut got).unwrap();
        assert_eq!(got, "input line\n");
        guest_out.write_all(got.as_bytes()).unwrap();
        let big = vec![b'x'; 1 << 20];
        guest_err.write_all(&big).unwrap();
        drop((guest_out, guest_err));

        assert!(io.wait_outputs(Duration::from_secs(10)));
        io.finish();
        writer_in.join().unwrap();
        assert_eq!(reader_out.join().unwrap(), b"input line\n");
        assert_eq!(reader_err.join().unwrap().len(), 1 << 20);
    }

    #[test]
    fn close_io_ends_stdin_even_without_a_writer() {
        let t = TempDir::new("closeio");
        let i = t.path().join("stdin");
        mkfifo(&i).unwrap();
        let (host_in, mut guest_in) = pair();
        let spec = StdioSpec {
            stdin: i.to_str().unwrap().into(),
            ..Default::default()
        };
        let io = ProcessIo::start(
            &spec,
            Streams {
                stdin: Some(host_in),
                stdout: None,
                stderr: None,
                pty: None,
            },
            "c1",
            "ns",
        )
        .unwrap();
        // No client ever opens the FIFO; CloseIO must still give EOF.
        std::thread::sleep(Duration::from_millis(100));
        io.close_stdin();
        guest_in
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = Vec::new();
        assert_eq!(guest_in.read_to_end(&mut buf).unwrap(), 0);
    }

    #[test]
    fn file_uri_gets_both_streams_and_a_gone_reader_does_not_stall() {
        let t = TempDir::new("file");
        let log = t.path().join("logs/c.log");
        let uri = format!("file://{}", log.display());
        let (host_out, mut guest_out) = pair();
        let (host_err, mut guest_err) = pair();
        let spec = StdioSpec {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let io = ProcessIo::start(
            &spec,
            Streams {
                stdin: None,
                stdout: Some(host_out),
                stderr: Some(host_err),
                pty: None,
            },
            "c1",
            "ns",
        )
        .unwrap();
        guest_out.write_all(b"out\n").unwrap();
        drop(guest_out);
        assert!(
            !io.wait_outputs(Duration::from_millis(200)),
            "stderr still open"
        );
        guest_err.write_all(b"err\n").unwrap();
        drop(guest_err);
        assert!(io.wait_outputs(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("out\n") && text.contains("err\n"), "{text:?}");

        // A destination that fails is dropped while the source is drained.
        let (a, mut b) = pair();
        let (r, w) = pipe().unwrap();
        drop(r);
        let t2 = std::thread::spawn(move || copy_out(a, Some(Box::new(File::from(w)))));
        b.write_all(&vec![1u8; 300_000]).unwrap();
        drop(b);
        assert_eq!(t2.join().unwrap(), 300_000);
    }

    #[test]
    fn finish_cuts_output_that_never_ends_and_closes_the_fifo() {
        let t = TempDir::new("cut");
        let o = t.path().join("stdout");
        mkfifo(&o).unwrap();
        let o2 = o.clone();
        let reader = std::thread::spawn(move || std::fs::read(o2).unwrap());
        let (host_pty, mut guest_pty) = pair();
        let spec = StdioSpec {
            stdout: o.to_str().unwrap().into(),
            terminal: true,
            ..Default::default()
        };
        let io = ProcessIo::start(
            &spec,
            Streams {
                stdin: None,
                stdout: None,
                stderr: None,
                pty: Some(host_pty),
            },
            "c1",
            "ns",
        )
        .unwrap();
        guest_pty.write_all(b"last words").unwrap();
        // The guest end stays open: the output never ends by itself.
        assert!(!io.wait_outputs(Duration::from_millis(300)));
        io.finish();
        assert!(io.wait_outputs(Duration::from_secs(10)));
        assert_eq!(reader.join().unwrap(), b"last words");
        drop(guest_pty);
    }

    #[test]
    fn binary_uri_runs_the_logger_with_fds_3_and_4() {
        let t = TempDir::new("binary");
        let script = t.path().join("logger.sh");
        let out = t.path().join("out.txt");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\ncat <&3 >{o}.out & cat <&4 >{o}.err & wait\n\
                 echo \"$CONTAINER_ID $CONTAINER_NAMESPACE $1 $2\" >{o}\n",
                o = out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = format!("binary://{}?tag=x", script.display());
        let (host_out, mut guest_out) = pair();
        let (host_err, mut guest_err) = pair();
        let spec = StdioSpec {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let io = ProcessIo::start(
            &spec,
            Streams {
                stdin: None,
                stdout: Some(host_out),
                stderr: Some(host_err),
                pty: None,
            },
            "c9",
            "ns9",
        )
        .unwrap();
        guest_out.write_all(b"to-out").unwrap();
        guest_err.write_all(b"to-err").unwrap();
        drop((guest_out, guest_err));
        assert!(io.wait_outputs(Duration::from_secs(10)));
        let child = io.binary.lock().unwrap().take();
        let status = child.unwrap().wait().unwrap();
        assert!(status.success());
        let o = |ext: &str| std::fs::read_to_string(format!("{}{ext}", out.display())).unwrap();
        assert_eq!(o(".out"), "to-out");
        assert_eq!(o(".err"), "to-err");
        assert_eq!(o(""), "c9 ns9 tag x\n");
    }
}
