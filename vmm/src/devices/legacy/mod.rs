//! Legacy PC devices on the I/O port bus: COM1 serial console, the i8042 reset line and the husk
//! boot/status port.

pub mod boot_port;
pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by a KVM irqfd: writing the eventfd raises the GSI.
#[derive(Debug)]
pub struct IrqFdTrigger(pub EventFd);

impl vm_superio::Trigger for IrqFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
