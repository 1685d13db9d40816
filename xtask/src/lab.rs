//! `cargo xtask lab -- <command>`: runs a command where a Linux-booting `/dev/kvm` exists.
//!
//! This workplace's `/dev/kvm` is PVM, which cannot boot an unmodified Linux guest
//! (DESIGN.md "Host facts"). The lab boots a throwaway L1 Debian kernel under QEMU TCG,
//! whose emulated AMD SVM gives the L1 a working KVM, chroots into the host's root
//! (shared read-only) and runs the command there with the same cwd, a chosen part of the
//! environment, and the cargo target dir and husk cache shared read-write at their own
//! paths, so test binaries and artifact paths work unchanged. Output streams back over
//! the serial console; the exit status comes back as a marker line (see `console`).
//!
//! The L1 boot itself is infrastructure: if it dies or hangs before the command starts, it is
//! retried once, loudly (`husk_integration::lab_retry` decides, as it does every lab retry).
//! Once the command runs the lab retries nothing: an L1 that dies under it is reported as
//! [`L1Died`], with what the command had printed, and only `cargo xtask test` may run that
//! test binary again, within the suite's budget and never after it printed a test failure.
//!
//! Library use: [`run`] or [`LabRun`]; [`kvm_mode`]/[`probe_host_kvm`] decide whether the
//! lab is needed at all.
//!
//! Environment: the command sees `HUSK_IN_LAB=1` and `HUSK_CACHE` (always set); the
//! caller's `PATH`, `HOME`, `USER`, `RUST_*` test/log variables, `CARGO_TARGET_DIR` and
//! every `HUSK_*` pass through; `--env K=V` adds more. The command's stdin is
//! `/dev/null`, its stdout and stderr both arrive on our stdout (one serial line).
//! `HUSK_LAB_VERBOSE=1` shows the L1's boot console on stderr; `HUSK_LAB_L1_CMDLINE` adds
//! words to the L1 kernel's command line (`husk_lab.kvm_amd=vgif=0` sets kvm_amd's parameters);
//! `HUSK_LAB_CPU` replaces QEMU's `-cpu max` for the L1. `HUSK_LAB_QEMU=patched` runs the L1
//! under Debian's QEMU 7.2 rebuilt with the lab's SVM patch (a fix and diagnostics, see
//! `emulator`); `HUSK_LAB_QEMU=backports` and
//! `HUSK_LAB_L1_KERNEL=backports` run the L1 under bookworm-backports' QEMU 10 and kernel 6.12
//! (fetched into the husk cache, see `backports`). `/tmp` and `/run` in the
//! lab are fresh tmpfs; everything else outside the shares is read-only.

mod apt;
pub mod backports;
mod console;
pub mod emulator;
pub mod hold_kvm;
mod image;
mod monitor;
pub mod probe;
mod qemu;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::cache;
pub use husk_shim::vmm::host_tsc_khz;
pub use probe::{build_vmm, kvm_mode, probe_host_kvm, KvmMode, HUSK_KVM_MODE_ENV};
pub use qemu::{Output, Seen};

/// Environment variables passed from the caller into the lab (plus every `HUSK_*`).
/// `RUST_BACKTRACE` stays outside: a lab test's panic message carries the VM's diagnostics,
/// and a CI log that keeps only a run's head and tail would show a backtrace instead of them.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "RUST_LOG",
    "RUST_TEST_THREADS",
    "CARGO_TARGET_DIR",
];
/// Set inside the lab so tests can tell where they run.
pub const HUSK_IN_LAB_ENV: &str = "HUSK_IN_LAB";
/// Default limit for a whole lab run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// Limit from QEMU launch to the command's start. The L1 normally has /dev/kvm after
/// 6–8 s and starts the command a second later; a boot that takes 8x that has hung.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Set to `1` to see the L1's boot console (without `quiet`) on stderr.
pub const HUSK_LAB_VERBOSE_ENV: &str = "HUSK_LAB_VERBOSE";
/// Words added to the L1 kernel's command line, for lab experiments (issue 8): kernel options
/// (`transparent_hugepage=never`) and `husk_lab.kvm_amd=vgif=0,avic=0` for kvm_amd's
/// parameters. Unset: the default lab.
pub const HUSK_LAB_L1_CMDLINE_ENV: &str = "HUSK_LAB_L1_CMDLINE";
/// QEMU's `-cpu` for the L1, for lab experiments; `max` (the default) emulates AMD SVM with
/// nested paging.
pub const HUSK_LAB_CPU_ENV: &str = "HUSK_LAB_CPU";

