//! One vsock stream between a guest port and a host Unix stream: the connection state machine
//! and credit-based flow control (virtio 1.2 §5.10.6.3 and §5.10.6.6).
//!
//! ```text
//!  host CONNECT ──▶ LocalInit ──guest RESPONSE──▶ Established ──RST/SHUTDOWN both──▶ (removed)
//!  guest REQUEST (host socket connected) ───────▶ Established
//!  LocalInit ──guest RST──▶ (removed; the host client is closed)
//! ```
//! The connection never blocks: host socket I/O is non-blocking, guest data the host cannot take
//! yet is buffered up to the credit we advertised ([`CONN_BUF_ALLOC`]), and host data is read only
//! when the guest has credit and an rx buffer is at hand.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::defs::*;
use super::packet::PacketHeader;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host asked for it; we sent (or will send) REQUEST and wait for RESPONSE.
    LocalInit,
    /// Data may flow.
    Established,
    /// Finished; the muxer drops it once any pending RST is sent.
    Dead,
}

/// Control packets waiting for an rx buffer.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    request: bool,
    response: bool,
    rst: bool,
    shutdown: Option<u32>,
    credit_update: bool,
    credit_request: bool,
}

/// What the muxer must do after the connection handled a guest packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAction {
    /// Nothing special.
    None,
    /// The guest accepted a host-initiated connection: tell the host client `OK`.
    Accepted,
}

