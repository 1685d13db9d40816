//! `cargo xtask setup`: makes a fresh Debian bookworm machine able to build and test husk.
//!
//! Idempotent and cheap when nothing is missing, so every other command calls
//! [`ensure`] first. Packages are only installed when `dpkg` says they are absent, and
//! `apt-get update` only runs in that case; whatever gets installed is announced loudly.

use std::process::Command;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

/// Debian packages the build, the lab and the tests need.
pub const APT_PACKAGES: &[&str] = &[
    // guest kernel build
    "linux-source-6.1",
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "cpio",
    "kmod",
    "file",
    // lab: an L1 Linux with KVM modules under QEMU TCG
    "qemu-system-x86",
    "linux-image-amd64",
    "busybox-static",
    // end-to-end tests and the baseline runtime
    "containerd",
    "runc",
    // the CRI tests: the pod network (CNI's bridge, host-local, loopback) and the CRI
    // client's bindings, generated at build time with protoc
    "containernetworking-plugins",
    "protobuf-compiler",
    // ip(8): the CRI fixture's bridge and the agent's interface test
    "iproute2",
    "libseccomp-dev",
    "libcap-ng-dev",
];

/// The Rust target the guest agent is built for.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The virtiofsd release we install (crates.io; the newest that builds with our toolchain,
/// checked with `cargo info virtiofsd`). Bump it here and setup reinstalls.
pub const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Installs whatever is missing. Silent when everything is present.
pub fn ensure() -> Result<()> {
    ensure_packages(APT_PACKAGES)?;
    ensure_rust_target()?;
    ensure_cni_dir()?;
    ensure_virtiofsd()
}

/// Where CNI's libraries keep their results cache (fixed in containerd 1.6's CRI plugin). The
/// lab mounts a fresh tmpfs on it, which needs the directory on the host's read-only root.
const CNI_STATE_DIR: &str = "/var/lib/cni";

fn ensure_cni_dir() -> Result<()> {
    std::fs::create_dir_all(CNI_STATE_DIR)
        .with_context(|| format!("Cannot create {CNI_STATE_DIR} (CNI's state directory)"))
}

/// Runs [`ensure`] and says so: the `setup` subcommand.
pub fn run() -> Result<()> {
    ensure()?;
    info!(
        "setup: all {} apt packages, the {MUSL_TARGET} target and virtiofsd {VIRTIOFSD_VERSION} \
         ({}) are present",
        APT_PACKAGES.len(),
        virtiofsd_path()?.display()
    );
    Ok(())
}

/// Installs those of `packages` that are missing (loudly); silent when all are present.
pub fn ensure_packages(packages: &[&'static str]) -> Result<()> {
    let missing = missing_packages(packages)?;
    if !missing.is_empty() {
        install_packages(&missing)?;
    }
    Ok(())
}

fn missing_packages(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
        .args(packages)
        .output()
        .context("Cannot run dpkg-query (is this a Debian machine?)")?;
    // dpkg-query exits 1 when some package is unknown; the listing is still valid.
    let listing = String::from_utf8_lossy(&out.stdout);
    Ok(packages
        .iter()
        .copied()
        .filter(|pkg| !listing.lines().any(|l| l == format!("{pkg} installed")))
        .collect())
}

fn install_packages(missing: &[&str]) -> Result<()> {
    warn!(
        "setup: INSTALLING missing apt packages: {}",
        missing.join(" ")
    );
    let sudo = needs_sudo();
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo {
            Command::new("sudo")
        } else {
            Command::new("apt-get")
        };
        if sudo {
            cmd.args(["-E", "apt-get"]);
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let status = cmd.status().context("Cannot run apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed with {status}", args.join(" "));
        }
        Ok(())
    };
    apt(&["update"])?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(missing);
    apt(&args)?;
    warn!("setup: installed {}", missing.join(" "));
    Ok(())
}

fn needs_sudo() -> bool {
    !nix::unistd::geteuid().is_root()
}

fn ensure_rust_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(crate::cache::workspace_root())
        .output()
        .context("Cannot run rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == MUSL_TARGET)
    {
        return Ok(());
    }
    warn!("setup: INSTALLING rust target {MUSL_TARGET}");
    let status = Command::new("rustup")
        .args(["target", "add", MUSL_TARGET])
        .current_dir(crate::cache::workspace_root())
        .status()
        .context("Cannot run rustup")?;
    if !status.success() {
        bail!("rustup target add {MUSL_TARGET} failed with {status}");
    }
    Ok(())
}

/// Where setup installs virtiofsd: `$HUSK_CACHE/bin/virtiofsd` (`cargo install --root $HUSK_CACHE`).
pub fn virtiofsd_path() -> Result<std::path::PathBuf> {
    Ok(crate::cache::cache_dir()?.join("bin/virtiofsd"))
}

/// The version `virtiofsd --version` reports (`virtiofsd 1.14.0`), if it runs at all.
fn installed_virtiofsd_version(path: &std::path::Path) -> Option<String> {
    let out = Command::new(path).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .filter(|_| out.status.success())
}

/// Installs virtiofsd [`VIRTIOFSD_VERSION`] when it is missing or another version. It needs
/// `libseccomp-dev` and `libcap-ng-dev` (in [`APT_PACKAGES`]); the build takes minutes.
fn ensure_virtiofsd() -> Result<()> {
    let path = virtiofsd_path()?;
    let installed = installed_virtiofsd_version(&path);
    if installed.as_deref() == Some(VIRTIOFSD_VERSION) {
        return Ok(());
    }
    let root = crate::cache::cache_dir()?;
    warn!(
        "setup: INSTALLING virtiofsd {VIRTIOFSD_VERSION} into {} (found {}); \
         `cargo install` builds it from crates.io and takes several minutes",
        path.display(),
        installed.as_deref().unwrap_or("none")
    );
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["install", "virtiofsd", "--locked", "--force", "--version"])
        .arg(VIRTIOFSD_VERSION)
        .arg("--root")
        .arg(&root)
        .arg("--target-dir")
        .arg(root.join("build/virtiofsd"))
        .status()
        .context("Cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install virtiofsd --version {VIRTIOFSD_VERSION} failed with {status}");
    }
    match installed_virtiofsd_version(&path) {
        Some(v) if v == VIRTIOFSD_VERSION => {
            warn!("setup: installed virtiofsd {v} at {}", path.display());
            Ok(())
        }
        other => bail!(
            "virtiofsd at {} reports version {other:?} after installing {VIRTIOFSD_VERSION}",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofsd_lives_in_the_cache() {
        let p = virtiofsd_path().unwrap();
        assert!(p.ends_with("bin/virtiofsd"), "{}", p.display());
    }
}
