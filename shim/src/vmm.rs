//! Command lines of the two host processes of a pod: `husk-vmm` and `virtiofsd`, and of QEMU,
//! the reference VMM the lab experiments and benchmarks run the same guest under ([`qemu`]).
//!
//! This module is the one place that knows the flags of each. [`VmmCommand`] spells
//! husk-vmm's (vmm/src/config.rs); the shim, xtask and the tests build their VMs through it, and
//! `vmm/tests/shim_command.rs` feeds its output to husk-vmm's own parser, so a flag renamed on
//! one side fails a test. [`VirtiofsdCommand`] spells virtiofsd's (1.14; its parser is not ours
//! to test against): the daemon always sandboxes itself (`--sandbox namespace` by default) and
//! serves one shared directory on one vhost-user socket.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::CachePolicy;

mod qemu;
pub use qemu::{QemuCommand, QEMU_PROGRAM};

/// The fixed part of the guest kernel command line (docs/contracts.md). husk-vmm builds the
/// same line (`husk_vmm::builder::BASE_CMDLINE`, held equal by `vmm/tests/shim_command.rs`);
/// QEMU gets it through [`QemuCommand`].
pub const GUEST_BASE_CMDLINE: &str =
    "console=ttyS0 quiet reboot=t panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The host's TSC frequency in kHz, from `cpu MHz` of `/proc/cpuinfo` (on this project's
/// hosts the TSC is constant and its frequency known: `tsc_known_freq`). Nested guests need it
/// as `tsc_early_khz=` because their own PIT calibration is unreliable under emulation
/// (DESIGN.md "Host facts"): the lab's L1, and QEMU's guests (husk-vmm asks KVM instead).
pub fn host_tsc_khz() -> Option<u64> {
    parse_cpu_mhz_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn parse_cpu_mhz_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split_once(':')?.1.trim().parse().ok()?;
    // Rounded to whole kHz: at most 1 ppm off the kernel's own calibration.
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// Where the guest serial console goes (`--console`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Console {
    /// Discarded (husk-vmm still scans it for kernel panics).
    #[default]
    Off,
    /// husk-vmm's standard output.
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

/// A husk-vmm command line.
///
/// ```
/// use husk_shim::vmm::{Console, VmmCommand};
/// let cmd = VmmCommand::new("/usr/bin/husk-vmm", "/boot/vmlinux", "/run/pod/vsock.sock")
///     .initrd("/boot/initramfs.cpio")
///     .mem_mib(512)
///     .vcpus(2)
///     .console(Console::File("/tmp/console.log".into()))
///     .fs("/run/pod/virtiofsd.sock", "husk")
///     .command();
/// assert_eq!(cmd.get_program(), "/usr/bin/husk-vmm");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmCommand {
    // The guest part is read by `qemu::QemuCommand::like` too.
    program: PathBuf,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    mem_mib: u32,
    vcpus: u8,
    vsock_uds: PathBuf,
    vsock_cid: Option<u32>,
    console: Console,
    cmdline_extra: Option<String>,
    fs: Option<(PathBuf, String)>,
    fs_queue_size: Option<u16>,
    net: Option<NetDevice>,
    jail: Option<(PathBuf, u32, u32)>,
    seccomp: Option<&'static str>,
}

/// A virtio-net device on a tap the VMM inherits (`--net-tap-fd`, `--net-mac`, `--net-mtu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    /// The descriptor number the tap has in the VMM's process (the caller puts it there).
    pub tap_fd: i32,
    /// The guest interface's MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// The MTU offered to the guest; husk-vmm's default (1500) when not set.
    pub mtu: Option<u16>,
}

/// The descriptor number husk-vmm gets its tap at (see [`inherit_fd`]).
pub const NET_TAP_FD: i32 = 3;

