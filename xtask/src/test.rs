//! `cargo xtask test`: the whole test suite, as CI runs it (`.ci/run`).
//!
//! Steps, each fatal on failure: setup (apt packages, musl target); `cargo fmt --check`;
//! `cargo clippy --all-targets -D warnings`; the host tests of every crate (unit tests and
//! tests that need no KVM); the release husk-vmm and the guest artifacts; then the component
//! tests of `husk-integration`, which boot real guests. Those run where a KVM boots Linux:
//! directly on hardware KVM, else inside the lab (decided by a probe boot, and printed). A
//! missing capability is a failure, never a skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{self, KvmMode};
use crate::{guest, setup};

/// Arguments of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Skip fmt and clippy (for quick local iterations; CI never skips them).
    #[arg(long)]
    pub no_lint: bool,
    /// Only run component tests whose name contains this filter.
    #[arg(long)]
    pub filter: Option<String>,
}

/// The crate holding the component and end-to-end tests.
const INTEGRATION_CRATE: &str = "husk-integration";
/// Limit for one component test binary in the lab.
const LAB_TEST_TIMEOUT: Duration = Duration::from_secs(30 * 60);

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
    let parts = step("build husk-vmm (release) and the guest", build_parts)?;
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
    for bin in &binaries {
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let code = step(&format!("component tests: {name}"), || {
            run_component_binary(bin, &parts, mode, args.filter.as_deref())
        })?;
        if code != 0 {
            failed.push(format!("{name} (exit status {code})"));
        }
    }
    if !failed.is_empty() {
        bail!("component tests failed: {}", failed.join(", "));
    }
    eprintln!(
        "==> all tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The real parts the component tests use.
#[derive(Debug, Clone)]
pub struct Parts {
    /// The release husk-vmm binary.
    pub vmm: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initrd: PathBuf,
}

impl Parts {
    /// The environment the tests read the parts from.
    pub fn env(&self, mode: KvmMode) -> Vec<(String, String)> {
        vec![
            ("HUSK_VMM".into(), self.vmm.display().to_string()),
            ("HUSK_KERNEL".into(), self.kernel.display().to_string()),
            ("HUSK_INITRD".into(), self.initrd.display().to_string()),
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

/// Builds the release husk-vmm and the guest artifacts.
pub fn build_parts() -> Result<Parts> {
    let root = crate::cache::workspace_root();
    cargo(&root, &["build", "--release", "-p", "husk-vmm"])?;
    let vmm = crate::cache::target_dir().join("release/husk-vmm");
    let g = guest::build()?;
    Ok(Parts {
        vmm,
        kernel: g.vmlinux,
        initrd: g.initramfs,
    })
}

fn run_component_binary(
    bin: &Path,
    parts: &Parts,
    mode: KvmMode,
    filter: Option<&str>,
) -> Result<i32> {
    let mut argv = vec![bin.display().to_string()];
    if let Some(f) = filter {
        argv.push(f.to_string());
    }
    // One guest at a time: the lab has two emulated CPUs, and parallel boots there make the
    // emulated SVM's flakes likelier without saving time.
    argv.push("--test-threads=1".into());
    let env = parts.env(mode);
    match mode {
        KvmMode::Direct => {
            let status = Command::new(&argv[0])
                .args(&argv[1..])
                .envs(env)
                .status()
                .with_context(|| format!("Cannot run {}", bin.display()))?;
            Ok(status.code().unwrap_or(128))
        }
        KvmMode::Lab => {
            let outcome = lab::run(&argv, &env, LAB_TEST_TIMEOUT)?;
            eprintln!(
                "lab: /dev/kvm ready after {:.1} s, run took {:.1} s, L1 boot retries: {}",
                outcome.kvm_ready.as_secs_f64(),
                outcome.total.as_secs_f64(),
                outcome.boot_retries
            );
            Ok(outcome.exit_code)
        }
    }
}

/// Builds the integration crate's test binaries and returns their paths.
fn component_test_binaries(root: &Path) -> Result<Vec<PathBuf>> {
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
