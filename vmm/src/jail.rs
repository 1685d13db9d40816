//! husk-vmm's jail: what the process gives up once the VM is built and before any thread
//! that serves the guest starts (DESIGN.md "husk-vmm's jail").
//!
//! By then every file it needs is open (`/dev/kvm`, the console, the guest memory memfd,
//! virtiofsd's socket, its own vsock listener) and the kernel and initrd are in guest memory,
//! so the jail can take the file system away entirely:
//! * a PID namespace of its own, entered first (see [`enter_pid_namespace`]), then new mount,
//!   IPC, UTS and network namespaces;
//! * the root becomes a private, empty, read-only tmpfs mounted on the jail directory (the
//!   host's tree is detached, so the mount namespace holds only the jail);
//! * resource limits: no core dumps, no locked memory, no POSIX message queues, a bounded
//!   number of open files;
//! * every capability dropped (bounding, ambient, inheritable), then the unprivileged
//!   uid/gid with no supplementary groups, then `NO_NEW_PRIVS`.
//!
//! The seccomp filters (`crate::seccomp`) come after, per thread.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::{ForkResult, Gid, Pid, Uid};

/// The jail of one VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// An empty directory the VMM mounts its private root on.
    pub dir: PathBuf,
    /// The user it runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
}

/// Errors entering the jail; the VMM does not start the guest after one.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step failed
    #[error("Cannot enter the jail: {step}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The uid or gid is root's
    #[error("The jail's uid and gid must not be 0")]
    Root,
}

/// Most open files the jailed VMM may hold (vsock connections are one each).
pub const MAX_OPEN_FILES: u64 = 4096;

/// Signals the waiter outside the PID namespace passes on to the VMM: the shim's stop
/// requests and its state-dump request (the ones `event_loop` reads).
const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGUSR1];

/// Puts the VMM in a PID namespace of its own, where it is PID 1 and sees no other process.
///
/// A process cannot move itself into a new PID namespace, only its children are born there,
/// so this forks, and it must be called first, while the process has one thread and before
/// `/dev/kvm` is opened (a KVM VM serves only the process that created it). The child returns
/// and becomes the VMM. The parent never returns: it stays outside as a waiter, as
/// unprivileged and filtered as the VMM ([`crate::seccomp`]'s waiter filter), passes the stop
/// and dump signals on, and ends as the VMM ends (the same exit code, or death by the same
/// signal), so the shim that started it sees what it would see of the VMM itself. The VMM
/// dies with the waiter (its parent-death signal is SIGKILL), so killing the process the shim
/// started still kills the VM.
pub fn enter_pid_namespace(
    config: &JailConfig,
    seccomp: crate::seccomp::SeccompMode,
    selftest: bool,
) -> Result<(), JailError> {
    if config.uid == 0 || config.gid == 0 {
        return Err(JailError::Root);
    }
    // Blocked before the fork, so none arrives between it and the waiter's first wait; the
    // child unblocks them again (the VMM blocks its own set later).
    let mut waited = SigSet::empty();
    for signal in FORWARDED {
        waited.add(signal);
    }
    waited.add(Signal::SIGCHLD);
    let before = waited
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .map_err(step("block the forwarded signals"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(step("unshare the PID namespace"))?;
    let (alive_r, alive_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("make the waiter's pipe"))?;
    // SAFETY: the process has a single thread (the caller's contract), so the child may run
    // any code after the fork.
    match unsafe { nix::unistd::fork() }.map_err(step("fork the VMM into its PID namespace"))? {
        ForkResult::Child => {
            drop(alive_w);
            die_with_the_waiter(&alive_r)?;
            *WAITER.lock().unwrap_or_else(|e| e.into_inner()) = Some(alive_r);
            before
                .thread_set_mask()
                .map_err(step("unblock the forwarded signals"))?;
            Ok(())
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            wait_for_vmm(child, &waited, config, seccomp, selftest, alive_w)
        }
    }
}

/// The VMM's end of the pipe whose other end the waiter holds (set in the PID namespace).
static WAITER: std::sync::Mutex<Option<std::os::fd::OwnedFd>> = std::sync::Mutex::new(None);

/// Makes SIGKILL the calling process's parent-death signal, then exits if the waiter has
/// already gone (its end of `alive` is closed: the pipe reads as end of file at once). A
/// change of uid or gid clears the parent-death signal, so [`enter`] calls this again.
fn die_with_the_waiter(alive: &std::os::fd::OwnedFd) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(step("set the parent-death signal")(
            nix::errno::Errno::last(),
        ));
    }
    let mut poll = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(alive),
        nix::poll::PollFlags::POLLIN,
    )];
    if nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO).unwrap_or(0) != 0 {
        tracing::error!("the VMM's waiter is gone; stopping");
        std::process::exit(crate::exit::ExitStatus::VmmError.code());
    }
    Ok(())
}

