//! The virtio-net device: frames between the guest's queues and a tap.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::NetError;
use crate::devices::lock;
use crate::devices::virtio::{ActivateError, ActiveQueues, VirtioDevice, VirtioInterrupt};
use crate::event_loop::{EventOps, Subscriber};
use crate::memory::GuestMemory;

/// The event-loop token of the tap (the queues' tokens are their indices).
const TAP_TOKEN: u32 = NUM_QUEUES as u32;
/// Largest read or write on the tap: the header and the largest frame.
const TAP_BUF_SIZE: usize = NET_HDR_SIZE + MAX_FRAME_SIZE;

/// Frame counters, for the state dump and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest received.
    pub rx_frames: u64,
    /// Frames from the tap dropped (device not active, buffer too small or unusable).
    pub rx_dropped: u64,
    /// Frames the guest sent that reached the tap.
    pub tx_frames: u64,
    /// Frames the guest sent that were dropped (malformed, or the tap refused them).
    pub tx_dropped: u64,
}

/// The net device.
#[derive(Debug)]
pub struct NetDevice {
    tap: File,
    mac: [u8; 6],
    mtu: u16,
    acked_features: u64,
    queue_events: Vec<EventFd>,
    queue_sizes: [u16; NUM_QUEUES],
    active: Option<ActiveQueues>,
    /// A frame read from the tap (header first) waiting for an rx buffer; `rx_len` 0: none.
    rx_frame: Vec<u8>,
    rx_len: usize,
    tx_frame: Vec<u8>,
    /// Offloads (`TUN_F_*`) the tap should apply to what it hands us, set on the event-loop
    /// thread by [`Self::sync_offload`] (activation runs on a vCPU thread, whose seccomp filter
    /// has no tap ioctl); `None` once applied.
    offload_pending: Option<u32>,
    /// Whether the event loop watches the tap for frames (not while one waits for a buffer).
    tap_watched: bool,
    /// The tap reported an error or hang-up (its interface is gone): no more frames.
    tap_gone: bool,
    /// The gone tap has left the event loop.
    tap_removed: bool,
    counters: NetCounters,
}

