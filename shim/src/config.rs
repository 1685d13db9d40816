//! The runtime configuration, `husk.toml`, and where the shim finds it.
//!
//! The file is looked up in this order: the runtime option `ConfigPath` that containerd passes
//! in the `Create` request (see [`config_path_from_options`]), then the environment variable
//! `HUSK_CONFIG` (for tests), then [`DEFAULT_CONFIG_PATH`]. Every key has a default, unknown
//! keys are errors (a typo must not silently fall back to a default), and the values are
//! checked before any VM starts. `configs/husk.toml` is the commented template.

use std::path::{Path, PathBuf};

use protobuf::CodedInputStream;
use serde::Deserialize;

/// Where the shim reads its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/husk.toml";
/// Environment variable naming the configuration file (below `ConfigPath`, above the default).
pub const CONFIG_ENV: &str = "HUSK_CONFIG";
/// Message name of containerd's generic runtime options (`pkg/runtimeoptions/v1`), the type
/// the CRI plugin and `ctr run --runtime-config-path` send to runtimes other than runc.
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// Smallest guest memory that boots our kernel and initramfs (husk-vmm's own lower bound).
const MIN_MEM_MIB: u32 = 32;
/// Largest guest memory husk-vmm accepts (256 GiB).
const MAX_MEM_MIB: u32 = 256 * 1024;
/// Most vCPUs husk-vmm supports.
const MAX_VCPUS: u8 = 32;

/// Errors of loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Cannot read the configuration file
    #[error("Cannot read the husk configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid
    #[error("The husk configuration {path} is not valid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml or serde found (names the key and line).
        #[source]
        source: toml::de::Error,
    },
    /// A configuration value is out of range
    #[error("The husk configuration {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state directory cannot be created or resolved
    #[error("Cannot use the state directory {path}")]
    StateDir {
        /// The configured path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime options containerd sent cannot be decoded
    #[error("The runtime options ({type_url}) cannot be decoded")]
    Options {
        /// Their type.
        type_url: String,
        /// The protobuf error.
        #[source]
        source: protobuf::Error,
    },
    /// Not one of virtiofsd's cache policies
    #[error("Unknown virtiofsd cache policy {0:?} (never, metadata, auto or always)")]
    CachePolicy(String),
}

/// virtiofsd's `--cache` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CachePolicy {
    /// No caching in the guest: every access goes to the host.
    Never,
    /// Cache metadata only.
    Metadata,
    /// Cache with close-to-open consistency (virtiofsd's default).
    #[default]
    Auto,
    /// Cache everything; only for shares nothing else writes to.
    Always,
}

impl CachePolicy {
    /// The value virtiofsd takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Metadata => "metadata",
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }
}

impl std::str::FromStr for CachePolicy {
    type Err = ConfigError;

    /// The inverse of [`CachePolicy::as_str`] (the words of `husk.toml` and virtiofsd).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Never, Self::Metadata, Self::Auto, Self::Always]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ConfigError::CachePolicy(s.to_string()))
    }
}

/// The contents of `husk.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Guest kernel: the uncompressed vmlinux with a PVH entry.
    pub kernel: PathBuf,
    /// Guest initramfs holding the agent as `/init`.
    pub initrd: PathBuf,
    /// The husk-vmm binary.
    pub vmm_path: PathBuf,
    /// The virtiofsd binary.
    pub virtiofsd_path: PathBuf,
    /// Guest memory per pod.
    pub mem_mib: u32,
    /// vCPUs per pod.
    pub vcpus: u8,
    /// virtiofsd's cache policy.
    pub virtiofs_cache: CachePolicy,
    /// Where per-pod directories (`<state_dir>/<sandbox-id>`) live.
    pub state_dir: PathBuf,
    /// Spec annotations passed on to the guest: exact keys, or prefixes ending in `*`.
    pub allowed_annotations: Vec<String>,
    /// File for the guest serial console (debugging); empty: discarded.
    pub debug_console: PathBuf,
    /// How long a pod's guest may take until its agent answers.
    pub boot_timeout_secs: u64,
    /// Extra words for the guest kernel command line.
    pub kernel_params: String,
    /// Whether husk-vmm jails itself (namespaces, empty root, no capabilities) as
    /// [`Config::vmm_uid`]:[`Config::vmm_gid`].
    pub vmm_jail: bool,
    /// The unprivileged user a jailed husk-vmm runs as.
    pub vmm_uid: u32,
    /// The unprivileged group a jailed husk-vmm runs as.
    pub vmm_gid: u32,
    /// husk-vmm's per-thread seccomp filters.
    pub vmm_seccomp: SeccompMode,
    /// The file this configuration was read from when containerd's runtime options or
    /// `HUSK_CONFIG` named one (not a key of the file): `delete` of a dead shim must clean up
    /// in the same state directory, so the shim notes it in each bundle
    /// ([`CONFIG_PATH_FILE`]).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The file in a container's bundle naming the configuration its pod was started with (only
