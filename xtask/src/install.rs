//! `cargo xtask install`: puts husk on this machine so containerd can run pods with it.
//!
//! Builds (release) and installs `husk-vmm` and `containerd-shim-husk-v2` into `<prefix>/bin`
//! (containerd finds a shim by its name on its `PATH`), virtiofsd into
//! `<prefix>/libexec/husk/`, the guest kernel and initramfs into `<prefix>/share/husk/`, and the
//! runtime config `<sysconfdir>/husk/husk.toml` from `configs/husk.toml` with the paths of this
//! installation (an existing config is kept unless `--force`). Files are replaced through a
//! rename, so a running shim or VMM keeps its old binary.
//!
//! Last, it prints the containerd runtime stanza for `io.containerd.husk.v2` (handler `husk`,
//! what a Kubernetes RuntimeClass names), or merges it into the config.toml named by
//! `--containerd-config`. The merge only appends: the file is parsed before and after, the
//! result must equal the old configuration plus exactly our stanza, and a config that already
//! has a different husk stanza is refused, never edited.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::{cache, guest, setup, test};

/// The runtime type containerd resolves to the binary `containerd-shim-husk-v2`.
pub const RUNTIME_TYPE: &str = "io.containerd.husk.v2";
/// The CRI runtime handler name (`RuntimeClass.handler`).
pub const HANDLER: &str = "husk";
/// The shim binary.
const SHIM_BINARY: &str = "containerd-shim-husk-v2";
/// The VMM binary.
const VMM_BINARY: &str = "husk-vmm";

/// Arguments of `cargo xtask install`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Installation prefix: binaries in PREFIX/bin, virtiofsd in PREFIX/libexec/husk, the
    /// guest in PREFIX/share/husk.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Where `husk/husk.toml` goes.
    #[arg(long, default_value = "/etc")]
    pub sysconfdir: PathBuf,
    /// Overwrite an existing husk.toml.
    #[arg(long)]
    pub force: bool,
    /// Merge the runtime stanza into this containerd config.toml (created if missing)
    /// instead of printing it.
    #[arg(long, value_name = "PATH")]
    pub containerd_config: Option<PathBuf>,
}

/// Where each installed file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `husk-vmm`.
    pub vmm: PathBuf,
    /// `containerd-shim-husk-v2`.
    pub shim: PathBuf,
    /// `virtiofsd`.
    pub virtiofsd: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs.
    pub initrd: PathBuf,
    /// `husk.toml`.
    pub config: PathBuf,
}

impl Layout {
    /// The layout under `prefix` and `sysconfdir`.
    pub fn new(prefix: &Path, sysconfdir: &Path) -> Layout {
        Layout {
            vmm: prefix.join("bin").join(VMM_BINARY),
            shim: prefix.join("bin").join(SHIM_BINARY),
            virtiofsd: prefix.join("libexec/husk/virtiofsd"),
            kernel: prefix.join("share/husk/vmlinux"),
            initrd: prefix.join("share/husk/initramfs.cpio"),
            config: sysconfdir.join("husk/husk.toml"),
        }
    }
}

