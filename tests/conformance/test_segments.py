"""Read/write requests and segment rules (inventory §2.2), backend role.

The suite's frontend sends requests through its raw layer and checks each
answer. Statuses: OKAY 0, ERROR -1, EOPNOTSUPP -2 (OP-6).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from blkif_spec.consts import BlkifOp
from tests.conformance.conftest import ERROR, OKAY, RAW_ID, RUN_LAST_READ_ONLY_VBD, answer, expect

pytestmark = pytest.mark.role("backend")

READ, WRITE = int(BlkifOp.READ), int(BlkifOp.WRITE)


@pytest.mark.rule("SEG-1", "SEC-2")
def test_more_than_eleven_segments_is_refused(connected_backend, slots) -> None:
    env = connected_backend()
    gref = env.peer.raw_grant()[0]
    status = answer(env, slots.rw(READ, RAW_ID, 0, [(gref, 0, 7)] * 11, nr_segments=12))
    expect("SEG-1", ERROR, status, "READ with nr_segments=12")


@pytest.mark.rule("SEG-1", "SEG-6")
def test_exactly_eleven_segments_are_served(connected_backend, slots) -> None:
    """nr_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST is inside the limit: a WRITE and a READ of
    eleven full pages are served, each segment's page in its place (the bound is not off by one)."""
    env = connected_backend()
    pages = [bytes([0x30 + k]) * 4096 for k in range(11)]
    grefs = [env.peer.raw_grant(page)[0] for page in pages]
    status = answer(env, slots.rw(WRITE, RAW_ID, 8, [(g, 0, 7) for g in grefs]))
    expect("SEG-1", OKAY, status, "WRITE with nr_segments=11")
    expect("SEG-6", b"".join(pages), env.peer.read(8, 88).data, "88 sectors written by 11 segments")
    targets = [env.peer.raw_grant() for _ in range(11)]
    status = answer(env, slots.rw(READ, RAW_ID, 8, [(g, 0, 7) for g, _ in targets]))
    expect("SEG-1", OKAY, status, "READ with nr_segments=11")
    expect("SEG-6", b"".join(pages), b"".join(bytes(page) for _, page in targets), "11 pages read")


@pytest.mark.rule("SEG-3", "SEC-3")
def test_sector_bounds_within_the_frame(connected_backend, slots) -> None:
    """0 ≤ first_sect ≤ last_sect ≤ 7: anything else is ERROR; valid ranges read OKAY."""
    env = connected_backend()
    gref = env.peer.raw_grant()[0]

    @given(first=st.integers(0, 255), last=st.integers(0, 255))
    @example(first=0, last=8)  # one sector past the frame
    @example(first=7, last=6)
    def check(first: int, last: int) -> None:
        status = answer(env, slots.rw(READ, RAW_ID, 0, [(gref, first, last)]))
        valid = first <= last <= 7
        expect("SEG-3", OKAY if valid else ERROR, status, f"first_sect={first} last_sect={last}")

    check()


@pytest.mark.rule("SEG-7", "SEC-3")
def test_requests_outside_the_disk_fail(connected_backend, slots) -> None:
    """sector_number + sectors must stay inside the disk, with no 64-bit wrap."""
    env = connected_backend()
    gref = env.peer.raw_grant()[0]
    disk = int(env.backend_tree()["sectors"])  # the size the backend announced (XK-B34)

    @given(sector=st.one_of(st.integers(disk - 16, disk + 16), st.integers(2**63, 2**64 - 1)))
    @example(sector=disk - 7)  # ends one sector past the disk
    @example(sector=2**64 - 8)  # sector_number + 8 wraps to 0
    @example(sector=2**63)  # sector_number * 512 wraps to 0
    def check(sector: int) -> None:
        status = answer(env, slots.rw(READ, RAW_ID, sector, [(gref, 0, 7)]))
        inside = sector + 8 <= disk
        expect("SEG-7", OKAY if inside else ERROR, status, f"8-sector READ at sector {sector}")

    check()


@pytest.mark.rule("SEG-6", "SEG-4")
def test_segments_are_contiguous_on_disk(connected_backend) -> None:
    """Segment k starts where segment k-1 ended; units are 512-byte sectors whatever the layout."""
    env = connected_backend()

    @given(start=st.integers(0, 7), count=st.integers(1, 80), page=st.integers(0, 64))
    def check(start: int, count: int, page: int) -> None:
        payload = bytes((i * 37 + start + page) % 251 for i in range(count * 512))
        sector = page * 8 + start
        expect("SEG-6", OKAY, env.peer.write(sector, payload).status)
        expect("SEG-6", payload, env.peer.read(sector, count).data, f"{count} sectors at {sector}")
        expect("SEG-4", payload[:512], env.store.read(sector * 512, 512), "store byte offset sector*512")

    check()


@pytest.mark.rule("SEG-2", "DIV-5.a")
def test_zero_segment_read_write(connected_backend, slots, record_variant) -> None:
    """DIV-5: ERROR (Linux) or OKAY with no I/O (QEMU) both pass; the data must not change."""
    env = connected_backend()
    env.peer.write(0, b"k" * 512)
    for op in (READ, WRITE):
        status = answer(env, slots.rw(op, RAW_ID, 0, []))
        expect("DIV-5.a", {OKAY, ERROR}, status, f"0-segment {BlkifOp(op).name}")
        record_variant("DIV-5.a", "ERROR (Linux)" if status == ERROR else "OKAY, no I/O (QEMU)")
    expect("DIV-5.a", b"k" * 512, env.peer.read(0, 1).data, "data after 0-segment requests")


@pytest.mark.rule("SEG-8", "SEC-3.a", "DIV-5.b")
@RUN_LAST_READ_ONLY_VBD
def test_writes_to_a_read_only_disk_fail(connected_backend, slots) -> None:
    env = connected_backend(readonly=True)
    gref = env.peer.raw_grant(b"w" * 4096)[0]
    expect(
        "SEG-8", ERROR, answer(env, slots.rw(WRITE, RAW_ID, 0, [(gref, 0, 7)])), "WRITE on a read-only disk"
    )
    expect("DIV-5.b", ERROR, answer(env, slots.rw(WRITE, RAW_ID, 0, [])), "0-segment WRITE, read-only")
    expect("SEG-8", bytes(512), env.store.read(0, 512), "disk content after refused writes")
    expect("SEG-8", OKAY, env.peer.read(0, 8).status, "READ on a read-only disk")


@pytest.mark.rule("SEG-9", "SEC-6")
def test_read_into_a_read_only_grant_fails(connected_backend, slots) -> None:
    """For READ the backend must write the frame; a read-only grant makes the request fail, nothing else."""
    env = connected_backend()
    gref = env.peer.raw_grant(readonly=True)[0]
    expect("SEG-9", ERROR, answer(env, slots.rw(READ, RAW_ID, 0, [(gref, 0, 7)])))
    expect("SEC-6", OKAY, env.peer.read(0, 8).status, "the ring is still served")


@pytest.mark.rule("SEC-6")
def test_bad_and_revoked_grants_fail_the_request_only(connected_backend, slots) -> None:
    env = connected_backend()
    revoked = env.peer.raw_grant()[0]
    env.peer.raw_revoke(revoked)
    for gref, what in ((0x7FFF_FFF0, "never granted"), (revoked, "revoked")):
        expect("SEC-6", ERROR, answer(env, slots.rw(WRITE, RAW_ID, 0, [(gref, 0, 7)])), f"{what} gref")
    expect("SEC-6", OKAY, env.peer.read(0, 8).status, "the ring is still served")
