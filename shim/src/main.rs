//! `containerd-shim-husk-v2`: the binary containerd runs for `io.containerd.husk.v2`.
//!
//! Actions (containerd's shim v2 protocol, `runtime/v2/README.md`):
//! * `start`: prints the ttrpc address of the shim serving this container's pod. Containers
//!   carrying `io.kubernetes.cri.sandbox-id` are grouped by it, so all of a pod's containers
//!   reach the one shim (and VM) of the pod; otherwise a container is its own pod. If that
//!   shim is not running yet, a server process is spawned first.
//! * `delete`: cleans up after a shim that died: unmounts and removes what it left in
//!   husk's state directory, and prints a `DeleteResponse`.
//! * no action: serves the Task API on `-socket` until containerd's `Shutdown`.
//! * `-v` prints the version; `-info` prints a `RuntimeInfo` protobuf (containerd ≥ 2.0 asks).
//!
//! The Task service is registered as `containerd.task.v2.Task`, which containerd 1.6 and 1.7
//! call, and as `containerd.task.v3.Task` for containerd 2.x; `start` prints a bare address,
//! which every containerd version reads as ttrpc and task API v2. (The shim crate's own
//! `run` speaks only v3 and needs containerd ≥ 2.0, hence this small bootstrap.)

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use containerd_shim::asynchronous::{spawn, ExitSignal};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::{create_task, Task};
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::Server;
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use husk_agent_api::stdio::valid_id;
use husk_shim::events::{self, Events};
use husk_shim::service::{load_config, load_config_from, Service};
use husk_shim::spec;
use husk_shim::task::HuskTask;
use tracing::{error, info, warn};

/// The runtime name users select.
const RUNTIME_NAME: &str = "io.containerd.husk.v2";
/// Service names the Task API is served under (containerd 1.x, containerd 2.x).
const TASK_SERVICE_V3: &str = "containerd.task.v3.Task";
const TASK_SERVICE_V2: &str = "containerd.task.v2.Task";
/// Exit status reported by `delete` for a task whose shim is gone (128 + SIGKILL).
const DEAD_SHIM_EXIT_STATUS: u32 = 137;

