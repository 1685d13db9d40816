//! Zombie reaping: as PID 1 the agent inherits every orphaned process and must collect it.
//!
//! There is exactly one `waitpid(-1)` loop in the guest, here. Processes the agent starts
//! (container init and exec processes, handed to PID 1 when the container helper that made
//! them exits, and the helpers themselves) register interest with [`watch`]; their exit
//! status is sent to that waiter. An exit can be reaped before its pid is registered (an exec
//! of `true` ends before the agent has its pid), so unclaimed statuses are kept, bounded, for
//! a later [`watch`] to pick up. Pids are reused, so each kept status carries the reaper's
//! [`Epoch`] and [`watch`] only takes a status reaped after the epoch its caller took before
//! the process could exist: a stale status of an earlier holder of the pid is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How many exit statuses of unregistered pids are kept for a late [`watch`].
const MAX_UNCLAIMED: usize = 1024;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The shell convention: the code, or 128 + the signal.
    pub fn status(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
        }
    }
}

/// A point in the reaper's history: the number of exits reaped so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Epoch(u64);

#[derive(Default)]
struct Routes {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    /// Exits nobody waited for yet, with the epoch they were reaped in.
    unclaimed: HashMap<i32, (Epoch, Exit)>,
    unclaimed_order: VecDeque<i32>,
    reaped: u64,
}

static ROUTES: Mutex<Option<Routes>> = Mutex::new(None);

fn routes() -> MutexGuard<'static, Option<Routes>> {
    // A poisoned lock only means a panic elsewhere (which aborts the guest agent anyway).
    ROUTES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The current epoch: take it before starting a process whose exit you will [`watch`].
pub fn epoch() -> Epoch {
    let mut guard = routes();
    Epoch(guard.get_or_insert_with(Routes::default).reaped)
}

/// Registers interest in the exit of `pid`, a process that did not exist before `since`.
/// If it was already reaped (after `since`), the receiver is ready.
pub fn watch(pid: i32, since: Epoch) -> oneshot::Receiver<Exit> {
    let (tx, rx) = oneshot::channel();
    let mut guard = routes();
    let r = guard.get_or_insert_with(Routes::default);
    match r.unclaimed.remove(&pid) {
        Some((at, exit)) if at > since => {
            r.unclaimed_order.retain(|p| *p != pid);
            let _ = tx.send(exit);
        }
        stale => {
            if stale.is_some() {
                r.unclaimed_order.retain(|p| *p != pid);
            }
            r.waiters.insert(pid, tx);
        }
    }
    rx
}

fn deliver(pid: i32, exit: Exit) {
    let mut guard = routes();
    let r = guard.get_or_insert_with(Routes::default);
    r.reaped += 1;
    let now = Epoch(r.reaped);
    debug!(
        pid,
        ?exit,
        registered = r.waiters.contains_key(&pid),
        "reaped"
    );
    if let Some(tx) = r.waiters.remove(&pid) {
        debug!(pid, ?exit, "process exited");
        let _ = tx.send(exit);
        return;
    }
    debug!(pid, ?exit, "reaped an orphan");
    if r.unclaimed.insert(pid, (now, exit)).is_none() {
        r.unclaimed_order.push_back(pid);
    }
    while r.unclaimed_order.len() > MAX_UNCLAIMED {
        if let Some(old) = r.unclaimed_order.pop_front() {
            r.unclaimed.remove(&old);
        }
    }
}

/// Reaps on every SIGCHLD, forever.
pub async fn run() {
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGCHLD; zombies will not be reaped");
            return;
        }
    };
    loop {
        reap_all();
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

/// Collects every child that has exited, without blocking, and routes the exits.
fn reap_all() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(WaitStatus::Exited(pid, code)) => deliver(pid.as_raw(), Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                deliver(pid.as_raw(), Exit::Signal(sig as i32))
            }
            Ok(status) => debug!(?status, "reaped"),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "waitpid failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_reach_waiters_registered_before_or_after() {
        let since = epoch();
        let mut early = watch(-10, since);
        deliver(-10, Exit::Code(7));
        assert_eq!(early.try_recv().unwrap(), Exit::Code(7));
        deliver(-11, Exit::Signal(9));
        let mut late = watch(-11, since);
        assert_eq!(late.try_recv().unwrap(), Exit::Signal(9));
        assert_eq!(Exit::Signal(9).status(), 137);
    }

    #[test]
    fn a_stale_status_of_a_reused_pid_is_not_taken() {
        deliver(-20, Exit::Code(1));
        let since = epoch();
        let mut rx = watch(-20, since);
        assert!(rx.try_recv().is_err(), "an exit from before the epoch");
        deliver(-20, Exit::Code(2));
        assert_eq!(rx.try_recv().unwrap(), Exit::Code(2));
    }
}
