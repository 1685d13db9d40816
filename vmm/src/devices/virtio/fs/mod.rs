//! virtio-fs device (virtio 1.2 §5.11, device id 26) as a vhost-user frontend for `virtiofsd`.
//!
//! Design:
//! * The file system server is not ours: `virtiofsd` (a separate, self-sandboxing process)
//!   processes the FUSE requests straight out of the guest's virtqueues. husk-vmm only emulates
//!   the virtio-mmio device (registers, features, the config space with the tag) and, once the
//!   driver sets DRIVER_OK, hands the rings to the daemon over the vhost-user protocol
//!   ([`backend::VhostUserFs`], rust-vmm's `vhost` crate).
//! * Guest memory is a memfd (see [`crate::memory`]); `SET_MEM_TABLE` passes its file
//!   descriptor and offsets so the daemon maps the very same pages. Ring addresses in
//!   `SET_VRING_ADDR` are our own virtual addresses, which the daemon translates through that table.
//! * Kick: the queue-notify ioeventfd KVM writes on the guest's QueueNotify goes to the daemon
//!   directly (`SET_VRING_KICK`); the event loop never reads it.
//! * Call: the daemon signals used buffers on one eventfd per queue that
//!   [`event_handler::FsHandler`] watches on the event loop; it sets the "used buffer" bit of
//!   InterruptStatus and then raises the irqfd, so the guest's `vm_interrupt` sees a correct
//!   status. Handing the daemon our irqfd directly would skip InterruptStatus, and the Linux
//!   virtio-mmio driver drops interrupts whose status reads 0.
//! * A dead daemon ends the VM: the handler also watches the vhost-user socket for a hang-up and
//!   reports a VMM error (exit status 1) naming virtiofsd; a failing vhost-user request during
//!   activation does the same. A missing socket fails the build of the VM.
//! * Feature negotiation: the guest is offered `VIRTIO_F_VERSION_1` and the ring features the
//!   daemon also offers ([`defs::GUEST_FEATURES`]); the daemon gets what the guest accepted plus
//!   `VHOST_USER_F_PROTOCOL_FEATURES`. Of the vhost-user protocol features we use only
//!   `REPLY_ACK` (every request is confirmed, so errors surface where they happen); no CONFIG
//!   (the tag is ours), no MQ (one request queue), no backend requests (no DAX window).

pub mod backend;
pub mod device;
pub mod event_handler;

pub use backend::VhostUserFs;
pub use device::FsDevice;
pub use event_handler::FsHandler;

/// Constants from virtio 1.2 §5.11 and the vhost-user specification.
pub mod defs {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    /// Device id (virtio 1.2 §5 "Device Types": 26 = file system device).
    pub const VIRTIO_ID_FS: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_FS;
    /// Queue 0 is the high-priority queue (FUSE_INTERRUPT, FUSE_FORGET), §5.11.2.
    pub const HIPRIO_QUEUE_INDEX: usize = 0;
    /// Number of request queues we offer (`num_request_queues`); they follow the hiprio queue.
    pub const NUM_REQUEST_QUEUES: usize = 1;
    /// Total queues: hiprio plus the request queues.
    pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES;
    /// Default size of each queue.
    pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
    /// Largest queue size of a split virtqueue (§2.7: "Queue Size ... maximum 32768").
    pub const MAX_QUEUE_SIZE: u16 = 32768;
    /// Length of the `tag` field of `struct virtio_fs_config` (§5.11.4), not NUL-terminated
    /// when all 36 bytes are used.
    pub const TAG_LEN: usize = 36;
    /// Size of `struct virtio_fs_config`: `u8 tag[36]; le32 num_request_queues;`
    /// (the `notify_buf_size` field only exists with VIRTIO_FS_F_NOTIFICATION, which we do not offer).
    pub const CONFIG_SPACE_SIZE: usize = TAG_LEN + 4;
    /// Virtio feature bits we pass through to the guest when the daemon offers them.
    pub const GUEST_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_RING_F_EVENT_IDX);
    /// `VHOST_USER_F_PROTOCOL_FEATURES` (vhost-user spec, bit 30 of the virtio feature word):
    /// the backend speaks the protocol-feature extension; rings then start disabled.
    pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 =
        vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
}

/// Errors of the virtio-fs device and its vhost-user connection.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Cannot connect to the virtiofsd socket
    #[error("Cannot connect to virtiofsd at {0} (is virtiofsd running with --socket-path there?)")]
    Connect(String, #[source] vhost::Error),
    /// A vhost-user request to virtiofsd failed
    #[error("vhost-user request {0} to virtiofsd failed")]
    Request(&'static str, #[source] vhost::Error),
    /// virtiofsd does not offer VIRTIO_F_VERSION_1
    #[error("virtiofsd does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    /// A guest memory region has no file behind it, so it cannot be shared
    #[error(
        "Guest memory region at {0:#x} is not file-backed and cannot be shared with virtiofsd"
    )]
    MemoryNotShareable(u64),
    /// A ring address does not translate to host memory
    #[error("Queue {0} ring address is outside guest memory")]
    RingAddress(usize),
    /// Cannot create an eventfd
    #[error("Cannot create a virtio-fs eventfd")]
    EventFd(#[source] std::io::Error),
    /// Cannot duplicate the vhost-user socket for hang-up detection
    #[error("Cannot duplicate the virtiofsd socket")]
    SocketDup(#[source] std::io::Error),
}
