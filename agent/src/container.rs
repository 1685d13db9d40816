//! The pod's containers: create, start, exec, signal, wait, pause, update, remove.
//!
//! Containers are made with youki's `libcontainer` (namespaces, cgroups v2, capabilities,
//! rlimits, user/cwd/env, read-only rootfs, masked and read-only paths, mounts from the
//! spec). Its calls block, so they run on the blocking pool; the ones that clone processes
//! (creating a container, exec'ing into one) run in a freshly exec'd single-threaded
//! [`helper`] process, because a raw clone from the multi-threaded agent can deadlock the
//! child. Every request is checked before anything is made, and a failure after that undoes
//! what was made, so a refused request leaves nothing behind. Exits come from the one reaper
//! ([`crate::reaper`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use husk_agent_api::agent::{CreateSandboxRequest, StdioConfig};
use husk_agent_api::stdio::{valid_id, StreamKind};
use libcontainer::container::Container as YoukiContainer;
use nix::sys::signal::Signal;
use tracing::{info, warn};

use crate::cgroup;
use crate::net;
use crate::process::{Process, ProcessError, ProcessIo};
use crate::sandbox::{self, SHARED_DIR};
use crate::seccomp::{self, SeccompExecutor};
use crate::spec;
use crate::stdio::StdioHub;

/// libcontainer's state directory.
const YOUKI_ROOT: &str = "/run/husk/youki";
/// Bundles (config.json, exec process files), one directory per container.
const BUNDLES_DIR: &str = "/run/husk/bundles";
/// How long a create or exec waits for the streams it declared (shorter than the host's
/// default per-call timeout, so the host sees the typed error rather than its own timeout).
pub const STDIO_ATTACH_TIMEOUT: Duration = Duration::from_secs(5);
/// A killed cgroup can only be removed once its processes are gone: retries, and the pause
/// between them, when undoing a failed creation.
const CGROUP_RMDIR_TRIES: u32 = 50;
const CGROUP_RMDIR_PAUSE: Duration = Duration::from_millis(10);

mod error;
pub mod helper;
mod resources;

pub use error::ContainerError;
use error::Result;

#[derive(Debug)]
struct Entry {
    init: Arc<Process>,
    /// Installs the spec's seccomp filter in every process of the container.
    executor: SeccompExecutor,
    execs: HashMap<String, Arc<Process>>,
    started: bool,
}

#[derive(Debug, Default)]
struct State {
    sandbox: bool,
    containers: HashMap<String, Entry>,
    /// Ids being created or removed (a second request for them is refused).
    busy: HashSet<String>,
    /// Per container: the oom_kill count last reported.
    oom_seen: HashMap<String, u64>,
}

/// All containers of the sandbox.
#[derive(Debug)]
pub struct Containers {
    state: Mutex<State>,
    hub: Arc<StdioHub>,
    oom_tx: tokio::sync::mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>,
}

fn check_id(kind: &'static str, id: &str) -> Result<()> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ContainerError::BadId(kind, id.chars().take(140).collect()))
    }
}

fn check_exec_id(id: &str) -> Result<()> {
    if id.is_empty() {
        Ok(())
    } else {
        check_id("exec", id)
    }
}

/// A tty's (rows, columns).
type TtySize = (u16, u16);

/// The stream kinds a stdio request declares.
fn kinds(cfg: Option<&StdioConfig>) -> Result<(Vec<StreamKind>, Option<TtySize>)> {
    let Some(c) = cfg else {
        return Ok((Vec::new(), None));
    };
    if c.tty {
        if c.stdin || c.stdout || c.stderr {
            return Err(ContainerError::Invalid(
                "tty mode takes one stream; stdin/stdout/stderr must be false".into(),
            ));
        }
        let size = u16::try_from(c.tty_rows)
            .ok()
            .zip(u16::try_from(c.tty_cols).ok())
            .ok_or_else(|| ContainerError::Invalid("tty size out of range".into()))?;
        return Ok((vec![StreamKind::Tty], (size != (0, 0)).then_some(size)));
    }
    let mut k = Vec::new();
    for (on, kind) in [
        (c.stdin, StreamKind::Stdin),
        (c.stdout, StreamKind::Stdout),
        (c.stderr, StreamKind::Stderr),
    ] {
        if on {
            k.push(kind);
        }
    }
    Ok((k, None))
}

