//! Model-specific registers set on every vCPU before it runs.
//!
//! Indices from linux `arch/x86/include/asm/msr-index.h`. The values are what a freshly reset CPU
//! (or a BIOS) leaves behind; the kernel programs them itself during boot.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// `MSR_IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `MSR_IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `MSR_IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `MSR_STAR`: legacy mode SYSCALL target.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `MSR_LSTAR`: long mode SYSCALL target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `MSR_CSTAR`: compat mode SYSCALL target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `MSR_SYSCALL_MASK`: EFLAGS mask for syscall.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `MSR_KERNEL_GS_BASE`: SwapGS GS shadow.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// `MSR_IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `MSR_IA32_MISC_ENABLE_FAST_STRING` (bit 0).
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// `MSR_MTRRdefType`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRdefType: MTRRs enabled (bit 11) with default type write-back (6).
pub const MTRR_ENABLE_WB_DEFAULT: u64 = (1 << 11) | 6;

/// Setting MSRs failed.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// Building the MSR list failed
    #[error("Cannot build the MSR list")]
    Build(#[source] vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed
    #[error("KVM_SET_MSRS failed")]
    Set(#[source] kvm_ioctls::Error),
    /// KVM accepted fewer MSRs than given
    #[error("KVM_SET_MSRS set only {0} of {1} MSRs")]
    Partial(usize, usize),
}

/// The boot MSR values.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB_DEFAULT),
    ]
}

/// Writes the boot MSRs into `vcpu`.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial(set, entries.len()));
    }
    Ok(())
}
