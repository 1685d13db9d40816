//! One pod's VM: virtiofsd + husk-vmm, the agent connection, and their teardown.
//!
//! [`Sandbox::start`] prepares `<state_dir>/<sandbox-id>/` (the share: `mounts/` where the
//! shim mounts and its read-only view `shared/`, see [`crate::mount`]; the sockets, the logs),
//! starts virtiofsd on `shared/`, boots husk-vmm with a virtio-fs device, waits for
//! the agent and creates the guest sandbox with the share mounted at `/run/husk/shared`.
//! A monitor task owns both child processes: when either exits, it kills and reaps the other
//! and publishes why ([`Sandbox::exited`]), so the death of any part ends the pod. The
//! children also get `PR_SET_PDEATHSIG`, so a killed shim does not leave a VM running.
//! [`Sandbox::stop`] shuts the guest down (or kills it), then unmounts and removes the
//! directory. A failed start undoes everything it did.

use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::agent::{AgentClient, AgentError, CreateSandboxRequest, ShareSource, AGENT_VSOCK_PORT};
use crate::cgroup::{CgroupError, PodCgroup, CGROUP_ROOT};
use crate::config::Config;
use crate::mount::{self, MountError};
use crate::network::{self, NetworkError, PodNetwork};
use crate::vmm::{Console, NetDevice, VirtiofsdCommand, VmmCommand, NET_TAP_FD};

/// The virtio-fs tag of the share (docs/contracts.md).
pub const SHARE_TAG: &str = "husk";
/// How long virtiofsd may take to create its socket.
const VIRTIOFSD_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest may take to remove its containers (`Agent.DestroySandbox`).
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping guest gets to reset by itself before husk-vmm is terminated.
const CLEAN_EXIT_GRACE: Duration = Duration::from_millis(500);
/// How long husk-vmm gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Largest host file copied into the guest's `resolv.conf` (the agent's limit is 64 KiB).
const MAX_RESOLV_CONF_BYTES: u64 = 64 * 1024;
/// Longest hostname (HOST_NAME_MAX).
const MAX_HOSTNAME_LEN: usize = 64;
/// Lines of a child's log quoted when it dies.
const LOG_TAIL_LINES: usize = 5;
/// How much of husk-vmm's log is searched for [`AGENT_STARTED_MARKER`].
const VMM_LOG_HEAD_BYTES: u64 = 64 * 1024;
/// What husk-vmm logs when the agent announces its start on the boot port (docs/contracts.md).
pub const AGENT_STARTED_MARKER: &str = "guest agent started boot_ms=";
/// Lines of the VMM log quoted when an agent RPC times out (two state dumps and context).
const TIMEOUT_LOG_LINES: usize = 12;

