//! Exec round trip of `true` into a running container: the time from the host's ExecProcess
//! call to the WaitProcess reply carrying the exit status, through the real agent in a real
//! guest (the same [`Pod`] the component tests use, rootfs on virtio-fs).
//!
//! Run by `cargo xtask bench exec` (in the lab where this host's KVM cannot boot Linux), with
//! the environment `cargo xtask test` gives the component tests. Prints one line per run and a
//! closing `exec round trip of true: median … ms` line.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use husk_integration::pod::{process, spec, Pod, WAIT};
use husk_shim::agent::StdioConfig;

/// Execs measured when no count is given.
const DEFAULT_RUNS: usize = 20;
/// Execs before measuring (page cache, agent warm-up).
const WARMUP_RUNS: usize = 2;

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

async fn exec_true(pod: &Pod, eid: &str) -> Result<f64> {
    let json = serde_json::to_vec(&process(&["true"]))?;
    let t = Instant::now();
    pod.client
        .exec_process("c1", eid, json, StdioConfig::default())
        .await
        .with_context(|| format!("ExecProcess {eid}"))?;
    let w = pod
        .client
        .wait_process("c1", eid, WAIT)
        .await
        .with_context(|| format!("WaitProcess {eid}"))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if w.exit_status != 0 {
        bail!("`true` exited {}", w.exit_status);
    }
    Ok(ms)
}

fn main() -> Result<()> {
    let runs = match std::env::args().nth(1) {
        Some(n) => n.parse().context("usage: husk-bench-exec [RUNS]")?,
        None => DEFAULT_RUNS,
    };
    if runs == 0 {
        bail!("RUNS must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pod = Pod::boot(256).await;
        pod.create("c1", &spec(&["sleep", "100000"]), StdioConfig::default())
            .await;
        pod.client.start_container("c1").await?;
        for i in 0..WARMUP_RUNS {
            exec_true(&pod, &format!("warm{i}")).await?;
        }
        let mut samples = Vec::with_capacity(runs);
        for i in 0..runs {
            let ms = exec_true(&pod, &format!("e{i}")).await?;
            println!("exec true run {}: {ms:.1} ms", i + 1);
            samples.push(ms);
        }
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(0.0, f64::max);
        println!(
            "exec round trip of true: median {:.1} ms (min {min:.1}, max {max:.1}) over {runs} runs",
            median_ms(samples)
        );
        pod.client.signal_process("c1", "", libc::SIGKILL, false).await?;
        pod.client.wait_process("c1", "", WAIT).await?;
        pod.client.remove_container("c1", false).await?;
        pod.shutdown().await;
        Ok(())
    })
}
