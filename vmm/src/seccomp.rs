//! husk-vmm's seccomp filters: one per thread kind, deny by default.
//!
//! Each thread installs its own filter (seccompiler, no TSYNC) before it touches anything the
//! guest controls: the event loop before its first `epoll_wait`, each vCPU before its first
//! `KVM_RUN`, the main thread once the others are started; the vCPUs wait for all three
//! (see `builder::run_vm`), so the guest's first instruction runs under every filter.
//!
//! The lists are what each thread does after setup, and no more: no `open`, `exec`, `clone`,
//! `mount`, `ptrace` or `kill` of another process anywhere; `ioctl` only by request number (the
//! vCPU thread's KVM calls, the event loop's `FIONBIO` and `TUNSETOFFLOAD`); no executable
//! memory (`mmap` and `mprotect` with `PROT_EXEC` are refused). Signals go only to husk-vmm's
//! own threads (the vCPU kick, `abort`). A syscall outside a list ([`SeccompMode::Kill`])
//! traps into a handler that writes the thread kind and syscall number to the VMM's log and
//! then lets the process die of `SIGSYS`, which the shim reports as a VMM failure;
//! [`SeccompMode::Log`] lets it through and has the kernel log it (to find a missing entry),
//! [`SeccompMode::Off`] installs nothing.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filter does with a syscall outside its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the process (SIGSYS).
    #[default]
    Kill,
    /// Allow it and have the kernel log it (audit).
    Log,
    /// No filters.
    Off,
}

