//! The QEMU the L1 runs under (`HUSK_LAB_QEMU`).
//!
//! By default the L1 runs under the installed, unpatched `qemu-system-x86_64` (Debian's 7.2).
//! `HUSK_LAB_QEMU=backports` runs bookworm-backports' QEMU 10 (`backports`), and
//! `HUSK_LAB_QEMU=patched` Debian's QEMU 7.2 rebuilt from its own source package with the lab's
//! patch, `qemu-svm-event-injection.patch` (issue 8), which does four things:
//!
//! - It fixes a defect of the SVM emulation. When the L1's KVM enters the L2 with an external
//!   interrupt to inject (VMCB `EVENTINJ`, type INTR), `helper_vmrun` sets `exception_index` to
//!   the vector and delivers the interrupt at once, but never clears `exception_index`. Until
//!   something overwrites it (the next exception or #VMEXIT), an exit request from another
//!   thread makes the CPU loop take it for a pending exception and deliver the vector again,
//!   whatever IF and GIF say. `HUSK_QEMU_SVM_FIX=0` turns the fix off, for an A/B in one binary.
//! - It fixes a data race that loses GIF. Every `FLDENV`, `FRSTOR`, `FXRSTOR` and `XRSTOR` of
//!   any vCPU calls `cpu_clear_ignne`, which does a plain read-modify-write of the *first*
//!   CPU's `hflags2` from that vCPU's thread (the lab runs MTTCG). When it races with the first
//!   CPU's own STGI, VMRUN or #VMEXIT, the stale copy written back undoes their change to GIF.
//!   The fix touches only the IGNNE bit, atomically, and only when it is set;
//!   `HUSK_QEMU_IGNNE_FIX=0` restores QEMU's code.
//! - It reports on stderr (`husk-qemu: …`, at most 50 reports of each kind per run, each with
//!   the CPU's last GIF events) every such
//!   stale event the CPU takes, and every external event delivered while GIF is clear, with the
//!   path that delivered it, and every `HLT` executed while GIF is clear (such a CPU never
//!   wakes again).
//! - It adds the SVM state that gates interrupts to `info registers` (`SVM GIF=… VGIF=… GM=…
//!   INT_CTL=… IRQ_REQ=…`), which the lab's monitor reads when the L1 goes silent
//!   ([`super::monitor`]): whether a wedged L1 has GIF clear.
//!
//! Measured (BENCHMARKS.md, session 26): the fix does not change the nested-paging reproducer's
//! guest deaths, and no stale event was taken in any run, so the default stays Debian's QEMU.
//!
//! The build: the source package of the installed `qemu-system-x86` comes through a private
//! apt configuration (`apt-get source --download-only`: apt checks the archive's signature and
//! every file's hash), Debian's own patches are applied in the order of their series file, then
//! ours; only `qemu-system-x86_64` is built, with TCG, virtio-9p and nothing else, in about five
//! minutes on two cores, once per (source version, patch, compiler) into the husk cache. Its
//! firmware (qboot for `microvm`) is the installed `qemu-system-data`'s, passed with `-L`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use super::apt::Apt;
use super::backports;
use crate::cache::{self, CacheKey};
use crate::process::{output_text, run_logged};

