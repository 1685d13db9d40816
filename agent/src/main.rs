//! husk-agent: PID 1 of a husk guest and the ttrpc server the shim talks to.
//!
//! As PID 1 (the initramfs's `/init`) it mounts the base file systems, logs to the console,
//! serves `agent.proto` on vsock port 1024, announces readiness on the status port, reaps
//! zombies, and on `Shutdown` or SIGTERM syncs, unmounts and resets the VM.
//!
//! Started as any other process (development, tests) it only serves:
//! `husk-agent --listen unix:/tmp/agent.sock`; it never mounts, reboots or touches I/O ports,
//! and `Shutdown` or SIGTERM/SIGINT make it exit 0. It then makes itself a child subreaper,
//! so container processes are handed to it as they are to PID 1 in a guest.
//!
//! `husk-agent __container-helper` is the agent's own single-threaded helper for the
//! libcontainer calls that clone processes ([`container::helper`]); it is not a user command.

mod cgroup;
mod container;
mod iface;
mod init;
mod mount;
mod net;
mod peer;
mod process;
mod reaper;
mod rpc;
mod safepath;
mod sandbox;
mod seccomp;
mod server;
mod spec;
mod stdio;
mod sysinfo;

use std::sync::Arc;

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tracing::level_filters::LevelFilter;
use tracing::{info, warn};

use crate::init::{KernelCmdline, Status, StatusPort, TestFault};
use crate::server::{AgentServer, ListenAddr};

const USAGE: &str = "usage: husk-agent [--listen vsock:PORT|unix:PATH]";
/// Log level variable when not running as PID 1 (as PID 1: `husk.log=` on the kernel command line).
const LOG_ENV: &str = container::helper::HELPER_LOG_ENV;

fn main() {
    if container::helper::invoked() {
        // No runtime, no threads: see container::helper for why.
        init_logging(
            std::env::var(container::helper::HELPER_LOG_ENV)
                .ok()
                .as_deref(),
        );
        std::process::exit(container::helper::serve());
    }
    let started = std::time::Instant::now();
    if init::is_pid1() {
        // A panic of PID 1 is the agent's own failure too: say so on the status port before
        // the default hook prints it and the process ends.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            init::report_failure();
        }));
    }
    let result = if init::is_pid1() {
        run_as_init(started)
    } else {
        run_as_process()
    };
    if let Err(e) = result {
        // Plain stderr (the console as PID 1): logging may not be set up yet. As PID 1 this
        // exit panics the guest kernel; the status port tells the host it was our failure.
        eprintln!("husk-agent: error: {e:#}");
        init::report_failure();
        std::process::exit(1);
    }
}

/// One subscriber for the whole binary: compact lines on stderr (the console as PID 1).
///
/// The writer is a close-on-exec duplicate of stderr taken now, not fd 2: libcontainer logs
/// from the container processes it forks after it has moved the container's stdio onto
/// fds 0–2, and those lines belong on the console, never in the container's output.
fn init_logging(level: Option<&str>) {
    use std::os::fd::AsFd as _;
    let parsed = level.map(str::parse::<LevelFilter>);
    let console = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .map(std::sync::Arc::new);
    let builder = tracing_subscriber::fmt();
    let builder = match console {
        Ok(file) => builder.with_writer(tracing_subscriber::fmt::writer::BoxMakeWriter::new(file)),
        Err(_) => builder.with_writer(tracing_subscriber::fmt::writer::BoxMakeWriter::new(
            std::io::stderr,
        )),
    };
    builder
        .with_ansi(false)
        .without_time()
        .with_max_level(match parsed {
            Some(Ok(l)) => l,
            _ => LevelFilter::INFO,
        })
        .init();
    if let Some(Err(_)) = parsed {
        warn!(level, "unknown log level; using info");
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Cannot create the async runtime")
}

/// Seconds since boot from /proc/uptime, as milliseconds (for the one "ready" line).
fn uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    // Truncation is fine: a log value.
    Some((secs * 1000.0) as u64)
}

fn run_as_init(started: std::time::Instant) -> anyhow::Result<()> {
    // Order matters: /dev before the console, /proc before the command line.
    let mounted = mount::mount_base();
    let console = init::attach_console();
    let cmdline = KernelCmdline::read();
    init_logging(cmdline.log_level.as_deref());
    console.context("Console setup failed")?;
    mounted.context("Base mounts failed")?;
    init::report_cmdline(&cmdline);
    let port = StatusPort::open().context("No access to the status port")?;
    // The pod's containers share the guest's network namespace: its loopback is theirs.
    net::loopback_up().context("Cannot configure the guest's network")?;
    port.announce(Status::Started);
    if cmdline.test_fault == Some(TestFault::FailInit) {
        anyhow::bail!("test fault fail_init: the init duties fail before ready");
    }

    runtime()?.block_on(async {
        let shutdown = Arc::new(Notify::new());
        let server = AgentServer::start(ListenAddr::default(), shutdown.clone()).await?;
        port.announce(Status::Ready);
        info!(
            uptime_ms = uptime_ms(),
            agent_ms = started.elapsed().as_millis(),
            "husk-agent ready"
        );
        if cmdline.test_fault == Some(TestFault::ExitAfterReady) {
            warn!("test fault exit_after_ready: init exits");
            std::process::exit(1);
        }
        tokio::spawn(reaper::run());
        wait_for_stop(&shutdown, false).await?;
        server.stop().await;
        anyhow::Ok(())
    })?;
    init::power_off(&port)
}

fn run_as_process() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen = ListenAddr::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().context(USAGE)?;
                listen = value.parse()?;
            }
            "--version" => {
                println!("husk-agent {}", rpc::AGENT_VERSION);
                return Ok(());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("Unknown argument {other:?}\n{USAGE}"),
        }
    }
    init_logging(std::env::var(LOG_ENV).ok().as_deref());
    // Container processes outlive the helper that made them; they must come to us, not to
    // the host's init, for the reaper to report their exits.
    nix::sys::prctl::set_child_subreaper(true).context("Cannot become a child subreaper")?;

    runtime()?.block_on(async {
        tokio::spawn(reaper::run());
        let shutdown = Arc::new(Notify::new());
        let server = AgentServer::start(listen.clone(), shutdown.clone()).await?;
        info!(%listen, "husk-agent ready (not PID 1: no mounts, no reboot)");
        wait_for_stop(&shutdown, true).await?;
        server.stop().await;
        info!("husk-agent stopped");
        Ok(())
    })
}

/// Waits for the `Shutdown` RPC or SIGTERM (and SIGINT when `interactive`).
async fn wait_for_stop(shutdown: &Notify, interactive: bool) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("Cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("Cannot watch SIGINT")?;
    loop {
        tokio::select! {
            _ = shutdown.notified() => return Ok(()),
            _ = sigterm.recv() => {
                info!("SIGTERM: shutting down");
                return Ok(());
            }
            _ = sigint.recv() => {
                if interactive {
                    return Ok(());
                }
                // PID 1 gets SIGINT for ctrl-alt-del; the host stops guests with Shutdown.
            }
        }
    }
}
