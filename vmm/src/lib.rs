//! husk-vmm: the KVM micro-VM monitor of husk.
//!
//! It boots an ELF `vmlinux` through its PVH entry point into memfd-backed guest memory, runs one
//! thread per vCPU plus one event-loop thread for devices, and offers the guest a 8250 serial
//! console, an i8042 reset line, the husk boot/status port (0x440), a user-space virtio-vsock
//! device and optionally a virtio-fs device (a vhost-user frontend for `virtiofsd`) over
//! virtio-mmio. The host reaches the guest's vsock through a Firecracker-style "hybrid vsock"
//! Unix socket. How a VM ends is mapped to an exit status by [`exit`].
#![warn(missing_docs)]

pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod jail;
pub mod memory;
pub mod ratelimit;
pub mod seccomp;
pub mod vcpu;

pub use builder::{run_vm, BuildError};
pub use config::{CliArgs, ConsoleTarget, VmConfig};
pub use exit::{ExitEvent, ExitStatus};