/// Chooses the L1's emulator: unset or empty for the installed one, `patched` or `backports`.
pub const HUSK_LAB_QEMU_ENV: &str = "HUSK_LAB_QEMU";
/// Our fix to QEMU's SVM emulation, applied after Debian's patches.
const PATCH: &str = include_str!("qemu-svm-event-injection.patch");
/// Bump when the build steps change in a way that changes the binary.
const RECIPE: &str = "lab-qemu-v1";
/// The binary package whose source we rebuild, and the firmware directory it installs.
const BINARY_PACKAGE: &str = "qemu-system-x86";
const INSTALLED_DATA_DIR: &str = "/usr/share/qemu";
/// What the build needs beyond the machine's setup (`setup::APT_PACKAGES`).
const BUILD_PACKAGES: &[&str] = &[
    "patch",
    "python3",
    "pkg-config",
    "meson",
    "ninja-build",
    "libglib2.0-dev",
    "libpixman-1-dev",
    "zlib1g-dev",
    "libfdt-dev",
    "libattr1-dev",
];
/// Where bookworm's QEMU sources are: the release, its stable updates and security updates.
const SOURCES: &str = "\
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
";
/// QEMU's configure: the one target, TCG and virtio-9p (the lab's shares), nothing else.
const CONFIGURE_ARGS: &[&str] = &[
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--enable-tcg",
    "--enable-virtfs",
    "--enable-attr",
    "--enable-cap-ng",
    "--enable-fdt=system",
    "--disable-docs",
    "--disable-werror",
];

/// The QEMU the L1 runs under: the program and the arguments it needs before the rest.
#[derive(Debug, Clone)]
pub struct LabQemu {
    /// The `qemu-system-x86_64` to run.
    pub program: PathBuf,
    /// `-L <data dir>` for a QEMU whose compiled-in data directory lacks the firmware.
    pub args: Vec<String>,
    /// What it is, for the lab's log line.
    pub name: &'static str,
}

/// Which emulator `HUSK_LAB_QEMU` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Patched,
    Debian,
    Backports,
}

fn choice(value: Option<String>) -> Result<Choice> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(Choice::Debian),
        Some("patched") => Ok(Choice::Patched),
        Some("backports") => Ok(Choice::Backports),
        Some(other) => bail!(
            "{HUSK_LAB_QEMU_ENV}={other:?}: it takes `patched` (Debian's QEMU rebuilt with the \
             lab's SVM patch), `backports` (QEMU 10 from bookworm-backports), or nothing (the \
             installed QEMU)"
        ),
    }
}

/// The lab's QEMU, as `HUSK_LAB_QEMU` asks; builds the patched one first if it is asked for
/// and missing.
pub fn qemu() -> Result<LabQemu> {
    match choice(std::env::var(HUSK_LAB_QEMU_ENV).ok())? {
        Choice::Debian => Ok(LabQemu {
            program: PathBuf::from("qemu-system-x86_64"),
            args: Vec::new(),
            name: "Debian's QEMU",
        }),
        Choice::Backports => backports::qemu(),
        Choice::Patched => Ok(LabQemu {
            program: patched()?,
            args: vec!["-L".into(), INSTALLED_DATA_DIR.into()],
            name: "Debian's QEMU with the lab's SVM patch",
        }),
    }
}

/// The cache key of a build from this source version, patch and compiler.
fn cache_key(source_version: &str, patch: &str, gcc: &str) -> CacheKey {
    let mut key = CacheKey::new(RECIPE);
    key.add("source-version", source_version.as_bytes())
        .add("patch", patch.as_bytes())
        .add("configure", CONFIGURE_ARGS.join(" ").as_bytes())
        .add("gcc", gcc.as_bytes());
    key
}

