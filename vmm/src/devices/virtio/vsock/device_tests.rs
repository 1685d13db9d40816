//! Tests of the vsock device through mock virtqueues (`MockSplitQueue`) and a real event loop
//! with real Unix sockets on the host side.

use super::*;
use crate::event_loop::EventLoop;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QLEN: u16 = 16;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;
const RX_DATA_LEN: u32 = 4096;

struct Harness<'a> {
    mem: &'a GuestMemory,
    rxq: MockSplitQueue<'a, GuestMemory>,
    txq: MockSplitQueue<'a, GuestMemory>,
    dev: Arc<Mutex<VsockDevice>>,
    el: EventLoop,
    rx_posted: u16,
    rx_seen: u16,
    tx_posted: u16,
    _dir: tempfile::TempDir,
    uds: std::path::PathBuf,
}

fn mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn chain(descs: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, (addr, len, write))| {
            let mut flags = if *write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
            }
            RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, 0))
        })
        .collect()
}

fn add_chain(q: &MockSplitQueue<GuestMemory>, posted: &mut u16, descs: &[(u64, u32, bool)]) {
    // Two descriptor slots per chain, rotating through the table.
    let slot = (*posted % (QLEN / 2)) * 2;
    let mut raw = chain(descs);
    for (i, d) in raw.iter_mut().enumerate() {
        let s = SplitDescriptor::from(*d);
        *d = RawDescriptor::from(SplitDescriptor::new(
            s.addr().0,
            s.len(),
            s.flags(),
            slot + i as u16 + 1,
        ));
    }
    q.add_desc_chains(&raw, slot).unwrap();
    *posted += 1;
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemory) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let rxq = MockSplitQueue::create(mem, GuestAddress(0x1000), QLEN);
        let txq = MockSplitQueue::create(mem, GuestAddress(0x4000), QLEN);
        let evq = MockSplitQueue::create(mem, GuestAddress(0x8000), QLEN);
        let queues = vec![
            rxq.create_queue::<Queue>().unwrap(),
            txq.create_queue::<Queue>().unwrap(),
            evq.create_queue::<Queue>().unwrap(),
        ];
        let dev = Arc::new(Mutex::new(VsockDevice::new(3, &uds).unwrap()));
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        dev.lock()
            .unwrap()
            .activate(mem.clone(), queues, irq)
            .unwrap();
        let mut el = EventLoop::new().unwrap();
        el.add_subscriber(Box::new(VsockHandler(dev.clone())))
            .unwrap();
        let mut h = Self {
            mem,
            rxq,
            txq,
            dev,
            el,
            rx_posted: 0,
            rx_seen: 0,
            tx_posted: 0,
            _dir: dir,
            uds,
        };
        for _ in 0..4 {
            h.post_rx();
        }
        h
    }

    fn rx_addr(n: u16) -> u64 {
        RX_BUF + u64::from(n % (QLEN / 2)) * 0x2000
    }

    fn post_rx(&mut self) {
        let a = Self::rx_addr(self.rx_posted);
        add_chain(
            &self.rxq,
            &mut self.rx_posted,
            &[
                (a, VSOCK_PKT_HDR_SIZE as u32, true),
                (a + 0x100, RX_DATA_LEN, true),
            ],
        );
    }

    fn kick(&mut self, queue: usize) {
        self.dev.lock().unwrap().queue_events()[queue]
            .write(1)
            .unwrap();
        self.el.run_once(1000).unwrap();
    }

    /// Sends a packet on the guest's tx queue and lets the device process it.
    fn guest_send(&mut self, hdr: PacketHeader, data: &[u8]) {
        let a = TX_BUF + u64::from(self.tx_posted % (QLEN / 2)) * 0x2_0000;
        self.mem
            .write_obj(VsockHeader::from(hdr), GuestAddress(a))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(a + 0x100)).unwrap();
        let mut descs = vec![(a, VSOCK_PKT_HDR_SIZE as u32, false)];
        if !data.is_empty() {
            descs.push((a + 0x100, data.len() as u32, false));
        }
        add_chain(&self.txq, &mut self.tx_posted, &descs);
        self.kick(TXQ_INDEX);
    }

    /// Waits for the next packet the device put in the guest's rx queue.
    fn guest_recv(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        for _ in 0..50 {
            let used = self.rxq.used().idx().load();
            if used != self.rx_seen {
                let a = Self::rx_addr(self.rx_seen);
                self.rx_seen += 1;
                let hdr =
                    PacketHeader::from(self.mem.read_obj::<VsockHeader>(GuestAddress(a)).unwrap());
                let mut data = vec![0u8; hdr.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(a + 0x100))
                    .unwrap();
                self.post_rx();
                self.kick(RXQ_INDEX);
                return Some((hdr, data));
            }
            self.el.run_once(20).unwrap();
        }
        None
    }

    fn guest_hdr(&self, op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            len,
            type_: VSOCK_TYPE_STREAM,
            op,
            buf_alloc: 65536,
            fwd_cnt: 0,
            ..Default::default()
        }
    }

    /// Host-initiated connection to guest port 1024, accepted by the guest.
    fn host_connect(&mut self) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        self.el.run_once(1000).unwrap();
        let (req, _) = self.guest_recv().expect("REQUEST");
        assert_eq!(req.op, VSOCK_OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (2, 3, 1024));
        let local = req.src_port;
        self.guest_send(self.guest_hdr(VSOCK_OP_RESPONSE, 1024, local, 0), &[]);
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        let mut b = [0u8; 1];
        while !line.ends_with('\n') {
            host.read_exact(&mut b).unwrap();
            line.push(b[0] as char);
        }
        assert_eq!(line, format!("OK {local}\n"));
        (host, local)
    }
}

