//! `cargo xtask soak <workload> --runs N`: runs one workload again and again and ends with
//! `N passed, M failed`, one line per failure (with its class) before it.
//!
//! Workloads:
//! - `vsock-stress`: the host-only stress of husk-vmm's vsock device
//!   (`vmm/src/devices/virtio/vsock/stress_tests.rs`), a new seed each run. No KVM needed.
//! - `bulk`: the component test with the 100 MiB stdout stream and the 10 MiB stdin round trip
//!   (`stdio_exit_status_stdin_tty_and_bulk_output`), each run in a fresh lab.
//! - `container-cycles`: `integration/examples/container_cycles`, `--cycles` container runs in
//!   one pod per run, each run in a fresh lab.
//! - `guest-load:<kind>`: `integration/examples/guest_load`, 30 s of guest load of one kind per
//!   run (`stdout` through the vsock device, `cpu` with no device traffic, `fs` through
//!   virtio-fs), each run in a fresh lab: does the guest die without our vsock device?
//! - `test:<name>`: any component or end-to-end test by its exact name, each run in a fresh lab.
//!
//! Lab runs (where the host KVM does not boot Linux) keep each run's output in
//! `$HUSK_CACHE/soak/<workload>-<time>/run-<n>.log`. A run counts as passed only if its command
//! exited 0; its guest retries (lines from `husk_integration::lab_retry`) are counted and shown.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_integration::lab_retry;

use crate::lab::{self, KvmMode, LabRun, Output};
use crate::test;

/// Arguments of `cargo xtask soak`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to run: `vsock-stress`, `bulk`, `container-cycles`, `guest-load:<stdout|cpu|fs>`
    /// or `test:<name>`.
    pub workload: String,
    /// How many runs.
    #[arg(long, default_value_t = 10)]
    pub runs: u32,
    /// Packets per run (`vsock-stress`), both directions and both notification modes together.
    #[arg(long, default_value_t = 1_000_000)]
    pub packets: u64,
    /// Container cycles per run (`container-cycles`).
    #[arg(long, default_value_t = 300)]
    pub cycles: u32,
    /// The VMM of the lab workloads' guests: `husk-vmm`, `qemu` (QEMU `-M microvm` with
    /// vhost-vsock, the baseline), or `both`, alternating run by run (husk-vmm first) so the
    /// two meet the same lab conditions.
    #[arg(long, default_value = "husk-vmm", value_parser = ["husk-vmm", "qemu", "both"])]
    pub vmm: String,
}

impl Args {
    /// The VMM of lab run `run` (1-based).
    fn vmm_of_run(&self, run: u32) -> &'static str {
        match self.vmm.as_str() {
            "qemu" => "qemu",
            "both" if run % 2 == 0 => "qemu",
            _ => "husk-vmm",
        }
    }
}

/// The bulk-stream component test.
const BULK_TEST: &str = "stdio_exit_status_stdin_tty_and_bulk_output";
/// The example behind `container-cycles`.
const CYCLES_EXAMPLE: &str = "container_cycles";
/// The example behind `guest-load:<kind>`.
const LOAD_EXAMPLE: &str = "guest_load";
/// Limit of one lab run (the bulk test takes 2–4 min there; 300 cycles about 5).
const RUN_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Time allowed per container cycle: a cycle takes 0.5–1 s in the lab, so a long run is not
/// cut off for its length (the lab's silence limit still ends a wedged one).
const CYCLE_ALLOWANCE: Duration = Duration::from_secs(2);

/// The limit of one lab run of `cycles` container cycles: 2 s each, at least [`RUN_TIMEOUT`].
fn cycles_run_timeout(cycles: u32) -> Duration {
    RUN_TIMEOUT.max(CYCLE_ALLOWANCE * cycles)
}