/// Makes the child of `cmd` inherit `fd` as descriptor `target` (not close-on-exec there),
/// whatever number `fd` has in this process. `fd` must stay open until the child is spawned.
pub fn inherit_fd(cmd: &mut Command, fd: std::os::fd::RawFd, target: std::os::fd::RawFd) {
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl) on descriptors it inherited.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let rc = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl VmmCommand {
    /// husk-vmm `program` booting `kernel`, with its hybrid vsock socket at `vsock_uds`;
    /// 256 MiB, one vCPU, console off.
    pub fn new(
        program: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        vsock_uds: impl Into<PathBuf>,
    ) -> Self {
        Self {
            program: program.into(),
            kernel: kernel.into(),
            initrd: None,
            mem_mib: 256,
            vcpus: 1,
            vsock_uds: vsock_uds.into(),
            vsock_cid: None,
            console: Console::Off,
            cmdline_extra: None,
            fs: None,
            fs_queue_size: None,
            net: None,
            jail: None,
            seccomp: None,
        }
    }

    /// Jails husk-vmm in the empty directory `dir` as `uid`:`gid` once the VM is built
    /// (`--jail-dir`, `--jail-uid`, `--jail-gid`).
    pub fn jail(mut self, dir: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        self.jail = Some((dir.into(), uid, gid));
        self
    }

    /// The seccomp filters' mode (`--seccomp`: kill, log or off); husk-vmm's default (kill)
    /// when not set.
    pub fn seccomp(mut self, mode: &'static str) -> Self {
        self.seccomp = Some(mode);
        self
    }

    /// The initramfs (`--initrd`).
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// Guest memory (`--mem-mib`).
    pub fn mem_mib(mut self, mem_mib: u32) -> Self {
        self.mem_mib = mem_mib;
        self
    }

    /// vCPUs (`--vcpus`).
    pub fn vcpus(mut self, vcpus: u8) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Guest vsock CID (`--vsock-cid`); husk-vmm's default (3) when not set.
    pub fn vsock_cid(mut self, cid: u32) -> Self {
        self.vsock_cid = Some(cid);
        self
    }

    /// Serial console destination (`--console`).
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// Words appended to the guest kernel command line (`--cmdline-extra`); empty: none.
    pub fn cmdline_extra(mut self, extra: impl Into<String>) -> Self {
        let extra = extra.into();
        self.cmdline_extra = (!extra.trim().is_empty()).then_some(extra);
        self
    }

    /// A virtio-fs device served by virtiofsd at `socket`, mounted by `tag`
    /// (`--fs-socket`, `--fs-tag`).
    pub fn fs(mut self, socket: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        self.fs = Some((socket.into(), tag.into()));
        self
    }

    /// Size of each virtio-fs queue (`--fs-queue-size`).
    pub fn fs_queue_size(mut self, size: u16) -> Self {
        self.fs_queue_size = Some(size);
        self
    }

    /// A virtio-net device on an inherited tap.
    pub fn net(mut self, net: NetDevice) -> Self {
        self.net = Some(net);
        self
    }

    /// The hybrid vsock socket.
    pub fn vsock_uds(&self) -> &Path {
        &self.vsock_uds
    }

    /// The arguments, without the program.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--kernel".into(),
            self.kernel.clone().into(),
            "--mem-mib".into(),
            self.mem_mib.to_string().into(),
            "--vcpus".into(),
            self.vcpus.to_string().into(),
            "--vsock-uds".into(),
            self.vsock_uds.clone().into(),
            "--console".into(),
        ];
        args.push(match &self.console {
            Console::Off => "off".into(),
            Console::Stdout => "stdout".into(),
            Console::File(path) => path.clone().into(),
        });
        if let Some(initrd) = &self.initrd {
            args.extend(["--initrd".into(), initrd.clone().into()]);
        }
        if let Some(cid) = self.vsock_cid {
            args.extend(["--vsock-cid".into(), cid.to_string().into()]);
        }
        if let Some(extra) = &self.cmdline_extra {
            args.extend(["--cmdline-extra".into(), extra.into()]);
        }
        if let Some((socket, tag)) = &self.fs {
            args.extend([
                "--fs-socket".into(),
                socket.clone().into(),
                "--fs-tag".into(),
                tag.into(),
            ]);
        }
        if let Some(size) = self.fs_queue_size {
            args.extend(["--fs-queue-size".into(), size.to_string().into()]);
        }
        if let Some(net) = &self.net {
            args.extend([
                "--net-tap-fd".into(),
                net.tap_fd.to_string().into(),
                "--net-mac".into(),
                net.mac.clone().into(),
            ]);
            if let Some(mtu) = net.mtu {
                args.extend(["--net-mtu".into(), mtu.to_string().into()]);
            }
        }
        if let Some((dir, uid, gid)) = &self.jail {
            args.extend([
                "--jail-dir".into(),
                dir.clone().into(),
                "--jail-uid".into(),
                uid.to_string().into(),
                "--jail-gid".into(),
                gid.to_string().into(),
            ]);
        }
        if let Some(mode) = self.seccomp {
            args.extend(["--seccomp".into(), mode.into()]);
        }
        args
    }

    /// A `Command` running husk-vmm with these arguments in a clean environment (only
    /// `RUST_LOG` is kept); stdio left to the caller.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args()).env_clear();
        if let Some(log) = std::env::var_os("RUST_LOG") {
            cmd.env("RUST_LOG", log);
        }
        cmd
    }
}

/// virtiofsd's `--sandbox` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsSandbox {
    /// Its own mount, pid and net namespaces, pivoted into the shared directory.
    #[default]
    Namespace,
    /// chroot(2) into the shared directory.
    Chroot,
}

/// A virtiofsd command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtiofsdCommand {
    program: PathBuf,
    socket_path: PathBuf,
    shared_dir: PathBuf,
    sandbox: FsSandbox,
    cache: CachePolicy,
    log_level: &'static str,
}

