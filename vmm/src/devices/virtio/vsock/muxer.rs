//! The host side of the vsock device: the hybrid Unix socket, the `CONNECT <port>` handshake and
//! the table of connections, multiplexed onto the device's queues.
//!
//! Tokens: the listener uses [`TOKEN_LISTENER`]; every host stream uses
//! `TOKEN_STREAM_BASE + fd`, so one lookup finds its pending handshake or connection.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnState, Connection, GuestAction};
use super::defs::*;
use super::packet::PacketHeader;
use super::VsockError;
use crate::event_loop::EventOps;

/// Token of the listening socket.
pub const TOKEN_LISTENER: u32 = 8;
/// Host streams use `TOKEN_STREAM_BASE + fd`.
pub const TOKEN_STREAM_BASE: u32 = 16;

/// `(host port, guest port)`.
type ConnKey = (u32, u32);

#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug)]
struct Entry {
    conn: Connection,
    /// Events currently registered with epoll (`None`: not registered).
    registered: Option<EventSet>,
    in_rx_list: bool,
}

/// Parses the host's `CONNECT <port>` line (without the newline).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to a host Unix socket without ever blocking the event loop: a listener whose
/// backlog is full makes this fail with `EAGAIN` instead of waiting.
fn connect_nonblocking(path: &str) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// The hybrid vsock multiplexer.
#[derive(Debug)]
pub struct VsockMuxer {
    uds_path: PathBuf,
    listener: UnixListener,
    guest_cid: u64,
    active: bool,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Entry>,
    fd_to_conn: HashMap<RawFd, ConnKey>,
    control: VecDeque<PacketHeader>,
    rx_list: VecDeque<ConnKey>,
    next_local_port: u32,
    scratch: Vec<u8>,
}

impl VsockMuxer {
    /// Binds the hybrid socket at `uds_path` (a stale socket there is replaced).
    pub fn bind(uds_path: &Path, guest_cid: u64) -> Result<Self, VsockError> {
        let name = uds_path.display().to_string();
        if std::fs::symlink_metadata(uds_path).is_ok() {
            std::fs::remove_file(uds_path).map_err(|e| VsockError::Bind(name.clone(), e))?;
        }
        let listener =
            UnixListener::bind(uds_path).map_err(|e| VsockError::Bind(name.clone(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Bind(name, e))?;
        Ok(Self {
            uds_path: uds_path.to_path_buf(),
            listener,
            guest_cid,
            active: false,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            fd_to_conn: HashMap::new(),
            control: VecDeque::new(),
            rx_list: VecDeque::new(),
            next_local_port: LOCAL_PORT_BASE,
            scratch: Vec::new(),
        })
    }

    /// Path of the hybrid socket.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Registers the listener.
    pub fn init(&mut self, ops: &mut EventOps) -> io::Result<()> {
        ops.add(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)
    }

    /// The driver activated (true) or reset (false) the device.
    pub fn set_active(&mut self, active: bool) {
        self.active = active;
        if !active {
            // Dropping the streams closes them, which also removes them from epoll.
            self.conns.clear();
            self.fd_to_conn.clear();
            self.control.clear();
            self.rx_list.clear();
        }
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn scratch(&mut self) -> &mut Vec<u8> {
        if self.scratch.is_empty() {
            self.scratch = vec![0; MAX_PKT_BUF_SIZE as usize];
        }
        &mut self.scratch
    }

    /// Too many control packets are waiting: stop taking guest packets for now.
    pub fn tx_backpressure(&self) -> bool {
        self.control.len() >= MAX_PENDING_CONTROL
    }

    /// Queues an RST answering `hdr` (for packets that belong to no connection).
    pub fn queue_rst(&mut self, hdr: &PacketHeader) {
        if hdr.op == VSOCK_OP_RST {
            return;
        }
        if self.control.len() >= MAX_PENDING_CONTROL {
            crate::guest_warn!("vsock: control queue full, dropping RST");
            return;
        }
        self.control.push_back(PacketHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RST,
            ..Default::default()
        });
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(entry) = self.conns.get_mut(&key) {
            if !entry.in_rx_list && entry.conn.has_rx_work() {
                entry.in_rx_list = true;
                self.rx_list.push_back(key);
            }
        }
    }

    /// Handles one validated packet from the guest's tx queue.
    pub fn recv_guest(&mut self, hdr: &PacketHeader, payload: &mut dyn Read) {
        if hdr.type_ != VSOCK_TYPE_STREAM {
            crate::guest_warn!(type_ = hdr.type_, "vsock: unsupported socket type");
            self.queue_rst(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            let mut scratch = std::mem::take(self.scratch());
            let entry = self.conns.get_mut(&key).expect("checked above");
            if entry.conn.recv_guest(hdr, payload, &mut scratch) == GuestAction::Accepted {
                let line = format!("OK {}\n", entry.conn.local_port);
                if entry.conn.stream.write_all(line.as_bytes()).is_err() {
                    entry.conn.reset();
                }
                tracing::debug!(port = hdr.src_port, "vsock: guest accepted host connection");
            }
            self.scratch = scratch;
            self.schedule(key);
            return;
        }
        match hdr.op {
            VSOCK_OP_REQUEST => self.guest_connect(hdr),
            VSOCK_OP_RST => {}
            _ => self.queue_rst(hdr),
        }
    }

    fn guest_connect(&mut self, hdr: &PacketHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::guest_warn!("vsock: too many connections, refusing");
            self.queue_rst(hdr);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), hdr.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(_) => {
                tracing::debug!(port = hdr.dst_port, "vsock: no host listener, refusing");
                self.queue_rst(hdr);
                return;
            }
        };
        let conn = Connection::new_peer(stream, hdr);
        let key = (conn.local_port, conn.peer_port);
        self.fd_to_conn.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(
            key,
            Entry {
                conn,
                registered: None,
                in_rx_list: false,
            },
        );
        self.schedule(key);
    }

    /// Whether a packet waits for an rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_list.is_empty()
    }