/// The waiter: passes [`FORWARDED`] signals on to `vmm` and ends as it ends.
fn wait_for_vmm(
    vmm: Pid,
    waited: &SigSet,
    config: &JailConfig,
    seccomp: crate::seccomp::SeccompMode,
    selftest: bool,
    _alive: std::os::fd::OwnedFd,
) -> ! {
    use crate::exit::ExitStatus;
    use crate::seccomp::{self, ThreadKind};
    // SIGCHLD ignored (inherited) would reap the VMM before `waitpid` could see its status.
    // SAFETY: restoring a default disposition installs no handler.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGCHLD, SigHandler::SigDfl) };
    let _ = seccomp::install_sigsys_handler();
    let program = seccomp::waiter_program(seccomp, std::process::id(), vmm.as_raw() as u32);
    let jailed = drop_privileges(config).and_then(|()| set_limits());
    let filtered = match (jailed, program) {
        (Ok(()), Ok(program)) => {
            seccomp::install(ThreadKind::Waiter, program.as_ref()).map_err(|e| e.to_string())
        }
        (Err(e), _) => Err(e.to_string()),
        (_, Err(e)) => Err(e.to_string()),
    };
    if let Err(e) = filtered {
        tracing::error!("Cannot jail the VMM's waiter: {e}");
        // The VMM dies with its parent (SIGKILL), before it has started a guest.
        // SAFETY: _exit ends the process at once, without running exit handlers.
        unsafe { libc::_exit(ExitStatus::VmmError.code()) }
    }
    if selftest {
        seccomp::forbidden_syscall();
    }
    loop {
        let Ok(signal) = waited.wait() else { continue };
        if signal != Signal::SIGCHLD {
            match nix::sys::signal::kill(vmm, signal) {
                // The VMM still runs as root, before its own jail, and has started no guest:
                // a stop request ends the waiter, and the VMM with it.
                Err(nix::errno::Errno::EPERM) if signal != Signal::SIGUSR1 => {
                    // SAFETY: as above.
                    unsafe { libc::_exit(ExitStatus::Stopped.code()) }
                }
                _ => continue,
            }
        }
        match nix::sys::wait::waitpid(vmm, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            // SAFETY: as above.
            Ok(WaitStatus::Exited(_, code)) => unsafe { libc::_exit(code) },
            Ok(WaitStatus::Signaled(_, signal, _)) => die_of(signal),
            Ok(_) => {}
            // SAFETY: as above.
            Err(_) => unsafe { libc::_exit(ExitStatus::VmmError.code()) },
        }
    }
}

/// Ends the process by `signal`, with its default action (no handler, unblocked).
fn die_of(signal: Signal) -> ! {
    // SAFETY: resetting a disposition to the default and raising a signal at ourselves are
    // plain syscalls; `_exit` covers a signal whose default action is to be ignored.
    unsafe {
        let _ = nix::sys::signal::signal(signal, SigHandler::SigDfl);
        let mut only = SigSet::empty();
        only.add(signal);
        let _ = only.thread_unblock();
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), signal);
        libc::_exit(128 + signal as i32)
    }
}

fn step(step: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

/// Enters the jail. Must run while the process has a single thread; returns what it applied,
/// for the log.
pub fn enter(config: &JailConfig) -> Result<String, JailError> {
    if config.uid == 0 || config.gid == 0 {
        return Err(JailError::Root);
    }
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(step("unshare the mount, IPC, UTS and network namespaces"))?;
    pivot_into_empty_root(&config.dir)?;
    set_limits()?;
    drop_privileges(config)?;
    if let Some(alive) = WAITER.lock().unwrap_or_else(|e| e.into_inner()).take() {
        die_with_the_waiter(&alive)?;
    }
    Ok(format!(
        "uid={} gid={} groups=none namespaces=pid,mnt,ipc,uts,net root=empty read-only tmpfs \
         capabilities=none no_new_privs=1 rlimits=nofile:{MAX_OPEN_FILES},core:0,memlock:0,msgqueue:0",
        config.uid, config.gid
    ))
}

/// Mounts a private empty tmpfs on `dir`, makes it the root and detaches the old one.
fn pivot_into_empty_root(dir: &Path) -> Result<(), JailError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make the mounts private"))?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        flags,
        Some("size=4k,nr_inodes=8,mode=0555"),
    )
    .map_err(step("mount the jail's tmpfs"))?;
    nix::unistd::chdir(dir).map_err(step("enter the jail directory"))?;
    // pivot_root(".", "."): the old root ends up stacked on the new one, then detached.
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's root"))?;
    nix::unistd::chdir("/").map_err(step("enter the new root"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
        None::<&str>,
    )
    .map_err(step("make the root read-only"))
}

fn set_limits() -> Result<(), JailError> {
    use nix::sys::resource::{setrlimit, Resource};
    for (resource, limit) in [
        (Resource::RLIMIT_NOFILE, MAX_OPEN_FILES),
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_MEMLOCK, 0),
        (Resource::RLIMIT_MSGQUEUE, 0),
    ] {
        setrlimit(resource, limit, limit).map_err(step("set the resource limits"))?;
    }
    Ok(())
}

/// The highest capability number the kernel may know (the bounding set is cleared up to it;
/// numbers past the kernel's last are refused with EINVAL and skipped).
const MAX_CAP: libc::c_ulong = 63;

fn drop_privileges(config: &JailConfig) -> Result<(), JailError> {
    for cap in 0..=MAX_CAP {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 && nix::errno::Errno::last() != nix::errno::Errno::EINVAL {
            return Err(step("drop the bounding capabilities")(
                nix::errno::Errno::last(),
            ));
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(step("clear the ambient capabilities")(
            nix::errno::Errno::last(),
        ));
    }
    nix::unistd::setgroups(&[]).map_err(step("drop the supplementary groups"))?;
    let gid = Gid::from_raw(config.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(step("set the gid"))?;
    let uid = Uid::from_raw(config.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(step("set the uid"))?;
    clear_capabilities()?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(step("set no_new_privs")(nix::errno::Errno::last()));
    }
    Ok(())
}

/// capset(2) with every set empty (the uid change cleared the permitted and effective sets;
/// this also clears the inheritable one).
fn clear_capabilities() -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads one header and two data structs (version 3), both live locals of
    // the kernel's layout.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    if rc != 0 {
        return Err(step("clear the capability sets")(nix::errno::Errno::last()));
    }
    Ok(())
}
