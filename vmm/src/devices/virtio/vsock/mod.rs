//! virtio-vsock device (virtio 1.2 §5.10, device id 19) with a Firecracker-style hybrid Unix
//! socket on the host side.
//!
//! Design:
//! * [`device::VsockDevice`] owns the three virtqueues (rx 0, tx 1, event 2). It runs on the
//!   event-loop thread: a queue notification (ioeventfd) or a host socket event makes it drain
//!   the tx queue into the [`muxer::VsockMuxer`] and then fill the rx queue from it.
//! * [`muxer::VsockMuxer`] is the host side. It listens on the `--vsock-uds` path; a host client
//!   connects and writes `CONNECT <port>\n`, the muxer sends a REQUEST to the guest and answers
//!   `OK <host port>\n` once the guest RESPONDs (or closes the client on RST). A guest REQUEST to
//!   host port P is forwarded to the Unix socket `<uds>_P`.
//! * [`connection::Connection`] is one stream's state machine with credit-based flow control
//!   (§5.10.6.3): each side advertises `buf_alloc` and `fwd_cnt`; a sender keeps
//!   `tx_cnt - peer_fwd_cnt <= peer_buf_alloc`. Guest data the host socket cannot take yet waits in
//!   a per-connection buffer that the credit we advertise bounds.
//! * [`packet`] reads and writes the 44-byte `virtio_vsock_hdr` from descriptor chains; every
//!   header field from the guest is validated before use.
//!
//! The event queue is never used (no transport reset events are sent).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

pub use device::{VsockDevice, VsockHandler};

/// Constants from virtio 1.2 §5.10 and linux `include/uapi/linux/virtio_vsock.h`.
pub mod defs {
    /// Device id (virtio 1.2 §5 "Device Types": 19 = socket device).
    pub const VIRTIO_ID_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
    /// Queue indices (§5.10.2).
    pub const RXQ_INDEX: usize = 0;
    /// Transmit queue.
    pub const TXQ_INDEX: usize = 1;
    /// Event queue.
    pub const EVQ_INDEX: usize = 2;
    /// Number of queues.
    pub const NUM_QUEUES: usize = 3;
    /// Size of each queue.
    pub const QUEUE_SIZE: u16 = 256;
    /// Well-known CID of the host (§5.10.4, `VMADDR_CID_HOST`).
    pub const VSOCK_HOST_CID: u64 = 2;
    /// `VIRTIO_VSOCK_TYPE_STREAM`.
    pub const VSOCK_TYPE_STREAM: u16 = 1;
    /// `VIRTIO_VSOCK_OP_REQUEST`: connection request.
    pub const VSOCK_OP_REQUEST: u16 = 1;
    /// `VIRTIO_VSOCK_OP_RESPONSE`: connection accepted.
    pub const VSOCK_OP_RESPONSE: u16 = 2;
    /// `VIRTIO_VSOCK_OP_RST`: connection reset / refused.
    pub const VSOCK_OP_RST: u16 = 3;
    /// `VIRTIO_VSOCK_OP_SHUTDOWN`: orderly shutdown of one or both directions.
    pub const VSOCK_OP_SHUTDOWN: u16 = 4;
    /// `VIRTIO_VSOCK_OP_RW`: data.
    pub const VSOCK_OP_RW: u16 = 5;
    /// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: unsolicited credit information.
    pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
    /// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: ask the peer for its credit.
    pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;
    /// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
    pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
    /// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
    pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;
    /// Size of `struct virtio_vsock_hdr`.
    pub const VSOCK_PKT_HDR_SIZE: usize = 44;
    /// Largest payload we accept or send in one packet (linux `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
    pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;
    /// Receive buffer we advertise per connection (`buf_alloc`); bounds the guest data we may
    /// have to buffer when a host socket is slow. With [`MAX_CONNECTIONS`] this caps what a
    /// hostile guest can make the VMM hold at 32 MiB.
    pub const CONN_BUF_ALLOC: u32 = 128 * 1024;
    /// Send a CREDIT_UPDATE once this many forwarded bytes have not been reported.
    pub const CONN_CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
    /// First host port handed to host-initiated connections (as Firecracker does).
    pub const LOCAL_PORT_BASE: u32 = 1 << 30;
    /// Longest `CONNECT <port>\n` line we read.
    pub const MAX_CONNECT_LINE: usize = 32;
    /// Most control packets (RST for unknown connections) queued for the guest; above this we
    /// stop reading the tx queue until the guest gives us rx buffers.
    pub const MAX_PENDING_CONTROL: usize = 256;
    /// Most simultaneous connections.
    pub const MAX_CONNECTIONS: usize = 256;
}

/// Errors of the vsock device and its host side.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Cannot bind the hybrid vsock socket
    #[error("Cannot bind the vsock socket {0}")]
    Bind(String, #[source] std::io::Error),
    /// Cannot create an eventfd
    #[error("Cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// A descriptor chain could not be read or written
    #[error("Invalid descriptor chain")]
    DescriptorChain(#[source] virtio_queue::Error),
    /// The packet header could not be read
    #[error("Cannot read the packet header")]
    ReadHeader(#[source] std::io::Error),
    /// The rx buffer is too small for a header
    #[error("Receive buffer too small for a packet header")]
    RxBufferTooSmall,
    /// The packet is malformed
    #[error("Malformed packet: {0}")]
    BadPacket(&'static str),
    /// Guest memory access failed while moving payload
    #[error("Cannot move packet payload")]
    Payload(#[source] std::io::Error),
}
