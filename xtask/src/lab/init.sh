#!/bin/sh
# PID 1 of the husk lab's L1 Linux (packed by xtask/src/lab/image.rs; busybox applets).
# Loads the KVM and 9p modules, checks /dev/kvm, mounts the host root shared
# read-only over virtio-9p as the root of the mount namespace and runs the job the host
# wrote into the `huskjob` share, chrooted there.
# It talks to the host only through marker lines `HUSK-LAB-<EVENT> <nonce> ...`.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

NONCE=unknown
KVM_AMD_PARAMS=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        husk_lab.nonce=*) NONCE="${arg#husk_lab.nonce=}" ;;
        # kvm_amd's module parameters (HUSK_LAB_L1_CMDLINE), comma-separated: insmod takes
        # them as arguments, the kernel command line does not reach it.
        husk_lab.kvm_amd=*) KVM_AMD_PARAMS=$(echo "${arg#husk_lab.kvm_amd=}" | tr , ' ') ;;
    esac
done

die() {
    echo "HUSK-LAB-FAIL $NONCE $*"
    dmesg | tail -n 40
    sync
    reboot -f
    sleep 60
}

for ko in $(cat /lib/modules/load-order); do
    params=
    case "$ko" in kvm_amd.ko) params="$KVM_AMD_PARAMS" ;; esac
    # One word per parameter: $params unquoted on purpose.
    insmod "/lib/modules/$ko" $params || die "insmod $ko $params failed"
done
[ -n "$KVM_AMD_PARAMS" ] && echo "husk lab: kvm_amd $KVM_AMD_PARAMS"
[ -c /dev/kvm ] || die "no /dev/kvm after loading kvm_amd"
# The L1 KVM runs its guests on shadow paging by default (husk_lab.kvm_amd=npt=0, set by the
# host: the emulated nested paging lets L2 guests triple-fault, BENCHMARKS.md); an experiment
# that asks for nested paging (npt=1) must get it.
case " $KVM_AMD_PARAMS " in
    *" npt=1 "*) dmesg | grep -q "Nested Paging enabled" || die "kvm_amd loaded without nested paging" ;;
esac
echo "HUSK-LAB-KVM $NONCE"
# From here the console belongs to the command: keep routine kernel messages off it, unless
# the lab was started verbose (HUSK_LAB_VERBOSE=1 boots without `quiet`). Level 5 still shows
# warnings and oopses with their traces: an L1 that dies says where.
grep -qw quiet /proc/cmdline && echo 5 > /proc/sys/kernel/printk

P9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /job /newroot
mount -t 9p -o "$P9" huskjob /job || die "cannot mount the job share"
. /job/config.sh
# Kernel text symbols for the host's report on a silent L1: asked for once per kernel
# (nokaslr keeps the addresses valid from one boot to the next).
[ -e /job/kallsyms.want ] && grep ' [tTwW] ' /proc/kallsyms > /job/kallsyms
mount -t 9p -o "$P9,ro,cache=loose" hostroot /newroot || die "cannot mount the host root"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=755 tmpfs /newroot/run
# CNI keeps its results cache in /var/lib/cni (`cargo xtask setup` makes the directory on the
# host, as a node has it): writable here, fresh for every lab.
[ -d /newroot/var/lib/cni ] && mount -t tmpfs -o mode=700 tmpfs /newroot/var/lib/cni
mkdir -p /newroot/run/husk-lab
mount --bind /job /newroot/run/husk-lab
set -- $RW_SHARES
while [ $# -ge 2 ]; do
    # A share under the lab's fresh /tmp or /run needs its mount point made first.
    [ -d "/newroot$2" ] || mkdir -p "/newroot$2"
    mount -t 9p -o "$P9,cache=mmap" "$1" "/newroot$2" || die "cannot mount share $1 at $2"
    shift 2
done
ip link set lo up 2>/dev/null

# The L1's page migration and compaction counters around the command (issue 8: does the
# L1 move the guest's pages, behind the nested page tables, when guests die?).
VMSTAT_KEYS='^(pgmigrate_success|pgmigrate_fail|compact_migrate_scanned|compact_stall|compact_success|thp_fault_alloc|thp_collapse_alloc|thp_split_page|numa_pages_migrated|pgsteal_kswapd|pgsteal_direct|allocstall_normal|allocstall_movable) '
grep -E "$VMSTAT_KEYS" /proc/vmstat > /vmstat.before
echo "HUSK-LAB-START $NONCE"
# The host root becomes the root of the mount namespace, as switch_root makes it: moved onto
# the initramfs' `/`. A plain chroot would leave the initramfs as the namespace's root, and a
# process that enters a container's mount namespace (`runc exec`) would land there instead
# of in the container. This shell keeps the initramfs as its own root (a root directory is
# not a mount crossing) and runs the command chrooted in the moved host root, its cwd.
cd /newroot || die "cannot enter the host root"
mount --move . / || die "cannot move the host root onto /"
chroot . /bin/sh /run/husk-lab/run.sh </dev/null
rc=$?
sync
grep -E "$VMSTAT_KEYS" /proc/vmstat > /vmstat.after
vm_line() { out=""; while read -r k v; do out="$out $k=$v"; done < "$1"; echo "$out"; }
echo "husk lab: L1 vmstat before the command:$(vm_line /vmstat.before)"
echo "husk lab: L1 vmstat after the command:$(vm_line /vmstat.after)"
echo "HUSK-LAB-EXIT $NONCE $rc"
set -- $RW_SHARES
while [ $# -ge 2 ]; do
    chroot . /bin/umount "$2" 2>/dev/null
    shift 2
done
reboot -f
sleep 60
