"""Faulty frontends: each a small variation of the reference frontend that breaks one named rule.

Every fault is a `ReferenceFrontend` whose `frontend_class` is a subclass of the
reference `Frontend` overriding one small step: what it chooses (`_choose`) or
publishes (`_publish`) when it connects, its ring class (`ring_class`), how it
puts a request on the ring (`_put`), takes data pages (`_data_pages`), judges a
response (`_complete`) or follows the backend (`_backend_changed`). Load one as
`--frontend=tests.faulty.frontends:NAME`.
"""

from __future__ import annotations

import dataclasses

from blkif_spec import consts, xenbus
from blkif_spec.consts import BlkifOp, BlkifRsp, XenbusState
from blkif_spec.drivers.frontend import Completion, Frontend, _Queue
from blkif_spec.ring import FrontRing
from blkif_spec.targets import ReferenceFrontend
from tests.faulty.registry import faulty

SECTOR = consts.SECTOR_SIZE
READ, WRITE, INDIRECT = int(BlkifOp.READ), int(BlkifOp.WRITE), int(BlkifOp.INDIRECT)
OKAY, ERROR, EOPNOTSUPP = int(BlkifRsp.OKAY), int(BlkifRsp.ERROR), int(BlkifRsp.EOPNOTSUPP)


# -- XenStore keys, multi-queue and multi-page rings ------------------------------------------


class _QueueZeroLayout(Frontend):
    def _publish(self, keys: dict[str, str]) -> None:
        if "multi-queue-num-queues" not in keys:  # one queue: flat keys moved under queue-0/
            ring = {k for k in keys if k == "event-channel" or k.startswith("ring-ref")}
            keys = {"multi-queue-num-queues": "1", "queue-0": "",
                    **{f"queue-0/{k}" if k in ring else k: v for k, v in keys.items()}}  # fmt: skip
        super()._publish(keys)


@faulty("frontend", "MQ-3.a", "with one queue writes multi-queue-num-queues=1 and a queue-0/ layout")
class QueueZeroWithOneQueue(ReferenceFrontend):
    """A frontend that always uses the multi-queue layout, even for n = 1 (backends read flat keys)."""

    frontend_class = _QueueZeroLayout


class _IgnoresQueueOffer(Frontend):
    def _choose(self, be_tree: dict[str, str]) -> tuple[int, int]:
        _, order = super()._choose(be_tree)
        return self.config.max_queues, order  # its own wish, whatever multi-queue-max-queues says


@faulty("frontend", "MQ-2", "uses its own 4 queues whatever multi-queue-max-queues offers (absent, 1, 2)")
class MoreQueuesThanOffered(ReferenceFrontend):
    """One queue per vCPU without the min() against the backend's offer."""

    frontend_class = _IgnoresQueueOffer


class _IgnoresOrderOffer(Frontend):
    def _choose(self, be_tree: dict[str, str]) -> tuple[int, int]:
        queues, _ = super()._choose(be_tree)
        return queues, self.config.max_ring_page_order  # its own wish, whatever max-ring-page-order says


@faulty("frontend", "MPR-1", "uses ring-page-order 4 whatever max-ring-page-order offers (absent, 0, 2)")
class RingOrderAboveOffer(ReferenceFrontend):
    """A multi-page ring sized by the guest's module parameter alone, not capped by the backend's max."""

    frontend_class = _IgnoresOrderOffer


class _OrderZeroFlatRef(Frontend):
    def _publish(self, keys: dict[str, str]) -> None:
        if "ring-page-order" not in keys:  # a one-page ring: announce order 0, keep the flat ring-ref
            keys = {"ring-page-order": "0", **keys}
        super()._publish(keys)


@faulty("frontend", "MPR-2", "writes ring-page-order=0 with only ring-ref (the backend reads ring-ref0)")
class OrderZeroWithRingRef(ReferenceFrontend):
    """blkif.h note 6 misread: order key written always, ring-ref%u only when order > 0; Linux
    blkback and QEMU then read ring-ref0 (DIV-11) and refuse the device."""

    frontend_class = _OrderZeroFlatRef


class _KeepsStaleKeys(Frontend):
    def _publish(self, keys: dict[str, str]) -> None:
        def body(t) -> None:  # the new keys written over the old ones; nothing removed first
            for key, value in keys.items():
                t.mkdir(f"{self.path}/{key}") if value == "" else t.write(f"{self.path}/{key}", value)

        self.xen.store.transact(body)


