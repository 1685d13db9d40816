//! COM1 (I/O ports 0x3f8..0x3ff, IRQ 4): a 16550A-compatible UART from vm-superio.
//!
//! Output goes to stdout, a file, or nowhere; either way every line is scanned for the kernel's
//! panic banner so the VMM can report a guest panic (exit status 3). Guest input is not wired.

use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_superio::Serial;

use super::IrqFdTrigger;
use crate::devices::BusDevice;
use crate::exit::GuestObservations;

/// First I/O port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 occupies eight ports.
pub const COM1_PORT_COUNT: u64 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// What the kernel prints when it panics (kernel/panic.c).
pub const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";
/// What the kernel prints when PID 1 (the agent) exits (kernel/exit.c).
pub const INIT_DIED_BANNER: &[u8] = b"Attempted to kill init";
/// Longest console line we keep for panic scanning; longer lines are scanned in pieces.
const LINE_BUF_MAX: usize = 256;

/// Console sink that scans the byte stream for [`PANIC_BANNER`].
pub struct ConsoleWriter {
    out: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    observations: Arc<GuestObservations>,
}

impl std::fmt::Debug for ConsoleWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleWriter")
            .field("enabled", &self.out.is_some())
            .finish()
    }
}

impl ConsoleWriter {
    /// A writer forwarding to `out` (or discarding if `None`).
    pub fn new(out: Option<Box<dyn Write + Send>>, observations: Arc<GuestObservations>) -> Self {
        Self {
            out,
            line: Vec::new(),
            observations,
        }
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' || self.line.len() >= LINE_BUF_MAX {
            self.check_line();
            // Keep a tail so a banner split across the cut is still found.
            let keep = if byte == b'\n' { 0 } else { PANIC_BANNER.len() };
            let cut = self.line.len() - keep.min(self.line.len());
            self.line.drain(..cut);
        }
        if byte != b'\n' {
            self.line.push(byte);
        }
    }
}

impl ConsoleWriter {
    fn check_line(&self) {
        if contains(&self.line, PANIC_BANNER) {
            self.observations.kernel_panic.store(true, Ordering::SeqCst);
        }
        if contains(&self.line, INIT_DIED_BANNER) {
            self.observations.init_died.store(true, Ordering::SeqCst);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for b in buf {
            self.scan(*b);
        }
        if let Some(out) = self.out.as_mut() {
            out.write_all(buf)?;
            if buf.contains(&b'\n') {
                out.flush()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check_line();
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

/// The COM1 device on the port bus.
#[derive(Debug)]
pub struct SerialDevice {
    serial: Serial<IrqFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: IrqFdTrigger, out: ConsoleWriter) -> Self {
        Self {
            serial: Serial::new(irq, out),
        }
    }

    /// Flushes pending console output (called at VM exit).
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_PORT_COUNT {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= COM1_PORT_COUNT {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            crate::guest_warn!(error = ?e, "serial console write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn panic_banner_is_detected_and_output_forwarded() {
        let obs = Arc::new(GuestObservations::default());
        let sink = Sink::default();
        let mut w = ConsoleWriter::new(Some(Box::new(sink.clone())), obs.clone());
        w.write_all(b"[    0.1] hello\n").unwrap();
        assert!(!obs.kernel_panic.load(Ordering::SeqCst));
        for b in b"[    1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            w.write_all(&[*b]).unwrap();
        }
        assert!(obs.kernel_panic.load(Ordering::SeqCst));
        assert!(obs.init_died.load(Ordering::SeqCst));
        assert!(sink.0.lock().unwrap().starts_with(b"[    0.1] hello\n"));
    }

    #[test]
    fn banner_split_by_long_line_is_found() {
        let obs = Arc::new(GuestObservations::default());
        let mut w = ConsoleWriter::new(None, obs.clone());
        w.write_all(&[b'x'; LINE_BUF_MAX - 5]).unwrap();
        w.write_all(PANIC_BANNER).unwrap();
        w.write_all(b"\n").unwrap();
        assert!(obs.kernel_panic.load(Ordering::SeqCst));
    }

    #[test]
    fn serial_transmits_bytes() {
        let obs = Arc::new(GuestObservations::default());
        let sink = Sink::default();
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            IrqFdTrigger(evt),
            ConsoleWriter::new(Some(Box::new(sink.clone())), obs),
        );
        dev.write(0, b"A");
        assert_eq!(&sink.0.lock().unwrap()[..], b"A");
    }
}
