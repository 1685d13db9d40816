//! `struct virtio_vsock_hdr` (virtio 1.2 §5.10.6) and its transfer to and from descriptor chains.

use vm_memory::{ByteValued, Le16, Le32, Le64};

use super::defs::*;
use super::VsockError;

/// The packet header as laid out in guest memory (little endian, packed).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: Le64,
    /// Destination CID.
    pub dst_cid: Le64,
    /// Source port.
    pub src_port: Le32,
    /// Destination port.
    pub dst_port: Le32,
    /// Payload length.
    pub len: Le32,
    /// Socket type (stream).
    pub type_: Le16,
    /// Operation.
    pub op: Le16,
    /// Operation flags (shutdown bits).
    pub flags: Le32,
    /// Sender's receive buffer size.
    pub buf_alloc: Le32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: Le32,
}

// SAFETY: VsockHeader is a packed POD struct of plain integers; every bit pattern is valid.
unsafe impl ByteValued for VsockHeader {}

const _: () = assert!(std::mem::size_of::<VsockHeader>() == VSOCK_PKT_HDR_SIZE);

/// A decoded header in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Flags.
    pub flags: u32,
    /// Sender's buffer size.
    pub buf_alloc: u32,
    /// Sender's forwarded count.
    pub fwd_cnt: u32,
}

impl From<VsockHeader> for PacketHeader {
    fn from(h: VsockHeader) -> Self {
        Self {
            src_cid: h.src_cid.into(),
            dst_cid: h.dst_cid.into(),
            src_port: h.src_port.into(),
            dst_port: h.dst_port.into(),
            len: h.len.into(),
            type_: h.type_.into(),
            op: h.op.into(),
            flags: h.flags.into(),
            buf_alloc: h.buf_alloc.into(),
            fwd_cnt: h.fwd_cnt.into(),
        }
    }
}

impl From<PacketHeader> for VsockHeader {
    fn from(h: PacketHeader) -> Self {
        Self {
            src_cid: h.src_cid.into(),
            dst_cid: h.dst_cid.into(),
            src_port: h.src_port.into(),
            dst_port: h.dst_port.into(),
            len: h.len.into(),
            type_: h.type_.into(),
            op: h.op.into(),
            flags: h.flags.into(),
            buf_alloc: h.buf_alloc.into(),
            fwd_cnt: h.fwd_cnt.into(),
        }
    }
}

impl PacketHeader {
    /// Checks a header the guest put on the tx queue. `payload_available` is how many bytes the
    /// chain holds after the header.
    pub fn validate_tx(&self, guest_cid: u64, payload_available: usize) -> Result<(), VsockError> {
        if self.src_cid != guest_cid {
            return Err(VsockError::BadPacket("source CID is not the guest's"));
        }
        if self.dst_cid != VSOCK_HOST_CID {
            return Err(VsockError::BadPacket("destination CID is not the host"));
        }
        if self.len > MAX_PKT_BUF_SIZE {
            return Err(VsockError::BadPacket("payload longer than 64 KiB"));
        }
        if self.len as usize > payload_available {
            return Err(VsockError::BadPacket("payload longer than its buffer"));
        }
        if self.op == VSOCK_OP_RW && self.len == 0 {
            return Err(VsockError::BadPacket("empty data packet"));
        }
        if self.op != VSOCK_OP_RW && self.len != 0 {
            return Err(VsockError::BadPacket("payload on a control packet"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 5,
            len: 10,
            type_: VSOCK_TYPE_STREAM,
            op: VSOCK_OP_RW,
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_through_wire_format() {
        let h = hdr();
        let wire = VsockHeader::from(h);
        let bytes = wire.as_slice().to_vec();
        assert_eq!(bytes.len(), 44);
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[28..30], &VSOCK_TYPE_STREAM.to_le_bytes());
        assert_eq!(&bytes[30..32], &VSOCK_OP_RW.to_le_bytes());
        let back = PacketHeader::from(*VsockHeader::from_slice(&bytes).unwrap());
        assert_eq!(back, h);
    }

    #[test]
    fn tx_validation() {
        assert!(hdr().validate_tx(3, 10).is_ok());
        assert!(hdr().validate_tx(4, 10).is_err());
        assert!(hdr().validate_tx(3, 9).is_err());
        let mut h = hdr();
        h.dst_cid = 7;
        assert!(h.validate_tx(3, 10).is_err());
        h = hdr();
        h.len = MAX_PKT_BUF_SIZE + 1;
        assert!(h.validate_tx(3, usize::MAX).is_err());
        h = hdr();
        h.op = VSOCK_OP_REQUEST;
        assert!(h.validate_tx(3, 10).is_err());
        h.len = 0;
        assert!(h.validate_tx(3, 0).is_ok());
    }
}
