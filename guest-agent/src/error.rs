//! The agent's error type and its mapping onto ttrpc status codes.

use std::io;

use thiserror::Error;
use ttrpc::Code;

/// Every failure a request can end in. Messages are shown to the host.
#[derive(Debug, Error)]
pub enum AgentError {
    /// A request field is malformed (bad id, path, size...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The OCI spec or process JSON is malformed or asks for something the
    /// agent refuses.
    #[error("invalid OCI spec: {0}")]
    InvalidSpec(String),
    /// No container has this id.
    #[error("container {0:?} not found")]
    ContainerNotFound(String),
    /// The container exists but has no process with this exec id.
    #[error("process {exec_id:?} of container {container_id:?} not found")]
    ProcessNotFound {
        /// The container searched.
        container_id: String,
        /// The exec id not found in it.
        exec_id: String,
    },
    /// A container with this id already exists.
    #[error("container {0:?} already exists")]
    ContainerExists(String),
    /// The container already has a process with this exec id.
    #[error("process {0:?} already exists")]
    ProcessExists(String),
    /// The call is valid but not in the container's or process's current
    /// state (e.g. start twice, resize without a terminal).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A path would resolve outside the root it must stay in.
    #[error("path {0:?} escapes its root")]
    PathEscape(String),
    /// An input (named first) is over its size limit in bytes (second).
    #[error("{0} is larger than the limit of {1} bytes")]
    TooLarge(&'static str, usize),
    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The request asks for something this agent does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A system call failed while doing what `context` says.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "mounting /dev/vdb on /run/c1".
        context: String,
        /// The failed call's error.
        #[source]
        source: io::Error,
    },
    /// A container process failed during its setup, before exec; holds the
    /// child's own message.
    #[error("starting the process failed: {0}")]
    Spawn(String),
}

/// The result of an agent operation.
pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    /// The ttrpc status code the host receives for this error.
    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidArgument(_)
            | AgentError::InvalidSpec(_)
            | AgentError::PathEscape(_)
            | AgentError::TooLarge(..) => Code::INVALID_ARGUMENT,
            AgentError::ContainerNotFound(_) | AgentError::ProcessNotFound { .. } => {
                Code::NOT_FOUND
            }
            AgentError::ContainerExists(_) | AgentError::ProcessExists(_) => Code::ALREADY_EXISTS,
            AgentError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            AgentError::Timeout(_) => Code::DEADLINE_EXCEEDED,
            AgentError::Unsupported(_) => Code::UNIMPLEMENTED,
            AgentError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                Code::NOT_FOUND
            }
            AgentError::Io { .. } | AgentError::Spawn(_) => Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Adds "what was being done" to an I/O error.
pub trait IoContext<T> {
    /// Turns an error into [`AgentError::Io`] with the text `context()`
    /// (evaluated only on error).
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| AgentError::Io {
            context: context(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| AgentError::Io {
            context: context(),
            source: io::Error::from(errno),
        })
    }
}
