//! The Task service's errors and the one place they become ttrpc status codes.
//!
//! containerd and kubelet act on the codes (a `NotFound` on Kill or Delete is "already
//! gone", `AlreadyExists` on Create is a retry of a duplicate), so each error keeps its kind;
//! the message is the whole error chain, printed once.

use crate::agent::AgentError;
use crate::config::ConfigError;
use crate::io::IoError;
use crate::mount::MountError;
use crate::sandbox::SandboxError;
use crate::spec::SpecError;

/// Errors of the Task service.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such container or process
    #[error("{0} not found")]
    NotFound(String),
    /// The id is taken
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request does not fit the current state
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request is malformed
    #[error("{0}")]
    InvalidArgument(String),
    /// husk does not implement this call
    #[error("{0} is not implemented by husk")]
    Unimplemented(&'static str),
    /// The configuration cannot be used
    #[error("Configuration error")]
    Config(#[from] ConfigError),
    /// The container's spec cannot be used
    #[error("Invalid container spec")]
    Spec(#[from] SpecError),
    /// The pod's VM failed
    #[error("Pod VM failure")]
    Sandbox(#[from] SandboxError),
    /// A host mount failed
    #[error("Mount failure")]
    Mount(#[from] MountError),
    /// The stdio relay failed
    #[error("stdio failure")]
    Io(#[from] IoError),
    /// The guest agent refused or failed a request
    #[error("Guest agent error")]
    Agent(#[from] AgentError),
    /// A host file operation failed
    #[error("{what}")]
    Host {
        /// What was attempted.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl TaskError {
    /// The ttrpc code containerd sees.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            Self::NotFound(_) => Code::NOT_FOUND,
            Self::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Self::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Self::InvalidArgument(_) | Self::Spec(_) => Code::INVALID_ARGUMENT,
            Self::Unimplemented(_) => Code::UNIMPLEMENTED,
            Self::Config(ConfigError::Options { .. }) => Code::INVALID_ARGUMENT,
            Self::Config(_) => Code::FAILED_PRECONDITION,
            Self::Io(IoError::Unsupported(_)) => Code::INVALID_ARGUMENT,
            Self::Io(IoError::Open { .. }) => Code::INVALID_ARGUMENT,
            Self::Agent(AgentError::Status { code, .. }) => guest_code(*code),
            Self::Agent(AgentError::Timeout { .. }) => Code::DEADLINE_EXCEEDED,
            Self::Agent(_) => Code::UNAVAILABLE,
            Self::Sandbox(SandboxError::Exists(_)) => Code::ALREADY_EXISTS,
            Self::Sandbox(SandboxError::Invalid(_)) => Code::INVALID_ARGUMENT,
            Self::Sandbox(SandboxError::Agent(AgentError::Status { code, .. })) => {
                guest_code(*code)
            }
            Self::Io(IoError::Stream { .. }) | Self::Sandbox(_) => Code::UNAVAILABLE,
            Self::Mount(_) | Self::Host { .. } => Code::INTERNAL,
        }
    }

    /// The message: this error and its sources, joined with `: `.
    pub fn message(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        msg
    }
}

/// The code containerd sees for a code the guest agent answered. The guest is not trusted to
/// speak for host state: codes that containerd and kubelet act on as facts (`NOT_FOUND` is
/// "the task is gone", `ALREADY_EXISTS` "a duplicate create succeeded", `UNAVAILABLE` "the
/// shim is gone") come only from the shim's own bookkeeping, which it checks before asking
/// the guest. The guest's other refusals of a request keep their code; the rest become
/// `INTERNAL` (the message still names the guest's code).
fn guest_code(code: ttrpc::Code) -> ttrpc::Code {
    use ttrpc::Code;
    match code {
        Code::INVALID_ARGUMENT
        | Code::FAILED_PRECONDITION
        | Code::UNIMPLEMENTED
        | Code::RESOURCE_EXHAUSTED
        | Code::OUT_OF_RANGE
        | Code::PERMISSION_DENIED
        | Code::DEADLINE_EXCEEDED => code,
        _ => Code::INTERNAL,
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.message()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn status(e: TaskError) -> (ttrpc::Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn kinds_keep_their_codes() {
        use ttrpc::Code;
        assert_eq!(
            status(TaskError::NotFound("container c1".into())).0,
            Code::NOT_FOUND
        );
        assert_eq!(
            status(TaskError::AlreadyExists("container c1".into())).0,
            Code::ALREADY_EXISTS
        );
        assert_eq!(
            status(TaskError::FailedPrecondition("running".into())).0,
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            status(TaskError::InvalidArgument("bad".into())).0,
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            status(TaskError::Unimplemented("Checkpoint")).0,
            Code::UNIMPLEMENTED
        );
        let spec = TaskError::Spec(SpecError::MountSource("x".into()));
        assert_eq!(status(spec).0, Code::INVALID_ARGUMENT);
        let sandbox = TaskError::Sandbox(SandboxError::Exists(PathBuf::from("/run/husk/p")));
        assert_eq!(status(sandbox).0, Code::ALREADY_EXISTS);
    }

    /// S7: the guest cannot make containerd believe a task is gone or a create succeeded.
    #[test]
    fn the_guest_does_not_pick_the_codes_containerd_acts_on() {
        use ttrpc::Code;
        for (guest, seen) in [
            (Code::NOT_FOUND, Code::INTERNAL),
            (Code::ALREADY_EXISTS, Code::INTERNAL),
            (Code::UNAVAILABLE, Code::INTERNAL),
            (Code::OK, Code::INTERNAL),
            (Code::FAILED_PRECONDITION, Code::FAILED_PRECONDITION),
            (Code::INVALID_ARGUMENT, Code::INVALID_ARGUMENT),
        ] {
            let status_of = |code| AgentError::Status {
                method: "Agent.SignalProcess",
                code,
                message: "\"no\"".into(),
            };
            let (code, message) = status(TaskError::Agent(status_of(guest)));
            assert_eq!(code, seen, "{guest:?}");
            assert!(message.contains(&format!("{guest:?}")), "{message}");
            let at_boot = TaskError::Sandbox(SandboxError::Agent(status_of(guest)));
            assert_eq!(status(at_boot).0, seen, "{guest:?} at boot");
        }
        let timeout = TaskError::Agent(AgentError::Timeout {
            method: "Agent.StartContainer",
            timeout: std::time::Duration::from_secs(1),
        });
        assert_eq!(status(timeout).0, Code::DEADLINE_EXCEEDED);
    }

    #[test]
    fn the_message_carries_the_chain_once() {
        let e = TaskError::Config(ConfigError::Read {
            path: "/etc/husk/husk.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        let (code, msg) = status(e);
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        assert!(
            msg.starts_with(
                "Configuration error: Cannot read the husk configuration /etc/husk/husk.toml: "
            ),
            "{msg}"
        );
        assert_eq!(msg.matches("husk.toml").count(), 1);
    }
}