#[test]
fn config_space_holds_guest_cid() {
    let dir = tempfile::tempdir().unwrap();
    let dev = VsockDevice::new(42, &dir.path().join("s")).unwrap();
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 42);
    let mut b = [0xffu8; 4];
    dev.read_config(6, &mut b);
    assert_eq!(b, [0; 4]);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
}

#[test]
fn host_connect_handshake_and_data_both_ways() {
    let m = mem();
    let mut h = Harness::new(&m);
    let (mut host, local) = h.host_connect();
    assert_eq!(local, LOCAL_PORT_BASE);

    host.write_all(b"ping").unwrap();
    let (pkt, data) = h.guest_recv().expect("data");
    assert_eq!((pkt.op, pkt.len), (VSOCK_OP_RW, 4));
    assert_eq!(data, b"ping");
    assert_eq!(pkt.buf_alloc, CONN_BUF_ALLOC);

    h.guest_send(h.guest_hdr(VSOCK_OP_RW, 1024, local, 4), b"pong");
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");

    // Host closes: the guest is told, answers RST, the connection goes away.
    drop(host);
    let (pkt, _) = h.guest_recv().expect("shutdown");
    assert_eq!(pkt.op, VSOCK_OP_SHUTDOWN);
    h.guest_send(h.guest_hdr(VSOCK_OP_RST, 1024, local, 0), &[]);
    assert_eq!(h.dev.lock().unwrap().muxer().connection_count(), 0);
}

#[test]
fn guest_rst_closes_the_host_client() {
    let m = mem();
    let mut h = Harness::new(&m);
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    h.el.run_once(1000).unwrap();
    let (req, _) = h.guest_recv().unwrap();
    h.guest_send(h.guest_hdr(VSOCK_OP_RST, 99, req.src_port, 0), &[]);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0, "closed without OK");
}

#[test]
fn bad_handshake_is_closed() {
    let m = mem();
    let mut h = Harness::new(&m);
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"HELLO\n").unwrap();
    h.el.run_once(1000).unwrap();
    h.el.run_once(100).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);
    assert!(h.guest_recv().is_none(), "nothing reaches the guest");
}

#[test]
fn unknown_connection_gets_rst() {
    let m = mem();
    let mut h = Harness::new(&m);
    h.guest_send(h.guest_hdr(VSOCK_OP_RW, 5000, 77, 3), b"abc");
    let (pkt, _) = h.guest_recv().unwrap();
    assert_eq!(pkt.op, VSOCK_OP_RST);
    assert_eq!((pkt.src_port, pkt.dst_port, pkt.dst_cid), (77, 5000, 3));
    // An RST for an unknown connection is not answered.
    h.guest_send(h.guest_hdr(VSOCK_OP_RST, 5000, 77, 0), &[]);
    assert!(h.guest_recv().is_none());
}

#[test]
fn guest_connect_to_host_listener() {
    let m = mem();
    let mut h = Harness::new(&m);
    let listener = UnixListener::bind(format!("{}_{}", h.uds.display(), 5000)).unwrap();
    h.guest_send(h.guest_hdr(VSOCK_OP_REQUEST, 2000, 5000, 0), &[]);
    let (pkt, _) = h.guest_recv().unwrap();
    assert_eq!(pkt.op, VSOCK_OP_RESPONSE);
    assert_eq!((pkt.src_port, pkt.dst_port), (5000, 2000));
    let (mut host, _) = listener.accept().unwrap();
    h.guest_send(h.guest_hdr(VSOCK_OP_RW, 2000, 5000, 2), b"hi");
    let mut b = [0u8; 2];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hi");
    // No listener on another port: refused.
    h.guest_send(h.guest_hdr(VSOCK_OP_REQUEST, 2001, 5001, 0), &[]);
    assert_eq!(h.guest_recv().unwrap().0.op, VSOCK_OP_RST);
}

#[test]
fn hostile_packets_are_dropped_without_panic() {
    let m = mem();
    let mut h = Harness::new(&m);
    // Wrong source CID: dropped silently.
    let mut hdr = h.guest_hdr(VSOCK_OP_REQUEST, 1, 2, 0);
    hdr.src_cid = 9;
    h.guest_send(hdr, &[]);
    // Length larger than the buffer: RST.
    let hdr = h.guest_hdr(VSOCK_OP_RW, 1, 2, 60000);
    h.guest_send(hdr, b"short");
    assert_eq!(h.guest_recv().unwrap().0.op, VSOCK_OP_RST);
    // Datagram type: RST.
    let mut hdr = h.guest_hdr(VSOCK_OP_REQUEST, 1, 2, 0);
    hdr.type_ = 2;
    h.guest_send(hdr, &[]);
    assert_eq!(h.guest_recv().unwrap().0.op, VSOCK_OP_RST);
    // A descriptor pointing outside guest memory.
    add_chain(&h.txq, &mut h.tx_posted, &[(0xffff_ff00, 44, false)]);
    h.kick(TXQ_INDEX);
    assert!(h.guest_recv().is_none());
    assert_eq!(
        h.txq.used().idx().load(),
        h.tx_posted,
        "every tx chain is returned"
    );
}

#[test]
fn reset_drops_connections() {
    let m = mem();
    let mut h = Harness::new(&m);
    let (mut host, _) = h.host_connect();
    h.dev.lock().unwrap().reset();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);
}
