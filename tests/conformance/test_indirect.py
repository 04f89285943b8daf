"""Indirect descriptors (inventory §2.3), both roles.

Backend role: the suite's frontend builds INDIRECT requests by hand: segment
descriptors in granted indirect pages (512 per page, IND-3), `indirect_grefs` for
them (IND-4), one-sector segments so that up to the 4096-segment ceiling fits the
disk. A backend advertising `feature-max-indirect-segments` accepts up to exactly
that many segments (DIV-4 reads "less than" as ≤), refuses one more, and answers
with `indirect_op` (IND-6, DIV-2); one that does not advertise it treats op 6 as
an unknown operation. Frontend role: the frontend under test never exceeds the
limit it was offered (IND-1).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import consts
from blkif_spec.consts import BlkifOp
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.factory import SlotFactory
from blkif_spec.harness import BackendUnderTest
from blkif_spec.model import pattern
from tests.conformance.conftest import (
    EOPNOTSUPP,
    ERROR,
    GREF_REUSE,
    OKAY,
    RAW_ID,
    backend_faults,
    expect,
    reply,
    require,
)

READ, WRITE, INDIRECT = int(BlkifOp.READ), int(BlkifOp.WRITE), int(BlkifOp.INDIRECT)
SECTOR = consts.SECTOR_SIZE
PER_PAGE = consts.SEGS_PER_INDIRECT_FRAME  # 512 descriptors per indirect page (IND-3)
CEILING = consts.BLKIF_MAX_INDIRECT_SEGMENTS  # 8 pages x 512
DATA_PAGES = 16


def limit_of(env: BackendUnderTest) -> int:
    require(env, "indirect")
    return int(env.backend_tree()["feature-max-indirect-segments"])


class Source:
    """A few granted data pages and one-sector segments over them, with the disk image they write.

    Segment i takes sector (i // pages) % 8 of page i % pages, so consecutive segments come
    from different pages and every segment's bytes are distinct (`pattern`).
    """

    def __init__(self, env: BackendUnderTest, seed: int, pages: int = DATA_PAGES) -> None:
        self.pages = [pattern(seed * 100 + p, 0, 8) for p in range(pages)]
        self.grefs = [env.peer.raw_grant(data)[0] for data in self.pages]

    def segments(self, count: int) -> list[tuple[int, int, int]]:
        n = len(self.grefs)
        return [(self.grefs[i % n], (i // n) % 8, (i // n) % 8) for i in range(count)]

    def image(self, count: int) -> bytes:
        n = len(self.pages)
        return b"".join(self.pages[i % n][((i // n) % 8) * SECTOR : ((i // n) % 8 + 1) * SECTOR]
                        for i in range(count))  # fmt: skip


def indirect(env: BackendUnderTest, slots: SlotFactory, op: int, sector: int,
             segs: Sequence[tuple[int, int, int]], *, nr_segments: int | None = None,
             unused: Sequence[int] = ()) -> bytes:  # fmt: skip
    """An INDIRECT slot whose descriptors live in freshly granted indirect pages (IND-3, IND-4).

    Every grant of these tests is writable: with persistent grants Linux blkback maps all of
    them writable, indirect pages included (PG-2), so a read-only one would fail there.

    `unused` fills the `indirect_grefs` entries after the pages in use (IND-4: ignored).
    """
    grefs = [env.peer.raw_grant(slots.segments_page(segs[i : i + PER_PAGE]))[0]
             for i in range(0, len(segs), PER_PAGE)]  # fmt: skip
    grefs = (grefs + list(unused))[: consts.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST]
    return slots.indirect(op, RAW_ID, sector, len(segs) if nr_segments is None else nr_segments, grefs)


def disk(env: BackendUnderTest, sector: int, count: int) -> bytes:
    with backend_faults(env):
        done = env.peer.read(sector, count)
    expect("IND-1", OKAY, done.status, f"READ of {count} sectors at {sector} to check the disk")
    return done.data


# -- backend role ------------------------------------------------------------------------------


@pytest.mark.role("backend")
@pytest.mark.rule("IND-1", "DIV-4", "IND-6", "OP-4", "DIV-16", "IND-7")
@pytest.mark.provokes(*GREF_REUSE)
def test_the_advertised_maximum_is_accepted(connected_backend, slots, record_variant) -> None:
    """nr_segments equal to feature-max-indirect-segments: served, answered with indirect_op (a
    backend writing the key implements op 6, OP-4)."""
    env = connected_backend()
    limit = limit_of(env)
    record_variant("DIV-16", f"feature-max-indirect-segments {limit}")
    record_variant("IND-7", f"backend maximum {limit}")
    count = min(limit, CEILING)
    src = Source(env, 1)
    got = reply(env, indirect(env, slots, WRITE, 64, src.segments(count)))
    expect("DIV-4", {(WRITE, OKAY)}, got, f"INDIRECT WRITE of exactly {count} segments (the maximum)")
    expect("IND-1", src.image(count), disk(env, 64, count), f"the {count} segments on disk, in order")


@pytest.mark.role("backend")
@pytest.mark.rule("IND-1", "DIV-4", "IND-6", "IND-3", "SEC-2")
def test_more_than_the_maximum_is_refused(connected_backend, slots) -> None:
    """One segment past the maximum (and past the 8-page ceiling): ERROR, indirect_op, no I/O."""
    env = connected_backend()
    limit = limit_of(env)
    src = Source(env, 2)
    for count, rule in ((limit + 1, "IND-1"), (CEILING + 1, "IND-3")):
        if count > CEILING and rule == "IND-1":
            continue  # limit+1 needs more than 8 indirect pages: the ceiling case covers it
        segs = src.segments(min(count, CEILING))
        slot = indirect(env, slots, WRITE, 0, segs, nr_segments=count)
        got = reply(env, slot)
        expect(rule, {(WRITE, ERROR)}, got, f"INDIRECT WRITE with nr_segments {count} (maximum {limit})")
        expect(rule, bytes(min(count, CEILING) * SECTOR), disk(env, 0, min(count, CEILING)),
               "nothing written by the refused request")  # fmt: skip


@pytest.mark.role("backend")
@pytest.mark.rule("IND-6", "DIV-2", "IND-3")
def test_answers_carry_indirect_op(connected_backend, slots) -> None:
    """READ and WRITE through indirect descriptors: the answer's operation is 0 or 1, never 6."""
    env = connected_backend()
    limit = limit_of(env)
    count = min(limit, 12)
    src = Source(env, 3)
    expect("IND-6", {(WRITE, OKAY)}, reply(env, indirect(env, slots, WRITE, 256, src.segments(count))),
           f"INDIRECT WRITE of {count} segments")  # fmt: skip
    pages = [env.peer.raw_grant() for _ in range(count)]
    segs = [(gref, 0, 0) for gref, _ in pages]
    expect("IND-6", {(READ, OKAY)}, reply(env, indirect(env, slots, READ, 256, segs)),
           f"INDIRECT READ of {count} segments")  # fmt: skip
    read = b"".join(bytes(page[:SECTOR]) for _, page in pages)
    expect("IND-3", src.image(count), read, "segment n of the READ filled from sector 256 + n")


@pytest.mark.role("backend")
@pytest.mark.rule("IND-2", "DIV-3", "IND-6")
def test_invalid_indirect_op_is_refused(connected_backend, slots, record_variant) -> None:
    """indirect_op other than READ/WRITE: ERROR carrying that indirect_op, and no I/O."""
    env = connected_backend()
    limit_of(env)
    src = Source(env, 4, pages=2)
    for inner in (2, 3, 4, 5, 6, 7, 255):
        got = reply(env, indirect(env, slots, inner, 512, src.segments(4)))
        expect("IND-2", ERROR, got[1], f"indirect_op {inner}")
        expect("IND-6", inner, got[0], f"operation in the answer to indirect_op {inner}")
    expect("DIV-3", bytes(4 * SECTOR), disk(env, 512, 4), "nothing written by the refused requests")
    record_variant("DIV-3", "ERROR, invalid indirect_op echoed, no I/O")


@pytest.mark.role("backend")
@pytest.mark.rule("IND-3", "IND-1")
def test_segments_span_indirect_pages(backend_under_test, record_negotiated, slots) -> None:
    """More than 512 segments: descriptor n is read from page n // 512, index n % 512."""
    env = backend_under_test(options={"max_indirect_segments": 1024})
    record_negotiated(env.connect())
    limit = limit_of(env)
    if limit <= PER_PAGE:
        pytest.skip(f"feature-max-indirect-segments {limit}: no request needs a second indirect page")
    src = Source(env, 5)
    for count in sorted({PER_PAGE + 1, min(limit, 3 * PER_PAGE - 7, CEILING)}):
        got = reply(env, indirect(env, slots, WRITE, 1024, src.segments(count)))
        expect(
            "IND-3",
            {(WRITE, OKAY)},
            got,
            f"INDIRECT WRITE of {count} segments over {-(-count // PER_PAGE)} pages",
        )
        expect("IND-3", src.image(count), disk(env, 1024, count), f"the {count} segments on disk, in order")


@pytest.mark.role("backend")
@pytest.mark.rule("IND-4")
@pytest.mark.provokes(*GREF_REUSE)
def test_unused_indirect_grefs_are_ignored(connected_backend, slots) -> None:
    """indirect_grefs after the pages in use hold junk, a revoked grant, a ring grant: ignored."""
    env = connected_backend()
    limit = limit_of(env)
    count = min(limit, 20)
    src = Source(env, 6)
    revoked = env.peer.raw_grant()[0]
    env.peer.raw_revoke(revoked)
    ring_gref = env.peer.raw_ring(0).ring_grefs[0]
    junk = [0xFFFF_FFFF, revoked, ring_gref, 0, 0xDEAD_BEEF, 7, 1]
    got = reply(env, indirect(env, slots, WRITE, 2048, src.segments(count), unused=junk))
    expect("IND-4", {(WRITE, OKAY)}, got, f"INDIRECT WRITE of {count} segments, 1 page, 7 junk grefs")
    expect("IND-4", src.image(count), disk(env, 2048, count), "the segments on disk")


@pytest.mark.role("backend")
@pytest.mark.rule("IND-5", "SEG-3", "SEG-7", "SEC-3")
def test_indirect_segments_obey_segment_rules(connected_backend, slots) -> None:
    """One bad descriptor among valid ones (last_sect > 7, first > last, or the extent past the
    disk): ERROR for the whole request, and nothing written."""
    env = connected_backend()
    limit = limit_of(env)
    sectors = int(env.backend_tree()["sectors"])
    src = Source(env, 7, pages=4)

    @given(count=st.integers(1, min(limit, 40)), data=st.data())
    def check(count: int, data: st.DataObject) -> None:
        segs = src.segments(count)
        k = data.draw(st.integers(0, count - 1), label="bad segment")
        kind = data.draw(st.sampled_from(["last>7", "first>last", "past end"]), label="fault")
        sector = 4096
        if kind == "last>7":
            segs[k] = (segs[k][0], data.draw(st.integers(0, 7)), data.draw(st.integers(8, 255)))
        elif kind == "first>last":
            last = data.draw(st.integers(0, 6))
            segs[k] = (segs[k][0], data.draw(st.integers(last + 1, 255)), last)
        else:
            sector = sectors - count + data.draw(st.integers(1, count))
        got = reply(env, indirect(env, slots, WRITE, sector, segs))
        expect("IND-5", {(WRITE, ERROR)}, got, f"{count} segments, #{k} {kind}, at sector {sector}")
        if kind != "past end":
            expect("IND-5", bytes(count * SECTOR), disk(env, 4096, count), "nothing written")

    check()
    expect("IND-5", bytes(8 * SECTOR), disk(env, sectors - 8, 8), "nothing written at the end of the disk")


@pytest.mark.role("backend")
@pytest.mark.rule("DIV-2", "IND-6", "DIV-1")
def test_backend_without_indirect_treats_op_6_as_unknown(backend_under_test, record_negotiated, slots,
                                                           record_variant) -> None:  # fmt: skip
    env = backend_under_test(options={"max_indirect_segments": 0})
    record_negotiated(env.connect())
    if "feature-max-indirect-segments" in env.backend_tree():
        pytest.skip("backend advertises feature-max-indirect-segments although asked not to")
    src = Source(env, 8, pages=1)
    echoed, status = reply(env, indirect(env, slots, WRITE, 0, src.segments(1)))
    expect("DIV-2", INDIRECT, echoed, "op 6 without indirect offered: answered as an unknown op, 6 echoed")
    expect("DIV-1", {ERROR, EOPNOTSUPP}, status, "op 6 without indirect offered")
    record_variant("DIV-1", f"op 6 not offered: {'ERROR' if status == ERROR else 'EOPNOTSUPP'}")
    expect("DIV-2", bytes(SECTOR), disk(env, 0, 1), "nothing written by the refused request")


# -- frontend role -----------------------------------------------------------------------------


@pytest.mark.role("frontend")
@pytest.mark.parametrize("limit", [
    pytest.param(0, marks=pytest.mark.rule("OP-2"), id="no-indirect"),
    pytest.param(16, marks=pytest.mark.rule("IND-1", "DIV-4"), id="16"),
])  # fmt: skip
def test_frontend_stays_within_the_offered_limit(frontend_under_test, limit: int) -> None:
    """A 64-page write and read: split into requests of at most `limit` segments; none indirect
    when the suite's backend offers no indirect (OP-2, a SHOULD). The suite's backend records
    every excess."""
    env = frontend_under_test(backend=BackendConfig(max_indirect_segments=limit))
    env.attach()
    data = pattern(9, 8, 64 * 8)
    expect("IND-1", OKAY, env.io("write", 8, data).status, "a 64-page write")
    got = env.io("read", 8, 64 * 8)
    expect("IND-1", {(OKAY, True)}, (got.status, got.data == data), "the 64 pages read back")
    expect("IND-1", data, env.store.read(8 * SECTOR, len(data)), "the 64 pages on the suite's disk")
    expect(
        "IND-1" if limit else "OP-2",
        {},
        env.request_rules_broken(),
        f"requests beyond the offered limit ({limit})",
    )
