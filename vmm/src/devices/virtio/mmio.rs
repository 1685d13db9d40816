//! virtio-mmio transport, virtio 1.x "4.2 Virtio Over MMIO", register layout version 2.
//!
//! The driver (guest) owns the register window; every value it writes is checked. Device status
//! changes are checked against [`STATUS_TRANSITIONS`], which encodes virtio 1.2 §3.1.1 "Driver
//! Requirements: Device Initialization":
//!
//! > 1. Reset the device. 2. Set the ACKNOWLEDGE status bit: the guest OS has noticed the device.
//! > 3. Set the DRIVER status bit: the guest OS knows how to drive the device. 4. Read device
//! > feature bits, and write the subset of feature bits understood by the OS and driver to the
//! > device. 5. Set the FEATURES_OK status bit. The driver MUST NOT accept new feature bits after
//! > this step. 6. Re-read device status to ensure the FEATURES_OK bit is still set: otherwise,
//! > the device does not support our subset of features and the device is unusable. 7. Perform
//! > device-specific setup, including discovery of virtqueues for the device [...]. 8. Set the
//! > DRIVER_OK status bit. At this point the device is "live".
//!
//! and §2.1.1: "The driver MAY set FAILED at any time"; writing 0 resets the device (§4.2.2.1).
//! Anything else is ignored (with a rate-limited warning) and leaves the status unchanged.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory as _};

use super::{VirtioDevice, VirtioInterrupt};
use crate::devices::{lock, BusDevice};
use crate::memory::GuestMemory;

/// "virt" in little endian (§4.2.2).
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version 2 (virtio 1.x; version 1 is the legacy interface).
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id, "HUSK".
pub const MMIO_VENDOR_ID: u32 = 0x4b53_5548;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

/// Allowed `(current status, new status)` pairs besides reset (0) and setting FAILED.
pub const STATUS_TRANSITIONS: &[(u32, u32)] = &[
    (0, ACK),
    (ACK, ACK | DRV),
    (ACK | DRV, ACK | DRV | FOK),
    (ACK | DRV | FOK, ACK | DRV | FOK | DOK),
];

/// Whether the driver may move the device status from `from` to `to`.
pub fn status_transition_allowed(from: u32, to: u32) -> bool {
    to == 0
        || (to & VIRTIO_CONFIG_S_FAILED != 0 && to & !VIRTIO_CONFIG_S_FAILED & !from == 0)
        || STATUS_TRANSITIONS.contains(&(from, to))
}

/// Descriptor table alignment (split virtqueue, §2.7: 16 bytes).
const DESC_TABLE_ALIGN: u64 = 16;
/// Available ring alignment (2 bytes).
const AVAIL_RING_ALIGN: u64 = 2;
/// Used ring alignment (4 bytes).
const USED_RING_ALIGN: u64 = 4;

/// A virtio-mmio window in front of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .finish()
    }
}

