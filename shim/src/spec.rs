//! What the shim changes in a container's OCI spec before the agent sees it, and which pod a
//! container belongs to.
//!
//! The spec is handled as JSON (`serde_json::Value`) so that fields the shim does not know
//! pass through to the agent unchanged. The shim rewrites only host-side facts:
//! * `root.path` becomes the guest path of the rootfs in the share,
//!   `/run/husk/shared/<container-id>/rootfs` (docs/contracts.md);
//! * bind mounts of host paths become binds of their copies in the share
//!   (`<container-id>/mounts/<n>`), which the shim bind mounts on the host side;
//! * namespace `path`s name host namespaces (CRI's network namespace, the pause container's
//!   `/proc/<pid>/ns/*`) that mean nothing in the guest: those entries are dropped from the
//!   guest's spec (the sandbox's network namespace is not lost: before the VM starts, the
//!   shim connects its CNI interface to the VM, [`crate::network`]), so the
//!   container shares the guest's (the pod's) namespace of that type — except PID and mount
//!   namespaces, which in the guest are the agent's: those become namespaces of the
//!   container's own; a spec without them (`hostPID`) gets them added, and the agent refuses
//!   a container without them. A PID namespace path must be `/proc/<pid>/ns/pid` of a live
//!   container of the pod ([`pid_namespace_pid`]: CRI's `shareProcessNamespace` names the
//!   sandbox container's, a debug container its target's, by the pid the shim reported):
//!   the agent then makes the container join that container's namespace in the guest. Any
//!   other PID namespace path is refused;
//! * a CRI pod's sandbox (pause) container shares the guest's network, IPC and UTS namespaces
//!   too, although CRI asks new ones for it: those are the pod's, which its app containers
//!   share (their paths to the pause container's were dropped above). The agent then sets the
//!   pod's hostname and namespaced sysctls in the guest's namespaces;
//! * annotations are kept only if the configuration allow-lists them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use husk_agent_api::stdio::valid_id;

use crate::config::Config;
use crate::mount::{BindOptions, MountPoint};

/// Where the agent mounts the share in the guest (docs/contracts.md).
pub const GUEST_SHARE_DIR: &str = "/run/husk/shared";
/// CRI annotation naming the pod (sandbox) a container belongs to.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI annotation telling a pod's sandbox (pause) container (`sandbox`) from the others.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Value of [`CRI_CONTAINER_TYPE`] for the sandbox container.
const CRI_TYPE_SANDBOX: &str = "sandbox";

/// Errors in a container's spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec is not a JSON object
    #[error("The OCI spec is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// A spec field has the wrong type
    #[error("The OCI spec field {0} has the wrong type")]
    Field(&'static str),
    /// The CRI sandbox id is not a valid id
    #[error("The sandbox id {0:?} (annotation io.kubernetes.cri.sandbox-id) is not a valid id: 1 to 128 of [A-Za-z0-9_.-], starting with a letter or digit")]
    SandboxId(String),
    /// A Kubernetes pod asks for the host's network namespace (`hostNetwork: true`)
    #[error("husk cannot run a hostNetwork pod: its containers run in a VM, which cannot share the host's network stack (run the pod with runc, or without hostNetwork)")]
    HostNetwork,
    /// A mount source is not usable
    #[error("Mount source {0} must be an absolute path without `..`")]
    MountSource(String),
    /// A PID namespace path that cannot name a container of the pod
    #[error("The PID namespace path {0:?} is not /proc/<pid>/ns/pid: in a husk VM a container can only join the PID namespace of another container of its pod")]
    PidNamespace(String),
}

/// The pod a container belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMembership {
    /// The pod's id: the CRI sandbox id, or the container's own id outside CRI.
    pub sandbox_id: String,
    /// Whether this container is the pod's sandbox container (its creation boots the VM and
    /// its deletion stops it).
    pub is_sandbox: bool,
}

/// The CRI sandbox id a spec names, if any; refused unless it is a valid id (it becomes the
/// name of the pod directory and is shared into the guest).
fn sandbox_annotation(spec: &Value) -> Result<Option<&str>, SpecError> {
    let named = spec
        .pointer("/annotations")
        .and_then(|a| a.get(CRI_SANDBOX_ID))
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty());
    match named {
        Some(id) if !valid_id(id) => Err(SpecError::SandboxId(id.to_owned())),
        other => Ok(other),
    }
}

