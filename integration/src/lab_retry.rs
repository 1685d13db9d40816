//! Every lab-retry decision of the test suite, in one place (DESIGN.md, "the retry rule").
//!
//! A retry is allowed only for what is proven to be the lab:
//! - **the L1 died or wedged** under a test binary (`cargo xtask test` sees QEMU end, or the
//!   L1 stay silent with its vCPU states as evidence): that binary is run again, within
//!   [`L1_BUDGET`] per suite, unless it had already printed a test failure;
//! - **a guest lost before its agent answered**, with our agent's own failures told apart:
//!   the guest reset or its kernel panicked before the agent said ready, and the agent did not
//!   report a failure (husk-vmm status 5 means it did), or the guest kernel never started the
//!   agent at all (no `guest agent started` on the boot port). Within [`GUEST_BUDGET`] per
//!   test binary.
//!
//! Never retried: a failure our own code reports (husk-vmm status 1, 2 or 5, a refused
//! request, an agent that started and then never answered), anything outside the lab, and any
//! guest death after its agent answered. Every retry is printed as a line starting with
//! [`RETRY_PREFIX`], with its evidence, and the suite's last line counts them.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::kvm_mode;
use crate::vm::status;

/// How many guests lost before their agent answered one test binary may absorb, across
/// every kind of test in it.
pub const GUEST_BUDGET: u32 = 3;
/// How many times per suite a test binary is run again because the lab's L1 died or wedged
/// under it. Two: session 7 saw an L1 failure in about half of the e2e binary's runs
/// (BENCHMARKS.md), and a re-run costs at most the silence limit plus one run of that binary
/// (about 13 min here), which two of still fit CI's 90 minutes.
pub const L1_BUDGET: u32 = 2;
/// How many times one lab run's L1 boot, lost before the command started (no test ran yet),
/// is tried again.
pub const L1_BOOT_BUDGET: u32 = 1;
/// Every retry's line starts with this (the suite counts them in the binaries' output).
pub const RETRY_PREFIX: &str = "LAB RETRY";
/// What husk-vmm logs when the agent announces its start on the boot port (docs/contracts.md).
pub const AGENT_STARTED_MARKER: &str = husk_shim::sandbox::AGENT_STARTED_MARKER;

static GUEST_RETRIES_USED: AtomicU32 = AtomicU32::new(0);

/// How a guest that never became ready ended, as the test saw it.
#[derive(Debug, Clone, Copy)]
pub struct EarlyEnd<'a> {
    /// husk-vmm's exit status; `None`: it still ran (no ready signal in time) or was killed.
    pub vmm_status: Option<i32>,
    /// husk-vmm's log so far.
    pub vmm_log: &'a str,
}

/// Whether a guest that was not ready yet was lost to the lab: `Ok(evidence)` when the rule
/// allows a retry, `Err(why it is ours)` when it does not.
pub fn classify_early_end(end: EarlyEnd<'_>) -> Result<String, String> {
    let started = end.vmm_log.contains(AGENT_STARTED_MARKER);
    match end.vmm_status {
        Some(status::AGENT_FAILED) => {
            Err("the agent reported its own failure before ready (husk-vmm status 5)".into())
        }
        Some(status::CLEAN) => Ok(format!(
            "the guest reset before its agent was ready, without the agent reporting a \
             failure (husk-vmm status 0; agent started: {started})"
        )),
        Some(status::GUEST_PANIC) => Ok(format!(
            "the guest kernel panicked before its agent was ready, and not because PID 1 \
             exited (husk-vmm status 3; agent started: {started})"
        )),
        Some(code) => Err(format!("husk-vmm ended with status {code}")),
        None if started => Err(
            "the agent started but never said ready: a hang of ours until shown otherwise".into(),
        ),
        None => Ok(
            "the guest kernel never started the agent (no `guest agent started` from husk-vmm)"
                .into(),
        ),
    }
}

/// Whether the shim's error text (what `ctr run` printed) says the pod's guest was lost
/// before its agent answered, in the ways [`classify_early_end`] allows a retry for.
pub fn shim_error_is_early_guest_loss(stderr: &str) -> bool {
    const LOST: &[&str] = &[
        // husk-vmm status 0 before ready: a reset without the agent protocol.
        "The pod's VM ended while starting: husk-vmm exited cleanly",
        // husk-vmm status 3 before ready: a kernel panic that was not PID 1 exiting (that is 5).
        "The pod's VM ended while starting: husk-vmm exited with status 3 (guest panic)",
        // Hung before the agent ran.
        "The pod's guest did not start its agent",
    ];
    LOST.iter().any(|m| stderr.contains(m))
}

