//! Starting and watching a real `husk-vmm` guest for tests.
//!
//! [`Vm::boot`] runs the husk-vmm binary with our kernel and initramfs, sends the guest console and
//! the VMM's log to files in a private temp dir, and waits until the VMM reports that the agent
//! announced itself ready. In the lab (`HUSK_KVM_MODE=lab`) the emulated SVM sometimes kills or
//! hangs a guest mid-boot (DESIGN.md, "Host facts"); such a guest, and only one that dies *before*
//! the agent is ready with a guest-side failure, may be booted again. Every retry is printed and
//! counts against a budget shared by the whole test binary. A failure the VMM itself reports
//! (exit status 1) is never retried.
//!
//! With `HUSK_TEST_VMM=qemu` the same guest boots under QEMU `-M microvm` instead (the lab
//! experiments' baseline, issue 8): its vsock device is the kernel's vhost-vsock, reached at the
//! guest's CID, and the agent's status port goes to a watcher that writes husk-vmm's own
//! `guest agent started` / `guest ready` lines into the VMM log, so every waiting and retry
//! decision reads one log either way.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use husk_shim::agent::VsockEndpoint;
use husk_shim::vmm::{host_tsc_khz, Console, QemuCommand, VmmCommand};

use crate::lab_retry::{self, EarlyEnd};
use crate::required_path;

/// The line husk-vmm logs when the agent writes "ready" to the boot port.
pub const READY_MARKER: &str = "guest ready boot_ms=";

/// husk-vmm exit statuses (docs/contracts.md).
pub mod status {
    /// Clean guest exit.
    pub const CLEAN: i32 = 0;
    /// VMM error.
    pub const VMM_ERROR: i32 = 1;
    /// Command-line usage error.
    pub const USAGE: i32 = 2;
    /// Guest panic.
    pub const GUEST_PANIC: i32 = 3;
    /// Stopped by a host signal.
    pub const STOPPED_BY_HOST: i32 = 4;
    /// The agent (or whatever runs as PID 1) failed before it was ready.
    pub const AGENT_FAILED: i32 = 5;
}

/// The environment variable that picks the VMM: `husk-vmm` (the default) or `qemu`.
pub const VMM_ENV: &str = "HUSK_TEST_VMM";
/// What the QEMU status watcher logs when QEMU ends without the agent's clean shutdown
/// after ready: with `reboot=t` and `-no-reboot`, a triple fault or a panic's reboot.
pub const QEMU_RESET_MARKER: &str =
    "qemu: the guest reset after ready without the agent's clean shutdown";

/// Which VMM runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Our own VMM.
    HuskVmm,
    /// QEMU `-M microvm` with vhost-vsock (the baseline).
    Qemu,
}

impl Backend {
    /// The backend `HUSK_TEST_VMM` names; husk-vmm when unset. Panics on any other value.
    pub fn from_env() -> Self {
        match std::env::var(VMM_ENV).as_deref() {
            Err(_) | Ok("") | Ok("husk-vmm") => Self::HuskVmm,
            Ok("qemu") => Self::Qemu,
            Ok(other) => panic!("{VMM_ENV}={other:?}: expected husk-vmm or qemu"),
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The VMM.
    pub backend: Backend,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Extra kernel command-line words.
    pub cmdline_extra: Option<String>,
    /// How long the guest may take to announce ready.
    pub ready_timeout: Duration,
    /// The initramfs to boot instead of `$HUSK_INITRD` (e.g. `$HUSK_FS_PROBE_INITRD`).
    pub initrd: Option<PathBuf>,
    /// Add a virtio-fs device: virtiofsd's vhost-user socket and the mount tag.
    pub fs: Option<(PathBuf, String)>,
    /// Add a virtio-net device (husk-vmm only): the tap ([`crate::tap::open`]) and the guest's
    /// MAC address. The VMM inherits the tap as descriptor [`NET_TAP_FD`].
    pub net: Option<(std::sync::Arc<std::os::fd::OwnedFd>, String)>,
}

/// The descriptor number the tap gets in husk-vmm's process.
pub const NET_TAP_FD: i32 = husk_shim::vmm::NET_TAP_FD;

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            backend: Backend::from_env(),
            vcpus: 1,
            mem_mib: 256,
            cmdline_extra: None,
            ready_timeout: Duration::from_secs(120),
            initrd: None,
            fs: None,
            net: None,
        }
    }
}

/// A running husk-vmm (or QEMU) process and the files it writes.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    dir: tempfile::TempDir,
    /// The hybrid vsock Unix socket (husk-vmm's; QEMU never creates it).
    pub vsock_uds: PathBuf,
    /// Where the host reaches the guest's vsock ports.
    pub endpoint: VsockEndpoint,
    /// Launch → ready as the VMM logged it.
    pub boot_ms: u64,
    exit: Option<ExitStatus>,
}

