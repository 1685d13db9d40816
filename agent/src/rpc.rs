//! The ttrpc services of `agent.proto`: thin handlers that delegate to other modules.
//!
//! This is the one place where agent errors become ttrpc status codes, so the host can act
//! on the code rather than parse a message.

use std::sync::Arc;

use async_trait::async_trait;
use husk_agent_api::agent::{
    CheckRequest, CheckResponse, GetGuestDetailsRequest, GetGuestDetailsResponse, ServingStatus,
    ShutdownRequest, ShutdownResponse, VersionRequest, VersionResponse,
};
use husk_agent_api::API_REVISION;
use tokio::sync::Notify;
use tracing::{debug, info};
use ttrpc::r#async::TtrpcContext;

use crate::sysinfo::{self, SysInfoError};

/// The agent's version, reported by `Version` and `GetGuestDetails`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Maps an agent error to the ttrpc status the host sees.
fn status(code: ttrpc::Code, err: &dyn std::error::Error) -> ttrpc::Error {
    // Print the whole chain once: the host logs it as the reason.
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

impl From<SysInfoError> for ttrpc::Error {
    fn from(err: SysInfoError) -> Self {
        status(ttrpc::Code::INTERNAL, &err)
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
}

impl AgentService {
    /// A service that signals `shutdown` when the host asks the guest to stop.
    pub fn new(shutdown: Arc<Notify>) -> Self {
        Self { shutdown }
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
}