@faulty("frontend", "MPR-2", "on reconnect leaves the earlier connection's ring-ref*/queue-N/ keys in place")
class StaleKeysAfterReconnect(ReferenceFrontend):
    """The stale-key failure behind Linux fix d75e7f63b7c9 (2021): after a reconnect to another
    offer, ring-ref0 (or queue-1/, ring-page-order) of the earlier connection stays beside the new
    keys, and a backend maps the stale grant instead of the one meant."""

    frontend_class = _KeepsStaleKeys


class _InitialisedFirst(Frontend):
    def _publish(self, keys: dict[str, str]) -> None:
        self._switch(XenbusState.Initialised)  # state first, transport keys after
        super()._publish(keys)


@faulty("frontend", "XK-8", "switches to Initialised before writing its transport keys")
class InitialisedBeforeKeys(ReferenceFrontend):
    """A backend reacting to Initialised at once reads no ring-ref/event-channel yet."""

    frontend_class = _InitialisedFirst


# -- wire and ring ---------------------------------------------------------------------------


class _AttachOnlyRing(FrontRing):
    __slots__ = ()

    def init(self, start: int = 0) -> None:
        self.attach(start)  # FRONT_RING_INIT without SHARED_RING_INIT: header left as allocated


class _RingNotInitialised(Frontend):
    ring_class = _AttachOnlyRing


@faulty("frontend", "WIRE-8", "never initialises the shared ring page: req_event and rsp_event stay 0")
class RingPageNotInitialised(ReferenceFrontend):
    """FRONT_RING_ATTACH in place of FRONT_RING_INIT: with req_event 0 no push ever asks for a
    notification, so the backend only notices requests when something else wakes it."""

    frontend_class = _RingNotInitialised


class _Overfills(Frontend):
    def _setup_rings(self, nqueues: int, order: int) -> None:
        super()._setup_rings(nqueues, order)
        for q in self._queues:  # a shadow table sized for twice the ring
            q.free_ids[:0] = range(q.ring.size, 2 * q.ring.size)

    def _put(self, q: _Queue, raw: bytes) -> None:
        ring = q.ring  # RING_FULL never consulted: the next slot is written whatever it holds
        ring.shared.write_slot(ring.next_request_slot(), raw.ljust(self._abi.entry_size, b"\0"))


@faulty("frontend", "RING-3", "keeps up to 2 x RING_SIZE requests outstanding (free ids, not free slots)")
class OverfillsRing(ReferenceFrontend):
    """Flow control by free request ids alone, with a shadow table larger than the ring: unconsumed
    requests are overwritten and the backend sees req_prod run away (RING-9)."""

    frontend_class = _Overfills


# -- segments, indirect, operations, discard ---------------------------------------------------


class _IndirectAtOwnLimit(Frontend):
    def connect(self) -> xenbus.Negotiated:
        n = super().connect()
        if n.max_indirect_segments:  # the offer read as a flag: any value means "our own maximum"
            n = dataclasses.replace(n, max_indirect_segments=self.config.max_indirect_segments)
        self.negotiated = n
        return n


@faulty("frontend", "IND-1", "once indirect is offered, sends up to its own 256 segments whatever the value")
class IndirectBeyondLimit(ReferenceFrontend):
    """feature-max-indirect-segments taken as a boolean: a backend offering 16 gets 64-segment requests."""

    frontend_class = _IndirectAtOwnLimit


class _AlwaysOffered(Frontend):
    def _offered(self, op: BlkifOp) -> bool:
        return True  # feature-flush-cache, -barrier and -discard never consulted


@faulty("frontend", "OP-2", "sends FLUSH, BARRIER and DISCARD to a backend that offered none of them")
class UnofferedOperations(ReferenceFrontend):
    """A frontend that relies on EOPNOTSUPP instead of the feature keys."""

    frontend_class = _AlwaysOffered


class _UnalignedDiscard(Frontend):
    def discard(self, sector: int, nsectors: int, *, secure: bool = False,
                queue: int | None = None) -> Completion:  # fmt: skip
        if not self._offered(BlkifOp.DISCARD):
            return super().discard(sector, nsectors, secure=secure, queue=queue)
        p = self.submit_simple(int(BlkifOp.DISCARD), sector=sector, nr_sectors=nsectors, secure=secure,
                               queue=queue)  # fmt: skip
        return self.wait([p])[0]