/// when that is not the default path); `containerd-shim-husk-v2 delete` reads it.
pub const CONFIG_PATH_FILE: &str = "husk-config-path";

/// What husk-vmm's seccomp filters do with a syscall outside them (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Kill husk-vmm (the pod fails with a VMM error).
    #[default]
    Kill,
    /// Let it through and have the kernel log it (finding a missing syscall).
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    /// The value husk-vmm takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Log => "log",
            Self::Off => "off",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kernel: "/usr/local/share/husk/vmlinux".into(),
            initrd: "/usr/local/share/husk/initramfs.cpio".into(),
            vmm_path: "/usr/local/bin/husk-vmm".into(),
            virtiofsd_path: "/usr/local/libexec/husk/virtiofsd".into(),
            mem_mib: 256,
            vcpus: 1,
            virtiofs_cache: CachePolicy::Auto,
            state_dir: "/run/husk".into(),
            allowed_annotations: Vec::new(),
            debug_console: PathBuf::new(),
            boot_timeout_secs: 60,
            kernel_params: String::new(),
            vmm_jail: true,
            vmm_uid: 65534,
            vmm_gid: 65534,
            vmm_seccomp: SeccompMode::Kill,
            source: None,
        }
    }
}

impl Config {
    /// Parses and checks a configuration; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check(path)?;
        Ok(config)
    }

    /// Reads, parses and checks the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(invalid(format!(
                "mem_mib {} is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB})",
                self.mem_mib
            )));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(invalid(format!(
                "vcpus {} is out of range (1..={MAX_VCPUS})",
                self.vcpus
            )));
        }
        for (key, value) in [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("vmm_path", &self.vmm_path),
            ("virtiofsd_path", &self.virtiofsd_path),
            ("state_dir", &self.state_dir),
        ] {
            if !value.is_absolute() {
                return Err(invalid(format!(
                    "{key} {} is not an absolute path",
                    value.display()
                )));
            }
        }
        if !self.debug_console.as_os_str().is_empty() && !self.debug_console.is_absolute() {
            return Err(invalid(format!(
                "debug_console {} is not an absolute path",
                self.debug_console.display()
            )));
        }
        if self.vmm_jail && (self.vmm_uid == 0 || self.vmm_gid == 0) {
            return Err(invalid(
                "vmm_uid and vmm_gid must not be 0 when vmm_jail is on".into(),
            ));
        }
        if self.boot_timeout_secs == 0 {
            return Err(invalid("boot_timeout_secs must be positive".into()));
        }
        if let Some(bad) = self
            .allowed_annotations
            .iter()
            .find(|p| p.is_empty() || p.trim_end_matches('*').contains('*'))
        {
            return Err(invalid(format!(
                "allowed_annotations entry {bad:?} is empty or has a `*` before its end"
            )));
        }
        Ok(())
    }

    /// Whether annotation `key` may reach the guest.
    pub fn annotation_allowed(&self, key: &str) -> bool {
        self.allowed_annotations
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => key == pattern,
            })
    }

    /// How long the guest may take until its agent answers.
    pub fn boot_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.boot_timeout_secs)
    }
}

/// Creates the state directory if needed (mode 0711) and returns its canonical path, so
/// that the mount points found in `/proc/self/mountinfo` (always canonical) match the pod
/// directories made under it even when it is reached through a symlink (`/var/run`).
pub fn resolve_state_dir(dir: &Path) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::DirBuilderExt;
    let fail = |source| ConfigError::StateDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(fail)?;
    dir.canonicalize().map_err(fail)
}

