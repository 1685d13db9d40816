//! Component tests: boot our real guest kernel and agent initramfs with husk-vmm under a KVM that
//! boots Linux, and talk to the agent from the host through the hybrid vsock socket (and once
//! under QEMU, the lab experiments' baseline, over AF_VSOCK).
//!
//! Run through `cargo xtask test` (inside the lab on hosts whose /dev/kvm is PVM).

use std::time::Duration;

use husk_integration::lab_retry;
use husk_integration::vm::{describe_status, status, Backend, Vm, VmOptions, QEMU_RESET_MARKER};
use husk_shim::agent::{AgentClient, VsockEndpoint};

const AGENT_PORT: u32 = 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn connect(vm: &Vm) -> AgentClient {
    match AgentClient::connect(&vm.endpoint, AGENT_PORT, Duration::from_secs(60)).await {
        Ok(c) => c,
        Err(e) => panic!("agent did not answer: {e}\n{}", vm.diagnostics()),
    }
}

fn expect_exit(vm: &mut Vm, code: i32, within: Duration) {
    match vm.wait_exit(within) {
        Some(st) if st.code() == Some(code) => {}
        Some(st) => panic!(
            "husk-vmm ended with {}, expected exit status {code}\n{}",
            describe_status(st),
            vm.diagnostics()
        ),
        None => panic!(
            "husk-vmm still running {within:?} later, expected exit status {code}\n{}",
            vm.diagnostics()
        ),
    }
}

#[test]
fn agent_answers_health_version_and_guest_details_then_shuts_down_cleanly() {
    // loglevel=6 lets the kernel banner (KERN_NOTICE) through `quiet`.
    let opts = VmOptions {
        vcpus: 1,
        mem_mib: 256,
        cmdline_extra: Some("loglevel=6".into()),
        ..Default::default()
    };
    let mut vm = Vm::boot(&opts);
    eprintln!(
        "guest ready after {} ms (husk-vmm's boot timer)",
        vm.boot_ms
    );
    runtime().block_on(async {
        let client = connect(&vm).await;
        client.check().await.expect("Health.Check");
        let version = client.version().await.expect("Health.Version");
        assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));

        let details = client.guest_details().await.expect("GetGuestDetails");
        assert!(
            details.kernel_release.starts_with("6.1."),
            "guest kernel release {:?} is not our 6.1 guest",
            details.kernel_release
        );
        let host_release = nix::sys::utsname::uname().unwrap();
        assert_ne!(
            details.kernel_release,
            host_release.release().to_string_lossy(),
            "the agent reported the host's kernel"
        );
        assert_eq!(details.online_cpus, 1);
        let total_mib = details.memory_total_bytes / (1024 * 1024);
        assert!(
            (200..=256).contains(&total_mib),
            "guest sees {total_mib} MiB, configured 256"
        );

        client.shutdown().await.expect("Shutdown");
    });
    expect_exit(&mut vm, status::CLEAN, Duration::from_secs(30));
    let console = vm.console();
    assert!(
        console.contains("Linux version 6.1"),
        "kernel banner missing from console:\n{console}"
    );
    assert!(
        !vm.vsock_uds.exists(),
        "husk-vmm left its vsock socket behind"
    );
}

#[test]
fn two_vcpus_are_online_in_the_guest() {
    let opts = VmOptions {
        vcpus: 2,
        ..Default::default()
    };
    let mut vm = Vm::boot(&opts);
    runtime().block_on(async {
        let client = connect(&vm).await;
        let details = client.guest_details().await.expect("GetGuestDetails");
        assert_eq!(details.online_cpus, 2, "{}", vm.diagnostics());
        client.shutdown().await.expect("Shutdown");
    });
    expect_exit(&mut vm, status::CLEAN, Duration::from_secs(30));
}

#[test]
fn a_dying_agent_is_reported_as_a_guest_panic() {
    let opts = VmOptions {
        cmdline_extra: Some("husk.test_fault=exit_after_ready".into()),
        ..Default::default()
    };
    let mut vm = Vm::boot(&opts);
    expect_exit(&mut vm, status::GUEST_PANIC, Duration::from_secs(60));
    let console = vm.console();
    assert!(
        console.contains("Kernel panic"),
        "no kernel panic on the console:\n{console}"
    );
}

