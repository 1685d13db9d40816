//! The container helper: libcontainer's process-cloning calls, run in a fresh
//! single-threaded process that the agent execs from its own binary.
//!
//! Why a separate process: libcontainer makes a container's intermediate and init processes
//! (and an exec's) with a raw `clone3` from the calling process, and those children run Rust
//! code (they allocate, log, parse) before they `execve`. A child cloned from a
//! multi-threaded process inherits every lock another thread held at that instant, musl's
//! malloc lock above all, with no thread left to release it: its first allocation then
//! deadlocks. musl's `fork(3)` takes those locks around the fork; a raw clone does not. The
//! agent has threads (tokio's blocking pool copies tty streams and runs blocking calls), so
//! it never calls those libcontainer functions itself. Kata's rustjail solves the same
//! problem the same way.
//!
//! How: the agent spawns `/proc/self/exe __container-helper` with `std::process::Command`
//! (`posix_spawn`, or `fork(3)` + `execve`: either is safe in a threaded process, the child
//! runs nothing that takes a lock before `execve`), sends it one [`Request`] and reads one
//! [`Reply`]. Fresh from `execve`, the helper has one thread, no runtime and no lock held by
//! anyone, so libcontainer's clones are safe there. [`Container::start`], `delete`, `kill`,
//! `pause` and `resume` do not clone and stay in the agent.
//!
//! The helper's fds:
//! * 0: the request, JSON, then EOF;
//! * 1: the reply, one JSON line: the new process's pid or the error chain;
//! * 2: the console (inherited from the agent), for the helper's log lines;
//! * the process's stdin, stdout and stderr at the numbers the request names (the agent
//!   clears their close-on-exec flag only while it spawns the helper, under a lock, so no
//!   other child inherits them).
//!
//! Exits: libcontainer clones the container's process as a child of the helper (its init is
//! a sibling of its intermediate process) and the helper only waits for the intermediate.
//! When the helper exits, the kernel hands the process to the agent (PID 1; elsewhere a child
//! subreaper) and the agent's one reaper collects it. It may exit before the agent has read
//! its pid (an exec of `true`), so the agent takes a [`reaper::Epoch`] before it spawns the
//! helper and registers the pid against it: such an exit is kept for the registration, and
//! an older unclaimed status of a reused pid is not mistaken for it.
//!
//! [`Container::start`]: libcontainer::container::Container::start

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::unistd::pipe2;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::YOUKI_ROOT;
use crate::process::ChildFds;
use crate::reaper::{self, Exit};
use crate::seccomp::{SeccompExecutor, WireProgram};

/// The hidden subcommand that makes `husk-agent` the helper.
pub const HELPER_ARG: &str = "__container-helper";
/// The agent's own binary, whatever it is called.
const SELF_EXE: &str = "/proc/self/exe";
/// The log level variable the helper reads (the agent passes its own level).
pub const HELPER_LOG_ENV: &str = "HUSK_AGENT_LOG";
/// Bound on a request (the seccomp programs dominate; a few KiB in practice).
const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Bound on a reply (one pid or one error chain).
const MAX_REPLY_BYTES: u64 = 64 << 10;

/// Serialises "clear close-on-exec, spawn, close": between the first and the last step the
/// process's stdio fds would leak into any other child the agent spawns.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

/// Errors of the helper, as the agent sees them.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// Cannot prepare the helper's pipes or fds
    #[error("Cannot prepare the container helper's pipes or fds")]
    Plumbing(#[source] nix::Error),
    /// Cannot start the helper
    #[error("Cannot start the container helper")]
    Spawn(#[source] std::io::Error),
    /// Cannot exchange the request and reply
    #[error("Cannot talk to the container helper")]
    Io(#[source] std::io::Error),
    /// Cannot encode the request
    #[error("Cannot encode the container helper's request")]
    Request(#[source] serde_json::Error),
    /// The helper's reply is not valid
    #[error("The container helper's reply is not valid")]
    Reply(#[source] serde_json::Error),
    /// The helper named an impossible pid
    #[error("The container helper named an impossible pid {0}")]
    BadPid(i32),
    /// The helper ended without a reply
    #[error("The container helper ended without a reply ({0:?})")]
    Died(Exit),
    /// libcontainer failed in the helper
    #[error("{0}")]
    Failed(String),
}

/// What the helper is asked to make.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Op {
    /// A container from the bundle (`config.json`), its init stopped before the user program.
    Create {
        /// The bundle directory.
        bundle: PathBuf,
    },
    /// A process in the running container, from an OCI `process` JSON file.
    Exec {
        /// The process file.
        process: PathBuf,
    },
}

/// The request on the helper's fd 0.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// The container id.
    pub id: String,
    /// What to make.
    pub op: Op,
    /// The helper's fd numbers of the process's stdin, stdout and stderr.
    pub stdio: [RawFd; 3],
    /// The compiled seccomp programs to install before `execve`.
    pub seccomp: Vec<WireProgram>,
}

/// The reply on the helper's fd 1.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    /// The new process's pid (guest pid namespace).
    Pid(i32),
    /// libcontainer's error chain.
    Failed(String),
}

/// A process the helper made.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: i32,
    /// Its exit, from the reaper.
    pub exited: oneshot::Receiver<Exit>,
}

