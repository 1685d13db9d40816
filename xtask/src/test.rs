//! `cargo xtask test`: the whole test suite, as CI runs it (`.ci/run`).
//!
//! Steps, each fatal on failure: setup (apt packages, musl target); `cargo fmt --check`;
//! `cargo clippy --all-targets -D warnings`; the host tests of every crate (unit tests and
//! tests that need no KVM); a short run of every fuzz target (`fuzz`); the release husk-vmm and the guest artifacts; then the component
//! tests of `husk-integration`, which boot real guests, and its end-to-end tests, which drive
//! a real containerd with `ctr` (`HUSK_SHIM`, `HUSK_TEST_IMAGE`; with
//! `HUSK_TEST_RUNTIME=io.containerd.runc.v2` they run on runc, to check the harness; the CRI
//! suite runs on both, every time). Those
//! run where a KVM boots Linux: directly on hardware KVM, else inside the lab (decided by a
//! probe boot, and printed). A missing capability is a failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use husk_integration::containerd::{RUNC_RUNTIME, RUNTIME_ENV};
use husk_integration::lab_retry::SuiteRetries;

use crate::lab::{self, KvmMode};
use crate::{guest, setup};

/// Arguments of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Skip fmt and clippy (for quick local iterations; CI never skips them).
    #[arg(long)]
    pub no_lint: bool,
    /// Only run component tests whose name contains this filter; repeat it to run the tests
    /// matching any of them.
    #[arg(long)]
    pub filter: Vec<String>,
}

/// The crate holding the component and end-to-end tests.
const INTEGRATION_CRATE: &str = "husk-integration";
/// The variable naming the busybox root file system (a host directory) for the tests.
pub const TEST_ROOTFS_ENV: &str = "HUSK_TEST_ROOTFS";
/// Limit for one component test binary in the lab. The slowest (the containerd end-to-end
/// tests) took 763–849 s there in earlier fresh clones, and 15 min cut one off (session 28),
/// so the limit is 20 min. A wedged L1 goes silent and is caught by
/// [`LAB_SILENCE_LIMIT`] first; a binary that keeps printing past this limit is cut off and
/// not retried (that hang might be ours), so it cannot eat CI's 90 minutes.
const LAB_TEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// A lab test binary that prints nothing for this long has a wedged L1 under it, not a hang
/// of ours: every wait in the tests gives up (and prints) within 4 min (`CTR_TIMEOUT`, the
/// longest), so only a wedged L1 keeps a test binary silent for 6. It counts as the L1
/// dying (`husk_integration::lab_retry` decides on a re-run: never after the binary printed
/// a failure, whose cleanup may well be silent that long); the lab prints the L1's vCPU
/// states every 2 min of silence and checks this limit at those reports.
pub const LAB_SILENCE_LIMIT: Duration = Duration::from_secs(6 * 60);