/// Picks the configuration file: `ConfigPath` from the runtime options if set, else
/// `$HUSK_CONFIG`, else [`DEFAULT_CONFIG_PATH`].
pub fn choose_config_path(from_options: Option<PathBuf>, env: Option<PathBuf>) -> PathBuf {
    from_options
        .or(env)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// Reads `ConfigPath` from the runtime options containerd attached to `Create`.
///
/// containerd sends the runtime's options as a `google.protobuf.Any`. For runtimes other than
/// runc that is `runtimeoptions.v1.Options` (`type_url = 1`, `config_path = 2`,
/// `config_body = 3`; `ctr run --runtime-config-path P` or the CRI runtime's
/// `options.ConfigPath`). Any other type carries no config path for husk and is ignored.
pub fn config_path_from_options(
    type_url: &str,
    value: &[u8],
) -> Result<Option<PathBuf>, ConfigError> {
    let name = type_url.rsplit('/').next().unwrap_or_default();
    if name != RUNTIME_OPTIONS_TYPE {
        return Ok(None);
    }
    let wrap = |source| ConfigError::Options {
        type_url: type_url.to_owned(),
        source,
    };
    let mut input = CodedInputStream::from_bytes(value);
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(wrap)? {
        let (field, wire_type) = (tag >> 3, tag & 7);
        const CONFIG_PATH_FIELD: u32 = 2;
        const LENGTH_DELIMITED: u32 = 2;
        if field == CONFIG_PATH_FIELD && wire_type == LENGTH_DELIMITED {
            let s = input.read_string().map_err(wrap)?;
            path = (!s.is_empty()).then(|| PathBuf::from(s));
        } else {
            let wire = protobuf::rt::WireType::new(wire_type).ok_or_else(|| {
                wrap(protobuf::Error::from(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("invalid wire type {wire_type}"),
                )))
            })?;
            input.skip_field(wire).map_err(wrap)?;
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/husk/husk.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_template_parses() {
        let template = include_str!("../../configs/husk.toml");
        let config = parse(template).expect("configs/husk.toml parses");
        assert_eq!(config.mem_mib, 256);
        assert_eq!(config.virtiofs_cache, CachePolicy::Auto);
    }

    #[test]
    fn values_are_read() {
        let c = parse(
            "kernel = \"/k\"\nmem_mib = 512\nvcpus = 2\nvirtiofs_cache = \"never\"\n\
             allowed_annotations = [\"io.husk.*\", \"exact\"]\n",
        )
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!((c.mem_mib, c.vcpus), (512, 2));
        assert_eq!(c.virtiofs_cache.as_str(), "never");
    }

    #[test]
    fn cache_policies_read_back_their_own_words() {
        for p in [
            CachePolicy::Never,
            CachePolicy::Metadata,
            CachePolicy::Auto,
            CachePolicy::Always,
        ] {
            assert_eq!(p.as_str().parse::<CachePolicy>().unwrap(), p);
        }
        let e = "sometimes".parse::<CachePolicy>().unwrap_err();
        assert!(
            matches!(&e, ConfigError::CachePolicy(w) if w == "sometimes"),
            "{e}"
        );
    }

    #[test]
    fn malformed_files_say_where() {
        let e = parse("mem_mib = \"lots\"").unwrap_err();
        let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(
            msg.contains("/etc/husk/husk.toml") && msg.contains("mem_mib"),
            "{msg}"
        );
        let e = parse("mem_mbi = 5").unwrap_err();
        let msg = std::error::Error::source(&e).unwrap().to_string();
        assert!(msg.contains("mem_mbi"), "{msg}");
        assert!(matches!(
            parse("virtiofs_cache = \"sometimes\""),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for bad in [
            "mem_mib = 4",
            "vcpus = 0",
            "vcpus = 33",
            "kernel = \"relative/vmlinux\"",
            "boot_timeout_secs = 0",
            "allowed_annotations = [\"a*b\"]",
            "allowed_annotations = [\"\"]",
            "debug_console = \"console.log\"",
        ] {
            assert!(
                matches!(parse(bad), Err(ConfigError::Invalid { .. })),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn annotation_allow_list() {
        let c = parse("allowed_annotations = [\"io.husk.*\", \"org.example.one\"]").unwrap();
        assert!(c.annotation_allowed("io.husk.debug"));
        assert!(c.annotation_allowed("org.example.one"));
        assert!(!c.annotation_allowed("org.example.one.more"));
        assert!(!c.annotation_allowed("io.kubernetes.cri.sandbox-id"));
        assert!(!Config::default().annotation_allowed("anything"));
    }

    #[test]
    fn config_path_precedence() {
        let opt = Some(PathBuf::from("/opt.toml"));
        let env = Some(PathBuf::from("/env.toml"));
        assert_eq!(
            choose_config_path(opt.clone(), env.clone()),
            PathBuf::from("/opt.toml")
        );
        assert_eq!(choose_config_path(None, env), PathBuf::from("/env.toml"));
        assert_eq!(
            choose_config_path(None, None),
            PathBuf::from(DEFAULT_CONFIG_PATH)
        );
    }

    #[test]
    fn config_path_is_decoded_from_runtime_options() {
        // runtimeoptions.v1.Options { type_url: "x", config_path: "/etc/husk/pod.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 18];
        value.extend_from_slice(b"/etc/husk/pod.toml");
        let url = "type.googleapis.com/runtimeoptions.v1.Options";
        assert_eq!(
            config_path_from_options(url, &value).unwrap(),
            Some(PathBuf::from("/etc/husk/pod.toml"))
        );
        assert_eq!(config_path_from_options(url, &[]).unwrap(), None);
        assert_eq!(
            config_path_from_options("containerd.runc.v1.Options", &value).unwrap(),
            None
        );
        assert!(config_path_from_options(url, &[0x12, 200]).is_err());
    }
}
