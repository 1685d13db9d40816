//! The shim's [`VmmCommand`] against husk-vmm's own parser: every command line the builder
//! can produce must parse and validate into exactly the values it was given, so a flag renamed
//! or retyped on either side fails here rather than at a pod's first boot.
//!
//! This runs [`CliArgs`] in-process (clap plus [`CliArgs::validate`], the same two steps
//! `main` takes); nothing here creates a VM.

use std::os::unix::net::UnixListener;
use std::path::Path;

use clap::Parser;
use husk_shim::vmm::{Console, VmmCommand};
use husk_vmm::config::{FsConfig, DEFAULT_GUEST_CID};
use husk_vmm::{CliArgs, ConsoleTarget, VmConfig};

/// What husk-vmm makes of the builder's command line, or why it refuses it.
fn parse(cmd: &VmmCommand) -> VmConfig {
    let args = cmd.args();
    let built: Vec<_> = cmd.command().get_args().map(|a| a.to_owned()).collect();
    assert_eq!(built, args, "command() passes args() unchanged");
    let cli = CliArgs::try_parse_from(std::iter::once("husk-vmm".into()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("husk-vmm rejects {args:?}:\n{e}"));
    cli.validate()
        .unwrap_or_else(|e| panic!("husk-vmm finds {args:?} invalid: {e}"))
}

/// A file husk-vmm takes for a kernel (its ELF magic is all it reads).
fn write_kernel(path: &Path) {
    std::fs::write(path, b"\x7fELF\x02\x01\x01").unwrap();
}

#[test]
fn every_option_reaches_husk_vmm_with_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    write_kernel(&kernel);
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(&initrd, b"070701").unwrap();
    let fs_socket = dir.path().join("fs.sock");
    let _virtiofsd = UnixListener::bind(&fs_socket).unwrap();
    let vsock_uds = dir.path().join("vsock.sock");
    let console = dir.path().join("console.log");

    let cmd = VmmCommand::new("husk-vmm", &kernel, &vsock_uds)
        .initrd(&initrd)
        .mem_mib(512)
        .vcpus(2)
        .vsock_cid(7)
        .console(Console::File(console.clone()))
        .cmdline_extra("quiet probe_mode=bench")
        .fs(&fs_socket, "husk")
        .fs_queue_size(256)
        .jail(dir.path().join("jail"), 65534, 65533)
        .seccomp("log");
    std::fs::create_dir(dir.path().join("jail")).unwrap();
    let cfg = parse(&cmd);

    assert_eq!(cfg.kernel, kernel);
    assert_eq!(cfg.initrd.as_deref(), Some(initrd.as_path()));
    assert_eq!(cfg.mem_size_mib, 512);
    assert_eq!(cfg.vcpus, 2);
    assert_eq!(cfg.vsock_uds, vsock_uds);
    assert_eq!(cfg.vsock_cid, 7);
    assert_eq!(cfg.console, ConsoleTarget::File(console));
    assert_eq!(cfg.cmdline_extra.as_deref(), Some("quiet probe_mode=bench"));
    assert_eq!(
        cfg.fs,
        Some(FsConfig {
            socket: fs_socket,
            tag: "husk".into(),
            queue_size: 256,
        })
    );
    assert_eq!(
        cfg.jail,
        Some(husk_vmm::jail::JailConfig {
            dir: dir.path().join("jail"),
            uid: 65534,
            gid: 65533,
        })
    );
    assert_eq!(cfg.seccomp, husk_vmm::seccomp::SeccompMode::Log);
    // The shim's config words are husk-vmm's.
    use husk_shim::config::SeccompMode as Shim;
    use husk_vmm::seccomp::SeccompMode as Vmm;
    for (mode, meant) in [
        (Shim::Kill, Vmm::Kill),
        (Shim::Log, Vmm::Log),
        (Shim::Off, Vmm::Off),
    ] {
        let cmd = VmmCommand::new("husk-vmm", &kernel, &vsock_uds).seccomp(mode.as_str());
        assert_eq!(parse(&cmd).seccomp, meant);
    }
}

#[test]
fn a_bare_command_gets_the_builders_defaults_and_husk_vmms_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    write_kernel(&kernel);
    let vsock_uds = dir.path().join("vsock.sock");

    let cfg = parse(&VmmCommand::new("husk-vmm", &kernel, &vsock_uds));

    // What VmmCommand::new documents: 256 MiB, one vCPU, console off, nothing else.
    assert_eq!(cfg.kernel, kernel);
    assert_eq!(cfg.vsock_uds, vsock_uds);
    assert_eq!(cfg.mem_size_mib, 256);
    assert_eq!(cfg.vcpus, 1);
    assert_eq!(cfg.console, ConsoleTarget::Off);
    assert_eq!(cfg.initrd, None);
    assert_eq!(cfg.cmdline_extra, None);
    assert!(cfg.fs.is_none());
    assert!(cfg.jail.is_none());
    // Left to husk-vmm, as VmmCommand::vsock_cid and VmmCommand::seccomp document.
    assert_eq!(cfg.seccomp, husk_vmm::seccomp::SeccompMode::Kill);
    assert_eq!(cfg.vsock_cid, DEFAULT_GUEST_CID);
}

#[test]
fn each_console_destination_means_the_same_to_both() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    write_kernel(&kernel);
    let log = dir.path().join("console.log");
    for (console, expected) in [
        (Console::Off, ConsoleTarget::Off),
        (Console::Stdout, ConsoleTarget::Stdout),
        (Console::File(log.clone()), ConsoleTarget::File(log.clone())),
    ] {
        let cmd = VmmCommand::new("husk-vmm", &kernel, dir.path().join("v.sock")).console(console);
        assert_eq!(parse(&cmd).console, expected);
    }
}

#[test]
fn the_shim_and_husk_vmm_boot_the_same_kernel_command_line() {
    assert_eq!(
        husk_shim::vmm::GUEST_BASE_CMDLINE,
        husk_vmm::builder::BASE_CMDLINE
    );
}
