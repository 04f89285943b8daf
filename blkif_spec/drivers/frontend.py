"""The reference blkif frontend: negotiation, per-queue rings, a small block API.

Written against `blkif_spec.xen.api` only. It reads the backend's offer after
InitWait (SM-3), chooses queues and ring order within the limits (MQ-2, MPR-1),
writes the flat or `queue-N/` layout (MQ-3, MQ-4, MPR-2), publishes everything
before Initialised (XK-8), and reads device properties only at Connected (XK-9).

It never trusts the backend (inventory §8.2): each response is copied once
(SEC-20); an unknown or duplicate id, a wrong operation echo, a status outside
{0, -1, -2} or a response producer past the ring (SEC-21, RING-9, OP-6) is
recorded as a `RuleViolation` and the device stops being used (DIV-22): no
more responses processed, no more notifications. Pages it shares are zeroed
when allocated (SEC-24); without persistent grants each data grant is revoked
on completion, and one the backend still has mapped is a backend error (SEC-23).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from blkif_spec import codec, consts, wire, xenbus
from blkif_spec.consts import BlkifOp, XenbusState
from blkif_spec.drivers import xsutil
from blkif_spec.errors import RuleViolation
from blkif_spec.ring import FrontRing, SharedRing
from blkif_spec.xen.api import Pages, XenError, XenServices, XenStore, XenTimeout

READ, WRITE = int(BlkifOp.READ), int(BlkifOp.WRITE)
SECTOR, PAGE = consts.SECTOR_SIZE, consts.PAGE_SIZE
SPP = consts.SECTORS_PER_PAGE
VALID_STATUS = frozenset(int(s) for s in consts.BlkifRsp)
STALE_TRANSPORT_KEYS = frozenset(
    {"event-channel", "ring-page-order", "num-ring-pages", "multi-queue-num-queues"}
)


def is_transport_key(key: str) -> bool:
    """A transport key a frontend publishes (`key` relative to its directory, `queue-N/…` included)."""
    name = key.split("/", 1)[0]
    return name in STALE_TRANSPORT_KEYS or name.startswith(("ring-ref", "queue-"))


class DeviceDisabled(XenError):
    """The frontend stopped using the device after a backend protocol violation (DIV-22)."""


@dataclass(frozen=True)
class FrontendConfig:
    """What the frontend wants; it takes min(wanted, offered). Defaults: a modern Linux guest."""

    max_queues: int = 4
    max_ring_page_order: int = consts.MAX_RING_PAGE_ORDER
    persistent: bool = True
    max_indirect_segments: int = 256  # 0: never use indirect descriptors
    protocol: str = consts.X86_64_ABI
    timeout: float = 2.0  # bound on every wait on the backend
    handle: int = 0
    # First ring index (WIRE-8 says 0, as ring.h does): tests start near 2^32 to cross the wrap
    # (RING-1) and to see where a backend attaches (RING-12, DIV-23).
    ring_start: int = 0


@dataclass
class Completion:
    """The backend's answer to one request."""

    id: int
    operation: int
    status: int
    data: bytes = b""


@dataclass
class _Pending:
    id: int
    operation: int  # what the response must echo (indirect_op for indirect, IND-6)
    grefs: list[int]  # grants to end at completion (non-persistent mode)
    pages: list[memoryview]  # data pages, in segment order
    segs: list[tuple[int, int]]  # (first_sect, last_sect) per page
    pooled: list[tuple[memoryview, int]] = field(default_factory=list)  # persistent pages to return
    owned: list[Pages] = field(default_factory=list)  # pages to free once the grants are ended
    done: Completion | None = None
    raw: bool = False  # put by `raw_request`: its id is the test's, not one of `free_ids`


@dataclass
class _Queue:
    index: int
    pages: Pages
    ring: FrontRing
    port: int
    ring_grefs: list[int]
    free_ids: list[int]
    pending: dict[int, _Pending] = field(default_factory=dict)
    pool: list[tuple[memoryview, int]] = field(default_factory=list)  # persistent (page, gref)


@dataclass(frozen=True)
class RawQueue:
    """A connected queue lent to a caller that drives its ring itself (see `Frontend.raw_queue`)."""

    ring: FrontRing
    buf: memoryview  # the ring pages: header, then the slots (WIRE-8, WIRE-9)
    port: int
    pages: list[tuple[memoryview, int]]  # persistent data pages and their grants (PG-2)
    ring_grefs: tuple[int, ...] = ()  # the grants of the ring pages, in order (WIRE-10)