/// The patched `qemu-system-x86_64`, built first if the cache lacks it.
fn patched() -> Result<PathBuf> {
    let version = output_text(Command::new("dpkg-query").args([
        "-W",
        "-f=${source:Version}",
        BINARY_PACKAGE,
    ]))
    .with_context(|| format!("{BINARY_PACKAGE} is not installed (run `cargo xtask setup`)"))?
    .trim()
    .to_string();
    let gcc = crate::guest::kernel::gcc_version()?;
    let key = cache_key(&version, PATCH, &gcc);
    let root = cache::cache_dir()?.join("lab").join("qemu");
    let program = root.join(key.short()).join("qemu-system-x86_64");
    if program.is_file() {
        return Ok(program);
    }
    let _lock = cache::lock(&root)?;
    if program.is_file() {
        return Ok(program); // another xtask built it while we waited
    }
    crate::setup::ensure_packages(BUILD_PACKAGES)?;
    let started = Instant::now();
    let build = root.join("build");
    if build.exists() {
        fs::remove_dir_all(&build).with_context(|| format!("Cannot remove {}", build.display()))?;
    }
    fs::create_dir_all(&build)?;
    let log = root.join("build.log");
    fs::write(&log, "")?;
    warn!(
        "lab: BUILDING the lab's QEMU ({BINARY_PACKAGE} {version} with the lab's SVM patch, key \
         {}); about 5 minutes on 2 cores, once; log: {}",
        key.short(),
        log.display()
    );
    let tree = unpack_source(&version, &build)?;
    apply_patches(&tree, &log)?;
    let out = tree.join("build");
    fs::create_dir_all(&out)?;
    run_logged(
        Command::new(tree.join("configure"))
            .args(CONFIGURE_ARGS)
            .current_dir(&out),
        &log,
    )?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    run_logged(
        Command::new("ninja")
            .arg(format!("-j{jobs}"))
            .arg("qemu-system-x86_64")
            .current_dir(&out),
        &log,
    )?;
    cache::copy_atomically(&out.join("qemu-system-x86_64"), &program)?;
    fs::remove_dir_all(&build).with_context(|| format!("Cannot remove {}", build.display()))?;
    info!(
        "lab: built the lab's QEMU in {:.0?}: {}",
        started.elapsed(),
        program.display()
    );
    Ok(program)
}

/// Downloads the source package `qemu` at `version` (or, when the archive no longer has it,
/// the newest bookworm has) and unpacks it into `build`; returns the source tree.
fn unpack_source(version: &str, build: &Path) -> Result<PathBuf> {
    let apt = Apt::new("qemu-source", SOURCES)?;
    let downloads = apt.downloads();
    for entry in fs::read_dir(&downloads)? {
        let path = entry?.path();
        if path.is_file() {
            fs::remove_file(&path)?;
        }
    }
    let exact = format!("qemu={version}");
    if let Err(e) = apt.output("apt-get", &["source", "--download-only", &exact]) {
        warn!("lab: {exact} is not in the archive ({e:#}); building bookworm's newest QEMU source");
        apt.output("apt-get", &["source", "--download-only", "qemu"])?;
    }
    let files: Vec<PathBuf> = fs::read_dir(&downloads)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let find = |suffix: &str| -> Result<PathBuf> {
        files
            .iter()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("qemu_") && n.contains(suffix))
            })
            .cloned()
            .with_context(|| {
                format!(
                    "apt-get source qemu left no *{suffix}* in {}",
                    downloads.display()
                )
            })
    };
    let orig = find(".orig.tar.")?;
    let debian = find(".debian.tar.")?;
    output_text(
        Command::new("tar")
            .arg("-xf")
            .arg(&orig)
            .arg("-C")
            .arg(build),
    )?;
    let tree = single_dir(build)?;
    output_text(
        Command::new("tar")
            .arg("-xf")
            .arg(&debian)
            .arg("-C")
            .arg(&tree),
    )?;
    Ok(tree)
}

/// The one directory an upstream tarball unpacked to.
fn single_dir(dir: &Path) -> Result<PathBuf> {
    let dirs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match dirs.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "{} holds {} directories after unpacking, not one",
            dir.display(),
            dirs.len()
        ),
    }
}

