//! `husk-fs-probe`: a test-only program that exercises a virtio-fs share, as guest `/init` or
//! as a plain process on a host (for the baseline of the file-system benchmark).
//!
//! It exists because the production agent must carry no test hooks. `cargo xtask test` builds it
//! statically for musl and packs it as `/init` of a second initramfs. As PID 1 it mounts the
//! virtio-fs tag (`probe_tag=`, default `husk`) at `/mnt`; otherwise it works in `$PROBE_DIR`.
//! The kernel hands unknown `name=value` command-line words to init as environment variables,
//! so the mode comes from `probe_mode=`:
//!
//! * `check`: prints `PROBE FILE <name> <size> <fnv1a64 hex>` for every file in `in/` (sorted)
//!   and writes `out/from-guest.txt`, so the host can check both directions.
//! * `bench`: sequential read of `big` (1 MiB reads) and creation of 10,000 small files in a
//!   fresh directory; prints `PROBE BENCH <name> bytes=<n> files=<n> ms=<elapsed>`.
//! * `hold`: prints `PROBE MOUNTED`, then keeps touching the share until the VM is stopped.
//! * `vsock` (in a container, not as PID 1): the attack of a container on the agent over vsock
//!   loopback. For the local CID (1) and the guest's CID (3), on the agent's ttrpc port (a
//!   `Health.Check` request) and its stdio port (a stream header), it connects, sends, waits
//!   up to 5 s and prints `PROBE VSOCK cid=<c> port=<p> <outcome>`, where the outcome is
//!   `answered <n> bytes`, `closed`, `timeout` or `refused <error>`.
//!
//! * `net` (as PID 1, no share needed): the guest side of the virtio-net test. It gives `eth0`
//!   the address `probe_addr=` (/24) and brings it up, then against `probe_peer=`: sends
//!   [`UDP_ROUNDS`] UDP datagrams of several sizes to port 7777, each checked byte for byte
//!   against the echo (`PROBE NET UDP sent=<n> echoed=<n> resent=<n>`), and streams
//!   [`TCP_BYTES`] to TCP port 7778, reading the echo back at the same time
//!   (`PROBE NET TCP bytes=<n> fnv=<sent hash> echo_fnv=<received hash> ms=<elapsed>`).
//!
//! Every run ends with `PROBE DONE` or `PROBE ERROR <what>`; as PID 1 it then syncs and reboots
//! (a triple fault under `reboot=t`, which husk-vmm reports as a clean exit).

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Files created by the small-file benchmark.
const SMALL_FILES: usize = 10_000;
/// Size of each small file.
const SMALL_FILE_BYTES: usize = 1024;
/// Read size of the sequential-read benchmark.
const READ_CHUNK: usize = 1 << 20;
/// What the guest writes back in `check` mode.
const FROM_GUEST: &[u8] = b"written by the guest through virtio-fs\n";