#[test]
fn the_agents_own_init_failure_is_status_5_and_never_a_lab_retry() {
    let opts = VmOptions {
        cmdline_extra: Some("husk.test_fault=fail_init".into()),
        ..Default::default()
    };
    loop {
        let mut vm = Vm::spawn(&opts);
        let st = vm.wait_exit(Duration::from_secs(120));
        let code = st.and_then(|s| s.code());
        if code == Some(status::AGENT_FAILED) {
            let (console, log) = (vm.console(), vm.vmm_log());
            assert!(
                console.contains("husk-agent: error: test fault fail_init"),
                "the agent's error is not on the console:\n{console}"
            );
            assert!(
                log.contains("guest agent started") && !log.contains("guest ready"),
                "{log}"
            );
            assert!(
                log.contains("the guest agent reported its own failure"),
                "{log}"
            );
            // The harness never takes it for the lab's.
            let end = lab_retry::EarlyEnd {
                vmm_status: code,
                vmm_log: &log,
            };
            assert!(lab_retry::classify_early_end(end).is_err());
            return;
        }
        // Only a guest the lab lost before the agent ran may be booted again.
        if st.is_none() {
            vm.kill();
        }
        let log = vm.vmm_log();
        let end = lab_retry::EarlyEnd {
            vmm_status: code,
            vmm_log: &log,
        };
        if let Err(why) = lab_retry::classify_early_end(end)
            .and_then(|ev| lab_retry::take_guest_retry("fail_init boot", &ev))
        {
            panic!(
                "expected husk-vmm status 5, got {st:?}: {why}\n{}",
                vm.diagnostics()
            );
        }
    }
}

#[test]
fn sigterm_to_the_vmm_stops_the_guest_and_cleans_up() {
    let mut vm = Vm::boot(&VmOptions::default());
    vm.signal(nix::sys::signal::Signal::SIGTERM);
    expect_exit(&mut vm, status::STOPPED_BY_HOST, Duration::from_secs(30));
    assert!(
        !vm.vsock_uds.exists(),
        "husk-vmm left its vsock socket behind"
    );
}

#[test]
fn sigusr1_logs_a_state_dump_and_the_guest_keeps_running() {
    let mut vm = Vm::boot(&VmOptions::default());
    runtime().block_on(async {
        let client = connect(&vm).await;
        vm.signal(nix::sys::signal::Signal::SIGUSR1);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let dump = loop {
            let log = vm.vmm_log();
            if let Some(line) = log.lines().find(|l| l.contains("vsock cid")) {
                break line.to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no vsock state dump after SIGUSR1:\n{}",
                vm.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The client's connection is in the table, established, with its flow control.
        assert!(dump.contains("state dump (SIGUSR1)"), "{dump}");
        assert!(dump.contains("conns=1"), "{dump}");
        assert!(dump.contains("Established"), "{dump}");
        assert!(dump.contains("peer_credit="), "{dump}");
        let log = vm.vmm_log();
        let exits = log
            .lines()
            .find(|l| l.contains("vCPU exits so far"))
            .unwrap_or_else(|| panic!("no vCPU line in the dump:\n{log}"));
        assert!(
            !exits.contains("[0]"),
            "a booted vCPU never exited: {exits}"
        );
        assert!(
            exits.contains("vCPU 0: RIP=0x") && exits.contains("CR3=0x"),
            "no registers of vCPU 0 in the dump: {exits}"
        );
        // SIGUSR1 only reports: the VM and the agent go on.
        client.check().await.expect("Health.Check after SIGUSR1");
        assert!(vm.try_exit().is_none(), "husk-vmm exited on SIGUSR1");
        client.shutdown().await.expect("Shutdown");
    });
    expect_exit(&mut vm, status::CLEAN, Duration::from_secs(30));
}

/// The baseline of the lab experiments (issue 8, `HUSK_TEST_VMM=qemu`): the same guest and agent
/// under QEMU `-M microvm` with the kernel's vhost-vsock. The agent announces itself on the status
/// port, answers over AF_VSOCK at the guest's CID, and its clean shutdown ends QEMU with 0.
#[test]
fn the_same_guest_under_qemu_answers_over_af_vsock() {
    let opts = VmOptions {
        backend: Backend::Qemu,
        ..Default::default()
    };
    let mut vm = Vm::boot(&opts);
    assert!(
        matches!(vm.endpoint, VsockEndpoint::Kernel { cid } if cid > 2),
        "{:?}",
        vm.endpoint
    );
    runtime().block_on(async {
        let client = connect(&vm).await;
        let details = client.guest_details().await.expect("GetGuestDetails");
        assert!(
            details.kernel_release.starts_with("6.1."),
            "guest kernel release {:?} is not our 6.1 guest",
            details.kernel_release
        );
        assert_eq!(details.online_cpus, 1);
        client.shutdown().await.expect("Shutdown");
    });
    expect_exit(&mut vm, 0, Duration::from_secs(30));
    // The status watcher saw the agent's clean-shutdown byte (it may log it a moment after QEMU
    // ended), and so reports no unexplained reset.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = vm.vmm_log();
        if log.contains("qemu: the agent announced a clean shutdown") {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no clean shutdown on the status port:\n{}",
            vm.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!log.contains(QEMU_RESET_MARKER), "{log}");
    assert!(!vm.vsock_uds.exists(), "QEMU has no hybrid socket");
}
