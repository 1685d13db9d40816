//! What a runtime can leave behind on the host, and how to see it.
//!
//! A [`Snapshot`] lists the host state a pod may create: processes of the runtime (husk-vmm,
//! virtiofsd, the shims), mounts under the fixture's temp dir or `/run/husk`, entries of
//! `/run/husk`, shim sockets in `/run/containerd/s`, bundles in containerd's state and runc's
//! state for the test namespace, pinned network namespaces (`/run/netns`, mounts and entries)
//! and network interfaces. Comparing it with the snapshot taken when the fixture started
//! gives the [`Leftovers`]; the tests assert that it is empty once their pods are gone.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use super::HUSK_RUN_DIR;

/// Programs (argv[0] file names) that belong to a pod; any of them alive after its pod is
/// gone is a leak. `/proc/<pid>/comm` would truncate the shims' names to 15 bytes.
pub const POD_PROGRAMS: &[&str] = &[
    "husk-vmm",
    "virtiofsd",
    "containerd-shim-husk-v2",
    "containerd-shim-runc-v2",
];
/// Where containerd 1.6 shims put their sockets (`runtime/v2/shim/util_unix.go`).
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// Where ctr puts the stdio fifos of the tasks it starts (containerd's `cio`).
const FIFO_DIR: &str = "/run/containerd/fifo";
/// runc's state root as the runc shim sets it (`/run/containerd/runc/<namespace>`).
const RUNC_STATE_DIR: &str = "/run/containerd/runc";
/// containerd's bundle directory for v2 tasks, under its state dir.
const BUNDLE_DIR: &str = "state/io.containerd.runtime.v2.task";
/// Where containerd's CRI plugin pins a pod's network namespace (`/var/run/netns/cni-…`).
const NETNS_DIR: &str = "/run/netns";
/// The host's network interfaces (a pod's veth, a VM's tap).
const NET_DEVICES_DIR: &str = "/sys/class/net";

/// A process seen in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Proc {
    /// Its pid.
    pub pid: i32,
    /// Its command line, space separated.
    pub cmdline: String,
}

/// The host state a pod can leave behind, at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    processes: BTreeSet<Proc>,
    mounts: BTreeSet<String>,
    paths: BTreeSet<PathBuf>,
}

/// What is there now and was not there at the baseline.
#[derive(Debug, Clone, Default)]
pub struct Leftovers {
    /// Pod processes ([`POD_PROGRAMS`]).
    pub processes: Vec<Proc>,
    /// Mount points under the fixture's dir, `/run/husk` or `/run/netns`.
    pub mounts: Vec<String>,
    /// `/run/husk` entries, shim sockets, ctr's fifos, bundles, runc state, pinned network
    /// namespaces and network interfaces.
    pub paths: Vec<PathBuf>,
}

impl Snapshot {
    /// Looks at the host now; `dir` is the fixture's temp dir, `namespace` its namespace.
    pub fn take(dir: &Path, namespace: &str) -> Snapshot {
        let mut paths = BTreeSet::new();
        for d in [
            PathBuf::from(HUSK_RUN_DIR),
            PathBuf::from(SHIM_SOCKET_DIR),
            PathBuf::from(FIFO_DIR),
            Path::new(RUNC_STATE_DIR).join(namespace),
            dir.join(BUNDLE_DIR).join(namespace),
            PathBuf::from(NETNS_DIR),
            PathBuf::from(NET_DEVICES_DIR),
        ] {
            paths.extend(list_dir(&d));
        }
        let dir_text = dir.display().to_string();
        let mounts = mount_points()
            .into_iter()
            .filter(|m| {
                is_under(m, &dir_text) || is_under(m, HUSK_RUN_DIR) || is_under(m, NETNS_DIR)
            })
            .collect();
        Snapshot {
            processes: pod_processes().into_iter().collect(),
            mounts,
            paths,
        }
    }

    /// What this snapshot has that `baseline` did not.
    pub fn since(&self, baseline: &Snapshot) -> Leftovers {
        Leftovers {
            processes: self
                .processes
                .iter()
                .filter(|p| !baseline.processes.iter().any(|b| b.pid == p.pid))
                .cloned()
                .collect(),
            mounts: self.mounts.difference(&baseline.mounts).cloned().collect(),
            paths: self.paths.difference(&baseline.paths).cloned().collect(),
        }
    }
}

impl Leftovers {
    /// The pids of the processes that run the program whose file name is `name`.
    pub fn pids_of(&self, name: &str) -> Vec<i32> {
        self.processes
            .iter()
            .filter(|p| {
                p.cmdline
                    .split(' ')
                    .next()
                    .is_some_and(|a| a.ends_with(name))
            })
            .map(|p| p.pid)
            .collect()
    }

    /// How many of the processes run the program whose file name is `name`.
    pub fn count_program(&self, name: &str) -> usize {
        self.pids_of(name).len()
    }

    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty() && self.mounts.is_empty() && self.paths.is_empty()
    }

    /// SIGKILLs the leftover processes (the fixture's last resort on drop).
    pub fn kill_processes(&self) {
        for p in &self.processes {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.processes {
            writeln!(f, "  process {} {}", p.pid, p.cmdline)?;
        }
        for m in &self.mounts {
            writeln!(f, "  mount {m}")?;
        }
        for p in &self.paths {
            writeln!(f, "  path {}", p.display())?;
        }
        Ok(())
    }
}

fn is_under(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn list_dir(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

/// Every live process whose argv[0] names one of [`POD_PROGRAMS`].
pub fn pod_processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for pid in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = pid.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(argv0) = args.first() else { continue };
        let name = argv0.rsplit('/').next().unwrap_or(argv0);
        if POD_PROGRAMS.contains(&name) {
            out.push(Proc {
                pid,
                cmdline: args.join(" "),
            });
        }
    }
    out
}

/// The mount points of this mount namespace (`/proc/self/mountinfo` field 5, unescaped).
pub fn mount_points() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything mounted under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let d = dir.display().to_string();
    let mut mounts: Vec<String> = mount_points()
        .into_iter()
        .filter(|m| is_under(m, &d))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo(r"/plain\09"), r"/plain\09");
    }

    #[test]
    fn under_means_the_dir_or_below_it() {
        assert!(is_under("/run/husk", "/run/husk"));
        assert!(is_under("/run/husk/a/b", "/run/husk"));
        assert!(!is_under("/run/husk2", "/run/husk"));
    }

    #[test]
    fn leftovers_are_what_is_new() {
        let base = Snapshot {
            processes: [Proc {
                pid: 1,
                cmdline: "husk-vmm".into(),
            }]
            .into(),
            mounts: ["/run/husk/a".to_string()].into(),
            paths: [PathBuf::from("/run/husk/a")].into(),
        };
        let now = Snapshot {
            processes: [
                Proc {
                    pid: 1,
                    cmdline: "husk-vmm".into(),
                },
                Proc {
                    pid: 2,
                    cmdline: "virtiofsd".into(),
                },
            ]
            .into(),
            mounts: ["/run/husk/a".to_string(), "/run/husk/b".to_string()].into(),
            paths: [PathBuf::from("/run/husk/a")].into(),
        };
        let left = now.since(&base);
        assert_eq!(left.processes.len(), 1);
        assert_eq!(left.processes[0].pid, 2);
        assert_eq!(left.mounts, ["/run/husk/b"]);
        assert!(left.paths.is_empty());
        assert!(!left.is_empty());
        assert!(now.since(&now).is_empty());
    }
}
