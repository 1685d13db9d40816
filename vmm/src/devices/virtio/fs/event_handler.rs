//! Event-loop side of virtio-fs: relays virtiofsd's "used buffers" signals to the guest
//! interrupt (keeping InterruptStatus correct) and ends the VM when virtiofsd hangs up.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::VirtioInterrupt;
use crate::event_loop::{EventOps, Subscriber};
use crate::exit::{ExitEvent, ExitNotifier};

/// Token of the vhost-user socket; call eventfds use their queue index.
const SOCKET_TOKEN: u32 = u32::MAX;

/// Watches the call eventfds and the vhost-user socket of one virtio-fs device.
#[derive(Debug)]
pub struct FsHandler {
    calls: Vec<EventFd>,
    socket: OwnedFd,
    interrupt: Arc<VirtioInterrupt>,
    exit: ExitNotifier,
    socket_name: String,
}

impl FsHandler {
    /// A handler for `calls` (one per queue), raising `interrupt`; a hang-up on `socket` (our
    /// duplicate of the vhost-user connection to virtiofsd at `socket_name`) is reported to `exit`.
    pub fn new(
        calls: Vec<EventFd>,
        socket: OwnedFd,
        interrupt: Arc<VirtioInterrupt>,
        exit: ExitNotifier,
        socket_name: String,
    ) -> Self {
        Self {
            calls,
            socket,
            interrupt,
            exit,
            socket_name,
        }
    }
}

impl Subscriber for FsHandler {
    fn init(&mut self, ops: &mut EventOps) -> std::io::Result<()> {
        for (i, evt) in self.calls.iter().enumerate() {
            ops.add(evt.as_raw_fd(), i as u32, EventSet::IN)?;
        }
        // Only hang-ups: replies on the socket belong to the vCPU thread that sent the request.
        ops.add(
            self.socket.as_raw_fd(),
            SOCKET_TOKEN,
            EventSet::READ_HANG_UP | EventSet::HANG_UP,
        )
    }

    fn process(&mut self, token: u32, events: EventSet, ops: &mut EventOps) {
        if token == SOCKET_TOKEN {
            tracing::debug!(?events, "virtio-fs: vhost-user socket event");
            // Level-triggered: stop watching so the loop does not spin until the VM is gone.
            let _ = ops.remove(self.socket.as_raw_fd());
            self.exit.notify(ExitEvent::VmmError(format!(
                "virtio-fs: virtiofsd closed its vhost-user connection ({}): the daemon died \
                 or was killed",
                self.socket_name
            )));
            return;
        }
        if let Some(evt) = self.calls.get(token as usize) {
            // The count does not matter; an error only means nothing was pending.
            if evt.read().is_ok() {
                self.interrupt.signal_used_queue();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::EventLoop;
    use std::os::unix::net::UnixStream;

    fn setup() -> (
        EventLoop,
        EventFd,
        UnixStream,
        Arc<VirtioInterrupt>,
        std::sync::mpsc::Receiver<ExitEvent>,
    ) {
        let (exit, rx) = ExitNotifier::new();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut el = EventLoop::new().unwrap();
        el.add_subscriber(Box::new(FsHandler::new(
            vec![call.try_clone().unwrap()],
            OwnedFd::from(ours),
            interrupt.clone(),
            exit,
            "/run/test.sock".into(),
        )))
        .unwrap();
        (el, call, theirs, interrupt, rx)
    }

    #[test]
    fn call_sets_used_ring_status_and_raises_irq() {
        let (mut el, call, _peer, interrupt, rx) = setup();
        assert_eq!(interrupt.status(), 0);
        call.write(1).unwrap();
        assert_eq!(el.run_once(1000).unwrap(), 1);
        assert_eq!(
            interrupt.status(),
            virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING
        );
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn daemon_hangup_is_a_vmm_error_naming_virtiofsd() {
        let (mut el, _call, peer, _interrupt, rx) = setup();
        assert_eq!(el.run_once(0).unwrap(), 0);
        drop(peer);
        assert_eq!(el.run_once(1000).unwrap(), 1);
        match rx.try_recv().unwrap() {
            ExitEvent::VmmError(msg) => assert!(msg.contains("virtiofsd"), "{msg}"),
            other => panic!("unexpected {other:?}"),
        }
        // Not reported again: the socket is no longer watched.
        assert_eq!(el.run_once(0).unwrap(), 0);
    }
}