/// The `install` subcommand.
pub fn run(args: &Args) -> Result<()> {
    setup::ensure()?;
    let root = cache::workspace_root();
    let layout = Layout::new(&args.prefix, &args.sysconfdir);
    test::step("build husk-vmm and the shim (release)", || {
        test::cargo(
            &root,
            &[
                "build",
                "--release",
                "-p",
                "husk-vmm",
                "-p",
                "husk-shim",
                "--bin",
                VMM_BINARY,
                "--bin",
                SHIM_BINARY,
            ],
        )
    })?;
    let g = test::step("build the guest", guest::build)?;
    let release = cache::target_dir().join("release");
    let copies = [
        (release.join(VMM_BINARY), &layout.vmm),
        (release.join(SHIM_BINARY), &layout.shim),
        (setup::virtiofsd_path()?, &layout.virtiofsd),
        (g.vmlinux, &layout.kernel),
        (g.initramfs, &layout.initrd),
    ];
    for (src, dst) in copies {
        install_file(&src, dst)?;
        println!("installed {}", dst.display());
    }

    let template_path = root.join("configs/husk.toml");
    let template = fs::read_to_string(&template_path)
        .with_context(|| format!("Cannot read {}", template_path.display()))?;
    if layout.config.exists() && !args.force {
        println!(
            "kept the existing {} (--force replaces it with the template)",
            layout.config.display()
        );
    } else {
        let text = config_for(&template, &layout)?;
        cache::write_atomically(&layout.config, text.as_bytes(), 0o644)
            .with_context(|| format!("Cannot write {}", layout.config.display()))?;
        println!("installed {}", layout.config.display());
    }

    match &args.containerd_config {
        None => {
            println!(
                "\nAdd this to containerd's config.toml (version 2) and restart containerd, or \
                 rerun with --containerd-config PATH:\n"
            );
            print!("{}", stanza(2, &layout.config)?);
        }
        Some(path) => {
            let old = match fs::read_to_string(path) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("Cannot read {}", path.display())),
            };
            match merge(old.as_deref(), &layout.config)
                .with_context(|| format!("Not changing {}", path.display()))?
            {
                Merged::AlreadyPresent => {
                    println!("{} already has the husk runtime; unchanged", path.display());
                }
                Merged::Updated(text) => {
                    if let Some(old) = &old {
                        let backup = path.with_extension("toml.before-husk");
                        fs::write(&backup, old)
                            .with_context(|| format!("Cannot write {}", backup.display()))?;
                        println!("saved the previous config as {}", backup.display());
                    }
                    cache::write_atomically(path, text.as_bytes(), 0o644)?;
                    println!(
                        "added runtime {HANDLER} ({RUNTIME_TYPE}) to {}; restart containerd",
                        path.display()
                    );
                }
            }
        }
    }
    Ok(())
}

/// Copies `src` to `dst` (parents created) through a rename, keeping the mode.
fn install_file(src: &Path, dst: &Path) -> Result<()> {
    if !src.is_file() {
        bail!("{} was not built", src.display());
    }
    cache::copy_atomically(src, dst).with_context(|| {
        format!(
            "Cannot install {} (run as root, or choose --prefix/--sysconfdir)",
            dst.display()
        )
    })
}

/// The template with the four paths of this installation (`kernel`, `initrd`, `vmm_path`,
/// `virtiofsd_path`) put in; every comment and other key stays as it is.
pub fn config_for(template: &str, layout: &Layout) -> Result<String> {
    let paths = [
        ("kernel", &layout.kernel),
        ("initrd", &layout.initrd),
        ("vmm_path", &layout.vmm),
        ("virtiofsd_path", &layout.virtiofsd),
    ];
    let mut seen = vec![false; paths.len()];
    let mut out = String::with_capacity(template.len());
    for line in template.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        match paths.iter().position(|(k, _)| *k == key) {
            Some(i) if !line.trim_start().starts_with('#') && line.contains('=') => {
                let value = toml::Value::String(paths[i].1.display().to_string());
                out.push_str(&format!("{key} = {value}\n"));
                seen[i] = true;
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        bail!("configs/husk.toml has no `{}` key to set", paths[i].0);
    }
    toml::from_str::<toml::Table>(&out).context("The installed husk.toml would not parse")?;
    Ok(out)
}

/// The key path of CRI's runtime table for containerd config format `version`.
fn runtimes_path(version: i64) -> Result<&'static [&'static str]> {
    Ok(match version {
        1 => &["plugins", "cri", "containerd", "runtimes"],
        2 => &[
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ],
        // containerd 2.x
        3 => &[
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ],
        v => bail!("Unknown containerd config version {v}"),
    })
}

/// The runtime stanza for config format `version`, using husk config `config`.
pub fn stanza(version: i64, config: &Path) -> Result<String> {
    let table = runtimes_path(version)?
        .iter()
        .map(|k| toml_key(k))
        .chain([HANDLER.to_string()])
        .collect::<Vec<_>>()
        .join(".");
    let config = toml::Value::String(config.display().to_string());
    Ok(format!(
        "# husk: every pod in its own KVM VM (`cargo xtask install`)\n\
         [{table}]\n  runtime_type = \"{RUNTIME_TYPE}\"\n\
         [{table}.options]\n  ConfigPath = {config}\n"
    ))
}

/// A bare TOML key when it can be one, else a quoted one.
fn toml_key(k: &str) -> String {
    if k.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

/// The outcome of [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merged {
    /// The same husk stanza is already there.
    AlreadyPresent,
    /// The new text of the file.
    Updated(String),
}

