"""Simulated Xen, part 2a: machine memory and grant tables with real permission checks.

Memory. A `GrantHost` owns the "machine memory": one memfd of `nr_frames` 4 KiB
frames, shared by every simulated domain. Pages a domain allocates and grants
it maps are views of that one file, so a write by the owner is seen by the
mapper and the other way round, across threads and across forked processes
(the IOPS benchmark runs a backend ring worker in a child). A multi-page buffer
is one contiguous virtual range even when its frames are not contiguous:
a Python `mmap` object reserves the range (and owns its lifetime) and libc
`mmap(MAP_FIXED|MAP_SHARED, memfd, frame*4096)` places each run of frames in it
(WIRE-10: ring-ref0..N-1 appear in gref order). Read-only maps are an
`ACCESS_READ` mmap with `PROT_READ` pages: a write through them raises
TypeError in Python, never a fault.

Shared state. Everything that another process must agree on (frame owners,
grant entries and their map counts, which domains exist) lives in a second
memfd, updated under a `SharedLock` (a POSIX semaphore shared with forked
children). Copies (`copy_from`/`copy_to`) check the entry without the lock, so
the data path of a benchmark costs no lock round trip; unlike Xen, which pins
a grant while it copies, a revoke racing a copy of the same grant succeeds.

Lifetime. `unmap()`/`free_pages()` give a range back at once when nobody holds
a slice of it. Callers should drop (or `release()`) slices and rings built on
a buffer first; if some are still alive, the range is *detached* instead:
private zero pages replace the shared frames, so a stale view neither faults
nor sees memory that now belongs to someone else, and the range is unmapped
when the last view dies. `GrantHost.destroy_domain` uses the same detach for
the destroyed domain's own pages and mappings in this process, force-ends its
grants (a peer's live mapping stays valid; the entry is dead so new maps and
copies fail; its frames are freed when the peer unmaps) and drops its maps.

Recording (SEC-1, XSA-155 double fetch). Loads from a raw memoryview are
invisible to Python, so reads cannot be recorded at the page. They are
recorded where a backend legitimately reads shared memory: its ring
(`RecordingRing`, a `SharedRing` whose slot copies and index-word accesses
are logged) and its indirect/data pages (`RecordingView`: `read`, `unpack_from`,
slices that return copies). A table made with `record=True` (or a
`map(..., record=True)`) returns mappings with an `AccessLog` in `log`;
`ring_for(mapping, order)` and `view_for(mapping)` build the recording
accessors for such a mapping and plain ones (`SharedRing`, an unlogged view)
for any other, so the same backend code runs recorded in simulation and
unrecorded on live Xen. The test then asserts exactly, e.g. for slot k:
`log.reads_of(ring.slot_offset(k), ring.slot_offset(k) + entry) == [1] * entry`
(`log.check_read_once(...)` says which bytes were read twice and when).
Handing out a live slot view (`slot_view`) or `RecordingView.raw` is logged
as an escape ("v"): it may be read any number of times, so `read_once` fails.
The check is exact only for code that reads through these accessors (the
reference backend and the self-check's faulty variants); reads of
`mapping.buf` itself are not seen, so for a target that reads it directly
only the racing-rewrite test (the one used against live backends) applies.
The log is per process: a forked worker's reads are not recorded.

Fork. Hosts and tables are used in a child started with the `fork` start
method (pass them as `Process` arguments; they are not picklable): the memfds,
their mappings and the lock are inherited. A mapping belongs to the process
that made it: a child may use and unmap its inherited copy, which does not end
the parent's mapping. Cross-process `destroy_domain` cannot detach another
process's views (they keep seeing the frames).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import multiprocessing
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from blkif_spec.ring import ENTRY_SIZE_X86_64, SharedRing
from blkif_spec.xen.api import PAGE_SIZE, Mapping, XenError, XenTimeout

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "FIRST_GREF",
    "AccessLog",
    "DomainTable",
    "GrantHost",
    "RecordingRing",
    "RecordingView",
    "SharedLock",
    "SimGrantTable",
    "SimMapping",
    "SimPages",
    "ring_for",
    "view_for",
]

# --------------------------------------------------------------------------------------
# libc: placing memfd pages at a chosen address
# --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc_mmap = _libc.mmap
_libc_mmap.restype = ctypes.c_void_p
_c_int, _c_long = ctypes.c_int, ctypes.c_long
_libc_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _c_int, _c_int, _c_int, _c_long]
_libc_fallocate = _libc.fallocate
_libc_fallocate.restype = ctypes.c_int
_libc_fallocate.argtypes = [_c_int, _c_int, _c_long, _c_long]

_MAP_FIXED = 0x10  # Linux; not exported by the mmap module on 3.11
_FALLOC_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_PROT_RO = mmap.PROT_READ
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address_of(obj: object) -> int:
    """Start address of a (possibly read-only) buffer; ctypes' from_buffer needs a writable one."""
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), 0)
    try:
        return int(view.buf)
    finally:
        _release_buffer(ctypes.byref(view))


