//! Host-side mounts of a pod's share: containerd's rootfs mounts, host bind mounts, and the
//! share's own shared-propagation bind.
//!
//! The share (`<state_dir>/<sandbox-id>/shared`) is bind mounted on itself and made a shared
//! mount before virtiofsd starts: virtiofsd's namespace sandbox turns its copy into a slave,
//! so rootfs mounts the shim makes later under the share show up inside virtiofsd too,
//! whatever the propagation of the host's `/run` is.

use std::path::{Path, PathBuf};

use containerd_shim_protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors of mounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount failed
    #[error("Cannot mount {what} on {target}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An unmount failed
    #[error("Cannot unmount {target}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// A mount point cannot be prepared
    #[error("Cannot prepare mount point {path}")]
    MountPoint {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The rootfs mount is of an unsupported kind
    #[error("Unsupported rootfs mount: {0}")]
    Unsupported(String),
}

/// Bind mounts `dir` on itself and makes it a shared mount (see the module doc).
pub fn make_shared_bind(dir: &Path) -> Result<(), MountError> {
    let fail = |source: nix::Error| MountError::Mount {
        what: "the share".into(),
        target: dir.to_owned(),
        source: source.into(),
    };
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(fail)?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(fail)
}

/// Mounts containerd's rootfs `mounts` (normally one overlay or bind) on `target`.
pub fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
    for m in mounts {
        if m.type_.contains('@') || m.type_.starts_with("format/") {
            // Mount types with transformations (containerd 2.x `format/`, `mkfs/`).
            return Err(MountError::Unsupported(m.type_.clone()));
        }
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()).filter(|t| !t.is_empty()),
            Some(m.source.as_str()).filter(|s| !s.is_empty()),
            &m.options,
            target,
        )
        .map_err(|e| MountError::Mount {
            what: format!("{} {}", m.type_, m.source),
            target: target.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

/// Bind mounts the host path `source` (file or directory) on `target`, creating the mount
/// point of the same kind. Symlinks in `source` are followed on the host, as runc does.
pub fn bind(source: &Path, target: &Path, recursive: bool) -> Result<(), MountError> {
    let prepare = |source| MountError::MountPoint {
        path: target.to_owned(),
        source,
    };
    let meta = std::fs::metadata(source).map_err(|e| MountError::Mount {
        what: source.display().to_string(),
        target: target.to_owned(),
        source: e,
    })?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(prepare)?;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(prepare)?;
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map_err(prepare)?;
    }
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(|e| MountError::Mount {
        what: source.display().to_string(),
        target: target.to_owned(),
        source: e.into(),
    })
}

/// The mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or below `dir`, deepest first (lazily if busy).
pub fn unmount_all_under(dir: &Path) -> Result<(), MountError> {
    let mut first_error = None;
    for target in mounts_under(dir) {
        let result = umount2(&target, MntFlags::empty()).or_else(|e| match e {
            nix::Error::EBUSY => umount2(&target, MntFlags::MNT_DETACH),
            other => Err(other),
        });
        match result {
            Ok(()) | Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
            Err(source) => {
                first_error.get_or_insert(MountError::Unmount { target, source });
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn nothing_is_mounted_under_a_fresh_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(mounts_under(dir.path()).is_empty());
        unmount_all_under(dir.path()).unwrap();
    }
}
