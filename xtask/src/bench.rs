//! `cargo xtask bench boot`: launch → agent-ready time of husk-vmm against QEMU `-M microvm`,
//! with the same kernel, initramfs, command line, memory and vCPUs, in the same KVM.
//!
//! Both VMMs are timed the same way, from the bench's own clock: spawn → the moment the bench sees
//! the agent's "ready" byte on I/O port 0x440 (docs/contracts.md). husk-vmm reports that write on
//! its log (`guest ready boot_ms=`); QEMU is given an `isa-debugcon` on the same port whose chardev
//! is a Unix socket the bench listens on. Runs are interleaved (ABAB…, alternating which goes
//! first) so drift in the machine hits both alike. At ready, the bench reads each VMM's
//! `/proc/<pid>/status`: the overhead is VmRSS minus RssShmem, because both keep guest RAM in a
//! memfd (QEMU through `memory-backend-memfd`), so RssShmem is exactly the guest memory touched.
//!
//! Boots that never become ready are counted as failures per VMM and reported: in the lab they
//! measure the emulated SVM's flake rate, which must not be higher for husk-vmm than for QEMU.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_shim::vmm::{host_tsc_khz, Console, QemuCommand, VmmCommand};

mod ctr;
mod exec;
mod fs;

/// How long one boot may take before it counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// What one boot benchmark run compares.
#[derive(Debug, Clone)]
pub struct BootBench {
    /// The husk-vmm binary.
    pub vmm: PathBuf,
    /// Guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// Runs per VMM.
    pub runs: u32,
    /// Guest memory.
    pub mem_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
}

/// One VMM's boot outcome.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ready: Duration,
    overhead_kib: u64,
    rss_kib: u64,
}

#[derive(Debug, Default)]
struct Series {
    samples: Vec<Sample>,
    failures: Vec<String>,
}

/// Runs the comparison where this process is (a KVM that boots Linux), printing a table and the
/// closing `boot ratio husk-vmm/qemu: <x>` line.
pub fn run_boot_inner(b: &BootBench) -> Result<()> {
    let tsc_khz = host_tsc_khz();
    let mut husk = Series::default();
    let mut qemu = Series::default();
    eprintln!(
        "bench boot: {} runs each, {} MiB, {} vCPU(s), interleaved",
        b.runs, b.mem_mib, b.vcpus
    );
    for i in 0..b.runs {
        let order: [bool; 2] = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_husk in order {
            let (name, series, res) = if is_husk {
                ("husk-vmm", &mut husk, boot_husk(b))
            } else {
                ("qemu", &mut qemu, boot_qemu(b, tsc_khz))
            };
            match res {
                Ok(s) => {
                    eprintln!(
                        "  run {:>3} {name:<8} ready {:>6} ms  rss {:>7} KiB  overhead {:>6} KiB",
                        i + 1,
                        s.ready.as_millis(),
                        s.rss_kib,
                        s.overhead_kib
                    );
                    series.samples.push(s);
                }
                Err(e) => {
                    eprintln!("  run {:>3} {name:<8} FAILED: {e:#}", i + 1);
                    series.failures.push(format!("{e:#}"));
                }
            }
        }
    }
    report(b, &husk, &qemu)
}

fn report(b: &BootBench, husk: &Series, qemu: &Series) -> Result<()> {
    let hm = median(husk.samples.iter().map(|s| s.ready.as_secs_f64() * 1e3));
    let qm = median(qemu.samples.iter().map(|s| s.ready.as_secs_f64() * 1e3));
    let ho = median(husk.samples.iter().map(|s| s.overhead_kib as f64));
    let qo = median(qemu.samples.iter().map(|s| s.overhead_kib as f64));
    println!(
        "| vmm | boots ok | failed | median launch→ready ms | min | max | median VMM overhead MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, s, m, o) in [("husk-vmm", husk, hm, ho), ("qemu", qemu, qm, qo)] {
        let min = s.samples.iter().map(|x| x.ready.as_millis()).min();
        let max = s.samples.iter().map(|x| x.ready.as_millis()).max();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            s.samples.len(),
            s.failures.len(),
            fmt_opt(m, 0),
            min.map_or("-".into(), |v| v.to_string()),
            max.map_or("-".into(), |v| v.to_string()),
            fmt_opt(o.map(|k| k / 1024.0), 2)
        );
    }
    println!(
        "guest: {} MiB, {} vCPU(s); runs per VMM: {}",
        b.mem_mib, b.vcpus, b.runs
    );
    match (hm, qm) {
        (Some(h), Some(q)) => {
            println!("boot ratio husk-vmm/qemu: {:.2}", h / q);
            Ok(())
        }
        _ => bail!("no successful boots of one of the VMMs; no ratio"),
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Kills the child on every path out of a boot.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest both VMMs boot, with its files in `dir`.
fn guest(b: &BootBench, dir: &Path) -> VmmCommand {
    VmmCommand::new(&b.vmm, &b.kernel, dir.join("vsock.sock"))
        .initrd(&b.initrd)
        .mem_mib(b.mem_mib)
        .vcpus(b.vcpus)
        .console(Console::File(dir.join("console.log")))
}

fn boot_husk(b: &BootBench) -> Result<Sample> {
    let dir = tempfile::Builder::new().prefix("husk-bench").tempdir()?;
    let start = Instant::now();
    let child = guest(b, dir.path())
        .command()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("Cannot start husk-vmm")?;
    let mut child = Reaped(child);
    let stderr = child.0.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("guest ready boot_ms=") {
                let _ = tx.send(Instant::now());
            }
        }
    });
    let ready_at = rx
        .recv_timeout(READY_TIMEOUT)
        .map_err(|_| anyhow::anyhow!("husk-vmm: no ready within {READY_TIMEOUT:?}"))?;
    let (rss_kib, shmem_kib) = rss_of(child.0.id())?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    Ok(Sample {
        ready: ready_at - start,
        overhead_kib: rss_kib.saturating_sub(shmem_kib),
        rss_kib,
    })
}

