//! The header that binds one stdio vsock stream to one process stream.
//!
//! The host connects to the agent's stdio port ([`crate::STDIO_VSOCK_PORT`]) once per process
//! stream and first writes this header; the agent answers one [`Ack`] byte and from then on
//! the connection carries the stream's bytes only (host → guest for stdin, guest → host for
//! stdout/stderr, both ways for a tty). A host half-close of a stdin or tty stream is the
//! process's stdin EOF. Layout (all fields one byte unless noted):
//!
//! | offset | field |
//! |---|---|
//! | 0..4 | magic `HSKS` |
//! | 4 | version, [`HEADER_VERSION`] |
//! | 5 | stream kind, [`StreamKind`] |
//! | 6 | container id length `c` (1..=[`MAX_ID_LEN`]) |
//! | 7 | exec id length `e` (0..=[`MAX_ID_LEN`]; 0 = the container's init process) |
//! | 8..8+c | container id |
//! | 8+c..8+c+e | exec id |
//!
//! Both sides validate ids with [`valid_id`], so the header never names a path component.

/// The first four bytes of every stdio stream.
pub const HEADER_MAGIC: [u8; 4] = *b"HSKS";
/// The header version this crate speaks.
pub const HEADER_VERSION: u8 = 1;
/// Longest container or exec id.
pub const MAX_ID_LEN: usize = 128;
/// Length of the fixed part of the header.
pub const FIXED_LEN: usize = 8;

/// Which process stream a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Host → process.
    Stdin = 1,
    /// Process → host.
    Stdout = 2,
    /// Process → host.
    Stderr = 3,
    /// Both ways, on a guest pty.
    Tty = 4,
}

impl StreamKind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Stdin,
            2 => Self::Stdout,
            3 => Self::Stderr,
            4 => Self::Tty,
            _ => return None,
        })
    }
}

/// The agent's one-byte answer to a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Bound (or parked until the process is created); stream bytes follow.
    Accepted = 0,
    /// Malformed header, or the stream is already bound; the agent closes the connection.
    Rejected = 1,
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    /// The container.
    pub container_id: String,
    /// The process; empty for the container's init process.
    pub exec_id: String,
    /// The stream.
    pub kind: StreamKind,
}

/// Errors decoding a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Bad magic
    #[error("Bad magic {0:02x?}")]
    Magic([u8; 4]),
    /// Unsupported version
    #[error("Unsupported header version {0}")]
    Version(u8),
    /// Unknown stream kind
    #[error("Unknown stream kind {0}")]
    Kind(u8),
    /// Invalid id
    #[error("Invalid {0} id")]
    Id(&'static str),
}

