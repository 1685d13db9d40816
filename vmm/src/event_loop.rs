//! The device event loop: one thread waiting on epoll for queue notifications (ioeventfds), host
//! sockets and signals, dispatching each event to the [`Subscriber`] that registered it.
//!
//! Event data packs `(subscriber index << 32) | token`, so subscribers pick their own tokens.

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Most events taken from epoll per wait.
const EVENT_BATCH: usize = 32;

/// Lets a subscriber add, change and remove its file descriptors.
#[derive(Debug)]
pub struct EventOps<'a> {
    epoll: &'a Epoll,
    slot: u32,
}

impl EventOps<'_> {
    fn ctl(&self, op: ControlOperation, fd: RawFd, token: u32, events: EventSet) -> io::Result<()> {
        let data = (u64::from(self.slot) << 32) | u64::from(token);
        self.epoll.ctl(op, fd, EpollEvent::new(events, data))
    }

    /// Starts watching `fd` for `events`, reporting `token`.
    pub fn add(&mut self, fd: RawFd, token: u32, events: EventSet) -> io::Result<()> {
        self.ctl(ControlOperation::Add, fd, token, events)
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&mut self, fd: RawFd, token: u32, events: EventSet) -> io::Result<()> {
        self.ctl(ControlOperation::Modify, fd, token, events)
    }

    /// Stops watching `fd`.
    pub fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.ctl(ControlOperation::Delete, fd, 0, EventSet::empty())
    }
}

/// Something that reacts to events on its file descriptors.
pub trait Subscriber: Send {
    /// Registers the subscriber's initial file descriptors.
    fn init(&mut self, ops: &mut EventOps) -> io::Result<()>;
    /// Handles `events` on the descriptor registered with `token`.
    fn process(&mut self, token: u32, events: EventSet, ops: &mut EventOps);
}

/// An epoll loop with its subscribers.
pub struct EventLoop {
    epoll: Epoll,
    subscribers: Vec<Box<dyn Subscriber>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("subscribers", &self.subscribers.len())
            .finish()
    }
}

impl EventLoop {
    /// A loop with no subscribers.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
            subscribers: Vec::new(),
        })
    }

    /// Adds a subscriber and lets it register its descriptors.
    pub fn add_subscriber(&mut self, mut subscriber: Box<dyn Subscriber>) -> io::Result<()> {
        let slot = self.subscribers.len() as u32;
        subscriber.init(&mut EventOps {
            epoll: &self.epoll,
            slot,
        })?;
        self.subscribers.push(subscriber);
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: forever) and dispatches what arrived; returns the count.
    pub fn run_once(&mut self, timeout_ms: i32) -> io::Result<usize> {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(e),
        };
        for event in &events[..n] {
            let data = event.data();
            let slot = (data >> 32) as u32;
            if let Some(sub) = self.subscribers.get_mut(slot as usize) {
                let mut ops = EventOps {
                    epoll: &self.epoll,
                    slot,
                };
                sub.process(data as u32, event.event_set(), &mut ops);
            }
        }
        Ok(n)
    }

    /// Runs until an epoll error.
    pub fn run(mut self) -> io::Error {
        loop {
            if let Err(e) = self.run_once(-1) {
                return e;
            }
        }
    }
}

/// Produces one line of device and vCPU state for a [`SignalSubscriber`] state dump.
pub type StateDump = Box<dyn Fn() -> String + Send>;

/// Turns SIGINT/SIGTERM (blocked in every thread, see [`block_stop_signals`]) into an exit
/// event, and SIGUSR1 into a state dump in the log (what the shim asks for when the agent
/// stops answering).
pub struct SignalSubscriber {
    fd: nix::sys::signalfd::SignalFd,
    exit: crate::exit::ExitNotifier,
    dumps: Vec<StateDump>,
}

impl std::fmt::Debug for SignalSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalSubscriber")
            .field("dumps", &self.dumps.len())
            .finish_non_exhaustive()
    }
}

/// Signals that stop the VM (exit status 4).
pub fn stop_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGINT);
    set.add(nix::sys::signal::Signal::SIGTERM);
    set
}

/// Every signal the [`SignalSubscriber`] reads: the stop signals and SIGUSR1 (state dump).
fn handled_signals() -> nix::sys::signal::SigSet {
    let mut set = stop_signals();
    set.add(nix::sys::signal::Signal::SIGUSR1);
    set
}

/// Blocks the handled signals in the calling thread (and every thread it spawns afterwards).
pub fn block_stop_signals() -> nix::Result<()> {
    handled_signals().thread_block()
}

impl SignalSubscriber {
    /// A signalfd for the handled signals; call after [`block_stop_signals`]. `dumps` make
    /// up the SIGUSR1 state dump, one log line each.
    pub fn new(exit: crate::exit::ExitNotifier, dumps: Vec<StateDump>) -> nix::Result<Self> {
        let fd = nix::sys::signalfd::SignalFd::with_flags(
            &handled_signals(),
            nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
        )?;
        Ok(Self { fd, exit, dumps })
    }
}

impl Subscriber for SignalSubscriber {
    fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        ops.add(self.fd.as_raw_fd(), 0, EventSet::IN)
    }

    fn process(&mut self, _token: u32, _events: EventSet, _ops: &mut EventOps) {
        while let Ok(Some(info)) = self.fd.read_signal() {
            if info.ssi_signo == nix::sys::signal::Signal::SIGUSR1 as u32 {
                // Warn level: the shim runs the VMM with --log-level warn.
                for dump in &self.dumps {
                    tracing::warn!(state = %dump(), "state dump (SIGUSR1)");
                }
                continue;
            }
            tracing::info!(signal = info.ssi_signo, "stopping the VM on host signal");
            self.exit
                .notify(crate::exit::ExitEvent::Signal(info.ssi_signo as i32));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    struct Counter {
        evt: EventFd,
        seen: Arc<Mutex<Vec<u32>>>,
    }

    impl Subscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
            ops.add(self.evt.as_raw_fd(), 42, EventSet::IN)
        }
        fn process(&mut self, token: u32, _events: EventSet, _ops: &mut EventOps) {
            self.evt.read().unwrap();
            self.seen.lock().unwrap().push(token);
        }
    }

    #[test]
    fn dispatches_to_the_right_subscriber() {
        let mut el = EventLoop::new().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b2 = b.try_clone().unwrap();
        el.add_subscriber(Box::new(Counter {
            evt: a,
            seen: seen.clone(),
        }))
        .unwrap();
        el.add_subscriber(Box::new(Counter {
            evt: b,
            seen: seen.clone(),
        }))
        .unwrap();
        b2.write(1).unwrap();
        assert_eq!(el.run_once(1000).unwrap(), 1);
        assert_eq!(*seen.lock().unwrap(), vec![42]);
        assert_eq!(el.run_once(0).unwrap(), 0);
    }
}
