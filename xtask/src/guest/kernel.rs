//! Builds the guest kernel: Debian's `linux-source-6.1`, `make tinyconfig`, our fragment
//! merged with `scripts/kconfig/merge_config.sh`, `make olddefconfig`, `make vmlinux`.
//!
//! The build takes 5–10 minutes on two cores, so the result is cached under a key over
//! the fragment, the source package version and the compiler version; the source tree is
//! kept too (keyed by the package version) so a fragment change rebuilds incrementally.
//! After `olddefconfig` every option of the fragment is checked against `.config`:
//! Kconfig silently drops options whose dependencies are unmet, and a kernel without,
//! say, VIRTIO_VSOCKETS would boot and then fail in a confusing place.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tracing::info;

use crate::cache::{self, CacheKey};
use crate::process::{output_text, run_logged};

/// Debian's kernel source package and the tarball it installs.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The directory the tarball unpacks to.
const SOURCE_DIR_NAME: &str = "linux-source-6.1";
/// Stamp file in the unpacked tree holding the package version it came from.
const SOURCE_STAMP: &str = ".husk-source-version";
/// Bump when the build steps change in a way that changes the output.
const RECIPE: &str = "guest-kernel-v1";

/// The config fragment, relative to the workspace root.
pub fn fragment_path() -> PathBuf {
    cache::workspace_root()
        .join("configs")
        .join("guest-kernel.config")
}

/// Returns the cached `vmlinux`, building it first if needed.
pub fn build() -> Result<PathBuf> {
    let fragment_path = fragment_path();
    let fragment = fs::read_to_string(&fragment_path)
        .with_context(|| format!("Cannot read {}", fragment_path.display()))?;
    let source_version = source_version()?;
    let gcc = gcc_version()?;
    let key = cache_key(&fragment, &source_version, &gcc);

    let cache = cache::cache_dir()?;
    let out_dir = cache.join("kernel").join(key.short());
    let vmlinux = out_dir.join("vmlinux");
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }

    let build_root = cache.join("build");
    let _lock = cache::lock(&build_root)?;
    if vmlinux.is_file() {
        return Ok(vmlinux); // another xtask built it while we waited
    }
    let tree = unpack_source(&build_root, &source_version)?;
    let log = build_root.join("kernel-build.log");
    fs::write(&log, "")?;
    let started = Instant::now();
    info!(
        "guest: building the guest kernel ({SOURCE_PACKAGE} {source_version}, key {}); \
         this takes 5–10 minutes on 2 cores; log: {}",
        key.short(),
        log.display()
    );
    configure(&tree, &fragment_path, &fragment, &log)?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    run_logged(make(&tree).arg(format!("-j{jobs}")).arg("vmlinux"), &log)?;

    let built = tree.join("vmlinux");
    let image = fs::read(&built).with_context(|| format!("Cannot read {}", built.display()))?;
    let entry = super::elf::pvh_entry(&image)
        .with_context(|| format!("{} has no PVH entry point", built.display()))?;
    cache::write_atomically(
        &out_dir.join("config"),
        &fs::read(tree.join(".config"))?,
        0o644,
    )?;
    cache::write_atomically(&vmlinux, &image, 0o644)?;
    info!(
        "guest: kernel built in {:.0?} ({} MiB, PVH entry {entry:#x})",
        started.elapsed(),
        image.len() >> 20
    );
    Ok(vmlinux)
}

/// The cache key of a kernel built from these inputs.
pub fn cache_key(fragment: &str, source_version: &str, gcc_version: &str) -> CacheKey {
    let mut key = CacheKey::new(RECIPE);
    key.add("fragment", fragment.as_bytes())
        .add("source-version", source_version.as_bytes())
        .add("gcc", gcc_version.as_bytes());
    key
}

fn source_version() -> Result<String> {
    let v = output_text(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))
        .with_context(|| {
        format!("{SOURCE_PACKAGE} is not installed (run `cargo xtask setup`)")
    })?;
    Ok(v.trim().to_string())
}

/// The compiler's first `--version` line, part of the cache keys of what we build from source.
pub(crate) fn gcc_version() -> Result<String> {
    let v = output_text(Command::new("gcc").arg("--version"))?;
    Ok(v.lines().next().unwrap_or_default().trim().to_string())
}

fn make(tree: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(tree)
        .env("KBUILD_BUILD_USER", "husk")
        .env("KBUILD_BUILD_HOST", "husk");
    cmd
}