/// Runs everything.
pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    setup::ensure()?;
    let root = crate::cache::workspace_root();
    if std::env::var("CI").is_ok_and(|v| v == "true") && args.no_lint {
        bail!("--no-lint is not allowed in CI");
    }
    if !args.no_lint {
        step("cargo fmt --check", || {
            cargo(&root, &["fmt", "--all", "--", "--check"])
        })?;
        step("cargo clippy", || {
            cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        })?;
    }
    step("host tests (unit tests and tests without KVM)", || {
        cargo(
            &root,
            &["test", "--workspace", "--exclude", INTEGRATION_CRATE],
        )?;
        cargo(&root, &["test", "-p", INTEGRATION_CRATE, "--lib"])
    })?;
    step(
        &format!(
            "fuzz smoke ({} s per target, seed corpus first)",
            crate::fuzz::SMOKE_SECONDS
        ),
        crate::fuzz::smoke,
    )?;
    let parts = step("build husk-vmm (release) and the guest", build_parts)?;
    let test_rootfs = step("build the busybox rootfs of the container tests", || {
        guest::busybox_rootfs()
    })?;
    let binaries = step("build the component tests", || {
        component_test_binaries(&root)
    })?;
    let mode = lab::kvm_mode(&parts.vmm, &parts.kernel, &parts.initrd)?;
    eprintln!(
        "==> component tests run {}",
        match mode {
            KvmMode::Direct => "directly on this host's KVM",
            KvmMode::Lab => "inside the lab (this host's /dev/kvm does not boot Linux)",
        }
    );
    let mut failed = Vec::new();
    let mut retries = SuiteRetries::default();
    for (bin, runtime) in runs(&binaries) {
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match runtime {
            Some(runtime) => format!("{name} on {runtime}"),
            None => name,
        };
        let run = || {
            step(&format!("component tests: {name}"), || {
                let mut env = parts.env(mode);
                env.push((TEST_ROOTFS_ENV.into(), test_rootfs.display().to_string()));
                if let Some(runtime) = runtime {
                    env.push((RUNTIME_ENV.into(), runtime.into()));
                }
                let ran = run_component_binary(bin, env, mode, &args.filter)?;
                if ran.code != 0 {
                    return Err(BinaryFailed(ran).into());
                }
                Ok(ran)
            })
        };
        let ran = loop {
            match run() {
                Err(e) => match e.chain().find_map(|c| c.downcast_ref::<lab::L1Died>()) {
                    Some(died) => {
                        retries.add(0, died.seen.guest_retries);
                        if !retries.rerun_after_l1_death(
                            &name,
                            &died.why,
                            died.seen.failure_printed,
                        ) {
                            break Err(e);
                        }
                    }
                    None => break Err(e),
                },
                Ok(ran) => break Ok(ran),
            }
        };
        match ran {
            Ok(ran) => retries.add(ran.l1_boot_retries, ran.seen.guest_retries),
            Err(e) => match e.chain().find_map(|c| c.downcast_ref::<BinaryFailed>()) {
                Some(BinaryFailed(ran)) => {
                    retries.add(ran.l1_boot_retries, ran.seen.guest_retries);
                    failed.push(format!("{name} (exit status {})", ran.code));
                }
                None => failed.push(format!("{name} ({e:#})")),
            },
        }
    }
    if !failed.is_empty() {
        bail!(
            "component tests failed: {}; {}",
            failed.join(", "),
            retries.summary()
        );
    }
    eprintln!(
        "==> all tests passed in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        retries.summary()
    );
    Ok(())
}

/// The real parts the component tests use.
#[derive(Debug, Clone, Default)]
pub struct Parts {
    /// The release husk-vmm binary.
    pub vmm: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initrd: PathBuf,
    /// virtiofsd, installed by setup.
    pub virtiofsd: PathBuf,
    /// A test-only initramfs whose `/init` is `husk-fs-probe` (virtio-fs component tests).
    pub fs_probe_initrd: PathBuf,
    /// The release `containerd-shim-husk-v2` (end-to-end tests).
    pub shim: PathBuf,
    /// The busybox OCI image archive the end-to-end tests import (`crate::image`).
    pub test_image: PathBuf,
}

impl Parts {
    /// The environment the tests read the parts from.
    pub fn env(&self, mode: KvmMode) -> Vec<(String, String)> {
        vec![
            ("HUSK_VMM".into(), self.vmm.display().to_string()),
            ("HUSK_KERNEL".into(), self.kernel.display().to_string()),
            ("HUSK_INITRD".into(), self.initrd.display().to_string()),
            (
                "HUSK_VIRTIOFSD".into(),
                self.virtiofsd.display().to_string(),
            ),
            (
                "HUSK_FS_PROBE_INITRD".into(),
                self.fs_probe_initrd.display().to_string(),
            ),
            (
                "HUSK_FS_PROBE".into(),
                fs_probe_binary().display().to_string(),
            ),
            ("HUSK_SHIM".into(), self.shim.display().to_string()),
            (
                crate::image::TEST_IMAGE_ENV.into(),
                self.test_image.display().to_string(),
            ),
            (
                lab::HUSK_KVM_MODE_ENV.into(),
                match mode {
                    KvmMode::Direct => "direct".into(),
                    KvmMode::Lab => "lab".into(),
                },
            ),
        ]
    }
}

/// The shim binary containerd starts for `io.containerd.husk.v2`.
pub const SHIM_BINARY: &str = "containerd-shim-husk-v2";

/// Builds the release husk-vmm and shim, the guest artifacts and the test image.
pub fn build_parts() -> Result<Parts> {
    let root = crate::cache::workspace_root();
    cargo(&root, &["build", "--release", "-p", "husk-vmm"])?;
    cargo(
        &root,
        &[
            "build",
            "--release",
            "-p",
            "husk-shim",
            "--bin",
            SHIM_BINARY,
        ],
    )?;
    let release = crate::cache::target_dir().join("release");
    let g = guest::build()?;
    Ok(Parts {
        vmm: release.join("husk-vmm"),
        kernel: g.vmlinux,
        initrd: g.initramfs,
        virtiofsd: setup::virtiofsd_path()?,
        fs_probe_initrd: build_fs_probe_initrd(&root)?,
        shim: release.join(SHIM_BINARY),
        test_image: crate::image::build_test_image()?,
    })
}

