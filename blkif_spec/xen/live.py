"""The Xen services of a real host's dom0, behind the same `api` Protocols as the simulation.

XenStore is pyxs on xenstored's socket (`PyxsStore`); grants we offer come from
`/dev/xen/gntalloc`, a peer's grants are mapped and copied through
`/dev/xen/gntdev`, and event channels are `/dev/xen/evtchn` handles. All of it
is `fcntl.ioctl` and `mmap` from Python: no compiled helper. The ioctl numbers
are computed from the Linux UAPI definitions (`_IOC(_IOC_NONE, type, nr, size)`).

Differences from the simulation that callers see:
- A page is granted at most once at a time: gntalloc allocates the page with the
  grant, so `grant` moves the page's memory onto a gntalloc page (MAP_FIXED at
  the same address, contents kept) and `revoke` moves it back.
- `revoke` cannot tell whether the peer still maps the grant (the kernel defers
  the end of access by itself), so it always returns True: SEC-23 is not
  observable on a live host.
- Frames are this process's page numbers, not machine frames.
Everything opened here is released by `close()`; `LiveXen` keeps a list so a
run that fails or is interrupted still releases its grants, ports and nodes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import select
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from blkif_spec.xen.api import PAGE_SIZE, XenError
from blkif_spec.xen.sim_grants import _PROT_RO, _PROT_RW, _address_of, _place
from blkif_spec.xen.xenstore import PyxsStore

XENSTORED_SOCKETS = ("/var/run/xenstored/socket", "/run/xenstored/socket")
DEV = "/dev/xen"


def _ioc(kind: str, nr: int, size: int) -> int:
    """Linux `_IOC(_IOC_NONE, kind, nr, size)` on x86 and arm (direction bits 0)."""
    return (size << 16) | (ord(kind) << 8) | nr


# evtchn.h
EVTCHN_BIND_INTERDOMAIN = _ioc("E", 1, 8)
EVTCHN_BIND_UNBOUND_PORT = _ioc("E", 2, 4)
EVTCHN_UNBIND = _ioc("E", 3, 4)
EVTCHN_NOTIFY = _ioc("E", 4, 4)
# gntalloc.h
GNTALLOC_ALLOC_GREF = _ioc("G", 5, 24)
GNTALLOC_DEALLOC_GREF = _ioc("G", 6, 16)
GNTALLOC_FLAG_WRITABLE = 1
# gntdev.h
GNTDEV_MAP_GRANT_REF = _ioc("G", 0, 24)
GNTDEV_UNMAP_GRANT_REF = _ioc("G", 1, 16)
GNTDEV_GRANT_COPY = _ioc("G", 8, 16)
GNTCOPY_SOURCE_GREF, GNTCOPY_DEST_GREF = 1, 2


GNTALLOC_LIMIT = "/sys/module/xen_gntalloc/parameters/limit"  # grants gntalloc hands out, all users


def _ioctl(fd: int, request: int, arg: bytearray, what: str, hints: dict[int, str] | None = None) -> int:
    """An ioctl whose failure names what was asked, and why when `hints` knows the errno."""
    try:
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as exc:
        code = exc.errno or errno.EIO
        hint = (hints or {}).get(code)
        raise XenError(f"{what}: {os.strerror(code)}" + (f" ({hint})" if hint else "")) from None


def _gntalloc_full() -> str:
    try:
        with open(GNTALLOC_LIMIT) as f:
            limit = f.read().strip()
    except OSError:
        limit = "?"
    return f"gntalloc's limit of {limit} grants is reached: raise {GNTALLOC_LIMIT}"


def _open(name: str) -> int:
    path = f"{DEV}/{name}"
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise XenError(f"cannot open {path}: {exc.strerror} (dom0 with the xen-{name} module?)") from None


# -- event channels ----------------------------------------------------------------------------


class LiveEventChannels:
    """One `/dev/xen/evtchn` handle (`api.EventChannels`): its ports' events come to it only."""

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self._fd = _open("evtchn")
        self._ports: set[int] = set()

    def _bind(self, request: int, args: bytes, what: str) -> int:
        port = _ioctl(self._fd, request, bytearray(args), what)
        self._ports.add(port)
        return port

    def alloc_unbound(self, remote: int) -> int:
        return self._bind(
            EVTCHN_BIND_UNBOUND_PORT, struct.pack("<I", remote), f"evtchn unbound for d{remote}"
        )

    def bind_interdomain(self, remote: int, remote_port: int) -> int:
        args = struct.pack("<II", remote, remote_port)
        return self._bind(EVTCHN_BIND_INTERDOMAIN, args, f"evtchn bind d{remote}:{remote_port}")

    def notify(self, port: int) -> None:
        if port not in self._ports:
            raise XenError(f"evtchn notify: port {port} is not bound by this handle")
        _ioctl(self._fd, EVTCHN_NOTIFY, bytearray(struct.pack("<I", port)), f"evtchn notify {port}")

    def wait(self, timeout: float) -> list[int]:
        """Pending ports, unmasked again before returning (the driver masks each one it reports)."""
        ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
        if not ready:
            return []
        raw = os.read(self._fd, 4 * 64)
        os.write(self._fd, raw)  # unmask
        return sorted(set(struct.unpack(f"<{len(raw) // 4}I", raw)))

    def unbind(self, port: int) -> None:
        if port in self._ports:
            self._ports.discard(port)
            _ioctl(self._fd, EVTCHN_UNBIND, bytearray(struct.pack("<I", port)), f"evtchn unbind {port}")

    def open(self) -> LiveEventChannels:
        return LiveEventChannels(self.domid)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the handle unbinds every port it holds
            self._fd = -1
            self._ports.clear()