/// True when this process was started as the helper.
pub fn invoked() -> bool {
    std::env::args_os().nth(1).as_deref() == Some(OsStr::new(HELPER_ARG))
}

// ---- the agent's side ----

/// Runs `op` for container `id` in a helper and returns the new process. Blocks for as long
/// as libcontainer takes (call it on the blocking pool). `fds` are consumed.
pub fn run(
    id: &str,
    op: Op,
    executor: &SeccompExecutor,
    fds: ChildFds,
) -> Result<Spawned, HelperError> {
    let since = reaper::epoch();
    let started = std::time::Instant::now();
    let request = Request {
        id: id.to_owned(),
        op,
        stdio: [
            fds.stdin.as_raw_fd(),
            fds.stdout.as_raw_fd(),
            fds.stderr.as_raw_fd(),
        ],
        seccomp: executor.to_wire(),
    };
    let json = serde_json::to_vec(&request).map_err(HelperError::Request)?;
    let (req_read, req_write) = pipe2(OFlag::O_CLOEXEC).map_err(HelperError::Plumbing)?;
    let (reply_read, reply_write) = pipe2(OFlag::O_CLOEXEC).map_err(HelperError::Plumbing)?;
    let helper_pid = spawn(req_read, reply_write, fds)?;
    let spawned_at = started.elapsed();
    // Registered before anything can go wrong below, so the helper's exit is always claimed.
    let helper_exit = reaper::watch(helper_pid, since);
    // A write error means the helper died early; its reply (none) tells the rest.
    let _ = std::fs::File::from(req_write).write_all(&json);
    let reply = read_reply(reply_read)?;
    debug!(
        container = %id,
        helper_pid,
        spawn_us = spawned_at.as_micros(),
        total_us = started.elapsed().as_micros(),
        ?reply,
        "container helper answered"
    );
    match reply {
        Some(Reply::Pid(pid)) if pid <= 1 => Err(HelperError::BadPid(pid)),
        Some(Reply::Pid(pid)) => {
            tokio::spawn(async move {
                match helper_exit.await {
                    Ok(Exit::Code(0)) | Err(_) => {}
                    Ok(exit) => warn!(helper_pid, ?exit, "container helper ended badly"),
                }
            });
            Ok(Spawned {
                pid,
                exited: reaper::watch(pid, since),
            })
        }
        Some(Reply::Failed(msg)) => Err(HelperError::Failed(msg)),
        None => {
            let exit = helper_exit
                .blocking_recv()
                .unwrap_or(Exit::Signal(libc::SIGKILL));
            Err(HelperError::Died(exit))
        }
    }
}

/// Starts the helper with the request pipe as fd 0, the reply pipe as fd 1 and the process's
/// stdio inherited at their own numbers; returns its pid.
fn spawn(req_read: OwnedFd, reply_write: OwnedFd, fds: ChildFds) -> Result<i32, HelperError> {
    let level = tracing::level_filters::LevelFilter::current().to_string();
    let mut cmd = Command::new(SELF_EXE);
    cmd.arg(HELPER_ARG)
        .env_clear()
        .env(HELPER_LOG_ENV, level)
        .stdin(Stdio::from(req_read))
        .stdout(Stdio::from(reply_write))
        .stderr(Stdio::inherit());
    let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for fd in [&fds.stdin, &fds.stdout, &fds.stderr] {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(HelperError::Plumbing)?;
    }
    let child = cmd.spawn().map_err(HelperError::Spawn);
    // Closes our copies of the process's stdio and of the helper's pipe ends before the
    // lock is released (the helper holds its own now).
    drop(fds);
    drop(cmd);
    let child = child?;
    i32::try_from(child.id()).map_err(|e| HelperError::Spawn(std::io::Error::other(e)))
}

