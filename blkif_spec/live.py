"""Live mode: the suite on a real Xen dom0, against the host's own blkback or QEMU qdisk.

The suite plays the toolstack for one device it was given explicitly
(`--xen-device`), plays the frontend with the reference frontend over the live
services of `blkif_spec.xen.live`, and observes the real backend only through
XenStore, the ring and the disk, as with any target. Safety first (issue 6):
it refuses to start unless root in dom0 with the device named, refuses a
mounted device or one holding a filesystem or partition table unless
`--xen-allow-dataloss`, touches only its own device directories, and removes
them, its grants and its ports on exit, on failure and on Ctrl-C. The XenStore
tree under this domain's `backend/` and `device/` is compared before and after
the run (`XenStoreSnapshot`): the difference must be empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from blkif_spec import toolstack
from blkif_spec.consts import XenbusState
from blkif_spec.drivers import xsutil
from blkif_spec.drivers.frontend import Frontend, FrontendConfig
from blkif_spec.harness import BackendUnderTest, TargetTimeout
from blkif_spec.xen import live as xen_live
from blkif_spec.xen.api import XenError, XenStore

DOM0 = 0
KINDS = {"vbd": "Linux blkback", "qdisk": "QEMU xen-block"}
VDEV_BASE = 202 << 8
BLKZEROOUT = 0x127F  # _IO(0x12, 127)  # xvd*: (202 << 8) | (index << 4)

# Signatures that say a device holds data (offset, magic): refused without --xen-allow-dataloss.
SIGNATURES = (
    (0x438, b"\x53\xef", "ext2/3/4"),
    (0, b"XFSB", "XFS"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (4086, b"SWAPSPACE2", "swap"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (510, b"\x55\xaa", "a partition table"),
    (0x200, b"EFI PART", "GPT"),
)


class LiveRefused(Exception):
    """Live mode will not start: the message says why and what to do."""


@dataclass(frozen=True)
class LiveOptions:
    """The command-line choices of live mode (`--xen-*`)."""

    device: str | None
    backend_domid: int = DOM0
    backend_kind: str = "vbd"
    vdev: str = "xvdf"
    allow_dataloss: bool = False

    @property
    def devid(self) -> int:
        letter = self.vdev.removeprefix("xvd")
        if len(letter) != 1 or not "a" <= letter <= "o":
            raise LiveRefused(f"--xen-vdev {self.vdev!r}: expected xvda..xvdo")
        return VDEV_BASE | ((ord(letter) - ord("a")) << 4)

    def vbd(self) -> toolstack.Vbd:
        return toolstack.Vbd(DOM0, self.backend_domid, self.devid, self.backend_kind, self.vdev)


# -- safety ------------------------------------------------------------------------------------


def mounted_devices() -> set[str]:
    with open("/proc/mounts") as f:
        return {line.split()[0] for line in f if line.startswith("/dev/")}


def holders(device: str) -> list[str]:
    """Partitions, device-mapper or md users of a block device (sysfs), which a test would clobber."""
    name = os.path.basename(os.path.realpath(device))
    base = f"/sys/class/block/{name}"
    found = []
    with contextlib.suppress(OSError):
        found += [f"holder {h}" for h in os.listdir(f"{base}/holders")]
    with contextlib.suppress(OSError):
        found += [f"partition {p}" for p in os.listdir(base) if p.startswith(name)]
    return found


KERNEL_BLKFRONT = "/sys/bus/xen/drivers/vbd"  # present while dom0's xen-blkfront is registered


def kernel_frontend_attaches() -> bool:
    """Whether dom0's own xen-blkfront is registered: it attaches to every new `device/vbd/*` of
    dom0, the very directory a backend-role run writes its frontend into, and would race it."""
    return os.path.isdir(KERNEL_BLKFRONT)


def signature(device: str) -> str | None:
    """The kind of data found on the device, or None when it looks blank."""
    with open(device, "rb") as f:
        head = f.read(0x10048)
    for offset, magic, what in SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return what
    return None


def check_safe(options: LiveOptions) -> str:
    """Refuse (LiveRefused) anything but an explicitly named, unused block device in dom0, with
    the suite as the only frontend that will attach to the test vbd (a backend-role run)."""
    problems = xen_live.preflight()
    if problems:
        raise LiveRefused("live mode needs root in a Xen dom0: " + "; ".join(problems))
    if kernel_frontend_attaches():
        raise LiveRefused(
            f"dom0's xen-blkfront is loaded ({KERNEL_BLKFRONT}): it would attach to the test vbd "
            f"{options.vbd().frontend_path} and race the suite's frontend; unload it (rmmod xen-blkfront)"
        )
    if not options.device:
        raise LiveRefused("live mode needs the test device named: --xen-device=/dev/… (it is overwritten)")
    device = os.path.realpath(options.device)
    try:
        mode = os.stat(device).st_mode
    except OSError as exc:
        raise LiveRefused(f"--xen-device {options.device}: {exc.strerror}") from None
    if not stat.S_ISBLK(mode):
        raise LiveRefused(f"--xen-device {options.device}: not a block device")
    if options.backend_kind not in KINDS:
        raise LiveRefused(f"--xen-backend-kind {options.backend_kind!r}: expected one of {', '.join(KINDS)}")
    if not options.allow_dataloss:
        if device in {os.path.realpath(d) for d in mounted_devices()}:
            raise LiveRefused(f"{device} is mounted; unmount it or pass --xen-allow-dataloss")
        used = holders(device)
        if used:
            raise LiveRefused(f"{device} is in use ({', '.join(used)}); pass --xen-allow-dataloss to proceed")
        found = signature(device)
        if found:
            raise LiveRefused(f"{device} holds {found}; its data would be lost: pass --xen-allow-dataloss")
    return device


# -- the device, as the suite reads and writes it behind the backend's back -------------------------


class DeviceStore:
    """`BackingStore` over the real device: what the backend wrote, read without the page cache."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self.readonly = readonly

    def _drop_cache(self) -> None:
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(self, offset: int, length: int) -> bytes:
        self._drop_cache()  # the backend writes below the page cache
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        os.pwrite(self._fd, bytes(data), offset)
        os.fsync(self._fd)
        self._drop_cache()

    def flush(self) -> None:
        os.fsync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def resize(self, size: int) -> None:
        raise NotImplementedError("live mode does not resize the test device")

    def zero(self, head: int = 8 << 20) -> None:
        """Zero the device, so each test starts from the blank disk the simulation gives it.

        BLKZEROOUT is cheap on a loop device over a sparse file (a hole punched); where it
        fails, the first `head` bytes and the last MiB, the ranges tests use, are written."""
        try:
            fcntl.ioctl(self._fd, BLKZEROOUT, bytearray(struct.pack("QQ", 0, self.size)))
        except OSError:
            for offset, length in ((0, min(head, self.size)), (max(self.size - (1 << 20), 0), 1 << 20)):
                os.pwrite(self._fd, bytes(min(length, self.size - offset)), offset)
            os.fsync(self._fd)
        self._drop_cache()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- the host ----------------------------------------------------------------------------------


