//! The ttrpc services of `agent.proto`: thin handlers that delegate to other modules.
//!
//! This is the one place where agent errors become ttrpc status codes, so the host can act
//! on the code rather than parse a message.

use std::sync::Arc;

use async_trait::async_trait;
use husk_agent_api::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, CloseStdinResponse, CreateContainerRequest,
    CreateContainerResponse, CreateSandboxRequest, CreateSandboxResponse, DestroySandboxRequest,
    DestroySandboxResponse, ExecProcessRequest, ExecProcessResponse, GetGuestDetailsRequest,
    GetGuestDetailsResponse, GetOOMEventRequest, GetOOMEventResponse, ListProcessesRequest,
    ListProcessesResponse, PauseContainerRequest, PauseContainerResponse, RemoveContainerRequest,
    RemoveContainerResponse, ResumeContainerRequest, ResumeContainerResponse, ServingStatus,
    ShutdownRequest, ShutdownResponse, SignalProcessRequest, SignalProcessResponse,
    StartContainerRequest, StartContainerResponse, StatsContainerRequest, StatsContainerResponse,
    TtyWinResizeRequest, TtyWinResizeResponse, UpdateContainerRequest, UpdateContainerResponse,
    UpdateInterfaceRequest, UpdateInterfaceResponse, UpdateRoutesRequest, UpdateRoutesResponse,
    VersionRequest, VersionResponse, WaitProcessRequest, WaitProcessResponse,
};
use husk_agent_api::API_REVISION;
use tokio::sync::Notify;
use tracing::{debug, info};
use ttrpc::r#async::TtrpcContext;

use crate::container::{ContainerError, Containers};
use crate::iface::{self, IfaceError};
use crate::reaper::Exit;
use crate::sysinfo::{self, SysInfoError};

/// The agent's version, reported by `Version` and `GetGuestDetails`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Maps an agent error to the ttrpc status the host sees.
fn status(code: ttrpc::Code, err: &dyn std::error::Error) -> ttrpc::Error {
    // Print the whole chain once: the host logs it as the reason.
    let msg = crate::container::helper::chain(err);
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

impl From<SysInfoError> for ttrpc::Error {
    fn from(err: SysInfoError) -> Self {
        status(ttrpc::Code::INTERNAL, &err)
    }
}

impl From<ContainerError> for ttrpc::Error {
    fn from(err: ContainerError) -> Self {
        debug!(error = %err, "request refused");
        status(err.code(), &err)
    }
}

impl From<IfaceError> for ttrpc::Error {
    fn from(err: IfaceError) -> Self {
        debug!(error = %err, "network request refused");
        status(err.code(), &err)
    }
}

/// `husk.agent.v1.Health`: answers as soon as the server is up.
#[derive(Debug, Default)]
pub struct HealthService;

#[async_trait]
impl husk_agent_api::Health for HealthService {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        debug!(service = %req.service, "health check");
        Ok(CheckResponse {
            status: ServingStatus::SERVING_STATUS_SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            agent_version: AGENT_VERSION.to_owned(),
            api_revision: API_REVISION,
            ..Default::default()
        })
    }
}

/// `husk.agent.v1.Agent`: guest lifecycle (and, later, containers).
#[derive(Debug)]
pub struct AgentService {
    /// Woken by `Shutdown`; the server loop replies first, then powers off.
    shutdown: Arc<Notify>,
    containers: Arc<Containers>,
}

impl AgentService {
    /// A service that signals `shutdown` when the host asks the guest to stop.
    pub fn new(shutdown: Arc<Notify>, containers: Arc<Containers>) -> Self {
        Self {
            shutdown,
            containers,
        }
    }
}

#[async_trait]
impl husk_agent_api::Agent for AgentService {
    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GetGuestDetailsRequest,
    ) -> ttrpc::Result<GetGuestDetailsResponse> {
        let mem = sysinfo::read_meminfo()?;
        Ok(GetGuestDetailsResponse {
            kernel_release: sysinfo::kernel_release()?,
            memory_total_bytes: mem.total_bytes,
            memory_available_bytes: mem.available_bytes,
            online_cpus: sysinfo::read_online_cpus()?,
            agent_version: AGENT_VERSION.to_owned(),
            mount_points: sysinfo::read_mount_points()?,
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        info!("shutdown requested by the host");
        // Only a wake-up: the server loop flushes this reply before it acts.
        self.shutdown.notify_one();
        Ok(ShutdownResponse::default())
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        self.containers.create_sandbox(req).await?;
        Ok(CreateSandboxResponse::default())
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> ttrpc::Result<DestroySandboxResponse> {
        self.containers.destroy_sandbox().await?;
        Ok(DestroySandboxResponse::default())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let pid = self
            .containers
            .create(
                &req.container_id,
                &req.oci_spec_json,
                req.stdio.as_ref(),
                &req.pid_namespace_of,
            )
            .await?;
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let pid = self.containers.start(&req.container_id).await?;
        Ok(StartContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let pid = self
            .containers
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.oci_process_json,
                req.stdio.as_ref(),
            )
            .await?;
        Ok(ExecProcessResponse {
            pid,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<SignalProcessResponse> {
        if req.all {
            if !req.exec_id.is_empty() {
                return Err(ContainerError::Invalid(
                    "`all` signals a container, not an exec".into(),
                )
                .into());
            }
            self.containers
                .signal_all(&req.container_id, req.signal)
                .await?;
        } else {
            self.containers
                .signal(&req.container_id, &req.exec_id, req.signal)?;
        }
        Ok(SignalProcessResponse::default())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let exit = self
            .containers
            .wait(&req.container_id, &req.exec_id)
            .await?;
        Ok(WaitProcessResponse {
            exit_status: exit.status(),
            signal: match exit {
                Exit::Signal(s) => s.unsigned_abs(),
                Exit::Code(_) => 0,
            },
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<RemoveContainerResponse> {
        self.containers.remove(&req.container_id, req.force).await?;
        Ok(RemoveContainerResponse::default())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        Ok(ListProcessesResponse {
            pids: self.containers.pids(&req.container_id)?,
            ..Default::default()
        })
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        Ok(self.containers.stats(&req.container_id)?)
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<PauseContainerResponse> {
        self.containers.freeze(&req.container_id, true).await?;
        Ok(PauseContainerResponse::default())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<ResumeContainerResponse> {
        self.containers.freeze(&req.container_id, false).await?;
        Ok(ResumeContainerResponse::default())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<UpdateContainerResponse> {
        self.containers
            .update(&req.container_id, &req.oci_resources_json)
            .await?;
        Ok(UpdateContainerResponse::default())
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<TtyWinResizeResponse> {
        self.containers
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols)?;
        Ok(TtyWinResizeResponse::default())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<CloseStdinResponse> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)?;
        Ok(CloseStdinResponse::default())
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: GetOOMEventRequest,
    ) -> ttrpc::Result<GetOOMEventResponse> {
        Ok(GetOOMEventResponse {
            container_id: self.containers.next_oom().await,
            ..Default::default()
        })
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<UpdateInterfaceResponse> {
        iface::update_interface(&req).await?;
        Ok(UpdateInterfaceResponse::default())
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<UpdateRoutesResponse> {
        iface::update_routes(&req).await?;
        Ok(UpdateRoutesResponse::default())
    }
}
