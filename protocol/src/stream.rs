//! The stdio stream handshake on the agent's stdio port ([`crate::STDIO_PORT`]).
//!
//! Every stdio stream of a process (stdin, stdout, stderr, or one pty) is its
//! own connection, so bulk output never competes with ttrpc calls. The host
//! opens the connection and sends a header naming the stream; the agent
//! answers with one reply line:
//!
//! ```text
//! host  -> agent: u16 big-endian length N, then N bytes of UTF-8:
//!                 "MOAT-STDIO/1 <kind> <container_id> <exec_id>"
//!                 kind: stdin | stdout | stderr | pty; exec_id "-" = init process
//! agent -> host:  "OK\n"  or  "ERR <reason>\n"
//! ```
//!
//! After `OK` the connection carries raw bytes: stdin host->agent (the host's
//! write shutdown is the process's EOF), stdout/stderr agent->host (the agent
//! closes after the process's pipe reached EOF), pty both ways. The host must
//! not send stream data before it has read the reply.
//!
//! The same port carries port forwarding (CRI PortForward): the header
//! `"MOAT-FORWARD/1 tcp <port>"` asks the agent to connect to
//! `127.0.0.1:<port>` in the pod's network namespace; its reply says whether
//! that worked, and then the connection carries the TCP bytes both ways.
//!
//! And host directories shared live (read-write volumes): the header
//! `"MOAT-SHARE/1 <tag>"` asks the agent to mount a FUSE filesystem at
//! `GUEST_SHARES_DIR/<tag>` whose requests it relays on this connection;
//! after `OK` the host answers them (FUSE messages both ways, each framed
//! by the length in its own header). The mount goes when the host closes.

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::ids::{is_valid_exec_id, is_valid_id};

/// Protocol word at the start of every header.
pub const STREAM_MAGIC: &str = "MOAT-STDIO/1";
/// Largest header the agent accepts.
pub const MAX_HEADER_LEN: usize = 512;
/// Protocol word of a port-forward request.
pub const FORWARD_MAGIC: &str = "MOAT-FORWARD/1";
/// Protocol word of a shared-directory request.
pub const SHARE_MAGIC: &str = "MOAT-SHARE/1";
/// Largest reply line the host accepts.
const MAX_REPLY_LEN: usize = 1024;

/// Which stdio stream a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// The process's standard input: bytes flow host -> agent.
    Stdin,
    /// The process's standard output: bytes flow agent -> host.
    Stdout,
    /// The process's standard error: bytes flow agent -> host.
    Stderr,
    /// A terminal: input and output on one connection.
    Pty,
}

impl StreamKind {
    /// The word that names this kind in a stream header.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
            StreamKind::Pty => "pty",
        }
    }

    fn parse(s: &str) -> Option<StreamKind> {
        Some(match s {
            "stdin" => StreamKind::Stdin,
            "stdout" => StreamKind::Stdout,
            "stderr" => StreamKind::Stderr,
            "pty" => StreamKind::Pty,
            _ => return None,
        })
    }
}

/// Names the process and stream a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    /// The container the process belongs to (checked by [`is_valid_id`]).
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    /// Which of the process's streams this connection carries.
    pub kind: StreamKind,
}

/// Errors of the stream handshake.
#[derive(Debug, Error)]
pub enum StreamError {
    /// Reading or writing the header or the reply failed.
    #[error("stream handshake I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The header (agent side) or the reply (host side) does not follow the
    /// protocol; the text says what was wrong.
    #[error("malformed stream header: {0}")]
    Malformed(String),
    /// The container or exec id breaks the rules of [`crate::ids`].
    #[error("invalid container or exec id in stream header")]
    InvalidId,
    /// The agent answered `ERR`; holds the agent's reason.
    #[error("agent refused the stream: {0}")]
    Refused(String),
}

impl StreamHeader {
    /// A header for `kind` of the process `exec_id` (empty: the init process)
    /// of `container_id`. The ids are checked when it is encoded.
    pub fn new(container_id: &str, exec_id: &str, kind: StreamKind) -> StreamHeader {
        StreamHeader {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            kind,
        }
    }

    /// The header bytes, length prefix included.
    pub fn encode(&self) -> Result<Vec<u8>, StreamError> {
        if !is_valid_id(&self.container_id) || !is_valid_exec_id(&self.exec_id) {
            return Err(StreamError::InvalidId);
        }
        let exec = if self.exec_id.is_empty() {
            "-"
        } else {
            &self.exec_id
        };
        let text = format!(
            "{STREAM_MAGIC} {} {} {exec}",
            self.kind.as_str(),
            self.container_id
        );
        // Ids are at most MAX_ID_LEN: the header stays short.
        Ok(framed(&text))
    }

