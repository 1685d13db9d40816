//! Running a real `virtiofsd` for tests, and booting the test-only `husk-fs-probe` guest.
//!
//! [`Virtiofsd::start`] launches the daemon that `cargo xtask setup` installed (`HUSK_VIRTIOFSD`)
//! with its own sandbox on, sharing one directory, and waits for its vhost-user socket.
//! [`run_probe`] boots husk-vmm with a virtio-fs device and the probe initramfs
//! (`HUSK_FS_PROBE_INITRD`) and waits for the probe's verdict on the console.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use husk_shim::config::CachePolicy;
use husk_shim::vmm::{FsSandbox, VirtiofsdCommand};

use crate::lab_retry::{self, EarlyEnd};
use crate::required_path;
use crate::vm::{Vm, VmOptions};

/// How long virtiofsd may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(15);

/// A running virtiofsd.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    log: PathBuf,
}

impl Virtiofsd {
    /// Starts virtiofsd sharing `shared` with `--sandbox namespace --cache <cache>
    /// --log-level info`; the socket and the log go to `dir`.
    pub fn start(shared: &Path, dir: &Path, cache: CachePolicy) -> Virtiofsd {
        let bin = required_path("HUSK_VIRTIOFSD");
        let socket = dir.join("virtiofsd.sock");
        let log = dir.join("virtiofsd.log");
        let child = VirtiofsdCommand::new(bin, &socket, shared)
            .sandbox(FsSandbox::Namespace)
            .cache(cache)
            .log_level("info")
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("virtiofsd log"))
            .spawn()
            .expect("spawn virtiofsd");
        let mut d = Virtiofsd { child, socket, log };
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !d.socket.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("virtiofsd exited early ({st}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "virtiofsd made no socket in {SOCKET_TIMEOUT:?}:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the daemon (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// FNV-1a 64-bit, the fingerprint `husk-fs-probe` prints for each file.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Options for the probe VM: the probe initramfs, the virtio-fs device and `probe_mode=`.
pub fn probe_vm_options(socket: &Path, mode: &str, mem_mib: u32) -> VmOptions {
    VmOptions {
        mem_mib,
        cmdline_extra: Some(format!("probe_mode={mode}")),
        initrd: Some(required_path("HUSK_FS_PROBE_INITRD")),
        fs: Some((socket.to_path_buf(), "husk".into())),
        ..Default::default()
    }
}

/// Waits until the console shows `marker` or `PROBE ERROR`, or husk-vmm exits; returns whether
/// `marker` appeared.
pub fn wait_console(vm: &mut Vm, marker: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let console = vm.console();
        if console.contains(marker) {
            return true;
        }
        if console.contains("PROBE ERROR") || vm.try_exit().is_some() {
            // One more look: the line may have landed just before the exit.
            return vm.console().contains(marker);
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the probe in `mode` against a fresh virtiofsd on `shared` until it prints `PROBE DONE`
/// and husk-vmm exits, and returns the console. A guest that dies or hangs before the probe
/// says anything is booted again when [`lab_retry`] finds the lab lost it; a `PROBE ERROR`,
/// a VMM error, a probe that died by itself (status 5) or anything in direct mode fails the
/// test.
pub fn run_probe(shared: &Path, mode: &str, mem_mib: u32, timeout: Duration) -> String {
    loop {
        let dir = tempfile::Builder::new()
            .prefix("husk-test-fs")
            .tempdir()
            .expect("temp dir");
        let mut daemon = Virtiofsd::start(shared, dir.path(), CachePolicy::Auto);
        let mut vm = Vm::spawn(&probe_vm_options(&daemon.socket, mode, mem_mib));
        let done = wait_console(&mut vm, "PROBE DONE", timeout);
        let status = vm.wait_exit(Duration::from_secs(30));
        let console = vm.console();
        let diag = format!("{}\n--- virtiofsd log:\n{}", vm.diagnostics(), daemon.log());
        daemon.kill();
        if done {
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(0),
                "the probe finished but husk-vmm did not exit cleanly\n{diag}"
            );
            return console;
        }
        if let Err(why) = early_probe_loss(&mut vm, &console, status.is_none())
            .and_then(|ev| lab_retry::take_guest_retry(&format!("virtio-fs probe ({mode})"), &ev))
        {
            panic!("the virtio-fs probe ({mode}) failed: {why}\n{diag}");
        }
        eprintln!("{diag}");
    }
}

/// Whether a probe guest that did not finish was lost to the lab before the probe ran
/// (`Ok(evidence)`), as [`lab_retry::classify_early_end`] decides for an agent: the probe, our
/// code, printed nothing yet. `hung`: husk-vmm still ran (it is killed here).
pub fn early_probe_loss(vm: &mut Vm, console: &str, hung: bool) -> Result<String, String> {
    if console.contains("PROBE ") {
        return Err("the probe had already run (it printed PROBE lines)".into());
    }
    if hung {
        vm.kill();
    }
    let log = vm.vmm_log();
    lab_retry::classify_early_end(EarlyEnd {
        vmm_status: if hung {
            None
        } else {
            vm.try_exit().and_then(|s| s.code())
        },
        vmm_log: &log,
    })
}
