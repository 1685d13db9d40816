//! The watchers of a pod: guest exits become TaskExit events (after the output is drained),
//! OOM kills become TaskOOM events, and a VM that ends under created processes reports them
//! exited.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::events::task::{TaskExit, TaskOOM};
use containerd_shim_protos::topics;
use containerd_shim_protos::types::task::Status;
use tracing::{error, info, warn};

use super::{lock, Service};
use crate::agent::AgentError;
use crate::container::LOST_EXIT_STATUS;
use crate::events;
use crate::sandbox::Sandbox;

/// One slice of a `WaitProcess` or `GetOOMEvent` call; the watchers call again after it.
const WAIT_SLICE: Duration = Duration::from_secs(24 * 3600);
/// The shortest time between two OOM reports taken from the guest.
const OOM_EVENT_INTERVAL: Duration = Duration::from_millis(100);
/// How many distinct unknown container ids in OOM reports are logged.
const MAX_UNKNOWN_OOM_LOGGED: usize = 16;
/// How long a broken agent connection may precede the VM's reaped exit.
const VM_EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long output may stay idle after the VM died under a process.
const DRAIN_AFTER_LOSS: Duration = Duration::from_secs(2);
/// How long an output stream may stay open without a byte after the guest reported its
/// process's exit (the agent reports an exit only after the process's output is sent, so
/// an honest guest has nothing left but what is in flight).
const DRAIN_IDLE_LIMIT: Duration = Duration::from_secs(30);

impl Service {
    /// Waits for the exit of process (`id`, `exec_id`) in the guest, drains its output
    /// (through the relay the process holds then), records the exit and publishes TaskExit.
    /// A process lost with its VM exits with [`LOST_EXIT_STATUS`].
    pub(super) fn watch_exit(&self, sandbox: Arc<Sandbox>, id: &str, exec_id: &str, pid: u32) {
        let this = self.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        tokio::spawn(async move {
            let (status, lost) = loop {
                match sandbox
                    .agent()
                    .wait_process(&id, &exec_id, WAIT_SLICE)
                    .await
                {
                    Ok(reply) => break (reply.exit_status.unsigned_abs(), false),
                    Err(AgentError::Timeout { .. }) => continue,
                    Err(_)
                        if this
                            .with(&id, |c| c.process(&id, &exec_id).map(drop))
                            .is_err() =>
                    {
                        // Deleted meanwhile (a created container's delete can come before
                        // the guest took the wait): nobody waits for this exit.
                        return;
                    }
                    Err(e) => {
                        // The connection breaks a moment before the monitor has reaped the
                        // VM: give it that moment, so the log says why.
                        let vm = tokio::time::timeout(VM_EXIT_GRACE, sandbox.exited())
                            .await
                            .ok();
                        error!(container = %id, exec = %exec_id, error = %e, vm = ?vm,
                            "process lost with the pod VM; reporting exit status {LOST_EXIT_STATUS}");
                        break (LOST_EXIT_STATUS, true);
                    }
                }
            };
            let relay = this
                .with(&id, |c| Ok(c.process_mut(&id, &exec_id)?.relay.take()))
                .ok()
                .flatten();
            if let Some(mut relay) = relay {
                let idle = if lost {
                    DRAIN_AFTER_LOSS
                } else {
                    DRAIN_IDLE_LIMIT
                };
                if !relay.drained(idle).await && !lost {
                    warn!(container = %id, exec = %exec_id,
                        "the guest kept an output stream open after the exit; reporting the exit");
                }
            }
            if exec_id.is_empty() && !lost {
                this.report_oom_before_exit(&sandbox, &id).await;
            }
            this.record_exit(&id, &exec_id, pid, status).await;
        });
    }

    /// Publishes TaskOOM ahead of an init's TaskExit when the guest counts an OOM kill in
    /// the container that no event has reported yet. The agent notices kills by polling, so
    /// its report can come after the exit; containerd's CRI gives the reason `OOMKilled` only
    /// to a container whose TaskOOM it has seen, and a kubelet reading the status between
    /// the two would record `Error`. runc's shim sends the OOM first; so does this.
    async fn report_oom_before_exit(&self, sandbox: &Sandbox, id: &str) {
        if self.with(id, |c| Ok(c.oom.forwarded)).unwrap_or(true) {
            return;
        }
        let kills = match sandbox.agent().stats_container(id).await {
            Ok(stats) => stats.memory.oom_kill_count,
            Err(e) => {
                warn!(container = id, error = %e, "cannot read the OOM kills behind the exit");
                return;
            }
        };
        if kills == 0 {
            return;
        }
        let marked = self.with(id, |c| {
            c.oom.at_exit = true;
            Ok(())
        });
        if marked.is_ok() {
            warn!(container = id, oom_kills = kills, "OOM kill in the guest");
            self.publish_oom(id).await;
        }
    }

    async fn publish_oom(&self, container_id: &str) {
        let event = TaskOOM {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_OOM_EVENT_TOPIC, event)
            .await;
    }

