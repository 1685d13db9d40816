//! Command line of `husk-vmm` and its validation into a [`VmConfig`].
//!
//! clap parses the syntax (exit status 2 on usage errors); [`CliArgs::validate`] checks the
//! semantics that clap cannot (files readable, ELF magic, sizes in range, socket path free) so the
//! VMM fails before it creates a VM, with one clear message.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::jail::JailConfig;
use crate::seccomp::{SeccompMode, ThreadKind};

/// Smallest guest memory we accept: a 6.1 kernel plus initramfs does not fit in less.
pub const MIN_MEM_SIZE_MIB: u64 = 32;
/// Largest guest memory we accept (256 GiB).
pub const MAX_MEM_SIZE_MIB: u64 = 256 * 1024;
/// Most vCPUs a VM may have (the MP table and our APIC id scheme are sized for this).
pub const MAX_VCPUS: u8 = 32;
/// Guest CID used when `--vsock-cid` is not given (docs/contracts.md).
pub const DEFAULT_GUEST_CID: u32 = 3;
/// Longest `--cmdline-extra` we accept; the whole command line must fit its guest page.
pub const MAX_CMDLINE_EXTRA_LEN: usize = 2048;

/// Where the guest serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// The VMM's standard output.
    Stdout,
    /// Append to this file (created if missing).
    File(PathBuf),
    /// Discard (still scanned for kernel panics).
    Off,
}

impl std::str::FromStr for ConsoleTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("console target must not be empty".to_string()),
            "stdout" | "-" => Ok(Self::Stdout),
            "off" | "none" => Ok(Self::Off),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// Command line arguments of `husk-vmm`.
#[derive(Debug, Parser)]
#[command(name = "husk-vmm", version, about = "husk's KVM micro-VM monitor")]
pub struct CliArgs {
    /// Guest kernel: an uncompressed ELF vmlinux with a PVH entry point.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio newc), handed to the kernel as a PVH module.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Guest memory size in MiB.
    #[arg(long = "mem-mib", value_name = "N", default_value_t = 256)]
    pub mem_size_mib: u64,
    /// Number of vCPUs (1..=32).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,
    /// Host path of the hybrid vsock Unix socket.
    #[arg(long = "vsock-uds", value_name = "PATH")]
    pub vsock_uds: PathBuf,
    /// Guest vsock context id.
    #[arg(long = "vsock-cid", value_name = "N", default_value_t = DEFAULT_GUEST_CID)]
    pub vsock_cid: u32,
    /// Serial console destination: `stdout`, `off` or a file path.
    #[arg(long, value_name = "FILE|stdout|off", default_value = "stdout")]
    pub console: ConsoleTarget,
    /// Extra text appended to the guest kernel command line.
    #[arg(long = "cmdline-extra", value_name = "STR")]
    pub cmdline_extra: Option<String>,
    /// vhost-user socket of a running virtiofsd: adds a virtio-fs device (needs --fs-tag).
    #[arg(long = "fs-socket", value_name = "PATH", requires = "fs_tag")]
    pub fs_socket: Option<PathBuf>,
    /// Tag the guest mounts the virtio-fs device by (`mount -t virtiofs TAG DIR`), 1..=36 bytes.
    #[arg(long = "fs-tag", value_name = "TAG", requires = "fs_socket")]
    pub fs_tag: Option<String>,
    /// Size of each virtio-fs queue (a power of two up to 32768).
    #[arg(long = "fs-queue-size", value_name = "N", default_value_t = crate::devices::virtio::fs::defs::DEFAULT_QUEUE_SIZE)]
    pub fs_queue_size: u16,
    /// An open tap inherited as this file descriptor (`/dev/net/tun` attached with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, vnet header size 12): adds a virtio-net device on
    /// it (needs --net-mac). The VMM never opens or configures a network device itself.
    #[arg(long = "net-tap-fd", value_name = "FD", requires = "net_mac")]
    pub net_tap_fd: Option<i32>,
    /// MAC address of the guest's interface, `xx:xx:xx:xx:xx:xx` (unicast, not all zero).
    #[arg(long = "net-mac", value_name = "MAC", requires = "net_tap_fd")]
    pub net_mac: Option<String>,
    /// MTU the device offers the guest (68..=65535).
    #[arg(long = "net-mtu", value_name = "N", default_value_t = crate::devices::virtio::net::defs::DEFAULT_MTU)]
    pub net_mtu: u16,
    /// Jail the VMM once the VM is built (crate::jail): an empty directory it mounts its
    /// private root on (needs --jail-uid and --jail-gid).
    #[arg(long = "jail-dir", value_name = "DIR", requires_all = ["jail_uid", "jail_gid"])]
    pub jail_dir: Option<PathBuf>,
    /// The unprivileged user the jailed VMM runs as.
    #[arg(long = "jail-uid", value_name = "UID", requires = "jail_dir")]
    pub jail_uid: Option<u32>,
    /// The unprivileged group the jailed VMM runs as.
    #[arg(long = "jail-gid", value_name = "GID", requires = "jail_dir")]
    pub jail_gid: Option<u32>,
    /// The per-thread seccomp filters: `kill` a syscall outside them, `log` it, or `off`.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,
    /// Test only: make a thread of this kind call a forbidden syscall once its filter is on.
    #[arg(long = "seccomp-selftest", value_enum, hide = true)]
    pub seccomp_selftest: Option<ThreadKind>,
}

