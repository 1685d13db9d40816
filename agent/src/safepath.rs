//! Resolving host-named paths inside a root without escaping it.
//!
//! The host names rootfs and mount sources relative to the shared file system, whose
//! contents an image controls (CVE-2020-2026 class: a symlink in an image pointing at `/`).
//! Paths are first checked lexically (relative, no `..`, no empty or `.` tricks), then
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from the root, so the
//! kernel refuses any symlink that leads outside; the opened file's real path is returned.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// `struct open_how` (include/uapi/linux/openat2.h).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `RESOLVE_NO_MAGICLINKS` (include/uapi/linux/openat2.h).
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
/// `RESOLVE_BENEATH` (include/uapi/linux/openat2.h).
const RESOLVE_BENEATH: u64 = 0x08;

/// Errors resolving a path.
#[derive(Debug, thiserror::Error)]
pub enum SafePathError {
    /// The path is not a plain relative path (absolute, `..`, empty)
    #[error("Path {0:?} must be relative, non-empty and free of `..`")]
    NotPlain(PathBuf),
    /// The path leaves its root or does not exist
    #[error("Path {path:?} does not resolve inside {root:?}")]
    Resolve {
        /// The root.
        root: PathBuf,
        /// The path.
        path: PathBuf,
        /// The openat2 error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `path` is relative and has only normal components (no `..`, no root).
pub fn check_plain(path: &Path) -> Result<(), SafePathError> {
    let plain = !path.as_os_str().is_empty()
        && path.as_os_str().as_bytes().iter().all(|b| *b != 0)
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if plain {
        Ok(())
    } else {
        Err(SafePathError::NotPlain(path.to_owned()))
    }
}

/// Resolves `path` (relative) inside `root` and returns the real absolute path it names.
/// Symlinks inside `root` are followed only while they stay inside it.
pub fn resolve_beneath(root: &Path, path: &Path) -> Result<PathBuf, SafePathError> {
    check_plain(path)?;
    let err = |source| SafePathError::Resolve {
        root: root.to_owned(),
        path: path.to_owned(),
        source,
    };
    let root_c = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    let path_c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| err(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: a valid NUL-terminated path; the returned fd is checked and owned below.
    let root_fd = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if root_fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: root_fd is a freshly opened descriptor nobody else owns.
    let root_fd = unsafe { OwnedFd::from_raw_fd(root_fd) };
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2(2) with a valid dirfd, NUL-terminated path and an `open_how` of the
    // size we pass; the result is checked and owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_fd.as_raw_fd(),
            path_c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: a freshly opened descriptor (fits in i32: the kernel returns an int).
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(err)?;
    let real_root = std::fs::canonicalize(root).map_err(err)?;
    if !real.starts_with(&real_root) {
        return Err(err(std::io::ErrorKind::PermissionDenied.into()));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn plain_paths_are_accepted_and_tricks_refused() {
        check_plain(Path::new("c1/rootfs")).unwrap();
        check_plain(Path::new("./c1")).unwrap();
        for bad in ["", "/etc", "c1/../..", "..", "a/../b"] {
            assert!(check_plain(Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn symlinks_may_not_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("share");
        std::fs::create_dir_all(root.join("c1/rootfs")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        symlink("/", root.join("abs")).unwrap();
        symlink("../outside", root.join("rel")).unwrap();
        symlink("c1/rootfs", root.join("inner")).unwrap();
        let real_root = std::fs::canonicalize(&root).unwrap();
        assert_eq!(
            resolve_beneath(&root, Path::new("c1/rootfs")).unwrap(),
            real_root.join("c1/rootfs")
        );
        assert_eq!(
            resolve_beneath(&root, Path::new("inner")).unwrap(),
            real_root.join("c1/rootfs")
        );
        for bad in ["abs", "abs/etc", "rel", "missing", "../share"] {
            assert!(resolve_beneath(&root, Path::new(bad)).is_err(), "{bad:?}");
        }
    }
}
