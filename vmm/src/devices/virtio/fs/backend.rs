//! The vhost-user session with `virtiofsd`: connect and negotiate at VM build time, hand over
//! memory and rings when the guest driver is ready, stop the rings on a device reset.
//!
//! Message order follows the vhost-user specification ("Starting and stopping rings"): features,
//! memory table, then per ring `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE`,
//! `SET_VRING_CALL`, `SET_VRING_KICK`, and finally `SET_VRING_ENABLE` (rings start disabled once
//! `VHOST_USER_F_PROTOCOL_FEATURES` is negotiated). `GET_VRING_BASE` stops a ring.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::defs::{GUEST_FEATURES, NUM_QUEUES, VHOST_USER_F_PROTOCOL_FEATURES};
use super::FsError;
use crate::memory::GuestMemory;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Protocol features we can use (module docs of [`super`]).
pub const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::REPLY_ACK;

/// The features negotiated with the daemon before the guest sees the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Virtio features the daemon offered.
    pub backend_features: u64,
    /// What we offer the guest: [`GUEST_FEATURES`] ∩ the daemon's.
    pub guest_features: u64,
    /// Whether the daemon speaks the protocol-feature extension.
    pub protocol_extension: bool,
    /// Protocol features acknowledged to the daemon.
    pub protocol_features: VhostUserProtocolFeatures,
}

/// Computes what to offer the guest from the daemon's features; fails without VERSION_1.
pub fn negotiate_features(backend_features: u64) -> Result<(u64, bool), FsError> {
    if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err(FsError::NoVersion1(backend_features));
    }
    Ok((
        backend_features & GUEST_FEATURES,
        backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0,
    ))
}

/// Protocol features to acknowledge: the daemon's ∩ [`WANTED_PROTOCOL_FEATURES`].
pub fn negotiate_protocol(offered: VhostUserProtocolFeatures) -> VhostUserProtocolFeatures {
    offered & WANTED_PROTOCOL_FEATURES
}

/// The virtio features the daemon gets for `guest_acked` (the guest's subset of our offer).
pub fn backend_acked_features(guest_acked: u64, negotiated: &Negotiated) -> u64 {
    let mut features = guest_acked & negotiated.guest_features;
    if negotiated.protocol_extension {
        features |= VHOST_USER_F_PROTOCOL_FEATURES;
    }
    features
}

/// One vhost-user connection to virtiofsd.
pub struct VhostUserFs {
    frontend: Frontend,
    /// Our own duplicate of the socket, watched for hang-up by the event loop.
    socket: OwnedFd,
    negotiated: Negotiated,
}

impl std::fmt::Debug for VhostUserFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserFs")
            .field("negotiated", &self.negotiated)
            .finish()
    }
}

fn req(what: &'static str) -> impl FnOnce(vhost::Error) -> FsError {
    move |e| FsError::Request(what, e)
}

impl VhostUserFs {
    /// Connects to the daemon's socket at `path` and negotiates features.
    pub fn connect(path: &Path) -> Result<Self, FsError> {
        let frontend = Frontend::connect(path, NUM_QUEUES as u64)
            .map_err(|e| FsError::Connect(path.display().to_string(), e))?;
        Self::handshake(frontend)
    }

