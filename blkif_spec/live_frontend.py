"""`--frontend=live`: the dom0 kernel's xen-blkfront against the suite's reference backend.

The suite creates a vbd whose frontend is dom0 itself and whose backend
directory lives under a type no kernel driver watches (`backend/blkif-suite/`),
so only the suite's reference backend, running in this process over gntdev,
serves it. Loading xen-blkfront (or having it loaded) makes the kernel attach;
the suite drives I/O through the resulting `/dev/xvdX` with O_DIRECT, and its
backend checks every request on the ring as in the simulation.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import subprocess
import time
from typing import Any

from blkif_spec import bounded, consts, toolstack
from blkif_spec.drivers.backend import Backend, BackendConfig
from blkif_spec.drivers.frontend import Completion
from blkif_spec.drivers.store import MemoryStore
from blkif_spec.harness import DISK_SIZE, FrontendUnderTest, TargetTimeout
from blkif_spec.live import (
    DOM0,
    LiveHost,
    LiveOptions,
    LiveRefused,
    kernel_frontend_attaches,
    missing_parents,
    remove_if_empty,
)
from blkif_spec.xen import live as xen_live
from blkif_spec.xen.api import XenError

SECTOR = consts.SECTOR_SIZE
OKAY, ERROR = int(consts.BlkifRsp.OKAY), int(consts.BlkifRsp.ERROR)
READ, WRITE = int(consts.BlkifOp.READ), int(consts.BlkifOp.WRITE)
BLKDISCARD, BLKSECDISCARD = 0x1277, 0x127D  # _IO(0x12, 119), _IO(0x12, 125)
QUIET_S = 1.0  # no request for this long after attaching: the kernel's own reads are over
BACKEND_TYPE = "blkif-suite"  # no dom0 driver watches backend/blkif-suite: only the suite serves it


_loaded_by_suite = False  # this process ran modprobe: the run's end unloads it again


def unload_blkfront(timeout: float = 30.0) -> str | None:
    """At the end of a run: unload xen-blkfront if this run loaded it, leaving dom0 as found (a
    backend-role run after it would otherwise be raced by it). Returns what went wrong, or None."""
    global _loaded_by_suite
    if not _loaded_by_suite:
        return None
    _loaded_by_suite = False
    return _modprobe("-r", timeout=timeout)


def _modprobe(*flags: str, timeout: float = 30.0) -> str | None:
    """`modprobe [flags] xen-blkfront`, bounded; what went wrong, or None."""
    command = ["modprobe", *flags, "xen-blkfront"]
    try:
        run = bounded.run(command, timeout)
    except subprocess.TimeoutExpired:
        return f"{' '.join(command)} did not return within {timeout:g} s"
    return f"{' '.join(command)}: {run.stderr.strip()}" if run.returncode else None


class KernelBlkfront:
    """The dom0 kernel's xen-blkfront as a `FrontendTarget`: block I/O on /dev/<vdev>."""

    name = "Linux xen-blkfront"

    def __init__(self, vbd: toolstack.Vbd, timeout: float) -> None:
        self.vbd = vbd
        self.timeout = timeout
        self.dev = f"/dev/{vbd.dev}"
        self.versions = {"linux": os.uname().release}
        self._fd = -1
        self._closed = False

    def start(self) -> None:
        """Load xen-blkfront if needed: it attaches to every `device/vbd/*` it finds."""
        global _loaded_by_suite
        if self._closed:
            raise XenError(f"vbd-{self.vbd.devid} was closed (unbound): {LiveFrontendUnderTest.no_restart}")
        if not kernel_frontend_attaches():
            problem = _modprobe()
            if problem:
                raise XenError(problem)
            _loaded_by_suite = True

    def _device(self) -> int:
        """The block device, opened O_DIRECT once it exists (blkfront adds it at Connected)."""
        if self._fd < 0:
            deadline = time.monotonic() + self.timeout
            while not os.path.exists(self.dev):
                if time.monotonic() > deadline:
                    raise TargetTimeout(f"{self.dev} did not appear within {self.timeout:g} s")
                time.sleep(0.02)
            self._fd = os.open(self.dev, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        return self._fd

    def read(self, sector: int, nsectors: int, *, queue: int | None = None) -> Completion:
        length = nsectors * SECTOR
        buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))  # page-aligned, as O_DIRECT wants
        try:
            got = os.preadv(self._device(), [memoryview(buf)[:length]], sector * SECTOR)
            data = bytes(buf[:got])
        except OSError:
            return Completion(0, READ, ERROR)
        finally:
            buf.close()
        return Completion(0, READ, OKAY if got == length else ERROR, data)

    def write(self, sector: int, data: bytes, *, queue: int | None = None) -> Completion:
        buf = mmap.mmap(-1, max(len(data), mmap.PAGESIZE))
        buf[: len(data)] = data
        try:
            done = os.pwritev(self._device(), [memoryview(buf)[: len(data)]], sector * SECTOR)
        except OSError:
            return Completion(0, WRITE, ERROR)
        finally:
            buf.close()
        return Completion(0, WRITE, OKAY if done == len(data) else ERROR)

    def _sync(self, op: int) -> Completion:
        try:
            os.fsync(self._device())  # the block layer turns it into FLUSH (or a barrier)
        except OSError:
            return Completion(0, op, ERROR)
        return Completion(0, op, OKAY)

    def flush(self, *, queue: int | None = None) -> Completion:
        return self._sync(int(consts.BlkifOp.FLUSH_DISKCACHE))

    def barrier(self, *, queue: int | None = None) -> Completion:
        return self._sync(int(consts.BlkifOp.WRITE_BARRIER))

    def discard(self, sector: int, nsectors: int, *, secure: bool = False,
                queue: int | None = None) -> Completion:  # fmt: skip
        op = int(consts.BlkifOp.DISCARD)
        arg = bytearray(struct.pack("QQ", sector * SECTOR, nsectors * SECTOR))
        try:
            fcntl.ioctl(self._device(), BLKSECDISCARD if secure else BLKDISCARD, arg)
        except OSError:
            return Completion(0, op, ERROR)
        return Completion(0, op, OKAY)

    def _unbind(self) -> None:
        """Unbind blkfront from the device, in a child process: if the kernel blocks in it (I/O
        that will never complete), the child is stuck, not the suite; TargetTimeout says so."""
        self._closed = True
        if not os.path.exists(f"/sys/bus/xen/devices/vbd-{self.vbd.devid}/driver"):
            return
        script = f"echo vbd-{self.vbd.devid} > /sys/bus/xen/drivers/vbd/unbind"
        try:
            done = bounded.run(["sh", "-c", script], self.timeout)
        except subprocess.TimeoutExpired:
            raise TargetTimeout(
                f"unbinding xen-blkfront from vbd-{self.vbd.devid} blocked in the kernel "
                f"for {self.timeout:g} s (I/O left pending?)"
            ) from None
        if done.returncode:
            raise XenError(f"unbinding xen-blkfront from vbd-{self.vbd.devid}: {done.stderr.strip()}")

    def close(self) -> None:
        """The guest lets go of the disk: unbinding the driver closes the device (SM-25)."""
        self._close_fd()
        self._unbind()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def stop(self) -> None:
        self._close_fd()
        self._unbind()