def _place(addr: int, nbytes: int, prot: int, flags: int, fd: int, offset: int) -> None:
    got = _libc_mmap(addr, nbytes, prot, flags | _MAP_FIXED, fd, offset)
    if got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap at {addr:#x} (+{nbytes}): {os.strerror(err)}")


def _runs(frames: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(first page index, first frame, length) of each run of consecutive frames."""
    i = 0
    n = len(frames)
    while i < n:
        j = i + 1
        while j < n and frames[j] == frames[j - 1] + 1:
            j += 1
        yield i, frames[i], j - i
        i = j


class _Region:
    """Frames of the memfd side by side in one virtual range owned by a Python mmap object."""

    __slots__ = ("_mm", "addr", "buf", "nbytes", "readonly")

    def __init__(self, fd: int, frames: Sequence[int], readonly: bool) -> None:
        self.nbytes = len(frames) * PAGE_SIZE
        self.readonly = readonly
        # The mmap object reserves the range and munmaps it when the last view dies;
        # ACCESS_READ makes Python itself refuse writes (no exported writable buffer).
        mm = mmap.mmap(-1, self.nbytes, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
        try:
            self.addr = _address_of(mm)
            prot = _PROT_RO if readonly else _PROT_RW
            for page, frame, count in _runs(frames):
                _place(self.addr + page * PAGE_SIZE, count * PAGE_SIZE, prot, mmap.MAP_SHARED, fd,
                       frame * PAGE_SIZE)  # fmt: skip
        except BaseException:
            mm.close()
            raise
        self._mm: mmap.mmap | None = mm
        self.buf = memoryview(mm)

    @property
    def live(self) -> bool:
        return self._mm is not None

    def release(self) -> None:
        """Give the range back; if slices of it are still alive, detach it (see module docstring)."""
        mm = self._mm
        if mm is None:
            return
        self._mm = None
        try:
            self.buf.release()
        except BufferError:
            pass
        try:
            mm.close()
        except BufferError:
            prot = _PROT_RO if self.readonly else _PROT_RW
            _place(self.addr, self.nbytes, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)


# --------------------------------------------------------------------------------------
# Shared helpers (also used by sim_evtchn)
# --------------------------------------------------------------------------------------


class SharedLock:
    """A lock for the threads of this process and of forked children (a POSIX semaphore).

    Acquiring is bounded: a holder that died (a killed worker) costs one
    `XenTimeout`, never a hang.
    """

    def __init__(self, what: str, timeout: float = 10.0) -> None:
        self._lock = multiprocessing.get_context("fork").Lock()
        self._what = what
        self.timeout = timeout
        self._holder: tuple[int, int] | None = None  # (pid, thread), to refuse re-entry at once

    def __enter__(self) -> None:
        me = (os.getpid(), threading.get_ident())
        if self._holder == me:
            raise RuntimeError(f"{self._what} lock is not re-entrant (already held by this thread)")
        if not self._lock.acquire(timeout=self.timeout):
            raise XenTimeout(f"{self._what} lock not acquired within {self.timeout} s (holder died?)")
        self._holder = me

    def __exit__(self, *exc: object) -> None:
        self._holder = None
        self._lock.release()


def shared_table(name: str, nbytes: int) -> tuple[int, mmap.mmap]:
    """A zeroed memfd of `nbytes` and its shared mapping: tables every forked process sees."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        return fd, mmap.mmap(fd, max(nbytes, 1), mmap.MAP_SHARED, _PROT_RW)
    except BaseException:
        os.close(fd)
        raise


class DomainTable:
    """Which domains exist, alive or destroyed, with a generation per incarnation.

    Lives in shared memory (an int32 view, 4 words per slot: used, domid,
    alive, generation) so a destroy in one process is seen by all. A service
    object remembers the generation it was made for: after a destroy (and
    even after the domid is re-created) its calls fail.
    """

    WORDS = 4
    _USED, _DOMID, _ALIVE, _GEN = range(4)

    def __init__(self, words: memoryview) -> None:
        self._w = words
        self.capacity = len(words) // self.WORDS
        self._cache: dict[int, int] = {}

    def slot(self, domid: int) -> int | None:
        """The slot of `domid` ever created, or None (lock-free)."""
        w = self._w
        s = self._cache.get(domid)
        if s is not None and w[s * 4 + self._USED] and w[s * 4 + self._DOMID] == domid:
            return s
        for s in range(self.capacity):
            if w[s * 4 + self._USED] and w[s * 4 + self._DOMID] == domid:
                self._cache[domid] = s
                return s
        return None

    def attach(self, domid: int) -> tuple[int, int, bool]:
        """(slot, generation, revived) of `domid`, creating or reviving it; call under the lock."""
        if type(domid) is not int or not 0 <= domid < 0x7FF0:
            raise XenError(f"invalid domid {domid!r}")
        w = self._w
        s = self.slot(domid)
        if s is None:
            s = next((i for i in range(self.capacity) if not w[i * 4 + self._USED]), None)
            if s is None:
                raise XenError(f"no free domain slot for domain {domid} ({self.capacity} in use)")
            w[s * 4 + self._DOMID] = domid
            w[s * 4 + self._GEN] = 0
            w[s * 4 + self._ALIVE] = 1
            w[s * 4 + self._USED] = 1
            self._cache[domid] = s
            return s, 0, False
        if w[s * 4 + self._ALIVE]:
            return s, w[s * 4 + self._GEN], False
        w[s * 4 + self._GEN] += 1
        w[s * 4 + self._ALIVE] = 1
        return s, w[s * 4 + self._GEN], True

    def alive(self, domid: int, gen: int) -> bool:
        s = self.slot(domid)
        return s is not None and bool(self._w[s * 4 + self._ALIVE]) and self._w[s * 4 + self._GEN] == gen

    def kill(self, domid: int) -> int | None:
        """Mark `domid` destroyed; its slot if it was alive, else None. Call under the lock."""
        s = self.slot(domid)
        if s is None or not self._w[s * 4 + self._ALIVE]:
            return None
        self._w[s * 4 + self._ALIVE] = 0
        return s


def refuse_pickling(obj: object) -> NoReturn:
    """`__reduce__` of objects that only a fork can hand over (fds, mappings, a semaphore)."""
    raise TypeError(
        f"{type(obj).__name__} holds file descriptors and shared mappings: hand it to a child "
        "process with the multiprocessing 'fork' start method (as a Process argument), not by pickling"
    )


# --------------------------------------------------------------------------------------
# The host: machine memory and the shared grant/frame tables
# --------------------------------------------------------------------------------------

# frame states (one byte per frame, searched with bytes.find)
_F_FREE, _F_USED, _F_ZOMBIE = 0, 1, 2
# grant entry states (one byte per entry)
_G_FREE, _G_ACTIVE, _G_DEAD, _G_RESERVED = 0, 1, 2, 3
# grant entry words (int32 each)
_GW = 5
_G_OWNER, _G_PEER, _G_FRAME, _G_RO, _G_MAPS = range(_GW)
#: Xen reserves the first grant references (GNTTAB_NR_RESERVED_ENTRIES): gref 0 is never valid.
FIRST_GREF = 8
_H_CURSOR = 0  # header word: next gref to try (round robin, so a revoked gref is not reused at once)


class GrantHost:
    """Machine memory and the grant tables of every simulated domain.

    `nr_frames` frames of 4 KiB (default 64 MiB, a sparse memfd: untouched
    frames cost nothing), `max_grants` grant entries shared by all domains,
    `max_domains` domains. Leak accounting for tests: `grants_of`,
    `mappings_of`, `frames_of`, and what destroyed domains leave until their
    peers unmap: `dead_grants`, `zombie_frames`.
    """

    def __init__(
        self,
        nr_frames: int = 16384,
        *,
        max_grants: int = 8192,
        max_domains: int = 16,
        lock_timeout: float = 10.0,
    ) -> None:
        if nr_frames < 1 or max_grants <= FIRST_GREF or max_domains < 1:
            raise ValueError("GrantHost needs at least one frame and domain, and more than 8 grant entries")
        self.nr_frames = nr_frames
        self.max_grants = max_grants
        self._lock = SharedLock("grant table", lock_timeout)
        self._memfd = os.memfd_create("blkif-sim-memory", os.MFD_CLOEXEC)
        self._ctlfd = -1
        try:
            os.ftruncate(self._memfd, nr_frames * PAGE_SIZE)
            self._phys_mm = mmap.mmap(self._memfd, nr_frames * PAGE_SIZE, mmap.MAP_SHARED, _PROT_RW)
            layout: list[tuple[str, int]] = [
                ("hdr", 32),
                ("dom", max_domains * DomainTable.WORDS * 4),
                ("fst", nr_frames),
                ("fown", nr_frames * 4),
                ("fmaps", nr_frames * 4),
                ("fgrants", nr_frames * 4),
                ("gst", max_grants),
                ("g", max_grants * _GW * 4),
            ]
            offsets: dict[str, tuple[int, int]] = {}
            pos = 0
            for name, size in layout:
                offsets[name] = (pos, pos + size)
                pos = (pos + size + 7) & ~7
            self._ctlfd, self._ctl_mm = shared_table("blkif-sim-grants", pos)
        except BaseException:
            os.close(self._memfd)
            if self._ctlfd >= 0:
                os.close(self._ctlfd)
            raise
        ctl = memoryview(self._ctl_mm)

        def part(name: str, fmt: str) -> memoryview:
            a, b = offsets[name]
            return ctl[a:b].cast(fmt) if fmt != "B" else ctl[a:b]

        self._hdr = part("hdr", "i")
        self.domains = DomainTable(part("dom", "i"))
        self._fst = part("fst", "B")
        self._fown = part("fown", "i")
        self._fmaps = part("fmaps", "i")
        self._fgrants = part("fgrants", "i")
        self._gst = part("gst", "B")
        self._g = part("g", "i")
        self._ctl_views = [
            ctl,
            self._hdr,
            self._fst,
            self._fown,
            self._fmaps,
            self._fgrants,
            self._gst,
            self._g,
        ]
        self._gst[:FIRST_GREF] = bytes([_G_RESERVED]) * FIRST_GREF
        self._hdr[_H_CURSOR] = FIRST_GREF
        self.phys = memoryview(self._phys_mm)
        # process-local: the regions this process made, per domain, for destroy_domain
        self._local_maps: dict[int, set[SimMapping]] = {}
        self._local_pages: dict[int, set[SimPages]] = {}
        self.closed = False

    # -- service objects -------------------------------------------------------------------

    def table(self, domid: int, *, record: bool = False) -> SimGrantTable:
        """The grant view of `domid` (created, or re-created after a destroy)."""
        return SimGrantTable(self, domid, record=record)

    # -- leak accounting ---------------------------------------------------------------------

    def grants_of(self, domid: int) -> list[int]:
        """Grant references `domid` offers and has not revoked."""
        with self._lock:
            st = self._gst.tobytes()
            g = self._g
            return [r for r, s in enumerate(st) if s == _G_ACTIVE and g[r * _GW + _G_OWNER] == domid]

    def mappings_of(self, domid: int) -> list[int]:
        """Grant references `domid` has mapped, once per live mapping (any process)."""
        with self._lock:
            st = self._gst.tobytes()
            g = self._g
            out: list[int] = []
            for r, s in enumerate(st):
                if s in (_G_ACTIVE, _G_DEAD) and g[r * _GW + _G_PEER] == domid and g[r * _GW + _G_MAPS]:
                    out.extend([r] * g[r * _GW + _G_MAPS])
            return out

    def access_logs(self, domid: int) -> list[tuple[tuple[int, ...], AccessLog]]:
        """(grefs, log) of each live recorded mapping `domid` made in this process (SEC-1 checks)."""
        with self._lock:
            maps = list(self._local_maps.get(domid, ()))
        return [(m.grefs, m.log) for m in maps if m.log is not None and m.mapped]

    def frames_of(self, domid: int) -> list[int]:
        """Frames allocated to `domid` and not freed."""
        with self._lock:
            st = self._fst.tobytes()
            own = self._fown
            return [f for f, s in enumerate(st) if s == _F_USED and own[f] == domid]

    def zombie_frames(self) -> list[int]:
        """Frames of destroyed domains still mapped by a peer (freed at its last unmap)."""
        with self._lock:
            return [f for f, s in enumerate(self._fst.tobytes()) if s == _F_ZOMBIE]

    def dead_grants(self) -> list[int]:
        """Grant references of destroyed domains still mapped by a peer (freed at its last unmap)."""
        with self._lock:
            return [r for r, s in enumerate(self._gst.tobytes()) if s == _G_DEAD]

    def free_frame_count(self) -> int:
        with self._lock:
            return self._fst.tobytes().count(_F_FREE)

    # -- domain destruction ------------------------------------------------------------------

    def destroy_domain(self, domid: int) -> None:
        """End everything `domid` holds, so its calls fail and nothing is left behind.

        Its grants end (mapped ones stay valid for the mapper but are dead:
        no new map or copy), its mappings are dropped, its frames are freed
        (a frame a peer still maps is freed at that peer's last unmap), and its
        pages and mappings in this process are detached so a thread of the
        destroyed domain that still writes through them touches nobody.
        Idempotent; unknown domains are ignored.
        """
        with self._lock:
            if self.domains.kill(domid) is None:
                return
            g, st, fmaps = self._g, self._gst, self._fmaps
            for r in range(FIRST_GREF, self.max_grants):
                s = st[r]
                if s == _G_FREE:
                    continue
                base = r * _GW
                if s == _G_ACTIVE and g[base + _G_OWNER] == domid:
                    self._fgrants[g[base + _G_FRAME]] -= 1
                    if g[base + _G_MAPS]:
                        st[r] = _G_DEAD
                        s = _G_DEAD
                    else:
                        st[r] = _G_FREE
                        continue
                if g[base + _G_PEER] == domid and g[base + _G_MAPS]:  # mappings held by domid
                    fmaps[g[base + _G_FRAME]] -= g[base + _G_MAPS]
                    g[base + _G_MAPS] = 0
                    if s == _G_DEAD:
                        st[r] = _G_FREE
                        self._maybe_free_zombie(g[base + _G_FRAME])
            fst, fown = self._fst, self._fown
            freed: list[int] = []
            for f, s in enumerate(fst.tobytes()):
                if s == _F_USED and fown[f] == domid:
                    if fmaps[f]:
                        fst[f] = _F_ZOMBIE
                    else:
                        fst[f] = _F_FREE
                        freed.append(f)
            # Under the lock: no frame may be handed out again while a view here still maps it.
            for m in self._local_maps.pop(domid, set()):
                m._detach()
            for p in self._local_pages.pop(domid, set()):
                p._region.release()
            self._punch(freed)

    # -- internals ---------------------------------------------------------------------------

    def _maybe_free_zombie(self, frame: int) -> None:
        if self._fst[frame] == _F_ZOMBIE and self._fmaps[frame] == 0:
            self._fst[frame] = _F_FREE
            self._punch([frame])

    def _punch(self, frames: Sequence[int]) -> None:
        """Return freed frames' memory to the kernel (they read back as zeros); best effort."""
        for _, first, count in _runs(sorted(frames)):
            _libc_fallocate(self._memfd, _FALLOC_PUNCH_HOLE, first * PAGE_SIZE, count * PAGE_SIZE)

    def close(self) -> None:
        """Release this process's mappings of the machine memory and its descriptors."""
        if self.closed:
            return
        self.closed = True
        for regs in (*self._local_maps.values(), *self._local_pages.values()):
            for obj in regs:
                obj._region.release()
        self._local_maps.clear()
        self._local_pages.clear()
        for view in (*reversed(self._ctl_views), self.phys, self.domains._w):
            try:
                view.release()
            except BufferError:
                pass
        for mm in (self._ctl_mm, self._phys_mm):
            try:
                mm.close()
            except BufferError:
                pass
        os.close(self._ctlfd)
        os.close(self._memfd)

    def __enter__(self) -> GrantHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> NoReturn:
        refuse_pickling(self)

    def __repr__(self) -> str:
        return f"<GrantHost {self.nr_frames} frames, {self.max_grants} grant entries>"


# --------------------------------------------------------------------------------------
# Per-domain objects
# --------------------------------------------------------------------------------------


class SimPages:
    """Pages a domain owns (`Pages`): one contiguous buffer and the frame of each page."""

    __slots__ = ("_region", "buf", "domid", "frames")

    def __init__(self, domid: int, frames: tuple[int, ...], region: _Region) -> None:
        self.domid = domid
        self.frames = frames
        self._region = region
        self.buf = region.buf

    def page(self, i: int) -> memoryview:
        """The i-th 4096-byte page of `buf`."""
        if not 0 <= i < len(self.frames):
            raise IndexError(f"page {i} of {len(self.frames)}")
        return self.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]

    def __repr__(self) -> str:
        return f"<SimPages dom{self.domid} frames={self.frames}>"


class SimMapping:
    """A peer's grants mapped into one domain (`Mapping`): one contiguous buffer in gref order.

    Drop slices of `buf` (and release rings built on it) before `unmap()`;
    a view that outlives the mapping reads private zeros, never the frames.
    `log` is an `AccessLog` when the mapping records accesses (see `ring_for`).
    """

    __slots__ = ("_frames", "_gen", "_pid", "_region", "_table", "buf", "grefs", "log", "peer", "readonly")

    def __init__(
        self,
        table: SimGrantTable,
        peer: int,
        grefs: tuple[int, ...],
        frames: tuple[int, ...],
        region: _Region,
        log: AccessLog | None,
    ) -> None:
        self._table = table
        self._gen = table._gen
        self._pid = os.getpid()
        self._frames = frames
        self._region = region
        self.peer = peer
        self.grefs = grefs
        self.readonly = region.readonly
        self.buf = region.buf
        self.log = log

    @property
    def mapped(self) -> bool:
        return self._region.live

    def unmap(self) -> None:
        """End the mapping (idempotent; after a destroy of this domain it only frees the range)."""
        self._table._unmap(self)

    def ring(self, order: int = 0, entry_size: int = ENTRY_SIZE_X86_64) -> SharedRing:
        """The shared ring over this mapping, recorded when it has a log (`ring_for`).

        Drivers call it when a mapping offers it, so the reference backend's slot
        reads are logged in simulation without importing the simulation.
        """
        return ring_for(self, order, entry_size)

    def _detach(self) -> None:
        self._region.release()

    def __enter__(self) -> SimMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmap()

    def __repr__(self) -> str:
        state = "mapped" if self.mapped else "unmapped"
        mode = "ro" if self.readonly else "rw"
        return f"<SimMapping dom{self._table.domid} <- dom{self.peer} grefs={self.grefs} {mode} {state}>"


class SimGrantTable:
    """The grant table of one domain (`GrantTable`) with Xen's permission checks.

    A domain maps only grants offered to it by the named peer and still
    active; a read-only grant maps only read-only and refuses `copy_to`;
    `revoke` refuses while the grant is mapped (SEC-23). With `record=True`
    every mapping it makes carries an `AccessLog` (double-fetch checks, SEC-1).
    """

    def __init__(self, host: GrantHost, domid: int, *, record: bool = False) -> None:
        self.host = host
        self.domid = domid
        self.record = record
        with host._lock:
            _, self._gen, _ = host.domains.attach(domid)

    # -- pages -------------------------------------------------------------------------------

    def alloc_pages(self, count: int = 1) -> SimPages:
        """`count` zeroed pages (SEC-24) in one buffer; contiguous frames when free memory allows."""
        if type(count) is not int or count < 1:
            raise ValueError(f"page count {count!r} is not a positive integer")
        h = self.host
        with h._lock:
            self._check_alive()
            st = h._fst.tobytes()
            first = st.find(bytes(count))
            if first >= 0:
                frames = tuple(range(first, first + count))
            else:
                found: list[int] = []
                pos = st.find(b"\0")
                while pos >= 0 and len(found) < count:
                    found.append(pos)
                    pos = st.find(b"\0", pos + 1)
                if len(found) < count:
                    raise XenError(
                        f"domain {self.domid}: out of memory ({count} pages asked, {len(found)} free)"
                    )
                frames = tuple(found)
            region = _Region(h._memfd, frames, readonly=False)
            for f in frames:
                h._fst[f] = _F_USED
                h._fown[f] = self.domid
                h._fmaps[f] = 0
                h._fgrants[f] = 0
            # Freed frames are punched (read back as zeros), but zero them anyway (SEC-24);
            # under the lock, so a concurrent destroy cannot unmap the range meanwhile.
            ctypes.memset(region.addr, 0, region.nbytes)
            pages = SimPages(self.domid, frames, region)
            h._local_pages.setdefault(self.domid, set()).add(pages)
        return pages

    def free_pages(self, pages: SimPages) -> None:
        """Free own pages; refused while a grant on them is active (revoke first, SEC-23)."""
        h = self.host
        with h._lock:
            self._check_alive()
            for f in pages.frames:
                if h._fst[f] != _F_USED or h._fown[f] != self.domid:
                    raise XenError(f"domain {self.domid}: frame {f} is not its page")
                if h._fgrants[f]:
                    raise XenError(
                        f"domain {self.domid}: frame {f} still has {h._fgrants[f]} active grant(s); "
                        "revoke them first"
                    )
            regs = h._local_pages.get(self.domid)
            if regs is not None:
                regs.discard(pages)
            pages._region.release()  # before the frames can be handed out again
            for f in pages.frames:
                h._fst[f] = _F_FREE
            h._punch(pages.frames)

    # -- offering grants ---------------------------------------------------------------------

    def grant(self, peer: int, frame: int, *, readonly: bool) -> int:
        """Offer own `frame` to `peer`; the new gref (round robin, so a revoked gref is not reused soon)."""
        h = self.host
        with h._lock:
            self._check_alive()
            if type(frame) is not int or not 0 <= frame < h.nr_frames:
                raise XenError(f"domain {self.domid}: no such frame {frame!r}")
            if h._fst[frame] != _F_USED or h._fown[frame] != self.domid:
                raise XenError(f"domain {self.domid}: frame {frame} is not its page; cannot grant it")
            st = h._gst.tobytes()
            cursor = h._hdr[_H_CURSOR]
            gref = st.find(b"\0", cursor)
            if gref < 0:
                gref = st.find(b"\0", FIRST_GREF)
            if gref < 0:
                raise XenError(f"grant table full ({h.max_grants} entries)")
            base = gref * _GW
            g = h._g
            g[base + _G_OWNER] = self.domid
            g[base + _G_PEER] = peer
            g[base + _G_FRAME] = frame
            g[base + _G_RO] = 1 if readonly else 0
            g[base + _G_MAPS] = 0
            h._gst[gref] = _G_ACTIVE
            h._fgrants[frame] += 1
            h._hdr[_H_CURSOR] = gref + 1 if gref + 1 < h.max_grants else FIRST_GREF
            return gref

    def revoke(self, gref: int) -> bool:
        """End foreign access: True and the entry is gone, or False (kept) while the peer maps it (SEC-23)."""
        h = self.host
        with h._lock:
            self._check_alive()
            base = self._own_entry(gref)
            if h._g[base + _G_MAPS]:
                return False
            h._gst[gref] = _G_FREE
            h._fgrants[h._g[base + _G_FRAME]] -= 1
            return True

    # -- using a peer's grants ---------------------------------------------------------------

    def map(
        self, peer: int, grefs: Sequence[int], *, readonly: bool, record: bool | None = None
    ) -> SimMapping:
        """Map `peer`'s grants as one contiguous buffer in gref order (WIRE-10); all or nothing.

        Raises XenError naming the first gref that is unknown, revoked, not
        `peer`'s, not offered to this domain, or read-only when `readonly` is
        False. `record` (default: the table's setting) attaches an `AccessLog`.
        """
        grefs = tuple(grefs)
        if not grefs:
            raise XenError("map: no grant references")
        h = self.host
        with h._lock:
            self._check_alive()
            frames = tuple(
                self._check_peer_entry(peer, gref, write=not readonly, what="map") for gref in grefs
            )
            region = _Region(h._memfd, frames, readonly)
            g = h._g
            for gref, f in zip(grefs, frames, strict=True):
                g[gref * _GW + _G_MAPS] += 1
                h._fmaps[f] += 1
            log = AccessLog() if (self.record if record is None else record) else None
            mapping = SimMapping(self, peer, grefs, frames, region, log)
            h._local_maps.setdefault(self.domid, set()).add(mapping)
        return mapping

    def copy_from(self, peer: int, gref: int, offset: int, length: int) -> bytes:
        """Grant copy out of a peer's page (QEMU-style, no mapping); same checks as `map`."""
        frame = self._check_copy(peer, gref, offset, length, write=False)
        a = frame * PAGE_SIZE + offset
        return self.host.phys[a : a + length].tobytes()

    def copy_to(self, peer: int, gref: int, offset: int, data: Buffer) -> None:
        """Grant copy into a peer's page; refused for a read-only grant."""
        src = memoryview(data).cast("B")
        n = src.nbytes
        frame = self._check_copy(peer, gref, offset, n, write=True)
        a = frame * PAGE_SIZE + offset
        self.host.phys[a : a + n] = src

    # -- internals ---------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self.host.domains.alive(self.domid, self._gen):
            raise XenError(f"domain {self.domid} was destroyed")

    def _entry(self, gref: int) -> int:
        if type(gref) is not int or not FIRST_GREF <= gref < self.host.max_grants:
            raise XenError(f"gref {gref!r}: not a grant reference")
        return gref * _GW

    def _own_entry(self, gref: int) -> int:
        base = self._entry(gref)
        h = self.host
        if h._gst[gref] != _G_ACTIVE or h._g[base + _G_OWNER] != self.domid:
            raise XenError(f"domain {self.domid}: gref {gref} is not an active grant of this domain")
        return base

    def _check_peer_entry(self, peer: int, gref: int, *, write: bool, what: str) -> int:
        """The frame behind `peer`'s `gref` if this domain may use it; else XenError naming the gref."""
        base = self._entry(gref)
        h = self.host
        g = h._g
        state = h._gst[gref]
        if state == _G_DEAD:
            raise XenError(f"{what}: gref {gref}: granting domain {g[base + _G_OWNER]} was destroyed")
        if state != _G_ACTIVE:
            raise XenError(f"{what}: gref {gref}: no such grant (never granted, or revoked)")
        if g[base + _G_OWNER] != peer:
            raise XenError(f"{what}: gref {gref} is not a grant of domain {peer}")
        if g[base + _G_PEER] != self.domid:
            raise XenError(f"{what}: gref {gref} of domain {peer} is not offered to domain {self.domid}")
        if write and g[base + _G_RO]:
            raise XenError(f"{what}: gref {gref} of domain {peer} is a read-only grant; write access refused")
        return g[base + _G_FRAME]

    def _check_copy(self, peer: int, gref: int, offset: int, length: int, *, write: bool) -> int:
        self._check_alive()
        frame = self._check_peer_entry(peer, gref, write=write, what="copy_to" if write else "copy_from")
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise XenError(f"grant copy: bad offset/length {offset!r}/{length!r}")
        if offset + length > PAGE_SIZE:
            raise XenError(
                f"grant copy: {offset}+{length} crosses the end of the 4096-byte page (gref {gref})"
            )
        return frame

    def _unmap(self, m: SimMapping) -> None:
        h = self.host
        with h._lock:
            if not m._region.live:
                return
            regs = h._local_maps.get(self.domid)
            if regs is not None:
                regs.discard(m)
            m._detach()  # first, and under the lock: a zombie frame freed below is mapped nowhere here
            # Counts belong to the process that mapped, and a destroy already dropped them.
            if m._pid == os.getpid() and h.domains.alive(self.domid, m._gen):
                g = h._g
                for gref, f in zip(m.grefs, m._frames, strict=True):
                    base = gref * _GW
                    g[base + _G_MAPS] -= 1
                    h._fmaps[f] -= 1
                    if h._gst[gref] == _G_DEAD and g[base + _G_MAPS] == 0:
                        h._gst[gref] = _G_FREE
                    h._maybe_free_zombie(f)

    def __reduce__(self) -> NoReturn:
        refuse_pickling(self)

    def __repr__(self) -> str:
        return f"<SimGrantTable dom{self.domid} gen={self._gen}{' recording' if self.record else ''}>"


# --------------------------------------------------------------------------------------
# Recording (SEC-1 double fetch)
# --------------------------------------------------------------------------------------


class AccessLog:
    """Accesses to one mapping in order: (seq, start, length, kind), offsets into its buffer.

    Kinds: "r" a copy read out, "w" a write, "v" a live view handed out (an
    escape: it may be read any number of times, so it never counts as once).
    """

    __slots__ = ("_seq", "entries")

    def __init__(self) -> None:
        self.entries: list[tuple[int, int, int, str]] = []
        self._seq = itertools.count()

    def add(self, start: int, length: int, kind: str) -> None:
        self.entries.append((next(self._seq), start, length, kind))

    def mark(self) -> int:
        """A sequence number; pass it as `since` to look only at later accesses."""
        return self.entries[-1][0] + 1 if self.entries else 0

    def clear(self) -> None:
        self.entries.clear()

    def _counts(self, start: int, stop: int, kind: str, since: int) -> list[int]:
        counts = [0] * (stop - start)
        for seq, a, n, k in self.entries:
            if k != kind or seq < since:
                continue
            lo, hi = max(a, start), min(a + n, stop)
            for i in range(lo - start, hi - start):
                counts[i] += 1
        return counts

    def reads_of(self, start: int, stop: int, *, since: int = 0) -> list[int]:
        """How often each byte of [start, stop) was copied out ("r")."""
        return self._counts(start, stop, "r", since)

    def writes_of(self, start: int, stop: int, *, since: int = 0) -> list[int]:
        return self._counts(start, stop, "w", since)

    def accesses(self, start: int, stop: int, *, since: int = 0) -> list[tuple[int, int, int, str]]:
        """The entries that touch [start, stop)."""
        return [e for e in self.entries if e[0] >= since and e[1] < stop and e[1] + e[2] > start]

    def read_once(self, start: int, stop: int, *, since: int = 0) -> bool:
        """Every byte of [start, stop) read exactly once and no live view of it handed out."""
        if any(k == "v" for _, _, _, k in self.accesses(start, stop, since=since)):
            return False
        return all(c == 1 for c in self.reads_of(start, stop, since=since))

    def check_read_once(self, start: int, stop: int, *, since: int = 0) -> None:
        """AssertionError naming the bytes not read exactly once and the accesses involved."""
        if self.read_once(start, stop, since=since):
            return
        counts = self.reads_of(start, stop, since=since)
        bad = [start + i for i, c in enumerate(counts) if c != 1]
        touched = self.accesses(start, stop, since=since)
        span = f"{bad[0]}..{bad[-1]}" if bad else "none"
        raise AssertionError(
            f"bytes [{start}, {stop}) not read exactly once (SEC-1): offsets not read once: {span}; "
            f"accesses (seq, start, length, kind): {touched}"
        )

    def __repr__(self) -> str:
        return f"<AccessLog {len(self.entries)} accesses>"


class RecordingView:
    """A logged window on a buffer: every read returns a copy and is recorded.

    Use it for pages a backend reads (indirect descriptors, data) where the
    double-fetch rule applies; `raw` hands out the live memoryview and is
    logged as an escape. With `log=None` nothing is recorded (live Xen).
    """

    __slots__ = ("_base", "_buf", "log")

    def __init__(self, buf: Buffer, log: AccessLog | None = None, base: int = 0) -> None:
        self._buf = memoryview(buf).cast("B")
        self.log = log
        self._base = base

    def __len__(self) -> int:
        return self._buf.nbytes

    @property
    def readonly(self) -> bool:
        return self._buf.readonly

    def _range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self._buf.nbytes:
            raise IndexError(f"access [{offset}, {offset + n}) outside a {self._buf.nbytes}-byte buffer")

    def read(self, offset: int, n: int) -> bytes:
        self._range(offset, n)
        if self.log is not None:
            self.log.add(self._base + offset, n, "r")
        return self._buf[offset : offset + n].tobytes()

    def write(self, offset: int, data: Buffer) -> None:
        n = memoryview(data).nbytes
        self._range(offset, n)
        if self.log is not None:
            self.log.add(self._base + offset, n, "w")
        self._buf[offset : offset + n] = data

    def _slice(self, key: slice) -> tuple[int, int]:
        start, stop, step = key.indices(self._buf.nbytes)
        if step != 1:
            raise ValueError("RecordingView slices must have step 1")
        return start, max(stop - start, 0)

    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            return self.read(*self._slice(key))
        i = key + self._buf.nbytes if key < 0 else key
        return self.read(i, 1)[0]

    def __setitem__(self, key: int | slice, value: int | Buffer) -> None:
        if isinstance(key, slice):
            start, n = self._slice(key)
            if memoryview(value).nbytes != n:  # type: ignore[arg-type]
                raise ValueError("RecordingView slice assignment cannot change the size")
            self.write(start, value)  # type: ignore[arg-type]
        else:
            i = key + self._buf.nbytes if key < 0 else key
            self.write(i, bytes([value]))  # type: ignore[list-item]

    def unpack_from(self, fmt: str | struct.Struct, offset: int = 0) -> tuple[object, ...]:
        """`struct.unpack_from` over a recorded copy of exactly the bytes it needs."""
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        return s.unpack(self.read(offset, s.size))

    def pack_into(self, fmt: str | struct.Struct, offset: int, *values: object) -> None:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        self.write(offset, s.pack(*values))

    def tobytes(self) -> bytes:
        return self.read(0, self._buf.nbytes)

    def sub(self, offset: int, n: int) -> RecordingView:
        """A window on [offset, offset+n) logging into the same log at the same offsets."""
        self._range(offset, n)
        return RecordingView(self._buf[offset : offset + n], self.log, self._base + offset)

    @property
    def raw(self) -> memoryview:
        """The live memoryview (unrecorded reads: logged as an escape "v")."""
        if self.log is not None:
            self.log.add(self._base, self._buf.nbytes, "v")
        return self._buf

    def release(self) -> None:
        self._buf.release()


class _RecordingWords:
    """Stands in for `SharedRing.words` (the cast("I") index words), logging each 4-byte access."""

    __slots__ = ("_log", "_w")

    def __init__(self, words: memoryview, log: AccessLog) -> None:
        self._w = words
        self._log = log

    def __getitem__(self, i: int) -> int:
        self._log.add(4 * i, 4, "r")
        return self._w[i]

    def __setitem__(self, i: int, value: int) -> None:
        self._log.add(4 * i, 4, "w")
        self._w[i] = value

    def __len__(self) -> int:
        return len(self._w)

    def tolist(self) -> list[int]:
        self._log.add(0, 4 * len(self._w), "r")
        return self._w.tolist()

    def release(self) -> None:
        self._w.release()


class RecordingRing(SharedRing):
    """A `SharedRing` whose slot copies, slot writes and index-word accesses are logged.

    `BackRing`/`FrontRing` work on it unchanged: they copy slots through
    `read_slot` and index words through `words`, both logged here.
    """

    __slots__ = ("log",)

    def __init__(
        self,
        buf: Buffer,
        order: int = 0,
        entry_size: int = ENTRY_SIZE_X86_64,
        *,
        log: AccessLog | None = None,
    ) -> None:
        super().__init__(buf, order, entry_size)
        self.log = AccessLog() if log is None else log
        self.words = _RecordingWords(self.words, self.log)  # type: ignore[assignment]

    def init(self, start: int = 0) -> None:
        super().init(start)
        self.log.add(16, 48, "w")

    def header_padding(self) -> bytes:
        self.log.add(16, 48, "r")
        return super().header_padding()

    def read_slot(self, idx: int) -> bytes:
        self.log.add(self.slot_offset(idx), self.entry_size, "r")
        return super().read_slot(idx)

    def write_slot(self, idx: int, data: Buffer) -> None:
        self.log.add(self.slot_offset(idx), memoryview(data).nbytes, "w")
        super().write_slot(idx, data)

    def write_at(self, idx: int, offset: int, data: Buffer) -> None:
        self.log.add(self.slot_offset(idx) + offset, memoryview(data).nbytes, "w")
        super().write_at(idx, offset, data)

    def slot_view(self, idx: int) -> memoryview:
        self.log.add(self.slot_offset(idx), self.entry_size, "v")
        return super().slot_view(idx)


def ring_for(mapping: Mapping, order: int = 0, entry_size: int = ENTRY_SIZE_X86_64) -> SharedRing:
    """The ring over a mapped ring buffer: recorded if the mapping has an `AccessLog`, plain otherwise."""
    log = getattr(mapping, "log", None)
    if log is None:
        return SharedRing(mapping.buf, order, entry_size)
    return RecordingRing(mapping.buf, order, entry_size, log=log)


def view_for(mapping: Mapping) -> RecordingView:
    """A `RecordingView` over a mapping's buffer, logging into its `AccessLog` if it has one."""
    return RecordingView(mapping.buf, getattr(mapping, "log", None))