/// Arguments of `cargo xtask lab`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Limit for the whole run, e.g. `90s`, `40m`, `1h` (QEMU is killed after it).
    #[arg(long, default_value = "40m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Extra environment for the command, `K=V` (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// vCPUs of the L1.
    #[arg(long, default_value_t = DEFAULT_SMP)]
    pub smp: u32,
    /// Memory of the L1, in MiB.
    #[arg(long, default_value_t = 3072)]
    pub mem_mib: u32,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// vCPUs of the L1. Two: one vCPU was tried (session 8) against the lab failures that can come
/// from multi-threaded TCG running two L1 vCPUs at once, and made another failure common: the
/// lone vCPU halted in the idle loop with its timer interrupt pending and never woken (twice in
/// ~27 min of lab time, against none in ~60 min with two). BENCHMARKS.md, "Lab reliability,
/// session 8".
pub const DEFAULT_SMP: u32 = 2;

/// One lab run.
#[derive(Debug, Clone)]
pub struct LabRun {
    /// The program and its arguments, run with the host's `PATH`.
    pub command: Vec<String>,
    /// Environment added to the passed-through set.
    pub env: Vec<(String, String)>,
    /// Working directory (default: the current one); must exist on the host.
    pub cwd: Option<PathBuf>,
    /// Limit for the command, once started.
    pub timeout: Duration,
    /// Limit for the L1 boot.
    pub boot_timeout: Duration,
    /// vCPUs of the L1.
    pub smp: u32,
    /// Memory of the L1 in MiB.
    pub mem_mib: u32,
    /// Where the command's output goes.
    pub output: Output,
    /// A command silent this long is taken for a wedged L1 ([`L1Died`]); only for commands
    /// whose own timeouts are all shorter (the test binaries).
    pub silence_limit: Option<Duration>,
}

/// The lab's L1 itself ended or wedged while the command ran (the emulated-SVM instability
/// DESIGN.md describes, one level further out than a guest): the command's own outcome is
/// unknown, unless it had already printed a failure.
#[derive(Debug, thiserror::Error)]
#[error("LAB FAILED: the L1 died: {why}")]
pub struct L1Died {
    /// The evidence.
    pub why: String,
    /// What the command printed before.
    pub seen: Seen,
    /// Its output so far, when it was captured (a soak keeps it in the run's log).
    pub output: String,
}

/// The command ran past the lab's time limit and was cut off; its output so far, when captured.
#[derive(Debug, thiserror::Error)]
#[error("LAB FAILED: {why}")]
pub struct RunLost {
    /// What happened.
    pub why: String,
    /// Its output so far, when it was captured.
    pub output: String,
}

/// The result of a lab run.
#[derive(Debug, Clone)]
pub struct LabOutcome {
    /// The command's exit status (128 + n when killed by signal n).
    pub exit_code: i32,
    /// Time from (the last) QEMU launch to `/dev/kvm` ready.
    pub kvm_ready: Duration,
    /// Time from the first launch to the end.
    pub total: Duration,
    /// Lost L1 boots that were retried.
    pub boot_retries: u32,
    /// What the command's output showed (failures, guest retries).
    pub seen: Seen,
    /// The output, when [`Output::Capture`] was asked for.
    pub output: String,
}

impl LabRun {
    /// A run of `command` with the defaults ([`DEFAULT_SMP`] vCPUs, 3 GiB, streamed output).
    pub fn new<S: Into<String>>(command: impl IntoIterator<Item = S>) -> Self {
        LabRun {
            command: command.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            timeout: DEFAULT_TIMEOUT,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            smp: DEFAULT_SMP,
            mem_mib: 3072,
            output: Output::Stream,
            silence_limit: None,
        }
    }

