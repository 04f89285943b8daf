"""The reference blkif backend: XenBus negotiation and per-queue ring service.

Written against `blkif_spec.xen.api` only, so it runs on the simulated Xen and
on a real host. It follows the documented startup (SM-2, SM-4): everything it
offers, transport parameters and `feature-*` keys alike, is published before
InitWait (XK-7.a and XK-7.b); device properties before Connected (XK-9). It
mirrors frontend Closing (SM-22), disconnects on frontend Closed (SM-23),
reconnects when a closed frontend returns to Initialising (SM-26) or, its
Initialising missed, announces Initialised or Connected (SM-12), and treats
a bad transport parameter as fatal: error node and Closing (SM-29, MPR-3, MQ-2).

Rings are served by one thread by default. `BackendConfig(ring_workers="process")`
gives each ring its own forked process instead, as Linux blkback gives each ring
a kthread (the multi-queue series): the same `RingServer`, run in parallel rather
than under one GIL. That mode needs memory every process sees: the simulated
host's grants and event channels (inherited across fork) and a shared store
(`MemoryStore(size, shared=True)`); `bench iops` measures it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import ClassVar

from blkif_spec import consts, wire, xenbus
from blkif_spec.consts import XenbusState
from blkif_spec.drivers import xsutil
from blkif_spec.drivers.blkserve import Disk, Features, RingServer
from blkif_spec.drivers.store import BackingStore
from blkif_spec.errors import RuleViolation
from blkif_spec.ring import BackRing, SharedRing
from blkif_spec.xen.api import EventChannels, Mapping, XenError, XenServices


@dataclass(frozen=True)
class BackendConfig:
    """What the backend offers. Defaults follow Linux blkback where it has one."""

    max_queues: int = 4
    max_ring_page_order: int = consts.MAX_RING_PAGE_ORDER
    max_indirect_segments: int = 256
    persistent: bool = True
    flush: bool = True
    barrier: bool = True
    discard: bool = True
    discard_secure: bool = True
    discard_granularity: int = 4096  # 0: publish neither discard-granularity nor -alignment (DIV-18)
    discard_alignment: int = 0
    sector_size: int = 512
    physical_sector_size: int = 0  # 0: same as sector_size
    max_persistent_grants: int = 1056
    host_is_x86: bool = True
    poll_interval: float = 0.05
    ring_workers: str = "thread"  # "thread": one thread serves every ring; "process": a process per ring
    worker_spin: float = 200e-6  # process mode: seconds an idle worker polls its ring before it sleeps
    # When offers appear (DIV-20), to test that a frontend copes with what real backends do
    # (DIV-20.a). "initwait": every offer before InitWait (the spec; QEMU 7.2 as traced).
    # "connected": feature-*, discard-* keys only in the Connected transaction (Linux blkback,
    # SM-10; fails XK-7.b, a should).
    publish_features: str = "initwait"
    # Write max-ring-page-order just after switching to InitWait, as QEMU 10.2's source does
    # (SM-13). Fails XK-7.a on purpose: a frontend reading early falls back to order 0.
    order_after_initwait: bool = False
    # Operations answered EOPNOTSUPP although advertised (OP-3: "at any time"), e.g.
    # (2, 3, 5): to test that a frontend copes; the answers are counted in `stats.refused`.
    unsupported_ops: tuple[int, ...] = ()


def _serve_ring(server: RingServer, evtchn: EventChannels, port: int, stop: ctypes.c_byte,
                report: Connection, spin: float, poll_interval: float) -> None:  # fmt: skip
    """A ring worker process's loop: serve, poll briefly when idle, then sleep on the port.

    Polling `spin` seconds before sleeping saves the wake-up (and the frontend's
    notify) when the next batch is already on its way; `serve()` has armed
    `req_event` (RING-7) before it returned, so a request pushed while we sleep
    is never missed. The persistent grants this process mapped are unmapped
    here, then its stats and halt reason go back to the parent.
    """
    error = ""
    ring = server.ring
    clock = time.perf_counter
    try:
        while not stop.value:
            if server.serve():
                evtchn.notify(port)
            if server.halted is None:
                deadline = clock() + spin
                while not ring.unconsumed_requests() and clock() < deadline:
                    pass
                if ring.unconsumed_requests():
                    continue
            evtchn.wait(poll_interval)
    except Exception as exc:  # a process boundary: the parent records it, as the ring thread does
        error = f"{type(exc).__name__}: {exc}"
    finally:
        server.close()
        report.send((server.stats, server.halted, error))
        report.close()


class _RingWorker:
    """One ring served by a forked process (`ring_workers="process"`).

    The child inherits the mapped ring, the grant table, the event channels and
    the store through fork; it waits on a view restricted to its own port so
    workers never take each other's events (or the frontend's).
    """

    def __init__(self, server: RingServer, evtchn: EventChannels, port: int, config: BackendConfig,
                 name: str) -> None:  # fmt: skip
        subset = getattr(evtchn, "subset", None)
        if subset is None:
            raise XenError("ring_workers='process' needs event channels with subset() (the simulated host)")
        ctx = multiprocessing.get_context("fork")
        self._stop = ctx.RawValue("b", 0)
        self._rx, tx = ctx.Pipe(duplex=False)
        args = (server, subset([port]), port, self._stop, tx, config.worker_spin, config.poll_interval)
        self.process = ctx.Process(target=_serve_ring, args=args, name=name, daemon=True)
        self.process.start()
        tx.close()

    def stop(self, server: RingServer, timeout: float = 2.0) -> str:
        """Stop the child; copy its stats and halt reason into `server`; return its error, if any."""
        self._stop.value = 1
        error = ""
        try:
            if self._rx.poll(timeout):
                server.stats, server.halted, error = self._rx.recv()
            else:
                error = f"ring worker {self.process.pid} did not stop within {timeout} s"
        except EOFError:
            error = f"ring worker {self.process.pid} died (exit code {self.process.exitcode})"
        finally:
            self._rx.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        return error


@dataclass
class _Queue:
    mapping: Mapping
    shared: SharedRing
    server: RingServer
    port: int
    worker: _RingWorker | None = None
    initial: bytes = b""  # the ring pages as first mapped, before anything was served (WIRE-8, SEC-24)
    events: int = 0  # wake-ups seen on `port` (SEC-21: a disabled frontend sends no more)


def _ring_over(mapping: Mapping, order: int, entry_size: int) -> SharedRing:
    """The ring over a mapped ring buffer: the mapping's own `ring(order, entry_size)` if it offers one.

    The simulated host's mappings do (a recording ring when grants are recorded, for the
    SEC-1 double-fetch check); a live mapping is plain memory and gets a `SharedRing`.
    """
    make = getattr(mapping, "ring", None)
    return make(order, entry_size) if callable(make) else SharedRing(mapping.buf, order, entry_size)


@dataclass
class Backend:
    """One vbd served by this domain. `start()` runs it on its own threads until `stop()`."""

    xen: XenServices
    path: str  # backend device directory
    store: BackingStore
    config: BackendConfig = field(default_factory=BackendConfig)

    #: The ring server class; a variant of the backend (the fault catalogue) swaps in its own.
    server_class: ClassVar[type[RingServer]] = RingServer

    def __post_init__(self) -> None:
        self.evtchn = self.xen.evtchn.open()  # our ports' events come to us only
        self.violations: list[RuleViolation] = []
        self.errors: list[str] = []
        self.negotiated: xenbus.Negotiated | None = None
        self._queues: list[_Queue] = []
        self._by_port: dict[int, _Queue] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._state = XenbusState.Initialising
        self.frontend_path = ""
        self.frontend_id = 0
        self.readonly = False
        self._paused = False
        self._late_keys: dict[str, int] = {}  # offers held back until Connected (publish_features)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        st = self.xen.store
        fe = st.read(f"{self.path}/frontend")
        fe_id = xsutil.read_int(st, f"{self.path}/frontend-id")
        if fe is None or fe_id is None:
            raise XenError(f"{self.path}: toolstack keys frontend/frontend-id missing (XK-B1, XK-B2)")
        if self.config.ring_workers not in ("thread", "process"):
            raise ValueError(f"ring_workers {self.config.ring_workers!r}: 'thread' or 'process'")
        self.frontend_path, self.frontend_id = fe, fe_id
        self.readonly = "w" not in (st.read(f"{self.path}/mode") or "w")
        if self.config.publish_features not in ("initwait", "connected"):
            raise ValueError(f"publish_features {self.config.publish_features!r}: 'initwait' or 'connected'")
        self._enter_initwait()
        loops = [(self._xenbus_loop, "xenbus")]
        if self.config.ring_workers == "thread":
            loops.append((self._ring_loop, "rings"))
        for target, name in loops:
            t = threading.Thread(target=target, name=f"blkback-{name}-{self.path}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads and drop every ring, grant mapping and port; nodes stay (toolstack's)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        self._disconnect()

    @property
    def state(self) -> XenbusState:
        return self._state

    @property
    def ring_worker_pids(self) -> list[int]:
        """Process ids of the ring workers, in queue order (empty unless `ring_workers="process"`)."""
        with self._lock:
            return [q.worker.process.pid for q in self._queues if q.worker and q.worker.process.pid]

    def halted_rings(self) -> list[RuleViolation]:
        """Why each halted ring stopped (RING-9: an ill-behaved frontend), in queue order."""
        with self._lock:
            return [q.server.halted for q in self._queues if q.server.halted is not None]

    def resize(self, size_bytes: int) -> None:
        """XK-10: rewrite `sectors`, then rewrite `state` to fire the frontend's watch."""
        with self._lock:
            self.store.resize(size_bytes)
            self.xen.store.write(f"{self.path}/sectors", str(size_bytes // consts.SECTOR_SIZE))
            self.xen.store.write(f"{self.path}/state", str(int(self._state)))

    # -- XenBus ----------------------------------------------------------------------------------

    def _enter_initwait(self) -> None:
        """SM-2 (and SM-26 on reconnect): publish the offer, then InitWait."""
        self._publish_offer()
        self._switch(XenbusState.InitWait)
        if self.config.order_after_initwait:  # QEMU 10.2 (SM-13): deliberately late
            self.xen.store.write(f"{self.path}/max-ring-page-order", str(self.config.max_ring_page_order))

    def _publish_offer(self) -> None:
        c, st, p = self.config, self.xen.store, self.path
        discard_enabled = (st.read(f"{p}/discard-enable") or "1") != "0"  # DISC-6, XK-B17
        keys = {
            "max-ring-page-order": c.max_ring_page_order,
            "multi-queue-max-queues": c.max_queues,
            "feature-flush-cache": int(c.flush),
            "feature-barrier": int(c.barrier),
            "feature-persistent": int(c.persistent),
        }
        if c.max_indirect_segments:
            keys["feature-max-indirect-segments"] = c.max_indirect_segments  # OP-4: only if served
        if discard_enabled:
            keys["feature-discard"] = int(c.discard)
            if c.discard:
                keys["discard-secure"] = int(c.discard_secure)
                if c.discard_granularity:
                    keys |= {"discard-granularity": c.discard_granularity,
                             "discard-alignment": c.discard_alignment}  # fmt: skip
        self._discard = c.discard and discard_enabled
        if c.order_after_initwait:
            del keys["max-ring-page-order"]
        transport = ("max-ring-page-order", "multi-queue-max-queues", "feature-max-indirect-segments")
        self._late_keys = {} if c.publish_features == "initwait" else \
            {k: v for k, v in keys.items() if k not in transport}  # fmt: skip
        keys = {k: v for k, v in keys.items() if k not in self._late_keys}

        def publish(t) -> None:
            for key, value in keys.items():
                t.write(f"{p}/{key}", str(value))

        st.transact(publish)

    def _switch(self, state: XenbusState) -> None:
        self._state = state
        self.xen.store.write(f"{self.path}/state", str(int(state)))

    def _fatal(self, violation: RuleViolation) -> None:
        """SM-29: record, write the error node and go to Closing."""
        self.violations.append(violation)
        xsutil.write_error(self.xen.store, self.path, 22, f"{violation.rule_id}: {violation.observed}")
        self._disconnect()
        self._switch(XenbusState.Closing)

    def _xenbus_loop(self) -> None:
        watch = self.xen.store.watch(f"{self.frontend_path}/state", f"be-{self.path}")
        try:
            while not self._stop.is_set():
                if watch.wait(self.config.poll_interval) is None:
                    continue
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._on_frontend(self._frontend_state())
        except XenError as exc:  # our domain was destroyed or XenStore went away
            self.errors.append(f"xenbus thread ended: {exc}")
        finally:
            watch.close()

    def _on_frontend(self, fe: int) -> None:
        S = XenbusState
        own = self._state
        if fe in (S.Initialised, S.Connected):  # SM-4, SM-12: either means "connect now"
            if own in (S.InitWait, S.Initialising):
                self._connect()
            elif own == S.Closed and self._online():  # SM-12: a reconnect whose Initialising we
                self._enter_initwait()  # missed (coalesced watch events): connect all the same,
                self._connect()  # as Linux and QEMU do
        elif fe == S.Initialising:
            if own == S.Closed and self._online():  # SM-26: reconnect
                self._enter_initwait()
        elif fe == S.Closing:
            if own not in (S.Closing, S.Closed):  # SM-22
                self._switch(S.Closing)
        elif fe in (S.Closed, S.Unknown):  # SM-23, SM-24
            self._disconnect()
            if own != S.Closed:
                self._switch(S.Closed)
            if not self._online():  # SM-20/SM-23: detached by the toolstack: the device goes away
                self._stop.set()
        elif own not in (S.Closing, S.Closed):  # SM-30: InitWait, Reconfiguring or out of 0..8: broken
            self._fatal(RuleViolation("SM-30", "frontend state 1, 3, 4, 5 or 6", f"frontend state {int(fe)}"))

    def _frontend_state(self) -> int:
        """The frontend's state as Linux reads it: absent or not a number is Unknown (0), while a
        number outside 0..8 stays itself, so that SM-30 (not SM-24) judges it."""
        value = xsutil.read_int(self.xen.store, f"{self.frontend_path}/state")
        return 0 if value is None else value

    def _online(self) -> bool:
        return (self.xen.store.read(f"{self.path}/online") or "0") == "1"

    # -- connect / disconnect ----------------------------------------------------------------

    def _connect(self) -> None:
        c = self.config
        fe_tree = xsutil.read_tree(self.xen.store, self.frontend_path)
        be_tree = xsutil.read_tree(self.xen.store, self.path)
        try:
            rings = self._read_rings(fe_tree, be_tree)  # MPR-2/3, MQ-2..5, SEC-8
            abi = wire.abi_for_protocol(fe_tree.get("protocol"), host_is_x86=c.host_is_x86)
        except RuleViolation as v:
            self._fatal(v)
            return
        except ValueError as exc:  # DIV-10: an unknown protocol string; refused, as Linux does
            self._fatal(RuleViolation("DIV-10", "x86_32-abi, x86_64-abi or arm-abi", str(exc)))
            return
        disk = Disk(self.store, c.sector_size, self.readonly)
        features = Features(flush=c.flush, barrier=c.barrier, discard=self._discard,
                            discard_secure=c.discard_secure, max_indirect_segments=c.max_indirect_segments,
                            persistent=c.persistent and fe_tree.get("feature-persistent") == "1",
                            max_persistent_grants=c.max_persistent_grants,
                            discard_granularity=c.discard_granularity or c.sector_size,
                            unsupported_ops=frozenset(c.unsupported_ops))  # fmt: skip
        try:
            for r in rings:
                order = len(r.grefs).bit_length() - 1  # 2^ring-page-order grants (MPR-2, MQ-5)
                mapping = self.xen.grants.map(self.frontend_id, list(r.grefs), readonly=False)
                initial = bytes(mapping.buf[: consts.PAGE_SIZE << order])
                shared = _ring_over(mapping, order, abi.entry_size)
                ring = BackRing(shared)
                ring.attach()  # RING-11: never initialise; RING-12: attach at the current indices
                try:
                    port = self.evtchn.bind_interdomain(self.frontend_id, r.port)
                except XenError:  # not a queue yet: _disconnect would not unmap it (SM-23)
                    shared.release()
                    mapping.unmap()
                    raise
                server = self.server_class(ring, abi.name, self.xen.grants, self.frontend_id, disk, features)
                queue = _Queue(mapping, shared, server, port, initial=initial)
                self._queues.append(queue)
                self._by_port[port] = queue
            if c.ring_workers == "process":  # each worker starts by serving what is there (SM-28)
                for i, q in enumerate(self._queues):
                    q.worker = _RingWorker(q.server, self.evtchn, q.port, c, f"blkback-ring{i}")
        except (XenError, ValueError, RuleViolation) as exc:
            v = exc if isinstance(exc, RuleViolation) else RuleViolation(
                "SM-29", "ring grants and event channels that map and bind", str(exc))  # fmt: skip
            self._fatal(v)
            return
        p, st = self.path, self.xen.store
        # XK-9: device properties before Connected; publish_features="connected": Linux's timing (SM-10)
        props = {**self._device_properties(), **self._late_keys}

        def publish(t) -> None:
            for key, value in props.items():
                t.write(f"{p}/{key}", str(value))

        st.transact(publish)
        self._switch(XenbusState.Connected)
        try:
            fe_tree, be_tree = (xsutil.read_tree(self.xen.store, d) for d in (self.frontend_path, self.path))
            self.negotiated = xenbus.negotiate(fe_tree, be_tree, default_abi=abi.name, phase=None)
        except RuleViolation as v:  # a frontend slip read_rings reads past, as Linux does (flat keys
            self.violations.append(v)  # beside queue-N/, MQ-4; a queue-N/ring-page-order, MQ-5): noted
            self.negotiated = None
        for q in self._queues:  # requests may already be waiting (SM-28: a resumed frontend)
            if q.worker is None:
                self._kick(q)

    def _read_rings(self, fe_tree: dict[str, str], be_tree: dict[str, str]) -> list[xenbus.Ring]:
        """The rings the frontend's keys name, as `xenbus.read_rings` reads them (a fault-catalogue hook)."""
        return xenbus.read_rings(fe_tree, be_tree)

    def _device_properties(self) -> dict[str, int | str]:
        """The device properties `_connect` publishes before Connected (XK-9; a fault-catalogue hook)."""
        c = self.config
        return {
            "sectors": self.store.size // consts.SECTOR_SIZE,
            "info": consts.VDISK_READONLY if self.readonly else 0,
            "sector-size": c.sector_size,
            "physical-sector-size": c.physical_sector_size or c.sector_size,
        }

    def _disconnect(self) -> None:
        with self._lock:
            for q in self._queues:
                if q.worker is not None:
                    error = q.worker.stop(q.server)
                    if error:
                        self.errors.append(f"ring worker for port {q.port}: {error}")
                q.server.close()
                try:
                    self.evtchn.unbind(q.port)
                except XenError:
                    pass
                q.shared.release()
                q.mapping.unmap()
                if q.server.halted is not None:
                    self.violations.append(q.server.halted)
            self._queues.clear()
            self._by_port.clear()

    # -- rings -----------------------------------------------------------------------------------

    def _kick(self, q: _Queue) -> None:
        if self._paused:
            return
        if q.server.serve():
            self.evtchn.notify(q.port)

    def _ring_loop(self) -> None:
        ev = self.evtchn
        try:
            while not self._stop.is_set():
                ports = ev.wait(self.config.poll_interval)
                if not ports:
                    continue
                with self._lock:
                    for port in ports:
                        q = self._by_port.get(port)
                        if q is not None:
                            q.events += 1
                            self._kick(q)
        except XenError as exc:
            self.errors.append(f"ring thread ended: {exc}")

    # -- the raw layer: say what a broken backend says (hostile-response tests, conventions §3) --
    #
    # For a frontend under test. Thread-mode rings only (`ring_workers="thread"`). `pause()`
    # leaves requests on the ring; the raw calls then consume, answer, scribble and publish
    # by hand, under the same lock as the ring thread, and `resume()` serves normally again.

    def _raw(self, queue: int) -> _Queue:
        with self._lock:
            if not 0 <= queue < len(self._queues):
                raise XenError(f"{self.path}: no connected queue {queue} ({len(self._queues)} connected)")
            q = self._queues[queue]
            if q.worker is not None:
                raise XenError("the raw layer serves thread-mode rings only")
            return q

    def pause(self) -> None:
        """Stop serving: published requests stay on the rings until `resume()` (RING-3 tests)."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Serve again, starting with whatever is waiting on every ring."""
        with self._lock:
            self._paused = False
            for q in self._queues:
                if q.worker is None:
                    self._kick(q)

    def raw_ring(self, queue: int = 0) -> BackRing:
        """Queue `queue`'s `BackRing` (indices through `.shared`), for observation."""
        return self._raw(queue).server.ring

    def initial_ring(self, queue: int = 0) -> bytes:
        """The ring pages of `queue` as they were when first mapped (WIRE-8 header, SEC-24 slots)."""
        return self._raw(queue).initial

    def notifications(self, queue: int = 0) -> int:
        """Wake-ups seen on `queue`'s port so far (coalesced events count once)."""
        return self._raw(queue).events

    def raw_peek(self, queue: int = 0) -> list[bytes]:
        """Copies of the requests published and not consumed, in ring order; nothing is consumed."""
        with self._lock:
            ring = self._raw(queue).server.ring
            n = (ring.shared.req_prod - ring.req_cons) & 0xFFFFFFFF
            return [ring.shared.read_slot(ring.req_cons + i) for i in range(min(n, ring.size))]

    def raw_take(self, queue: int = 0, *, scribble: int | None = None) -> list[bytes]:
        """Consume every request available now, unanswered; with `scribble`, fill each slot with that byte.

        Scribbling after the copy shows whether a frontend reads its requests back from the
        ring (SEC-22): the response later overwrites only its own bytes of the slot.
        """
        with self._lock:
            ring = self._raw(queue).server.ring
            taken = []
            for _ in range(ring.unconsumed_requests()):
                idx = ring.req_cons
                taken.append(ring.get_request())
                if scribble is not None:
                    ring.shared.write_slot(idx, bytes([scribble]) * ring.shared.entry_size)
            return taken

    def raw_answer(
        self, requests: list[bytes], queue: int = 0, *, publish: bool = True
    ) -> list[tuple[int, int, int]]:
        """Serve copies taken by `raw_take`, in the order given (OP-7); returns (id, op, status) of each."""
        with self._lock:
            server = self._raw(queue).server
            answers = []
            for slot in requests:
                rid, op, status = server.handle(slot)
                server.respond(rid, op, status)
                answers.append((rid, op, status))
            server.stats.requests += len(requests)
        if publish:
            self.raw_publish(queue)
        return answers

    def raw_respond(self, rid: int, op: int, status: int, queue: int = 0) -> None:
        """Write any response at the next response position, unchecked (not yet published)."""
        with self._lock:
            self._raw(queue).server.respond(rid, op, status)

    def raw_publish(self, queue: int = 0, *, extra: int = 0) -> None:
        """Publish the responses written so far, `rsp_prod` moved `extra` further (RING-9), and notify."""
        with self._lock:
            q = self._raw(queue)
            ring = q.server.ring
            ring.shared.rsp_prod = ring.rsp_prod_pvt + extra
            self.evtchn.notify(q.port)

    def raw_notify(self, queue: int = 0, count: int = 1) -> None:
        """Send `count` notifications with nothing new on the ring (SEC-25 event storm)."""
        port = self._raw(queue).port
        for _ in range(count):
            self.evtchn.notify(port)

    def raw_copy(self, gref: int, offset: int = 0, length: int = consts.PAGE_SIZE) -> bytes:
        """What the frontend's grant `gref` holds, by grant copy (SEC-24: the page as we see it)."""
        return self.xen.grants.copy_from(self.frontend_id, gref, offset, length)
