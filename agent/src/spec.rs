//! Checking and rewriting the OCI spec the host sends, before libcontainer sees it.
//!
//! The rootfs is always `/run/husk/shared/<container-id>/rootfs`, resolved without leaving
//! the share; bind-mount sources must resolve inside the share or the sandbox directory;
//! destinations must be plain absolute paths. The agent owns the guest's layout, so it sets
//! the cgroup path, drops hooks (they would run guest binaries as PID 1's children outside
//! the container) and handles the terminal itself (`process.terminal` becomes false; the
//! agent gives the process a pty it made).
//!
//! It also refuses what husk itself never sends, so that nothing in a spec can turn a
//! container against the guest's agent or devices: a namespace `path` (the shim drops host
//! paths; joining another guest namespace by path could put a container into the agent's),
//! a container without its own PID and mount namespaces (it would see and could kill the
//! agent, PID 1), mount types outside the ones a container runtime uses (no block or network
//! file systems, no second virtio-fs mount of the share), and device nodes outside the
//! harmless character devices (no `/dev/mem`, no disks, no vsock). A container joins another
//! container's PID namespace only by that container's id (`CreateContainer`'s
//! `pid_namespace_of`), which the agent turns into the path ([`join_pid_namespace`]).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Spec};

use crate::safepath::{self, SafePathError};
use crate::sandbox::{SANDBOX_DIR, SHARED_DIR};

/// Largest spec or process JSON accepted.
pub const MAX_SPEC_BYTES: usize = 512 * 1024;

/// Errors in a host-sent spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec is larger than allowed
    #[error("The spec is {0} bytes, more than {MAX_SPEC_BYTES}")]
    TooLarge(usize),
    /// The spec is not valid OCI JSON
    #[error("The spec is not valid OCI runtime JSON")]
    Json(#[source] serde_json::Error),
    /// The spec has no process
    #[error("The spec has no process or an empty args list")]
    NoProcess,
    /// The spec has no linux section
    #[error("The spec has no linux section")]
    NoLinux,
    /// The rootfs is not a directory inside the share
    #[error("The rootfs is not a directory inside the share")]
    Rootfs(#[source] SafePathError),
    /// A mount path is not allowed
    #[error("Mount {0:?} is not allowed")]
    Mount(String, #[source] Option<SafePathError>),
    /// A mount of a file system type containers do not get
    #[error("Mount {0:?} has type {1:?}; allowed: {types}", types = MOUNT_TYPES.join(", "))]
    MountType(String, String),
    /// A namespace is joined by path
    #[error("Namespace {0} names a path ({1:?}): joining namespaces by path is not supported in the guest")]
    NamespacePath(String, String),
    /// A namespace every container must have of its own is missing
    #[error("The container has no {0} namespace of its own: it would share the agent's")]
    NamespaceMissing(&'static str),
    /// A device node that containers do not get
    #[error("Device {0:?} ({1} {2}:{3}) is not allowed in a husk guest")]
    Device(String, String, i64, i64),
}

/// File system types a container may mount (what runc specs and Kubernetes use); `bind`
/// mounts are checked separately and may only come from the share or the sandbox directory.
pub const MOUNT_TYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "bind", "none",
];

/// Character devices a container may have as nodes (major, minor): null, zero, full,
/// random, urandom, tty, console, ptmx, net/tun and fuse. Everything else (block devices,
/// memory devices, vsock, the guest's console and disks) stays out.
const ALLOWED_DEVICES: &[(i64, i64)] = &[
    (1, 3),
    (1, 5),
    (1, 7),
    (1, 8),
    (1, 9),
    (5, 0),
    (5, 1),
    (5, 2),
    (10, 200),
    (10, 229),
];

/// The checks of the module documentation on namespaces, mount types and devices.
fn check_guest_resources(spec: &Spec) -> Result<(), SpecError> {
    use oci_spec::runtime::LinuxNamespaceType;
    let linux = spec.linux().as_ref().ok_or(SpecError::NoLinux)?;
    let namespaces = linux.namespaces().as_deref().unwrap_or_default();
    for ns in namespaces {
        if let Some(path) = ns.path().as_ref().filter(|p| !p.as_os_str().is_empty()) {
            return Err(SpecError::NamespacePath(
                format!("{:?}", ns.typ()).to_lowercase(),
                path.display().to_string(),
            ));
        }
    }
    for (typ, name) in [
        (LinuxNamespaceType::Pid, "pid"),
        (LinuxNamespaceType::Mount, "mount"),
    ] {
        if !namespaces.iter().any(|ns| ns.typ() == typ) {
            return Err(SpecError::NamespaceMissing(name));
        }
    }
    for m in spec.mounts().as_deref().unwrap_or_default() {
        if let Some(typ) = m.typ().as_deref().filter(|t| !t.is_empty()) {
            if !MOUNT_TYPES.contains(&typ) {
                return Err(SpecError::MountType(
                    m.destination().display().to_string(),
                    typ.to_owned(),
                ));
            }
        }
    }
    for d in linux.devices().as_deref().unwrap_or_default() {
        let typ = d.typ();
        let char_dev = matches!(
            typ,
            oci_spec::runtime::LinuxDeviceType::C | oci_spec::runtime::LinuxDeviceType::U
        );
        if !char_dev || !ALLOWED_DEVICES.contains(&(d.major(), d.minor())) {
            return Err(SpecError::Device(
                d.path().display().to_string(),
                format!("{typ:?}").to_lowercase(),
                d.major(),
                d.minor(),
            ));
        }
    }
    Ok(())
}

/// Parses a process object (for exec) and checks it has args.
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    if json.len() > MAX_SPEC_BYTES {
        return Err(SpecError::TooLarge(json.len()));
    }
    let mut p: Process = serde_json::from_slice(json).map_err(SpecError::Json)?;
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::NoProcess);
    }
    p.set_terminal(Some(false));
    Ok(p)
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Resolves an absolute bind source inside the share or the sandbox directory.
fn resolve_source(source: &Path) -> Result<PathBuf, Option<SafePathError>> {
    for root in [SHARED_DIR, SANDBOX_DIR] {
        if let Ok(rel) = source.strip_prefix(root) {
            return safepath::resolve_beneath(Path::new(root), rel).map_err(Some);
        }
    }
    Err(None)
}

