//! virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] exposes it to the guest through
//! the virtio-mmio register window and activates it once the driver is ready. Devices process
//! their queues on the event-loop thread and notify the guest through a [`VirtioInterrupt`].

pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub mod test_driver;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Activating a device failed.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not configure the queues the device needs
    #[error("Driver set up {got} queues, the device needs {want}")]
    QueueCount {
        /// Queues provided.
        got: usize,
        /// Queues required.
        want: usize,
    },
    /// The device is already active
    #[error("Device is already active")]
    AlreadyActive,
    /// The device's backend (e.g. virtiofsd) refused or failed
    #[error("Device backend failed: {0}")]
    Backend(String),
}

/// The guest-visible interrupt of one virtio-mmio device: the InterruptStatus bits plus the
/// irqfd that raises its IOAPIC pin.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// An interrupt raising `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Reports used buffers (InterruptStatus bit 0, "Used Buffer Notification").
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Reports a configuration change (InterruptStatus bit 1).
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::error!(error = %e, "cannot raise virtio interrupt");
        }
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd (registered with KVM by the builder).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device runs on once the driver has activated it: guest memory, its queues and its
/// interrupt.
#[derive(Debug)]
pub struct ActiveQueues {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The driver's queues, in the device's queue order.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: std::sync::Arc<VirtioInterrupt>,
}

impl ActiveQueues {
    /// Checks that the driver set up the `want` queues the device needs.
    pub fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<VirtioInterrupt>,
        want: usize,
    ) -> Result<Self, ActivateError> {
        if queues.len() != want {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want,
            });
        }
        Ok(Self {
            mem,
            queues,
            interrupt,
        })
    }

    /// Interrupts the guest for the used buffers of `queue`, unless the driver asked not to be
    /// (`device` names the device in a warning).
    pub fn notify(&mut self, queue: usize, device: &'static str) {
        match self.queues[queue].needs_notification(&self.mem) {
            Ok(true) => self.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => {
                crate::guest_warn!(error = %e, device, "cannot read queue notification state")
            }
        }
    }

    /// For the state dump: each queue's avail, next avail and used index, named by `names`,
    /// then the interrupt status.
    pub fn state(&self, names: &[&str]) -> String {
        use std::sync::atomic::Ordering::Acquire;
        let mut out = String::new();
        for (name, q) in names.iter().zip(&self.queues) {
            let avail = q
                .avail_idx(&self.mem, Acquire)
                .map_or_else(|e| format!("? ({e})"), |i| i.0.to_string());
            let used = q
                .used_idx(&self.mem, Acquire)
                .map_or_else(|e| format!("? ({e})"), |i| i.0.to_string());
            out.push_str(&format!(
                " {name} avail={avail} next_avail={} used={used};",
                q.next_avail()
            ));
        }
        out.push_str(&format!(" irq_status={:#x};", self.interrupt.status()));
        out
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Device id (virtio spec 5, "Device Types").
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of [`Self::avail_features`]).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by read-only configs).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Returns the device to its initial state (driver wrote 0 to Status).
    fn reset(&mut self);
    /// One eventfd per queue, written on QueueNotify (by KVM ioeventfd or by the transport).
    fn queue_events(&self) -> &[EventFd];
}
