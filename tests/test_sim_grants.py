"""Tests of the simulated grant table: permissions, shared memory, detach on destroy, recording.

The state machine at the end checks every operation against a small model
of what Xen would do; the other tests pin one rule each with a readable
failure.
"""

from __future__ import annotations

import multiprocessing
import pickle
import struct
from collections.abc import Iterator

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blkif_spec.ring import ENTRY_SIZE_X86_64, BackRing, FrontRing, SharedRing
from blkif_spec.xen.api import PAGE_SIZE, GrantTable, Mapping, Pages, XenError
from blkif_spec.xen.sim_grants import (
    FIRST_GREF,
    GrantHost,
    RecordingRing,
    SimGrantTable,
    SimMapping,
    SimPages,
    ring_for,
    view_for,
)

FRONT, BACK, OTHER = 1, 2, 3
JOIN_TIMEOUT = 10.0


@pytest.fixture
def host() -> Iterator[GrantHost]:
    with GrantHost(256, max_grants=256) as h:
        yield h


def tables(host: GrantHost) -> tuple[SimGrantTable, SimGrantTable, SimGrantTable]:
    return host.table(FRONT), host.table(BACK), host.table(OTHER)


def test_objects_satisfy_the_api_protocols(host: GrantHost) -> None:
    front, back, _ = tables(host)
    pages = front.alloc_pages()
    gref = front.grant(BACK, pages.frames[0], readonly=False)
    mapping = back.map(FRONT, [gref], readonly=False)
    assert isinstance(front, GrantTable)
    assert isinstance(pages, Pages)
    assert isinstance(mapping, Mapping)
    mapping.unmap()


# -- allocation ----------------------------------------------------------------------------


def test_allocation_is_zeroed_even_when_frames_are_reused(host: GrantHost) -> None:  # SEC-24
    front, _, _ = tables(host)
    pages = front.alloc_pages(4)
    frames = pages.frames
    pages.buf[:] = b"\xa5" * len(pages.buf)
    front.free_pages(pages)
    again = front.alloc_pages(4)
    assert again.frames == frames  # first fit hands the same frames back
    assert again.buf.tobytes() == bytes(4 * PAGE_SIZE)


def test_fragmented_allocation_is_one_contiguous_buffer() -> None:
    with GrantHost(4) as host:
        front = host.table(FRONT)
        singles = [front.alloc_pages() for _ in range(4)]
        front.free_pages(singles[0])
        front.free_pages(singles[2])
        pages = front.alloc_pages(2)
        assert pages.frames == (0, 2)
        assert len(pages.buf) == 2 * PAGE_SIZE
        pages.page(1)[:4] = b"two!"
        assert host.phys[2 * PAGE_SIZE : 2 * PAGE_SIZE + 4].tobytes() == b"two!"
        with pytest.raises(XenError, match="out of memory"):
            front.alloc_pages()


def test_free_pages_refused_while_a_grant_is_active(host: GrantHost) -> None:
    front, _, _ = tables(host)
    pages = front.alloc_pages()
    gref = front.grant(BACK, pages.frames[0], readonly=True)
    with pytest.raises(XenError, match="revoke"):
        front.free_pages(pages)
    assert front.revoke(gref)
    front.free_pages(pages)
    assert host.frames_of(FRONT) == []


def test_grant_only_own_frames(host: GrantHost) -> None:
    front, back, _ = tables(host)
    theirs = back.alloc_pages()
    with pytest.raises(XenError, match="not its page"):
        front.grant(BACK, theirs.frames[0], readonly=False)
    with pytest.raises(XenError, match="no such frame"):
        front.grant(BACK, host.nr_frames, readonly=False)


# -- permission checks on map ------------------------------------------------------------------


def test_map_only_grants_offered_to_you_by_that_peer(host: GrantHost) -> None:
    front, back, other = tables(host)
    gref = front.grant(BACK, front.alloc_pages().frames[0], readonly=False)
    with pytest.raises(XenError, match=rf"gref {gref} of domain {FRONT} is not offered to domain {OTHER}"):
        other.map(FRONT, [gref], readonly=True)
    with pytest.raises(XenError, match=rf"gref {gref} is not a grant of domain {OTHER}"):
        back.map(OTHER, [gref], readonly=True)
    for bad in (0, FIRST_GREF - 1, host.max_grants, -1):
        with pytest.raises(XenError, match="not a grant reference"):
            back.map(FRONT, [bad], readonly=True)
    with pytest.raises(XenError, match="no such grant"):
        back.map(FRONT, [gref + 1], readonly=True)
    with pytest.raises(XenError, match="no grant references"):
        back.map(FRONT, [], readonly=True)
    assert host.mappings_of(OTHER) == host.mappings_of(BACK) == []


