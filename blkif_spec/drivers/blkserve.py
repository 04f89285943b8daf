"""The backend's ring service: consume requests, validate them, do the I/O, answer each once.

Sans-XenStore: a `RingServer` gets a `BackRing` over the mapped shared ring,
the backend domain's grant table, a `Disk` and the negotiated features, and
`serve()` processes whatever the frontend has published. It never trusts the
frontend (inventory §8.1):

* each slot is copied once and only the copy is used (SEC-1, RING-10);
* every count and range is bounded before use (SEC-2, SEC-3, SEG-1..8, IND-1..5);
* every consumed request gets exactly one response with status 0, -1 or -2,
  its `id` echoed and its operation echoed (`indirect_op` for indirect, IND-6);
  unknown operations get EOPNOTSUPP (DIV-1, as Linux does);
* responses are written field by field, padding untouched (SEC-5);
* a grant that cannot be mapped or copied fails the request, nothing else (SEC-6);
* a producer index more than RING_SIZE ahead halts the ring (RING-9, SEC-4).

Data moves by grant copy (QEMU style) unless persistent grants were negotiated,
in which case each data gref is mapped once, writable, and reused (PG-1..PG-4).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from blkif_spec import codec, consts
from blkif_spec.consts import BlkifOp, BlkifRsp
from blkif_spec.drivers.store import BackingStore
from blkif_spec.errors import RuleViolation
from blkif_spec.ring import BackRing
from blkif_spec.xen.api import GrantTable, Mapping, XenError

OKAY, ERROR, EOPNOTSUPP = int(BlkifRsp.OKAY), int(BlkifRsp.ERROR), int(BlkifRsp.EOPNOTSUPP)
READ, WRITE, BARRIER, FLUSH = (int(BlkifOp.READ), int(BlkifOp.WRITE), int(BlkifOp.WRITE_BARRIER),
                               int(BlkifOp.FLUSH_DISKCACHE))  # fmt: skip
DISCARD, INDIRECT = int(BlkifOp.DISCARD), int(BlkifOp.INDIRECT)
SECTOR = consts.SECTOR_SIZE
PAGE = consts.PAGE_SIZE
SPP = consts.SECTORS_PER_PAGE


@dataclass
class Disk:
    """The virtual disk as the frontend sees it: size in 512-byte sectors (SEG-4)."""

    store: BackingStore
    sector_size: int = 512
    readonly: bool = False

    @property
    def sectors(self) -> int:
        return self.store.size // SECTOR


@dataclass(frozen=True)
class Features:
    """What this backend offered and negotiated for one device."""

    flush: bool = True
    barrier: bool = True
    discard: bool = True
    discard_secure: bool = True
    max_indirect_segments: int = 256  # 0: indirect not offered (OP-4)
    persistent: bool = False  # negotiated: both sides advertised it (PG-1)
    max_persistent_grants: int = 1056
    discard_granularity: int = 512  # bytes; sector-size when the key is not published (DISC-4)
    # Operations offered yet answered EOPNOTSUPP, as OP-3 allows "at any time": to test
    # that a frontend copes (OP-3, DIV-29). Each such answer is counted in `stats.refused`.
    unsupported_ops: frozenset[int] = frozenset()


class BadRequest(Exception):
    """A request the backend refuses; `status` is the answer, `rule` the reason."""

    def __init__(self, rule: str, status: int = ERROR) -> None:
        self.rule = rule
        self.status = status


@dataclass
class ServeStats:
    requests: int = 0
    errors: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)  # op -> EOPNOTSUPP answers (unsupported_ops)


class RingServer:
    """Serves one ring (one queue) of one device."""

    def __init__(self, ring: BackRing, abi: str, grants: GrantTable, peer: int, disk: Disk,
                 features: Features) -> None:  # fmt: skip
        self.ring = ring
        self.grants = grants
        self.peer = peer
        self.disk = disk
        self.features = features
        self.halted: RuleViolation | None = None
        self.stats = ServeStats()
        self._persistent: dict[int, Mapping] = {}
        c = codec.codecs(abi)
        self._rw_unpack = c.request_rw.unpack_from
        # A request with at most one segment is parsed by a prefix of the layout (header and
        # seg[0]): the same tuple positions, without unpacking ten unused segments.
        head = c.request_rw.fields[: c.request_rw.index("seg[0].last_sect") + 1]
        parts = c.request_rw.field_parts(*head)
        self._rw_head_unpack = struct.Struct("<" + "".join(st.format[1:] for _, st in parts)).unpack_from
        self._discard = c.request_discard
        self._indirect = c.request_indirect
        self._other = c.request_other
        self._seg_page = c.indirect_page
        self._rsp_size = c.response.size
        # SEC-5: a response is written field by field; its padding bytes are never touched.
        # `id` and `operation` are adjacent in every ABI, so they go in one write; `status`
        # in another (the pad byte between them and the tail padding stay as they were).
        (id_at, id_st), (op_at, op_st), (st_at, st_st) = c.response.field_parts("id", "operation", "status")
        if op_at != id_at + id_st.size:
            raise AssertionError(f"{abi}: response operation not right after id")
        id_op = struct.Struct("<" + id_st.format[1:] + op_st.format[1:])
        self._rsp_id_op_at, self._rsp_id_op = id_at, id_op.pack
        self._rsp_status_at, self._rsp_status = st_at, st_st.pack
        self._rw_id = c.request_rw.index("id")
        self._rw_seg = c.request_rw.index("seg[0].gref")
        self._other_id = c.request_other.index("id")
        self._discard_id = c.request_discard.index("id")
        ind = c.request_indirect
        self._ind_id, self._ind_sector = ind.index("id"), ind.index("sector_number")
        self._ind_grefs = ind.index("indirect_grefs[0]")

    # -- the loop ------------------------------------------------------------------------------

    def serve(self) -> bool:
        """Answer every request available now; return whether to notify the frontend (RING-6)."""
        if self.halted is not None:
            return False
        ring = self.ring
        while True:
            prod = ring.shared.req_prod
            if ring.request_prod_overflow(prod):
                self.halted = RuleViolation(
                    "RING-9", f"req_prod - rsp_prod_pvt <= {ring.size}",
                    f"req_prod {prod}, rsp_prod_pvt {ring.rsp_prod_pvt}",
                    "ill-behaved frontend: ring halted until disconnect (SEC-4)",
                )  # fmt: skip
                return ring.push_responses()
            handle, respond, get_request = self.handle, self.respond, ring.get_request
            n = ring.unconsumed_requests()
            while n:  # in batches: the per-request path is what `bench iops` measures
                self.stats.requests += n
                for _ in range(n):
                    respond(*handle(get_request()))  # get_request: the one copy we use (SEC-1)
                n = ring.unconsumed_requests()
            notify = ring.push_responses()
            if not ring.final_check_for_requests():
                return notify

    def _note(self, rule: str) -> None:
        """Count a frontend mistake by rule (frontend-role tests read these: `request_rules_broken`)."""
        self.stats.by_rule[rule] = self.stats.by_rule.get(rule, 0) + 1  # pragma: no mutate (a count)

    def _refuse(self, op: int) -> int:
        """EOPNOTSUPP for an advertised operation in `features.unsupported_ops` (OP-3), counted."""
        self.stats.refused[op] = self.stats.refused.get(op, 0) + 1  # pragma: no mutate (a count)
        return EOPNOTSUPP

    def respond(self, rid: int, op: int, status: int) -> None:
        """Write one response into the next response slot, leaving its padding alone (SEC-5)."""
        ring = self.ring
        idx = ring.rsp_prod_pvt
        write_at = ring.shared.write_at
        write_at(idx, self._rsp_id_op_at, self._rsp_id_op(rid, op))
        write_at(idx, self._rsp_status_at, self._rsp_status(status))
        ring.rsp_prod_pvt = (idx + 1) & 0xFFFFFFFF

    # -- one request ---------------------------------------------------------------------------

    def handle(self, slot: bytes) -> tuple[int, int, int]:
        """(id, operation to echo, status) for one copied request slot; `serve` counts requests."""
        op = slot[0]
        try:
            if op <= FLUSH:
                f = (self._rw_head_unpack if slot[1] <= 1 else self._rw_unpack)(slot)  # [1]: nr_segments
                return f[self._rw_id], op, self._rw_request(op, f)
            if op == DISCARD and self.features.discard:
                f = self._discard.unpack_from(slot)
                return f[self._discard_id], op, self._discard_request(f)
            if op == INDIRECT and self.features.max_indirect_segments:
                f = self._indirect.unpack_from(slot)
                return self._indirect_request(f)
        except BadRequest as bad:
            self.stats.errors += 1  # pragma: no mutate (a count)
            self._note(bad.rule)
            rid = self._other.unpack_from(slot)[self._other_id]
            return rid, op, bad.status
        # Unknown operation, or one this backend did not offer (DIV-1, OP-4): EOPNOTSUPP, op echoed.
        self.stats.errors += 1  # pragma: no mutate (a count)
        if op == DISCARD or op == INDIRECT:
            self._note("OP-2")  # the frontend used a feature this backend did not advertise
        return self._other.unpack_from(slot)[self._other_id], op, EOPNOTSUPP

    def _rw_request(self, op: int, f: tuple) -> int:
        nseg = f[1]
        sector = f[self._rw_id + 1]
        disk = self.disk
        if op == FLUSH or op == BARRIER:
            if not (self.features.flush if op == FLUSH else self.features.barrier):
                self._note("OP-2")  # the frontend sent an operation this backend did not offer
                return EOPNOTSUPP  # not offered (OP-2/OP-3)
            if op in self.features.unsupported_ops:
                return self._refuse(op)
            if nseg and disk.readonly:
                raise BadRequest("SEC-3.a")  # data-carrying flush on a read-only disk
            # FL-1.a/FL-2: this ring is served in order, so every earlier write has completed.
            disk.store.flush()
            if not nseg:
                return OKAY
            op_data = WRITE
        else:
            op_data = op
            if nseg == 0:
                raise BadRequest("DIV-5.b" if op == WRITE and disk.readonly else "DIV-5.a")
            if op == WRITE and disk.readonly:
                raise BadRequest("SEG-8")
        if nseg > consts.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BadRequest("SEG-1")
        base = self._rw_seg
        if nseg == 1:  # the common case, I/O within one page: no comprehension to run
            segs: Sequence[tuple[int, int, int]] = ((f[base], f[base + 1], f[base + 2]),)
        else:
            end = base + 4 * nseg
            segs = tuple(zip(f[base:end:4], f[base + 1 : end : 4], f[base + 2 : end : 4], strict=True))
        self._io(op_data, sector, segs)
        return OKAY

    def _indirect_request(self, f: tuple) -> tuple[int, int, int]:
        inner, nseg = f[1], f[2]
        rid, sector, grefs_at = f[self._ind_id], f[self._ind_sector], self._ind_grefs
        try:
            if inner not in (READ, WRITE):
                raise BadRequest("IND-2")
            if not 1 <= nseg <= self.features.max_indirect_segments:
                raise BadRequest("IND-1")
            if inner == WRITE and self.disk.readonly:
                raise BadRequest("SEG-8")
            npages = -(-nseg // consts.SEGS_PER_INDIRECT_FRAME)
            if npages > consts.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
                raise BadRequest("IND-3")
            segs: list[tuple[int, int, int]] = []
            for page_no in range(npages):
                page = self._copy_in(f[grefs_at + page_no], 0, PAGE)  # read once (SEC-1)
                values = self._seg_page.unpack_from(page)
                count = min(nseg - len(segs), consts.SEGS_PER_INDIRECT_FRAME)
                segs.extend((values[i], values[i + 1], values[i + 2]) for i in range(0, 4 * count, 4))
            self._io(inner, sector, segs)
        except BadRequest as bad:
            self.stats.errors += 1  # pragma: no mutate (a count)
            self._note(bad.rule)
            return rid, inner, bad.status
        return rid, inner, OKAY  # IND-6: the response carries indirect_op

    def _discard_request(self, f: tuple) -> int:
        sector, nr = f[-2], f[-1]
        disk = self.disk
        if (sector * SECTOR) % self.features.discard_granularity:
            self._note("DISC-2")  # recorded, not refused: Linux blkback does not check it either
        if DISCARD in self.features.unsupported_ops:
            return self._refuse(DISCARD)
        if disk.readonly:
            raise BadRequest("DISC-5")
        if sector + nr > disk.sectors:
            raise BadRequest("DISC-5")
        if nr:
            # DISC-3: the secure flag is honoured only when discard-secure was offered; this
            # store zeroes discarded ranges, which satisfies both plain and secure discard.
            disk.store.discard(sector * SECTOR, nr * SECTOR)
        return OKAY

    def _io(self, op: int, sector: int, segs: Sequence[tuple[int, int, int]]) -> None:
        """Validate every segment first (SEG-3..7), then move the data."""
        disk = self.disk
        ss = disk.sector_size
        total = 0
        for _gref, first, last in segs:
            if first > last or last >= SPP:
                raise BadRequest("SEG-3")
            if ss > SECTOR and ((first * SECTOR) % ss or ((last - first + 1) * SECTOR) % ss):
                raise BadRequest("SEG-5")
            total += last - first + 1
        if ss > SECTOR and (sector * SECTOR) % ss:
            raise BadRequest("SEG-5")
        if sector + total > disk.sectors:
            raise BadRequest("SEG-7")
        offset = sector * SECTOR
        if op == READ:
            data = disk.store.read(offset, total * SECTOR)
            pos = 0
            for gref, first, last in segs:
                n = (last - first + 1) * SECTOR
                self._copy_out(gref, first * SECTOR, data[pos : pos + n])
                pos += n
        else:
            chunks = []  # a loop, not a comprehension: no function object per request
            for gref, first, last in segs:
                chunks.append(self._copy_in(gref, first * SECTOR, (last - first + 1) * SECTOR))
            disk.store.write(offset, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    # -- data movement through grants ----------------------------------------------------------

    def _mapping(self, gref: int) -> Mapping | None:
        """A persistent writable mapping of `gref`, or None to fall back to grant copy (PG-4)."""
        m = self._persistent.get(gref)
        if m is not None or not self.features.persistent:
            return m
        if len(self._persistent) >= self.features.max_persistent_grants:
            return None
        try:
            m = self.grants.map(self.peer, [gref], readonly=False)
        except XenError:
            return None  # e.g. granted read-only: serve it by copy instead
        self._persistent[gref] = m
        return m

    def _copy_in(self, gref: int, offset: int, length: int) -> bytes:
        m = self._persistent.get(gref)  # the hot path: already mapped (PG-3)
        if m is None:
            m = self._mapping(gref)
        if m is not None:
            return bytes(m.buf[offset : offset + length])
        try:
            return self.grants.copy_from(self.peer, gref, offset, length)
        except XenError:
            raise BadRequest("SEC-6") from None

    def _copy_out(self, gref: int, offset: int, data: bytes) -> None:
        m = self._persistent.get(gref)  # the hot path: already mapped (PG-3)
        if m is None:
            m = self._mapping(gref)
        if m is not None:
            m.buf[offset : offset + len(data)] = data
            return
        try:
            self.grants.copy_to(self.peer, gref, offset, data)
        except XenError:
            raise BadRequest("SEC-6") from None

    def close(self) -> None:
        """Drop every persistent mapping (SEC-12: freed on disconnect)."""
        for m in self._persistent.values():
            m.unmap()
        self._persistent.clear()