    /// Negotiates over an already connected frontend.
    pub fn handshake(mut frontend: Frontend) -> Result<Self, FsError> {
        let socket = {
            use std::os::fd::AsRawFd;
            let raw = frontend.as_raw_fd();
            // SAFETY: `raw` is the frontend's open socket, which lives as long as `frontend`;
            // we only borrow it to duplicate it.
            let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
            borrowed.try_clone_to_owned().map_err(FsError::SocketDup)?
        };
        frontend.set_owner().map_err(req("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(req("GET_FEATURES"))?;
        let (guest_features, protocol_extension) = negotiate_features(backend_features)?;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if protocol_extension {
            let offered = frontend
                .get_protocol_features()
                .map_err(req("GET_PROTOCOL_FEATURES"))?;
            protocol_features = negotiate_protocol(offered);
            frontend
                .set_protocol_features(protocol_features)
                .map_err(req("SET_PROTOCOL_FEATURES"))?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let negotiated = Negotiated {
            backend_features,
            guest_features,
            protocol_extension,
            protocol_features,
        };
        tracing::debug!(?negotiated, "virtiofsd vhost-user handshake done");
        Ok(Self {
            frontend,
            socket,
            negotiated,
        })
    }

    /// The negotiated features.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The socket, for hang-up detection.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Hands memory and rings to the daemon and starts them. `kicks[i]` and `calls[i]` belong to
    /// `queues[i]`.
    pub fn start(
        &mut self,
        guest_acked: u64,
        mem: &GuestMemory,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), FsError> {
        self.frontend
            .set_features(backend_acked_features(guest_acked, &self.negotiated))
            .map_err(req("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| FsError::MemoryNotShareable(r.start_addr().0))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(req("SET_MEM_TABLE"))?;
        for (index, queue) in queues.iter().enumerate() {
            let size = queue.size();
            let host = |addr: u64, len: u64| -> Result<u64, FsError> {
                // One region must hold the whole ring: the daemon maps regions separately.
                mem.get_slice(GuestAddress(addr), len as usize)
                    .map(|s| s.ptr_guard().as_ptr() as u64)
                    .map_err(|_| FsError::RingAddress(index))
            };
            let n = u64::from(size);
            // Ring sizes from virtio 1.2 §2.7 (16-byte descriptors; flags, idx, ring, event).
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: size,
                flags: 0,
                desc_table_addr: host(queue.desc_table(), 16 * n)?,
                used_ring_addr: host(queue.used_ring(), 6 + 8 * n)?,
                avail_ring_addr: host(queue.avail_ring(), 6 + 2 * n)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, size)
                .map_err(req("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(req("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(req("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, &calls[index])
                .map_err(req("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, &kicks[index])
                .map_err(req("SET_VRING_KICK"))?;
        }
        if self.negotiated.protocol_extension {
            for index in 0..queues.len() {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the rings (device reset by the driver).
    pub fn stop(&mut self, queues: usize) -> Result<(), FsError> {
        for index in 0..queues {
            if self.negotiated.protocol_extension {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(req("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn offer_is_the_intersection_and_needs_version_1() {
        let backend =
            V1 | (1 << VIRTIO_RING_F_EVENT_IDX) | VHOST_USER_F_PROTOCOL_FEATURES | (1 << 5);
        let (guest, ext) = negotiate_features(backend).unwrap();
        assert_eq!(guest, V1 | (1 << VIRTIO_RING_F_EVENT_IDX));
        assert!(ext);
        assert!(matches!(
            negotiate_features(1 << VIRTIO_RING_F_EVENT_IDX),
            Err(FsError::NoVersion1(_))
        ));
        let (guest, ext) = negotiate_features(V1).unwrap();
        assert_eq!((guest, ext), (V1, false));
    }

    #[test]
    fn only_reply_ack_is_acknowledged() {
        let offered = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ;
        assert_eq!(
            negotiate_protocol(offered),
            VhostUserProtocolFeatures::REPLY_ACK
        );
        assert!(negotiate_protocol(VhostUserProtocolFeatures::MQ).is_empty());
    }

    #[test]
    fn backend_gets_guest_subset_plus_protocol_bit() {
        let n = Negotiated {
            backend_features: V1 | VHOST_USER_F_PROTOCOL_FEATURES,
            guest_features: V1,
            protocol_extension: true,
            protocol_features: VhostUserProtocolFeatures::REPLY_ACK,
        };
        // A guest acking something we never offered does not reach the daemon.
        assert_eq!(
            backend_acked_features(V1 | (1 << 33), &n),
            V1 | VHOST_USER_F_PROTOCOL_FEATURES
        );
        let plain = Negotiated {
            protocol_extension: false,
            ..n
        };
        assert_eq!(backend_acked_features(V1, &plain), V1);
    }

    #[test]
    fn missing_socket_is_a_connect_error_naming_virtiofsd() {
        let dir = tempfile::tempdir().unwrap();
        let err = VhostUserFs::connect(&dir.path().join("nope.sock")).unwrap_err();
        assert!(matches!(err, FsError::Connect(..)));
        assert!(err.to_string().contains("virtiofsd"), "{err}");
    }

    #[test]
    fn peer_that_hangs_up_fails_the_handshake() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(theirs);
        let err =
            VhostUserFs::handshake(Frontend::from_stream(ours, NUM_QUEUES as u64)).unwrap_err();
        assert!(matches!(err, FsError::Request(..)), "{err}");
        assert!(err.to_string().contains("virtiofsd"), "{err}");
    }
}