def physical_device(device: str) -> str:
    """`major:minor` in hex, as the hotplug script writes it (blkback opens the device then)."""
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev):x}:{os.minor(rdev):x}"


class LiveHost:
    """What the harness needs of the host, in live mode: the toolstack's XenStore connection.

    Nothing here can destroy a domain: the target is dom0's own driver. A target that
    stops answering is detached by force instead (libxl's forced removal)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.dom0 = xen_live.LiveDomain(DOM0, timeout=timeout)
        self.domains: dict[int, Any] = {}

    def destroy_domain(self, domid: int) -> None:
        """The real backend did not answer: nothing to kill; its device is removed by `close`."""

    leaks_visible = False

    def leaks(self, domid: int) -> dict[str, list[int]]:
        """A real driver's grants, mappings and ports are not visible from dom0's user space: empty,
        and `leaks_visible` says that this proves nothing."""
        return {}

    def close(self) -> None:
        self.dom0.close()


class XenStoreSnapshot:
    """The nodes under dom0's `backend/` and `device/`, to show that a run left nothing behind."""

    ROOTS = ("/local/domain/0/backend", "/local/domain/0/device", "/local/domain/0/error")

    def __init__(self, store: XenStore) -> None:
        self.store = store
        self.before = self.take()

    def take(self) -> dict[str, str]:
        tree: dict[str, str] = {}
        for root in self.ROOTS:
            with contextlib.suppress(XenError):
                tree.update({f"{root}/{k}": v for k, v in xsutil.read_tree(self.store, root).items()})
        return tree

    def diff(self) -> list[str]:
        after = self.take()
        added = [f"+ {k}={after[k]!r}" for k in sorted(after.keys() - self.before.keys())]
        removed = [f"- {k}" for k in sorted(self.before.keys() - after.keys())]
        return added + removed


