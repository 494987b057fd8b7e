//! The control API: HTTP/1.1 + JSON on a unix socket (see `API.md`),
//! served by one thread that calls into a [`VmControl`].

mod fd_stream;
pub mod http;

use std::io::BufReader;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use moat_vmm_api::api::{self as wire, BlockRequest, ShutdownRequest, VmInfo};
use moat_vmm_api::limits::MAX_API_FDS;
use serde::Deserialize;
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::block::BlockSource;
use fd_stream::FdStream;
use http::{read_request, write_response, HttpError, Request};

/// What the API can do to the running VM.
pub trait VmControl: Send + Sync {
    /// The VM's run state and boot time, for `GET /vm`.
    fn state(&self) -> VmInfo;
    /// Stops every vCPU until [`VmControl::resume`].
    fn pause(&self) -> Result<(), ApiError>;
    /// Lets paused vCPUs run again.
    fn resume(&self) -> Result<(), ApiError>;
    /// Asks the guest to stop, then stops it hard after `timeout`.
    fn shutdown(&self, timeout: Duration) -> Result<(), ApiError>;
    /// Swaps the backing file of block device `id` while the guest runs; the
    /// guest learns the new capacity from a config-change interrupt.
    fn replace_block(&self, id: &str, source: BlockSource, read_only: bool)
        -> Result<(), ApiError>;
    /// Saves the paused VM as a template into `file`; the VM serves nothing
    /// afterwards.
    fn snapshot(&self, file: std::fs::File) -> Result<(), ApiError>;
}

/// Why an API call failed; each variant maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// The request names a device or path that does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the VM's current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The VMM failed to do what was asked (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::Internal(_) => 500,
        }
    }
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the unix socket at the path failed.
    #[error("Cannot bind the API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// Creating the stop eventfd or the thread failed.
    #[error("Cannot start the API thread")]
    Spawn(#[source] std::io::Error),
}

/// The block file a request names: its path, or the one descriptor that
/// came with it.
fn block_source(req: BlockRequest, mut fds: Vec<OwnedFd>) -> Result<BlockSource, ApiError> {
    match (req.path, fds.len()) {
        (Some(path), 0) => Ok(BlockSource::Path(path)),
        (None, 1) => Ok(BlockSource::Fd(fds.remove(0))),
        (Some(_), _) => Err(ApiError::BadRequest(
            "Give either a path or a file descriptor, not both".into(),
        )),
        (None, 0) => Err(ApiError::BadRequest(
            "Give a path, or pass the file's descriptor with the request".into(),
        )),
        (None, n) => Err(ApiError::BadRequest(format!(
            "Pass one file descriptor, not {n}"
        ))),
    }
}

/// The one descriptor a request that writes a file must come with.
fn one_file(mut fds: Vec<OwnedFd>) -> Result<std::fs::File, ApiError> {
    match fds.len() {
        1 => Ok(std::fs::File::from(fds.remove(0))),
        n => Err(ApiError::BadRequest(format!(
            "Pass the template file open with the request: one descriptor, not {n}"
        ))),
    }
}

fn shutdown_timeout(req: ShutdownRequest) -> Result<Duration, ApiError> {
    req.timeout().ok_or_else(|| {
        ApiError::BadRequest(format!(
            "timeout_ms must be at most {}",
            ShutdownRequest::MAX_TIMEOUT.as_millis()
        ))
    })
}