/// A virtio-fs device served by virtiofsd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    /// Mount tag.
    pub tag: String,
    /// Size of each queue.
    pub queue_size: u16,
}

/// A virtio-net device on an inherited tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap's file descriptor, checked to be an open tap set up as the device needs; the
    /// builder takes ownership of it.
    pub tap_fd: i32,
    /// The guest interface's MAC address.
    pub mac: [u8; 6],
    /// The MTU offered to the guest.
    pub mtu: u16,
}

/// Validated configuration of one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest kernel (ELF).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Guest memory size in MiB.
    pub mem_size_mib: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Hybrid vsock socket path.
    pub vsock_uds: PathBuf,
    /// Guest CID.
    pub vsock_cid: u32,
    /// Console destination.
    pub console: ConsoleTarget,
    /// Extra kernel command line.
    pub cmdline_extra: Option<String>,
    /// Optional virtio-fs device.
    pub fs: Option<FsConfig>,
    /// Optional virtio-net device.
    pub net: Option<NetConfig>,
    /// The jail, if any.
    pub jail: Option<JailConfig>,
    /// The seccomp filters' mode.
    pub seccomp: SeccompMode,
    /// Test only: the thread kind that calls a forbidden syscall.
    pub seccomp_selftest: Option<ThreadKind>,
}

/// A semantically invalid command line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Cannot open the kernel image
    #[error("Cannot open kernel {path}")]
    KernelUnreadable {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not an ELF file
    #[error(
        "Kernel {0} is not an ELF vmlinux (bzImage is not supported; use the uncompressed vmlinux)"
    )]
    KernelNotElf(PathBuf),
    /// Cannot open the initrd
    #[error("Cannot open initrd {path}")]
    InitrdUnreadable {
        /// Path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Memory size out of range
    #[error("Memory size {0} MiB is out of range ({MIN_MEM_SIZE_MIB}..={MAX_MEM_SIZE_MIB} MiB)")]
    MemSize(u64),
    /// vCPU count out of range
    #[error("vCPU count {0} is out of range (1..={MAX_VCPUS})")]
    Vcpus(u8),
    /// Reserved or invalid CID
    #[error("Guest CID {0} is reserved or invalid (must be 3..=0xfffffffe)")]
    Cid(u32),
    /// Socket path taken by something that is not a stale socket
    #[error("Vsock socket path {0} exists and is not a socket")]
    UdsPathTaken(PathBuf),
    /// Socket path in use by a live listener
    #[error("Vsock socket path {0} is in use by a running process")]
    UdsInUse(PathBuf),
    /// Socket path too long for sockaddr_un
    #[error("Vsock socket path {0} is too long for a Unix socket")]
    UdsTooLong(PathBuf),
    /// Extra command line invalid
    #[error(
        "--cmdline-extra is longer than {MAX_CMDLINE_EXTRA_LEN} bytes or contains a NUL or newline"
    )]
    CmdlineExtra,
    /// Bad virtio-fs tag
    #[error("--fs-tag must be 1..=36 bytes without NUL, got {0:?}")]
    FsTag(String),
    /// Bad virtio-fs queue size
    #[error("--fs-queue-size {0} is not a power of two in 2..=32768")]
    FsQueueSize(u16),
    /// The jail directory is not an empty directory
    #[error("--jail-dir {0} is not an empty directory")]
    JailDir(PathBuf),
    /// The tap descriptor is unusable
    #[error("--net-tap-fd {0} is not an open tap set up for husk-vmm: {1}")]
    NetTap(i32, String),
    /// Bad MAC address
    #[error("--net-mac must be a unicast MAC address xx:xx:xx:xx:xx:xx other than all zeroes, got {0:?}")]
    NetMac(String),
    /// MTU out of range
    #[error("--net-mtu {0} is out of range (68..=65535)")]
    NetMtu(u16),
    /// The virtiofsd socket is not there
    #[error("virtiofsd socket {0} does not exist or is not a socket (start virtiofsd first)")]
    FsSocketMissing(PathBuf),
}

