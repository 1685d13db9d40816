//! The configuration files the fixture writes: containerd's own config.toml, and the
//! husk.toml the shim reads (through `HUSK_CONFIG`).

use std::path::Path;

use crate::required_path;

/// What the CRI plugin needs when the fixture enables it (`Containerd::start_cri`).
#[derive(Debug, Clone)]
pub struct CriConfig {
    /// The pod sandbox ("pause") image.
    pub sandbox_image: String,
    /// Where the CNI plugin binaries are (Debian's containernetworking-plugins).
    pub cni_bin_dir: String,
    /// The CNI configuration directory (written by the fixture).
    pub cni_conf_dir: String,
    /// The husk.toml the husk runtime handler's shim reads.
    pub husk_config: String,
}

/// containerd's configuration (format version 2, containerd 1.6): everything under `dir`.
/// Without `cri` the CRI plugin is disabled (`ctr` needs none of it and it slows the start);
/// with it, the plugin serves on the same socket with runtime handlers `runc` (the default) and
/// `husk`, as `configs/containerd-husk.toml` documents the latter.
pub fn containerd_config(dir: &Path, cri: Option<&CriConfig>) -> String {
    let d = dir.display();
    let (cri_disabled, cri_section) = match cri {
        None => ("\n  \"io.containerd.grpc.v1.cri\",", String::new()),
        Some(c) => ("", cri_section(c)),
    };
    format!(
        r#"# Written by husk-integration's Containerd fixture.
version = 2
root = "{d}/root"
state = "{d}/state"
# The snapshotters that cannot work here only add noise.
disabled_plugins = [{cri_disabled}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "info"
{cri_section}"#
    )
}

/// The CRI plugin's section.
fn cri_section(c: &CriConfig) -> String {
    let q = |s: &str| toml_string(s);
    let cri = r#"[plugins."io.containerd.grpc.v1.cri"]"#;
    let runtimes = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes"#;
    format!(
        r#"
{cri}
  sandbox_image = {image}
  # Neither exists in the lab.
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    {runtimes}.runc]
      runtime_type = "io.containerd.runc.v2"
    {runtimes}.husk]
      runtime_type = "io.containerd.husk.v2"
    {runtimes}.husk.options]
      ConfigPath = {husk_config}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {bin}
    conf_dir = {conf}
    max_conf_num = 1
"#,
        image = q(&c.sandbox_image),
        husk_config = q(&c.husk_config),
        bin = q(&c.cni_bin_dir),
        conf = q(&c.cni_conf_dir),
    )
}

/// Seconds a pod's guest may take until its agent answers (lab boots take 3–8 s, two at once
/// on two emulated CPUs longer; a boot that takes 60 s has hung, and is a lab retry).
const BOOT_TIMEOUT_SECS: u32 = 60;

