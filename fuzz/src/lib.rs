//! The harnesses behind husk's fuzz targets (`fuzz_targets/`), kept here so that the seed
//! corpus can also be replayed by a plain test. Each takes the fuzzer's bytes and drives real
//! husk code the way a hostile guest (or its kernel) would.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use husk_agent_api::agent;
use husk_vmm::devices::virtio::mmio::MmioTransport;
use husk_vmm::devices::virtio::vsock::packet::{PacketHeader, VsockHeader};
use husk_vmm::devices::virtio::vsock::VsockDevice;
use husk_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use husk_vmm::devices::BusDevice;
use protobuf::Message;
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

/// The hybrid vsock socket of this process's devices (a new device rebinds it). On tmpfs
/// where there is one: binding a socket on ext4 costs more than the rest of an execution.
fn uds() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("husk-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        extern "C" fn remove_dir() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain function without arguments; libFuzzer leaves through
        // exit(), which runs it, so no socket directory outlives the fuzzer.
        unsafe { libc::atexit(remove_dir) };
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
            2 => self
                .transport
                .write(offset, &value.to_le_bytes()[..(op[0] as usize % 3) + 1]),
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
/// vsock packet header checked as a tx packet, the agent's stdio-stream answer and stream
/// header, a ttrpc response frame and every agent reply message the shim reads, with the
/// shim's conversion of container stats into containerd's metrics.
pub fn guest_replies(data: &[u8]) {
    let _ = husk_shim::agent::parse_handshake_reply(data);
    let size = std::mem::size_of::<VsockHeader>();
    if data.len() >= size {
        let mut raw = VsockHeader::default();
        raw.as_mut_slice().copy_from_slice(&data[..size]);
        let _ = PacketHeader::from(raw).validate_tx(u64::from(GUEST_CID), data.len() - size);
    }
    let _ = husk_agent_api::stdio::StreamHeader::decode(data);
    let Some((header, payload)) = ttrpc_frame(data) else {
        return;
    };
    let Ok(response) = ttrpc::Response::parse_from_bytes(payload) else {
        return;
    };
    let reply = &response.payload;
    // The reply type follows the request the shim sent; the frame's flags pick one here.
    match header.flags % 8 {
        0 => drop(agent::CheckResponse::parse_from_bytes(reply)),
        1 => drop(agent::VersionResponse::parse_from_bytes(reply)),
        2 => drop(agent::GetGuestDetailsResponse::parse_from_bytes(reply)),
        3 => drop(agent::CreateContainerResponse::parse_from_bytes(reply)),
        4 => drop(agent::WaitProcessResponse::parse_from_bytes(reply)),
        5 => drop(agent::ListProcessesResponse::parse_from_bytes(reply)),
        6 => {
            if let Ok(stats) = agent::StatsContainerResponse::parse_from_bytes(reply) {
                let _ = husk_shim::task::metrics(&stats);
            }
        }
        _ => drop(agent::GetOOMEventResponse::parse_from_bytes(reply)),
    }
}

/// A ttrpc frame: the 10-byte header, then a payload no longer than the header says and
/// within ttrpc's size limit (what both ends check before decoding).
fn ttrpc_frame(data: &[u8]) -> Option<(ttrpc::MessageHeader, &[u8])> {
    const HEADER: usize = 10;
    if data.len() < HEADER {
        return None;
    }
    let header = ttrpc::MessageHeader::from(&data[..HEADER]);
    let payload = &data[HEADER..];
    let length = usize::try_from(header.length).ok()?;
    if length > payload.len() || length > ttrpc::proto::MESSAGE_LENGTH_MAX {
        return None;
    }
    Some((header, &payload[..length]))
}

/// What the agent decodes of the host's requests before any handler runs: a ttrpc request
/// frame, the request envelope, the method's request message (picked by the method name, as
/// the server does), and the OCI JSON the container and exec requests carry. A container in
/// the guest must not be able to reach this (the agent accepts the host's CID only), but the
/// decoding must still hold against any bytes.
pub fn agent_requests(data: &[u8]) {
    let Some((_, payload)) = ttrpc_frame(data) else {
        return;
    };
    let Ok(request) = ttrpc::Request::parse_from_bytes(payload) else {
        return;
    };
    let body = &request.payload;
    match request.method.as_str() {
        "CreateContainer" => {
            if let Ok(req) = agent::CreateContainerRequest::parse_from_bytes(body) {
                let _ = serde_json::from_slice::<oci_spec::runtime::Spec>(&req.oci_spec_json);
            }
        }
        "ExecProcess" => {
            if let Ok(req) = agent::ExecProcessRequest::parse_from_bytes(body) {
                let _ = serde_json::from_slice::<oci_spec::runtime::Process>(&req.oci_process_json);
            }
        }
        "UpdateContainer" => {
            if let Ok(req) = agent::UpdateContainerRequest::parse_from_bytes(body) {
                let _ = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(
                    &req.oci_resources_json,
                );
            }
        }
        "CreateSandbox" => drop(agent::CreateSandboxRequest::parse_from_bytes(body)),
        "SignalProcess" => drop(agent::SignalProcessRequest::parse_from_bytes(body)),
        "WaitProcess" => drop(agent::WaitProcessRequest::parse_from_bytes(body)),
        "TtyWinResize" => drop(agent::TtyWinResizeRequest::parse_from_bytes(body)),
        "CloseStdin" => drop(agent::CloseStdinRequest::parse_from_bytes(body)),
        "RemoveContainer" => drop(agent::RemoveContainerRequest::parse_from_bytes(body)),
        _ => drop(agent::StartContainerRequest::parse_from_bytes(body)),
    }
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
            ("agent_requests", agent_requests),
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
