//! Launches the lab's QEMU and follows its console until the command's exit marker.
//!
//! QEMU runs TCG with `-cpu max`, which emulates AMD SVM, so the L1 kernel's kvm_amd gives a
//! `/dev/kvm` that boots Linux guests, on shadow paging ([`DEFAULT_KVM_AMD_PARAMS`]); the host's
//! own /dev/kvm is PVM and does not (DESIGN.md "Host facts"). The host root is shared read-only over
//! virtio-9p, the job directory and the read-write shares (cargo target dir, husk cache)
//! at their own paths. A watchdog kills QEMU when the boot or the whole run overruns.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::info;

use super::console::{classify, Line, LineSplitter, Marker};
use super::emulator::LabQemu;
use super::image::LabKernel;

/// 9p mount tags the lab init knows.
pub const ROOT_TAG: &str = "hostroot";
pub const JOB_TAG: &str = "huskjob";
/// How long the L1 may take to power off after the command's exit marker.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// A running command silent this long gets the L1's vCPU states printed (repeatedly), so
/// a wedged L1 shows where it is stuck before the run timeout kills it.
const SILENCE_REPORT: Duration = Duration::from_secs(120);
/// How long an L1 found asleep with interrupts pending is watched again before it counts as
/// wedged.
const WEDGE_RECHECK: Duration = Duration::from_secs(5);
/// kvm_amd's parameters in the L1 unless an experiment sets others: `npt=0`, shadow paging
/// for the L2 instead of the emulated nested paging. Measured on the bulk test (BENCHMARKS.md,
/// "Lab configurations"): with nested paging the L2 triple-faulted in the 100 MiB stream in
/// about one run in three; with shadow paging it did not (14 runs). The price: tests that
/// start many processes run slower (the e2e binary ~1.7x), as every guest page-table change
/// now exits to the L1.
pub const DEFAULT_KVM_AMD_PARAMS: &str = "npt=0";
/// The monitor socket's name in the job directory.
const MONITOR_SOCKET: &str = "hmp.sock";
/// In the job directory: asks the lab init for the L1's kernel symbols...
pub const KALLSYMS_WANT: &str = "kallsyms.want";
/// ...which it writes here (text symbols of /proc/kallsyms).
pub const KALLSYMS: &str = "kallsyms";

/// Everything one QEMU launch needs.
#[derive(Debug)]
pub struct Launch<'a> {
    pub kernel: &'a LabKernel,
    pub initramfs: &'a Path,
    pub job_dir: &'a Path,
    /// Read-write shares: (mount tag, host path = guest path).
    pub rw_shares: &'a [(String, PathBuf)],
    pub nonce: &'a str,
    pub smp: u32,
    pub mem_mib: u32,
    /// Show the L1's boot console (no `quiet`) on stderr, for debugging the lab.
    pub verbose: bool,
    /// The host's TSC frequency, which TCG passes through to the L1.
    pub tsc_khz: Option<u64>,
    /// The cached kernel symbols of the L1 (used when this boot wrote none).
    pub symbols: &'a Path,
    /// See `LabRun::silence_limit`.
    pub silence_limit: Option<Duration>,
    /// Words added to the L1 kernel's command line (`HUSK_LAB_L1_CMDLINE`), for lab
    /// experiments: kernel options, and `husk_lab.kvm_amd=a=1,b=0` for kvm_amd's parameters.
    pub l1_cmdline_extra: Option<String>,
    /// QEMU's `-cpu` for the L1 (`max`, or `HUSK_LAB_CPU`).
    pub cpu: &'a str,
    /// The emulator: Debian's installed QEMU, or backports' (`HUSK_LAB_QEMU`).
    pub qemu: &'a LabQemu,
}

/// Where the command's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Each line to our stdout as it arrives.
    Stream,
    /// Collected and returned.
    Capture,
}

/// What the command's output showed, for the retry decisions (`husk_integration::lab_retry`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// A line reported a test failure.
    pub failure_printed: bool,
    /// Lines of guest retries the command printed.
    pub guest_retries: u32,
}