    /// Boots the lab, runs the command, and returns its exit status.
    pub fn run(&self) -> Result<LabOutcome> {
        if self.command.is_empty() {
            bail!("No command to run in the lab");
        }
        let kernel = match backports::kernel()? {
            Some(kernel) => kernel,
            None => image::find_kernel()?,
        };
        let lab_qemu = emulator::qemu()?;
        let initramfs = image::build_initramfs(&kernel)?;
        let cwd = match &self.cwd {
            Some(dir) => dir.clone(),
            None => std::env::current_dir()?,
        };
        let rw_shares = rw_shares()?;
        let job = tempfile::Builder::new().prefix("husk-lab-").tempdir()?;
        fs::write(job.path().join("config.sh"), config_script(&rw_shares)?)?;
        let env = self.environment()?;
        // The KVM holder first (lab/hold_kvm.rs): this binary is at the same path in the L1.
        let holder = std::env::current_exe().context("Cannot find the xtask binary")?;
        fs::write(
            job.path().join("run.sh"),
            format!(
                "{} lab-hold-kvm </dev/null >/dev/null &\n{}",
                shell_quote(&holder.to_string_lossy()),
                run_script(&cwd, &env, &self.command)
            ),
        )?;

        let symbols = crate::cache::cache_dir()?
            .join("lab")
            .join(format!("kallsyms-{}", kernel.release));
        if !symbols.exists() {
            fs::write(job.path().join(qemu::KALLSYMS_WANT), "")?;
        }

        let tsc_khz = host_tsc_khz();
        let cpu = std::env::var(HUSK_LAB_CPU_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| "max".into());
        let started = Instant::now();
        let mut retries = 0;
        loop {
            let nonce = nonce()?;
            let launch = qemu::Launch {
                kernel: &kernel,
                initramfs: &initramfs,
                job_dir: job.path(),
                rw_shares: &rw_shares,
                nonce: &nonce,
                smp: self.smp,
                mem_mib: self.mem_mib,
                verbose: std::env::var(HUSK_LAB_VERBOSE_ENV).is_ok_and(|v| v == "1"),
                tsc_khz,
                symbols: &symbols,
                silence_limit: self.silence_limit,
                l1_cmdline_extra: std::env::var(HUSK_LAB_L1_CMDLINE_ENV)
                    .ok()
                    .filter(|v| !v.trim().is_empty()),
                cpu: &cpu,
                qemu: &lab_qemu,
            };
            let ended = qemu::launch_once(&launch, self.output, self.boot_timeout, self.timeout);
            keep_symbols(job.path(), &symbols);
            match ended? {
                qemu::Ended::Exited {
                    code,
                    kvm_ready,
                    output,
                    seen,
                } => {
                    return Ok(LabOutcome {
                        exit_code: code,
                        kvm_ready,
                        total: started.elapsed(),
                        boot_retries: retries,
                        output,
                        seen,
                    })
                }
                qemu::Ended::InitFailed { reason, console } => {
                    bail!(
                        "LAB FAILED: {reason}\n--- L1 console ---\n{}",
                        console.join("\n")
                    )
                }
                qemu::Ended::RunLost { why, output } => return Err(RunLost { why, output }.into()),
                qemu::Ended::L1Died { why, seen, output } => {
                    return Err(L1Died { why, seen, output }.into())
                }
                qemu::Ended::BootLost { why, console }
                    if husk_integration::lab_retry::retry_l1_boot(retries, &why) =>
                {
                    retries += 1;
                    warn!(
                        "--- L1 console of the lost boot ---\n{}",
                        console.join("\n")
                    );
                }
                qemu::Ended::BootLost { why, console } => bail!(
                    "LAB FAILED: the L1 did not boot ({why}), retries exhausted\n\
                     --- L1 console ---\n{}",
                    console.join("\n")
                ),
            }
        }
    }

    /// The command's environment: the passed-through set, the run's own, and the markers.
    fn environment(&self) -> Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| PASSED_ENV.contains(&k.as_str()) || k.starts_with("HUSK_"))
            .collect();
        env.push((
            cache::HUSK_CACHE_ENV.to_string(),
            cache::cache_dir()?.to_string_lossy().into_owned(),
        ));
        env.push((HUSK_IN_LAB_ENV.to_string(), "1".to_string()));
        env.extend(self.env.iter().cloned());
        // Later entries win, as with `env K=1 K=2`; keep only the last of each key.
        let mut seen = std::collections::HashSet::new();
        let mut unique: Vec<_> = env
            .into_iter()
            .rev()
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect();
        unique.reverse();
        Ok(unique)
    }
}

/// Runs `command` in the lab with extra `env`, streaming its output; returns its outcome.
pub fn run(command: &[String], env: &[(String, String)], timeout: Duration) -> Result<LabOutcome> {
    run_with_silence_limit(command, env, timeout, None)
}

