"""Faulty backends, part 2: XenStore keys and timing, the state machine, multi-page rings,
multi-queue, flush/barrier, discard and persistent grants.

Each class is a target (`--backend=tests.faulty.backends_xenbus:NAME`): the reference
backend with one small change, registered with the ONE rule it breaks. The XenBus
faults override a method of `Backend` (`_read_rings`, `_device_properties`,
`_on_frontend`, `_kick`, `resize`, ...); the request faults swap in a `RingServer`
subclass through `Backend.server_class`.
"""

from __future__ import annotations

import time
from dataclasses import replace

from blkif_spec import consts, xenbus
from blkif_spec.consts import XenbusState as S
from blkif_spec.drivers.backend import Backend, _Queue
from blkif_spec.drivers.blkserve import BARRIER, FLUSH, OKAY, PAGE, BadRequest, RingServer
from blkif_spec.drivers.store import BackingStore
from blkif_spec.targets import ReferenceBackend
from blkif_spec.xen.api import XenError
from tests.faulty.registry import faulty, serving

# -- XenStore keys and timing --------------------------------------------------------------------


class _LateOrderBackend(Backend):
    def __post_init__(self) -> None:
        self.config = replace(self.config, order_after_initwait=True)  # the reference's QEMU 10.2 mode
        super().__post_init__()


@faulty("backend", "XK-7.a", "writes max-ring-page-order just after switching to InitWait")
class RingOrderAfterInitWait(ReferenceBackend):
    """QEMU 10.2 (SM-13): a frontend reading the offer on InitWait sees no multi-page ring."""

    backend_class = _LateOrderBackend


class _SectorSizeAfterConnectedBackend(Backend):
    def _device_properties(self) -> dict[str, int | str]:
        props = super()._device_properties()
        self._held = {"sector-size": props.pop("sector-size")}
        return props

    def _switch(self, state: S) -> None:
        super()._switch(state)
        held = getattr(self, "_held", None)
        if state == S.Connected and held:  # the bug: a device property published after Connected
            for key, value in held.items():
                self.xen.store.write(f"{self.path}/{key}", str(value))


@faulty("backend", "XK-9", "writes sector-size only after state=4 (Connected)")
class SectorSizeAfterConnected(ReferenceBackend):
    """Old backends that never wrote sector-size, or wrote it late: Linux blkfront fails the device."""

    backend_class = _SectorSizeAfterConnectedBackend


class _OddSectorSizeBackend(Backend):
    def _device_properties(self) -> dict[str, int | str]:
        return super()._device_properties() | {"sector-size": 520, "physical-sector-size": 520}


@faulty("backend", "XK-B32", "announces sector-size=520 (not a power of two)")
class SectorSizeNotPowerOfTwo(ReferenceBackend):
    """A 520-byte-sector SAS disk passed through as it is (its I/O still uses 512-byte sectors)."""

    backend_class = _OddSectorSizeBackend


class _HexPropertyBackend(Backend):
    def _device_properties(self) -> dict[str, int | str]:
        props = super()._device_properties()
        return props | {"physical-sector-size": hex(int(props["physical-sector-size"]))}


@faulty("backend", "XK-4", "writes physical-sector-size in hex (0x200), not decimal")
class PhysicalSectorSizeInHex(ReferenceBackend):
    """A `%#x` where `%u` was meant: every value but physical-device is decimal."""

    backend_class = _HexPropertyBackend


