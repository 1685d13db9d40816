//! A private, real containerd for the end-to-end tests, driven with `ctr`.
//!
//! [`Containerd::start`] runs Debian's `/usr/bin/containerd` with its own configuration, root,
//! state and sockets in a temp dir (the CRI plugin disabled: `ctr` needs none of it and it slows
//! the start), imports the busybox OCI image xtask built (`$HUSK_TEST_IMAGE`) and hands out
//! [`Containerd::ctr`] with the right `--address` and namespace. The runtime under test comes
//! from `$HUSK_TEST_RUNTIME`: `io.containerd.husk.v2` (the default; the shim binary is
//! `$HUSK_SHIM`, its directory is put first on containerd's `PATH`, and `HUSK_CONFIG` names a
//! husk.toml written from `$HUSK_KERNEL`, `$HUSK_INITRD`, `$HUSK_VMM` and `$HUSK_VIRTIOFSD`)
//! or `io.containerd.runc.v2`, which needs no VM and proves the harness itself.
//!
//! One fixture lives at a time in a test binary (a global lock), so [`Containerd::leftovers`]
//! can name everything that appeared since the fixture started and was not cleaned: husk and
//! shim processes, mounts under the temp dir or `/run/husk`, `/run/husk` entries, shim sockets,
//! bundles and runc state. On drop the fixture removes every task and container it can, stops
//! containerd, kills what it leaked, unmounts and removes the temp dir; when the test failed it
//! prints the tail of containerd's log first.

mod config;
mod events;
mod leftovers;

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use config::{containerd_config, husk_config_text, CriConfig};
pub use events::Event;
pub use leftovers::{pod_processes, Leftovers, Proc, Snapshot, POD_PROGRAMS};

use crate::required_path;

/// Debian's containerd.
pub const CONTAINERD: &str = "/usr/bin/containerd";
/// Debian's ctr.
pub const CTR: &str = "/usr/bin/ctr";
/// The variable choosing the runtime under test.
pub const RUNTIME_ENV: &str = "HUSK_TEST_RUNTIME";
/// husk's runtime (the shim binary `containerd-shim-husk-v2`).
pub const HUSK_RUNTIME: &str = "io.containerd.husk.v2";
/// containerd's default runtime, for validating the harness without a VM.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The shim binary of [`HUSK_RUNTIME`].
pub const HUSK_SHIM_BINARY: &str = "containerd-shim-husk-v2";
/// The image archive xtask builds, and the name it is imported under.
pub const TEST_IMAGE_ENV: &str = "HUSK_TEST_IMAGE";
/// See [`TEST_IMAGE_ENV`].
pub const IMAGE: &str = "docker.io/library/husk-busybox:test";
/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "husk-test";
/// The containerd namespace of the CRI plugin (Kubernetes' pods).
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The pod sandbox image xtask builds into the same archive (`xtask/src/image.rs`).
pub const PAUSE_IMAGE: &str = "docker.io/library/husk-pause:test";
/// Where Debian's containernetworking-plugins installs the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The bridge the CRI fixture's CNI network uses (made before the fixture's baseline, removed
/// when it ends, like a node's `cni0`).
pub const CNI_BRIDGE: &str = "husk-cni0";
/// The CRI fixture's pod network.
pub const CNI_SUBNET: &str = "10.88.7.0/24";
/// Where the husk shim keeps per-sandbox state on the host (DESIGN.md "Rootfs and volumes").
pub const HUSK_RUN_DIR: &str = "/run/husk";
/// How long containerd may take to answer after start (the lab is slow).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default limit for one `ctr` invocation: long enough for a VM boot in the lab.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(240);
/// How long containerd gets to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Lines of containerd's log shown when a test fails.
const LOG_TAIL_LINES: usize = 60;
/// `PATH` entries containerd needs besides the shim's directory (runc is in /usr/sbin).
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One fixture at a time per test binary: leftovers are judged globally.
static SERIAL: Mutex<()> = Mutex::new(());

/// The runtime under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `io.containerd.husk.v2`: every pod is a husk VM.
    Husk,
    /// `io.containerd.runc.v2`: plain runc, to prove the harness.
    Runc,
}

