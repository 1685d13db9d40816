//! A minimal i8042 keyboard controller at ports 0x60/0x64, only there to give the guest a reset
//! line: command 0xFE ("pulse output line 0", the CPU reset) ends the VM like a triple fault.
//!
//! It answers the few probes Linux's i8042 driver sends (read/write the command byte, self
//! test) so the driver gives up quickly instead of timing out, and reports no keyboard data.

use crate::devices::BusDevice;
use crate::exit::{ExitEvent, ExitNotifier, ResetKind};

/// Data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Span from the data port to the command/status port (0x60..=0x64).
pub const I8042_PORT_SPAN: u64 = 5;
/// Offset of the command/status port inside the span (0x64).
const COMMAND_OFFSET: u64 = 4;
/// Commands (IBM PC/AT technical reference; linux drivers/input/serio/i8042.h).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_RESET_CPU: u8 = 0xfe;
/// Self test passed.
const SELF_TEST_OK: u8 = 0x55;
/// Status: output buffer full.
const STATUS_OBF: u8 = 0x01;
/// Status: system flag (POST passed).
const STATUS_SYS: u8 = 0x04;
/// Controller command byte after reset: interrupts off, system flag, translation.
const CTR_DEFAULT: u8 = 0x44;

/// The i8042 device.
#[derive(Debug)]
pub struct I8042Device {
    exit: ExitNotifier,
    ctr: u8,
    out: Option<u8>,
    expect_ctr: bool,
}

impl I8042Device {
    /// A controller that reports resets through `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self {
            exit,
            ctr: CTR_DEFAULT,
            out: None,
            expect_ctr: false,
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.out.take().unwrap_or(0),
            COMMAND_OFFSET => STATUS_SYS | if self.out.is_some() { STATUS_OBF } else { 0 },
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if self.expect_ctr => {
                self.ctr = value;
                self.expect_ctr = false;
            }
            COMMAND_OFFSET => match value {
                CMD_RESET_CPU => {
                    tracing::info!("guest requested reset through the i8042");
                    self.exit.notify(ExitEvent::GuestReset(ResetKind::I8042));
                }
                CMD_READ_CTR => self.out = Some(self.ctr),
                CMD_WRITE_CTR => self.expect_ctr = true,
                CMD_SELF_TEST => self.out = Some(SELF_TEST_OK),
                CMD_KBD_TEST => self.out = Some(0),
                _ => {}
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let (n, rx) = ExitNotifier::new();
        let mut d = I8042Device::new(n);
        d.write(COMMAND_OFFSET, &[0x20]);
        let mut b = [0u8];
        d.read(COMMAND_OFFSET, &mut b);
        assert_eq!(b[0] & STATUS_OBF, STATUS_OBF);
        d.read(0, &mut b);
        assert_eq!(b[0], CTR_DEFAULT);
        assert!(rx.try_recv().is_err());
        d.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(
            rx.try_recv().unwrap(),
            ExitEvent::GuestReset(ResetKind::I8042)
        );
    }
}
