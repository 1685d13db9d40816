//! `cargo xtask bench exec`: the round trip of exec'ing `true` into a running container
//! (host ExecProcess call → WaitProcess reply with the exit status), through the real agent
//! in a real guest with its rootfs on virtio-fs.
//!
//! The measuring program is the integration crate's `husk-bench-exec`, which boots the same
//! pod the component tests use; it runs in the lab where this host's KVM cannot boot Linux.
//!
//! `cargo xtask bench cri` runs the integration crate's `bench_cri` example the same way
//! (Kubernetes pods through containerd's CRI plugin, husk vs runc; see the example).

use std::time::Duration;

use anyhow::{bail, Result};

use crate::test::{cargo, step};

/// Arguments of `cargo xtask bench exec`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExecArgs {
    /// Execs measured (after two warm-up execs).
    #[arg(long, default_value_t = 20)]
    pub runs: u32,
}

/// `cargo xtask bench exec`.
pub fn run(args: &ExecArgs) -> Result<()> {
    in_lab(
        &["build", "--release", "--bin", "husk-bench-exec"],
        "release/husk-bench-exec",
        &[args.runs.to_string()],
        Vec::new(),
        Duration::from_secs(1800),
    )
}

/// Builds a program of husk-integration (`cargo <build> -p husk-integration`, found at
/// `<target>/<bin>`) and runs it with `args` and the component tests' environment plus `env`
/// where KVM boots Linux (the lab here).
fn in_lab(
    build: &[&str],
    bin: &str,
    args: &[String],
    env: Vec<(String, String)>,
    timeout: Duration,
) -> Result<()> {
    crate::setup::ensure()?;
    let root = crate::cache::workspace_root();
    let parts = step(
        "build husk-vmm (release) and the guest",
        crate::test::build_parts,
    )?;
    let rootfs = step("build the busybox rootfs", crate::guest::busybox_rootfs)?;
    let mut cargo_args = build.to_vec();
    cargo_args.extend(["-p", "husk-integration"]);
    step(&format!("build {bin}"), || cargo(&root, &cargo_args))?;
    let bin = crate::cache::target_dir().join(bin);
    let mode = crate::lab::kvm_mode(&parts.vmm, &parts.kernel, &parts.initrd)?;
    let mut all_env = parts.env(mode);
    all_env.push(("HUSK_TEST_ROOTFS".into(), rootfs.display().to_string()));
    all_env.extend(env);
    let mut argv = vec![bin.display().to_string()];
    argv.extend(args.iter().cloned());
    let code = crate::lab::run_where_kvm_boots(&argv, &all_env, mode, timeout, None)?.code;
    if code != 0 {
        bail!("the benchmark failed (exit status {code})");
    }
    Ok(())
}

/// Arguments of `cargo xtask bench cri`.
#[derive(Debug, Clone, clap::Args)]
pub struct CriArgs {
    /// Pods per runtime (interleaved).
    #[arg(long, default_value_t = 10)]
    pub runs: u32,
}

/// `cargo xtask bench cri`.
pub fn run_cri(args: &CriArgs) -> Result<()> {
    in_lab(
        &["build", "--example", "bench_cri"],
        "debug/examples/bench_cri",
        &[],
        vec![("BENCH_RUNS".into(), args.runs.to_string())],
        Duration::from_secs(3600),
    )
}
