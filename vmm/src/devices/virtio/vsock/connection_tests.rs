//! Tests of the connection state machine over a real Unix socket pair.

use super::*;
use std::io::Cursor;

fn guest_hdr(op: u16, len: u32) -> PacketHeader {
    PacketHeader {
        src_cid: 3,
        dst_cid: VSOCK_HOST_CID,
        src_port: 1024,
        dst_port: LOCAL_PORT_BASE,
        len,
        type_: VSOCK_TYPE_STREAM,
        op,
        buf_alloc: 4096,
        fwd_cnt: 0,
        ..Default::default()
    }
}

fn established() -> (Connection, UnixStream) {
    let (ours, host) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let mut c = Connection::new_local(ours, LOCAL_PORT_BASE, 1024);
    let mut scratch = vec![0u8; MAX_PKT_BUF_SIZE as usize];
    let mut out = Vec::new();
    let req = c.next_rx(&mut out, 0, &mut scratch).unwrap();
    assert_eq!(req.op, VSOCK_OP_REQUEST);
    assert_eq!((req.src_port, req.dst_port), (LOCAL_PORT_BASE, 1024));
    assert_eq!(
        c.recv_guest(
            &guest_hdr(VSOCK_OP_RESPONSE, 0),
            &mut Cursor::new(vec![]),
            &mut scratch
        ),
        GuestAction::Accepted
    );
    assert_eq!(c.state(), ConnState::Established);
    (c, host)
}

fn scratch() -> Vec<u8> {
    vec![0u8; MAX_PKT_BUF_SIZE as usize]
}

#[test]
fn rst_while_connecting_kills_without_reply() {
    let (ours, _host) = UnixStream::pair().unwrap();
    let mut c = Connection::new_local(ours, LOCAL_PORT_BASE, 1024);
    c.recv_guest(
        &guest_hdr(VSOCK_OP_RST, 0),
        &mut Cursor::new(vec![]),
        &mut scratch(),
    );
    assert!(c.is_finished());
}

#[test]
fn data_before_response_resets() {
    let (ours, _host) = UnixStream::pair().unwrap();
    let mut c = Connection::new_local(ours, LOCAL_PORT_BASE, 1024);
    let mut s = scratch();
    let mut out = Vec::new();
    c.next_rx(&mut out, 0, &mut s);
    c.recv_guest(
        &guest_hdr(VSOCK_OP_RW, 2),
        &mut Cursor::new(vec![1, 2]),
        &mut s,
    );
    assert_eq!(c.state(), ConnState::Dead);
    assert_eq!(c.next_rx(&mut out, 0, &mut s).unwrap().op, VSOCK_OP_RST);
    assert!(c.is_finished());
}