impl NetDevice {
    /// A device with MAC address `mac` and MTU `mtu` on `tap`: a tap opened with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header (or, in tests, anything
    /// that keeps frame boundaries the same way, such as a `SOCK_SEQPACKET` socket). The
    /// descriptor is made non-blocking.
    pub fn new(tap: OwnedFd, mac: [u8; 6], mtu: u16) -> Result<Self, NetError> {
        let raw = tap.as_raw_fd();
        let flags = nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| NetError::Tap(raw, e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| NetError::Tap(raw, e.into()))?;
        let queue_events = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            tap: File::from(tap),
            mac,
            mtu,
            acked_features: 0,
            queue_events,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            active: None,
            rx_frame: vec![0; TAP_BUF_SIZE],
            rx_len: 0,
            tx_frame: vec![0; TAP_BUF_SIZE],
            offload_pending: None,
            tap_watched: false,
            tap_gone: false,
            tap_removed: false,
            counters: NetCounters::default(),
        })
    }

    /// The frame counters so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Moves the guest's frames from the tx queue to the tap.
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        loop {
            let txq = &mut active.queues[TXQ_INDEX];
            let Some(chain) = txq.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            match read_tx_chain(&active.mem, chain, &mut self.tx_frame, self.acked_features) {
                Ok(len) => match self.tap.write(&self.tx_frame[..len]) {
                    Ok(_) => self.counters.tx_frames += 1,
                    Err(e) => {
                        self.counters.tx_dropped += 1;
                        tracing::debug!(error = %e, "net: the tap refused a frame");
                    }
                },
                Err(e) => {
                    self.counters.tx_dropped += 1;
                    crate::guest_warn!(error = %e, "net: dropping a bad tx frame");
                }
            }
            // Transmit buffers are only read: their used length is 0 (§2.7.8.2).
            if let Err(e) = txq.add_used(&active.mem, head, 0) {
                crate::guest_warn!(error = %e, "net: cannot return a tx buffer");
            }
            used = true;
        }
        if used {
            active.notify(TXQ_INDEX, "net");
        }
    }

    /// Moves frames from the tap into the guest's rx buffers until the tap is empty or the
    /// guest has no buffer left (the frame then waits, and the tap is not read meanwhile).
    pub fn process_rx(&mut self) {
        let mut used = false;
        loop {
            if self.rx_len == 0 && !self.read_tap() {
                break;
            }
            let Some(active) = self.active.as_mut() else {
                // Link down: the frame is lost, as on a NIC without a driver.
                self.rx_len = 0;
                self.counters.rx_dropped += 1;
                continue;
            };
            let rxq = &mut active.queues[RXQ_INDEX];
            let Some(chain) = rxq.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let frame = &self.rx_frame[..self.rx_len];
            let written = match check_rx_header(frame, self.acked_features)
                .and_then(|()| write_rx_chain(&active.mem, chain, frame))
            {
                Ok(()) => {
                    self.counters.rx_frames += 1;
                    frame.len() as u32
                }
                Err(e) => {
                    self.counters.rx_dropped += 1;
                    crate::guest_warn!(error = %e, "net: dropping a frame for a bad rx buffer");
                    0
                }
            };
            self.rx_len = 0;
            if let Err(e) = rxq.add_used(&active.mem, head, written) {
                crate::guest_warn!(error = %e, "net: cannot return an rx buffer");
            }
            used = true;
        }
        if used {
            if let Some(active) = self.active.as_mut() {
                active.notify(RXQ_INDEX, "net");
            }
        }
    }

    /// Reads one frame from the tap into `rx_frame`; false when there is none.
    fn read_tap(&mut self) -> bool {
        while !self.tap_gone {
            match self.tap.read(&mut self.rx_frame) {
                Ok(n) if n >= NET_HDR_SIZE + MIN_FRAME_SIZE => {
                    // The tap fills the 10-byte `virtio_net_hdr`; without mergeable rx buffers
                    // a frame always takes exactly one buffer.
                    self.rx_frame[NUM_BUFFERS_OFFSET..NET_HDR_SIZE]
                        .copy_from_slice(&1u16.to_le_bytes());
                    self.rx_len = n;
                    return true;
                }
                Ok(0) => {
                    self.tap_gone = true;
                    tracing::warn!("net: the tap closed; the guest's link is down");
                }
                Ok(n) => {
                    // A runt; the next frame may be fine.
                    tracing::debug!(len = n, "net: ignoring a runt frame from the tap");
                    self.counters.rx_dropped += 1;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) => {
                    self.tap_gone = true;
                    tracing::warn!(error = %e, "net: cannot read the tap; the guest's link is down");
                }
            }
        }
        false
    }

    /// Applies a pending change of the tap's offloads (`TUNSETOFFLOAD`), if any. A tap that
    /// refuses keeps handing over plain frames, which every driver takes: the caller logs it.
    pub fn sync_offload(&mut self) -> std::io::Result<()> {
        let Some(flags) = self.offload_pending.take() else {
            return Ok(());
        };
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.tap.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        tracing::debug!(flags, "net: tap offloads set");
        Ok(())
    }

    /// Whether the event loop should watch the tap: not while a frame waits for a buffer (the
    /// rx notification resumes), not once the tap is gone.
    fn wants_tap(&self) -> bool {
        self.rx_len == 0 && !self.tap_gone
    }

    /// Makes the event loop's interest in the tap match [`Self::wants_tap`]; a tap that is
    /// gone leaves the event loop (even with no events asked for, epoll would keep reporting
    /// its error).
    fn sync_tap(&mut self, ops: &mut EventOps) {
        let fd = self.tap.as_raw_fd();
        if self.tap_gone {
            if !self.tap_removed {
                if let Err(e) = ops.remove(fd) {
                    tracing::error!(error = %e, "net: cannot stop watching the tap");
                }
                self.tap_removed = true;
                self.tap_watched = false;
            }
            return;
        }
        let want = self.wants_tap();
        if want == self.tap_watched {
            return;
        }
        let events = if want {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        match ops.modify(fd, TAP_TOKEN, events) {
            Ok(()) => self.tap_watched = want,
            Err(e) => tracing::error!(error = %e, "net: cannot change the tap's events"),
        }
    }

    /// One line of queue and frame state (the SIGUSR1 state dump).
    pub fn state_dump(&self) -> String {
        let Some(active) = self.active.as_ref() else {
            return "net: not activated".into();
        };
        format!(
            "net:{} frame_waiting={} tap_gone={} features={:#x} {:?}",
            active.state(&["rx", "tx"]),
            self.rx_len,
            self.tap_gone,
            self.acked_features,
            self.counters
        )
    }
}

