//! One container process: its stdio plumbing and its exit.
//!
//! [`ProcessIo::prepare`] makes the guest-side ends (pipes, or a pty in tty mode) that the
//! process gets as fds 0–2, from the vsock streams the host attached. [`Process::spawn`]
//! starts the copy tasks and one supervisor that publishes the exit only after the process
//! has exited (routed from the reaper) *and* its stdout/stderr copies have reached EOF and
//! been flushed to the host, so a waiter never misses the tail of the output.
//!
//! A stdin stream is never half-closed by the agent while the host may still send: the
//! stream is dropped whole when its copy ends. (An early guest-side `SHUTDOWN(SEND)` plus the
//! host's own half-close at EOF turns into a full hang-up on the VMM's host socket, which
//! husk-vmm's vsock stopped watching with data still queued: a 10 MiB `cat` then never saw
//! its EOF.)

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use husk_agent_api::stdio::StreamKind;
use nix::fcntl::OFlag;
use nix::pty::openpty;
use nix::unistd::pipe2;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch, Notify};
use tracing::debug;

use crate::reaper::Exit;

/// `VEOF` default (^D): what a tty stdin EOF from the host becomes.
const TTY_EOF: u8 = 0x04;
/// Pipe buffer size for stdout/stderr (`F_SETPIPE_SZ`); bigger pipes, fewer wake-ups.
const PIPE_SIZE_BYTES: i32 = 1 << 20;

