//! Tests of the virtio-mmio transport with a dummy device.

use super::*;
use crate::devices::virtio::ActivateError;
use vmm_sys_util::eventfd::EventFd;

struct Dummy {
    queue_sizes: Vec<u16>,
    acked: u64,
    activated: usize,
    resets: usize,
    events: Vec<EventFd>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | 1
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8 + 1);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemory,
        queues: Vec<Queue>,
        _interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        assert_eq!(queues.len(), self.queue_sizes.len());
        self.activated += 1;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.events
    }
}

fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
    let (mem, _f) = crate::memory::create_guest_memory(32).unwrap();
    let dev = Arc::new(Mutex::new(Dummy {
        queue_sizes: vec![16, 16],
        acked: 0,
        activated: 0,
        resets: 0,
        events: vec![
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ],
    }));
    let irq = Arc::new(VirtioInterrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ));
    (MmioTransport::new(dev.clone(), mem, irq), dev)
}

fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport) {
    wr(t, VIRTIO_MMIO_STATUS, ACK);
    wr(t, VIRTIO_MMIO_STATUS, ACK | DRV);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1 is bit 32
    wr(t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
    assert_eq!(rd(t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK);
}

fn setup_queue(t: &mut MmioTransport, index: u32, base: u32) {
    wr(t, VIRTIO_MMIO_QUEUE_SEL, index);
    wr(t, VIRTIO_MMIO_QUEUE_NUM, 16);
    wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base);
    wr(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x100);
    wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x200);
    wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

#[test]
fn identification_registers() {
    let (mut t, _) = setup();
    assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 19);
    wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    let mut b = [0u8; 2];
    t.read(0x100, &mut b);
    assert_eq!(b, [1, 1]);
}

#[test]
fn transition_table() {
    assert!(status_transition_allowed(0, ACK));
    assert!(status_transition_allowed(ACK, ACK | DRV));
    assert!(status_transition_allowed(
        ACK | DRV | FOK,
        ACK | DRV | FOK | DOK
    ));
    assert!(status_transition_allowed(
        ACK | DRV,
        ACK | DRV | VIRTIO_CONFIG_S_FAILED
    ));
    assert!(status_transition_allowed(ACK | DRV | FOK | DOK, 0));
    assert!(!status_transition_allowed(0, ACK | DRV));
    assert!(!status_transition_allowed(ACK, ACK | DRV | FOK));
    assert!(!status_transition_allowed(ACK | DRV, ACK | DRV | DOK));
    assert!(!status_transition_allowed(ACK | DRV | FOK | DOK, ACK));
    assert!(!status_transition_allowed(
        ACK,
        ACK | DRV | FOK | VIRTIO_CONFIG_S_FAILED
    ));
}

#[test]
fn invalid_transitions_leave_status_unchanged() {
    let (mut t, _) = setup();
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK);
}

#[test]
fn features_without_version_1_are_rejected() {
    let (mut t, _) = setup();
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_STATUS),
        ACK | DRV,
        "FEATURES_OK not set"
    );
}

#[test]
fn features_not_offered_are_rejected() {
    let (mut t, _) = setup();
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0x2);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV);
}

#[test]
fn features_cannot_change_after_features_ok() {
    let (mut t, _) = setup();
    negotiate(&mut t);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    assert_eq!(t.acked_features(), 1 << VIRTIO_F_VERSION_1);
}

#[test]
fn full_init_activates_and_reset_resets() {
    let (mut t, dev) = setup();
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    setup_queue(&mut t, 1, 0x11000);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK | DRV | FOK | DOK);
    assert_eq!(dev.lock().unwrap().activated, 1);
    assert_eq!(dev.lock().unwrap().acked, 1 << VIRTIO_F_VERSION_1);
    wr(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(dev.lock().unwrap().resets, 1);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn driver_ok_without_queues_needs_reset() {
    let (mut t, dev) = setup();
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    wr(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK);
    assert_ne!(
        rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_eq!(dev.lock().unwrap().activated, 0);
    assert_ne!(
        rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
}

#[test]
fn hostile_queue_config_is_rejected() {
    let (mut t, _) = setup();
    // Before FEATURES_OK, queue registers are ignored.
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
    negotiate(&mut t);
    // Not a power of two, too big, zero, beyond u16.
    for bad in [3u32, 32, 0, 0x1_0000] {
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, bad);
    }
    // Misaligned descriptor table is ignored.
    wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10001);
    // Rings outside guest memory (32 MiB): the queue does not become ready.
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    wr(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10000);
    wr(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x11000);
    wr(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0xfff_f000);
    wr(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0xffff_ffff);
    wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    // Out-of-range queue select: writes go nowhere, no panic.
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, u32::MAX);
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    // Odd-sized and unaligned accesses are ignored.
    t.write(0x70, &[1]);
    t.write(0x71, &[1, 0, 0, 0]);
    let mut b = [0u8; 4];
    t.read(0x72, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn queue_size_is_accepted_when_valid() {
    let (mut t, _) = setup();
    negotiate(&mut t);
    setup_queue(&mut t, 0, 0x10000);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    // Once ready, the queue's registers are frozen.
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
    assert_eq!(t.queues[0].size(), 16);
}

#[test]
fn interrupt_ack_clears_bits() {
    let (mut t, _) = setup();
    t.interrupt.signal_used_queue();
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_signals_event() {
    let (mut t, dev) = setup();
    wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    assert_eq!(dev.lock().unwrap().events[1].read().unwrap(), 1);
}