@faulty("frontend", "DISC-2", "sends discards as asked, ignoring discard-granularity (unaligned starts)")
class UnalignedDiscard(ReferenceFrontend):
    """The block layer's extent passed through unrounded: discard-granularity never read."""

    frontend_class = _UnalignedDiscard


class _SectorSizeUnits(Frontend):
    def _put(self, q: _Queue, raw: bytes) -> None:
        units = self.sector_size // SECTOR
        if units > 1 and raw[0] in (READ, WRITE, INDIRECT):  # sector_number in sector-size units
            c = self._codecs.request_indirect if raw[0] == INDIRECT else self._codecs.request_rw
            values = list(c.unpack_from(raw))
            values[c.index("sector_number")] //= units
            raw = c.pack(*values)
        super()._put(q, raw)


@faulty("frontend", "SEG-4", "on a 4096-byte-sector disk writes sector_number in 4096-byte units (DIV-12)")
class SectorNumberInSectorSizeUnits(ReferenceFrontend):
    """The large-sector confusion the inventory records (DIV-12): the byte offset divided by
    sector-size instead of 512; with 512-byte sectors it goes unnoticed."""

    frontend_class = _SectorSizeUnits


# -- hostile responses and security ------------------------------------------------------------


class _SkipsUnknownIds(Frontend):
    def _complete(self, q: _Queue, rid: int, op: int, status: int) -> None:
        if rid not in q.pending and rid not in q.free_ids:
            return  # an id it never issued: dropped, and the device used on
        super()._complete(q, rid, op, status)


@faulty("frontend", "SEC-21", "drops a response with an unknown id and keeps using the device (no DIV-22)")
class TrustsHostileResponses(ReferenceFrontend):
    """A frontend that shrugs off an impossible response instead of stopping: a backend that
    forges ids keeps being fed requests."""

    frontend_class = _SkipsUnknownIds


class _StatusNotErrorIsSuccess(Frontend):
    def _complete(self, q: _Queue, rid: int, op: int, status: int) -> None:
        if status not in (ERROR, EOPNOTSUPP):
            status = OKAY  # `status != ERROR` tested instead of `status == OKAY`
        super()._complete(q, rid, op, status)


@faulty("frontend", "OP-6", "takes a status outside {0, -1, -2} (e.g. 5) as success")
class Status5IsSuccess(ReferenceFrontend):
    """Success judged by "not an error code": a read answered with status 5 returns stale data."""

    frontend_class = _StatusNotErrorIsSuccess


STALE_GUEST_MEMORY = b"\xde\xad\xbe\xef" * (consts.PAGE_SIZE // 4)


class _UnzeroedDataPages(Frontend):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._granted: set[int] = set()  # persistent grants already used once

    def _data_pages(self, q: _Queue, count: int, *, backend_writes: bool):
        taken, owned = super()._data_pages(q, count, backend_writes=backend_writes)
        for page, gref in taken:  # fresh pages (owned) or pool pages on their first use
            if owned is not None or gref not in self._granted:
                page[:] = STALE_GUEST_MEMORY  # what the guest had in that memory before
        self._granted.update(gref for _, gref in taken)
        return taken, owned


@faulty("frontend", "SEC-24", "grants first-use data pages without zeroing them (XSA-403, trusted=0)")
class FirstUsePagesNotZeroed(ReferenceFrontend):
    """XSA-403 (CVE-2022-26365 for blkfront): granted pages carry old guest memory around the
    sectors of the request, which the backend can read; Linux now zeroes them (and, with
    trusted=0, bounces all data through such pages)."""

    frontend_class = _UnzeroedDataPages


# -- state machine -----------------------------------------------------------------------------


class _IgnoresBackendClose(Frontend):
    def _backend_changed(self, state: XenbusState) -> bool:
        if state in (XenbusState.Closing, XenbusState.Closed):
            return False  # the backend's Closing never acted on: stays Connected
        return super()._backend_changed(state)


@faulty("frontend", "SM-21", "ignores backend Closing: never goes to Closed, the detach never completes")
class IgnoresBackendClosing(ReferenceFrontend):
    """A frontend with no otherend_changed handler for Closing: a toolstack detach hangs."""

    frontend_class = _IgnoresBackendClose
