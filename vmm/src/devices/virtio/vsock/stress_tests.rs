//! A host-only stress of the vsock device: a simulated guest driver on real guest memory drives
//! the real device, muxer and event loop, with a real Unix socket on the host side. No KVM.
//!
//! What it asserts, for every packet both ways:
//! * every byte the device changed lies inside a device-writable descriptor it was given, and
//!   inside the used length it reported (guest memory starts, and is reset to, a canary pattern);
//! * every used length is the header plus the header's `len`; tx buffers come back untouched with
//!   a used length of 0;
//! * the byte streams arrive complete and in order (guest → host socket, host socket → guest);
//! * a guest that asks for an interrupt (`used_event`) gets one when the device adds used buffers.
//!
//! The ring indices start just below 2^16 so even the short run wraps them; descriptor chains are
//! split at random points (headers included), and connections are torn down and made anew.
//! `HUSK_VSOCK_STRESS_PACKETS` sets the packet count (default 60,000) and `HUSK_VSOCK_STRESS_SEED`
//! the randomness; `cargo xtask soak vsock-stress --runs N` runs it with a new seed each run.

use super::*;
use crate::devices::virtio::test_driver::*;
use crate::event_loop::EventLoop;
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 16 << 20;
/// Where each queue's buffers live: SLOTS regions of REGION bytes.
const RX_REGION: u64 = 0x10_0000;
const TX_REGION: u64 = 0x60_0000;
const GUEST_BUF_ALLOC: u32 = 64 * 1024;
const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
/// Bytes each way per connection before it is closed and a new one is made.
const BYTES_PER_CONN: u64 = 4 << 20;

/// Byte `i` of connection `conn`'s stream in one direction.
fn pattern(conn: u64, dir: u64, i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9) ^ conn.wrapping_mul(31) ^ (dir << 7) ^ (i >> 13);
    (x ^ (x >> 8)) as u8
}

/// Per-connection stream state on both sides.
#[derive(Default)]
struct Conn {
    id: u64,
    local_port: u32,
    /// Guest → host: bytes the guest sent, bytes the host socket read.
    g2h_sent: u64,
    g2h_read: u64,
    /// Host → guest: bytes the host socket wrote, bytes the guest received.
    h2g_written: u64,
    h2g_recv: u64,
    /// The host's credit as the guest last heard it.
    host_buf_alloc: u32,
    host_fwd_cnt: u32,
    /// fwd_cnt last reported to the device.
    reported_fwd: u64,
    closing: bool,
}

