//! The pod's host cgroup. husk-vmm and virtiofsd are the pod's real cost on the host, so they
//! run in the cgroup the sandbox container's spec names (`linux.cgroupsPath`: under the pod's
//! `cgroup_parent` in Kubernetes, `/<namespace>/<id>` for `ctr run`), as runc's container
//! processes do. containerd's PodSandboxStats reads the pod's cgroup, and a kubelet's pod
//! limits (its containers' limits plus the RuntimeClass `overhead`) bind the VM.
//!
//! Each process joins before it executes (it writes `0` to the cgroup's `cgroup.procs` between
//! fork and exec), so every page it ever touches is charged there; its children (the jailed
//! VMM under its waiter) inherit the cgroup. The limits of the spec are the guest's business
//! (the agent applies them to the container in the VM), never the host cgroup's. Only the
//! unified hierarchy (cgroup v2) is supported; under v1 the processes stay where the shim is,
//! with a warning.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use tracing::warn;

/// Where the unified hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a pod's cgroup may stay busy after its processes were reaped.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the pod's cgroup cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The spec's cgroupsPath is not one husk can place the VM in
    #[error("cgroupsPath {0:?} is neither an absolute cgroup path (\"/a/b\") nor a systemd one (\"slice:prefix:name\") of plain names")]
    Invalid(String),
    /// The cgroup cannot be created or joined
    #[error("Cannot prepare the pod's cgroup {path}")]
    Host {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The directory, relative to the hierarchy's root, that `cgroups_path` names: an absolute
/// path of plain names (cgroupfs, as runc takes it), or `slice:prefix:name` (systemd's form:
/// `kubepods-besteffort-pod1.slice:cri-containerd:ID` is
/// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-ID.scope`).
pub fn resolve(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let invalid = || CgroupError::Invalid(cgroups_path.to_owned());
    let plain = |name: &str| {
        !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && !name.contains('\0')
    };
    if cgroups_path.starts_with('/') {
        let mut dir = PathBuf::new();
        for c in Path::new(cgroups_path).components() {
            match c {
                Component::RootDir => {}
                Component::Normal(n) if plain(&n.to_string_lossy()) => dir.push(n),
                _ => return Err(invalid()),
            }
        }
        return if dir.as_os_str().is_empty() {
            Err(invalid())
        } else {
            Ok(dir)
        };
    }
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err(invalid());
    };
    if !plain(name) || !(prefix.is_empty() || plain(prefix)) {
        return Err(invalid());
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let base = slice.strip_suffix(".slice").ok_or_else(invalid)?;
    if !plain(slice) || base.is_empty() {
        return Err(invalid());
    }
    let mut dir = PathBuf::new();
    if base != "-" {
        let mut acc = String::new();
        for part in base.split('-') {
            if part.is_empty() {
                return Err(invalid());
            }
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            dir.push(format!("{acc}.slice"));
        }
    }
    dir.push(if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}-{name}.scope")
    });
    Ok(dir)
}

/// A pod's cgroup, made by the shim, removed with the pod.
#[derive(Debug)]
pub struct PodCgroup {
    dir: PathBuf,
    /// The pod's cgroup if this pod made it (removed with the pod).
    created: Vec<PathBuf>,
    procs: OwnedFd,
}