/// Runs the soak; fails if any run failed.
pub fn run(args: &Args) -> Result<()> {
    let w = args.workload.as_str();
    let outcomes = if let Some(name) = w.strip_prefix("test:") {
        lab_soak(args, &Target::Test(name.into()), RUN_TIMEOUT)?
    } else if let Some(kind) = w.strip_prefix("guest-load:") {
        lab_soak(
            args,
            &Target::Example(LOAD_EXAMPLE, vec![("LOAD".into(), kind.into())]),
            RUN_TIMEOUT,
        )?
    } else {
        match w {
            "vsock-stress" => vsock_stress(args)?,
            "bulk" => lab_soak(args, &Target::Test(BULK_TEST.into()), RUN_TIMEOUT)?,
            "container-cycles" => lab_soak(
                args,
                &Target::Example(
                    CYCLES_EXAMPLE,
                    vec![("CYCLES".into(), args.cycles.to_string())],
                ),
                cycles_run_timeout(args.cycles),
            )?,
            other => bail!(
                "Unknown soak workload {other:?} (known: vsock-stress, bulk, container-cycles, \
                 guest-load:<stdout|cpu|fs>, test:<name>)"
            ),
        }
    };
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    let retries: u32 = outcomes.iter().filter_map(|o| o.as_ref().ok()).sum();
    for f in &failures {
        println!("{f}");
    }
    if args.vmm == "both" {
        for vmm in ["husk-vmm", "qemu"] {
            let runs: Vec<_> = (1..=args.runs)
                .zip(&outcomes)
                .filter(|(run, _)| args.vmm_of_run(*run) == vmm)
                .map(|(_, o)| o)
                .collect();
            let failed = runs.iter().filter(|o| o.is_err()).count();
            println!(
                "soak: {vmm}: {} passed, {failed} failed",
                runs.len() - failed
            );
        }
    }
    let failed = failures.len() as u32;
    println!(
        "{} passed, {failed} failed (guest retries in passed runs: {retries})",
        args.runs - failed
    );
    if failed > 0 {
        bail!("{failed} of {} soak runs failed", args.runs);
    }
    Ok(())
}

/// One run: `Ok(guest retries)` or `Err(the failure line)`.
type RunOutcome = std::result::Result<u32, String>;

fn vsock_stress(args: &Args) -> Result<Vec<RunOutcome>> {
    let mut outcomes = Vec::new();
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
        outcomes.push(if status.success() {
            Ok(0)
        } else {
            Err(format!(
                "soak failure: run {} seed {seed:#x}: assertion failed ({status})",
                run + 1
            ))
        });
    }
    Ok(outcomes)
}