/// Errors of a pod's VM.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The pod directory cannot be prepared
    #[error("Cannot prepare the pod directory {path}")]
    Dir {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The pod cannot be started as asked (checked before anything is created)
    #[error("{0}")]
    Invalid(String),
    /// A pod with this id already has a directory
    #[error("The pod directory {0} already exists (is the pod running in another shim?)")]
    Exists(PathBuf),
    /// A mount of the share failed
    #[error("Cannot set up the pod's share")]
    Mount(#[source] MountError),
    /// A host process cannot be started
    #[error("Cannot start {program} ({path})")]
    Spawn {
        /// Which one.
        program: &'static str,
        /// Its path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// virtiofsd did not come up
    #[error("virtiofsd did not create its socket within {0:?}")]
    VirtiofsdTimeout(Duration),
    /// The VM ended before it was ready
    #[error("The pod's VM ended while starting: {0}")]
    Died(String),
    /// The agent never answered the first connection
    #[error("{}", if *agent_started {
        "The pod's guest started its agent (husk-vmm saw its start), but the agent did not answer"
    } else {
        "The pod's guest did not start its agent (husk-vmm saw no agent start on the boot port)"
    })]
    NoAnswer {
        /// Whether the agent had announced its start (boot port 0x04).
        agent_started: bool,
        /// The client's error (how long it tried).
        #[source]
        source: AgentError,
    },
    /// The agent did not answer or refused the sandbox
    #[error("The guest agent failed while the pod started")]
    Agent(#[source] AgentError),
    /// The pod's network namespace cannot be connected to the VM
    #[error("Cannot connect the pod's network to its VM")]
    Network(#[source] NetworkError),
    /// The pod's cgroup cannot hold the VM
    #[error("Cannot place the pod's VM in its cgroup")]
    Cgroup(#[source] CgroupError),
}

/// A running pod VM.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    mounts: PathBuf,
    vsock_uds: PathBuf,
    agent: AgentClient,
    exited: watch::Receiver<Option<String>>,
    kill: std::sync::Arc<Notify>,
    /// The pod's network namespace and the interface connected to the VM there.
    network: Option<(PathBuf, String)>,
    /// The host cgroup husk-vmm and virtiofsd run in.
    cgroup: Option<PodCgroup>,
}

/// Files of a pod directory.
struct Layout {
    dir: PathBuf,
    mounts: PathBuf,
    shared: PathBuf,
    vsock_uds: PathBuf,
    fs_socket: PathBuf,
}

impl Layout {
    fn new(state_dir: &Path, id: &str) -> Self {
        let dir = state_dir.join(id);
        Self {
            mounts: dir.join("mounts"),
            shared: dir.join("shared"),
            vsock_uds: dir.join("vsock.sock"),
            fs_socket: dir.join("virtiofsd.sock"),
            dir,
        }
    }
}

/// Longest path of a Unix socket (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The longest per-port socket husk-vmm makes beside the vsock socket: `_` and a u32 port.
const PORT_SUFFIX_LEN: usize = 1 + 10;

impl Layout {
    /// Refuses, before anything is created, a pod whose hostname the guest kernel would
    /// refuse or whose sockets cannot be bound at their paths.
    fn check(&self, hostname: &str) -> Result<(), SandboxError> {
        if hostname.len() > MAX_HOSTNAME_LEN {
            return Err(SandboxError::Invalid(format!(
                "the hostname {hostname:?} is {} bytes long; the limit is {MAX_HOSTNAME_LEN}",
                hostname.len()
            )));
        }
        let longest = [
            self.vsock_uds.as_os_str().len() + PORT_SUFFIX_LEN,
            self.fs_socket.as_os_str().len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        if longest > MAX_SOCKET_PATH {
            return Err(SandboxError::Invalid(format!(
                "the pod directory {} is too long for its sockets ({longest} of at most \
                 {MAX_SOCKET_PATH} bytes): use a shorter state_dir or pod id",
                self.dir.display()
            )));
        }
        Ok(())
    }
}

/// Describes a child's exit, naming the signal if there was one.
fn describe(program: &str, status: std::io::Result<ExitStatus>, log: &Path) -> String {
    let how = match status {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(0), _) => "exited cleanly".to_string(),
            (Some(3), _) if program == "husk-vmm" => "exited with status 3 (guest panic)".into(),
            (Some(5), _) if program == "husk-vmm" => {
                "exited with status 5 (the guest agent failed before it was ready)".into()
            }
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(libc::SIGSYS)) => format!(
                "was killed by signal {} (SIGSYS: a syscall its seccomp filter forbids)",
                libc::SIGSYS
            ),
            (None, Some(s)) => format!("was killed by signal {s}"),
            _ => format!("ended ({st})"),
        },
        Err(e) => format!("could not be waited for ({e})"),
    };
    if how == "exited cleanly" {
        return format!("{program} {how}");
    }
    let tail = log_tail(log, LOG_TAIL_LINES);
    if tail.is_empty() {
        format!("{program} {how}")
    } else {
        format!("{program} {how}; its log ends: {tail}")
    }
}