def test_read_only_grant_mapped_writable_is_refused_naming_the_gref(host: GrantHost) -> None:
    front, back, _ = tables(host)
    pages = front.alloc_pages(2)
    rw = front.grant(BACK, pages.frames[0], readonly=False)
    ro = front.grant(BACK, pages.frames[1], readonly=True)
    with pytest.raises(XenError, match=rf"gref {ro} of domain {FRONT} is a read-only grant"):
        back.map(FRONT, [rw, ro], readonly=False)
    assert host.mappings_of(BACK) == []  # all or nothing: the good gref is not left mapped


def test_writes_through_a_read_only_mapping_raise_type_error(host: GrantHost) -> None:
    front, back, _ = tables(host)
    pages = front.alloc_pages()
    pages.buf[:5] = b"hello"
    gref = front.grant(BACK, pages.frames[0], readonly=False)  # even a writable grant mapped read-only
    mapping = back.map(FRONT, [gref], readonly=True)
    assert mapping.readonly and mapping.buf.readonly
    assert mapping.buf[:5].tobytes() == b"hello"
    with pytest.raises(TypeError):
        mapping.buf[0] = 1
    with pytest.raises(TypeError):
        mapping.buf[0:2] = b"xx"
    with pytest.raises(TypeError):
        struct.pack_into("<I", mapping.buf, 0, 7)
    with pytest.raises(TypeError):
        mapping.buf.obj[0] = 1  # type: ignore[index]  # even the exporter refuses
    with pytest.raises(TypeError):
        SharedRing(mapping.buf)
    assert pages.buf[:5].tobytes() == b"hello"
    mapping.unmap()


def test_revoke_refused_while_mapped_and_a_revoked_grant_cannot_be_mapped(host: GrantHost) -> None:  # SEC-23
    front, back, _ = tables(host)
    gref = front.grant(BACK, front.alloc_pages().frames[0], readonly=False)
    mapping = back.map(FRONT, [gref], readonly=False)
    assert front.revoke(gref) is False
    assert host.grants_of(FRONT) == [gref]
    mapping.unmap()
    mapping.unmap()  # idempotent
    assert front.revoke(gref) is True
    assert host.grants_of(FRONT) == []
    with pytest.raises(XenError, match="no such grant"):
        back.map(FRONT, [gref], readonly=True)
    with pytest.raises(XenError, match="not an active grant"):
        front.revoke(gref)
    other_gref = front.grant(OTHER, front.alloc_pages().frames[0], readonly=False)
    with pytest.raises(XenError, match="not an active grant of this domain"):
        back.revoke(other_gref)
    assert other_gref != gref  # a revoked gref is not handed out again at once


def test_same_gref_mapped_twice_counts_twice(host: GrantHost) -> None:  # PG-5
    front, back, _ = tables(host)
    gref = front.grant(BACK, front.alloc_pages().frames[0], readonly=False)
    first = back.map(FRONT, [gref], readonly=False)
    second = back.map(FRONT, [gref, gref], readonly=True)
    assert host.mappings_of(BACK) == [gref, gref, gref]
    first.unmap()
    assert front.revoke(gref) is False
    second.unmap()
    assert front.revoke(gref) is True


# -- shared memory ------------------------------------------------------------------------------


def test_multi_page_map_is_contiguous_in_gref_order_and_shared(host: GrantHost) -> None:  # WIRE-10
    front, back, _ = tables(host)
    a = front.alloc_pages()
    front.alloc_pages()  # a gap, so the frames are not contiguous
    b = front.alloc_pages(2)
    order = [b.page(1), a.page(0), b.page(0)]
    frames = [b.frames[1], a.frames[0], b.frames[0]]
    assert frames != sorted(frames)
    grefs = [front.grant(BACK, f, readonly=False) for f in frames]
    for i, page in enumerate(order):
        page[:] = bytes([i + 1]) * PAGE_SIZE
    mapping = back.map(FRONT, grefs, readonly=False)
    assert len(mapping.buf) == 3 * PAGE_SIZE
    for i in range(3):
        assert mapping.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].tobytes() == bytes([i + 1]) * PAGE_SIZE
    mapping.buf[PAGE_SIZE - 2 : PAGE_SIZE + 2] = b"WXYZ"  # across the page seam
    assert order[0][-2:].tobytes() == b"WX" and order[1][:2].tobytes() == b"YZ"
    order[2][100:104] = b"back"
    assert mapping.buf[2 * PAGE_SIZE + 100 : 2 * PAGE_SIZE + 104].tobytes() == b"back"
    mapping.unmap()