/// Reads the one reply line; `None` if the helper closed its end without one.
fn read_reply(fd: OwnedFd) -> Result<Option<Reply>, HelperError> {
    let mut line = Vec::new();
    BufReader::new(std::fs::File::from(fd).take(MAX_REPLY_BYTES))
        .read_until(b'\n', &mut line)
        .map_err(HelperError::Io)?;
    if line.last() != Some(&b'\n') {
        return Ok(None);
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(HelperError::Reply)
}

// ---- the helper's side ----

/// The helper's main: reads the request, makes the process, writes the reply. The exit
/// status is 0 whenever a reply was written.
pub fn serve() -> i32 {
    // Container processes start with SIGPIPE at its default (as under runc); Rust's runtime
    // set it to "ignore" in this process, and the clones would inherit that.
    // SAFETY: resetting one signal's disposition; no handler is installed.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let reply = match read_request() {
        Ok(req) => {
            debug!(container = %req.id, op = ?req.op, "container helper");
            let t = std::time::Instant::now();
            let made = make(req);
            debug!(build_us = t.elapsed().as_micros(), "libcontainer done");
            match made {
                Ok(pid) => Reply::Pid(pid),
                Err(msg) => Reply::Failed(msg),
            }
        }
        Err(msg) => Reply::Failed(msg),
    };
    let Ok(mut line) = serde_json::to_vec(&reply) else {
        return 1;
    };
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    match out.write_all(&line).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn read_request() -> Result<Request, String> {
    let mut json = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_REQUEST_BYTES)
        .read_to_end(&mut json)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("invalid request: {e}"))
}

/// Takes ownership of an inherited fd, checking that it is open.
fn inherited(fd: RawFd) -> Result<OwnedFd, String> {
    if fd <= libc::STDERR_FILENO {
        return Err(format!("stdio fd {fd} collides with the helper's own"));
    }
    fcntl(fd, FcntlArg::F_GETFD).map_err(|e| format!("stdio fd {fd}: {e}"))?;
    // SAFETY: the agent passed this fd to this process for this one use; nothing else here
    // owns it (checked open just above).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn youki(id: &str) -> Result<ContainerBuilder, String> {
    ContainerBuilder::new(id.to_owned(), SyscallType::Linux)
        .with_root_path(YOUKI_ROOT)
        .map_err(|e| chain(&e))
}

/// Runs the libcontainer builder; the pid or the error chain.
fn make(req: Request) -> Result<i32, String> {
    let [stdin, stdout, stderr] = req.stdio;
    let (stdin, stdout, stderr) = (inherited(stdin)?, inherited(stdout)?, inherited(stderr)?);
    let executor = SeccompExecutor::from_wire(req.seccomp);
    let builder = youki(&req.id)?
        .with_executor(executor)
        .with_stdin(stdin)
        .with_stdout(stdout)
        .with_stderr(stderr);
    match req.op {
        Op::Create { bundle } => builder
            .as_init(bundle)
            .with_systemd(false)
            .with_detach(true)
            .with_no_pivot(true)
            .build()
            .map_err(|e| chain(&e))
            .and_then(|c| {
                c.pid()
                    .map(|p| p.as_raw())
                    .ok_or_else(|| "libcontainer returned no init pid".to_owned())
            }),
        Op::Exec { process } => builder
            .as_tenant()
            .with_process(Some(process))
            .with_detach(true)
            .build()
            .map(|p| p.as_raw())
            .map_err(|e| chain(&e)),
    }
}

/// An error and its sources, `: `-joined (what the host will see).
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let req = Request {
            id: "c1".into(),
            op: Op::Exec {
                process: "/run/husk/bundles/c1/exec-e1.json".into(),
            },
            stdio: [7, 8, 9],
            seccomp: vec![vec![(0x20, 0, 0, 4), (0x06, 0, 0, 0x7fff_0000)]],
        };
        let json = serde_json::to_vec(&req).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&json).unwrap(), req);
        for reply in [Reply::Pid(42), Reply::Failed("no".into())] {
            let json = serde_json::to_vec(&reply).unwrap();
            assert_eq!(serde_json::from_slice::<Reply>(&json).unwrap(), reply);
        }
    }

    #[test]
    fn a_missing_reply_line_is_none() {
        let (r, w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        std::fs::File::from(w).write_all(b"{\"Pid\":").unwrap();
        assert!(read_reply(r).unwrap().is_none());
        let (r, w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        std::fs::File::from(w).write_all(b"{\"Pid\":5}\n").unwrap();
        assert_eq!(read_reply(r).unwrap(), Some(Reply::Pid(5)));
    }

    #[test]
    fn inherited_fds_must_be_open_and_above_stdio() {
        assert!(inherited(1).is_err());
        assert!(inherited(1_000_000).is_err());
    }
}
