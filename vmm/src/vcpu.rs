//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches port I/O and MMIO exits to the
//! shared buses. Exits that end the VM (triple fault, KVM errors) are reported through the
//! [`ExitNotifier`]; the thread then stops running its vCPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Bus;
use crate::exit::{ExitEvent, ExitNotifier, ResetKind};

/// The buses a vCPU dispatches to.
#[derive(Debug, Clone)]
pub struct Buses {
    /// Port I/O.
    pub pio: Arc<Bus>,
    /// Memory-mapped I/O.
    pub mmio: Arc<Bus>,
}

/// One vCPU and what it needs to run.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    buses: Buses,
    exit: ExitNotifier,
    /// KVM_RUN returns so far (shown by the SIGUSR1 state dump: a guest that still runs
    /// keeps exiting for its timer and devices).
    exits: Arc<AtomicU64>,
}

/// A human-readable name for a KVM internal error suberror (linux `include/uapi/linux/kvm.h`).
pub fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering another exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(fd: VcpuFd, id: u8, buses: Buses, exit: ExitNotifier) -> Self {
        Self {
            fd,
            id,
            buses,
            exit,
            exits: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The count of KVM_RUN returns, for state dumps.
    pub fn exit_counter(&self) -> Arc<AtomicU64> {
        self.exits.clone()
    }

    fn describe_internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the kernel filled the `internal` member of the union for KVM_EXIT_INTERNAL_ERROR,
        // which is the exit we are handling.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..ndata]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|_| "?".into());
        format!(
            "KVM internal error on vCPU {}. Suberror: {} ({}), data [{}], rip {rip}",
            self.id,
            internal.suberror,
            internal_error_name(internal.suberror),
            data.join(", ")
        )
    }

    /// Runs the vCPU until the VM ends.
    pub fn run(mut self) {
        loop {
            self.exits.fetch_add(1, Ordering::Relaxed);
            let event = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.buses.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.buses.pio.write(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.buses.mmio.read(addr, data) {
                        data.fill(0);
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.buses.mmio.write(addr, data);
                    continue;
                }
                Ok(VcpuExit::Shutdown) => {
                    tracing::info!(vcpu = self.id, "guest triple fault (reset)");
                    ExitEvent::GuestReset(ResetKind::TripleFault)
                }
                Ok(VcpuExit::Hlt) => {
                    tracing::info!(vcpu = self.id, "guest halted");
                    ExitEvent::GuestReset(ResetKind::Halt)
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_RESET | KVM_SYSTEM_EVENT_SHUTDOWN => {
                        ExitEvent::GuestReset(ResetKind::TripleFault)
                    }
                    KVM_SYSTEM_EVENT_CRASH => ExitEvent::VmmError("guest crash event".into()),
                    other => ExitEvent::VmmError(format!("unexpected KVM system event {other}")),
                },
                Ok(VcpuExit::InternalError) => ExitEvent::VmmError(self.describe_internal_error()),
                Ok(VcpuExit::FailEntry(reason, cpu)) => ExitEvent::VmmError(format!(
                    "KVM_EXIT_FAIL_ENTRY on vCPU {} (host cpu {cpu}): hardware entry failure reason {reason:#x}",
                    self.id
                )),
                Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => continue,
                Ok(other) => ExitEvent::VmmError(format!(
                    "unexpected KVM exit on vCPU {}: {other:?}",
                    self.id
                )),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => ExitEvent::VmmError(format!("KVM_RUN failed on vCPU {}: {e}", self.id)),
            };
            self.exit.notify(event);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_error_names() {
        assert_eq!(internal_error_name(1), "emulation failure");
        assert_eq!(internal_error_name(99), "unknown");
    }
}