def test_multi_page_ring_over_a_mapping(host: GrantHost) -> None:  # WIRE-10
    front, back, _ = tables(host)
    ring_pages = [front.alloc_pages() for _ in range(2)]
    grefs = [front.grant(BACK, p.frames[0], readonly=False) for p in reversed(ring_pages)]
    mapping = back.map(FRONT, grefs, readonly=False)
    shared = SharedRing(mapping.buf, order=1)
    shared.init()
    fr = FrontRing(shared)
    for i in range(shared.size):
        fr.put_request(i.to_bytes(8, "little"))
    fr.push_requests()
    # the last slot lies in the second page, i.e. in ring_pages[0] (grefs were given in reverse)
    off = shared.slot_offset(shared.size - 1) - PAGE_SIZE
    assert ring_pages[0].buf[off : off + 8].tobytes() == (shared.size - 1).to_bytes(8, "little")
    shared.release()
    mapping.unmap()


def test_copy_permission_checks(host: GrantHost) -> None:
    front, back, other = tables(host)
    pages = front.alloc_pages(2)
    rw = front.grant(BACK, pages.frames[0], readonly=False)
    ro = front.grant(BACK, pages.frames[1], readonly=True)
    pages.page(1)[10:13] = b"abc"
    back.copy_to(FRONT, rw, 4090, b"edge!!")
    assert pages.page(0)[4090:].tobytes() == b"edge!!"
    assert back.copy_from(FRONT, ro, 10, 3) == b"abc"
    assert back.copy_from(FRONT, rw, 4090, 6) == b"edge!!"
    with pytest.raises(XenError, match=rf"gref {ro} .* read-only grant"):
        back.copy_to(FRONT, ro, 0, b"x")
    with pytest.raises(XenError, match="crosses the end"):
        back.copy_to(FRONT, rw, 4095, b"xy")
    with pytest.raises(XenError, match="crosses the end"):
        back.copy_from(FRONT, rw, 1, PAGE_SIZE)
    with pytest.raises(XenError, match="bad offset"):
        back.copy_from(FRONT, rw, -1, 1)
    with pytest.raises(XenError, match="not offered"):
        other.copy_from(FRONT, rw, 0, 1)
    with pytest.raises(XenError, match="not a grant of domain"):
        back.copy_from(OTHER, rw, 0, 1)
    assert front.revoke(rw)
    with pytest.raises(XenError, match="no such grant"):
        back.copy_from(FRONT, rw, 0, 1)
    assert pages.page(1)[:1].tobytes() == b"\0"


def test_unmap_with_a_live_slice_detaches_it_instead_of_faulting(host: GrantHost) -> None:
    front, back, _ = tables(host)
    pages = front.alloc_pages()
    pages.buf[:4] = b"data"
    gref = front.grant(BACK, pages.frames[0], readonly=False)
    mapping = back.map(FRONT, [gref], readonly=False)
    stale = mapping.buf[:8]
    mapping.unmap()
    assert not mapping.mapped
    assert front.revoke(gref)
    assert stale.tobytes() == bytes(8)  # private zeros, not the frame
    stale[:4] = b"oops"
    assert pages.buf[:4].tobytes() == b"data"


def test_pickling_is_refused_with_a_hint(host: GrantHost) -> None:
    front, _, _ = tables(host)
    for obj in (host, front):
        with pytest.raises(TypeError, match="fork"):
            pickle.dumps(obj)


# -- destroy ----------------------------------------------------------------------------------