/// The husk.toml the fixture gives the shim (keys of `configs/husk.toml`): the guest and the
/// helper binaries under test, and the guest consoles appended to `guest-console.log` in `dir`.
pub fn husk_config_text(dir: &Path) -> String {
    let p = |var: &str| toml_string(&required_path(var).display().to_string());
    format!(
        "# Written by husk-integration's Containerd fixture from the HUSK_* test environment.\n\
         kernel = {}\ninitrd = {}\nvmm_path = {}\nvirtiofsd_path = {}\n\
         mem_mib = 256\nvcpus = 1\nboot_timeout_secs = {BOOT_TIMEOUT_SECS}\n\
         debug_console = {}\n",
        p("HUSK_KERNEL"),
        p("HUSK_INITRD"),
        p("HUSK_VMM"),
        p("HUSK_VIRTIOFSD"),
        toml_string(&dir.join("guest-console.log").display().to_string()),
    )
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_everything_in_the_dir() {
        let cfg = containerd_config(Path::new("/tmp/x"), None);
        assert!(cfg.contains("root = \"/tmp/x/root\"\n"), "{cfg}");
        assert!(cfg.contains("state = \"/tmp/x/state\"\n"), "{cfg}");
        assert!(cfg.contains("\"io.containerd.grpc.v1.cri\""));
        assert!(cfg.contains("address = \"/tmp/x/containerd.sock\""));
        let v: toml::Value = toml::from_str(&cfg).unwrap();
        assert!(v["disabled_plugins"]
            .as_array()
            .unwrap()
            .contains(&"io.containerd.grpc.v1.cri".into()));
    }

    /// With the CRI plugin on, both runtime handlers are there and the husk one points at the
    /// fixture's husk.toml, in the form configs/containerd-husk.toml documents.
    #[test]
    fn cri_config_names_both_handlers_and_cni() {
        let cri = CriConfig {
            sandbox_image: "docker.io/library/p:t".into(),
            cni_bin_dir: "/usr/lib/cni".into(),
            cni_conf_dir: "/tmp/x/cni".into(),
            husk_config: "/tmp/x/husk.toml".into(),
        };
        let cfg = containerd_config(Path::new("/tmp/x"), Some(&cri));
        let v: toml::Value = toml::from_str(&cfg).unwrap();
        assert!(!v["disabled_plugins"]
            .as_array()
            .unwrap()
            .contains(&"io.containerd.grpc.v1.cri".into()));
        let c = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(c["sandbox_image"].as_str(), Some("docker.io/library/p:t"));
        let rt = &c["containerd"]["runtimes"];
        assert_eq!(
            rt["husk"]["runtime_type"].as_str(),
            Some("io.containerd.husk.v2")
        );
        assert_eq!(
            rt["husk"]["options"]["ConfigPath"].as_str(),
            Some("/tmp/x/husk.toml")
        );
        assert_eq!(
            rt["runc"]["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(c["cni"]["conf_dir"].as_str(), Some("/tmp/x/cni"));
        // The documented stanza parses and says the same about the husk handler.
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/containerd-husk.toml"
        ))
        .unwrap();
        let doc: toml::Value = toml::from_str(&doc).unwrap();
        let husk = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["husk"];
        assert_eq!(husk["runtime_type"], rt["husk"]["runtime_type"]);
        assert!(husk["options"]["ConfigPath"].is_str());
    }

    /// The largest PSS of a running husk pod (shim and descendants, networking on) that
    /// `cargo xtask bench cri` measured, MiB (BENCHMARKS.md, "Kubernetes pods through CRI").
    const MEASURED_POD_PSS_MIB: f64 = 57.6;

    /// configs/runtimeclass.yaml names the handler configs/containerd-husk.toml defines, and
    /// its memory overhead covers what a pod was measured to cost.
    #[test]
    fn the_runtime_class_matches_the_handler_and_the_measured_overhead() {
        let yaml = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/runtimeclass.yaml"
        ))
        .unwrap();
        let field = |indent: &str, key: &str| {
            yaml.lines()
                .find_map(|l| l.strip_prefix(indent)?.strip_prefix(key)?.strip_prefix(':'))
                .map(|v| v.trim().trim_matches('"').to_owned())
                .unwrap_or_else(|| panic!("runtimeclass.yaml has no {key}"))
        };
        assert_eq!(field("", "kind"), "RuntimeClass");
        let handler = field("", "handler");
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/containerd-husk.toml"
        ))
        .unwrap();
        let doc: toml::Value = toml::from_str(&doc).unwrap();
        let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(
            runtimes[handler.as_str()]["runtime_type"].as_str(),
            Some("io.containerd.husk.v2"),
            "the RuntimeClass's handler {handler:?} is not husk's in containerd-husk.toml"
        );
        let memory = field("    ", "memory");
        let mib: f64 = memory
            .strip_suffix("Mi")
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("overhead memory {memory:?} is not <N>Mi"));
        assert!(
            mib >= MEASURED_POD_PSS_MIB,
            "overhead memory {mib} MiB is below the measured {MEASURED_POD_PSS_MIB} MiB per pod"
        );
    }
}
