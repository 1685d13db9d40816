//! A real tap device for the virtio-net tests, set up the way husk-vmm takes one
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet header), with an IPv4 address on the
//! host side. Ioctls on `/dev/net/tun` and an `AF_INET` socket of the calling thread's network
//! namespace: the tests run it in a namespace of their own, so the lab's own network is never
//! touched. Needs root (the lab runs tests as root).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub use husk_shim::network::VNET_HDR_SIZE;

fn request(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Creates tap `name` in the calling thread's network namespace, as the shim does in a pod's
/// network namespace, and returns its descriptor (close-on-exec).
pub use husk_shim::network::open_tap as open;

/// Gives interface `name` the address `addr`/24 and brings it up.
pub fn set_ipv4_up(name: &str, addr: [u8; 4]) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket")?;
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let sockaddr = |a: [u8; 4]| {
        // SAFETY: sockaddr_in is plain old data.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(a);
        // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as the
        // family says.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    };
    let mut req = request(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    // SAFETY: `req` is a valid ifreq that outlives each call below.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR as libc::Ioctl, &req) };
    check(rc, "SIOCSIFADDR")?;
    req.ifr_ifru.ifru_netmask = sockaddr([255, 255, 255, 0]);
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK as libc::Ioctl, &req) };
    check(rc, "SIOCSIFNETMASK")?;
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as libc::Ioctl, &req) };
    check(rc, "SIOCSIFFLAGS")
}
