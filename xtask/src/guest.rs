//! `cargo xtask guest`: builds the two guest artifacts husk-vmm boots, the kernel
//! (`vmlinux` with a PVH entry) and the initramfs (`/init` = static `husk-agent`).
//!
//! Both are cached under `$HUSK_CACHE` by content. The paths are printed on stdout as
//! `vmlinux=<path>` and `initramfs=<path>` lines (the contract in docs/contracts.md);
//! logs go to stderr. Other commands call [`build`] directly.

mod elf;
mod initramfs;
pub(crate) mod kernel;
mod testdata;

use std::path::PathBuf;

use anyhow::Result;

/// Arguments of `cargo xtask guest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build only the kernel (no agent, no initramfs).
    #[arg(long)]
    pub kernel_only: bool,
    /// Pack this static binary as /init instead of building husk-agent.
    #[arg(long, value_name = "PATH")]
    pub init: Option<PathBuf>,
}

/// Paths of the built guest artifacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestArtifacts {
    /// The uncompressed kernel ELF with a PVH entry note.
    pub vmlinux: PathBuf,
    /// The uncompressed newc initramfs.
    pub initramfs: PathBuf,
}

/// Builds (or finds in the cache) the kernel and an initramfs with the agent as `/init`.
pub fn build() -> Result<GuestArtifacts> {
    let vmlinux = kernel::build()?;
    let agent = initramfs::build_agent()?;
    let initramfs = initramfs::pack(&agent)?;
    Ok(GuestArtifacts { vmlinux, initramfs })
}

/// Builds (or finds in the cache) the busybox root file system of the container tests (see
/// `guest/testdata.rs`).
pub use testdata::busybox_rootfs;

/// Packs the static binary `init` as `/init` of a cached initramfs (what `--init PATH` does);
/// used for test-only guests such as `husk-fs-probe`.
pub fn pack_init(init: &std::path::Path) -> Result<PathBuf> {
    initramfs::pack(init)
}

pub use initramfs::GUEST_PROFILE;

/// Builds the guest kernel only.
pub fn build_kernel() -> Result<PathBuf> {
    kernel::build()
}

/// The `guest` subcommand: builds, then prints `vmlinux=` and `initramfs=` lines.
pub fn run(args: &Args) -> Result<()> {
    crate::setup::ensure()?;
    let vmlinux = kernel::build()?;
    let initramfs = if args.kernel_only {
        None
    } else {
        let init = match &args.init {
            Some(path) => path.clone(),
            None => initramfs::build_agent()?,
        };
        Some(initramfs::pack(&init)?)
    };
    println!("vmlinux={}", vmlinux.display());
    if let Some(initramfs) = initramfs {
        println!("initramfs={}", initramfs.display());
    }
    Ok(())
}