/// ELF magic, `\x7fELF` (elf.h `ELFMAG`).
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// Longest `sun_path` (sys/un.h, 108 bytes including the NUL).
const SUN_PATH_MAX: usize = 107;

impl ConfigError {
    /// True for values out of range (a usage error, exit status 2); false for problems with the
    /// files and paths named (a configuration error, exit status 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::MemSize(_)
                | Self::Vcpus(_)
                | Self::Cid(_)
                | Self::CmdlineExtra
                | Self::UdsTooLong(_)
                | Self::FsTag(_)
                | Self::FsQueueSize(_)
                | Self::NetMac(_)
                | Self::NetMtu(_)
        )
    }
}

impl CliArgs {
    /// Checks everything that can be checked before a VM exists.
    pub fn validate(self) -> Result<VmConfig, ConfigError> {
        check_kernel(&self.kernel)?;
        if let Some(initrd) = &self.initrd {
            File::open(initrd).map_err(|source| ConfigError::InitrdUnreadable {
                path: initrd.clone(),
                source,
            })?;
        }
        if !(MIN_MEM_SIZE_MIB..=MAX_MEM_SIZE_MIB).contains(&self.mem_size_mib) {
            return Err(ConfigError::MemSize(self.mem_size_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.vsock_cid < 3 || self.vsock_cid == u32::MAX {
            return Err(ConfigError::Cid(self.vsock_cid));
        }
        check_uds_path(&self.vsock_uds)?;
        if let Some(extra) = &self.cmdline_extra {
            if extra.len() > MAX_CMDLINE_EXTRA_LEN || extra.contains(['\0', '\n']) {
                return Err(ConfigError::CmdlineExtra);
            }
        }
        let fs = match (self.fs_socket, self.fs_tag) {
            (Some(socket), Some(tag)) => Some(check_fs(socket, tag, self.fs_queue_size)?),
            _ => None,
        };
        let net = match (self.net_tap_fd, self.net_mac) {
            (Some(fd), Some(mac)) => Some(check_net(fd, &mac, self.net_mtu)?),
            _ => None,
        };
        let jail = match (self.jail_dir, self.jail_uid, self.jail_gid) {
            (Some(dir), Some(uid), Some(gid)) => {
                let empty = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none());
                if !empty {
                    return Err(ConfigError::JailDir(dir));
                }
                Some(JailConfig { dir, uid, gid })
            }
            _ => None,
        };
        Ok(VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            mem_size_mib: self.mem_size_mib,
            vcpus: self.vcpus,
            vsock_uds: self.vsock_uds,
            vsock_cid: self.vsock_cid,
            console: self.console,
            cmdline_extra: self.cmdline_extra,
            fs,
            net,
            jail,
            seccomp: self.seccomp,
            seccomp_selftest: self.seccomp_selftest,
        })
    }
}

fn check_fs(socket: PathBuf, tag: String, queue_size: u16) -> Result<FsConfig, ConfigError> {
    use crate::devices::virtio::fs::defs::{MAX_QUEUE_SIZE, TAG_LEN};
    if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
        return Err(ConfigError::FsTag(tag));
    }
    if !queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&queue_size) {
        return Err(ConfigError::FsQueueSize(queue_size));
    }
    let is_socket = std::fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return Err(ConfigError::FsSocketMissing(socket));
    }
    Ok(FsConfig {
        socket,
        tag,
        queue_size,
    })
}

