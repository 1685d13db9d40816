//! `cargo xtask bench ctr`: what a user pays for a husk pod, next to runc, in one containerd.
//!
//! Two figures (BENCHMARKS.md):
//! * **Wall time** of `ctr run --rm <busybox> <id> true`, husk (`io.containerd.husk.v2`) against
//!   runc (`io.containerd.runc.v2`), runs interleaved (alternating which goes first) in the same
//!   private containerd (the end-to-end tests' fixture), medians and their ratio.
//! * **Host memory per idle pod**: `--pods` detached `sleep` pods at once; for each, the PSS
//!   (`/proc/<pid>/smaps_rollup`) of its shim and every descendant (husk-vmm, virtiofsd; under
//!   runc the container's processes). Guest RAM is a memfd shared by husk-vmm and virtiofsd, so
//!   PSS counts the guest pages it touched once; husk-vmm's `RssShmem` is shown on its own as
//!   the guest's resident memory.
//!
//! Where this host's KVM cannot boot Linux the bench runs inside the lab; `--runtime runc`
//! alone needs no VM but is measured in the lab as well, so both halves share one machine.

use std::collections::HashMap;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_integration::containerd::{Containerd, Runtime};

/// Arguments of `cargo xtask bench ctr`.
#[derive(Debug, Clone, clap::Args)]
pub struct CtrArgs {
    /// Runs per runtime (interleaved).
    #[arg(long, default_value_t = 20)]
    pub runs: u32,
    /// Idle pods for the memory figure.
    #[arg(long, default_value_t = 10)]
    pub pods: u32,
    /// Which runtimes to measure: `both`, `husk` or `runc`.
    #[arg(long, default_value = "both")]
    pub runtime: String,
    /// Run here (used inside the lab).
    #[arg(long, hide = true)]
    pub inner: bool,
}

fn runtimes(which: &str) -> Result<Vec<Runtime>> {
    Ok(match which {
        "both" => vec![Runtime::Husk, Runtime::Runc],
        "husk" => vec![Runtime::Husk],
        "runc" => vec![Runtime::Runc],
        other => bail!("--runtime {other}: expected both, husk or runc"),
    })
}

fn label(r: Runtime) -> &'static str {
    match r {
        Runtime::Husk => "husk",
        Runtime::Runc => "runc",
    }
}

/// `cargo xtask bench ctr`.
pub fn run(args: &CtrArgs) -> Result<()> {
    let rts = runtimes(&args.runtime)?;
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.inner {
        return run_inner(args, &rts);
    }
    crate::setup::ensure()?;
    let argv: Vec<String> = vec![
        std::env::current_exe()?.display().to_string(),
        "bench".into(),
        "ctr".into(),
        "--inner".into(),
        "--runs".into(),
        args.runs.to_string(),
        "--pods".into(),
        args.pods.to_string(),
        "--runtime".into(),
        args.runtime.clone(),
    ];
    let (env, mode) = if rts.contains(&Runtime::Husk) {
        let parts = crate::test::step(
            "build husk-vmm and the shim (release), the guest and the test image",
            crate::test::build_parts,
        )?;
        let mode = crate::lab::kvm_mode(&parts.vmm, &parts.kernel, &parts.initrd)?;
        (parts.env(mode), mode)
    } else {
        let image = crate::image::build_test_image()?;
        let env = vec![(
            crate::image::TEST_IMAGE_ENV.to_string(),
            image.display().to_string(),
        )];
        (env, crate::lab::KvmMode::Lab)
    };
    let code = match mode {
        crate::lab::KvmMode::Direct => Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env)
            .status()?
            .code()
            .unwrap_or(128),
        crate::lab::KvmMode::Lab => {
            eprintln!(
                "bench: measuring inside the lab (QEMU-TCG L1 with nested KVM): absolute times \
                 are the lab's, the ratio is the figure"
            );
            crate::lab::run(&argv, &env, Duration::from_secs(2 * 3600))?.exit_code
        }
    };
    if code != 0 {
        bail!("the benchmark failed (exit status {code})");
    }
    Ok(())
}

fn run_inner(args: &CtrArgs, rts: &[Runtime]) -> Result<()> {
    // One containerd for both: a husk fixture also runs runc.
    let host = if rts.contains(&Runtime::Husk) {
        Runtime::Husk
    } else {
        Runtime::Runc
    };
    let c = Containerd::start_with(host);
    eprintln!(
        "bench ctr: {} runs per runtime, interleaved; snapshotter {}",
        args.runs,
        c.snapshotter()
    );
    let mut times: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut failures: HashMap<&str, u32> = HashMap::new();
    for i in 0..args.runs {
        let mut order = rts.to_vec();
        if i % 2 == 1 {
            order.reverse();
        }
        for rt in order {
            let id = format!("bench-{}-{i}", label(rt));
            let argv = c.run_args_on(rt, &["--rm"], &id);
            let mut cmd = c.ctr_command(&argv);
            cmd.arg("true");
            let t = Instant::now();
            let out = cmd.output().context("Cannot run ctr")?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if out.status.success() {
                eprintln!("  run {:>3} {:<4} {ms:>8.0} ms", i + 1, label(rt));
                times.entry(label(rt)).or_default().push(ms);
            } else {
                eprintln!(
                    "  run {:>3} {:<4} FAILED ({}): {}",
                    i + 1,
                    label(rt),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                *failures.entry(label(rt)).or_default() += 1;
            }
        }
    }
    println!("| runtime | runs ok | failed | median ms | min | max |");
    println!("|---|---|---|---|---|---|");
    for rt in rts {
        let v = times.get(label(*rt)).cloned().unwrap_or_default();
        let min = v.iter().copied().reduce(f64::min);
        let max = v.iter().copied().reduce(f64::max);
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            label(*rt),
            v.len(),
            failures.get(label(*rt)).unwrap_or(&0),
            fmt(median(v)),
            fmt(min),
            fmt(max)
        );
    }
    if let (Some(h), Some(r)) = (
        times.get("husk").cloned().and_then(median),
        times.get("runc").cloned().and_then(median),
    ) {
        println!("ctr run --rm true, ratio husk/runc: {:.2}", h / r);
    }
    for rt in rts {
        idle_pods(&c, *rt, args.pods)?;
    }
    Ok(())
}

