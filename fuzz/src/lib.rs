//! The harnesses behind husk's fuzz targets (`fuzz_targets/`), kept here so that the seed
//! corpus can also be replayed by a plain test. Each takes the fuzzer's bytes and drives real
//! husk code the way a hostile guest (or its kernel) would.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use husk_vmm::devices::virtio::mmio::MmioTransport;
use husk_vmm::devices::virtio::vsock::packet::{PacketHeader, VsockHeader};
use husk_vmm::devices::virtio::vsock::VsockDevice;
use husk_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use husk_vmm::devices::BusDevice;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory of the device harnesses.
pub const MEM_SIZE: usize = 64 * 1024;
/// Queue length the driver prefix configures (every vsock queue).
const QLEN: u32 = 16;
/// Where queue `q`'s descriptor table, avail and used rings are (`q * 0x1000` plus these).
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x400;
const USED: u64 = 0x800;
/// Guest CID of the device.
const GUEST_CID: u32 = 3;

/// virtio-mmio v2 register offsets.
mod reg {
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    pub const QUEUE_USED_LOW: u64 = 0xa0;
}

/// The hybrid vsock socket of this process's devices (a new device rebinds it).
fn uds() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        dir
    })
    .join("v.sock")
}

/// A vsock device behind its virtio-mmio transport, on `MEM_SIZE` bytes of guest memory.
struct Rig {
    device: Arc<Mutex<VsockDevice>>,
    transport: MmioTransport,
    mem: GuestMemoryMmap<()>,
}

impl Rig {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
        let device = Arc::new(Mutex::new(
            VsockDevice::new(GUEST_CID, &uds()).expect("vsock device"),
        ));
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let shared: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport =
            MmioTransport::new(shared, mem.clone(), Arc::new(VirtioInterrupt::new(irq)));
        Self {
            device,
            transport,
            mem,
        }
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// What a Linux driver does up to DRIVER_OK, with every queue's rings at `q * 0x1000`.
    fn driver_init(&mut self) {
        self.write(reg::STATUS, 1);
        self.write(reg::STATUS, 1 | 2);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, 0);
        self.write(reg::STATUS, 1 | 2 | 8);
        for q in 0..3u32 {
            let base = u64::from(q) * 0x1000;
            self.write(reg::QUEUE_SEL, q);
            self.write(reg::QUEUE_NUM, QLEN);
            self.write(reg::QUEUE_DESC_LOW, (base + DESC) as u32);
            self.write(reg::QUEUE_AVAIL_LOW, (base + AVAIL) as u32);
            self.write(reg::QUEUE_USED_LOW, (base + USED) as u32);
            self.write(reg::QUEUE_READY, 1);
        }
        self.write(reg::STATUS, 1 | 2 | 8 | 4);
    }

    /// One register access from 7 bytes: kind, offset (u16), value (u32).
    fn access(&mut self, op: &[u8]) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) % 0x180);
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        match op[0] % 4 {
            0 => self.write(offset & !3, value),
            1 => {
                let mut data = [0u8; 4];
                self.transport.read(offset & !3, &mut data);
            }
            // Odd sizes and alignments: refused, never a panic.
            2 => self.transport.write(offset, &value.to_le_bytes()[..(op[0] as usize % 3) + 1]),
            _ => {
                // A queue notification, then what the event loop would do.
                self.write(reg::QUEUE_NOTIFY, value % 3);
                self.device.lock().unwrap().process_queues();
            }
        }
    }
}

/// The vsock device with a working driver: the fuzzer writes the rings and buffers (the first
/// bytes become guest memory from address 0) and then notifies, so it controls every
/// descriptor chain, index and packet the device reads. Layout: `[n][n * 7 op bytes][memory]`.
pub fn vsock_device(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let ops_len = (usize::from(n) * 7).min(rest.len());
    let (ops, memory) = rest.split_at(ops_len);
    let mut rig = Rig::new();
    let memory = &memory[..memory.len().min(MEM_SIZE)];
    rig.mem
        .write_slice(memory, GuestAddress(0))
        .expect("fits guest memory");
    rig.driver_init();
    rig.device.lock().unwrap().process_queues();
    for op in ops.chunks_exact(7) {
        rig.access(op);
    }
    rig.device.lock().unwrap().process_queues();
}

/// The transport's registers with no driver prefix: any order of accesses, including ones
/// that set queue addresses anywhere and activate the device, over guest memory the fuzzer
/// fills after the accesses. Layout: `[n][n * 7 op bytes][memory]`.
pub fn mmio_registers(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let ops_len = (usize::from(n) * 7).min(rest.len());
    let (ops, memory) = rest.split_at(ops_len);
    let mut rig = Rig::new();
    rig.mem
        .write_slice(&memory[..memory.len().min(MEM_SIZE)], GuestAddress(0))
        .expect("fits guest memory");
    for op in ops.chunks_exact(7) {
        rig.access(op);
    }
}

/// What the host parses of the guest's answers: the hybrid vsock handshake reply line, a
/// vsock packet header checked as a tx packet, and the agent's stdio-stream answer and
/// stream header.
pub fn guest_replies(data: &[u8]) {
    let _ = husk_shim::agent::parse_handshake_reply(data);
    let size = std::mem::size_of::<VsockHeader>();
    if data.len() >= size {
        let mut raw = VsockHeader::default();
        raw.as_mut_slice().copy_from_slice(&data[..size]);
        let _ = PacketHeader::from(raw).validate_tx(u64::from(GUEST_CID), data.len() - size);
    }
    let _ = husk_agent_api::stdio::StreamHeader::decode(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed corpus replays without a panic (what the CI smoke runs first, too).
    #[test]
    fn the_seed_corpus_replays() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (target, run) in [
            ("vsock_device", vsock_device as fn(&[u8])),
            ("mmio_registers", mmio_registers),
            ("guest_replies", guest_replies),
        ] {
            let dir = root.join(target);
            let seeds: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            assert!(!seeds.is_empty(), "no seeds for {target}");
            for seed in seeds {
                run(&std::fs::read(&seed).unwrap());
            }
        }
    }
}
