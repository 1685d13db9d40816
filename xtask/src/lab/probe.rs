//! Decides whether tests can use this host's `/dev/kvm` directly or need the lab.
//!
//! A real-mode KVM_RUN smoke passes on PVM too, so the only honest probe is the real
//! thing: boot our guest with husk-vmm and see whether its agent announces ready
//! (husk-vmm logs `guest ready boot_ms=<ms>` on stderr when the agent writes `0x01` to
//! the status port, docs/contracts.md). On PVM the boot dies within a second or two with
//! a KVM internal error; on hardware KVM the agent is ready in well under a second.
//! `HUSK_KVM_MODE=direct|lab` skips the probe.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use husk_shim::vmm::{Console, VmmCommand};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::info;

/// Arguments of `cargo xtask kvm-mode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// husk-vmm binary (default: build `husk-vmm --release`).
    #[arg(long, value_name = "PATH")]
    pub vmm: Option<PathBuf>,
    /// Guest kernel (default: `cargo xtask guest`'s).
    #[arg(long, value_name = "PATH", requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (default: `cargo xtask guest`'s).
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
}

/// `cargo xtask kvm-mode`: prints `direct` or `lab`.
pub fn run_command(args: &Args) -> Result<()> {
    crate::setup::ensure()?;
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => {
            let guest = crate::guest::build()?;
            (guest.vmlinux, guest.initramfs)
        }
    };
    let vmm = match &args.vmm {
        Some(vmm) => vmm.clone(),
        None => build_vmm()?,
    };
    let mode = kvm_mode(&vmm, &kernel, &initrd)?;
    println!(
        "{}",
        if mode == KvmMode::Direct {
            "direct"
        } else {
            "lab"
        }
    );
    Ok(())
}

/// Builds `husk-vmm` in release mode and returns its path.
pub fn build_vmm() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(crate::cache::workspace_root())
        .args(["build", "-p", "husk-vmm", "--release"])
        .status()
        .context("Cannot run cargo")?;
    if !status.success() {
        bail!("Building husk-vmm failed ({status})");
    }
    Ok(crate::cache::target_dir().join("release").join("husk-vmm"))
}

/// Forces the mode: `direct` or `lab`.
pub const HUSK_KVM_MODE_ENV: &str = "HUSK_KVM_MODE";
/// How long the probe guest may take to announce ready on a usable KVM (there it takes
/// well under a second; on PVM the guest dies after 1–20 s, or hangs).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The stderr line husk-vmm prints when the agent announced ready.
const READY_PREFIX: &str = "guest ready boot_ms=";

/// Where KVM guests run for tests, benchmarks and demos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmMode {
    /// This host's `/dev/kvm` boots Linux.
    Direct,
    /// Only the lab's nested KVM boots Linux.
    Lab,
}

/// The mode from `HUSK_KVM_MODE`; else `Direct` inside the lab; else the cached result
/// of [`probe_host_kvm`] for this host boot and these exact binaries.
pub fn kvm_mode(vmm: &Path, kernel: &Path, initrd: &Path) -> Result<KvmMode> {
    match std::env::var(HUSK_KVM_MODE_ENV).ok().as_deref() {
        Some("direct") => return Ok(KvmMode::Direct),
        Some("lab") => return Ok(KvmMode::Lab),
        Some("") | None => {}
        Some(other) => bail!("{HUSK_KVM_MODE_ENV}={other:?}: expected `direct` or `lab`"),
    }
    if std::env::var(super::HUSK_IN_LAB_ENV).is_ok_and(|v| v == "1") {
        return Ok(KvmMode::Direct); // the lab exists to provide exactly this
    }
    let mut key = crate::cache::CacheKey::new("kvm-probe-v1");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    key.add("boot-id", boot_id.trim().as_bytes());
    // Identify the binaries by path, size and mtime: hashing a 100 MB debug husk-vmm
    // would cost seconds, and a rebuilt binary gets a new mtime anyway.
    for path in [vmm, kernel, initrd] {
        let meta =
            std::fs::metadata(path).with_context(|| format!("Cannot read {}", path.display()))?;
        let mtime = meta
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let id = format!("{}:{}:{mtime}", path.display(), meta.len());
        key.add("file", id.as_bytes());
    }
    let record = crate::cache::cache_dir()?
        .join("kvm-probe")
        .join(key.short());
    match std::fs::read_to_string(&record).ok().as_deref() {
        Some("direct") => return Ok(KvmMode::Direct),
        Some("lab") => return Ok(KvmMode::Lab),
        _ => {}
    }
    let mode = probe_host_kvm(vmm, kernel, initrd)?;
    let text = if mode == KvmMode::Direct {
        "direct"
    } else {
        "lab"
    };
    crate::cache::write_atomically(&record, text.as_bytes(), 0o644)?;
    Ok(mode)
}

