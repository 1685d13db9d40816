//! Component tests of husk-vmm's virtio-fs device against a real, sandboxed virtiofsd and a real
//! guest kernel (run by `cargo xtask test`, in the lab where the host KVM cannot boot Linux).
//!
//! The guest is the test-only `husk-fs-probe` as `/init` (the production agent carries no test
//! hooks): it mounts the tag `husk` with `mount -t virtiofs` and reports on the console.

use std::fs;
use std::time::Duration;

use husk_integration::lab_retry;
use husk_integration::virtiofsd::{
    early_probe_loss, fnv1a64, probe_vm_options, run_probe, wait_console, Virtiofsd,
};
use husk_integration::vm::{describe_status, status, Vm, VmOptions};
use husk_shim::config::CachePolicy;

fn shared_dir_with_files() -> (tempfile::TempDir, Vec<(String, Vec<u8>)>) {
    let shared = tempfile::Builder::new()
        .prefix("husk-test-share")
        .tempdir()
        .unwrap();
    fs::create_dir(shared.path().join("in")).unwrap();
    fs::create_dir(shared.path().join("out")).unwrap();
    // Deterministic pseudo-random bytes (xorshift), large enough for many FUSE reads.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let files = vec![
        ("empty".to_string(), Vec::new()),
        ("hello.txt".to_string(), b"hello from the host\n".to_vec()),
        ("random.bin".to_string(), big),
    ];
    for (name, data) in &files {
        fs::write(shared.path().join("in").join(name), data).unwrap();
    }
    (shared, files)
}

#[test]
fn guest_reads_and_writes_the_shared_directory() {
    let (shared, files) = shared_dir_with_files();
    let console = run_probe(shared.path(), "check", 256, Duration::from_secs(120));
    let seen: Vec<&str> = console
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("PROBE FILE "))
        .collect();
    let want: Vec<String> = files
        .iter()
        .map(|(name, data)| format!("{name} {} {:016x}", data.len(), fnv1a64(data)))
        .collect();
    assert_eq!(seen, want, "console:\n{console}");
    let written = fs::read(shared.path().join("out/from-guest.txt"))
        .expect("the guest's file is visible on the host");
    assert_eq!(written, b"written by the guest through virtio-fs\n");
}

#[test]
fn killing_virtiofsd_ends_the_vm_with_status_1() {
    let (shared, _files) = shared_dir_with_files();
    // A lab guest lost before the probe ran is booted again (integration/src/lab_retry.rs).
    loop {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = Virtiofsd::start(shared.path(), dir.path(), CachePolicy::Never);
        let mut vm = Vm::spawn(&probe_vm_options(&daemon.socket, "hold", 256));
        if !wait_console(&mut vm, "PROBE MOUNTED", Duration::from_secs(120)) {
            let diag = format!("{}\n--- virtiofsd log:\n{}", vm.diagnostics(), daemon.log());
            let hung = vm.try_exit().is_none();
            let console = vm.console();
            match early_probe_loss(&mut vm, &console, hung)
                .and_then(|ev| lab_retry::take_guest_retry("virtio-fs probe (hold)", &ev))
            {
                Ok(_) => continue,
                Err(why) => panic!("the guest never mounted the share: {why}\n{diag}"),
            }
        }
        // The guest is using the share; now the daemon dies under it.
        daemon.kill();
        let st = vm.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
            panic!(
                "husk-vmm still runs 30 s after virtiofsd died\n{}",
                vm.diagnostics()
            )
        });
        assert_eq!(
            st.code(),
            Some(status::VMM_ERROR),
            "{}\n{}",
            describe_status(st),
            vm.diagnostics()
        );
        let log = vm.vmm_log();
        assert!(
            log.contains("virtiofsd closed its vhost-user connection"),
            "the error names virtiofsd:\n{log}"
        );
        return;
    }
}

#[test]
fn missing_virtiofsd_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // No socket at all: rejected before a VM exists.
    let opts = VmOptions {
        fs: Some((dir.path().join("absent.sock"), "husk".into())),
        ..Default::default()
    };
    let mut vm = Vm::spawn(&opts);
    let st = vm
        .wait_exit(Duration::from_secs(30))
        .expect("husk-vmm exits");
    assert_eq!(st.code(), Some(status::VMM_ERROR), "{}", vm.diagnostics());
    assert!(
        vm.vmm_log().contains("virtiofsd socket"),
        "{}",
        vm.diagnostics()
    );

    // A stale socket nobody listens on: the connection is refused.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let opts = VmOptions {
        fs: Some((stale, "husk".into())),
        ..Default::default()
    };
    let mut vm = Vm::spawn(&opts);
    let st = vm
        .wait_exit(Duration::from_secs(30))
        .expect("husk-vmm exits");
    assert_eq!(st.code(), Some(status::VMM_ERROR), "{}", vm.diagnostics());
    assert!(
        vm.vmm_log().contains("Cannot connect to virtiofsd"),
        "{}",
        vm.diagnostics()
    );
}
