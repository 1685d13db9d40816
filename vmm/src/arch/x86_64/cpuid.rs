//! CPUID for each vCPU: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), adjusted for this VM.
//!
//! Per the Intel SDM vol. 2A (CPUID) and the AMD APM vol. 3 (E.4), we set:
//! * leaf 0x1: initial APIC id (EBX[31:24]), logical processor count (EBX[23:16]) and HTT, and the
//!   hypervisor-present bit (ECX[31]) so the kernel looks for the KVM leaves 0x4000_0000+;
//! * leaf 0x4: cores per package (EAX[31:26]) matching the vCPU count, one thread per core;
//! * leaf 0xb / 0x1f: extended topology, one thread per core, all vCPUs in one package, x2APIC
//!   id in EDX;
//! * leaf 0xa: no architectural PMU (we expose no performance counters);
//! * leaf 0x8000_0008: AMD core count (ECX[7:0]).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 0x1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 EDX bit 28: HTT (EBX[23:16] is valid).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x1 EBX: initial APIC id shift.
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
/// Leaf 0x1 EBX: logical processor count shift.
const LEAF1_EBX_CPU_COUNT_SHIFT: u32 = 16;
/// Leaf 0x4 EAX: cores-per-package-minus-one shift.
const LEAF4_EAX_CORES_SHIFT: u32 = 26;
/// Leaf 0xb ECX level type: SMT.
const LEVEL_TYPE_SMT: u32 = 1;
/// Leaf 0xb ECX level type: core.
const LEVEL_TYPE_CORE: u32 = 2;
/// Leaf 0xb ECX level type shift.
const LEVEL_TYPE_SHIFT: u32 = 8;

/// Returns the CPUID table for vCPU `cpu_id` of `vcpu_count` from KVM's supported table.
pub fn filter_cpuid(supported: &CpuId, cpu_id: u8, vcpu_count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice().iter_mut() {
        adjust_entry(entry, cpu_id, vcpu_count);
    }
    cpuid
}

/// Number of bits needed to hold ids `0..count` (ceil(log2(count))).
fn id_bits(count: u8) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (u32::from(count) - 1).leading_zeros()
    }
}

fn adjust_entry(entry: &mut kvm_cpuid_entry2, cpu_id: u8, vcpu_count: u8) {
    let cpu_id = u32::from(cpu_id);
    let count = u32::from(vcpu_count);
    match entry.function {
        0x1 => {
            entry.ebx &= 0x0000_ffff;
            entry.ebx |= cpu_id << LEAF1_EBX_APIC_ID_SHIFT;
            entry.ebx |= count << LEAF1_EBX_CPU_COUNT_SHIFT;
            entry.ecx |= LEAF1_ECX_HYPERVISOR;
            if vcpu_count > 1 {
                entry.edx |= LEAF1_EDX_HTT;
            } else {
                entry.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // Keep the cache description, replace the core count; one thread shares each cache
            // level below the package (EAX[25:14] = 0), the LLC is shared by all.
            entry.eax &= (1 << LEAF4_EAX_CORES_SHIFT) - 1;
            entry.eax |= (count - 1) << LEAF4_EAX_CORES_SHIFT;
        }
        0xa => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0xb | 0x1f => {
            entry.edx = cpu_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (LEVEL_TYPE_SMT << LEVEL_TYPE_SHIFT) | entry.index;
                }
                1 => {
                    entry.eax = id_bits(vcpu_count);
                    entry.ebx = count;
                    entry.ecx = (LEVEL_TYPE_CORE << LEVEL_TYPE_SHIFT) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        0x8000_0008 => {
            entry.ecx &= !0xff;
            entry.ecx |= count - 1;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff12_3456,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_ids_and_hypervisor_bit() {
        let c = filter_cpuid(&table(), 3, 4);
        let leaf1 = c.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x3456);
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
        let leafb = c.as_slice()[1];
        assert_eq!(leafb.edx, 3);
        assert_eq!(leafb.ebx, 4);
        assert_eq!(leafb.eax, 2);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(32), 5);
    }
}