/// One vsock stream.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Host port (our side of the vsock address pair).
    pub local_port: u32,
    /// Guest port.
    pub peer_port: u32,
    state: ConnState,
    pending: Pending,
    /// Guest data not yet written to the host socket.
    tx_buf: VecDeque<u8>,
    /// Bytes of guest data written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last reported to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes of host data sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Shutdown flags the guest sent.
    peer_shutdown: u32,
    /// Epoll says the host socket has data (or EOF) to read.
    host_readable: bool,
    /// The host socket hung up or failed; it is no longer watched.
    host_hup: bool,
    /// We read EOF from the host.
    host_eof: bool,
    /// Send RST once the tx buffer is flushed (guest closed both directions).
    rst_after_flush: bool,
    /// The host write side was shut down after the guest's SHUTDOWN(SEND).
    host_write_shut: bool,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            pending: Pending::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_readable: false,
            host_hup: false,
            host_eof: false,
            rst_after_flush: false,
            host_write_shut: false,
        }
    }

    /// A host-initiated connection; a REQUEST to the guest is queued.
    pub fn new_local(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, ConnState::LocalInit);
        c.pending.request = true;
        c
    }

    /// A guest-initiated connection already connected on the host; a RESPONSE is queued.
    pub fn new_peer(stream: UnixStream, hdr: &PacketHeader) -> Self {
        let mut c = Self::new(stream, hdr.dst_port, hdr.src_port, ConnState::Established);
        c.update_peer_credit(hdr);
        c.pending.response = true;
        c
    }

    /// Current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Whether the muxer can forget this connection (dead and nothing left to tell the guest).
    pub fn is_finished(&self) -> bool {
        self.state == ConnState::Dead && !self.pending.rst
    }

    /// Kills the connection and queues an RST for the guest.
    pub fn reset(&mut self) {
        self.state = ConnState::Dead;
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
    }

    fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still receive.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_RCV == 0
            && !self.host_eof
    }

    /// Handles a packet from the guest. `payload` holds `hdr.len` bytes of data for RW.
    pub fn recv_guest(
        &mut self,
        hdr: &PacketHeader,
        payload: &mut dyn Read,
        scratch: &mut [u8],
    ) -> GuestAction {
        if self.state == ConnState::Dead {
            return GuestAction::None;
        }
        self.update_peer_credit(hdr);
        match (self.state, hdr.op) {
            (_, VSOCK_OP_RST) => {
                self.state = ConnState::Dead;
                self.pending = Pending::default();
            }
            (ConnState::LocalInit, VSOCK_OP_RESPONSE) => {
                self.state = ConnState::Established;
                return GuestAction::Accepted;
            }
            (ConnState::Established, VSOCK_OP_RW) => {
                self.recv_data(hdr.len as usize, payload, scratch)
            }
            (ConnState::Established, VSOCK_OP_CREDIT_UPDATE) => {}
            (ConnState::Established, VSOCK_OP_CREDIT_REQUEST) => self.pending.credit_update = true,
            (ConnState::Established, VSOCK_OP_SHUTDOWN) => self.recv_shutdown(hdr.flags),
            _ => {
                crate::guest_warn!(op = hdr.op, state = ?self.state, "vsock: unexpected packet, resetting");
                self.reset();
            }
        }
        GuestAction::None
    }

    fn recv_data(&mut self, len: usize, payload: &mut dyn Read, scratch: &mut [u8]) {
        if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0 {
            crate::guest_warn!("vsock: data after SHUTDOWN(SEND), resetting");
            self.reset();
            return;
        }
        if self.tx_buf.len() + len > CONN_BUF_ALLOC as usize {
            crate::guest_warn!("vsock: guest ignored our credit, resetting");
            self.reset();
            return;
        }
        let data = &mut scratch[..len];
        if payload.read_exact(data).is_err() {
            crate::guest_warn!("vsock: cannot read packet payload, resetting");
            self.reset();
            return;
        }
        let mut written = 0;
        if self.tx_buf.is_empty() && !self.host_hup {
            match self.stream.write(data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        self.tx_buf.extend(&data[written..]);
        self.account_forwarded(written);
    }

    fn account_forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    fn recv_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & (VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND);
        let both = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
        if self.peer_shutdown == both {
            if self.tx_buf.is_empty() {
                self.reset();
            } else {
                self.rst_after_flush = true;
            }
        } else {
            self.maybe_shut_host_write();
        }
    }

    fn maybe_shut_host_write(&mut self) {
        if self.peer_shutdown & VSOCK_FLAGS_SHUTDOWN_SEND != 0
            && self.tx_buf.is_empty()
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// Handles epoll events on the host socket.
    pub fn host_event(&mut self, events: EventSet) {
        if events.intersects(EventSet::OUT) {
            self.flush_tx();
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.host_hup = true;
            match self.state {
                ConnState::LocalInit => self.reset(),
                // Drain what is left; the read that returns EOF queues the SHUTDOWN.
                ConnState::Established => self.host_readable = true,
                ConnState::Dead => {}
            }
            return;
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
            self.host_readable = true;
        }
    }

    fn flush_tx(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.account_forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset();
                    return;
                }
            }
        }
        if self.tx_buf.is_empty() {
            self.tx_buf.shrink_to_fit();
            if self.rst_after_flush {
                self.reset();
                return;
            }
            self.maybe_shut_host_write();
        }
    }

    /// Flow-control and state flags, for the SIGUSR1 state dump.
    pub fn state_dump(&self) -> String {
        format!(
            "{:?} pending={:?} tx_buf={} fwd_cnt={} rx_cnt={} peer_buf_alloc={} peer_fwd_cnt={} \
             peer_credit={} peer_shutdown={} readable={} hup={} eof={}",
            self.state,
            self.pending,
            self.tx_buf.len(),
            self.fwd_cnt.0,
            self.rx_cnt.0,
            self.peer_buf_alloc,
            self.peer_fwd_cnt.0,
            self.peer_credit(),
            self.peer_shutdown,
            self.host_readable,
            self.host_hup,
            self.host_eof
        )
    }

    /// Events the host socket should be watched for; `None` once it must not be watched at all.
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup || self.state == ConnState::Dead {
            return None;
        }
        let mut set = EventSet::empty();
        if self.state == ConnState::Established {
            if self.can_send_data() && !self.host_readable && self.peer_credit() > 0 {
                set |= EventSet::IN | EventSet::READ_HANG_UP;
            }
            if !self.tx_buf.is_empty() {
                set |= EventSet::OUT;
            }
        }
        Some(set)
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx_work(&self) -> bool {
        let p = &self.pending;
        p.request
            || p.response
            || p.rst
            || p.shutdown.is_some()
            || p.credit_update
            || p.credit_request
            || (self.host_readable && self.can_send_data())
    }

    fn header(&self, op: u16) -> PacketHeader {
        PacketHeader {
            src_port: self.local_port,
            dst_port: self.peer_port,
            type_: VSOCK_TYPE_STREAM,
            op,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..Default::default()
        }
    }

    /// Produces the next packet for the guest, writing any payload (at most `max_payload`
    /// bytes) to `payload`. CIDs are left for the muxer to fill in.
    pub fn next_rx(
        &mut self,
        payload: &mut dyn Write,
        max_payload: usize,
        scratch: &mut [u8],
    ) -> Option<PacketHeader> {
        let hdr = self.next_rx_inner(payload, max_payload, scratch)?;
        self.last_fwd_cnt_sent = Wrapping(hdr.fwd_cnt);
        self.pending.credit_update = false;
        Some(hdr)
    }

    fn next_rx_inner(
        &mut self,
        payload: &mut dyn Write,
        max_payload: usize,
        scratch: &mut [u8],
    ) -> Option<PacketHeader> {
        if std::mem::take(&mut self.pending.rst) {
            return Some(self.header(VSOCK_OP_RST));
        }
        if std::mem::take(&mut self.pending.request) {
            return Some(self.header(VSOCK_OP_REQUEST));
        }
        if std::mem::take(&mut self.pending.response) {
            return Some(self.header(VSOCK_OP_RESPONSE));
        }
        if self.host_readable && self.can_send_data() {
            if let Some(hdr) = self.read_host(payload, max_payload, scratch) {
                return Some(hdr);
            }
        }
        if let Some(flags) = self.pending.shutdown.take() {
            let mut hdr = self.header(VSOCK_OP_SHUTDOWN);
            hdr.flags = flags;
            return Some(hdr);
        }
        if self.pending.credit_update {
            return Some(self.header(VSOCK_OP_CREDIT_UPDATE));
        }
        if std::mem::take(&mut self.pending.credit_request) {
            return Some(self.header(VSOCK_OP_CREDIT_REQUEST));
        }
        None
    }

    fn read_host(
        &mut self,
        payload: &mut dyn Write,
        max_payload: usize,
        scratch: &mut [u8],
    ) -> Option<PacketHeader> {
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            // Ask once; the guest's CREDIT_UPDATE re-arms reading.
            self.host_readable = false;
            self.pending.credit_request = true;
            return None;
        }
        let want = credit.min(max_payload).min(scratch.len());
        if want == 0 {
            return None;
        }
        match self.stream.read(&mut scratch[..want]) {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                let flags = if self.host_hup {
                    VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND
                } else {
                    VSOCK_FLAGS_SHUTDOWN_SEND
                };
                self.pending.shutdown = Some(flags);
                None
            }
            Ok(n) => {
                if payload.write_all(&scratch[..n]).is_err() {
                    // The rx buffer was validated to hold `max_payload`; this is a bug guard.
                    self.reset();
                    return None;
                }
                self.rx_cnt += Wrapping(n as u32);
                let mut hdr = self.header(VSOCK_OP_RW);
                hdr.len = n as u32;
                Some(hdr)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                None
            }
            Err(_) => {
                self.reset();
                None
            }
        }
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
