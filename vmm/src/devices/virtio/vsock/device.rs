//! The virtio-vsock device: queue processing between the guest and the [`VsockMuxer`].

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::defs::*;
use super::muxer::VsockMuxer;
use super::packet::{PacketHeader, VsockHeader};
use super::VsockError;
use crate::devices::lock;
use crate::devices::virtio::{ActivateError, ActiveQueues, VirtioDevice, VirtioInterrupt};
use crate::event_loop::{EventOps, Subscriber};
use crate::memory::GuestMemory;

/// How often one event may re-run the tx queue after rx drained a full control queue.
const MAX_TX_RX_ROUNDS: usize = 4;

/// The vsock device.
#[derive(Debug)]
pub struct VsockDevice {
    guest_cid: u64,
    acked_features: u64,
    queue_events: Vec<EventFd>,
    queue_sizes: [u16; NUM_QUEUES],
    active: Option<ActiveQueues>,
    muxer: VsockMuxer,
}

impl VsockDevice {
    /// A device for guest `guest_cid`, listening on `uds_path`.
    pub fn new(guest_cid: u32, uds_path: &Path) -> Result<Self, VsockError> {
        let muxer = VsockMuxer::bind(uds_path, u64::from(guest_cid))?;
        let queue_events = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            guest_cid: u64::from(guest_cid),
            acked_features: 0,
            queue_events,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            active: None,
            muxer,
        })
    }

    /// The host side (for tests and status).
    pub fn muxer(&self) -> &VsockMuxer {
        &self.muxer
    }

    /// Moves guest packets from the tx queue to the muxer. Returns true if it stopped early
    /// because too many control packets wait for rx buffers.
    pub fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut used = false;
        let mut stalled = false;
        loop {
            if self.muxer.tx_backpressure() {
                stalled = true;
                break;
            }
            let txq = &mut active.queues[TXQ_INDEX];
            let Some(chain) = txq.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            if let Err(e) = handle_tx_chain(&active.mem, chain, self.guest_cid, &mut self.muxer) {
                crate::guest_warn!(error = %e, "vsock: dropping bad tx packet");
            }
            if let Err(e) = txq.add_used(&active.mem, head, 0) {
                crate::guest_warn!(error = %e, "vsock: cannot return tx buffer");
            }
            used = true;
        }
        if used {
            active.notify(TXQ_INDEX, "vsock");
        }
        stalled
    }

    /// Fills rx buffers with whatever the muxer has for the guest.
    pub fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while self.muxer.has_rx() {
            let rxq = &mut active.queues[RXQ_INDEX];
            let Some(chain) = rxq.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            match fill_rx_chain(&active.mem, chain, &mut self.muxer) {
                Ok(Some(len)) => {
                    if let Err(e) = rxq.add_used(&active.mem, head, len) {
                        crate::guest_warn!(error = %e, "vsock: cannot return rx buffer");
                    }
                    used = true;
                }
                Ok(None) => {
                    rxq.go_to_previous_position();
                    break;
                }
                Err(e) => {
                    crate::guest_warn!(error = %e, "vsock: unusable rx buffer");
                    let _ = rxq.add_used(&active.mem, head, 0);
                    used = true;
                }
            }
        }
        if used {
            active.notify(RXQ_INDEX, "vsock");
        }
    }

    /// One line of queue and connection state (the SIGUSR1 state dump).
    pub fn state_dump(&self) -> String {
        let Some(active) = self.active.as_ref() else {
            return format!("vsock cid {}: not activated", self.guest_cid);
        };
        format!(
            "vsock cid {}:{} {}",
            self.guest_cid,
            active.state(&["rx", "tx", "event"]),
            self.muxer.state_dump()
        )
    }

    /// Runs tx then rx until no more progress is possible for this event.
    pub fn process_queues(&mut self) {
        for _ in 0..MAX_TX_RX_ROUNDS {
            let stalled = self.process_tx();
            self.process_rx();
            // Packets left in the tx queue get no new notification: if rx made room, go again.
            if !stalled || self.muxer.tx_backpressure() {
                break;
            }
        }
    }
}

fn handle_tx_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    guest_cid: u64,
    muxer: &mut VsockMuxer,
) -> Result<(), VsockError> {
    let mut reader = Reader::new(mem, chain).map_err(VsockError::DescriptorChain)?;
    let hdr = PacketHeader::from(
        reader
            .read_obj::<VsockHeader>()
            .map_err(VsockError::ReadHeader)?,
    );
    if let Err(e) = hdr.validate_tx(guest_cid, reader.available_bytes()) {
        if hdr.src_cid == guest_cid && hdr.dst_cid == VSOCK_HOST_CID {
            muxer.queue_rst(&hdr);
        }
        return Err(e);
    }
    let mut payload = reader.take(u64::from(hdr.len));
    muxer.recv_guest(&hdr, &mut payload);
    Ok(())
}

fn fill_rx_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    muxer: &mut VsockMuxer,
) -> Result<Option<u32>, VsockError> {
    let mut writer = Writer::new(mem, chain).map_err(VsockError::DescriptorChain)?;
    if writer.available_bytes() < VSOCK_PKT_HDR_SIZE {
        return Err(VsockError::RxBufferTooSmall);
    }
    let mut data = writer
        .split_at(VSOCK_PKT_HDR_SIZE)
        .map_err(VsockError::DescriptorChain)?;
    let max_payload = data.available_bytes().min(MAX_PKT_BUF_SIZE as usize);
    let Some(hdr) = muxer.fill_rx(&mut data, max_payload) else {
        return Ok(None);
    };
    writer
        .write_all(VsockHeader::from(hdr).as_slice())
        .map_err(VsockError::Payload)?;
    Ok(Some(VSOCK_PKT_HDR_SIZE as u32 + hdr.len))
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// Config space: `le64 guest_cid` (§5.10.4).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        data.fill(0);
        let start = offset.min(config.len() as u64) as usize;
        let end = (start + data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        crate::guest_warn!("vsock: config space is read-only");
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
        self.muxer.set_active(true);
        tracing::debug!(cid = self.guest_cid, "vsock device activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.muxer.set_active(false);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }
}

/// Event-loop glue: queue notifications and host sockets of one vsock device.
#[derive(Debug)]
pub struct VsockHandler(pub Arc<Mutex<VsockDevice>>);

impl Subscriber for VsockHandler {
    fn init(&mut self, ops: &mut EventOps) -> std::io::Result<()> {
        let mut dev = lock(&self.0);
        for (i, evt) in dev.queue_events.iter().enumerate() {
            ops.add(evt.as_raw_fd(), i as u32, EventSet::IN)?;
        }
        dev.muxer.init(ops)
    }

    fn process(&mut self, token: u32, events: EventSet, ops: &mut EventOps) {
        let mut dev = lock(&self.0);
        if (token as usize) < NUM_QUEUES {
            // The count does not matter; an error only means nothing was pending.
            let _ = dev.queue_events[token as usize].read();
        } else {
            dev.muxer.handle_event(token, events, ops);
        }
        dev.process_queues();
        dev.muxer.sync(ops);
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "stress_tests.rs"]
mod stress_tests;
