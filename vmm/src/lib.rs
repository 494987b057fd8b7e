//! moat-vmm: a small KVM virtual machine monitor for moat microVMs.
//!
//! Layout:
//! - the VM configuration (JSON file or flags), its limits and checks, and
//!   the control API's bodies live in the `moat_vmm_api` crate, shared with
//!   every caller;
//! - [`vmm`]: builds a VM from a config and runs it to the end;
//! - [`layout`]: the guest physical address map;
//! - [`arch`]: kernel loading, boot protocols, initial vCPU state;
//! - [`vstate`]: the KVM VM and vCPU threads;
//! - [`devices`]: port-I/O and virtio-mmio devices behind a [`devices::Bus`];
//! - [`api`]: the control API on a unix socket;
//! - [`seccomp`]: one syscall filter per thread kind;
//! - [`logger`], [`capped_file`]: the log, and the size cap of log files;
//! - [`privileges`]: every capability dropped before the guest runs;
//! - [`host`]: hardware KVM or PVM, and what each needs.

pub mod api;
pub mod arch;
pub mod capped_file;
pub mod devices;
pub mod host;
pub mod layout;
pub mod logger;
pub mod privileges;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;
pub mod vstate;
