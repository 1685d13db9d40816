//! Component test of husk-vmm's virtio-net device with a real guest kernel's virtio-net driver
//! on a real tap (run by `cargo xtask test`, in the lab where the host KVM cannot boot Linux).
//!
//! The guest is the test-only `husk-fs-probe` as `/init` in its `net` mode: it puts 10.9.0.2/24
//! on `eth0` and talks to echo servers on the tap's side, 10.9.0.1, in a network namespace of
//! the test's own. The agent does not configure guest interfaces yet (issue 10), so this is the
//! device's end-to-end evidence: every datagram and every byte of a TCP stream must come back.

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use husk_integration::virtiofsd::{early_probe_loss, wait_console};
use husk_integration::vm::{Vm, VmOptions};
use husk_integration::{lab_retry, required_path, tap};

const TAP: &str = "husk-net0";
const MAC: &str = "02:68:75:73:6b:02";

/// Echoes every datagram on 10.9.0.1:7777 and every TCP stream on 10.9.0.1:7778.
fn echo_servers() {
    let udp = UdpSocket::bind("10.9.0.1:7777").expect("udp echo bind");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    let tcp = TcpListener::bind("10.9.0.1:7778").expect("tcp echo bind");
    std::thread::spawn(move || {
        for stream in tcp.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
    });
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn the_guest_talks_udp_and_tcp_through_a_real_tap() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace of the test's own (needs root)");
        let fd = Arc::new(tap::open(TAP).expect("tap"));
        tap::set_ipv4_up(TAP, [10, 9, 0, 1]).expect("tap address");
        echo_servers();
        let opts = VmOptions {
            cmdline_extra: Some("probe_mode=net probe_addr=10.9.0.2 probe_peer=10.9.0.1".into()),
            initrd: Some(required_path("HUSK_FS_PROBE_INITRD")),
            net: Some((fd, MAC.into())),
            ..Default::default()
        };
        let console = loop {
            let mut vm = Vm::spawn(&opts);
            let done = wait_console(&mut vm, "PROBE DONE", Duration::from_secs(240));
            let status = vm.wait_exit(Duration::from_secs(30));
            let console = vm.console();
            let diag = vm.diagnostics();
            if done {
                assert_eq!(
                    status.and_then(|s| s.code()),
                    Some(0),
                    "the probe finished but husk-vmm did not exit cleanly\n{diag}"
                );
                assert!(
                    vm.vmm_log().contains("virtio-net device on the tap"),
                    "{diag}"
                );
                break console;
            }
            if let Err(why) = early_probe_loss(&mut vm, &console, status.is_none())
                .and_then(|ev| lab_retry::take_guest_retry("virtio-net probe", &ev))
            {
                panic!("the virtio-net probe failed: {why}\n{diag}");
            }
            eprintln!("{diag}");
        };
        let line = |prefix: &str| {
            console
                .lines()
                .find(|l| l.contains(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} on the console:\n{console}"))
                .trim_end()
                .to_string()
        };
        let udp = line("PROBE NET UDP ");
        eprintln!("{udp}");
        assert_eq!(field(&udp, "echoed"), field(&udp, "sent"), "{udp}");
        let tcp = line("PROBE NET TCP ");
        eprintln!("{tcp}");
        assert_eq!(field(&tcp, "bytes"), (8u64 << 20).to_string(), "{tcp}");
        assert_eq!(field(&tcp, "fnv"), field(&tcp, "echo_fnv"), "{tcp}");
        let ms: f64 = field(&tcp, "ms").parse().unwrap();
        eprintln!(
            "TCP through the tap: 8 MiB each way in {ms} ms ({:.1} MiB/s each way)",
            8.0 * 1000.0 / ms.max(1.0)
        );
    })
    .join()
    .unwrap();
}
