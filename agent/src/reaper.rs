//! Zombie reaping: as PID 1 the agent inherits every orphaned process and must collect it.
//!
//! Today the agent starts no processes of its own, so every exit is an orphan's. When the
//! container API arrives, exits of processes the agent started must be routed to their
//! owners from here (one `waitpid(-1)` loop per system), not waited on elsewhere.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, warn};

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

/// Collects every child that has exited, without blocking.
fn reap_all() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(status) => debug!(?status, "reaped"),
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "waitpid failed");
                return;
            }
        }
    }
}
