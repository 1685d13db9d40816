//! Where xtask keeps what it builds, and how it names it.
//!
//! Everything expensive (the guest kernel, the lab initramfs) lives under `$HUSK_CACHE`
//! (default `~/.cache/husk`) in a directory named by a [`CacheKey`]: a sha256 over every
//! input that can change the output. A second run with the same inputs finds the
//! directory and is instant; different inputs get a different directory, so a stale
//! artifact is never reused. Writers take [`lock`] and publish files with
//! [`write_atomically`], so concurrent xtask runs neither race nor see half a file.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// The environment variable that moves the cache.
pub const HUSK_CACHE_ENV: &str = "HUSK_CACHE";

/// The cache root: `$HUSK_CACHE`, else `$HOME/.cache/husk`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(HUSK_CACHE_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("Neither HUSK_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("husk"))
}

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    // xtask lives at <root>/xtask.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// A sha256 over labelled inputs. Each input is framed with its label and length, so
/// moving bytes from one input to the next changes the key.
#[derive(Debug, Clone, Default)]
pub struct CacheKey {
    hasher: Sha256,
}

impl CacheKey {
    /// A key for one kind of artifact; `recipe` names it and carries a version to bump
    /// when the way the artifact is built changes.
    pub fn new(recipe: &str) -> Self {
        let mut key = CacheKey::default();
        key.add("recipe", recipe.as_bytes());
        key
    }

    /// Adds one labelled input.
    pub fn add(&mut self, label: &str, bytes: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), bytes] {
            self.hasher.update((part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    /// The full hex digest.
    pub fn hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// A short prefix of the digest, used as a directory name.
    pub fn short(&self) -> String {
        self.hex()[..16].to_string()
    }
}

/// Holds an exclusive `flock` on `<dir>/.lock` until dropped.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

/// Takes the lock for `dir` (created if missing), waiting for other holders.
pub fn lock(dir: &Path) -> Result<DirLock> {
    fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = File::create(&path).with_context(|| format!("Cannot open {}", path.display()))?;
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .with_context(|| format!("Cannot lock {}", path.display()))?;
    Ok(DirLock { _lock: lock })
}

/// Writes `data` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("Path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(())
}

/// Copies `src` to `dst` through a temporary file and a rename.
pub fn copy_atomically(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let data = fs::read(src).with_context(|| format!("Cannot read {}", src.display()))?;
    let mode = fs::metadata(src)?.permissions().mode() & 0o7777;
    write_atomically(dst, &data, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable() {
        let mut a = CacheKey::new("kernel-v1");
        a.add("fragment", b"CONFIG_64BIT=y\n").add("gcc", b"12.2.0");
        let mut b = CacheKey::new("kernel-v1");
        b.add("fragment", b"CONFIG_64BIT=y\n").add("gcc", b"12.2.0");
        assert_eq!(a.hex(), b.hex());
        // Pinned: a change to the framing would silently rebuild every cache.
        assert_eq!(a.hex().len(), 64);
        assert_eq!(a.short(), a.hex()[..16]);
    }

    #[test]
    fn key_separates_inputs() {
        let mut a = CacheKey::new("r");
        a.add("x", b"ab").add("y", b"c");
        let mut b = CacheKey::new("r");
        b.add("x", b"a").add("y", b"bc");
        assert_ne!(a.hex(), b.hex());
        let mut c = CacheKey::new("r2");
        c.add("x", b"ab").add("y", b"c");
        assert_ne!(a.hex(), c.hex());
    }

    #[test]
    fn key_known_value() {
        // Guards against accidental changes of the framing (which would invalidate caches).
        let mut k = CacheKey::new("test");
        k.add("a", b"b");
        let again = {
            let mut h = Sha256::new();
            for part in [&b"recipe"[..], b"test", b"a", b"b"] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
            hex::encode(h.finalize())
        };
        assert_eq!(k.hex(), again);
    }

    #[test]
    fn atomic_write_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _guard = lock(dir.path()).unwrap();
        let path = dir.path().join("sub/file");
        write_atomically(&path, b"hello", 0o640).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello");
    }
}
