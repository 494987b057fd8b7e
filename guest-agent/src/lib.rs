//! moat-agent: the guest agent (PID 1 of the guest initramfs).
//!
//! A library so that the binaries (`main.rs`, `moat-mkinitramfs`) and the
//! integration tests share the code. The tests' scenarios live in the
//! test-only crate `moat-agent-scenarios` (guest-agent/scenarios/).
//!
//! Layout:
//! - [`init`]: PID 1 duties (basic mounts, loopback, power-off);
//!   [`config`]: the agent's settings, from the kernel command line (or
//!   flags in tests);
//! - [`server`]: the ttrpc service, over [`transport`]'s vsock or unix
//!   listeners; [`error`] maps failures onto ttrpc codes;
//! - [`container`]: container and process lifecycle, built on [`process`]
//!   (fork, namespaces, exec), [`mount`] (rootfs and volumes, through the
//!   [`syscall`] trait), [`capabilities`], [`cgroup`], [`seccomp`] (with [`syscall_table`])
//!   and [`oci`] (the spec types);
//! - [`stdio`]: the stdio-stream port and each process's pipes or pty;
//!   [`port_forward`]: CRI PortForward connections that arrive on it;
//!   [`share`]: the host directories shared over FUSE through it;
//! - [`reaper`], [`events`], [`oom`]: exit statuses, and the exit/OOM
//!   events the host takes with GetEvent;
//! - [`network`] and [`files`]: SetNetwork and CopyFile;
//! - [`initramfs`]: the cpio writer behind `moat-mkinitramfs`;
//! - [`logger`]: console logging.

pub mod capabilities;
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
pub mod port_forward;
pub mod process;
pub mod reaper;
pub mod restored;
pub mod seccomp;
pub mod server;
pub mod share;
pub mod stdio;
pub mod syscall;
pub mod syscall_table;
pub mod transport;
