//! The husk-vmm command line as a person meets it: the real binary, its exit statuses and
//! messages for bad input. None of these cases reach KVM, so they run on any host.

use std::process::{Command, Output};

fn husk_vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .args(args)
        .output()
        .expect("run husk-vmm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_names_every_option_and_exits_zero() {
    let o = husk_vmm(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--kernel",
        "--initrd",
        "--mem-mib",
        "--vcpus",
        "--vsock-uds",
        "--console",
        "--cmdline-extra",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}:\n{text}");
    }
}

#[test]
fn a_missing_kernel_is_a_vmm_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let o = husk_vmm(&[
        "--kernel",
        "/nonexistent/vmlinux",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/vmlinux"),
        "message does not name the path: {}",
        stderr(&o)
    );
    assert!(!uds.exists(), "a failed start left its socket behind");
}

#[test]
fn a_bzimage_is_refused_as_not_an_elf_vmlinux() {
    let dir = tempfile::tempdir().unwrap();
    let bz = dir.path().join("bzImage");
    std::fs::write(&bz, b"MZ\0\0 a compressed kernel, not an ELF").unwrap();
    let o = husk_vmm(&[
        "--kernel",
        bz.to_str().unwrap(),
        "--vsock-uds",
        dir.path().join("v.sock").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).to_lowercase().contains("elf"),
        "message does not explain the format: {}",
        stderr(&o)
    );
}

#[test]
fn out_of_range_values_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    for bad in [["--vcpus", "0"], ["--vcpus", "33"], ["--mem-mib", "1"]] {
        let mut args = vec![
            "--kernel",
            "/bin/true",
            "--vsock-uds",
            uds.to_str().unwrap(),
        ];
        args.extend_from_slice(&bad);
        let o = husk_vmm(&args);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
    }
}

#[test]
fn a_missing_vsock_socket_option_is_a_usage_error() {
    let o = husk_vmm(&["--kernel", "/bin/true"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--vsock-uds"), "{}", stderr(&o));
}
