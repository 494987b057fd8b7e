//! The one contract between moat-vmm and whoever starts it (the shim, the
//! benchmarks, the tests): what a VM is made of ([`VmConfig`]), the limits
//! a configuration must stay within ([`limits`]) and the checks that
//! enforce them, the bodies of the control API's requests and responses
//! ([`api`]), a client for that API ([`ApiClient`]), and what the guest
//! itself tells the VMM ([`guest`]).
//!
//! moat-vmm reads exactly these types, so a configuration that passes
//! [`VmConfig::check_limits`] here is one the VMM accepts (files and host
//! memory permitting, which [`VmConfig::validate`] adds). The wire format is
//! described in `vmm/API.md`.
//!
//! This crate is deliberately light: serde and libc/nix, no KVM.

#![warn(missing_docs)]

pub mod api;
mod cli;
pub mod client;
pub mod config;
pub mod guest;
pub mod limits;
mod shape;

pub use api::{BlockRequest, ErrorBody, ShutdownRequest, VmInfo, VmState};
pub use client::{ApiClient, ClientError, Response};
pub use config::{
    parse_mac, BlockConfig, ConfigError, JailConfig, NetConfig, SerialOutput, VmConfig, VsockConfig,
};
pub use shape::Shape;

#[cfg(test)]
mod tests;