/// Starts `pods` idle pods on `rt`, measures each, removes them.
fn idle_pods(c: &Containerd, rt: Runtime, pods: u32) -> Result<()> {
    if pods == 0 {
        return Ok(());
    }
    let ids: Vec<String> = (0..pods)
        .map(|i| format!("idle-{}-{i}", label(rt)))
        .collect();
    for id in &ids {
        let mut argv = c.run_args_on(rt, &["-d"], id);
        argv.extend(["sleep", "1000000"]);
        let out = c.ctr(&argv);
        if !out.status.success() {
            bail!(
                "ctr run -d {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    for id in &ids {
        c.wait_task_status(id, "RUNNING", Duration::from_secs(300));
    }
    // Let start-up work settle before measuring "idle".
    std::thread::sleep(Duration::from_secs(5));
    let procs = proc_table();
    let mut per_pod = Vec::new();
    let mut guest = Vec::new();
    for id in &ids {
        let shim = procs
            .iter()
            .find(|p| p.argv0.starts_with("containerd-shim") && has_id(&p.cmdline, id))
            .with_context(|| format!("no shim process for {id}"))?;
        let tree = descendants(&procs, shim.pid);
        let pss_kib: u64 = tree.iter().map(|pid| pss_kib(*pid)).sum();
        let shmem: u64 = tree
            .iter()
            .filter(|pid| {
                procs
                    .iter()
                    .any(|p| p.pid == **pid && p.argv0 == "husk-vmm")
            })
            .map(|pid| status_kib(*pid, "RssShmem:"))
            .sum();
        eprintln!(
            "  {id}: {} processes, PSS {:.1} MiB, guest resident (husk-vmm RssShmem) {:.1} MiB",
            tree.len(),
            pss_kib as f64 / 1024.0,
            shmem as f64 / 1024.0
        );
        per_pod.push(pss_kib as f64 / 1024.0);
        guest.push(shmem as f64 / 1024.0);
    }
    println!(
        "idle pods ({}): {} pods, median PSS per pod {} MiB (max {}), of which guest resident {} MiB",
        label(rt),
        ids.len(),
        fmt(median(per_pod.clone())),
        fmt(per_pod.iter().copied().reduce(f64::max)),
        fmt(median(guest))
    );
    for id in &ids {
        let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    for id in &ids {
        c.wait_task_status(id, "STOPPED", Duration::from_secs(120));
        let _ = c.ctr(&["task", "delete", id]);
        let _ = c.ctr(&["container", "delete", id]);
    }
    Ok(())
}

fn has_id(cmdline: &[String], id: &str) -> bool {
    cmdline.windows(2).any(|w| w[0] == "-id" && w[1] == id)
}

#[derive(Debug)]
struct ProcInfo {
    pid: u32,
    ppid: u32,
    argv0: String,
    cmdline: Vec<String>,
}

fn proc_table() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let argv0 = cmdline
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
            .unwrap_or_default();
        let ppid = status_kib(pid, "PPid:") as u32;
        out.push(ProcInfo {
            pid,
            ppid,
            argv0,
            cmdline,
        });
    }
    out
}

/// `root` and all its descendants.
fn descendants(procs: &[ProcInfo], root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(procs.iter().filter(|p| p.ppid == parent).map(|p| p.pid));
        i += 1;
    }
    out
}

/// The first number of the `field` line of `/proc/<pid>/status` (kB for memory fields).
fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// PSS of a process in KiB (`/proc/<pid>/smaps_rollup`).
fn pss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(v: Vec<f64>) -> Option<f64> {
    super::median(v.into_iter())
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_ids_and_process_trees() {
        let cmd: Vec<String> = ["shim", "-namespace", "n", "-id", "idle-1", "-address", "a"]
            .map(String::from)
            .to_vec();
        assert!(has_id(&cmd, "idle-1"));
        assert!(!has_id(&cmd, "idle-10"));
        let p = |pid, ppid| ProcInfo {
            pid,
            ppid,
            argv0: String::new(),
            cmdline: Vec::new(),
        };
        let procs = vec![p(10, 1), p(11, 10), p(12, 11), p(13, 1)];
        assert_eq!(descendants(&procs, 10), [10, 11, 12]);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert!(runtimes("qemu").is_err());
    }
}