class _StateBeforeSectorsBackend(Backend):
    def resize(self, size_bytes: int) -> None:
        with self._lock:
            self.store.resize(size_bytes)
            self.xen.store.write(f"{self.path}/state", str(int(self._state)))  # the bug: state first
            self.xen.store.write(f"{self.path}/sectors", str(size_bytes // consts.SECTOR_SIZE))


@faulty("backend", "XK-10", "on a resize rewrites state before sectors: the frontend re-reads the old size")
class ResizeStateBeforeSectors(ReferenceBackend):
    backend_class = _StateBeforeSectorsBackend


class _GuestWritableDirBackend(Backend):
    def _publish_offer(self) -> None:
        super()._publish_offer()
        # the bug: "let the frontend write back" — its own directory opened to the guest
        self.xen.store.set_perms(self.path, [f"n{self.xen.store.domid}", f"b{self.frontend_id}"])


@faulty("backend", "SEC-30", "gives the guest write access to the backend's own device directory")
class BackendDirWritableByGuest(ReferenceBackend):
    """The guest can then rewrite sectors, state or feature keys the toolstack relies on."""

    backend_class = _GuestWritableDirBackend


# -- the state machine ---------------------------------------------------------------------------


class _NoClosingMirrorBackend(Backend):
    def _on_frontend(self, fe: int) -> None:
        if fe == S.Closing:
            return  # the bug: stays Connected until the frontend goes Closed
        super()._on_frontend(fe)


@faulty("backend", "SM-22", "ignores frontend Closing (stays Connected)")
class IgnoresFrontendClosing(ReferenceBackend):
    backend_class = _NoClosingMirrorBackend


class _KeepsRingsOnCloseBackend(Backend):
    def _on_frontend(self, fe: int) -> None:
        if fe == S.Closed and self._state != S.Closed:
            self._switch(S.Closed)  # the bug: rings, grant mappings and ports kept
            return
        super()._on_frontend(fe)


@faulty("backend", "SM-23", "goes Closed on frontend Closed but keeps its rings mapped and ports bound")
class LeaksRingsOnClose(ReferenceBackend):
    backend_class = _KeepsRingsOnCloseBackend


class _NoReopenBackend(Backend):
    def _on_frontend(self, fe: int) -> None:
        if fe == S.Initialising and self._state == S.Closed:
            return  # the bug: Closed is final; only a new backend would serve again
        super()._on_frontend(fe)


@faulty("backend", "SM-26", "stays Closed when a closed frontend returns to Initialising")
class NoReconnectAfterClose(ReferenceBackend):
    """Backends that tear the device down for good on close (kexec, driver reload break)."""

    backend_class = _NoReopenBackend


class _DiesWhenFlappedBackend(Backend):
    FLAPS, WINDOW = 3, 5.0  # this many Connected→Closing/Closed within WINDOW s kill the thread

    def _on_frontend(self, fe: int) -> None:
        if fe in (S.Closing, S.Closed) and self._state == S.Connected:
            now = time.monotonic()
            self._flaps = [t for t in getattr(self, "_flaps", []) if now - t < self.WINDOW] + [now]
            if len(self._flaps) >= self.FLAPS:  # _xenbus_loop records it and the thread ends
                raise XenError(f"xenbus thread crashed after {len(self._flaps)} rapid disconnects")
        super()._on_frontend(fe)


@faulty("backend", "SEC-7", "its xenbus thread dies after 3 rapid Connected→Closed flaps")
class DiesOnStateFlapping(ReferenceBackend):
    """XSA-350: blkback's disconnect raced a reconnect and crashed; later connects time out."""

    backend_class = _DiesWhenFlappedBackend


# -- multi-page rings ----------------------------------------------------------------------------


class _StaleRingRef0Backend(Backend):
    def _read_rings(self, fe_tree: dict[str, str], be_tree: dict[str, str]) -> list[xenbus.Ring]:
        if "ring-page-order" not in fe_tree and "ring-ref0" in fe_tree:
            fe_tree = fe_tree | {"ring-page-order": "0"}  # the bug: ring-ref0 taken whenever present
        return super()._read_rings(fe_tree, be_tree)


@faulty("backend", "MPR-2", "reads a stale ring-ref0 when ring-page-order is absent")
class ReadsStaleRingRef0(ReferenceBackend):
    """The 2021 Linux blkback regression fixed by "xen-blkback: fix compatibility bug with single
    page rings": after a multi-page connection, a single-page reconnect mapped the old ring-ref0."""

    backend_class = _StaleRingRef0Backend


class _OrderOffByOneBackend(Backend):
    def __post_init__(self) -> None:  # offers one order below what it can map, so max + 1 still maps
        top = min(self.config.max_ring_page_order, consts.MAX_RING_PAGE_ORDER - 1)
        self.config = replace(self.config, max_ring_page_order=top)
        super().__post_init__()

    def _read_rings(self, fe_tree: dict[str, str], be_tree: dict[str, str]) -> list[xenbus.Ring]:
        top = int(be_tree.get("max-ring-page-order", "0"))
        return super()._read_rings(fe_tree, be_tree | {"max-ring-page-order": str(top + 1)})  # the bug


@faulty("backend", "MPR-3", "offers max-ring-page-order 3 and accepts ring-page-order 4 (off by one)")
class AcceptsOrderAboveMax(ReferenceBackend):
    """A `>` where `>=` was meant in the order check: one order above the offer connects."""

    backend_class = _OrderOffByOneBackend


class _ReversedRingRefsBackend(Backend):
    def _read_rings(self, fe_tree: dict[str, str], be_tree: dict[str, str]) -> list[xenbus.Ring]:
        return [r._replace(grefs=r.grefs[::-1]) for r in super()._read_rings(fe_tree, be_tree)]


@faulty(
    "backend",
    "WIRE-10",
    "maps ring-ref0..N-1 in reverse order: reads the indices from the last page",
    hangs=True,
)
class MapsRingPagesReversed(ReferenceBackend):
    """With 2+ ring pages it reads req_prod from the wrong page: it never sees a request (timeout)."""

    backend_class = _ReversedRingRefsBackend


# -- multi-queue ---------------------------------------------------------------------------------


class _QueuesAboveOfferBackend(Backend):
    HARD_LIMIT = 16

    def _read_rings(self, fe_tree: dict[str, str], be_tree: dict[str, str]) -> list[xenbus.Ring]:
        # the bug: the count is checked against the build-time limit, not the max it offered
        return super()._read_rings(fe_tree, be_tree | {"multi-queue-max-queues": str(self.HARD_LIMIT)})


@faulty("backend", "MQ-2", "accepts more queues than its multi-queue-max-queues (up to 16)")
class AcceptsMoreQueuesThanOffered(ReferenceBackend):
    backend_class = _QueuesAboveOfferBackend


class _FlatKeysWithQueuesBackend(Backend):
    def _read_rings(self, fe_tree: dict[str, str], be_tree: dict[str, str]) -> list[xenbus.Ring]:
        rings = super()._read_rings(fe_tree, be_tree)
        if len(rings) > 1 and "ring-ref" in fe_tree and "event-channel" in fe_tree:
            # the bug: the single-queue keys win for queue 0 wherever they are present
            rings[0] = xenbus.Ring(0, (int(fe_tree["ring-ref"]),), int(fe_tree["event-channel"]))
        return rings


@faulty("backend", "MQ-4", "with n >= 2 uses a top-level ring-ref/event-channel for queue 0")
class ReadsFlatKeysWithQueues(ReferenceBackend):
    backend_class = _FlatKeysWithQueuesBackend


class _PerQueueOrderBackend(Backend):
    def _read_rings(self, fe_tree: dict[str, str], be_tree: dict[str, str]) -> list[xenbus.Ring]:
        rings = []
        for r in super()._read_rings(fe_tree, be_tree):
            own = fe_tree.get(f"queue-{r.queue}/ring-page-order", "")
            if r.queue is not None and own.isdigit():  # the bug: a per-queue order is honoured
                r = r._replace(grefs=r.grefs[: 1 << int(own)])
            rings.append(r)
        return rings


@faulty("backend", "MQ-5", "honours a queue-N/ring-page-order over the top-level ring-page-order", hangs=True)
class HonoursPerQueueRingOrder(ReferenceBackend):
    """Its one-page ring sees 64 requests where 32 fit: it halts the ring (RING-9) and never answers."""

    backend_class = _PerQueueOrderBackend


class _WrongQueuePortBackend(Backend):
    def _kick(self, q: _Queue) -> None:
        if self._paused:
            return
        if q.server.serve():  # the bug: the answer is signalled on the next queue's channel
            queues = self._queues
            self.evtchn.notify(queues[(queues.index(q) + 1) % len(queues)].port)


@faulty("backend", "RING-13", "notifies queue q's responses on queue q+1's event channel")
class NotifiesWrongQueue(ReferenceBackend):
    backend_class = _WrongQueuePortBackend


# -- flush and barrier ---------------------------------------------------------------------------


class _WriteBackCache:
    """A write-back cache in front of a store: writes wait in memory until flush() or a read."""

    def __init__(self, store: BackingStore) -> None:
        self.store = store
        self.dirty: list[tuple[int, bytes]] = []

    @property
    def size(self) -> int:
        return self.store.size

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.dirty.append((offset, bytes(data)))

    def write_back(self) -> None:
        for offset, data in self.dirty:
            self.store.write(offset, data)
        self.dirty.clear()

    def read(self, offset: int, length: int) -> bytes:
        self.write_back()
        return self.store.read(offset, length)

    def flush(self) -> None:
        self.write_back()
        self.store.flush()

    def discard(self, offset: int, length: int) -> None:
        self.write_back()
        self.store.discard(offset, length)

    def resize(self, size: int) -> None:
        self.write_back()
        self.store.resize(size)

    def close(self) -> None:
        self.write_back()


class _BarrierSkipsCache(RingServer):
    def _rw_request(self, op: int, f: tuple) -> int:
        if op == BARRIER and f[1] == 0 and self.features.barrier:
            return OKAY  # the bug: answered at once, the earlier writes still in the cache
        return super()._rw_request(op, f)


class _BarrierSkipsCacheBackend(Backend):
    server_class = _BarrierSkipsCache

    def __post_init__(self) -> None:
        super().__post_init__()
        self.store = _WriteBackCache(self.store)  # one cache for every ring of the disk

    def _disconnect(self) -> None:
        super()._disconnect()
        self.store.write_back()


@faulty("backend", "FL-1.a", "answers a BARRIER while earlier writes still sit in its write-back cache")
class BarrierBeforeEarlierWrites(ReferenceBackend):
    """Writes are cached (fine: FLUSH drains the cache) but a BARRIER does not drain it first."""

    backend_class = _BarrierSkipsCacheBackend


class _EmptyFlushRefused(RingServer):
    def _rw_request(self, op: int, f: tuple) -> int:
        if op == FLUSH and f[1] == 0 and self.features.flush:
            raise BadRequest("DIV-6.b")  # the bug: a FLUSH is expected to carry data
        return super()._rw_request(op, f)


@faulty("backend", "DIV-6.b", "answers a 0-segment FLUSH with ERROR although feature-flush-cache=1")
class RefusesEmptyFlush(ReferenceBackend):
    backend_class = serving(_EmptyFlushRefused)


# -- discard -------------------------------------------------------------------------------------


class _DiscardIgnoresReadOnly(RingServer):
    def _discard_request(self, f: tuple) -> int:
        disk, self.disk = self.disk, replace(self.disk, readonly=False)  # the bug: only the range checked
        try:
            return super()._discard_request(f)
        finally:
            self.disk = disk


@faulty("backend", "DISC-5", "discards on a read-only disk")
class DiscardsReadOnlyDisk(ReferenceBackend):
    """Read-only checked for WRITE but forgotten for DISCARD (blkback had to add it)."""

    backend_class = serving(_DiscardIgnoresReadOnly)


class _DroppedDiscards:
    """A store on which a discard is a hint it drops: the data stays (DISC-1 allows that)."""

    def __init__(self, store: BackingStore) -> None:
        self._store = store

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    @property
    def size(self) -> int:
        return self._store.size

    def discard(self, offset: int, length: int) -> None:
        pass


class _SecureDiscardIgnored(RingServer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.disk = replace(self.disk, store=_DroppedDiscards(self.disk.store))  # secure ones too


@faulty("backend", "DISC-3", "offers discard-secure=1 but ignores BLKIF_DISCARD_SECURE: the data stays")
class IgnoresSecureDiscard(ReferenceBackend):
    """Plain discards are dropped as hints (allowed); a secure one answered OKAY leaves old data."""

    backend_class = serving(_SecureDiscardIgnored)


# -- persistent grants ---------------------------------------------------------------------------


class _StalePersistentPages(RingServer):
    def _copy_in(self, gref: int, offset: int, length: int) -> bytes:
        if not self.features.persistent:
            return super()._copy_in(gref, offset, length)
        pages = self.__dict__.setdefault("_pages", {})
        if gref not in pages:  # the bug: the page's contents cached by gref, never read again
            pages[gref] = super()._copy_in(gref, 0, PAGE)
        return pages[gref][offset : offset + length]


@faulty("backend", "PG-2", "caches a persistent grant's page contents: reused grants write stale data")
class StalePersistentGrantData(ReferenceBackend):
    """A persistent-grant cache that keeps a copy of the data instead of the mapping."""

    backend_class = serving(_StalePersistentPages)


class _RefusesRepeatedGref(RingServer):
    def _io(self, op: int, sector: int, segs) -> None:
        grefs = [g for g, _first, _last in segs]
        if self.features.persistent and len(set(grefs)) < len(grefs):
            raise BadRequest("PG-5")  # the bug: the second persistent map of a gref fails the request
        super()._io(op, sector, segs)


@faulty("backend", "PG-5", "answers ERROR when one gref appears in two segments of a request")
class RefusesGrefUsedTwice(ReferenceBackend):
    """Linux blkback maps such a gref a second time, non-persistently; this one gives up instead."""

    backend_class = serving(_RefusesRepeatedGref)
