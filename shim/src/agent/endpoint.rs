//! Where the host reaches a guest's vsock ports.
//!
//! Two ways, one protocol above them:
//! * [`VsockEndpoint::Hybrid`]: the VMM's Unix socket in the Firecracker "hybrid vsock" form
//!   (connect, `CONNECT <port>\n`, `OK <hostport>\n`). husk-vmm serves it; Firecracker and
//!   rust-vmm's `vhost-device-vsock` speak the same, so the shim's client works with each.
//! * [`VsockEndpoint::Kernel`]: the host kernel's `AF_VSOCK` at the guest's CID, for a VMM whose
//!   vsock device is the kernel's `vhost-vsock` (QEMU's `vhost-vsock-device`). The QEMU baseline
//!   of the lab experiments reaches its agent this way.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use super::{handshake, AgentError};

/// A connected guest port: a byte stream, whichever way it was reached.
pub trait GuestStream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> GuestStream for T {}

/// How the host reaches the guest's vsock ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockEndpoint {
    /// The VMM's hybrid vsock Unix socket.
    Hybrid(PathBuf),
    /// The host kernel's `AF_VSOCK`, at this guest CID.
    Kernel {
        /// The guest's context id.
        cid: u32,
    },
}

impl fmt::Display for VsockEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hybrid(path) => write!(f, "hybrid vsock socket {}", path.display()),
            Self::Kernel { cid } => write!(f, "AF_VSOCK guest CID {cid}"),
        }
    }
}

impl From<&Path> for VsockEndpoint {
    fn from(path: &Path) -> Self {
        Self::Hybrid(path.to_owned())
    }
}

impl From<&PathBuf> for VsockEndpoint {
    fn from(path: &PathBuf) -> Self {
        Self::Hybrid(path.clone())
    }
}

impl From<PathBuf> for VsockEndpoint {
    fn from(path: PathBuf) -> Self {
        Self::Hybrid(path)
    }
}

impl From<&VsockEndpoint> for VsockEndpoint {
    fn from(endpoint: &VsockEndpoint) -> Self {
        endpoint.clone()
    }
}

impl VsockEndpoint {
    /// Connects to guest `port`; the hybrid handshake (or the kernel's connect) must finish
    /// within `limit`.
    pub async fn connect(
        &self,
        port: u32,
        limit: Duration,
    ) -> Result<Box<dyn GuestStream>, AgentError> {
        match self {
            Self::Hybrid(path) => {
                let mut stream =
                    UnixStream::connect(path)
                        .await
                        .map_err(|source| AgentError::Connect {
                            path: path.clone(),
                            source,
                        })?;
                tokio::time::timeout(limit, handshake::handshake(&mut stream, port))
                    .await
                    .map_err(|_| AgentError::HandshakeTimeout(limit))?
                    .map_err(|source| AgentError::Handshake {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Box::new(stream))
            }
            Self::Kernel { cid } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, port);
                let stream = tokio::time::timeout(limit, tokio_vsock::VsockStream::connect(addr))
                    .await
                    .map_err(|_| AgentError::HandshakeTimeout(limit))?
                    .map_err(|source| AgentError::VsockConnect {
                        cid: *cid,
                        port,
                        source,
                    })?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// Whether a failed `AF_VSOCK` connect may succeed later: the guest (or its listener) is not
/// there yet. A guest port nobody listens on answers with a reset; a CID no VM holds yet,
/// `ENODEV`.
pub(crate) fn vsock_connect_is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::TimedOut
    ) || e.raw_os_error() == Some(nix::libc::ENODEV)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_themselves() {
        assert_eq!(
            VsockEndpoint::from(Path::new("/run/pod/vsock.sock")).to_string(),
            "hybrid vsock socket /run/pod/vsock.sock"
        );
        assert_eq!(
            VsockEndpoint::Kernel { cid: 7 }.to_string(),
            "AF_VSOCK guest CID 7"
        );
    }

    #[test]
    fn only_an_absent_guest_is_worth_another_connect() {
        use std::io::{Error, ErrorKind};
        assert!(vsock_connect_is_transient(&Error::from(
            ErrorKind::ConnectionReset
        )));
        assert!(vsock_connect_is_transient(&Error::from_raw_os_error(
            nix::libc::ENODEV
        )));
        assert!(!vsock_connect_is_transient(&Error::from(
            ErrorKind::PermissionDenied
        )));
    }
}