class Frontend:
    """One vbd as seen from the guest: connect, do I/O, close."""

    #: The front ring class; a variant of the frontend (the fault catalogue) swaps in its own.
    ring_class: ClassVar[type[FrontRing]] = FrontRing

    def __init__(self, xen: XenServices, path: str, config: FrontendConfig | None = None) -> None:
        self.xen = xen
        self.evtchn = xen.evtchn.open()  # our ports' events come to us only
        self.path = path
        self.config = config or FrontendConfig()
        self.violations: list[RuleViolation] = []
        self.negotiated: xenbus.Negotiated | None = None
        self.backend_path = ""
        self.backend_id = 0
        self.sectors = 0
        self.sector_size = SECTOR
        self.info = 0
        self.disabled = False
        self.detached = False  # the backend closed the device (SM-21)
        self._queues: list[_Queue] = []
        self._by_port: dict[int, _Queue] = {}
        self._lock = threading.RLock()
        self._watcher_lock = threading.Lock()  # publishes the backend watcher thread
        self._codecs = codec.codecs(self.config.protocol)
        self._abi = wire.abi(self.config.protocol)
        self._page_frames: list[Pages] = []  # freed at teardown
        self._stuck_grefs: list[int] = []  # grants to end at teardown (kept mapped, or raw)
        # Raw layer: called with our XenStore and the transport keys just published, before the
        # switch to Initialised; a test rewrites the directory there (other key schemes, keys
        # left from an earlier connection: MPR-2, MQ-2..5). We then negotiate what we meant.
        self.raw_before_initialised: Callable[[XenStore, dict[str, str]], None] | None = None

    # -- XenBus ----------------------------------------------------------------------------------

    def _find_backend(self) -> None:
        """The toolstack's `backend` and `backend-id` keys (XK-F1, XK-F2), which must exist."""
        backend = self.xen.store.read(f"{self.path}/backend")
        backend_id = xsutil.read_int(self.xen.store, f"{self.path}/backend-id")
        if backend is None or backend_id is None:
            raise XenError(f"{self.path}: toolstack keys backend/backend-id missing (XK-F1, XK-F2)")
        self.backend_path, self.backend_id = backend, backend_id

    def connect(self) -> xenbus.Negotiated:
        """Run the documented startup (SM-3, SM-5) to Connected; every wait is bounded."""
        st, c = self.xen.store, self.config
        self._find_backend()
        self._wait_backend({XenbusState.InitWait, XenbusState.Connected}, "backend InitWait (SM-2)")
        be_tree = xsutil.read_tree(st, self.backend_path)
        nqueues, order = self._choose(be_tree)
        self._setup_rings(nqueues, order)
        keys = xenbus.frontend_transport(
            order=order, grefs=[q.ring_grefs for q in self._queues], ports=[q.port for q in self._queues],
            protocol=c.protocol, persistent=c.persistent,
        )  # fmt: skip
        self._publish(keys)
        if self.raw_before_initialised is not None:
            self.raw_before_initialised(st, dict(keys))
        self._switch(XenbusState.Initialised)  # XK-8: after every transport key
        self._wait_backend({XenbusState.Connected}, "backend Connected (SM-4)")
        be_tree = xsutil.read_tree(st, self.backend_path)
        fe_tree = xsutil.read_tree(st, self.path)
        if self.raw_before_initialised is not None:  # the raw edits are the test's business
            fe_tree = {k: v for k, v in fe_tree.items() if not is_transport_key(k)} | keys
        self.negotiated = xenbus.negotiate(fe_tree, be_tree)
        self._read_properties(be_tree)
        self._switch(XenbusState.Connected)
        self._start_watcher()
        return self.negotiated

    # `_choose` and `_publish` are the steps of `connect` a variant (the fault catalogue) overrides.

    def _choose(self, be_tree: dict[str, str]) -> tuple[int, int]:
        """(queues, ring order) within the backend's offer and our wishes (MQ-2, MPR-1)."""
        queues = xenbus.choose_queues(be_tree, self.config.max_queues)
        return queues, xenbus.choose_ring_order(be_tree, self.config.max_ring_page_order)

    def _publish(self, keys: dict[str, str]) -> None:
        """Write the transport keys in one transaction, before Initialised (XK-8)."""

        def publish(t) -> None:
            # A previous connection's keys must not survive a reconnect: a stale ring-ref0 or
            # queue-1/ would be read instead of what we write now (MPR-2, MQ-3).
            for name in t.directory(self.path):
                if is_transport_key(name):
                    t.rm(f"{self.path}/{name}")
            for key, value in keys.items():
                if value == "":
                    t.mkdir(f"{self.path}/{key}")  # `queue-N` directory nodes (MQ-4, PYXS-10)
                else:
                    t.write(f"{self.path}/{key}", value)

        self.xen.store.transact(publish)

    def _start_watcher(self) -> None:
        """Follow the backend while connected: resize (XK-10) and backend-initiated close (SM-21).

        The thread is published only once started: a target's close may stop it from another
        thread at any moment (joining a thread not yet started raises)."""
        self._stop_watcher()
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch_backend, args=(stop,),
                                   name=f"blkfront-{self.path}", daemon=True)  # fmt: skip
        with self._watcher_lock:
            watcher.start()
            self._watch_stop, self._watcher = stop, watcher

    def _stop_watcher(self) -> None:
        with self._watcher_lock:
            watcher, self._watcher = getattr(self, "_watcher", None), None
            stop = getattr(self, "_watch_stop", None)
        if stop is not None:
            stop.set()
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(self.config.timeout)

    def _watch_backend(self, stop: threading.Event) -> None:
        try:
            watch = self.xen.store.watch(f"{self.backend_path}/state", f"fe-watch-{self.path}")
        except XenError:
            return
        try:
            while not stop.is_set():
                if watch.wait(0.05) is None:
                    continue
                state = self.backend_state()
                with self._lock:
                    if stop.is_set() or self._backend_changed(state):
                        return
        except XenError:
            pass  # our domain was destroyed, or XenStore went away: nothing more to follow
        finally:
            watch.close()

    def _backend_changed(self, state: XenbusState) -> bool:
        """React to the backend's state while connected; True once there is nothing more to follow."""
        if state == XenbusState.Connected:
            self.refresh()  # XK-10: a rewritten Connected may carry a new size
        elif state in (XenbusState.Closing, XenbusState.Closed):
            # SM-21: stop using the device and go straight to Closed, as Linux does.
            self.detached = True
            self._switch(XenbusState.Closed)
            return True
        return False

    def _read_properties(self, be_tree: dict[str, str]) -> None:
        """XK-9: sectors, info and sector-size are mandatory once the backend is Connected."""
        try:
            self.sectors = int(be_tree["sectors"])
            self.info = int(be_tree["info"])
            self.sector_size = int(be_tree["sector-size"])
        except (KeyError, ValueError) as exc:
            raise RuleViolation("XK-9", "sectors, info, sector-size readable at Connected",
                                f"backend tree lacks or garbles {exc}") from None  # fmt: skip
        size = self.sector_size
        if size < SECTOR or size & (size - 1):  # SEC-26: never use a size the spec rules out
            raise RuleViolation("SEC-26", "sector-size a power of two >= 512", f"sector-size {size}")

    def refresh(self) -> None:
        """Re-read `sectors` (XK-10: a backend rewrote state after a resize)."""
        self._read_properties(xsutil.read_tree(self.xen.store, self.backend_path))

    @property
    def readonly(self) -> bool:
        return bool(self.info & consts.VDISK_READONLY)

    def _switch(self, state: XenbusState) -> None:
        self.xen.store.write(f"{self.path}/state", str(int(state)))

    def backend_state(self) -> XenbusState:
        return xsutil.read_state(self.xen.store, self.backend_path)

    def _wait_backend(self, states: set[XenbusState], what: str) -> XenbusState:
        watch = self.xen.store.watch(f"{self.backend_path}/state", f"fe-{self.path}-{time.monotonic()}")
        deadline = time.monotonic() + self.config.timeout
        try:
            while True:
                state = self.backend_state()
                if state in states:
                    return state
                if state is XenbusState.Unknown and self.xen.store.read(self.backend_path) is None:
                    # The toolstack made it before the frontend started: the backend removed it,
                    # refusing the device (QEMU does when it cannot open the disk).
                    raise XenError(f"waiting for {what}: the backend directory {self.backend_path} is gone")
                if state in (XenbusState.Closing, XenbusState.Closed) and XenbusState.Connected in states \
                        and XenbusState.InitWait not in states:  # fmt: skip
                    # Waiting for Connected, the backend gave up (SM-29). (Closed while we wait
                    # for InitWait is a reconnect in progress, SM-26.)
                    raise XenError(f"waiting for {what}: backend went to {state.name}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise XenTimeout(f"waiting for {what}: backend stayed in {state.name}")
                watch.wait(left)
        finally:
            watch.close()

    def close(self) -> None:
        """Guest close (SM-25): Closing, backend Closing, Closed, backend Closed; then free all.

        After a backend-initiated close (SM-21: we are Closed already) only the freeing is left.
        """
        self._stop_watcher()
        if self.detached:
            self._teardown()
            return
        try:
            self._switch(XenbusState.Closing)
            self._wait_backend({XenbusState.Closing, XenbusState.Closed}, "backend Closing (SM-22)")
            self._switch(XenbusState.Closed)
            self._wait_backend({XenbusState.Closed}, "backend Closed (SM-23)")
        finally:
            self._teardown()

    def reconnect(self, config: FrontendConfig | None = None) -> xenbus.Negotiated:
        """SM-26: from Closed, back to Initialising and through the startup again."""
        if config is not None:
            self.config = config
            self._codecs = codec.codecs(config.protocol)
            self._abi = wire.abi(config.protocol)
        self.disabled = False
        self.detached = False
        self._switch(XenbusState.Initialising)
        return self.connect()

    # -- rings -----------------------------------------------------------------------------------

    def _setup_rings(self, nqueues: int, order: int) -> None:
        self._teardown()
        g, ev = self.xen.grants, self.evtchn
        for i in range(nqueues):
            pages = g.alloc_pages(1 << order)
            shared = SharedRing(pages.buf, order, self._abi.entry_size)
            ring = self.ring_class(shared)
            ring.init(self.config.ring_start)  # WIRE-8, RING-11: only the frontend initialises the page
            grefs = [g.grant(self.backend_id, frame, readonly=False) for frame in pages.frames]
            port = ev.alloc_unbound(self.backend_id)
            q = _Queue(i, pages, ring, port, grefs, list(range(ring.size)))
            self._queues.append(q)
            self._by_port[port] = q

    def _teardown(self) -> None:
        """End every grant, unbind every port, free every page (nothing left behind)."""
        g, ev = self.xen.grants, self.evtchn
        with self._lock:
            for q in self._queues:
                for p in list(q.pending.values()):  # requests the backend never answered
                    self._end_grants(p, check=False)
                    q.pool.extend(p.pooled)
                q.pending.clear()
                for _page, gref in q.pool:
                    g.revoke(gref)
                for gref in q.ring_grefs:
                    g.revoke(gref)
                try:
                    ev.unbind(q.port)
                except XenError:
                    pass
                q.ring.shared.release()
                g.free_pages(q.pages)
            for gref in self._stuck_grefs:
                g.revoke(gref)
            self._stuck_grefs.clear()
            for pages in self._page_frames:
                g.free_pages(pages)
            self._page_frames.clear()
            self._queues.clear()
            self._by_port.clear()

    @property
    def queues(self) -> int:
        return len(self._queues)

    def raw_queue(self, index: int, pages: int) -> RawQueue:
        """Lend queue `index`'s ring and `pages` persistent data pages to a caller that drives the ring.

        For load generators (`bench iops`) that pre-encode requests and push them
        in batches: the block API's per-request bookkeeping would cost more than
        the backend being measured. The pages stay in the queue's pool, so close
        still revokes every grant. While lent, the caller owns the ring: it must
        retire every response it caused before the block API uses this queue again.
        """
        if not 0 <= index < len(self._queues):
            raise XenError(f"{self.path}: no queue {index} ({len(self._queues)} connected)")
        if self.negotiated is None or not self.negotiated.persistent:
            raise XenError(f"{self.path}: raw_queue needs persistent grants (PG-1)")
        q = self._queues[index]
        taken, _ = self._data_pages(q, pages, backend_writes=True)
        q.pool[:0] = taken  # lent, not taken: they stay the queue's
        return RawQueue(q.ring, q.pages.buf, q.port, taken)

    # -- requests --------------------------------------------------------------------------------

    def _data_pages(
        self, q: _Queue, count: int, *, backend_writes: bool
    ) -> tuple[list[tuple[memoryview, int]], Pages | None]:
        """`count` zeroed data pages with their grants; the Pages to free after use (None: pooled)."""
        g = self.xen.grants
        if self.negotiated is not None and self.negotiated.persistent:
            while len(q.pool) < count:
                pages = g.alloc_pages(1)
                self._page_frames.append(pages)
                # PG-2: persistent grants are always writable, a page may later serve a read.
                q.pool.append((pages.page(0), g.grant(self.backend_id, pages.frames[0], readonly=False)))
            taken, q.pool[:] = q.pool[:count], q.pool[count:]
            return taken, None
        pages = g.alloc_pages(count)
        ro = not backend_writes
        return [
            (pages.page(i), g.grant(self.backend_id, f, readonly=ro)) for i, f in enumerate(pages.frames)
        ], pages

    def _queue(self, queue: int | None, sector: int) -> _Queue:
        if self.disabled:
            raise DeviceDisabled(f"{self.path}: device disabled after {self.violations[-1].rule_id}")
        if self.detached:
            raise XenError(f"{self.path}: the backend closed the device (SM-21)")
        if not self._queues:
            raise XenError(f"{self.path}: not connected")
        if queue is None:
            queue = (sector // SPP) % len(self._queues)
        return self._queues[queue % len(self._queues)]

    def submit_rw(self, op: int, sector: int, data: bytes | int, *, queue: int | None = None) -> _Pending:
        """Queue one READ (data = sector count) or WRITE (data = bytes) request; not yet pushed.

        The extent may start and end anywhere in a page: segments carry first/last
        sectors (SEG-3). More than 11 pages go indirect when the backend offered it.
        """
        q = self._queue(queue, sector)
        nsect = data if isinstance(data, int) else len(data) // SECTOR
        if nsect <= 0 or (not isinstance(data, int) and len(data) % SECTOR):
            raise ValueError(f"I/O of {nsect} sectors: must be a positive whole number of sectors")
        segs, s, left = [], sector % SPP, nsect
        while left:  # pack sectors into pages: frame offset follows the disk offset
            n = min(SPP - s, left)
            segs.append((s, s + n - 1))
            s, left = 0, left - n
        taken, owned = self._data_pages(q, len(segs), backend_writes=op == READ)
        pooled = owned is None
        pages, grefs = [page for page, _ in taken], [gref for _, gref in taken]
        if op == WRITE:
            pos = 0
            for page, (first, last) in zip(pages, segs, strict=True):
                n = (last - first + 1) * SECTOR
                page[first * SECTOR : first * SECTOR + n] = data[pos : pos + n]  # type: ignore[index]
                pos += n
        rid = self._take_id(q)
        p = _Pending(rid, op, [] if pooled else grefs, pages, segs, taken if pooled else [],
                     [] if owned is None else [owned])  # fmt: skip
        if len(segs) <= consts.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            seg_values = []
            for gref, (first, last) in zip(grefs, segs, strict=True):
                seg_values += [gref, first, last, b"\0\0"]
            seg_values += [0, 0, 0, b"\0\0"] * (consts.BLKIF_MAX_SEGMENTS_PER_REQUEST - len(segs))
            c = self._codecs.request_rw
            values = [op, len(segs), self.config.handle, rid, sector, *seg_values]
            if "_pad0" in c.fields[:4]:
                values.insert(3, bytes(4))
            self._put(q, c.pack(*values))
        else:
            self._put(q, self._indirect(q, p, op, sector, grefs, segs))
        q.pending[rid] = p
        return p

    def _indirect(self, q: _Queue, p: _Pending, op: int, sector: int, grefs: list[int],
                  segs: list[tuple[int, int]]) -> bytes:  # fmt: skip
        limit = self.negotiated.max_indirect_segments if self.negotiated else 0
        limit = min(limit, self.config.max_indirect_segments)
        if len(segs) > limit:
            raise ValueError(f"{len(segs)} segments: more than the indirect limit {limit} (IND-1)")
        per = consts.SEGS_PER_INDIRECT_FRAME
        npages = -(-len(segs) // per)
        g = self.xen.grants
        if self.negotiated is not None and self.negotiated.persistent:
            # PG-2: with persistent grants the indirect pages come from the writable pool too;
            # Linux blkback maps every grant writable then and keeps it mapped (blkback.c
            # xen_blkbk_map), so a read-only or revoked-per-request page would fail there.
            taken, _ = self._data_pages(q, npages, backend_writes=True)
            p.pooled.extend(taken)
            bufs = [page for page, _ in taken]
            for page in bufs:
                page[:] = bytes(PAGE)
            ind_grefs = [gref for _, gref in taken]
        else:
            ind = g.alloc_pages(npages)
            p.owned.append(ind)
            bufs = [ind.page(i) for i in range(npages)]
            ind_grefs = [g.grant(self.backend_id, f, readonly=True) for f in ind.frames]  # IND-4
            p.grefs = p.grefs + ind_grefs
        seg_codec = self._codecs.segment
        for i, (gref, (first, last)) in enumerate(zip(grefs, segs, strict=True)):
            seg_codec.pack_into(bufs[i // per], (i % per) * seg_codec.size, gref, first, last, b"\0\0")
        p.operation = op  # IND-6: the response must carry indirect_op
        c = self._codecs.request_indirect
        values: list = [int(BlkifOp.INDIRECT), op, len(segs)]
        if "_pad0" in c.fields:
            values.append(bytes(4))
        unused = [0] * (consts.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - npages)
        tail = bytes(c.size - c.offset("_pad2"))
        values += [p.id, sector, self.config.handle, b"\0\0", *ind_grefs, *unused, tail]
        return c.pack(*values)

    def submit_simple(self, op: int, *, sector: int = 0, nr_sectors: int = 0, secure: bool = False,
                      queue: int | None = None) -> _Pending:  # fmt: skip
        """FLUSH or BARRIER with no segments, or DISCARD of `nr_sectors` from `sector`."""
        q = self._queue(queue, sector)
        rid = self._take_id(q)
        if op == BlkifOp.DISCARD:
            c = self._codecs.request_discard
            values: list = [op, consts.BLKIF_DISCARD_SECURE if secure else 0, self.config.handle]
            if "_pad0" in c.fields:
                values.append(bytes(4))
            raw = c.pack(*values, rid, sector, nr_sectors)
        else:
            c = self._codecs.request_rw
            values = [op, 0, self.config.handle]
            if "_pad0" in c.fields[:4]:
                values.append(bytes(4))
            raw = c.pack(*values, rid, sector, *[0, 0, 0, b"\0\0"] * consts.BLKIF_MAX_SEGMENTS_PER_REQUEST)
        self._put(q, raw)
        p = _Pending(rid, op, [], [], [])
        q.pending[rid] = p
        return p

    def _put(self, q: _Queue, raw: bytes) -> None:
        # SEC-22: built in private memory, copied to the ring, never read back.
        q.ring.put_request(raw.ljust(self._abi.entry_size, b"\0"))

    def _take_id(self, q: _Queue) -> int:
        """A free request id below RING_SIZE (Linux shadow index, DIV-31); waits while the ring is full."""
        deadline = time.monotonic() + self.config.timeout
        while not q.free_ids:
            self.push()
            if not self._poll_queue(q):
                if time.monotonic() > deadline:
                    raise XenTimeout(f"queue {q.index}: ring full for {self.config.timeout}s")
                self.evtchn.wait(0.01)
            if self.disabled:
                raise DeviceDisabled(str(self.violations[-1]))
        return q.free_ids.pop()

    def push(self) -> None:
        """Publish queued requests on every queue and notify where RING-6 says so."""
        for q in self._queues:
            if q.ring.push_requests():
                self.evtchn.notify(q.port)

    # -- responses -------------------------------------------------------------------------------

    def poll(self) -> int:
        """Consume every available response on every queue; returns how many completed."""
        done = 0
        for q in self._queues:
            done += self._poll_queue(q)
        return done

    def _poll_queue(self, q: _Queue) -> int:
        if self.disabled:
            return 0
        rsp = self._codecs.response
        done = 0
        try:
            while q.ring.final_check_for_responses() if done else q.ring.unconsumed_responses():
                while q.ring.unconsumed_responses():
                    values = rsp.unpack_from(q.ring.get_response())  # SEC-20: one copy
                    self._complete(q, values[0], values[1], values[3])
                    done += 1
                if not done:
                    break
        except RuleViolation as v:
            self._disable(v)
        return done

    def _complete(self, q: _Queue, rid: int, op: int, status: int) -> None:
        p = q.pending.get(rid)
        if p is None or p.done is not None:
            kind = "duplicate" if p else "unknown"
            raise RuleViolation("SEC-21", "a response id of an outstanding request",
                                f"id {rid:#x} ({kind}) on queue {q.index}")  # fmt: skip
        if op != p.operation:
            raise RuleViolation(
                "SEC-21", f"operation {p.operation} echoed for id {rid:#x}", f"operation {op}"
            )
        if status not in VALID_STATUS:
            raise RuleViolation("OP-6", "status 0, -1 or -2", f"status {status} for id {rid:#x}")
        data = b""
        if op == READ and status == 0:
            data = b"".join(bytes(page[first * SECTOR : (last + 1) * SECTOR])
                            for page, (first, last) in zip(p.pages, p.segs, strict=True))  # fmt: skip
        self._end_grants(p, check=True)
        q.pool.extend(p.pooled)  # PG-2: the same grants serve the next requests
        p.done = Completion(rid, op, status, data)
        del q.pending[rid]
        if not p.raw:  # a raw request's id was never taken from the free list
            q.free_ids.append(rid)

    def _end_grants(self, p: _Pending, *, check: bool) -> None:
        """SEC-23: end access, then free the pages; a grant still mapped at completion is a backend error.

        Such a page is never reused: it stays allocated until teardown.
        """
        stuck = [gref for gref in p.grefs if not self.xen.grants.revoke(gref)]
        p.grefs = []
        if stuck:
            self._stuck_grefs.extend(stuck)
            self._page_frames.extend(p.owned)
        else:
            for pages in p.owned:
                self.xen.grants.free_pages(pages)
        p.owned = []
        if stuck and check:
            raise RuleViolation(
                "SEC-23", f"grefs {stuck} unmapped by the backend at completion", "still mapped"
            )

    def _disable(self, v: RuleViolation) -> None:
        """DIV-22: stop using the device; no more responses processed, no notifications."""
        self.violations.append(v)
        self.disabled = True

    def wait(self, pendings: Sequence[_Pending], timeout: float | None = None) -> list[Completion]:
        """Push, then poll until every request has completed; XenTimeout after the bound."""
        self.push()
        deadline = time.monotonic() + (self.config.timeout if timeout is None else timeout)
        while True:
            self.poll()
            if self.disabled:
                raise DeviceDisabled(str(self.violations[-1]))
            if all(p.done is not None for p in pendings):
                return [p.done for p in pendings]  # type: ignore[misc]
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [hex(p.id) for p in pendings if p.done is None]
                raise XenTimeout(f"no response within {self.config.timeout}s for ids {', '.join(missing)}")
            self.evtchn.wait(min(left, 0.05))

    # -- the raw layer: say what a broken frontend says (hostile-input tests) --------------------

    def raw_request(self, slot: bytes, *, queue: int = 0, operation: int | None = None) -> _Pending:
        """Put any slot bytes on a ring, tracked by the id they carry (use ids ≥ RING_SIZE).

        `operation` is what the response must echo (default: the slot's operation byte).
        """
        q = self._queues[queue]
        rid = self._codecs.request_other.unpack_from(slot)[self._codecs.request_other.index("id")]
        p = _Pending(rid, slot[0] if operation is None else operation, [], [], [], raw=True)
        q.ring.put_request(slot)
        q.pending[rid] = p
        return p

    def raw_produce(self, count: int, *, queue: int = 0) -> None:
        """Move `req_prod` forward by `count` slots without writing them, and notify (RING-9)."""
        q = self._queues[queue]
        for _ in range(count):
            q.ring.next_request_slot()
        q.ring.push_requests()
        self.evtchn.notify(q.port)

    def raw_grant(self, data: bytes = b"", *, readonly: bool = False) -> tuple[int, memoryview]:
        """A fresh page holding `data`, granted to the backend: (gref, page)."""
        pages = self.xen.grants.alloc_pages(1)
        self._page_frames.append(pages)
        page = pages.page(0)
        page[: len(data)] = data
        gref = self.xen.grants.grant(self.backend_id, pages.frames[0], readonly=readonly)
        self._stuck_grefs.append(gref)  # ended at teardown, if the test does not revoke it
        return gref, page

    def raw_revoke(self, gref: int) -> bool:
        ended = self.xen.grants.revoke(gref)
        if ended and gref in self._stuck_grefs:
            self._stuck_grefs.remove(gref)
        return ended

    def raw_ring(self, queue: int = 0) -> RawQueue:
        """Queue `queue`'s ring, port and ring grants, for tests that read indices and slots themselves.

        Nothing is lent: the block API keeps using the queue. A test that consumes
        responses through `ring` (or produces requests) owns the consequences.
        """
        q = self._queues[queue]
        return RawQueue(q.ring, q.pages.buf, q.port, [], tuple(q.ring_grefs))

    def ring_slot(self, idx: int, *, queue: int = 0) -> bytes:
        """The bytes of a slot of our own ring page, as the backend left them (SEC-5 checks)."""
        return self._queues[queue].ring.shared.read_slot(idx)

    # -- the raw layer: XenBus by hand (keys in any order; skipped, repeated or bogus states) ----
    #
    # `connect` in pieces, for tests that drive the handshake themselves (SM-8, SM-12, SEC-7,
    # SEC-8): `raw_transport` sets up rings and returns the keys `connect` would publish; the
    # test writes them (`raw_write`) in any order and states (`raw_state`) in any sequence;
    # `raw_finish` ends the startup as `connect` does; `raw_release` frees everything and
    # writes nothing. Once a test writes a state, the frontend stops following the backend on
    # its own (no SM-21 reaction behind the test's back) until `raw_finish`.

    def raw_transport(self, *, queues: int | None = None, order: int | None = None) -> dict[str, str]:
        """Set up rings and return the transport keys `connect` would publish; nothing is written.

        Does not wait for the backend. `queues` (≥ 1) and `order` default to `connect`'s choice
        from the backend's current offer; given, they are used as they are, beyond the offer too.
        """
        st, c = self.xen.store, self.config
        self._find_backend()
        self.disabled = self.detached = False
        be_tree = xsutil.read_tree(st, self.backend_path)
        order = xenbus.choose_ring_order(be_tree, c.max_ring_page_order) if order is None else order
        queues = xenbus.choose_queues(be_tree, c.max_queues) if queues is None else queues
        self._setup_rings(queues, order)
        return xenbus.frontend_transport(
            order=order, grefs=[q.ring_grefs for q in self._queues], ports=[q.port for q in self._queues],
            protocol=c.protocol, persistent=c.persistent,
        )  # fmt: skip

    def raw_write(self, keys: Mapping[str, str | None], *, clear: bool = False) -> None:
        """Write `keys` (relative to our directory) in one transaction.

        None removes a key, "" makes a directory node (`queue-N`, PYXS-10); `clear` first
        removes every transport key a previous connection left (as `connect` does).
        """

        def body(t) -> None:
            if clear:
                for name in t.directory(self.path):
                    if is_transport_key(name):
                        t.rm(f"{self.path}/{name}")
            for key, value in keys.items():
                path = f"{self.path}/{key}"
                if value is None:
                    if t.read(path) is not None:
                        t.rm(path)
                elif value == "":
                    t.mkdir(path)
                else:
                    t.write(path, value)

        self.xen.store.transact(body)

    def raw_state(self, state: int | str | None) -> None:
        """Write any value to our `state` node (None removes it: Unknown, SM-24); the frontend stops
        following the backend by itself."""
        self._stop_watcher()
        path = f"{self.path}/state"
        if state is None:
            self.xen.store.rm(path)
        else:
            self.xen.store.write(path, str(int(state)) if isinstance(state, int) else state)

    def raw_finish(self) -> xenbus.Negotiated:
        """The end of `connect`: wait (bounded) for backend Connected, read the device properties
        (XK-9), go Connected unless we are already, and follow the backend again."""
        st = self.xen.store
        self._wait_backend({XenbusState.Connected}, "backend Connected (SM-4)")
        be_tree = xsutil.read_tree(st, self.backend_path)
        self.negotiated = xenbus.negotiate(xsutil.read_tree(st, self.path), be_tree)
        self._read_properties(be_tree)
        if xsutil.read_state(st, self.path) != XenbusState.Connected:
            self._switch(XenbusState.Connected)
        self._start_watcher()
        return self.negotiated

    def raw_release(self) -> None:
        """Stop following the backend and free every ring, grant, port and page; no state is written."""
        self._stop_watcher()
        self._teardown()

    # -- the block API ---------------------------------------------------------------------------

    def max_pages_per_request(self) -> int:
        """Pages one request may carry: the indirect limit in force (IND-1, IND-7), else 11 (SEG-1)."""
        limit = self.negotiated.max_indirect_segments if self.negotiated else 0
        limit = min(limit, self.config.max_indirect_segments)
        return max(limit, consts.BLKIF_MAX_SEGMENTS_PER_REQUEST)

    def _split(self, sector: int, nsectors: int) -> list[tuple[int, int]]:
        """Cut an extent into requests of at most `max_pages_per_request()` pages each."""
        per = self.max_pages_per_request() * SPP
        parts = []
        while nsectors > 0:
            n = min(nsectors, per - sector % SPP)
            parts.append((sector, n))
            sector, nsectors = sector + n, nsectors - n
        return parts

    def _joined(self, op: int, done: list[Completion]) -> Completion:
        status = next((c.status for c in done if c.status), 0)
        data = b"".join(c.data for c in done) if op == READ and not status else b""
        return Completion(done[0].id, op, status, data)

    def read(self, sector: int, nsectors: int, *, queue: int | None = None) -> Completion:
        """Read `nsectors` from `sector`; larger than one request allows, it is split."""
        parts = self._split(sector, nsectors)
        return self._joined(READ, self.wait([self.submit_rw(READ, s, n, queue=queue) for s, n in parts]))

    def write(self, sector: int, data: bytes, *, queue: int | None = None) -> Completion:
        parts, pos, pending = self._split(sector, len(data) // SECTOR), 0, []
        for s, n in parts:
            pending.append(self.submit_rw(WRITE, s, data[pos : pos + n * SECTOR], queue=queue))
            pos += n * SECTOR
        return self._joined(WRITE, self.wait(pending))

    # FLUSH, BARRIER and DISCARD go to the backend only when it offered them (OP-2); otherwise
    # they complete here with EOPNOTSUPP, nothing sent. (`submit_simple` sends them regardless:
    # the raw layer says what a broken frontend says.)

    def _offered(self, op: BlkifOp) -> bool:
        n = self.negotiated
        if n is None:
            return True  # not connected: `_queue` raises the error
        return {BlkifOp.FLUSH_DISKCACHE: n.flush_cache, BlkifOp.WRITE_BARRIER: n.barrier,
                BlkifOp.DISCARD: n.discard}[op]  # fmt: skip

    def flush(self, *, queue: int | None = None) -> Completion:
        if not self._offered(BlkifOp.FLUSH_DISKCACHE):
            return Completion(-1, int(BlkifOp.FLUSH_DISKCACHE), int(consts.BlkifRsp.EOPNOTSUPP))
        return self.wait([self.submit_simple(int(BlkifOp.FLUSH_DISKCACHE), queue=queue)])[0]

    def barrier(self, *, queue: int | None = None) -> Completion:
        if not self._offered(BlkifOp.WRITE_BARRIER):
            return Completion(-1, int(BlkifOp.WRITE_BARRIER), int(consts.BlkifRsp.EOPNOTSUPP))
        return self.wait([self.submit_simple(int(BlkifOp.WRITE_BARRIER), queue=queue)])[0]

    def discard(
        self, sector: int, nsectors: int, *, secure: bool = False, queue: int | None = None
    ) -> Completion:
        """Discard the whole `discard-granularity` units inside the extent (DISC-2: a discard starts
        aligned); nothing is sent when none fits, as a discard is only a hint."""
        op = int(BlkifOp.DISCARD)
        if not self._offered(BlkifOp.DISCARD):
            return Completion(-1, op, int(consts.BlkifRsp.EOPNOTSUPP))
        n = self.negotiated
        unit = max(1, ((n.discard_granularity if n else None) or self.sector_size) // SECTOR)
        start = -(-sector // unit) * unit
        end = (sector + nsectors) // unit * unit
        if end <= start:
            return Completion(-1, op, int(consts.BlkifRsp.OKAY))
        p = self.submit_simple(op, sector=start, nr_sectors=end - start, secure=secure, queue=queue)
        return self.wait([p])[0]