/// The last `n` lines of a log file, joined with ` | ` (empty if there is none).
fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// What the shim does when an agent RPC times out: asks husk-vmm for two state dumps a
/// second apart (SIGUSR1: vCPU exit counts, vsock queues and connections), tries a fresh
/// agent connection, and logs the result with the VMM log's tail. It tells a wedged guest
/// (no vCPU exits) from a stuck connection (a new one answers) from a busy agent.
fn timeout_hook(
    id: &str,
    vmm_pid: Option<u32>,
    vmm_log: &Path,
    vsock_uds: &Path,
    exited: watch::Receiver<Option<String>>,
) -> crate::agent::TimeoutHook {
    let (id, vmm_log, vsock_uds) = (id.to_owned(), vmm_log.to_owned(), vsock_uds.to_owned());
    std::sync::Arc::new(move |method| {
        let (id, vmm_log, vsock_uds) = (id.clone(), vmm_log.clone(), vsock_uds.clone());
        let exited = exited.clone();
        Box::pin(async move {
            let signal_vmm = || {
                // The monitor reaps the VMM and then publishes its exit: while nothing is
                // published the pid is still the VMM's.
                if let (Some(pid), None) = (vmm_pid, exited.borrow().as_ref()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGUSR1,
                    );
                }
            };
            signal_vmm();
            tokio::time::sleep(Duration::from_secs(1)).await;
            signal_vmm();
            let started = std::time::Instant::now();
            let probe =
                AgentClient::connect(&vsock_uds, AGENT_VSOCK_PORT, Duration::from_secs(3)).await;
            let probe = match probe {
                Ok(_) => format!(
                    "a new connection's Health.Check answered in {} ms",
                    started.elapsed().as_millis()
                ),
                Err(e) => format!("a new connection got no answer ({e})"),
            };
            warn!(
                sandbox = %id,
                method,
                probe,
                vmm_log = %log_tail(&vmm_log, TIMEOUT_LOG_LINES),
                "the agent did not answer in time"
            );
        })
    })
}

