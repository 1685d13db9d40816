//! vCPU register state for the PVH entry, FPU defaults and local APIC LINT pins.
//!
//! The PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h and Linux
//! `Documentation/x86/boot.rst`, "PVH"): the vCPU starts in 32-bit protected mode with paging
//! disabled; CS is a flat 32-bit read/execute code segment, DS/ES/SS flat 32-bit read/write data
//! segments, TR a 32-bit TSS (busy); CR0.PE = 1, CR4 = 0; EFLAGS.IF = 0; `ebx` holds the guest
//! physical address of `hvm_start_info`; other GPRs are undefined.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_GDT_START, PVH_INFO_START};
use crate::memory::GuestMemory;

/// CR0.PE: protected mode enable (Intel SDM vol. 3, 2.5).
const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type, hard-wired to 1 on modern CPUs.
const X86_CR0_ET: u64 = 1 << 4;
/// EFLAGS bit 1 is reserved and always 1.
const X86_EFLAGS_FIXED: u64 = 1 << 1;
/// FPU control word after FNINIT (all exceptions masked, 64-bit precision).
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset (all SSE exceptions masked).
const MXCSR_DEFAULT: u32 = 0x1f80;

/// GDT selectors (index << 3).
const GDT_CODE_SELECTOR: u16 = 1 << 3;
const GDT_DATA_SELECTOR: u16 = 2 << 3;
const GDT_TSS_SELECTOR: u16 = 3 << 3;

/// Segment types (Intel SDM vol. 3, table 3-1 and 3-2).
const SEG_TYPE_CODE_EXEC_READ_ACCESSED: u8 = 0xb;
const SEG_TYPE_DATA_READ_WRITE_ACCESSED: u8 = 0x3;
const SEG_TYPE_TSS_32_BUSY: u8 = 0xb;

/// APIC register offsets (Intel SDM vol. 3, table 10-1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// LVT delivery modes (bits 10:8).
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Setting up vCPU registers failed.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing the GDT into guest memory failed
    #[error("Cannot write the boot GDT into guest memory")]
    Gdt(#[source] vm_memory::GuestMemoryError),
}

fn flat_segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Packs a segment into a GDT descriptor (Intel SDM vol. 3, figure 3-8).
fn gdt_entry(seg: &kvm_segment) -> u64 {
    let base = seg.base;
    let limit = u64::from(if seg.g == 1 {
        seg.limit >> 12
    } else {
        seg.limit
    });
    let flags = u64::from(seg.type_)
        | (u64::from(seg.s) << 4)
        | (u64::from(seg.dpl) << 5)
        | (u64::from(seg.present) << 7)
        | (u64::from(seg.avl) << 12)
        | (u64::from(seg.l) << 13)
        | (u64::from(seg.db) << 14)
        | (u64::from(seg.g) << 15);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (flags << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

/// Sets the PVH entry state on the boot vCPU.
pub fn setup_pvh_regs(vcpu: &VcpuFd, mem: &GuestMemory, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: X86_EFLAGS_FIXED,
        rip: entry,
        rbx: PVH_INFO_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("KVM_SET_REGS", e))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("KVM_GET_SREGS", e))?;
    let code = flat_segment(GDT_CODE_SELECTOR, SEG_TYPE_CODE_EXEC_READ_ACCESSED, 1);
    let data = flat_segment(GDT_DATA_SELECTOR, SEG_TYPE_DATA_READ_WRITE_ACCESSED, 1);
    let tss = kvm_segment {
        limit: 0x67,
        g: 0,
        db: 0,
        ..flat_segment(GDT_TSS_SELECTOR, SEG_TYPE_TSS_32_BUSY, 0)
    };
    let gdt = [0u64, gdt_entry(&code), gdt_entry(&data), gdt_entry(&tss)];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + (i as u64) * 8))
            .map_err(RegsError::Gdt)?;
    }
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("KVM_SET_SREGS", e))
}

/// Sets FNINIT-like FPU/SSE state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("KVM_SET_FPU", e))
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Wires LINT0 to ExtINT (the 8259 PIC) and LINT1 to NMI, as the MP table declares.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_known_encodings() {
        let code = flat_segment(GDT_CODE_SELECTOR, SEG_TYPE_CODE_EXEC_READ_ACCESSED, 1);
        assert_eq!(gdt_entry(&code), 0x00cf_9b00_0000_ffff);
        let data = flat_segment(GDT_DATA_SELECTOR, SEG_TYPE_DATA_READ_WRITE_ACCESSED, 1);
        assert_eq!(gdt_entry(&data), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn lvt_mode_is_set() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x7);
    }
}
