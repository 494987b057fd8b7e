//! Just enough HTTP/1.1 for a local control socket: a request line,
//! headers, an optional body with Content-Length; no chunking.

use std::io::{BufRead, BufReader, Read, Write};

use moat_vmm_api::limits::MAX_API_REQUEST_BODY as MAX_BODY_BYTES;

/// Bounds on what a client may send, so a bad client cannot grow our memory.
const MAX_HEADER_BYTES: usize = 8 * 1024;

/// One parsed request; the body is at most the API's body limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (`GET`, `PUT`...).
    pub method: String,
    /// The request target, e.g. `/vm/pause`; not decoded.
    pub path: String,
    /// Exactly Content-Length bytes; empty when the header is absent.
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept for another request: by
    /// default for HTTP/1.1, never after `Connection: close`.
    pub keep_alive: bool,
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer closed the connection before a request line.
    #[error("Connection closed")]
    Closed,
    /// The request breaks the subset of HTTP/1.1 we speak (the reason says how).
    #[error("Malformed request: {0}")]
    Malformed(&'static str),
    /// The request line and headers exceed `MAX_HEADER_BYTES`.
    #[error("Request headers are larger than {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// Content-Length is above the API's body limit.
    #[error("Request body is larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    /// Reading the socket failed, or it closed before the whole body came.
    #[error("Cannot read the request")]
    Io(#[from] std::io::Error),
}

/// Reads one request; `Closed` when the peer closed between requests.
pub fn read_request<R: Read>(reader: &mut BufReader<R>) -> Result<Request, HttpError> {
    let mut head_bytes = 0;
    let mut line = String::new();
    let mut next_line = |line: &mut String| -> Result<usize, HttpError> {
        line.clear();
        let n = reader
            .by_ref()
            .take((MAX_HEADER_BYTES + 1 - head_bytes) as u64)
            .read_line(line)?;
        head_bytes += n;
        if head_bytes > MAX_HEADER_BYTES {
            return Err(HttpError::HeadersTooLarge);
        }
        Ok(n)
    };
    if next_line(&mut line)? == 0 {
        return Err(HttpError::Closed);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("bad request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not HTTP/1.x"));
    }
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = 0usize;
    loop {
        if next_line(&mut line)? == 0 {
            return Err(HttpError::Malformed("headers end early"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header
            .split_once(':')
            .ok_or(HttpError::Malformed("bad header"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| HttpError::Malformed("bad Content-Length"))?;
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed("chunked bodies are not supported"));
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge);
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    Ok(Request {
        method,
        path,
        body,
        keep_alive,
    })
}

/// Writes one response: `status`, its reason phrase and `body` as JSON.
pub fn write_response<W: Write>(
    out: &mut W,
    status: u16,
    body: &serde_json::Value,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        _ => "Internal Server Error",
    };
    let body = body.to_string();
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut BufReader::new(raw))
    }

    #[test]
    fn parses_requests() {
        let r = parse(b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.keep_alive),
            ("PUT", "/vm/pause", true)
        );
        let r = parse(b"PUT /block/a HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            .unwrap();
        assert_eq!(r.body, b"{}");
        assert!(!r.keep_alive);
    }

    #[test]
    fn rejects_bad_requests() {
        assert!(matches!(parse(b""), Err(HttpError::Closed)));
        assert!(matches!(
            parse(b"GARBAGE\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / SPDY/3\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"),
            Err(HttpError::BodyTooLarge)
        ));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 10_000));
        huge.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(parse(&huge), Err(HttpError::HeadersTooLarge)));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Err(HttpError::Io(_))
        ));
    }
}