/// How one boot attempt ended.
enum Attempt {
    Ready(Vm),
    /// The guest was not ready in time (`hung`, husk-vmm then killed) or husk-vmm ended
    /// first; the text says how.
    NotReady {
        vm: Vm,
        how: String,
        hung: bool,
    },
}

impl Vm {
    /// Boots a guest and waits for the agent to announce ready, booting again when the lab
    /// lost the guest before its agent answered ([`lab_retry`] decides). Panics (fails the
    /// test) on anything else.
    pub fn boot(opts: &VmOptions) -> Vm {
        Self::boot_with(opts, |_| ()).0
    }

    /// [`Vm::boot`], calling `prepare` before every attempt to start what the VM needs
    /// afresh (virtiofsd serves one VMM connection) and adjust the options; returns the VM
    /// with what the last `prepare` returned. What earlier attempts prepared is dropped.
    pub fn boot_with<T: std::fmt::Debug>(
        opts: &VmOptions,
        mut prepare: impl FnMut(&mut VmOptions) -> T,
    ) -> (Vm, T) {
        loop {
            let mut opts = opts.clone();
            let prepared = prepare(&mut opts);
            match Self::attempt(&opts) {
                Attempt::Ready(vm) => return (vm, prepared),
                Attempt::NotReady { vm, how, hung } => {
                    let diag = format!("{}\n--- prepared: {prepared:?}", vm.diagnostics());
                    let log = vm.vmm_log();
                    let end = EarlyEnd {
                        vmm_status: if hung {
                            None
                        } else {
                            vm.exit.and_then(|s| s.code())
                        },
                        vmm_log: &log,
                    };
                    let verdict = lab_retry::classify_early_end(end).and_then(|evidence| {
                        lab_retry::take_guest_retry(&format!("boot ({how})"), &evidence)
                    });
                    match verdict {
                        Ok(_) => eprintln!("{diag}"),
                        Err(why) => {
                            panic!("the guest was not ready: {how}; {why}\n{diag}")
                        }
                    }
                }
            }
        }
    }