/// Takes one guest retry for `what`, lost with `evidence` (from [`classify_early_end`] or
/// [`shim_error_is_early_guest_loss`]): prints the retry line and returns `Ok(n)`, the n-th
/// of this binary; `Err(why not)` outside the lab or when the budget is used up.
pub fn take_guest_retry(what: &str, evidence: &str) -> Result<u32, String> {
    if kvm_mode() != "lab" {
        return Err(format!(
            "not retried: the tests run in kvm mode {:?}, and only the lab's losses are retried",
            kvm_mode()
        ));
    }
    let used = GUEST_RETRIES_USED.fetch_add(1, Ordering::SeqCst) + 1;
    if used > GUEST_BUDGET {
        return Err(format!(
            "not retried: this binary used its {GUEST_BUDGET} lab retries"
        ));
    }
    eprintln!(
        "{RETRY_PREFIX} {used}/{GUEST_BUDGET} (guest lost before its agent answered): \
         {what}: {evidence}"
    );
    Ok(used)
}

/// Whether a line a test binary printed reports a test failure: the panic message libtest
/// prints the moment a test fails (before any slow cleanup), or its summary.
pub fn line_reports_test_failure(line: &str) -> bool {
    let line = line.trim_end();
    // `thread 'name' panicked at …`, and with this toolchain (1.95)
    // `thread 'name' (tid) panicked at …`.
    (line.starts_with("thread '") && line.contains(" panicked at "))
        || line.starts_with("test result: FAILED")
        || (line.starts_with("test ") && line.ends_with(" ... FAILED"))
}

/// Whether a line a test binary printed is one of this module's guest retries.
pub fn line_is_guest_retry(line: &str) -> bool {
    line.starts_with(RETRY_PREFIX)
}

/// Whether a lab run whose L1 was lost before the command started (`why`) boots its L1
/// again, after `used` such retries; prints the retry line.
pub fn retry_l1_boot(used: u32, why: &str) -> bool {
    if used >= L1_BOOT_BUDGET {
        eprintln!("lab: the L1 did not boot ({why}); its {L1_BOOT_BUDGET} boot retry is used");
        return false;
    }
    eprintln!(
        "{RETRY_PREFIX} {}/{L1_BOOT_BUDGET} (the lab's L1 boot was lost before the command \
         started): {why}",
        used + 1
    );
    true
}

/// The suite's account of L1 re-runs and of the guest retries its binaries printed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SuiteRetries {
    /// Test binaries run again after the L1 died under them.
    pub l1: u32,
    /// Lost L1 boots tried again before a binary started.
    pub l1_boot: u32,
    /// Guest retries the binaries printed.
    pub guest: u32,
}

impl SuiteRetries {
    /// Decides whether `binary`, under which the L1 died (`why`), runs again; prints the
    /// decision with its evidence either way. Never after the binary printed a test failure.
    pub fn rerun_after_l1_death(&mut self, binary: &str, why: &str, failure_printed: bool) -> bool {
        if failure_printed {
            eprintln!(
                "==> not retried: the L1 died while {binary} ran ({why}), but {binary} had \
                 already printed a test failure, which stands"
            );
            return false;
        }
        if self.l1 >= L1_BUDGET {
            eprintln!(
                "==> not retried: the L1 died while {binary} ran ({why}); the suite used its \
                 {L1_BUDGET} L1 re-runs"
            );
            return false;
        }
        self.l1 += 1;
        eprintln!(
            "==> {RETRY_PREFIX} ({}/{L1_BUDGET} per suite, the lab's L1 died): {binary} ran \
             into: {why}; running {binary} again from the start",
            self.l1
        );
        true
    }

    /// Counts the L1 boot retries and guest retries of one binary run.
    pub fn add(&mut self, l1_boot: u32, guest: u32) {
        self.l1_boot += l1_boot;
        self.guest += guest;
    }

