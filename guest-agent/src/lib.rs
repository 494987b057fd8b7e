//! moat-agent: the guest agent (PID 1 of the guest initramfs).
//!
//! Library so the integration tests and the lead's VM tests can share the
//! scenario code in [`scenarios`]; the binary is `main.rs`.

pub mod cgroup;
pub mod config;
pub mod container;
pub mod error;
pub mod events;
pub mod files;
pub mod init;
pub mod initramfs;
pub mod logger;
pub mod mount;
pub mod network;
pub mod oci;
pub mod oom;
pub mod process;
pub mod reaper;
pub mod scenarios;
pub mod seccomp;
pub mod server;
pub mod stdio;
pub mod syscall;
pub mod syscall_table;
pub mod transport;
