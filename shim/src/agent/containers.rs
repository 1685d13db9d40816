//! Typed client methods of the container API (`Agent.CreateSandbox` … `Agent.GetOOMEvent`)
//! and the host end of a stdio stream.
//!
//! Replies come from a guest we do not trust: pids must be positive, exit statuses in range,
//! container ids valid. Calls that wait on the guest (`WaitProcess`, `GetOOMEvent`) take an
//! explicit timeout instead of the per-call one.

use std::path::Path;
use std::time::Duration;

use husk_agent_api::agent::{
    CloseStdinRequest, CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest,
    ExecProcessRequest, GetOOMEventRequest, ListProcessesRequest, PauseContainerRequest,
    RemoveContainerRequest, ResumeContainerRequest, SignalProcessRequest, StartContainerRequest,
    StatsContainerRequest, StatsContainerResponse, StdioConfig, TtyWinResizeRequest,
    UpdateContainerRequest, WaitProcessRequest, WaitProcessResponse,
};
use husk_agent_api::agent::{
    Interface, IpAddress, Route, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use husk_agent_api::stdio::{valid_id, Ack, StreamHeader};
pub use husk_agent_api::STDIO_VSOCK_PORT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{handshake, AgentClient, AgentError, GuestStream, VsockEndpoint};

/// Highest pid the guest kernel can hand out (`PID_MAX_LIMIT` on 64-bit).
const PID_MAX_LIMIT: u32 = 4 * 1024 * 1024;
/// Most pids a ListProcesses reply may carry.
const MAX_LISTED_PIDS: usize = 65_536;

fn check_pid(method: &'static str, pid: u32) -> Result<u32, AgentError> {
    if (1..=PID_MAX_LIMIT).contains(&pid) {
        Ok(pid)
    } else {
        Err(AgentError::InvalidReply {
            method,
            reason: format!("pid {pid} is out of range"),
        })
    }
}

impl AgentClient {
    /// `Agent.CreateSandbox`.
    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), AgentError> {
        self.call("Agent.CreateSandbox", |ctx| {
            self.agent.create_sandbox(ctx, req)
        })
        .await
        .map(drop)
    }

    /// `Agent.UpdateInterface`: the guest interface with `interface`'s MAC gets its name, MTU
    /// and addresses, and comes up.
    pub async fn update_interface(
        &self,
        interface: &crate::network::Interface,
    ) -> Result<(), AgentError> {
        let req = UpdateInterfaceRequest {
            interface: Some(Interface {
                name: interface.name.clone(),
                mac: crate::network::format_mac(&interface.mac),
                mtu: interface.mtu,
                addresses: interface
                    .addresses
                    .iter()
                    .map(|a| IpAddress {
                        address: a.address.to_string(),
                        prefix_len: a.prefix_len.into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.call("Agent.UpdateInterface", |ctx| {
            self.agent.update_interface(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.UpdateRoutes`: `routes` of interface `device`, all or none.
    pub async fn update_routes(
        &self,
        device: &str,
        routes: &[crate::network::Route],
    ) -> Result<(), AgentError> {
        let text = |ip: Option<std::net::Ipv4Addr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
        let req = UpdateRoutesRequest {
            routes: routes
                .iter()
                .map(|r| Route {
                    destination: r
                        .destination
                        .map(|d| format!("{}/{}", d.address, d.prefix_len))
                        .unwrap_or_default(),
                    gateway: text(r.gateway),
                    source: text(r.source),
                    device: device.to_owned(),
                    scope: r.scope.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.call("Agent.UpdateRoutes", |ctx| {
            self.agent.update_routes(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.DestroySandbox`.
    pub async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        let req = DestroySandboxRequest::default();
        self.call("Agent.DestroySandbox", |ctx| {
            self.agent.destroy_sandbox(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.CreateContainer`: returns the guest pid of the container's init process.
    pub async fn create_container(
        &self,
        container_id: &str,
        oci_spec_json: Vec<u8>,
        stdio: StdioConfig,
    ) -> Result<u32, AgentError> {
        self.create_container_joining(container_id, oci_spec_json, stdio, "")
            .await
    }

    /// `Agent.CreateContainer` of a container that joins the PID namespace of the live
    /// container `pid_namespace_of` (empty: a namespace of its own). Returns the init pid.
    pub async fn create_container_joining(
        &self,
        container_id: &str,
        oci_spec_json: Vec<u8>,
        stdio: StdioConfig,
        pid_namespace_of: &str,
    ) -> Result<u32, AgentError> {
        const METHOD: &str = "Agent.CreateContainer";
        let req = CreateContainerRequest {
            container_id: container_id.to_owned(),
            oci_spec_json,
            stdio: Some(stdio).into(),
            pid_namespace_of: pid_namespace_of.to_owned(),
            ..Default::default()
        };
        let reply = self
            .call(METHOD, |ctx| self.agent.create_container(ctx, &req))
            .await?;
        check_pid(METHOD, reply.pid)
    }

    /// `Agent.StartContainer`: returns the init pid.
    pub async fn start_container(&self, container_id: &str) -> Result<u32, AgentError> {
        const METHOD: &str = "Agent.StartContainer";
        let req = StartContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let reply = self
            .call(METHOD, |ctx| self.agent.start_container(ctx, &req))
            .await?;
        check_pid(METHOD, reply.pid)
    }

    /// `Agent.ExecProcess`: `oci_process_json` is an OCI `process` object. Returns the pid.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        oci_process_json: Vec<u8>,
        stdio: StdioConfig,
    ) -> Result<u32, AgentError> {
        const METHOD: &str = "Agent.ExecProcess";
        let req = ExecProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            oci_process_json,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let reply = self
            .call(METHOD, |ctx| self.agent.exec_process(ctx, &req))
            .await?;
        check_pid(METHOD, reply.pid)
    }

    /// `Agent.SignalProcess` (`exec_id` empty: the init process; `all`: every process in the
    /// container's cgroup, exec_id empty).
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal: signal.unsigned_abs(),
            all,
            ..Default::default()
        };
        self.call("Agent.SignalProcess", |ctx| {
            self.agent.signal_process(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.WaitProcess`, waiting up to `timeout`: the exit, after the output is drained.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
        timeout: Duration,
    ) -> Result<WaitProcessResponse, AgentError> {
        const METHOD: &str = "Agent.WaitProcess";
        let req = WaitProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        let reply =
            Self::call_within(METHOD, timeout, |ctx| self.agent.wait_process(ctx, &req)).await?;
        // 0..=255 from exit(2); 129..=192 from a signal.
        if !(0..=255).contains(&reply.exit_status) || reply.signal > 64 {
            return Err(AgentError::InvalidReply {
                method: METHOD,
                reason: format!("exit status {} signal {}", reply.exit_status, reply.signal),
            });
        }
        Ok(reply)
    }

    /// `Agent.RemoveContainer`.
    pub async fn remove_container(
        &self,
        container_id: &str,
        force: bool,
    ) -> Result<(), AgentError> {
        let req = RemoveContainerRequest {
            container_id: container_id.to_owned(),
            force,
            ..Default::default()
        };
        self.call("Agent.RemoveContainer", |ctx| {
            self.agent.remove_container(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.ListProcesses`: guest pids in the container's cgroup.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        const METHOD: &str = "Agent.ListProcesses";
        let req = ListProcessesRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let reply = self
            .call(METHOD, |ctx| self.agent.list_processes(ctx, &req))
            .await?;
        if reply.pids.len() > MAX_LISTED_PIDS {
            return Err(AgentError::InvalidReply {
                method: METHOD,
                reason: format!("{} pids", reply.pids.len()),
            });
        }
        for pid in &reply.pids {
            check_pid(METHOD, *pid)?;
        }
        Ok(reply.pids)
    }

    /// `Agent.StatsContainer`.
    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, AgentError> {
        let req = StatsContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.call("Agent.StatsContainer", |ctx| {
            self.agent.stats_container(ctx, &req)
        })
        .await
    }

    /// `Agent.PauseContainer`.
    pub async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = PauseContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.call("Agent.PauseContainer", |ctx| {
            self.agent.pause_container(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.ResumeContainer`.
    pub async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = ResumeContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.call("Agent.ResumeContainer", |ctx| {
            self.agent.resume_container(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.UpdateContainer`: `oci_resources_json` is an OCI `linux.resources` object.
    pub async fn update_container(
        &self,
        container_id: &str,
        oci_resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: container_id.to_owned(),
            oci_resources_json,
            ..Default::default()
        };
        self.call("Agent.UpdateContainer", |ctx| {
            self.agent.update_container(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.TtyWinResize`.
    pub async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = TtyWinResizeRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            rows,
            cols,
            ..Default::default()
        };
        self.call("Agent.TtyWinResize", |ctx| {
            self.agent.tty_win_resize(ctx, &req)
        })
        .await
        .map(drop)
    }

    /// `Agent.CloseStdin`.
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = CloseStdinRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.call("Agent.CloseStdin", |ctx| self.agent.close_stdin(ctx, &req))
            .await
            .map(drop)
    }

    /// `Agent.GetOOMEvent`, waiting up to `timeout`: the id of a container with an OOM kill.
    pub async fn get_oom_event(&self, timeout: Duration) -> Result<String, AgentError> {
        const METHOD: &str = "Agent.GetOOMEvent";
        let req = GetOOMEventRequest::default();
        let reply =
            Self::call_within(METHOD, timeout, |ctx| self.agent.get_oom_event(ctx, &req)).await?;
        if !valid_id(&reply.container_id) {
            return Err(AgentError::InvalidReply {
                method: METHOD,
                reason: "invalid container id".into(),
            });
        }
        Ok(reply.container_id)
    }
}

/// Errors opening a stdio stream.
#[derive(Debug, thiserror::Error)]
pub enum StdioStreamError {
    /// Cannot connect to the hybrid vsock socket
    #[error("Cannot connect to the hybrid vsock socket")]
    Connect(#[source] std::io::Error),
    /// The hybrid vsock handshake failed
    #[error("The hybrid vsock handshake failed")]
    Handshake(#[source] super::HandshakeError),
    /// Cannot reach the agent's stdio port at the endpoint
    #[error("Cannot reach the agent's stdio port")]
    Endpoint(#[source] Box<AgentError>),
    /// The stream header could not be sent or answered
    #[error("The stream header could not be sent or answered")]
    Io(#[source] std::io::Error),
    /// The guest did not accept the stream in time
    #[error("The guest did not accept the stream within {0:?}")]
    Timeout(Duration),
    /// The agent refused the stream header
    #[error("The agent refused the stream header (answer {0})")]
    Refused(u8),
}

/// How long opening a stdio stream may take, from the connect to the agent's acceptance: a
/// guest that never answers must not hold `Create` (and the pod's create lock) forever.
pub const STDIO_OPEN_LIMIT: Duration = Duration::from_secs(10);

/// Opens one stdio stream: connects to the agent's stdio port through the VMM's hybrid
/// vsock socket `uds_path`, sends `header` and waits for the agent's acceptance, all within
/// [`STDIO_OPEN_LIMIT`]. The returned stream carries the process stream's bytes;
/// `shutdown()` on a stdin or tty stream is the process's stdin EOF.
pub async fn open_stdio_stream(
    uds_path: &Path,
    header: &StreamHeader,
) -> Result<UnixStream, StdioStreamError> {
    open_stdio_stream_within(uds_path, header, STDIO_OPEN_LIMIT).await
}

/// [`open_stdio_stream`] with its own time limit.
pub async fn open_stdio_stream_within(
    uds_path: &Path,
    header: &StreamHeader,
    limit: Duration,
) -> Result<UnixStream, StdioStreamError> {
    let open = async {
        let mut stream = UnixStream::connect(uds_path)
            .await
            .map_err(StdioStreamError::Connect)?;
        handshake::handshake(&mut stream, STDIO_VSOCK_PORT)
            .await
            .map_err(StdioStreamError::Handshake)?;
        bind_stdio_stream(stream, header).await
    };
    tokio::time::timeout(limit, open)
        .await
        .map_err(|_| StdioStreamError::Timeout(limit))?
}

/// [`open_stdio_stream`] at any [`VsockEndpoint`] (a guest CID over AF_VSOCK too), as a
/// boxed stream.
pub async fn open_stdio_stream_at(
    endpoint: &VsockEndpoint,
    header: &StreamHeader,
) -> Result<Box<dyn GuestStream>, StdioStreamError> {
    if let VsockEndpoint::Hybrid(path) = endpoint {
        let stream = open_stdio_stream(path, header).await?;
        return Ok(Box::new(stream));
    }
    let open = async {
        let stream = endpoint
            .connect(STDIO_VSOCK_PORT, STDIO_OPEN_LIMIT)
            .await
            .map_err(|e| StdioStreamError::Endpoint(Box::new(e)))?;
        bind_stdio_stream(stream, header).await
    };
    tokio::time::timeout(STDIO_OPEN_LIMIT, open)
        .await
        .map_err(|_| StdioStreamError::Timeout(STDIO_OPEN_LIMIT))?
}

/// Sends `header` on a connected stdio stream and waits for the agent's acceptance.
async fn bind_stdio_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    header: &StreamHeader,
) -> Result<S, StdioStreamError> {
    stream
        .write_all(&header.encode())
        .await
        .map_err(StdioStreamError::Io)?;
    let mut ack = [0u8; 1];
    stream
        .read_exact(&mut ack)
        .await
        .map_err(StdioStreamError::Io)?;
    if ack[0] != Ack::Accepted as u8 {
        return Err(StdioStreamError::Refused(ack[0]));
    }
    Ok(stream)
}