/// The CRI container type a spec's annotations name (`sandbox` or `container`), if any.
fn cri_container_type(spec: &Value) -> Option<&str> {
    spec.pointer("/annotations")?
        .get(CRI_CONTAINER_TYPE)?
        .as_str()
}

/// Which pod container `id` with `spec` belongs to: the one its CRI annotations name, or its
/// own when it has none.
pub fn pod_membership(id: &str, spec: &Value) -> Result<PodMembership, SpecError> {
    let container_type = cri_container_type(spec);
    // CRI leaves the network namespace out of a hostNetwork pod's sandbox spec (runc then
    // shares the host's). A VM has its own stack: refused before anything is created.
    if container_type == Some(CRI_TYPE_SANDBOX) && !has_namespace(spec, "network") {
        return Err(SpecError::HostNetwork);
    }
    Ok(match sandbox_annotation(spec)? {
        Some(sandbox_id) => PodMembership {
            sandbox_id: sandbox_id.to_owned(),
            is_sandbox: sandbox_id == id || container_type == Some(CRI_TYPE_SANDBOX),
        },
        None => PodMembership {
            sandbox_id: id.to_owned(),
            is_sandbox: true,
        },
    })
}

/// The task pid whose PID namespace the spec asks to join (`linux.namespaces[type=pid].path`
/// of the form `/proc/<pid>/ns/pid`), or `None` for a namespace of its own. containerd's CRI
/// writes the pid the shim reported for the task (the sandbox container's for
/// `shareProcessNamespace`, the target's for a debug container): the caller looks it up
/// among the pod's containers.
pub fn pid_namespace_pid(spec: &Value) -> Result<Option<u32>, SpecError> {
    let Some(path) = namespace(spec, "pid")
        .and_then(|ns| ns.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    path.strip_prefix("/proc/")
        .and_then(|rest| rest.strip_suffix("/ns/pid"))
        .filter(|digits| {
            !digits.is_empty() && digits.len() <= 10 && digits.bytes().all(|b| b.is_ascii_digit())
        })
        .and_then(|digits| digits.parse::<u32>().ok())
        .filter(|&pid| pid > 0)
        .map(Some)
        .ok_or_else(|| SpecError::PidNamespace(path.to_owned()))
}

/// Whether the spec has a `linux.namespaces` entry of type `kind`.
fn has_namespace(spec: &Value, kind: &str) -> bool {
    namespace(spec, kind).is_some()
}

/// The spec's `linux.namespaces` entry of type `kind`, if any.
fn namespace<'a>(spec: &'a Value, kind: &str) -> Option<&'a Value> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(Value::as_str) == Some(kind))
}

/// The network namespace path of a spec (`linux.namespaces[type=network].path`), if any:
/// CRI's pod network namespace, which [`crate::network::connect`] joins to the VM.
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    namespace(spec, "network")?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The spec's `linux.cgroupsPath`, if it names one: the host cgroup of a sandbox's VM
/// ([`crate::cgroup`]).
pub fn cgroups_path(spec: &Value) -> Option<&str> {
    spec.pointer("/linux/cgroupsPath")?
        .as_str()
        .filter(|p| !p.is_empty())
}

/// The sandbox id from a bundle's `config.json` (for `start`, which groups the containers of
/// a pod into one shim): `Ok(None)` when the container is its own pod or the spec cannot be
/// read (`create` reports that), an error when the id is not a valid one.
pub fn grouping_sandbox_id(config_json: &[u8]) -> Result<Option<String>, SpecError> {
    let Ok(spec) = serde_json::from_slice::<Value>(config_json) else {
        return Ok(None);
    };
    Ok(sandbox_annotation(&spec)?.map(str::to_owned))
}

/// A host path the shim must bind mount into the share for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host source from the spec.
    pub source: PathBuf,
    /// Target relative to the share (`<container-id>/mounts/<n>`).
    pub share_path: PathBuf,
    /// `rbind` or `bind`, `ro` or `rw`: the host enforces both, not just the guest.
    pub options: BindOptions,
}

/// The guest path of container `id`'s rootfs.
pub fn guest_rootfs(id: &str) -> String {
    format!("{GUEST_SHARE_DIR}/{id}/rootfs")
}

/// The rootfs directory of container `id`, relative to the share.
pub fn share_rootfs(id: &str) -> PathBuf {
    Path::new(id).join("rootfs")
}