/// The kinds of husk-vmm threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ThreadKind {
    /// The main thread: waits for the VM's end, flushes the console, exits.
    Main,
    /// The device event loop: vsock sockets, virtio queue and vhost-user events, signals.
    Events,
    /// A vCPU: `KVM_RUN` and the device emulation of its exits.
    Vcpu,
    /// The waiter outside the VMM's PID namespace (`jail::enter_pid_namespace`): waits for
    /// signals and for the VMM's end.
    Waiter,
}

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules or could not install them
    #[error("Cannot install the {0:?} seccomp filter")]
    Filter(ThreadKind, #[source] seccompiler::Error),
    /// seccompiler refused a condition or rule
    #[error("Invalid seccomp rule")]
    Backend(#[from] seccompiler::BackendError),
}

// ioctl request numbers (linux/kvm.h, asm-generic/ioctls.h).
const KVMIO: u64 = 0xAE;
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (KVMIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = ioc(0, 0x80, 0);
/// `KVM_GET_REGS`: `_IOR(KVMIO, 0x81, struct kvm_regs)`.
pub const KVM_GET_REGS: u64 = ioc(
    IOC_READ,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>() as u64,
);
/// `KVM_GET_SREGS`: `_IOR(KVMIO, 0x83, struct kvm_sregs)`.
pub const KVM_GET_SREGS: u64 = ioc(
    IOC_READ,
    0x83,
    std::mem::size_of::<kvm_bindings::kvm_sregs>() as u64,
);
/// `KVM_TRANSLATE`: `_IOWR(KVMIO, 0x85, struct kvm_translation)`.
pub const KVM_TRANSLATE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x85,
    std::mem::size_of::<kvm_bindings::kvm_translation>() as u64,
);
/// `FIONBIO` (what `set_nonblocking` uses).
const FIONBIO: u64 = 0x5421;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)` (linux/if_tun.h).
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

fn arg_eq(index: u8, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?)
}

/// `arg & mask == 0`.
fn arg_lacks(index: u8, mask: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )?)
}

/// The syscalls of a thread kind, with their argument rules (an empty list: any arguments).
fn rules(kind: ThreadKind, pid: u32) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let any = |rules: &mut BTreeMap<i64, Vec<SeccompRule>>, calls: &[libc::c_long]| {
        for call in calls {
            rules.insert(*call, Vec::new());
        }
    };
    // Every thread: memory (never executable), locks, time, its own signals, logging, exit.
    any(
        &mut rules,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_getrandom,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    let no_exec = || -> Result<Vec<SeccompRule>, SeccompError> {
        Ok(vec![SeccompRule::new(vec![arg_lacks(
            2,
            libc::PROT_EXEC as u64,
        )?])?])
    };
    rules.insert(libc::SYS_mmap, no_exec()?);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    // Signals only to our own threads: the vCPU kick, abort's SIGABRT.
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![arg_eq(0, u64::from(pid))?])?],
    );
    // Descriptor flags only (std checks and sets them; F_DUPFD and F_SETOWN are out).
    rules.insert(
        libc::SYS_fcntl,
        [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL]
            .into_iter()
            .map(|cmd| Ok(SeccompRule::new(vec![arg_eq(1, cmd as u64)?])?))
            .collect::<Result<Vec<_>, SeccompError>>()?,
    );
    // abort() resets SIGABRT's handler before raising it; the SIGSYS handler resets its own.
    rules.insert(
        libc::SYS_rt_sigaction,
        vec![
            SeccompRule::new(vec![arg_eq(0, libc::SIGABRT as u64)?])?,
            SeccompRule::new(vec![arg_eq(0, libc::SIGSYS as u64)?])?,
        ],
    );
    // vhost-user messages (the vCPU thread activates the virtio-fs device; the event loop
    // answers its backend) and vsock data: socket I/O on descriptors opened before.
    any(
        &mut rules,
        &[
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
        ],
    );
    match kind {
        ThreadKind::Main => {
            // Removing the vsock socket at the end when not jailed.
            any(&mut rules, &[libc::SYS_unlink, libc::SYS_unlinkat]);
        }
        ThreadKind::Events => {
            any(
                &mut rules,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_accept4,
                    libc::SYS_connect,
                    libc::SYS_shutdown,
                    libc::SYS_getsockopt,
                ],
            );
            // Guest-initiated vsock connections: Unix stream sockets only.
            rules.insert(
                libc::SYS_socket,
                vec![SeccompRule::new(vec![arg_eq(0, libc::AF_UNIX as u64)?])?],
            );
            // FIONBIO, and the net device's tap offloads, which follow the driver's features.
            rules.insert(
                libc::SYS_ioctl,
                vec![
                    SeccompRule::new(vec![arg_eq(1, FIONBIO)?])?,
                    SeccompRule::new(vec![arg_eq(1, TUNSETOFFLOAD)?])?,
                ],
            );
        }
        ThreadKind::Waiter => {
            // sigwait, the VMM's end, and its own end by the VMM's signal (the default action
            // restored first). `kill` is added by [`waiter_program`], for two pids only.
            any(
                &mut rules,
                &[libc::SYS_rt_sigtimedwait, libc::SYS_wait4, libc::SYS_waitid],
            );
            rules.insert(libc::SYS_rt_sigaction, Vec::new());
        }
        ThreadKind::Vcpu => {
            let ioctls = [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_TRANSLATE]
                .into_iter()
                .map(|request| Ok(SeccompRule::new(vec![arg_eq(1, request)?])?))
                .collect::<Result<Vec<_>, SeccompError>>()?;
            rules.insert(libc::SYS_ioctl, ioctls);
            // The virtio-fs device's activation waits for virtiofsd's replies.
            any(&mut rules, &[libc::SYS_poll, libc::SYS_ppoll]);
        }
    }
    Ok(rules)
}

/// The BPF program of thread kind `kind` in process `pid`, or `None` when `mode` is off.
pub fn program(
    kind: ThreadKind,
    mode: SeccompMode,
    pid: u32,
) -> Result<Option<BpfProgram>, SeccompError> {
    compile(kind, mode, rules(kind, pid)?)
}

/// The waiter's program: [`ThreadKind::Waiter`]'s rules, and `kill` of the VMM (`vmm`, the
/// signals it passes on) and of itself (`pid`, to end by the VMM's signal) only.
pub fn waiter_program(
    mode: SeccompMode,
    pid: u32,
    vmm: u32,
) -> Result<Option<BpfProgram>, SeccompError> {
    let mut rules = rules(ThreadKind::Waiter, pid)?;
    rules.insert(
        libc::SYS_kill,
        vec![
            SeccompRule::new(vec![arg_eq(0, u64::from(vmm))?])?,
            SeccompRule::new(vec![arg_eq(0, u64::from(pid))?])?,
        ],
    );
    compile(ThreadKind::Waiter, mode, rules)
}

fn compile(
    kind: ThreadKind,
    mode: SeccompMode,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Filter(kind, e.into()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Filter(kind, e.into()))?;
    Ok(Some(program))
}

thread_local! {
    /// The calling thread's kind, for the SIGSYS handler's message.
    static KIND: std::cell::Cell<&'static str> = const { std::cell::Cell::new("unfiltered") };
}

/// Installs `program` (from [`program`]) on the calling thread.
pub fn install(kind: ThreadKind, program: Option<&BpfProgram>) -> Result<(), SeccompError> {
    KIND.with(|k| {
        k.set(match kind {
            ThreadKind::Main => "main",
            ThreadKind::Events => "event loop",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Waiter => "waiter",
        })
    });
    match program {
        Some(program) => {
            seccompiler::apply_filter(program).map_err(|e| SeccompError::Filter(kind, e))
        }
        None => Ok(()),
    }
}

/// Keeps glibc's allocator from opening files on a filtered thread: call first in `main`,
/// before any thread starts.
///
/// glibc gives each new thread its own malloc arena. When a free leaves enough at the top of
/// such an arena, `shrink_heap` reads `/proc/sys/vm/overcommit_memory` once per process, with
/// `openat`, which no filter allows: a bulk stream through the event loop killed husk-vmm that
/// way. With one arena every thread allocates from the main one, which trims with `brk` and
/// never reads that file. (Cloud Hypervisor allows a read-only `openat` instead; we keep the
/// file system out of every list.) It also keeps the VMM's host memory in one heap.
pub fn single_malloc_arena() -> std::io::Result<()> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes allocator parameters; M_ARENA_MAX takes a count.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
            return Err(std::io::Error::other("mallopt(M_ARENA_MAX, 1) failed"));
        }
    }
    Ok(())
}

/// Installs the handler of the filters' trap: it writes which thread made which syscall to
/// stderr (the VMM's log), then the process dies of SIGSYS. Call before any filter.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Offset of `si_call_addr` in a SIGSYS `siginfo_t` (x86_64: after the three ints and the
/// padding).
const SI_CALL_ADDR_OFFSET: usize = 16;
/// Offset of `si_syscall` (after `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO), whose `_sigsys`
    // member holds the syscall number as an int at SI_SYSCALL_OFFSET.
    let nr =
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    // SAFETY: as above; `si_call_addr` is a pointer-sized field at SI_CALL_ADDR_OFFSET.
    let call = unsafe {
        std::ptr::read_unaligned(info.cast::<u8>().add(SI_CALL_ADDR_OFFSET).cast::<usize>())
    };
    let kind = KIND.with(|k| k.get());
    let mut msg = [0u8; 320];
    let mut len = 0;
    let mut put = |msg: &mut [u8; 320], part: &[u8]| {
        msg[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    };
    put(&mut msg, b"husk-vmm: seccomp: the ");
    put(&mut msg, kind.as_bytes());
    put(&mut msg, b" thread made syscall ");
    let mut number = [0u8; 24];
    let n = write_decimal(&mut number, i64::from(nr));
    put(&mut msg, &number[..n]);
    // The call site, and two anchors to place it: one in husk-vmm, one in libc.
    let anchors: [(&[u8], usize); 3] = [
        (b" at 0x", call),
        (
            b" (husk-vmm's on_sigsys at 0x",
            on_sigsys as *const () as usize,
        ),
        (b", libc's write at 0x", libc::write as *const () as usize),
    ];
    for (label, address) in anchors {
        put(&mut msg, label);
        let n = write_hex(&mut number, address as u64);
        put(&mut msg, &number[..n]);
    }
    put(
        &mut msg,
        b"), which its filter forbids; the VMM stops (SIGSYS)\n",
    );
    // SAFETY: write, signal and tgkill are async-signal-safe and allowed by every filter;
    // `msg` is a live local buffer of at least `len` bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), len);
        // The default action, then a SIGSYS that is delivered once this handler returns.
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

/// Writes `value` in decimal at the start of `out` without allocating; returns its length.
fn write_decimal(out: &mut [u8], value: i64) -> usize {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut len = 0;
    if value < 0 {
        out[0] = b'-';
        len = 1;
    }
    let body = &digits[i..];
    out[len..len + body.len()].copy_from_slice(body);
    len + body.len()
}

/// Writes `value` in lower-case hex at the start of `out` without allocating; returns its
/// length.
fn write_hex(out: &mut [u8], value: u64) -> usize {
    let digits = if value == 0 {
        1
    } else {
        (64 - value.leading_zeros() as usize).div_ceil(4)
    };
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        let nibble = (value >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble as usize];
    }
    digits
}

