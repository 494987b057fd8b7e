//! vCPU threads: each runs KVM_RUN in a loop and dispatches port I/O and
//! MMIO exits to the buses. They never start threads or open anything: a
//! virtio DRIVER_OK only posts an activation request for the event thread.
//! The main thread stops or pauses them by setting a flag and kicking them
//! out of KVM_RUN with a signal. A paused vCPU has finished its last
//! instruction (a pending port or MMIO read is completed first), so its
//! state can be saved for a template (see `crate::snapshot`).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::snapshot::{self, SnapshotError, VcpuState};
use super::Vm;
use crate::arch::regs::{self, EntryPoint, RegsError};
use crate::devices::Bus;

/// Why the VMM exits; the process exit code (see API.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    /// The guest powered off or rebooted, or the API shut it down.
    Ok = 0,
    /// Bad configuration, or setup failed before any guest code ran.
    SetupError = 1,
    /// A vCPU failed: KVM_RUN error or unhandled exit.
    VcpuFailed = 2,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault = 3,
    /// An internal error after boot (event loop, device).
    Internal = 4,
    /// The guest kernel panicked and reset the machine (`reboot=panic_warm`).
    GuestPanic = 5,
}

impl ExitCode {
    /// The exit code stored as `code` by [`VcpuControl::request_exit`].
    pub fn from_code(code: i32) -> ExitCode {
        [
            ExitCode::Ok,
            ExitCode::SetupError,
            ExitCode::VcpuFailed,
            ExitCode::TripleFault,
            ExitCode::GuestPanic,
        ]
        .into_iter()
        .find(|c| *c as i32 == code)
        .unwrap_or(ExitCode::Internal)
    }
}

