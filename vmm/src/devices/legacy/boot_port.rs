//! The husk boot/status port (I/O port 0x440, docs/contracts.md).
//!
//! The agent writes 0x04 as soon as it runs as PID 1 (`guest agent started`), 0x01 when its
//! ttrpc server listens (we log `guest ready boot_ms=…`, the boot timer), 0x03 right before
//! PID 1 exits because the agent failed, and 0x02 right before it resets the VM on a clean
//! shutdown. All are remembered for the exit classification.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::devices::BusDevice;
use crate::exit::GuestObservations;

/// The port.
pub const BOOT_PORT: u64 = 0x440;
/// Agent ready.
pub const BOOT_READY: u8 = 0x01;
/// Agent clean shutdown.
pub const BOOT_SHUTDOWN: u8 = 0x02;
/// The agent failed; PID 1 exits.
pub const BOOT_FAILED: u8 = 0x03;
/// The agent runs as PID 1.
pub const BOOT_STARTED: u8 = 0x04;

/// The boot/status port device.
#[derive(Debug)]
pub struct BootPort {
    launched: Instant,
    observations: std::sync::Arc<GuestObservations>,
}

impl BootPort {
    /// A port measuring boot time from `launched` (process start).
    pub fn new(launched: Instant, observations: std::sync::Arc<GuestObservations>) -> Self {
        Self {
            launched,
            observations,
        }
    }
}

impl BusDevice for BootPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first().copied() {
            Some(BOOT_READY) => {
                if !self.observations.agent_ready.swap(true, Ordering::SeqCst) {
                    let boot_ms = self.launched.elapsed().as_millis();
                    tracing::info!("guest ready boot_ms={boot_ms}");
                }
            }
            Some(BOOT_STARTED) => {
                if !self.observations.agent_started.swap(true, Ordering::SeqCst) {
                    let boot_ms = self.launched.elapsed().as_millis();
                    tracing::info!("guest agent started boot_ms={boot_ms}");
                }
            }
            Some(BOOT_FAILED) => {
                if !self.observations.agent_failed.swap(true, Ordering::SeqCst) {
                    crate::guest_warn!("the guest agent reported its own failure; PID 1 exits");
                }
            }
            Some(BOOT_SHUTDOWN) => {
                if !self
                    .observations
                    .agent_shutdown
                    .swap(true, Ordering::SeqCst)
                {
                    tracing::info!("guest announced clean shutdown");
                }
            }
            other => crate::guest_warn!(value = ?other, "unknown value on the boot port"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn ready_and_shutdown_are_recorded() {
        let obs = Arc::new(GuestObservations::default());
        let mut p = BootPort::new(Instant::now(), obs.clone());
        p.write(0, &[7]);
        assert!(!obs.agent_ready.load(Ordering::SeqCst));
        p.write(0, &[BOOT_READY]);
        p.write(0, &[BOOT_READY]);
        assert!(obs.agent_ready.load(Ordering::SeqCst));
        assert!(!obs.agent_shutdown.load(Ordering::SeqCst));
        p.write(0, &[BOOT_SHUTDOWN]);
        assert!(obs.agent_shutdown.load(Ordering::SeqCst));
        assert!(!obs.agent_started.load(Ordering::SeqCst));
        p.write(0, &[BOOT_STARTED]);
        assert!(obs.agent_started.load(Ordering::SeqCst));
        assert!(!obs.agent_failed.load(Ordering::SeqCst));
        p.write(0, &[BOOT_FAILED]);
        assert!(obs.agent_failed.load(Ordering::SeqCst));
    }
}
