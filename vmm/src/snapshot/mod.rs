//! VM templates: a booted VM saved to one file, and new VMs started from
//! it without a boot.
//!
//! The file holds a header, the saved state as JSON (vCPUs, the VM's
//! interrupt controllers and clock, each virtio transport, the serial
//! port) and then guest memory from a page boundary on. Every VM restored
//! from it maps that memory copy-on-write ([`memory::map_private`]).
//!
//! A template is only valid for VMs of its shape (`moat_vmm_api::Shape`): the same
//! kernel, initramfs, command line, vCPUs, memory and devices, in order.
//! What may differ is each device's host side: disk files, taps, the vsock
//! socket path, the console's output.

pub mod memory;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use moat_vmm_api::{Shape, VmConfig};
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use crate::devices::legacy::SerialState;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::GuestMemory;
use crate::vstate::snapshot::{VcpuState, VmState};
pub use memory::MemoryError;

/// The first bytes of a template file.
const MAGIC: &[u8; 8] = b"MOATSNAP";
/// The layout this moat-vmm writes and reads; another is refused.
const VERSION: u32 = 1;
/// Magic, version, state length.
const HEADER_LEN: usize = 8 + 4 + 8;
/// Guest memory starts on this boundary, so it can be mapped.
const MEMORY_ALIGN: u64 = 4096;
/// A larger state is not a template of ours (32 vCPUs take about 1 MiB).
const MAX_STATE_LEN: u64 = 16 << 20;

/// Why a template could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template file cannot be opened or read.
    #[error("Cannot read the template {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not a template of this moat-vmm.
    #[error("{0} is not a moat VM template of version {VERSION}")]
    NotATemplate(PathBuf),
    /// The saved state does not parse.
    #[error("The template {0} is corrupt")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    /// The VM asked for differs from the template's.
    #[error("The VM's {what} differs from the template's")]
    Shape {
        /// The first field that differs.
        what: &'static str,
    },
    /// Writing the template failed.
    #[error("Cannot write the template")]
    Write(#[source] std::io::Error),
    /// Guest memory could not be saved or mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Everything of a VM but its memory.
#[derive(Serialize, Deserialize)]
pub struct SavedVm {
    /// The VM's shape.
    pub shape: Shape,
    /// Interrupt controllers, PIT and clock.
    pub vm: VmState,
    /// Each vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// Each virtio transport, in the VM's device order.
    pub transports: Vec<TransportState>,
    /// The console UART's registers.
    pub serial: SerialState,
}

/// Where guest memory starts in a file whose state is `state_len` bytes.
fn memory_offset(state_len: usize) -> u64 {
    ((HEADER_LEN + state_len) as u64).div_ceil(MEMORY_ALIGN) * MEMORY_ALIGN
}

/// Writes `saved` and `mem` to `file` (emptied first) and syncs it.
pub fn write(file: &File, saved: &SavedVm, mem: &GuestMemory) -> Result<(), TemplateError> {
    let state = serde_json::to_vec(saved).expect("the saved state always serializes");
    let mut head = Vec::with_capacity(HEADER_LEN + state.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(state.len() as u64).to_le_bytes());
    head.extend_from_slice(&state);
    file.set_len(0).map_err(TemplateError::Write)?;
    file.write_all_at(&head, 0).map_err(TemplateError::Write)?;
    memory::save(mem, file, memory_offset(state.len()))?;
    file.sync_all().map_err(TemplateError::Write)
}

/// A template opened for restoring VMs.
pub struct Template {
    /// The saved state.
    pub saved: SavedVm,
    path: PathBuf,
    file: File,
    memory_offset: u64,
}

impl Template {
    /// Opens and parses the template at `path`.
    pub fn open(path: &Path) -> Result<Template, TemplateError> {
        let read = |e| TemplateError::Read(path.to_owned(), e);
        let not = || TemplateError::NotATemplate(path.to_owned());
        let mut file = File::open(path).map_err(read)?;
        let mut head = [0u8; HEADER_LEN];
        file.read_exact(&mut head).map_err(|_| not())?;
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
        if &head[..8] != MAGIC || version != VERSION || len > MAX_STATE_LEN {
            return Err(not());
        }
        let mut state = vec![0u8; len as usize];
        file.read_exact(&mut state).map_err(|_| not())?;
        let saved: SavedVm = serde_json::from_slice(&state)
            .map_err(|e| TemplateError::Corrupt(path.to_owned(), e))?;
        Ok(Template {
            saved,
            path: path.to_owned(),
            file,
            memory_offset: memory_offset(state.len()),
        })
    }

    /// Checks that `cfg` describes a VM of the template's shape.
    pub fn check_shape(&self, cfg: &VmConfig) -> Result<(), TemplateError> {
        match self.saved.shape.difference(&Shape::of(cfg)) {
            Some(what) => Err(TemplateError::Shape { what }),
            None => Ok(()),
        }
    }

    /// The template's guest memory at `regions`, mapped copy-on-write.
    pub fn map_memory(
        &self,
        regions: &[(GuestAddress, usize)],
    ) -> Result<GuestMemory, TemplateError> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| TemplateError::Read(self.path.clone(), e))?;
        Ok(memory::map_private(file, self.memory_offset, regions)?)
    }
}
