//! The errors of pod operations. The task layer maps each kind to one
//! ttrpc code (`task::status`).

use std::time::Duration;

use moat_protocol::ttrpc::{self, Code};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PodError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0} is not supported by moat")]
    Unimplemented(&'static str),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
    /// The agent answered with an error status, whose code is kept.
    #[error("{what}: guest agent: {message}")]
    Agent {
        what: &'static str,
        code: Code,
        message: String,
    },
    /// The agent could not be reached (the VM is gone, a broken connection).
    #[error("{what}: guest agent: {message}")]
    AgentGone { what: &'static str, message: String },
    #[error(
        "{what}: the guest agent did not answer within {timeout:?} ({setting} in the moat config)"
    )]
    Timeout {
        what: &'static str,
        timeout: Duration,
        setting: &'static str,
    },
}

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
