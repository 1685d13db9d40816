//! How a VM ends, and the exit status `husk-vmm` reports for it (docs/contracts.md).
//!
//! Several threads can observe the end of a VM (a vCPU sees a triple fault, the i8042 sees a
//! reset request, the event loop sees SIGTERM). Each sends one [`ExitEvent`] through an
//! [`ExitNotifier`]; the main thread takes the first and classifies it with what the guest told
//! us on the way ([`GuestObservations`]: boot port values, a kernel panic on the console).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

/// Why the guest asked to reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// `KVM_EXIT_SHUTDOWN`: a triple fault (our guests use `reboot=t`).
    TripleFault,
    /// Write of 0xFE (pulse reset line) to the i8042 command port.
    I8042,
    /// All vCPUs halted with nothing to wake them (only without an in-kernel LAPIC).
    Halt,
}

/// One reason for the VM to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitEvent {
    /// The guest reset or halted the machine.
    GuestReset(ResetKind),
    /// The VMM failed (KVM error, device error, internal error); the text says what happened.
    VmmError(String),
    /// A host signal asked us to stop.
    Signal(i32),
}

/// Process exit statuses of `husk-vmm` (docs/contracts.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitStatus {
    /// Clean guest exit.
    Clean = 0,
    /// VMM error.
    VmmError = 1,
    /// Usage error.
    Usage = 2,
    /// Guest panic or agent died after ready.
    GuestPanic = 3,
    /// Stopped by a host signal.
    Stopped = 4,
    /// The agent failed before it was ready: it said so on the boot port (0x03), or PID 1
    /// exited (the kernel's "Attempted to kill init") before announcing ready.
    AgentFailed = 5,
}

impl ExitStatus {
    /// The numeric status for `std::process::exit`.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// What the guest reported while it ran; written by devices, read at exit.
#[derive(Debug, Default)]
pub struct GuestObservations {
    /// The console printed `Kernel panic - not syncing`.
    pub kernel_panic: AtomicBool,
    /// The console printed the kernel's `Attempted to kill init` (PID 1, the agent, exited).
    pub init_died: AtomicBool,
    /// The agent wrote 0x04 (started) to the boot port.
    pub agent_started: AtomicBool,
    /// The agent wrote 0x01 (ready) to the boot port.
    pub agent_ready: AtomicBool,
    /// The agent wrote 0x03 (failed, PID 1 exits) to the boot port.
    pub agent_failed: AtomicBool,
    /// The agent wrote 0x02 (clean shutdown) to the boot port.
    pub agent_shutdown: AtomicBool,
}

/// A snapshot of [`GuestObservations`], for [`classify`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// `Kernel panic - not syncing` on the console.
    pub panic: bool,
    /// `Attempted to kill init` on the console.
    pub init_died: bool,
    /// Boot port 0x01.
    pub ready: bool,
    /// Boot port 0x03.
    pub failed: bool,
    /// Boot port 0x02.
    pub shutdown: bool,
}

impl GuestObservations {
    /// What was seen so far.
    pub fn seen(&self) -> Seen {
        Seen {
            panic: self.kernel_panic.load(Ordering::SeqCst),
            init_died: self.init_died.load(Ordering::SeqCst),
            ready: self.agent_ready.load(Ordering::SeqCst),
            failed: self.agent_failed.load(Ordering::SeqCst),
            shutdown: self.agent_shutdown.load(Ordering::SeqCst),
        }
    }

    /// Classifies an exit event into the process exit status.
    pub fn classify(&self, event: &ExitEvent) -> ExitStatus {
        classify(event, self.seen())
    }
}