impl Runtime {
    /// The runtime named by `$HUSK_TEST_RUNTIME` (default husk); panics on anything else.
    pub fn from_env() -> Runtime {
        match std::env::var(RUNTIME_ENV).as_deref() {
            Err(_) | Ok("") | Ok(HUSK_RUNTIME) => Runtime::Husk,
            Ok(RUNC_RUNTIME) => Runtime::Runc,
            Ok(other) => {
                panic!("{RUNTIME_ENV}={other}: expected {HUSK_RUNTIME} (default) or {RUNC_RUNTIME}")
            }
        }
    }

    /// The shim binary containerd starts for the runtime.
    pub fn shim_binary(self) -> &'static str {
        match self {
            Runtime::Husk => HUSK_SHIM_BINARY,
            Runtime::Runc => "containerd-shim-runc-v2",
        }
    }

    /// containerd's name of the runtime (`ctr run --runtime`).
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Husk => HUSK_RUNTIME,
            Runtime::Runc => RUNC_RUNTIME,
        }
    }
}

/// A running private containerd with the test image imported.
#[derive(Debug)]
pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    address: PathBuf,
    runtime: Runtime,
    snapshotter: String,
    baseline: Snapshot,
    events: Option<Child>,
    /// The containerd namespace: [`NAMESPACE`], or [`CRI_NAMESPACE`] with the CRI plugin on.
    namespace: &'static str,
    /// The CRI plugin is on (and [`CNI_BRIDGE`] exists).
    cri: bool,
    _serial: MutexGuard<'static, ()>,
}

impl Containerd {
    /// Starts containerd for the runtime in `$HUSK_TEST_RUNTIME` and imports the test image.
    pub fn start() -> Containerd {
        Self::start_with(Runtime::from_env())
    }

    /// Starts containerd for `runtime` and imports the test image.
    pub fn start_with(runtime: Runtime) -> Containerd {
        Self::start_inner(runtime, false)
    }

    /// Starts containerd with its CRI plugin on (runtime handlers `runc` and `husk`, a CNI
    /// bridge network from Debian's plugins), the test and pause images imported into the CRI
    /// namespace. The CRI client is the CRI tests' (`tests/cri/client.rs`); `runtime` only
    /// decides which helper binaries must exist.
    pub fn start_cri(runtime: Runtime) -> Containerd {
        Self::start_inner(runtime, true)
    }