/// Errors preparing stdio.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Cannot create a pipe or pty for the process
    #[error("Cannot create a pipe or pty for the process")]
    Plumbing(#[source] nix::Error),
    /// Cannot open /dev/null
    #[error("Cannot open /dev/null")]
    DevNull(#[source] std::io::Error),
    /// Cannot set up the copy of a stream
    #[error("Cannot set up the copy of a stream")]
    Copy(#[source] std::io::Error),
    /// The process is not attached to a tty
    #[error("The process is not attached to a tty")]
    NoTty,
    /// Cannot resize the tty
    #[error("Cannot resize the tty")]
    Resize(#[source] std::io::Error),
}

/// The fds a new process gets as stdin, stdout and stderr.
#[derive(Debug)]
pub struct ChildFds {
    /// fd 0.
    pub stdin: OwnedFd,
    /// fd 1.
    pub stdout: OwnedFd,
    /// fd 2.
    pub stderr: OwnedFd,
}

/// The agent-side ends, before the process exists.
#[derive(Debug)]
pub struct ProcessIo {
    streams: HashMap<StreamKind, UnixStream>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    tty_master: Option<OwnedFd>,
}

fn dev_null() -> Result<OwnedFd, ProcessError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(ProcessError::DevNull)?;
    Ok(f.into())
}

impl ProcessIo {
    /// Makes the pipes (or pty) for the attached `streams`; undeclared streams are /dev/null.
    pub fn prepare(
        streams: HashMap<StreamKind, UnixStream>,
        tty_size: Option<(u16, u16)>,
    ) -> Result<(Self, ChildFds), ProcessError> {
        let mut io = Self {
            streams,
            stdin: None,
            stdout: None,
            stderr: None,
            tty_master: None,
        };
        if io.streams.contains_key(&StreamKind::Tty) {
            let ws = tty_size.map(|(rows, cols)| nix::pty::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            });
            let pty = openpty(ws.as_ref(), None).map_err(ProcessError::Plumbing)?;
            let slave = pty.slave;
            // Every agent fd is close-on-exec: the container helper gets exactly the fds
            // it is handed (see `container::helper`).
            nix::fcntl::fcntl(
                slave.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(ProcessError::Plumbing)?;
            let fds = ChildFds {
                stdin: slave.try_clone().map_err(ProcessError::DevNull)?,
                stdout: slave.try_clone().map_err(ProcessError::DevNull)?,
                stderr: slave,
            };
            nix::fcntl::fcntl(
                pty.master.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(ProcessError::Plumbing)?;
            io.tty_master = Some(pty.master);
            return Ok((io, fds));
        }
        let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(ProcessError::Plumbing);
        let stdin = if io.streams.contains_key(&StreamKind::Stdin) {
            let (r, w) = pipe()?;
            io.stdin = Some(w);
            r
        } else {
            dev_null()?
        };
        let mut out = |kind| -> Result<OwnedFd, ProcessError> {
            if io.streams.contains_key(&kind) {
                let (r, w) = pipe()?;
                // Best effort: a larger buffer only saves wake-ups.
                let _ = nix::fcntl::fcntl(
                    r.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE_BYTES),
                );
                if kind == StreamKind::Stdout {
                    io.stdout = Some(r);
                } else {
                    io.stderr = Some(r);
                }
                Ok(w)
            } else {
                dev_null()
            }
        };
        let stdout = out(StreamKind::Stdout)?;
        let stderr = out(StreamKind::Stderr)?;
        Ok((
            io,
            ChildFds {
                stdin,
                stdout,
                stderr,
            },
        ))
    }
}

/// A running (or exited) process the agent started.
#[derive(Debug)]
pub struct Process {
    /// Guest pid.
    pub pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    close_stdin: Arc<Notify>,
    tty_master: Option<Arc<OwnedFd>>,
    stdin_open: Arc<Mutex<bool>>,
}

impl Process {
    /// Starts the copies and the exit supervisor of the process `pid` with `io`; `exited`
    /// is its registration with the reaper.
    pub fn spawn(
        pid: i32,
        exited: oneshot::Receiver<Exit>,
        io: ProcessIo,
    ) -> Result<Arc<Self>, ProcessError> {
        let (tx, rx) = watch::channel(None);
        let close_stdin = Arc::new(Notify::new());
        let stdin_open = Arc::new(Mutex::new(true));
        let mut drains = Vec::new();
        let mut streams = io.streams;
        let mut tty_master = None;
        if let Some(master) = io.tty_master {
            let master = Arc::new(master);
            tty_master = Some(master.clone());
            let stream = streams
                .remove(&StreamKind::Tty)
                .ok_or(ProcessError::NoTty)?;
            let (vs_read, vs_write) = stream.into_split();
            let reader = tokio::fs::File::from_std(File::from(
                master.try_clone().map_err(ProcessError::Copy)?,
            ));
            let writer = tokio::fs::File::from_std(File::from(
                master.try_clone().map_err(ProcessError::Copy)?,
            ));
            drains.push(tokio::spawn(copy_out(pid, "tty", reader, vs_write)));
            tokio::spawn(copy_in(vs_read, writer, close_stdin.clone(), true));
        } else {
            if let (Some(w), Some(s)) = (io.stdin, streams.remove(&StreamKind::Stdin)) {
                let w = pipe::Sender::from_owned_fd(w).map_err(ProcessError::Copy)?;
                // The whole stream, not its read half: dropping a write half would half-close
                // the stream towards the host while the host is still sending.
                tokio::spawn(copy_in(s, w, close_stdin.clone(), false));
            }
            for (fd, kind) in [
                (io.stdout, StreamKind::Stdout),
                (io.stderr, StreamKind::Stderr),
            ] {
                if let (Some(fd), Some(s)) = (fd, streams.remove(&kind)) {
                    let r = pipe::Receiver::from_owned_fd(fd).map_err(ProcessError::Copy)?;
                    drains.push(tokio::spawn(copy_out(
                        pid,
                        if kind == StreamKind::Stdout {
                            "stdout"
                        } else {
                            "stderr"
                        },
                        r,
                        s,
                    )));
                }
            }
        }
        tokio::spawn(async move {
            // The sender side lives in the reaper's table; it only drops if the agent does.
            let exit = exited.await.unwrap_or(Exit::Signal(libc::SIGKILL));
            for d in drains {
                let _ = d.await;
            }
            debug!(pid, ?exit, "process exited and its output is drained");
            let _ = tx.send(Some(exit));
        });
        Ok(Arc::new(Self {
            pid,
            exit: rx,
            close_stdin,
            tty_master,
            stdin_open,
        }))
    }

    /// The exit, if the process has exited and its output is drained.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit (after the output is drained).
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit::Signal(libc::SIGKILL);
            }
        }
    }

    /// Closes the process's stdin (EOF), as if the host had half-closed the stream.
    pub fn close_stdin(&self) {
        let mut open = self.stdin_open.lock().unwrap_or_else(|e| e.into_inner());
        if *open {
            *open = false;
            // notify_one stores a permit, so a copy task that is between reads sees it too.
            self.close_stdin.notify_one();
        }
    }

    /// Sets the tty window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ProcessError> {
        let master = self.tty_master.as_ref().ok_or(ProcessError::NoTty)?;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `struct winsize` from a valid pointer; the fd is ours.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(ProcessError::Resize(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Copies process output to the host until EOF, then half-closes the host stream.
/// A pty master reports EIO once every slave fd is closed: that is its EOF.
async fn copy_out(
    pid: i32,
    what: &'static str,
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        if to.write_all(&buf[..n]).await.is_err() {
            debug!(
                pid,
                what, total, "the host stopped reading; discarding the rest"
            );
            // The host went away: keep draining so the process does not block forever.
            while let Ok(n) = from.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            return;
        }
    }
    let _ = to.flush().await;
    let _ = to.shutdown().await;
    debug!(pid, what, total, "output copied to the host");
}

/// Copies host input to the process until the host half-closes or [`Process::close_stdin`];
/// then closes the process's stdin (in tty mode: sends the EOF character).
async fn copy_in(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    close: Arc<Notify>,
    tty: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = close.notified() => break,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    if tty {
        // The writer is a dup of the master: dropping it leaves the output side open.
        let _ = to.write_all(&[TTY_EOF]).await;
    }
    // Dropping the pipe writer is the process's stdin EOF.
    let _ = to.flush().await;
}
