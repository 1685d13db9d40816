//! `cargo xtask demo`: the README's first command. Sets the machine up, builds husk, starts a
//! private containerd (Debian's, with its own root, state and sockets in a temp dir, so the
//! machine's own containerd is not touched), imports the busybox image the tests use, and runs
//!
//! ```text
//! ctr run --runtime io.containerd.husk.v2 --rm <image> demo uname -r
//! ```
//!
//! printing the container's output (the guest kernel's release) next to the host's. Where this
//! host's `/dev/kvm` cannot boot Linux all of that runs inside the lab, where the "host" is the
//! lab's L1 kernel. Nothing is left behind: the fixture checks for leftover pods on the way out.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_integration::containerd::{Containerd, Runtime};

use crate::lab::{self, KvmMode};
use crate::test::{build_parts, step};

/// Arguments of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run the demo here, assuming a KVM that boots Linux (used inside the lab).
    #[arg(long, hide = true)]
    pub inner: bool,
}

/// The container id of the demo.
const DEMO_ID: &str = "demo";
/// How long the whole demo may take in the lab.
const LAB_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the demo's pod may take to disappear.
const CLEANUP: Duration = Duration::from_secs(60);

/// Runs the demo.
pub fn run(args: &Args) -> Result<()> {
    if args.inner {
        return inner();
    }
    crate::setup::ensure()?;
    let parts = step(
        "build husk-vmm and the shim (release), the guest and the busybox image",
        build_parts,
    )?;
    let mode = lab::kvm_mode(&parts.vmm, &parts.kernel, &parts.initrd)?;
    let argv = vec![
        std::env::current_exe()?.display().to_string(),
        "demo".into(),
        "--inner".into(),
    ];
    let code = match mode {
        KvmMode::Direct => {
            eprintln!("demo: this host's KVM boots Linux; running containerd here");
            Command::new(&argv[0])
                .args(&argv[1..])
                .envs(parts.env(mode))
                .status()
                .context("Cannot run the demo")?
                .code()
                .unwrap_or(128)
        }
        KvmMode::Lab => {
            eprintln!(
                "demo: this host's /dev/kvm cannot boot Linux; running containerd and the pod \
                 inside the lab (a QEMU-TCG VM with nested KVM), so it takes a while"
            );
            lab::run(&argv, &parts.env(mode), LAB_TIMEOUT)?.exit_code
        }
    };
    if code != 0 {
        bail!("the demo failed (exit status {code})");
    }
    Ok(())
}

/// The demo proper, where a KVM boots Linux.
fn inner() -> Result<()> {
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("Cannot read the host's kernel release")?
        .trim()
        .to_string();
    let c = Containerd::start_with(Runtime::Husk);
    let mut args = c.run_args(&["--rm"], DEMO_ID);
    args.extend(["uname", "-r"]);
    println!(
        "$ ctr --address {} --namespace husk-test {}",
        c.address().display(),
        args.join(" ")
    );
    let started = Instant::now();
    let out = c.ctr(&args);
    let took = started.elapsed();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "ctr run failed ({}): {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            c.log_tail()
        );
    }
    let guest_release = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if guest_release.is_empty() || guest_release == host_release {
        bail!(
            "the container reported kernel {guest_release:?}, the host runs {host_release:?}: \
             the container did not run in a husk VM"
        );
    }
    c.assert_no_leftovers(CLEANUP);
    println!(
        "husk: the container ran in its own VM (guest kernel {guest_release}, host kernel \
         {host_release}) in {:.1} s, and left nothing behind",
        took.as_secs_f64()
    );
    Ok(())
}
