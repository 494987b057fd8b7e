//! The errors of pod operations. The task layer maps each kind to one
//! ttrpc code (`task::status`).

use std::time::Duration;

use moat_protocol::ttrpc::{self, Code};
use thiserror::Error;

/// Why a pod operation failed.
#[derive(Debug, Error)]
pub enum PodError {
    /// The request itself is wrong (a bad spec, signal or annotation).
    #[error("{0}")]
    InvalidArgument(String),
    /// The named container, exec or process does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The named container or exec exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The operation does not fit the current state (e.g. start twice).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A feature moat does not offer.
    #[error("{0} is not supported by moat")]
    Unimplemented(&'static str),
    /// A limit is reached (e.g. no block slot left in the VM).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A host-side failure (files, the VM) not caused by the request.
    #[error("{0}")]
    Internal(String),
    /// The agent answered with an error status, whose code is kept.
    #[error("{what}: guest agent: {message}")]
    Agent {
        /// The operation that called the agent.
        what: &'static str,
        /// The agent's ttrpc status code.
        code: Code,
        /// The agent's error message.
        message: String,
    },
    /// The agent could not be reached (the VM is gone, a broken connection).
    #[error("{what}: guest agent: {message}")]
    AgentGone {
        /// The operation that called the agent.
        what: &'static str,
        /// The transport's error.
        message: String,
    },
    /// The agent did not answer within the configured deadline.
    #[error(
        "{what}: the guest agent did not answer within {timeout:?} ({setting} in the moat config)"
    )]
    Timeout {
        /// The operation that called the agent.
        what: &'static str,
        /// The deadline that passed.
        timeout: Duration,
        /// The configuration key that sets it.
        setting: &'static str,
    },
}

/// The result of a pod operation.
pub type PodResult<T> = Result<T, PodError>;

impl PodError {
    /// Classifies an agent call's error; `elapsed` tells a timeout apart
    /// from other transport errors (ttrpc reports both as text).
    pub fn agent(
        what: &'static str,
        e: ttrpc::Error,
        elapsed: Duration,
        timeout: Duration,
        setting: &'static str,
    ) -> PodError {
        match e {
            ttrpc::Error::RpcStatus(s) => PodError::Agent {
                what,
                code: s.code(),
                message: s.message().to_owned(),
            },
            _ if elapsed >= timeout => PodError::Timeout {
                what,
                timeout,
                setting,
            },
            other => PodError::AgentGone {
                what,
                message: other.to_string(),
            },
        }
    }
}
