//! Host-only tests of the net device: a simulated guest driver on real guest memory, and on the
//! host side either a `SOCK_SEQPACKET` socket pair (which keeps frame boundaries as a tap does)
//! or a real tap device in a network namespace of the test's own, answered by the host kernel.

use super::*;
use crate::devices::virtio::test_driver::*;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixDatagram;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 16 << 20;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x4_0000;
const RX_REGION: u64 = 0x10_0000;
const TX_REGION: u64 = 0x60_0000;
const MAC: [u8; 6] = [0x02, 0x68, 0x75, 0x73, 0x6b, 0x02];

/// A device on one end of a `SOCK_SEQPACKET` pair, active on fresh guest queues.
struct Rig<'a> {
    dev: NetDevice,
    rx: GuestQueue<'a>,
    tx: GuestQueue<'a>,
    interrupt: Arc<VirtioInterrupt>,
    /// The host's end: what the device writes to "the tap" arrives here, and frames written here
    /// reach the device.
    host: OwnedFd,
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let (a, b) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    (a, b)
}

fn memory() -> GuestMemory {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(
        &vec![CANARY; MEM_SIZE - RX_REGION as usize],
        GuestAddress(RX_REGION),
    )
    .unwrap();
    mem
}

/// The features a driver without offloads acks (version 1, MAC, MTU).
const PLAIN: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MTU);

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemory, tap: OwnedFd, host: OwnedFd) -> Self {
        Self::acking(mem, tap, host, OFFERED_FEATURES)
    }

    /// A device whose driver acked `acked`.
    fn acking(mem: &'a GuestMemory, tap: OwnedFd, host: OwnedFd, acked: u64) -> Self {
        let mut dev = NetDevice::new(tap, MAC, 1500).unwrap();
        let rx = GuestQueue::new(mem, RX_RING, RX_REGION, true);
        let tx = GuestQueue::new(mem, TX_RING, TX_REGION, false);
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        dev.set_acked_features(acked);
        dev.activate(
            mem.clone(),
            vec![rx.device_queue(false), tx.device_queue(false)],
            interrupt.clone(),
        )
        .unwrap();
        Self {
            dev,
            rx,
            tx,
            interrupt,
            host,
        }
    }

    fn with_pair(mem: &'a GuestMemory) -> Self {
        let (tap, host) = seqpacket_pair();
        Self::new(mem, tap, host)
    }

    /// Posts one rx buffer of `len` bytes split into `segs` segments.
    fn post_rx(&mut self, slot: u16, len: u32, rng: &mut Rng) -> Vec<Seg> {
        let segs = layout(rng, self.rx.slot_region(slot), len);
        self.rx.post(slot, segs.clone());
        segs
    }

    /// Posts `bytes` (header and frame) as one tx chain.
    fn post_tx(&mut self, slot: u16, bytes: &[u8], rng: &mut Rng) {
        let segs = layout(rng, self.tx.slot_region(slot), bytes.len() as u32);
        let mut off = 0;
        for &(addr, len) in &segs {
            self.tx
                .mem
                .write_slice(&bytes[off..off + len as usize], GuestAddress(addr))
                .unwrap();
            off += len as usize;
        }
        self.tx.post(slot, segs);
    }

    /// Writes a frame to the device's tap end, as the host kernel would.
    fn host_send(&self, frame: &[u8]) {
        let n = nix::unistd::write(&self.host, frame).unwrap();
        assert_eq!(n, frame.len());
    }

    /// Frames the device wrote to its tap end so far.
    fn host_recv_all(&self) -> Vec<Vec<u8>> {
        let sock = UnixDatagram::from(self.host.try_clone().unwrap());
        sock.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }
}

/// A frame as the host's tap hands it over: a zero `virtio_net_hdr` (10 bytes), two bytes the
/// tap leaves alone (num_buffers), then Ethernet.
fn tap_frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; NET_HDR_SIZE];
    f[NUM_BUFFERS_OFFSET] = 0x77; // whatever was in the device's buffer
    f.extend_from_slice(&MAC); // destination
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // source
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(31) ^ seed));
    f
}

/// The same frame as the guest must see it: `num_buffers` = 1.
fn as_guest_sees(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[NUM_BUFFERS_OFFSET..NET_HDR_SIZE].copy_from_slice(&1u16.to_le_bytes());
    f
}

