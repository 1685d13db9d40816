//! Host-side mounts of a pod's share, and their teardown.
//!
//! # The layout the guest cannot turn against the host
//!
//! A pod directory holds two views of one tree:
//! * `mounts/` — where the shim creates directories and mounts (containerd's rootfs mounts,
//!   the container's host binds). Only the host sees it.
//! * `shared/` — what virtiofsd serves to the guest: a **read-only** bind of `mounts/` that is
//!   a slave of it, so every mount the shim makes under `mounts/` appears under `shared/` (and in
//!   virtiofsd's own mount namespace, whose copy is a slave too).
//!
//! The guest can write only inside the mounts themselves (a container's rootfs, a writable
//! volume), never the directories above them: it cannot rename `<id>/rootfs`, plant a symlink
//! where the shim will mount next, or create a container directory. So every path the shim
//! follows under `mounts/` is one only the host wrote, and no call site needs to be careful
//! (the approach Kata takes with its `mounts/` and `shared/` directories).
//!
//! # Read-only and recursion on the host
//!
//! A host bind is cloned as a detached tree (`open_tree`), made read-only there when asked
//! (`mount_setattr`, recursively for `rbind`), and only then attached (`move_mount`): the copies
//! that propagation makes in `shared/` and in virtiofsd's namespace are born read-only, which a
//! remount after the fact would not give them. `bind` clones only the source mount, `rbind`
//! its submounts too, as runc does.
//!
//! # Teardown
//!
//! Mount points are found in `/proc/self/mountinfo` under the canonical path of the
//! directory (so a state directory reached through a symlink, like `/var/run`, still
//! matches), unmounted deepest first without following a final symlink, and a directory is
//! removed only by [`remove_tree`], which never descends into a mount point or through a
//! symlink: what is still mounted is left, and said.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use containerd_shim_protos::types::mount::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rustix::fs::{AtFlags, StatxFlags, CWD};
use rustix::mount::{MoveMountFlags, OpenTreeFlags};

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
    /// A directory was not removed because something below it is still mounted
    #[error("{dir} is not removed: {mount} below it is still mounted")]
    StillMounted {
        /// The directory.
        dir: PathBuf,
        /// The first mount point found below it.
        mount: PathBuf,
    },
    /// A directory cannot be removed
    #[error("Cannot remove {path}")]
    Remove {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn mount_error(what: &str, target: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let what = what.to_owned();
    let target = target.to_owned();
    move |source| MountError::Mount {
        what,
        target,
        source,
    }
}

/// Sets up a pod's share (see the module doc): `mounts` bound on itself in a peer group of
/// its own, and `shared` a read-only slave bind of it. Both directories are created.
pub fn make_share(mounts: &Path, shared: &Path) -> Result<(), MountError> {
    for dir in [mounts, shared] {
        std::fs::create_dir_all(dir).map_err(|source| MountError::MountPoint {
            path: dir.to_owned(),
            source,
        })?;
    }
    let on_mounts = |e: nix::Error| mount_error("the share's host tree", mounts)(e.into());
    mount(
        Some(mounts),
        mounts,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(on_mounts)?;
    // A peer group of its own: the host's /run may be shared with other namespaces.
    for flag in [MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
        mount(None::<&str>, mounts, None::<&str>, flag, None::<&str>).map_err(on_mounts)?;
    }
    let on_shared = |e: nix::Error| mount_error("the share's guest view", shared)(e.into());
    mount(
        Some(mounts),
        shared,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(on_shared)?;
    mount(
        None::<&str>,
        shared,
        None::<&str>,
        MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(on_shared)?;
    mount(
        None::<&str>,
        shared,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(on_shared)
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

/// How a host path is bound into the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BindOptions {
    /// `rbind`: the source's submounts come along (`bind` alone takes only its own mount).
    pub recursive: bool,
    /// `ro`: read-only on the host, submounts included.
    pub readonly: bool,
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `MOUNT_ATTR_RDONLY` (linux/mount.h).
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// Makes the detached mount tree `tree` read-only, submounts included.
fn make_tree_readonly(tree: &impl AsFd) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes at `&attr`, a live local of
    // the kernel's `struct mount_attr` layout (four u64, MOUNT_ATTR_SIZE_VER0); the path is a
    // NUL-terminated empty string and the fd is open for the call's duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_fd().as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bind mounts the host path `source` (file or directory) on `target`, creating the mount
/// point of the same kind, as `options` say (see the module doc). Symlinks in `source` are
/// followed on the host, as runc does; `target` must be in a tree only the host writes.
pub fn bind(source: &Path, target: &Path, options: BindOptions) -> Result<(), MountError> {
    let prepare = |source| MountError::MountPoint {
        path: target.to_owned(),
        source,
    };
    let what = source.display().to_string();
    let meta = std::fs::metadata(source).map_err(mount_error(&what, target))?;
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
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if options.recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(CWD, source, flags)
        .map_err(|e| mount_error(&what, target)(e.into()))?;
    if options.readonly {
        make_tree_readonly(&tree).map_err(mount_error(&what, target))?;
    }
    rustix::mount::move_mount(
        &tree,
        c"",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| mount_error(&what, target)(e.into()))
}

/// A mount point a container needs in its rootfs: a path inside the container, and whether it
/// is a file (a bind of a host file) rather than a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    /// Absolute path inside the container.
    pub path: PathBuf,
    /// An empty file rather than a directory.
    pub file: bool,
}

/// Creates `points` in the rootfs at `root` (what the guest could not create in a rootfs the
/// host made read-only). Every component is resolved with `root` as `/` (openat2
/// `RESOLVE_IN_ROOT`, no magic links, no crossing into another mount): an image's symlinks
/// cannot lead the shim outside the rootfs. Existing entries are kept.
pub fn create_mount_points(root: &Path, points: &[MountPoint]) -> Result<(), MountError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let root_fd =
        rustix::fs::open(root, dir_flags, Mode::empty()).map_err(|e| MountError::MountPoint {
            path: root.to_owned(),
            source: e.into(),
        })?;
    // openat2 answers EAGAIN when a rename or mount anywhere on the host races with a `..`
    // it resolves under RESOLVE_IN_ROOT: try again, a bounded number of times.
    let openat2 = |rel: &Path, flags: OFlags, mode: Mode| {
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(&root_fd, rel, flags, mode, how) {
                Err(rustix::io::Errno::AGAIN) if tries < 64 => tries += 1,
                other => return other,
            }
        }
    };
    let open_dir = |rel: &Path| openat2(rel, dir_flags, Mode::empty());
    for point in points {
        let fail = |e: rustix::io::Errno| MountError::MountPoint {
            path: root.join(point.path.strip_prefix("/").unwrap_or(&point.path)),
            source: e.into(),
        };
        let names: Vec<_> = point
            .path
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(name) => Some(name),
                _ => None,
            })
            .collect();
        // Each component is resolved from `root` (an absolute symlink inside the image means
        // the image's `/`, which a walk relative to the parent's handle would get wrong); the
        // handle of one component is the parent of the next.
        let mut rel = PathBuf::from(".");
        let mut parent = open_dir(&rel).map_err(fail)?;
        for (i, name) in names.iter().enumerate() {
            rel.push(name);
            if point.file && i + 1 == names.len() {
                openat2(
                    &rel,
                    OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
                    Mode::from_raw_mode(0o644),
                )
                .map_err(fail)?;
                break;
            }
            parent = match open_dir(&rel) {
                Ok(dir) => dir,
                Err(rustix::io::Errno::NOENT) => {
                    // `mkdirat` never follows its last component: a dangling symlink there is
                    // EEXIST, and the open below then refuses it.
                    match rustix::fs::mkdirat(&parent, *name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(fail(e)),
                    }
                    open_dir(&rel).map_err(fail)?
                }
                Err(e) => return Err(fail(e)),
            };
        }
    }
    Ok(())
}

/// The mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`, matched on
/// the canonical path of `dir`; empty when `dir` does not exist).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&dir))
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

/// Unmounts everything at or below `dir`, deepest first (lazily if busy), never following a
/// symlink in the last component.
pub fn unmount_all_under(dir: &Path) -> Result<(), MountError> {
    let mut first_error = None;
    for target in mounts_under(dir) {
        let result = umount2(&target, MntFlags::UMOUNT_NOFOLLOW).or_else(|e| match e {
            nix::Error::EBUSY => umount2(&target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW),
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

/// Whether `path` (not followed if a symlink) is the root of a mount.
fn is_mount_root(path: &Path) -> std::io::Result<bool> {
    let st = rustix::fs::statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    )?;
    let mount_root = rustix::fs::StatxAttributes::MOUNT_ROOT;
    if !st.stx_attributes_mask.contains(mount_root) {
        // Kernels before 5.8 cannot say: a mount point is then one on another device.
        let parent = path.parent().unwrap_or(Path::new("/"));
        let parent = rustix::fs::statx(CWD, parent, AtFlags::empty(), StatxFlags::BASIC_STATS)?;
        return Ok(
            (st.stx_dev_major, st.stx_dev_minor) != (parent.stx_dev_major, parent.stx_dev_minor)
        );
    }
    Ok(st.stx_attributes.contains(mount_root))
}

/// Removes `dir` and what is below it, never descending into a mount point and never through
/// a symlink (a symlink is removed, not followed). If anything at or below `dir` is still
/// mounted, nothing is removed and [`MountError::StillMounted`] names it. A missing `dir` is
/// not an error.
pub fn remove_tree(dir: &Path) -> Result<(), MountError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(MountError::Remove {
                path: dir.to_owned(),
                source,
            })
        }
        Ok(meta) if !meta.is_dir() => {
            return std::fs::remove_file(dir).map_err(|source| MountError::Remove {
                path: dir.to_owned(),
                source,
            })
        }
        Ok(_) => {}
    }
    if let Some(mount) = mounts_under(dir).pop() {
        return Err(MountError::StillMounted {
            dir: dir.to_owned(),
            mount,
        });
    }
    remove_below(dir, dir)
}

fn remove_below(top: &Path, dir: &Path) -> Result<(), MountError> {
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |source| MountError::Remove { path, source }
    };
    if is_mount_root(dir).map_err(fail(dir))? {
        return Err(MountError::StillMounted {
            dir: top.to_owned(),
            mount: dir.to_owned(),
        });
    }
    for entry in std::fs::read_dir(dir).map_err(fail(dir))? {
        let path = entry.map_err(fail(dir))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(fail(&path))?;
        if meta.is_dir() {
            remove_below(top, &path)?;
        } else if is_mount_root(&path).map_err(fail(&path))? {
            return Err(MountError::StillMounted {
                dir: top.to_owned(),
                mount: path,
            });
        } else {
            std::fs::remove_file(&path).map_err(fail(&path))?;
        }
    }
    std::fs::remove_dir(dir).map_err(fail(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod directory with its share set up, unmounted when dropped.
    struct Pod {
        root: tempfile::TempDir,
        dir: PathBuf,
    }

    impl Pod {
        fn new(state_dir: Option<&Path>) -> Self {
            assert!(
                nix::unistd::geteuid().is_root(),
                "this test mounts: run the host tests as root (.ci/run does)"
            );
            let root = tempfile::tempdir().unwrap();
            let dir = state_dir.unwrap_or(root.path()).join("pod");
            make_share(&dir.join("mounts"), &dir.join("shared")).unwrap();
            Self { root, dir }
        }
        fn mounts(&self) -> PathBuf {
            self.dir.join("mounts")
        }
        fn shared(&self) -> PathBuf {
            self.dir.join("shared")
        }
    }

    impl Drop for Pod {
        fn drop(&mut self) {
            let _ = unmount_all_under(self.root.path());
            let _ = unmount_all_under(&self.dir);
        }
    }

    fn is_erofs<T>(result: &std::io::Result<T>) -> bool {
        matches!(result, Err(e) if e.raw_os_error() == Some(libc::EROFS))
    }

    /// A host directory with a file and a tmpfs submount holding another file.
    fn volume(parent: &Path) -> PathBuf {
        let vol = parent.join("volume");
        std::fs::create_dir_all(vol.join("sub")).unwrap();
        std::fs::write(vol.join("data"), "host data").unwrap();
        mount(
            Some("tmpfs"),
            &vol.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(vol.join("sub/inner"), "inner data").unwrap();
        vol
    }

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

    /// S1: what the guest reaches through virtiofsd is `shared/`. It must not be able to
    /// plant a symlink where the shim mounts next, nor rename what the shim mounted on.
    #[test]
    fn the_guest_cannot_redirect_a_host_mount() {
        let pod = Pod::new(None);
        let victim = pod.root.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let image = pod.root.path().join("image");
        std::fs::create_dir(&image).unwrap();
        bind(
            &image,
            &pod.mounts().join("c1/rootfs"),
            BindOptions::default(),
        )
        .unwrap();

        // The guest's attempts, made where virtiofsd would make them.
        let planted = std::os::unix::fs::symlink(&victim, pod.shared().join("c2"));
        assert!(
            is_erofs(&planted),
            "a symlink was planted in the share: {planted:?}"
        );
        let renamed = std::fs::rename(
            pod.shared().join("c1/rootfs"),
            pod.shared().join("c1/moved"),
        );
        assert!(
            is_erofs(&renamed),
            "the guest renamed a mount point: {renamed:?}"
        );
        assert!(is_erofs(&std::fs::create_dir(pod.shared().join("c3"))));

        // The shim's next mounts land in the pod directory, and show in the guest's view.
        let vol = pod.root.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("f"), "v").unwrap();
        bind(
            &vol,
            &pod.mounts().join("c2/mounts/0"),
            BindOptions::default(),
        )
        .unwrap();
        assert!(
            mounts_under(&victim).is_empty(),
            "a mount landed on the victim"
        );
        assert_eq!(
            std::fs::read_to_string(pod.shared().join("c2/mounts/0/f")).unwrap(),
            "v"
        );
        // Inside its own rootfs the guest still writes.
        std::fs::write(pod.shared().join("c1/rootfs/new"), "guest").unwrap();
        assert_eq!(std::fs::read_to_string(image.join("new")).unwrap(), "guest");
    }

    /// S2: `ro` holds on the host, submounts included, in the guest's view too.
    #[test]
    fn a_readonly_volume_is_readonly_on_the_host() {
        let pod = Pod::new(None);
        let vol = volume(pod.root.path());
        let options = BindOptions {
            recursive: true,
            readonly: true,
        };
        bind(&vol, &pod.mounts().join("c1/mounts/0"), options).unwrap();
        for view in [pod.shared(), pod.mounts()] {
            let target = view.join("c1/mounts/0");
            assert!(is_erofs(&std::fs::write(target.join("data"), "guest")));
            assert!(is_erofs(&std::fs::write(target.join("sub/inner"), "guest")));
            assert!(is_erofs(&std::fs::remove_file(target.join("data"))));
        }
        assert_eq!(
            std::fs::read_to_string(vol.join("data")).unwrap(),
            "host data"
        );
        assert_eq!(
            std::fs::read_to_string(vol.join("sub/inner")).unwrap(),
            "inner data"
        );
        // The source itself stays writable on the host.
        std::fs::write(vol.join("data"), "host again").unwrap();
    }

    /// A read-only rootfs: its mount points are made beneath it (an image's symlinks cannot
    /// lead elsewhere), then the guest's view of it is read-only on the host.
    #[test]
    fn a_readonly_rootfs_gets_its_mount_points_and_the_guest_cannot_write_it() {
        let pod = Pod::new(None);
        let image = pod.root.path().join("image");
        let outside = pod.root.path().join("outside");
        std::fs::create_dir_all(image.join("etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // Hostile image: symlinks that point out of the rootfs, absolute and relative.
        std::os::unix::fs::symlink(&outside, image.join("proc")).unwrap();
        std::os::unix::fs::symlink("../../outside", image.join("etc/up")).unwrap();
        let point = |p: &str, file| MountPoint {
            path: p.into(),
            file,
        };
        // Read as if the image were `/`, the first leads nowhere (refused, not followed out),
        // the second to the image's own /outside.
        assert!(create_mount_points(&image, &[point("/proc/self", false)]).is_err());
        std::fs::create_dir(image.join("outside")).unwrap();
        let points = [
            point("/etc/up/planted", false),
            point("/etc/hosts", true),
            point("/run/a/b", false),
        ];
        create_mount_points(&image, &points).unwrap();
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "escaped");
        assert!(image.join("outside/planted").is_dir());
        assert!(image.join("etc/hosts").is_file());
        assert!(image.join("run/a/b").is_dir());
        // Existing entries are kept; a directory where a file is needed is an error.
        create_mount_points(&image, &points).unwrap();
        assert!(create_mount_points(&image, &[point("/run/a", true)]).is_err());

        let options = BindOptions {
            recursive: true,
            readonly: true,
        };
        bind(&image, &pod.mounts().join("c1/rootfs"), options).unwrap();
        let guest = pod.shared().join("c1/rootfs");
        assert!(guest.join("etc/hosts").is_file() && guest.join("run/a/b").is_dir());
        assert!(is_erofs(&std::fs::write(guest.join("etc/passwd"), "x")));
        assert!(is_erofs(&std::fs::remove_file(guest.join("etc/hosts"))));
        assert!(is_erofs(&std::fs::create_dir(guest.join("new"))));
        assert!(!image.join("etc/passwd").exists());
    }

    /// S2: `bind` without `rbind` does not expose the source's submounts.
    #[test]
    fn a_plain_bind_hides_the_sources_submounts() {
        let pod = Pod::new(None);
        let vol = volume(pod.root.path());
        bind(
            &vol,
            &pod.mounts().join("c1/mounts/0"),
            BindOptions::default(),
        )
        .unwrap();
        let target = pod.shared().join("c1/mounts/0");
        assert!(target.join("data").exists());
        assert!(!target.join("sub/inner").exists(), "a submount came along");
        let recursive = BindOptions {
            recursive: true,
            readonly: false,
        };
        bind(&vol, &pod.mounts().join("c1/mounts/1"), recursive).unwrap();
        assert!(pod.shared().join("c1/mounts/1/sub/inner").exists());
    }

    /// S3: a state directory reached through a symlink (`/var/run` on Debian) still tears
    /// down: the binds are unmounted and the volume's data survives the removal.
    #[test]
    fn teardown_through_a_symlinked_state_dir_keeps_the_volume() {
        let outer = tempfile::tempdir().unwrap();
        std::fs::create_dir(outer.path().join("run")).unwrap();
        std::os::unix::fs::symlink("run", outer.path().join("var-run")).unwrap();
        let pod = Pod::new(Some(&outer.path().join("var-run")));
        let vol = pod.root.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("precious"), "host data").unwrap();
        let rw = BindOptions {
            recursive: true,
            readonly: false,
        };
        bind(&vol, &pod.mounts().join("c1/mounts/0"), rw).unwrap();
        assert_eq!(
            mounts_under(&pod.dir).len(),
            4,
            "mounts/, shared/ and the volume in both"
        );

        unmount_all_under(&pod.dir).unwrap();
        assert!(mounts_under(&pod.dir).is_empty());
        remove_tree(&pod.dir).unwrap();
        assert!(!pod.dir.exists());
        assert_eq!(
            std::fs::read_to_string(vol.join("precious")).unwrap(),
            "host data"
        );
    }

    /// S3: removal refuses a tree with a mount still in it and deletes nothing.
    #[test]
    fn removal_leaves_a_tree_that_is_still_mounted() {
        let pod = Pod::new(None);
        let vol = pod.root.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("precious"), "host data").unwrap();
        bind(
            &vol,
            &pod.mounts().join("c1/mounts/0"),
            BindOptions::default(),
        )
        .unwrap();
        let err = remove_tree(&pod.mounts().join("c1")).unwrap_err();
        assert!(matches!(err, MountError::StillMounted { .. }), "{err:?}");
        assert_eq!(
            std::fs::read_to_string(vol.join("precious")).unwrap(),
            "host data"
        );
        // Even when mountinfo is not consulted, the walk does not descend into the mount.
        let err = remove_below(&pod.mounts(), &pod.mounts().join("c1")).unwrap_err();
        assert!(matches!(err, MountError::StillMounted { .. }), "{err:?}");
        assert_eq!(
            std::fs::read_to_string(vol.join("precious")).unwrap(),
            "host data"
        );
    }

    #[test]
    fn removal_does_not_follow_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let tree = root.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(outside.join("keep").exists());
        remove_tree(&tree).unwrap();
    }
}