    pub(super) async fn record_exit(&self, id: &str, exec_id: &str, pid: u32, status: u32) {
        let at = events::now();
        let recorded = self
            .with(id, |c| {
                Ok(c.process_mut(id, exec_id)?.set_exit(status, at.clone()))
            })
            .unwrap_or(false);
        if !recorded {
            return;
        }
        info!(
            container = id,
            exec = exec_id,
            pid,
            status,
            "process exited"
        );
        let event = TaskExit {
            container_id: id.to_owned(),
            id: if exec_id.is_empty() { id } else { exec_id }.to_owned(),
            pid,
            exit_status: status,
            exited_at: Some(at).into(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_EXIT_EVENT_TOPIC, event)
            .await;
    }

    /// Watches the pod: OOM kills become TaskOOM events; when the VM ends, processes no
    /// watcher follows (execs added, never started) are reported exited.
    pub(super) fn watch_pod(&self, sandbox: Arc<Sandbox>) {
        let this = self.clone();
        let pod = sandbox.clone();
        tokio::spawn(async move {
            let reason = pod.exited().await;
            let idle: Vec<(String, String, u32)> = lock(&this.inner.containers)
                .iter()
                .flat_map(|(id, c)| {
                    c.execs
                        .iter()
                        .map(|(e, p)| (id.clone(), e.clone(), p))
                        .filter(|(_, _, p)| p.status == Status::CREATED && p.exit().is_none())
                        .map(|(id, e, p)| (id, e, p.pid))
                        .collect::<Vec<_>>()
                })
                .collect();
            if !idle.is_empty() {
                error!(pod = pod.id(), %reason, "pod VM ended under created processes");
            }
            for (id, exec_id, pid) in idle {
                this.record_exit(&id, &exec_id, pid, LOST_EXIT_STATUS).await;
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let next = || sandbox.agent().get_oom_event(WAIT_SLICE);
            let known = |id: &str| lock(&this.inner.containers).contains_key(id);
            let publish = |container_id: String| {
                let this = this.clone();
                async move {
                    // The kill behind an init's exit, already reported with the exit.
                    if this
                        .with(&container_id, |c| Ok(c.oom.at_exit))
                        .unwrap_or(false)
                    {
                        return;
                    }
                    this.publish_oom(&container_id).await;
                    let _ = this.with(&container_id, |c| {
                        c.oom.forwarded = true;
                        Ok(())
                    });
                }
            };
            let e = forward_oom_events(next, known, publish, OOM_EVENT_INTERVAL).await;
            // A VM that ends (stopped or died) ends this loop quietly.
            if tokio::time::timeout(VM_EXIT_GRACE, sandbox.exited())
                .await
                .is_err()
            {
                warn!(pod = sandbox.id(), error = %e, "OOM events unavailable");
            }
        });
    }
}

/// Forwards the guest's OOM reports (`next`) as events (`publish`) until `next` fails, and
/// returns that error. The guest cannot flood containerd or the log: reports come at most
/// one per `interval` (the next one is not asked for sooner), and reports of containers
/// this shim does not run (`known`) are dropped, logged once each.
async fn forward_oom_events<N, NF, K, P, PF>(
    next: N,
    known: K,
    publish: P,
    interval: Duration,
) -> AgentError
where
    N: Fn() -> NF,
    NF: std::future::Future<Output = Result<String, AgentError>>,
    K: Fn(&str) -> bool,
    P: Fn(String) -> PF,
    PF: std::future::Future<Output = ()>,
{
    let mut unknown_logged = std::collections::HashSet::new();
    loop {
        let asked = tokio::time::Instant::now();
        match next().await {
            Ok(container_id) if known(&container_id) => {
                warn!(container = %container_id, "OOM kill in the guest");
                publish(container_id).await;
            }
            Ok(container_id) => {
                if unknown_logged.len() < MAX_UNKNOWN_OOM_LOGGED
                    && unknown_logged.insert(container_id.clone())
                {
                    warn!(container = %container_id, "the guest reported an OOM kill of a container this shim does not run; ignored");
                }
            }
            Err(AgentError::Timeout { .. }) => continue,
            Err(e) => return e,
        }
        tokio::time::sleep_until(asked + interval).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// S5: a guest that answers every GetOOMEvent at once gets at most one event per
    /// interval through, and none for containers the shim does not run.
    #[tokio::test]
    async fn a_flood_of_oom_reports_is_paced_and_filtered() {
        let asked = AtomicUsize::new(0);
        let published = std::sync::Mutex::new(Vec::new());
        let next = || {
            let n = asked.fetch_add(1, Ordering::Relaxed);
            async move {
                match n {
                    0..=39 => Ok(if n % 2 == 0 { "c1" } else { "ghost" }.to_string()),
                    _ => Err(AgentError::NotServing(2)),
                }
            }
        };
        let known = |id: &str| id == "c1";
        let publish = |id: String| {
            published.lock().unwrap().push(id);
            async {}
        };
        let started = std::time::Instant::now();
        let end = forward_oom_events(next, known, publish, Duration::from_millis(20)).await;
        assert!(matches!(end, AgentError::NotServing(2)), "{end:?}");
        let published = published.into_inner().unwrap();
        assert_eq!(published, vec!["c1".to_string(); 20]);
        assert!(
            started.elapsed() >= Duration::from_millis(39 * 20),
            "40 reports went through in {:?}",
            started.elapsed()
        );
    }
}
