"""The reference backend never trusts the frontend: every hostile request gets the right answer.

The reference frontend's raw layer puts crafted slots on the ring (built by
`SlotFactory`); the backend must answer each exactly once with the status of
the rule it breaks, echo id and operation, and keep serving (inventory §8.1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import consts
from blkif_spec.consts import BlkifOp, BlkifRsp
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.drivers.frontend import Frontend, FrontendConfig
from blkif_spec.factory import SlotFactory
from blkif_spec.pair import ReferencePair
from blkif_spec.xen.sim import SimXen

OKAY, ERROR, EOPNOTSUPP = int(BlkifRsp.OKAY), int(BlkifRsp.ERROR), int(BlkifRsp.EOPNOTSUPP)
READ, WRITE, INDIRECT = int(BlkifOp.READ), int(BlkifOp.WRITE), int(BlkifOp.INDIRECT)
DISCARD = int(BlkifOp.DISCARD)
SECTORS = 2048
RID = 0x5EC0_0000_0000  # raw ids stay clear of the frontend's own (< RING_SIZE)


@pytest.fixture(scope="module")
def pair(sim_xen: SimXen) -> Iterator[ReferencePair]:
    with ReferencePair(sim_xen, BackendConfig(max_indirect_segments=64), FrontendConfig(max_queues=2),
                       size=SECTORS * 512) as p:  # fmt: skip
        p.connect()
        yield p


@pytest.fixture(scope="module")
def slots() -> SlotFactory:
    return SlotFactory(consts.X86_64_ABI)


def answer(fe: Frontend, slot: bytes, *, operation: int | None = None, queue: int = 0) -> int:
    """Send one raw request and return the status of its single response."""
    done = fe.wait([fe.raw_request(slot, operation=operation, queue=queue)])[0]
    return done.status


Case = Callable[[Frontend, SlotFactory], tuple[bytes, int, int]]  # -> (slot, echoed op, status)


def _gref(fe: Frontend, *, readonly: bool = False) -> int:
    return fe.raw_grant(b"", readonly=readonly)[0]


CASES: dict[str, Case] = {
    # rule: (slot, operation the response must echo, expected status)
    "SEG-1 twelve segments": lambda fe, f: (
        f.rw(READ, RID, 0, [(_gref(fe), 0, 7)] * 11, nr_segments=12), READ, ERROR),
    "SEG-3 first_sect > last_sect": lambda fe, f: (f.rw(READ, RID, 0, [(_gref(fe), 5, 2)]), READ, ERROR),
    "SEG-3 last_sect 8": lambda fe, f: (f.rw(READ, RID, 0, [(_gref(fe), 0, 8)]), READ, ERROR),
    "SEG-7 past the end": lambda fe, f: (f.rw(READ, RID, SECTORS - 4, [(_gref(fe), 0, 7)]), READ, ERROR),
    "SEG-7 wrapping sector": lambda fe, f: (f.rw(READ, RID, 2**64 - 4, [(_gref(fe), 0, 7)]), READ, ERROR),
    "DIV-5.a zero-segment read": lambda fe, f: (f.rw(READ, RID, 0, []), READ, ERROR),
    "DIV-1 reserved op 4": lambda fe, f: (f.other(4, RID), 4, EOPNOTSUPP),
    "DIV-1 unknown op 99": lambda fe, f: (f.other(99, RID, fill=b"\xff"), 99, EOPNOTSUPP),
    "SEC-6 never-granted gref": lambda fe, f: (f.rw(READ, RID, 0, [(0x7FFF_FFF0, 0, 7)]), READ, ERROR),
    "SEG-9 read into a read-only grant": lambda fe, f: (
        f.rw(READ, RID, 0, [(_gref(fe, readonly=True), 0, 7)]), READ, ERROR),
    "IND-1 over the advertised limit": lambda fe, f: (
        f.indirect(READ, RID, 0, 65, [_gref(fe)]), READ, ERROR),
    "IND-1 zero indirect segments": lambda fe, f: (f.indirect(READ, RID, 0, 0, [_gref(fe)]), READ, ERROR),
    "IND-2 indirect flush": lambda fe, f: (f.indirect(3, RID, 0, 1, [_gref(fe)]), 3, ERROR),
    "DISC-5 discard past the end": lambda fe, f: (f.discard(RID, SECTORS - 1, 2), DISCARD, ERROR),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_request_gets_its_status(pair: ReferencePair, slots: SlotFactory, name: str) -> None:
    fe = pair.frontend
    slot, op, status = CASES[name](fe, slots)
    assert answer(fe, slot, operation=op) == status, name
    assert fe.read(0, 8).status == OKAY  # the ring is still served
    assert not fe.violations


def test_revoked_grant_fails_the_request(pair: ReferencePair, slots: SlotFactory) -> None:
    """SEC-6: a grant revoked before the backend uses it fails that request only."""
    fe = pair.frontend
    gref = _gref(fe)
    assert fe.raw_revoke(gref)
    assert answer(fe, slots.rw(WRITE, RID, 0, [(gref, 0, 7)])) == ERROR


def test_indirect_answer_carries_indirect_op(pair: ReferencePair, slots: SlotFactory) -> None:
    """IND-6 / DIV-2: an advertised indirect READ is answered with operation READ, not 6."""
    fe = pair.frontend
    data_gref, page = fe.raw_grant(b"")
    fe.write(0, b"Q" * 4096)
    seg_gref = fe.raw_grant(slots.segments_page([(data_gref, 0, 7)]), readonly=True)[0]
    assert answer(fe, slots.indirect(READ, RID, 0, 1, [seg_gref]), operation=READ) == OKAY
    assert bytes(page[:4096]) == b"Q" * 4096


@given(garbage=st.binary(min_size=112, max_size=112))
def test_any_slot_gets_one_answer_with_a_valid_status(pair: ReferencePair, garbage: bytes) -> None:
    """OP-5, SEC-11: whatever the slot holds, one response, status in {0, -1, -2}, id and op echoed."""
    fe = pair.frontend
    slot = bytearray(garbage)
    slot[8:16] = RID.to_bytes(8, "little")
    op = slot[0]
    expected_op = slot[1] if op == INDIRECT else op  # IND-6: indirect echoes indirect_op
    status = answer(fe, bytes(slot), operation=expected_op)
    assert status in (OKAY, ERROR, EOPNOTSUPP)
    assert not fe.violations


def test_response_padding_is_never_written(pair: ReferencePair, slots: SlotFactory) -> None:
    """SEC-5 (XSA-216): response padding bytes keep what the slot held before (the request)."""
    fe = pair.frontend
    request = slots.other(99, RID, fill=b"\xa5")
    fe.raw_request(request, operation=99)
    q = fe._queues[0]
    idx = q.ring.req_prod_pvt - 1
    fe.wait([q.pending[RID]])
    slot = fe.ring_slot(idx)
    rsp = slots.codecs.response
    for name in (n for n in rsp.fields if n.startswith("_pad")):
        start = rsp.offset(name)
        end = start + len(rsp.unpack_from(slot)[rsp.index(name)])
        assert slot[start:end] == request[start:end], f"SEC-5: {name} rewritten"


def test_producer_overflow_halts_that_ring_only(sim_xen: SimXen) -> None:
    """RING-9, SEC-4, DIV-21: req_prod more than RING_SIZE ahead halts the ring; others go on."""
    with ReferencePair(sim_xen, frontend_config=FrontendConfig(max_queues=2, max_ring_page_order=0)) as p:
        p.connect()
        fe = p.frontend
        fe.raw_produce(33, queue=0)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not p.backend.halted_rings():
            time.sleep(0.01)
        assert [v.rule_id for v in p.backend.halted_rings()] == ["RING-9"]
        assert fe.read(0, 8, queue=1).status == OKAY