/// What a lab soak runs.
enum Target {
    /// A component or end-to-end test by exact name.
    Test(String),
    /// An example of husk-integration, with its environment.
    Example(&'static str, Vec<(String, String)>),
}

/// Runs `target` `args.runs` times in the lab, each run limited to `timeout`.
fn lab_soak(args: &Args, target: &Target, timeout: Duration) -> Result<Vec<RunOutcome>> {
    crate::setup::ensure()?;
    let root = crate::cache::workspace_root();
    let parts = test::step("build husk-vmm (release) and the guest", test::build_parts)?;
    let rootfs = test::step("build the busybox rootfs", crate::guest::busybox_rootfs)?;
    let argv = match target {
        Target::Test(name) => {
            let bins = test::step("build the component tests", || {
                test::component_test_binaries(&root)
            })?;
            let bin = binary_with_test(&bins, name)?;
            vec![
                bin.display().to_string(),
                name.clone(),
                "--exact".into(),
                "--test-threads=1".into(),
                "--nocapture".into(),
            ]
        }
        Target::Example(name, _) => {
            test::cargo(
                &root,
                &["build", "-p", "husk-integration", "--example", name],
            )?;
            vec![crate::cache::target_dir()
                .join("debug/examples")
                .join(name)
                .display()
                .to_string()]
        }
    };
    let mode = lab::kvm_mode(&parts.vmm, &parts.kernel, &parts.initrd)?;
    let mut env = parts.env(mode);
    env.push((test::TEST_ROOTFS_ENV.into(), rootfs.display().to_string()));
    if let Target::Example(_, vars) = target {
        env.extend(vars.iter().cloned());
    }
    let logs = crate::cache::cache_dir()?.join("soak").join(format!(
        "{}-{}",
        args.workload.replace([':', '/'], "-"),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    ));
    fs::create_dir_all(&logs).with_context(|| format!("Cannot create {}", logs.display()))?;
    println!(
        "soak: {} runs of {:?}; logs in {}",
        args.runs,
        argv,
        logs.display()
    );
    let mut outcomes = Vec::new();
    for run in 1..=args.runs {
        let started = Instant::now();
        let vmm = args.vmm_of_run(run);
        let mut env = env.clone();
        env.push((husk_integration::vm::VMM_ENV.into(), vmm.into()));
        println!("soak: run {run}/{} under {vmm}", args.runs);
        let (outcome, output) = one_lab_run(&argv, &env, mode, timeout)?;
        let log = logs.join(format!("run-{run}.log"));
        fs::write(&log, &output).with_context(|| format!("Cannot write {}", log.display()))?;
        let took = started.elapsed().as_secs_f64();
        match &outcome {
            Ok(retries) => println!(
                "soak: run {run}/{}: passed in {took:.0} s (guest retries: {retries})",
                args.runs
            ),
            Err(class) => println!(
                "soak: run {run}/{}: FAILED in {took:.0} s: {class} ({})",
                args.runs,
                log.display()
            ),
        }
        outcomes.push(
            outcome.map_err(|class| {
                format!("soak failure: run {run}: {class} (log {})", log.display())
            }),
        );
    }
    Ok(outcomes)
}

/// One run of `argv` where KVM boots Linux, with its output.
fn one_lab_run(
    argv: &[String],
    env: &[(String, String)],
    mode: KvmMode,
    timeout: Duration,
) -> Result<(RunOutcome, String)> {
    if mode == KvmMode::Direct {
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .with_context(|| format!("Cannot run {}", argv[0]))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let outcome = if out.status.success() {
            Ok(0)
        } else {
            Err(classify_failure(&text, out.status.code().unwrap_or(128)))
        };
        return Ok((outcome, text));
    }
    let mut lab = LabRun::new(argv.iter().cloned());
    lab.env = env.to_vec();
    lab.timeout = timeout;
    lab.output = Output::Capture;
    // As in the suite: a run silent this long has a wedged L1 under it (an `L1 died` failure).
    // The tests' waits give up sooner, and the lab experiments finish a run or print well
    // within it.
    lab.silence_limit = Some(test::LAB_SILENCE_LIMIT);
    Ok(match lab.run() {
        Ok(o) if o.exit_code == 0 => (Ok(o.seen.guest_retries), o.output),
        Ok(o) => (Err(classify_failure(&o.output, o.exit_code)), o.output),
        // A run cut off or whose L1 died keeps what it printed until then in its log.
        Err(e) => match (
            e.downcast_ref::<lab::L1Died>(),
            e.downcast_ref::<lab::RunLost>(),
        ) {
            (Some(died), _) => (
                Err(format!(
                    "L1 died{}: {}",
                    if died.seen.failure_printed {
                        " after a test failure was printed"
                    } else {
                        ""
                    },
                    died.why
                )),
                died.output.clone(),
            ),
            (None, Some(lost)) => (Err(format!("lab failed: {e:#}")), lost.output.clone()),
            (None, None) => (Err(format!("lab failed: {e:#}")), String::new()),
        },
    })
}

/// The class of a failed run, from what it printed: how the guest died, and the first
/// failure line.
pub fn classify_failure(output: &str, code: i32) -> String {
    let kind = if output.contains("GuestReset(TripleFault)") {
        "guest triple fault"
    } else if output.contains("Kernel panic - not syncing") {
        "guest kernel panic"
    } else if output.contains(husk_integration::vm::QEMU_RESET_MARKER) {
        "guest triple fault"
    } else if output.contains("timed out") || output.contains("did not answer") {
        "stall (a wait for the guest timed out)"
    } else if output.contains("lab: the command printed nothing") {
        "L1 silent"
    } else {
        "test failure"
    };
    let first = output
        .lines()
        .find(|l| lab_retry::line_reports_test_failure(l))
        .map(|l| format!(": {}", l.trim()))
        .unwrap_or_default();
    format!("{kind} (exit status {code}){first}")
}

/// The test binary among `bins` that has a test named exactly `name` (asked with `--list`,
/// which needs no KVM).
fn binary_with_test(bins: &[PathBuf], name: &str) -> Result<PathBuf> {
    for bin in bins {
        if lists_test(bin, name)? {
            return Ok(bin.clone());
        }
    }
    bail!("No component test is named {name:?}")
}

fn lists_test(bin: &Path, name: &str) -> Result<bool> {
    let out = Command::new(bin)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("Cannot list the tests of {}", bin.display()))?;
    let want = format!("{name}: test");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == want))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classed_by_how_the_guest_died() {
        let tf = "INFO husk_vmm: VM ended event=GuestReset(TripleFault) status=GuestPanic\n\
                  thread 'bulk' panicked at integration/tests/containers.rs:90:9:\n";
        assert_eq!(
            classify_failure(tf, 101),
            "guest triple fault (exit status 101): thread 'bulk' panicked at \
             integration/tests/containers.rs:90:9:"
        );
        assert!(classify_failure("WaitProcess timed out after 240s", 101).starts_with("stall"));
        assert!(classify_failure("assertion failed", 101).starts_with("test failure"));
    }

    #[test]
    fn a_long_cycle_run_is_not_cut_off_for_its_length() {
        assert_eq!(cycles_run_timeout(300), RUN_TIMEOUT);
        // Session 23's 1,000 cycles took 1034 s; 2,000 need more than the base 20 min.
        assert_eq!(cycles_run_timeout(2000), Duration::from_secs(4000));
    }
}
