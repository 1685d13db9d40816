//! Who may talk to the agent: the host, and nobody inside the guest.
//!
//! The guest kernel has vsock loopback (`CONFIG_VSOCKETS_LOOPBACK`), and `AF_VSOCK` is not
//! namespaced: any process of any container could connect to `VMADDR_CID_LOCAL` (1) or the
//! guest's own CID on the agent's ports and create, exec into or take the stdio of other
//! containers. Both listeners (ttrpc on 1024, stdio on 1025) therefore accept a vsock peer
//! only if it is the host (`VMADDR_CID_HOST`, 2): husk-vmm and QEMU's vhost-vsock both give
//! host-initiated connections that source CID. Unix-socket peers (the agent run on a host for
//! development and tests) are not vsock and pass.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{getpeername, SockaddrStorage};
use tracing::warn;

/// `VMADDR_CID_HOST`.
pub const HOST_CID: u32 = 2;

/// Refused connections (for rate-limited logging).
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// A vsock peer other than the host (a process in the guest, over loopback)
    #[error("vsock peer CID {0} is not the host (CID {HOST_CID})")]
    NotHost(u32),
    /// The peer address cannot be read
    #[error("Cannot read the peer's address: {0}")]
    Unknown(nix::Error),
}

/// Decides on a peer: a vsock peer (its CID) must be the host; other families pass.
pub fn allowed(vsock_cid: Option<u32>) -> Result<(), PeerError> {
    match vsock_cid {
        Some(cid) if cid != HOST_CID => Err(PeerError::NotHost(cid)),
        _ => Ok(()),
    }
}

/// Checks the peer of an accepted socket; a refusal is logged (the first, then one in 100,
/// so a container cannot flood the console with connection attempts).
pub fn check(fd: RawFd) -> Result<(), PeerError> {
    let result = getpeername::<SockaddrStorage>(fd)
        .map_err(PeerError::Unknown)
        .and_then(|peer| allowed(peer.as_vsock_addr().map(|v| v.cid())));
    if let Err(e) = &result {
        let n = REFUSED.fetch_add(1, Ordering::Relaxed);
        if n % 100 == 0 {
            warn!(error = %e, refused = n + 1, "connection to the agent refused");
        }
    }
    result
}

/// ttrpc's accept hook: runs [`check`] before ttrpc reads a byte of the connection.
#[derive(Debug)]
pub struct HostOnly;

impl ttrpc::AcceptHook for HostOnly {
    fn on_accept(&self, fd: RawFd) -> Result<ttrpc::HookOutput, ttrpc::HookError> {
        check(fd).map_err(|e| ttrpc::HookError::Rejected(e.to_string()))?;
        Ok(ttrpc::HookOutput {
            data: Default::default(),
            payload_transform: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_cid_and_non_vsock_peers_pass() {
        assert_eq!(allowed(Some(HOST_CID)), Ok(()));
        for cid in [0, 1, 3, 42, u32::MAX] {
            assert_eq!(
                allowed(Some(cid)),
                Err(PeerError::NotHost(cid)),
                "cid {cid}"
            );
        }
        assert_eq!(allowed(None), Ok(()));
    }

    #[test]
    fn a_unix_socket_pair_passes_the_check() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(check(a.as_raw_fd()), Ok(()));
        assert!(matches!(check(-1), Err(PeerError::Unknown(_))));
    }
}
