//! The bodies of moat's fuzz targets: one function per target, taking the
//! raw input. The cargo-fuzz targets in `fuzz/fuzz_targets/` call them, and
//! so does the corpus replay test (`tests/corpus.rs`), on stable, in CI.
//!
//! A body panics, hangs or trips a sanitizer only where the code under test
//! does: that is a finding. Inputs that the real caller would never pass on
//! (a queue the transport refused to activate, a path the fuzzer could open
//! on the host) are shaped or skipped here, and each such place says why.

pub mod config;
pub mod legacy;
pub mod mmio;
pub mod protocol;
pub mod virtio;
pub mod vmm_api;

/// A fuzz target: its name (a folder under `fuzz/corpus/`) and its body.
pub struct Target {
    /// The cargo-fuzz target's name.
    pub name: &'static str,
    /// Runs one input.
    pub body: fn(&[u8]),
}

/// Every target, in the order of the README's table.
pub const TARGETS: &[Target] = &[
    Target {
        name: "virtio_block",
        body: virtio::block,
    },
    Target {
        name: "virtio_net",
        body: virtio::net,
    },
    Target {
        name: "virtio_vsock",
        body: virtio::vsock,
    },
    Target {
        name: "virtio_rng",
        body: virtio::rng,
    },
    Target {
        name: "mmio_transport",
        body: mmio::transport,
    },
    Target {
        name: "legacy_devices",
        body: legacy::devices,
    },
    Target {
        name: "vmm_api",
        body: vmm_api::api,
    },
    Target {
        name: "vmm_api_client",
        body: vmm_api::client,
    },
    Target {
        name: "vmm_config",
        body: config::vmm_config,
    },
    Target {
        name: "shim_config",
        body: config::shim_config,
    },
    Target {
        name: "shim_annotations",
        body: config::shim_annotations,
    },
    Target {
        name: "agent_cmdline",
        body: config::agent_cmdline,
    },
    Target {
        name: "agent_oci",
        body: config::agent_oci,
    },
    Target {
        name: "stream_header",
        body: protocol::stream_header,
    },
    Target {
        name: "agent_messages",
        body: protocol::agent_messages,
    },
];

/// Reads input bytes front to back; past the end every read is zero, so a
/// body can take what it needs from any input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte was taken.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
}