/// Parses `xx:xx:xx:xx:xx:xx` into a unicast, non-zero MAC address.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    let unicast = mac[0] & 1 == 0;
    (parts.next().is_none() && unicast && mac != [0; 6]).then_some(mac)
}

/// The tap must be open, a tun/tap character device (10:200), attached as a tap with the
/// vnet header the device passes frames with (no packet information), its vnet header 12 bytes.
fn check_net(fd: i32, mac: &str, mtu: u16) -> Result<NetConfig, ConfigError> {
    use crate::devices::virtio::net::defs::NET_HDR_SIZE;
    let mac = parse_mac(mac).ok_or_else(|| ConfigError::NetMac(mac.to_string()))?;
    if mtu < 68 {
        return Err(ConfigError::NetMtu(mtu));
    }
    let bad = |why: String| ConfigError::NetTap(fd, why);
    if fd <= 2 {
        return Err(bad("standard streams are not taps".into()));
    }
    let st = nix::sys::stat::fstat(fd).map_err(|e| bad(format!("fstat: {e}")))?;
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if !is_char || libc::major(st.st_rdev) != 10 || libc::minor(st.st_rdev) != 200 {
        return Err(bad("not /dev/net/tun".into()));
    }
    // SAFETY: ifreq is plain old data; zeroes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes the ifreq, which outlives the call; `fd` is open (fstat above).
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF as libc::Ioctl, &mut req) } < 0 {
        return Err(bad(format!(
            "not attached to an interface: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if flags & (want | libc::IFF_TUN) != want {
        return Err(bad(format!(
            "flags {flags:#x}: a tap with IFF_NO_PI and IFF_VNET_HDR is needed"
        )));
    }
    let mut size: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int, which outlives the call.
    if unsafe { libc::ioctl(fd, libc::TUNGETVNETHDRSZ as libc::Ioctl, &mut size) } < 0 {
        return Err(bad(format!(
            "TUNGETVNETHDRSZ: {}",
            std::io::Error::last_os_error()
        )));
    }
    if size as usize != NET_HDR_SIZE {
        return Err(bad(format!(
            "vnet header size {size}, {NET_HDR_SIZE} needed (TUNSETVNETHDRSZ)"
        )));
    }
    Ok(NetConfig {
        tap_fd: fd,
        mac,
        mtu,
    })
}

fn check_kernel(path: &Path) -> Result<(), ConfigError> {
    let unreadable = |source| ConfigError::KernelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(unreadable)?;
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if magic == ELF_MAGIC => Ok(()),
        Ok(()) => Err(ConfigError::KernelNotElf(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ConfigError::KernelNotElf(path.to_path_buf()))
        }
        Err(e) => Err(unreadable(e)),
    }
}

/// The socket path must be free, or a stale socket left by a dead VMM (which we may replace).
fn check_uds_path(path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().len() > SUN_PATH_MAX {
        return Err(ConfigError::UdsTooLong(path.to_path_buf()));
    }
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                Err(ConfigError::UdsInUse(path.to_path_buf()))
            } else {
                Ok(())
            }
        }
        Ok(_) => Err(ConfigError::UdsPathTaken(path.to_path_buf())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn elf_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF\x02\x01\x01").unwrap();
        f
    }

    fn parse(args: &[&str]) -> Result<CliArgs, clap::Error> {
        CliArgs::try_parse_from(std::iter::once("husk-vmm").chain(args.iter().copied()))
    }

    #[test]
    fn mac_addresses_are_parsed_strictly() {
        assert_eq!(
            parse_mac("02:68:75:73:6b:0a"),
            Some([0x02, 0x68, 0x75, 0x73, 0x6b, 0x0a])
        );
        for bad in [
            "",
            "02:68:75:73:6b",
            "02:68:75:73:6b:0a:01",
            "02:68:75:73:6b:0g",
            "2:68:75:73:6b:0a",
            "01:00:5e:00:00:01", // multicast
            "00:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    /// Opens a tap in the calling thread's network namespace with `flags`, vnet header `size`.
    fn tap(flags: i32, size: Option<i32>) -> std::os::fd::OwnedFd {
        use std::os::fd::{AsRawFd, FromRawFd};
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun");
        // SAFETY: as in check_net.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_ifru.ifru_flags = flags as i16;
        // SAFETY: TUNSETIFF reads and updates the ifreq, which outlives the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as libc::Ioctl, &mut req) };
        assert!(r >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        if let Some(size) = size {
            // SAFETY: TUNSETVNETHDRSZ reads one int, which outlives the call.
            let r =
                unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ as libc::Ioctl, &size) };
            assert!(r >= 0);
        }
        // SAFETY: the File is consumed, its descriptor moves to the OwnedFd.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
    }

    /// What `--net-tap-fd` accepts, on real taps in a network namespace of the test's own
    /// (needs root, as every test host here has).
    #[test]
    fn only_a_tap_set_up_for_the_device_is_accepted() {
        use std::os::fd::AsRawFd;
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let mac = "02:00:00:00:00:02";
            let good = tap(
                libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
                Some(12),
            );
            let config = check_net(good.as_raw_fd(), mac, 1500).unwrap();
            assert_eq!(config.mac, [2, 0, 0, 0, 0, 2]);
            let refused = |fd: i32, why: &str| match check_net(fd, mac, 1500) {
                Err(ConfigError::NetTap(got, text)) => {
                    assert_eq!(got, fd);
                    assert!(text.contains(why), "{text}");
                }
                other => panic!("fd {fd} accepted or wrong error: {other:?}"),
            };
            let devnull = std::fs::File::open("/dev/null").unwrap();
            refused(devnull.as_raw_fd(), "not /dev/net/tun");
            refused(1, "standard streams");
            refused(9999, "fstat");
            let tun = tap(
                libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
                Some(12),
            );
            refused(tun.as_raw_fd(), "a tap with");
            let no_vnet = tap(libc::IFF_TAP | libc::IFF_NO_PI, None);
            refused(no_vnet.as_raw_fd(), "a tap with");
            let short_hdr = tap(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR, None);
            refused(short_hdr.as_raw_fd(), "vnet header size 10");
            assert!(matches!(
                check_net(good.as_raw_fd(), mac, 67),
                Err(ConfigError::NetMtu(67))
            ));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn missing_required_args_are_usage_errors() {
        let err = parse(&["--mem-mib", "128"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn non_numeric_values_are_usage_errors() {
        let err = parse(&["--kernel", "k", "--vsock-uds", "u", "--vcpus", "two"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let err = parse(&["--kernel", "k", "--vsock-uds", "u", "--vcpus", "300"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn help_and_version_are_recognised() {
        assert_eq!(
            parse(&["--help"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayHelp
        );
        assert_eq!(
            parse(&["--version"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayVersion
        );
    }

    #[test]
    fn console_targets_parse() {
        assert_eq!("stdout".parse::<ConsoleTarget>(), Ok(ConsoleTarget::Stdout));
        assert_eq!("off".parse::<ConsoleTarget>(), Ok(ConsoleTarget::Off));
        assert_eq!(
            "/tmp/c.log".parse::<ConsoleTarget>(),
            Ok(ConsoleTarget::File("/tmp/c.log".into()))
        );
    }

    #[test]
    fn valid_config_passes() {
        let k = elf_file();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let args = parse(&[
            "--kernel",
            k.path().to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
            "--vcpus",
            "2",
            "--mem-mib",
            "128",
        ])
        .unwrap();
        let cfg = args.validate().unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.vsock_cid, DEFAULT_GUEST_CID);
        assert_eq!(cfg.console, ConsoleTarget::Stdout);
    }

    fn validate_with(extra: &[&str], kernel: &Path, uds: &Path) -> Result<VmConfig, ConfigError> {
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        parse(&args).unwrap().validate()
    }

    #[test]
    fn semantic_errors_are_reported() {
        let k = elf_file();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let e = validate_with(&["--vcpus", "0"], k.path(), &uds).unwrap_err();
        assert!(matches!(e, ConfigError::Vcpus(0)));
        assert!(e.is_usage());
        let e = validate_with(&["--vcpus", "33"], k.path(), &uds).unwrap_err();
        assert!(matches!(e, ConfigError::Vcpus(33)));
        let e = validate_with(&["--mem-mib", "8"], k.path(), &uds).unwrap_err();
        assert!(matches!(e, ConfigError::MemSize(8)));
        let e = validate_with(&["--mem-mib", "999999999"], k.path(), &uds).unwrap_err();
        assert!(matches!(e, ConfigError::MemSize(_)));
        let e = validate_with(&["--vsock-cid", "2"], k.path(), &uds).unwrap_err();
        assert!(matches!(e, ConfigError::Cid(2)));
        let e = validate_with(&[], &dir.path().join("missing"), &uds).unwrap_err();
        assert!(matches!(e, ConfigError::KernelUnreadable { .. }));
        assert!(!e.is_usage());
        assert!(e.to_string().starts_with("Cannot open kernel"));
        let missing_initrd = dir.path().join("nope.cpio");
        let e = validate_with(
            &["--initrd", missing_initrd.to_str().unwrap()],
            k.path(),
            &uds,
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::InitrdUnreadable { .. }));
    }

    #[test]
    fn fs_options_are_checked() {
        let k = elf_file();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let fs_sock = dir.path().join("fs.sock");
        let fs = fs_sock.to_str().unwrap();
        assert!(parse(&["--kernel", "k", "--vsock-uds", "u", "--fs-socket", fs]).is_err());
        let e = validate_with(&["--fs-socket", fs, "--fs-tag", "husk"], k.path(), &uds);
        assert!(matches!(e, Err(ConfigError::FsSocketMissing(_))));
        assert!(!e.unwrap_err().is_usage());
        let _listener = std::os::unix::net::UnixListener::bind(&fs_sock).unwrap();
        let long = "x".repeat(37);
        let e = validate_with(&["--fs-socket", fs, "--fs-tag", &long], k.path(), &uds);
        assert!(matches!(e, Err(ConfigError::FsTag(_))));
        let e = validate_with(
            &[
                "--fs-socket",
                fs,
                "--fs-tag",
                "husk",
                "--fs-queue-size",
                "1000",
            ],
            k.path(),
            &uds,
        );
        assert!(matches!(e, Err(ConfigError::FsQueueSize(1000))));
        let cfg = validate_with(&["--fs-socket", fs, "--fs-tag", "husk"], k.path(), &uds).unwrap();
        let fs_cfg = cfg.fs.unwrap();
        assert_eq!(fs_cfg.tag, "husk");
        assert_eq!(fs_cfg.queue_size, 1024);
        assert!(validate_with(&[], k.path(), &uds).unwrap().fs.is_none());
    }

    #[test]
    fn non_elf_kernel_is_rejected() {
        let mut bz = tempfile::NamedTempFile::new().unwrap();
        bz.write_all(b"MZ\x00\x00 not an elf").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = validate_with(&[], bz.path(), &dir.path().join("v.sock")).unwrap_err();
        assert!(matches!(e, ConfigError::KernelNotElf(_)));
    }

    #[test]
    fn uds_path_rules() {
        let k = elf_file();
        let dir = tempfile::tempdir().unwrap();
        // A regular file in the way.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = validate_with(&[], k.path(), &file).unwrap_err();
        assert!(matches!(e, ConfigError::UdsPathTaken(_)));
        // A live listener.
        let live = dir.path().join("live.sock");
        let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let e = validate_with(&[], k.path(), &live).unwrap_err();
        assert!(matches!(e, ConfigError::UdsInUse(_)));
        // A stale socket is fine.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        validate_with(&[], k.path(), &stale).unwrap();
    }
}