/// Whether the container gets a network namespace of its own (one without a path), rather
/// than joining the guest's.
fn new_network_namespace(spec: &oci_spec::runtime::Spec) -> bool {
    net::own_namespace(spec, oci_spec::runtime::LinuxNamespaceType::Network)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        // The agent aborts on panic (profile.guest), so this is unreachable there.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Undoes a container creation that failed part way: the container (and its processes),
/// its libcontainer state and its cgroup, whatever of them exists.
fn undo_create(id: &str) {
    if let Ok(mut c) = load(id) {
        let _ = c.delete(true);
    }
    let _ = std::fs::remove_dir_all(Path::new(YOUKI_ROOT).join(id));
    let cg = cgroup::dir(id);
    if cg.exists() {
        // The helper may have died between making the cgroup and recording the container.
        let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        for _ in 0..CGROUP_RMDIR_TRIES {
            if std::fs::remove_dir(&cg).is_ok() || !cg.exists() {
                break;
            }
            std::thread::sleep(CGROUP_RMDIR_PAUSE);
        }
    }
}

/// A signal number from the host.
fn parse_signal(signal: u32) -> Result<Signal> {
    i32::try_from(signal)
        .ok()
        .and_then(|s| Signal::try_from(s).ok())
        .ok_or_else(|| ContainerError::Invalid(format!("invalid signal {signal}")))
}

fn load(id: &str) -> std::result::Result<YoukiContainer, libcontainer::error::LibcontainerError> {
    YoukiContainer::load(Path::new(YOUKI_ROOT).join(id))
}

impl Containers {
    /// An empty set, taking stdio streams from `hub`.
    pub fn new(hub: Arc<StdioHub>) -> Arc<Self> {
        let (oom_tx, oom_rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Self {
            state: Mutex::new(State::default()),
            hub,
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `CreateSandbox`.
    pub async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<()> {
        sandbox::validate(&req).map_err(ContainerError::SandboxRequest)?;
        {
            let mut st = self.lock();
            if st.sandbox || st.busy.contains("") {
                return Err(ContainerError::SandboxExists);
            }
            st.busy.insert(String::new());
        }
        let r = blocking(move || sandbox::create(&req)).await;
        let mut st = self.lock();
        st.busy.remove("");
        r.map_err(ContainerError::Sandbox)?;
        st.sandbox = true;
        info!("sandbox created");
        Ok(())
    }

    /// `DestroySandbox`: removes every container (killing it), then the sandbox.
    pub async fn destroy_sandbox(&self) -> Result<()> {
        let ids: Vec<String> = {
            let st = self.lock();
            if !st.sandbox {
                return Err(ContainerError::NoSandbox);
            }
            st.containers.keys().cloned().collect()
        };
        for id in ids {
            if let Err(e) = self.remove(&id, true).await {
                warn!(container = %id, error = %e, "cannot remove container");
            }
        }
        blocking(sandbox::destroy).await;
        self.lock().sandbox = false;
        info!("sandbox destroyed");
        Ok(())
    }

    /// Reserves a new container id.
    fn reserve(&self, id: &str) -> Result<()> {
        check_id("container", id)?;
        let mut st = self.lock();
        if !st.sandbox {
            return Err(ContainerError::NoSandbox);
        }
        if st.containers.contains_key(id) || st.busy.contains(id) {
            return Err(ContainerError::Exists(id.to_owned()));
        }
        st.busy.insert(id.to_owned());
        Ok(())
    }

    /// `CreateContainer`: returns the init pid. `pid_namespace_of`, if not empty, names the
    /// live container whose PID namespace this one joins.
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        stdio: Option<&StdioConfig>,
        pid_namespace_of: &str,
    ) -> Result<u32> {
        self.reserve(id)?;
        let r = self
            .create_reserved(id, spec_json, stdio, pid_namespace_of)
            .await;
        let mut st = self.lock();
        st.busy.remove(id);
        let (pid, entry) = r?;
        st.containers.insert(id.to_owned(), entry);
        st.oom_seen.insert(id.to_owned(), 0);
        info!(container = %id, pid, "container created");
        Ok(pid)
    }

    async fn create_reserved(
        &self,
        id: &str,
        spec_json: &[u8],
        stdio: Option<&StdioConfig>,
        pid_namespace_of: &str,
    ) -> Result<(u32, Entry)> {
        let (kinds, tty_size) = kinds(stdio)?;
        let mut spec = spec::prepare(id, spec_json, Path::new(SHARED_DIR), &cgroup::spec_path(id))
            .map_err(ContainerError::Spec)?;
        if !pid_namespace_of.is_empty() {
            let path = self.pid_namespace(pid_namespace_of)?;
            spec::join_pid_namespace(&mut spec, path).map_err(ContainerError::Spec)?;
        }
        net::take_pod_hostname(&mut spec);
        let pod_sysctls = net::take_pod_sysctls(&mut spec);
        if !pod_sysctls.is_empty() {
            blocking(move || net::set_sysctls(&pod_sysctls))
                .await
                .map_err(ContainerError::Network)?;
        }
        let programs = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            Some(profile) => seccomp::compile(profile).map_err(ContainerError::Seccomp)?,
            None => Vec::new(),
        };
        let executor = SeccompExecutor::new(programs);
        let bundle = Path::new(BUNDLES_DIR).join(id);
        let config = bundle.join("config.json");
        let written = std::fs::create_dir_all(&bundle)
            .and_then(|()| {
                serde_json::to_vec(&spec)
                    .map_err(std::io::Error::other)
                    .and_then(|j| std::fs::write(&config, j))
            })
            .map_err(|e| ContainerError::Bundle(config.clone(), e));
        let undo_bundle = || {
            let _ = std::fs::remove_dir_all(&bundle);
        };
        if let Err(e) = written {
            undo_bundle();
            return Err(e);
        }
        let streams = match self.hub.take(id, "", &kinds, STDIO_ATTACH_TIMEOUT).await {
            Ok(s) => s,
            Err(e) => {
                undo_bundle();
                return Err(ContainerError::Stdio(e));
            }
        };
        let (io, fds) = match ProcessIo::prepare(streams, tty_size) {
            Ok(v) => v,
            Err(e) => {
                undo_bundle();
                return Err(ContainerError::Process(e));
            }
        };
        let cid = id.to_owned();
        let op = helper::Op::Create {
            bundle: bundle.clone(),
        };
        let exec = executor.clone();
        let built = blocking(move || helper::run(&cid, op, &exec, fds)).await;
        let undo = |e| async {
            let cid = id.to_owned();
            blocking(move || undo_create(&cid)).await;
            undo_bundle();
            Err(e)
        };
        let spawned = match built {
            Ok(s) => s,
            Err(e) => return undo(ContainerError::Helper("create the container", e)).await,
        };
        let pid = spawned.pid;
        if new_network_namespace(&spec) {
            // Before start, so the container's first instruction sees its loopback up.
            let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Err(e) = blocking(move || net::loopback_up_in(&ns)).await {
                return undo(ContainerError::Network(e)).await;
            }
        }
        let init = match Process::spawn(pid, spawned.exited, io) {
            Ok(p) => p,
            Err(e) => return undo(ContainerError::Process(e)).await,
        };
        Ok((
            u32::try_from(pid).unwrap_or(0),
            Entry {
                init,
                executor,
                execs: HashMap::new(),
                started: false,
            },
        ))
    }

    fn entry<T>(&self, id: &str, f: impl FnOnce(&mut Entry) -> Result<T>) -> Result<T> {
        check_id("container", id)?;
        let mut st = self.lock();
        let e = st
            .containers
            .get_mut(id)
            .ok_or_else(|| ContainerError::NoContainer(id.to_owned()))?;
        f(e)
    }

    /// The PID namespace of container `id`'s init, for a container that joins it. Only a
    /// live container of the pod qualifies: never the agent's own namespace. (Its init's pid
    /// is not reaped, hence not reused, before its exit is recorded here.)
    fn pid_namespace(&self, id: &str) -> Result<PathBuf> {
        self.entry(id, |e| {
            if e.init.exit().is_some() || e.init.pid <= 0 {
                return Err(ContainerError::State(
                    id.to_owned(),
                    "not running: its PID namespace cannot be joined",
                ));
            }
            Ok(PathBuf::from(format!("/proc/{}/ns/pid", e.init.pid)))
        })
    }

    /// `StartContainer`.
    pub async fn start(&self, id: &str) -> Result<u32> {
        let pid = self.entry(id, |e| {
            if e.started {
                return Err(ContainerError::State(id.to_owned(), "already started"));
            }
            e.started = true;
            Ok(e.init.pid)
        })?;
        let cid = id.to_owned();
        let r = blocking(move || load(&cid).and_then(|mut c| c.start())).await;
        if let Err(e) = r {
            let _ = self.entry(id, |e| {
                e.started = false;
                Ok(())
            });
            return Err(ContainerError::Youki("start the container", e));
        }
        info!(container = %id, pid, "container started");
        Ok(u32::try_from(pid).unwrap_or(0))
    }

    /// `ExecProcess`: returns the pid.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: Option<&StdioConfig>,
    ) -> Result<u32> {
        check_id("exec", exec_id)?;
        let (kinds, tty_size) = kinds(stdio)?;
        let process = spec::parse_process(process_json).map_err(ContainerError::Spec)?;
        let executor = self.entry(id, |e| {
            if !e.started || e.init.exit().is_some() {
                return Err(ContainerError::State(id.to_owned(), "not running"));
            }
            if e.execs.contains_key(exec_id) {
                return Err(ContainerError::ProcessExists(
                    id.to_owned(),
                    exec_id.to_owned(),
                ));
            }
            Ok(e.executor.clone())
        })?;
        let streams = self
            .hub
            .take(id, exec_id, &kinds, STDIO_ATTACH_TIMEOUT)
            .await
            .map_err(ContainerError::Stdio)?;
        let (io, fds) = ProcessIo::prepare(streams, tty_size).map_err(ContainerError::Process)?;
        let path = Path::new(BUNDLES_DIR)
            .join(id)
            .join(format!("exec-{exec_id}.json"));
        serde_json::to_vec(&process)
            .map_err(std::io::Error::other)
            .and_then(|j| std::fs::write(&path, j))
            .map_err(|e| ContainerError::Bundle(path.clone(), e))?;
        let cid = id.to_owned();
        let op = helper::Op::Exec {
            process: path.clone(),
        };
        let built = blocking(move || helper::run(&cid, op, &executor, fds)).await;
        let _ = std::fs::remove_file(&path);
        let spawned = built.map_err(|e| ContainerError::Helper("exec the process", e))?;
        let pid = spawned.pid;
        let proc = Process::spawn(pid, spawned.exited, io).map_err(ContainerError::Process)?;
        self.entry(id, |e| {
            e.execs.insert(exec_id.to_owned(), proc);
            Ok(())
        })?;
        info!(container = %id, exec = %exec_id, pid, "process started");
        Ok(u32::try_from(pid).unwrap_or(0))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        check_exec_id(exec_id)?;
        self.entry(id, |e| {
            if exec_id.is_empty() {
                Ok(e.init.clone())
            } else {
                e.execs
                    .get(exec_id)
                    .cloned()
                    .ok_or_else(|| ContainerError::NoProcess(id.to_owned(), exec_id.to_owned()))
            }
        })
    }

    /// `SignalProcess`.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        let sig = parse_signal(signal)?;
        let p = self.process(id, exec_id)?;
        if p.exit().is_some() || p.pid <= 0 {
            return Err(ContainerError::State(
                id.to_owned(),
                "not running that process",
            ));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
            .map_err(ContainerError::Signal)
    }

    /// `WaitProcess`: the exit, after the output is drained.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<crate::reaper::Exit> {
        let p = self.process(id, exec_id)?;
        Ok(p.wait().await)
    }

    /// `CloseStdin`.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.process(id, exec_id)?.close_stdin();
        Ok(())
    }

    /// `TtyWinResize`.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let size = u16::try_from(rows)
            .ok()
            .zip(u16::try_from(cols).ok())
            .ok_or_else(|| ContainerError::Invalid("tty size out of range".into()))?;
        self.process(id, exec_id)?
            .resize(size.0, size.1)
            .map_err(|e| match e {
                ProcessError::NoTty => ContainerError::State(id.to_owned(), "not on a tty"),
                e => ContainerError::Process(e),
            })
    }

    /// `RemoveContainer`.
    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        {
            let mut st = self.lock();
            check_id("container", id)?;
            let e = st
                .containers
                .get(id)
                .ok_or_else(|| ContainerError::NoContainer(id.to_owned()))?;
            let running = e.started && e.init.exit().is_none();
            if running && !force {
                return Err(ContainerError::State(id.to_owned(), "running (use force)"));
            }
            if !st.busy.insert(id.to_owned()) {
                return Err(ContainerError::State(id.to_owned(), "busy"));
            }
        }
        let cid = id.to_owned();
        let r = blocking(move || {
            let r = load(&cid).and_then(|mut c| {
                // Frozen processes cannot die: thaw first.
                if c.status() == libcontainer::container::ContainerStatus::Paused {
                    let _ = c.resume();
                }
                c.delete(true)
            });
            let _ = std::fs::remove_dir_all(Path::new(BUNDLES_DIR).join(&cid));
            r
        })
        .await;
        self.hub.forget(id);
        let mut st = self.lock();
        st.busy.remove(id);
        r.map_err(|e| ContainerError::Youki("delete the container", e))?;
        st.containers.remove(id);
        st.oom_seen.remove(id);
        info!(container = %id, "container removed");
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pathless_network_namespace_is_the_containers_own() {
        let spec = |namespaces: serde_json::Value| -> oci_spec::runtime::Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "linux": {"namespaces": namespaces}
            }))
            .unwrap()
        };
        assert!(new_network_namespace(&spec(serde_json::json!([
            {"type": "pid"}, {"type": "network"}
        ]))));
        assert!(!new_network_namespace(&spec(
            serde_json::json!([{"type": "pid"}])
        )));
        assert!(!new_network_namespace(&spec(serde_json::json!([
            {"type": "network", "path": "/proc/7/ns/net"}
        ]))));
    }

    #[test]
    fn stdio_configs_declare_streams() {
        let cfg = StdioConfig {
            stdin: true,
            stderr: true,
            ..Default::default()
        };
        assert_eq!(
            kinds(Some(&cfg)).unwrap().0,
            [StreamKind::Stdin, StreamKind::Stderr]
        );
        let tty = StdioConfig {
            tty: true,
            tty_rows: 24,
            tty_cols: 80,
            ..Default::default()
        };
        assert_eq!(
            kinds(Some(&tty)).unwrap(),
            (vec![StreamKind::Tty], Some((24, 80)))
        );
        let bad = StdioConfig {
            tty: true,
            stdout: true,
            ..Default::default()
        };
        assert!(kinds(Some(&bad)).is_err());
        assert!(kinds(None).unwrap().0.is_empty());
    }

    #[test]
    fn error_codes_are_typed() {
        assert_eq!(
            ContainerError::NoContainer("x".into()).code(),
            ttrpc::Code::NOT_FOUND
        );
        assert_eq!(
            ContainerError::Exists("x".into()).code(),
            ttrpc::Code::ALREADY_EXISTS
        );
        assert_eq!(
            ContainerError::NoSandbox.code(),
            ttrpc::Code::FAILED_PRECONDITION
        );
        assert_eq!(
            ContainerError::BadId("container", "..".into()).code(),
            ttrpc::Code::INVALID_ARGUMENT
        );
    }
}