def test_destroying_the_granter_keeps_a_peer_mapping_valid_but_dead(host: GrantHost) -> None:
    front, back, _ = tables(host)
    pages = front.alloc_pages(2)
    pages.buf[:4] = b"keep"
    grefs = [front.grant(BACK, f, readonly=False) for f in pages.frames]
    mapping = back.map(FRONT, grefs[:1], readonly=False)
    stale = pages.buf[:]  # a view a thread of the doomed domain still holds
    host.destroy_domain(FRONT)
    assert host.grants_of(FRONT) == [] and host.frames_of(FRONT) == []
    assert host.zombie_frames() == [pages.frames[0]]
    assert host.dead_grants() == grefs[:1]
    assert mapping.buf[:4].tobytes() == b"keep"
    stale[:4] = b"gone"  # the destroyed domain's thread writes on: detached, nobody sees it
    assert mapping.buf[:4].tobytes() == b"keep"
    with pytest.raises(ValueError, match="released"):
        pages.buf[0]  # the Pages' own buffer is released: an exception, not a fault
    with pytest.raises(XenError, match="destroyed"):
        back.map(FRONT, grefs[:1], readonly=True)
    with pytest.raises(XenError, match="no such grant"):
        back.map(FRONT, grefs[1:], readonly=True)
    with pytest.raises(XenError, match="destroyed"):
        back.copy_from(FRONT, grefs[0], 0, 4)
    calls = [lambda: front.alloc_pages(), lambda: front.grant(BACK, 0, readonly=True),
             lambda: front.revoke(grefs[0]), lambda: front.map(BACK, grefs[:1], readonly=True)]  # fmt: skip
    for call in calls:
        with pytest.raises(XenError, match=f"domain {FRONT} was destroyed"):
            call()
    mapping.unmap()
    assert host.zombie_frames() == host.dead_grants() == host.mappings_of(BACK) == []
    assert host.free_frame_count() == host.nr_frames
    reborn = host.table(FRONT)  # a new incarnation works; the old table stays dead
    assert reborn.alloc_pages().buf.tobytes() == bytes(PAGE_SIZE)
    with pytest.raises(XenError, match="destroyed"):
        front.alloc_pages()


def test_destroying_the_mapper_drops_its_mappings(host: GrantHost) -> None:
    front, back, _ = tables(host)
    pages = front.alloc_pages()
    pages.buf[:4] = b"mine"
    gref = front.grant(BACK, pages.frames[0], readonly=False)
    mapping = back.map(FRONT, [gref], readonly=False)
    view = mapping.buf[:]  # a ring or slice the backend thread still holds
    host.destroy_domain(BACK)
    assert host.mappings_of(BACK) == []
    assert not mapping.mapped
    assert view[:4].tobytes() == bytes(4)  # detached, no fault
    view[:4] = b"evil"
    assert pages.buf[:4].tobytes() == b"mine"
    assert front.revoke(gref) is True
    again = front.grant(BACK, pages.frames[0], readonly=False)
    reborn = host.table(BACK)
    second = reborn.map(FRONT, [again], readonly=True)
    mapping.unmap()  # the dead domain's late cleanup neither raises nor ends the new mapping
    assert host.mappings_of(BACK) == [again]
    assert front.revoke(again) is False
    second.unmap()
    host.destroy_domain(BACK)  # idempotent
    host.destroy_domain(99)  # unknown: ignored


def test_destroy_leaves_nothing_behind(host: GrantHost) -> None:
    front, back, _ = tables(host)
    fp, bp = front.alloc_pages(3), back.alloc_pages(2)
    fg = [front.grant(BACK, f, readonly=i % 2 == 0) for i, f in enumerate(fp.frames)]
    bg = [back.grant(FRONT, f, readonly=False) for f in bp.frames]
    maps = [back.map(FRONT, fg, readonly=True), front.map(BACK, bg, readonly=False)]
    host.destroy_domain(FRONT)
    host.destroy_domain(BACK)
    for d in (FRONT, BACK):
        assert host.grants_of(d) == host.mappings_of(d) == host.frames_of(d) == []
    assert host.zombie_frames() == host.dead_grants() == []
    assert host.free_frame_count() == host.nr_frames
    assert not any(m.mapped for m in maps)


# -- recording (SEC-1) ------------------------------------------------------------------------


def _ring_pair(host: GrantHost, *, record: bool) -> tuple[FrontRing, SimMapping, SharedRing]:
    front = host.table(FRONT)
    pages = front.alloc_pages()
    fshared = SharedRing(pages.buf)
    fring = FrontRing(fshared)
    fring.init()
    gref = front.grant(BACK, pages.frames[0], readonly=False)
    mapping = host.table(BACK, record=record).map(FRONT, [gref], readonly=False)
    return fring, mapping, ring_for(mapping)


def test_recording_ring_sees_each_slot_byte_read_exactly_once(host: GrantHost) -> None:
    fring, mapping, bshared = _ring_pair(host, record=True)
    assert isinstance(bshared, RecordingRing) and mapping.log is not None
    for i in range(3):
        fring.put_request(bytes([i]) * ENTRY_SIZE_X86_64)
    fring.push_requests()
    bring = BackRing(bshared)
    bring.attach(0)
    log = mapping.log
    mark = log.mark()
    n = bring.poll_requests()
    got = [bring.get_request() for _ in range(n)]
    assert got == [bytes([i]) * ENTRY_SIZE_X86_64 for i in range(3)]
    for k in range(3):
        off = bshared.slot_offset(k)
        assert log.reads_of(off, off + ENTRY_SIZE_X86_64) == [1] * ENTRY_SIZE_X86_64
        log.check_read_once(off, off + ENTRY_SIZE_X86_64)
    assert log.reads_of(0, 4, since=mark) == [1, 1, 1, 1]  # req_prod read once by poll_requests (RING-5)
    bshared.release()
    mapping.unmap()


