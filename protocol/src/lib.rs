//! The moat host <-> guest agent protocol.
//!
//! - [`agent`] and [`agent_ttrpc`]: messages and ttrpc stubs generated from
//!   `proto/agent.proto` at build time.
//! - [`client`]: the host-side [`AgentClient`], which performs the version
//!   handshake, and [`connect_hybrid_vsock`] for Firecracker-style hybrid vsock.
//! - [`stream`]: the stdio stream and port-forward handshakes used on
//!   [`STDIO_PORT`] (both sides).
//! - [`relay`]: the byte copy both ends of a port forward run.
//! - [`ids`]: the container/exec id rules both sides enforce.
//!
//! See `protocol/README.md` for the wire-level description.

pub mod agent {
    //! Generated protobuf messages.
    // Generated from proto/agent.proto at build time: the docs live in the
    // .proto file, and rust-protobuf does not copy them onto every item.
    #![allow(warnings, missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

pub mod agent_ttrpc {
    //! Generated ttrpc client and server stubs.
    // Generated from proto/agent.proto at build time: the docs live in the
    // .proto file, and ttrpc-codegen does not copy them onto every item.
    #![allow(warnings, missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod client;
pub mod ids;
pub mod relay;
pub mod stream;
pub mod vsock;

pub use client::{open_forward, open_share, AgentClient, ClientError, Connector};
pub use stream::{StreamError, StreamHeader, StreamKind};
pub use vsock::connect_hybrid_vsock;

/// Re-exported so users name the exact ttrpc/protobuf versions this crate uses.
pub use protobuf;
pub use ttrpc;

/// Version of this protocol. Bump on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest peer version this build can still talk to.
pub const MIN_COMPATIBLE_VERSION: u32 = 1;

/// Guest vsock port of the agent's ttrpc server (override:
/// [`AGENT_PORT_PARAM`]).
pub const DEFAULT_AGENT_PORT: u32 = 1024;
/// Kernel command line parameter: the agent's port (`moat.port=N`).
pub const AGENT_PORT_PARAM: &str = "moat.port";
/// Guest vsock port for stdio streams: always the agent port + 1.
pub const STDIO_PORT_OFFSET: u32 = 1;
/// Guest vsock port for stdio streams with the default agent port.
pub const STDIO_PORT: u32 = DEFAULT_AGENT_PORT + STDIO_PORT_OFFSET;

/// Kernel command line parameter: the pids.max of every container whose
/// OCI spec sets no pids limit (`moat.pids_limit=N`; 0 for none).
pub const PIDS_LIMIT_PARAM: &str = "moat.pids_limit";
/// The agent's pids limit without [`PIDS_LIMIT_PARAM`], and the shim's
/// default for it: a fork bomb stays in its container, and the guest
/// keeps pids and memory for the agent.
pub const DEFAULT_PIDS_LIMIT: u32 = 1024;

/// Largest `CopyFileRequest.data` the agent accepts in one call.
pub const MAX_COPY_CHUNK: usize = 1 << 20;
/// Where CopyFile paths live in the guest (the agent's default state
/// directory + `shared`); the shim points spec mounts there.
pub const GUEST_SHARED_DIR: &str = "/run/moat/shared";
/// Where the agent mounts the host's shared directories (read-write
/// volumes, served over FUSE: `stream::Request::Share`).
pub const GUEST_SHARES_DIR: &str = "/run/moat/shares";
/// The guest's own /dev/shm (a 64 MiB tmpfs, as CRI's default sandbox
/// shm): one VM is one pod, so the pod's containers bind it as theirs.
pub const GUEST_POD_SHM: &str = "/dev/shm";
/// Largest OCI spec JSON the agent accepts.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Largest ttrpc frame (the ttrpc crate's limit).
pub const MAX_MESSAGE_BYTES: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;

/// How long the agent keeps an attached stream waiting for its process, and
/// how long a start waits for announced streams.
pub const STREAM_ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