/// Adds the husk runtime to the containerd config `existing` (`None`: no file yet).
///
/// Refuses, with the reason, a config that does not parse, has an unknown version, already
/// has another husk runtime (the handler `husk`, or any runtime of type
/// `io.containerd.husk.v2`) that differs from ours, or cannot take the stanza by appending.
pub fn merge(existing: Option<&str>, config: &Path) -> Result<Merged> {
    let text = existing.unwrap_or("");
    let old: toml::Table = toml::from_str(text).context("The containerd config does not parse")?;
    // containerd 1.x reads a config without `version` as version 1; a new file gets 2.
    let version = match old.get("version") {
        Some(v) => v.as_integer().context("`version` is not an integer")?,
        None if text.trim().is_empty() => 2,
        None => 1,
    };
    let path = runtimes_path(version)?;
    let ours: toml::Table = toml::from_str(&stanza(version, config)?)?;
    let our_runtime = lookup(&ours, path)
        .and_then(|r| r.get(HANDLER))
        .cloned()
        .context("stanza lookup")?;

    if let Some(runtimes) = lookup(&old, path) {
        let mut same = false;
        for (name, rt) in runtimes {
            let is_husk = name == HANDLER
                || rt.get("runtime_type").and_then(|t| t.as_str()) == Some(RUNTIME_TYPE);
            if !is_husk {
                continue;
            }
            if name == HANDLER && *rt == our_runtime {
                same = true;
                continue;
            }
            bail!(
                "It already has a different husk runtime `{name}`:\n{}\nwhich is not the one \
                 this installation needs:\n{}\nEdit or remove that entry by hand, then rerun.",
                toml::to_string(rt).unwrap_or_default().trim_end(),
                toml::to_string(&our_runtime).unwrap_or_default().trim_end()
            );
        }
        if same {
            return Ok(Merged::AlreadyPresent);
        }
    }

    let mut new_text = String::new();
    if existing.is_none() || text.trim().is_empty() {
        new_text.push_str("version = 2\n\n");
    } else {
        new_text.push_str(text);
        if !text.ends_with('\n') {
            new_text.push('\n');
        }
        new_text.push('\n');
    }
    new_text.push_str(&stanza(version, config)?);

    // The result must be the old configuration plus exactly our runtime.
    let new: toml::Table = toml::from_str(&new_text).map_err(|e| {
        anyhow::anyhow!(
            "Appending the husk stanza would not give a valid config ({e}); the file defines \
             the runtimes table in a form that cannot be extended by appending. Add this by \
             hand:\n{}",
            stanza(version, config).unwrap_or_default()
        )
    })?;
    let mut expected = old.clone();
    if existing.is_none() || text.trim().is_empty() {
        expected.insert("version".into(), toml::Value::Integer(2));
    }
    insert_at(&mut expected, path, HANDLER, our_runtime)?;
    if new != expected {
        bail!("Appending the husk stanza would change other settings; add it by hand");
    }
    Ok(Merged::Updated(new_text))
}

fn lookup<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Table> {
    let mut cur = t;
    for k in path {
        cur = cur.get(*k)?.as_table()?;
    }
    Some(cur)
}

