//! The host-side client of the in-guest agent (`agent.proto` over hybrid vsock).
//!
//! [`AgentClient::connect`] keeps trying until the agent answers a `Health.Check` or the
//! deadline passes: early on the VMM's socket may not exist yet, and until the agent listens
//! the VMM closes every connection after `CONNECT`. After that every RPC has a timeout, and
//! every reply, written by a guest we do not trust, is validated before it is returned.

mod containers;
mod endpoint;
mod handshake;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_agent_api::agent::{
    CheckRequest, GetGuestDetailsRequest, GetGuestDetailsResponse, ServingStatus, ShutdownRequest,
    VersionRequest, VersionResponse,
};
use husk_agent_api::agent_ttrpc;
use tracing::debug;

pub use containers::{
    open_stdio_stream, open_stdio_stream_at, open_stdio_stream_within, StdioStreamError,
    STDIO_OPEN_LIMIT, STDIO_VSOCK_PORT,
};
pub use endpoint::{GuestStream, VsockEndpoint};
pub use handshake::{parse_reply as parse_handshake_reply, HandshakeError};
pub use husk_agent_api::agent::{CreateSandboxRequest, ShareSource, StdioConfig};
pub use husk_agent_api::stdio::{StreamHeader, StreamKind};
/// The agent's guest port, for [`AgentClient::connect`].
pub use husk_agent_api::AGENT_VSOCK_PORT;

/// First pause between connection attempts; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(50);
/// Longest a guest-supplied string (version, kernel release, error message) may be.
const MAX_GUEST_STRING_LEN: usize = 256;
/// More CPUs than any husk guest can have (KVM's limit is lower).
const MAX_GUEST_CPUS: u32 = 4096;

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Cannot connect to the hybrid vsock socket
    #[error("Cannot connect to the hybrid vsock socket {path}")]
    Connect {
        /// The VMM's socket.
        path: PathBuf,
        /// The connect(2) error.
        #[source]
        source: std::io::Error,
    },
    /// Cannot connect to the guest over AF_VSOCK
    #[error("Cannot connect to guest CID {cid} port {port} over AF_VSOCK")]
    VsockConnect {
        /// The guest's context id.
        cid: u32,
        /// The guest port.
        port: u32,
        /// The connect(2) error.
        #[source]
        source: std::io::Error,
    },
    /// The hybrid vsock handshake failed
    #[error("The hybrid vsock handshake on {path} failed")]
    Handshake {
        /// The VMM's socket.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: HandshakeError,
    },
    /// The hybrid vsock handshake did not finish in time
    #[error("The hybrid vsock handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    /// The agent did not answer before the deadline
    #[error("The agent did not answer within {waited:?} ({attempts} attempts)")]
    Unreachable {
        /// Time spent trying.
        waited: Duration,
        /// Connection attempts made.
        attempts: u32,
        /// Why the last attempt failed (none if there was no time for one).
        #[source]
        last: Option<Box<AgentError>>,
    },
    /// An RPC timed out
    #[error("{method} timed out after {timeout:?}")]
    Timeout {
        /// The RPC.
        method: &'static str,
        /// The per-call timeout.
        timeout: Duration,
    },
    /// The agent answered with an error status
    #[error("{method} failed with {code:?}: {message}")]
    Status {
        /// The RPC.
        method: &'static str,
        /// The ttrpc status code.
        code: ttrpc::Code,
        /// The agent's message, quoted and bounded.
        message: String,
    },
    /// The connection to the agent failed
    #[error("{method} failed on the connection to the agent")]
    Transport {
        /// The RPC.
        method: &'static str,
        /// The ttrpc error.
        #[source]
        source: ttrpc::Error,
    },
    /// The agent is not serving
    #[error("The agent is not serving (status {0})")]
    NotServing(i32),
    /// The agent sent an invalid reply
    #[error("Invalid {method} reply from the agent: {reason}")]
    InvalidReply {
        /// The RPC.
        method: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl AgentError {
    /// Whether a new connection attempt may succeed (the guest or VMM is still starting).
    fn is_transient(&self) -> bool {
        match self {
            Self::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ),
            Self::VsockConnect { source, .. } => endpoint::vsock_connect_is_transient(source),
            Self::Handshake { source, .. } => source.is_transient(),
            Self::HandshakeTimeout(_)
            | Self::Timeout { .. }
            | Self::Transport { .. }
            | Self::NotServing(_) => true,
            Self::Unreachable { .. } | Self::Status { .. } | Self::InvalidReply { .. } => false,
        }
    }
}

