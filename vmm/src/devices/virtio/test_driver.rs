//! A simulated guest driver for host-only tests of the virtio devices: split virtqueues on real
//! guest memory (vm-memory), filled by the test as a guest driver would, with a canary pattern to
//! catch any byte a device writes outside the buffers it was given.

// Test support, not API: its items are documented where it helps the tests' reader.
#![allow(missing_docs, missing_debug_implementations)]

use std::collections::HashMap;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

pub const QLEN: u16 = 256;
/// Offsets of the avail and used rings from a queue's descriptor table. (Not virtio-queue's
/// `MockSplitQueue`: its `create` puts the used ring over the avail ring's second half.)
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
/// Descriptors reserved per chain; a chain uses 1..=DESCS_PER_CHAIN of them.
pub const DESCS_PER_CHAIN: u16 = 8;
pub const SLOTS: u16 = QLEN / DESCS_PER_CHAIN;
pub const REGION: u64 = 0x1_0000;
pub const CANARY: u8 = 0xa5;
/// First ring index: a few hundred packets before the 16-bit wrap.
pub const START_IDX: u16 = 0xffff - 300;

/// xorshift64*: reproducible randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// One descriptor segment: guest address, length.
pub type Seg = (u64, u32);

/// Splits `total` bytes into 1..=DESCS_PER_CHAIN segments placed in `region`, with random gaps.
pub fn layout(rng: &mut Rng, region: u64, total: u32) -> Vec<Seg> {
    let n = rng.range(1, u64::from(DESCS_PER_CHAIN).min(u64::from(total))) as usize;
    let mut cuts: Vec<u32> = (1..n)
        .map(|_| rng.range(1, u64::from(total) - 1) as u32)
        .collect();
    cuts.push(0);
    cuts.push(total);
    cuts.sort_unstable();
    cuts.dedup();
    let mut addr = region + rng.range(0, 64);
    let mut segs = Vec::new();
    for w in cuts.windows(2) {
        let len = w[1] - w[0];
        segs.push((addr, len));
        addr += u64::from(len) + rng.range(0, 64);
    }
    assert!(addr < region + REGION);
    segs
}

/// The guest side of one virtqueue: descriptor slots, the avail ring it writes and the used ring
/// it reads, both with free-running 16-bit indices.
pub struct GuestQueue<'a> {
    /// Descriptor table, avail ring and used ring, each on its own page.
    pub ring: u64,
    pub mem: &'a GuestMemory,
    pub region: u64,
    pub writable: bool,
    pub avail_idx: u16,
    pub used_seen: u16,
    pub free: Vec<u16>,
    pub posted: HashMap<u16, Vec<Seg>>,
}

impl<'a> GuestQueue<'a> {
    pub fn new(mem: &'a GuestMemory, ring: u64, region: u64, writable: bool) -> Self {
        mem.write_obj(START_IDX, GuestAddress(ring + AVAIL + 2))
            .unwrap();
        mem.write_obj(START_IDX, GuestAddress(ring + USED + 2))
            .unwrap();
        Self {
            ring,
            mem,
            region,
            writable,
            avail_idx: START_IDX,
            used_seen: START_IDX,
            free: (0..SLOTS).rev().collect(),
            posted: HashMap::new(),
        }
    }

    pub fn device_queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(QLEN).unwrap();
        q.set_size(QLEN);
        q.set_ready(true);
        let addr = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = addr(self.ring);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = addr(self.ring + AVAIL);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = addr(self.ring + USED);
        q.set_used_ring_address(lo, hi);
        q.set_next_avail(START_IDX);
        q.set_next_used(START_IDX);
        q.set_event_idx(event_idx);
        q
    }

    pub fn slot_region(&self, slot: u16) -> u64 {
        self.region + u64::from(slot) * REGION
    }

    /// Makes `segs` (inside a free slot's region) available as one chain.
    pub fn post(&mut self, slot: u16, segs: Vec<Seg>) {
        let base = slot * DESCS_PER_CHAIN;
        for (i, &(addr, len)) in segs.iter().enumerate() {
            let mut flags = if self.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < segs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = SplitDescriptor::new(addr, len, flags, base + i as u16 + 1);
            let at = self.ring + u64::from(base + i as u16) * 16;
            self.mem
                .write_obj(RawDescriptor::from(d), GuestAddress(at))
                .unwrap();
        }
        let slot_at = self.ring + AVAIL + 4 + u64::from(self.avail_idx % QLEN) * 2;
        self.mem.write_obj(base, GuestAddress(slot_at)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.ring + AVAIL + 2))
            .unwrap();
        self.posted.insert(base, segs);
    }

    /// Asks for an interrupt at the next used buffer (`used_event`, EVENT_IDX) or far later.
    pub fn set_used_event(&self, want: bool) {
        let ev = if want {
            self.used_seen
        } else {
            self.used_seen.wrapping_add(QLEN * 2)
        };
        let at = self.ring + AVAIL + 4 + u64::from(QLEN) * 2;
        self.mem.write_obj(ev, GuestAddress(at)).unwrap();
    }

    /// Takes the next used element: its segments and used length.
    pub fn pop_used(&mut self) -> Option<(u16, Vec<Seg>, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let at = self.ring + USED + 4 + u64::from(self.used_seen % QLEN) * 8;
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        let id = u16::try_from(id).expect("used id fits the ring");
        let segs = self
            .posted
            .remove(&id)
            .unwrap_or_else(|| panic!("used id {id} was not available"));
        self.free.push(id / DESCS_PER_CHAIN);
        Some((id / DESCS_PER_CHAIN, segs, len))
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.ring + USED + 2))
            .unwrap()
    }

    /// Checks that outside `segs` the slot's region still holds the canary, then resets it.
    pub fn check_and_reset(&self, slot: u16, segs: &[Seg], written: &[u8], what: &str) {
        let region = self.slot_region(slot);
        let end = segs.last().map_or(0, |&(a, l)| a + u64::from(l)) + 64 - region;
        let mut buf = vec![0u8; end as usize];
        self.mem.read_slice(&mut buf, GuestAddress(region)).unwrap();
        let mut expected = vec![CANARY; buf.len()];
        let mut off = 0usize;
        for &(addr, len) in segs {
            let start = (addr - region) as usize;
            for b in &mut expected[start..start + len as usize] {
                if off < written.len() {
                    *b = written[off];
                }
                off += 1;
            }
        }
        if let Some(i) = (0..buf.len()).find(|&i| buf[i] != expected[i]) {
            panic!(
                "{what}: slot {slot} byte {:#x} is {:#04x}, expected {:#04x} (segments {segs:x?})",
                region + i as u64,
                buf[i],
                expected[i]
            );
        }
        self.mem
            .write_slice(&vec![CANARY; buf.len()], GuestAddress(region))
            .unwrap();
    }
}

/// Reads the chain's bytes in order.
pub fn gather(mem: &GuestMemory, segs: &[Seg], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for &(addr, l) in segs {
        let mut b = vec![0u8; l as usize];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        out.extend_from_slice(&b);
    }
    out.truncate(len);
    out
}
