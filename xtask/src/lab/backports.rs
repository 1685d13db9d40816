//! Debian bookworm-backports packages for lab experiments (issue 8, item 3): QEMU 10.0 as the
//! L1's emulator (`HUSK_LAB_QEMU=backports`) and Linux 6.12 as the L1 kernel
//! (`HUSK_LAB_L1_KERNEL=backports`).
//!
//! The packages are downloaded with a private apt configuration (`apt`) and unpacked under
//! the husk cache with `dpkg-deb -x`. Backports' QEMU 10 runs on bookworm's libraries; its
//! firmware comes from its own unpacked `qemu-system-data`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tracing::info;

use super::apt::Apt;
use super::emulator::LabQemu;
use super::image::LabKernel;
use crate::cache;

/// `HUSK_LAB_L1_KERNEL=backports` boots bookworm-backports' kernel (6.12) as the L1; unset or
/// empty: the newest installed `/boot/vmlinuz-*-amd64`.
pub const HUSK_LAB_L1_KERNEL_ENV: &str = "HUSK_LAB_L1_KERNEL";
/// The only value the variable takes besides empty.
const BACKPORTS: &str = "backports";
const SOURCES: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                       http://deb.debian.org/debian bookworm-backports main\n";

/// This configuration's private apt (`<husk cache>/lab/backports`).
fn apt() -> Result<Apt> {
    Apt::new("backports", SOURCES)
}

/// Reads the kernel knob: false when unset or empty, an error for a value other than
/// `backports`.
fn wants_backports(var: &str) -> Result<bool> {
    knob(var, std::env::var(var).ok())
}

fn knob(var: &str, value: Option<String>) -> Result<bool> {
    match value {
        None => Ok(false),
        Some(v) if v.trim().is_empty() => Ok(false),
        Some(v) if v.trim() == BACKPORTS => Ok(true),
        Some(v) => bail!("{var}={v:?}: the only value it takes is `{BACKPORTS}` (or unset)"),
    }
}

/// bookworm-backports' QEMU (`HUSK_LAB_QEMU=backports`), unpacked with its own firmware.
pub fn qemu() -> Result<LabQemu> {
    let root = unpacked(&["qemu-system-x86", "qemu-system-data"])?;
    let program = root.join("usr/bin/qemu-system-x86_64");
    let data = root.join("usr/share/qemu");
    if !program.is_file() || !data.is_dir() {
        bail!(
            "{} lacks usr/bin/qemu-system-x86_64 or usr/share/qemu",
            root.display()
        );
    }
    Ok(LabQemu {
        program,
        args: vec!["-L".into(), data.to_string_lossy().into_owned()],
        name: "QEMU from bookworm-backports",
    })
}

/// The L1 kernel from bookworm-backports if `HUSK_LAB_L1_KERNEL` asks for it.
pub fn kernel() -> Result<Option<LabKernel>> {
    if !wants_backports(HUSK_LAB_L1_KERNEL_ENV)? {
        return Ok(None);
    }
    let apt = apt()?;
    // The metapackage names the current image package: `Depends: linux-image-6.12.N+deb12-amd64`.
    let show = apt.output(
        "apt-cache",
        &["show", "--no-all-versions", "linux-image-amd64"],
    )?;
    let image = show
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .and_then(|deps| {
            deps.split(',')
                .map(|d| d.split_whitespace().next().unwrap_or(""))
                .find(|d| d.starts_with("linux-image-"))
        })
        .context("linux-image-amd64 in bookworm-backports names no linux-image package")?
        .to_string();
    let root = unpacked(&[&image])?;
    let release = image.trim_start_matches("linux-image-").to_string();
    let modules_dir = root.join("lib/modules").join(&release);
    if !modules_dir.join("modules.dep").is_file() {
        // Debian runs depmod at install time; an unpacked package has no modules.dep yet.
        let status = Command::new("depmod")
            .arg("-b")
            .arg(&root)
            .arg(&release)
            .status()
            .context("Cannot run depmod (install kmod)")?;
        if !status.success() {
            bail!("depmod -b {} {release} failed: {status}", root.display());
        }
    }
    Ok(Some(LabKernel {
        image: root.join("boot").join(format!("vmlinuz-{release}")),
        modules_dir,
        release,
    }))
}

/// Downloads `packages` (their bookworm-backports versions) and unpacks them together into a
/// directory named after their .deb files, once.
fn unpacked(packages: &[&str]) -> Result<PathBuf> {
    let apt = apt()?;
    let debs_dir = apt.downloads();
    let _lock = cache::lock(apt.dir())?;
    let mut debs = Vec::new();
    for package in packages {
        let policy = apt.output("apt-cache", &["policy", package])?;
        let version = policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(str::trim)
            .filter(|v| *v != "(none)")
            .with_context(|| format!("{package} is not in bookworm-backports"))?
            .to_string();
        let wanted = format!("{package}={version}");
        let deb = find_deb(&debs_dir, package, &version)?;
        let deb = match deb {
            Some(deb) => deb,
            None => {
                info!("downloading {wanted} from bookworm-backports");
                apt.output("apt-get", &["download", &wanted])?;
                find_deb(&debs_dir, package, &version)?
                    .with_context(|| format!("apt-get download {wanted} left no .deb"))?
            }
        };
        debs.push(deb);
    }
    // Named after the first package's .deb, its version included.
    let name = debs[0]
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .replace('%', "_");
    let root = apt.dir().join("root").join(name);
    let done = root.join(".unpacked");
    if !done.exists() {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        for deb in &debs {
            let status = Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(&root)
                .status()
                .context("Cannot run dpkg-deb")?;
            if !status.success() {
                bail!("dpkg-deb -x {} failed: {status}", deb.display());
            }
        }
        fs::write(&done, "")?;
    }
    Ok(root)
}

/// The downloaded .deb of `package` at `version` (apt writes the epoch's `:` as `%3a`).
fn find_deb(dir: &Path, package: &str, version: &str) -> Result<Option<PathBuf>> {
    let version = version.replace(':', "%3a");
    let prefix = format!("{package}_{version}_");
    Ok(fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_knob_takes_backports_or_nothing() {
        let var = HUSK_LAB_L1_KERNEL_ENV;
        assert!(!knob(var, None).unwrap());
        assert!(!knob(var, Some(" ".into())).unwrap());
        assert!(knob(var, Some("backports".into())).unwrap());
        let err = knob(var, Some("6.12".into())).unwrap_err().to_string();
        assert!(err.contains("HUSK_LAB_L1_KERNEL=\"6.12\""), "{err}");
        assert!(err.contains("only value it takes is `backports`"), "{err}");
    }

    #[test]
    fn finds_a_deb_by_package_and_version_with_its_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let deb = dir
            .path()
            .join("qemu-system-x86_1%3a10.0.2+ds-2+deb13u1~bpo12+1_amd64.deb");
        fs::write(&deb, "").unwrap();
        fs::write(
            dir.path().join("qemu-system-x86-xen_1%3a10.0.2_amd64.deb"),
            "",
        )
        .unwrap();
        let found = find_deb(
            dir.path(),
            "qemu-system-x86",
            "1:10.0.2+ds-2+deb13u1~bpo12+1",
        );
        assert_eq!(found.unwrap(), Some(deb));
        assert_eq!(
            find_deb(dir.path(), "qemu-system-x86", "1:7.2").unwrap(),
            None
        );
    }
}