fn body<'a, T: Deserialize<'a>>(req: &'a Request) -> Result<T, ApiError> {
    let raw: &[u8] = if req.body.is_empty() {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(raw).map_err(|e| ApiError::BadRequest(format!("Invalid JSON body: {e}")))
}

/// Routes one request, with the descriptors passed along with it (any a
/// request does not use are closed); returns status and JSON body.
pub fn handle(ctl: &dyn VmControl, req: &Request, fds: Vec<OwnedFd>) -> (u16, serde_json::Value) {
    let result = match (req.method.as_str(), req.path.as_str()) {
        ("GET", wire::VM) => return (200, info(ctl)),
        ("PUT", wire::PAUSE) => ctl.pause(),
        ("PUT", wire::RESUME) => ctl.resume(),
        ("PUT", wire::SNAPSHOT) => one_file(fds).and_then(|file| ctl.snapshot(file)),
        ("PUT", wire::SHUTDOWN) => body::<ShutdownRequest>(req)
            .and_then(shutdown_timeout)
            .and_then(|timeout| ctl.shutdown(timeout)),
        ("PUT", path) if path.starts_with(wire::BLOCK_PREFIX) => body::<BlockRequest>(req)
            .and_then(|b| {
                let read_only = b.read_only;
                let id = &path[wire::BLOCK_PREFIX.len()..];
                ctl.replace_block(id, block_source(b, fds)?, read_only)
            }),
        (_, wire::VM | wire::PAUSE | wire::RESUME | wire::SHUTDOWN | wire::SNAPSHOT) => {
            return (
                405,
                json!({ "error": format!("{} is not allowed on {}", req.method, req.path) }),
            )
        }
        _ => Err(ApiError::NotFound(format!(
            "No such resource: {}",
            req.path
        ))),
    };
    match result {
        Ok(()) => (200, info(ctl)),
        Err(e) => (e.status(), json!({ "error": e.to_string() })),
    }
}

fn info(ctl: &dyn VmControl) -> serde_json::Value {
    serde_json::to_value(ctl.state()).expect("VmInfo always serializes")
}

fn serve_connection(ctl: &dyn VmControl, stream: UnixStream) {
    // A client that stalls must not hold the API forever.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(FdStream::new(stream));
    loop {
        let request = read_request(&mut reader);
        // Descriptors belong to the request whose bytes they came with.
        let fds = reader.get_mut().take_fds();
        let (status, body, keep_alive) = match request {
            Ok(req) => {
                let (status, body) = handle(ctl, &req, fds);
                (status, body, req.keep_alive)
            }
            Err(HttpError::Io(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                let error = format!("Pass at most {MAX_API_FDS} file descriptors");
                (400, json!({ "error": error }), false)
            }
            Err(HttpError::Closed) | Err(HttpError::Io(_)) => return,
            Err(e @ HttpError::BodyTooLarge) => (413, json!({ "error": e.to_string() }), false),
            Err(e) => (400, json!({ "error": e.to_string() }), false),
        };
        if write_response(&mut writer, status, &body).is_err() || !keep_alive {
            return;
        }
    }
}

/// The API thread; dropping it stops and joins the thread and removes the
/// socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds the socket now (so a bad path fails before the guest runs).
    pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
        // A stale socket from a crashed VMM would make bind fail.
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(path);
        }
        UnixListener::bind(path).map_err(|e| ServerError::Bind(path.to_owned(), e))
    }

    /// Starts the API thread on `listener` (from [`ApiServer::bind`]); the
    /// thread installs `seccomp`, when given, before it serves.
    pub fn start(
        path: &Path,
        listener: UnixListener,
        ctl: Arc<dyn VmControl>,
        seccomp: Option<seccompiler::BpfProgram>,
    ) -> Result<Self, ServerError> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::Spawn)?);
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Some(filter) = seccomp {
                    if let Err(e) = seccompiler::apply_filter(&filter) {
                        log::error!("API thread: cannot install its seccomp filter: {e}");
                        return;
                    }
                }
                loop {
                    let mut fds = [
                        libc::pollfd {
                            fd: listener.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: stop2.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: `fds` is a valid array of two pollfd for the call.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                    if n < 0 {
                        if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                        {
                            continue;
                        }
                        log::error!("API poll failed: {}", std::io::Error::last_os_error());
                        return;
                    }
                    if fds[1].revents != 0 {
                        return;
                    }
                    if let Ok((stream, _)) = listener.accept() {
                        serve_connection(ctl.as_ref(), stream);
                    }
                }
            })
            .map_err(ServerError::Spawn)?;
        Ok(Self {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
    }
    impl VmControl for Fake {
        fn state(&self) -> VmInfo {
            VmInfo {
                state: wire::VmState::Running,
                boot_time_us: None,
            }
        }
        fn pause(&self) -> Result<(), ApiError> {
            self.calls.lock().unwrap().push("pause".into());
            Ok(())
        }
        fn resume(&self) -> Result<(), ApiError> {
            Err(ApiError::Conflict("Not paused".into()))
        }
        fn shutdown(&self, t: Duration) -> Result<(), ApiError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("shutdown {}", t.as_millis()));
            Ok(())
        }
        fn snapshot(&self, _file: std::fs::File) -> Result<(), ApiError> {
            self.calls.lock().unwrap().push("snapshot".into());
            Ok(())
        }
        fn replace_block(&self, id: &str, source: BlockSource, ro: bool) -> Result<(), ApiError> {
            if id != "a" {
                return Err(ApiError::NotFound(format!("No block device {id:?}")));
            }
            self.calls
                .lock()
                .unwrap()
                .push(format!("block {source} {ro}"));
            Ok(())
        }
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            keep_alive: false,
        }
    }

    #[test]
    fn routes_requests() {
        let f = Fake::default();
        assert_eq!(handle(&f, &req("GET", "/vm", ""), vec![]).0, 200);
        assert_eq!(handle(&f, &req("PUT", "/vm/pause", ""), vec![]).0, 200);
        assert_eq!(handle(&f, &req("PUT", "/vm/resume", ""), vec![]).0, 409);
        assert_eq!(
            handle(
                &f,
                &req("PUT", "/vm/shutdown", r#"{"timeout_ms":10}"#),
                vec![]
            )
            .0,
            200
        );
        assert_eq!(
            handle(&f, &req("PUT", "/vm/shutdown", r#"{"timeout":10}"#), vec![]).0,
            400
        );
        // A wait that would hold the API thread for long is refused.
        let (code, body) = handle(
            &f,
            &req("PUT", "/vm/shutdown", r#"{"timeout_ms":86400000}"#),
            vec![],
        );
        assert_eq!(code, 400);
        assert!(body["error"].as_str().unwrap().contains("at most 60000"));
        assert_eq!(
            handle(
                &f,
                &req("PUT", "/block/a", r#"{"path":"/x","read_only":true}"#),
                vec![]
            )
            .0,
            200
        );
        assert_eq!(
            handle(&f, &req("PUT", "/block/b", r#"{"path":"/x"}"#), vec![]).0,
            404
        );
        assert_eq!(
            handle(&f, &req("PUT", "/block/a", "not json"), vec![]).0,
            400
        );
        assert_eq!(handle(&f, &req("DELETE", "/vm", ""), vec![]).0, 405);
        assert_eq!(handle(&f, &req("GET", "/nope", ""), vec![]).0, 404);
        assert_eq!(
            *f.calls.lock().unwrap(),
            vec![
                "pause".to_string(),
                "shutdown 10".into(),
                "block /x true".into()
            ]
        );
    }

    #[test]
    fn a_block_file_is_a_path_or_one_passed_descriptor() {
        let f = Fake::default();
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let put = |body: &str, fds| handle(&f, &req("PUT", "/block/a", body), fds);
        assert_eq!(put(r#"{"read_only":true}"#, vec![fd()]).0, 200);
        let (code, body) = put(r#"{"read_only":true}"#, vec![]);
        assert_eq!(code, 400);
        assert!(body["error"].as_str().unwrap().contains("pass the file"));
        let (code, body) = put(r#"{"path":"/x"}"#, vec![fd()]);
        assert_eq!(code, 400);
        assert!(body["error"].as_str().unwrap().contains("not both"));
        assert_eq!(put("{}", vec![fd(), fd()]).0, 400);
        // Descriptors that come with other requests are closed, not kept.
        assert_eq!(handle(&f, &req("PUT", "/vm/pause", ""), vec![fd()]).0, 200);
        assert_eq!(
            *f.calls.lock().unwrap(),
            vec![
                "block a passed file descriptor true".to_string(),
                "pause".into()
            ]
        );
    }

    #[test]
    fn serves_over_a_unix_socket_and_cleans_up() {
        let path = std::env::temp_dir().join(format!("moat-api-test-{}.sock", std::process::id()));
        let listener = ApiServer::bind(&path).unwrap();
        let server = ApiServer::start(&path, listener, Arc::new(Fake::default()), None).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(
            out.ends_with(r#"{"boot_time_us":null,"state":"Running"}"#),
            "{out}"
        );
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"BROKEN\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        // A file passed along with the request that names it.
        let s = UnixStream::connect(&path).unwrap();
        let body = r#"{"read_only":true}"#;
        let request = format!(
            "PUT /block/a HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let null = std::fs::File::open("/dev/null").unwrap();
        vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fd(
            &s,
            request.as_bytes(),
            null.as_raw_fd(),
        )
        .unwrap();
        let mut out = String::new();
        (&s).read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        drop(server);
        assert!(!path.exists());
    }
}
