//! The virtio-fs device as the guest sees it: features, config space (tag and queue count) and
//! activation, which hands the rings to virtiofsd through [`VhostUserFs`].

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::{FsError, VhostUserFs};
use crate::devices::virtio::{ActivateError, VirtioDevice, VirtioInterrupt};
use crate::exit::{ExitEvent, ExitNotifier};
use crate::memory::GuestMemory;

/// `struct virtio_fs_config` (virtio 1.2 §5.11.4) for `tag`: the UTF-8 tag padded with NULs to
/// [`TAG_LEN`] bytes, then `num_request_queues` little endian. The caller checked the tag length.
pub fn config_space(tag: &str) -> [u8; CONFIG_SPACE_SIZE] {
    let mut config = [0u8; CONFIG_SPACE_SIZE];
    let bytes = tag.as_bytes();
    let len = bytes.len().min(TAG_LEN);
    config[..len].copy_from_slice(&bytes[..len]);
    config[TAG_LEN..].copy_from_slice(&(NUM_REQUEST_QUEUES as u32).to_le_bytes());
    config
}

/// The virtio-fs device.
#[derive(Debug)]
pub struct FsDevice {
    backend: VhostUserFs,
    config: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: [u16; NUM_QUEUES],
    acked_features: u64,
    /// Kick eventfds: KVM ioeventfds on QueueNotify, read by virtiofsd.
    kicks: Vec<EventFd>,
    /// Call eventfds: written by virtiofsd, relayed by [`super::FsHandler`].
    calls: Vec<EventFd>,
    exit: ExitNotifier,
    active_queues: usize,
}

impl FsDevice {
    /// A device with `tag` and queues of `queue_size` served by the connected `backend`.
    /// `exit` ends the VM when the daemon fails.
    pub fn new(
        backend: VhostUserFs,
        tag: &str,
        queue_size: u16,
        exit: ExitNotifier,
    ) -> Result<Self, FsError> {
        let eventfds = || {
            (0..NUM_QUEUES)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            backend,
            config: config_space(tag),
            queue_sizes: [queue_size; NUM_QUEUES],
            acked_features: 0,
            kicks: eventfds()?,
            calls: eventfds()?,
            exit,
            active_queues: 0,
        })
    }

    /// The vhost-user session.
    pub fn backend(&self) -> &VhostUserFs {
        &self.backend
    }

    /// Duplicates of the call eventfds, for the event loop.
    pub fn call_events(&self) -> Result<Vec<EventFd>, FsError> {
        self.calls
            .iter()
            .map(|e| e.try_clone().map_err(FsError::EventFd))
            .collect()
    }

    fn backend_failed(&self, error: &FsError) {
        let message = format!("virtio-fs: virtiofsd failed: {:#}", anyhow_chain(error));
        self.exit.notify(ExitEvent::VmmError(message));
    }
}

/// Formats an error with its sources (the library has no anyhow).
fn anyhow_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.backend.negotiated().guest_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        match start
            .checked_add(data.len())
            .filter(|end| *end <= self.config.len())
        {
            Some(end) => data.copy_from_slice(&self.config[start..end]),
            None => {
                crate::guest_warn!(
                    offset,
                    len = data.len(),
                    "virtio-fs: config read out of range"
                );
                data.fill(0);
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // §5.11.4: the configuration is read-only for the driver.
        crate::guest_warn!(offset, len = data.len(), "virtio-fs: config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        _interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active_queues != 0 {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: NUM_QUEUES,
            });
        }
        // The interrupt reached the event-loop handler when the VM was built.
        match self
            .backend
            .start(self.acked_features, &mem, &queues, &self.kicks, &self.calls)
        {
            Ok(()) => {
                self.active_queues = queues.len();
                tracing::info!(features = self.acked_features, "virtio-fs: device active");
                Ok(())
            }
            Err(e) => {
                self.backend_failed(&e);
                Err(ActivateError::Backend(e.to_string()))
            }
        }
    }

    fn reset(&mut self) {
        if self.active_queues == 0 {
            return;
        }
        if let Err(e) = self.backend.stop(self.active_queues) {
            self.backend_failed(&e);
        }
        self.active_queues = 0;
        self.acked_features = 0;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.kicks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_has_padded_tag_and_one_request_queue() {
        let c = config_space("husk");
        assert_eq!(&c[..4], b"husk");
        assert!(c[4..TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(u32::from_le_bytes(c[TAG_LEN..].try_into().unwrap()), 1);
        // A full-length tag has no NUL terminator (§5.11.4).
        let long = "t".repeat(TAG_LEN);
        let c = config_space(&long);
        assert_eq!(&c[..TAG_LEN], long.as_bytes());
        assert_eq!(CONFIG_SPACE_SIZE, 40);
    }

    #[test]
    fn error_chain_names_the_cause() {
        let e = FsError::Request(
            "SET_MEM_TABLE",
            vhost::Error::IOError(std::io::Error::from_raw_os_error(libc::EPIPE)),
        );
        let text = anyhow_chain(&e);
        assert!(text.starts_with("vhost-user request SET_MEM_TABLE to virtiofsd failed: "));
    }
}
