//! One stream connection between a guest socket and a host unix stream.
//!
//! The connection keeps both directions' credit accounting: it never sends
//! the guest more than the guest advertised room for, and it buffers at most
//! [`CONN_BUF_SIZE`] bytes of guest data the host side has not read yet, which
//! is the room it advertises to the guest.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer advertised to the guest (`buf_alloc`), per connection.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Tell the guest about freed room once it believes it has less than this.
const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;
/// How long a guest may take to answer a host connection request by default
/// (a port without a listener is refused at once; only a guest that does not
/// answer at all waits this long). Generous: a busy guest whose kernel runs
/// in PVM's instruction emulator has been seen not to answer for over 15 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest may take to finish closing a connection.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The connection must end with an RST to the guest.
#[derive(Debug, PartialEq, Eq)]
pub struct Reset;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent or queued, waiting for the RESPONSE.
    HostConnecting {
        /// When the connection is dropped if the guest has not answered.
        deadline: Instant,
    },
    /// Data may flow both ways (until a side shuts down).
    Established,
    /// Both directions shut down from our side; waiting for the guest's RST.
    Closing {
        /// When the connection is dropped with an RST if the guest has not sent one.
        deadline: Instant,
    },
}

/// What [`Connection::next_packet`] put in the guest's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Emitted {
    /// A packet of this many bytes, header included.
    Packet(usize),
    /// Nothing to send.
    Nothing,
}

/// Send `buf` on `stream` without raising SIGPIPE if the peer is gone.
pub fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for its length; the fd is open for the call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One stream connection between a guest port and a host unix stream, with its
/// credit accounting.
pub struct Connection {
    /// The host side of the connection.
    pub stream: UnixStream,
    /// Epoll token of `stream`.
    pub token: u64,
    /// Host side port (ours) and guest side port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Where the connection is in its life.
    pub state: State,
    /// Events `stream` is registered for; `None` once deregistered.
    pub interest: Option<EventSet>,
    /// Whether the connection is in the muxer's list of rx work.
    pub in_rx_list: bool,

    // Guest -> host.
    /// Guest data not yet written to the stream.
    tx_buf: VecDeque<u8>,
    /// Bytes received from the guest, and those of them written to the host.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    credit_update_pending: bool,
    /// The write side of `stream` is shut (the guest will send no more).
    write_shut: bool,

    // Host -> guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    /// The stream has data (or EOF) we have not read yet.
    host_readable: bool,
    host_eof: bool,
    /// The host closed the stream altogether.
    host_hup: bool,

