//! A booted guest with a sandbox, for the container component tests.
//!
//! [`Pod::boot`] builds a share directory on the host (what the shim will make of containerd's
//! rootfs mounts), starts a real virtiofsd on it, boots the production initramfs with a
//! virtio-fs device, connects to the agent and creates a sandbox whose share is the virtio-fs
//! tag. The share holds:
//! * `bb/rootfs` — a copy of the busybox tree `cargo xtask test` builds (`$HUSK_TEST_ROOTFS`);
//! * `c1` … `c9` — symlinks to `bb`, so containers `c1`…`c9` find `<id>/rootfs`;
//! * `escape-abs/rootfs` → `/` and `escape-rel/rootfs` → `../../..`: rootfs symlinks that
//!   leave the share, which the agent must refuse;
//! * `vol/hello.txt` — a volume for bind mounts.
//!
//! [`spec`] builds the OCI spec of a busybox container; [`Pod::run`] creates and starts one
//! with its stdio streams attached and collects its output and exit.

use std::fs;
use std::os::unix::fs::symlink;
use std::time::Duration;

use husk_shim::agent::{
    open_stdio_stream_at, AgentClient, CreateSandboxRequest, GuestStream, ShareSource, StdioConfig,
    StreamHeader, StreamKind,
};
use husk_shim::config::CachePolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::required_path;
use crate::virtiofsd::Virtiofsd;
use crate::vm::{Vm, VmOptions};

/// The virtio-fs tag of the share.
pub const SHARE_TAG: &str = "husk";
/// Container ids whose rootfs is the busybox tree.
const CONTAINER_IDS: std::ops::RangeInclusive<u32> = 1..=9;
/// The agent's ttrpc port.
const AGENT_PORT: u32 = 1024;
/// Generous: containers start slowly under nested emulation.
pub const WAIT: Duration = Duration::from_secs(120);

/// Default capabilities of a container (Docker's set).
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The OCI process object for `args` (root, busybox PATH, default capabilities).
pub fn process(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm", "HOME=/root"],
        "cwd": "/",
        "capabilities": {
            "bounding": DEFAULT_CAPS,
            "effective": DEFAULT_CAPS,
            "permitted": DEFAULT_CAPS,
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true,
    })
}

/// A busybox container spec running `args`: its own pid, ipc, uts and mount namespaces,
/// read-only rootfs, the usual masked and read-only paths, a writable /tmp.
pub fn spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process(args),
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "container",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "resources": {"pids": {"limit": 128}},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    })
}

/// Output and exit of a finished process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Everything on stdout.
    pub stdout: Vec<u8>,
    /// Everything on stderr.
    pub stderr: Vec<u8>,
    /// Exit status (128 + signal when killed).
    pub status: i32,
}

/// The host ends of one process's streams.
#[derive(Default)]
pub struct Streams {
    /// stdin (or the tty stream).
    pub stdin: Option<Box<dyn GuestStream>>,
    /// stdout.
    pub stdout: Option<Box<dyn GuestStream>>,
    /// stderr.
    pub stderr: Option<Box<dyn GuestStream>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .finish()
    }
}

/// Builds the share directory described in the module documentation.
fn build_share() -> tempfile::TempDir {
    let share = tempfile::Builder::new()
        .prefix("husk-test-share")
        .tempdir()
        .expect("temp dir");
    let root = share.path();
    let rootfs = required_path("HUSK_TEST_ROOTFS");
    fs::create_dir(root.join("bb")).expect("mkdir bb");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&rootfs)
        .arg(root.join("bb/rootfs"))
        .status()
        .expect("run cp");
    assert!(st.success(), "cp -a {} failed: {st}", rootfs.display());
    for i in CONTAINER_IDS {
        symlink("bb", root.join(format!("c{i}"))).expect("symlink");
    }
    for (dir, target) in [("escape-abs", "/"), ("escape-rel", "../../..")] {
        fs::create_dir(root.join(dir)).expect("mkdir");
        symlink(target, root.join(dir).join("rootfs")).expect("symlink");
    }
    fs::create_dir(root.join("vol")).expect("mkdir vol");
    fs::write(root.join("vol/hello.txt"), "hello from the share\n").expect("write");
    share
}

