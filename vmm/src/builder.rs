//! Builds and runs one VM from a [`VmConfig`]: KVM VM with in-kernel irqchip and PIT, guest
//! memory, devices on the buses, the PVH-loaded kernel, vCPU threads and the event loop. Returns
//! when the VM ends, with the classified [`ExitStatus`].

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::{Address, GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{self as arch, layout};
use crate::config::{ConsoleTarget, VmConfig};
use crate::devices::legacy::boot_port::{BootPort, BOOT_PORT};
use crate::devices::legacy::i8042::{I8042Device, I8042_DATA_PORT, I8042_PORT_SPAN};
use crate::devices::legacy::serial::{
    ConsoleWriter, SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORT_COUNT,
};
use crate::devices::legacy::IrqFdTrigger;
use crate::devices::virtio::fs::{FsDevice, FsError, FsHandler, VhostUserFs};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{NetDevice, NetError, NetHandler};
use crate::devices::virtio::vsock::{VsockDevice, VsockHandler};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::{lock, Bus};
use crate::event_loop::{block_stop_signals, EventLoop, SignalSubscriber, StateDump};
use crate::exit::{ExitEvent, ExitNotifier, ExitStatus};
use crate::memory::{create_guest_memory, GuestMemory};
use crate::seccomp::{self, SeccompMode, ThreadKind};
use crate::vcpu::{Buses, Vcpu};

/// Places a virtio device in the MMIO window at `base` with interrupt line `irq`: its irqfd,
/// one ioeventfd per queue on the QueueNotify register, and its transport on the bus. Returns
/// the device's interrupt.
fn attach_mmio_device(
    vm: &VmFd,
    mmio: &mut Bus,
    mem: &GuestMemory,
    device: Arc<Mutex<dyn VirtioDevice>>,
    base: u64,
    irq: u32,
) -> Result<Arc<VirtioInterrupt>, BuildError> {
    let interrupt = Arc::new(VirtioInterrupt::new(irqfd(vm, irq)?));
    for (index, evt) in lock(&device).queue_events().iter().enumerate() {
        let addr = IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
        vm.register_ioevent(evt, &addr, index as u32)
            .map_err(vm_err("KVM_IOEVENTFD"))?;
    }
    let transport = MmioTransport::new(device, mem.clone(), interrupt.clone());
    mmio.insert(
        base,
        layout::VIRTIO_MMIO_WINDOW_SIZE,
        Arc::new(Mutex::new(transport)),
    )?;
    Ok(interrupt)
}

/// Fixed part of the guest command line (docs/contracts.md). The `i8042.*` words stop the
/// guest's keyboard-controller driver from probing for a mouse, a multiplexer and a keyboard
/// that do not exist: each probe waits for a timeout, ~2 s of boot under nested KVM.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 quiet reboot=t panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Building the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// /dev/kvm cannot be opened
    #[error("Cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A required KVM capability is missing
    #[error("KVM lacks the required capability {0:?}")]
    MissingCap(Cap),
    /// A KVM VM ioctl failed
    #[error("KVM {0} failed")]
    VmIoctl(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory setup failed
    #[error("Cannot set up guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    /// Boot setup failed
    #[error("Cannot set up the guest boot")]
    Boot(#[from] arch::BootError),
    /// Creating an eventfd failed
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The console file cannot be opened
    #[error("Cannot open console file {0}")]
    Console(String, #[source] std::io::Error),
    /// Device setup failed
    #[error("Cannot set up the vsock device")]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// virtio-fs setup failed
    #[error("Cannot set up the virtio-fs device")]
    Fs(#[from] FsError),
    /// virtio-net setup failed
    #[error("Cannot set up the virtio-net device")]
    Net(#[from] NetError),
    /// Bus setup failed
    #[error("Cannot place a device")]
    Bus(#[from] crate::devices::BusError),
    /// Signal setup failed
    #[error("Cannot set up signal handling")]
    Signals(#[source] nix::Error),
    /// Thread or event loop setup failed
    #[error("Cannot start a VMM thread")]
    Thread(#[source] std::io::Error),
    /// The jail could not be entered
    #[error("Cannot jail the VMM")]
    Jail(#[from] crate::jail::JailError),
    /// A seccomp filter could not be built or installed
    #[error("Cannot filter the VMM's syscalls")]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

fn vm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |e| BuildError::VmIoctl(what, e)
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, BuildError> {
    for cap in [
        Cap::Irqchip,
        Cap::Irqfd,
        Cap::Ioeventfd,
        Cap::Pit2,
        Cap::UserMemory,
    ] {
        if !kvm.check_extension(cap) {
            return Err(BuildError::MissingCap(cap));
        }
    }
    let vm = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(vm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(vm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), BuildError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).map_err(|_| {
            BuildError::VmIoctl(
                "KVM_SET_USER_MEMORY_REGION",
                kvm_ioctls::Error::new(libc::EFAULT),
            )
        })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `mem`, which outlives the VM (both live until process
        // exit), and the guest ranges of the regions do not overlap.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn console_writer(
    target: &ConsoleTarget,
    exit: &ExitNotifier,
) -> Result<ConsoleWriter, BuildError> {
    let out: Option<Box<dyn Write + Send>> = match target {
        ConsoleTarget::Stdout => Some(Box::new(std::io::stdout())),
        ConsoleTarget::Off => None,
        ConsoleTarget::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| BuildError::Console(path.display().to_string(), e))?;
            Some(Box::new(std::io::LineWriter::new(file)))
        }
    };
    Ok(ConsoleWriter::new(out, exit.observations.clone()))
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, BuildError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&evt, gsi).map_err(vm_err("KVM_IRQFD"))?;
    Ok(evt)
}

/// The full guest command line.
pub fn build_cmdline(tsc_khz: Option<u32>, virtio: &[(u64, u32)], extra: Option<&str>) -> String {
    let mut cmdline = BASE_CMDLINE.to_string();
    if let Some(khz) = tsc_khz {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    for (base, irq) in virtio {
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    if let Some(extra) = extra.filter(|e| !e.trim().is_empty()) {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    cmdline
}

/// Builds the VM, runs it and returns how it ended. `launched` is when the process started (the
/// boot timer's origin).
pub fn run_vm(config: &VmConfig, launched: Instant) -> Result<ExitStatus, BuildError> {
    // Before any thread exists, so every thread inherits the mask and only the signalfd sees them.
    block_stop_signals().map_err(BuildError::Signals)?;
    let (exit, exit_rx) = ExitNotifier::new();

    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    let vm = create_vm(&kvm)?;
    let (mem, _memfd) = create_guest_memory(config.mem_size_mib)?;
    register_memory(&vm, &mem)?;

    // Legacy devices on the port bus.
    let mut pio = Bus::new();
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        IrqFdTrigger(irqfd(&vm, COM1_IRQ)?),
        console_writer(&config.console, &exit)?,
    )));
    pio.insert(COM1_PORT, COM1_PORT_COUNT, serial.clone())?;
    pio.insert(
        I8042_DATA_PORT,
        I8042_PORT_SPAN,
        Arc::new(Mutex::new(I8042Device::new(exit.clone()))),
    )?;
    pio.insert(
        BOOT_PORT,
        1,
        Arc::new(Mutex::new(BootPort::new(
            launched,
            exit.observations.clone(),
        ))),
    )?;

    // virtio-vsock on the MMIO bus.
    let mut mmio = Bus::new();
    let vsock = Arc::new(Mutex::new(VsockDevice::new(
        config.vsock_cid,
        &config.vsock_uds,
    )?));
    let vsock_base = layout::VIRTIO_MMIO_BASE;
    let vsock_irq = layout::VIRTIO_IRQ_BASE;
    attach_mmio_device(&vm, &mut mmio, &mem, vsock.clone(), vsock_base, vsock_irq)?;
    let mut virtio_windows = vec![(vsock_base, vsock_irq)];

    // virtio-fs (vhost-user, served by virtiofsd) in the next window.
    let mut fs_handler = None;
    if let Some(fs) = &config.fs {
        let base = vsock_base + layout::VIRTIO_MMIO_WINDOW_SIZE;
        let irq = vsock_irq + 1;
        let backend = VhostUserFs::connect(&fs.socket)?;
        let socket = backend
            .socket()
            .try_clone_to_owned()
            .map_err(FsError::SocketDup)?;
        let device = FsDevice::new(backend, &fs.tag, fs.queue_size, exit.clone())?;
        let call_events = device.call_events()?;
        let device = Arc::new(Mutex::new(device));
        let interrupt = attach_mmio_device(&vm, &mut mmio, &mem, device, base, irq)?;
        fs_handler = Some(FsHandler::new(
            call_events,
            socket,
            interrupt.clone(),
            exit.clone(),
            fs.socket.display().to_string(),
        ));
        virtio_windows.push((base, irq));
        tracing::info!(socket = %fs.socket.display(), tag = %fs.tag, "virtio-fs device connected to virtiofsd");
    }

    // virtio-net on the pod's tap, in the next window.
    let mut net_device = None;
    if let Some(net) = &config.net {
        let index = virtio_windows.len();
        let base = vsock_base + index as u64 * layout::VIRTIO_MMIO_WINDOW_SIZE;
        let irq = vsock_irq + index as u32;
        // SAFETY: the descriptor was inherited for this device and checked to be an open tap
        // (config::check_net); nothing else in this process owns it.
        let tap =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(net.tap_fd) };
        let device = Arc::new(Mutex::new(NetDevice::new(tap, net.mac, net.mtu)?));
        attach_mmio_device(&vm, &mut mmio, &mem, device.clone(), base, irq)?;
        virtio_windows.push((base, irq));
        tracing::info!(
            mac = %crate::devices::virtio::net::format_mac(&net.mac),
            mtu = net.mtu,
            "virtio-net device on the tap"
        );
        net_device = Some(device);
    }

    // vCPUs (vCPU 0 first: KVM_GET_TSC_KHZ is a vCPU ioctl).
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(vm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let vcpu_fds = (0..config.vcpus)
        .map(|id| {
            vm.create_vcpu(u64::from(id))
                .map_err(vm_err("KVM_CREATE_VCPU"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tsc_khz = match vcpu_fds[0].get_tsc_khz() {
        Ok(khz) => Some(khz),
        Err(e) => {
            tracing::warn!(error = %e, "KVM_GET_TSC_KHZ failed; not passing tsc_early_khz");
            None
        }
    };

    // Kernel, initrd, command line, boot tables.
    let boot = arch::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(arch::load_initrd(&mem, path, boot.kernel_end)?),
        None => None,
    };
    let cmdline = build_cmdline(tsc_khz, &virtio_windows, config.cmdline_extra.as_deref());
    tracing::debug!(%cmdline, entry = format!("{:#x}", boot.entry.raw_value()), "booting");
    arch::load_cmdline(&mem, &cmdline)?;
    arch::mptable::setup_mptable(&mem, config.vcpus).map_err(arch::BootError::from)?;
    arch::configure_pvh(&mem, initrd)?;
    for (id, fd) in vcpu_fds.iter().enumerate() {
        arch::configure_vcpu(
            fd,
            &mem,
            &supported_cpuid,
            id as u8,
            config.vcpus,
            boot.entry,
        )?;
    }

    // vCPUs, made before the event loop so its state dump can count their exits.
    let buses = Buses {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
    };
    let vcpus: Vec<Vcpu> = vcpu_fds
        .into_iter()
        .enumerate()
        .map(|(id, fd)| Vcpu::new(fd, id as u8, buses.clone(), exit.clone(), mem.clone()))
        .collect();
    let exit_counters: Vec<_> = vcpus.iter().map(Vcpu::exit_counter).collect();
    let probes: Vec<_> = vcpus.iter().map(Vcpu::regs_probe).collect();
    crate::vcpu::install_kick_handler().map_err(BuildError::Thread)?;
    seccomp::install_sigsys_handler().map_err(BuildError::Thread)?;
    // The vCPU threads' handles, filled in once they are spawned below.
    let vcpu_threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    let dump_threads = vcpu_threads.clone();
    let dump_vsock = vsock.clone();
    let mut dumps: Vec<StateDump> = vec![
        Box::new(move || {
            let counts: Vec<String> = exit_counters
                .iter()
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed).to_string())
                .collect();
            let threads = crate::devices::lock(&dump_threads);
            let regs: Vec<String> = probes
                .iter()
                .zip(threads.iter())
                .enumerate()
                .map(|(i, (probe, thread))| {
                    format!(
                        "vCPU {i}: {}",
                        probe.read(thread, std::time::Duration::from_millis(300))
                    )
                })
                .collect();
            format!(
                "vCPU exits so far: [{}]; {}",
                counts.join(", "),
                regs.join("; ")
            )
        }),
        Box::new(move || crate::devices::lock(&dump_vsock).state_dump()),
    ];
    if let Some(net) = &net_device {
        let net = net.clone();
        dumps.push(Box::new(move || crate::devices::lock(&net).state_dump()));
    }

    // Event loop thread.
    let mut event_loop = EventLoop::new().map_err(BuildError::Thread)?;
    event_loop
        .add_subscriber(Box::new(
            SignalSubscriber::new(exit.clone(), dumps).map_err(BuildError::Signals)?,
        ))
        .map_err(BuildError::Thread)?;
    event_loop
        .add_subscriber(Box::new(VsockHandler(vsock.clone())))
        .map_err(BuildError::Thread)?;
    if let Some(handler) = fs_handler {
        event_loop
            .add_subscriber(Box::new(handler))
            .map_err(BuildError::Thread)?;
    }
    if let Some(net) = &net_device {
        event_loop
            .add_subscriber(Box::new(NetHandler(net.clone())))
            .map_err(BuildError::Thread)?;
    }
    // The jail and the filters, before any thread that serves the guest starts.
    let pid = std::process::id();
    let filter = |kind| seccomp::program(kind, config.seccomp, pid);
    let (main_filter, events_filter, vcpu_filter) = (
        filter(ThreadKind::Main)?,
        filter(ThreadKind::Events)?,
        filter(ThreadKind::Vcpu)?,
    );
    if let Some(jail) = &config.jail {
        let applied = crate::jail::enter(jail)?;
        tracing::info!(%applied, "VMM jailed");
    }
    let selftest = config.seccomp_selftest;

    // Event loop thread: its filter first, then its first wait.
    let loop_exit = exit.clone();
    let (filtered_tx, filtered_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("husk-events".into())
        .spawn(move || {
            let installed = seccomp::install(ThreadKind::Events, events_filter.as_ref());
            let ok = installed.is_ok();
            let _ = filtered_tx.send(installed);
            if !ok {
                return;
            }
            if selftest == Some(ThreadKind::Events) {
                seccomp::forbidden_syscall();
            }
            let e = event_loop.run();
            loop_exit.notify(ExitEvent::VmmError(format!("event loop failed: {e}")));
        })
        .map_err(BuildError::Thread)?;
    filtered_rx
        .recv()
        .map_err(|_| BuildError::Thread(std::io::Error::other("the event loop thread ended")))??;

    // vCPU threads: each installs its filter, then all wait until the main thread's is on.
    let start = Arc::new(std::sync::Barrier::new(vcpus.len() + 1));
    let go = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (filtered_tx, filtered_rx) = std::sync::mpsc::channel();
    let count = vcpus.len();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (start, go, filtered_tx) = (start.clone(), go.clone(), filtered_tx.clone());
        let vcpu_filter = vcpu_filter.clone();
        let handle = std::thread::Builder::new()
            .name(format!("husk-vcpu{id}"))
            .spawn(move || {
                let _ = filtered_tx.send(seccomp::install(ThreadKind::Vcpu, vcpu_filter.as_ref()));
                start.wait();
                if !go.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                if selftest == Some(ThreadKind::Vcpu) {
                    seccomp::forbidden_syscall();
                }
                vcpu.run()
            })
            .map_err(BuildError::Thread)?;
        crate::devices::lock(&vcpu_threads).push(handle);
    }
    drop(filtered_tx);
    let mut installed: Result<(), BuildError> = Ok(());
    for _ in 0..count {
        match filtered_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => installed = Err(e.into()),
            Err(_) => {
                installed = Err(BuildError::Thread(std::io::Error::other(
                    "a vCPU thread ended",
                )))
            }
        }
    }
    if installed.is_ok() {
        installed = seccomp::install(ThreadKind::Main, main_filter.as_ref()).map_err(Into::into);
    }
    go.store(installed.is_ok(), std::sync::atomic::Ordering::SeqCst);
    start.wait();
    installed?;
    if config.seccomp != SeccompMode::Off {
        tracing::info!(mode = ?config.seccomp, "seccomp filters on: main, events, vcpu");
    }
    if selftest == Some(ThreadKind::Main) {
        seccomp::forbidden_syscall();
    }
    tracing::info!(
        vcpus = config.vcpus,
        mem_size_mib = config.mem_size_mib,
        uds = %config.vsock_uds.display(),
        "VM started"
    );

    // `exit` itself keeps the channel open, so recv only fails if every sender vanished.
    let event = exit_rx
        .recv()
        .unwrap_or_else(|_| ExitEvent::VmmError("all VMM threads ended".into()));
    lock(&serial).flush();
    if config.jail.is_none() {
        // A jailed VMM cannot see it any more; the shim removes the pod directory.
        let _ = std::fs::remove_file(&config.vsock_uds);
    }
    let status = exit.observations.classify(&event);
    match &event {
        ExitEvent::VmmError(msg) => tracing::error!("{msg}"),
        other if status == ExitStatus::AgentFailed => tracing::error!(
            event = ?other,
            ?status,
            "VM ended: the guest agent failed before it was ready (see the guest console)"
        ),
        other => tracing::info!(event = ?other, ?status, "VM ended"),
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_contract_parts() {
        let c = build_cmdline(Some(2_000_000), &[(0xd000_0000, 5)], Some(" loglevel=7 "));
        assert_eq!(
            c,
            "console=ttyS0 quiet reboot=t panic=-1 i8042.noaux i8042.nomux i8042.nopnp \
             i8042.dumbkbd tsc_early_khz=2000000 \
             virtio_mmio.device=4K@0xd0000000:5 loglevel=7"
        );
        assert!(!build_cmdline(None, &[], None).contains("tsc_early_khz"));
    }
}
