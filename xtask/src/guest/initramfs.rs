//! Packs the guest initramfs: the static `husk-agent` as `/init` plus the few
//! directories and device nodes PID 1 needs before it mounts anything.
//!
//! `/dev/console` (char 5:1) must exist in the image: the kernel opens it for PID 1's
//! stdio before devtmpfs is mounted. Nothing from the host's file system goes in except
//! the agent binary, and the archive is deterministic, so it is cached by content.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tracing::info;

use crate::cache::{self, CacheKey};
use crate::cpio::{self, Entry};
use crate::setup::MUSL_TARGET;

/// Bump when the layout of the image changes.
const RECIPE: &str = "guest-initramfs-v1";
/// The console device node (`Documentation/admin-guide/devices.txt`: 5,1 = /dev/console).
const CONSOLE_MAJOR: u32 = 5;
const CONSOLE_MINOR: u32 = 1;

/// The cargo profile of guest binaries (root Cargo.toml): small, and `panic = "abort"` so an
/// agent panic ends PID 1 and shows as a guest panic instead of a half-alive agent.
pub const GUEST_PROFILE: &str = "guest";

/// Builds `husk-agent` for the guest and returns the path of the static binary.
pub fn build_agent() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    info!("guest: building husk-agent for {MUSL_TARGET}");
    let status = Command::new(cargo)
        .current_dir(cache::workspace_root())
        .args([
            "build",
            "-p",
            "husk-agent",
            "--profile",
            GUEST_PROFILE,
            "--target",
            MUSL_TARGET,
        ])
        .status()
        .context("Cannot run cargo")?;
    if !status.success() {
        bail!(
            "Building husk-agent failed ({status}): the guest initramfs needs a compiling agent \
             (`cargo build -p husk-agent --profile {GUEST_PROFILE} --target {MUSL_TARGET}`)"
        );
    }
    Ok(cache::target_dir()
        .join(MUSL_TARGET)
        .join(GUEST_PROFILE)
        .join("husk-agent"))
}

/// The archive entries of a guest image whose `/init` is `init`.
pub fn entries(init: Vec<u8>) -> Vec<Entry> {
    vec![
        Entry::dir("dev", 0o755),
        Entry::char_dev("dev/console", 0o600, CONSOLE_MAJOR, CONSOLE_MINOR),
        Entry::dir("proc", 0o755),
        Entry::dir("sys", 0o755),
        Entry::dir("tmp", 0o1777),
        Entry::dir("run", 0o755),
        Entry::file("init", 0o755, init),
    ]
}

/// Packs `init` into a cached initramfs and returns its path.
pub fn pack(init_path: &Path) -> Result<PathBuf> {
    let init =
        fs::read(init_path).with_context(|| format!("Cannot read {}", init_path.display()))?;
    if !super::elf::is_static(&init)
        .with_context(|| format!("{} is not a usable /init", init_path.display()))?
    {
        bail!(
            "{} is dynamically linked; /init must be static",
            init_path.display()
        );
    }
    let mut key = CacheKey::new(RECIPE);
    key.add("init", &init);
    let out = cache::cache_dir()?
        .join("initramfs")
        .join(key.short())
        .join("initramfs.cpio");
    if !out.is_file() {
        let bytes = cpio::archive_bytes(&entries(init))?;
        cache::write_atomically(&out, &bytes, 0o644)?;
    }
    Ok(out)
}