def ancestors(vbd: toolstack.Vbd) -> list[str]:
    """The directories above a device's two directories and its error nodes, below the domain homes."""
    found = []
    paths = [vbd.backend_path, vbd.frontend_path]
    for domid, path in ((vbd.backend_domid, vbd.backend_path), (vbd.frontend_domid, vbd.frontend_path)):
        home = f"/local/domain/{domid}"
        paths.append(f"{home}/error/{path.removeprefix(home + '/')}")  # where a driver reports errors
    for path in paths:
        parts = path.split("/")
        for i in range(5, len(parts)):  # below /local/domain/<id>, never that home itself
            parent = "/".join(parts[:i])
            if parent not in found:
                found.append(parent)
    return found


def missing_parents(store: XenStore, vbd: toolstack.Vbd) -> list[str]:
    """The directories above the device's two directories that creating them will add."""
    return [p for p in ancestors(vbd) if store.read(p) is None]


def remove_if_empty(store: XenStore, paths: list[str]) -> None:
    """Remove the directories we added, deepest first, where nothing else lives now."""
    for path in sorted(paths, key=lambda p: -p.count("/")):
        with contextlib.suppress(XenError):
            if store.read(path) is not None and not store.directory(path):
                store.rm(path)


def tidy(snapshot: XenStoreSnapshot, options: LiveOptions, settle: float = 2.0) -> None:
    """At the end of a run: remove the empty directories above this run's devices that were not
    there before it. A backend (QEMU) may still be removing its own nodes: wait for it briefly."""
    from blkif_spec.live_frontend import BACKEND_TYPE  # the frontend-role vbd's backend type

    vbds = [options.vbd(), toolstack.Vbd(DOM0, DOM0, options.devid, BACKEND_TYPE, options.vdev)]
    roots = XenStoreSnapshot.ROOTS  # never removed: the snapshot does not say whether they were there
    ours = [p for vbd in vbds for p in ancestors(vbd) if p not in snapshot.before and p not in roots]
    deadline = time.monotonic() + settle
    while True:
        remove_if_empty(snapshot.store, ours)
        if not snapshot.diff() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


DEVICE_MODEL_PID = "/local/domain/0/image/device-model-pid"  # QEMU serving dom0's qdisk devices


def qemu_gone(store: XenStore) -> str | None:
    """Why QEMU's qdisk backend cannot serve (its process is gone: an earlier test may have crashed
    it), or None. Each later test then fails at once instead of waiting out two timeouts."""
    pid = (store.read(DEVICE_MODEL_PID) or "").strip()
    if not pid.isdigit():
        return f"no {DEVICE_MODEL_PID}: QEMU's qdisk backend is not running in dom0"
    if not os.path.exists(f"/proc/{pid}"):
        return f"QEMU's qdisk backend (pid {pid}) is gone: an earlier test crashed it (see its dmesg lines)"
    return None