fn main() -> std::process::ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("containerd-shim-husk-v2: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(flags) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("containerd-shim-husk-v2: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(flags: Flags) -> Result<()> {
    if flags.version {
        println!(
            "containerd-shim-husk-v2:\n  Version:  {}\n  Runtime:  {RUNTIME_NAME}\n  Task API: {TASK_SERVICE_V2}, {TASK_SERVICE_V3}",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    if flags.info {
        return write_info();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    match flags.action.as_str() {
        "start" => runtime.block_on(start(&flags)),
        "delete" => runtime.block_on(delete(&flags)),
        "" => runtime.block_on(serve(&flags)),
        other => bail!("Unknown action {other:?} (expected start, delete or none)"),
    }
}

/// `-info`: containerd (≥ 2.0) sends the runtime options on stdin; husk has no features to
/// declare beyond its name and version.
fn write_info() -> Result<()> {
    let info = RuntimeInfo {
        name: RUNTIME_NAME.into(),
        version: Some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let mut out = std::io::stdout();
    out.write_all(&info.write_to_bytes()?)?;
    out.flush()?;
    Ok(())
}

/// The pod (shim grouping) of the container whose bundle is the current directory; an
/// error if the container id or the sandbox id it names is not a valid id.
fn grouping(flags: &Flags) -> Result<String> {
    if !valid_id(&flags.id) {
        bail!("invalid container id {:?}", flags.id);
    }
    let named = match std::fs::read("config.json") {
        Ok(bytes) => spec::grouping_sandbox_id(&bytes)?,
        Err(_) => None,
    };
    Ok(named.unwrap_or_else(|| flags.id.clone()))
}

fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

async fn start(flags: &Flags) -> Result<()> {
    let grouping = grouping(flags)?;
    let opts = StartOpts {
        id: flags.id.clone(),
        publish_binary: flags.publish_binary.clone(),
        address: flags.address.clone(),
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace.clone(),
        debug: flags.debug,
        ..Default::default()
    };
    let address = opts.socket_address(&grouping);
    let serving = tokio::net::UnixStream::connect(socket_path(&address))
        .await
        .is_ok();
    let address = if serving {
        // The pod's shim runs already: this container joins it.
        address
    } else {
        spawn(opts, &grouping, Vec::new())
            .await
            .context("Cannot spawn the shim server")?
    };
    std::fs::write("address", &address).context("Cannot write the address file")?;
    print!("{address}");
    std::io::stdout().flush()?;
    Ok(())
}

/// Opens containerd's `log` fifo (in the bundle) without blocking if nobody reads it.
fn open_log() -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .ok()?;
    // Blocking from here on: a full fifo must slow the shim down, not lose lines.
    let fd = file.as_raw_fd();
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).ok()?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags)).ok()?;
    Some(file)
}

fn init_logging(flags: &Flags) {
    let default = if flags.debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let result = match open_log() {
        Some(file) => builder.with_writer(std::sync::Mutex::new(file)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    if let Err(e) = result {
        eprintln!("containerd-shim-husk-v2: logging: {e}");
    }
}

async fn serve(flags: &Flags) -> Result<()> {
    init_logging(flags);
    if flags.socket.is_empty() {
        bail!("-socket is required to serve");
    }
    let path = socket_path(&flags.socket).to_owned();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("Cannot create {}", parent.display()))?;
    }
    let listener = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if tokio::net::UnixStream::connect(&path).await.is_ok() {
                info!(socket = %path.display(), "the pod's shim is already serving");
                std::fs::write("address", &flags.socket)?;
                signal_started()?;
                return Ok(());
            }
            std::fs::remove_file(&path)?;
            std::os::unix::net::UnixListener::bind(&path)
                .with_context(|| format!("Cannot listen on {}", path.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("Cannot listen on {}", path.display())),
    };
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .context("Cannot connect to containerd's events service")?;
    let exit = Arc::new(ExitSignal::default());
    let service = Service::new(Events::new(Some(publisher), &flags.namespace), exit.clone());
    let task: Arc<dyn Task + Send + Sync> = Arc::new(HuskTask::new(service.clone()));
    let mut services = create_task(task.clone());
    let v2 = create_task(task)
        .remove(TASK_SERVICE_V3)
        .context("the generated Task service changed its name")?;
    services.insert(TASK_SERVICE_V2.to_string(), v2);
    let mut server = Server::new()
        .add_listener(Listener::try_from(listener).context("Cannot use the listener")?)
        .register_service(services);
    server
        .start()
        .await
        .context("Cannot start the ttrpc server")?;
    signal_started()?;
    info!(id = %flags.id, namespace = %flags.namespace, socket = %flags.socket, "shim serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        () = exit.wait() => {}
        _ = term.recv() => warn!("SIGTERM: stopping the pod"),
        _ = int.recv() => warn!("SIGINT: stopping the pod"),
    }
    service.stop_pod().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&path);
    info!("shim exiting");
    Ok(())
}

/// Tells `start` (which reads our stdout until EOF) that the server is up: stdout becomes
/// a copy of stderr, closing the pipe.
fn signal_started() -> Result<()> {
    nix::unistd::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO)
        .context("Cannot close the start pipe")?;
    Ok(())
}

/// Cleans up after a dead shim: the container's directory in the share, or the whole pod
/// directory for the pod's sandbox container (the VM died with the shim: PR_SET_PDEATHSIG).
async fn delete(flags: &Flags) -> Result<()> {
    let pod = grouping(flags)?;
    // The configuration the pod ran with: the one its Create noted in the bundle (the
    // current directory), else the default path or HUSK_CONFIG.
    let config = match std::fs::read(husk_shim::config::CONFIG_PATH_FILE) {
        Ok(path) => load_config_from(Path::new(std::ffi::OsStr::from_bytes(&path))),
        Err(_) => load_config(None),
    };
    let state_dir = config
        .map(|c| c.state_dir)
        .unwrap_or_else(|_| PathBuf::from("/run/husk"));
    let pod_dir = state_dir.join(&pod);
    // Both ids are valid ids (single path components), so these stay in the state directory.
    let dir = if pod == flags.id {
        pod_dir
    } else {
        pod_dir.join("mounts").join(&flags.id)
    };
    husk_shim::sandbox::remove_dir(&dir);
    let response = DeleteResponse {
        pid: 0,
        exit_status: DEAD_SHIM_EXIT_STATUS,
        exited_at: Some(events::now()).into(),
        ..Default::default()
    };
    let mut out = std::io::stdout();
    out.write_all(&response.write_to_bytes()?)?;
    out.flush()?;
    Ok(())
}
