//! What kind of /dev/kvm this host has, and what the guest needs for it.

use std::path::Path;

/// The kind of virtualization behind /dev/kvm on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// VT-x or AMD-V.
    Hardware,
    /// A PVM backend (`kvm_pvm`): guest ring 0 runs in the host's instruction
    /// emulator, which needs the guest kernel's `emul_compat` mode.
    Pvm,
}

impl HostKind {
    /// Tells the kinds apart by the kernel modules loaded on the host
    /// (`/sys/module`); hardware wins when both are loaded.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(modules: &Path) -> Self {
        let hardware = modules.join("kvm_intel").exists() || modules.join("kvm_amd").exists();
        if !hardware && modules.join("kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::Hardware
        }
    }

    /// Kernel command-line words this host needs (see
    /// kernel-config/README.md): the emulator runs only `emul_compat`
    /// kernels, and every console byte is an emulated port write.
    pub fn kernel_args(self) -> &'static str {
        match self {
            HostKind::Hardware => "",
            HostKind::Pvm => "emul_compat quiet",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_from_loaded_modules() {
        let tmp = moat_testutil::TempDir::new("host");
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(HostKind::detect_in(dir), HostKind::Hardware);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(HostKind::detect_in(dir), HostKind::Pvm);
        std::fs::create_dir_all(dir.join("kvm_intel")).unwrap();
        assert_eq!(HostKind::detect_in(dir), HostKind::Hardware);
    }
}