class LiveBackendUnderTest(BackendUnderTest):
    """`BackendUnderTest` for a real backend: dom0's blkback, or QEMU's qdisk, on `--xen-device`."""

    def __init__(self, live: LiveOptions, *, timeout: float = 10.0, readonly: bool = False,
                 discard: bool = True, abi: str = "x86_64-abi", start: bool = True,
                 **ignored: Any) -> None:  # fmt: skip
        # `size`, `options` (module parameters) and `record_grants` are simulation choices:
        # the real device has its own size and the real backend its own parameters.
        options = live
        self.timeout = timeout
        self.live = live
        device = os.path.realpath(options.device or "")
        self.xen = LiveHost(timeout)
        self.vbd = options.vbd()
        if self.dom0.read(self.vbd.backend_path) is not None or self.dom0.read(self.vbd.frontend_path):
            self.xen.close()
            raise LiveRefused(f"{self.vbd.backend_path} or its frontend exists already: not ours to replace")
        if options.backend_kind == "qdisk":
            dead = qemu_gone(self.dom0)
            if dead:
                self.xen.close()
                raise XenError(dead)
        self.store = DeviceStore(device, readonly)
        self.store.zero()
        self.readonly = readonly
        self.target = None
        self.destroyed = False
        self.closed = False
        self._peer_closed = False
        self.abi = abi
        params = f"aio:{device}" if options.backend_kind == "qdisk" else device
        self._new_dirs = missing_parents(self.dom0, self.vbd)
        toolstack.create(self.dom0, self.vbd, readonly=readonly, discard=discard, params=params)
        self.device = device
        self._peer_domain = xen_live.LiveDomain(DOM0, timeout=timeout)
        self.peer = Frontend(self._peer_domain, self.vbd.frontend_path,
                             FrontendConfig(protocol=abi, timeout=timeout))  # fmt: skip
        if start:
            self.start()

    def start(self) -> None:
        """What the hotplug script does for blkback: `physical-device` makes it open the disk.
        QEMU's qdisk starts from the nodes alone."""
        if self.live.backend_kind == "vbd":
            self.dom0.write(f"{self.vbd.backend_path}/physical-device", physical_device(self.device))
            self.dom0.write(f"{self.vbd.backend_path}/physical-device-path", self.device)

    def destroy_target(self) -> None:
        """A hung real backend: remove its device (forced detach) so the run goes on."""
        if not self.destroyed:
            self.destroyed = True
            with contextlib.suppress(XenError):
                toolstack.request_detach(self.dom0, self.vbd)

    def ring_log(self, queue: int = 0):
        return None  # the real backend's reads of the ring are not observable from user space

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._close_peer()
            self._wait_closed()
        finally:
            try:
                toolstack.destroy(self.dom0, self.vbd)
                remove_if_empty(self.dom0, self._new_dirs)
            finally:
                self.store.close()
                self._peer_domain.close()
                self.xen.close()

    def _wait_closed(self) -> None:
        """libxl's detach: online=0 and Closing, then wait (bounded) for the backend's Closed.

        A guest's blkfront answers the backend's Closing by closing; the suite's frontend, if it
        did not close already (never connected, or gave up on the device), says Closed itself:
        blkback acts on a detach only when its frontend closes, and a test that skipped before
        connecting otherwise waited the whole timeout."""
        with contextlib.suppress(XenError):
            toolstack.request_detach(self.dom0, self.vbd)
            if not self._peer_closed and not self.destroyed:
                self.dom0.write(f"{self.vbd.frontend_path}/state", str(int(XenbusState.Closed)))
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                state = self.dom0.read(f"{self.vbd.backend_path}/state")
                if state in (None, "6"):
                    return
                time.sleep(0.02)

    def _close_peer(self) -> None:
        """The suite's frontend closes first if it is connected and still using the device."""
        peer = self.peer
        try:
            if peer.queues and not peer.disabled and not self.destroyed:
                peer.close()
                self._peer_closed = True
        except (XenError, TargetTimeout):
            pass
        finally:
            peer._stop_watcher()
            peer._teardown()


def versions(kind: str, store: XenStore) -> dict[str, str]:
    """What the report names as the implementation under test: the dom0 kernel, QEMU's version."""
    found = {"linux": os.uname().release}
    if kind == "qdisk":
        pid = store.read(DEVICE_MODEL_PID) or ""
        exe = os.path.realpath(f"/proc/{pid.strip()}/exe") if pid.strip() else "qemu-system-i386"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5).stdout
            found["qemu"] = out.splitlines()[0] if out else "unknown"
    return found
