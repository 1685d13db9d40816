//! Guest memory: one or two memfd-backed regions mapped with vm-memory.
//!
//! The memory is a `memfd` (not anonymous memory) so that vhost-user backends such as virtiofsd
//! can map the same pages later. A memfd is backed lazily: pages cost host RAM only once the guest
//! touches them. RAM above the 32-bit MMIO gap continues at 4 GiB.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{MMIO32_GAP_SIZE, MMIO32_GAP_START};

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Guest memory setup failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed
    #[error("Cannot create the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed
    #[error("Cannot size the guest memory memfd to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    /// Mapping failed
    #[error("Cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest physical RAM ranges `(start, size)` for `mem_size` bytes, skipping the MMIO gap.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    let gap_end = MMIO32_GAP_START + MMIO32_GAP_SIZE;
    if mem_size <= MMIO32_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO32_GAP_START),
            (GuestAddress(gap_end), mem_size - MMIO32_GAP_START),
        ]
    }
}

/// Creates `mem_size_mib` MiB of guest memory backed by one memfd.
pub fn create_guest_memory(mem_size_mib: u64) -> Result<(GuestMemory, File), MemoryError> {
    let mem_size = mem_size_mib << 20;
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; we check the result.
    let fd = unsafe { libc::memfd_create(c"husk-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_size)
        .map_err(|e| MemoryError::Truncate(mem_size, e))?;
    let mut file_offset = 0u64;
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(mem_size) {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, file_offset);
        regions.push((start, size as usize, Some(fo)));
        file_offset += size;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
    Ok((mem, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory as _};

    #[test]
    fn small_memory_is_one_region() {
        let (mem, _f) = create_guest_memory(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn large_memory_skips_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(1 << 32));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
