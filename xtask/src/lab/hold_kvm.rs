//! `xtask lab-hold-kvm`: runs inside the L1 for the whole lab run, holding one KVM VM with
//! an in-kernel irqchip and a vCPU that never runs.
//!
//! Why: the L1 kernel flips static keys when the first VM appears and the last one goes
//! (`preempt_notifier_key`, patched into `__schedule`; the local APIC's `apic_sw_disabled`,
//! patched into kvm). Text patching goes through `int3` breakpoints, and QEMU's multi-threaded
//! TCG can leave another vCPU running a stale translation that still holds the `int3`: the
//! kernel sees the breakpoint is gone, returns to retry, and traps again, forever. A lab
//! wedged that way was caught with both L1 vCPUs in `asm_exc_int3` / `__schedule+0x2ab`
//! while memory already held the restored NOP. With this VM held, the counts never return
//! to zero, so pods coming and going patch nothing.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

/// `_IO(KVMIO, 0x01)`.
const KVM_CREATE_VM: libc::c_ulong = 0xae01;
/// `_IO(KVMIO, 0x41)`.
const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;
/// `_IO(KVMIO, 0x60)`.
const KVM_CREATE_IRQCHIP: libc::c_ulong = 0xae60;

fn ioctl_fd(fd: &impl AsRawFd, request: libc::c_ulong, what: &str) -> Result<OwnedFd> {
    // SAFETY: the three requests used here take an integer argument (0) and return a new
    // file descriptor or -1; no memory is passed to the kernel.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, 0) };
    if ret < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of these ioctls is a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// Creates the VM and its vCPU, then sleeps until killed (the L1 powers off at the end).
pub fn run() -> Result<()> {
    let kvm = File::open("/dev/kvm").context("Cannot open /dev/kvm")?;
    let vm = ioctl_fd(&kvm, KVM_CREATE_VM, "KVM_CREATE_VM")?;
    // SAFETY: KVM_CREATE_IRQCHIP takes no argument and returns 0 or -1.
    if unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_IRQCHIP, 0) } < 0 {
        bail!("KVM_CREATE_IRQCHIP: {}", std::io::Error::last_os_error());
    }
    let _vcpu = ioctl_fd(&vm, KVM_CREATE_VCPU, "KVM_CREATE_VCPU")?;
    loop {
        // SAFETY: pause(2) has no arguments and only returns on a signal.
        unsafe { libc::pause() };
    }
}