impl MmioTransport {
    /// A transport for `device` using `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = Self::fresh_queues(&device);
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            activated: false,
        }
    }

    fn fresh_queues(device: &Arc<Mutex<dyn VirtioDevice>>) -> Vec<Queue> {
        lock(device)
            .queue_max_sizes()
            .iter()
            // Queue::new only fails for a max size that is not a power of two; device constants
            // are powers of two, and a failure would leave the device without that queue.
            .filter_map(|max| Queue::new(*max).ok())
            .collect()
    }

    /// Current device status (for tests and logs).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change after FEATURES_OK and before DRIVER_OK (§4.2.3.2), on a
    /// queue that is not ready yet.
    fn queue_config_allowed(&self) -> bool {
        self.status & (FOK | DOK | VIRTIO_CONFIG_S_FAILED) == FOK
            && self
                .queues
                .get(self.queue_select as usize)
                .is_some_and(|q| !q.ready())
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.queues = Self::fresh_queues(&self.device);
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if !status_transition_allowed(self.status, value) {
            crate::guest_warn!(
                from = self.status,
                to = value,
                "virtio-mmio: invalid device status transition ignored"
            );
            return;
        }
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & FOK != 0 && !self.features_acceptable() {
            // §2.2.2: the device MUST NOT set FEATURES_OK if it does not accept the subset; the
            // driver notices on re-reading Status.
            crate::guest_warn!(
                features = self.acked_features,
                "virtio-mmio: driver feature subset rejected"
            );
            return;
        }
        self.status = value;
        if newly & DOK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).avail_features();
        self.acked_features & !offered == 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        // The device gets its own copies; the transport keeps the registers for the driver.
        let ready: Vec<Queue> = self
            .queues
            .iter()
            .filter(|q| q.ready())
            .filter_map(|q| Queue::try_from(q.state()).ok())
            .collect();
        let all_valid =
            ready.len() == self.queues.len() && ready.iter().all(|q| q.is_valid(&self.mem));
        let result = if all_valid {
            let mut device = lock(&self.device);
            device.set_acked_features(self.acked_features);
            device
                .activate(self.mem.clone(), ready, self.interrupt.clone())
                .map_err(|e| e.to_string())
        } else {
            Err("not every queue is ready and valid".to_string())
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                crate::guest_warn!(error = %e, "virtio-mmio: device activation failed");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn set_queue_ready(&mut self, value: u32) {
        let mem = self.mem.clone();
        let allowed = value == 0 || self.queue_config_allowed();
        let Some(queue) = self.selected_queue() else {
            return;
        };
        if !allowed {
            crate::guest_warn!("virtio-mmio: QueueReady written in the wrong state");
            return;
        }
        if value == 1 {
            queue.set_ready(true);
            if !queue_addresses_valid(queue, &mem) {
                queue.set_ready(false);
                crate::guest_warn!("virtio-mmio: queue rings outside guest memory, not ready");
            }
        } else {
            queue.set_ready(false);
        }
    }

    fn write_queue_addr(&mut self, reg: u32, value: u32) {
        if !self.queue_config_allowed() {
            crate::guest_warn!(reg, "virtio-mmio: queue address written in the wrong state");
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        let set_half = |old: u64, high: bool| {
            if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        let ok = match reg {
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                let a = set_half(q.desc_table(), reg == VIRTIO_MMIO_QUEUE_DESC_HIGH);
                q.try_set_desc_table_address(GuestAddress(a)).is_ok()
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                let a = set_half(q.avail_ring(), reg == VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
                q.try_set_avail_ring_address(GuestAddress(a)).is_ok()
            }
            _ => {
                let a = set_half(q.used_ring(), reg == VIRTIO_MMIO_QUEUE_USED_HIGH);
                q.try_set_used_ring_address(GuestAddress(a)).is_ok()
            }
        };
        if !ok {
            crate::guest_warn!(reg, value, "virtio-mmio: misaligned queue address ignored");
        }
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: length -1 (§4.2.2, SHMLenLow/High).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                crate::guest_warn!(reg, "virtio-mmio: read of unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, reg: u32, value: u32) {
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & (DRV | FOK | VIRTIO_CONFIG_S_FAILED) != DRV {
                    crate::guest_warn!("virtio-mmio: DriverFeatures written in the wrong state");
                    return;
                }
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.acked_features &= !(0xffff_ffffu64 << shift);
                self.acked_features |= u64::from(value) << shift;
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                let allowed = self.queue_config_allowed();
                if let Some(q) = self.selected_queue() {
                    let ok = allowed
                        && u16::try_from(value).is_ok_and(|size| q.try_set_size(size).is_ok());
                    if !ok {
                        crate::guest_warn!(value, "virtio-mmio: invalid queue size ignored");
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(value),
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally caught by an ioeventfd in KVM; this is the slow path.
                let device = lock(&self.device);
                if let Some(evt) = device.queue_events().get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        tracing::error!(error = %e, "cannot signal queue event");
                    }
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_addr(reg, value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => crate::guest_warn!(reg, "virtio-mmio: write to unknown register"),
        }
    }
}

/// Checks that all three rings of `queue` lie inside guest memory (the size is already valid).
fn queue_addresses_valid(queue: &Queue, mem: &GuestMemory) -> bool {
    let size = u64::from(queue.size());
    let fits = |addr: u64, len: u64, align: u64| {
        addr % align == 0
            && addr
                .checked_add(len)
                .is_some_and(|end| end > 0 && mem.address_in_range(GuestAddress(end - 1)))
            && mem.address_in_range(GuestAddress(addr))
    };
    // Sizes from §2.7.2 (descriptor: 16 bytes) and §2.7.6 / §2.7.8 (flags, idx, ring, event).
    fits(queue.desc_table(), 16 * size, DESC_TABLE_ALIGN)
        && fits(queue.avail_ring(), 6 + 2 * size, AVAIL_RING_ALIGN)
        && fits(queue.used_ring(), 6 + 8 * size, USED_RING_ALIGN)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            crate::guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: unaligned register read"
            );
            data.fill(0);
            return;
        }
        let value = self.read_reg(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: unaligned register write"
            );
            return;
        };
        if offset % 4 != 0 {
            crate::guest_warn!(offset, "virtio-mmio: unaligned register write");
            return;
        }
        self.write_reg(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
