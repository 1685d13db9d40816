//! Shared helpers for husk's component and end-to-end tests.
//!
//! The tests drive real parts: the `husk-vmm` binary, our guest kernel and the agent initramfs.
//! They are started by `cargo xtask test`, which builds those parts and passes their paths in
//! the environment (`HUSK_VMM`, `HUSK_KERNEL`, `HUSK_INITRD`) and says where the tests run
//! (`HUSK_KVM_MODE=direct|lab`). A test that lacks any of them fails loudly: nothing is skipped.

#![warn(missing_docs)]

pub mod containerd;
pub mod lab_retry;
pub mod pod;
pub mod tap;
pub mod virtiofsd;
pub mod vm;

use std::path::PathBuf;

/// Reads a required path from the environment, failing the test with a clear message if absent.
pub fn required_path(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => {
            let p = PathBuf::from(v);
            assert!(
                p.exists(),
                "{var}={} does not exist; run the tests through `cargo xtask test`",
                p.display()
            );
            p
        }
        _ => panic!(
            "{var} is not set: this test needs real husk parts and a KVM that boots Linux; \
             run it through `cargo xtask test`, which builds them and uses the lab where needed"
        ),
    }
}

/// Where the tests run: on a host KVM that boots Linux, or inside the QEMU-TCG lab.
pub fn kvm_mode() -> String {
    std::env::var("HUSK_KVM_MODE").unwrap_or_else(|_| "unknown".to_string())
}

/// The two-worker tokio runtime the lab experiments (`examples/`) drive a pod on.
pub fn experiment_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
