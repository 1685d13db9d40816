//! husk-vmm's jail: what the process gives up once the VM is built and before any thread
//! that serves the guest starts (DESIGN.md "husk-vmm's jail").
//!
//! By then every file it needs is open (`/dev/kvm`, the console, the guest memory memfd,
//! virtiofsd's socket, its own vsock listener) and the kernel and initrd are in guest memory,
//! so the jail can take the file system away entirely:
//! * new mount, IPC, UTS and network namespaces;
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
use nix::unistd::{Gid, Uid};

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
    Ok(format!(
        "uid={} gid={} groups=none namespaces=mnt,ipc,uts,net root=empty read-only tmpfs \
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
