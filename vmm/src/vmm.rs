//! Builds a VM from a [`VmConfig`] and runs it to the end.
//!
//! Order matters for the promise that bad input fails before any guest code
//! runs and leaves nothing behind: validate the config, open every device
//! backend, create the VM and load the kernel, wire devices, bind the API,
//! and only then start the vCPUs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiServer, VmControl};
use crate::arch::{boot, mptable};
use crate::capped_file::CappedFile;
use crate::devices::legacy::{BootTimer, SerialDevice, SerialState, I8042};
use crate::devices::virtio::block::BlockSource;
use crate::devices::virtio::{self, MmioTransport, VirtioDevice};
use crate::devices::Bus;
use crate::layout::*;
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{SavedVm, Template, TemplateError};
use crate::vstate::snapshot::VmState as KvmVmState;
use crate::vstate::{ExitCode, VcpuStart, Vcpus, Vm};
use moat_vmm_api::{SerialOutput, Shape, VmConfig, VmInfo, VmState};

/// Why the VMM could not build or start a VM; `main` exits with code 1 on any of them.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid or breaks a limit.
    #[error(transparent)]
    Config(#[from] moat_vmm_api::ConfigError),
    /// The KVM VM or its memory could not be set up.
    #[error(transparent)]
    Vm(#[from] crate::vstate::VmError),
    /// The kernel, initramfs or boot parameters could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table could not be written to guest memory.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The vCPU registers could not be set up.
    #[error(transparent)]
    Regs(#[from] crate::arch::regs::RegsError),
    /// The vCPUs could not be created or started.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::VcpuError),
    /// The control API could not start.
    #[error(transparent)]
    Api(#[from] crate::api::ServerError),
    /// The seccomp filters could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// Privileges could not be dropped.
    #[error(transparent)]
    Privileges(#[from] crate::privileges::PrivilegeError),
    /// A block device could not be set up; holds its id.
    #[error("Block device {0:?}")]
    Block(String, #[source] virtio::block::BlockError),
    /// A network device could not be set up; holds its id.
    #[error("Net device {0:?}")]
    Net(String, #[source] virtio::net::NetError),
    /// The vsock device could not be set up.
    #[error("vsock device")]
    Vsock(#[source] virtio::vsock::VsockError),
    /// A virtio-mmio transport could not create its queue notify eventfds.
    #[error("Cannot set up the virtio-mmio transport")]
    Transport(#[source] std::io::Error),
    /// The serial output file cannot be opened.
    #[error("Cannot open the serial output {0}")]
    SerialOutput(PathBuf, #[source] std::io::Error),
    /// The log file cannot be given its size cap.
    #[error("Cannot cap the log file")]
    LogFile(#[source] std::io::Error),
    /// An eventfd or the termination signalfd could not be created.
    #[error("Cannot create an eventfd or signalfd")]
    EventFd(#[source] std::io::Error),
    /// A device's range could not be put on a bus.
    #[error(transparent)]
    Bus(#[from] crate::devices::BusError),
    /// The template to restore from cannot be used.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The template's KVM state was refused by this VM.
    #[error("Cannot restore the template's VM state")]
    RestoreKvm(#[source] crate::vstate::snapshot::SnapshotError),
    /// A template's device could not be restored; holds its index.
    #[error("Cannot restore the template's device {0}")]
    RestoreDevice(usize, #[source] virtio::mmio::RestoreError),
    /// The template holds another number of devices than the VM.
    #[error("The template has {0} devices, the VM {1}")]
    RestoreDeviceCount(usize, usize),
}

/// Host memory in MiB, for the memory-size check.
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib / 1024)
}

/// The console's writer. A file (by path, or an fd of a regular file) is
/// capped at `cap` bytes: the guest decides how much it prints.
fn serial_output(cfg: &SerialOutput, cap: u64) -> Result<Box<dyn Write + Send>, VmmError> {
    let (file, what) = match cfg {
        SerialOutput::Stdout => return Ok(Box::new(std::io::stdout())),
        SerialOutput::Off => return Ok(Box::new(std::io::sink())),
        SerialOutput::File(path) => (
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| VmmError::SerialOutput(path.clone(), e))?,
            path.clone(),
        ),
        SerialOutput::Fd(fd) => {
            // SAFETY: F_GETFD only inspects the descriptor number.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(VmmError::SerialOutput(
                    format!("fd {fd}").into(),
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: the fd was handed to us for the console and is valid
            // (checked above); nothing else in the VMM owns it.
            let file = unsafe { File::from_raw_fd(*fd) };
            (file, format!("fd {fd}").into())
        }
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(Box::new(file));
    }
    let capped = CappedFile::new(file, cap).map_err(|e| VmmError::SerialOutput(what, e))?;
    Ok(Box::new(capped))
}

/// Opens every virtio device backend, in the guest-visible order (block,
/// net, vsock, rng), keeping a handle to each block device for the API.
type BlockHandles = HashMap<String, virtio::block::BlockHandle>;

/// Each device's workers get the seccomp filter of their kind from
/// `filters`, if any.
fn create_devices(
    cfg: &VmConfig,
    filters: Option<&seccomp::Filters>,
) -> Result<(Vec<Box<dyn VirtioDevice>>, BlockHandles), VmmError> {
    let mut devices: Vec<(Box<dyn VirtioDevice>, ThreadKind)> = Vec::new();
    let mut blocks = HashMap::new();
    for b in &cfg.block {
        let serial = b.serial.as_deref().unwrap_or(&b.id);
        let dev = virtio::block::Block::new(&b.id, b.path.as_deref(), b.read_only, Some(serial))
            .map_err(|e| VmmError::Block(b.id.clone(), e))?;
        blocks.insert(b.id.clone(), dev.handle());
        devices.push((Box::new(dev), ThreadKind::Block));
    }
    for n in &cfg.net {
        let tap = match (&n.tap, n.tap_fd) {
            (Some(name), _) => virtio::net::TapSource::Name(name.clone()),
            (None, Some(fd)) => virtio::net::TapSource::Fd(fd),
            (None, None) => unreachable!("validated: a net device has a tap or a tap_fd"),
        };
        let mac = n.mac.as_deref().map(moat_vmm_api::parse_mac).transpose()?;
        let dev = virtio::net::Net::new(virtio::net::NetConfig {
            id: n.id.clone(),
            tap,
            mac,
        })
        .map_err(|e| VmmError::Net(n.id.clone(), e))?;
        devices.push((Box::new(dev), ThreadKind::Net));
    }
    if let Some(v) = &cfg.vsock {
        let dev =
            virtio::vsock::Vsock::new(v.guest_cid, v.uds_path.clone()).map_err(VmmError::Vsock)?;
        devices.push((Box::new(dev), ThreadKind::Vsock));
    }
    if cfg.rng {
        devices.push((Box::new(virtio::rng::Rng::new()), ThreadKind::Rng));
    }
    let devices = devices
        .into_iter()
        .map(|(mut dev, kind)| {
            if let Some(filters) = filters {
                dev.set_seccomp_filter(filters.get(kind));
            }
            dev
        })
        .collect();
    Ok((devices, blocks))
}

/// The kernel command line: console, reset method, host needs, devices,
/// then the user's words (last, so they can override).
fn kernel_cmdline(cfg: &VmConfig, host: crate::host::HostKind, num_devices: u32) -> String {
    // Resets go through the i8042 (which the VMM sees); a panic marks its
    // reset warm (see `RESET_MODE_ADDR`).
    let mut words = vec![
        "console=ttyS0".to_string(),
        "reboot=k".into(),
        "reboot=panic_warm".into(),
    ];
    words.extend(host.kernel_args().split_whitespace().map(String::from));
    for i in 0..num_devices {
        words.push(format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            virtio_mmio_base(i),
            IRQ_BASE + i
        ));
    }
    if !cfg.cmdline.trim().is_empty() {
        words.push(cfg.cmdline.trim().to_string());
    }
    words.join(" ")
}

/// What the API thread acts on.
struct Controller {
    vcpus: Arc<Vcpus>,
    i8042: Arc<Mutex<I8042>>,
    blocks: BlockHandles,
    boot_time_us: Arc<Mutex<Option<u64>>>,
    /// What a snapshot saves besides the vCPUs.
    template: TemplateParts,
    /// Set once the VM was saved: its devices are stopped for good.
    saved: Mutex<bool>,
}

/// The parts of a VM that `PUT /vm/snapshot` saves besides the vCPUs.
struct TemplateParts {
    vm: Arc<Vm>,
    shape: Shape,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice>>,
}

impl TemplateParts {
    /// Saves the paused VM in `vcpus` to `file`. Device workers are stopped
    /// first, so guest memory is still when it is written.
    fn save(&self, vcpus: &Vcpus, file: &File) -> Result<(), ApiError> {
        let internal = |e: &dyn std::error::Error| ApiError::Internal(moat_crash::error_chain(e));
        let vcpu_states = vcpus.save().map_err(|e| internal(&e))?;
        let vm = KvmVmState::save(&self.vm.fd).map_err(|e| internal(&e))?;
        let transports = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save())
            .collect();
        let saved = SavedVm {
            shape: self.shape.clone(),
            vm,
            vcpus: vcpu_states,
            transports,
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
        };
        crate::snapshot::write(file, &saved, &self.vm.mem).map_err(|e| internal(&e))
    }
}

impl VmControl for Controller {
    fn state(&self) -> VmInfo {
        let state = if self.vcpus.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        };
        VmInfo {
            state,
            boot_time_us: *self.boot_time_us.lock().unwrap(),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.vcpus.pause();
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        if *self.saved.lock().unwrap() {
            return Err(ApiError::Conflict(
                "The VM was saved as a template and its devices are stopped: shut it down".into(),
            ));
        }
        self.vcpus.resume();
        Ok(())
    }

    fn snapshot(&self, file: File) -> Result<(), ApiError> {
        let mut saved = self.saved.lock().unwrap();
        if *saved {
            return Err(ApiError::Conflict("The VM was saved already".into()));
        }
        if !self.vcpus.is_paused() {
            return Err(ApiError::Conflict("Pause the VM before saving it".into()));
        }
        *saved = true;
        let started = Instant::now();
        self.template.save(&self.vcpus, &file)?;
        log::info!(
            "VM saved as a template in {} ms",
            started.elapsed().as_millis()
        );
        Ok(())
    }

    fn shutdown(&self, timeout: Duration) -> Result<(), ApiError> {
        let control = self.vcpus.control();
        if !self.vcpus.is_paused() {
            self.i8042
                .lock()
                .unwrap()
                .send_ctrl_alt_del()
                .map_err(|e| ApiError::Internal(format!("Cannot signal the guest: {e}")))?;
            let deadline = Instant::now() + timeout;
            while control.exit_code().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if control.exit_code().is_none() {
            log::info!("Guest did not stop within {timeout:?}: stopping it");
        }
        control.request_exit(ExitCode::Ok);
        Ok(())
    }

    fn replace_block(
        &self,
        id: &str,
        source: BlockSource,
        read_only: bool,
    ) -> Result<(), ApiError> {
        let handle = self
            .blocks
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("No block device {id:?}")))?;
        handle
            .replace_backing(source, read_only)
            .map_err(|e| ApiError::BadRequest(moat_crash::error_chain(&e)))
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP (inherited by every thread started
/// later) and returns a signalfd for them, so the main loop can stop the VM
/// cleanly instead of dying with sockets left behind.
fn termination_signalfd() -> Result<File, VmmError> {
    // SAFETY: sigset manipulation on a local, zero-initialised set, then a
    // mask change of this thread and a new signalfd that we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(VmmError::EventFd(std::io::Error::last_os_error()));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(VmmError::EventFd(std::io::Error::last_os_error()));
        }
        Ok(File::from_raw_fd(fd))
    }
}

/// Boots the VM described by `cfg` (or restores it from `cfg.restore`)
/// and runs it until the guest stops.
pub fn run(cfg: VmConfig, start: Instant) -> Result<ExitCode, VmmError> {
    cfg.validate(host_memory_mib())?;
    let template = match &cfg.restore {
        Some(path) => {
            let template = Template::open(path)?;
            template.check_shape(&cfg)?;
            Some(template)
        }
        None => None,
    };
    let serial_out = serial_output(&cfg.serial, cfg.log_max_bytes)?;
    crate::logger::cap_stderr_file(cfg.log_max_bytes).map_err(VmmError::LogFile)?;
    let filters = if cfg.seccomp {
        Some(seccomp::Filters::build()?)
    } else {
        None
    };
    let (devices, blocks) = create_devices(&cfg, filters.as_ref())?;

    let regions = boot::memory_regions(cfg.memory_mib << 20);
    let kvm = Path::new("/dev/kvm");
    let vm = Arc::new(match &template {
        Some(t) => Vm::with_memory(kvm, t.map_memory(&regions)?, cfg.vcpus)?,
        None => Vm::new(kvm, &regions, cfg.vcpus)?,
    });
    let entry = match &template {
        Some(_) => None,
        None => Some(load_guest(&cfg, &vm, devices.len() as u32)?),
    };

    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let serial_state = template.as_ref().map(|t| &t.saved.serial);
    let legacy = attach_legacy_devices(&vm, &mut pio, serial_out, serial_state, start)?;
    let activate_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    let transports = attach_devices(&vm, &mut mmio, devices, &activate_evt)?;

    let signals = termination_signalfd()?;
    let api_listener = match &cfg.api_socket {
        Some(path) => Some((path.clone(), ApiServer::bind(path)?)),
        None => None,
    };

    // Everything the VM needs is open: no capability is needed from here on.
    crate::privileges::drop_privileges(cfg.jail.as_ref())?;
    // A restored device starts its worker at once: only now, so that no
    // thread keeps a capability.
    let how = match (&template, entry) {
        (Some(t), _) => {
            restore_state(&vm, t, &transports)?;
            VcpuStart::Restore(&t.saved.vcpus)
        }
        (None, Some(entry)) => VcpuStart::Boot(entry),
        (None, None) => unreachable!("a VM without a template loads its kernel"),
    };
    let vcpus = Arc::new(Vcpus::start(
        &vm,
        cfg.vcpus,
        how,
        pio,
        mmio,
        filters.as_ref().map(|f| f.get(ThreadKind::Vcpu)),
    )?);
    drop(template);
    log::info!("Guest started after {} us", start.elapsed().as_micros());

    let ctl = Controller {
        vcpus: vcpus.clone(),
        i8042: legacy.i8042,
        blocks,
        boot_time_us: legacy.boot_time_us,
        template: TemplateParts {
            vm: vm.clone(),
            shape: Shape::of(&cfg),
            transports: transports.clone(),
            serial: legacy.serial,
        },
        saved: Mutex::new(false),
    };
    let api = start_api(api_listener, ctl, filters.as_ref())?;
    if let Some(f) = &filters {
        seccomp::apply(&f.get(ThreadKind::Main))?;
    }
    moat_crash::crash_point("vmm-main-filtered");

    let events = EventLoop {
        vcpus: &vcpus,
        mem: &vm.mem,
        reset_evt: legacy.reset_evt,
        signals,
        activate_evt,
        transports,
    };
    let code = events.run();
    vcpus.stop();
    // The API thread ends first, so that the devices it can reach are
    // dropped here, under this thread's filter, with the event loop's
    // (the buses' were in the vCPU threads, now joined): their workers are
    // joined and their sockets removed.
    drop(api);
    drop(events);
    log::info!(
        "VM stopped after {} ms with exit code {}",
        start.elapsed().as_millis(),
        code as i32
    );
    Ok(code)
}

/// Loads the kernel, initramfs, boot parameters and MP table of a fresh
/// boot; returns the kernel's entry point.
fn load_guest(
    cfg: &VmConfig,
    vm: &Vm,
    num_devices: u32,
) -> Result<crate::arch::regs::EntryPoint, VmmError> {
    let kernel = boot::load_kernel(&vm.mem, &cfg.kernel)?;
    let initramfs = match &cfg.initramfs {
        Some(path) => Some(boot::load_initramfs(&vm.mem, path, &kernel)?),
        None => None,
    };
    let cmdline = kernel_cmdline(cfg, vm.host, num_devices);
    log::debug!("Kernel command line: {cmdline}");
    boot::write_boot_params(&vm.mem, &kernel, &cmdline, initramfs)?;
    mptable::setup_mptable(&vm.mem, cfg.vcpus)?;
    Ok(kernel.entry)
}

/// Writes a template's interrupt controllers, clock and devices into the
/// new VM; the vCPUs follow in [`Vcpus::start`].
fn restore_state(
    vm: &Vm,
    template: &Template,
    transports: &[Arc<Mutex<MmioTransport>>],
) -> Result<(), VmmError> {
    let saved = &template.saved;
    saved.vm.restore(&vm.fd).map_err(VmmError::RestoreKvm)?;
    if saved.transports.len() != transports.len() {
        return Err(VmmError::RestoreDeviceCount(
            saved.transports.len(),
            transports.len(),
        ));
    }
    for (index, (transport, state)) in transports.iter().zip(&saved.transports).enumerate() {
        transport
            .lock()
            .unwrap()
            .restore(state)
            .map_err(|e| VmmError::RestoreDevice(index, e))?;
    }
    Ok(())
}

/// Starts the API thread on `listener` (bound to its path), if any.
fn start_api(
    listener: Option<(PathBuf, UnixListener)>,
    ctl: Controller,
    filters: Option<&seccomp::Filters>,
) -> Result<Option<ApiServer>, VmmError> {
    let Some((path, listener)) = listener else {
        return Ok(None);
    };
    let filter = filters.map(|f| f.get(ThreadKind::Api));
    Ok(Some(ApiServer::start(
        &path,
        listener,
        Arc::new(ctl),
        filter,
    )?))
}

/// The port-I/O devices, as the rest of the VMM sees them.
struct Legacy {
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    /// Written when the guest resets the machine through the i8042.
    reset_evt: EventFd,
    /// When the guest wrote the boot timer.
    boot_time_us: Arc<Mutex<Option<u64>>>,
}

/// Puts the serial port (writing to `serial_out`, with a template's
/// registers if given), the i8042 and the boot timer (counting from
/// `start`) on `pio`, their interrupts wired to KVM.
fn attach_legacy_devices(
    vm: &Vm,
    pio: &mut Bus,
    serial_out: Box<dyn Write + Send>,
    serial_state: Option<&SerialState>,
    start: Instant,
) -> Result<Legacy, VmmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial = Arc::new(Mutex::new(match serial_state {
        Some(state) => SerialDevice::from_state(state, serial_irq, serial_out),
        None => SerialDevice::new(serial_irq, serial_out),
    }));
    pio.insert(serial.clone(), SERIAL_PORT, 8)?;
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&kbd_irq, 1)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        reset_evt.try_clone().map_err(VmmError::EventFd)?,
        kbd_irq,
    )));
    pio.insert(i8042.clone(), I8042_PORT, 5)?;
    let timer = BootTimer::new(start);
    let boot_time_us = timer.elapsed_handle();
    pio.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_PORT, 1)?;
    Ok(Legacy {
        serial,
        i8042,
        reset_evt,
        boot_time_us,
    })
}

/// Puts each device behind a virtio-mmio transport on `mmio`, with its
/// interrupt and queue notifications wired to KVM; DRIVER_OK writes go to
/// `activate_evt`. Returns the transports, for the event thread.
fn attach_devices(
    vm: &Vm,
    mmio: &mut Bus,
    devices: Vec<Box<dyn VirtioDevice>>,
    activate_evt: &EventFd,
) -> Result<Vec<Arc<Mutex<MmioTransport>>>, VmmError> {
    let mut transports = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let index = index as u32;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&irq, IRQ_BASE + index)?;
        let base = virtio_mmio_base(index);
        let activate = activate_evt.try_clone().map_err(VmmError::EventFd)?;
        let transport = MmioTransport::new(device, vm.mem.clone(), irq, activate)
            .map_err(VmmError::Transport)?;
        for (queue, evt) in transport.queue_notify_eventfds().iter().enumerate() {
            vm.register_ioevent(evt, base + virtio::mmio::NOTIFY_REG_OFFSET, queue as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        transports.push(transport);
    }
    Ok(transports)
}

/// The event thread (the main thread once the guest runs): activates
/// devices when their driver sets DRIVER_OK, and waits for a reason to stop.
struct EventLoop<'a> {
    vcpus: &'a Vcpus,
    mem: &'a virtio::GuestMemory,
    /// Written by the i8042 when the guest resets the machine.
    reset_evt: EventFd,
    /// SIGTERM, SIGINT, SIGHUP.
    signals: File,
    /// Written by a transport on DRIVER_OK.
    activate_evt: EventFd,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl EventLoop<'_> {
    /// Runs until the VM is to stop; why.
    fn run(&self) -> ExitCode {
        let control = self.vcpus.control();
        let fds = [
            control.exit_evt().as_raw_fd(),
            self.reset_evt.as_raw_fd(),
            self.signals.as_raw_fd(),
            self.activate_evt.as_raw_fd(),
        ];
        loop {
            let mut pfds = fds.map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: `pfds` is a valid array of pollfd for the call.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as _, -1) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("Main loop poll failed: {err}");
                return ExitCode::Internal;
            }
            if pfds[3].revents != 0 {
                self.activate_devices();
            }
            if pfds[1].revents != 0 {
                control.request_exit(self.reset_reason());
            }
            if pfds[2].revents != 0 {
                log::info!("Termination signal: stopping the VM");
                control.request_exit(ExitCode::Ok);
            }
            if let Some(code) = control.exit_code() {
                return ExitCode::from_code(code);
            }
            let _ = control.exit_evt().read();
        }
    }

    /// Activates every device whose driver set DRIVER_OK.
    fn activate_devices(&self) {
        let _ = self.activate_evt.read();
        for transport in &self.transports {
            transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .activate_pending();
        }
    }

    /// Why the guest reset the machine: a kernel panic marks its reset warm.
    fn reset_reason(&self) -> ExitCode {
        let mode: u16 = self
            .mem
            .read_obj(GuestAddress(RESET_MODE_ADDR))
            .map(u16::from_le)
            .unwrap_or(0);
        if mode == WARM_RESET_MARK {
            log::error!("Guest kernel panicked and reset the machine: stopping the VM");
            ExitCode::GuestPanic
        } else {
            log::info!("Guest reset the machine (i8042)");
            ExitCode::Ok
        }
    }
}
