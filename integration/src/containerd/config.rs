//! The configuration files the fixture writes: containerd's own config.toml, and the
//! husk.toml the shim reads (through `HUSK_CONFIG`).

use std::path::Path;

use crate::required_path;

/// containerd's configuration (format version 2, containerd 1.6): everything under `dir`.
pub fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"# Written by husk-integration's Containerd fixture.
version = 2
root = "{d}/root"
state = "{d}/state"
# Not needed by ctr, and slow to start; the snapshotters that cannot work here only add noise.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
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
"#
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
        let cfg = containerd_config(Path::new("/tmp/x"));
        assert!(cfg.contains("root = \"/tmp/x/root\"\n"), "{cfg}");
        assert!(cfg.contains("state = \"/tmp/x/state\"\n"), "{cfg}");
        assert!(cfg.contains("\"io.containerd.grpc.v1.cri\""));
        assert!(cfg.contains("address = \"/tmp/x/containerd.sock\""));
    }
}
