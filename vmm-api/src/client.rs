//! A client for the control API: HTTP/1.1 on the unix socket, one request
//! per connection, a file descriptor passed along with a request's bytes
//! (`SCM_RIGHTS`), a deadline on the whole exchange and a bound on what it
//! reads back.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{self, BlockRequest, ErrorBody, ShutdownRequest, VmInfo};
use crate::limits::MAX_API_RESPONSE;

/// A failed exchange with the API, or an answer that is not a success.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("Cannot connect to the VMM API at {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// The request cannot be sent.
    #[error("Cannot send the request to the VMM API")]
    Send(#[source] std::io::Error),
    /// The response cannot be read.
    #[error("Cannot read the VMM API's response")]
    Receive(#[source] std::io::Error),
    /// No complete response came before the deadline.
    #[error("The VMM API did not answer within {0:?}")]
    TimedOut(Duration),
    /// The response is larger than [`MAX_API_RESPONSE`].
    #[error("The VMM API's response is larger than {MAX_API_RESPONSE} bytes")]
    TooLarge,
    /// The response is not HTTP.
    #[error("Malformed response from the VMM API: {0}")]
    Malformed(String),
    /// The VMM refused the request.
    #[error("The VMM API answered {status}: {message}")]
    Status {
        /// The HTTP status code.
        status: u16,
        /// The VMM's `error`, or the raw body.
        message: String,
    },
    /// A request or response body is not the JSON expected.
    #[error("Unexpected JSON from or for the VMM API")]
    Json(#[source] serde_json::Error),
}

/// One HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: String,
}

impl Response {
    /// The body as `T` if the status is 2xx, else a [`ClientError::Status`]
    /// with the VMM's error message.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        if !(200..300).contains(&self.status) {
            let message = serde_json::from_str::<ErrorBody>(&self.body)
                .map(|e| e.error)
                .unwrap_or(self.body);
            return Err(ClientError::Status {
                status: self.status,
                message,
            });
        }
        serde_json::from_str(&self.body).map_err(ClientError::Json)
    }
}

