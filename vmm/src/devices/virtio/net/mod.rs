//! virtio-net device (virtio 1.2 §5.1, device id 1) on a host tap device.
//!
//! Design, the Firecracker way without vhost (there is no `/dev/vhost-net` on these hosts):
//! * the tap is handed in as an open file descriptor (`--net-tap-fd`), opened by the shim inside
//!   the pod's network namespace with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a vnet header
//!   size of 12 bytes ([`defs::NET_HDR_SIZE`]), so the jailed VMM needs no network privilege and
//!   each `read`/`write` on it is one Ethernet frame behind a `virtio_net_hdr_v1`, the same
//!   header the guest puts in front of its frames: frames pass through without translation;
//! * [`device::NetDevice`] owns the two virtqueues (rx 0, tx 1) and runs on the event-loop
//!   thread: a tx notification moves the guest's frames to the tap; a readable tap (or an rx
//!   notification after the guest ran out of buffers) moves frames from the tap to the guest;
//! * checksum and TCP segmentation offloads both ways (`CSUM`, `GUEST_CSUM`, `HOST_TSO4/6`,
//!   `GUEST_TSO4/6`), as Firecracker offers them: the guest's TCP sends up to 64 KiB segments
//!   with a partial checksum and the host kernel's tap finishes them, and the tap hands the
//!   guest whole segments (`TUNSETOFFLOAD`, set from the driver's features on the event-loop
//!   thread); a driver that takes segments posts 64 KiB rx buffers. No UDP or ECN offloads and
//!   no mergeable rx buffers: a frame always takes one buffer.
//!
//! What the guest controls is checked: a tx chain shorter than the header or longer than the
//! largest frame, or whose header asks for an offload the driver did not negotiate, is dropped
//! (and its buffer returned), and the host kernel checks the rest of a segment's header as it
//! does for QEMU's and Firecracker's taps; an rx chain too small for the frame waiting gets the
//! frame dropped, never truncated or written past.

pub mod device;

pub use device::{NetCounters, NetDevice, NetHandler};

/// `xx:xx:xx:xx:xx:xx`, for logs.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Constants from virtio 1.2 §5.1 and linux `include/uapi/linux/virtio_net.h`.
pub mod defs {
    /// Device id (virtio 1.2 §5 "Device Types": 1 = network card).
    pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
    /// Receive queue (§5.1.2).
    pub const RXQ_INDEX: usize = 0;
    /// Transmit queue.
    pub const TXQ_INDEX: usize = 1;
    /// Number of queues (one pair, no control queue).
    pub const NUM_QUEUES: usize = 2;
    /// Size of each queue.
    pub const QUEUE_SIZE: u16 = 256;
    /// `struct virtio_net_hdr_v1`: 12 bytes once `VIRTIO_F_VERSION_1` is negotiated
    /// (`num_buffers` is always present, §5.1.6).
    pub const NET_HDR_SIZE: usize = 12;
    /// Offset of `num_buffers` in the header.
    pub const NUM_BUFFERS_OFFSET: usize = 10;
    /// Largest Ethernet frame (without the virtio header) the device moves either way: a 64 KiB
    /// IP packet plus its Ethernet and VLAN headers, as Linux's `VIRTIO_NET_MAX_BUF_SIZE`.
    pub const MAX_FRAME_SIZE: usize = 65_562;
    /// Smallest frame: an Ethernet header.
    pub const MIN_FRAME_SIZE: usize = 14;
    /// Default MTU offered in the config space.
    pub const DEFAULT_MTU: u16 = 1500;
    /// Config space: `mac[6]`, `status` (le16), `max_virtqueue_pairs` (le16), `mtu` (le16).
    pub const CONFIG_SIZE: usize = 12;
}

/// Errors of the net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Cannot create an eventfd
    #[error("Cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// The tap file descriptor cannot be used
    #[error("Cannot use the tap file descriptor {0}")]
    Tap(i32, #[source] std::io::Error),
    /// A descriptor chain could not be read or written
    #[error("Invalid descriptor chain")]
    DescriptorChain(#[source] virtio_queue::Error),
    /// Guest memory access failed while moving a frame
    #[error("Cannot move the frame through guest memory")]
    GuestMemory(#[source] std::io::Error),
    /// The guest's frame is malformed
    #[error("Bad frame from the guest: {0}")]
    BadFrame(&'static str),
    /// The rx buffer is smaller than the frame waiting for it
    #[error("Receive buffer of {buffer} bytes is too small for a {frame}-byte frame")]
    RxBufferTooSmall {
        /// The buffer's size.
        buffer: usize,
        /// The frame's size, header included.
        frame: usize,
    },
}