/// Whether `id` is a valid container or exec id: 1..=128 bytes of `[A-Za-z0-9_.-]`, not
/// starting with `.` or `-` (so never `.`, `..` or an option-looking word).
pub fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl StreamHeader {
    /// Encodes the header. Panics never; invalid ids are the caller's error and are refused
    /// by the agent.
    pub fn encode(&self) -> Vec<u8> {
        let c = self.container_id.as_bytes();
        let e = self.exec_id.as_bytes();
        let mut out = Vec::with_capacity(FIXED_LEN + c.len() + e.len());
        out.extend_from_slice(&HEADER_MAGIC);
        out.push(HEADER_VERSION);
        out.push(self.kind as u8);
        out.push(u8::try_from(c.len()).unwrap_or(u8::MAX));
        out.push(u8::try_from(e.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(c);
        out.extend_from_slice(e);
        out
    }

    /// Decodes the fixed part: returns the lengths of the two ids that follow.
    pub fn decode_fixed(
        fixed: &[u8; FIXED_LEN],
    ) -> Result<(StreamKind, usize, usize), HeaderError> {
        let magic = [fixed[0], fixed[1], fixed[2], fixed[3]];
        if magic != HEADER_MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        if fixed[4] != HEADER_VERSION {
            return Err(HeaderError::Version(fixed[4]));
        }
        let kind = StreamKind::from_byte(fixed[5]).ok_or(HeaderError::Kind(fixed[5]))?;
        let (c, e) = (usize::from(fixed[6]), usize::from(fixed[7]));
        if c == 0 || c > MAX_ID_LEN {
            return Err(HeaderError::Id("container"));
        }
        if e > MAX_ID_LEN {
            return Err(HeaderError::Id("exec"));
        }
        Ok((kind, c, e))
    }

    /// Decodes the ids (`ids` holds exactly the lengths [`Self::decode_fixed`] returned).
    pub fn decode_ids(
        kind: StreamKind,
        container_len: usize,
        ids: &[u8],
    ) -> Result<Self, HeaderError> {
        let (c, e) = ids.split_at(container_len.min(ids.len()));
        let container_id = std::str::from_utf8(c)
            .ok()
            .filter(|s| valid_id(s))
            .ok_or(HeaderError::Id("container"))?;
        let exec_id = std::str::from_utf8(e)
            .ok()
            .filter(|s| s.is_empty() || valid_id(s))
            .ok_or(HeaderError::Id("exec"))?;
        Ok(Self {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            kind,
        })
    }

    /// Decodes a whole header from `buf` (which holds exactly one header).
    pub fn decode(buf: &[u8]) -> Result<Self, HeaderError> {
        let fixed: &[u8; FIXED_LEN] = buf
            .get(..FIXED_LEN)
            .and_then(|f| f.try_into().ok())
            .ok_or(HeaderError::Magic([0; 4]))?;
        let (kind, c, e) = Self::decode_fixed(fixed)?;
        let ids = &buf[FIXED_LEN..];
        if ids.len() != c + e {
            return Err(HeaderError::Id("container"));
        }
        Self::decode_ids(kind, c, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cid: &str, eid: &str, kind: StreamKind) -> StreamHeader {
        StreamHeader {
            container_id: cid.into(),
            exec_id: eid.into(),
            kind,
        }
    }

    #[test]
    fn headers_round_trip() {
        for h in [
            header("c1", "", StreamKind::Stdout),
            header("pod-a.b_c", "exec-1", StreamKind::Tty),
            header(
                &"a".repeat(MAX_ID_LEN),
                &"b".repeat(MAX_ID_LEN),
                StreamKind::Stdin,
            ),
        ] {
            let bytes = h.encode();
            assert_eq!(&bytes[..4], b"HSKS");
            assert_eq!(StreamHeader::decode(&bytes).unwrap(), h);
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = header("c1", "e1", StreamKind::Stderr).encode();
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            StreamHeader::decode(&bad_magic),
            Err(HeaderError::Magic(_))
        ));
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        assert_eq!(
            StreamHeader::decode(&bad_version),
            Err(HeaderError::Version(9))
        );
        let mut bad_kind = good.clone();
        bad_kind[5] = 0;
        assert_eq!(StreamHeader::decode(&bad_kind), Err(HeaderError::Kind(0)));
        let mut no_cid = good.clone();
        no_cid[6] = 0;
        assert!(StreamHeader::decode(&no_cid).is_err());
        assert!(StreamHeader::decode(&good[..good.len() - 1]).is_err());
        assert!(StreamHeader::decode(&good[..5]).is_err());
        for cid in ["..", ".", "a/b", "-x", "a b", "é"] {
            let h = header(cid, "", StreamKind::Stdout).encode();
            assert!(StreamHeader::decode(&h).is_err(), "{cid:?}");
        }
        let h = header("c", "../x", StreamKind::Stdout).encode();
        assert_eq!(StreamHeader::decode(&h), Err(HeaderError::Id("exec")));
    }

    #[test]
    fn ids_are_validated() {
        assert!(valid_id("abc-1.2_3"));
        assert!(!valid_id(""));
        assert!(!valid_id(&"a".repeat(MAX_ID_LEN + 1)));
        assert!(!valid_id(".."));
        assert!(!valid_id("a/.."));
    }
}
