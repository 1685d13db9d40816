//! Reads the two facts xtask checks in the ELF files it ships: the PVH entry point of a
//! `vmlinux` (the `XEN_ELFNOTE_PHYS32_ENTRY` note) and whether `/init` is static.
//!
//! husk-vmm boots `vmlinux` through this 32-bit entry (no bzImage decompressor on the boot
//! path), so a kernel without the note is useless to us even though it builds fine. The
//! check runs after every kernel build; it reads the ELF program headers directly so it
//! does not depend on binutils output formats.

use anyhow::{bail, ensure, Context, Result};

/// `PT_INTERP` and `PT_NOTE` from `<elf.h>`.
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// The owner name of Xen notes, NUL-terminated (`include/xen/interface/elfnote.h`).
const XEN_NOTE_NAME: &[u8] = b"Xen\0";
/// `XEN_ELFNOTE_PHYS32_ENTRY` (`include/xen/interface/elfnote.h`): the PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `ELFCLASS64` / `ELFDATA2LSB` identification bytes.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;

fn u16_at(b: &[u8], off: usize) -> Result<u16> {
    let s = b.get(off..off + 2).context("ELF truncated")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    let s = b.get(off..off + 4).context("ELF truncated")?;
    Ok(u32::from_le_bytes(s.try_into()?))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64> {
    let s = b.get(off..off + 8).context("ELF truncated")?;
    Ok(u64::from_le_bytes(s.try_into()?))
}

/// The program headers of a 64-bit little-endian ELF image as `(p_type, file bytes)`.
fn segments(elf: &[u8]) -> Result<Vec<(u32, &[u8])>> {
    ensure!(elf.len() >= 64 && &elf[..4] == ELF_MAGIC, "Not an ELF file");
    ensure!(
        elf[4] == ELFCLASS64 && elf[5] == ELFDATA2LSB,
        "Not a 64-bit little-endian ELF"
    );
    let phoff = usize::try_from(u64_at(elf, 0x20)?)?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    (0..phnum)
        .map(|i| {
            let ph = phoff + i * phentsize;
            let start = usize::try_from(u64_at(elf, ph + 8)?)?;
            let size = usize::try_from(u64_at(elf, ph + 32)?)?;
            let bytes = elf
                .get(start..start + size)
                .context("Segment outside the file")?;
            Ok((u32_at(elf, ph)?, bytes))
        })
        .collect()
}

/// Returns the PVH entry address of the 64-bit little-endian ELF image `elf`.
pub fn pvh_entry(elf: &[u8]) -> Result<u64> {
    for (kind, notes) in segments(elf)? {
        if kind == PT_NOTE {
            if let Some(entry) = find_note(notes)? {
                return Ok(entry);
            }
        }
    }
    bail!("No XEN_ELFNOTE_PHYS32_ENTRY note: the kernel was built without CONFIG_PVH")
}

/// Whether `elf` runs without a dynamic loader (no `PT_INTERP`), as `/init` must.
pub fn is_static(elf: &[u8]) -> Result<bool> {
    Ok(segments(elf)?.iter().all(|(kind, _)| *kind != PT_INTERP))
}

fn find_note(mut notes: &[u8]) -> Result<Option<u64>> {
    while notes.len() >= 12 {
        let name_size = usize::try_from(u32_at(notes, 0)?)?;
        let desc_size = usize::try_from(u32_at(notes, 4)?)?;
        let kind = u32_at(notes, 8)?;
        let name_end = 12 + name_size.next_multiple_of(4);
        let desc_end = name_end + desc_size.next_multiple_of(4);
        ensure!(desc_end <= notes.len(), "ELF note truncated");
        let name = &notes[12..12 + name_size];
        if name == XEN_NOTE_NAME && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            let desc = &notes[name_end..name_end + desc_size];
            return Ok(Some(match desc_size {
                4 => u64::from(u32_at(desc, 0)?),
                8 => u64_at(desc, 0)?,
                _ => bail!("PHYS32_ENTRY note has {desc_size} bytes"),
            }));
        }
        notes = &notes[desc_end..];
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    /// A 64-bit ELF with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = ELFCLASS64;
        elf[5] = ELFDATA2LSB;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        elf[72..80].copy_from_slice(&120u64.to_le_bytes());
        elf[96..104].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(notes);
        elf
    }

    #[test]
    fn finds_entry_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 5, b"xen-3.0\0"));
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0abcu32.to_le_bytes(),
        ));
        assert_eq!(pvh_entry(&elf_with_notes(&notes)).unwrap(), 0x0100_0abc);
    }

    #[test]
    fn missing_note_is_an_error() {
        let notes = note(b"GNU\0", 3, &[0; 4]);
        let err = pvh_entry(&elf_with_notes(&notes)).unwrap_err();
        assert!(err.to_string().contains("CONFIG_PVH"));
        assert!(is_static(&elf_with_notes(&notes)).unwrap());
        assert!(pvh_entry(b"not an elf at all, just some bytes that are long enough....").is_err());
    }
}