    fn start_inner(runtime: Runtime, cri: bool) -> Containerd {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let image = required_path(TEST_IMAGE_ENV);
        let dir = tempfile::Builder::new()
            .prefix("husk-ctrd-")
            .tempdir()
            .expect("temp dir for containerd");
        let address = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        let namespace = if cri { CRI_NAMESPACE } else { NAMESPACE };
        let husk_config = dir.path().join("husk.toml");
        let cri_config = cri.then(|| {
            let conf_dir = dir.path().join("cni");
            fs::create_dir_all(&conf_dir).expect("CNI conf dir");
            fs::write(
                conf_dir.join("10-husk.conflist"),
                cni_conflist(&dir.path().join("cni-ipam")),
            )
            .expect("write the CNI config");
            assert!(
                Path::new(CNI_BIN_DIR).join("bridge").is_file(),
                "{CNI_BIN_DIR}/bridge is missing (apt package containernetworking-plugins, \
                 installed by `cargo xtask setup`)"
            );
            make_bridge();
            CriConfig {
                sandbox_image: PAUSE_IMAGE.into(),
                cni_bin_dir: CNI_BIN_DIR.into(),
                cni_conf_dir: conf_dir.display().to_string(),
                husk_config: husk_config.display().to_string(),
            }
        });
        fs::write(&config, containerd_config(dir.path(), cri_config.as_ref()))
            .expect("write config.toml");

        let mut path = OsString::new();
        let mut env: Vec<(String, OsString)> = Vec::new();
        if runtime == Runtime::Husk {
            let shim = required_path("HUSK_SHIM");
            assert!(
                shim.file_name().is_some_and(|n| n == HUSK_SHIM_BINARY),
                "HUSK_SHIM={} must name the {HUSK_SHIM_BINARY} binary (containerd finds it by name)",
                shim.display()
            );
            let shim_dir = shim.parent().expect("shim directory");
            path.push(shim_dir);
            path.push(":");
            fs::write(&husk_config, husk_config_text(dir.path())).expect("write husk.toml");
            env.push(("HUSK_CONFIG".into(), husk_config.into_os_string()));
        }
        if let Some(p) = std::env::var_os("PATH") {
            path.push(p);
            path.push(":");
        }
        path.push(SYSTEM_PATH);
        env.push(("PATH".into(), path));

        let baseline = Snapshot::take(dir.path(), namespace);
        let log = fs::File::create(dir.path().join("containerd.log")).expect("containerd.log");
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(&config)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CONTAINERD} (apt package containerd): {e}"));
        let mut c = Containerd {
            dir,
            child: Some(child),
            address,
            runtime,
            snapshotter: "overlayfs".into(),
            baseline,
            events: None,
            namespace,
            cri,
            _serial: serial,
        };
        c.wait_ready();
        c.events = Some(c.record_events());
        c.snapshotter = c.pick_snapshotter();
        let out = c.ctr(&[
            "images",
            "import",
            "--snapshotter",
            &c.snapshotter.clone(),
            &image.display().to_string(),
        ]);
        assert_ok(&out, "ctr images import");
        let listed = c.ctr_ok(&["images", "ls", "-q"]);
        for name in [IMAGE, PAUSE_IMAGE] {
            assert!(
                listed.lines().any(|l| l == name),
                "{name} not among the imported images: {listed:?}"
            );
        }
        c
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "containerd exited during start ({st}); log:\n{}",
                    self.log_tail()
                );
            }
            if self.address.exists() {
                let out = self.ctr_timeout(&["version"], Duration::from_secs(20));
                if out.status.success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within {READY_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// overlayfs when containerd's overlay snapshotter loaded (needs a file system overlayfs
    /// accepts as upper, e.g. tmpfs or ext4), else `native` (plain copies), said loudly.
    fn pick_snapshotter(&self) -> String {
        let plugins = self.ctr_ok(&["plugins", "ls"]);
        let overlay_ok = plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1")
                && f.get(1) == Some(&"overlayfs")
                && f.last() == Some(&"ok")
        });
        if overlay_ok {
            "overlayfs".into()
        } else {
            eprintln!(
                "containerd fixture: the overlayfs snapshotter is not usable on {}; \
                 FALLING BACK to the native snapshotter",
                self.dir.path().display()
            );
            "native".into()
        }
    }

    /// `ctr events`, running for the fixture's life, into `events.log`.
    fn record_events(&self) -> Child {
        let log = fs::File::create(self.dir.path().join("events.log")).expect("events.log");
        let mut cmd = self.ctr_command(&["events"]);
        cmd.stdout(log).stderr(Stdio::null());
        cmd.spawn().expect("ctr events")
    }

    /// The events of the test namespace containerd published so far, oldest first.
    pub fn events(&self) -> Vec<Event> {
        fs::read_to_string(self.dir.path().join("events.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(Event::parse)
            .filter(|e| e.namespace == self.namespace)
            .collect()
    }

    /// Waits until an event with `topic` (e.g. `/tasks/start`) names `container_id`, and
    /// returns the first such; fails the test after `timeout`.
    pub fn wait_event(&self, topic: &str, container_id: &str, timeout: Duration) -> Event {
        self.wait_event_where(topic, timeout, |e| e.container_id() == Some(container_id))
    }

    /// Waits for the `/tasks/exit` of `container_id`'s process `exec_id` (`""`: its init).
    pub fn wait_exit(&self, container_id: &str, exec_id: &str, timeout: Duration) -> Event {
        let process = if exec_id.is_empty() {
            container_id
        } else {
            exec_id
        };
        self.wait_event_where("/tasks/exit", timeout, |e| {
            e.container_id() == Some(container_id) && e.body["id"].as_str() == Some(process)
        })
    }

    /// Waits until an event with `topic` satisfies `pred`; fails the test after `timeout`.
    pub fn wait_event_where(
        &self,
        topic: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .events()
                .into_iter()
                .find(|e| e.topic == topic && pred(e))
            {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no matching {topic} event within {timeout:?}; events:\n{}",
                self.events()
                    .iter()
                    .map(|e| format!("  {} {}", e.topic, e.body))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The runtime under test.
    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// The containerd namespace the fixture's containers live in.
    pub fn namespace(&self) -> &'static str {
        self.namespace
    }

    /// The snapshotter in use (`overlayfs`, or `native` when overlay is impossible).
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// The fixture's temp dir (config, root, state, sockets, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// A `ctr` command with `--address` and `--namespace` set; stdin null unless changed.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR);
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(self.namespace)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr args…` to completion (limit [`CTR_TIMEOUT`]) and returns its output.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_timeout(args, CTR_TIMEOUT)
    }

    /// [`Containerd::ctr`] with a chosen limit; a `ctr` still running then is killed and
    /// the test fails.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        self.ctr_with(args, None, timeout)
    }

    /// Runs `ctr args…` with `stdin`. A `ctr run` whose pod's guest was lost before its agent
    /// answered (the shim's error says so; [`lab_retry`](crate::lab_retry) decides) is run
    /// again, loudly, after deleting what the failed attempt left in containerd. Nothing else
    /// is retried.
    fn ctr_with(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Output {
        loop {
            let out =
                output_with_timeout(self.ctr_command(args), stdin.map(<[u8]>::to_vec), timeout)
                    .unwrap_or_else(|e| panic!("ctr {}: {e}", args.join(" ")));
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lost = self.runtime == Runtime::Husk
                && args.first() == Some(&"run")
                && !out.status.success()
                && crate::lab_retry::shim_error_is_early_guest_loss(&stderr);
            if !lost {
                return out;
            }
            let what = format!("ctr {}", args.join(" "));
            if let Err(why) = crate::lab_retry::take_guest_retry(&what, stderr.trim()) {
                eprintln!("{what}: the pod's guest was lost before its agent answered; {why}");
                return out;
            }
            if let Some(id) = args
                .iter()
                .position(|a| *a == IMAGE)
                .and_then(|i| args.get(i + 1))
            {
                let _ = self.ctr_try(&["containers", "delete", id], Duration::from_secs(60));
            }
        }
    }

    /// Runs `ctr args…`, fails the test unless it exits 0, and returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert_ok(&out, &format!("ctr {}", args.join(" ")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The arguments of `ctr run` up to and including the image and container id:
    /// `run --runtime R --snapshotter S <flags> IMAGE id`. Append the command.
    pub fn run_args<'a>(&'a self, flags: &[&'a str], id: &'a str) -> Vec<&'a str> {
        self.run_args_on(self.runtime, flags, id)
    }

    /// [`Containerd::run_args`] for another runtime in the same containerd (runc works in
    /// every fixture; husk only in one started for husk). The benchmark compares the two.
    pub fn run_args_on<'a>(
        &'a self,
        runtime: Runtime,
        flags: &[&'a str],
        id: &'a str,
    ) -> Vec<&'a str> {
        let mut v = vec![
            "run",
            "--runtime",
            runtime.name(),
            "--snapshotter",
            &self.snapshotter,
        ];
        v.extend_from_slice(flags);
        v.extend([IMAGE, id]);
        v
    }

    /// `ctr run <flags> IMAGE id argv…` to completion.
    pub fn run(&self, flags: &[&str], id: &str, argv: &[&str]) -> Output {
        let mut args = self.run_args(flags, id);
        args.extend_from_slice(argv);
        self.ctr(&args)
    }

    /// `ctr run <flags> IMAGE id argv…` with `stdin` written to ctr's stdin.
    pub fn run_with_stdin(&self, flags: &[&str], id: &str, argv: &[&str], stdin: &[u8]) -> Output {
        let mut args = self.run_args(flags, id);
        args.extend_from_slice(argv);
        self.ctr_with(&args, Some(stdin), CTR_TIMEOUT)
    }

    /// The status `ctr task ls` shows for `id` (`RUNNING`, `PAUSED`, `STOPPED`, …), if listed.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.ctr_ok(&["task", "ls"]).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.last().unwrap_or(&"").to_string())
        })
    }

    /// The host pid `ctr task ls` shows for `id`.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        self.ctr_ok(&["task", "ls"]).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(1)?.parse().ok())?
        })
    }

    /// Polls until `id`'s task has `status`; fails the test after `timeout`.
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.task_status(id);
            if now.as_deref() == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} is {now:?}, not {status}, after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What appeared since the fixture started and is still there (see [`Leftovers`]).
    pub fn leftovers(&self) -> Leftovers {
        Snapshot::take(self.dir.path(), self.namespace).since(&self.baseline)
    }

    /// Polls [`Containerd::leftovers`] until it is empty (cleanup is asynchronous: shims
    /// exit after their last task is deleted); fails the test with the list after `timeout`.
    pub fn assert_no_leftovers(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind after {timeout:?}:\n{left}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last lines of containerd's log (which also carries the shims' logs).
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        crate::vm::last_lines(&text, LOG_TAIL_LINES)
    }

    /// Removes every task and container of the namespace, as far as containerd lets us.
    fn remove_all(&self) {
        let quick = Duration::from_secs(60);
        let ids = |what: &str| -> Vec<String> {
            let out = self.ctr_try(&[what, "ls", "-q"], quick);
            String::from_utf8_lossy(&out.map(|o| o.stdout).unwrap_or_default())
                .lines()
                .map(str::to_owned)
                .collect()
        };
        for id in ids("tasks") {
            let _ = self.ctr_try(&["tasks", "kill", "--all", "-s", "SIGKILL", &id], quick);
            let _ = self.ctr_try(&["tasks", "delete", "--force", &id], quick);
        }
        for id in ids("containers") {
            let _ = self.ctr_try(&["containers", "delete", &id], quick);
        }
    }

    fn ctr_try(&self, args: &[&str], timeout: Duration) -> Option<Output> {
        output_with_timeout(self.ctr_command(args), None, timeout).ok()
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if wait_timeout(&mut child, STOP_TIMEOUT).is_none() {
            eprintln!(
                "containerd fixture: containerd ignored SIGTERM for {STOP_TIMEOUT:?}; killing it"
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- containerd log ({}) ---\n{}\n--- end of containerd log ---",
                self.dir.path().display(),
                self.log_tail()
            );
            let console = self.dir.path().join("guest-console.log");
            if let Ok(text) = fs::read_to_string(&console) {
                eprintln!(
                    "--- guest consoles ---\n{}\n--- end of guest consoles ---",
                    crate::vm::last_lines(&text, LOG_TAIL_LINES)
                );
            }
        }
        self.remove_all();
        if let Some(mut events) = self.events.take() {
            let _ = events.kill();
            let _ = events.wait();
        }
        self.stop();
        let left = self.leftovers();
        if !left.is_empty() {
            eprintln!("containerd fixture: cleaning up after the test:\n{left}");
        }
        left.kill_processes();
        leftovers::unmount_under(self.dir.path());
        if self.cri {
            remove_bridge();
        }
    }
}

/// The CRI fixture's CNI network (Debian's plugins): a bridge with the gateway address, addresses
/// from host-local (its state under `ipam_dir`), and hostPorts by portmap.
pub fn cni_conflist(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "husk-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": CNI_SUBNET }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir.display().to_string(),
                },
            },
            {
                // hostPort: DNAT (iptables, nf_tables in the lab) from the node's addresses
                // to the pod's IP.
                "type": "portmap",
                "capabilities": { "portMappings": true },
            },
        ],
    })
    .to_string()
}

/// Makes [`CNI_BRIDGE`] (CNI's bridge plugin would make it on the first pod, after the fixture's
/// baseline, and never remove it).
fn make_bridge() {
    remove_bridge();
    for args in [
        &["link", "add", "name", CNI_BRIDGE, "type", "bridge"][..],
        &["link", "set", CNI_BRIDGE, "up"][..],
    ] {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("run ip (iproute2)");
        assert_ok(&out, &format!("ip {}", args.join(" ")));
    }
}

fn remove_bridge() {
    let _ = Command::new("ip")
        .args(["link", "del", CNI_BRIDGE])
        .stderr(Stdio::null())
        .status();
}

/// Fails the test unless `out` is a success, quoting its output.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` with `stdin` (or /dev/null), collecting stdout and stderr; kills it after
/// `timeout` and returns an error then.
pub fn output_with_timeout(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Output, String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // ctr never closes the container's stdin at EOF (DESIGN.md): keep the pipe open
        // until ctr exits, so it cannot mistake an early close for anything.
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = pipe.write_all(&data);
            let _ = pipe.flush();
            std::thread::sleep(timeout);
        });
    }
    let reader = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let Some(status) = wait_timeout(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        return Err(format!(
            "still running after {timeout:?}; killed. stdout: {} stderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Waits for `child` up to `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}