# -- grants ------------------------------------------------------------------------------------


class _Segment(ctypes.Structure):
    """`struct gntdev_grant_copy_segment` (24 bytes on 64-bit)."""

    _fields_ = [
        ("source", ctypes.c_uint64),  # void * or {u32 ref; u16 offset; u16 domid}
        ("dest", ctypes.c_uint64),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


def _foreign(ref: int, offset: int, domid: int) -> int:
    return ref | (offset << 32) | (domid << 48)


@dataclass
class _Granted:
    index: int  # gntalloc offset of the page
    gref: int
    peer: int
    readonly: bool


@dataclass
class LivePages:
    """Pages this process owns (`api.Pages`); `frames` are process-local page numbers."""

    buf: memoryview
    frames: tuple[int, ...]
    _mm: mmap.mmap
    addr: int
    granted: dict[int, _Granted] = field(default_factory=dict)  # frame -> its grant

    def page(self, i: int) -> memoryview:
        if not 0 <= i < len(self.frames):
            raise IndexError(f"page {i} of {len(self.frames)}")
        return self.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]


class LiveMapping:
    """A peer's grants mapped through gntdev (`api.Mapping`), contiguous in gref order."""

    def __init__(self, table: LiveGrantTable, index: int, count: int, mm: mmap.mmap, readonly: bool) -> None:
        self._table, self._index, self._count, self._mm = table, index, count, mm
        self.buf = memoryview(mm)
        self.readonly = readonly

    def unmap(self) -> None:
        if self._mm is None:
            return
        self.buf.release()
        try:
            self._mm.close()
        except BufferError:  # a slice outlived the mapping: the kernel unmaps at process exit
            return
        self._mm = None
        args = bytearray(struct.pack("<QII", self._index, self._count, 0))
        _ioctl(self._table._gntdev(), GNTDEV_UNMAP_GRANT_REF, args, "gntdev unmap")
        self._table._mappings.discard(self)