impl Seen {
    fn observe(&mut self, line: &str) {
        use husk_integration::lab_retry;
        self.failure_printed |= lab_retry::line_reports_test_failure(line);
        if lab_retry::line_is_guest_retry(line) {
            self.guest_retries += 1;
        }
    }
}

/// How one launch ended.
#[derive(Debug)]
pub enum Ended {
    /// The command ran and exited with this status.
    Exited {
        code: i32,
        kvm_ready: Duration,
        output: String,
        seen: Seen,
    },
    /// The lab init reported a failure before the command ran (never retried).
    InitFailed {
        reason: String,
        console: Vec<String>,
    },
    /// The L1 died or hung before the command started (may be retried).
    BootLost { why: String, console: Vec<String> },
    /// The run timed out while the command ran (never retried).
    RunLost {
        why: String,
        /// What the command printed (with [`Output::Capture`]).
        output: String,
    },
    /// The L1 itself ended (reset, triple fault, panic) while the command ran: the command's
    /// outcome is unknown. The lab never retries it; a caller may, within its own budget.
    L1Died {
        why: String,
        seen: Seen,
        /// What the command printed (with [`Output::Capture`]).
        output: String,
    },
}

/// QEMU's command line for `launch` (without the program name).
pub fn qemu_args(launch: &Launch<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = launch.qemu.args.iter().map(OsString::from).collect();
    args.extend(
        [
            "-M",
            "microvm,rtc=on",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ]
        .iter()
        .map(OsString::from),
    );
    // `max` emulates AMD SVM with nested paging; `HUSK_LAB_CPU` may add or drop features
    // for an experiment (e.g. `max,avx=off,avx2=off`).
    args.extend(["-cpu".into(), launch.cpu.into()]);
    // Multi-threaded TCG: one host thread per L1 vCPU. `thread=single` was tried against
    // the wedges (lab/hold_kvm.rs) and was worse: the slower L2 guests hit emulation faults
    // (recursive page faults, a vCPU that stopped exiting) in 2 of the first 3 e2e tests; one
    // L1 vCPU (lab::DEFAULT_SMP) was worse too.
    args.extend(["-accel".into(), "tcg,thread=multi".into()]);
    let mut monitor = OsString::from("unix:");
    monitor.push(escape_qemu_opt(&launch.job_dir.join(MONITOR_SOCKET)));
    monitor.push(",server=on,wait=off");
    args.extend(["-monitor".into(), monitor]);
    args.extend(["-smp".into(), launch.smp.to_string().into()]);
    args.extend(["-m".into(), launch.mem_mib.to_string().into()]);
    args.extend([
        "-kernel".into(),
        launch.kernel.image.clone().into_os_string(),
    ]);
    args.extend(["-initrd".into(), launch.initramfs.as_os_str().to_owned()]);
    // quiet: every console byte is slow under emulation; mitigations=off: page-table
    // isolation and retpolines only slow TCG down; reboot=t + -no-reboot: the lab's
    // `reboot -f` (and a panic, via panic=-1) ends QEMU. nokaslr: the silence report
    // names kernel addresses from the kallsyms an earlier boot saved.
    //
    // tsc_early_khz: under a loaded host the L1's PIT calibration of the TSC can fail
    // ("tsc: Unable to calibrate against PIT ... Marking TSC unstable") and the boot then
    // hangs (4 of 25 launches in one series). TCG's TSC is the host's, so its frequency
    // is known; tsc=reliable keeps the clocksource watchdog from dropping it under load.
    let quiet = if launch.verbose { "" } else { " quiet" };
    let tsc = match launch.tsc_khz {
        Some(khz) => format!(" tsc_early_khz={khz} tsc=reliable"),
        None => String::new(),
    };
    // husk_lab.kvm_amd: the L1 KVM's module parameters, read by the lab init (the last one
    // wins, so HUSK_LAB_L1_CMDLINE can override the default).
    let mut cmdline = format!(
        "console=ttyS0{quiet}{tsc} mitigations=off nokaslr reboot=t panic=-1 husk_lab.nonce={} \
         husk_lab.kvm_amd={DEFAULT_KVM_AMD_PARAMS}",
        launch.nonce
    );
    if let Some(extra) = &launch.l1_cmdline_extra {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    args.extend(["-append".into(), cmdline.into()]);
    let mut share = |id: &str, path: &Path, tag: &str, readonly: bool| {
        let ro = if readonly { ",readonly=on" } else { "" };
        let mut fsdev = OsString::from(format!(
            "local,id={id},security_model=none,multidevs=remap{ro},path="
        ));
        fsdev.push(escape_qemu_opt(path));
        args.extend(["-fsdev".into(), fsdev]);
        args.extend([
            "-device".into(),
            format!("virtio-9p-device,fsdev={id},mount_tag={tag}").into(),
        ]);
    };
    share("root", Path::new("/"), ROOT_TAG, true);
    share("job", launch.job_dir, JOB_TAG, false);
    for (i, (tag, path)) in launch.rw_shares.iter().enumerate() {
        share(&format!("rw{i}"), path, tag, false);
    }
    args
}

/// QEMU option values escape a comma by doubling it.
fn escape_qemu_opt(path: &Path) -> OsString {
    OsString::from(path.to_string_lossy().replace(',', ",,"))
}

fn spawn(launch: &Launch<'_>) -> Result<Child> {
    let program = &launch.qemu.program;
    let mut cmd = Command::new(program);
    cmd.args(qemu_args(launch))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the forked child before exec and only calls prctl,
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            // QEMU dies with xtask, so a killed test run leaves no emulator behind.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        });
    }
    cmd.spawn().with_context(|| {
        format!(
            "Cannot start {} (install qemu-system-x86)",
            program.display()
        )
    })
}