/// Timeouts of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Limit of each RPC after connecting.
    pub call_timeout: Duration,
    /// Limit of one connection attempt (connect, handshake, first `Health.Check`).
    pub attempt_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        // Generous: the lab runs guests under nested emulation.
        Self {
            call_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
        }
    }
}

/// When [`AgentClient::connect`] gives up: an [`Instant`], or a [`Duration`] from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(Instant);

impl From<Instant> for Deadline {
    fn from(at: Instant) -> Self {
        Self(at)
    }
}

impl From<Duration> for Deadline {
    fn from(within: Duration) -> Self {
        let now = Instant::now();
        // An absurdly long wait is capped rather than overflowing.
        Self(
            now.checked_add(within)
                .unwrap_or(now + Duration::from_secs(86_400 * 365)),
        )
    }
}

/// Called when an RPC times out, before the timeout is returned: gathers what the VMM and
/// a fresh connection can tell about a guest that stopped answering (see `sandbox`).
pub type TimeoutHook = std::sync::Arc<
    dyn Fn(&'static str) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync,
>;

/// A connection to the agent of one VM.
#[derive(Clone)]
pub struct AgentClient {
    health: agent_ttrpc::HealthClient,
    agent: agent_ttrpc::AgentClient,
    config: ClientConfig,
    on_timeout: Option<TimeoutHook>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Quotes a guest-supplied string for an error message: bounded and escaped.
fn quote(s: &str) -> String {
    let mut end = s.len().min(MAX_GUEST_STRING_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}", &s[..end])
}

/// Checks a guest-supplied identifier-like string (versions, release names).
fn check_guest_string(method: &'static str, field: &str, value: &str) -> Result<(), AgentError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_GUEST_STRING_LEN
        && value.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidReply {
            method,
            reason: format!(
                "{field} {} is empty, too long or not printable",
                quote(value)
            ),
        })
    }
}

impl AgentClient {
    /// Connects to the agent on guest `port` (normally [`AGENT_VSOCK_PORT`]) at `endpoint`
    /// (the VMM's hybrid vsock socket, or a guest CID over AF_VSOCK), retrying with a short
    /// backoff until the agent answers `Health.Check` or `deadline` passes. Default timeouts.
    pub async fn connect(
        endpoint: impl Into<VsockEndpoint>,
        port: u32,
        deadline: impl Into<Deadline>,
    ) -> Result<Self, AgentError> {
        Self::connect_with(endpoint, port, deadline, ClientConfig::default()).await
    }