class LiveGrantTable:
    """Grants of dom0 (`api.GrantTable`) through gntalloc (ours) and gntdev (a peer's)."""

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self._alloc_fd = -1
        self._dev_fd = -1
        self._frames = itertools.count(1)
        self._owner: dict[int, tuple[LivePages, int]] = {}  # frame -> (pages, page index)
        self._by_gref: dict[int, tuple[LivePages, int]] = {}  # gref -> (pages, frame)
        self._mappings: set[LiveMapping] = set()
        self._lock = threading.Lock()

    def _gntalloc(self) -> int:
        if self._alloc_fd < 0:
            self._alloc_fd = _open("gntalloc")
        return self._alloc_fd

    def _gntdev(self) -> int:
        if self._dev_fd < 0:
            self._dev_fd = _open("gntdev")
        return self._dev_fd

    # -- our pages -------------------------------------------------------------------------

    def alloc_pages(self, count: int = 1) -> LivePages:
        mm = mmap.mmap(-1, count * PAGE_SIZE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, _PROT_RW)
        frames = tuple(next(self._frames) for _ in range(count))
        pages = LivePages(memoryview(mm), frames, mm, _address_of(mm))
        with self._lock:
            for i, f in enumerate(frames):
                self._owner[f] = (pages, i)
        return pages

    def free_pages(self, pages: LivePages) -> None:
        for g in list(pages.granted.values()):
            self.revoke(g.gref)
        with self._lock:
            for f in pages.frames:
                self._owner.pop(f, None)
        pages.buf.release()
        try:
            pages._mm.close()
        except BufferError:  # a caller still holds a view of a page: the memory goes with the last one
            pass

    def grant(self, peer: int, frame: int, *, readonly: bool) -> int:
        with self._lock:
            pages, i = self._owner.get(frame, (None, 0))
            if pages is None:
                raise XenError(f"grant: frame {frame} is not ours")
            if frame in pages.granted:
                raise XenError(f"grant: frame {frame} is granted already (gntalloc grants a page once)")
            args = bytearray(
                struct.pack("<HHIQI4x", peer, 0 if readonly else GNTALLOC_FLAG_WRITABLE, 1, 0, 0)
            )
            full = {errno.ENOSPC: _gntalloc_full()}
            _ioctl(self._gntalloc(), GNTALLOC_ALLOC_GREF, args, f"gntalloc for d{peer}", full)
            index, gref = struct.unpack_from("<QI", args, 8)
            addr = pages.addr + i * PAGE_SIZE
            keep = bytes(pages.page(i))
            _place(addr, PAGE_SIZE, _PROT_RW, mmap.MAP_SHARED, self._gntalloc(), index)
            ctypes.memmove(addr, keep, PAGE_SIZE)
            pages.granted[frame] = _Granted(index, gref, peer, readonly)
            self._by_gref[gref] = (pages, frame)
            return gref

    def revoke(self, gref: int) -> bool:
        with self._lock:
            pages, frame = self._by_gref.pop(gref, (None, 0))
            if pages is None:
                raise XenError(f"revoke: gref {gref} is not one of ours")
            g = pages.granted.pop(frame)
            i = self._owner[frame][1]
            addr = pages.addr + i * PAGE_SIZE
            keep = bytes(pages.page(i))
            args = bytearray(struct.pack("<QI4x", g.index, 1))
            _ioctl(self._gntalloc(), GNTALLOC_DEALLOC_GREF, args, f"gntalloc dealloc {gref}")
            anon = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
            _place(addr, PAGE_SIZE, _PROT_RW, anon, -1, 0)  # unmapping the gntalloc page ends the grant
            ctypes.memmove(addr, keep, PAGE_SIZE)
            return True

    # -- a peer's grants ---------------------------------------------------------------------

    def map(self, peer: int, grefs: Sequence[int], *, readonly: bool) -> LiveMapping:
        n = len(grefs)
        if n == 0:
            raise XenError("map: no grant references")
        refs = b"".join(struct.pack("<II", peer, g) for g in grefs)
        args = bytearray(struct.pack("<IIQ", n, 0, 0) + refs)
        fd = self._gntdev()
        _ioctl(fd, GNTDEV_MAP_GRANT_REF, args, f"gntdev map d{peer} {list(grefs)}")
        index = struct.unpack_from("<Q", args, 8)[0]
        try:
            mm = mmap.mmap(
                fd, n * PAGE_SIZE, mmap.MAP_SHARED, _PROT_RO if readonly else _PROT_RW, offset=index
            )
        except OSError as exc:
            _ioctl(fd, GNTDEV_UNMAP_GRANT_REF, bytearray(struct.pack("<QII", index, n, 0)), "gntdev unmap")
            raise XenError(f"map d{peer} grefs {list(grefs)}: {exc.strerror}") from None
        m = LiveMapping(self, index, n, mm, readonly)
        self._mappings.add(m)
        return m

    def _copy(self, seg: _Segment, what: str) -> None:
        array = (_Segment * 1)(seg)
        args = bytearray(struct.pack("<I4xQ", 1, ctypes.addressof(array)))
        _ioctl(self._gntdev(), GNTDEV_GRANT_COPY, args, what)
        if array[0].status != 0:
            raise XenError(f"{what}: grant copy status {array[0].status}")

    def copy_from(self, peer: int, gref: int, offset: int, length: int) -> bytes:
        if not (0 <= offset and length >= 0 and offset + length <= PAGE_SIZE):
            raise XenError(f"copy_from: {offset}+{length} outside one page")
        out = ctypes.create_string_buffer(max(length, 1))
        seg = _Segment(_foreign(gref, offset, peer), ctypes.addressof(out), length, GNTCOPY_SOURCE_GREF, 0)
        self._copy(seg, f"grant copy from d{peer} gref {gref}")
        return out.raw[:length]

    def copy_to(self, peer: int, gref: int, offset: int, data: bytes) -> None:
        if not (0 <= offset and offset + len(data) <= PAGE_SIZE):
            raise XenError(f"copy_to: {offset}+{len(data)} outside one page")
        src = ctypes.create_string_buffer(bytes(data), max(len(data), 1))
        seg = _Segment(ctypes.addressof(src), _foreign(gref, offset, peer), len(data), GNTCOPY_DEST_GREF, 0)
        self._copy(seg, f"grant copy to d{peer} gref {gref}")

    def close(self) -> None:
        """End every grant and mapping this table still holds, then close the devices."""
        for m in list(self._mappings):
            m.unmap()
        for gref in list(self._by_gref):
            self.revoke(gref)
        for fd in (self._alloc_fd, self._dev_fd):
            if fd >= 0:
                os.close(fd)
        self._alloc_fd = self._dev_fd = -1

    def held(self) -> dict[str, list[int]]:
        """What this table still holds: our grants and our mappings of a peer's (leak check)."""
        return {k: v for k, v in (("grants", sorted(self._by_gref)),
                                  ("mappings", [m._index for m in self._mappings])) if v}  # fmt: skip


