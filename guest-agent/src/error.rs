//! The agent's error type and its mapping onto ttrpc status codes.

use std::io;

use thiserror::Error;
use ttrpc::Code;

/// Every failure a request can end in. Messages are shown to the host.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid OCI spec: {0}")]
    InvalidSpec(String),
    #[error("container {0:?} not found")]
    ContainerNotFound(String),
    #[error("process {exec_id:?} of container {container_id:?} not found")]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("container {0:?} already exists")]
    ContainerExists(String),
    #[error("process {0:?} already exists")]
    ProcessExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("path {0:?} escapes its root")]
    PathEscape(String),
    #[error("{0} is larger than the limit of {1} bytes")]
    TooLarge(&'static str, usize),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("starting the process failed: {0}")]
    Spawn(String),
}

pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
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