/// Pure exit classification (see the table in docs/contracts.md).
///
/// The agent's own failure before ready gets its own status so that nobody can take it for
/// a guest the lab lost (DESIGN.md, the retry rule): a lab death before ready is a reset or
/// a kernel panic without the agent having said it failed and without PID 1 exiting.
pub fn classify(event: &ExitEvent, seen: Seen) -> ExitStatus {
    match event {
        ExitEvent::Signal(_) => ExitStatus::Stopped,
        ExitEvent::VmmError(_) => ExitStatus::VmmError,
        ExitEvent::GuestReset(_) if !seen.ready && (seen.failed || seen.init_died) => {
            ExitStatus::AgentFailed
        }
        ExitEvent::GuestReset(_) if seen.panic => ExitStatus::GuestPanic,
        ExitEvent::GuestReset(_) if seen.ready && !seen.shutdown => ExitStatus::GuestPanic,
        ExitEvent::GuestReset(_) => ExitStatus::Clean,
    }
}

/// Cloneable sender of [`ExitEvent`]s, handed to vCPUs and devices.
#[derive(Debug, Clone)]
pub struct ExitNotifier {
    tx: Sender<ExitEvent>,
    /// Shared guest observations, so a device can record what it saw.
    pub observations: Arc<GuestObservations>,
}

impl ExitNotifier {
    /// Creates a notifier and the receiver the main thread waits on.
    pub fn new() -> (Self, Receiver<ExitEvent>) {
        let (tx, rx) = mpsc::channel();
        (
            Self {
                tx,
                observations: Arc::new(GuestObservations::default()),
            },
            rx,
        )
    }

    /// Reports that the VM must end. Later events are ignored by the receiver.
    pub fn notify(&self, event: ExitEvent) {
        // The receiver only goes away when the process is exiting anyway.
        let _ = self.tx.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESET: ExitEvent = ExitEvent::GuestReset(ResetKind::TripleFault);

    fn seen(panic: bool, ready: bool, shutdown: bool) -> Seen {
        Seen {
            panic,
            ready,
            shutdown,
            ..Seen::default()
        }
    }

    #[test]
    fn reset_without_agent_protocol_is_clean() {
        assert_eq!(classify(&RESET, Seen::default()), ExitStatus::Clean);
        assert_eq!(
            classify(&ExitEvent::GuestReset(ResetKind::I8042), Seen::default()),
            ExitStatus::Clean
        );
    }

    #[test]
    fn reset_after_ready_and_shutdown_is_clean() {
        assert_eq!(classify(&RESET, seen(false, true, true)), ExitStatus::Clean);
    }

    #[test]
    fn reset_after_ready_without_shutdown_is_panic() {
        assert_eq!(
            classify(&RESET, seen(false, true, false)),
            ExitStatus::GuestPanic
        );
    }

    #[test]
    fn console_panic_wins() {
        assert_eq!(
            classify(&RESET, seen(true, true, true)),
            ExitStatus::GuestPanic
        );
        assert_eq!(
            classify(&RESET, seen(true, false, false)),
            ExitStatus::GuestPanic
        );
    }

    #[test]
    fn the_agents_own_failure_before_ready_is_told_apart() {
        let failed = Seen {
            failed: true,
            panic: true,
            ..Seen::default()
        };
        assert_eq!(classify(&RESET, failed), ExitStatus::AgentFailed);
        let init_died = Seen {
            init_died: true,
            panic: true,
            ..Seen::default()
        };
        assert_eq!(classify(&RESET, init_died), ExitStatus::AgentFailed);
        // After ready, a dying agent stays a guest panic (status 3), as before.
        let after_ready = Seen {
            ready: true,
            ..init_died
        };
        assert_eq!(classify(&RESET, after_ready), ExitStatus::GuestPanic);
        assert_eq!(ExitStatus::AgentFailed.code(), 5);
    }

    #[test]
    fn signals_and_errors() {
        assert_eq!(
            classify(&ExitEvent::Signal(15), seen(true, true, false)),
            ExitStatus::Stopped
        );
        assert_eq!(
            classify(&ExitEvent::VmmError("x".into()), seen(false, true, true)),
            ExitStatus::VmmError
        );
        assert_eq!(ExitStatus::Usage.code(), 2);
    }

    #[test]
    fn notifier_delivers_first_event() {
        let (n, rx) = ExitNotifier::new();
        n.notify(ExitEvent::Signal(2));
        n.clone().notify(RESET);
        assert_eq!(rx.recv().unwrap(), ExitEvent::Signal(2));
    }
}
