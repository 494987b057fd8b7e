//! containerd-shim-moat-v1: the containerd shim v2 of moat, which runs each
//! pod in its own KVM microVM.
//!
//! Actions: `start` (spawn or reuse the pod's shim daemon, print its ttrpc
//! address), `delete` (clean up after a dead shim), `-info`, the daemon
//! itself, and `fs-serve` (one shared directory's server: `share`). The bootstrap is our own rather than `containerd_shim::run`
//! because the daemon serves the task API under both its v2 name (containerd
//! 1.6/1.7) and its v3 name (containerd 2.x), and `start` must answer each
//! containerd in the format it reads.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::bootstrap::{BootstrapParams, BootstrapResult};
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim::shim_ttrpc::create_task;
use containerd_shim::protos::ttrpc;
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use containerd_shim::{DeleteResponse, ExitSignal, Flags};
use thiserror::Error;

use containerd_shim_moat_v1::config::Config;
use containerd_shim_moat_v1::{annotations, daemon_socket, events, pod, sandbox, share, task};

const RUNTIME_ID: &str = "io.containerd.moat.v1";
const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";
const TASK_V3: &str = "/containerd.task.v3.Task/";
const TASK_V2: &str = "/containerd.task.v2.Task/";
/// The FIFO in the bundle that containerd reads the shim's log from (the
/// one `containerd_shim::logger` writes to).
const LOG_FIFO: &str = "log";

#[derive(Debug, Error)]
enum ShimError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("shim daemon failed to start: {0}")]
    Daemon(String),
    #[error("ttrpc: {0}")]
    Ttrpc(#[from] ttrpc::Error),
    #[error("protobuf: {0}")]
    Protobuf(#[from] containerd_shim::protos::protobuf::Error),
    #[error("cannot connect to containerd's event service: {0}")]
    Publisher(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Io { what, source }
}

fn main() {
    // containerd reads `start`'s and `delete`'s stderr; the daemon points
    // its own at containerd's log (`log_to_containerd`).
    moat_crash::install("containerd-shim-moat-v1");
    let args: Vec<_> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == share::SUBCOMMAND) {
        std::process::exit(share::server::main(&args[2..]));
    }
    let result = containerd_shim::parse(&args[1..])
        .map_err(|e| ShimError::Args(e.to_string()))
        .and_then(|flags| {
            if flags.version {
                println!(
                    "{RUNTIME_ID} (containerd-shim-moat-v1) {}",
                    env!("CARGO_PKG_VERSION")
                );
                return Ok(());
            }
            if flags.info {
                return info();
            }
            match flags.action.as_str() {
                "start" => start(&flags),
                "delete" => delete(&flags),
                "" => serve(&flags),
                other => Err(ShimError::Args(format!("unknown action {other:?}"))),
            }
        });
    if let Err(e) = result {
        eprintln!("{RUNTIME_ID}: {e}");
        std::process::exit(1);
    }
}

/// Reads what containerd piped in, if anything.
fn read_stdin() -> Vec<u8> {
    let mut input = Vec::new();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let _ = stdin.lock().take(10 << 20).read_to_end(&mut input);
    }
    input
}

/// `-info`: moat's own runtime description.
fn info() -> Result<(), ShimError> {
    let _ = read_stdin();
    let info = RuntimeInfo {
        name: RUNTIME_ID.to_owned(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            revision: String::new(),
            ..Default::default()
        }),
        annotations: HashMap::from([("io.moat.isolation".to_owned(), "kvm-microvm".to_owned())]),
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&info.write_to_bytes()?)
        .and_then(|()| out.flush())
        .map_err(io_err("write runtime info"))
}

/// The pod this container belongs to, from the bundle in the working directory.
fn grouping_of_cwd(id: &str) -> String {
    let ann = oci_spec::runtime::Spec::load("config.json")
        .ok()
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default();
    annotations::grouping(&ann, id)
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// `start`: starts the pod's shim daemon unless it runs already, and prints
/// the address containerd should connect to.
fn start(flags: &Flags) -> Result<(), ShimError> {
    let input = read_stdin();
    // containerd 2.3+ passes its parameters as protobuf on stdin and wants a
    // protobuf answer; older ones pass flags and environment and read a
    // plain address (which containerd 2.0-2.2 take as task API v2, served too).
    let bootstrap = BootstrapParams::parse_from_bytes(&input)
        .ok()
        .filter(|p| p.instance_id == flags.id && p.namespace == flags.namespace);
    let ttrpc_address = match &bootstrap {
        Some(p) => p.containerd_ttrpc_address.clone(),
        None => std::env::var(TTRPC_ADDRESS).unwrap_or_default(),
    };
    if ttrpc_address.is_empty() {
        return Err(ShimError::Args(format!("{TTRPC_ADDRESS} is not set")));
    }
    let grouping = grouping_of_cwd(&flags.id);
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &grouping);
    let path = Path::new(socket_path(&address)).to_owned();

    if !daemon_socket::alive(&path) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        }
        let exe = std::env::current_exe().map_err(io_err("find the shim binary"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["-namespace", &flags.namespace, "-id", &flags.id])
            .args(["-address", &flags.address, "-socket", &address])
            .env(TTRPC_ADDRESS, &ttrpc_address)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if flags.debug {
            cmd.arg("-debug");
        }
        // SAFETY: setsid is async-signal-safe; it detaches the daemon from
        // containerd's process group and session.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_err("spawn the shim daemon"))?;
        // The daemon closes its stdout once it serves; before that it
        // writes nothing there but a fatal error.
        let mut report = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut report);
        }
        if !daemon_socket::alive(&path) {
            let status = child.try_wait().ok().flatten();
            let report = report.trim();
            return Err(ShimError::Daemon(if report.is_empty() {
                format!("it exited ({status:?}) without serving {address}")
            } else {
                report.to_owned()
            }));
        }
        // The daemon lives on; it is reparented when this process exits.
        std::mem::forget(child);
    }
    let _ = std::fs::write("address", &address);

    let reply = match bootstrap {
        Some(_) => BootstrapResult {
            version: containerd_shim::protos::TASK_API_VERSION,
            address: address.clone(),
            protocol: "ttrpc".to_owned(),
            ..Default::default()
        }
        .write_to_bytes()?,
        None => address.into_bytes(),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&reply)
        .and_then(|()| out.flush())
        .map_err(io_err("write the shim address"))
}

