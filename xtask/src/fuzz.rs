//! `cargo xtask fuzz`: coverage-guided fuzzing of husk's guest-facing parsers (`fuzz/`) on the
//! stable toolchain.
//!
//! What `cargo fuzz build --sanitizer none` does, without the tool: the fuzz workspace is
//! built for the host triple (so build scripts and proc macros stay uninstrumented) with
//! LLVM's SanitizerCoverage passes that libFuzzer reads (inline 8-bit counters, the PC table,
//! comparison tracing), `--cfg fuzzing`, debug assertions and overflow checks on. Each target
//! then runs from a working corpus seeded with `fuzz/corpus/<target>`; a crash leaves its
//! input in `target/fuzz/artifacts/<target>/` and fails the command.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cache;

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &[
    "vsock_device",
    "mmio_registers",
    "agent_requests",
    "guest_replies",
];

/// Seconds per target of the suite's smoke run.
pub const SMOKE_SECONDS: u64 = 30;

/// The host triple the targets are built for (an explicit `--target` keeps RUSTFLAGS off
/// build scripts and proc macros).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The instrumentation `cargo fuzz` adds with `--sanitizer none`.
const RUSTFLAGS: &[&str] = &[
    "--cfg",
    "fuzzing",
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Targets to run (all of them when none is named).
    pub targets: Vec<String>,
    /// Stop each target after this many seconds.
    #[arg(long, conflicts_with = "runs")]
    pub seconds: Option<u64>,
    /// Stop each target after this many executions.
    #[arg(long)]
    pub runs: Option<u64>,
}

/// What one target's run did (libFuzzer's final statistics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Inputs executed.
    pub execs: u64,
    /// Executions per second over the run.
    pub execs_per_sec: u64,
    /// Coverage features at the end (`ft:` of the last status line).
    pub features: u64,
    /// Inputs in the working corpus at the end.
    pub corpus: u64,
}

/// Runs `cargo xtask fuzz`.
pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "unknown fuzz target {t:?} (targets: {})",
                    TARGETS.join(", ")
                );
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    let limit = match (args.seconds, args.runs) {
        (_, Some(runs)) => Limit::Runs(runs),
        (Some(s), None) => Limit::Seconds(s),
        (None, None) => Limit::Seconds(SMOKE_SECONDS),
    };
    let bins = build()?;
    for target in targets {
        let stats = run_target(&bins, target, limit)?;
        println!(
            "{target}: {} executions in {}, {} exec/s, 0 crashes, {} features, corpus {}",
            stats.execs,
            limit.describe(),
            stats.execs_per_sec,
            stats.features,
            stats.corpus
        );
    }
    Ok(())
}

/// The suite's smoke: every target for [`SMOKE_SECONDS`] (seed corpus first).
pub fn smoke() -> Result<()> {
    let bins = build()?;
    for target in TARGETS {
        let stats = run_target(&bins, target, Limit::Seconds(SMOKE_SECONDS))?;
        eprintln!(
            "    {target}: {} executions, {} exec/s, no crash",
            stats.execs, stats.execs_per_sec
        );
    }
    Ok(())
}

/// When a target stops.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Seconds(u64),
    Runs(u64),
}

impl Limit {
    fn flag(self) -> String {
        match self {
            Self::Seconds(s) => format!("-max_total_time={s}"),
            Self::Runs(n) => format!("-runs={n}"),
        }
    }

    fn describe(self) -> String {
        match self {
            Self::Seconds(s) => format!("{s} s"),
            Self::Runs(n) => format!("a limit of {n} runs"),
        }
    }
}

/// Builds every target; returns the directory holding the binaries.
fn build() -> Result<PathBuf> {
    let root = cache::workspace_root();
    let target_dir = cache::target_dir().join("fuzz");
    let status = Command::new(env!("CARGO"))
        .current_dir(root.join("fuzz"))
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        .args(["build", "--release", "--locked", "--target", TRIPLE])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .context("Cannot run cargo build for fuzz/")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    Ok(target_dir.join(TRIPLE).join("release"))
}

/// Runs one target until `limit`; a crash, leak or timeout fails.
fn run_target(bins: &Path, target: &str, limit: Limit) -> Result<Stats> {
    let root = cache::workspace_root();
    let work = cache::target_dir().join("fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    let started = Instant::now();
    let out = Command::new(bins.join(target))
        .arg(limit.flag())
        .arg("-print_final_stats=1")
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .arg(root.join("fuzz/corpus").join(target))
        .output()
        .with_context(|| format!("Cannot run the fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({}) after {:.0} s; the input is in {}:\n{}",
            out.status,
            started.elapsed().as_secs_f64(),
            artifacts.display(),
            tail.join("\n")
        );
    }
    let stats = parse_stats(&log);
    if stats.execs == 0 {
        bail!("fuzz target {target} printed no statistics:\n{log}");
    }
    Ok(stats)
}

/// Reads libFuzzer's `-print_final_stats` lines and its last status line.
pub fn parse_stats(log: &str) -> Stats {
    let mut stats = Stats::default();
    let stat =
        |line: &str, key: &str| -> Option<u64> { line.strip_prefix(key)?.trim().parse().ok() };
    for line in log.lines() {
        if let Some(n) = stat(line, "stat::number_of_executed_units:") {
            stats.execs = n;
        }
        if let Some(n) = stat(line, "stat::average_exec_per_sec:") {
            stats.execs_per_sec = n;
        }
        if line.starts_with('#') && line.contains(" ft: ") {
            let field = |key: &str| {
                line.split_whitespace()
                    .skip_while(|w| *w != key)
                    .nth(1)
                    .and_then(|v| v.split('/').next())
                    .and_then(|v| v.parse().ok())
            };
            if let Some(ft) = field("ft:") {
                stats.features = ft;
            }
            if let Some(corp) = field("corp:") {
                stats.corpus = corp;
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_final_statistics_are_read() {
        let log = "INFO: Seed: 1\n\
            #174796\tREDUCE cov: 813 ft: 2320 corp: 402/828Kb lim: 20495 exec/s: 8739 rss: 29Mb\n\
            #175091\tDONE   cov: 813 ft: 2321 corp: 403/828Kb lim: 20495 exec/s: 8337 rss: 29Mb\n\
            Done 175091 runs in 21 second(s)\n\
            stat::number_of_executed_units: 175091\n\
            stat::average_exec_per_sec:     8337\n\
            stat::new_units_added:          2121\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                execs: 175091,
                execs_per_sec: 8337,
                features: 2321,
                corpus: 403
            }
        );
        assert_eq!(parse_stats("no statistics").execs, 0);
    }
}
