//! `cargo xtask`: husk's build and test orchestration (see DESIGN.md).
//!
//! A thin dispatcher: each subcommand lives in its own module of the `xtask` library,
//! with its own `Args` and `run`.

use std::io::IsTerminal;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{bench, boot_check, demo, fuzz, guest, image, install, lab, setup, soak, test};

/// husk's build, lab, test and benchmark orchestration.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install missing apt packages and the musl Rust target (idempotent).
    Setup,
    /// Build the guest kernel and initramfs; prints `vmlinux=` and `initramfs=` lines.
    Guest(guest::Args),
    /// Build the busybox OCI image archive of the end-to-end tests; prints `image=` and `name=`.
    Image,
    /// Install husk (binaries, guest, /etc/husk/husk.toml) and print or merge the containerd
    /// runtime stanza for io.containerd.husk.v2.
    Install(install::Args),
    /// Run a command in the lab: an L1 Linux under QEMU TCG with a working /dev/kvm.
    Lab(lab::Args),
    /// Probe whether this host's /dev/kvm boots the guest: prints `direct` or `lab`.
    KvmMode(lab::probe::Args),
    /// Run the whole test suite (what CI runs).
    Test(test::Args),
    /// Boot the guest once and print `agent ready: version=… kernel=… boot_ms=…`.
    BootCheck(boot_check::Args),
    /// The README's first command: set up, build, and run a container in a husk VM through
    /// containerd (`ctr run --runtime io.containerd.husk.v2 --rm … uname -r`).
    Demo(demo::Args),
    /// Benchmarks (BENCHMARKS.md).
    Bench(bench::Args),
    /// Run one workload again and again: `soak vsock-stress|bulk|container-cycles|test:<name> --runs N`
    /// (ends `N passed, M failed`).
    Soak(soak::Args),
    /// Coverage-guided fuzzing of the guest-facing parsers (`fuzz/`), on the stable toolchain:
    /// `fuzz [TARGET...] [--seconds S | --runs N]` (30 s per target by default).
    Fuzz(fuzz::Args),
    /// Inside the lab's L1 only: hold one idle KVM VM for the run (see lab/hold_kvm.rs).
    #[command(hide = true)]
    LabHoldKvm,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XTASK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Guest(args) => guest::run(&args),
        Cmd::Image => image::run(),
        Cmd::Install(args) => install::run(&args),
        Cmd::Lab(args) => {
            let code = lab::run_command(&args)?;
            std::process::exit(code);
        }
        Cmd::KvmMode(args) => lab::probe::run_command(&args),
        Cmd::Test(args) => test::run(&args),
        Cmd::BootCheck(args) => boot_check::run(&args),
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Bench(args) => bench::run(&args),
        Cmd::Soak(args) => soak::run(&args),
        Cmd::Fuzz(args) => fuzz::run(&args),
        Cmd::LabHoldKvm => lab::hold_kvm::run(),
    }
}