    /// [`AgentClient::connect`] with explicit timeouts.
    pub async fn connect_with(
        endpoint: impl Into<VsockEndpoint>,
        port: u32,
        deadline: impl Into<Deadline>,
        config: ClientConfig,
    ) -> Result<Self, AgentError> {
        let endpoint = endpoint.into();
        let Deadline(deadline) = deadline.into();
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut backoff = FIRST_BACKOFF;
        let mut last = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(AgentError::Unreachable {
                    waited: started.elapsed(),
                    attempts,
                    last: last.map(Box::new),
                });
            }
            attempts += 1;
            let limit = remaining.min(config.attempt_timeout);
            match Self::attempt(&endpoint, port, config, limit).await {
                Ok(client) => {
                    debug!(attempts, elapsed = ?started.elapsed(), "agent answered");
                    return Ok(client);
                }
                Err(e) if e.is_transient() => {
                    debug!(attempts, error = %e, "agent not reachable yet");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection attempt, bounded by `limit` as a whole.
    async fn attempt(
        endpoint: &VsockEndpoint,
        port: u32,
        config: ClientConfig,
        limit: Duration,
    ) -> Result<Self, AgentError> {
        let attempt_deadline = tokio::time::Instant::now() + limit;
        let stream = endpoint.connect(port, limit).await?;
        let ttrpc = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(stream));
        let client = Self {
            health: agent_ttrpc::HealthClient::new(ttrpc.clone()),
            agent: agent_ttrpc::AgentClient::new(ttrpc),
            config,
            on_timeout: None,
        };
        let left = attempt_deadline.saturating_duration_since(tokio::time::Instant::now());
        client.check_within(left).await?;
        Ok(client)
    }

    /// This client, running `hook` whenever an RPC times out.
    pub fn with_timeout_hook(mut self, hook: TimeoutHook) -> Self {
        self.on_timeout = Some(hook);
        self
    }

    /// Runs one RPC with the per-call timeout and maps its failure.
    async fn call<T, F>(
        &self,
        method: &'static str,
        rpc: impl FnOnce(ttrpc::context::Context) -> F,
    ) -> Result<T, AgentError>
    where
        F: Future<Output = ttrpc::Result<T>>,
    {
        let result = Self::call_within(method, self.config.call_timeout, rpc).await;
        if let (Err(AgentError::Timeout { .. }), Some(hook)) = (&result, &self.on_timeout) {
            hook(method).await;
        }
        result
    }

    /// Runs one RPC with `timeout` and maps its failure.
    async fn call_within<T, F>(
        method: &'static str,
        timeout: Duration,
        rpc: impl FnOnce(ttrpc::context::Context) -> F,
    ) -> Result<T, AgentError>
    where
        F: Future<Output = ttrpc::Result<T>>,
    {
        let started = Instant::now();
        // The context carries the deadline to the agent; the local timeout is the guard.
        let result = tokio::time::timeout(timeout, rpc(ttrpc::context::with_duration(timeout)))
            .await
            .map_err(|_| AgentError::Timeout { method, timeout })?;
        match result {
            Ok(reply) => Ok(reply),
            // ttrpc's own deadline error is untyped; the clock tells what happened.
            Err(_) if started.elapsed() >= timeout => Err(AgentError::Timeout { method, timeout }),
            Err(ttrpc::Error::RpcStatus(status)) => Err(AgentError::Status {
                method,
                code: status.code(),
                message: quote(status.message()),
            }),
            Err(source) => Err(AgentError::Transport { method, source }),
        }
    }

    /// `Health.Check`: succeeds when the agent is serving.
    pub async fn check(&self) -> Result<(), AgentError> {
        self.check_within(self.config.call_timeout).await
    }

    async fn check_within(&self, timeout: Duration) -> Result<(), AgentError> {
        let req = CheckRequest::default();
        let reply =
            Self::call_within("Health.Check", timeout, |ctx| self.health.check(ctx, &req)).await?;
        match reply.status.enum_value() {
            Ok(ServingStatus::SERVING_STATUS_SERVING) => Ok(()),
            _ => Err(AgentError::NotServing(reply.status.value())),
        }
    }

    /// `Health.Version`: the agent's version and protocol revision.
    pub async fn version(&self) -> Result<VersionResponse, AgentError> {
        const METHOD: &str = "Health.Version";
        let req = VersionRequest::default();
        let reply = self
            .call(METHOD, |ctx| self.health.version(ctx, &req))
            .await?;
        check_guest_string(METHOD, "agent_version", &reply.agent_version)?;
        if reply.api_revision == 0 {
            return Err(AgentError::InvalidReply {
                method: METHOD,
                reason: "api_revision is 0".into(),
            });
        }
        Ok(reply)
    }

    /// `Agent.GetGuestDetails`, validated: memory counters are consistent, at least one
    /// CPU is online, strings are short and printable.
    pub async fn guest_details(&self) -> Result<GetGuestDetailsResponse, AgentError> {
        const METHOD: &str = "Agent.GetGuestDetails";
        let req = GetGuestDetailsRequest::default();
        let reply = self
            .call(METHOD, |ctx| self.agent.get_guest_details(ctx, &req))
            .await?;
        let invalid = |reason: String| AgentError::InvalidReply {
            method: METHOD,
            reason,
        };
        check_guest_string(METHOD, "kernel_release", &reply.kernel_release)?;
        check_guest_string(METHOD, "agent_version", &reply.agent_version)?;
        let (total, available) = (reply.memory_total_bytes, reply.memory_available_bytes);
        if total == 0 || available > total {
            return Err(invalid(format!(
                "memory available {available} of total {total} bytes"
            )));
        }
        if !(1..=MAX_GUEST_CPUS).contains(&reply.online_cpus) {
            return Err(invalid(format!("{} online CPUs", reply.online_cpus)));
        }
        Ok(reply)
    }

    /// `Agent.Shutdown`: the agent replies, then syncs and resets the VM. The caller waits
    /// for the VM to exit.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        let req = ShutdownRequest::default();
        self.call("Agent.Shutdown", |ctx| self.agent.shutdown(ctx, &req))
            .await
            .map(drop)
    }
}