/// Parses and rewrites a container's spec (see the module docs). `share` is where the
/// shared file system is mounted ([`SHARED_DIR`] in the guest; a temp dir in unit tests).
pub fn prepare(
    container_id: &str,
    json: &[u8],
    share: &Path,
    cgroups_path: &Path,
) -> Result<Spec, SpecError> {
    if json.len() > MAX_SPEC_BYTES {
        return Err(SpecError::TooLarge(json.len()));
    }
    let mut spec: Spec = serde_json::from_slice(json).map_err(SpecError::Json)?;
    let process = spec.process_mut().as_mut().ok_or(SpecError::NoProcess)?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::NoProcess);
    }
    process.set_terminal(Some(false));

    let rootfs = safepath::resolve_beneath(share, &Path::new(container_id).join("rootfs"))
        .map_err(SpecError::Rootfs)?;
    if !rootfs.is_dir() {
        return Err(SpecError::Rootfs(SafePathError::NotPlain(rootfs)));
    }
    let readonly = spec.root().as_ref().and_then(|r| r.readonly());
    let mut root = oci_spec::runtime::Root::default();
    root.set_path(rootfs);
    root.set_readonly(readonly);
    spec.set_root(Some(root));

    if let Some(mounts) = spec.mounts_mut() {
        for m in mounts.iter_mut() {
            let dest = m.destination().clone();
            let bad = |e| SpecError::Mount(dest.display().to_string(), e);
            let rel = dest.strip_prefix("/").map_err(|_| bad(None))?;
            safepath::check_plain(rel).map_err(|e| bad(Some(e)))?;
            if is_bind(m) {
                let source = m.source().clone().ok_or_else(|| bad(None))?;
                if !source.is_absolute() {
                    return Err(bad(None));
                }
                let real = resolve_source(&source).map_err(bad)?;
                m.set_source(Some(real));
            }
        }
    }
    check_guest_resources(&spec)?;
    spec.set_hooks(None);
    let linux = spec.linux_mut().as_mut().ok_or(SpecError::NoLinux)?;
    linux.set_cgroups_path(Some(cgroups_path.to_owned()));
    Ok(spec)
}

