//! The init (PID 1) side of the agent: console, kernel command line, the boot/status port
//! and the final reset.
//!
//! Nothing here runs when the agent is started as an ordinary process on a host
//! (`--listen unix:PATH` for development and tests): see `main.rs`.

use std::fs::OpenOptions;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use nix::sys::reboot::{reboot, RebootMode};
use tracing::{error, info, warn};

use crate::mount;

/// The kernel's console device; PID 1's stdin/stdout/stderr.
const CONSOLE_PATH: &str = "/dev/console";
/// The kernel command line.
const CMDLINE_PATH: &str = "/proc/cmdline";
/// The husk-vmm boot/status port (docs/contracts.md, "Boot/status port").
const STATUS_PORT: u16 = 0x440;
/// Kernel command-line key for test fault injection (docs/contracts.md).
const TEST_FAULT_KEY: &str = "husk.test_fault";
/// Kernel command-line key for the agent's log level (`error`…`trace`).
const LOG_KEY: &str = "husk.log";

/// Errors of the init duties.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Cannot open the console
    #[error("Cannot open {CONSOLE_PATH}")]
    Console(#[source] std::io::Error),
    /// Cannot redirect standard streams to the console
    #[error("Cannot redirect standard streams to the console")]
    Dup(#[source] nix::Error),
    /// ioperm(2) on the status port failed (the guest kernel needs CONFIG_X86_IOPL_IOPERM=y)
    #[error(
        "ioperm(2) on the status port failed (the guest kernel needs CONFIG_X86_IOPL_IOPERM=y)"
    )]
    Ioperm(#[source] std::io::Error),
}

/// Whether this process is the guest's init.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Points stdin, stdout and stderr at /dev/console (once /dev is mounted), so logs and
/// panics reach the serial console whatever the kernel left us.
pub fn attach_console() -> Result<(), InitError> {
    let console = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(CONSOLE_PATH)
        .map_err(InitError::Console)?;
    for fd in 0..=2 {
        // SAFETY: dup2 on a descriptor we own (`console`) onto the standard descriptors; no
        // Rust object owns fds 0–2 exclusively (std's handles are unowned wrappers).
        let rc = unsafe { libc::dup2(console.as_raw_fd(), fd) };
        if rc < 0 {
            return Err(InitError::Dup(nix::Error::last()));
        }
    }
    Ok(())
}

/// Fault injected for tests through `husk.test_fault=` (docs/contracts.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    /// Exit right after announcing ready, so the host sees a dying init as a guest panic.
    ExitAfterReady,
    /// Fail the init duties before ready, so the host sees the agent's own failure (status 5).
    FailInit,
}

/// What the agent reads from the kernel command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    /// `husk.test_fault=`.
    pub test_fault: Option<TestFault>,
    /// `husk.log=`, a level name.
    pub log_level: Option<String>,
    /// Keys we own but could not use, reported once logging is up.
    pub unknown: Vec<String>,
}

impl KernelCmdline {
    /// Parses a kernel command line (whitespace-separated `key=value` words).
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for word in text.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match (key, value) {
                (TEST_FAULT_KEY, "exit_after_ready") => {
                    out.test_fault = Some(TestFault::ExitAfterReady)
                }
                (TEST_FAULT_KEY, "fail_init") => out.test_fault = Some(TestFault::FailInit),
                (LOG_KEY, level) => out.log_level = Some(level.to_owned()),
                (key, _) if key.starts_with("husk.") => out.unknown.push(word.to_owned()),
                _ => {}
            }
        }
        out
    }

    /// Reads /proc/cmdline; an unreadable command line is an empty one.
    pub fn read() -> Self {
        Self::parse(&std::fs::read_to_string(CMDLINE_PATH).unwrap_or_default())
    }
}

/// Values written to the status port (docs/contracts.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// The ttrpc server is listening on vsock port 1024.
    Ready = 0x01,
    /// The agent has synced and is about to reset the VM.
    CleanShutdown = 0x02,
    /// The agent failed and PID 1 is about to exit: the guest dies of the agent's own failure.
    Failed = 0x03,
    /// PID 1 (the agent) runs: the guest kernel booted as far as our code.
    Started = 0x04,
}

/// Access to the boot/status I/O port; only PID 1 (CAP_SYS_RAWIO) can open it.
///
/// I/O permissions belong to the thread that called `ioperm` (and threads it creates later),
/// so the handle is neither `Send` nor `Sync`.
#[derive(Debug)]
pub struct StatusPort(PhantomData<*const ()>);

impl StatusPort {
    /// Asks the kernel for access to the port (`ioperm`).
    pub fn open() -> Result<Self, InitError> {
        // SAFETY: ioperm only changes this thread's I/O permission bitmap; it touches no memory.
        let rc = unsafe { libc::ioperm(libc::c_ulong::from(STATUS_PORT), 1, 1) };
        if rc != 0 {
            return Err(InitError::Ioperm(std::io::Error::last_os_error()));
        }
        Ok(Self(PhantomData))
    }

    /// Writes one status byte.
    pub fn announce(&self, status: Status) {
        // SAFETY: `self` exists only after ioperm granted this thread access to STATUS_PORT,
        // so `out` cannot fault; a port write has no effect on this process's memory.
        unsafe {
            std::arch::asm!(
                "out dx, al",
                in("dx") STATUS_PORT,
                in("al") status as u8,
                options(nomem, nostack, preserves_flags)
            );
        }
    }
}

/// Tells the host that PID 1 is about to exit because the agent failed (best effort: the
/// failure may be that the port cannot be opened). The host then reports the agent's own
/// failure (husk-vmm exit status 5), which is never taken for the lab's.
pub fn report_failure() {
    if is_pid1() {
        if let Ok(port) = StatusPort::open() {
            port.announce(Status::Failed);
        }
    }
}

/// Ends the VM cleanly: sync, unmount, announce clean shutdown, reset (`reboot=t` makes the
/// reset a triple fault, which the VMM treats as a clean exit). Never returns.
pub fn power_off(port: &StatusPort) -> ! {
    nix::unistd::sync();
    mount::unmount_all();
    nix::unistd::sync();
    info!("powering off");
    port.announce(Status::CleanShutdown);
    let err = match reboot(RebootMode::RB_AUTOBOOT) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    // Only reachable without CAP_SYS_BOOT; exiting PID 1 panics the kernel, which the
    // host reports instead of hanging.
    error!(error = %err, "reboot(2) failed");
    std::process::exit(1)
}

/// Logs what was odd about the command line, once logging is up.
pub fn report_cmdline(cmdline: &KernelCmdline) {
    for word in &cmdline.unknown {
        warn!(word = %word, "unknown husk option on the kernel command line");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_keys_are_found() {
        let c = KernelCmdline::parse(
            "console=ttyS0 quiet reboot=t husk.test_fault=exit_after_ready husk.log=debug\n",
        );
        assert_eq!(c.test_fault, Some(TestFault::ExitAfterReady));
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        assert!(c.unknown.is_empty());
    }

    #[test]
    fn cmdline_without_husk_keys_is_default() {
        let c = KernelCmdline::parse("console=ttyS0 panic=-1 virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(c, KernelCmdline::default());
    }

    #[test]
    fn unknown_faults_are_reported_not_applied() {
        let c = KernelCmdline::parse("husk.test_fault=explode husk.other=1");
        assert_eq!(c.test_fault, None);
        assert_eq!(c.unknown, ["husk.test_fault=explode", "husk.other=1"]);
    }
}
