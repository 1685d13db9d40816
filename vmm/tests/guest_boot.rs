//! Component tests of `husk-vmm` against a real guest (our kernel + the agent initramfs).
//!
//! They need a KVM that boots Linux (hardware KVM or the lab) and the guest artifacts, given as
//! `HUSK_TEST_VMLINUX` and `HUSK_TEST_INITRAMFS` (what `cargo xtask guest` prints). Without them
//! the tests print why and pass vacuously, so `cargo test` stays green on a PVM-only host:
//!
//! ```text
//! cargo xtask lab -- env HUSK_TEST_VMLINUX=… HUSK_TEST_INITRAMFS=… \
//!     cargo test -p husk-vmm --test guest_boot
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Generous: the lab's nested, emulated KVM boots in 5–15 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

struct Guest {
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

fn guest() -> Option<Guest> {
    let vmlinux = std::env::var_os("HUSK_TEST_VMLINUX")?;
    let initramfs = std::env::var_os("HUSK_TEST_INITRAMFS")?;
    Some(Guest {
        vmlinux: vmlinux.into(),
        initramfs: initramfs.into(),
    })
}

struct Vm {
    child: Child,
    uds: PathBuf,
    ready: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

fn start_vm(g: &Guest, vcpus: u8, extra: &str) -> Result<Vm> {
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("vsock.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--kernel")
        .arg(&g.vmlinux)
        .arg("--initrd")
        .arg(&g.initramfs)
        .args([
            "--mem-mib",
            "256",
            "--vcpus",
            &vcpus.to_string(),
            "--console",
            "off",
        ])
        .arg("--vsock-uds")
        .arg(&uds)
        .args(["--cmdline-extra", extra])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn husk-vmm")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, ready) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("vmm: {line}");
            if line.contains("guest ready boot_ms=") {
                let _ = tx.send(line);
            }
        }
    });
    Ok(Vm {
        child,
        uds,
        ready,
        _dir: dir,
    })
}

fn wait_status(child: &mut Child, timeout: Duration) -> Result<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return status.code().context("killed by a signal");
        }
        if start.elapsed() > timeout {
            child.kill()?;
            bail!("husk-vmm did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Hybrid vsock handshake to guest port `port`.
fn connect(uds: &PathBuf, port: u32) -> Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b)?;
        line.push(b[0]);
    }
    let line = String::from_utf8(line)?;
    if !line.starts_with("OK ") {
        bail!("unexpected handshake reply {line:?}");
    }
    Ok(s)
}

fn pb_bytes(field: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![(field << 3) | 2];
    let mut n = data.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(data);
    out
}

/// One unary ttrpc call (framing from containerd/ttrpc PROTOCOL.md); returns the response frame.
fn ttrpc_call(s: &mut UnixStream, stream_id: u32, service: &str, method: &str) -> Result<Vec<u8>> {
    let mut body = pb_bytes(1, service.as_bytes());
    body.extend(pb_bytes(2, method.as_bytes()));
    body.extend(pb_bytes(3, &[]));
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(stream_id.to_be_bytes());
    frame.extend([1u8, 0u8]); // type request, no flags
    frame.extend(body);
    s.write_all(&frame)?;
    let mut hdr = [0u8; 10];
    s.read_exact(&mut hdr)?;
    let len = u32::from_be_bytes(hdr[0..4].try_into()?) as usize;
    if hdr[8] != 2 {
        bail!("expected a response frame, got type {}", hdr[8]);
    }
    let mut data = vec![0u8; len];
    s.read_exact(&mut data)?;
    Ok(data)
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).context("truncated varint")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("varint too long")
}

/// One protobuf field value: a varint (`Ok`) or length-delimited bytes (`Err`).
type PbValue = Result<u64, Vec<u8>>;

