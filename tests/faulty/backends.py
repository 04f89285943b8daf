"""Faulty backends, part 1: wire and padding, ring indices and notification, security,
segments and sectors, operations and indirect requests.

Each class is a target (`--backend=tests.faulty.backends:NAME`): the reference backend
with one small change, registered with the ONE rule it breaks. Every fault here swaps
in a `RingServer` subclass through `Backend.server_class` (see `_serving`) and
overrides the smallest method of the reference ring service it can; the ring faults
also give the server a `BackRing` subclass (`_rering`). None of them edits the
reference driver.
"""

from __future__ import annotations

from dataclasses import replace

from blkif_spec.consts import RING_IDX_MASK
from blkif_spec.drivers.blkserve import (
    BARRIER,
    DISCARD,
    FLUSH,
    INDIRECT,
    READ,
    SECTOR,
    SPP,
    WRITE,
    BadRequest,
    RingServer,
)
from blkif_spec.ring import REQ_EVENT, REQ_PROD, BackRing
from blkif_spec.targets import ReferenceBackend
from tests.faulty.registry import faulty, serving

M32 = RING_IDX_MASK
M64 = 2**64 - 1
KNOWN_OPS = frozenset({READ, WRITE, BARRIER, FLUSH, DISCARD, INDIRECT})


def _rering(ring: BackRing, cls: type[BackRing]) -> BackRing:
    """`ring` as a `cls`: same shared page, same private indices (the backend attached already)."""
    new = cls(ring.shared)
    new.req_cons, new.rsp_prod_pvt = ring.req_cons, ring.rsp_prod_pvt
    return new


# == wire and padding =============================================================================