    /// Reads a stdio header (agent side); any other request is refused.
    pub fn read_from(r: &mut impl Read) -> Result<StreamHeader, StreamError> {
        match Request::read_from(r)? {
            Request::Stdio(h) => Ok(h),
            other => Err(StreamError::Malformed(format!(
                "{other:?} where a stdio header was expected"
            ))),
        }
    }

    fn parse(words: &[&str]) -> Result<StreamHeader, StreamError> {
        let [kind, container_id, exec_id] = words[..] else {
            return Err(StreamError::Malformed(format!(
                "expected 4 words, got {}",
                words.len() + 1
            )));
        };
        let kind = StreamKind::parse(kind)
            .ok_or_else(|| StreamError::Malformed(format!("unknown stream kind {kind:?}")))?;
        let exec_id = if exec_id == "-" { "" } else { exec_id };
        if !is_valid_id(container_id) || !is_valid_exec_id(exec_id) {
            return Err(StreamError::InvalidId);
        }
        Ok(StreamHeader::new(container_id, exec_id, kind))
    }

    /// Host side: sends this header on a fresh connection and waits for the
    /// agent's answer. On `Ok` the stream is ready for data.
    pub fn attach<S: Read + Write>(&self, stream: &mut S) -> Result<(), StreamError> {
        stream.write_all(&self.encode()?)?;
        read_reply(stream)
    }
}

/// What a connection to the stdio port asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A process's stdio stream.
    Stdio(StreamHeader),
    /// A TCP connection to `127.0.0.1:port` in the guest.
    Forward {
        /// The guest port.
        port: u16,
    },
    /// A FUSE mount at `GUEST_SHARES_DIR/<tag>`, served by the host.
    Share {
        /// The mount's name (an id: see [`crate::ids`]).
        tag: String,
    },
}

impl Request {
    /// Reads a request (agent side): two reads, whatever its length.
    pub fn read_from(r: &mut impl Read) -> Result<Request, StreamError> {
        let mut len = [0u8; 2];
        r.read_exact(&mut len)?;
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > MAX_HEADER_LEN {
            return Err(StreamError::Malformed(format!("header length {len}")));
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf)?;
        let text = String::from_utf8(buf)
            .map_err(|_| StreamError::Malformed("header is not UTF-8".into()))?;
        let words: Vec<&str> = text.split(' ').collect();
        match words[0] {
            STREAM_MAGIC => StreamHeader::parse(&words[1..]).map(Request::Stdio),
            FORWARD_MAGIC => parse_forward(&words[1..]),
            SHARE_MAGIC => match words[1..] {
                [tag] if is_valid_id(tag) => Ok(Request::Share { tag: tag.into() }),
                _ => Err(StreamError::Malformed(format!(
                    "expected one valid tag after {SHARE_MAGIC}"
                ))),
            },
            magic => Err(StreamError::Malformed(format!(
                "unknown protocol word {magic:?}"
            ))),
        }
    }
}

fn parse_forward(words: &[&str]) -> Result<Request, StreamError> {
    let ["tcp", port] = words[..] else {
        return Err(StreamError::Malformed(format!(
            "expected \"tcp <port>\" after {FORWARD_MAGIC}, got {:?}",
            words.join(" ")
        )));
    };
    // Digits only: Rust's parser would take a leading '+'.
    let number = port.bytes().all(|b| b.is_ascii_digit());
    match port.parse::<u16>() {
        Ok(n) if number && n != 0 => Ok(Request::Forward { port: n }),
        _ => Err(StreamError::Malformed(format!("bad port {port:?}"))),
    }
}

impl Request {
    /// The request's bytes, length prefix included.
    pub fn encode(&self) -> Result<Vec<u8>, StreamError> {
        match self {
            Request::Stdio(h) => h.encode(),
            Request::Forward { port } => Ok(framed(&format!("{FORWARD_MAGIC} tcp {port}"))),
            Request::Share { tag } if is_valid_id(tag) => {
                Ok(framed(&format!("{SHARE_MAGIC} {tag}")))
            }
            Request::Share { .. } => Err(StreamError::InvalidId),
        }
    }
}

