//! `cargo xtask bench fs`: virtio-fs against the host's own file system, in the same machine.
//!
//! Two workloads, both done by the test-only `husk-fs-probe` (`probe_mode=bench`): a sequential
//! read of a 256 MiB file in 1 MiB reads, and creating 10,000 files of 1 KiB. In the guest the
//! probe is `/init` of a husk-vmm VM whose virtio-fs device is served by virtiofsd (sandbox on,
//! `--cache` as given) sharing a directory; on the host the same static binary runs as a plain
//! process on that very directory. The guest page cache starts cold for the big file (the host
//! wrote it), the host's is warm: on the lab's tmpfs that is the host's real best case, so the
//! ratio is a floor. Every run prints its raw lines; the summary gives medians and ratios.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_shim::config::CachePolicy;
use husk_shim::vmm::{Console, FsSandbox, VirtiofsdCommand, VmmCommand};

/// Size of the sequential-read file.
const BIG_FILE_MIB: usize = 256;
/// How long one guest run may take.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Arguments of `cargo xtask bench fs`.
#[derive(Debug, Clone, clap::Args)]
pub struct FsArgs {
    /// Runs per side (guest and host), interleaved.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// virtiofsd cache policy (auto, always, never, metadata).
    #[arg(long, default_value = "auto")]
    pub cache: CachePolicy,
    /// Guest memory in MiB. 256, the pods' default: in the lab a 512 MiB guest reading the
    /// 256 MiB file crashed 3 times in 3 (two L1 resets, one guest triple fault; BENCHMARKS.md).
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u32,
    /// Run here, assuming a KVM that boots Linux (used inside the lab).
    #[arg(long, hide = true)]
    pub inner: bool,
}

/// One probe run's two figures, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    seq_read_ms: f64,
    create_ms: f64,
}

/// Parses `PROBE BENCH seq_read … ms=N` and `PROBE BENCH create_small … ms=N` lines.
fn parse_probe(output: &str) -> Option<Sample> {
    let ms = |name: &str| -> Option<f64> {
        let line = output
            .lines()
            .find(|l| l.contains(&format!("PROBE BENCH {name} ")))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("ms="))?
            .trim()
            .parse()
            .ok()
    };
    Some(Sample {
        seq_read_ms: ms("seq_read")?,
        create_ms: ms("create_small")?,
    })
}

fn write_big_file(path: &Path) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("Cannot create {}", path.display()))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..BIG_FILE_MIB {
        for b in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

struct Paths {
    vmm: PathBuf,
    kernel: PathBuf,
    probe_initrd: PathBuf,
    probe: PathBuf,
    virtiofsd: PathBuf,
}

fn guest_run(p: &Paths, args: &FsArgs, share: &Path, work: &Path, i: u32) -> Result<Sample> {
    let socket = work.join(format!("virtiofsd-{i}.sock"));
    let console = work.join(format!("console-{i}.log"));
    // virtiofsd's own default log level (info), as this benchmark has always run it.
    let mut daemon = VirtiofsdCommand::new(&p.virtiofsd, &socket, share)
        .sandbox(FsSandbox::Namespace)
        .cache(args.cache)
        .log_level("info")
        .command()
        .stdout(Stdio::null())
        .stderr(fs::File::create(work.join(format!("virtiofsd-{i}.log")))?)
        .spawn()
        .context("Cannot start virtiofsd")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let vmm = VmmCommand::new(&p.vmm, &p.kernel, work.join(format!("vsock-{i}.sock")))
        .initrd(&p.probe_initrd)
        .mem_mib(args.mem_mib)
        .console(Console::File(console.clone()))
        .fs(&socket, "husk")
        .cmdline_extra("probe_mode=bench")
        .command()
        .stderr(Stdio::inherit())
        .spawn()
        .context("Cannot start husk-vmm")?;
    let status = wait_with_timeout(vmm, GUEST_TIMEOUT);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let out = fs::read_to_string(&console).unwrap_or_default();
    for line in out.lines().filter(|l| l.contains("PROBE")) {
        eprintln!("  guest {i}: {}", line.trim());
    }
    match (status, parse_probe(&out)) {
        (Some(0), Some(s)) => Ok(s),
        (st, _) => bail!("guest run {i} failed (husk-vmm status {st:?}); console:\n{out}"),
    }
}

fn wait_with_timeout(mut child: std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn host_run(p: &Paths, share: &Path, i: u32) -> Result<Sample> {
    let out = Command::new(&p.probe)
        .env("PROBE_DIR", share)
        .env("probe_mode", "bench")
        .output()
        .context("Cannot run husk-fs-probe on the host")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| l.contains("PROBE")) {
        eprintln!("  host  {i}: {}", line.trim());
    }
    parse_probe(&text).with_context(|| format!("host run {i} failed:\n{text}"))
}

/// The median of at least one value (`--runs` is at least 1).
fn median(v: Vec<f64>) -> f64 {
    super::median(v.into_iter()).expect("at least one run per side")
}

/// Runs the comparison where this process is (a KVM that boots Linux).
fn run_inner(args: &FsArgs, p: &Paths) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let work = tempfile::Builder::new().prefix("husk-bench-fs").tempdir()?;
    let share = work.path().join("share");
    fs::create_dir(&share)?;
    write_big_file(&share.join("big"))?;
    eprintln!(
        "bench fs: {} runs per side, {BIG_FILE_MIB} MiB sequential read and 10000 x 1 KiB \
         creates, virtiofsd --cache {}, guest {} MiB, share on {}",
        args.runs,
        args.cache.as_str(),
        args.mem_mib,
        share.display()
    );
    let (mut guest, mut host) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        guest.push(guest_run(p, args, &share, work.path(), i)?);
        host.push(host_run(p, &share, i)?);
    }
    let mib = BIG_FILE_MIB as f64;
    let g_read = median(guest.iter().map(|s| s.seq_read_ms).collect());
    let h_read = median(host.iter().map(|s| s.seq_read_ms).collect());
    let g_create = median(guest.iter().map(|s| s.create_ms).collect());
    let h_create = median(host.iter().map(|s| s.create_ms).collect());
    println!("| workload | virtio-fs (guest) | host fs | guest/host |");
    println!("|---|---|---|---|");
    println!(
        "| sequential read {BIG_FILE_MIB} MiB | {g_read:.0} ms ({:.0} MiB/s) | {h_read:.0} ms ({:.0} MiB/s) | {:.1}% |",
        mib / (g_read / 1000.0),
        mib / (h_read / 1000.0),
        100.0 * h_read / g_read
    );
    println!(
        "| create 10000 x 1 KiB files | {g_create:.0} ms ({:.0} files/s) | {h_create:.0} ms ({:.0} files/s) | {:.1}% |",
        10_000.0 / (g_create / 1000.0),
        10_000.0 / (h_create / 1000.0),
        100.0 * h_create / g_create
    );
    Ok(())
}

