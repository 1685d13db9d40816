//! A private apt configuration under the husk cache, for what the lab fetches from Debian
//! beyond the machine's installed packages: bookworm-backports' binaries (`backports`) and
//! the QEMU source package the lab's emulator is built from (`emulator`).
//!
//! It has its own sources list, package lists and archive directory, so the machine's apt
//! sources and installed packages stay as they are. apt still checks the archive's
//! signatures (the Debian keyring) and every downloaded file's hash.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::info;

use crate::cache;

/// Package lists younger than this are not fetched again.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// One private apt configuration: `<husk cache>/lab/<name>/`.
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// The configuration named `name` with this `sources.list`; fetches its package lists
    /// unless they are fresh.
    pub fn new(name: &str, sources: &str) -> Result<Self> {
        let dir = cache::cache_dir()?.join("lab").join(name);
        for sub in ["lists/partial", "archives/partial", "debs"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let list = dir.join("sources.list");
        let changed = fs::read_to_string(&list).ok().as_deref() != Some(sources);
        if changed {
            fs::write(&list, sources)?;
        }
        let apt = Apt { dir };
        if changed || !apt.lists_fresh()? {
            info!(
                "lab: fetching the package lists of {} into {}",
                sources.lines().collect::<Vec<_>>().join("; "),
                apt.dir.display()
            );
            apt.output("apt-get", &["update"])?;
        }
        Ok(apt)
    }

    /// The configuration's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where downloads land (`apt-get download` and `apt-get source` write to the cwd).
    pub fn downloads(&self) -> PathBuf {
        self.dir.join("debs")
    }

    /// True when some package or source list is younger than [`LISTS_MAX_AGE`] (apt keeps
    /// them compressed, `…_Packages.lz4`, `…_Sources.lz4`).
    fn lists_fresh(&self) -> Result<bool> {
        Ok(fs::read_dir(self.dir.join("lists"))?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.contains("_Packages") || name.contains("_Sources")
            })
            .any(|e| {
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age < LISTS_MAX_AGE)
            }))
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            "-oDir::Etc::SourceParts=/dev/null".into(),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}"),
            format!("-oDir::Cache::Archives={d}/archives"),
            // The downloads land in a root-owned cache directory.
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    /// Runs an apt program (`apt-get`, `apt-cache`) with this configuration in the
    /// download directory and returns its stdout.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = Command::new(program)
            .args(self.options())
            .args(args)
            .current_dir(self.downloads())
            .output()
            .with_context(|| format!("Cannot run {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