/// The host-side options of a bind mount: `rbind` recursive (else only the source's own
/// mount), `ro` read-only (the last of `ro`/`rw` wins, as in runc).
fn bind_options(mount: &Value) -> BindOptions {
    let mut options = BindOptions::default();
    let listed = mount.get("options").and_then(Value::as_array);
    for option in listed.into_iter().flatten().filter_map(Value::as_str) {
        match option {
            "rbind" => options.recursive = true,
            "ro" => options.readonly = true,
            "rw" => options.readonly = false,
            _ => {}
        }
    }
    options
}

fn is_bind(mount: &Value) -> bool {
    let typ = mount.get("type").and_then(Value::as_str).unwrap_or("");
    let has_bind_option = mount
        .get("options")
        .and_then(Value::as_array)
        .is_some_and(|o| {
            o.iter()
                .any(|x| matches!(x.as_str(), Some("bind" | "rbind")))
        });
    typ == "bind" || has_bind_option
}

/// Whether the spec asks for a read-only rootfs (`root.readonly`).
pub fn readonly_rootfs(spec: &Value) -> bool {
    spec.pointer("/root/readonly").and_then(Value::as_bool) == Some(true)
}

/// What the shim creates in a container's rootfs before the guest sees it. For a read-only
/// rootfs, where the guest cannot create them: the destination of every mount that is not
/// inside another mount (those are created in the mount above them), as a file for a bind of
/// a host file. For every rootfs: the process's working directory, which runc creates when
/// the image lacks it. Call it on the spec as containerd wrote it (host bind sources).
pub fn rootfs_mount_points(spec: &Value, readonly: bool) -> Vec<MountPoint> {
    let usable = |p: &Path| {
        p.is_absolute()
            && p != Path::new("/")
            && !p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
    };
    let mounts = spec
        .get("mounts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let destinations: Vec<&Path> = mounts
        .iter()
        .filter_map(|m| m.get("destination").and_then(Value::as_str))
        .map(Path::new)
        .filter(|p| usable(p))
        .collect();
    let inside_another = |p: &Path| destinations.iter().any(|d| *d != p && p.starts_with(d));
    let mut points = Vec::new();
    for mount in mounts.iter().filter(|_| readonly) {
        let Some(dest) = mount
            .get("destination")
            .and_then(Value::as_str)
            .map(Path::new)
        else {
            continue;
        };
        if !usable(dest) || inside_another(dest) {
            continue;
        }
        let file = is_bind(mount)
            && mount
                .get("source")
                .and_then(Value::as_str)
                .and_then(|s| std::fs::metadata(s).ok())
                .is_some_and(|m| !m.is_dir());
        points.push(MountPoint {
            path: dest.to_owned(),
            file,
        });
    }
    if let Some(cwd) = spec.pointer("/process/cwd").and_then(Value::as_str) {
        let cwd = Path::new(cwd);
        if usable(cwd) && !inside_another(cwd) {
            points.push(MountPoint {
                path: cwd.to_owned(),
                file: false,
            });
        }
    }
    points
}

/// Rewrites `spec` for container `id` in the guest (see the module doc) and returns the host
/// paths to bind mount into the share.
pub fn rewrite(spec: &mut Value, id: &str, config: &Config) -> Result<Vec<HostBind>, SpecError> {
    let cri_sandbox = cri_container_type(spec) == Some(CRI_TYPE_SANDBOX);
    let obj = spec.as_object_mut().ok_or(SpecError::Field("(root)"))?;
    let root = obj
        .entry("root")
        .or_insert_with(|| serde_json::json!({}))
        .as_object_mut()
        .ok_or(SpecError::Field("root"))?;
    root.insert("path".into(), Value::String(guest_rootfs(id)));

    let mut binds = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts") {
        let mounts = mounts.as_array_mut().ok_or(SpecError::Field("mounts"))?;
        for mount in mounts.iter_mut() {
            if !is_bind(mount) {
                continue;
            }
            let source = mount
                .get("source")
                .and_then(Value::as_str)
                .ok_or(SpecError::Field("mounts[].source"))?;
            let path = Path::new(source);
            if !path.is_absolute()
                || path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(SpecError::MountSource(source.to_owned()));
            }
            let share_path = Path::new(id).join("mounts").join(binds.len().to_string());
            let guest = Path::new(GUEST_SHARE_DIR).join(&share_path);
            binds.push(HostBind {
                source: path.to_owned(),
                share_path,
                options: bind_options(mount),
            });
            mount["source"] = Value::String(guest.to_string_lossy().into_owned());
        }
    }

    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        let namespaces = linux
            .entry("namespaces")
            .or_insert_with(|| Value::Array(Vec::new()));
        let namespaces = namespaces
            .as_array_mut()
            .ok_or(SpecError::Field("linux.namespaces"))?;
        namespaces.retain_mut(|ns| {
            let pod_wide = matches!(
                ns.get("type").and_then(Value::as_str),
                Some("network" | "ipc" | "uts")
            );
            if cri_sandbox && pod_wide {
                return false;
            }
            let has_path = ns
                .get("path")
                .and_then(Value::as_str)
                .is_some_and(|p| !p.is_empty());
            if !has_path {
                return true;
            }
            // The guest's root PID and mount namespaces are the agent's: a container never
            // joins them, so a host path for these becomes a namespace of its own.
            let own = matches!(
                ns.get("type").and_then(Value::as_str),
                Some("pid" | "mount")
            );
            if own {
                if let Some(ns) = ns.as_object_mut() {
                    ns.remove("path");
                }
            }
            own
        });
        // Without a PID or mount namespace runc would share the host's; in the guest that
        // would be the agent's, so the container gets its own (a hostPID pod sees its pod's
        // processes only, as under Kata).
        for kind in ["pid", "mount"] {
            if !namespaces
                .iter()
                .any(|ns| ns.get("type").and_then(Value::as_str) == Some(kind))
            {
                namespaces.push(serde_json::json!({ "type": kind }));
            }
        }
    }

    if let Some(annotations) = obj.get_mut("annotations") {
        let annotations = annotations
            .as_object_mut()
            .ok_or(SpecError::Field("annotations"))?;
        annotations.retain(|key, _| config.annotation_allowed(key));
    }
    Ok(binds)
}

