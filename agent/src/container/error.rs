//! The container API's error type and its mapping to ttrpc status codes.

use std::path::PathBuf;

use crate::cgroup;
use crate::process::ProcessError;
use crate::sandbox::SandboxError;
use crate::spec::SpecError;
use crate::stdio::StdioError;

/// Errors of the container API; [`ContainerError::code`] is the ttrpc status.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Invalid id
    #[error("Invalid {0} id {1:?}")]
    BadId(&'static str, String),
    /// There is no sandbox
    #[error("There is no sandbox (CreateSandbox first)")]
    NoSandbox,
    /// The sandbox exists already
    #[error("The sandbox exists already")]
    SandboxExists,
    /// Invalid sandbox request
    #[error("Invalid sandbox request")]
    SandboxRequest(#[source] SandboxError),
    /// Cannot set up the sandbox
    #[error("Cannot set up the sandbox")]
    Sandbox(#[source] SandboxError),
    /// The container exists already
    #[error("Container {0:?} exists already")]
    Exists(String),
    /// No such container
    #[error("No container {0:?}")]
    NoContainer(String),
    /// The process exists already
    #[error("Process {1:?} of container {0:?} exists already")]
    ProcessExists(String, String),
    /// No such process
    #[error("No process {1:?} in container {0:?}")]
    NoProcess(String, String),
    /// Invalid spec
    #[error("Invalid spec")]
    Spec(#[source] SpecError),
    /// Invalid seccomp profile
    #[error("Invalid seccomp profile")]
    Seccomp(#[source] crate::seccomp::SeccompError),
    /// Invalid resources
    #[error("Invalid resources JSON")]
    Resources(#[source] serde_json::Error),
    /// Invalid argument
    #[error("{0}")]
    Invalid(String),
    /// The container is not in a state that allows this
    #[error("Container {0:?} is {1}")]
    State(String, &'static str),
    /// The stdio streams were not attached
    #[error("The process's stdio streams were not attached")]
    Stdio(#[source] StdioError),
    /// Stdio plumbing failed
    #[error("Stdio plumbing failed")]
    Process(#[source] ProcessError),
    /// libcontainer failed
    #[error("libcontainer failed to {0}")]
    Youki(
        &'static str,
        #[source] libcontainer::error::LibcontainerError,
    ),
    /// libcontainer failed in the container helper
    #[error("libcontainer failed to {0}")]
    Helper(&'static str, #[source] super::helper::HelperError),
    /// The cgroup operation failed
    #[error("The cgroup operation failed: {0}")]
    Cgroup(String),
    /// Cannot read the cgroup
    #[error("Cannot read the container's cgroup")]
    CgroupRead(#[source] cgroup::CgroupError),
    /// Cannot write the bundle
    #[error("Cannot write the bundle {0}")]
    Bundle(PathBuf, #[source] std::io::Error),
    /// Cannot signal the process
    #[error("Cannot signal the process")]
    Signal(#[source] nix::Error),
    /// Cannot configure the container's network namespace
    #[error("Cannot configure the container's network namespace")]
    Network(#[source] crate::net::NetError),
}

impl ContainerError {
    /// The ttrpc status code the host sees.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            Self::BadId(..)
            | Self::SandboxRequest(_)
            | Self::Spec(_)
            | Self::Seccomp(_)
            | Self::Resources(_)
            | Self::Invalid(_) => Code::INVALID_ARGUMENT,
            Self::NoContainer(_) | Self::NoProcess(..) => Code::NOT_FOUND,
            Self::SandboxExists | Self::Exists(_) | Self::ProcessExists(..) => Code::ALREADY_EXISTS,
            Self::NoSandbox | Self::State(..) => Code::FAILED_PRECONDITION,
            Self::Stdio(_) => Code::DEADLINE_EXCEEDED,
            _ => Code::INTERNAL,
        }
    }
}

pub(super) type Result<T> = std::result::Result<T, ContainerError>;
