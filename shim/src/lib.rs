//! The modules of containerd-shim-moat-v1, as a library for its binary
//! (`main.rs`) and for the fuzz targets, which reach the configuration and
//! annotation parsers through it.

pub mod annotations;
pub mod config;
pub mod daemon_socket;
pub mod events;
mod network;
pub mod pod;
mod process;
mod rootfs;
pub mod sandbox;
pub mod share;
mod stdio;
pub mod task;
mod volumes;