struct Sim<'a> {
    mem: &'a GuestMemory,
    rng: Rng,
    rx: GuestQueue<'a>,
    tx: GuestQueue<'a>,
    dev: Arc<Mutex<VsockDevice>>,
    irq: Arc<VirtioInterrupt>,
    el: EventLoop,
    event_idx: bool,
    packets: u64,
    interrupts: u64,
    uds: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl<'a> Sim<'a> {
    fn new(mem: &'a GuestMemory, seed: u64, event_idx: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let rx = GuestQueue::new(mem, 0x1000, RX_REGION, true);
        let tx = GuestQueue::new(mem, 0x4_0000, TX_REGION, false);
        let ev = GuestQueue::new(mem, 0x8_0000, 0, true);
        let queues = vec![
            rx.device_queue(event_idx),
            tx.device_queue(event_idx),
            ev.device_queue(false),
        ];
        let dev = Arc::new(Mutex::new(
            VsockDevice::new(GUEST_CID as u32, &uds).unwrap(),
        ));
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        dev.lock()
            .unwrap()
            .activate(mem.clone(), queues, irq.clone())
            .unwrap();
        let mut el = EventLoop::new().unwrap();
        el.add_subscriber(Box::new(VsockHandler(dev.clone())))
            .unwrap();
        Self {
            mem,
            rng: Rng(seed),
            rx,
            tx,
            dev,
            irq,
            el,
            event_idx,
            packets: 0,
            interrupts: 0,
            uds,
            _dir: dir,
        }
    }

    fn kick(&mut self, queue: usize) {
        lock(&self.dev).queue_events()[queue].write(1).unwrap();
    }

    /// Posts rx buffers into every free slot, with random sizes and splits.
    fn refill_rx(&mut self) {
        let mut any = false;
        while let Some(slot) = self.rx.free.pop() {
            let total = VSOCK_PKT_HDR_SIZE as u32 + self.rng.range(1, 8192) as u32;
            let segs = layout(&mut self.rng, self.rx.slot_region(slot), total);
            self.rx.post(slot, segs);
            any = true;
        }
        if any {
            self.kick(RXQ_INDEX);
        }
    }

    fn header(&self, conn: &Conn, op: u16, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: GUEST_PORT,
            dst_port: conn.local_port,
            len,
            type_: VSOCK_TYPE_STREAM,
            op,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: conn.h2g_recv as u32,
            ..Default::default()
        }
    }

    /// Sends one packet on the tx queue, header and payload split at random. Returns false if no
    /// tx slot is free.
    fn send(&mut self, hdr: PacketHeader, payload: &[u8]) -> bool {
        let Some(slot) = self.tx.free.pop() else {
            return false;
        };
        let mut bytes = VsockHeader::from(hdr).as_slice().to_vec();
        bytes.extend_from_slice(payload);
        let segs = layout(&mut self.rng, self.tx.slot_region(slot), bytes.len() as u32);
        let mut off = 0usize;
        for &(addr, len) in &segs {
            let len = len as usize;
            self.mem
                .write_slice(&bytes[off..off + len], GuestAddress(addr))
                .unwrap();
            off += len;
        }
        self.tx.post(slot, segs);
        self.packets += 1;
        self.kick(TXQ_INDEX);
        true
    }

    /// One round of the event loop, then the guest's interrupt handler: it must have been
    /// interrupted if it asked to be and the device used buffers.
    fn run(&mut self, conn: &mut Conn) {
        let rx_before = self.rx.used_seen;
        let tx_before = self.tx.used_seen;
        let want = !self.event_idx || self.rng.next_u64() % 2 == 0;
        if self.event_idx {
            self.rx.set_used_event(want);
            self.tx.set_used_event(want);
        }
        self.el.run_once(5).unwrap();
        let used_moved = self.rx.used_idx() != rx_before || self.tx.used_idx() != tx_before;
        let signalled = self.irq.irqfd().read().is_ok();
        if signalled {
            self.interrupts += 1;
            assert_ne!(
                self.irq.status() & 1,
                0,
                "irqfd raised without the VRING bit"
            );
            self.irq.ack(1);
        }
        if want && used_moved {
            assert!(
                signalled,
                "used buffers added but the guest was not interrupted"
            );
        }
        self.reap_tx();
        self.reap_rx(conn);
    }

    fn reap_tx(&mut self) {
        while let Some((slot, segs, len)) = self.tx.pop_used() {
            assert_eq!(len, 0, "tx used length");
            // The device may only read tx buffers: the bytes the guest wrote are still there.
            let total: u32 = segs.iter().map(|s| s.1).sum();
            let written = gather(self.mem, &segs, total as usize);
            self.tx.check_and_reset(slot, &segs, &written, "tx");
        }
    }

    /// Takes the next used rx buffer: checks its length and that the device wrote nothing
    /// outside it, then parses the packet.
    fn take_rx_packet(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        let (slot, segs, len) = self.rx.pop_used()?;
        let cap: u32 = segs.iter().map(|s| s.1).sum();
        assert!(
            len as usize >= VSOCK_PKT_HDR_SIZE && len <= cap,
            "rx used len {len}"
        );
        let mut bytes = gather(self.mem, &segs, len as usize);
        self.rx.check_and_reset(slot, &segs, &bytes, "rx");
        let hdr = PacketHeader::from(
            VsockHeader::from_slice(&bytes[..VSOCK_PKT_HDR_SIZE])
                .copied()
                .unwrap(),
        );
        assert_eq!(
            len,
            VSOCK_PKT_HDR_SIZE as u32 + hdr.len,
            "used length vs header"
        );
        bytes.drain(..VSOCK_PKT_HDR_SIZE);
        Some((hdr, bytes))
    }

    fn reap_rx(&mut self, conn: &mut Conn) {
        while let Some((hdr, data)) = self.take_rx_packet() {
            self.packets += 1;
            self.guest_recv(conn, &hdr, &data);
        }
        self.refill_rx();
    }

    fn guest_recv(&mut self, conn: &mut Conn, h: &PacketHeader, d: &[u8]) {
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (VSOCK_HOST_CID, GUEST_CID, conn.local_port, GUEST_PORT),
            "packet addressed to another connection: {h:?}"
        );
        conn.host_buf_alloc = h.buf_alloc;
        conn.host_fwd_cnt = h.fwd_cnt;
        match h.op {
            VSOCK_OP_RW => {
                for (i, &b) in d.iter().enumerate() {
                    let at = conn.h2g_recv + i as u64;
                    assert_eq!(
                        b,
                        pattern(conn.id, 1, at),
                        "host→guest byte {at} of conn {}",
                        conn.id
                    );
                }
                conn.h2g_recv += d.len() as u64;
                if conn.h2g_recv - conn.reported_fwd >= u64::from(GUEST_BUF_ALLOC / 4) {
                    self.credit_update(conn);
                }
            }
            VSOCK_OP_CREDIT_UPDATE => {}
            VSOCK_OP_CREDIT_REQUEST => self.credit_update(conn),
            VSOCK_OP_SHUTDOWN if conn.closing => {}
            op => panic!("unexpected op {op} on conn {}: {h:?}", conn.id),
        }
    }

    fn credit_update(&mut self, conn: &mut Conn) {
        let hdr = self.header(conn, VSOCK_OP_CREDIT_UPDATE, 0);
        // A full tx queue drains on the next round; the update then goes out with the next packet.
        if self.send(hdr, &[]) {
            conn.reported_fwd = conn.h2g_recv;
        }
    }

    /// Host connects, the guest accepts.
    fn connect(&mut self, id: u64) -> (Conn, UnixStream) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .unwrap();
        let mut conn = Conn {
            id,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let req = loop {
            assert!(Instant::now() < deadline, "no REQUEST for conn {id}");
            self.el.run_once(5).unwrap();
            let _ = self.irq.irqfd().read();
            self.reap_tx();
            if let Some((hdr, _)) = self.take_rx_packet() {
                self.refill_rx();
                break hdr;
            }
        };
        assert_eq!(req.op, VSOCK_OP_REQUEST);
        conn.local_port = req.src_port;
        conn.host_buf_alloc = req.buf_alloc;
        let resp = self.header(&conn, VSOCK_OP_RESPONSE, 0);
        assert!(self.send(resp, &[]));
        self.el.run_once(5).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.last() != Some(&b'\n') {
            host.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert_eq!(line, format!("OK {}\n", conn.local_port).into_bytes());
        host.set_nonblocking(true).unwrap();
        (conn, host)
    }

    /// Moves BYTES_PER_CONN each way (or until the packet budget is spent), then closes.
    fn exchange(&mut self, conn: &mut Conn, host: &mut UnixStream, budget: u64) {
        let mut last_progress = Instant::now();
        let mut progress_mark = 0u64;
        let mut hostbuf = vec![0u8; 64 * 1024];
        loop {
            let done_sending = conn.g2h_sent >= BYTES_PER_CONN || self.packets >= budget;
            let done_writing = conn.h2g_written >= BYTES_PER_CONN || self.packets >= budget;
            if done_sending
                && done_writing
                && conn.g2h_read == conn.g2h_sent
                && conn.h2g_recv == conn.h2g_written
            {
                return;
            }
            // Host writes a random chunk of its stream.
            if !done_writing {
                let n = self.rng.range(1, 20_000) as usize;
                let chunk: Vec<u8> = (0..n as u64)
                    .map(|i| pattern(conn.id, 1, conn.h2g_written + i))
                    .collect();
                match host.write(&chunk) {
                    Ok(w) => conn.h2g_written += w as u64,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("host write: {e}"),
                }
            }
            // Host reads what arrived and checks it.
            loop {
                match host.read(&mut hostbuf) {
                    Ok(0) => panic!("host socket closed early on conn {}", conn.id),
                    Ok(n) => {
                        for (i, &b) in hostbuf[..n].iter().enumerate() {
                            let at = conn.g2h_read + i as u64;
                            if b != pattern(conn.id, 0, at) {
                                // Name the stream offset the bytes came from: lost or repeated data.
                                let got = &hostbuf[i..n.min(i + 16)];
                                let found = (at.saturating_sub(300_000)..at + 300_000).find(|&o| {
                                    got.iter()
                                        .enumerate()
                                        .all(|(k, &x)| x == pattern(conn.id, 0, o + k as u64))
                                });
                                panic!(
                                    "guest→host byte {at} of conn {} is wrong: the bytes there \
                                     are stream offset {found:?} (sent {})",
                                    conn.id, conn.g2h_sent
                                );
                            }
                        }
                        conn.g2h_read += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("host read: {e}"),
                }
            }
            // Guest sends within the host's credit.
            for _ in 0..self.rng.range(0, 4) {
                let credit = conn
                    .host_buf_alloc
                    .saturating_sub((conn.g2h_sent as u32).wrapping_sub(conn.host_fwd_cnt));
                let left = BYTES_PER_CONN.saturating_sub(conn.g2h_sent);
                if done_sending || credit == 0 || left == 0 {
                    break;
                }
                let n = self.rng.range(1, 4096).min(u64::from(credit)).min(left);
                let payload: Vec<u8> = (0..n)
                    .map(|i| pattern(conn.id, 0, conn.g2h_sent + i))
                    .collect();
                let hdr = self.header(conn, VSOCK_OP_RW, n as u32);
                if !self.send(hdr, &payload) {
                    break;
                }
                conn.g2h_sent += n;
                conn.reported_fwd = conn.h2g_recv;
            }
            if conn.h2g_recv > conn.reported_fwd {
                self.credit_update(conn);
            }
            self.run(conn);
            let mark = conn.g2h_read + conn.h2g_recv + self.packets;
            if mark != progress_mark {
                progress_mark = mark;
                last_progress = Instant::now();
            }
            assert!(
                last_progress.elapsed() < Duration::from_secs(10),
                "no progress for 10 s on conn {}: g2h {}/{} h2g {}/{}; {}",
                conn.id,
                conn.g2h_read,
                conn.g2h_sent,
                conn.h2g_recv,
                conn.h2g_written,
                lock(&self.dev).state_dump()
            );
        }
    }

    /// Host closes; the guest sees SHUTDOWN and answers RST; the device forgets the connection.
    fn close(&mut self, mut conn: Conn, host: UnixStream) {
        conn.closing = true;
        drop(host);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&self.dev).muxer().connection_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "connection {} not closed",
                conn.id
            );
            self.run(&mut conn);
            if self.tx.free.len() == usize::from(SLOTS) {
                let rst = self.header(&conn, VSOCK_OP_RST, 0);
                self.send(rst, &[]);
            }
        }
        self.el.run_once(5).unwrap();
        self.reap_tx();
    }

    fn run_all(&mut self, packets: u64) {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        self.mem
            .write_slice(
                &vec![CANARY; MEM_SIZE - RX_REGION as usize],
                GuestAddress(RX_REGION),
            )
            .unwrap();
        self.refill_rx();
        let mut id = 0;
        while self.packets < packets {
            let (mut conn, mut host) = self.connect(id);
            self.exchange(&mut conn, &mut host, packets);
            self.close(conn, host);
            id += 1;
        }
        // Every buffer returned: the whole buffer area still holds the canary.
        let mut rest =
            vec![0u8; (MEM_SIZE - TX_REGION as usize).min(usize::from(SLOTS) * REGION as usize)];
        self.mem
            .read_slice(&mut rest, GuestAddress(TX_REGION))
            .unwrap();
        assert!(rest.iter().all(|&b| b == CANARY), "tx area changed");
        assert!(id >= 1);
        let wraps = u64::from(START_IDX) + self.packets / 2;
        eprintln!(
            "vsock stress: {} packets, {id} connections, {} interrupts, ~{} ring wraps per queue, event_idx={}",
            self.packets,
            self.interrupts,
            wraps >> 16,
            self.event_idx
        );
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

fn packet_budget() -> u64 {
    env_u64("HUSK_VSOCK_STRESS_PACKETS", 60_000)
}

fn seed(test: u64) -> u64 {
    let seed = env_u64("HUSK_VSOCK_STRESS_SEED", 0x5eed_0000) ^ test;
    eprintln!("vsock stress: seed {seed:#x}");
    seed
}

#[test]
fn stress_both_ways_without_notification_suppression() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    Sim::new(&mem, seed(1), false).run_all(packet_budget() / 2);
}

#[test]
fn stress_both_ways_with_event_idx() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    Sim::new(&mem, seed(2), true).run_all(packet_budget() / 2);
}