    fn attempt(opts: &VmOptions) -> Attempt {
        let mut vm = Self::spawn(opts);
        let deadline = Instant::now() + opts.ready_timeout;
        loop {
            let log = vm.vmm_log();
            if let Some(ms) = parse_boot_ms(&log) {
                vm.boot_ms = ms;
                return Attempt::Ready(vm);
            }
            if let Some(st) = vm.try_exit() {
                return Attempt::NotReady {
                    vm,
                    how: format!("husk-vmm ended: {}", describe_status(st)),
                    hung: false,
                };
            }
            if Instant::now() > deadline {
                vm.kill();
                return Attempt::NotReady {
                    vm,
                    how: format!("no ready signal within {:?}", opts.ready_timeout),
                    hung: true,
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the VMM without waiting for anything.
    pub fn spawn(opts: &VmOptions) -> Vm {
        let kernel = required_path("HUSK_KERNEL");
        let initrd = opts
            .initrd
            .clone()
            .unwrap_or_else(|| required_path("HUSK_INITRD"));
        let dir = tempfile::Builder::new()
            .prefix("husk-test-vm")
            .tempdir()
            .expect("temp dir");
        let vsock_uds = dir.path().join("vsock.sock");
        let console = Console::File(dir.path().join("console.log"));
        let log_path = dir.path().join("vmm.log");
        fs::File::create(&log_path).expect("vmm log");
        // Appending: under QEMU the status-port watcher writes into the same file.
        let log = fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .expect("vmm log");
        let mut guest = VmmCommand::new(required_path("HUSK_VMM"), kernel, &vsock_uds)
            .initrd(initrd)
            .mem_mib(opts.mem_mib)
            .vcpus(opts.vcpus)
            .console(console);
        if let Some(extra) = &opts.cmdline_extra {
            guest = guest.cmdline_extra(extra.clone());
        }
        if let Some((socket, tag)) = &opts.fs {
            guest = guest.fs(socket, tag.clone());
        }
        if let Some((_, mac)) = &opts.net {
            assert_eq!(
                opts.backend,
                Backend::HuskVmm,
                "the QEMU backend has no virtio-net device yet"
            );
            guest = guest.net(husk_shim::vmm::NetDevice {
                tap_fd: NET_TAP_FD,
                mac: mac.clone(),
                mtu: None,
            });
        }
        let (mut cmd, endpoint) = match opts.backend {
            Backend::HuskVmm => (guest.command(), VsockEndpoint::Hybrid(vsock_uds.clone())),
            Backend::Qemu => {
                let cid = next_guest_cid();
                let status = dir.path().join("status.sock");
                let listener = UnixListener::bind(&status).expect("status port socket");
                watch_status_port(listener, log_path.clone(), Instant::now());
                let qemu = QemuCommand::like(&guest, cid)
                    .tsc_khz(host_tsc_khz())
                    .status_port(&status);
                (qemu.command(), VsockEndpoint::Kernel { cid })
            }
        };
        if let Some((tap, _)) = &opts.net {
            husk_shim::vmm::inherit_fd(
                &mut cmd,
                std::os::fd::AsRawFd::as_raw_fd(tap.as_ref()),
                NET_TAP_FD,
            );
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", opts.backend));
        Vm {
            child,
            dir,
            vsock_uds,
            endpoint,
            boot_ms: 0,
            exit: None,
        }
    }

    /// The directory holding this VM's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The guest console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.dir.path().join("console.log"))
    }

    /// husk-vmm's own log (stderr) so far.
    pub fn vmm_log(&self) -> String {
        read_lossy(&self.dir.path().join("vmm.log"))
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Non-blocking check whether husk-vmm has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
        }
        self.exit
    }

    /// Waits up to `timeout` for husk-vmm to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills husk-vmm (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// Sends a signal to husk-vmm.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("kill");
    }

    /// A text block with the exit status, the VMM log and the console tail, for failure messages.
    pub fn diagnostics(&self) -> String {
        let tail = last_lines(&self.console(), 40);
        format!(
            "--- exit: {}\n--- husk-vmm log:\n{}\n--- console (last 40 lines):\n{}",
            self.exit
                .map(describe_status)
                .unwrap_or_else(|| "running".into()),
            self.vmm_log(),
            tail
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A guest CID no other VM of this L1 holds: vhost-vsock needs them unique per host, and
/// test binaries run one after another (their pids differ) with their VMs numbered within.
fn next_guest_cid() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 64;
    3 + (std::process::id() % 1_000_000) * 64 + n
}

/// Follows QEMU's view of the agent's status port (one byte per event, docs/contracts.md) and
/// logs husk-vmm's lines for them into `log`; when QEMU ends (the socket closes) after ready
/// without the agent's clean-shutdown byte, logs [`QEMU_RESET_MARKER`].
fn watch_status_port(listener: UnixListener, log: PathBuf, launched: Instant) {
    std::thread::spawn(move || {
        let Ok((mut port, _)) = listener.accept() else {
            return;
        };
        let Ok(mut log) = fs::OpenOptions::new().append(true).open(&log) else {
            return;
        };
        let (mut ready, mut clean) = (false, false);
        let mut byte = [0u8; 1];
        while let Ok(1) = port.read(&mut byte) {
            let ms = launched.elapsed().as_millis();
            let line = match byte[0] {
                0x04 => format!("{AGENT_STARTED}{ms}"),
                0x01 => {
                    ready = true;
                    format!("{READY_MARKER}{ms}")
                }
                0x02 => {
                    clean = true;
                    "qemu: the agent announced a clean shutdown".into()
                }
                0x03 => "qemu: the agent announced its own failure".into(),
                other => format!("qemu: status port byte {other:#04x}"),
            };
            let _ = writeln!(log, "{line}");
        }
        if ready && !clean {
            let _ = writeln!(
                log,
                "{QEMU_RESET_MARKER} ({:.1} s after launch; `reboot=t`: a triple fault, or a \
                 kernel panic's reboot if the console shows one)",
                launched.elapsed().as_secs_f64()
            );
        }
    });
}

/// What husk-vmm logs on the agent's first status byte 0x04.
const AGENT_STARTED: &str = husk_shim::sandbox::AGENT_STARTED_MARKER;

/// The last `n` lines of `text`, for failure messages.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Describes an exit status, naming a signal if there was one.
pub fn describe_status(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st}"),
    }
}

/// Finds the VMM's `guest ready boot_ms=N` line and returns N.
pub fn parse_boot_ms(log: &str) -> Option<u64> {
    let at = log.find(READY_MARKER)?;
    let digits: String = log[at + READY_MARKER.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ms_is_parsed_from_the_vmm_log() {
        let log = "2026 INFO husk_vmm: guest ready boot_ms=812 vcpus=1\n";
        assert_eq!(parse_boot_ms(log), Some(812));
        assert_eq!(parse_boot_ms("nothing here"), None);
        assert_eq!(parse_boot_ms("guest ready boot_ms=x"), None);
    }
}
