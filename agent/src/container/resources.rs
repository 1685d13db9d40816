//! Resource operations on running containers: processes, statistics, the freezer,
//! resource updates and OOM events, all on the container's cgroup v2 directory.

use std::sync::Arc;
use std::time::Duration;

use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt, FreezerState};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use oci_spec::runtime::LinuxResources;
use tracing::{info, warn};

use super::{blocking, load, ContainerError, Containers, Result};
use crate::{cgroup, spec};

impl Containers {
    /// `ListProcesses`.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>> {
        self.entry(id, |_| Ok(()))?;
        cgroup::pids(id).map_err(ContainerError::CgroupRead)
    }

    /// `StatsContainer`.
    pub fn stats(&self, id: &str) -> Result<husk_agent_api::agent::StatsContainerResponse> {
        self.entry(id, |_| Ok(()))?;
        cgroup::stats(id).map_err(ContainerError::CgroupRead)
    }

    /// `PauseContainer` / `ResumeContainer` (the cgroup freezer, through libcontainer).
    pub async fn freeze(&self, id: &str, pause: bool) -> Result<()> {
        self.entry(id, |e| {
            if !e.started || e.init.exit().is_some() {
                return Err(ContainerError::State(id.to_owned(), "not running"));
            }
            Ok(())
        })?;
        let cid = id.to_owned();
        blocking(move || load(&cid).and_then(|mut c| if pause { c.pause() } else { c.resume() }))
            .await
            .map_err(|e| match e {
                libcontainer::error::LibcontainerError::IncorrectStatus(_) => {
                    ContainerError::State(
                        id.to_owned(),
                        if pause { "not running" } else { "not paused" },
                    )
                }
                e => ContainerError::Youki(if pause { "pause" } else { "resume" }, e),
            })
    }

    /// `SignalProcess` with `all` (`runc kill --all`): the signal to every process in the
    /// container's cgroup, not only the ones the agent started (a daemon's children, a
    /// process that joined through a shared namespace). The cgroup is frozen while its pids
    /// are read and signalled, so nothing forks past the signal; a paused container stays
    /// frozen (SIGKILL still ends its processes, other signals wait for the resume). A
    /// created container's only process is its init.
    pub async fn signal_all(&self, id: &str, signal: u32) -> Result<()> {
        let sig = super::parse_signal(signal)?;
        let started = self.entry(id, |e| {
            if e.init.exit().is_some() {
                return Err(ContainerError::State(
                    id.to_owned(),
                    "not running that process",
                ));
            }
            Ok(e.started)
        })?;
        if !started {
            return self.signal(id, "", signal);
        }
        let cid = id.to_owned();
        blocking(move || signal_cgroup(&cid, sig)).await
    }

    /// `UpdateContainer`: applies new `linux.resources` to the cgroup.
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        if resources_json.len() > spec::MAX_SPEC_BYTES {
            return Err(ContainerError::Invalid("resources JSON too large".into()));
        }
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(ContainerError::Resources)?;
        self.entry(id, |_| Ok(()))?;
        let cid = id.to_owned();
        blocking(move || {
            let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
                cgroup_path: cgroup::spec_path(&cid),
                systemd_cgroup: false,
                container_name: cid.clone(),
            })
            .map_err(|e| e.to_string())?;
            manager
                .apply(&ControllerOpt {
                    resources: &resources,
                    disable_oom_killer: false,
                    oom_score_adj: None,
                    freezer_state: None,
                })
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(ContainerError::Cgroup)
    }

    /// Compares every container's oom_kill counter with the last one seen and queues an
    /// event per increase. Called periodically by [`Containers::watch_oom`].
    fn scan_oom(&self) {
        let mut st = self.lock();
        let ids: Vec<String> = st.containers.keys().cloned().collect();
        for id in ids {
            let now = cgroup::oom_kills(&id);
            let seen = st.oom_seen.entry(id.clone()).or_insert(0);
            if now > *seen {
                *seen = now;
                info!(container = %id, oom_kills = now, "OOM kill in container");
                let _ = self.oom_tx.send(id);
            }
        }
    }

    /// Watches memory.events of every container for new OOM kills, forever.
    pub async fn watch_oom(self: Arc<Self>) {
        /// memory.events changes are rare; this is not on any data path.
        const OOM_SCAN_INTERVAL: Duration = Duration::from_millis(200);
        let mut tick = tokio::time::interval(OOM_SCAN_INTERVAL);
        loop {
            tick.tick().await;
            self.scan_oom();
        }
    }

    /// `GetOOMEvent`: waits for the next OOM kill and names its container.
    pub async fn next_oom(&self) -> String {
        let mut rx = self.oom_rx.lock().await;
        rx.recv().await.unwrap_or_default()
    }
}

/// Freezes the container's cgroup (unless it is frozen already), signals every pid in it and
/// thaws it again.
fn signal_cgroup(id: &str, sig: Signal) -> Result<()> {
    let manager = libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup::spec_path(id),
        systemd_cgroup: false,
        container_name: id.to_owned(),
    })
    .map_err(|e| ContainerError::Cgroup(e.to_string()))?;
    let paused = cgroup::frozen(id);
    if !paused {
        // A cgroup that does not settle frozen (libcgroups waits 10 s) is signalled anyway, as
        // runc does, and thawed below whatever state the freeze left it in.
        if let Err(e) = manager.freeze(FreezerState::Frozen) {
            warn!(container = %id, error = %e, "cannot freeze the cgroup to signal it");
        }
    }
    let signalled = manager
        .get_all_pids()
        .map_err(|e| ContainerError::Cgroup(e.to_string()))
        .and_then(|pids| {
            pids.into_iter().try_for_each(|pid| {
                match nix::sys::signal::kill(pid, sig) {
                    // Gone between the listing and the signal: what the signal wanted.
                    Ok(()) | Err(Errno::ESRCH) => Ok(()),
                    Err(e) => Err(ContainerError::Signal(e)),
                }
            })
        });
    if !paused {
        if let Err(e) = manager.freeze(FreezerState::Thawed) {
            warn!(container = %id, error = %e, "cannot thaw the cgroup after signalling it");
        }
    }
    signalled
}
