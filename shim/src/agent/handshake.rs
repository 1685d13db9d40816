//! The host side of the Firecracker "hybrid vsock" handshake.
//!
//! The host connects to the VMM's Unix socket, writes `CONNECT <port>\n` and reads one reply
//! line, `OK <host-port>\n`; after it the stream is the guest port. The reply comes from
//! the VMM (which the guest can influence), so it is read strictly: byte by byte (nothing
//! after the newline is consumed), bounded, and anything but the exact form is an error.
//! The same protocol is spoken by Firecracker, Cloud Hypervisor and rust-vmm's
//! vhost-device-vsock.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest reply line accepted, newline included. The longest valid one,
/// `OK 4294967295\n`, has 14 bytes.
pub const MAX_REPLY_LEN: usize = 32;
/// Prefix of a successful reply.
const OK_PREFIX: &[u8] = b"OK ";
/// Longest decimal `u32`.
const MAX_PORT_DIGITS: usize = 10;
/// How much of a bad reply is quoted in an error.
const QUOTE_LEN: usize = 40;

/// Errors of the hybrid vsock handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// I/O error on the hybrid vsock socket
    #[error("I/O error on the hybrid vsock socket")]
    Io(#[source] std::io::Error),
    /// The VMM closed the connection before a complete reply (the guest port is not listening)
    #[error("The VMM closed the connection after {received} reply bytes (the guest port is not listening)")]
    Closed {
        /// Bytes received before the end of stream.
        received: usize,
    },
    /// The reply line is too long
    #[error("The handshake reply is longer than {MAX_REPLY_LEN} bytes")]
    TooLong,
    /// The reply is not `OK <port>`
    #[error("The handshake reply is not OK: {0}")]
    Rejected(String),
    /// The reply's host port is not a decimal u32
    #[error("The handshake reply has an invalid host port: {0}")]
    BadPort(String),
}

impl HandshakeError {
    /// Whether the guest side may simply not be ready yet, so a new attempt can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Closed { .. } => true,
            Self::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            Self::TooLong | Self::Rejected(_) | Self::BadPort(_) => false,
        }
    }
}

/// Quotes untrusted bytes for an error message: bounded and escaped.
fn quote(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(QUOTE_LEN)];
    let mut s = format!("\"{}\"", shown.escape_ascii());
    if bytes.len() > QUOTE_LEN {
        s.push('…');
    }
    s
}

/// Parses a reply line (without its newline) into the host port the VMM assigned.
pub fn parse_reply(line: &[u8]) -> Result<u32, HandshakeError> {
    let digits = line
        .strip_prefix(OK_PREFIX)
        .ok_or_else(|| HandshakeError::Rejected(quote(line)))?;
    // `u32::from_str` would also take a leading '+': accept digits only.
    if digits.is_empty() || digits.len() > MAX_PORT_DIGITS || !digits.iter().all(u8::is_ascii_digit)
    {
        return Err(HandshakeError::BadPort(quote(line)));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| HandshakeError::BadPort(quote(line)))
}

/// Reads one reply line, without its newline, never reading past it.
pub async fn read_reply_line<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Vec<u8>, HandshakeError> {
    let mut line = Vec::with_capacity(MAX_REPLY_LEN);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await.map_err(HandshakeError::Io)? == 0 {
            return Err(HandshakeError::Closed {
                received: line.len(),
            });
        }
        if byte[0] == b'\n' {
            return Ok(line);
        }
        // Room must remain for the newline.
        if line.len() + 1 >= MAX_REPLY_LEN {
            return Err(HandshakeError::TooLong);
        }
        line.push(byte[0]);
    }
}