#[test]
fn frames_cross_both_ways_byte_exact() {
    let mem = memory();
    let mut rig = Rig::with_pair(&mem);
    let mut rng = Rng(7);
    // Host → guest: frames of several sizes into buffers split at random points.
    let sizes = [46usize, 1, 700, 1486, 9000, 64_000];
    let mut posted = Vec::new();
    for (slot, &size) in sizes.iter().enumerate() {
        let frame = tap_frame(size, slot as u8);
        let segs = rig.post_rx(slot as u16, frame.len() as u32 + 100, &mut rng);
        posted.push((slot as u16, segs, frame.clone()));
        rig.host_send(&frame);
    }
    rig.dev.process_rx();
    for (slot, segs, frame) in posted {
        let (got_slot, got_segs, len) = rig.rx.pop_used().expect("a used rx buffer");
        assert_eq!(got_slot, slot);
        assert_eq!(len as usize, frame.len(), "used length = header + frame");
        let want = as_guest_sees(&frame);
        assert_eq!(gather(&mem, &got_segs, len as usize), want);
        // Nothing written past the frame, inside or outside the buffer.
        rig.rx.check_and_reset(slot, &segs, &want, "rx");
    }
    assert!(rig.rx.pop_used().is_none());
    assert_ne!(rig.interrupt.status(), 0, "the guest was interrupted");

    // Guest → host: each chain arrives as one frame, unchanged, and comes back with length 0.
    let frames: Vec<Vec<u8>> = [60usize, 1514, 9014]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut f = vec![0u8; NET_HDR_SIZE];
            f.extend((0..n).map(|j| (j as u8) ^ (i as u8 * 17)));
            f
        })
        .collect();
    for (slot, f) in frames.iter().enumerate() {
        rig.post_tx(slot as u16, f, &mut rng);
    }
    rig.dev.process_tx();
    assert_eq!(rig.host_recv_all(), frames);
    for _ in &frames {
        let (_, _, len) = rig.tx.pop_used().expect("a used tx buffer");
        assert_eq!(len, 0, "tx buffers are returned with used length 0");
    }
    let c = rig.dev.counters();
    assert_eq!(
        (c.rx_frames, c.tx_frames, c.rx_dropped, c.tx_dropped),
        (6, 3, 0, 0)
    );
}

/// With no rx buffer the frame waits (the tap is not read meanwhile); the next buffer gets it,
/// and the frames behind it follow in order.
#[test]
fn a_frame_waits_for_a_buffer() {
    let mem = memory();
    let mut rig = Rig::with_pair(&mem);
    let mut rng = Rng(3);
    let first = tap_frame(100, 1);
    let second = tap_frame(200, 2);
    rig.host_send(&first);
    rig.host_send(&second);
    rig.dev.process_rx();
    assert!(rig.rx.pop_used().is_none());
    assert!(
        !rig.dev.wants_tap(),
        "a waiting frame stops the tap's reads"
    );
    rig.post_rx(0, 2000, &mut rng);
    rig.post_rx(1, 2000, &mut rng);
    rig.dev.process_rx();
    let (_, segs, len) = rig.rx.pop_used().unwrap();
    assert_eq!(gather(&mem, &segs, len as usize), as_guest_sees(&first));
    let (_, segs, len) = rig.rx.pop_used().unwrap();
    assert_eq!(gather(&mem, &segs, len as usize), as_guest_sees(&second));
    assert!(rig.dev.wants_tap());
}

/// A hostile driver's rx buffer that is too small gets no partial frame: the frame is dropped,
/// the buffer comes back with used length 0 and not one byte of it changed.
#[test]
fn a_small_rx_buffer_gets_nothing_written() {
    let mem = memory();
    let mut rig = Rig::with_pair(&mem);
    let mut rng = Rng(11);
    let frame = tap_frame(1000, 5);
    let segs = rig.post_rx(0, frame.len() as u32 - 1, &mut rng);
    rig.host_send(&frame);
    rig.dev.process_rx();
    let (slot, _, len) = rig.rx.pop_used().unwrap();
    assert_eq!(len, 0);
    rig.rx
        .check_and_reset(slot, &segs, &[], "too small rx buffer");
    assert_eq!(rig.dev.counters().rx_dropped, 1);
    // The next frame, into a buffer that fits, is whole.
    let next = tap_frame(10, 6);
    rig.post_rx(1, 500, &mut rng);
    rig.host_send(&next);
    rig.dev.process_rx();
    let (_, segs, len) = rig.rx.pop_used().unwrap();
    assert_eq!(gather(&mem, &segs, len as usize), as_guest_sees(&next));
}