def test_recording_catches_a_double_fetch(host: GrantHost) -> None:
    fring, mapping, bshared = _ring_pair(host, record=True)
    fring.put_request(bytes(ENTRY_SIZE_X86_64))
    fring.push_requests()
    off = bshared.slot_offset(0)
    end = off + ENTRY_SIZE_X86_64
    log = mapping.log
    assert log is not None
    mark = log.mark()
    bshared.read_slot(0)[:1]  # validate the operation...
    bshared.read_slot(0)  # ...then fetch the request again: XSA-155
    assert not log.read_once(off, end, since=mark)
    with pytest.raises(AssertionError, match="not read exactly once"):
        log.check_read_once(off, end, since=mark)
    mark = log.mark()
    bshared.slot_view(0)[0]  # reading fields in place from the live slot is an escape
    assert not log.read_once(off, end, since=mark)
    bshared.release()
    mapping.unmap()


def test_recording_view_for_indirect_pages(host: GrantHost) -> None:
    front, back, _ = tables(host)
    pages = front.alloc_pages()
    struct.pack_into("<IBB", pages.buf, 8, 0xBEEF, 1, 7)
    gref = front.grant(BACK, pages.frames[0], readonly=True)
    mapping = back.map(FRONT, [gref], readonly=True, record=True)
    view = view_for(mapping)
    assert view.unpack_from("<IBB", 8) == (0xBEEF, 1, 7)
    assert view[8] == 0xEF and view[8:10] == b"\xef\xbe"
    assert mapping.log is not None
    assert mapping.log.reads_of(8, 14) == [3, 2, 1, 1, 1, 1]
    with pytest.raises(IndexError):
        view.read(PAGE_SIZE - 2, 4)
    with pytest.raises(TypeError):
        view.write(0, b"x")  # a read-only mapping stays read-only
    view.release()
    mapping.unmap()


def test_plain_mappings_give_plain_rings(host: GrantHost) -> None:
    _, mapping, bshared = _ring_pair(host, record=False)
    assert mapping.log is None and type(bshared) is SharedRing
    assert view_for(mapping).log is None
    bshared.release()
    mapping.unmap()


# -- across processes ---------------------------------------------------------------------


def _child_maps(table: SimGrantTable, gref: int, mapped: object, done: object, conn: object) -> None:
    mapping = table.map(FRONT, [gref], readonly=False)
    conn.send(mapping.buf[:5].tobytes())  # type: ignore[attr-defined]
    mapping.buf[5:10] = b"child"
    mapped.set()  # type: ignore[attr-defined]
    if not done.wait(JOIN_TIMEOUT):  # type: ignore[attr-defined]
        raise SystemExit(3)
    mapping.unmap()


def test_a_forked_child_maps_a_grant_and_revoke_sees_it() -> None:  # SEC-23 across processes
    ctx = multiprocessing.get_context("fork")
    with GrantHost(64, max_grants=64) as host:
        front, back = host.table(FRONT), host.table(BACK)
        pages = front.alloc_pages()
        pages.buf[:5] = b"hello"
        gref = front.grant(BACK, pages.frames[0], readonly=False)
        mapped, done = ctx.Event(), ctx.Event()
        here, there = ctx.Pipe()
        child = ctx.Process(target=_child_maps, args=(back, gref, mapped, done, there))
        child.start()
        try:
            assert mapped.wait(JOIN_TIMEOUT)
            assert here.recv() == b"hello"
            assert pages.buf[5:10].tobytes() == b"child"
            assert host.mappings_of(BACK) == [gref]
            assert front.revoke(gref) is False
            done.set()
            child.join(JOIN_TIMEOUT)
            assert child.exitcode == 0
            assert host.mappings_of(BACK) == []
            assert front.revoke(gref) is True
        finally:
            if child.is_alive():
                child.kill()
                child.join()


def _child_unmaps_and_destroys(host: GrantHost, inherited: SimMapping) -> None:
    inherited.unmap()  # the child's copy: the parent's mapping must not end
    if host.mappings_of(BACK) != list(inherited.grefs):
        raise SystemExit(4)
    host.destroy_domain(BACK)