class _GarbagePadding(RingServer):
    def respond(self, rid: int, op: int, status: int) -> None:
        rsp = bytearray(b"\xde\xad\xbe\xef" * (self._rsp_size // 4))  # an uninitialised struct
        id_op, st = self._rsp_id_op(rid, op), self._rsp_status(status)
        rsp[self._rsp_id_op_at : self._rsp_id_op_at + len(id_op)] = id_op
        rsp[self._rsp_status_at : self._rsp_status_at + len(st)] = st
        ring = self.ring
        ring.shared.write_slot(ring.rsp_prod_pvt, rsp)  # the whole struct, padding included
        ring.rsp_prod_pvt = (ring.rsp_prod_pvt + 1) & M32


@faulty("backend", "SEC-5", "writes the whole response struct, its padding bytes 9 and 12-15 full of garbage")
class PaddingLeak(ReferenceBackend):
    """XSA-216: blkback built the response on the stack and copied all 16 bytes to the ring."""

    backend_class = serving(_GarbagePadding)


class _Id32(RingServer):
    def respond(self, rid: int, op: int, status: int) -> None:
        super().respond(rid & 0xFFFFFFFF, op, status)


@faulty("backend", "WIRE-5", "echoes only the low 32 bits of the request id")
class IdTruncated32(ReferenceBackend):
    """A backend keeping the id in an `unsigned long` of a 32-bit build (DIV-31)."""

    backend_class = serving(_Id32)


# == ring indices and notification ================================================================


class _WideIndexRing(BackRing):
    __slots__ = ()

    def request_prod_overflow(self, prod: int) -> bool:
        return (prod - self.rsp_prod_pvt) & M64 > self.size  # the bug: 64-bit, not RING_IDX, arithmetic


class _WideIndex(RingServer):
    def __init__(self, ring: BackRing, *args, **kwargs) -> None:
        super().__init__(_rering(ring, _WideIndexRing), *args, **kwargs)


@faulty(
    "backend",
    "RING-1",
    "judges req_prod - rsp_prod_pvt in 64 bits: halts the ring at the 2^32 wrap",
    hangs=True,
)
class IndexWrapHalts(ReferenceBackend):
    """Indices held in 64-bit variables: RING_REQUEST_PROD_OVERFLOW computed without the
    32-bit wrap. Right until the frontend's req_prod wraps to a small number; then a
    well-behaved frontend looks overflowed (RING-9) and the ring is halted: no more answers."""

    backend_class = serving(_WideIndex)


class _NotifyInverted(RingServer):
    def serve(self) -> bool:
        return not super().serve()  # the hold-off test inverted: `<` written `>=`


@faulty("backend", "RING-6", "notifies exactly when rsp_event does not ask for it, never when it does")
class NotifyInverted(ReferenceBackend):
    """Notify suppression that loses a wake-up: the frontend sleeping on rsp_event is never woken."""

    backend_class = serving(_NotifyInverted)


class _NoRecheckRing(BackRing):
    __slots__ = ()

    def final_check_for_requests(self) -> bool:
        if self.unconsumed_requests():
            return True
        self._w[REQ_EVENT] = (self.req_cons + 1) & M32
        return False  # the bug: no second look at req_prod after arming req_event


class _NoRecheck(RingServer):
    def __init__(self, ring: BackRing, *args, **kwargs) -> None:
        super().__init__(_rering(ring, _NoRecheckRing), *args, **kwargs)


@faulty("backend", "RING-7", "arms req_event and goes idle without re-checking req_prod")
class NoRecheckAfterArming(ReferenceBackend):
    """RING_FINAL_CHECK_FOR_REQUESTS without its re-check: a request pushed between the last
    look and the arming needs no notification (RING-6) and is never seen."""

    backend_class = serving(_NoRecheck)


class _ReinitRing(RingServer):
    def __init__(self, ring: BackRing, *args, **kwargs) -> None:
        ring.shared.init()  # SHARED_RING_INIT: the frontend's job (RING-11)
        ring.attach(0)
        super().__init__(ring, *args, **kwargs)


@faulty("backend", "RING-11", "initialises the shared ring page (SHARED_RING_INIT) when it connects")
class ReinitialisesRing(ReferenceBackend):
    """A backend sharing the frontend's ring set-up code: it resets the indices the frontend
    chose (and any requests already published) to 0."""

    backend_class = serving(_ReinitRing)


class _DeferringRing(BackRing):
    """A ring whose server writes its responses only when it publishes them."""

    __slots__ = ("before_push",)

    def push_responses(self) -> bool:
        self.before_push()
        return super().push_responses()


class _Batching(RingServer):
    """Consumes every request it may before answering any, as Linux blkback does; the
    reference bounds keep that within RING_SIZE. Its ring class breaks them."""

    ring_class: type[_DeferringRing] = _DeferringRing

    def __init__(self, ring: BackRing, *args, **kwargs) -> None:
        super().__init__(_rering(ring, self.ring_class), *args, **kwargs)
        self._held: list[tuple[int, int, int]] = []
        self.ring.before_push = self._answer_held

    def respond(self, rid: int, op: int, status: int) -> None:
        self._held.append((rid, op, status))

    def _answer_held(self) -> None:
        held, self._held = self._held, []
        for answer in held:
            super().respond(*answer)


class _OneTooManyRing(_DeferringRing):
    __slots__ = ()

    def request_prod_overflow(self, prod: int) -> bool:
        return False  # no halt on an overflowed producer (QEMU, a variant of RING-9)

    def unconsumed_requests(self) -> int:
        cons = self.req_cons
        req = (self._w[REQ_PROD] - cons) & M32
        rsp = (self.size + 1 - (cons - self.rsp_prod_pvt)) & M32  # the bug: RING_SIZE + 1
        return min(req, rsp)

    def get_request(self) -> bytes:
        idx = self.req_cons
        if ((idx - self.rsp_prod_pvt) & M32) > self.size:  # the bug: > for >=
            raise AssertionError("unreachable: unconsumed_requests() keeps within RING_SIZE + 1")
        self.req_cons = (idx + 1) & M32
        return self.shared.read_slot(idx)


class _OneTooMany(_Batching):
    ring_class = _OneTooManyRing


@faulty(
    "backend", "RING-8", "RING_REQUEST_CONS_OVERFLOW off by one: consumes RING_SIZE + 1 unanswered requests"
)
class ConsumesOneTooMany(ReferenceBackend):
    """`>` for `>=` in the consumer's overflow check: with req_prod pushed past the ring it
    reads slot 0 again before answering it, and answers that request twice."""

    backend_class = serving(_OneTooMany)


# == security =====================================================================================


class _DoubleFetch(RingServer):
    def handle(self, slot: bytes) -> tuple[int, int, int]:
        again = self.ring.shared.read_slot((self.ring.req_cons - 1) & M32)  # the slot just copied
        return super().handle(again)


@faulty("backend", "SEC-1", "reads each request slot from the ring a second time and serves that copy")
class DoubleFetch(ReferenceBackend):
    """XSA-155: the request is fetched from shared memory again after it was copied, so what
    is served need not be what was checked."""

    backend_class = serving(_DoubleFetch)


class _EarlierGrantErrorHidden(RingServer):
    _left = 0  # segments of the current request not yet copied

    def _io(self, op: int, sector: int, segs) -> None:
        self._left = len(segs)
        try:
            super()._io(op, sector, segs)
        finally:
            self._left = 0

    def _later_segment_follows(self) -> bool:
        self._left -= 1
        return self._left > 0

    def _copy_in(self, gref: int, offset: int, length: int) -> bytes:
        try:
            return super()._copy_in(gref, offset, length)
        except BadRequest:
            if self._later_segment_follows():
                return bytes(length)
            raise

    def _copy_out(self, gref: int, offset: int, data: bytes) -> None:
        try:
            super()._copy_out(gref, offset, data)
        except BadRequest:
            if not self._later_segment_follows():
                raise


@faulty("backend", "SEC-6", "a failed grant copy is overwritten by the next segment's success: OKAY")
class EarlierGrantErrorHidden(ReferenceBackend):
    """XSA-365: one status variable for all segments, so a later good segment hides the error
    of an earlier bad one."""

    backend_class = serving(_EarlierGrantErrorHidden)


class _TrustingRing(_DeferringRing):
    __slots__ = ()

    def request_prod_overflow(self, prod: int) -> bool:
        return False

    def unconsumed_requests(self) -> int:
        return (self._w[REQ_PROD] - self.req_cons) & M32  # whatever the frontend published

    def get_request(self) -> bytes:
        idx = self.req_cons
        self.req_cons = (idx + 1) & M32
        return self.shared.read_slot(idx)


class _Trusting(_Batching):
    ring_class = _TrustingRing


@faulty("backend", "SEC-4", "trusts an overflowed req_prod: consumes everything published before answering")
class TrustsOverflowedProducer(ReferenceBackend):
    """Neither halts (Linux) nor stops at RING_SIZE (QEMU): a req_prod moved past the ring
    makes it consume slots whose requests it has not answered yet, some of them twice."""

    backend_class = serving(_Trusting)


# == segments and sectors =========================================================================


class _TwelveSegments(RingServer):
    def _rw_request(self, op: int, f: tuple) -> int:
        if f[1] > 11:
            f = (f[0], 11, *f[2:])  # serves the first 11 and says OKAY (the clamp keeps it safe)
        return super()._rw_request(op, f)


@faulty("backend", "SEG-1", "accepts nr_segments 12..255, serving the first 11 segments, OKAY")
class AcceptsTwelveSegments(ReferenceBackend):
    """No `nr_segments <= 11` check; it never reads past the slot, but answers OKAY."""

    backend_class = serving(_TwelveSegments)


class _LastSectUnchecked(RingServer):
    def _io(self, op: int, sector: int, segs) -> None:
        cut = [
            (g, first, min(last, SPP - 1)) if first <= last else (g, first, last) for g, first, last in segs
        ]
        super()._io(op, sector, cut)


@faulty("backend", "SEG-3", "accepts last_sect 8..255: the segment is cut at the end of its frame, OKAY")
class LastSectUnchecked(ReferenceBackend):
    """Checks first_sect <= last_sect but not last_sect <= 7; the copy stops at the frame."""

    backend_class = serving(_LastSectUnchecked)


class _SectorOffsetWraps(RingServer):
    def _io(self, op: int, sector: int, segs) -> None:
        super()._io(op, (sector * SECTOR & M64) // SECTOR, segs)  # byte offset in 64 bits


@faulty("backend", "SEG-7", "range-checks sector_number * 512 in 64 bits: sector 2^55 + s wraps to s")
class SectorOffsetWraps(ReferenceBackend):
    """QEMU's finding (SEC-3): the byte offset wraps, so a huge sector_number passes the range
    check and the I/O lands near the start of the disk."""

    backend_class = serving(_SectorOffsetWraps)


class _WritesReadOnly(RingServer):
    def _rw_request(self, op: int, f: tuple) -> int:
        if op != WRITE or not self.disk.readonly:
            return super()._rw_request(op, f)
        disk, self.disk = self.disk, replace(self.disk, readonly=False)  # the WRITE path forgets mode=r
        try:
            return super()._rw_request(op, f)
        finally:
            self.disk = disk


@faulty(
    "backend",
    "SEG-8",
    "serves WRITE requests on a read-only disk (indirect, discard, flush keep their checks)",
)
class WritesReadOnlyDisk(ReferenceBackend):
    """The read-only check missing from the direct WRITE path only."""

    backend_class = serving(_WritesReadOnly)


class _NotContiguous(RingServer):
    def _io(self, op: int, sector: int, segs) -> None:
        for seg in segs:
            super()._io(op, sector, (seg,))  # the bug: every segment at sector_number


@faulty("backend", "SEG-6", "does every segment's I/O at sector_number instead of after the previous one")
class SegmentsNotContiguous(ReferenceBackend):
    """A per-segment loop that never advances the disk offset."""

    backend_class = serving(_NotContiguous)


class _SectorSizeUnits(RingServer):
    def _io(self, op: int, sector: int, segs) -> None:
        super()._io(op, sector * self.disk.sector_size // SECTOR, segs)


@faulty("backend", "SEG-4", "reads sector_number in sector-size units (x8 with 4096-byte sectors)")
class SectorSizeUnits(ReferenceBackend):
    """QEMU's reading of sector_number (DIV-12): right for 512-byte disks only."""

    backend_class = serving(_SectorSizeUnits)


class _MisalignedAccepted(RingServer):
    def __init__(self, ring: BackRing, abi: str, grants, peer: int, disk, features) -> None:
        super().__init__(ring, abi, grants, peer, replace(disk, sector_size=SECTOR), features)


@faulty("backend", "SEG-5", "checks alignment against 512 bytes while publishing sector-size 4096")
class MisalignedAccepted(ReferenceBackend):
    """Publishes sector-size 4096 but serves any 512-byte aligned start and length."""

    backend_class = serving(_MisalignedAccepted)


# == operations ===================================================================================


class _SilentOnUnknown(RingServer):
    _unknown = False

    def handle(self, slot: bytes) -> tuple[int, int, int]:
        self._unknown = slot[0] not in KNOWN_OPS
        return super().handle(slot)

    def respond(self, rid: int, op: int, status: int) -> None:
        if not self._unknown:  # the bug: an unknown operation is dropped, never answered
            super().respond(rid, op, status)


@faulty("backend", "DIV-1", "never answers an unknown operation (4, 7..255); serves the rest", hangs=True)
class HangsOnUnknownOp(ReferenceBackend):
    """A dispatch switch without a default case: the request is consumed and forgotten, the
    frontend waits for ever (verdict timeout)."""

    backend_class = serving(_SilentOnUnknown)


class _StatusMinus5(RingServer):
    def handle(self, slot: bytes) -> tuple[int, int, int]:
        rid, op, status = super().handle(slot)
        return rid, op, -5 if slot[0] not in KNOWN_OPS else status  # -EIO, an errno for a status


@faulty("backend", "OP-6", "answers an unknown operation with status -5 (-EIO)")
class StatusMinus5ForUnknownOp(ReferenceBackend):
    """A backend returning its errno as the blkif status."""

    backend_class = serving(_StatusMinus5)


class _AnswersTwice(RingServer):
    _unknown = False

    def handle(self, slot: bytes) -> tuple[int, int, int]:
        self._unknown = slot[0] not in KNOWN_OPS
        return super().handle(slot)

    def respond(self, rid: int, op: int, status: int) -> None:
        super().respond(rid, op, status)
        if self._unknown:  # the error path answers, then falls through to the common answer
            super().respond(rid, op, status)


@faulty("backend", "OP-5", "answers every unknown operation twice")
class AnswersUnknownOpTwice(ReferenceBackend):
    """An error path that completes the request and then reaches the common completion too."""

    backend_class = serving(_AnswersTwice)


# == indirect =====================================================================================


class _EchoesSix(RingServer):
    def _indirect_request(self, f: tuple) -> tuple[int, int, int]:
        rid, _, status = super()._indirect_request(f)
        return rid, INDIRECT, status


@faulty("backend", "IND-6", "answers INDIRECT requests with operation 6 instead of indirect_op")
class EchoesIndirectOp6(ReferenceBackend):
    """Echoes the request's operation byte; Linux blkfront then disables the disk (DIV-2)."""

    backend_class = serving(_EchoesSix)


class _BelowMaximum(RingServer):
    def __init__(self, ring: BackRing, abi: str, grants, peer: int, disk, features) -> None:
        below = replace(features, max_indirect_segments=features.max_indirect_segments - 1)
        super().__init__(ring, abi, grants, peer, disk, below)  # `<` where DIV-4 reads `<=`


@faulty("backend", "IND-1", "refuses nr_segments equal to its advertised feature-max-indirect-segments")
class RefusesAdvertisedMaximum(ReferenceBackend):
    """Reads "less than the number provided" literally (DIV-4): the maximum it advertises fails."""

    backend_class = serving(_BelowMaximum)


class _IndirectFlushAsWrite(RingServer):
    def _indirect_request(self, f: tuple) -> tuple[int, int, int]:
        if f[1] != FLUSH:
            return super()._indirect_request(f)
        rid, _, status = super()._indirect_request((f[0], WRITE, *f[2:]))
        return rid, FLUSH, status


@faulty("backend", "IND-2", "serves indirect_op FLUSH_DISKCACHE (3) as a WRITE, OKAY")
class IndirectFlushAsWrite(ReferenceBackend):
    """Accepts any data-carrying indirect_op and writes its segments."""

    backend_class = serving(_IndirectFlushAsWrite)