/// Why the vCPUs could not be set up or started.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed for this vCPU index.
    #[error("Cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot read the host's supported CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed for this vCPU index.
    #[error("Cannot set CPUID of vCPU {0}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    /// The registers of this vCPU index could not be set.
    #[error("Cannot set up vCPU {0}")]
    Regs(u8, #[source] RegsError),
    /// A vCPU thread could not be spawned.
    #[error("Cannot start a vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The handler of the signal that kicks a vCPU out of KVM_RUN could not be installed.
    #[error("Cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A template's vCPU state could not be read or written back.
    #[error(transparent)]
    State(#[from] SnapshotError),
    /// A template holds another number of vCPUs (first) than asked (second).
    #[error("The template has {0} vCPUs, not {1}")]
    StateCount(usize, u8),
}

/// How the vCPUs begin.
#[derive(Clone, Copy)]
pub enum VcpuStart<'a> {
    /// A fresh boot: the boot vCPU enters the kernel at this address, the
    /// others wait for INIT/SIPI.
    Boot(EntryPoint),
    /// Each vCPU takes up the state saved in a template, in vCPU order.
    Restore(&'a [VcpuState]),
}

/// State shared by the vCPU threads and the thread that controls them.
pub struct VcpuControl {
    stop: AtomicBool,
    pause: Mutex<bool>,
    resumed: Condvar,
    parked: Mutex<usize>,
    parked_changed: Condvar,
    /// First reason to exit wins.
    exit_code: AtomicI32,
    exit_evt: EventFd,
}

impl VcpuControl {
    /// Records why the VM stops and wakes the main loop; later calls keep the
    /// first code.
    pub fn request_exit(&self, code: ExitCode) {
        let _ =
            self.exit_code
                .compare_exchange(-1, code as i32, Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.exit_evt.write(1);
    }

    /// The first exit code requested, if any, as a process exit code.
    pub fn exit_code(&self) -> Option<i32> {
        match self.exit_code.load(Ordering::SeqCst) {
            -1 => None,
            c => Some(c),
        }
    }

    /// Signalled on every exit request; the main loop waits on it.
    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }
}

/// The vCPU threads of a VM, and the control they share.
pub struct Vcpus {
    handles: Mutex<Vec<JoinHandle<()>>>,
    control: Arc<VcpuControl>,
    /// Each vCPU's fd; its thread holds the lock only around KVM_RUN and
    /// the exit's dispatch, so a paused vCPU's fd is free to save.
    fds: Vec<Arc<Mutex<VcpuFd>>>,
    /// The MSRs KVM lists for saving (read before any filter is installed:
    /// listing them is a system ioctl).
    listed_msrs: Vec<u32>,
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only interrupts KVM_RUN (EINTR); the flags say what to do next.
}

/// Per-vCPU CPUID: the host's supported leaves with this vCPU's APIC ID.
fn cpuid_for(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
                // Logical processor count, for the HTT topology leaf.
                entry.ebx = (entry.ebx & 0xff00_ffff) | (u32::from(count) << 16);
            }
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

impl Vcpus {
    /// Creates and configures every vCPU, then starts their threads (see
    /// [`VcpuStart`]).
    pub fn start(
        vm: &Vm,
        count: u8,
        how: VcpuStart<'_>,
        pio: Bus,
        mmio: Bus,
        seccomp: Option<seccompiler::BpfProgram>,
    ) -> Result<Self, VcpuError> {
        if let VcpuStart::Restore(states) = how {
            if states.len() != usize::from(count) {
                return Err(VcpuError::StateCount(states.len(), count));
            }
        }
        register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)?;
        let base = vm
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::Cpuid)?;
        let mut fds = Vec::with_capacity(count.into());
        for id in 0..count {
            let fd = vm
                .fd
                .create_vcpu(id.into())
                .map_err(|e| VcpuError::Create(id, e))?;
            fd.set_cpuid2(&cpuid_for(&base, id, count))
                .map_err(|e| VcpuError::SetCpuid(id, e))?;
            let r = |e| VcpuError::Regs(id, e);
            match how {
                VcpuStart::Boot(entry) => {
                    regs::setup_msrs(&fd).map_err(r)?;
                    regs::setup_fpu(&fd).map_err(r)?;
                    regs::setup_lapic(&fd).map_err(r)?;
                    if id == 0 {
                        regs::setup_sregs(&vm.mem, &fd).map_err(r)?;
                        regs::setup_regs(&fd, entry).map_err(r)?;
                    }
                }
                VcpuStart::Restore(states) => states[usize::from(id)].restore(&fd)?,
            }
            fds.push(fd);
        }
        let listed_msrs = snapshot::listed_msrs(&vm.kvm)?;
        let fds: Vec<_> = fds.into_iter().map(|fd| Arc::new(Mutex::new(fd))).collect();
        let control = Arc::new(VcpuControl {
            stop: AtomicBool::new(false),
            pause: Mutex::new(false),
            resumed: Condvar::new(),
            parked: Mutex::new(0),
            parked_changed: Condvar::new(),
            exit_code: AtomicI32::new(-1),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(VcpuError::Spawn)?,
        });
        let vcpus = Vcpus {
            handles: Mutex::new(vec![]),
            control,
            fds: fds.clone(),
            listed_msrs,
        };
        for (id, fd) in fds.into_iter().enumerate() {
            let (pio, mmio, control) = (pio.clone(), mmio.clone(), vcpus.control.clone());
            let filter = seccomp.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Some(filter) = filter {
                        if let Err(e) = seccompiler::apply_filter(&filter) {
                            log::error!("vCPU {id}: cannot install its seccomp filter: {e}");
                            control.request_exit(ExitCode::Internal);
                            return;
                        }
                    }
                    run_vcpu(id, fd, &pio, &mmio, &control)
                })
                .map_err(VcpuError::Spawn)?;
            vcpus.handles.lock().unwrap().push(handle);
        }
        Ok(vcpus)
    }

    /// The state shared with the vCPU threads (exit requests).
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    fn running(&self) -> usize {
        self.handles
            .lock()
            .unwrap()
            .iter()
            .filter(|h| !h.is_finished())
            .count()
    }

    fn kick_all(&self) {
        for h in self.handles.lock().unwrap().iter() {
            if !h.is_finished() {
                let _ = h.kill(kick_signal());
            }
        }
    }

    /// Stops every vCPU and waits until all are parked.
    pub fn pause(&self) {
        *self.control.pause.lock().unwrap() = true;
        let want = self.running();
        let mut parked = self.control.parked.lock().unwrap();
        while *parked < want && !self.control.stop.load(Ordering::SeqCst) {
            drop(parked);
            // A kick can land just before KVM_RUN and be lost: repeat it.
            self.kick_all();
            parked = self.control.parked.lock().unwrap();
            parked = self
                .control
                .parked_changed
                .wait_timeout(parked, Duration::from_millis(10))
                .unwrap()
                .0;
        }
    }

    /// The state of every vCPU, in order, for a template. The vCPUs must
    /// be paused ([`Vcpus::pause`]), so none is inside KVM_RUN.
    pub fn save(&self) -> Result<Vec<VcpuState>, SnapshotError> {
        debug_assert!(self.is_paused());
        let Some(first) = self.fds.first() else {
            return Ok(Vec::new());
        };
        let indices = snapshot::msr_indices(&self.listed_msrs, &first.lock().unwrap());
        self.fds
            .iter()
            .map(|fd| VcpuState::save(&fd.lock().unwrap(), &indices))
            .collect()
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        *self.control.pause.lock().unwrap() = false;
        self.control.resumed.notify_all();
    }

    /// Whether a pause is in force (set by [`Vcpus::pause`], cleared by
    /// [`Vcpus::resume`]).
    pub fn is_paused(&self) -> bool {
        *self.control.pause.lock().unwrap()
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&self) {
        self.control.stop.store(true, Ordering::SeqCst);
        self.resume();
        while self.running() > 0 {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(5));
        }
        for h in self.handles.lock().unwrap().drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Parks the vCPU while a pause is in force. It first finishes the