/// A hostile driver's tx chains: shorter than a header plus an Ethernet header, longer than the
/// largest frame, or asking for TCP segmentation without a segment size. None reaches the
/// tap; every buffer is returned.
#[test]
fn bad_tx_chains_never_reach_the_tap() {
    let mem = memory();
    let mut rig = Rig::with_pair(&mem);
    let mut rng = Rng(13);
    let short = vec![0u8; NET_HDR_SIZE + MIN_FRAME_SIZE - 1];
    let long = vec![0u8; NET_HDR_SIZE + MAX_FRAME_SIZE + 1];
    let mut gso = vec![0u8; NET_HDR_SIZE + 1514];
    gso[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    let mut good = vec![0u8; NET_HDR_SIZE + 60];
    good[NET_HDR_SIZE] = 0xaa;
    // The long chain needs more than one slot's region: give it its own layout.
    rig.post_tx(0, &short, &mut rng);
    rig.tx.post(
        1,
        vec![
            (TX_REGION + 0x10_0000, 0x1_0000),
            (TX_REGION + 0x11_0000, (long.len() - 0x1_0000) as u32),
        ],
    );
    rig.post_tx(2, &gso, &mut rng);
    rig.post_tx(3, &good, &mut rng);
    rig.dev.process_tx();
    assert_eq!(rig.host_recv_all(), vec![good], "only the good frame");
    for _ in 0..4 {
        let (_, _, len) = rig.tx.pop_used().expect("every tx buffer comes back");
        assert_eq!(len, 0);
    }
    assert_eq!(rig.dev.counters().tx_dropped, 3);
}

/// Frames that arrive before the driver is up are dropped, not kept (and the tap is drained).
#[test]
fn frames_before_activation_are_dropped() {
    let (tap, host) = seqpacket_pair();
    let mut dev = NetDevice::new(tap, MAC, 1500).unwrap();
    for i in 0..3 {
        nix::unistd::write(&host, &tap_frame(50, i)).unwrap();
    }
    dev.process_rx();
    assert_eq!(dev.counters().rx_dropped, 3);
    assert!(dev.wants_tap());
}

#[test]
fn config_space_has_the_mac_and_mtu() {
    let (tap, _host) = seqpacket_pair();
    let dev = NetDevice::new(tap, MAC, 1400).unwrap();
    let mut config = [0xffu8; CONFIG_SIZE];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400);
    let mut tail = [0xffu8; 4];
    dev.read_config(10, &mut tail);
    assert_eq!(tail, [0x78, 0x05, 0, 0], "past the end reads as zero");
    let offloads = [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ];
    assert_eq!(
        dev.avail_features(),
        offloads.iter().fold(PLAIN, |f, bit| f | (1 << bit)),
        "checksum and TCP segmentation both ways; no UFO, ECN, mergeable buffers or control queue"
    );
}

