//! Reads the guest facts the host cannot see from outside (kernel release, memory, CPUs,
//! the agent's mount points).
//!
//! The parsers take text so they are unit-tested on fixed inputs; `read_*` do the I/O.

use std::path::Path;

/// Where the kernel reports memory counters.
const MEMINFO_PATH: &str = "/proc/meminfo";
/// The kernel's list of online CPUs, e.g. `0-3,6` (Documentation/ABI/testing/sysfs-devices-system-cpu).
const CPU_ONLINE_PATH: &str = "/sys/devices/system/cpu/online";
/// The agent's mount table.
const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";
/// At most this many mount points are reported.
pub const MAX_MOUNT_POINTS: usize = 1024;
/// /proc/meminfo reports kibibytes.
const KIB: u64 = 1024;

/// Errors while reading guest facts.
#[derive(Debug, thiserror::Error)]
pub enum SysInfoError {
    /// Cannot read a kernel information file
    #[error("Cannot read {path}")]
    Read {
        /// The file that could not be read.
        path: &'static str,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A kernel information file has an unexpected format
    #[error("Unexpected format in {path}: {reason}")]
    Format {
        /// The file with the bad content.
        path: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// uname(2) failed
    #[error("uname(2) failed")]
    Uname(#[source] nix::Error),
}

/// Memory counters from /proc/meminfo, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total_bytes: u64,
    /// `MemAvailable`.
    pub available_bytes: u64,
}

/// Parses `MemTotal` and `MemAvailable` out of /proc/meminfo text.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, SysInfoError> {
    let field = |name: &str| -> Result<u64, SysInfoError> {
        let bad = |reason: String| SysInfoError::Format {
            path: MEMINFO_PATH,
            reason,
        };
        let line = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .ok_or_else(|| bad(format!("no {name} line")))?;
        let mut parts = line.split_whitespace();
        let kib: u64 = parts
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("{name} has no number")))?;
        if parts.next() != Some("kB") {
            return Err(bad(format!("{name} is not in kB")));
        }
        kib.checked_mul(KIB)
            .ok_or_else(|| bad(format!("{name} overflows")))
    };
    Ok(MemInfo {
        total_bytes: field("MemTotal")?,
        available_bytes: field("MemAvailable")?,
    })
}

/// Counts the CPUs in a kernel CPU list such as `0-3,6\n`.
pub fn parse_cpu_list(text: &str) -> Result<u32, SysInfoError> {
    let bad = |reason: String| SysInfoError::Format {
        path: CPU_ONLINE_PATH,
        reason,
    };
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| bad(format!("bad CPU number {s:?}")))
    };
    let mut count = 0u32;
    for range in text.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(range)?, num(range)?),
        };
        if last < first {
            return Err(bad(format!("descending range {range:?}")));
        }
        count = count
            .checked_add(last - first + 1)
            .ok_or_else(|| bad("too many CPUs".into()))?;
    }
    if count == 0 {
        return Err(bad("no CPU online".into()));
    }
    Ok(count)
}

/// The mount points (field 5) of /proc/<pid>/mountinfo text, at most [`MAX_MOUNT_POINTS`].
pub fn parse_mount_points(text: &str) -> Result<Vec<String>, SysInfoError> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .take(MAX_MOUNT_POINTS)
        .map(|line| {
            line.split(' ')
                .nth(4)
                .map(str::to_owned)
                .ok_or_else(|| SysInfoError::Format {
                    path: MOUNTINFO_PATH,
                    reason: format!("no mount point in {line:?}"),
                })
        })
        .collect()
}

fn read(path: &'static str) -> Result<String, SysInfoError> {
    std::fs::read_to_string(Path::new(path)).map_err(|source| SysInfoError::Read { path, source })
}

/// Reads the guest's memory counters.
pub fn read_meminfo() -> Result<MemInfo, SysInfoError> {
    parse_meminfo(&read(MEMINFO_PATH)?)
}

/// Reads the number of online CPUs.
pub fn read_online_cpus() -> Result<u32, SysInfoError> {
    parse_cpu_list(&read(CPU_ONLINE_PATH)?)
}

/// Reads the mount points of the agent's mount namespace.
pub fn read_mount_points() -> Result<Vec<String>, SysInfoError> {
    parse_mount_points(&read(MOUNTINFO_PATH)?)
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> Result<String, SysInfoError> {
    let uts = nix::sys::utsname::uname().map_err(SysInfoError::Uname)?;
    Ok(uts.release().to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        3014656 kB\nMemFree:         2900000 kB\n\
                           MemAvailable:    2950000 kB\nBuffers:               0 kB\n";

    #[test]
    fn mount_points_are_field_five_of_mountinfo() {
        let text = "22 1 0:21 / / rw,relatime - rootfs rootfs rw\n\
                    25 22 0:5 / /dev rw,nosuid - devtmpfs dev rw,size=4k\n\
                    31 22 0:27 / /run/husk/shared rw - virtiofs husk rw\n";
        assert_eq!(
            parse_mount_points(text).unwrap(),
            ["/", "/dev", "/run/husk/shared"]
        );
        assert!(parse_mount_points("22 1 0:21 /\n").is_err());
        let many = "1 1 0:1 / /m rw - tmpfs t rw\n".repeat(MAX_MOUNT_POINTS + 5);
        assert_eq!(parse_mount_points(&many).unwrap().len(), MAX_MOUNT_POINTS);
    }

    #[test]
    fn meminfo_is_converted_to_bytes() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total_bytes, 3_014_656 * 1024);
        assert_eq!(m.available_bytes, 2_950_000 * 1024);
    }

    #[test]
    fn meminfo_without_available_is_an_error() {
        let err = parse_meminfo("MemTotal: 1 kB\n").unwrap_err();
        assert!(err.to_string().contains("MemAvailable"), "{err}");
    }

    #[test]
    fn meminfo_rejects_other_units_and_garbage() {
        assert!(parse_meminfo("MemTotal: 1 MB\nMemAvailable: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
        // A line that merely starts with the name is not the field.
        assert!(parse_meminfo("MemTotalX: 1 kB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(parse_cpu_list("0\n").unwrap(), 1);
        assert_eq!(parse_cpu_list("0-1\n").unwrap(), 2);
        assert_eq!(parse_cpu_list("0-3,6,8-9\n").unwrap(), 7);
    }

    #[test]
    fn bad_cpu_lists_are_errors() {
        for bad in ["", "\n", "a", "3-1", "0-", "-1", "0,,x"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn this_host_has_facts() {
        assert!(!kernel_release().unwrap().is_empty());
        assert!(read_online_cpus().unwrap() >= 1);
        let m = read_meminfo().unwrap();
        assert!(m.available_bytes <= m.total_bytes);
    }
}
