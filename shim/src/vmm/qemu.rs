//! QEMU's command line for the same guest husk-vmm boots: `-M microvm` with KVM, the kernel's
//! `vhost-vsock` as the vsock device (the host reaches the agent at the guest's CID over
//! AF_VSOCK), virtio-fs through `vhost-user-fs-device` on the same virtiofsd, guest memory a
//! shared memfd as husk-vmm's, and the agent's status port (docs/contracts.md, 0x440) watched
//! through an `isa-debugcon` on a Unix socket.
//!
//! QEMU is the reference husk-vmm is measured against (the boot benchmark) and the baseline of
//! the lab experiments: the same guest, agent and workload under another VMM
//! (DESIGN.md, "Hypervisor backends").

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use super::{Console, VmmCommand, GUEST_BASE_CMDLINE};

/// Debian's QEMU binary.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";

/// A QEMU `-M microvm` command line.
///
/// ```
/// use husk_shim::vmm::{QemuCommand, VmmCommand};
/// let guest = VmmCommand::new("/usr/bin/husk-vmm", "/boot/vmlinux", "/run/pod/vsock.sock")
///     .initrd("/boot/initramfs.cpio");
/// let cmd = QemuCommand::like(&guest, 5).command();
/// assert_eq!(cmd.get_program(), "qemu-system-x86_64");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommand {
    program: PathBuf,
    guest: VmmCommand,
    vsock_cid: u32,
    tsc_khz: Option<u64>,
    status_port: Option<PathBuf>,
}

impl QemuCommand {
    /// QEMU booting exactly the guest `guest` describes (kernel, initramfs, memory, vCPUs,
    /// console, command-line words, virtio-fs), with a `vhost-vsock` device at guest CID
    /// `vsock_cid` in place of husk-vmm's hybrid socket.
    pub fn like(guest: &VmmCommand, vsock_cid: u32) -> Self {
        Self {
            program: QEMU_PROGRAM.into(),
            guest: guest.clone(),
            vsock_cid,
            tsc_khz: None,
            status_port: None,
        }
    }

    /// The TSC frequency the guest is told (`tsc_early_khz=`), as husk-vmm tells it the one
    /// KVM reports: without it a nested guest may hang calibrating (DESIGN.md).
    pub fn tsc_khz(mut self, khz: Option<u64>) -> Self {
        self.tsc_khz = khz;
        self
    }

    /// Connect the agent's status port (0x440) to the Unix socket `listener` (the caller
    /// listens there before QEMU starts; QEMU connects and writes each byte the agent
    /// writes).
    pub fn status_port(mut self, listener: impl Into<PathBuf>) -> Self {
        self.status_port = Some(listener.into());
        self
    }

    /// The guest kernel command line: husk-vmm's base line, the TSC frequency and the
    /// caller's words. QEMU adds the `virtio_mmio.device=` words of its own devices.
    pub fn kernel_cmdline(&self) -> String {
        let mut line = GUEST_BASE_CMDLINE.to_owned();
        if let Some(khz) = self.tsc_khz {
            line.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if let Some(extra) = &self.guest.cmdline_extra {
            line.push(' ');
            line.push_str(extra);
        }
        line
    }

    /// The arguments, without the program.
    pub fn args(&self) -> Vec<OsString> {
        let guest = &self.guest;
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |words: &[&str]| args.extend(words.iter().map(OsString::from));
        push(&["-enable-kvm", "-cpu", "host"]);
        push(&[
            "-M",
            "microvm,x-option-roms=off,acpi=off,memory-backend=mem",
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                guest.mem_mib
            ),
            "-m",
            &format!("{}M", guest.mem_mib),
            "-smp",
            &guest.vcpus.to_string(),
        ]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        push(&[
            "-device",
            &format!("vhost-vsock-device,guest-cid={}", self.vsock_cid),
        ]);
        let serial = match &guest.console {
            Console::Off => "null".to_owned(),
            Console::Stdout => "stdio".to_owned(),
            Console::File(path) => format!("file:{}", path.display()),
        };
        push(&["-serial", &serial]);
        if let Some((socket, tag)) = &guest.fs {
            push(&[
                "-chardev",
                &format!("socket,id=husk-fs,path={}", socket.display()),
                "-device",
                &format!("vhost-user-fs-device,chardev=husk-fs,tag={tag}"),
            ]);
        }
        if let Some(listener) = &self.status_port {
            push(&[
                "-chardev",
                &format!("socket,id=husk-status,path={}", listener.display()),
                "-device",
                "isa-debugcon,iobase=0x440,chardev=husk-status",
            ]);
        }
        args.extend(["-kernel".into(), guest.kernel.clone().into()]);
        if let Some(initrd) = &guest.initrd {
            args.extend(["-initrd".into(), initrd.clone().into()]);
        }
        args.extend(["-append".into(), self.kernel_cmdline().into()]);
        args
    }

    /// A `Command` running QEMU with these arguments (stdio left to the caller).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args());
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qemu_guest_is_husk_vmms_guest() {
        let guest = VmmCommand::new("/husk-vmm", "/k", "/s/v.sock")
            .initrd("/i")
            .mem_mib(512)
            .vcpus(2)
            .console(Console::File("/c.log".into()))
            .cmdline_extra("husk.log=debug")
            .fs("/s/fs.sock", "husk");
        let cmd = QemuCommand::like(&guest, 9)
            .tsc_khz(Some(2_000_000))
            .status_port("/s/status.sock");
        let joined = cmd
            .args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        for want in [
            "-enable-kvm -cpu host",
            "memory-backend-memfd,id=mem,size=512M,share=on -m 512M -smp 2",
            "-device vhost-vsock-device,guest-cid=9",
            "-serial file:/c.log",
            "socket,id=husk-fs,path=/s/fs.sock -device vhost-user-fs-device,chardev=husk-fs,tag=husk",
            "socket,id=husk-status,path=/s/status.sock -device isa-debugcon,iobase=0x440",
            "-kernel /k -initrd /i -append",
        ] {
            assert!(joined.contains(want), "{want:?} missing from {joined}");
        }
        assert_eq!(
            cmd.kernel_cmdline(),
            format!("{GUEST_BASE_CMDLINE} tsc_early_khz=2000000 husk.log=debug")
        );
    }
}