    /// For the suite's last line: `lab retries: N (L1 re-runs a/2, L1 boots b, guests c)`.
    pub fn summary(&self) -> String {
        format!(
            "lab retries: {} (L1 re-runs {}/{L1_BUDGET}, lost L1 boots {}, guests lost before \
             their agent answered {})",
            self.l1 + self.l1_boot + self.guest,
            self.l1,
            self.l1_boot,
            self.guest
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(vmm_status: Option<i32>, vmm_log: &str) -> Result<String, String> {
        classify_early_end(EarlyEnd {
            vmm_status,
            vmm_log,
        })
    }

    const STARTED: &str = "INFO husk_vmm: guest agent started boot_ms=412\n";

    #[test]
    fn the_agents_own_failures_are_never_the_labs() {
        assert!(end(Some(status::AGENT_FAILED), STARTED).is_err());
        assert!(end(Some(status::AGENT_FAILED), "").is_err());
        assert!(end(Some(status::VMM_ERROR), "").is_err());
        assert!(end(Some(status::USAGE), "").is_err());
        assert!(end(Some(status::STOPPED_BY_HOST), "").is_err());
        // A hang after the agent ran is ours until shown otherwise.
        assert!(end(None, STARTED).is_err());
    }

    #[test]
    fn early_resets_panics_and_kernel_hangs_are_the_labs() {
        assert!(end(Some(status::CLEAN), "").is_ok());
        assert!(end(Some(status::GUEST_PANIC), STARTED).is_ok());
        assert!(end(None, "INFO husk_vmm: VM started\n").is_ok());
    }

    #[test]
    fn shim_errors_are_told_apart() {
        assert!(shim_error_is_early_guest_loss(
            "ctr: failed to create shim task: The pod's VM ended while starting: husk-vmm \
             exited with status 3 (guest panic); its log ends: x"
        ));
        assert!(shim_error_is_early_guest_loss(
            "The pod's guest did not start its agent (husk-vmm saw no agent start on the boot \
             port): The agent did not answer within 60s (7 attempts)"
        ));
        assert!(!shim_error_is_early_guest_loss(
            "The pod's VM ended while starting: husk-vmm exited with status 5 (the guest agent \
             failed before it was ready)"
        ));
        assert!(!shim_error_is_early_guest_loss(
            "The pod's guest started its agent (husk-vmm saw its start), but the agent did not \
             answer"
        ));
        assert!(!shim_error_is_early_guest_loss(
            "The guest agent failed while the pod started: CreateSandbox: refused"
        ));
    }

    #[test]
    fn failure_lines_are_recognised() {
        assert!(line_reports_test_failure(
            "thread 'pause_freezes' panicked at integration/tests/containerd.rs:290:5:"
        ));
        assert!(line_reports_test_failure(
            "test result: FAILED. 3 passed; 1 failed"
        ));
        assert!(line_reports_test_failure(
            "test exit_code_propagates ... FAILED"
        ));
        assert!(!line_reports_test_failure(
            "test exit_code_propagates ... ok"
        ));
        assert!(!line_reports_test_failure(
            "test result: ok. 12 passed; 0 failed"
        ));
        assert!(!line_reports_test_failure(
            "guest console: husk-agent: error: panicked at nothing"
        ));
        assert!(line_is_guest_retry(
            "LAB RETRY 1/3 (guest lost before its agent answered): x: y"
        ));
    }

    #[test]
    fn l1_reruns_stop_at_a_printed_failure_and_at_the_budget() {
        let mut r = SuiteRetries::default();
        assert!(!r.rerun_after_l1_death("e2e", "QEMU ended", true));
        assert_eq!(r.l1, 0);
        assert!(r.rerun_after_l1_death("e2e", "QEMU ended", false));
        assert!(r.rerun_after_l1_death("e2e", "QEMU ended", false));
        assert!(!r.rerun_after_l1_death("e2e", "QEMU ended", false));
        r.add(1, 2);
        assert_eq!(
            r.summary(),
            "lab retries: 5 (L1 re-runs 2/2, lost L1 boots 1, guests lost before their agent \
             answered 2)"
        );
        assert!(retry_l1_boot(0, "no command start within 60s"));
        assert!(!retry_l1_boot(
            L1_BOOT_BUDGET,
            "no command start within 60s"
        ));
    }
}