/// Parses a spec from `config.json` bytes.
pub fn parse(bytes: &[u8]) -> Result<Value, SpecError> {
    let spec: Value = serde_json::from_slice(bytes).map_err(SpecError::Json)?;
    if !spec.is_object() {
        return Err(SpecError::Field("(root)"));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config(allowed: &[&str]) -> Config {
        Config {
            allowed_annotations: allowed.iter().map(|s| s.to_string()).collect(),
            ..Config::default()
        }
    }

    #[test]
    fn root_path_points_into_the_share() {
        let mut spec = json!({"root": {"path": "rootfs", "readonly": true}});
        let binds = rewrite(&mut spec, "c1", &config(&[])).unwrap();
        assert!(binds.is_empty());
        assert_eq!(spec["root"]["path"], "/run/husk/shared/c1/rootfs");
        assert_eq!(spec["root"]["readonly"], true);
        let mut spec = json!({});
        rewrite(&mut spec, "c2", &config(&[])).unwrap();
        assert_eq!(spec["root"]["path"], "/run/husk/shared/c2/rootfs");
    }

    #[test]
    fn host_binds_move_into_the_share() {
        let mut spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts",
             "options": ["rbind", "ro"]},
            {"destination": "/data", "source": "/srv/data", "options": ["bind"]},
            {"destination": "/x", "source": "/srv/x", "options": ["rbind", "ro", "rw"]},
        ], "unknown": {"kept": 1}});
        let binds = rewrite(&mut spec, "c1", &config(&[])).unwrap();
        assert_eq!(
            binds,
            [
                HostBind {
                    source: "/var/lib/x/hosts".into(),
                    share_path: "c1/mounts/0".into(),
                    options: BindOptions {
                        recursive: true,
                        readonly: true
                    },
                },
                HostBind {
                    source: "/srv/data".into(),
                    share_path: "c1/mounts/1".into(),
                    options: BindOptions::default(),
                },
                HostBind {
                    source: "/srv/x".into(),
                    share_path: "c1/mounts/2".into(),
                    options: BindOptions {
                        recursive: true,
                        readonly: false
                    },
                },
            ]
        );
        assert_eq!(spec["mounts"][0]["source"], "proc");
        assert_eq!(spec["mounts"][1]["source"], "/run/husk/shared/c1/mounts/0");
        assert_eq!(spec["mounts"][1]["options"], json!(["rbind", "ro"]));
        assert_eq!(spec["mounts"][2]["source"], "/run/husk/shared/c1/mounts/1");
        assert_eq!(spec["unknown"]["kept"], 1);
    }

    #[test]
    fn unsafe_bind_sources_are_refused() {
        for source in ["relative/dir", "/a/../etc"] {
            let mut spec =
                json!({"mounts": [{"destination": "/x", "type": "bind", "source": source}]});
            assert!(matches!(
                rewrite(&mut spec, "c", &config(&[])),
                Err(SpecError::MountSource(_))
            ));
        }
    }

    #[test]
    fn the_netns_path_comes_from_the_spec() {
        let spec = json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
        ]}});
        assert_eq!(
            netns_path(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let own = json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(netns_path(&own), None);
        assert_eq!(netns_path(&json!({})), None);
    }

    /// A PID namespace path names a task pid, or nothing a VM could join.
    #[test]
    fn pid_namespace_paths_name_a_task_pid_or_are_refused() {
        let with = |path: &str| json!({"linux": {"namespaces": [{"type": "pid", "path": path}]}});
        assert_eq!(
            pid_namespace_pid(&with("/proc/42/ns/pid")).unwrap(),
            Some(42)
        );
        assert_eq!(pid_namespace_pid(&with("")).unwrap(), None);
        assert_eq!(
            pid_namespace_pid(&json!({"linux": {"namespaces": [{"type": "pid"}]}})).unwrap(),
            None
        );
        assert_eq!(pid_namespace_pid(&json!({})).unwrap(), None);
        for bad in [
            "/proc/0/ns/pid",
            "/proc/self/ns/pid",
            "/proc/42/ns/net",
            "/proc//ns/pid",
            "/proc/42/../1/ns/pid",
            "/proc/99999999999/ns/pid",
            "/var/run/netns/x",
            "proc/42/ns/pid",
        ] {
            assert!(
                matches!(pid_namespace_pid(&with(bad)), Err(SpecError::PidNamespace(p)) if p == bad),
                "{bad}"
            );
        }
    }

    /// Host namespace paths leave the guest's spec; the pod's network namespace reaches the
    /// VM another way ([`netns_path`] reads it from the original spec).
    #[test]
    fn host_namespace_paths_are_dropped() {
        let mut spec = json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "mount", "path": ""},
        ]}});
        rewrite(&mut spec, "c", &config(&[])).unwrap();
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount", "path": ""}])
        );
        // A pod's shared PID namespace (the pause container's) never becomes the guest's
        // root one, where the agent runs: the container gets a PID namespace of its own.
        let mut spec = json!({"linux": {"namespaces": [
            {"type": "pid", "path": "/proc/42/ns/pid"},
            {"type": "mount", "path": "/proc/42/ns/mnt"},
            {"type": "uts", "path": "/proc/42/ns/uts"},
        ]}});
        rewrite(&mut spec, "c", &config(&[])).unwrap();
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}])
        );
    }

    /// A CRI pod's sandbox container shares the guest's network, IPC and UTS namespaces (the
    /// pod's), as its app containers do; a `ctr run` container keeps the new ones it asks for.
    #[test]
    fn a_cri_sandbox_shares_the_pods_network_ipc_and_uts_namespaces() {
        let namespaces = json!([
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
        ]);
        let mut sandbox = json!({
            "annotations": {CRI_CONTAINER_TYPE: "sandbox", CRI_SANDBOX_ID: "p1"},
            "linux": {"namespaces": namespaces},
        });
        rewrite(&mut sandbox, "p1", &config(&[])).unwrap();
        assert_eq!(
            sandbox["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}])
        );
        let mut own = json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        ]}});
        rewrite(&mut own, "c", &config(&[])).unwrap();
        assert_eq!(own["linux"]["namespaces"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn a_readonly_rootfs_gets_its_top_mount_points_and_cwd() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = json!({
            "root": {"path": "rootfs", "readonly": true},
            "process": {"cwd": "/work/here"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
                {"destination": "/etc/hosts", "type": "bind", "source": file.path(),
                 "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "none", "source": dir.path(),
                 "options": ["bind"]},
                {"destination": "/data/sub", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/a/../../x", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "relative", "type": "tmpfs", "source": "tmpfs"},
            ],
        });
        assert!(readonly_rootfs(&spec));
        let point = |p: &str, file| MountPoint {
            path: p.into(),
            file,
        };
        assert_eq!(
            rootfs_mount_points(&spec, true),
            [
                point("/proc", false),
                point("/dev", false),
                point("/etc/hosts", true),
                point("/data", false),
                point("/work/here", false),
            ]
        );
        assert_eq!(
            rootfs_mount_points(&spec, false),
            [point("/work/here", false)]
        );
        assert!(!readonly_rootfs(&json!({"root": {"path": "rootfs"}})));
    }

    #[test]
    fn missing_pid_and_mount_namespaces_are_added() {
        let mut spec = json!({"linux": {"namespaces": [{"type": "ipc"}]}});
        rewrite(&mut spec, "c", &config(&[])).unwrap();
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "ipc"}, {"type": "pid"}, {"type": "mount"}])
        );
        let mut spec = json!({"linux": {}});
        rewrite(&mut spec, "c", &config(&[])).unwrap();
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}])
        );
        let mut spec = json!({"linux": {"namespaces": {}}});
        assert!(matches!(
            rewrite(&mut spec, "c", &config(&[])),
            Err(SpecError::Field("linux.namespaces"))
        ));
    }

    #[test]
    fn annotations_are_allow_listed() {
        let mut spec = json!({"annotations": {
            "io.kubernetes.cri.sandbox-id": "p",
            "io.husk.trace": "1",
            "other": "x",
        }});
        rewrite(&mut spec, "c", &config(&["io.husk.*"])).unwrap();
        assert_eq!(spec["annotations"], json!({"io.husk.trace": "1"}));
    }

    #[test]
    fn wrong_types_are_errors() {
        assert!(rewrite(&mut json!([]), "c", &config(&[])).is_err());
        assert!(rewrite(&mut json!({"root": 1}), "c", &config(&[])).is_err());
        assert!(rewrite(&mut json!({"mounts": {}}), "c", &config(&[])).is_err());
        assert!(parse(b"[1]").is_err());
        assert!(parse(b"{").is_err());
    }

    #[test]
    fn pods_come_from_cri_annotations() {
        let plain = json!({});
        assert_eq!(
            pod_membership("c1", &plain).unwrap(),
            PodMembership {
                sandbox_id: "c1".into(),
                is_sandbox: true
            }
        );
        let sandbox = json!({
            "annotations": {CRI_SANDBOX_ID: "p1", CRI_CONTAINER_TYPE: "sandbox"},
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}]},
        });
        assert!(pod_membership("p1", &sandbox).unwrap().is_sandbox);
        let member =
            json!({"annotations": {CRI_SANDBOX_ID: "p1", CRI_CONTAINER_TYPE: "container"}});
        assert_eq!(
            pod_membership("c2", &member).unwrap(),
            PodMembership {
                sandbox_id: "p1".into(),
                is_sandbox: false
            }
        );
        let bytes = serde_json::to_vec(&member).unwrap();
        assert_eq!(grouping_sandbox_id(&bytes).unwrap().as_deref(), Some("p1"));
        assert_eq!(grouping_sandbox_id(b"{}").unwrap(), None);
        assert_eq!(grouping_sandbox_id(b"garbage").unwrap(), None);
    }

    /// A hostNetwork pod (CRI leaves the network namespace out of its sandbox's spec) is
    /// refused with the reason; its app containers never get that far.
    #[test]
    fn a_host_network_pod_is_refused() {
        let host_network = json!({
            "annotations": {CRI_SANDBOX_ID: "p1", CRI_CONTAINER_TYPE: "sandbox"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]},
        });
        let err = pod_membership("p1", &host_network).unwrap_err();
        assert!(matches!(err, SpecError::HostNetwork), "{err:?}");
        assert!(err.to_string().contains("hostNetwork"), "{err}");
        // A `ctr run --net-host` container is no pod sandbox: it runs in its VM's network.
        let plain = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}});
        assert!(pod_membership("c1", &plain).is_ok());
    }

    /// S4: the sandbox id names the pod directory; `..` or a `/` must never get that far.
    #[test]
    fn a_sandbox_id_that_is_a_path_is_refused() {
        for bad in [
            "../../var/lib/x",
            "..",
            "a/b",
            "-rf",
            ".hidden",
            &"p".repeat(129),
        ] {
            let spec = json!({"annotations": {CRI_SANDBOX_ID: bad}});
            let err = pod_membership("c1", &spec).unwrap_err();
            assert!(
                matches!(&err, SpecError::SandboxId(id) if id == bad),
                "{bad}: {err:?}"
            );
            let bytes = serde_json::to_vec(&spec).unwrap();
            assert!(grouping_sandbox_id(&bytes).is_err(), "{bad}");
        }
    }
}
