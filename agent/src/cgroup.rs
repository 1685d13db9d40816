//! Reading a container's cgroup v2 files: processes, statistics and OOM kills.
//!
//! Containers live in `/sys/fs/cgroup/husk/<container-id>` (the agent sets the spec's
//! `cgroupsPath`). The files and their formats are the kernel's
//! (Documentation/admin-guide/cgroup-v2.rst); a missing controller file reads as zero.

use std::path::{Path, PathBuf};

use husk_agent_api::agent::{CpuStats, IoStats, MemoryStats, PidsStats, StatsContainerResponse};

/// Where the cgroup2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of every container's cgroup, relative to [`CGROUP_ROOT`].
pub const CONTAINERS_PARENT: &str = "husk";

/// The spec `cgroupsPath` of a container.
pub fn spec_path(container_id: &str) -> PathBuf {
    Path::new("/").join(CONTAINERS_PARENT).join(container_id)
}

/// The directory of a container's cgroup.
pub fn dir(container_id: &str) -> PathBuf {
    Path::new(CGROUP_ROOT)
        .join(CONTAINERS_PARENT)
        .join(container_id)
}

/// Errors reading a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Cannot read the cgroup file
    #[error("Cannot read the cgroup file {0}")]
    Read(PathBuf, #[source] std::io::Error),
}

fn read(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| CgroupError::Read(path, e))
}

/// `key value` lines (cpu.stat, memory.events): the value of `key`, 0 if absent.
pub fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A single number or `max` (memory.max, pids.max): `max` is 0 (unlimited).
fn limit(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// io.stat: the sums of `rbytes=` and `wbytes=` over every device.
fn io_bytes(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            r = r.saturating_add(v.parse().unwrap_or(0));
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            w = w.saturating_add(v.parse().unwrap_or(0));
        }
    }
    (r, w)
}

/// Every pid in the container's cgroup (and its sub-cgroups).
pub fn pids(container_id: &str) -> Result<Vec<u32>, CgroupError> {
    let mut out = Vec::new();
    collect_pids(&dir(container_id), &mut out)?;
    out.sort_unstable();
    Ok(out)
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) -> Result<(), CgroupError> {
    out.extend(
        read(dir, "cgroup.procs")?
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok()),
    );
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), out)?;
            }
        }
    }
    Ok(())
}

/// Whether the container's cgroup is frozen (paused): `cgroup.freeze` reads 1.
pub fn frozen(container_id: &str) -> bool {
    read(&dir(container_id), "cgroup.freeze").is_ok_and(|t| t.trim() == "1")
}

/// The oom_kill counter of memory.events (0 if unreadable).
pub fn oom_kills(container_id: &str) -> u64 {
    read(&dir(container_id), "memory.events")
        .map(|t| keyed(&t, "oom_kill"))
        .unwrap_or(0)
}

/// cpu, memory, pids and io statistics of a container.
pub fn stats(container_id: &str) -> Result<StatsContainerResponse, CgroupError> {
    let d = dir(container_id);
    // cgroup.procs must exist: a missing cgroup is an error, a missing controller is zero.
    read(&d, "cgroup.procs")?;
    let opt = |f: &str| read(&d, f).unwrap_or_default();
    let cpu = opt("cpu.stat");
    let (read_bytes, write_bytes) = io_bytes(&opt("io.stat"));
    Ok(StatsContainerResponse {
        cpu: Some(CpuStats {
            usage_usec: keyed(&cpu, "usage_usec"),
            user_usec: keyed(&cpu, "user_usec"),
            system_usec: keyed(&cpu, "system_usec"),
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStats {
            usage_bytes: limit(&opt("memory.current")),
            limit_bytes: limit(&opt("memory.max")),
            oom_kill_count: keyed(&opt("memory.events"), "oom_kill"),
            ..Default::default()
        })
        .into(),
        pids: Some(PidsStats {
            current: limit(&opt("pids.current")),
            limit: limit(&opt("pids.max")),
            ..Default::default()
        })
        .into(),
        io: Some(IoStats {
            read_bytes,
            write_bytes,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_parse() {
        let cpu = "usage_usec 1200\nuser_usec 1000\nsystem_usec 200\n";
        assert_eq!(keyed(cpu, "user_usec"), 1000);
        assert_eq!(keyed(cpu, "nope"), 0);
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(events, "oom_kill"), 1);
        assert_eq!(limit("max\n"), 0);
        assert_eq!(limit("1048576\n"), 1 << 20);
        let io = "254:0 rbytes=100 wbytes=7 rios=1 wios=1\n254:16 rbytes=5 wbytes=3\n";
        assert_eq!(io_bytes(io), (105, 10));
    }
}