# -- the host ----------------------------------------------------------------------------------


def xenstored_socket() -> str:
    for path in XENSTORED_SOCKETS:
        if os.path.exists(path):
            return path
    raise XenError(f"no xenstored socket ({', '.join(XENSTORED_SOCKETS)}): not a Xen dom0?")


class LiveDomain:
    """dom0's services (`api.XenServices`) for one driver of the suite."""

    def __init__(self, domid: int = 0, *, timeout: float = 2.0) -> None:
        self.domid = domid
        self.store = PyxsStore.connect(xenstored_socket(), domid, timeout=timeout)
        self.grants = LiveGrantTable(domid)
        self.evtchn = LiveEventChannels(domid)

    def close(self) -> None:
        try:
            self.grants.close()
            self.evtchn.close()
        finally:
            self.store.close()


def preflight() -> list[str]:
    """Why this host cannot run live tests (empty when it can): root in a dom0 with the devices."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (live mode needs root in dom0)")
    caps = "/proc/xen/capabilities"
    try:
        with open(caps) as f:
            if "control_d" not in f.read():
                problems.append(f"{caps} does not say control_d: not dom0")
    except OSError:
        problems.append(f"{caps} unreadable: not a Xen dom0 (or xenfs not mounted)")
    for name in ("evtchn", "gntdev", "gntalloc"):
        if not os.path.exists(f"{DEV}/{name}"):
            problems.append(f"{DEV}/{name} missing (modprobe xen-{name})")
    if not any(os.path.exists(p) for p in XENSTORED_SOCKETS):
        problems.append("no xenstored socket")
    return problems


__all__ = ["LiveDomain", "LiveEventChannels", "LiveGrantTable", "preflight", "xenstored_socket"]