class LiveFrontendUnderTest(FrontendUnderTest):
    """`FrontendUnderTest` for dom0's kernel blkfront, served by the suite's reference backend."""

    # Linux leaves I/O on a device it disabled pending (DIV-22) and then cannot remove the device
    # while it is held open: unbinding blocks in the kernel (seen in the lab). Never risk the host.
    destroyable = False
    no_restart = (
        "Linux blkfront never reconnects in place after a close: blkback_changed() acts on InitWait only "
        "while the xenbus device is in Initialising, which only a new device (the toolstack writing the "
        "directory anew) or a resume gives it; a rebound driver stays put"
    )

    def __init__(self, live: LiveOptions, *, timeout: float = 10.0, size: int = DISK_SIZE,
                 readonly: bool = False, discard: bool = True, backend: BackendConfig | None = None,
                 **ignored: Any) -> None:  # fmt: skip
        options = live
        self.timeout = timeout
        self.xen = LiveHost(timeout)
        letter = options.vdev.removeprefix("xvd")
        self.vbd = toolstack.Vbd(DOM0, DOM0, options.devid, BACKEND_TYPE, f"xvd{letter}")
        for path in (self.vbd.backend_path, self.vbd.frontend_path):
            if self.dom0.read(path) is not None:
                self.xen.close()
                raise LiveRefused(f"{path} exists already: not ours to replace")
        if not _gone(f"/dev/{self.vbd.dev}", timeout):  # the previous test's disk may still be going
            self.xen.close()
            raise LiveRefused(f"/dev/{self.vbd.dev} exists already: choose another --xen-vdev")
        self.store = MemoryStore(size)
        self.readonly = readonly
        self.destroyed = False
        self.closed = False
        self._new_dirs = missing_parents(self.dom0, self.vbd)
        toolstack.create(self.dom0, self.vbd, readonly=readonly, discard=discard, params="suite")
        self._peer_domain = xen_live.LiveDomain(DOM0, timeout=timeout)
        self.peer = Backend(self._peer_domain, self.vbd.backend_path, self.store, backend or BackendConfig())
        self.peer.start()
        self.target = KernelBlkfront(self.vbd, timeout)

    def attach(self) -> None:
        """Connected, and then quiet: the kernel reads the new disk's partition table on its own,
        and a test that takes "the next request" off the ring must not take one of those."""
        super().attach()
        self.target._device()  # the block device exists once blkfront added the disk
        self._quiet()

    def _quiet(self) -> None:
        """Wait (bounded) until the suite's backend has seen no new request for QUIET_S."""
        deadline = time.monotonic() + self.timeout
        seen, since = self.requests_per_queue(), time.monotonic()
        while time.monotonic() - since < QUIET_S and time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.requests_per_queue()
            if now != seen:
                seen, since = now, time.monotonic()

    def destroy_target(self) -> None:
        """A hung kernel frontend cannot be killed: unbind it from the device instead."""
        if not self.destroyed:
            self.destroyed = True
            self.target.stop()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            # Serve whatever the kernel still has in flight (a test may have paused the suite's
            # backend): Linux removes a disk only once its queue is empty.
            with contextlib.suppress(XenError):
                self.peer.resume()
            self._quiet()
            with contextlib.suppress(XenError, TargetTimeout):
                self.target.stop()
            self.peer.stop()
        finally:
            try:
                toolstack.destroy(self.dom0, self.vbd)
                remove_if_empty(self.dom0, self._new_dirs)
                _gone(f"/dev/{self.vbd.dev}", self.timeout)
            finally:
                self._peer_domain.close()
                self.xen.close()


def _gone(path: str, timeout: float) -> bool:
    """Wait (bounded) until `path` no longer exists."""
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
