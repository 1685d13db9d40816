//! Starting and watching a real `husk-vmm` guest for tests.
//!
//! [`Vm::boot`] runs the husk-vmm binary with our kernel and initramfs, sends the guest console and
//! the VMM's log to files in a private temp dir, and waits until the VMM reports that the agent
//! announced itself ready. In the lab (`HUSK_KVM_MODE=lab`) the emulated SVM sometimes kills or
//! hangs a guest mid-boot (DESIGN.md, "Host facts"); such a guest, and only one that dies *before*
//! the agent is ready with a guest-side failure, may be booted again. Every retry is printed and
//! counts against a budget shared by the whole test binary. A failure the VMM itself reports
//! (exit status 1) is never retried.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use husk_shim::vmm::{Console, VmmCommand};

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

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmOptions {
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
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            vcpus: 1,
            mem_mib: 256,
            cmdline_extra: None,
            ready_timeout: Duration::from_secs(120),
            initrd: None,
            fs: None,
        }
    }
}

/// A running husk-vmm process and the files it writes.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    dir: tempfile::TempDir,
    /// The hybrid vsock Unix socket.
    pub vsock_uds: PathBuf,
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

    /// Starts husk-vmm without waiting for anything.
    pub fn spawn(opts: &VmOptions) -> Vm {
        let vmm = required_path("HUSK_VMM");
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
        let console = dir.path().join("console.log");
        let log = fs::File::create(dir.path().join("vmm.log")).expect("vmm log");
        let mut vmm_cmd = VmmCommand::new(vmm, kernel, &vsock_uds)
            .initrd(initrd)
            .mem_mib(opts.mem_mib)
            .vcpus(opts.vcpus)
            .console(Console::File(console));
        if let Some(extra) = &opts.cmdline_extra {
            vmm_cmd = vmm_cmd.cmdline_extra(extra.clone());
        }
        if let Some((socket, tag)) = &opts.fs {
            vmm_cmd = vmm_cmd.fs(socket, tag.clone());
        }
        let child = vmm_cmd
            .command()
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn husk-vmm");
        Vm {
            child,
            dir,
            vsock_uds,
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
