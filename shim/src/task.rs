//! The containerd Task service (`containerd.task.v2.Task`, served under the v3 name too):
//! thin handlers that validate, delegate to [`Service`] or the agent, and map errors to
//! ttrpc codes in one place ([`TaskError`]).

use async_trait::async_trait;
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::events::task::{TaskPaused, TaskResumed};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use husk_agent_api::agent::StatsContainerResponse;
use tracing::{debug, info};

use crate::error::TaskError;
use crate::io::StdioPaths;
use crate::service::Service;

/// containerd's type URL of cgroup v2 metrics (what `ctr task metrics` decodes).
pub const CGROUPS_V2_METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

type Result<T> = std::result::Result<T, ttrpc::Error>;

/// The Task service of one shim.
#[derive(Debug, Clone)]
pub struct HuskTask {
    service: Service,
}

impl HuskTask {
    /// A Task service over `service`.
    pub fn new(service: Service) -> Self {
        Self { service }
    }
}

/// Logs a failed call with its code and turns it into the ttrpc error.
fn fail(method: &str, e: TaskError) -> ttrpc::Error {
    info!(method, code = ?e.code(), error = %e.message(), "task call failed");
    e.into()
}

/// Converts the agent's cgroup v2 counters into containerd's metrics message.
pub fn metrics(stats: &StatsContainerResponse) -> Metrics {
    let (cpu, mem, pids, io) = (&stats.cpu, &stats.memory, &stats.pids, &stats.io);
    Metrics {
        pids: Some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            ..Default::default()
        })
        .into(),
        memory_events: Some(MemoryEvents {
            oom_kill: mem.oom_kill_count,
            ..Default::default()
        })
        .into(),
        io: Some(IOStat {
            usage: vec![IOEntry {
                rbytes: io.read_bytes,
                wbytes: io.write_bytes,
                ..Default::default()
            }],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

#[async_trait]
impl Task for HuskTask {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse> {
        debug!(id = %req.id, bundle = %req.bundle, "Create");
        if !req.checkpoint.is_empty() {
            return Err(fail(
                "Create",
                TaskError::Unimplemented("Create from a checkpoint"),
            ));
        }
        let pid = self
            .service
            .create(&req)
            .await
            .map_err(|e| fail("Create", e))?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> Result<StartResponse> {
        let pid = self
            .service
            .start(&req.id, &req.exec_id)
            .await
            .map_err(|e| fail("Start", e))?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> Result<DeleteResponse> {
        let (pid, exit) = self
            .service
            .delete(&req.id, &req.exec_id)
            .await
            .map_err(|e| fail("Delete", e))?;
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> Result<StateResponse> {
        self.service
            .with(&req.id, |c| {
                let bundle = c.bundle.clone();
                let p = c.process(&req.id, &req.exec_id)?;
                let exit = p.exit();
                Ok(StateResponse {
                    id: if req.exec_id.is_empty() {
                        &req.id
                    } else {
                        &req.exec_id
                    }
                    .clone(),
                    bundle,
                    pid: p.pid,
                    status: p.status.into(),
                    stdin: p.stdio.stdin.clone(),
                    stdout: p.stdio.stdout.clone(),
                    stderr: p.stdio.stderr.clone(),
                    terminal: p.stdio.terminal,
                    exit_status: exit.as_ref().map_or(0, |e| e.status),
                    exited_at: exit.map(|e| e.at).into(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                })
            })
            .map_err(|e| fail("State", e))
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> Result<PidsResponse> {
        let run = async {
            self.service.with(&req.id, |_| Ok(()))?;
            let pids = self.service.pod()?.agent().list_processes(&req.id).await?;
            Ok(PidsResponse {
                processes: pids
                    .into_iter()
                    .map(|pid| ProcessInfo {
                        pid,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        run.await.map_err(|e| fail("Pids", e))
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> Result<Empty> {
        let run = async {
            self.service.with(&req.id, |c| match c.init.status {
                Status::RUNNING if c.init.exit().is_none() => Ok(()),
                _ => Err(TaskError::FailedPrecondition(format!(
                    "container {} is not running",
                    req.id
                ))),
            })?;
            self.service.pod()?.agent().pause_container(&req.id).await?;
            self.service.with(&req.id, |c| {
                c.init.status = Status::PAUSED;
                Ok(())
            })
        };
        run.await.map_err(|e| fail("Pause", e))?;
        let event = TaskPaused {
            container_id: req.id,
            ..Default::default()
        };
        self.service
            .events()
            .publish(topics::TASK_PAUSED_EVENT_TOPIC, event)
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> Result<Empty> {
        let run = async {
            self.service.with(&req.id, |c| match c.init.status {
                Status::PAUSED => Ok(()),
                _ => Err(TaskError::FailedPrecondition(format!(
                    "container {} is not paused",
                    req.id
                ))),
            })?;
            self.service
                .pod()?
                .agent()
                .resume_container(&req.id)
                .await?;
            self.service.with(&req.id, |c| {
                if c.init.exit().is_none() {
                    c.init.status = Status::RUNNING;
                }
                Ok(())
            })
        };
        run.await.map_err(|e| fail("Resume", e))?;
        let event = TaskResumed {
            container_id: req.id,
            ..Default::default()
        };
        self.service
            .events()
            .publish(topics::TASK_RESUMED_EVENT_TOPIC, event)
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: CheckpointTaskRequest) -> Result<Empty> {
        Err(fail("Checkpoint", TaskError::Unimplemented("Checkpoint")))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> Result<Empty> {
        let run = async {
            let signal = i32::try_from(req.signal)
                .ok()
                .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
                .ok_or_else(|| {
                    TaskError::InvalidArgument(format!("invalid signal {}", req.signal))
                })?;
            self.service.with(&req.id, |c| {
                let p = c.process(&req.id, &req.exec_id)?;
                if p.exit().is_some() {
                    return Err(TaskError::NotFound(format!(
                        "process {}/{} (already finished)",
                        req.id, req.exec_id
                    )));
                }
                Ok(())
            })?;
            // `all` (an init's Kill only, as runc): the agent signals every process in the
            // container's cgroup, the execs the shim started among them.
            let all = req.all && req.exec_id.is_empty();
            self.service
                .pod()?
                .agent()
                .signal_process(&req.id, &req.exec_id, signal as i32, all)
                .await?;
            Ok(())
        };
        run.await.map_err(|e| fail("Kill", e))?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> Result<Empty> {
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let json = req
            .spec
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_default();
        self.service
            .add_exec(&req.id, &req.exec_id, stdio, json)
            .await
            .map_err(|e| fail("Exec", e))?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> Result<Empty> {
        let run = async {
            self.service
                .with(&req.id, |c| c.process(&req.id, &req.exec_id).map(drop))?;
            self.service
                .pod()?
                .agent()
                .tty_win_resize(&req.id, &req.exec_id, req.height, req.width)
                .await?;
            Ok(())
        };
        run.await.map_err(|e| fail("ResizePty", e))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> Result<Empty> {
        self.service
            .with(&req.id, |c| {
                let p = c.process(&req.id, &req.exec_id)?;
                if req.stdin {
                    if let Some(close) = &p.stdin_close {
                        close.notify_one();
                    }
                }
                Ok(())
            })
            .map_err(|e| fail("CloseIO", e))?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> Result<Empty> {
        let run = async {
            self.service.with(&req.id, |_| Ok(()))?;
            let resources = req
                .resources
                .as_ref()
                .map(|r| r.value.clone())
                .unwrap_or_default();
            let parsed: serde_json::Value = serde_json::from_slice(&resources).map_err(|e| {
                TaskError::InvalidArgument(format!("resources are not OCI JSON: {e}"))
            })?;
            if !parsed.is_object() {
                return Err(TaskError::InvalidArgument(
                    "resources are not a JSON object".into(),
                ));
            }
            self.service
                .pod()?
                .agent()
                .update_container(&req.id, resources)
                .await?;
            Ok(())
        };
        run.await.map_err(|e| fail("Update", e))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> Result<WaitResponse> {
        let mut exit = self
            .service
            .with(&req.id, |c| {
                Ok(c.process(&req.id, &req.exec_id)?.exit_watch())
            })
            .map_err(|e| fail("Wait", e))?;
        let exit = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| {
                fail(
                    "Wait",
                    TaskError::NotFound(format!("process {}/{}", req.id, req.exec_id)),
                )
            })?
            .clone()
            .expect("waited for Some");
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(exit.at).into(),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> Result<StatsResponse> {
        let run = async {
            self.service.with(&req.id, |_| Ok(()))?;
            let stats = self.service.pod()?.agent().stats_container(&req.id).await?;
            let value = metrics(&stats).write_to_bytes().map_err(|e| {
                TaskError::InvalidArgument(format!("metrics cannot be encoded: {e}"))
            })?;
            Ok(StatsResponse {
                stats: Some(Any {
                    type_url: CGROUPS_V2_METRICS_TYPE.into(),
                    value,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
        };
        run.await.map_err(|e| fail("Stats", e))
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> Result<ConnectResponse> {
        let task_pid = self
            .service
            .with(&req.id, |c| Ok(c.init.pid))
            .map_err(|e| fail("Connect", e))?;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> Result<Empty> {
        if self.service.is_empty() {
            info!("no containers left; shutting the shim down");
            self.service.stop_pod().await;
            self.service.signal_exit();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use husk_agent_api::agent::{CpuStats, IoStats, MemoryStats, PidsStats};

    use super::*;

    #[test]
    fn agent_stats_become_cgroup_v2_metrics() {
        let stats = StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: 10,
                user_usec: 6,
                system_usec: 4,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage_bytes: 4096,
                limit_bytes: 8192,
                oom_kill_count: 1,
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStats {
                current: 3,
                limit: 128,
                ..Default::default()
            })
            .into(),
            io: Some(IoStats {
                read_bytes: 1,
                write_bytes: 2,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = metrics(&stats);
        assert_eq!(
            (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec),
            (10, 6, 4)
        );
        assert_eq!((m.memory.usage, m.memory.usage_limit), (4096, 8192));
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!((m.pids.current, m.pids.limit), (3, 128));
        assert_eq!((m.io.usage[0].rbytes, m.io.usage[0].wbytes), (1, 2));
        // Round trip through the wire format containerd decodes.
        let bytes = m.write_to_bytes().unwrap();
        assert_eq!(Metrics::parse_from_bytes(&bytes).unwrap(), m);
    }

    #[test]
    fn the_metrics_type_url_is_the_message_name() {
        use containerd_shim_protos::protobuf::MessageFull;
        assert_eq!(Metrics::descriptor().full_name(), CGROUPS_V2_METRICS_TYPE);
    }
}