    /// Produces the next packet for the guest, writing payload (≤ `max_payload`) to `payload`.
    pub fn fill_rx(&mut self, payload: &mut dyn Write, max_payload: usize) -> Option<PacketHeader> {
        if let Some(hdr) = self.control.pop_front() {
            return Some(hdr);
        }
        let mut scratch = std::mem::take(self.scratch());
        let mut result = None;
        while let Some(key) = self.rx_list.pop_front() {
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.in_rx_list = false;
            if let Some(mut hdr) = entry.conn.next_rx(payload, max_payload, &mut scratch) {
                hdr.src_cid = VSOCK_HOST_CID;
                hdr.dst_cid = self.guest_cid;
                self.schedule(key);
                result = Some(hdr);
                break;
            }
        }
        self.scratch = scratch;
        result
    }

    /// Handles an epoll event on the listener or a host stream.
    pub fn handle_event(&mut self, token: u32, events: EventSet, ops: &mut EventOps) {
        if token == TOKEN_LISTENER {
            self.accept_all(ops);
            return;
        }
        let Some(fd) = token.checked_sub(TOKEN_STREAM_BASE).map(|f| f as RawFd) else {
            return;
        };
        if self.handshakes.contains_key(&fd) {
            self.handshake_event(fd, events);
        } else if let Some(key) = self.fd_to_conn.get(&fd).copied() {
            if let Some(entry) = self.conns.get_mut(&key) {
                entry.conn.host_event(events);
            }
            self.schedule(key);
        }
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(fd, TOKEN_STREAM_BASE + fd as u32, EventSet::IN) {
                        tracing::warn!(error = %e, "vsock: cannot watch host client");
                        continue;
                    }
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    break;
                }
            }
        }
    }

    fn handshake_event(&mut self, fd: RawFd, events: EventSet) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut port = None;
        let mut failed = events.contains(EventSet::ERROR);
        // One byte at a time: bytes after the newline already belong to the guest stream.
        let mut byte = [0u8; 1];
        while !failed && port.is_none() {
            match hs.stream.read(&mut byte) {
                Ok(0) => failed = true,
                Ok(_) if byte[0] == b'\n' => match parse_connect_line(&hs.line) {
                    Some(p) => port = Some(p),
                    None => failed = true,
                },
                Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => failed = true,
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => failed = true,
            }
        }
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(peer_port) = port.filter(|_| !failed) else {
            tracing::debug!("vsock: bad handshake from host client, closing");
            return;
        };
        if !self.active || self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!(
                peer_port,
                "vsock: guest driver not ready, closing host client"
            );
            return;
        }
        let local_port = self.alloc_local_port(peer_port);
        let conn = Connection::new_local(hs.stream, local_port, peer_port);
        let key = (local_port, peer_port);
        self.fd_to_conn.insert(fd, key);
        self.conns.insert(
            key,
            Entry {
                conn,
                registered: Some(EventSet::IN),
                in_rx_list: false,
            },
        );
        tracing::debug!(peer_port, local_port, "vsock: host connecting to guest");
        self.schedule(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(LOCAL_PORT_BASE);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    /// Connection table and queues, for the SIGUSR1 state dump.
    pub fn state_dump(&self) -> String {
        let mut out = format!(
            "muxer: control={} rx_list={} handshakes={} conns={}",
            self.control.len(),
            self.rx_list.len(),
            self.handshakes.len(),
            self.conns.len()
        );
        for ((local, peer), e) in &self.conns {
            out.push_str(&format!(
                " [{local}->{peer} registered={:?} in_rx_list={} {}]",
                e.registered.map(|s| s.bits()),
                e.in_rx_list,
                e.conn.state_dump()
            ));
        }
        out
    }

    /// Brings epoll registrations in line with what each connection needs and drops finished
    /// connections.
    pub fn sync(&mut self, ops: &mut EventOps) {
        let mut finished = Vec::new();
        for (key, entry) in self.conns.iter_mut() {
            let fd = entry.conn.stream.as_raw_fd();
            let token = TOKEN_STREAM_BASE + fd as u32;
            let want = entry.conn.interest();
            if want != entry.registered {
                let result = match (entry.registered, want) {
                    (None, Some(set)) => ops.add(fd, token, set),
                    (Some(_), Some(set)) => ops.modify(fd, token, set),
                    (Some(_), None) => ops.remove(fd),
                    (None, None) => Ok(()),
                };
                match result {
                    Ok(()) => entry.registered = want,
                    Err(e) => {
                        tracing::warn!(error = %e, "vsock: epoll registration failed");
                        entry.conn.reset();
                    }
                }
            }
            if entry.conn.is_finished() {
                finished.push(*key);
            }
        }
        for key in finished {
            if let Some(entry) = self.conns.remove(&key) {
                self.fd_to_conn.remove(&entry.conn.stream.as_raw_fd());
                if entry.conn.state() == ConnState::Dead {
                    tracing::debug!(local = key.0, peer = key.1, "vsock: connection closed");
                }
            }
        }
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT +5"), None);
        assert_eq!(parse_connect_line(b"connect 5"), None);
        assert_eq!(parse_connect_line(b"CONNECT 5 6"), None);
        assert_eq!(parse_connect_line(b"\xff\xfe"), None);
    }
}