/// A client of one VMM's control API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// How long one exchange may take unless [`ApiClient::with_timeout`]
    /// says otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

    /// A client of the API at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient {
            socket: socket.into(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another deadline per exchange (connect, send
    /// and receive together).
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /vm`.
    pub fn vm_info(&self) -> Result<VmInfo, ClientError> {
        self.request("GET", api::VM, "", None)?.into_result()
    }

    /// `PUT /vm/pause`.
    pub fn pause(&self) -> Result<VmInfo, ClientError> {
        self.request("PUT", api::PAUSE, "", None)?.into_result()
    }

    /// `PUT /vm/resume`.
    pub fn resume(&self) -> Result<VmInfo, ClientError> {
        self.request("PUT", api::RESUME, "", None)?.into_result()
    }

    /// `PUT /vm/snapshot`, with `template` (open for writing) passed along.
    /// The exchange's deadline is that of a shutdown's longest wait: the
    /// VMM writes all guest memory before it answers.
    pub fn snapshot(&self, template: BorrowedFd<'_>) -> Result<VmInfo, ClientError> {
        let client = self
            .clone()
            .with_timeout(self.timeout + ShutdownRequest::MAX_TIMEOUT);
        client
            .request("PUT", api::SNAPSHOT, "", Some(template))?
            .into_result()
    }

    /// `PUT /vm/shutdown`. The exchange's deadline is extended by the
    /// request's own wait.
    pub fn shutdown(&self, request: &ShutdownRequest) -> Result<VmInfo, ClientError> {
        let wait = request.timeout().unwrap_or(ShutdownRequest::MAX_TIMEOUT);
        let client = self.clone().with_timeout(self.timeout + wait);
        client
            .request("PUT", api::SHUTDOWN, &to_json(request)?, None)?
            .into_result()
    }

    /// `PUT /block/<id>`; `file` travels with the request (then `request`
    /// has no `path`).
    pub fn put_block(
        &self,
        id: &str,
        request: &BlockRequest,
        file: Option<BorrowedFd<'_>>,
    ) -> Result<VmInfo, ClientError> {
        let body = to_json(request)?;
        self.request("PUT", &api::block_path(id), &body, file)?
            .into_result()
    }

    /// One request with a JSON `body` (may be empty), and `fd` passed with
    /// its bytes; any status is returned as it is.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: &str,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = self.connect(deadline)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(ClientError::Send)?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        send(&mut stream, request.as_bytes(), fd)
            .map_err(|e| self.io_error(e, ClientError::Send))?;
        let raw = receive(&mut stream, deadline).map_err(|e| match e {
            ReceiveError::Io(e) => self.io_error(e, ClientError::Receive),
            ReceiveError::TooLarge => ClientError::TooLarge,
            ReceiveError::Malformed(m) => ClientError::Malformed(m),
        })?;
        Ok(raw)
    }

    fn io_error(&self, e: std::io::Error, other: fn(std::io::Error) -> ClientError) -> ClientError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::TimedOut(self.timeout),
            _ => other(e),
        }
    }

    /// Connects without blocking past `deadline`: a unix socket whose
    /// backlog is full makes a blocking connect wait for as long as the
    /// server does not accept.
    fn connect(&self, deadline: Instant) -> Result<UnixStream, ClientError> {
        let error = |e: Errno| ClientError::Connect(self.socket.clone(), e.into());
        let addr = UnixAddr::new(&self.socket).map_err(error)?;
        let fd: OwnedFd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(error)?;
        loop {
            match socket::connect(fd.as_raw_fd(), &addr) {
                Ok(()) => break,
                Err(Errno::EAGAIN | Errno::EINTR) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(Errno::EAGAIN) => return Err(ClientError::TimedOut(self.timeout)),
                Err(e) => return Err(error(e)),
            }
        }
        let stream = UnixStream::from(fd);
        stream
            .set_nonblocking(false)
            .map_err(|e| ClientError::Connect(self.socket.clone(), e))?;
        Ok(stream)
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<String, ClientError> {
    serde_json::to_string(value).map_err(ClientError::Json)
}

/// Writes `request`; `fd` goes with its first bytes, in one `sendmsg`.
fn send(
    stream: &mut UnixStream,
    request: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let mut sent = 0;
    if let Some(fd) = fd {
        let fds = [fd.as_raw_fd()];
        sent = socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(request)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
    }
    stream.write_all(&request[sent..])
}

enum ReceiveError {
    Io(std::io::Error),
    TooLarge,
    Malformed(String),
}

/// Reads one response, never more than [`MAX_API_RESPONSE`] bytes nor past
/// `deadline`.
fn receive(stream: &mut UnixStream, deadline: Instant) -> Result<Response, ReceiveError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(response) = parse(&buf, false)? {
            return Ok(response);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReceiveError::Io(ErrorKind::TimedOut.into()));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(ReceiveError::Io)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return parse(&buf, true)?.ok_or_else(|| truncated(&buf)),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReceiveError::Io(e)),
        };
        if buf.len() + n > MAX_API_RESPONSE {
            return Err(ReceiveError::TooLarge);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn truncated(buf: &[u8]) -> ReceiveError {
    ReceiveError::Malformed(if buf.is_empty() {
        "no response".into()
    } else {
        "the connection closed in the middle of the response".into()
    })
}

/// The response in `buf` once it is complete: with a Content-Length, when
/// that many body bytes are there; without one, at the end of the stream.
fn parse(buf: &[u8], at_end: bool) -> Result<Option<Response>, ReceiveError> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    let status = match (words.next(), words.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/1.") => code,
        _ => {
            return Err(ReceiveError::Malformed(format!(
                "bad status line {status_line:?}"
            )))
        }
    };
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReceiveError::Malformed(format!("bad header {line:?}")));
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            let n = value.trim().parse::<usize>().map_err(|_| {
                ReceiveError::Malformed(format!("bad Content-Length {:?}", value.trim()))
            })?;
            length = Some(n);
        }
    }
    let body = &buf[head_end + 4..];
    let body = match length {
        Some(n) if body.len() >= n => &body[..n],
        Some(n) if n > MAX_API_RESPONSE => return Err(ReceiveError::TooLarge),
        None if at_end => body,
        _ => return Ok(None),
    };
    Ok(Some(Response {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSliceMut;
    use std::os::fd::{AsFd, FromRawFd, RawFd};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    /// A socket path of its own for each test, removed on drop.
    struct Socket(PathBuf);

    impl Socket {
        fn new(tag: &str) -> Socket {
            let path =
                std::env::temp_dir().join(format!("moat-api-{tag}-{}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            Socket(path)
        }
    }

    impl Drop for Socket {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Serves one connection: reads what the client sends (and the
    /// descriptors that come with it), then writes `answer` and waits
    /// `linger` before it closes.
    fn serve(sock: &Socket, answer: Vec<u8>, linger: Duration) -> JoinHandle<(String, Vec<RawFd>)> {
        let l = UnixListener::bind(&sock.0).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let mut space = nix::cmsg_space!([RawFd; 1]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg =
                socket::recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                    .unwrap();
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let socket::ControlMessageOwned::ScmRights(r) = c {
                    fds.extend(r);
                }
            }
            let n = msg.bytes;
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let _ = (&s).write_all(&answer);
            std::thread::sleep(linger);
            (req, fds)
        })
    }

    /// A 200 answer with `body`.
    fn ok(body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn speaks_http_and_reports_the_vmm_error() {
        let sock = Socket::new("http");
        let body = br#"{"error": "Not paused"}"#;
        let mut answer = format!(
            "HTTP/1.1 409 Conflict\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(body);
        let server = serve(&sock, answer, Duration::ZERO);
        let err = ApiClient::new(&sock.0).resume().unwrap_err();
        assert!(
            matches!(&err, ClientError::Status { status: 409, message } if message == "Not paused"),
            "{err:?}"
        );
        let (req, fds) = server.join().unwrap();
        assert!(req.starts_with("PUT /vm/resume HTTP/1.1\r\n"), "{req}");
        assert!(fds.is_empty());
    }

    #[test]
    fn a_block_file_travels_with_its_request() {
        let sock = Socket::new("fd");
        let answer = ok(r#"{"state":"Running","boot_time_us":null}"#);
        let server = serve(&sock, answer, Duration::ZERO);
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let request = BlockRequest {
            path: None,
            read_only: true,
        };
        let info = ApiClient::new(&sock.0)
            .put_block("b3", &request, Some(file.as_fd()))
            .unwrap();
        assert_eq!(info.state, crate::api::VmState::Running);
        let (req, fds) = server.join().unwrap();
        assert!(req.starts_with("PUT /block/b3 HTTP/1.1\r\n"), "{req}");
        assert!(req.ends_with(r#"{"read_only":true}"#), "{req}");
        assert_eq!(fds.len(), 1);
        // SAFETY: the descriptor was just received and is owned by nobody else.
        let got = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let (a, b) = (got.metadata().unwrap(), file.metadata().unwrap());
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    }

    #[test]
    fn a_huge_response_is_refused_not_buffered() {
        let sock = Socket::new("huge");
        let mut answer = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        answer.resize(4 << 20, b'x');
        let server = serve(&sock, answer, Duration::ZERO);
        let err = ApiClient::new(&sock.0).vm_info().unwrap_err();
        assert!(matches!(err, ClientError::TooLarge), "{err:?}");
        drop(server);
        // A Content-Length above the limit is refused as soon as it is read.
        let sock = Socket::new("huge-length");
        let server = serve(
            &sock,
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{".to_vec(),
            Duration::from_secs(2),
        );
        let t = Instant::now();
        let err = ApiClient::new(&sock.0).vm_info().unwrap_err();
        assert!(matches!(err, ClientError::TooLarge), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
        server.join().unwrap();
    }

    #[test]
    fn a_silent_vmm_times_out() {
        let sock = Socket::new("silent");
        // Half an answer, then nothing while the connection stays open.
        let server = serve(&sock, b"HTTP/1.1 200".to_vec(), Duration::from_secs(2));
        let t = Instant::now();
        let client = ApiClient::new(&sock.0).with_timeout(Duration::from_millis(300));
        let err = client.vm_info().unwrap_err();
        assert!(matches!(err, ClientError::TimedOut(_)), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        server.join().unwrap();
    }

    #[test]
    fn a_complete_response_needs_no_close() {
        let sock = Socket::new("keepalive");
        let server = serve(
            &sock,
            ok(r#"{"state":"Paused","boot_time_us":12345}"#),
            Duration::from_secs(2),
        );
        let t = Instant::now();
        let info = ApiClient::new(&sock.0).vm_info().unwrap();
        assert_eq!(info.boot_time_us, Some(12345));
        assert!(t.elapsed() < Duration::from_secs(2));
        server.join().unwrap();
    }

    #[test]
    fn garbage_and_missing_sockets_are_clear_errors() {
        let sock = Socket::new("garbage");
        let server = serve(&sock, b"SPDY/3 200\r\n\r\n".to_vec(), Duration::ZERO);
        let err = ApiClient::new(&sock.0).vm_info().unwrap_err();
        assert!(matches!(err, ClientError::Malformed(_)), "{err:?}");
        server.join().unwrap();
        let err = ApiClient::new("/nonexistent/api.sock")
            .vm_info()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/api.sock"), "{err}");
    }
}