/// The test-only package packed as `/init` for the virtio-fs component tests.
const FS_PROBE_PACKAGE: &str = "husk-fs-probe";

/// Builds `husk-fs-probe` statically for the guest and packs it as an initramfs.
pub fn build_fs_probe_initrd(root: &Path) -> Result<PathBuf> {
    cargo(
        root,
        &[
            "build",
            "-p",
            FS_PROBE_PACKAGE,
            "--profile",
            guest::GUEST_PROFILE,
            "--target",
            setup::MUSL_TARGET,
        ],
    )?;
    guest::pack_init(&fs_probe_binary())
}

/// Where [`build_fs_probe_initrd`] leaves the static `husk-fs-probe`.
pub fn fs_probe_binary() -> PathBuf {
    crate::cache::target_dir()
        .join(setup::MUSL_TARGET)
        .join(guest::GUEST_PROFILE)
        .join(FS_PROBE_PACKAGE)
}

fn run_component_binary(
    bin: &Path,
    env: Vec<(String, String)>,
    mode: KvmMode,
    filters: &[String],
) -> Result<lab::Ran> {
    let mut argv = vec![bin.display().to_string()];
    // libtest runs the tests whose names contain any of its filters.
    argv.extend(filters.iter().cloned());
    // One guest at a time: the lab has two emulated CPUs, and parallel boots there make the
    // emulated SVM's flakes likelier without saving time.
    argv.push("--test-threads=1".into());
    // Live output: a test's logs (containerd's, the guest console's) show as it fails, even
    // when the lab dies before libtest's summary.
    argv.push("--nocapture".into());
    lab::run_where_kvm_boots(&argv, &env, mode, LAB_TEST_TIMEOUT, Some(LAB_SILENCE_LIMIT))
}

/// The test binary that runs again on runc (the CRI suite: its acceptance is that it passes
/// on both runtimes, which also proves its harness).
const ALSO_ON_RUNC: &str = "cri-";

/// Every binary once on husk, then the CRI suite again on runc.
fn runs(binaries: &[PathBuf]) -> Vec<(&PathBuf, Option<&'static str>)> {
    let mut runs: Vec<_> = binaries.iter().map(|b| (b, None)).collect();
    runs.extend(
        binaries
            .iter()
            .filter(|b| {
                b.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(ALSO_ON_RUNC))
            })
            .map(|b| (b, Some(RUNC_RUNTIME))),
    );
    runs
}

/// Builds the integration crate's test binaries and returns their paths.
pub fn component_test_binaries(root: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "test",
            "-p",
            INTEGRATION_CRATE,
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("Cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the component tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test_target = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if msg["reason"] == "compiler-artifact" && is_test_target {
            if let Some(exe) = msg["executable"].as_str() {
                bins.push(PathBuf::from(exe));
            }
        }
    }
    if bins.is_empty() {
        bail!("{INTEGRATION_CRATE} has no test binaries: nothing would be tested");
    }
    bins.sort();
    Ok(bins)
}

/// Runs `cargo` with `args` in `root`, failing on a non-zero exit.
pub fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(args)
        .status()
        .with_context(|| format!("Cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs one named step, printing its name and duration.
pub fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("==> {name}");
    let t = Instant::now();
    let r = f().with_context(|| format!("step failed: {name}"));
    eprintln!(
        "<== {name}: {} in {:.1} s",
        if r.is_ok() { "ok" } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );
    r
}

/// A test binary that exited non-zero (its step reads FAILED; the suite goes on).
#[derive(Debug, thiserror::Error)]
#[error("the test binary exited with status {}", .0.code)]
struct BinaryFailed(lab::Ran);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cri_suite_runs_on_husk_and_again_on_runc() {
        let binaries: Vec<PathBuf> = ["boot-1a", "cri-2b", "containerd-3c"]
            .iter()
            .map(|n| PathBuf::from("/t/deps").join(n))
            .collect();
        let runs: Vec<_> = runs(&binaries)
            .into_iter()
            .map(|(b, r)| (b.file_name().unwrap().to_str().unwrap().to_owned(), r))
            .collect();
        assert_eq!(
            runs,
            [
                ("boot-1a".to_owned(), None),
                ("cri-2b".to_owned(), None),
                ("containerd-3c".to_owned(), None),
                ("cri-2b".to_owned(), Some(RUNC_RUNTIME)),
            ]
        );
    }
}