def test_mappings_belong_to_their_process_and_destroy_reaches_across() -> None:
    ctx = multiprocessing.get_context("fork")
    with GrantHost(64, max_grants=64) as host:
        front, back = host.table(FRONT), host.table(BACK)
        pages = front.alloc_pages()
        pages.buf[:4] = b"page"
        gref = front.grant(BACK, pages.frames[0], readonly=False)
        mapping = back.map(FRONT, [gref], readonly=False)
        child = ctx.Process(target=_child_unmaps_and_destroys, args=(host, mapping))
        child.start()
        child.join(JOIN_TIMEOUT)
        if child.is_alive():
            child.kill()
            child.join()
        assert child.exitcode == 0
        assert host.mappings_of(BACK) == []
        with pytest.raises(XenError, match="destroyed"):
            back.map(FRONT, [gref], readonly=True)
        # A destroy in another process cannot detach this process's view (documented limit).
        assert mapping.mapped and mapping.buf[:4].tobytes() == b"page"
        assert front.revoke(gref) is True
        again = front.grant(BACK, pages.frames[0], readonly=False)
        second = host.table(BACK).map(FRONT, [again], readonly=True)
        mapping.unmap()  # made by the destroyed incarnation: must not end the new mapping
        assert host.mappings_of(BACK) == [again]
        host.destroy_domain(FRONT)
        assert host.zombie_frames() == list(pages.frames)  # still mapped by `second`
        second.unmap()
        assert host.zombie_frames() == [] and host.free_frame_count() == host.nr_frames


# -- the model check ---------------------------------------------------------------------------

DOMAINS = (1, 2, 3)


class _Entry:
    def __init__(self, owner: int, peer: int, frame: int, ro: bool) -> None:
        self.owner, self.peer, self.frame, self.ro = owner, peer, frame, ro
        self.maps = 0
        self.dead = False