/// Makes the container join the PID namespace at `path` (another container's of the pod,
/// which the caller has checked) instead of having one of its own.
pub fn join_pid_namespace(spec: &mut Spec, path: PathBuf) -> Result<(), SpecError> {
    use oci_spec::runtime::LinuxNamespaceType;
    let linux = spec.linux_mut().as_mut().ok_or(SpecError::NoLinux)?;
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    let pid = namespaces
        .iter_mut()
        .find(|ns| ns.typ() == LinuxNamespaceType::Pid)
        .ok_or(SpecError::NamespaceMissing("pid"))?;
    pid.set_path(Some(path));
    linux.set_namespaces(Some(namespaces));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn spec_json(mounts: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "terminal": true, "user": {"uid": 0, "gid": 0}},
            "root": {"path": "/anything", "readonly": true},
            "mounts": mounts,
            "linux": {"cgroupsPath": "/evil", "namespaces": [{"type": "pid"}, {"type": "mount"}]},
        }))
        .unwrap()
    }

    #[test]
    fn namespace_paths_shared_pid_or_mount_namespaces_odd_mounts_and_devices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path();
        std::fs::create_dir_all(share.join("c1/rootfs")).unwrap();
        let cg = Path::new("/husk/c1");
        let with = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value =
                serde_json::from_slice(&spec_json(serde_json::json!([]))).unwrap();
            edit(&mut v);
            prepare("c1", &serde_json::to_vec(&v).unwrap(), share, cg)
        };
        with(&|_| {}).unwrap();
        // Joining the agent's namespaces by path, or having none of one's own.
        let r = with(
            &|v| v["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}]),
        );
        assert!(
            matches!(r, Err(SpecError::NamespacePath(ref t, _)) if t == "network"),
            "{r:?}"
        );
        let r = with(&|v| v["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}]));
        assert!(
            matches!(r, Err(SpecError::NamespaceMissing("pid"))),
            "{r:?}"
        );
        let r = with(&|v| v["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}]));
        assert!(
            matches!(r, Err(SpecError::NamespaceMissing("mount"))),
            "{r:?}"
        );
        // A disk, the share again, a network file system.
        for (typ, source) in [
            ("ext4", "/dev/vda"),
            ("virtiofs", "husk"),
            ("nfs", "10.0.0.1:/x"),
            ("overlay", "overlay"),
        ] {
            let r = with(&|v| {
                v["mounts"] =
                    serde_json::json!([{"destination": "/x", "type": typ, "source": source}])
            });
            assert!(
                matches!(r, Err(SpecError::MountType(_, ref t)) if t == typ),
                "{typ}: {r:?}"
            );
        }
        // /dev/mem, a block device, /dev/vsock; /dev/fuse and /dev/null are fine.
        for (typ, major, minor) in [("c", 1, 1), ("b", 254, 0), ("c", 10, 121)] {
            let r = with(
                &|v| v["linux"]["devices"] = serde_json::json!([{"path": "/dev/x", "type": typ, "major": major, "minor": minor}]),
            );
            assert!(
                matches!(r, Err(SpecError::Device(..))),
                "{typ} {major}:{minor}: {r:?}"
            );
        }
        with(&|v| {
            v["linux"]["devices"] = serde_json::json!([
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
            ])
        })
        .unwrap();
    }

    #[test]
    fn specs_are_rewritten_and_escapes_refused() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path();
        std::fs::create_dir_all(share.join("c1/rootfs")).unwrap();
        symlink("/", share.join("c2")).unwrap();
        let cg = Path::new("/husk/c1");
        let spec = prepare("c1", &spec_json(serde_json::json!([])), share, cg).unwrap();
        let root = spec.root().as_ref().unwrap();
        assert_eq!(
            root.path(),
            &share.canonicalize().unwrap().join("c1/rootfs")
        );
        assert_eq!(root.readonly(), Some(true));
        assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(false));
        assert_eq!(
            spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(cg)
        );
        // Rootfs through a symlink to `/`, a missing rootfs, malformed JSON.
        assert!(matches!(
            prepare("c2", &spec_json(serde_json::json!([])), share, cg),
            Err(SpecError::Rootfs(_))
        ));
        assert!(prepare("c3", &spec_json(serde_json::json!([])), share, cg).is_err());
        assert!(matches!(
            prepare("c1", b"{not json", share, cg),
            Err(SpecError::Json(_))
        ));
        assert!(matches!(
            prepare("c1", &vec![b' '; MAX_SPEC_BYTES + 1], share, cg),
            Err(SpecError::TooLarge(_))
        ));
        // Bind sources outside the share or sandbox, and `..` destinations.
        for mounts in [
            serde_json::json!([{"destination": "/x", "type": "bind", "source": "/etc", "options": ["rbind"]}]),
            serde_json::json!([{"destination": "/x", "source": "/run/husk/shared/../../etc", "options": ["bind"]}]),
            serde_json::json!([{"destination": "/x/../../y", "type": "tmpfs", "source": "tmpfs"}]),
            serde_json::json!([{"destination": "rel", "type": "tmpfs", "source": "tmpfs"}]),
        ] {
            assert!(
                matches!(
                    prepare("c1", &spec_json(mounts.clone()), share, cg),
                    Err(SpecError::Mount(..))
                ),
                "{mounts}"
            );
        }
        let ok = serde_json::json!([{"destination": "/proc", "type": "proc", "source": "proc"}]);
        prepare("c1", &spec_json(ok), share, cg).unwrap();
    }

    /// Only the pid namespace gets the path; a spec without one is refused.
    #[test]
    fn a_joined_pid_namespace_is_the_only_path() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path();
        std::fs::create_dir_all(share.join("c1/rootfs")).unwrap();
        let cg = Path::new("/husk/c1");
        let mut spec = prepare("c1", &spec_json(serde_json::json!([])), share, cg).unwrap();
        join_pid_namespace(&mut spec, PathBuf::from("/proc/7/ns/pid")).unwrap();
        let paths: Vec<_> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|ns| (format!("{:?}", ns.typ()), ns.path().clone()))
            .collect();
        assert_eq!(
            paths,
            [
                ("Pid".to_owned(), Some(PathBuf::from("/proc/7/ns/pid"))),
                ("Mount".to_owned(), None)
            ]
        );
        let mut no_linux = Spec::default();
        no_linux.set_linux(None);
        assert!(join_pid_namespace(&mut no_linux, PathBuf::from("/proc/7/ns/pid")).is_err());
    }

    #[test]
    fn exec_processes_need_args() {
        assert!(
            parse_process(br#"{"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#)
                .is_ok()
        );
        assert!(matches!(
            parse_process(br#"{"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#),
            Err(SpecError::NoProcess)
        ));
        assert!(parse_process(b"[]").is_err());
    }
}
