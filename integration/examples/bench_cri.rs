//! `cargo xtask bench cri`: a Kubernetes pod on husk next to the same pod on runc, through
//! containerd's CRI plugin with CNI's bridge (the CRI tests' fixture), runs interleaved
//! (alternating which runtime goes first) in one containerd:
//! * **RunPodSandbox → Ready**: the call's wall time (it returns when the pod is ready);
//! * **CreateContainer + StartContainer → running**: both calls' wall time, for a container
//!   running busybox `nc -ll -p 5002 -e /bin/cat` (an echo server);
//! * **host ↔ pod round trip**: the median of 200 one-byte echoes on one TCP connection from
//!   the host (the CNI bridge's side) to the pod's IP;
//! * **host ↔ pod throughput**: 32 MiB written to the echo server and read back at the same
//!   time on one connection (MiB/s each way);
//! * **pod host memory**: the PSS of the pod's shim and all its descendants (under husk the
//!   VMM, its waiter and virtiofsd; under runc the pause and app processes), with the pod
//!   and its container running (networking on), from `/proc/<pid>/smaps_rollup`.
//!
//! Runs where a KVM boots Linux (the lab here), with the component tests' environment;
//! `BENCH_RUNS` pods per runtime (default 10).

#[path = "../tests/cri/client.rs"]
#[allow(dead_code)]
mod client;
#[allow(dead_code)] // the tests' streaming client; the benchmark does not stream
#[path = "../tests/cri/stream.rs"]
mod stream;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use client::Cri;
use husk_integration::containerd::Runtime;

const ECHO_PORT: u16 = 5002;
const ROUND_TRIPS: usize = 200;
const STREAM_BYTES: usize = 32 << 20;

#[derive(Debug, Default)]
struct Series {
    pod_ms: Vec<f64>,
    container_ms: Vec<f64>,
    rtt_us: Vec<f64>,
    mib_s: Vec<f64>,
    pss_mib: Vec<f64>,
}

fn label(r: Runtime) -> &'static str {
    match r {
        Runtime::Husk => "husk",
        Runtime::Runc => "runc",
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Connects to the pod's echo server, retrying while it starts.
fn connect(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                s.set_nodelay(true).expect("TCP_NODELAY");
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("read timeout");
                return s;
            }
            Err(e) if Instant::now() > deadline => panic!("connect {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The median round trip of one byte, in µs.
fn round_trip(addr: SocketAddr) -> f64 {
    let mut s = connect(addr);
    let mut b = [0u8; 1];
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS + 10 {
        let t = Instant::now();
        s.write_all(&[i as u8]).expect("echo write");
        s.read_exact(&mut b).expect("echo read");
        assert_eq!(b[0], i as u8, "the echo server sent something else");
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    median(times)
}

/// Writes `STREAM_BYTES` and reads them back, concurrently; MiB/s each way.
fn throughput(addr: SocketAddr) -> f64 {
    let s = connect(addr);
    let mut writer = s.try_clone().expect("clone the stream");
    let t = Instant::now();
    let sent = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = STREAM_BYTES;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n]).expect("stream write");
            left -= n;
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let mut reader = s;
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    while got < STREAM_BYTES {
        match reader.read(&mut buf).expect("stream read") {
            0 => break,
            n => got += n,
        }
    }
    sent.join().expect("the writer");
    assert_eq!(got, STREAM_BYTES, "the echo server returned less");
    (STREAM_BYTES as f64 / (1 << 20) as f64) / t.elapsed().as_secs_f64()
}

/// The PSS of the pod's shim (the one started with `-id <pod_id>`) and its descendants, MiB.
fn pod_pss_mib(pod_id: &str) -> f64 {
    let shim = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"-id" && w[1] == pod_id.as_bytes())
        })
        .unwrap_or_else(|| panic!("no shim runs pod {pod_id}"));
    let mut kib = 0u64;
    let mut todo = vec![shim];
    while let Some(pid) = todo.pop() {
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        kib += rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    kib as f64 / 1024.0
}

fn one_pod(cri: &mut Cri, runtime: Runtime, run: u32, series: &mut Series) {
    cri.set_runtime(runtime);
    let pod = cri.pod_config(&format!("bench-{}-{run}", label(runtime)));
    let t = Instant::now();
    let pod_id = cri.run_pod(&pod);
    let pod_ms = t.elapsed().as_secs_f64() * 1e3;
    let ip = cri
        .pod_status(&pod_id)
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    let echo = cri.container_config(
        "echo",
        0,
        &["nc", "-ll", "-p", &ECHO_PORT.to_string(), "-e", "/bin/cat"],
    );
    let t = Instant::now();
    cri.start_container(&pod_id, &pod, echo);
    let container_ms = t.elapsed().as_secs_f64() * 1e3;
    let addr: SocketAddr = format!("{ip}:{ECHO_PORT}").parse().expect("pod address");
    let rtt_us = round_trip(addr);
    let mib_s = throughput(addr);
    let pss_mib = pod_pss_mib(&pod_id);
    cri.remove_pod(&pod_id);
    println!(
        "  run {run:>3} {:<4} pod {pod_ms:>7.0} ms  container {container_ms:>6.0} ms  rtt {rtt_us:>7.0} µs  {mib_s:>7.1} MiB/s  pss {pss_mib:>6.1} MiB",
        label(runtime)
    );
    series.pod_ms.push(pod_ms);
    series.container_ms.push(container_ms);
    series.rtt_us.push(rtt_us);
    series.mib_s.push(mib_s);
    series.pss_mib.push(pss_mib);
}

fn main() {
    let runs: u32 = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // The husk fixture configures both handlers (husk and runc) in one containerd.
    let mut cri = Cri::start();
    assert_eq!(
        cri.runtime(),
        Runtime::Husk,
        "run the benchmark with husk's environment"
    );
    println!("bench cri: {runs} pods per runtime, interleaved");
    let mut husk = Series::default();
    let mut runc = Series::default();
    for run in 1..=runs {
        let order = if run % 2 == 1 {
            [Runtime::Husk, Runtime::Runc]
        } else {
            [Runtime::Runc, Runtime::Husk]
        };
        for runtime in order {
            let series = match runtime {
                Runtime::Husk => &mut husk,
                Runtime::Runc => &mut runc,
            };
            one_pod(&mut cri, runtime, run, series);
        }
    }
    cri.containerd()
        .assert_no_leftovers(Duration::from_secs(60));
    println!();
    println!("| figure (median of {runs}) | husk | runc | husk/runc |");
    println!("|---|---|---|---|");
    let row = |name: &str, h: &[f64], r: &[f64], digits: usize| {
        let (h, r) = (median(h.to_vec()), median(r.to_vec()));
        println!("| {name} | {h:.digits$} | {r:.digits$} | {:.2} |", h / r);
    };
    row("RunPodSandbox → ready, ms", &husk.pod_ms, &runc.pod_ms, 0);
    row(
        "CreateContainer + StartContainer, ms",
        &husk.container_ms,
        &runc.container_ms,
        0,
    );
    row(
        "host ↔ pod TCP round trip, µs",
        &husk.rtt_us,
        &runc.rtt_us,
        0,
    );
    row(
        "host ↔ pod TCP echo throughput, MiB/s each way",
        &husk.mib_s,
        &runc.mib_s,
        1,
    );
    row(
        "pod host memory (PSS of shim + descendants), MiB",
        &husk.pss_mib,
        &runc.pss_mib,
        1,
    );
}