/// Unpacks the source tarball into `<build_root>/linux-source-6.1` unless the tree there
/// already came from `version`.
fn unpack_source(build_root: &Path, version: &str) -> Result<PathBuf> {
    let tree = build_root.join(SOURCE_DIR_NAME);
    let stamp = tree.join(SOURCE_STAMP);
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == version) {
        return Ok(tree);
    }
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("Cannot remove {}", tree.display()))?;
    }
    info!("guest: unpacking {SOURCE_TARBALL}");
    output_text(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .arg("-C")
            .arg(build_root),
    )?;
    fs::write(&stamp, version)?;
    Ok(tree)
}

fn configure(tree: &Path, fragment_path: &Path, fragment: &str, log: &Path) -> Result<()> {
    run_logged(make(tree).arg("tinyconfig"), log)?;
    run_logged(
        Command::new(tree.join("scripts/kconfig/merge_config.sh"))
            .current_dir(tree)
            .args(["-m", ".config"])
            .arg(fragment_path),
        log,
    )?;
    run_logged(make(tree).arg("olddefconfig"), log)?;
    let config = fs::read_to_string(tree.join(".config"))?;
    let lost = lost_options(fragment, &config);
    if !lost.is_empty() {
        let list: Vec<String> = lost
            .iter()
            .map(|(name, want, got)| format!("  {name}: fragment says {want}, .config has {got}"))
            .collect();
        bail!(
            "Kconfig dropped {} option(s) of {} (unmet dependencies?):\n{}",
            lost.len(),
            fragment_path.display(),
            list.join("\n")
        );
    }
    Ok(())
}

/// Parses `.config` syntax: `CONFIG_X=v` and `# CONFIG_X is not set` (recorded as `n`).
pub fn parse_kconfig(text: &str) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") {
                    options.insert(name.to_string(), "n".to_string());
                }
            }
        } else if let Some((name, value)) = line.split_once('=') {
            if name.starts_with("CONFIG_") {
                options.insert(name.to_string(), value.to_string());
            }
        }
    }
    options
}

/// Options of `fragment` whose value in `config` differs: `(name, wanted, got)`.
/// An option absent from `config` counts as `n`.
pub fn lost_options(fragment: &str, config: &str) -> Vec<(String, String, String)> {
    let have = parse_kconfig(config);
    parse_kconfig(fragment)
        .into_iter()
        .filter_map(|(name, want)| {
            let got = have.get(&name).cloned().unwrap_or_else(|| "n".to_string());
            (got != want).then_some((name, want, got))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_set_unset_and_values() {
        let cfg = "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_HZ=100\nCONFIG_S=\"x=y\"\n";
        let m = parse_kconfig(cfg);
        assert_eq!(m["CONFIG_A"], "y");
        assert_eq!(m["CONFIG_B"], "n");
        assert_eq!(m["CONFIG_HZ"], "100");
        assert_eq!(m["CONFIG_S"], "\"x=y\"");
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn reports_lost_options() {
        let fragment = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D=4\n";
        let config = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_D=4\n";
        let lost = lost_options(fragment, config);
        assert_eq!(
            lost,
            vec![
                ("CONFIG_B".to_string(), "n".to_string(), "y".to_string()),
                ("CONFIG_C".to_string(), "y".to_string(), "n".to_string()),
            ]
        );
    }

    #[test]
    fn unset_option_may_be_absent() {
        assert!(lost_options("# CONFIG_MODULES is not set\n", "CONFIG_X=y\n").is_empty());
    }

    #[test]
    fn cache_key_depends_on_every_input() {
        let base = cache_key("CONFIG_A=y\n", "6.1.192-2", "gcc 12.2.0").hex();
        assert_eq!(
            base,
            cache_key("CONFIG_A=y\n", "6.1.192-2", "gcc 12.2.0").hex()
        );
        assert_ne!(
            base,
            cache_key("CONFIG_A=n\n", "6.1.192-2", "gcc 12.2.0").hex()
        );
        assert_ne!(
            base,
            cache_key("CONFIG_A=y\n", "6.1.192-3", "gcc 12.2.0").hex()
        );
        assert_ne!(
            base,
            cache_key("CONFIG_A=y\n", "6.1.192-2", "gcc 12.2.1").hex()
        );
    }

    #[test]
    fn shipped_fragment_wants_the_essentials() {
        let fragment = fs::read_to_string(fragment_path()).unwrap();
        let m = parse_kconfig(&fragment);
        for must in [
            "CONFIG_64BIT",
            "CONFIG_PVH",
            "CONFIG_KVM_GUEST",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_VIRTIO_FS",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_DEVTMPFS_MOUNT",
            "CONFIG_SECCOMP_FILTER",
            "CONFIG_CGROUP_BPF",
        ] {
            assert_eq!(m.get(must).map(String::as_str), Some("y"), "{must}");
        }
    }
}
