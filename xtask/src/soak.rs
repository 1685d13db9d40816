//! `cargo xtask soak <workload> --runs N`: runs one workload again and again and ends with
//! `N passed, M failed`, one line per failure before it.
//!
//! Workloads today: `vsock-stress`, the host-only stress of husk-vmm's vsock device
//! (`vmm/src/devices/virtio/vsock/stress_tests.rs`), a new seed each run. It needs no KVM.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Arguments of `cargo xtask soak`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to run: `vsock-stress`.
    pub workload: String,
    /// How many runs.
    #[arg(long, default_value_t = 10)]
    pub runs: u32,
    /// Packets per run (`vsock-stress`), both directions and both notification modes together.
    #[arg(long, default_value_t = 1_000_000)]
    pub packets: u64,
}

/// Runs the soak; fails if any run failed.
pub fn run(args: &Args) -> Result<()> {
    if args.workload != "vsock-stress" {
        bail!(
            "Unknown soak workload {:?} (known: vsock-stress)",
            args.workload
        );
    }
    let mut failures = Vec::new();
    for run in 0..args.runs {
        let seed = 0x5eed_0000_u64 + u64::from(run) * 0x1_0000;
        println!("soak: run {}/{} seed {seed:#x}", run + 1, args.runs);
        let status = Command::new(env!("CARGO"))
            .args([
                "test",
                "--release",
                "-p",
                "husk-vmm",
                "--lib",
                "stress_tests",
            ])
            .args(["--", "--nocapture", "--test-threads", "2"])
            .env("HUSK_VSOCK_STRESS_PACKETS", args.packets.to_string())
            .env("HUSK_VSOCK_STRESS_SEED", seed.to_string())
            .status()
            .context("Cannot run cargo test")?;
        if !status.success() {
            failures.push(format!(
                "soak failure: run {} seed {seed:#x}: assertion failed ({status})",
                run + 1
            ));
        }
    }
    for f in &failures {
        println!("{f}");
    }
    let failed = failures.len() as u32;
    println!("{} passed, {failed} failed", args.runs - failed);
    if failed > 0 {
        bail!("{failed} of {} soak runs failed", args.runs);
    }
    Ok(())
}
