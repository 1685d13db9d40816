//! The lab's L1 boot image: Debian's standard kernel from `/boot` and an initramfs of
//! busybox, the kernel modules the lab needs (with their dependencies from
//! `modules.dep`) and the lab init script.
//!
//! The standard `-amd64` flavour is used because it ships KVM as modules (the `-cloud`
//! one has no KVM). The initramfs is cached under a hash of everything packed into it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cache::{self, CacheKey};
use crate::cpio::{self, Entry};

/// Bump when the layout of the image changes.
const RECIPE: &str = "lab-initramfs-v1";
/// The lab's PID 1.
const INIT_SCRIPT: &str = include_str!("init.sh");
/// The static busybox from `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";
/// Applets the init script uses, linked to `/bin/busybox`.
const APPLETS: &[&str] = &[
    "sh", "mount", "umount", "insmod", "mkdir", "cat", "grep", "dmesg", "tail", "reboot", "chroot",
    "sleep", "sync", "ip", "ls",
];
/// Modules the lab loads, in this order (each after its dependencies): KVM first, so
/// `/dev/kvm` appears as early as possible, then virtio-mmio and 9p for the shares, then
/// overlayfs for container snapshots inside the lab, tun for the virtio-net tests, then pod
/// networking (CNI's bridge and veth, tc).
pub const LAB_MODULES: &[&str] = &[
    "kvm-amd",
    "virtio_mmio",
    "9pnet_virtio",
    "9p",
    "overlay",
    // QEMU's vsock for the boot benchmark baseline (husk-vmm's vsock is in user space).
    "vhost_vsock",
    // Taps for husk-vmm's virtio-net device (`/dev/net/tun`).
    "tun",
    // CNI's bridge plugin for the CRI tests (a bridge and a veth per pod), and tc's ingress
    // qdisc, u32 filter and mirred action, with which the shim joins a pod's CNI interface
    // to its tap (husk_shim::network).
    "bridge",
    "veth",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    // CNI's portmap for hostPorts: iptables (Debian's is iptables-nft) with the matches and
    // targets its rules use. crc32c first: conntrack's libcrc32c wants it (a softdep, which
    // modules.dep does not list).
    "crc32c_generic",
    "nft_compat",
    "nft_chain_nat",
    "xt_nat",
    "xt_comment",
    "xt_multiport",
    "xt_addrtype",
    "xt_mark",
    "xt_MASQUERADE",
    "xt_tcpudp",
];
/// The `console` device node (`Documentation/admin-guide/devices.txt`).
const CONSOLE_MAJOR: u32 = 5;
const CONSOLE_MINOR: u32 = 1;

/// The L1 kernel: `/boot/vmlinuz-<release>` and its modules.
#[derive(Debug, Clone)]
pub struct LabKernel {
    /// `uname -r` of the kernel.
    pub release: String,
    /// The bzImage.
    pub image: PathBuf,
    /// `/lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

/// Finds the newest `/boot/vmlinuz-*-amd64` that has `kvm-amd` among its modules.
pub fn find_kernel() -> Result<LabKernel> {
    let mut releases: Vec<String> = fs::read_dir("/boot")
        .context("Cannot list /boot")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_string))
        .filter(|release| release.ends_with("-amd64") && !release.contains("cloud"))
        .filter(|release| {
            let dep = Path::new("/lib/modules").join(release).join("modules.dep");
            fs::read_to_string(dep).is_ok_and(|t| t.contains("/kvm-amd.ko"))
        })
        .collect();
    releases.sort_by_key(|r| version_order(r));
    let Some(release) = releases.pop() else {
        bail!(
            "No /boot/vmlinuz-*-amd64 with kvm-amd modules found (install linux-image-amd64, \
             `cargo xtask setup`)"
        );
    };
    Ok(LabKernel {
        image: PathBuf::from("/boot").join(format!("vmlinuz-{release}")),
        modules_dir: PathBuf::from("/lib/modules").join(&release),
        release,
    })
}

/// Sort key comparing the numeric runs of a release string as numbers.
fn version_order(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect()
}

