//! The pod and container lifecycle behind the Task service: create (booting the pod's VM for
//! its first container), start, exec, delete, and the watchers that turn guest exits, VM
//! deaths and OOM kills into containerd events.
//!
//! One shim serves one pod. Creates are serialized; every other call takes the container
//! table's lock only for bookkeeping, never across a call to the guest.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api::CreateTaskRequest;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::topics;
use containerd_shim_protos::types::task::Status;
use husk_agent_api::stdio::valid_id;
use tracing::{info, warn};

use crate::agent::AgentError;
use crate::config::{self, Config};
use crate::container::{Container, Containers, Exit, Process};
use crate::error::TaskError;
use crate::events::{self, Events};
use crate::io::{Relay, StdioPaths};
use crate::mount;
use crate::sandbox::Sandbox;
use crate::spec;

mod watch;

/// The shim's state: its pod, its containers, where events go.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("events", &self.inner.events)
            .field(
                "pod",
                &lock(&self.inner.pod)
                    .as_ref()
                    .map(|(s, _)| s.id().to_owned()),
            )
            .finish_non_exhaustive()
    }
}

struct Inner {
    events: Events,
    exit: Arc<ExitSignal>,
    create_lock: tokio::sync::Mutex<()>,
    pod: Mutex<Option<(Arc<Sandbox>, Config)>>,
    containers: Mutex<Containers>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn host_error(what: String) -> impl FnOnce(std::io::Error) -> TaskError {
    move |source| TaskError::Host { what, source }
}

/// Loads the configuration for a new pod: `ConfigPath` in the runtime options, else
/// `$HUSK_CONFIG`, else `/etc/husk/husk.toml` (whose absence means the defaults).
pub fn load_config(options: Option<&Any>) -> Result<Config, TaskError> {
    let from_options = match options {
        Some(any) if !any.type_url.is_empty() => {
            config::config_path_from_options(&any.type_url, &any.value)?
        }
        _ => None,
    };
    let env = std::env::var_os(config::CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let explicit = from_options.is_some() || env.is_some();
    let path = config::choose_config_path(from_options, env);
    if !explicit && !path.exists() {
        info!(path = %path.display(), "no husk configuration; using the defaults");
        let mut config = Config::default();
        config.state_dir = config::resolve_state_dir(&config.state_dir)?;
        return Ok(config);
    }
    let mut config = load_config_from(&path)?;
    if !explicit {
        config.source = None;
    }
    Ok(config)
}

/// Loads the configuration file `path` (its state directory resolved), remembering the path.
pub fn load_config_from(path: &Path) -> Result<Config, TaskError> {
    let mut config = Config::load(path)?;
    config.state_dir = config::resolve_state_dir(&config.state_dir)?;
    config.source = Some(path.to_owned());
    Ok(config)
}

impl Service {
    /// A shim with no pod yet; `exit` is signalled when containerd shuts it down.
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                events,
                exit,
                create_lock: tokio::sync::Mutex::new(()),
                pod: Mutex::new(None),
                containers: Mutex::new(Containers::new()),
            }),
        }
    }

    /// The events publisher.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    /// The running pod.
    pub fn pod(&self) -> Result<Arc<Sandbox>, TaskError> {
        lock(&self.inner.pod)
            .as_ref()
            .map(|(s, _)| s.clone())
            .ok_or_else(|| TaskError::FailedPrecondition("the pod's VM is not running".into()))
    }

    /// Runs `f` on container `id` under the table lock.
    pub fn with<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<R, TaskError>,
    ) -> Result<R, TaskError> {
        let mut table = lock(&self.inner.containers);
        let c = table
            .get_mut(id)
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))?;
        f(c)
    }

    /// Whether the shim has no containers left.
    pub fn is_empty(&self) -> bool {
        lock(&self.inner.containers).is_empty()
    }

    /// Creates container `req.id`, booting the pod's VM if it is the pod's first. Returns
    /// the guest pid of its init process. A failure undoes everything, the VM included if
    /// this call booted it.
    pub async fn create(&self, req: &CreateTaskRequest) -> Result<u32, TaskError> {
        let id = req.id.as_str();
        if !valid_id(id) {
            return Err(TaskError::InvalidArgument(format!(
                "invalid container id {id:?}"
            )));
        }
        let _serial = self.inner.create_lock.lock().await;
        if lock(&self.inner.containers).contains_key(id) {
            return Err(TaskError::AlreadyExists(format!("container {id}")));
        }
        let bundle = Path::new(&req.bundle);
        let config_json = bundle.join("config.json");
        let bytes = std::fs::read(&config_json)
            .map_err(host_error(format!("Cannot read {}", config_json.display())))?;
        let spec = spec::parse(&bytes)?;
        let membership = spec::pod_membership(id, &spec)?;
        let (sandbox, config, booted) = self.pod_for(id, &membership, req, &spec).await?;
        if let Some(source) = &config.source {
            // For `delete` after a crash, which gets no runtime options (see CONFIG_PATH_FILE).
            let note = bundle.join(config::CONFIG_PATH_FILE);
            if let Err(e) = std::fs::write(&note, source.as_os_str().as_encoded_bytes()) {
                warn!(path = %note.display(), error = %e, "cannot note the configuration path");
            }
        }
        match self
            .create_in(&sandbox, &config, req, spec, membership.is_sandbox)
            .await
        {
            Ok(pid) => Ok(pid),
            Err(e) => {
                if booted {
                    lock(&self.inner.pod).take();
                    sandbox.stop().await;
                }
                Err(e)
            }
        }
    }

    /// The pod a new container goes into, booting it for its sandbox container.
    async fn pod_for(
        &self,
        id: &str,
        membership: &spec::PodMembership,
        req: &CreateTaskRequest,
        spec: &serde_json::Value,
    ) -> Result<(Arc<Sandbox>, Config, bool), TaskError> {
        let current = lock(&self.inner.pod).clone();
        match current {
            Some((sandbox, config)) if sandbox.id() == membership.sandbox_id => {
                Ok((sandbox, config, false))
            }
            Some((sandbox, _)) => Err(TaskError::FailedPrecondition(format!(
                "container {id} belongs to pod {}, but this shim runs pod {}",
                membership.sandbox_id,
                sandbox.id()
            ))),
            None if !membership.is_sandbox => Err(TaskError::FailedPrecondition(format!(
                "pod {} of container {id} is not running in this shim",
                membership.sandbox_id
            ))),
            None => {
                let config = load_config(req.options.as_ref())?;
                // The spec's hostname as given (too long is an error, as with runc), else
                // the pod id's first 64 bytes (an id is ASCII: no character is cut).
                let id = membership.sandbox_id.as_str();
                let hostname = spec
                    .get("hostname")
                    .and_then(serde_json::Value::as_str)
                    .filter(|h| !h.is_empty())
                    .unwrap_or(&id[..id.len().min(64)]);
                let netns = spec::netns_path(spec);
                let sandbox = Arc::new(
                    Sandbox::start(
                        &membership.sandbox_id,
                        &config,
                        hostname,
                        netns.as_deref(),
                        spec::cgroups_path(spec),
                    )
                    .await?,
                );
                *lock(&self.inner.pod) = Some((sandbox.clone(), config.clone()));
                self.watch_pod(sandbox.clone());
                Ok((sandbox, config, true))
            }
        }
    }

    async fn create_in(
        &self,
        sandbox: &Arc<Sandbox>,
        config: &Config,
        req: &CreateTaskRequest,
        mut spec: serde_json::Value,
        is_sandbox: bool,
    ) -> Result<u32, TaskError> {
        let id = req.id.as_str();
        // The pod's container whose PID namespace this one joins, found by the pid the shim
        // reported for it (checked before anything is made).
        let pid_namespace_of = match spec::pid_namespace_pid(&spec)? {
            None => String::new(),
            Some(pid) => lock(&self.inner.containers)
                .iter()
                .find(|(_, c)| c.init.pid == pid && c.init.exit().is_none())
                .map(|(id, _)| id.clone())
                .ok_or_else(|| {
                    TaskError::InvalidArgument(format!(
                        "the PID namespace /proc/{pid}/ns/pid of container {id} is not a live container's of pod {}",
                        sandbox.id()
                    ))
                })?,
        };
        let share_dir = sandbox.mounts_dir().join(id);
        if share_dir.exists() {
            return Err(TaskError::AlreadyExists(format!(
                "share directory of container {id}"
            )));
        }
        let rootfs = sandbox.mounts_dir().join(spec::share_rootfs(id));
        std::fs::create_dir_all(&rootfs)
            .map_err(host_error(format!("Cannot create {}", rootfs.display())))?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // A read-only rootfs is read-only on the host: the guest cannot write through it.
        // The mount points its container needs are made first, as runc makes them; in a
        // writable one only a missing working directory, which runc creates too.
        let readonly = spec::readonly_rootfs(&spec);
        let points = spec::rootfs_mount_points(&spec, readonly);
        let attempt = async {
            if req.rootfs.is_empty() {
                // The bundle's rootfs is already prepared (no snapshotter mounts to do).
                let root = spec
                    .pointer("/root/path")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("rootfs");
                let source = Path::new(&req.bundle).join(root);
                mount::create_mount_points(&source, &points)?;
                let whole = mount::BindOptions {
                    recursive: true,
                    readonly,
                };
                mount::bind(&source, &rootfs, whole)?;
            } else if readonly {
                // Mounted where the guest cannot see it, completed, then bound into the share
                // read-only: no writable copy of it ever appears there.
                let staging = sandbox.staging_dir().join(id);
                let staged = async {
                    std::fs::create_dir_all(&staging)
                        .map_err(host_error(format!("Cannot create {}", staging.display())))?;
                    mount::mount_rootfs(&req.rootfs, &staging)?;
                    mount::create_mount_points(&staging, &points)?;
                    let whole = mount::BindOptions {
                        recursive: true,
                        readonly: true,
                    };
                    mount::bind(&staging, &rootfs, whole)?;
                    Ok::<(), TaskError>(())
                }
                .await;
                crate::sandbox::remove_dir(&staging);
                staged?;
            } else {
                mount::mount_rootfs(&req.rootfs, &rootfs)?;
                mount::create_mount_points(&rootfs, &points)?;
            }
            for bind in spec::rewrite(&mut spec, id, config)? {
                mount::bind(
                    &bind.source,
                    &sandbox.mounts_dir().join(&bind.share_path),
                    bind.options,
                )?;
            }
            let json = serde_json::to_vec(&spec).map_err(spec::SpecError::Json)?;
            let mut relay = Relay::attach(sandbox.vsock_uds(), id, "", &paths).await?;
            match sandbox
                .agent()
                .create_container_joining(id, json, paths.config(), &pid_namespace_of)
                .await
            {
                Ok(pid) => Ok((pid, relay)),
                Err(e) => {
                    relay.abort();
                    Err(TaskError::from(e))
                }
            }
        };
        let (pid, relay) = match attempt.await {
            Ok(done) => done,
            Err(e) => {
                remove_share_dir(&share_dir);
                return Err(e);
            }
        };
        let mut init = Process::new(paths.clone(), None);
        init.pid = pid;
        init.stdin_close = relay.stdin_closer();
        init.relay = Some(relay);
        lock(&self.inner.containers).insert(
            id.to_owned(),
            Container {
                bundle: req.bundle.clone(),
                share_dir,
                is_sandbox,
                init,
                execs: Default::default(),
                oom: Default::default(),
            },
        );
        // Followed from now: a created init that is killed before it starts ends with an
        // exit event and answers its waiters, as runc's does.
        self.watch_exit(sandbox.clone(), id, "", pid);
        info!(container = id, pod = sandbox.id(), pid, "container created");
        let event = TaskCreate {
            container_id: id.to_owned(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: paths.stdin,
                stdout: paths.stdout,
                stderr: paths.stderr,
                terminal: paths.terminal,
                ..Default::default()
            })
            .into(),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_CREATE_EVENT_TOPIC, event)
            .await;
        Ok(pid)
    }

    /// Starts the init process (empty `exec_id`) or an exec added before.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let sandbox = self.pod()?;
        let (stdio, exec_spec) = self.with(id, |c| {
            let p = c.process(id, exec_id)?;
            if p.status != Status::CREATED || p.exit().is_some() {
                return Err(TaskError::FailedPrecondition(format!(
                    "process {id}/{exec_id} is not in the created state"
                )));
            }
            Ok((p.stdio.clone(), p.exec_spec.clone()))
        })?;
        let (pid, relay) = if exec_id.is_empty() {
            (sandbox.agent().start_container(id).await?, None)
        } else {
            let mut relay = Relay::attach(sandbox.vsock_uds(), id, exec_id, &stdio).await?;
            let json = exec_spec.unwrap_or_default();
            match sandbox
                .agent()
                .exec_process(id, exec_id, json, stdio.config())
                .await
            {
                Ok(pid) => (pid, Some(relay)),
                Err(e) => {
                    relay.abort();
                    return Err(e.into());
                }
            }
        };
        self.with(id, |c| {
            let p = c.process_mut(id, exec_id)?;
            p.pid = pid;
            p.status = Status::RUNNING;
            if let Some(r) = relay {
                p.stdin_close = r.stdin_closer();
                p.relay = Some(r);
            }
            Ok(())
        })?;
        if !exec_id.is_empty() {
            // The init's watcher runs since its create.
            self.watch_exit(sandbox, id, exec_id, pid);
        }
        info!(container = id, exec = exec_id, pid, "process started");
        if exec_id.is_empty() {
            let event = TaskStart {
                container_id: id.to_owned(),
                pid,
                ..Default::default()
            };
            self.inner
                .events
                .publish(topics::TASK_START_EVENT_TOPIC, event)
                .await;
        } else {
            let event = TaskExecStarted {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
                ..Default::default()
            };
            self.inner
                .events
                .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, event)
                .await;
        }
        Ok(pid)
    }

    /// Registers exec `exec_id` (started by a later `start`).
    pub async fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        process_json: Vec<u8>,
    ) -> Result<(), TaskError> {
        if !valid_id(exec_id) {
            return Err(TaskError::InvalidArgument(format!(
                "invalid exec id {exec_id:?}"
            )));
        }
        let parsed: serde_json::Value = serde_json::from_slice(&process_json)
            .map_err(|e| TaskError::InvalidArgument(format!("exec spec is not JSON: {e}")))?;
        if !parsed.is_object() {
            return Err(TaskError::InvalidArgument(
                "exec spec is not a JSON object".into(),
            ));
        }
        self.with(id, |c| {
            if c.init.status != Status::RUNNING || c.init.exit().is_some() {
                return Err(TaskError::FailedPrecondition(format!(
                    "container {id} is not running"
                )));
            }
            if c.execs.contains_key(exec_id) {
                return Err(TaskError::AlreadyExists(format!(
                    "exec {exec_id} of container {id}"
                )));
            }
            c.execs
                .insert(exec_id.to_owned(), Process::new(stdio, Some(process_json)));
            Ok(())
        })?;
        let event = TaskExecAdded {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, event)
            .await;
        Ok(())
    }

    /// Deletes an exited exec, or a container that is not running (its rootfs is unmounted;
    /// deleting the pod's sandbox container stops the VM). Returns pid and exit.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exit), TaskError> {
        let running = |p: &Process| {
            matches!(p.status, Status::RUNNING | Status::PAUSED) && p.exit().is_none()
        };
        if !exec_id.is_empty() {
            return self.with(id, |c| {
                let p = c.process(id, exec_id)?;
                if running(p) {
                    return Err(TaskError::FailedPrecondition(format!(
                        "exec {exec_id} of container {id} is running"
                    )));
                }
                let p = c.execs.remove(exec_id).expect("checked above");
                let exit = p.exit().unwrap_or_else(|| Exit {
                    status: 0,
                    at: events::now(),
                });
                Ok((p.pid, exit))
            });
        }
        let (is_sandbox, share_dir) = self.with(id, |c| {
            if running(&c.init) {
                return Err(TaskError::FailedPrecondition(format!(
                    "container {id} is running"
                )));
            }
            Ok((c.is_sandbox, c.share_dir.clone()))
        })?;
        let pod = lock(&self.inner.pod).clone();
        if let Some((sandbox, _)) = &pod {
            if sandbox.exit_reason().is_none() {
                match sandbox.agent().remove_container(id, true).await {
                    Ok(()) => {}
                    Err(AgentError::Status {
                        code: ttrpc::Code::NOT_FOUND,
                        ..
                    }) => {}
                    Err(e) => warn!(container = id, error = %e, "RemoveContainer failed"),
                }
            }
        }
        remove_share_dir(&share_dir);
        let container = lock(&self.inner.containers)
            .remove(id)
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))?;
        let exit = container.init.exit().unwrap_or_else(|| Exit {
            status: 0,
            at: events::now(),
        });
        let pid = container.init.pid;
        drop(container);
        info!(container = id, "container deleted");
        let event = TaskDelete {
            container_id: id.to_owned(),
            pid,
            exit_status: exit.status,
            exited_at: Some(exit.at.clone()).into(),
            id: id.to_owned(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_DELETE_EVENT_TOPIC, event)
            .await;
        if is_sandbox {
            let pod = lock(&self.inner.pod).take();
            if let Some((sandbox, _)) = pod {
                sandbox.stop().await;
            }
        }
        Ok((pid, exit))
    }

    /// Stops the pod's VM if one runs (shim shutdown).
    pub async fn stop_pod(&self) {
        let pod = lock(&self.inner.pod).take();
        if let Some((sandbox, _)) = pod {
            sandbox.stop().await;
        }
    }

    /// Ends the shim.
    pub fn signal_exit(&self) {
        self.inner.exit.signal();
    }
}

/// Unmounts and removes a container's directory in the share.
fn remove_share_dir(dir: &Path) {
    crate::sandbox::remove_dir(dir);
}