/// A `virtio_net_hdr` with these flags, segment kind and segment size (checksum at 34+16,
/// a TCP header after an IPv4 one).
fn header(flags: u8, gso_type: u8, gso_size: u16) -> [u8; NET_HDR_SIZE] {
    let mut h = [0u8; NET_HDR_SIZE];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&66u16.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

/// What a driver may ask of the host kernel through a tx header is what it negotiated: a
/// partial checksum needs `CSUM`, a TCPv4/v6 segment `HOST_TSO4`/`HOST_TSO6` plus a partial
/// checksum and a segment size; UDP and ECN segments and the receive-only flags never pass.
#[test]
fn tx_headers_ask_only_for_the_offloads_negotiated() {
    let bit = |b: u32| 1u64 << b;
    let all = OFFERED_FEATURES;
    let csum = PLAIN | bit(VIRTIO_NET_F_CSUM);
    let tso4 = csum | bit(VIRTIO_NET_F_HOST_TSO4);
    let cases: [(&str, [u8; NET_HDR_SIZE], u64, bool); 14] = [
        ("plain frame, plain driver", header(0, 0, 0), PLAIN, true),
        (
            "partial checksum, plain driver",
            header(1, 0, 0),
            PLAIN,
            false,
        ),
        ("partial checksum with CSUM", header(1, 0, 0), csum, true),
        ("TSO4 without HOST_TSO4", header(1, 1, 1448), csum, false),
        ("TSO4 with HOST_TSO4", header(1, 1, 1448), tso4, true),
        ("TSO6 with only HOST_TSO4", header(1, 4, 1428), tso4, false),
        ("TSO6 with everything", header(1, 4, 1428), all, true),
        (
            "TSO4 without a partial checksum",
            header(0, 1, 1448),
            all,
            false,
        ),
        ("TSO4 without a segment size", header(1, 1, 0), all, false),
        ("UDP fragmentation offload", header(1, 3, 1472), all, false),
        ("UDP segmentation offload", header(1, 5, 1472), all, false),
        ("TSO4 with ECN", header(1, 0x81, 1448), all, false),
        ("DATA_VALID from a driver", header(2, 0, 0), all, false),
        ("an unknown flag", header(0x80, 0, 0), all, false),
    ];
    for (what, hdr, acked, ok) in cases {
        assert_eq!(
            check_tx_header(&hdr, acked).is_ok(),
            ok,
            "{what}: {:?}",
            check_tx_header(&hdr, acked)
        );
    }
}

/// The tap is told to hand over what the driver takes, and no more.
#[test]
fn the_taps_offloads_follow_the_drivers_features() {
    let bit = |b: u32| 1u64 << b;
    assert_eq!(tap_offloads(PLAIN), 0);
    assert_eq!(
        tap_offloads(PLAIN | bit(VIRTIO_NET_F_GUEST_TSO4)),
        0,
        "no segments without checksum offload"
    );
    assert_eq!(
        tap_offloads(PLAIN | bit(VIRTIO_NET_F_GUEST_CSUM)),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        tap_offloads(
            PLAIN
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_HOST_TSO4)
        ),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

/// A 64 KiB TCP segment with a partial checksum crosses byte-exact both ways for a driver that
/// negotiated TSO; for a driver that did not, the same frames are dropped either way (the
/// host kernel would otherwise segment and checksum at the guest's request, and the guest
/// would get a frame larger than it posted buffers for).
#[test]
fn tcp_segments_cross_only_for_a_driver_that_negotiated_them() {
    let mem = memory();
    let mut tso = header(1, 1, 1448).to_vec();
    tso.extend((0..65_000usize).map(|i| (i % 251) as u8));
    let mut rx_tso = tso.clone();
    rx_tso[NUM_BUFFERS_OFFSET..NET_HDR_SIZE].copy_from_slice(&[0x55, 0x55]);
    for (acked, crosses) in [(None, true), (Some(PLAIN), false)] {
        let (tap, host) = seqpacket_pair();
        let mut rig = match acked {
            None => Rig::new(&mem, tap, host),
            Some(acked) => Rig::acking(&mem, tap, host, acked),
        };
        let (first, rest) = tso.split_at(0x8000);
        mem.write_slice(first, GuestAddress(TX_REGION + 0x10_0000))
            .unwrap();
        mem.write_slice(rest, GuestAddress(TX_REGION + 0x11_0000))
            .unwrap();
        rig.tx.post(
            0,
            vec![
                (TX_REGION + 0x10_0000, first.len() as u32),
                (TX_REGION + 0x11_0000, rest.len() as u32),
            ],
        );
        rig.dev.process_tx();
        let sent = rig.host_recv_all();
        rig.rx.post(
            0,
            vec![
                (RX_REGION + 0x20_0000, 0x1_0000),
                (RX_REGION + 0x21_0000, 0x1_0000),
            ],
        );
        rig.host_send(&rx_tso);
        rig.dev.process_rx();
        let (_, segs, len) = rig.rx.pop_used().expect("the rx buffer comes back");
        if crosses {
            assert_eq!(
                sent,
                vec![tso.clone()],
                "the guest's segment reaches the tap"
            );
            assert_eq!(gather(&mem, &segs, len as usize), as_guest_sees(&rx_tso));
        } else {
            assert!(sent.is_empty(), "a segment the driver never negotiated");
            assert_eq!(len, 0, "a segment the driver never took");
            let c = rig.dev.counters();
            assert_eq!((c.tx_dropped, c.rx_dropped), (1, 1));
        }
    }
}

/// Opens a tap named `name` in the calling thread's network namespace the way the shim hands
/// one to husk-vmm: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet header.
fn open_tap(name: &str) -> OwnedFd {
    let fd = nix::fcntl::open(
        "/dev/net/tun",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open /dev/net/tun");
    // SAFETY: open(2) just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads (and updates) the ifreq, which outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert!(r >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    let size: libc::c_int = NET_HDR_SIZE as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
    assert!(
        r >= 0,
        "TUNSETVNETHDRSZ: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// Gives interface `name` the IPv4 address `addr`/24 and brings it up (ioctls on a socket
/// of the calling thread's network namespace).
fn configure(name: &str, addr: [u8; 4]) {
    // SAFETY: socket(2) with constant arguments; the result is checked and owned at once.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(sock >= 0);
    // SAFETY: `sock` is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let request = |set: &dyn Fn(&mut libc::ifreq)| {
        // SAFETY: as in open_tap.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        set(&mut req);
        req
    };
    let sockaddr = |a: [u8; 4]| {
        // SAFETY: sockaddr_in is plain old data.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(a);
        // SAFETY: sockaddr_in fits in sockaddr's storage within ifreq's union.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    };
    for (op, req) in [
        (
            libc::SIOCSIFADDR,
            request(&|r| r.ifr_ifru.ifru_addr = sockaddr(addr)),
        ),
        (
            libc::SIOCSIFNETMASK,
            request(&|r| r.ifr_ifru.ifru_netmask = sockaddr([255, 255, 255, 0])),
        ),
        (
            libc::SIOCSIFFLAGS,
            request(&|r| r.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16),
        ),
    ] {
        // SAFETY: `req` is a valid ifreq that outlives the call.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), op, &req) };
        assert!(
            r >= 0,
            "ioctl {op:#x} on {name}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// On a real tap, answered by the host kernel, after the tap took the driver's offloads: the
/// guest sends an ARP request for the tap's address and receives the kernel's ARP reply,
/// addressed to its MAC. Runs in a network namespace of its own (needs root, as every test
/// host here has; without it the test fails, loudly).
#[test]
fn the_host_kernel_answers_the_guests_arp_through_a_real_tap() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace of the test's own (needs root)");
        let tap = open_tap("husk-test0");
        configure("husk-test0", [10, 9, 0, 1]);
        let mem = memory();
        let (_, unused) = seqpacket_pair();
        let mut rig = Rig::new(&mem, tap, unused);
        // The driver took every offload: the real tap must take them too (TUNSETOFFLOAD with
        // checksums and TCP segments both families).
        rig.dev
            .sync_offload()
            .expect("the tap takes the offloads the driver negotiated");
        let mut rng = Rng(17);
        for slot in 0..8 {
            rig.post_rx(slot, 2048, &mut rng);
        }
        // who-has 10.9.0.1 tell 10.9.0.2, from MAC.
        let mut frame = vec![0u8; NET_HDR_SIZE];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&MAC);
        frame.extend_from_slice(&[0x08, 0x06]);
        frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&MAC);
        frame.extend_from_slice(&[10, 9, 0, 2]);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&[10, 9, 0, 1]);
        rig.post_tx(0, &frame, &mut rng);
        rig.dev.process_tx();
        assert_eq!(rig.dev.counters().tx_frames, 1);
        // The kernel may send other frames first (IPv6 neighbour discovery on link up).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            rig.dev.process_rx();
            while let Some((_, segs, len)) = rig.rx.pop_used() {
                let got = gather(&mem, &segs, len as usize);
                let eth = &got[NET_HDR_SIZE..];
                if eth.len() >= 42 && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                    assert_eq!(&eth[..6], &MAC, "the reply is addressed to the guest");
                    assert_eq!(&eth[28..32], &[10, 9, 0, 1], "sender: the tap's address");
                    assert_eq!(&eth[32..38], &MAC, "target: the guest");
                    assert_eq!(&got[NUM_BUFFERS_OFFSET..NET_HDR_SIZE], &[1, 0]);
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no ARP reply from the host kernel within 5 s: {:?}",
                rig.dev.counters()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    })
    .join()
    .unwrap();
}
