//! The shim <-> agent protocol: the stdio stream and port-forward
//! handshakes (header and reply framing, both sides) and the ttrpc
//! payloads each side decodes.

use std::io::{self, Read, Write};

use moat_protocol::agent;
use moat_protocol::protobuf::Message;
use moat_protocol::stream::Request;
use moat_protocol::{StreamHeader, StreamKind};

use crate::Input;

/// The agent reading a stream header, and the host reading the agent's
/// reply to one. A header that parses must encode back to itself.
pub fn stream_header(data: &[u8]) {
    if let Ok(request) = Request::read_from(&mut &data[..]) {
        let bytes = request.encode().expect("a parsed request encodes");
        let again = Request::read_from(&mut &bytes[..]).expect("an encoded request parses");
        assert_eq!(request, again);
    }
    let mut peer = Peer { reply: data };
    let _ = StreamHeader::new("fuzz", "", StreamKind::Stdout).attach(&mut peer);
}

/// The agent's side of a connection: replies with the input, swallows writes.
struct Peer<'a> {
    reply: &'a [u8],
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reply.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A ttrpc payload: the first byte picks the message type (requests the
/// agent decodes, replies and events the shim decodes); one that decodes
/// must survive an encode and decode unchanged.
pub fn agent_messages(data: &[u8]) {
    let mut input = Input::new(data);
    let kind = input.u8();
    let payload = input.rest();
    match kind % 14 {
        0 => round_trip::<agent::VersionRequest>(payload),
        1 => round_trip::<agent::VersionResponse>(payload),
        2 => round_trip::<agent::CreateContainerRequest>(payload),
        3 => round_trip::<agent::StartContainerRequest>(payload),
        4 => round_trip::<agent::RemoveContainerRequest>(payload),
        5 => round_trip::<agent::ExecProcessRequest>(payload),
        6 => round_trip::<agent::SignalProcessRequest>(payload),
        7 => round_trip::<agent::WaitProcessResponse>(payload),
        8 => round_trip::<agent::ResizePtyRequest>(payload),
        9 => round_trip::<agent::StatsResponse>(payload),
        10 => round_trip::<agent::UpdateContainerRequest>(payload),
        11 => round_trip::<agent::SetNetworkRequest>(payload),
        12 => round_trip::<agent::CopyFileRequest>(payload),
        _ => round_trip::<agent::GetEventResponse>(payload),
    }
}

fn round_trip<M: Message + PartialEq>(payload: &[u8]) {
    let Ok(msg) = M::parse_from_bytes(payload) else {
        return;
    };
    let bytes = msg.write_to_bytes().expect("a decoded message encodes");
    let again = M::parse_from_bytes(&bytes).expect("an encoded message decodes");
    assert!(again == msg, "message changed across encode and decode");
}
