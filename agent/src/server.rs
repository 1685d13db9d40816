//! The ttrpc server: where it listens and how it stops.
//!
//! In the guest it listens on vsock port 1024 for any CID and serves only the host's CID
//! (`peer`); on a host (development, tests)
//! on a Unix socket. Stopping flushes replies already produced (the `Shutdown` reply) before
//! the caller acts on them.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use husk_agent_api::{AGENT_VSOCK_PORT, STDIO_VSOCK_PORT};
use tokio::sync::Notify;
use tracing::debug;
use ttrpc::r#async::Server;

use crate::container::Containers;
use crate::rpc::{AgentService, HealthService};
use crate::stdio::{self, StdioError, StdioHub};

/// How long a stopping vsock server leaves the guest kernel (and the VMM) to move the last
/// reply out of the socket before the VM resets. vsock has no "send queue empty" query in
/// Linux 6.1 (SIOCOUTQ came in 6.10); the transmit work runs as soon as this thread sleeps.
const VSOCK_FLUSH_GRACE: Duration = Duration::from_millis(50);

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Invalid listen address (expected vsock:PORT or unix:PATH)
    #[error("Invalid listen address {0:?} (expected vsock:PORT or unix:PATH)")]
    BadAddress(String),
    /// Cannot listen
    #[error("Cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: ListenAddr,
        /// The ttrpc error.
        #[source]
        source: ttrpc::Error,
    },
    /// Cannot start the ttrpc server
    #[error("Cannot start the ttrpc server")]
    Start(#[source] ttrpc::Error),
    /// Cannot start the stdio listener
    #[error("Cannot start the stdio listener")]
    Stdio(#[source] StdioError),
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A vsock port, any local CID (`VMADDR_CID_ANY`).
    Vsock {
        /// The port.
        port: u32,
    },
    /// A Unix socket path (created; must not exist).
    Unix(PathBuf),
}

impl Default for ListenAddr {
    fn default() -> Self {
        Self::Vsock {
            port: AGENT_VSOCK_PORT,
        }
    }
}

impl FromStr for ListenAddr {
    type Err = ServerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ServerError::BadAddress(s.to_owned());
        match s.split_once(':') {
            Some(("vsock", port)) => Ok(Self::Vsock {
                port: port.parse().map_err(|_| bad())?,
            }),
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vsock { port } => write!(f, "vsock:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// Starts the stdio stream listener that goes with this address: vsock port 1025, or
    /// `<path>.stdio` next to a Unix socket.
    fn listen_stdio(&self, hub: Arc<StdioHub>) -> Result<(), StdioError> {
        match self {
            Self::Vsock { .. } => stdio::listen_vsock(STDIO_VSOCK_PORT, hub),
            Self::Unix(path) => {
                let mut p = path.clone().into_os_string();
                p.push(".stdio");
                stdio::listen_unix(std::path::Path::new(&p), hub)
            }
        }
    }

    /// The address in ttrpc's URI form.
    fn ttrpc_uri(&self) -> String {
        match self {
            // ttrpc maps CID -1 to VMADDR_CID_ANY.
            Self::Vsock { port } => format!("vsock://-1:{port}"),
            Self::Unix(path) => format!("unix://{}", path.display()),
        }
    }
}

/// A listening, serving agent.
#[derive(Debug)]
pub struct AgentServer {
    server: ServerHandle,
    addr: ListenAddr,
}

/// `ttrpc::r#async::Server` is not `Debug`.
struct ServerHandle(Server);

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Server")
    }
}

impl AgentServer {
    /// Binds `addr` and starts serving. When this returns the socket is listening, so the
    /// caller may announce readiness. `shutdown` is notified by the `Shutdown` RPC.
    pub async fn start(addr: ListenAddr, shutdown: Arc<Notify>) -> Result<Self, ServerError> {
        let hub = Arc::new(StdioHub::default());
        addr.listen_stdio(hub.clone()).map_err(ServerError::Stdio)?;
        let containers = Containers::new(hub);
        tokio::spawn(containers.clone().watch_oom());
        let mut server = Server::new()
            .bind(&addr.ttrpc_uri())
            .map_err(|source| ServerError::Listen {
                addr: addr.clone(),
                source,
            })?
            .set_accept_hook(crate::peer::HostOnly)
            .register_service(husk_agent_api::create_health(Arc::new(HealthService)))
            .register_service(husk_agent_api::create_agent(Arc::new(AgentService::new(
                shutdown, containers,
            ))));
        server.start().await.map_err(ServerError::Start)?;
        debug!(%addr, "listening");
        Ok(Self {
            server: ServerHandle(server),
            addr,
        })
    }

    /// Stops accepting, lets in-flight requests finish and their replies reach the socket,
    /// then closes every connection.
    pub async fn stop(mut self) {
        // Waits for handler tasks and connection writers to drain (bounded inside ttrpc).
        if let Err(e) = self.server.0.shutdown().await {
            debug!(error = %e, "ttrpc shutdown");
        }
        match &self.addr {
            ListenAddr::Vsock { .. } => tokio::time::sleep(VSOCK_FLUSH_GRACE).await,
            ListenAddr::Unix(path) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "vsock:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock { port: 1024 }
        );
        assert_eq!(
            "unix:/run/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        for bad in ["", "vsock:", "vsock:x", "unix:", "tcp:1", "/path"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_is_the_contract_port() {
        assert_eq!(ListenAddr::default().ttrpc_uri(), "vsock://-1:1024");
    }
}
