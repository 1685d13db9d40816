//! A lab experiment, not a test: container create/run/remove cycles in one pod, to measure how
//! often the lab's L2 guest stops or triple-faults mid-run (BENCHMARKS.md, "Lab reliability,
//! session 8"). It needs the component tests' environment; run it in the lab:
//!
//! ```text
//! cargo build -p husk-integration --example container_cycles
//! cargo xtask lab --env HUSK_VMM=… --env HUSK_KERNEL=… --env HUSK_INITRD=… \
//!     --env HUSK_VIRTIOFSD=… --env HUSK_KVM_MODE=lab --env HUSK_TEST_ROOTFS=… \
//!     --env CYCLES=300 -- target/debug/examples/container_cycles
//! ```
//!
//! When a cycle makes no progress for 7 s it sends husk-vmm SIGUSR1 twice (its state dump:
//! vCPU registers, the code at RIP, the top of the stack) and prints the L1 KVM's debugfs
//! counters for the VM, then the VMM log and the console tail.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use husk_integration::pod::{spec, Pod};
use husk_integration::vm::last_lines;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

static PROGRESS: AtomicUsize = AtomicUsize::new(0);

/// The L1 KVM's non-zero debugfs counters of the VM of `pid`.
fn kvm_stats(pid: u32) -> String {
    let _ = std::process::Command::new("mount")
        .args(["-t", "debugfs", "none", "/sys/kernel/debug"])
        .status();
    let mut out = String::new();
    let Ok(dirs) = std::fs::read_dir("/sys/kernel/debug/kvm") else {
        return "no /sys/kernel/debug/kvm".into();
    };
    for dir in dirs.flatten() {
        if !dir
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{pid}-"))
        {
            continue;
        }
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(v) = std::fs::read_to_string(f.path()) {
                let v = v.trim();
                if !v.is_empty() && v != "0" && v.len() < 24 {
                    out.push_str(&format!(" {}={v}", f.file_name().to_string_lossy()));
                }
            }
        }
    }
    out
}

fn tail(path: &Path, lines: usize) -> String {
    last_lines(&std::fs::read_to_string(path).unwrap_or_default(), lines)
}

fn watchdog(pid: u32, dir: PathBuf) {
    let (mut last, mut still) = (0, 0);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = PROGRESS.load(Ordering::SeqCst);
        if now == last {
            still += 1;
        } else {
            (last, still) = (now, 0);
        }
        if still == 7 || still == 8 {
            eprintln!("WATCHDOG: cycle {now} made no progress for {still} s");
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGUSR1);
            eprintln!("WATCHDOG: L1 KVM counters:{}", kvm_stats(pid));
        }
        if still == 9 {
            eprintln!("WATCHDOG: vmm.log:\n{}", tail(&dir.join("vmm.log"), 20));
            eprintln!("WATCHDOG: console:\n{}", tail(&dir.join("console.log"), 20));
        }
    }
}

fn main() {
    let cycles: usize = std::env::var("CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let rt = husk_integration::experiment_runtime();
    rt.block_on(async {
        let pod = Pod::boot(256).await;
        let (pid, dir) = (pod.vm.pid(), pod.vm.dir().to_path_buf());
        std::thread::spawn(move || watchdog(pid, dir));
        let start = Instant::now();
        for i in 0..cycles {
            PROGRESS.store(i + 1, Ordering::SeqCst);
            // The share has rootfs links c1..c9; two alternate.
            let id = format!("c{}", 1 + i % 2);
            let o = pod.run(&id, &spec(&["sh", "-c", "echo hi"]), None).await;
            assert_eq!(o.stdout, b"hi\n", "cycle {i}");
            if i % 50 == 0 {
                eprintln!("cycle {i} at {:?}", start.elapsed());
            }
        }
        eprintln!("CYCLES DONE: {cycles} in {:?}", start.elapsed());
        pod.shutdown().await;
    });
}
