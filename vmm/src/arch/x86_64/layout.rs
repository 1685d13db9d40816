//! Guest physical memory layout on x86_64.
//!
//! ```text
//! 0x0000_0500  boot GDT (PVH entry uses its hidden descriptor state, the copy is for the guest)
//! 0x0000_6000  hvm_start_info        (xen/include/public/arch-x86/hvm/start_info.h)
//! 0x0000_6040  hvm_modlist_entry[]   (initrd)
//! 0x0000_7000  hvm_memmap_table_entry[] (e820-style memory map)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (start of the EBDA, where Linux scans for "_MP_")
//! 0x0010_0000  high memory: the ELF kernel loads at its physical addresses above this
//! 0xc000_0000  32-bit MMIO gap (virtio-mmio windows at 0xd000_0000, IOAPIC, LAPIC)
//! 0x1_0000_0000 RAM above the gap
//! ```

/// Where the boot GDT is written.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where `hvm_start_info` is written; `ebx` points here at the PVH entry.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH module list (initrd) is written.
pub const MODLIST_START: u64 = 0x6040;
/// Where the PVH memory map is written.
pub const MEMMAP_START: u64 = 0x7000;
/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x20000;
/// Space reserved for the command line (Linux x86 COMMAND_LINE_SIZE is 2048; 6.x allows more).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (640 KiB).
pub const EBDA_END: u64 = 0xa0000;
/// First byte of high memory (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO32_GAP_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO gap (up to 4 GiB).
pub const MMIO32_GAP_SIZE: u64 = 0x4000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window (4 KiB; docs/contracts.md).
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 0x1000;
/// First IRQ for virtio-mmio devices (4 is COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC input usable for devices (the KVM IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;
/// IOAPIC MMIO base (Intel 82093AA default).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base (Intel SDM vol. 3, 10.4.1).
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the real-mode TSS on Intel (KVM_SET_TSS_ADDR), inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM identity map page (KVM_SET_IDENTITY_MAP_ADDR), right after the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
