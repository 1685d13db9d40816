//! Emulated devices and the buses vCPU exits are dispatched on.
//!
//! A [`Bus`] maps address ranges (I/O ports or guest physical MMIO addresses) to devices. vCPU
//! threads share the buses; each device sits behind its own mutex, so vCPUs touching different
//! devices never contend.

pub mod legacy;
pub mod virtio;

use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Adding a device to a bus failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range overlaps an existing device or is empty
    #[error("Bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Range start.
        base: u64,
        /// Range length.
        len: u64,
    },
}

#[derive(Clone)]
struct BusEntry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// An address space (PIO or MMIO) with devices in non-overlapping ranges.
#[derive(Clone, Default)]
pub struct Bus {
    entries: Vec<BusEntry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.push(BusEntry { base, len, device });
        self.entries.sort_by_key(|e| e.base);
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&BusEntry, u64)> {
        let idx = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let entry = &self.entries[idx];
        let offset = addr - entry.base;
        (offset.checked_add(size as u64)? <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) if nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device mutex; a poisoned lock (a panic in another thread) is still usable because
/// device state is only ever mutated through complete register operations.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x20, 8, Arc::new(Mutex::new(Echo(5)))).unwrap();
        assert!(bus.insert(0x14, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x30, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x18, &mut b));
        assert!(!bus.read(0x0, &mut b));
        let mut w = [0u8; 4];
        assert!(
            !bus.read(0x26, &mut w),
            "access crossing the end is rejected"
        );
        assert!(bus.write(0x20, &[9]));
        assert!(bus.read(0x20, &mut b));
        assert_eq!(b[0], 9);
    }
}
