//! The virtio-vsock packet header (`struct virtio_vsock_hdr`).

/// Size of the header on the wire.
pub const HDR_LEN: usize = 44;

/// CID of the host, as the guest addresses it.
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type served.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_OP_REQUEST`: open a connection.
pub const OP_REQUEST: u16 = 1;
/// `VIRTIO_VSOCK_OP_RESPONSE`: accept a connection.
pub const OP_RESPONSE: u16 = 2;
/// `VIRTIO_VSOCK_OP_RST`: refuse or end a connection at once.
pub const OP_RST: u16 = 3;
/// `VIRTIO_VSOCK_OP_SHUTDOWN`: a side stops receiving and/or sending; `flags` says which.
pub const OP_SHUTDOWN: u16 = 4;
/// `VIRTIO_VSOCK_OP_RW`: data, `len` bytes after the header.
pub const OP_RW: u16 = 5;
/// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the sender's `buf_alloc` and `fwd_cnt`.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both directions shut down.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Largest payload of one packet, either way (Linux's own limit).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// A decoded packet header; all fields little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Context ID of the sender.
    pub src_cid: u64,
    /// Context ID of the receiver.
    pub dst_cid: u64,
    /// Port of the sender.
    pub src_port: u32,
    /// Port of the receiver.
    pub dst_port: u32,
    /// Payload length in bytes, after the header.
    pub len: u32,
    /// Socket type; [`TYPE_STREAM`] is the only one served.
    pub type_: u16,
    /// One of the `OP_*` operations.
    pub op: u16,
    /// SHUTDOWN flags for [`OP_SHUTDOWN`]; zero otherwise.
    pub flags: u32,
    /// Bytes of receive buffer the sender has for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has received on this connection and passed on, wrapping.
    pub fwd_cnt: u32,
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decodes a header from its wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the header in its wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST answering `self`: addresses swapped, no payload, no credit.
    pub fn reset_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_layout() {
        let hdr = Header {
            src_cid: 0x0102030405060708,
            dst_cid: 2,
            src_port: 0x11223344,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x10000,
            fwd_cnt: 7,
        };
        let b = hdr.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[24..32], &[5, 0, 0, 0, 1, 0, 5, 0]);
        assert_eq!(&b[36..44], &[0, 0, 1, 0, 7, 0, 0, 0]);
        assert_eq!(Header::from_bytes(&b), hdr);
        let rst = hdr.reset_reply();
        assert_eq!((rst.src_cid, rst.dst_cid), (2, hdr.src_cid));
        assert_eq!((rst.src_port, rst.dst_port), (1024, 0x11223344));
        assert_eq!((rst.op, rst.len), (OP_RST, 0));
    }
}