/// `cargo xtask bench fs`.
pub fn run(args: &FsArgs) -> Result<()> {
    let from_env = |v: &str| -> Result<PathBuf> {
        std::env::var_os(v)
            .map(PathBuf::from)
            .with_context(|| format!("{v} is not set"))
    };
    if args.inner {
        let p = Paths {
            vmm: from_env("HUSK_VMM")?,
            kernel: from_env("HUSK_KERNEL")?,
            probe_initrd: from_env("HUSK_FS_PROBE_INITRD")?,
            probe: from_env("HUSK_FS_PROBE")?,
            virtiofsd: from_env("HUSK_VIRTIOFSD")?,
        };
        super::check_inputs(&[&p.vmm, &p.kernel, &p.probe_initrd, &p.probe, &p.virtiofsd])?;
        return run_inner(args, &p);
    }
    crate::setup::ensure()?;
    let parts = crate::test::step(
        "build husk-vmm (release), the guest and the fs probe",
        crate::test::build_parts,
    )?;
    let mode = crate::lab::kvm_mode(&parts.vmm, &parts.kernel, &parts.initrd)?;
    let argv: Vec<String> = vec![
        std::env::current_exe()?.display().to_string(),
        "bench".into(),
        "fs".into(),
        "--inner".into(),
        "--runs".into(),
        args.runs.to_string(),
        "--cache".into(),
        args.cache.as_str().into(),
        "--mem-mib".into(),
        args.mem_mib.to_string(),
    ];
    let mut env = parts.env(mode);
    env.push((
        "HUSK_FS_PROBE".into(),
        crate::test::fs_probe_binary().display().to_string(),
    ));
    if mode == crate::lab::KvmMode::Lab {
        eprintln!(
            "bench: measuring inside the lab (QEMU-TCG L1 with nested KVM); guest and host \
             figures come from the same L1, the ratio is the figure"
        );
    }
    let code =
        crate::lab::run_where_kvm_boots(&argv, &env, mode, Duration::from_secs(3600), None)?.code;
    if code != 0 {
        bail!("the benchmark failed (exit status {code})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_lines_are_parsed() {
        let out = "noise\nPROBE BENCH seq_read bytes=268435456 files=1 ms=812\r\n\
                   PROBE BENCH create_small bytes=10240000 files=10000 ms=2345\nPROBE DONE\n";
        let s = parse_probe(out).unwrap();
        assert_eq!((s.seq_read_ms, s.create_ms), (812.0, 2345.0));
        assert!(parse_probe("PROBE BENCH seq_read ms=1").is_none());
    }
}