/// The protobuf fields of `msg` as (number, value).
fn pb_fields(msg: &[u8]) -> Result<Vec<(u64, PbValue)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < msg.len() {
        let key = read_varint(msg, &mut pos)?;
        match key & 7 {
            0 => out.push((key >> 3, Ok(read_varint(msg, &mut pos)?))),
            2 => {
                let len = read_varint(msg, &mut pos)? as usize;
                let data = msg.get(pos..pos + len).context("truncated field")?.to_vec();
                pos += len;
                out.push((key >> 3, Err(data)));
            }
            wire => bail!("unexpected wire type {wire}"),
        }
    }
    Ok(out)
}

/// `online_cpus` (field 4) of the GetGuestDetailsResponse inside a ttrpc Response (payload = 2).
fn online_cpus(response: &[u8]) -> Result<u64> {
    let payload = pb_fields(response)?
        .into_iter()
        .find_map(|(n, v)| (n == 2).then_some(v).and_then(|v| v.err()))
        .context("no payload")?;
    pb_fields(&payload)?
        .into_iter()
        .find_map(|(n, v)| (n == 4).then_some(v).and_then(|v| v.ok()))
        .context("no online_cpus")
}

fn boot_and_shutdown(vcpus: u8) -> Result<()> {
    let Some(g) = guest() else {
        eprintln!("HUSK_TEST_VMLINUX/HUSK_TEST_INITRAMFS not set: skipping");
        return Ok(());
    };
    let mut vm = start_vm(&g, vcpus, "")?;
    let ready = vm
        .ready
        .recv_timeout(BOOT_TIMEOUT)
        .context("no guest ready line")?;
    eprintln!("{ready}");
    let mut s = connect(&vm.uds, 1024)?;
    let check = ttrpc_call(&mut s, 1, "husk.agent.v1.Health", "Check")?;
    // Response { payload = CheckResponse { status = SERVING (1) } }: field 2 holds `08 01`.
    if !check.windows(2).any(|w| w == [0x08, 0x01]) {
        bail!("Health.Check did not report SERVING: {check:02x?}");
    }
    let details = ttrpc_call(&mut s, 3, "husk.agent.v1.Agent", "GetGuestDetails")?;
    assert_eq!(
        online_cpus(&details)?,
        u64::from(vcpus),
        "the guest sees every vCPU"
    );
    ttrpc_call(&mut s, 5, "husk.agent.v1.Agent", "Shutdown")?;
    let status = wait_status(&mut vm.child, BOOT_TIMEOUT)?;
    assert_eq!(status, 0, "a clean agent shutdown ends husk-vmm with 0");
    assert!(!vm.uds.exists(), "the vsock socket is removed on exit");
    Ok(())
}

#[test]
fn boots_agent_and_shuts_down_cleanly_1_vcpu() -> Result<()> {
    boot_and_shutdown(1)
}

#[test]
fn boots_agent_and_shuts_down_cleanly_2_vcpus() -> Result<()> {
    boot_and_shutdown(2)
}

#[test]
fn agent_dying_after_ready_is_a_guest_panic() -> Result<()> {
    let Some(g) = guest() else {
        eprintln!("HUSK_TEST_VMLINUX/HUSK_TEST_INITRAMFS not set: skipping");
        return Ok(());
    };
    let mut vm = start_vm(&g, 1, "husk.test_fault=exit_after_ready")?;
    let status = wait_status(&mut vm.child, BOOT_TIMEOUT)?;
    assert_eq!(status, 3);
    Ok(())
}

#[test]
fn sigterm_stops_the_vm_with_status_4() -> Result<()> {
    let Some(g) = guest() else {
        eprintln!("HUSK_TEST_VMLINUX/HUSK_TEST_INITRAMFS not set: skipping");
        return Ok(());
    };
    let mut vm = start_vm(&g, 1, "")?;
    vm.ready
        .recv_timeout(BOOT_TIMEOUT)
        .context("no guest ready line")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    assert_eq!(wait_status(&mut vm.child, BOOT_TIMEOUT)?, 4);
    assert!(!vm.uds.exists());
    Ok(())
}