fn run_with_silence_limit(
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
    silence_limit: Option<Duration>,
) -> Result<LabOutcome> {
    let mut lab = LabRun::new(command.iter().cloned());
    lab.env = env.to_vec();
    lab.timeout = timeout;
    lab.silence_limit = silence_limit;
    lab.run()
}

/// How a command run by [`run_where_kvm_boots`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ran {
    /// Its exit status (128 + n when killed by signal n).
    pub code: i32,
    /// Lost L1 boots retried before it started.
    pub l1_boot_retries: u32,
    /// What its output showed (lab only; direct runs retry nothing).
    pub seen: Seen,
}

/// Runs `command` with `env` where a KVM that boots Linux is: directly on this host
/// ([`KvmMode::Direct`]) or inside the lab, and returns how it ended. In the lab the run's
/// figures (time to `/dev/kvm`, total, L1 boot retries) are printed. `silence_limit`: see
/// [`LabRun::silence_limit`] (ignored outside the lab).
pub fn run_where_kvm_boots(
    command: &[String],
    env: &[(String, String)],
    mode: KvmMode,
    timeout: Duration,
    silence_limit: Option<Duration>,
) -> Result<Ran> {
    let (program, args) = command.split_first().context("No command to run")?;
    match mode {
        KvmMode::Direct => {
            let status = std::process::Command::new(program)
                .args(args)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .status()
                .with_context(|| format!("Cannot run {program}"))?;
            Ok(Ran {
                code: status.code().unwrap_or(128),
                l1_boot_retries: 0,
                seen: qemu::Seen::default(),
            })
        }
        KvmMode::Lab => {
            let outcome = run_with_silence_limit(command, env, timeout, silence_limit)?;
            eprintln!(
                "lab: /dev/kvm ready after {:.1} s, run took {:.1} s, L1 boot retries: {}",
                outcome.kvm_ready.as_secs_f64(),
                outcome.total.as_secs_f64(),
                outcome.boot_retries
            );
            Ok(Ran {
                code: outcome.exit_code,
                l1_boot_retries: outcome.boot_retries,
                seen: outcome.seen,
            })
        }
    }
}

/// The `lab` subcommand: exits with the command's status.
pub fn run_command(args: &Args) -> Result<i32> {
    crate::setup::ensure()?;
    let mut lab = LabRun::new(args.command.iter().cloned());
    lab.env = args.env.clone();
    lab.timeout = args.timeout;
    lab.smp = args.smp;
    lab.mem_mib = args.mem_mib;
    let outcome = lab.run()?;
    info!(
        "lab: command exited with {} after {:.1} s in the lab",
        outcome.exit_code,
        outcome.total.as_secs_f64()
    );
    Ok(outcome.exit_code)
}

/// The read-write shares: the cargo target dir and the husk cache, parents first.
fn rw_shares() -> Result<Vec<(String, PathBuf)>> {
    let mut dirs = vec![cache::target_dir(), cache::cache_dir()?];
    for dir in &mut dirs {
        fs::create_dir_all(&*dir).with_context(|| format!("Cannot create {}", dir.display()))?;
        *dir = fs::canonicalize(&*dir)?;
    }
    // The lab mounts fresh tmpfs on /tmp and /run, hiding a checkout there (a CI clone in
    // /tmp, say): share the workspace itself then, or the command could not even cd into it.
    let workspace = fs::canonicalize(cache::workspace_root())?;
    if is_under_lab_tmpfs(&workspace) {
        dirs.push(workspace);
    }
    dirs.sort_by_key(|d| d.components().count());
    dirs.dedup();
    Ok(dirs
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("huskrw{i}"), d))
        .collect())
}

/// Directories the lab init replaces by an empty tmpfs (see `init.sh`).
const LAB_TMPFS_DIRS: &[&str] = &["/tmp", "/run", "/dev"];

/// Whether `path` is hidden in the lab by one of [`LAB_TMPFS_DIRS`].
fn is_under_lab_tmpfs(path: &Path) -> bool {
    LAB_TMPFS_DIRS.iter().any(|d| path.starts_with(d))
}

