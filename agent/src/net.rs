//! The guest's network interfaces, as far as the agent configures them today: `lo` up.
//!
//! The kernel gives every network namespace a loopback device, down. runc and crun bring it up
//! in every network namespace they create, so a container can reach its own services on
//! 127.0.0.1; libcontainer does not. The agent therefore brings `lo` up in the guest's own
//! network namespace when it starts (the one a pod's containers share: the shim drops the
//! host's namespace paths) and in each new network namespace a container gets (a `ctr run`
//! container, whose spec asks for a namespace of its own), between create and start, so the
//! container's first instruction already sees it up.
//!
//! A pod's namespaced sysctls (`net.*`, e.g. Kubernetes' `net.ipv4.ip_unprivileged_port_start`,
//! and the IPC ones) and its hostname arrive on its sandbox container, which the shim makes
//! share the guest's network, IPC and UTS namespaces: those are the pod's. libcontainer
//! refuses such sysctls, and a hostname, for a container without the namespace of its own
//! (under runc they would change the host's), so the agent takes them out of the spec and sets
//! the sysctls in the guest's namespaces itself, before the container is created (the
//! hostname is the guest's since the sandbox was created).

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
    #[error("Sysctl {0:?} is not a network or IPC sysctl the agent sets for a pod")]
    SysctlName(String),
    #[error("Cannot set sysctl {0}={1:?}: {2}")]
    Sysctl(String, String, io::Error),
}

/// The IPC namespace's sysctls besides `fs.mqueue.*` (the list runc and libcontainer check).
const IPC_SYSCTLS: &[&str] = &[
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Which namespace a namespaced sysctl belongs to: network (`net.*`) or IPC.
fn sysctl_namespace(key: &str) -> Option<oci_spec::runtime::LinuxNamespaceType> {
    use oci_spec::runtime::LinuxNamespaceType;
    let key = key.replace('/', ".");
    if key.starts_with("net.") {
        Some(LinuxNamespaceType::Network)
    } else if key.starts_with("fs.mqueue.") || IPC_SYSCTLS.contains(&key.as_str()) {
        Some(LinuxNamespaceType::Ipc)
    } else {
        None
    }
}

/// Whether the container gets a namespace of type `typ` of its own: an entry without a path
/// (the shim drops the host's paths, so one with a path is not expected here; it would join
/// another namespace, not own one).
pub fn own_namespace(
    spec: &oci_spec::runtime::Spec,
    typ: oci_spec::runtime::LinuxNamespaceType,
) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|ns| ns.typ() == typ && ns.path().is_none()))
}

/// Takes the namespaced sysctls out of `spec` whose namespace (network or IPC) the container
/// does not have of its own, because it shares the guest's (the pod's), and returns them, to
/// be set by the agent in the guest's namespaces; the others stay for libcontainer.
pub fn take_pod_sysctls(spec: &mut oci_spec::runtime::Spec) -> Vec<(String, String)> {
    use oci_spec::runtime::LinuxNamespaceType::{Ipc, Network};
    let own: Vec<_> = [Network, Ipc]
        .into_iter()
        .filter(|t| own_namespace(spec, *t))
        .collect();
    let Some(linux) = spec.linux_mut().as_mut() else {
        return Vec::new();
    };
    let Some(sysctls) = linux.sysctl_mut().as_mut() else {
        return Vec::new();
    };
    let keys: Vec<String> = sysctls
        .keys()
        .filter(|k| sysctl_namespace(k).is_some_and(|ns| !own.contains(&ns)))
        .cloned()
        .collect();
    let mut taken: Vec<(String, String)> = keys
        .into_iter()
        .filter_map(|k| sysctls.remove_entry(&k))
        .collect();
    taken.sort();
    taken
}

/// The path under `/proc/sys` of namespaced sysctl `key` (`net.ipv4.x` or `net/ipv4/x`), or
/// an error for anything else: a network or IPC sysctl, every component a plain name.
fn sysctl_path(key: &str) -> Result<PathBuf, NetError> {
    let bad = || NetError::SysctlName(key.to_owned());
    let parts: Vec<&str> = if key.contains('/') {
        key.split('/').collect()
    } else {
        key.split('.').collect()
    };
    if sysctl_namespace(key).is_none() || parts.len() < 2 {
        return Err(bad());
    }
    let mut path = PathBuf::from("/proc/sys");
    for part in parts {
        let plain = !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b));
        if !plain {
            return Err(bad());
        }
        path.push(part);
    }
    Ok(path)
}