/// instruction of its last exit: the data of a port or MMIO read reaches
/// the guest's register only on the next KVM_RUN, which `immediate_exit`
/// makes return at once after that. A saved state then misses nothing.
fn park_if_paused(control: &VcpuControl, fd: &Mutex<VcpuFd>) {
    if !*control.pause.lock().unwrap() {
        return;
    }
    {
        let mut fd = fd.lock().unwrap();
        fd.set_kvm_immediate_exit(1);
        let _ = fd.run();
        fd.set_kvm_immediate_exit(0);
    }
    let mut paused = control.pause.lock().unwrap();
    if !*paused {
        return;
    }
    *control.parked.lock().unwrap() += 1;
    control.parked_changed.notify_all();
    while *paused && !control.stop.load(Ordering::SeqCst) {
        paused = control.resumed.wait(paused).unwrap();
    }
    *control.parked.lock().unwrap() -= 1;
}

fn run_vcpu(id: usize, fd: Arc<Mutex<VcpuFd>>, pio: &Bus, mmio: &Bus, control: &VcpuControl) {
    loop {
        if control.stop.load(Ordering::SeqCst) {
            return;
        }
        park_if_paused(control, &fd);
        let mut fd = fd.lock().unwrap();
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(port.into(), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(port.into(), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC a HLT only exits when it can never
                // wake up (interrupts off): the guest has halted for good.
                log::info!("vCPU {id} halted with interrupts disabled");
                control.request_exit(ExitCode::Ok);
                return;
            }
            Ok(VcpuExit::Shutdown) => {
                log::error!("vCPU {id}: guest triple fault (KVM_EXIT_SHUTDOWN)");
                control.request_exit(ExitCode::TripleFault);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                log::info!("vCPU {id}: system event {kind}");
                control.request_exit(ExitCode::Ok);
                return;
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                log::error!("vCPU {id}: unhandled exit {other:?}");
                control.request_exit(ExitCode::VcpuFailed);
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                log::error!("vCPU {id}: KVM_RUN failed: {e}");
                control.request_exit(ExitCode::VcpuFailed);
                return;
            }
        }
    }
}
