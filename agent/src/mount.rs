//! The guest's base file systems: mounted by PID 1 at boot, unmounted before the reset.
//!
//! The initramfs holds only `/init` (and `/dev/console`); everything else a Linux userland
//! expects (/proc, /sys, /dev, /tmp, /run, the cgroup2 hierarchy) is mounted here, without
//! any guest tools.

use std::os::unix::fs::DirBuilderExt;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::debug;

/// The mount table PID 1 reads before the reset.
const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";

/// Errors while setting up or tearing down mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Cannot create a mount point
    #[error("Cannot create mount point {target}")]
    MkDir {
        /// The directory.
        target: &'static str,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Cannot mount a file system
    #[error("Cannot mount {fstype} on {target}")]
    Mount {
        /// File system type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The mount(2) error.
        #[source]
        source: Errno,
    },
}

/// One entry of the base mount table.
#[derive(Debug)]
struct BaseMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// Mounted in this order (parents before children) at boot.
const BASE_MOUNTS: &[BaseMount] = &[
    BaseMount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    BaseMount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    BaseMount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    BaseMount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    BaseMount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    BaseMount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=0755"),
    },
    BaseMount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Symlinks programs expect in /dev (what udev or systemd would create). /dev/ptmx is
/// devtmpfs's node, which since Linux 4.7 opens the devpts instance mounted at /dev/pts.
const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
];

/// Mounts the base file systems. A target that is already mounted (`EBUSY`) is kept.
pub fn mount_base() -> Result<(), MountError> {
    for m in BASE_MOUNTS {
        if std::fs::metadata(m.target).is_err() {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(m.target)
                .map_err(|source| MountError::MkDir {
                    target: m.target,
                    source,
                })?;
        }
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => {
                return Err(MountError::Mount {
                    fstype: m.fstype,
                    target: m.target,
                    source,
                })
            }
        }
    }
    for (original, link) in DEV_SYMLINKS {
        if let Err(e) = std::os::unix::fs::symlink(original, link) {
            debug!(link, error = %e, "symlink not created");
        }
    }
    Ok(())
}

/// Decodes the octal escapes (`\040` for a space, …) the kernel uses in mountinfo paths.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of a mountinfo text, in mount order (field 5, see proc(5)).
fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .collect()
}

/// Unmounts everything but `/`, children before parents. Best effort: a busy mount (the
/// console keeps /dev open) stays; the caller has synced and the VM is about to reset.
pub fn unmount_all() {
    let Ok(mountinfo) = std::fs::read_to_string(MOUNTINFO_PATH) else {
        debug!("no mountinfo; nothing unmounted");
        return;
    };
    for target in mount_points(&mountinfo).iter().rev() {
        if target == "/" {
            continue;
        }
        if let Err(e) = umount2(target.as_str(), MntFlags::empty()) {
            debug!(target = %target, error = %e, "not unmounted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_points_are_listed_in_order_and_unescaped() {
        let text = "1 0 0:2 / / rw - rootfs rootfs rw\n\
                    20 1 0:20 / /proc rw,nosuid - proc proc rw\n\
                    30 1 0:30 / /run/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(mount_points(text), ["/", "/proc", "/run/with space"]);
    }

    #[test]
    fn stray_backslashes_are_kept() {
        assert_eq!(unescape_mount_path("/a\\b"), "/a\\b");
        assert_eq!(unescape_mount_path("/a\\"), "/a\\");
        assert_eq!(unescape_mount_path("/a\\134b"), "/a\\b");
    }

    #[test]
    fn parents_are_mounted_before_children() {
        for (i, m) in BASE_MOUNTS.iter().enumerate() {
            for child in &BASE_MOUNTS[..i] {
                assert!(
                    !child.target.starts_with(&format!("{}/", m.target)),
                    "{} must come after {}",
                    child.target,
                    m.target
                );
            }
        }
    }
}