/// Takes the hostname out of `spec` when the container has no UTS namespace of its own (a pod's
/// sandbox container, which shares the guest's): the guest's is the pod's hostname, which the
/// agent set when the sandbox was created (`sandbox::create`), and libcontainer refuses a
/// hostname without a UTS namespace. Returns what was taken.
pub fn take_pod_hostname(spec: &mut oci_spec::runtime::Spec) -> Option<String> {
    if own_namespace(spec, oci_spec::runtime::LinuxNamespaceType::Uts) {
        return None;
    }
    spec.hostname_mut().take()
}

/// Sets namespaced sysctls in the calling thread's namespaces (the guest's).
pub fn set_sysctls(sysctls: &[(String, String)]) -> Result<(), NetError> {
    for (key, value) in sysctls {
        let path = sysctl_path(key)?;
        std::fs::write(&path, value.as_bytes())
            .map_err(|e| NetError::Sysctl(key.clone(), value.clone(), e))?;
    }
    Ok(())
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

    fn spec(linux: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": linux,
        }))
        .unwrap()
    }

    /// A pod's sandbox (no network namespace of its own, an IPC one here) gives up its `net.*`
    /// sysctls to the agent and keeps the IPC one and the unknown one for libcontainer (which
    /// refuses the latter); a container with namespaces of its own keeps them all.
    #[test]
    fn namespaced_sysctls_of_a_pod_are_taken_from_its_spec() {
        let sysctls = serde_json::json!({
            "net.ipv4.ip_unprivileged_port_start": "80",
            "net/core/somaxconn": "512",
            "kernel.shm_rmid_forced": "1",
            "vm.overcommit_memory": "1",
        });
        let mut pod = spec(serde_json::json!({
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}],
            "sysctl": sysctls,
        }));
        assert_eq!(
            take_pod_sysctls(&mut pod),
            vec![
                (
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "80".to_string()
                ),
                ("net/core/somaxconn".to_string(), "512".to_string()),
            ]
        );
        let left = pod.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left["kernel.shm_rmid_forced"], "1");

        let mut shared_ipc = spec(serde_json::json!({
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network"}],
            "sysctl": sysctls,
        }));
        assert_eq!(
            take_pod_sysctls(&mut shared_ipc),
            vec![("kernel.shm_rmid_forced".to_string(), "1".to_string())]
        );

        let mut own = spec(serde_json::json!({
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network"}, {"type": "ipc"}],
            "sysctl": sysctls,
        }));
        assert!(take_pod_sysctls(&mut own).is_empty());
        assert_eq!(
            own.linux()
                .as_ref()
                .unwrap()
                .sysctl()
                .as_ref()
                .unwrap()
                .len(),
            4
        );
    }

    /// A pod's sandbox (no UTS namespace of its own) gives up its hostname (the guest's already);
    /// a container with a UTS namespace keeps it for libcontainer.
    #[test]
    fn the_hostname_of_a_pod_is_taken_from_its_sandbox_spec() {
        let with = |namespaces: serde_json::Value| {
            let mut s = spec(serde_json::json!({ "namespaces": namespaces }));
            s.set_hostname(Some("web".into()));
            s
        };
        let mut pod = with(serde_json::json!([{"type": "pid"}, {"type": "mount"}]));
        assert_eq!(take_pod_hostname(&mut pod).as_deref(), Some("web"));
        assert_eq!(pod.hostname(), &None);
        let mut own =
            with(serde_json::json!([{"type": "pid"}, {"type": "mount"}, {"type": "uts"}]));
        assert_eq!(take_pod_hostname(&mut own), None);
        assert_eq!(own.hostname().as_deref(), Some("web"));
    }

    /// Only namespaced (network and IPC) sysctls made of plain components become paths.
    #[test]
    fn sysctl_names_cannot_leave_proc_sys_net() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        assert_eq!(
            sysctl_path("kernel.shm_rmid_forced").unwrap(),
            Path::new("/proc/sys/kernel/shm_rmid_forced")
        );
        assert_eq!(
            sysctl_path("fs.mqueue.msg_max").unwrap(),
            Path::new("/proc/sys/fs/mqueue/msg_max")
        );
        for bad in [
            "kernel.hostname",
            "kernel.shm_rmid_forced.x",
            "fs.file-max",
            "net",
            "net..ipv4",
            "net/../kernel/hostname",
            "net/ipv4/../../kernel/x",
            "net.ipv4.x\0",
            "/net/ipv4/x",
            "net/ipv4/x/",
        ] {
            assert!(
                matches!(sysctl_path(bad), Err(NetError::SysctlName(_))),
                "{bad:?} was accepted"
            );
        }
    }

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
