//! Process stdio over vsock: the stream listener and the copy tasks.
//!
//! The host opens one connection to the stdio port per process stream and binds it with a
//! [`StreamHeader`]. Accepted connections are parked in the [`StdioHub`] under their
//! (container, exec, kind) key until the process that declared them is created; a process
//! is not created before its declared streams are there ([`StdioHub::take`], bounded), so
//! no output is lost. No RPC is involved in moving bytes.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_agent_api::stdio::{Ack, StreamHeader, StreamKind, FIXED_LEN, MAX_ID_LEN};
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// How long a connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an accepted stream waits for its process before it is dropped.
const PARKED_TTL: Duration = Duration::from_secs(60);
/// Most streams parked at once (a host cannot exhaust guest memory with connections).
const MAX_PARKED: usize = 256;

/// Errors of the stdio layer.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// Cannot listen for stdio streams
    #[error("Cannot listen for stdio streams on {0}")]
    Listen(String, #[source] std::io::Error),
    /// The declared stdio streams were not attached in time
    #[error("The declared stdio streams {missing:?} were not attached within {waited:?}")]
    NotAttached {
        /// Kinds still missing.
        missing: Vec<StreamKind>,
        /// The bound.
        waited: Duration,
    },
}

type Key = (String, String, StreamKind);

/// Accepted streams waiting for their process.
#[derive(Debug, Default)]
pub struct StdioHub {
    parked: Mutex<HashMap<Key, (Instant, UnixStream)>>,
    arrived: Notify,
}

impl StdioHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Instant, UnixStream)>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks a bound stream; false if its key is taken or the hub is full.
    fn park(&self, header: StreamHeader, stream: UnixStream) -> Result<(), UnixStream> {
        let mut parked = self.lock();
        parked.retain(|_, (at, _)| at.elapsed() < PARKED_TTL);
        let key = (header.container_id, header.exec_id, header.kind);
        if parked.contains_key(&key) || parked.len() >= MAX_PARKED {
            return Err(stream);
        }
        parked.insert(key, (Instant::now(), stream));
        drop(parked);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// Waits up to `bound` until every stream in `kinds` of (container, exec) is attached,
    /// then takes them. On timeout the ones that did arrive are dropped (closed).
    pub async fn take(
        &self,
        container_id: &str,
        exec_id: &str,
        kinds: &[StreamKind],
        bound: Duration,
    ) -> Result<HashMap<StreamKind, UnixStream>, StdioError> {
        let deadline = tokio::time::Instant::now() + bound;
        let key = |k: StreamKind| (container_id.to_owned(), exec_id.to_owned(), k);
        loop {
            let arrived = self.arrived.notified();
            {
                let mut parked = self.lock();
                let missing: Vec<StreamKind> = kinds
                    .iter()
                    .copied()
                    .filter(|k| !parked.contains_key(&key(*k)))
                    .collect();
                if missing.is_empty() {
                    return Ok(kinds
                        .iter()
                        .filter_map(|k| parked.remove(&key(*k)).map(|(_, s)| (*k, s)))
                        .collect());
                }
                if tokio::time::Instant::now() >= deadline {
                    for k in kinds {
                        parked.remove(&key(*k));
                    }
                    return Err(StdioError::NotAttached {
                        missing,
                        waited: bound,
                    });
                }
            }
            let _ = tokio::time::timeout_at(deadline, arrived).await;
        }
    }

    /// Drops every parked stream of a container (it is being removed).
    pub fn forget(&self, container_id: &str) {
        self.lock().retain(|(c, _, _), _| c != container_id);
    }

    /// Reads and answers one connection's header, then parks it.
    async fn bind(self: Arc<Self>, mut stream: UnixStream) {
        let header = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut stream)).await;
        let header = match header {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                debug!(error = %e, "stdio stream refused");
                let _ = stream.write_all(&[Ack::Rejected as u8]).await;
                return;
            }
            Err(_) => {
                debug!("stdio stream sent no header in time");
                return;
            }
        };
        if stream.write_all(&[Ack::Accepted as u8]).await.is_err() {
            return;
        }
        debug!(container = %header.container_id, exec = %header.exec_id, kind = ?header.kind, "stdio stream attached");
        if let Err(mut stream) = self.park(header, stream) {
            // Already acked; closing is the refusal the host sees.
            let _ = stream.shutdown().await;
        }
    }
}

async fn read_header(stream: &mut UnixStream) -> std::io::Result<StreamHeader> {
    let invalid = |e| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut fixed = [0u8; FIXED_LEN];
    stream.read_exact(&mut fixed).await?;
    let (kind, c, e) = StreamHeader::decode_fixed(&fixed).map_err(invalid)?;
    let mut ids = [0u8; 2 * MAX_ID_LEN];
    stream.read_exact(&mut ids[..c + e]).await?;
    StreamHeader::decode_ids(kind, c, &ids[..c + e]).map_err(invalid)
}

/// Listens on guest vsock `port` (any CID) and parks every bound stream in `hub`.
pub fn listen_vsock(port: u32, hub: Arc<StdioHub>) -> Result<(), StdioError> {
    let err = |e: nix::Error| StdioError::Listen(format!("vsock:{port}"), e.into());
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port)).map_err(err)?;
    listen(&fd, Backlog::new(64).map_err(err)?).map_err(err)?;
    // SAFETY: `fd` is an open socket owned by the AsyncFd for its whole life; OwnedFd's
    // as_raw_fd always returns that same descriptor.
    let listener = unsafe { AsyncFd::register(fd) }
        .map_err(|e| StdioError::Listen(format!("vsock:{port}"), e.into_parts().1))?;
    tokio::spawn(accept_loop(listener, hub));
    Ok(())
}

/// Listens on a Unix socket (the agent outside a guest, for development).
pub fn listen_unix(path: &std::path::Path, hub: Arc<StdioHub>) -> Result<(), StdioError> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| StdioError::Listen(path.display().to_string(), e))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(hub.clone().bind(s));
                }
                Err(e) => {
                    warn!(error = %e, "stdio accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn accept_loop(listener: AsyncFd<OwnedFd>, hub: Arc<StdioHub>) {
    loop {
        let Ok(mut ready) = listener.readable().await else {
            return;
        };
        match accept4(
            listener.get_ref().as_raw_fd(),
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(raw) => {
                // SAFETY: accept4 returned a new descriptor that nobody else owns.
                let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                // Only the host may open stdio streams (a container could otherwise take
                // another container's stdio over vsock loopback); dropping `owned` closes.
                if crate::peer::check(owned.as_raw_fd()).is_err() {
                    continue;
                }
                // A connected stream socket; tokio only reads, writes and shuts it down.
                let std_stream = std::os::unix::net::UnixStream::from(owned);
                match UnixStream::from_std(std_stream) {
                    Ok(s) => {
                        tokio::spawn(hub.clone().bind(s));
                    }
                    Err(e) => warn!(error = %e, "cannot register a stdio stream"),
                }
            }
            Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
            Err(e) => {
                warn!(error = %e, "stdio accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
