#!/bin/sh
# dom0's /init in the blkif-conformance lab (blkif_spec/lab/guest/init.sh, put in each run's image).
# Sets up a Xen dom0 without systemd or udev, runs $SHARE/jobs.sh (the plan, written by the host
# into the 9p share), then powers off. Lines starting with "LAB-" are markers the host watches on
# the serial log; every step logs and goes on when it fails, so the jobs report what is missing.
# PID 1 must never exit (the kernel would panic): the script ends in poweroff and a sleep loop.

XENBIN=/usr/lib/xen-4.17/bin   # xl, xenstored, xen-init-dom0 without Debian's version wrapper
export PATH=$XENBIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
SHARE=/mnt/host0
NLOOP=4        # loop devices over 64 MiB sparse files in /tmp: /dev/loop0 .. /dev/loop3
LOOP_MIB=64

mark() { echo "LAB-$1 $(cut -d' ' -f1 /proc/uptime 2>/dev/null) ${2:-}"; }
try() { "$@" || echo "LAB-WARN exit $? from: $*"; }
wait_for() {   # PATH TENTHS: bounded wait for a file or socket to appear
    n=0
    while [ ! -e "$1" ] && [ "$n" -lt "$2" ]; do sleep 0.1; n=$((n + 1)); done
    [ -e "$1" ]
}
poweroff_now() {
    sync & s=$!   # bounded: a device wedged by a host_hazard test can hang sync for good
    n=0
    while kill -0 "$s" 2>/dev/null && [ "$n" -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    mark DONE
    echo o >/proc/sysrq-trigger
    while :; do sleep 60; done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mark INIT "$(uname -r)"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
# Without udev these links are missing, and Xen's hotplug locking.sh spins on /dev/stdin.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /run/lock /run/xen /run/xenstored /var/lib/xen /var/lib/xenstored /var/log/xen
hostname dom0

# Results channel first, so the xenstored trace and every job's output land on the host directly.
for m in virtio_pci 9pnet_virtio 9p; do try modprobe "$m"; done
mkdir -p "$SHARE"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host0 "$SHARE"; then
    echo "LAB-ERROR cannot mount the 9p share host0: no results can leave the VM"
    poweroff_now
fi

for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback configfs; do try modprobe "$m"; done
# gntalloc hands out 1024 grants in all by default: bench iops holds 16 ring + 512 data pages per queue
try sh -c 'echo 8192 > /sys/module/xen_gntalloc/parameters/limit'
try modprobe loop max_loop=8
try modprobe null_blk nr_devices=1 gb=1
try mount -t xenfs xenfs /proc/xen
try mount -t configfs configfs /sys/kernel/config

mark STEP modules-loaded
# C xenstored with a trace of every request (connection, order): see the notes' "-T FILE". The trace
# lives in tmpfs and is copied to the share at the end: written over 9p, each request took ~1 s.
XS_TRACE=/tmp/xenstored-trace.log
try xenstored --pid-file /run/xenstored.pid -T "$XS_TRACE"
wait_for /run/xenstored/socket 300 || echo "LAB-ERROR xenstored socket did not appear in 30 s"
try xen-init-dom0
mark STEP xenstore-ready

LOOPS=""
i=0
while [ "$i" -lt "$NLOOP" ]; do
    try truncate -s "${LOOP_MIB}M" "/tmp/disk$i.img"
    try losetup "/dev/loop$i" "/tmp/disk$i.img"
    LOOPS="$LOOPS /dev/loop$i"
    i=$((i + 1))
done

mark STEP loop-devices
# QEMU's xen backend (qdisk) as Debian's init script starts it; libxl also wants device-model-pid.
QEMU_DM=/usr/libexec/xen-qemu-system-i386
[ -x /usr/local/lib/blkif-lab/qemu ] && QEMU_DM=/usr/local/lib/blkif-lab/qemu
# Not -daemonize: that sends QEMU's error reports (why a qdisk device was refused) to /dev/null.
LAB_QDISK=0
QEMU_LOG=/tmp/qemu-dom0.log
"$QEMU_DM" -xen-domid 0 -xen-attach -name dom0 -nographic -M xenpv \
    -monitor none -serial none -parallel none -pidfile /run/qemu-dom0.pid >"$QEMU_LOG" 2>&1 </dev/null &
if wait_for /run/qemu-dom0.pid 50 && xenstore-write /local/domain/0/image/device-model-pid \
        "$(cat /run/qemu-dom0.pid)"; then
    LAB_QDISK=1
else
    echo "LAB-WARN QEMU's xen backend did not start: qdisk is unavailable"
fi

{
    echo "kernel=$(uname -r)"
    echo "xen=$(xl info 2>/dev/null | awk -F': *' '/^xen_version/ {print $2}')"
    echo "qemu=$("$QEMU_DM" --version 2>/dev/null | head -n 1) ($QEMU_DM)"
    echo "python=$(python3 --version 2>&1)"
    echo "cpus=$(nproc)"
    echo "mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
} >"$SHARE/guest-info.txt"

# What every job sees (listed in blkif_spec/lab/__init__.py).
export LAB_SHARE=$SHARE LAB_XS_TRACE=$XS_TRACE LAB_LOOPS="${LOOPS# }" LAB_QDISK LAB_QEMU_DM=$QEMU_DM
# /opt/site-packages (a link to /opt/pydeps): Hypothesis scans the source of every module it takes for
# the user's own (not under a "/site-packages/" path) for constants; the dependencies took ~30 s of
# the first test of each job under TCG. Bytecode may be written: pytest then rewrites the test
# modules' assertions once per boot, not once per job.
ln -sfn pydeps /opt/site-packages
export LAB_GUEST=1 PYTHONPATH=/opt/blkif-conformance:/opt/site-packages
mark READY
if [ -f "$SHARE/jobs.sh" ]; then
    sh "$SHARE/jobs.sh"
else
    echo "LAB-ERROR $SHARE/jobs.sh is missing: no jobs run"
fi
mark JOBS-END
cp "$XS_TRACE" "$SHARE/xenstored-trace.log"
cp "$QEMU_LOG" "$SHARE/qemu-dom0.log"
dmesg >"$SHARE/dmesg.txt" 2>&1
timeout -k 5 30 xl dmesg >"$SHARE/xen-dmesg.txt" 2>&1
poweroff_now
