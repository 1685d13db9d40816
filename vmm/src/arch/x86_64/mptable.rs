//! Intel MultiProcessor Specification 1.4 table, so a guest without ACPI finds its CPUs and IOAPIC.
//!
//! Linux scans the first KiB of the EBDA (0x9fc00) for the floating pointer `_MP_`
//! (arch/x86/kernel/mpparse.c), which points at the configuration table `PCMP` that follows it.
//! Entries: one processor per vCPU (APIC id = vCPU index), an ISA bus, the IOAPIC, one I/O
//! interrupt per IOAPIC pin (ISA IRQ n → pin n, edge/high as ISA defaults), and LINT0 = ExtINT,
//! LINT1 = NMI. Field layouts from the MP spec, chapter 4 (and linux `asm/mpspec_def.h`).

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_START, IRQ_MAX};
use crate::memory::GuestMemory;

/// MP spec revision 1.4.
const MPC_SPEC: u8 = 4;
/// Local APIC version reported for each CPU (integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version (82093AA).
const IOAPIC_VERSION: u8 = 0x11;
/// Entry types (MP spec table 4-3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Processor flags: enabled, bootstrap processor.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Interrupt types (MP spec table 4-10).
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// IOAPIC flag: usable.
const MPC_APIC_USABLE: u8 = 1;
/// CPU signature / feature flags reported in processor entries (family 6, FPU + APIC present).
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const CPU_FEATURE_FPU: u32 = 1 << 0;
/// Size of the floating pointer structure (16 bytes, length field counts 16-byte units).
const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
const MPC_HEADER_SIZE: usize = 44;
/// Bus id of the ISA bus.
const ISA_BUS_ID: u8 = 0;

/// Writing the MP table failed.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many CPUs for the space below 640 KiB
    #[error("MP table for {0} vCPUs does not fit in the EBDA")]
    TooLarge(u8),
    /// Guest memory write failed
    #[error("Cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer + configuration table as placed at `base`.
pub fn build_mptable(base: u64, num_cpus: u8) -> Vec<u8> {
    let table_addr = base + MPF_SIZE as u64;
    let ioapic_id = num_cpus; // first APIC id after the CPUs
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // type, irqtype, irqflag (u16, 0 = conforming to the bus), srcbus, srcbusirq, dstapic, dstirq
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0: ExtINT to the BSP; LINT1: NMI to all local APICs (dstapic 0xff).
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, ISA_BUS_ID, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(MPC_HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((MPC_HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    header.push(MPC_SPEC);
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"HUSK    "); // oem[8]
    header.extend_from_slice(b"husk-vmm    "); // productid[12]
    header.extend_from_slice(&0u32.to_le_bytes()); // oemptr
    header.extend_from_slice(&0u16.to_le_bytes()); // oemsize
    header.extend_from_slice(&count.to_le_bytes()); // oemcount (entry count)
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes()); // lapic
    header.extend_from_slice(&0u32.to_le_bytes()); // reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MPC_SPEC);
    mpf.push(0); // checksum
    mpf.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = configuration table present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    mpf
}

/// Writes the MP table for `num_cpus` vCPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemory, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build_mptable(EBDA_START, num_cpus);
    if EBDA_START + bytes.len() as u64 > EBDA_END {
        return Err(MptableError::TooLarge(num_cpus));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero() {
        let t = build_mptable(EBDA_START, 4);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(checksum(&t[..MPF_SIZE]), 0);
        let table = &t[MPF_SIZE..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(checksum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count as usize, 4 + 1 + 1 + (IRQ_MAX as usize + 1) + 2);
        let ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64;
        assert_eq!(ptr, EBDA_START + MPF_SIZE as u64);
    }

    #[test]
    fn max_cpus_fit_in_ebda() {
        let t = build_mptable(EBDA_START, crate::config::MAX_VCPUS);
        assert!(EBDA_START + t.len() as u64 <= EBDA_END);
    }
}