/// Runs the handshake for guest `port` on a freshly connected stream; returns the host port.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    port: u32,
) -> Result<u32, HandshakeError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(HandshakeError::Io)?;
    let line = read_reply_line(stream).await?;
    parse_reply(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the handshake against a peer that answers `reply`; returns the result and what
    /// the peer received.
    async fn against(reply: &[u8]) -> (Result<u32, HandshakeError>, Vec<u8>) {
        let (mut ours, mut theirs) = tokio::io::duplex(256);
        let reply = reply.to_vec();
        let peer = tokio::spawn(async move {
            let mut got = vec![0u8; "CONNECT 1024\n".len()];
            theirs.read_exact(&mut got).await.unwrap();
            theirs.write_all(&reply).await.unwrap();
            // Closing the peer gives EOF after the reply.
            got
        });
        let result = handshake(&mut ours, 1024).await;
        (result, peer.await.unwrap())
    }

    #[tokio::test]
    async fn good_reply_gives_the_host_port() {
        let (result, sent) = against(b"OK 1073741824\n").await;
        assert_eq!(sent, b"CONNECT 1024\n");
        assert_eq!(result.unwrap(), 1_073_741_824);
        assert_eq!(parse_reply(b"OK 4294967295").unwrap(), u32::MAX);
        assert_eq!(parse_reply(b"OK 0").unwrap(), 0);
    }

    #[tokio::test]
    async fn bytes_after_the_newline_are_not_consumed() {
        let (mut ours, mut theirs) = tokio::io::duplex(256);
        theirs.write_all(b"OK 7\nTTRPC").await.unwrap();
        let line = read_reply_line(&mut ours).await.unwrap();
        assert_eq!(line, b"OK 7");
        let mut rest = [0u8; 5];
        ours.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"TTRPC");
    }

    #[tokio::test]
    async fn garbage_is_rejected() {
        let (result, _) = against(b"\x00\xff\x1b[2J\n").await;
        let err = result.unwrap_err();
        assert!(matches!(err, HandshakeError::Rejected(_)), "{err:?}");
        assert!(!err.is_transient());
        // Control bytes are escaped in the message.
        assert!(!err.to_string().contains('\x1b'), "{err}");
    }

    #[tokio::test]
    async fn too_long_reply_is_rejected_without_reading_on() {
        let mut long = b"OK ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 200));
        long.push(b'\n');
        let (result, _) = against(&long).await;
        assert!(matches!(result, Err(HandshakeError::TooLong)), "{result:?}");
        // 31 bytes and a newline fit; 32 and a newline do not.
        for (len, ok) in [(MAX_REPLY_LEN - 1, true), (MAX_REPLY_LEN, false)] {
            let mut line = vec![b'x'; len];
            line.push(b'\n');
            let (mut ours, mut theirs) = tokio::io::duplex(256);
            theirs.write_all(&line).await.unwrap();
            assert_eq!(read_reply_line(&mut ours).await.is_ok(), ok, "{len}");
        }
    }

    #[tokio::test]
    async fn wrong_prefix_is_rejected() {
        for reply in [&b"ok 1\n"[..], b"OK1\n", b"ERR 1\n", b" OK 1\n", b"OK\n"] {
            let (result, _) = against(reply).await;
            assert!(
                matches!(result, Err(HandshakeError::Rejected(_))),
                "{reply:?}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn bad_ports_are_rejected() {
        for reply in [
            &b"OK \n"[..],
            b"OK +1\n",
            b"OK -1\n",
            b"OK 1 \n",
            b"OK 1\r\n",
            b"OK 4294967296\n",
            b"OK 12345678901\n",
            b"OK 0x10\n",
        ] {
            let (result, _) = against(reply).await;
            assert!(
                matches!(result, Err(HandshakeError::BadPort(_))),
                "{reply:?}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn eof_is_transient() {
        for (reply, received) in [(&b""[..], 0), (b"OK 10", 5)] {
            let (result, _) = against(reply).await;
            match result {
                Err(e @ HandshakeError::Closed { .. }) => {
                    assert!(e.is_transient());
                    assert!(matches!(e, HandshakeError::Closed { received: r } if r == received));
                }
                other => panic!("{reply:?}: {other:?}"),
            }
        }
    }
}
