//! The KVM VM: guest memory slots, in-kernel irqchip and PIT, irqfds and
//! ioeventfds.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::GuestMemory;
use crate::host::HostKind;
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors of creating and wiring up the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device path does not exist (or is not a valid C string).
    #[error("/dev/kvm is missing: this host has no KVM (load kvm_intel/kvm_amd or a PVM backend)")]
    KvmMissing,
    /// Opening the KVM device was refused (EACCES or EPERM).
    #[error("Permission denied on /dev/kvm: run as root or add the user to the kvm group")]
    KvmPermission,
    /// Opening the KVM device failed for another reason.
    #[error("Cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// KVM reports an API version other than 12; holds the version seen.
    #[error("KVM API version {0} is not the supported version 12")]
    KvmVersion(i32),
    /// KVM lacks a capability the VMM relies on; holds its `KVM_CAP_*` name.
    #[error("KVM lacks a required capability: {0}")]
    Capability(&'static str),
    /// `KVM_CREATE_VM` failed.
    #[error("Cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Mapping guest RAM failed; holds its total size in MiB.
    #[error("Cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// A VM ioctl failed; holds the name of the call (e.g. `register_irqfd`).
    #[error("KVM refused a VM setup call ({0})")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    /// More vCPUs were asked for (first) than KVM's maximum here (second).
    #[error("{0} vCPUs are more than KVM allows here ({1})")]
    TooManyVcpus(u8, usize),
}

/// A KVM VM with its guest RAM mapped, its TSS set, and an in-kernel
/// irqchip (and PIT where KVM offers one). vCPUs are created from it by
/// [`crate::vstate::vcpu`].
pub struct Vm {
    /// The open KVM device: system-wide queries such as supported CPUID.
    pub kvm: Kvm,
    /// The VM file descriptor: vCPU creation and VM-wide ioctls.
    pub fd: VmFd,
    /// Guest RAM, one KVM memory slot per region, in slot order.
    pub mem: GuestMemory,
    /// The kind of host KVM this VM runs on (decides kernel arguments).
    pub host: HostKind,
}

impl Vm {
    /// Opens KVM at `kvm_path`, checks its version and capabilities and that
    /// it allows `vcpus` vCPUs, then creates the VM with guest RAM at
    /// `mem_regions` (guest address, size in bytes).
    pub fn new(
        kvm_path: &Path,
        mem_regions: &[(vm_memory::GuestAddress, usize)],
        vcpus: u8,
    ) -> Result<Self, VmError> {
        Self::create(kvm_path, vcpus, || {
            let size_mib = mem_regions.iter().map(|r| r.1 as u64).sum::<u64>() >> 20;
            GuestMemory::from_ranges(mem_regions).map_err(|e| VmError::Memory(size_mib, e))
        })
    }

    /// Like [`Vm::new`], with guest RAM already mapped (a template's).
    pub fn with_memory(kvm_path: &Path, mem: GuestMemory, vcpus: u8) -> Result<Self, VmError> {
        Self::create(kvm_path, vcpus, || Ok(mem))
    }

    /// Checks KVM, creates the VM, then maps `memory()` into it.
    fn create(
        kvm_path: &Path,
        vcpus: u8,
        memory: impl FnOnce() -> Result<GuestMemory, VmError>,
    ) -> Result<Self, VmError> {
        let kvm = open_kvm(kvm_path)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::Capability(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(VmError::TooManyVcpus(vcpus, max));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let mem = memory()?;
        for (slot, region) in mem.iter().enumerate() {
            let host_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("an mmap region has a host address") as u64;
            let kvm_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host_addr,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which this
            // struct keeps alive for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(kvm_region) }
                .map_err(|e| VmError::Setup("set_user_memory_region", e))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Setup("set_tss_address", e))?;
        if let Err(e) = fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
            // Only VMX needs it; PVM and SVM may refuse.
            log::debug!("KVM_SET_IDENTITY_MAP_ADDR refused: {e}");
        }
        fd.create_irq_chip()
            .map_err(|e| VmError::Setup("create_irq_chip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        if let Err(e) = fd.create_pit2(pit) {
            // The kernel calibrates with kvmclock; a missing PIT only costs a
            // fallback timer.
            log::warn!("No in-kernel PIT: {e}");
        }
        Ok(Self {
            kvm,
            fd,
            mem,
            host: HostKind::detect(),
        })
    }

    /// Binds `evt` so that writing to it raises `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Setup("register_irqfd", e))
    }

    /// Makes a guest write of `datamatch` (4 bytes) at MMIO `addr` signal `evt`
    /// inside KVM, without an exit to user space.
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| VmError::Setup("register_ioevent", e))
    }
}

fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    use std::os::unix::ffi::OsStrExt;
    let cpath =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::KvmMissing)?;
    match Kvm::new_with_path(&cpath) {
        Ok(kvm) => Ok(kvm),
        Err(e) if e.errno() == libc::ENOENT => Err(VmError::KvmMissing),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(VmError::KvmPermission)
        }
        Err(e) => Err(VmError::KvmOpen(e)),
    }
}