/// The husk-vmm command line of the probe boot: one vCPU, 256 MiB, console off.
pub fn probe_command(vmm: &Path, kernel: &Path, initrd: &Path, vsock_uds: &Path) -> Command {
    VmmCommand::new(vmm, kernel, vsock_uds)
        .initrd(initrd)
        .vcpus(1)
        .mem_mib(256)
        .console(Console::Off)
        .command()
}

/// Boots the guest with husk-vmm on this host's `/dev/kvm`: [`KvmMode::Direct`] only if
/// the agent announced ready within [`PROBE_TIMEOUT`].
pub fn probe_host_kvm(vmm: &Path, kernel: &Path, initrd: &Path) -> Result<KvmMode> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        info!("kvm probe: no usable /dev/kvm on this host: using the lab");
        return Ok(KvmMode::Lab);
    }
    let sock_dir = tempfile::Builder::new()
        .prefix("husk-kvm-probe-")
        .tempdir()?;
    let mut child = probe_command(vmm, kernel, initrd, &sock_dir.path().join("vsock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("Cannot start {}", vmm.display()))?;
    let stderr = child.stderr.take().context("husk-vmm stderr not piped")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut tail = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(boot) = ready_boot_time(&line) {
                let _ = tx.send(boot);
            }
            tail.push(line);
            if tail.len() > 5 {
                tail.remove(0);
            }
        }
        tail
    });
    let ready = rx.recv_timeout(PROBE_TIMEOUT).ok();
    // Ready or not, the probe guest has served its purpose: stop it (exit status 4).
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    let _ = kill(pid, Signal::SIGTERM);
    let status = wait_or_kill(&mut child);
    let tail = reader.join().unwrap_or_default();
    match ready {
        Some(boot) => {
            info!("kvm probe: the host's /dev/kvm booted the guest in {boot:?}: running directly");
            Ok(KvmMode::Direct)
        }
        None => {
            info!(
                "kvm probe: the host's /dev/kvm did not boot the guest ({status}; last lines: {}): \
                 using the lab",
                tail.join(" | ")
            );
            Ok(KvmMode::Lab)
        }
    }
}

fn wait_or_kill(child: &mut std::process::Child) -> String {
    for _ in 0..100 {
        if let Ok(Some(status)) = child.try_wait() {
            return status.to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child
        .wait()
        .map_or_else(|e| e.to_string(), |s| s.to_string())
}

/// Parses husk-vmm's ready line, wherever the log formatting puts it in the line.
pub fn ready_boot_time(line: &str) -> Option<Duration> {
    let rest = &line[line.find(READY_PREFIX)? + READY_PREFIX.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_lines() {
        assert_eq!(
            ready_boot_time("guest ready boot_ms=412"),
            Some(Duration::from_millis(412))
        );
        assert_eq!(
            ready_boot_time("2026-01-01T00:00:00Z  INFO husk_vmm: guest ready boot_ms=87 vcpus=1"),
            Some(Duration::from_millis(87))
        );
        assert_eq!(ready_boot_time("KVM internal error. Suberror: 1"), None);
        assert_eq!(ready_boot_time("guest ready boot_ms="), None);
    }

    #[test]
    fn forced_mode() {
        // Only this test touches the variable.
        std::env::set_var(HUSK_KVM_MODE_ENV, "lab");
        let p = Path::new("/nonexistent");
        assert_eq!(kvm_mode(p, p, p).unwrap(), KvmMode::Lab);
        std::env::set_var(HUSK_KVM_MODE_ENV, "direct");
        assert_eq!(kvm_mode(p, p, p).unwrap(), KvmMode::Direct);
        std::env::set_var(HUSK_KVM_MODE_ENV, "maybe");
        assert!(kvm_mode(p, p, p).is_err());
        std::env::remove_var(HUSK_KVM_MODE_ENV);
    }
}
