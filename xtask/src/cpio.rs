//! A writer for the "new ASCII" (newc, magic `070701`) cpio format that the Linux
//! kernel unpacks as an initramfs (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Both initramfs images husk builds (the guest's and the lab's) are written here, from
//! bytes in memory, so nothing of the host leaks into an image by accident: every entry
//! is owned by root, has mtime 0 and a sequential inode number, which makes the output a
//! pure function of its entries (and therefore cacheable by content).

use std::io::{self, Write};

/// The newc header magic.
const MAGIC_NEWC: &[u8; 6] = b"070701";
/// The name of the entry that ends an archive.
const TRAILER_NAME: &str = "TRAILER!!!";
/// Headers, names and file data are each padded to this alignment.
const ALIGN: usize = 4;

/// File-type bits of `st_mode` (`<sys/stat.h>`).
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Path in the archive.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file with its content.
    File {
        /// Path in the archive.
        path: String,
        /// Permission bits.
        mode: u32,
        /// The content.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Path in the archive.
        path: String,
        /// Where the link points.
        target: String,
    },
    /// A character device node.
    CharDev {
        /// Path in the archive.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

impl Entry {
    /// A directory entry.
    pub fn dir(path: &str, mode: u32) -> Self {
        Entry::Dir {
            path: path.into(),
            mode,
        }
    }

    /// A regular file entry.
    pub fn file(path: &str, mode: u32, data: Vec<u8>) -> Self {
        Entry::File {
            path: path.into(),
            mode,
            data,
        }
    }

    /// A symbolic link entry.
    pub fn symlink(path: &str, target: &str) -> Self {
        Entry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }

    /// A character device entry.
    pub fn char_dev(path: &str, mode: u32, major: u32, minor: u32) -> Self {
        Entry::CharDev {
            path: path.into(),
            mode,
            major,
            minor,
        }
    }

    fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::CharDev { path, .. } => path,
        }
    }
}

/// Writes `entries`, then the trailer, as one newc archive.
///
/// Paths are stored relative (a leading `/` is dropped), which is what the kernel and
/// `cpio -i` expect. Parent directories must come before their children.
pub fn write_archive<W: Write>(out: &mut W, entries: &[Entry]) -> io::Result<()> {
    let mut w = PaddedWriter {
        inner: out,
        written: 0,
    };
    for (index, entry) in entries.iter().enumerate() {
        // Inode 0 is avoided: some unpackers treat it as "no inode".
        let ino = u32::try_from(index + 1).map_err(|_| invalid("too many entries"))?;
        let name = entry.path().trim_start_matches('/');
        if name.is_empty() {
            return Err(invalid("empty path in cpio entry"));
        }
        let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir { mode, .. } => (S_IFDIR | (mode & 0o7777), 2, &[], (0, 0)),
            Entry::File { mode, data, .. } => (S_IFREG | (mode & 0o7777), 1, data, (0, 0)),
            Entry::Symlink { target, .. } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
            Entry::CharDev {
                mode, major, minor, ..
            } => (S_IFCHR | (mode & 0o7777), 1, &[], (*major, *minor)),
        };
        write_member(&mut w, ino, mode, nlink, rdev, name, data)?;
    }
    write_member(&mut w, 0, 0, 1, (0, 0), TRAILER_NAME, &[])?;
    w.inner.flush()
}

/// Builds a whole archive in memory.
pub fn archive_bytes(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    write_archive(&mut buf, entries)?;
    Ok(buf)
}

fn write_member<W: Write>(
    w: &mut PaddedWriter<W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rdev_major, rdev_minor): (u32, u32),
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let file_size = u32::try_from(data.len()).map_err(|_| invalid("cpio member over 4 GiB"))?;
    let name_size = u32::try_from(name.len() + 1).map_err(|_| invalid("cpio name too long"))?;
    // Fields in order: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check.
    let fields = [
        ino, mode, 0, 0, nlink, 0, file_size, 0, 0, rdev_major, rdev_minor, name_size, 0,
    ];
    w.write_all(MAGIC_NEWC)?;
    for field in fields {
        write!(w, "{field:08x}")?;
    }
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.pad()?;
    w.write_all(data)?;
    w.pad()
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

/// Counts bytes so members can be padded to [`ALIGN`] relative to the archive start.
struct PaddedWriter<'a, W: Write> {
    inner: &'a mut W,
    written: usize,
}

impl<W: Write> PaddedWriter<'_, W> {
    fn pad(&mut self) -> io::Result<()> {
        let rem = self.written % ALIGN;
        if rem != 0 {
            self.write_all(&[0u8; ALIGN][..ALIGN - rem])?;
        }
        Ok(())
    }
}

impl<W: Write> Write for PaddedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<Entry> {
        vec![
            Entry::dir("/dev", 0o755),
            Entry::char_dev("/dev/console", 0o600, 5, 1),
            Entry::dir("tmp", 0o1777),
            Entry::file("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec()),
            Entry::symlink("/bin", "usr/bin"),
        ]
    }

    /// A minimal newc reader, enough to check what the writer produced.
    fn parse(mut buf: &[u8]) -> Vec<(String, u32, u32, Vec<u8>)> {
        let start_len = buf.len();
        let mut out = Vec::new();
        loop {
            assert_eq!(&buf[..6], MAGIC_NEWC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, rdev_minor, name_size) = (field(1), field(6), field(10), field(11));
            let name_end = 110 + name_size as usize;
            let name = std::str::from_utf8(&buf[110..name_end - 1])
                .unwrap()
                .to_string();
            let data_start = name_end.next_multiple_of(ALIGN);
            let data = buf[data_start..data_start + size as usize].to_vec();
            let next = (data_start + size as usize).next_multiple_of(ALIGN);
            buf = &buf[next..];
            assert_eq!((start_len - buf.len()) % ALIGN, 0);
            if name == TRAILER_NAME {
                assert!(buf.is_empty());
                return out;
            }
            out.push((name, mode, rdev_minor, data));
        }
    }

    #[test]
    fn round_trip_through_own_reader() {
        let bytes = archive_bytes(&sample()).unwrap();
        let members = parse(&bytes);
        let names: Vec<_> = members.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "tmp", "init", "bin"]);
        assert_eq!(members[1].1, S_IFCHR | 0o600);
        assert_eq!(members[1].2, 1);
        assert_eq!(members[2].1, S_IFDIR | 0o1777);
        assert_eq!(members[3].1, S_IFREG | 0o755);
        assert_eq!(members[3].3, b"#!/bin/sh\necho hi\n");
        assert_eq!(members[4].3, b"usr/bin");
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(
            archive_bytes(&sample()).unwrap(),
            archive_bytes(&sample()).unwrap()
        );
    }

    #[test]
    fn rejects_empty_path() {
        assert!(archive_bytes(&[Entry::dir("/", 0o755)]).is_err());
    }

    /// GNU cpio (installed by `cargo xtask setup`) lists what we wrote.
    #[test]
    fn gnu_cpio_lists_the_archive() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; run `cargo xtask setup`");
            return;
        }
        let bytes = archive_bytes(&sample()).unwrap();
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<_> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("crw-------") && lines[1].contains("5,"),
            "{listing}"
        );
        assert!(lines[2].starts_with("drwxrwxrwt"), "{listing}");
        assert!(
            lines[3].starts_with("-rwxr-xr-x") && lines[3].ends_with(" init"),
            "{listing}"
        );
        assert!(lines[4].starts_with("lrwxrwxrwx") && lines[4].ends_with("bin -> usr/bin"));
    }
}
