//! The lab QEMU's human monitor (HMP), used only to tell what a silent L1 is doing: its
//! vCPUs' instruction pointers, privilege levels and halt states, with kernel addresses
//! named from the L1 kernel's `/proc/kallsyms`, saved once per kernel (the lab boots it with
//! `nokaslr`, so the addresses stay valid).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// The HMP prompt that ends every answer.
const PROMPT: &str = "(qemu) ";
/// Limit of one monitor exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One vCPU as `info registers -a` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuState {
    /// QEMU's CPU index.
    pub index: u32,
    /// RIP.
    pub rip: u64,
    /// Current privilege level (0 = kernel, 3 = user).
    pub cpl: u8,
    /// Halted (idle, waiting for an interrupt).
    pub halted: bool,
    /// Interrupt vectors pending in its local APIC. A halted vCPU with pending vectors and
    /// interrupts enabled is one the emulator no longer wakes (seen: both L1 vCPUs so, an
    /// NMI from the monitor ignored too, as if SVM's global interrupt flag stayed clear).
    pub irr: Vec<u8>,
    /// The SVM state that gates interrupts (`GIF=… VGIF=… GM=… INT_CTL=… IRQ_REQ=…`), which
    /// only the lab's patched QEMU prints (`HUSK_LAB_QEMU=patched`, [`super::emulator`]).
    pub svm: Option<String>,
}

/// Every vCPU halted and at least one with vectors pending: an L1 the emulator no longer wakes,
/// when it lasts (a halted vCPU takes a pending vector at once: in the idle loop nothing masks
/// it).
pub fn asleep_with_interrupts_pending(states: &[CpuState]) -> bool {
    !states.is_empty()
        && states.iter().all(|s| s.halted)
        && states.iter().any(|s| !s.irr.is_empty())
}

/// Runs `info registers -a` and `info lapic N` on the monitor socket and returns every
/// vCPU's state.
pub fn cpu_states(socket: &Path) -> Result<Vec<CpuState>> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("Cannot connect to the lab monitor {}", socket.display()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    read_to_prompt(&mut reader).context("No monitor banner")?;
    (&stream).write_all(b"info registers -a\n")?;
    let text = read_to_prompt(&mut reader).context("No answer to info registers")?;
    let mut states = parse_registers(&text);
    for s in &mut states {
        (&stream).write_all(format!("info lapic {}\n", s.index).as_bytes())?;
        let text = read_to_prompt(&mut reader).context("No answer to info lapic")?;
        s.irr = parse_irr(&text);
    }
    Ok(states)
}

/// The vectors of the `IRR` line of `info lapic` (requested, not yet delivered).
pub fn parse_irr(text: &str) -> Vec<u8> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("IRR"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn read_to_prompt(reader: &mut impl BufRead) -> Result<String> {
    let mut text = String::new();
    let mut byte = [0u8; 1];
    while !text.ends_with(PROMPT) {
        if reader.read(&mut byte)? == 0 {
            anyhow::bail!("the monitor closed the connection");
        }
        text.push(char::from(byte[0]));
    }
    Ok(text)
}

/// Parses `info registers -a`: a `CPU#n` line starts each vCPU, and its `RIP=… CPL=n …
/// HLT=n` line gives the state (and the patched QEMU's `SVM …` line after it, its SVM state).
pub fn parse_registers(text: &str) -> Vec<CpuState> {
    let mut out: Vec<CpuState> = Vec::new();
    let mut index = 0;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("SVM ") {
            if let Some(last) = out.last_mut().filter(|s| s.index == index) {
                last.svm = Some(rest.to_owned());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("CPU#") {
            index = rest
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or(index);
            continue;
        }
        if !line.starts_with("RIP=") {
            continue;
        }
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_owned)
        };
        let Some(rip) = field("RIP=").and_then(|v| u64::from_str_radix(&v, 16).ok()) else {
            continue;
        };
        out.push(CpuState {
            index,
            rip,
            cpl: field("CPL=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(u8::MAX),
            halted: field("HLT=").is_some_and(|v| v == "1"),
            irr: Vec::new(),
            svm: None,
        });
    }
    out
}

/// Kernel text symbols (`/proc/kallsyms` or `System.map` format), sorted by address.
#[derive(Debug, Default)]
pub struct SymbolMap(Vec<(u64, String)>);

impl SymbolMap {
    /// Reads `address type name [module]` lines; keeps text symbols.
    pub fn parse(text: &str) -> Self {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_owned()))
            })
            .collect();
        syms.sort();
        Self(syms)
    }

    /// Loads `path`; an unreadable map gives an empty one (addresses stay unnamed).
    pub fn load(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// `symbol+0xoff` for a kernel address, if a symbol precedes it.
    pub fn name(&self, addr: u64) -> Option<String> {
        let i = self.0.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (base, name) = &self.0[i];
        Some(format!("{name}+{:#x}", addr - base))
    }
}

