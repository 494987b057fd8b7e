//! A VM's shape: what two VMs must share to start from one template.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::VmConfig;

/// What makes VMs interchangeable for a template (`moat-vmm --restore`
/// refuses a VM of another shape; the shim names its templates after it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    cmdline: String,
    vcpus: u8,
    memory_mib: u64,
    block: Vec<String>,
    net: Vec<String>,
    vsock_cid: Option<u64>,
    rng: bool,
}

impl Shape {
    /// The shape of the VM `cfg` describes.
    pub fn of(cfg: &VmConfig) -> Shape {
        Shape {
            kernel: cfg.kernel.clone(),
            initramfs: cfg.initramfs.clone(),
            cmdline: cfg.cmdline.clone(),
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            block: cfg.block.iter().map(|b| b.id.clone()).collect(),
            net: cfg.net.iter().map(|n| n.id.clone()).collect(),
            vsock_cid: cfg.vsock.as_ref().map(|v| v.guest_cid),
            rng: cfg.rng,
        }
    }

    /// The first field in which `other` differs, if any.
    pub fn difference(&self, other: &Shape) -> Option<&'static str> {
        [
            (self.kernel != other.kernel, "kernel"),
            (self.initramfs != other.initramfs, "initramfs"),
            (self.cmdline != other.cmdline, "command line"),
            (self.vcpus != other.vcpus, "vCPU count"),
            (self.memory_mib != other.memory_mib, "memory size"),
            (self.block != other.block, "block device list"),
            (self.net != other.net, "net device list"),
            (self.vsock_cid != other.vsock_cid, "vsock device"),
            (self.rng != other.rng, "rng device"),
        ]
        .into_iter()
        .find_map(|(differs, what)| differs.then_some(what))
    }
}