fn insert_at(t: &mut toml::Table, path: &[&str], key: &str, value: toml::Value) -> Result<()> {
    let mut cur = t;
    for k in path {
        cur = cur
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("`{k}` is not a table"))?;
    }
    cur.insert(key.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "/etc/husk/husk.toml";

    fn runtime(text: &str, version: i64) -> toml::Table {
        let t: toml::Table = toml::from_str(text).unwrap();
        lookup(&t, runtimes_path(version).unwrap())
            .and_then(|r| r.get(HANDLER))
            .and_then(|h| h.as_table())
            .cloned()
            .unwrap()
    }

    #[test]
    fn stanza_names_the_runtime_and_config() {
        let s = stanza(2, Path::new(CFG)).unwrap();
        assert!(s.contains(
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]\n  \
             runtime_type = \"io.containerd.husk.v2\"\n"
        ));
        let rt = runtime(&s, 2);
        assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(rt["options"]["ConfigPath"].as_str(), Some(CFG));
        assert!(stanza(1, Path::new(CFG))
            .unwrap()
            .contains("[plugins.cri.containerd.runtimes.husk]"));
        assert!(stanza(7, Path::new(CFG)).is_err());
    }

    #[test]
    fn new_file_gets_version_2_and_the_stanza() {
        let Merged::Updated(text) = merge(None, Path::new(CFG)).unwrap() else {
            panic!("expected an update")
        };
        assert!(text.starts_with("version = 2\n"));
        assert_eq!(
            runtime(&text, 2)["runtime_type"].as_str(),
            Some(RUNTIME_TYPE)
        );
        assert_eq!(
            merge(Some(&text), Path::new(CFG)).unwrap(),
            Merged::AlreadyPresent,
            "a second install changes nothing"
        );
    }

    #[test]
    fn existing_config_is_kept_byte_for_byte_and_extended() {
        let old = "version = 2\nroot = \"/var/lib/containerd\"\n\n\
                   [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  \
                   runtime_type = \"io.containerd.runc.v2\"\n";
        let Merged::Updated(text) = merge(Some(old), Path::new(CFG)).unwrap() else {
            panic!("expected an update")
        };
        assert!(text.starts_with(old), "the old text is kept as it was");
        let t: toml::Table = toml::from_str(&text).unwrap();
        let rts = lookup(&t, runtimes_path(2).unwrap()).unwrap();
        assert_eq!(rts.len(), 2, "runc and husk");
        assert_eq!(t["root"].as_str(), Some("/var/lib/containerd"));
    }

    #[test]
    fn config_without_version_is_version_1() {
        let old = "root = \"/var/lib/containerd\"\n";
        let Merged::Updated(text) = merge(Some(old), Path::new(CFG)).unwrap() else {
            panic!("expected an update")
        };
        assert!(text.contains("[plugins.cri.containerd.runtimes.husk]"));
        let Merged::Updated(v3) = merge(Some("version = 3\n"), Path::new(CFG)).unwrap() else {
            panic!("expected an update")
        };
        assert!(v3.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.husk]"));
    }

    #[test]
    fn a_different_husk_stanza_is_refused() {
        let other = stanza(2, Path::new("/opt/husk.toml")).unwrap();
        let err = merge(Some(&format!("version = 2\n{other}")), Path::new(CFG)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("different husk runtime `husk`"), "{msg}");
        assert!(msg.contains("/opt/husk.toml") && msg.contains(CFG), "{msg}");

        let renamed = "version = 2\n\
                       [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-ish]\n\
                       runtime_type = \"io.containerd.husk.v2\"\n";
        let msg = format!("{:#}", merge(Some(renamed), Path::new(CFG)).unwrap_err());
        assert!(msg.contains("`kata-ish`"), "{msg}");
    }

    #[test]
    fn unappendable_or_broken_configs_are_refused() {
        let inline = "version = 2\n\
                      [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
                      runtimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n";
        let msg = format!("{:#}", merge(Some(inline), Path::new(CFG)).unwrap_err());
        assert!(msg.contains("Add this by hand"), "{msg}");
        assert!(merge(Some("version = [\n"), Path::new(CFG)).is_err());
        assert!(merge(Some("version = 9\n"), Path::new(CFG)).is_err());
    }

    #[test]
    fn installed_config_points_at_the_installed_files() {
        let template =
            std::fs::read_to_string(cache::workspace_root().join("configs/husk.toml")).unwrap();
        let layout = Layout::new(Path::new("/opt/h"), Path::new("/etc"));
        let text = config_for(&template, &layout).unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["kernel"].as_str(), Some("/opt/h/share/husk/vmlinux"));
        assert_eq!(
            t["initrd"].as_str(),
            Some("/opt/h/share/husk/initramfs.cpio")
        );
        assert_eq!(t["vmm_path"].as_str(), Some("/opt/h/bin/husk-vmm"));
        assert_eq!(
            t["virtiofsd_path"].as_str(),
            Some("/opt/h/libexec/husk/virtiofsd")
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with('#')).count(),
            template.lines().filter(|l| l.starts_with('#')).count(),
            "comments kept"
        );
        // The default prefix reproduces the template's own paths.
        let default = config_for(
            &template,
            &Layout::new(Path::new("/usr/local"), Path::new("/etc")),
        )
        .unwrap();
        assert_eq!(
            toml::from_str::<toml::Table>(&default).unwrap(),
            toml::from_str::<toml::Table>(&template).unwrap()
        );
        assert!(config_for("mem_mib = 1\n", &layout).is_err());
    }
}