class GrantMachine(RuleBasedStateMachine):
    """Grant/map/unmap/revoke/copy/destroy against a model of Xen's rules."""

    NR_FRAMES = 24
    MAX_GRANTS = FIRST_GREF + 24

    def __init__(self) -> None:
        super().__init__()
        self.host = GrantHost(self.NR_FRAMES, max_grants=self.MAX_GRANTS, max_domains=4)
        self.tables = {d: self.host.table(d) for d in DOMAINS}
        self.dead_tables: list[SimGrantTable] = []
        self.pages: list[SimPages] = []
        self.entries: dict[int, _Entry] = {}
        self.seen_grefs: list[int] = []
        self.maps: list[tuple[int, SimMapping]] = []
        self.orphans: list[SimMapping] = []  # mappings of destroyed domains, still to be unmapped
        self.used: dict[int, int] = {}  # frame -> owner
        self.zombies: set[int] = set()

    def teardown(self) -> None:
        self.host.close()

    # helpers
    def _fmaps(self, frame: int) -> int:
        return sum(m._frames.count(frame) for _, m in self.maps)

    def _drop_mapping(self, i: int) -> None:
        _, m = self.maps.pop(i)
        for gref in m.grefs:
            e = self.entries[gref]
            e.maps -= 1
            if e.dead and e.maps == 0:
                del self.entries[gref]
        for f in set(m._frames):
            if f in self.zombies and self._fmaps(f) == 0:
                self.zombies.discard(f)

    # rules
    @initialize(ro=st.booleans())
    def offer_pages_around(self, ro: bool) -> None:
        """Each domain offers two pages to the next, which maps one: every rule has work at once."""
        for d, peer in zip(DOMAINS, DOMAINS[1:] + DOMAINS[:1], strict=True):
            self.alloc(d, 2)
            assert self.pages[-1].domid == d
            self.grant(len(self.pages) - 1, 0, peer, ro)
            self.grant(len(self.pages) - 1, 1, peer, not ro)
            self.map(peer, [len(self.entries) - 1], d, readonly=True, honest=True)

    @rule(d=st.sampled_from(DOMAINS), count=st.integers(1, 3))
    def alloc(self, d: int, count: int) -> None:
        free = self.NR_FRAMES - len(self.used) - len(self.zombies)
        if count > free:
            with pytest.raises(XenError, match="out of memory"):
                self.tables[d].alloc_pages(count)
            return
        pages = self.tables[d].alloc_pages(count)
        assert len(set(pages.frames)) == count and not set(pages.frames) & (self.used.keys() | self.zombies)
        assert pages.buf.tobytes() == bytes(count * PAGE_SIZE)
        self.used.update(dict.fromkeys(pages.frames, d))
        self.pages.append(pages)

    @precondition(lambda self: self.pages)
    @rule(i=st.integers(0, 100))
    def free(self, i: int) -> None:
        pages = self.pages[i % len(self.pages)]
        granted = any(e.frame in pages.frames and not e.dead for e in self.entries.values())
        if granted:
            with pytest.raises(XenError, match="revoke"):
                self.tables[pages.domid].free_pages(pages)
            return
        self.tables[pages.domid].free_pages(pages)
        self.pages.remove(pages)
        for f in pages.frames:
            del self.used[f]

    @precondition(lambda self: self.pages)
    @rule(i=st.integers(0, 100), j=st.integers(0, 3), peer=st.sampled_from(DOMAINS), ro=st.booleans())
    def grant(self, i: int, j: int, peer: int, ro: bool) -> None:
        pages = self.pages[i % len(self.pages)]
        frame = pages.frames[j % len(pages.frames)]
        table = self.tables[pages.domid]
        if len(self.entries) >= self.MAX_GRANTS - FIRST_GREF:
            with pytest.raises(XenError, match="full"):
                table.grant(peer, frame, readonly=ro)
            return
        gref = table.grant(peer, frame, readonly=ro)
        assert gref not in self.entries
        self.entries[gref] = _Entry(pages.domid, peer, frame, ro)
        self.seen_grefs.append(gref)

    def _map_error(self, mapper: int, peer: int, gref: int, write: bool) -> str | None:
        e = self.entries.get(gref)
        if e is None:
            return "no such grant"
        if e.dead:
            return "destroyed"
        if e.owner != peer:
            return "not a grant of domain"
        if e.peer != mapper:
            return "not offered"
        if write and e.ro:
            return "read-only grant"
        return None

    def _honest(self, gref: int) -> tuple[int, int] | None:
        """(mapper, peer) that the grant entry allows, if the gref is live."""
        e = self.entries.get(gref)
        return None if e is None else (e.peer, e.owner)

    @precondition(lambda self: self.seen_grefs)
    @rule(
        mapper=st.sampled_from(DOMAINS),
        picks=st.lists(st.integers(0, 100), min_size=1, max_size=3),
        peer=st.sampled_from(DOMAINS),
        readonly=st.booleans(),
        honest=st.booleans(),
    )
    def map(self, mapper: int, picks: list[int], peer: int, readonly: bool, honest: bool) -> None:
        live = sorted(g for g, e in self.entries.items() if not e.dead)
        pool = live if honest and live else self.seen_grefs
        grefs = [pool[p % len(pool)] for p in picks]
        pair = self._honest(grefs[0]) if honest else None
        if pair is not None:  # mostly legal maps, so the rules after a map get exercised
            mapper, peer = pair
            same = sorted(g for g, e in self.entries.items() if (e.peer, e.owner) == pair)
            grefs[1:] = [same[p % len(same)] for p in picks[1:]]
        errors = [self._map_error(mapper, peer, g, not readonly) for g in grefs]
        first = next((err for err in errors if err), None)
        if first is not None:
            with pytest.raises(XenError, match=first):
                self.tables[mapper].map(peer, grefs, readonly=readonly)
            return
        m = self.tables[mapper].map(peer, grefs, readonly=readonly)
        assert m.readonly == readonly and len(m.buf) == len(grefs) * PAGE_SIZE
        for g in grefs:
            self.entries[g].maps += 1
        self.maps.append((mapper, m))

    @precondition(lambda self: self.maps)
    @rule(i=st.integers(0, 100))
    def unmap(self, i: int) -> None:
        i %= len(self.maps)
        self.maps[i][1].unmap()
        self._drop_mapping(i)

    @precondition(lambda self: self.orphans)
    @rule(i=st.integers(0, 100))
    def unmap_orphan(self, i: int) -> None:
        """A destroyed domain's thread cleans up late: no error, and no count changes."""
        self.orphans.pop(i % len(self.orphans)).unmap()

    @precondition(lambda self: self.maps)
    @rule(i=st.integers(0, 100), offset=st.integers(0, PAGE_SIZE - 1), value=st.integers(1, 255))
    def write_through_mapping(self, i: int, offset: int, value: int) -> None:
        _, m = self.maps[i % len(self.maps)]
        pos = (offset * 7) % len(m.buf)
        if m.readonly:
            with pytest.raises(TypeError):
                m.buf[pos] = value
        else:
            m.buf[pos] = value
            frame = m._frames[pos // PAGE_SIZE]
            assert self.host.phys[frame * PAGE_SIZE + pos % PAGE_SIZE] == value

    @precondition(lambda self: self.seen_grefs)
    @rule(
        i=st.integers(0, 100), who=st.sampled_from(DOMAINS), pick=st.sampled_from(("any", "live", "mapped"))
    )
    def revoke(self, i: int, who: int, pick: str) -> None:
        live = sorted(g for g, e in self.entries.items() if pick == "live" or e.maps)
        pool = live if pick != "any" and live else self.seen_grefs
        gref = pool[i % len(pool)]
        e = self.entries.get(gref)
        if pick != "any" and e is not None:
            who = e.owner
        if e is None or e.dead or e.owner != who:
            with pytest.raises(XenError):
                self.tables[who].revoke(gref)
            return
        ok = self.tables[who].revoke(gref)
        assert ok == (e.maps == 0)
        if ok:
            del self.entries[gref]

    @precondition(lambda self: self.seen_grefs)
    @rule(
        i=st.integers(0, 100),
        who=st.sampled_from(DOMAINS),
        peer=st.sampled_from(DOMAINS),
        to=st.booleans(),
        data=st.binary(min_size=1, max_size=8),
        honest=st.booleans(),
    )
    def copy(self, i: int, who: int, peer: int, to: bool, data: bytes, honest: bool) -> None:
        live = sorted(self.entries)
        pool = live if honest and live else self.seen_grefs
        gref = pool[i % len(pool)]
        pair = self._honest(gref) if honest else None
        if pair is not None:
            who, peer = pair
        err = self._map_error(who, peer, gref, to)
        table = self.tables[who]
        if err is not None:
            with pytest.raises(XenError, match=err):
                table.copy_to(peer, gref, 0, data) if to else table.copy_from(peer, gref, 0, len(data))
            return
        if to:
            table.copy_to(peer, gref, 0, data)
        expected = data if to else self._frame_bytes(gref, len(data))
        assert table.copy_from(peer, gref, 0, len(data)) == expected

    def _frame_bytes(self, gref: int, n: int) -> bytes:
        f = self.entries[gref].frame
        return self.host.phys[f * PAGE_SIZE : f * PAGE_SIZE + n].tobytes()

    @rule(d=st.sampled_from(DOMAINS), now=st.integers(0, 2))
    def destroy(self, d: int, now: int) -> None:
        if now:  # destroy one step in three, so domains live long enough to map and revoke
            return
        self.host.destroy_domain(d)
        for gref, e in list(self.entries.items()):
            if e.owner == d and not e.dead:
                if e.maps:
                    e.dead = True
                else:
                    del self.entries[gref]
        for i in reversed(range(len(self.maps))):
            if self.maps[i][0] == d:
                assert not self.maps[i][1].mapped
                self.orphans.append(self.maps[i][1])
                self._drop_mapping(i)
        for f, owner in list(self.used.items()):
            if owner == d:
                del self.used[f]
                if self._fmaps(f):
                    self.zombies.add(f)
        self.pages = [p for p in self.pages if p.domid != d]
        self.dead_tables.append(self.tables[d])
        self.tables[d] = self.host.table(d)

    @precondition(lambda self: self.dead_tables)
    @rule(i=st.integers(0, 100))
    def dead_table_refuses(self, i: int) -> None:
        with pytest.raises(XenError, match="destroyed"):
            self.dead_tables[i % len(self.dead_tables)].alloc_pages()

    # invariants
    @invariant()
    def accounting_matches_the_model(self) -> None:
        for d in DOMAINS:
            live = sorted(g for g, e in self.entries.items() if e.owner == d and not e.dead)
            assert self.host.grants_of(d) == live
            mapped = sorted(g for mapper, m in self.maps if mapper == d for g in m.grefs)
            assert self.host.mappings_of(d) == mapped
            assert self.host.frames_of(d) == sorted(f for f, o in self.used.items() if o == d)
        assert self.host.zombie_frames() == sorted(self.zombies)
        assert self.host.dead_grants() == sorted(g for g, e in self.entries.items() if e.dead)

    @invariant()
    def views_alias_their_frames(self) -> None:
        phys = self.host.phys
        for _, m in self.maps:
            for i, f in enumerate(m._frames):
                assert m.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == phys[f * PAGE_SIZE : (f + 1) * PAGE_SIZE]
        for p in self.pages:
            for i, f in enumerate(p.frames):
                assert p.page(i) == phys[f * PAGE_SIZE : (f + 1) * PAGE_SIZE]


TestGrantMachine = GrantMachine.TestCase