/// A syscall none of the filters allows, for `--seccomp-selftest`: the test that proves a
/// thread's filter is on calls it on that thread and expects the process to die of SIGSYS.
pub fn forbidden_syscall() {
    // SAFETY: getppid has no arguments and no effect on memory.
    unsafe {
        libc::syscall(libc::SYS_getppid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_kvm_ioctls() {
        // The values of linux/kvm.h on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
        #[allow(clippy::unnecessary_cast)] // a c_int on musl, a c_ulong on glibc
        let tunsetoffload = libc::TUNSETOFFLOAD as u64;
        assert_eq!(TUNSETOFFLOAD, tunsetoffload);
    }

    #[test]
    fn every_kind_compiles_and_off_is_nothing() {
        for kind in [ThreadKind::Main, ThreadKind::Events, ThreadKind::Vcpu] {
            assert!(program(kind, SeccompMode::Kill, 1).unwrap().is_some());
            assert!(program(kind, SeccompMode::Off, 1).unwrap().is_none());
        }
        let events = rules(ThreadKind::Events, 1).unwrap();
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_openat,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_mount,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_getppid,
        ] {
            for kind in [ThreadKind::Main, ThreadKind::Events, ThreadKind::Vcpu] {
                assert!(
                    !rules(kind, 1).unwrap().contains_key(&forbidden),
                    "{kind:?} allows {forbidden}"
                );
            }
        }
        assert!(events.contains_key(&libc::SYS_accept4));
    }

    #[test]
    fn the_waiter_may_signal_only_the_vmm_and_itself() {
        assert!(program(ThreadKind::Waiter, SeccompMode::Kill, 1)
            .unwrap()
            .is_some());
        assert!(!rules(ThreadKind::Waiter, 10)
            .unwrap()
            .contains_key(&libc::SYS_kill));
        for kind in [ThreadKind::Main, ThreadKind::Events, ThreadKind::Vcpu] {
            assert!(!rules(kind, 10).unwrap().contains_key(&libc::SYS_wait4));
        }
        let prog = waiter_program(SeccompMode::Kill, std::process::id(), 1)
            .unwrap()
            .unwrap();
        // SAFETY: the child only installs the filter and makes raw syscalls before _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let _ = install_sigsys_handler();
                // The filter was built for the parent's pid: a kill of anything but the
                // two pids it names is a forbidden syscall.
                let code = match install(ThreadKind::Waiter, Some(&prog)) {
                    Ok(()) => {
                        // SAFETY: kill with signal 0 only checks; it never returns here.
                        unsafe { libc::kill(2, 0) };
                        0
                    }
                    Err(_) => 7,
                };
                // SAFETY: _exit is async-signal-safe and ends the child.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Signaled(
                        child,
                        nix::sys::signal::Signal::SIGSYS,
                        false
                    ),
                    "the waiter's filter let a kill of pid 2 through"
                );
            }
        }
    }

    #[test]
    fn decimals_without_allocation() {
        let mut out = [0u8; 24];
        let n = write_decimal(&mut out, 39);
        assert_eq!(&out[..n], b"39");
        let n = write_decimal(&mut out, -1);
        assert_eq!(&out[..n], b"-1");
        let n = write_decimal(&mut out, 0);
        assert_eq!(&out[..n], b"0");
        for value in [0u64, 0xf, 0x10, 0x7f12_3456_789a, u64::MAX] {
            let n = write_hex(&mut out, value);
            assert_eq!(
                std::str::from_utf8(&out[..n]).unwrap(),
                format!("{value:x}")
            );
        }
    }

    /// A filter really kills: a child process installs the vCPU filter and calls a syscall
    /// outside it; it dies of SIGSYS after saying which syscall.
    #[test]
    fn a_forbidden_syscall_kills_with_sigsys() {
        let prog = program(ThreadKind::Vcpu, SeccompMode::Kill, std::process::id()).unwrap();
        // SAFETY: the child only installs the filter and makes raw syscalls before _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let _ = install_sigsys_handler();
                let code = match install(ThreadKind::Vcpu, prog.as_ref()) {
                    Ok(()) => {
                        forbidden_syscall();
                        0
                    }
                    Err(_) => 7,
                };
                // SAFETY: _exit is async-signal-safe and ends the child.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Signaled(
                        child,
                        nix::sys::signal::Signal::SIGSYS,
                        false
                    ),
                    "the filter did not kill"
                );
            }
        }
    }
}