/// The features the device offers: version 1, MAC, MTU, and checksum and TCP segmentation
/// offloads both ways (no UDP or ECN offloads, no mergeable rx buffers, no control queue).
pub const OFFERED_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_MTU)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6);

/// Whether feature `bit` is among `features`.
fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// The tap offloads (`TUN_F_*`) that match the driver's features: what the tap may hand over
/// is what the driver said it takes (partial checksums with `GUEST_CSUM`, TCP segments of up
/// to 64 KiB with `GUEST_TSO4`/`GUEST_TSO6`; the tap honours TSO only with checksums).
pub fn tap_offloads(acked: u64) -> u32 {
    if !has(acked, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(acked, VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(acked, VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

/// Checks the `virtio_net_hdr` of a frame the guest sends against what it negotiated: a
/// partial checksum only with `CSUM`, TCP segmentation only of the kinds it negotiated (with a
/// partial checksum and a segment size, as every driver sends it), no other flag or kind. The
/// host kernel acts on this header, so the guest gets no request through it never had the
/// right to make.
pub fn check_tx_header(hdr: &[u8], acked: u64) -> Result<(), NetError> {
    let flags = u32::from(hdr[0]);
    let gso_type = u32::from(hdr[1]);
    let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
    if flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err(NetError::BadFrame("a header flag a driver may not send"));
    }
    let csum = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    if csum && !has(acked, VIRTIO_NET_F_CSUM) {
        return Err(NetError::BadFrame(
            "checksum offload requested, not negotiated",
        ));
    }
    let tso_feature = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        _ => {
            return Err(NetError::BadFrame(
                "a segmentation kind never offered (UDP, ECN)",
            ))
        }
    };
    if !has(acked, tso_feature) {
        return Err(NetError::BadFrame(
            "TCP segmentation requested, not negotiated",
        ));
    }
    if !csum || gso_size == 0 {
        return Err(NetError::BadFrame(
            "TCP segmentation without a partial checksum or a segment size",
        ));
    }
    Ok(())
}

/// Checks a frame's header from the tap against what the driver takes: the tap's offloads
/// follow the driver's features, but only once the event loop has applied them, so a frame
/// read in between (or after a reset) must not carry a segment or checksum kind the driver
/// never asked for.
fn check_rx_header(frame: &[u8], acked: u64) -> Result<(), NetError> {
    let flags = u32::from(frame[0]);
    // ECN segments (`GSO_ECN` set) are never negotiated either way.
    let needed = match u32::from(frame[1]) {
        VIRTIO_NET_HDR_GSO_NONE => None,
        VIRTIO_NET_HDR_GSO_TCPV4 => Some(VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => Some(VIRTIO_NET_F_GUEST_TSO6),
        _ => return Err(NetError::BadFrame("a segment kind the driver never took")),
    };
    if needed.is_some_and(|bit| !has(acked, bit))
        || (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(acked, VIRTIO_NET_F_GUEST_CSUM))
    {
        return Err(NetError::BadFrame(
            "an offloaded frame for a driver that did not negotiate it",
        ));
    }
    Ok(())
}

/// Copies one tx chain (header and frame) into `buf` and checks its header against the
/// features `acked`; returns its length.
fn read_tx_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
    acked: u64,
) -> Result<usize, NetError> {
    let mut reader = Reader::new(mem, chain).map_err(NetError::DescriptorChain)?;
    let len = reader.available_bytes();
    if len < NET_HDR_SIZE + MIN_FRAME_SIZE {
        return Err(NetError::BadFrame(
            "shorter than a header and an Ethernet header",
        ));
    }
    if len > NET_HDR_SIZE + MAX_FRAME_SIZE {
        return Err(NetError::BadFrame("longer than the largest frame"));
    }
    reader
        .read_exact(&mut buf[..len])
        .map_err(NetError::GuestMemory)?;
    check_tx_header(&buf[..NET_HDR_SIZE], acked)?;
    Ok(len)
}

/// Writes `frame` (header first) into one rx chain, all of it or nothing.
fn write_rx_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    frame: &[u8],
) -> Result<(), NetError> {
    let mut writer = Writer::new(mem, chain).map_err(NetError::DescriptorChain)?;
    if writer.available_bytes() < frame.len() {
        return Err(NetError::RxBufferTooSmall {
            buffer: writer.available_bytes(),
            frame: frame.len(),
        });
    }
    writer.write_all(frame).map_err(NetError::GuestMemory)
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// Config space (§5.1.4): `mac`, `status` (0: no `VIRTIO_NET_F_STATUS`),
    /// `max_virtqueue_pairs` (0: no `VIRTIO_NET_F_MQ`), `mtu`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&self.mac);
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        data.fill(0);
        let start = offset.min(CONFIG_SIZE as u64) as usize;
        let end = (start + data.len()).min(CONFIG_SIZE);
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR, never offered.
        crate::guest_warn!("net: config space is read-only");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        self.active = Some(ActiveQueues::new(mem, queues, interrupt, NUM_QUEUES)?);
        self.offload_pending = Some(tap_offloads(self.acked_features));
        tracing::debug!(features = self.acked_features, "net device activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.offload_pending = Some(0);
        if self.rx_len != 0 {
            self.rx_len = 0;
            self.counters.rx_dropped += 1;
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }
}

/// Event-loop glue: queue notifications and the tap of one net device.
#[derive(Debug)]
pub struct NetHandler(pub Arc<Mutex<NetDevice>>);

impl Subscriber for NetHandler {
    fn init(&mut self, ops: &mut EventOps) -> std::io::Result<()> {
        let mut dev = lock(&self.0);
        for (i, evt) in dev.queue_events.iter().enumerate() {
            ops.add(evt.as_raw_fd(), i as u32, EventSet::IN)?;
        }
        ops.add(dev.tap.as_raw_fd(), TAP_TOKEN, EventSet::IN)?;
        dev.tap_watched = true;
        Ok(())
    }

    fn process(&mut self, token: u32, events: EventSet, ops: &mut EventOps) {
        let mut dev = lock(&self.0);
        if (token as usize) < NUM_QUEUES {
            // The count does not matter; an error only means nothing was pending.
            let _ = dev.queue_events[token as usize].read();
        } else if events.intersects(EventSet::ERROR | EventSet::HANG_UP) && !dev.tap_gone {
            // A tap whose interface was deleted (the pod's network namespace went away).
            dev.tap_gone = true;
            tracing::warn!("net: the tap's interface is gone; the guest's link is down");
        }
        if let Err(e) = dev.sync_offload() {
            tracing::warn!(error = %e, "net: the tap refused its offloads; the guest gets plain frames");
        }
        dev.process_tx();
        dev.process_rx();
        dev.sync_tap(ops);
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