impl PodCgroup {
    /// Creates (as far as missing) the cgroup `cgroups_path` names under `root`. `Ok(None)`
    /// when `root` is not a unified hierarchy.
    pub fn create(root: &Path, cgroups_path: &str) -> Result<Option<Self>, CgroupError> {
        let relative = resolve(cgroups_path)?;
        if !root.join("cgroup.controllers").is_file() {
            warn!(root = %root.display(), cgroups_path,
                "no cgroup v2 hierarchy: the pod's VM stays in the shim's cgroup");
            return Ok(None);
        }
        let dir = root.join(&relative);
        // The parents are shared (a kubelet's pod cgroup, ctr's namespace): made if missing,
        // never removed, as runc treats them. The pod's own cgroup goes with the pod, if it
        // made it.
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|source| CgroupError::Host {
                path: parent.to_owned(),
                source,
            })?;
        }
        let created = match std::fs::create_dir(&dir) {
            Ok(()) => vec![dir.clone()],
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Vec::new(),
            Err(source) => return Err(CgroupError::Host { path: dir, source }),
        };
        let procs_path = dir.join("cgroup.procs");
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&procs_path);
        match opened {
            Ok(f) => Ok(Some(Self {
                dir,
                created,
                procs: f.into(),
            })),
            Err(source) => {
                remove_dirs(&created);
                Err(CgroupError::Host {
                    path: procs_path,
                    source,
                })
            }
        }
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pod's cgroup if this pod made it.
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }

    /// Makes the process `cmd` starts join this cgroup before it executes.
    pub fn join_on_exec(&self, cmd: &mut std::process::Command) {
        let fd = self.procs.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and only calls write(2),
        // which is async-signal-safe, on a descriptor the child inherited from this
        // PodCgroup (open until the spawn returns, as the caller holds `self`); the buffer is
        // a static.
        unsafe {
            cmd.pre_exec(move || {
                const SELF: &[u8] = b"0";
                if libc::write(fd, SELF.as_ptr().cast(), SELF.len()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Removes the pod's cgroup if this pod made it, once its processes are gone.
    pub fn remove(&self) {
        remove_dirs(&self.created);
    }
}

/// Removes the cgroups `created`, last first; a cgroup stays busy for a moment after its
/// last process is reaped.
pub fn remove_dirs(created: &[PathBuf]) {
    let deadline = std::time::Instant::now() + REMOVE_TIMEOUT;
    for d in created.iter().rev() {
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    warn!(path = %d.display(), error = %e, "cannot remove the pod's cgroup");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths_resolve_as_runc_resolves_them() {
        assert_eq!(
            resolve("/kubepods/besteffort/pod1/abc").unwrap(),
            PathBuf::from("kubepods/besteffort/pod1/abc")
        );
        assert_eq!(
            resolve("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            resolve(":husk:abc").unwrap(),
            PathBuf::from("system.slice/husk-abc.scope")
        );
        assert_eq!(
            resolve("-.slice::abc.scope").unwrap(),
            PathBuf::from("abc.scope")
        );
    }

    /// A spec's path cannot lead the VM out of the hierarchy or into its root.
    #[test]
    fn escaping_or_malformed_paths_are_refused() {
        for bad in [
            "/",
            "/../etc",
            "/a/../../b",
            "relative/path",
            "a:b",
            "a.slice:b:c:d",
            "notaslice:p:n",
            "a--b.slice:p:n",
            "a.slice:p:..",
            "a.slice:p/q:n",
            "a.slice:p:n/m",
            "../x.slice:p:n",
        ] {
            assert!(
                matches!(resolve(bad), Err(CgroupError::Invalid(_))),
                "{bad:?} was accepted: {:?}",
                resolve(bad)
            );
        }
    }

    /// The VM's processes join before they execute, and the pod's cgroup goes with the pod
    /// while its parents stay, made by the pod or not. Needs root and a writable cgroup v2 hierarchy.
    #[test]
    fn a_spawned_process_runs_in_the_pods_cgroup_and_the_cgroup_goes_with_the_pod() {
        // The unified hierarchy: at the root in the lab, beside v1 on a hybrid host.
        let root = [CGROUP_ROOT, "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|r| r.join("cgroup.controllers").is_file())
            .expect("this test needs a cgroup v2 hierarchy");
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        let parent = root.join(format!("husk-test-cg-{}", std::process::id()));
        std::fs::create_dir(&parent).expect("the kubelet's pod cgroup");
        let cgroups_path = format!("/{}/sandbox", parent.file_name().unwrap().to_string_lossy());
        let pod = PodCgroup::create(root, &cgroups_path)
            .expect("create")
            .expect("cgroup v2");
        assert_eq!(pod.dir(), parent.join("sandbox"));
        let mut cmd = std::process::Command::new("/bin/cat");
        cmd.arg("/proc/self/cgroup");
        pod.join_on_exec(&mut cmd);
        let out = cmd.output().expect("run cat");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.lines().find_map(|l| l.strip_prefix("0::")),
            Some(cgroups_path.as_str()),
            "{text}"
        );
        pod.remove();
        assert!(!parent.join("sandbox").exists(), "the pod's cgroup stayed");
        assert!(parent.exists(), "the kubelet's cgroup went with the pod");

        // Missing parents (ctr's `/<namespace>/<id>`) are made and stay for their next pods.
        let nested = format!("{}/ns/pod2", cgroups_path.trim_end_matches("/sandbox"));
        let pod = PodCgroup::create(root, &nested).unwrap().unwrap();
        pod.remove();
        assert!(!parent.join("ns/pod2").exists(), "the pod's cgroup stayed");
        assert!(
            parent.join("ns").exists(),
            "a shared parent went with the pod"
        );
        std::fs::remove_dir(parent.join("ns")).unwrap();
        std::fs::remove_dir(&parent).unwrap();
    }
}