/// One line per vCPU: where it is and in which mode.
pub fn describe(states: &[CpuState], map: &SymbolMap) -> String {
    states
        .iter()
        .map(|s| {
            let mode = match (s.halted, s.cpl) {
                (true, _) => "halted".to_owned(),
                (false, 0) => "kernel".to_owned(),
                (false, 3) => "user".to_owned(),
                (false, n) => format!("CPL {n}"),
            };
            let name = if s.cpl == 0 { map.name(s.rip) } else { None };
            let irr = if s.irr.is_empty() {
                String::new()
            } else {
                let v: Vec<String> = s.irr.iter().map(u8::to_string).collect();
                format!(", IRR pending {}", v.join(" "))
            };
            let svm = s
                .svm
                .as_ref()
                .map(|v| format!(", SVM {v}"))
                .unwrap_or_default();
            format!(
                "L1 vCPU {}: {mode} RIP={:#x}{}{irr}{svm}",
                s.index,
                s.rip,
                name.map(|n| format!(" ({n})")).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "info registers -a\r\n\r\nCPU#0\r\n\
RAX=0000000000000000 RBX=ffffffff82613940 RCX=0000000000000001 RDX=0000000000000000\r\n\
RIP=ffffffff81a2c7ce RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\
\r\nCPU#1\r\n\
RIP=00007f12d4a1b2c3 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0\r\n(qemu) ";

    const LAPIC: &str = "dumping local APIC state for CPU 0 \r\n\
ISR\t (none)\r\nIRR\t 236 251 253 \r\nAPR 0x00 TPR 0x10 DFR 0x0f LDR 0x01 PPR 0x10\r\n(qemu) ";

    #[test]
    fn asleep_with_interrupts_pending_needs_every_vcpu_halted_and_a_vector() {
        let cpu = |index, halted, irr: &[u8]| CpuState {
            index,
            rip: 0xffff_ffff_81a5_92eb,
            cpl: 0,
            halted,
            irr: irr.to_vec(),
            svm: None,
        };
        assert!(asleep_with_interrupts_pending(&[cpu(0, true, &[236])]));
        assert!(asleep_with_interrupts_pending(&[
            cpu(0, true, &[236, 251]),
            cpu(1, true, &[])
        ]));
        // Idle with nothing pending is just idle; a running vCPU is not asleep.
        assert!(!asleep_with_interrupts_pending(&[cpu(0, true, &[])]));
        assert!(!asleep_with_interrupts_pending(&[
            cpu(0, true, &[236]),
            cpu(1, false, &[])
        ]));
        assert!(!asleep_with_interrupts_pending(&[]));
    }

    #[test]
    fn parses_every_cpu() {
        let s = parse_registers(SAMPLE);
        assert_eq!(
            s,
            vec![
                CpuState {
                    index: 0,
                    rip: 0xffffffff81a2c7ce,
                    cpl: 0,
                    halted: true,
                    irr: vec![],
                    svm: None,
                },
                CpuState {
                    index: 1,
                    rip: 0x7f12d4a1b2c3,
                    cpl: 3,
                    halted: false,
                    irr: vec![],
                    svm: None,
                },
            ]
        );
    }

    #[test]
    fn names_kernel_addresses() {
        let map = SymbolMap::parse(
            "ffffffff81000000 T _stext\nffffffff81a2c7c0 T default_idle\n\
             ffffffff81a2c800 t later\nffffffff82000000 D some_data\n",
        );
        assert_eq!(
            map.name(0xffffffff81a2c7ce).as_deref(),
            Some("default_idle+0xe")
        );
        assert_eq!(map.name(0x1000), None);
        let mut states = parse_registers(SAMPLE);
        states[0].irr = parse_irr(LAPIC);
        let text = describe(&states, &map);
        assert_eq!(
            text,
            "L1 vCPU 0: halted RIP=0xffffffff81a2c7ce (default_idle+0xe), IRR pending 236 251 253; \
             L1 vCPU 1: user RIP=0x7f12d4a1b2c3"
        );
        assert!(parse_irr("ISR\t (none)\r\nIRR\t (none)\r\n").is_empty());
    }

    #[test]
    fn the_patched_qemus_svm_line_belongs_to_its_cpu() {
        let patched = "info registers -a\r\n\r\nCPU#0\r\n\
RIP=ffffffff81a2c7ce RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\
SVM GIF=0 VGIF=0 GM=0 INT_CTL=00000000 IRQ_REQ=00000002\r\n\
ES =0000 0000000000000000 ffffffff 00c00000\r\n\
\r\nCPU#1\r\n\
RIP=00007f12d4a1b2c3 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0\r\n(qemu) ";
        let states = parse_registers(patched);
        assert_eq!(
            states[0].svm.as_deref(),
            Some("GIF=0 VGIF=0 GM=0 INT_CTL=00000000 IRQ_REQ=00000002")
        );
        assert_eq!(states[1].svm, None);
        let text = describe(&states, &SymbolMap::default());
        assert!(
            text.starts_with(
                "L1 vCPU 0: halted RIP=0xffffffff81a2c7ce, SVM GIF=0 VGIF=0 GM=0 \
                 INT_CTL=00000000 IRQ_REQ=00000002; "
            ),
            "{text}"
        );
    }
}
