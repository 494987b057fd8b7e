//! The control API's resources and the JSON bodies of its requests and
//! responses (HTTP/1.1 on a unix socket; see `vmm/API.md`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `GET` the VM's [`VmInfo`].
pub const VM: &str = "/vm";
/// `PUT`: stop every vCPU.
pub const PAUSE: &str = "/vm/pause";
/// `PUT`: restart them.
pub const RESUME: &str = "/vm/resume";
/// `PUT`, with the template file passed open (read-write): save the paused
/// VM into it. The VM serves nothing afterwards; shut it down.
pub const SNAPSHOT: &str = "/vm/snapshot";
/// `PUT` a [`ShutdownRequest`]: stop the guest, then the process.
pub const SHUTDOWN: &str = "/vm/shutdown";
/// `PUT` a [`BlockRequest`] to `/block/<id>`: fill or replace block
/// device `<id>`.
pub const BLOCK_PREFIX: &str = "/block/";

/// The resource of block device `id`.
pub fn block_path(id: &str) -> String {
    format!("{BLOCK_PREFIX}{id}")
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are stopped (`PUT /vm/pause`).
    Paused,
}

/// The answer to `GET /vm` and to every successful `PUT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Whether the vCPUs run.
    pub state: VmState,
    /// Microseconds from moat-vmm's start to the guest's boot-timer
    /// write; None until the guest makes it.
    pub boot_time_us: Option<u64>,
}

/// The body of `PUT /vm/shutdown`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// How long to wait for the guest to stop before stopping it hard;
    /// None: [`ShutdownRequest::DEFAULT_TIMEOUT`]. At most
    /// [`ShutdownRequest::MAX_TIMEOUT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl ShutdownRequest {
    /// The wait when the request names none.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The longest wait a request may ask for: the API serves nothing else
    /// meanwhile.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

    /// The wait this request asks for; None if it is above
    /// [`ShutdownRequest::MAX_TIMEOUT`].
    pub fn timeout(&self) -> Option<Duration> {
        let timeout = self
            .timeout_ms
            .map_or(Self::DEFAULT_TIMEOUT, Duration::from_millis);
        (timeout <= Self::MAX_TIMEOUT).then_some(timeout)
    }
}

/// The body of `PUT /block/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRequest {
    /// The new backing file; None: the file is the one descriptor passed
    /// with the request (`SCM_RIGHTS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
}

/// The body of every `4xx` and `5xx` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, as a sentence.
    pub error: String,
}
