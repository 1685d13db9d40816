//! Checking and rewriting the OCI spec the host sends, before libcontainer sees it.
//!
//! The rootfs is always `/run/husk/shared/<container-id>/rootfs`, resolved without leaving
//! the share; bind-mount sources must resolve inside the share or the sandbox directory;
//! destinations must be plain absolute paths. The agent owns the guest's layout, so it sets
//! the cgroup path, drops hooks (they would run guest binaries as PID 1's children outside
//! the container) and handles the terminal itself (`process.terminal` becomes false; the
//! agent gives the process a pty it made).

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
    spec.set_hooks(None);
    let linux = spec.linux_mut().as_mut().ok_or(SpecError::NoLinux)?;
    linux.set_cgroups_path(Some(cgroups_path.to_owned()));
    Ok(spec)
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
            "linux": {"cgroupsPath": "/evil"},
        }))
        .unwrap()
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
