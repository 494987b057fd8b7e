//! KVM state: the VM (memory, interrupt controller) and its vCPUs.

pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use vcpu::{ExitCode, VcpuError, VcpuStart, Vcpus};
pub use vm::{Vm, VmError};