impl VirtiofsdCommand {
    /// virtiofsd `program` sharing `shared_dir` on the vhost-user socket `socket_path`,
    /// namespace sandbox, cache `auto`.
    pub fn new(
        program: impl Into<PathBuf>,
        socket_path: impl Into<PathBuf>,
        shared_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            program: program.into(),
            socket_path: socket_path.into(),
            shared_dir: shared_dir.into(),
            sandbox: FsSandbox::Namespace,
            cache: CachePolicy::Auto,
            log_level: "warn",
        }
    }

    /// The sandbox mode (`--sandbox`).
    pub fn sandbox(mut self, sandbox: FsSandbox) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// The cache policy (`--cache`).
    pub fn cache(mut self, cache: CachePolicy) -> Self {
        self.cache = cache;
        self
    }

    /// Log verbosity (`--log-level`: error, warn, info, debug); `warn` unless set.
    pub fn log_level(mut self, level: &'static str) -> Self {
        self.log_level = level;
        self
    }

    /// The vhost-user socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The arguments, without the program.
    pub fn args(&self) -> Vec<OsString> {
        vec![
            "--socket-path".into(),
            self.socket_path.clone().into(),
            "--shared-dir".into(),
            self.shared_dir.clone().into(),
            "--sandbox".into(),
            match self.sandbox {
                FsSandbox::Namespace => "namespace",
                FsSandbox::Chroot => "chroot",
            }
            .into(),
            "--cache".into(),
            self.cache.as_str().into(),
            "--log-level".into(),
            self.log_level.into(),
            "--seccomp".into(),
            "kill".into(),
        ]
    }

    /// A `Command` running virtiofsd with these arguments (stdio left to the caller).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args());
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn cpu_mhz() {
        let cpuinfo =
            "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.150\ncache size\t: 512 KB\n";
        assert_eq!(parse_cpu_mhz_khz(cpuinfo), Some(2_596_150));
        assert_eq!(parse_cpu_mhz_khz("processor\t: 0\n"), None);
        assert_eq!(parse_cpu_mhz_khz("cpu MHz\t: n/a\n"), None);
    }

    #[test]
    fn minimal_vmm_command() {
        let args = strings(VmmCommand::new("/vmm", "/k", "/s/v.sock").args());
        assert_eq!(
            args,
            [
                "--kernel",
                "/k",
                "--mem-mib",
                "256",
                "--vcpus",
                "1",
                "--vsock-uds",
                "/s/v.sock",
                "--console",
                "off"
            ]
        );
    }

    #[test]
    fn full_vmm_command() {
        let cmd = VmmCommand::new("/vmm", "/k", "/s/v.sock")
            .initrd("/i")
            .mem_mib(512)
            .vcpus(2)
            .vsock_cid(7)
            .console(Console::File("/c.log".into()))
            .cmdline_extra("quiet x=1")
            .fs("/s/fs.sock", "husk")
            .fs_queue_size(256);
        let args = strings(cmd.args());
        let joined = args.join(" ");
        assert!(joined.contains("--mem-mib 512 --vcpus 2"), "{joined}");
        assert!(
            joined.contains("--console /c.log --initrd /i --vsock-cid 7"),
            "{joined}"
        );
        assert!(joined.contains("--cmdline-extra quiet x=1"), "{joined}");
        assert!(joined.ends_with("--fs-socket /s/fs.sock --fs-tag husk --fs-queue-size 256"));
        assert_eq!(cmd.command().get_program(), "/vmm");
    }

    #[test]
    fn net_device_arguments() {
        let net = |mtu| NetDevice {
            tap_fd: 3,
            mac: "02:00:00:00:00:02".into(),
            mtu,
        };
        let args = strings(VmmCommand::new("/vmm", "/k", "/u").net(net(None)).args());
        assert!(args
            .join(" ")
            .ends_with("--net-tap-fd 3 --net-mac 02:00:00:00:00:02"));
        let args = strings(
            VmmCommand::new("/vmm", "/k", "/u")
                .net(net(Some(9000)))
                .args(),
        );
        assert!(args
            .join(" ")
            .ends_with("--net-mac 02:00:00:00:00:02 --net-mtu 9000"));
    }

    #[test]
    fn blank_cmdline_extra_is_left_out() {
        let args = strings(
            VmmCommand::new("/vmm", "/k", "/u")
                .cmdline_extra("  ")
                .args(),
        );
        assert!(!args.iter().any(|a| a == "--cmdline-extra"));
    }

    #[test]
    fn virtiofsd_command() {
        let args = strings(
            VirtiofsdCommand::new("/vfsd", "/s/fs.sock", "/s/shared")
                .cache(CachePolicy::Never)
                .args(),
        );
        assert_eq!(
            args,
            [
                "--socket-path",
                "/s/fs.sock",
                "--shared-dir",
                "/s/shared",
                "--sandbox",
                "namespace",
                "--cache",
                "never",
                "--log-level",
                "warn",
                "--seccomp",
                "kill"
            ]
        );
    }
}