/// The valid `CreateSandbox` request [`Pod::boot`] sends: hostname, hosts, resolv.conf and
/// the virtio-fs share.
pub fn sandbox_request() -> CreateSandboxRequest {
    CreateSandboxRequest {
        hostname: "husk-test".into(),
        hosts: b"127.0.0.1 localhost\n".to_vec(),
        resolv_conf: b"nameserver 10.0.2.3\n".to_vec(),
        share: Some(ShareSource {
            virtiofs_tag: SHARE_TAG.into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// A booted guest with a sandbox.
#[derive(Debug)]
pub struct Pod {
    /// The VM.
    pub vm: Vm,
    /// The agent.
    pub client: AgentClient,
    /// The daemon serving the share.
    pub virtiofsd: Virtiofsd,
    /// virtiofsd's socket and log.
    _fs_dir: tempfile::TempDir,
    /// The share (removed last).
    pub share: tempfile::TempDir,
}

impl Pod {
    /// Builds the share, starts virtiofsd, boots the guest and creates the sandbox.
    pub async fn boot(mem_mib: u32) -> Pod {
        let share = build_share();
        let opts = VmOptions {
            mem_mib,
            ..Default::default()
        };
        let (vm, (virtiofsd, fs_dir)) = Vm::boot_with(&opts, |opts| {
            let dir = tempfile::Builder::new()
                .prefix("husk-test-fs")
                .tempdir()
                .expect("temp dir");
            let daemon = Virtiofsd::start(share.path(), dir.path(), CachePolicy::Auto);
            opts.fs = Some((daemon.socket.clone(), SHARE_TAG.into()));
            (daemon, dir)
        });
        let client = match AgentClient::connect(&vm.endpoint, AGENT_PORT, WAIT).await {
            Ok(c) => c,
            Err(e) => panic!("agent did not answer: {e}\n{}", vm.diagnostics()),
        };
        let pod = Pod {
            vm,
            client,
            virtiofsd,
            _fs_dir: fs_dir,
            share,
        };
        pod.client
            .create_sandbox(&sandbox_request())
            .await
            .unwrap_or_else(|e| panic!("CreateSandbox: {e}\n{}", pod.diagnostics()));
        pod
    }

    /// The VM's diagnostics and virtiofsd's log.
    pub fn diagnostics(&self) -> String {
        format!(
            "{}\n--- virtiofsd log:\n{}",
            self.vm.diagnostics(),
            self.virtiofsd.log()
        )
    }

    /// Opens the streams `stdio` declares for (container, exec).
    pub async fn open_streams(&self, cid: &str, eid: &str, stdio: &StdioConfig) -> Streams {
        let open = |kind| {
            let header = StreamHeader {
                container_id: cid.into(),
                exec_id: eid.into(),
                kind,
            };
            let endpoint = self.vm.endpoint.clone();
            async move {
                open_stdio_stream_at(&endpoint, &header)
                    .await
                    .unwrap_or_else(|e| panic!("stdio stream {kind:?}: {e}"))
            }
        };
        let mut s = Streams::default();
        if stdio.tty {
            s.stdin = Some(open(StreamKind::Tty).await);
            return s;
        }
        if stdio.stdin {
            s.stdin = Some(open(StreamKind::Stdin).await);
        }
        if stdio.stdout {
            s.stdout = Some(open(StreamKind::Stdout).await);
        }
        if stdio.stderr {
            s.stderr = Some(open(StreamKind::Stderr).await);
        }
        s
    }

    /// Creates container `cid` from `spec` with `stdio`, opening its streams first.
    pub async fn create(&self, cid: &str, spec: &serde_json::Value, stdio: StdioConfig) -> Streams {
        let streams = self.open_streams(cid, "", &stdio).await;
        let json = serde_json::to_vec(spec).expect("spec JSON");
        self.client
            .create_container(cid, json, stdio)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {cid}: {e}\n{}", self.diagnostics()));
        streams
    }

    /// Runs `spec` as container `cid` with stdout and stderr, feeding `stdin` (then EOF)
    /// if given, and returns everything it wrote and its status. Removes it afterwards.
    pub async fn run(
        &self,
        cid: &str,
        spec: &serde_json::Value,
        stdin: Option<Vec<u8>>,
    ) -> Outcome {
        let stdio = StdioConfig {
            stdin: stdin.is_some(),
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let streams = self.create(cid, spec, stdio).await;
        self.client
            .start_container(cid)
            .await
            .unwrap_or_else(|e| panic!("StartContainer {cid}: {e}\n{}", self.diagnostics()));
        let outcome = self.collect(cid, "", streams, stdin).await;
        self.client
            .remove_container(cid, false)
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer {cid}: {e}"));
        outcome
    }

    /// Feeds `stdin`, reads stdout and stderr to EOF and waits for the process.
    pub async fn collect(
        &self,
        cid: &str,
        eid: &str,
        streams: Streams,
        stdin: Option<Vec<u8>>,
    ) -> Outcome {
        // A stdin that breaks is reported after WaitProcess, with the VM's diagnostics: a
        // broken pipe alone cannot tell a dead guest from a closed stream.
        let feeder = tokio::spawn(async move {
            if let (Some(mut s), Some(data)) = (streams.stdin, stdin) {
                s.write_all(&data)
                    .await
                    .map_err(|e| format!("write stdin: {e}"))?;
                s.shutdown()
                    .await
                    .map_err(|e| format!("half-close stdin: {e}"))?;
                // Keep the stream open until the peer closes (the guest may still answer).
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            }
            Ok::<(), String>(())
        });
        let read_all = |s: Option<Box<dyn GuestStream>>| {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if let Some(mut s) = s {
                    s.read_to_end(&mut buf)
                        .await
                        .map_err(|e| format!("read output stream: {e}"))?;
                }
                Ok::<Vec<u8>, String>(buf)
            })
        };
        let out = read_all(streams.stdout);
        let err = read_all(streams.stderr);
        let wait = match self.client.wait_process(cid, eid, WAIT).await {
            Ok(wait) => wait,
            Err(e) => {
                let stdin = if feeder.is_finished() {
                    format!("{:?}", feeder.await.expect("stdin task"))
                } else {
                    "still open".into()
                };
                panic!(
                    "WaitProcess {cid}/{eid}: {e} (stdin: {stdin})\n{}",
                    self.diagnostics()
                )
            }
        };
        if let Err(e) = feeder.await.expect("stdin task") {
            panic!("{cid}/{eid}: {e}\n{}", self.diagnostics());
        }
        let output = |r: Result<Vec<u8>, String>| {
            r.unwrap_or_else(|e| panic!("{cid}/{eid}: {e}\n{}", self.diagnostics()))
        };
        Outcome {
            stdout: output(out.await.expect("stdout task")),
            stderr: output(err.await.expect("stderr task")),
            status: wait.exit_status,
        }
    }

    /// Shuts the guest down cleanly.
    pub async fn shutdown(mut self) {
        self.client.destroy_sandbox().await.expect("DestroySandbox");
        self.client.shutdown().await.expect("Shutdown");
        match self.vm.wait_exit(Duration::from_secs(60)) {
            Some(st) if st.success() => {}
            other => panic!("VM did not exit cleanly: {other:?}\n{}", self.diagnostics()),
        }
    }
}
