//! The shim's record of its containers and their processes (init and execs).
//!
//! The guest is the truth about processes; this is what containerd asks about between
//! calls: pids, states, stdio paths, exits. Each process carries a `watch` channel of its
//! exit, which `Wait` awaits and the exit watcher fills once the agent reported the exit and
//! the output was drained.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::types::task::Status;
use tokio::sync::{watch, Notify};

use crate::error::TaskError;
use crate::io::{Relay, StdioPaths};

/// How a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// When the shim learned of it.
    pub at: Timestamp,
}

/// Exit status reported for processes lost with their VM (the VM died or was killed).
pub const LOST_EXIT_STATUS: u32 = 255;

/// One process of a container.
#[derive(Debug)]
pub struct Process {
    /// Guest pid (0 until created).
    pub pid: u32,
    /// Created, running, paused or stopped.
    pub status: Status,
    /// containerd's stdio of it.
    pub stdio: StdioPaths,
    /// For an exec: the OCI process JSON to run.
    pub exec_spec: Option<Vec<u8>>,
    /// The relay until the exit watcher takes it.
    pub relay: Option<Relay>,
    /// Closes stdin (CloseIO).
    pub stdin_close: Option<Arc<Notify>>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    /// A process not yet running.
    pub fn new(stdio: StdioPaths, exec_spec: Option<Vec<u8>>) -> Self {
        Self {
            pid: 0,
            status: Status::CREATED,
            stdio,
            exec_spec,
            relay: None,
            stdin_close: None,
            exit_tx: watch::channel(None).0,
        }
    }

    /// The exit, once there is one.
    pub fn exit(&self) -> Option<Exit> {
        self.exit_tx.borrow().clone()
    }

    /// A receiver that sees the exit.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }

    /// Records the exit (once) and wakes waiters; returns false if it already had one.
    pub fn set_exit(&mut self, status: u32, at: Timestamp) -> bool {
        if self.exit().is_some() {
            return false;
        }
        self.status = Status::STOPPED;
        self.stdin_close = None;
        self.exit_tx.send_replace(Some(Exit { status, at }));
        true
    }
}

/// A container in the pod.
#[derive(Debug)]
pub struct Container {
    /// containerd's bundle directory.
    pub bundle: String,
    /// The container's directory in the share (`<share>/<id>`).
    pub share_dir: PathBuf,
    /// Whether deleting it stops the pod's VM.
    pub is_sandbox: bool,
    /// The init process.
    pub init: Process,
    /// Exec processes by exec id.
    pub execs: HashMap<String, Process>,
    /// What this shim has published of the container's OOM kills.
    pub oom: OomReported,
}

/// The TaskOOM events published for one container, so that the kill behind an init's
/// exit is reported once, before the exit, whichever watcher sees it first.
#[derive(Debug, Default, Clone, Copy)]
pub struct OomReported {
    /// The guest's OOM reports forwarded so far.
    pub forwarded: bool,
    /// Published by the exit watcher, ahead of the init's TaskExit: later reports of the
    /// container are the same kill.
    pub at_exit: bool,
}

impl Container {
    /// The process `exec_id` names (empty: init).
    pub fn process(&self, id: &str, exec_id: &str) -> Result<&Process, TaskError> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} of container {id}")))
    }

    /// [`Container::process`], mutable.
    pub fn process_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Process, TaskError> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} of container {id}")))
    }
}

/// Every container of the shim, by id.
pub type Containers = HashMap<String, Container>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_recorded_once() {
        let mut p = Process::new(StdioPaths::default(), None);
        let rx = p.exit_watch();
        assert!(p.exit().is_none());
        assert!(p.set_exit(42, Timestamp::default()));
        assert!(!p.set_exit(0, Timestamp::default()));
        assert_eq!(p.exit().unwrap().status, 42);
        assert_eq!(p.status, Status::STOPPED);
        assert_eq!(rx.borrow().as_ref().unwrap().status, 42);
    }

    #[test]
    fn processes_are_found_by_exec_id() {
        let mut c = Container {
            bundle: "/b".into(),
            share_dir: "/s/c".into(),
            is_sandbox: true,
            init: Process::new(StdioPaths::default(), None),
            execs: HashMap::new(),
            oom: Default::default(),
        };
        c.execs.insert(
            "e1".into(),
            Process::new(StdioPaths::default(), Some(b"{}".to_vec())),
        );
        assert!(c.process("c", "").unwrap().exec_spec.is_none());
        assert!(c.process("c", "e1").unwrap().exec_spec.is_some());
        assert!(matches!(c.process("c", "e2"), Err(TaskError::NotFound(_))));
        assert!(c.process_mut("c", "e1").is_ok());
    }
}