/// `text` behind its length; callers keep it far below 64 KiB.
fn framed(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// Host side: sends `request` on a fresh connection and waits for the
/// agent's answer. On `Ok` the stream carries what was asked for.
pub fn ask<S: Read + Write>(stream: &mut S, request: &Request) -> Result<(), StreamError> {
    stream.write_all(&request.encode()?)?;
    read_reply(stream)
}

/// Host side: the agent's one-line answer to a header.
fn read_reply<S: Read>(stream: &mut S) -> Result<(), StreamError> {
    let reply = crate::vsock::read_line(stream, MAX_REPLY_LEN)?;
    match reply.strip_prefix("ERR ") {
        None if reply == "OK" => Ok(()),
        None => Err(StreamError::Malformed(format!(
            "unexpected reply {reply:?}"
        ))),
        Some(reason) => Err(StreamError::Refused(reason.to_owned())),
    }
}

/// Agent side: answers a stream header, in one write.
pub fn write_reply(w: &mut impl Write, result: Result<(), &str>) -> io::Result<()> {
    match result {
        Ok(()) => w.write_all(b"OK\n"),
        Err(reason) => {
            // A newline in the reason would end the reply early.
            let reason = reason.replace('\n', " ");
            w.write_all(format!("ERR {reason}\n").as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn header_round_trip() {
        for (exec, kind) in [
            ("", StreamKind::Stdout),
            ("exec-1", StreamKind::Pty),
            ("e.2_x", StreamKind::Stdin),
            ("z", StreamKind::Stderr),
        ] {
            let h = StreamHeader::new("ctr1", exec, kind);
            let bytes = h.encode().unwrap();
            let back = StreamHeader::read_from(&mut &bytes[..]).unwrap();
            assert_eq!(back, h);
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let cases: Vec<Vec<u8>> = vec![
            vec![0, 0],
            vec![0xff, 0xff],
            b"\x00\x05hello".to_vec(),
            b"\x00\x1bMOAT-STDIO/1 stdout ../x -".to_vec(),
            b"\x00\x1bMOAT-STDIO/1 stdwhat ctr -".to_vec(),
            b"\x00\x1bMOAT-STDIO/9 stdout ctr1 -".to_vec(),
        ];
        for c in cases {
            assert!(StreamHeader::read_from(&mut &c[..]).is_err(), "{c:?}");
        }
        assert!(StreamHeader::new("..", "", StreamKind::Stdin)
            .encode()
            .is_err());
    }

    #[test]
    fn forward_requests_round_trip_and_bad_ones_are_refused() {
        let bytes = Request::Forward { port: 8080 }.encode().unwrap();
        assert_eq!(
            Request::read_from(&mut &bytes[..]).unwrap(),
            Request::Forward { port: 8080 }
        );
        assert!(StreamHeader::read_from(&mut &bytes[..]).is_err());
        let share = Request::Share {
            tag: "c1-m2".into(),
        }
        .encode()
        .unwrap();
        assert_eq!(
            Request::read_from(&mut &share[..]).unwrap(),
            Request::Share {
                tag: "c1-m2".into()
            }
        );
        assert!(Request::Share { tag: "../x".into() }.encode().is_err());
        let stdio = StreamHeader::new("c", "", StreamKind::Stdin)
            .encode()
            .unwrap();
        assert!(matches!(
            Request::read_from(&mut &stdio[..]).unwrap(),
            Request::Stdio(_)
        ));
        for bad in [
            "MOAT-FORWARD/1 tcp 0",
            "MOAT-FORWARD/1 tcp 65536",
            "MOAT-FORWARD/1 tcp +80",
            "MOAT-FORWARD/1 udp 53",
            "MOAT-FORWARD/1 tcp",
            "MOAT-FORWARD/1 tcp 80 81",
            "MOAT-SHARE/1 ..",
            "MOAT-SHARE/1 a b",
            "MOAT-SHARE/1",
        ] {
            let mut b = (bad.len() as u16).to_be_bytes().to_vec();
            b.extend_from_slice(bad.as_bytes());
            assert!(Request::read_from(&mut &b[..]).is_err(), "{bad}");
        }
    }

    #[test]
    fn attach_reads_reply_and_leaves_data() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let h = StreamHeader::read_from(&mut agent).unwrap();
            write_reply(&mut agent, Ok(())).unwrap();
            agent.write_all(b"data").unwrap();
            h
        });
        StreamHeader::new("c", "", StreamKind::Stdout)
            .attach(&mut host)
            .unwrap();
        let mut rest = String::new();
        host.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "data");
        assert_eq!(t.join().unwrap().kind, StreamKind::Stdout);
    }

    #[test]
    fn refusal_carries_reason() {
        let (mut host, mut agent) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            StreamHeader::read_from(&mut agent).unwrap();
            write_reply(&mut agent, Err("no such\ncontainer")).unwrap();
        });
        let err = StreamHeader::new("c", "e", StreamKind::Stdin)
            .attach(&mut host)
            .unwrap_err();
        t.join().unwrap();
        assert!(matches!(err, StreamError::Refused(ref r) if r == "no such container"));
    }
}