    // Shutdown: what the guest told us, what we told it, what we will tell it.
    peer_shutdown: u32,
    local_shutdown: u32,
    want_shutdown: u32,
    request_pending: bool,
    response_pending: bool,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            token,
            local_port,
            peer_port,
            state,
            interest: None,
            in_rx_list: false,
            tx_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            credit_update_pending: false,
            write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            host_hup: false,
            peer_shutdown: 0,
            local_shutdown: 0,
            want_shutdown: 0,
            request_pending: false,
            response_pending: false,
        }
    }

    /// A host process asked to reach guest port `peer_port`; the guest must
    /// answer by `deadline`.
    pub fn host_initiated(
        stream: UnixStream,
        token: u64,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            token,
            local_port,
            peer_port,
            State::HostConnecting { deadline },
        );
        conn.request_pending = true;
        conn
    }

    /// The guest's REQUEST `req` reached a host listener over `stream`.
    pub fn guest_initiated(stream: UnixStream, token: u64, req: &Header) -> Self {
        let mut conn = Self::new(
            stream,
            token,
            req.dst_port,
            req.src_port,
            State::Established,
        );
        conn.update_peer_credit(req);
        conn.response_pending = true;
        conn
    }

    /// Every guest packet carries its current receive credit.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can take right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        // A guest claiming to have consumed more than we sent gets nothing.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Host-initiated and not yet accepted by the guest.
    pub fn is_connecting(&self) -> bool {
        matches!(self.state, State::HostConnecting { .. })
    }

    fn established(&self) -> bool {
        matches!(self.state, State::Established | State::Closing { .. })
    }

    /// The guest accepted our REQUEST: tell the host process which port the
    /// connection has, after which the stream carries data.
    pub fn on_response(&mut self) -> Result<(), Reset> {
        if !matches!(self.state, State::HostConnecting { .. }) || self.request_pending {
            return Err(Reset);
        }
        self.state = State::Established;
        let line = format!("OK {}\n", self.local_port);
        // A fresh stream has an empty send buffer: a short write means the
        // host side is gone.
        match send_nosignal(&self.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => Ok(()),
            _ => Err(Reset),
        }
    }

    /// Guest data for the host.
    pub fn on_data(&mut self, payload: &[u8]) -> Result<(), Reset> {
        if !self.established() || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(Reset);
        }
        if payload.is_empty() {
            return Ok(());
        }
        if self.tx_buf.len() + payload.len() > CONN_BUF_SIZE as usize {
            // The guest ignored the credit we gave it.
            return Err(Reset);
        }
        let len = Wrapping(payload.len() as u32);
        self.rx_cnt += len;
        if self.host_hup || self.write_shut {
            // Nobody will read it; account for it so the guest's credit
            // keeps flowing until it sees our SHUTDOWN.
            self.fwd_cnt += len;
            return Ok(());
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = match send_nosignal(&self.stream, payload) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => return Err(Reset),
            };
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.tx_buf.extend(&payload[written..]);
        self.check_credit_update();
        Ok(())
    }

    /// Writes buffered guest data to the host stream, as far as it takes it.
    pub fn flush(&mut self) -> Result<(), Reset> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => return Err(Reset),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(Reset),
            }
        }
        self.check_credit_update();
        Ok(())
    }

    fn check_credit_update(&mut self) {
        let guest_view_used = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = CONN_BUF_SIZE.saturating_sub(guest_view_used);
        if guest_view_free < CREDIT_UPDATE_THRESHOLD && self.fwd_cnt != self.last_fwd_cnt_sent {
            self.credit_update_pending = true;
        }
    }

    /// The guest asked for our credit: send a credit update.
    pub fn on_credit_request(&mut self) {
        self.credit_update_pending = true;
    }

    /// The guest will receive and/or send no more.
    pub fn on_peer_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        if self.peer_shutdown & SHUTDOWN_RCV != 0 && self.host_hup {
            self.want_shutdown = SHUTDOWN_BOTH;
        }
    }

    /// The stream reported a hang-up or an error: the host closed it.
    pub fn on_hup(&mut self) {
        self.host_hup = true;
        // Data still queued in the stream is read before the EOF.
        self.host_readable = true;
        self.tx_buf.clear();
        self.want_shutdown |= SHUTDOWN_RCV;
        if self.peer_shutdown & SHUTDOWN_RCV != 0 {
            self.want_shutdown |= SHUTDOWN_SEND;
        }
    }

    /// The host stream has data (or an EOF) to read.
    pub fn on_readable(&mut self) {
        self.host_readable = true;
    }

    /// Whether host data may go to the guest now.
    fn can_send_data(&self) -> bool {
        self.established()
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.want_shutdown & SHUTDOWN_SEND == 0
            && !self.host_eof
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn wants_rx(&self) -> bool {
        self.request_pending
            || self.response_pending
            || self.credit_update_pending
            || self.want_shutdown != self.local_shutdown
            || (self.host_readable && self.can_send_data())
    }

    /// Events the stream should be polled for.
    pub fn desired_interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.can_send_data() && !self.host_readable {
            events |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Applies deferred effects of guest SHUTDOWNs once the data before them
    /// is flushed; `Err` when the connection is over.
    pub fn settle(&mut self, now: Instant) -> Result<(), Reset> {
        if !self.tx_buf.is_empty() || !self.established() {
            return Ok(());
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut && !self.host_hup {
            // Forward the guest's EOF to the host.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.write_shut = true;
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed its socket; it expects our RST.
            return Err(Reset);
        }
        if let State::Closing { deadline } = self.state {
            if now >= deadline {
                return Err(Reset);
            }
        }
        Ok(())
    }

    /// When the connection gives up waiting for the guest.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::HostConnecting { deadline } | State::Closing { deadline } => Some(deadline),
            State::Established => None,
        }
    }

    fn header(&mut self, guest_cid: u64, op: u16, flags: u32, len: u32) -> Header {
        // Every packet tells the guest our current credit.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_pending = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Writes the connection's next packet for the guest into `writer`, which
    /// has room for at least a header. `scratch` bounces host data.
    pub fn next_packet(
        &mut self,
        writer: &mut virtio_queue::Writer<'_>,
        scratch: &mut [u8],
        guest_cid: u64,
        now: Instant,
    ) -> Result<Emitted, Reset> {
        if self.request_pending {
            self.request_pending = false;
            return self.emit(writer, guest_cid, OP_REQUEST, 0, &[]);
        }
        if self.response_pending {
            self.response_pending = false;
            return self.emit(writer, guest_cid, OP_RESPONSE, 0, &[]);
        }
        if self.host_readable && self.can_send_data() {
            let room = writer.available_bytes().saturating_sub(HDR_LEN);
            let max = room
                .min(self.peer_credit() as usize)
                .min(MAX_PAYLOAD)
                .min(scratch.len());
            if max > 0 {
                match (&self.stream).read(&mut scratch[..max]) {
                    Ok(0) => {
                        self.host_readable = false;
                        self.host_eof = true;
                        self.want_shutdown |= SHUTDOWN_SEND;
                    }
                    Ok(n) => {
                        self.tx_cnt += Wrapping(n as u32);
                        return self.emit(writer, guest_cid, OP_RW, 0, &scratch[..n]);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => self.on_hup(),
                }
            }
        }
        if self.want_shutdown != self.local_shutdown {
            let flags = self.want_shutdown;
            self.local_shutdown = flags;
            if flags == SHUTDOWN_BOTH {
                self.state = State::Closing {
                    deadline: now + CLOSE_TIMEOUT,
                };
            }
            return self.emit(writer, guest_cid, OP_SHUTDOWN, flags, &[]);
        }
        if self.credit_update_pending {
            return self.emit(writer, guest_cid, OP_CREDIT_UPDATE, 0, &[]);
        }
        Ok(Emitted::Nothing)
    }

    fn emit(
        &mut self,
        writer: &mut virtio_queue::Writer<'_>,
        guest_cid: u64,
        op: u16,
        flags: u32,
        payload: &[u8],
    ) -> Result<Emitted, Reset> {
        let hdr = self.header(guest_cid, op, flags, payload.len() as u32);
        writer.write_all(&hdr.to_bytes()).map_err(|_| Reset)?;
        writer.write_all(payload).map_err(|_| Reset)?;
        Ok(Emitted::Packet(HDR_LEN + payload.len()))
    }
}
