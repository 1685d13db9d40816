//! The guest's network interfaces, as far as the agent configures them today: `lo` up.
//!
//! The kernel gives every network namespace a loopback device, down. runc and crun bring it up
//! in every network namespace they create, so a container can reach its own services on
//! 127.0.0.1; libcontainer does not. The agent therefore brings `lo` up in the guest's own
//! network namespace when it starts (the one a pod's containers share: the shim drops the
//! host's namespace paths) and in each new network namespace a container gets (a `ctr run`
//! container, whose spec asks for a namespace of its own), between create and start, so the
//! container's first instruction already sees it up.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// The loopback device's name.
const LOOPBACK: &str = "lo";

/// Errors while configuring an interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Cannot open the network namespace {0}: {1}")]
    Namespace(PathBuf, io::Error),
    #[error("Cannot enter the network namespace {0}: {1}")]
    Enter(PathBuf, nix::Error),
    #[error("Cannot bring {0} up: {1}")]
    Up(&'static str, io::Error),
    #[error("The thread that configures the network namespace {0} panicked")]
    Panicked(PathBuf),
}

/// Brings `lo` up in the calling thread's network namespace.
pub fn loopback_up() -> Result<(), NetError> {
    set_up(LOOPBACK).map_err(|e| NetError::Up(LOOPBACK, e))
}

/// Brings `lo` up in the network namespace at `ns` (e.g. `/proc/<pid>/ns/net`). A thread of
/// its own enters the namespace, so the agent's threads stay in theirs.
pub fn loopback_up_in(ns: &Path) -> Result<(), NetError> {
    let file = File::open(ns).map_err(|e| NetError::Namespace(ns.to_owned(), e))?;
    let path = ns.to_owned();
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Enter(path, e))?;
        loopback_up()
    })
    .join()
    .map_err(|_| NetError::Panicked(ns.to_owned()))?
}

/// Whether interface `name` is up in the calling thread's network namespace.
#[cfg(test)]
pub fn is_up(name: &str) -> io::Result<bool> {
    let socket = control_socket()?;
    let mut req = request(name)?;
    get_flags(&socket, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(flags & libc::IFF_UP as libc::c_short != 0)
}

/// Sets `IFF_UP` on interface `name` (SIOCGIFFLAGS, then SIOCSIFFLAGS with the flag added).
fn set_up(name: &str) -> io::Result<()> {
    let socket = control_socket()?;
    let mut req = request(name)?;
    get_flags(&socket, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union; this writes that member.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: `req` is a valid ifreq that outlives the call; SIOCSIFFLAGS reads it only.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as libc::Ioctl, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A socket to address interface ioctls to, in the calling thread's network namespace.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; a non-negative result is a new fd we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming interface `name`.
fn request(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn get_flags(socket: &OwnedFd, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid ifreq that outlives the call; SIOCGIFFLAGS writes its flags.
    if unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFFLAGS as libc::Ioctl,
            req as *mut libc::ifreq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(request("lo").is_ok());
        assert!(request("").is_err());
        assert!(request("a-name-longer-than-16").is_err());
        assert!(request("l\0o").is_err());
    }

    /// On the real kernel: a fresh network namespace's `lo` is down, and up after
    /// `loopback_up_in`, while the caller's namespace is left alone. Needs root (a test host
    /// without CAP_SYS_ADMIN fails it, loudly).
    #[test]
    fn loopback_comes_up_in_a_fresh_namespace() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare a network namespace");
            let tid = nix::unistd::gettid();
            tx.send((tid, is_up(LOOPBACK).expect("lo flags"))).unwrap();
            // Keep the namespace alive until the check below is done.
            done_rx.recv().unwrap();
            is_up(LOOPBACK).expect("lo flags")
        });
        let (tid, before) = rx.recv().unwrap();
        assert!(!before, "a fresh network namespace's lo is down");
        let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        loopback_up_in(&PathBuf::from(format!("/proc/self/task/{tid}/ns/net"))).unwrap();
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            ours,
            "the caller stays in its namespace"
        );
        done_tx.send(()).unwrap();
        assert!(
            holder.join().unwrap(),
            "lo is up in the namespace after loopback_up_in"
        );
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let e = loopback_up_in(Path::new("/proc/self/ns/no-such")).unwrap_err();
        assert!(matches!(e, NetError::Namespace(..)), "{e}");
    }
}