/// `config.sh`, sourced by the lab init: the shares to mount, as `tag path` pairs.
fn config_script(rw_shares: &[(String, PathBuf)]) -> Result<String> {
    let mut pairs = Vec::new();
    for (tag, path) in rw_shares {
        let path = path.to_str().context("Share path is not UTF-8")?;
        if path.chars().any(|c| c.is_whitespace() || c == '\'') {
            bail!("Lab share path {path:?} contains whitespace or a quote");
        }
        pairs.push(format!("{tag} {path}"));
    }
    Ok(format!("RW_SHARES='{}'\n", pairs.join(" ")))
}

/// `run.sh`, run by `/bin/sh` in the chroot: cd, then exec the command with exactly `env`.
pub fn run_script(cwd: &Path, env: &[(String, String)], command: &[String]) -> String {
    let cwd = shell_quote(&cwd.to_string_lossy());
    let mut script = format!(
        "cd {cwd} || {{ echo \"husk lab: cannot cd to \"{cwd} >&2; exit 125; }}\nexec env -i --"
    );
    for (k, v) in env {
        script.push(' ');
        script.push_str(&shell_quote(&format!("{k}={v}")));
    }
    for arg in command {
        script.push(' ');
        script.push_str(&shell_quote(arg));
    }
    script.push('\n');
    script
}

/// Quotes `s` for POSIX sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Moves the kernel symbols an L1 wrote into the job directory to the cache.
fn keep_symbols(job_dir: &Path, cache: &Path) {
    let written = job_dir.join(qemu::KALLSYMS);
    if fs::metadata(&written).is_ok_and(|m| m.len() > 0) {
        if let Some(dir) = cache.parent() {
            let _ = fs::create_dir_all(dir);
        }
        let _ = fs::copy(&written, cache);
    }
}

/// A fresh random hex string for the console markers.
fn nonce() -> Result<String> {
    let mut bytes = [0u8; 8];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Parses `90s`, `40m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("bad duration unit in {s:?} (use s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected K=V, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("40m").unwrap(), Duration::from_secs(2400));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("7d").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }

    /// The generated script, run by a real sh, passes every byte of every argument
    /// through and sets exactly the given environment.
    #[test]
    fn run_script_quotes_arguments_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let env = vec![
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("X".into(), "it's $HOME".into()),
        ];
        let cmd: Vec<String> = ["printf", "%s|", "a b", "'q'", "$(x)", "-"]
            .map(String::from)
            .to_vec();
        let script = run_script(dir.path(), &env, &cmd);
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|'q'|$(x)|-|");

        let cmd: Vec<String> = ["sh", "-c", "pwd; env | sort"].map(String::from).to_vec();
        let out = Command::new("sh")
            .arg("-c")
            .arg(run_script(dir.path(), &env, &cmd))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            fs::canonicalize(dir.path()).unwrap().to_str().unwrap()
        );
        assert!(lines.contains(&"X=it's $HOME"), "{text}");
        assert!(!lines.iter().any(|l| l.starts_with("HOME=")), "{text}");
    }

    #[test]
    fn missing_cwd_exits_125() {
        let script = run_script(Path::new("/nonexistent/dir"), &[], &["true".to_string()]);
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert_eq!(out.status.code(), Some(125));
    }

    #[test]
    fn checkouts_in_the_labs_tmpfs_are_noticed() {
        assert!(is_under_lab_tmpfs(Path::new("/tmp/ci-clone")));
        assert!(is_under_lab_tmpfs(Path::new("/run/user/0/x")));
        assert!(!is_under_lab_tmpfs(Path::new("/work/main")));
        assert!(!is_under_lab_tmpfs(Path::new("/tmpfoo")));
    }

    #[test]
    fn config_script_lists_shares() {
        let shares = vec![("huskrw0".to_string(), PathBuf::from("/work/main/target"))];
        assert_eq!(
            config_script(&shares).unwrap(),
            "RW_SHARES='huskrw0 /work/main/target'\n"
        );
        let bad = vec![("huskrw0".to_string(), PathBuf::from("/a b"))];
        assert!(config_script(&bad).is_err());
    }

    #[test]
    fn later_env_entries_win() {
        let mut lab = LabRun::new(["true"]);
        lab.env = vec![("HUSK_IN_LAB".into(), "2".into()), ("K".into(), "v".into())];
        let env = lab.environment().unwrap();
        assert_eq!(env.iter().filter(|(k, _)| k == "HUSK_IN_LAB").count(), 1);
        assert!(env.contains(&("HUSK_IN_LAB".into(), "2".into())));
        assert!(env.contains(&("K".into(), "v".into())));
    }
}
