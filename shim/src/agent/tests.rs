//! The client against the real agent server (`husk-agent --listen unix:PATH`), reached
//! through a test-only hybrid vsock endpoint that does the `CONNECT`/`OK` handshake and
//! splices to the agent's socket. The endpoint is scaffolding for the client's logic (retry,
//! handshake, RPCs); the evidence that the real VMM path works comes from booting a guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use husk_agent_api::API_REVISION;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::*;

/// Overrides where the agent binary is (otherwise it is built with cargo).
const AGENT_BIN_ENV: &str = "HUSK_AGENT_BIN";
/// Bound on every test's waiting.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// The `husk-agent` binary: `$HUSK_AGENT_BIN`, or built now into this test's target dir.
fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os(AGENT_BIN_ENV) {
            return PathBuf::from(path);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "husk-agent",
            "--bin",
            "husk-agent",
        ]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build -p husk-agent");
        assert!(status.success(), "cargo build -p husk-agent failed");
        // <target>/<profile>/deps/<this test> → <target>/<profile>/husk-agent
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
        profile_dir.join("husk-agent")
    })
}

/// A running `husk-agent --listen unix:…`, killed when dropped.
struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    fn start(socket: &Path) -> anyhow::Result<Self> {
        let child = Command::new(agent_binary())
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .spawn()
            .context("spawn husk-agent")?;
        Ok(Self { child })
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < until,
                "husk-agent still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the fake endpoint answers after `CONNECT <port>\n`.
#[derive(Clone, Copy)]
enum Reply {
    /// Like the VMM: splice to the agent socket if it accepts, else close.
    Splice,
    /// A fixed (bad) reply.
    Fixed(&'static [u8]),
    /// No reply; the connection stays open.
    Silent,
}

/// A test-only hybrid vsock endpoint at `uds`, forwarding guest port `AGENT_VSOCK_PORT` to
/// the agent's Unix socket `agent`.
fn fake_hybrid_vsock(uds: &Path, agent: &Path, reply: Reply) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(uds).expect("bind fake hybrid vsock socket");
    let agent = agent.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((mut host, _)) = listener.accept().await else {
                return;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while line.len() < 64 {
                    match host.read(&mut byte).await {
                        Ok(1) if byte[0] == b'\n' => break,
                        Ok(1) => line.push(byte[0]),
                        _ => return,
                    }
                }
                let wanted = format!("CONNECT {AGENT_VSOCK_PORT}");
                match reply {
                    Reply::Fixed(bytes) => {
                        let _ = host.write_all(bytes).await;
                    }
                    Reply::Silent => {
                        std::future::pending::<()>().await;
                    }
                    Reply::Splice if line == wanted.as_bytes() => {
                        // Guest port not listening: close without a reply, as the VMM does.
                        let Ok(mut guest) = UnixStream::connect(&agent).await else {
                            return;
                        };
                        if host.write_all(b"OK 1073741824\n").await.is_ok() {
                            let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
                        }
                    }
                    Reply::Splice => {}
                }
            });
        }
    })
}

fn deadline() -> Instant {
    Instant::now() + TEST_DEADLINE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_rpcs_against_the_real_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("vsock.sock");
    let agent_sock = dir.path().join("agent.sock");
    let binary = tokio::task::spawn_blocking(agent_binary).await?;
    ensure!(binary.exists(), "no agent binary at {}", binary.display());

    // The endpoint exists first and the agent starts late: the client must retry through
    // "VMM closes the connection" until the agent listens.
    let _endpoint = fake_hybrid_vsock(&uds, &agent_sock, Reply::Splice);
    let connecting = tokio::spawn({
        let uds = uds.clone();
        async move { AgentClient::connect(&uds, AGENT_VSOCK_PORT, deadline()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut agent = AgentProcess::start(&agent_sock)?;
    let client = connecting.await??;

    client.check().await?;

    let version = client.version().await?;
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_revision, API_REVISION);

    let details = client.guest_details().await?;
    let uname = nix::sys::utsname::uname()?;
    assert_eq!(details.kernel_release, uname.release().to_string_lossy());
    assert_eq!(details.agent_version, version.agent_version);
    let online = std::thread::available_parallelism()?.get();
    assert!(details.online_cpus as usize >= online, "{details:?}");
    assert!(details.memory_total_bytes > 64 << 20, "{details:?}");
    assert!(details.memory_available_bytes <= details.memory_total_bytes);

    client.shutdown().await?;
    let status = tokio::task::spawn_blocking(move || {
        let status = agent.wait_exit(Duration::from_secs(10));
        (agent, status)
    })
    .await?
    .1?;
    assert!(status.success(), "agent exit: {status}");
    assert!(!agent_sock.exists(), "agent left its socket behind");

    // The connection is gone with the agent.
    match client.check().await {
        Err(AgentError::Transport { .. } | AgentError::Timeout { .. }) => {}
        other => panic!("check after shutdown: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn missing_socket_is_retried_until_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let limit = Duration::from_millis(300);
    let err = AgentClient::connect(
        &dir.path().join("absent"),
        AGENT_VSOCK_PORT,
        started + limit,
    )
    .await
    .unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= limit && waited < limit + Duration::from_secs(1),
        "{waited:?}"
    );
    match &err {
        AgentError::Unreachable { attempts, last, .. } => {
            assert!(*attempts > 2, "{err:?}");
            assert!(
                matches!(last.as_deref(), Some(AgentError::Connect { .. })),
                "{err:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn guest_not_listening_is_retried_until_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let _endpoint = fake_hybrid_vsock(&uds, &dir.path().join("no-agent"), Reply::Splice);
    // A deadline can also be given as a duration from now.
    let err = AgentClient::connect(&uds, AGENT_VSOCK_PORT, Duration::from_millis(300))
        .await
        .unwrap_err();
    match &err {
        AgentError::Unreachable { last, .. } => assert!(
            matches!(
                last.as_deref(),
                Some(AgentError::Handshake {
                    source: HandshakeError::Closed { received: 0 },
                    ..
                })
            ),
            "{err:?}"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_handshake_reply_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let _endpoint = fake_hybrid_vsock(&uds, &dir.path().join("x"), Reply::Fixed(b"NOPE\n"));
    let started = Instant::now();
    let err = AgentClient::connect(&uds, AGENT_VSOCK_PORT, deadline())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(
            err,
            AgentError::Handshake {
                source: HandshakeError::Rejected(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn silent_endpoint_times_out_per_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let _endpoint = fake_hybrid_vsock(&uds, &dir.path().join("x"), Reply::Silent);
    let config = ClientConfig {
        attempt_timeout: Duration::from_millis(100),
        ..ClientConfig::default()
    };
    let err = AgentClient::connect_with(
        &uds,
        AGENT_VSOCK_PORT,
        Instant::now() + Duration::from_millis(500),
        config,
    )
    .await
    .unwrap_err();
    match &err {
        AgentError::Unreachable { attempts, last, .. } => {
            assert!(*attempts >= 2, "{err:?}");
            assert!(
                matches!(last.as_deref(), Some(AgentError::HandshakeTimeout(_))),
                "{err:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}