/// `delete`: cleans up after a shim that is gone, then reports the task as killed.
fn delete(flags: &Flags) -> Result<(), ShimError> {
    let cfg = Config::load().unwrap_or_default();
    let grouping = grouping_of_cwd(&flags.id);
    // containerd also runs `delete` when its connection for one container
    // of a pod closes; while the pod's daemon still serves, the VM and the
    // other containers' files are its own.
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &grouping);
    let path = Path::new(socket_path(&address));
    if !daemon_socket::alive(path) {
        sandbox::cleanup_dead(&cfg, &grouping, &flags.id);
        // A daemon killed by a signal left its socket file.
        daemon_socket::remove_if_dead(path);
    }
    // Nothing is mounted on the host, but a bundle may carry a leftover rootfs mount.
    let _ = nix::mount::umount2("rootfs", nix::mount::MntFlags::MNT_DETACH);
    let resp = DeleteResponse {
        pid: 0,
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: MessageField::some(events::timestamp(SystemTime::now())),
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    resp.write_to_writer(&mut out)?;
    out.flush().map_err(io_err("write the delete response"))
}

/// Stops writing to the `start` process's pipe, which tells it we serve.
fn close_stdout() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1 of valid descriptors; `null` is closed afterwards.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

/// Points stderr (`start` made it /dev/null) at the `log` FIFO in the
/// bundle, whose every byte containerd copies into its own log, so that a
/// panic's report and any stray stderr output reach a person.
fn log_to_containerd() {
    match std::fs::OpenOptions::new().write(true).open(LOG_FIFO) {
        // SAFETY: dup2 onto fd 2 of a valid descriptor; `fifo` is closed afterwards.
        Ok(fifo) => unsafe {
            libc::dup2(fifo.as_raw_fd(), libc::STDERR_FILENO);
        },
        Err(e) => log::warn!("stderr stays detached: opening {LOG_FIFO}: {e}"),
    }
}

/// The daemon: serves the task API until Shutdown.
fn serve(flags: &Flags) -> Result<(), ShimError> {
    let result = serve_inner(flags);
    if let Err(e) = &result {
        // The `start` process relays this to containerd.
        println!("{e}");
    }
    close_stdout();
    result
}

fn serve_inner(flags: &Flags) -> Result<(), ShimError> {
    if flags.socket.is_empty() || flags.namespace.is_empty() {
        return Err(ShimError::Args(
            "-socket and -namespace are required".into(),
        ));
    }
    if containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id).is_err() {
        // No log FIFO (started by hand): nothing to log to.
        log::set_max_level(log::LevelFilter::Off);
    } else {
        log_to_containerd();
    }
    moat_crash::crash_point("shim-serve");
    let path = Path::new(socket_path(&flags.socket)).to_owned();
    let Some(listener) =
        daemon_socket::claim(&path).map_err(io_err(format!("bind {}", path.display())))?
    else {
        return Ok(());
    };
    let ttrpc_address = std::env::var(TTRPC_ADDRESS).unwrap_or_default();
    let publisher = containerd_shim::publisher::RemotePublisher::new(&ttrpc_address)
        .map_err(|e| ShimError::Publisher(e.to_string()))?;
    let exit = Arc::new(ExitSignal::default());
    let cfg = Config::load().map_err(|e| e.to_string());
    if let Err(e) = &cfg {
        log::error!("{e}");
    }
    let events = Arc::new(events::Publisher::new(flags.namespace.clone(), publisher));
    let pod = cfg.map(|cfg| {
        let launcher = Box::new(pod::vm::SandboxLauncher);
        pod::Pod::new(cfg, &flags.namespace, events, launcher)
    });
    let task: Arc<dyn containerd_shim::Task + Send + Sync> =
        Arc::new(task::TaskService::new(pod, exit.clone()));
    let v3 = create_task(task.clone());
    let v2 = create_task(task)
        .into_iter()
        .map(|(k, v)| (k.replacen(TASK_V3, TASK_V2, 1), v))
        .collect();
    let mut server = ttrpc::Server::new()
        .add_listener(listener.into_raw_fd())?
        .register_service(v3)
        .register_service(v2);
    server.start()?;
    log::info!("moat shim serving {} for {}", flags.socket, flags.id);
    close_stdout();
    exit.wait();
    daemon_socket::release(&path);
    // Let the last reply (Shutdown) go out before the server stops.
    std::thread::sleep(Duration::from_millis(50));
    server.shutdown();
    Ok(())
}
