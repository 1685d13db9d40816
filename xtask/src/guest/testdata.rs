//! Test data for the container tests: a busybox root file system on the host.
//!
//! [`busybox_rootfs`] builds (once, cached under the husk cache) a directory holding Debian's
//! `busybox-static` binary as `/bin/busybox`, one symlink per applet (as `busybox --list-full`
//! names them), the usual empty top-level directories and an `/etc/passwd` with root. The
//! component tests copy it into the directory virtiofsd shares with the guest (the rootfs of a
//! container, as containerd would mount it), and the end-to-end tests pack it into an OCI image.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cache::{self, CacheKey};

/// Bump when the layout of the tree changes.
const RECIPE: &str = "busybox-rootfs-v1";
/// Debian `busybox-static`'s binary.
const BUSYBOX: &str = "/bin/busybox";
/// Empty directories of the tree.
const DIRS: &[&str] = &[
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root",
];
/// `/etc/passwd` of the tree.
const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n";
/// `/etc/group` of the tree.
const GROUP: &[u8] = b"root:x:0:\nnogroup:x:65534:\n";

/// The applet paths (relative, e.g. `bin/sh`) of `/bin/busybox`, without busybox itself.
fn applets() -> Result<Vec<String>> {
    let out = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .with_context(|| format!("Cannot run {BUSYBOX} (apt package busybox-static)"))?;
    if !out.status.success() {
        bail!("{BUSYBOX} --list-full failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "bin/busybox" && !a.contains(".."))
        .map(str::to_owned)
        .collect())
}

/// Writes the busybox tree into the empty directory `root`.
fn populate(root: &Path, busybox: &[u8]) -> Result<()> {
    for d in DIRS {
        fs::create_dir_all(root.join(d))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    let bin = root.join("bin/busybox");
    fs::write(&bin, busybox)?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("etc/passwd"), PASSWD)?;
    fs::write(root.join("etc/group"), GROUP)?;
    for applet in applets()? {
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        let link = root.join(&applet);
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        symlink(&target, &link).with_context(|| format!("Cannot link {}", link.display()))?;
    }
    Ok(())
}

/// Builds (or finds in the cache) the busybox root file system and returns its directory.
pub fn busybox_rootfs() -> Result<PathBuf> {
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("Cannot read {BUSYBOX} (apt package busybox-static)"))?;
    let mut key = CacheKey::new(RECIPE);
    key.add("busybox", &busybox);
    let dir = cache::cache_dir()?.join("busybox-rootfs").join(key.short());
    let out = dir.join("rootfs");
    if out.is_dir() {
        return Ok(out);
    }
    fs::create_dir_all(&dir)?;
    let _lock = cache::lock(&dir)?;
    if out.is_dir() {
        return Ok(out);
    }
    let tmp = dir.join("rootfs.tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp)?;
    populate(&tmp, &busybox)
        .with_context(|| format!("Cannot build the busybox tree in {}", tmp.display()))?;
    fs::rename(&tmp, &out)?;
    Ok(out)
}
