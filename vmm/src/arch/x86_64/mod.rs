//! x86_64 boot: load an ELF vmlinux, place initrd and command line, describe memory to the
//! kernel through the PVH `hvm_start_info`, and prepare each vCPU (CPUID, MSRs, registers).

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

use std::fs::File;
use std::path::Path;

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, GuestMemoryRegion};

use crate::memory::GuestMemory;
use layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_END, EBDA_START, HIMEM_START, MEMMAP_START,
    MMIO32_GAP_START, MODLIST_START, PVH_INFO_START,
};

/// `XEN_HVM_START_MAGIC_VALUE` (xen/include/public/arch-x86/hvm/start_info.h).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// hvm_start_info version we fill (1: has memmap fields).
const HVM_START_INFO_VERSION: u32 = 1;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
const E820_RESERVED: u32 = 2;
/// Initrd alignment (one page).
const INITRD_ALIGN: u64 = 0x1000;

/// Booting the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Cannot open the kernel
    #[error("Cannot open kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// The ELF loader failed
    #[error("Cannot load the ELF kernel")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// No PVH note in the kernel
    #[error(
        "The kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y"
    )]
    NoPvhEntry,
    /// Cannot read the initrd
    #[error("Cannot read initrd {0}")]
    ReadInitrd(String, #[source] std::io::Error),
    /// The initrd does not fit
    #[error("The initrd ({0} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge(u64),
    /// Writing boot data into guest memory failed
    #[error("Cannot write boot data into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// The command line is invalid or too long
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line cannot be written
    #[error("Cannot write the kernel command line")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    /// PVH configuration failed
    #[error("Cannot write the PVH start info")]
    StartInfo(#[source] linux_loader::configurator::Error),
    /// MP table
    #[error("Cannot write the MP table")]
    Mptable(#[from] mptable::MptableError),
    /// CPU setup
    #[error("Cannot set up vCPU registers")]
    Regs(#[from] regs::RegsError),
    /// MSR setup
    #[error("Cannot set up vCPU MSRs")]
    Msr(#[from] msr::MsrError),
    /// KVM_SET_CPUID2 failed
    #[error("KVM_SET_CPUID2 failed")]
    Cpuid(#[source] kvm_ioctls::Error),
}

/// Where things ended up in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// PVH entry point (guest physical).
    pub entry: GuestAddress,
    /// End of the kernel image.
    pub kernel_end: u64,
}

/// Loads the ELF kernel and returns its PVH entry point.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<BootInfo, BootError> {
    let mut file =
        File::open(path).map_err(|e| BootError::OpenKernel(path.display().to_string(), e))?;
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::LoadKernel)?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(BootInfo {
            entry,
            kernel_end: result.kernel_end,
        }),
        _ => Err(BootError::NoPvhEntry),
    }
}

/// Highest guest address usable for boot data below 4 GiB (end of the low RAM region).
fn low_ram_end(mem: &GuestMemory) -> u64 {
    let first = mem.iter().next().map(|r| r.last_addr().raw_value() + 1);
    first.unwrap_or(0).min(MMIO32_GAP_START)
}

/// Loads the initrd at the top of low memory; returns `(address, size)`.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|e| BootError::ReadInitrd(name.clone(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::ReadInitrd(name.clone(), e))?
        .len();
    let top = low_ram_end(mem);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(INITRD_ALIGN - 1))
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitrdTooLarge(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::Write)?;
    Ok((GuestAddress(addr), size))
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn load_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    let mut cl =
        linux_loader::cmdline::Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(BootError::LoadCmdline)
}

/// The PVH memory map: low RAM below the EBDA, the EBDA (MP table) reserved, RAM from 1 MiB.
pub fn memory_map(mem: &GuestMemory) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, size: u64, type_: u32| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, EBDA_END - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.last_addr().raw_value() + 1;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes `hvm_start_info`, its memory map and module list (initrd).
pub fn configure_pvh(
    mem: &GuestMemory,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let memmap = memory_map(mem);
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: HVM_START_INFO_VERSION,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(addr, size)| hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(BootError::StartInfo)?;
    // Zero the GDT/IDT area so stale data never looks like a descriptor.
    mem.write_slice(&[0u8; 64], GuestAddress(layout::BOOT_GDT_START))
        .map_err(BootError::Write)
}

/// Prepares vCPU `cpu_id`: CPUID, MSRs, FPU, LAPIC pins; the boot vCPU also gets the PVH entry.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemory,
    supported_cpuid: &CpuId,
    cpu_id: u8,
    vcpu_count: u8,
    entry: GuestAddress,
) -> Result<(), BootError> {
    let cpuid = cpuid::filter_cpuid(supported_cpuid, cpu_id, vcpu_count);
    vcpu.set_cpuid2(&cpuid).map_err(BootError::Cpuid)?;
    msr::setup_msrs(vcpu)?;
    regs::setup_fpu(vcpu)?;
    regs::setup_lint(vcpu)?;
    if cpu_id == 0 {
        regs::setup_pvh_regs(vcpu, mem, entry.raw_value())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_reserves_ebda() {
        let (mem, _f) = crate::memory::create_guest_memory(64).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].type_, E820_RESERVED);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, 64 << 20);
    }

    #[test]
    fn initrd_goes_to_top_of_memory() {
        let (mem, _f) = crate::memory::create_guest_memory(64).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 5000]).unwrap();
        let (addr, size) = load_initrd(&mem, f.path(), 16 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr.raw_value() % INITRD_ALIGN, 0);
        assert!(addr.raw_value() + size <= 64 << 20);
        let b: u8 = mem.read_obj(addr).unwrap();
        assert_eq!(b, 7);
        assert!(matches!(
            load_initrd(&mem, f.path(), 64 << 20),
            Err(BootError::InitrdTooLarge(_))
        ));
    }
}