/// Makes `cmd` die with the shim: PR_SET_PDEATHSIG SIGKILL, stdio to `log`.
fn prepare(cmd: &mut std::process::Command, log: &Path) -> std::io::Result<()> {
    let log = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn spawn(
    program: &'static str,
    path: &Path,
    mut cmd: std::process::Command,
    log: &Path,
) -> Result<tokio::process::Child, SandboxError> {
    let fail = |source| SandboxError::Spawn {
        program,
        path: path.to_owned(),
        source,
    };
    prepare(&mut cmd, log).map_err(fail)?;
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    cmd.spawn().map_err(fail)
}

impl Sandbox {
    /// Starts the VM of pod `id` with `config`; `hostname` is the guest's; `netns` is the
    /// pod's network namespace (CRI's), whose interface the VM gets; `cgroups_path` is the
    /// sandbox container's (`linux.cgroupsPath`), the host cgroup the VM's processes run in.
    pub async fn start(
        id: &str,
        config: &Config,
        hostname: &str,
        netns: Option<&Path>,
        cgroups_path: Option<&str>,
    ) -> Result<Self, SandboxError> {
        let layout = Layout::new(&config.state_dir, id);
        layout.check(hostname)?;
        if layout.dir.exists() {
            return Err(SandboxError::Exists(layout.dir));
        }
        let cgroup = match cgroups_path {
            Some(path) => {
                PodCgroup::create(Path::new(CGROUP_ROOT), path).map_err(SandboxError::Cgroup)?
            }
            None => None,
        };
        let started = Self::start_with(id, config, hostname, netns, &layout, cgroup.as_ref()).await;
        match started {
            Ok(mut sandbox) => {
                sandbox.cgroup = cgroup;
                Ok(sandbox)
            }
            Err(e) => {
                if let Some(cgroup) = &cgroup {
                    remove_cgroup(cgroup).await;
                }
                Err(e)
            }
        }
    }

    async fn start_with(
        id: &str,
        config: &Config,
        hostname: &str,
        netns: Option<&Path>,
        layout: &Layout,
        cgroup: Option<&PodCgroup>,
    ) -> Result<Self, SandboxError> {
        let dir_error = |source| SandboxError::Dir {
            path: layout.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&layout.dir).map_err(dir_error)?;
        let network = match netns {
            Some(netns) => {
                let netns = netns.to_owned();
                tokio::task::spawn_blocking(move || network::connect(&netns))
                    .await
                    .unwrap_or_else(|_| Err(NetworkError::Panicked(PathBuf::new())))
                    .map_err(|e| {
                        remove_dir(&layout.dir);
                        SandboxError::Network(e)
                    })?
            }
            None => None,
        };
        let connected = network.as_ref().map(PodNetwork::connection);
        match Self::start_in(id, config, hostname, layout, network, cgroup).await {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => {
                if let Some((netns, name)) = connected {
                    disconnect(netns, name).await;
                }
                remove_dir(&layout.dir);
                Err(e)
            }
        }
    }

    async fn start_in(
        id: &str,
        config: &Config,
        hostname: &str,
        layout: &Layout,
        network: Option<PodNetwork>,
        cgroup: Option<&PodCgroup>,
    ) -> Result<Self, SandboxError> {
        mount::make_share(&layout.mounts, &layout.shared).map_err(SandboxError::Mount)?;
        let fs_cmd =
            VirtiofsdCommand::new(&config.virtiofsd_path, &layout.fs_socket, &layout.shared)
                .cache(config.virtiofs_cache);
        let fs_log = layout.dir.join("virtiofsd.log");
        let mut fs_command = fs_cmd.command();
        if let Some(cgroup) = cgroup {
            cgroup.join_on_exec(&mut fs_command);
        }
        let mut virtiofsd = spawn("virtiofsd", &config.virtiofsd_path, fs_command, &fs_log)?;
        let deadline = tokio::time::Instant::now() + VIRTIOFSD_SOCKET_TIMEOUT;
        while !layout.fs_socket.exists() {
            if let Ok(Some(st)) = virtiofsd.try_wait() {
                return Err(SandboxError::Died(describe("virtiofsd", Ok(st), &fs_log)));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(SandboxError::VirtiofsdTimeout(VIRTIOFSD_SOCKET_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let console = if config.debug_console.as_os_str().is_empty() {
            Console::Off
        } else {
            Console::File(config.debug_console.clone())
        };
        let mut vmm_cmd = VmmCommand::new(&config.vmm_path, &config.kernel, &layout.vsock_uds)
            .initrd(&config.initrd)
            .mem_mib(config.mem_mib)
            .vcpus(config.vcpus)
            .console(console)
            .cmdline_extra(config.kernel_params.clone())
            .fs(&layout.fs_socket, SHARE_TAG)
            .seccomp(config.vmm_seccomp.as_str());
        if config.vmm_jail {
            let jail = layout.dir.join("jail");
            std::fs::create_dir(&jail).map_err(|source| SandboxError::Dir {
                path: jail.clone(),
                source,
            })?;
            vmm_cmd = vmm_cmd.jail(jail, config.vmm_uid, config.vmm_gid);
        }
        if let Some(network) = &network {
            vmm_cmd = vmm_cmd.net(NetDevice {
                tap_fd: NET_TAP_FD,
                mac: network::format_mac(&network.interface.mac),
                mtu: u16::try_from(network.interface.mtu).ok(),
            });
        }
        let mut command = vmm_cmd.command();
        if let Some(network) = &network {
            crate::vmm::inherit_fd(&mut command, network.tap.as_raw_fd(), NET_TAP_FD);
        }
        if let Some(cgroup) = cgroup {
            cgroup.join_on_exec(&mut command);
        }
        let vmm_log = layout.dir.join("vmm.log");
        let vmm = spawn("husk-vmm", &config.vmm_path, command, &vmm_log)?;
        // The VMM holds the tap now (the shim's copy closes here): it goes away with the VMM.
        let connection = network.as_ref().map(PodNetwork::connection);
        let guest_net = network.map(|n| (n.interface, n.routes));
        let vmm_pid = vmm.id();
        info!(
            sandbox = id,
            vmm_pid,
            virtiofsd_pid = virtiofsd.id(),
            "pod VM starting"
        );

        let vmm_log_path = vmm_log.clone();
        let (exit_tx, exited) = watch::channel(None);
        let kill = std::sync::Arc::new(Notify::new());
        tokio::spawn(monitor(
            id.to_owned(),
            vmm,
            virtiofsd,
            vmm_log,
            fs_log,
            kill.clone(),
            exit_tx,
        ));
        let booted = Self::boot(id, config, hostname, layout, exited.clone(), guest_net).await;
        let agent = match booted {
            Ok(agent) => agent.with_timeout_hook(timeout_hook(
                id,
                vmm_pid,
                &vmm_log_path,
                &layout.vsock_uds,
                exited.clone(),
            )),
            Err(e) => {
                kill.notify_one();
                let mut exited = exited;
                let _ = exited.wait_for(Option::is_some).await;
                return Err(e);
            }
        };
        Ok(Sandbox {
            id: id.to_owned(),
            dir: layout.dir.clone(),
            mounts: layout.mounts.clone(),
            vsock_uds: layout.vsock_uds.clone(),
            agent,
            exited,
            kill,
            network: connection,
            cgroup: None,
        })
    }

    /// Waits for the agent (failing early if the VM ends) and creates the guest sandbox.
    async fn boot(
        id: &str,
        config: &Config,
        hostname: &str,
        layout: &Layout,
        mut exited: watch::Receiver<Option<String>>,
        network: Option<(network::Interface, Vec<network::Route>)>,
    ) -> Result<AgentClient, SandboxError> {
        let started = std::time::Instant::now();
        let connect =
            AgentClient::connect(&layout.vsock_uds, AGENT_VSOCK_PORT, config.boot_timeout());
        let agent = tokio::select! {
            agent = connect => match agent {
                Ok(agent) => agent,
                Err(source @ AgentError::Unreachable { .. }) => {
                    // The marker comes within the log's first lines; the guest can make the
                    // log long, so only its head is read.
                    let head = read_bounded(&layout.dir.join("vmm.log"), VMM_LOG_HEAD_BYTES);
                    return Err(SandboxError::NoAnswer {
                        agent_started: String::from_utf8_lossy(&head)
                            .contains(AGENT_STARTED_MARKER),
                        source,
                    });
                }
                Err(e) => return Err(SandboxError::Agent(e)),
            },
            why = exited.wait_for(Option::is_some) => {
                let why = why.ok().and_then(|w| w.clone()).unwrap_or_default();
                return Err(SandboxError::Died(why));
            }
        };
        let req = CreateSandboxRequest {
            hostname: hostname.to_owned(),
            hosts: b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_vec(),
            resolv_conf: read_bounded(Path::new("/etc/resolv.conf"), MAX_RESOLV_CONF_BYTES),
            share: Some(ShareSource {
                virtiofs_tag: SHARE_TAG.into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        agent
            .create_sandbox(&req)
            .await
            .map_err(SandboxError::Agent)?;
        if let Some((interface, routes)) = network {
            agent
                .update_interface(&interface)
                .await
                .map_err(SandboxError::Agent)?;
            agent
                .update_routes(&interface.name, &routes)
                .await
                .map_err(SandboxError::Agent)?;
        }
        info!(
            sandbox = id,
            boot_ms = started.elapsed().as_millis() as u64,
            "pod VM ready"
        );
        Ok(agent)
    }

    /// The pod id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the shim creates and mounts what the guest sees at `/run/husk/shared`: only the
    /// host writes the directories of this tree (see [`crate::mount`]).
    pub fn mounts_dir(&self) -> &Path {
        &self.mounts
    }

    /// Where the shim prepares a read-only rootfs before it enters the share: in the pod
    /// directory, outside what the guest sees.
    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join("staging")
    }

    /// The VMM's hybrid vsock socket (for stdio streams).
    pub fn vsock_uds(&self) -> &Path {
        &self.vsock_uds
    }

    /// The agent.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Why the VM ended, once it has.
    pub fn exit_reason(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// Waits until the VM has ended and returns why.
    pub async fn exited(&self) -> String {
        let mut rx = self.exited.clone();
        let reason = rx.wait_for(Option::is_some).await;
        reason
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "the pod monitor ended".into())
    }

    /// Stops the VM: a clean guest shutdown if it is still running, a kill if that does not
    /// end it in time; then unmounts everything in the pod directory and removes it.
    pub async fn stop(&self) {
        if self.exit_reason().is_none() {
            let destroyed =
                tokio::time::timeout(DESTROY_TIMEOUT, self.agent.destroy_sandbox()).await;
            match destroyed {
                Ok(Ok(())) => {
                    // Every container is gone and the share is unmounted in the guest: nothing
                    // there needs saving. Ask for a clean reset, but do not wait long for it
                    // (today's agent holds its reset until its ttrpc connections close).
                    let clean = async {
                        if let Err(e) = self.agent.shutdown().await {
                            debug!(sandbox = %self.id, error = %e, "agent Shutdown failed");
                        }
                        self.exited().await
                    };
                    let _ = tokio::time::timeout(CLEAN_EXIT_GRACE, clean).await;
                }
                Ok(Err(e)) => warn!(sandbox = %self.id, error = %e, "DestroySandbox failed"),
                Err(_) => warn!(sandbox = %self.id, "DestroySandbox timed out"),
            }
        }
        self.kill.notify_one();
        let reason = self.exited().await;
        info!(sandbox = %self.id, %reason, "pod VM stopped");
        if let Some((netns, name)) = &self.network {
            disconnect(netns.clone(), name.clone()).await;
        }
        if let Some(cgroup) = &self.cgroup {
            // Its processes are reaped: the cgroups this pod made can go.
            remove_cgroup(cgroup).await;
        }
        remove_dir(&self.dir);
    }
}

/// Removes a pod's cgroup off the runtime's threads (it may wait for the cgroup to empty).
async fn remove_cgroup(cgroup: &PodCgroup) {
    let created = cgroup.created().to_vec();
    let _ = tokio::task::spawn_blocking(move || crate::cgroup::remove_dirs(&created)).await;
}

/// Removes the tc redirect from the pod's network namespace (off the runtime's threads).
async fn disconnect(netns: PathBuf, name: String) {
    let _ = tokio::task::spawn_blocking(move || network::disconnect(&netns, &name)).await;
}

/// Unmounts everything in a directory of the pod and removes it, unless something is still
/// mounted there (then it is left, with an error in the log).
pub fn remove_dir(dir: &Path) {
    if let Err(e) = mount::unmount_all_under(dir) {
        warn!(dir = %dir.display(), error = %e, "unmount failed");
    }
    if let Err(e) = mount::remove_tree(dir) {
        tracing::error!(dir = %dir.display(), error = %e, "left in place");
    }
}

fn read_bounded(path: &Path, limit: u64) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(limit).read_to_end(&mut out);
    }
    out
}

/// Owns the two children: the first to end (or a kill request) ends both; the reason is
/// published once both are reaped.
async fn monitor(
    id: String,
    mut vmm: tokio::process::Child,
    mut virtiofsd: tokio::process::Child,
    vmm_log: PathBuf,
    fs_log: PathBuf,
    kill: std::sync::Arc<Notify>,
    exit_tx: watch::Sender<Option<String>>,
) {
    let reason = tokio::select! {
        st = vmm.wait() => describe("husk-vmm", st, &vmm_log),
        st = virtiofsd.wait() => describe("virtiofsd", st, &fs_log),
        () = kill.notified() => "stopped by the shim".to_string(),
    };
    // husk-vmm first, politely: on SIGTERM it stops the guest and removes its sockets.
    if let (Ok(None), Some(pid)) = (vmm.try_wait(), vmm.id()) {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = tokio::time::timeout(TERM_GRACE, vmm.wait()).await;
    }
    for child in [&mut vmm, &mut virtiofsd] {
        if let Ok(None) = child.try_wait() {
            let _ = child.start_kill();
        }
        let _ = child.wait().await;
    }
    if reason != "stopped by the shim" && !reason.starts_with("husk-vmm exited cleanly") {
        warn!(sandbox = %id, %reason, "pod VM ended");
    }
    let _ = exit_tx.send(Some(reason));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_start_leaves_nothing() {
        let state = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: state.path().to_owned(),
            virtiofsd_path: state.path().join("no-such-virtiofsd"),
            ..Config::default()
        };
        let err = Sandbox::start("pod1", &config, "pod1", None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SandboxError::Spawn {
                    program: "virtiofsd",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            !state.path().join("pod1").exists(),
            "the pod directory is left"
        );
        assert!(
            mount::mounts_under(state.path()).is_empty(),
            "a mount is left"
        );
    }

    /// S8: limits give clear errors before anything is spawned, and a hostname is never cut
    /// inside a character.
    #[tokio::test]
    async fn a_long_hostname_or_pod_path_is_refused_before_anything_starts() {
        let state = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: state.path().to_owned(),
            virtiofsd_path: state.path().join("no-such-virtiofsd"),
            ..Config::default()
        };
        let hostname = "é".repeat(40);
        let err = Sandbox::start("pod1", &config, &hostname, None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SandboxError::Invalid(m) if m.contains("80 bytes long")),
            "{err:?}"
        );
        let id = "p".repeat(100);
        let err = Sandbox::start(&id, &config, "h", None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SandboxError::Invalid(m) if m.contains("too long for its sockets")),
            "{err:?}"
        );
        assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn an_existing_pod_directory_is_refused_and_kept() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir(state.path().join("pod1")).unwrap();
        let config = Config {
            state_dir: state.path().to_owned(),
            ..Config::default()
        };
        let err = Sandbox::start("pod1", &config, "pod1", None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, SandboxError::Exists(_)), "{err:?}");
        assert!(state.path().join("pod1").exists());
    }

    #[test]
    fn exits_are_described_with_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        std::fs::write(&log, "a\nb\nKVM internal error\n").unwrap();
        let st = ExitStatus::from_raw(3 << 8);
        let text = describe("husk-vmm", Ok(st), &log);
        assert_eq!(
            text,
            "husk-vmm exited with status 3 (guest panic); its log ends: a | b | KVM internal error"
        );
        let killed = describe(
            "virtiofsd",
            Ok(ExitStatus::from_raw(9)),
            &dir.path().join("none"),
        );
        assert_eq!(killed, "virtiofsd was killed by signal 9");
        std::fs::write(
            &log,
            "husk-vmm: seccomp: the vCPU thread made syscall 110\n",
        )
        .unwrap();
        let filtered = describe("husk-vmm", Ok(ExitStatus::from_raw(31)), &log);
        assert_eq!(
            filtered,
            "husk-vmm was killed by signal 31 (SIGSYS: a syscall its seccomp filter forbids); \
             its log ends: husk-vmm: seccomp: the vCPU thread made syscall 110"
        );
    }
}