/// The patch files `debian/patches/series` names, in order.
fn series(text: &str) -> Vec<&str> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// Applies Debian's patches in series order, then ours; any that does not apply is an error.
fn apply_patches(tree: &Path, log: &Path) -> Result<()> {
    let patches = tree.join("debian/patches");
    let list = fs::read_to_string(patches.join("series"))
        .with_context(|| format!("Cannot read {}", patches.join("series").display()))?;
    let mut files: Vec<PathBuf> = series(&list).iter().map(|p| patches.join(p)).collect();
    let ours = tree.join("husk-svm-event-injection.patch");
    fs::write(&ours, PATCH)?;
    files.push(ours);
    for file in &files {
        run_logged(
            Command::new("patch")
                .args(["-p1", "--forward", "--no-backup-if-mismatch", "-i"])
                .arg(file)
                .current_dir(tree),
            log,
        )
        .with_context(|| format!("{} does not apply", file.display()))?;
    }
    info!("lab: applied {} patches to QEMU's source", files.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_knob_takes_patched_backports_or_nothing() {
        assert_eq!(choice(None).unwrap(), Choice::Debian);
        assert_eq!(choice(Some(" ".into())).unwrap(), Choice::Debian);
        assert_eq!(choice(Some("patched".into())).unwrap(), Choice::Patched);
        assert_eq!(choice(Some("backports".into())).unwrap(), Choice::Backports);
        let err = choice(Some("10.0".into())).unwrap_err().to_string();
        assert!(err.contains("HUSK_LAB_QEMU=\"10.0\""), "{err}");
        assert!(err.contains("`patched`"), "{err}");
    }

    #[test]
    fn the_series_file_lists_patches_in_order_without_comments() {
        let text = "# upstream stable\nv7.2.1.diff\n\nv7.2.2.diff -p1\n  # gone.diff\nspelling.diff # ok\n";
        assert_eq!(
            series(text),
            ["v7.2.1.diff", "v7.2.2.diff", "spelling.diff"]
        );
    }

    #[test]
    fn the_patch_clears_exception_index_once_the_injected_interrupt_is_delivered() {
        let delivery = PATCH
            .find(" do_interrupt_x86_hardirq(env, vector, 1);")
            .expect("the INTR injection's delivery is in the patch's context");
        let fix = PATCH
            .find("+                cs->exception_index = -1;")
            .expect("the patch clears exception_index");
        assert!(delivery < fix);
        // Every report the patch adds says where it comes from.
        let reports: Vec<&str> = PATCH
            .lines()
            .filter(|l| l.starts_with('+') && l.contains("fprintf(stderr"))
            .collect();
        assert_eq!(reports.len(), 6);
        assert!(
            reports.iter().all(|l| l.contains("\"husk-qemu: ")),
            "{reports:?}"
        );
        // The line the monitor parses, in the format it parses.
        let dump = PATCH
            .lines()
            .find(|l| l.starts_with('+') && l.contains("\"SVM GIF="))
            .expect("info registers reports GIF");
        assert!(dump.contains("SVM GIF=%d VGIF=%d GM=%d INT_CTL=%08x IRQ_REQ=%08x"));
    }

    #[test]
    fn the_patch_makes_clearing_ignne_atomic_and_keeps_qemus_code_behind_a_knob() {
        let clear = PATCH
            .find(" void cpu_clear_ignne(void)")
            .expect("cpu_clear_ignne is in the patch's context");
        let atomic = PATCH
            .find("+            qatomic_and(&env->hflags2, ~HF2_IGNNE_MASK);")
            .expect("the patch clears IGNNE atomically");
        assert!(clear < atomic);
        assert!(PATCH.contains("HUSK_QEMU_IGNNE_FIX"));
    }

    #[test]
    fn the_key_follows_the_source_version_the_patch_and_the_compiler() {
        let base = cache_key("1:7.2+dfsg-7+deb12u18", PATCH, "gcc 12.2.0").hex();
        assert_ne!(
            base,
            cache_key("1:7.2+dfsg-7+deb12u19", PATCH, "gcc 12.2.0").hex()
        );
        assert_ne!(
            base,
            cache_key("1:7.2+dfsg-7+deb12u18", "", "gcc 12.2.0").hex()
        );
        assert_ne!(
            base,
            cache_key("1:7.2+dfsg-7+deb12u18", PATCH, "gcc 12.3.0").hex()
        );
    }
}