/// Boots the lab once and follows it until the command's exit, a failure or a timeout.
pub fn launch_once(
    launch: &Launch<'_>,
    output: Output,
    boot_timeout: Duration,
    run_timeout: Duration,
) -> Result<Ended> {
    let started = Instant::now();
    let mut child = spawn(launch)?;
    let mut stdout = child.stdout.take().context("QEMU stdout not piped")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut splitter = LineSplitter::default();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            for line in splitter.push(&buf[..n]) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        }
        if let Some(rest) = splitter.finish() {
            let _ = tx.send(rest);
        }
    });

    let mut console = Vec::new(); // L1 boot output, shown only when the boot fails
    let mut captured = String::new();
    let mut kvm_ready = None;
    let mut command_started = None;
    let mut exit_code = None;
    let mut exit_seen = None;
    let mut last_output = Instant::now();
    let mut silent_since = Instant::now();
    let mut symbols = None;
    let mut seen = Seen::default();
    let ended = loop {
        let deadline = match (exit_seen, command_started) {
            (Some(t), _) => t + TEARDOWN_TIMEOUT,
            (None, None) => started + boot_timeout,
            (None, Some(t)) => t + run_timeout,
        };
        let report_at = (command_started.is_some() && exit_seen.is_none())
            .then(|| last_output + SILENCE_REPORT)
            .filter(|t| *t < deadline);
        let wait = report_at
            .unwrap_or(deadline)
            .saturating_duration_since(Instant::now());
        let raw = match rx.recv_timeout(wait) {
            Ok(raw) => {
                last_output = Instant::now();
                silent_since = last_output;
                raw
            }
            Err(RecvTimeoutError::Disconnected) => break None,
            Err(RecvTimeoutError::Timeout) if report_at.is_some() => {
                let map = symbols.get_or_insert_with(|| {
                    let fresh = launch.job_dir.join(KALLSYMS);
                    super::monitor::SymbolMap::load(if fresh.exists() {
                        &fresh
                    } else {
                        launch.symbols
                    })
                });
                let socket = launch.job_dir.join(MONITOR_SOCKET);
                let sampled = super::monitor::cpu_states(&socket);
                let states = match &sampled {
                    Ok(s) => super::monitor::describe(s, map),
                    Err(e) => format!("cannot read them ({e:#})"),
                };
                let silent = silent_since.elapsed();
                eprintln!(
                    "lab: the command printed nothing for {:.0} s (ran {:.0} s); {states}",
                    silent.as_secs_f64(),
                    command_started.map_or(0.0, |t: Instant| t.elapsed().as_secs_f64())
                );
                // An L1 asleep with interrupts pending, the same 5 s later, is wedged now: no
                // need to wait out the silence limit (seen: 3 times in 2 sessions).
                let asleep = launch.silence_limit.is_some()
                    && sampled.as_ref().is_ok_and(|first| {
                        super::monitor::asleep_with_interrupts_pending(first) && {
                            std::thread::sleep(WEDGE_RECHECK);
                            super::monitor::cpu_states(&socket).is_ok_and(|again| again == *first)
                        }
                    });
                let wedged = if asleep {
                    Some(format!(
                        "the command printed nothing for {:.0} s and every L1 vCPU stayed \
                         halted with interrupts pending for {WEDGE_RECHECK:?}: the emulator no \
                         longer wakes the L1",
                        silent.as_secs_f64()
                    ))
                } else {
                    launch.silence_limit.filter(|l| silent >= *l).map(|limit| {
                        format!(
                            "the command printed nothing for {:.0} s, longer than it ever waits \
                             without printing ({limit:?}): the L1 is wedged",
                            silent.as_secs_f64()
                        )
                    })
                };
                if let Some(why) = wedged {
                    let _ = child.kill();
                    break Some(Ended::L1Died {
                        why: format!("{why}; {states}"),
                        seen,
                        output: std::mem::take(&mut captured),
                    });
                }
                last_output = Instant::now();
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                if exit_code.is_some() {
                    break None; // the lab did not power off by itself; the run is complete
                }
                break Some(match command_started {
                    None => Ended::BootLost {
                        why: format!("no command start within {boot_timeout:?} of launch"),
                        console: std::mem::take(&mut console),
                    },
                    Some(_) => Ended::RunLost {
                        why: format!("the command did not finish within {run_timeout:?}"),
                        output: std::mem::take(&mut captured),
                    },
                });
            }
        };
        if exit_code.is_some() {
            continue; // lab teardown chatter after the exit marker
        }
        match classify(&raw, launch.nonce) {
            Line::Marker(Marker::KvmReady) => {
                let t = started.elapsed();
                kvm_ready = Some(t);
                info!(
                    "lab: using an L1 Linux {} under QEMU TCG ({}: {}, nested SVM); /dev/kvm after {:.1} s",
                    launch.kernel.release,
                    launch.qemu.name,
                    launch.qemu.program.display(),
                    t.as_secs_f64()
                );
            }
            Line::Marker(Marker::Start) => command_started = Some(Instant::now()),
            Line::Marker(Marker::Exit(code)) => {
                exit_code = Some(code);
                exit_seen = Some(Instant::now());
            }
            Line::Marker(Marker::Fail(reason)) => {
                let _ = child.kill();
                break Some(Ended::InitFailed {
                    reason,
                    console: std::mem::take(&mut console),
                });
            }
            Line::Output(text) if command_started.is_none() => {
                if launch.verbose {
                    eprintln!("L1| {text}");
                }
                console.push(text);
            }
            Line::Output(text) => {
                seen.observe(&text);
                match output {
                    Output::Stream => {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{text}");
                        let _ = out.flush();
                    }
                    Output::Capture => {
                        captured.push_str(&text);
                        captured.push('\n');
                    }
                }
            }
        }
    };
    let status = wait_briefly(&mut child);
    let _ = reader.join();
    if let Some(ended) = ended {
        return Ok(ended);
    }
    Ok(match (exit_code, command_started) {
        (Some(code), _) => Ended::Exited {
            code,
            kvm_ready: kvm_ready.unwrap_or_default(),
            output: captured,
            seen,
        },
        (None, None) => Ended::BootLost {
            why: format!("QEMU ended ({status}) before the command started"),
            console,
        },
        (None, Some(_)) => Ended::L1Died {
            why: format!("QEMU ended ({status}) while the command ran, without an exit status"),
            seen,
            output: captured,
        },
    })
}

/// Waits for QEMU to exit after its console closed; kills it if it lingers.
fn wait_briefly(child: &mut Child) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                return child
                    .wait()
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
            }
        }
    }
}