fn boot_qemu(b: &BootBench, tsc_khz: Option<u64>) -> Result<Sample> {
    let dir = tempfile::Builder::new().prefix("husk-bench").tempdir()?;
    let sock = dir.path().join("ready.sock");
    let listener = UnixListener::bind(&sock)?;
    let start = Instant::now();
    let child = QemuCommand::like(&guest(b, dir.path()), 3)
        .tsc_khz(tsc_khz)
        .status_port(&sock)
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("Cannot start qemu-system-x86_64")?;
    let mut child = Reaped(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut byte = [0u8; 1];
            while let Ok(1) = s.read(&mut byte) {
                if byte[0] == 0x01 {
                    let _ = tx.send(Instant::now());
                    break;
                }
            }
        }
    });
    let ready_at = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(t) => t,
        Err(_) => {
            let _ = child.0.kill();
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!(
                "qemu: no ready within {READY_TIMEOUT:?}; stderr: {}",
                err.trim()
            );
        }
    };
    let (rss_kib, shmem_kib) = rss_of(child.0.id())?;
    Ok(Sample {
        ready: ready_at - start,
        overhead_kib: rss_kib.saturating_sub(shmem_kib),
        rss_kib,
    })
}

/// VmRSS and RssShmem of a process, in KiB.
fn rss_of(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("RssShmem:")))
}

/// Checks that the files the bench needs exist.
pub fn check_inputs(paths: &[&Path]) -> Result<()> {
    for p in paths {
        if !p.exists() {
            bail!("{} does not exist", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
    }
}

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to measure.
    #[command(subcommand)]
    pub what: Bench,
}

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// Launch → agent ready, husk-vmm vs QEMU microvm, and husk-vmm's memory overhead.
    Boot {
        /// Runs per VMM (interleaved).
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u32,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Run here, assuming a KVM that boots Linux (used inside the lab).
        #[arg(long, hide = true)]
        inner: bool,
    },
    /// virtio-fs vs the host's own file system: 256 MiB sequential read, 10,000 small files.
    Fs(fs::FsArgs),
    /// `ctr run --rm <busybox> true`, husk vs runc, and host memory per idle husk pod.
    Ctr(ctr::CtrArgs),
    /// Exec round trip of `true` into a running container (agent in a real guest).
    Exec(exec::ExecArgs),
    /// Kubernetes pods through CRI, husk vs runc: pod and container start, host ↔ pod TCP
    /// round trip and throughput, pod host memory.
    Cri(exec::CriArgs),
}

/// Runs a benchmark, in the lab where this host's KVM cannot boot Linux.
pub fn run(args: &Args) -> Result<()> {
    let (runs, mem_mib, vcpus, inner) = match &args.what {
        Bench::Boot {
            runs,
            mem_mib,
            vcpus,
            inner,
        } => (runs, mem_mib, vcpus, inner),
        Bench::Fs(fs_args) => return fs::run(fs_args),
        Bench::Ctr(ctr_args) => return ctr::run(ctr_args),
        Bench::Exec(exec_args) => return exec::run(exec_args),
        Bench::Cri(cri_args) => return exec::run_cri(cri_args),
    };
    let from_env = |v: &str| -> Result<PathBuf> {
        std::env::var_os(v)
            .map(PathBuf::from)
            .with_context(|| format!("{v} is not set"))
    };
    if *inner {
        let b = BootBench {
            vmm: from_env("HUSK_VMM")?,
            kernel: from_env("HUSK_KERNEL")?,
            initrd: from_env("HUSK_INITRD")?,
            runs: *runs,
            mem_mib: *mem_mib,
            vcpus: *vcpus,
        };
        check_inputs(&[&b.vmm, &b.kernel, &b.initrd])?;
        return run_boot_inner(&b);
    }
    crate::setup::ensure()?;
    let parts = crate::test::step(
        "build husk-vmm (release) and the guest",
        crate::test::build_parts,
    )?;
    let mode = crate::lab::kvm_mode(&parts.vmm, &parts.kernel, &parts.initrd)?;
    let argv: Vec<String> = vec![
        std::env::current_exe()?.display().to_string(),
        "bench".into(),
        "boot".into(),
        "--inner".into(),
        "--runs".into(),
        runs.to_string(),
        "--mem-mib".into(),
        mem_mib.to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
    ];
    let env = parts.env(mode);
    let code = match mode {
        crate::lab::KvmMode::Direct => {
            eprintln!("bench: running directly on this host's KVM");
            Command::new(&argv[0])
                .args(&argv[1..])
                .envs(env)
                .status()?
                .code()
                .unwrap_or(128)
        }
        crate::lab::KvmMode::Lab => {
            eprintln!(
                "bench: this host's /dev/kvm cannot boot Linux; measuring inside the lab \
                 (QEMU-TCG L1 with nested KVM): absolute times are the lab's, the ratio is the figure"
            );
            crate::lab::run(&argv, &env, Duration::from_secs(3 * 3600))?.exit_code
        }
    };
    if code != 0 {
        bail!("the benchmark failed (exit status {code})");
    }
    Ok(())
}