/// The module name of a `modules.dep` path: the file name without `.ko[.xz|.zst|.gz]`,
/// with `-` and `_` equivalent (as modprobe treats them).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Resolves `wanted` module names against `modules.dep` text into relative module paths
/// in load order: every module after all of its dependencies, each once.
pub fn resolve_modules(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim();
        let list = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(path), (path.to_string(), list));
    }
    let mut order = Vec::new();
    let mut done = HashSet::new();
    for name in wanted {
        visit(
            &module_name(name),
            &deps,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    deps: &BTreeMap<String, (String, Vec<String>)>,
    done: &mut HashSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if stack.iter().any(|s| s == name) {
        bail!("Module dependency cycle: {} -> {name}", stack.join(" -> "));
    }
    let (path, list) = deps
        .get(name)
        .with_context(|| format!("Module {name} is not in modules.dep (built in, or missing?)"))?;
    stack.push(name.to_string());
    for dep in list {
        visit(&module_name(dep), deps, done, stack, order)?;
    }
    stack.pop();
    done.insert(name.to_string());
    order.push(path.clone());
    Ok(())
}

/// Reads a module file, decompressing `.ko.xz` with `xz` (busybox insmod takes plain ELF).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    if name.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("Cannot read {}", path.display()));
    }
    if name.ends_with(".ko.xz") {
        let out = std::process::Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()?;
        if out.status.success() {
            return Ok(out.stdout);
        }
    }
    bail!("Cannot unpack module {}", path.display())
}

/// Builds (or finds) the lab initramfs for `kernel` and returns its path.
pub fn build_initramfs(kernel: &LabKernel) -> Result<PathBuf> {
    let dep_path = kernel.modules_dir.join("modules.dep");
    let dep_text = fs::read_to_string(&dep_path)
        .with_context(|| format!("Cannot read {}", dep_path.display()))?;
    let order = resolve_modules(&dep_text, LAB_MODULES)?;
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("Cannot read {BUSYBOX} (install busybox-static)"))?;

    let mut key = CacheKey::new(RECIPE);
    key.add("release", kernel.release.as_bytes())
        .add("init", INIT_SCRIPT.as_bytes());
    key.add("busybox", &busybox);
    let mut modules = Vec::new();
    for rel in &order {
        let data = read_module(&kernel.modules_dir.join(rel))?;
        let file = format!("{}.ko", module_name(rel));
        key.add(&file, &data);
        modules.push((file, data));
    }
    let out = cache::cache_dir()?
        .join("lab")
        .join(key.short())
        .join("initramfs.cpio");
    if out.is_file() {
        return Ok(out);
    }

    let mut entries = vec![
        Entry::dir("bin", 0o755),
        Entry::file("bin/busybox", 0o755, busybox),
        Entry::dir("dev", 0o755),
        Entry::char_dev("dev/console", 0o600, CONSOLE_MAJOR, CONSOLE_MINOR),
        Entry::dir("proc", 0o755),
        Entry::dir("sys", 0o755),
        Entry::dir("tmp", 0o1777),
        Entry::dir("lib", 0o755),
        Entry::dir("lib/modules", 0o755),
        Entry::file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec()),
    ];
    entries.extend(
        APPLETS
            .iter()
            .map(|a| Entry::symlink(&format!("bin/{a}"), "busybox")),
    );
    let load_order: Vec<&str> = modules.iter().map(|(f, _)| f.as_str()).collect();
    let load_order = format!("{}\n", load_order.join("\n"));
    entries.push(Entry::file(
        "lib/modules/load-order",
        0o644,
        load_order.into_bytes(),
    ));
    for (file, data) in modules {
        entries.push(Entry::file(&format!("lib/modules/{file}"), 0o644, data));
    }
    cache::write_atomically(&out, &cpio::archive_bytes(&entries)?, 0o644)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/drivers/crypto/ccp/ccp.ko:
kernel/virt/lib/irqbypass.ko:
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";

    fn names(order: &[String]) -> Vec<String> {
        order.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn resolves_kvm_amd_in_load_order() {
        let order = resolve_modules(DEP, &["kvm-amd"]).unwrap();
        assert_eq!(names(&order), ["ccp", "irqbypass", "kvm", "kvm_amd"]);
        assert_eq!(order[3], "kernel/arch/x86/kvm/kvm-amd.ko");
    }

    #[test]
    fn shared_dependencies_load_once_and_first() {
        let order = names(&resolve_modules(DEP, &["9pnet_virtio", "9p"]).unwrap());
        assert_eq!(
            order,
            [
                "9pnet",
                "virtio_ring",
                "virtio",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p"
            ]
        );
    }

    #[test]
    fn unknown_module_and_cycles_are_errors() {
        assert!(resolve_modules(DEP, &["nosuch"])
            .unwrap_err()
            .to_string()
            .contains("nosuch"));
        let cyclic = "a.ko: b.ko\nb.ko: a.ko\n";
        assert!(resolve_modules(cyclic, &["a"])
            .unwrap_err()
            .to_string()
            .contains("cycle"));
    }

    #[test]
    fn module_names_normalise() {
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-amd.ko"), "kvm_amd");
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(module_name("kvm-amd"), "kvm_amd");
    }

    #[test]
    fn newest_release_sorts_last() {
        let mut v = ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64"];
        v.sort_by_key(|r| version_order(r));
        assert_eq!(v, ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-56-amd64"]);
    }
}