/// FNV-1a 64-bit: the content fingerprint the test recomputes on the host.
fn fnv1a64(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn mount_share(tag: &str, target: &Path) -> Result<(), String> {
    fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {e}", target.display()))?;
    let src = CString::new(tag).map_err(|e| e.to_string())?;
    let dst = CString::new(target.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: all pointers are valid NUL-terminated strings (or NULL data) for the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            c"virtiofs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount -t virtiofs {tag} {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn check(dir: &Path) -> Result<(), String> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir.join("in"))
        .map_err(|e| format!("read_dir in/: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    for path in names {
        let data = fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        say(&format!(
            "PROBE FILE {name} {} {:016x}",
            data.len(),
            fnv1a64(&data)
        ));
    }
    let out = dir.join("out/from-guest.txt");
    let mut f = fs::File::create(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
    f.write_all(FROM_GUEST)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write {}: {e}", out.display()))
}

fn bench(dir: &Path) -> Result<(), String> {
    let big = dir.join("big");
    let started = Instant::now();
    let mut f = fs::File::open(&big).map_err(|e| format!("open {}: {e}", big.display()))?;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("read big: {e}"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    say(&format!(
        "PROBE BENCH seq_read bytes={total} files=1 ms={}",
        started.elapsed().as_millis()
    ));

    // A fresh directory per run (as PID 1 every guest run has the same pid).
    let small = (0..)
        .map(|n| dir.join(format!("small-{}-{n}", std::process::id())))
        .find(|p| !p.exists())
        .ok_or("no free directory name")?;
    fs::create_dir(&small).map_err(|e| format!("mkdir {}: {e}", small.display()))?;
    let payload = vec![b'x'; SMALL_FILE_BYTES];
    let started = Instant::now();
    for i in 0..SMALL_FILES {
        let path = small.join(format!("f{i}"));
        let mut f =
            fs::File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        f.write_all(&payload)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    say(&format!(
        "PROBE BENCH create_small bytes={} files={SMALL_FILES} ms={}",
        SMALL_FILES * SMALL_FILE_BYTES,
        started.elapsed().as_millis()
    ));
    Ok(())
}

fn hold(dir: &Path) -> Result<(), String> {
    say("PROBE MOUNTED");
    loop {
        fs::metadata(dir).map_err(|e| format!("stat {}: {e}", dir.display()))?;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A ttrpc request frame calling `husk.agent.v1.Health/Check` with an empty request.
fn health_check_frame() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, data: &[u8]) {
        out.push(number << 3 | 2);
        out.push(u8::try_from(data.len()).expect("short field"));
        out.extend_from_slice(data);
    }
    let mut request = Vec::new();
    field(&mut request, 1, b"husk.agent.v1.Health");
    field(&mut request, 2, b"Check");
    field(&mut request, 3, b"");
    let mut frame = Vec::new();
    frame.extend_from_slice(&u32::try_from(request.len()).expect("short").to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes()); // stream id
    frame.extend_from_slice(&[1, 0]); // request, no flags
    frame.extend_from_slice(&request);
    frame
}

/// Connects to `cid:port` over vsock, sends `hello` and reports what came back.
fn vsock_attempt(cid: u32, port: u32, hello: &[u8]) -> String {
    // SAFETY: plain socket(2) call; the descriptor is owned by the File below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return format!("refused socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let mut sock = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_vm is valid; the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: `fd` is open; the pointers and lengths describe live values of the right types.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return format!("refused connect: {}", std::io::Error::last_os_error());
    }
    if let Err(e) = sock.write_all(hello) {
        return format!("refused write: {e}");
    }
    let mut buf = [0u8; 4096];
    match sock.read(&mut buf) {
        Ok(0) => "closed".into(),
        Ok(n) => format!("answered {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "timeout".into(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "closed".into(),
        Err(e) => format!("refused read: {e}"),
    }
}

/// The `vsock` mode (see the module documentation).
fn vsock_attack() -> Result<(), String> {
    let stdio_header = [&b"HSKS"[..], &[0u8; 12]].concat();
    for cid in [1u32, 3] {
        for (port, hello) in [
            (1024u32, health_check_frame()),
            (1025, stdio_header.clone()),
        ] {
            say(&format!(
                "PROBE VSOCK cid={cid} port={port} {}",
                vsock_attempt(cid, port, &hello)
            ));
        }
    }
    Ok(())
}

/// UDP datagrams the `net` mode sends.
const UDP_ROUNDS: usize = 300;
/// Bytes the `net` mode streams over TCP.
const TCP_BYTES: usize = 8 << 20;

/// Byte `i` of the `net` mode's payloads.
fn net_pattern(seed: usize, i: usize) -> u8 {
    (i.wrapping_mul(131) ^ seed.wrapping_mul(7) ^ (i >> 9)) as u8
}

fn ipv4(var: &str) -> Result<[u8; 4], String> {
    let text = std::env::var(var).map_err(|_| format!("{var} is not set"))?;
    let addr: std::net::Ipv4Addr = text.parse().map_err(|e| format!("{var}={text}: {e}"))?;
    Ok(addr.octets())
}

/// Address `addr`/24 on `eth0`, and the interface up (ioctls, as `ifconfig` does).
fn configure_eth0(addr: [u8; 4]) -> Result<(), String> {
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain old data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"eth0") {
        *d = *s as libc::c_char;
    }
    let sockaddr = |a: [u8; 4]| {
        // SAFETY: sockaddr_in is plain old data.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(a);
        // SAFETY: sockaddr_in and sockaddr have the same size; the family tells the kernel.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    };
    let mut steps: Vec<(libc::Ioctl, &str, libc::ifreq)> = Vec::new();
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    steps.push((libc::SIOCSIFADDR as libc::Ioctl, "SIOCSIFADDR", req));
    req.ifr_ifru.ifru_netmask = sockaddr([255, 255, 255, 0]);
    steps.push((libc::SIOCSIFNETMASK as libc::Ioctl, "SIOCSIFNETMASK", req));
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
    steps.push((libc::SIOCSIFFLAGS as libc::Ioctl, "SIOCSIFFLAGS", req));
    let mut result = Ok(());
    for (op, name, req) in &steps {
        // SAFETY: `req` is a valid ifreq that outlives the call.
        if unsafe { libc::ioctl(fd, *op, req) } < 0 {
            result = Err(format!("{name} eth0: {}", std::io::Error::last_os_error()));
            break;
        }
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    result
}

/// Waits for the echo of `msg`: true when it came, false on a timeout. A late echo of an
/// earlier round (its first byte is that round's number) is skipped; a wrong echo of this
/// round is an error.
fn udp_echo(udp: &std::net::UdpSocket, msg: &[u8], buf: &mut [u8]) -> Result<bool, String> {
    loop {
        match udp.recv(buf) {
            Ok(n) if buf[..n] == *msg => return Ok(true),
            Ok(n) if n > 0 && buf[0] != msg[0] => continue,
            Ok(n) => return Err(format!("a wrong echo of {n} bytes for {} sent", msg.len())),
            Err(_) => return Ok(false),
        }
    }
}

/// The `net` mode (see the module documentation).
fn net() -> Result<(), String> {
    use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
    configure_eth0(ipv4("probe_addr")?)?;
    let peer = Ipv4Addr::from(ipv4("probe_peer")?);
    let udp = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("udp bind: {e}"))?;
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let sizes = [1usize, 64, 512, 1400, 1472];
    let (mut echoed, mut resent) = (0usize, 0usize);
    let mut buf = vec![0u8; 2048];
    for round in 0..UDP_ROUNDS {
        let size = sizes[round % sizes.len()];
        let mut msg: Vec<u8> = (0..size).map(|i| net_pattern(round, i)).collect();
        msg[0] = round as u8;
        // The first datagrams may wait for ARP; a lost one is sent again, a few times.
        for attempt in 0..6 {
            if attempt > 0 {
                resent += 1;
            }
            udp.send_to(&msg, SocketAddrV4::new(peer, 7777))
                .map_err(|e| format!("udp send: {e}"))?;
            if udp_echo(&udp, &msg, &mut buf)? {
                echoed += 1;
                break;
            }
        }
    }
    say(&format!(
        "PROBE NET UDP sent={UDP_ROUNDS} echoed={echoed} resent={resent}"
    ));
    let started = Instant::now();
    let mut stream = TcpStream::connect(SocketAddrV4::new(peer, 7778))
        .map_err(|e| format!("tcp connect: {e}"))?;
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || {
        let mut all = Vec::with_capacity(TCP_BYTES);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => return Ok(all),
                Ok(n) => all.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("tcp read: {e}")),
            }
        }
    });
    let data: Vec<u8> = (0..TCP_BYTES).map(|i| net_pattern(1, i)).collect();
    stream
        .write_all(&data)
        .map_err(|e| format!("tcp write: {e}"))?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("tcp shutdown: {e}"))?;
    let back = echo.join().map_err(|_| "the echo reader panicked")??;
    say(&format!(
        "PROBE NET TCP bytes={} fnv={:016x} echo_fnv={:016x} ms={}",
        back.len(),
        fnv1a64(&data),
        fnv1a64(&back),
        started.elapsed().as_millis()
    ));
    Ok(())
}

fn run(pid1: bool) -> Result<(), String> {
    match std::env::var("probe_mode").as_deref() {
        Ok("vsock") => return vsock_attack(),
        Ok("net") => return net(),
        _ => {}
    }
    let dir = if pid1 {
        let tag = std::env::var("probe_tag").unwrap_or_else(|_| "husk".into());
        let dir = PathBuf::from("/mnt");
        mount_share(&tag, &dir)?;
        dir
    } else {
        PathBuf::from(std::env::var("PROBE_DIR").map_err(|_| "PROBE_DIR is not set")?)
    };
    match std::env::var("probe_mode").as_deref().unwrap_or("check") {
        "check" => check(&dir),
        "bench" => bench(&dir),
        "hold" => hold(&dir),
        other => Err(format!("unknown probe_mode {other}")),
    }
}

fn main() {
    let pid1 = std::process::id() == 1;
    match run(pid1) {
        Ok(()) => say("PROBE DONE"),
        Err(e) => say(&format!("PROBE ERROR {e}")),
    }
    if pid1 {
        // SAFETY: sync and reboot take no pointers; as PID 1 we own the machine's lifetime.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_AUTOBOOT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn check_mode_on_a_host_directory() {
        let dir = std::env::temp_dir().join(format!("probe-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("in")).unwrap();
        fs::create_dir_all(dir.join("out")).unwrap();
        fs::write(dir.join("in/a.txt"), b"a").unwrap();
        check(&dir).unwrap();
        assert_eq!(
            fs::read(dir.join("out/from-guest.txt")).unwrap(),
            FROM_GUEST
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
