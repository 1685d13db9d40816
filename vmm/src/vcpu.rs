//! vCPU threads: each runs `KVM_RUN` in a loop and dispatches port I/O and MMIO exits to the
//! shared buses. Exits that end the VM (triple fault, KVM errors) are reported through the
//! [`ExitNotifier`]; the thread then stops running its vCPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// keeps exiting for its devices).
    exits: Arc<AtomicU64>,
    /// Register requests of the state dump.
    probe: Arc<RegsProbe>,
    /// Guest memory, to show the code at RIP and the top of the stack in the state dump.
    mem: crate::memory::GuestMemory,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (its handler does nothing).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler of the kick signal; call before the vCPU threads start.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A request for one vCPU's registers, answered by its own thread between two `KVM_RUN`s
/// (registers can only be read there). For the SIGUSR1 state dump: where a guest that
/// stopped answering is.
#[derive(Debug, Default)]
pub struct RegsProbe {
    requested: AtomicBool,
    answer: Mutex<Option<String>>,
}

impl RegsProbe {
    /// Asks `thread` (the vCPU's) for its registers, kicking it out of `KVM_RUN` every
    /// 20 ms, for at most `wait`.
    pub fn read(&self, thread: &std::thread::JoinHandle<()>, wait: Duration) -> String {
        use vmm_sys_util::signal::Killable;
        *crate::devices::lock(&self.answer) = None;
        self.requested.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + wait;
        loop {
            if thread.is_finished() {
                return "its thread has ended".into();
            }
            // The handle keeps the thread's descriptor, so the signal cannot reach another.
            if let Err(e) = thread.kill(kick_signal()) {
                return format!("cannot kick it ({e})");
            }
            std::thread::sleep(Duration::from_millis(20));
            if let Some(answer) = crate::devices::lock(&self.answer).take() {
                return answer;
            }
            if Instant::now() >= deadline {
                self.requested.store(false, Ordering::SeqCst);
                return format!("no answer within {wait:?}");
            }
        }
    }
}

/// `bytes` as little-endian words of `word` bytes in hex, separated by spaces (x86 order: the
/// stack's return addresses read as addresses).
fn hex_words(bytes: &[u8], word: usize) -> String {
    let words: Vec<String> = bytes
        .chunks(word.max(1))
        .map(|c| {
            let v = c.iter().rev().fold(0u64, |v, b| (v << 8) | u64::from(*b));
            format!("{v:0w$x}", w = c.len() * 2)
        })
        .collect();
    words.join(" ")
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
    pub fn new(
        fd: VcpuFd,
        id: u8,
        buses: Buses,
        exit: ExitNotifier,
        mem: crate::memory::GuestMemory,
    ) -> Self {
        Self {
            fd,
            id,
            buses,
            exit,
            mem,
            exits: Arc::new(AtomicU64::new(0)),
            probe: Arc::new(RegsProbe::default()),
        }
    }

    /// The register probe of this vCPU, for state dumps.
    pub fn regs_probe(&self) -> Arc<RegsProbe> {
        self.probe.clone()
    }

    fn answer_probe(&self) {
        let text = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "RIP={:#x} RSP={:#x} RFLAGS={:#x} IF={} CPL={} CR3={:#x}; code at RIP: {}; \
                 stack from RSP: {}",
                r.rip,
                r.rsp,
                r.rflags,
                (r.rflags >> 9) & 1,
                s.cs.selector & 3,
                s.cr3,
                self.guest_bytes(r.rip, 16, 1),
                self.guest_bytes(r.rsp, 64, 8)
            ),
            (Err(e), _) | (_, Err(e)) => format!("cannot read its registers ({e})"),
        };
        *crate::devices::lock(&self.probe.answer) = Some(text);
    }

    /// `len` bytes at guest virtual address `gva` (translated by the vCPU's own MMU), in hex,
    /// grouped in little-endian words of `word` bytes, or why they cannot be read.
    fn guest_bytes(&self, gva: u64, len: usize, word: usize) -> String {
        use vm_memory::{Bytes, GuestAddress};
        let t = match self.fd.translate_gva(gva) {
            Ok(t) if t.valid != 0 => t,
            Ok(_) => return format!("{gva:#x} is not mapped"),
            Err(e) => return format!("cannot translate {gva:#x} ({e})"),
        };
        // Stay inside the page: the next one may map elsewhere.
        let len = len.min(0x1000 - (t.physical_address & 0xfff) as usize);
        let mut buf = vec![0u8; len];
        if let Err(e) = self
            .mem
            .read_slice(&mut buf, GuestAddress(t.physical_address))
        {
            return format!("gpa {:#x}: cannot read ({e})", t.physical_address);
        }
        format!("gpa {:#x} [{}]", t.physical_address, hex_words(&buf, word))
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
            if self.probe.requested.swap(false, Ordering::SeqCst) {
                self.answer_probe();
            }
            let result = self.fd.run();
            // A kick (a signal, as the state dump sends) is not the guest exiting.
            let kicked = matches!(result, Ok(VcpuExit::Intr))
                || matches!(&result, Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN);
            if !kicked {
                self.exits.fetch_add(1, Ordering::Relaxed);
            }
            let event = match result {
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

    #[test]
    fn hex_words_are_little_endian_words() {
        let bytes = [
            0x0f, 0x0b, 0x90, 0xc3, 0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc, 0xfe,
        ];
        assert_eq!(hex_words(&bytes[..4], 1), "0f 0b 90 c3");
        assert_eq!(hex_words(&bytes[4..], 8), "fedcba9876543210");
        // A short last word keeps its own width.
        assert_eq!(hex_words(&bytes[..10], 8), "76543210c3900b0f ba98");
    }
}