#[test]
fn guest_data_reaches_host_and_counts_forwarded() {
    let (mut c, mut host) = established();
    let mut s = scratch();
    c.recv_guest(
        &guest_hdr(VSOCK_OP_RW, 5),
        &mut Cursor::new(b"hello".to_vec()),
        &mut s,
    );
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    // The next packet to the guest carries fwd_cnt = 5 once a credit update is due.
    c.recv_guest(
        &guest_hdr(VSOCK_OP_CREDIT_REQUEST, 0),
        &mut Cursor::new(vec![]),
        &mut s,
    );
    let upd = c.next_rx(&mut Vec::new(), 0, &mut s).unwrap();
    assert_eq!(upd.op, VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(upd.fwd_cnt, 5);
    assert_eq!(upd.buf_alloc, CONN_BUF_ALLOC);
}

#[test]
fn host_data_respects_guest_credit() {
    let (mut c, mut host) = established();
    let mut s = scratch();
    host.write_all(&[7u8; 6000]).unwrap();
    c.host_event(EventSet::IN);
    assert!(c.has_rx_work());
    // Guest advertised 4096 bytes of buffer.
    let mut out = Vec::new();
    let p = c.next_rx(&mut out, 65536, &mut s).unwrap();
    assert_eq!((p.op, p.len), (VSOCK_OP_RW, 4096));
    assert_eq!(out.len(), 4096);
    assert_eq!(c.peer_credit(), 0);
    // No credit left: the connection asks for credit instead of reading.
    let p = c.next_rx(&mut out, 65536, &mut s).unwrap();
    assert_eq!(p.op, VSOCK_OP_CREDIT_REQUEST);
    assert_eq!(c.interest(), Some(EventSet::empty()));
    // The guest consumed everything: reading resumes.
    let mut upd = guest_hdr(VSOCK_OP_CREDIT_UPDATE, 0);
    upd.fwd_cnt = 4096;
    c.recv_guest(&upd, &mut Cursor::new(vec![]), &mut s);
    assert!(c.interest().unwrap().contains(EventSet::IN));
    c.host_event(EventSet::IN);
    let mut out = Vec::new();
    let p = c.next_rx(&mut out, 65536, &mut s).unwrap();
    assert_eq!(p.len, 6000 - 4096);
}

#[test]
fn rx_payload_is_bounded_by_buffer() {
    let (mut c, mut host) = established();
    host.write_all(&[1u8; 100]).unwrap();
    c.host_event(EventSet::IN);
    let mut out = Vec::new();
    let p = c.next_rx(&mut out, 30, &mut scratch()).unwrap();
    assert_eq!(p.len, 30);
}

#[test]
fn host_eof_sends_shutdown_and_guest_both_shutdown_resets() {
    let (mut c, host) = established();
    host.shutdown(Shutdown::Write).unwrap();
    c.host_event(EventSet::IN | EventSet::READ_HANG_UP);
    let mut s = scratch();
    let p = c.next_rx(&mut Vec::new(), 100, &mut s).unwrap();
    assert_eq!(p.op, VSOCK_OP_SHUTDOWN);
    assert_eq!(p.flags, VSOCK_FLAGS_SHUTDOWN_SEND);
    let mut sd = guest_hdr(VSOCK_OP_SHUTDOWN, 0);
    sd.flags = VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND;
    c.recv_guest(&sd, &mut Cursor::new(vec![]), &mut s);
    assert_eq!(
        c.next_rx(&mut Vec::new(), 100, &mut s).unwrap().op,
        VSOCK_OP_RST
    );
    assert!(c.is_finished());
}

#[test]
fn guest_send_shutdown_half_closes_host() {
    let (mut c, mut host) = established();
    let mut sd = guest_hdr(VSOCK_OP_SHUTDOWN, 0);
    sd.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
    c.recv_guest(&sd, &mut Cursor::new(vec![]), &mut scratch());
    let mut buf = Vec::new();
    host.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty());
    assert_eq!(c.state(), ConnState::Established);
}

#[test]
fn guest_ignoring_credit_is_reset() {
    let (mut c, _host) = established();
    let mut s = scratch();
    // The host never reads: fill the socket, then our buffer, then overflow our credit.
    let chunk = vec![0u8; MAX_PKT_BUF_SIZE as usize];
    for _ in 0..64 {
        let hdr = guest_hdr(VSOCK_OP_RW, chunk.len() as u32);
        c.recv_guest(&hdr, &mut Cursor::new(chunk.clone()), &mut s);
        if c.state() == ConnState::Dead {
            break;
        }
    }
    assert_eq!(c.state(), ConnState::Dead);
    assert_eq!(
        c.next_rx(&mut Vec::new(), 0, &mut s).unwrap().op,
        VSOCK_OP_RST
    );
}

#[test]
fn buffered_data_is_flushed_on_writable() {
    let (mut c, mut host) = established();
    let mut s = scratch();
    let chunk = vec![9u8; MAX_PKT_BUF_SIZE as usize];
    let mut sent = 0;
    while c.interest().unwrap() & EventSet::OUT == EventSet::empty() {
        c.recv_guest(
            &guest_hdr(VSOCK_OP_RW, chunk.len() as u32),
            &mut Cursor::new(chunk.clone()),
            &mut s,
        );
        sent += chunk.len();
    }
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; sent];
        host.read_exact(&mut buf).unwrap();
        buf.len()
    });
    while c.interest().unwrap().contains(EventSet::OUT) {
        c.host_event(EventSet::OUT);
        std::thread::yield_now();
    }
    assert_eq!(reader.join().unwrap(), sent);
    assert_eq!(c.state(), ConnState::Established);
}

#[test]
fn host_hangup_while_connecting_resets() {
    let (ours, host) = UnixStream::pair().unwrap();
    let mut c = Connection::new_local(ours, LOCAL_PORT_BASE, 1024);
    drop(host);
    c.host_event(EventSet::HANG_UP);
    assert_eq!(c.interest(), None);
    assert_eq!(
        c.next_rx(&mut Vec::new(), 0, &mut scratch()).unwrap().op,
        VSOCK_OP_RST
    );
}
