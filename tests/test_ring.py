"""Property tests of `blkif_spec.ring`: sizes, free-running indices, FIFO, notify, final check, overflow.

Every ring-level property runs over the three buffer kinds a ring sees in
practice: a `bytearray` (simulation), an anonymous `mmap` (the benchmark's
shared memory) and a `memoryview` (a caller's view of someone else's memory).
"""

from __future__ import annotations

import mmap
import re
import struct
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec.errors import RuleViolation
from blkif_spec.ring import (
    ENTRY_SIZE_X86_32,
    ENTRY_SIZE_X86_64,
    REQ_EVENT,
    REQ_PROD,
    RSP_EVENT,
    RSP_PROD,
    BackRing,
    FrontRing,
    SharedRing,
    free_requests,
    idx_add,
    idx_sub,
    need_notify,
    nr_unconsumed_requests,
    request_cons_overflow,
    request_prod_overflow,
    response_prod_overflow,
    ring_bytes,
    ring_size,
    round_down_pow2,
)

M = 2**32
KINDS = ("bytearray", "mmap", "memoryview")
ENTRY_SIZES = (ENTRY_SIZE_X86_64, ENTRY_SIZE_X86_32)

u32 = st.integers(0, M - 1)
near_wrap = st.integers(M - 600, M - 1)  # free-running indices that cross 2^32 within a test
starts = st.one_of(near_wrap, st.just(0), u32)
orders = st.integers(0, 4)
small_orders = st.integers(0, 1)  # exchange tests: keep batches relative to RING_SIZE interesting
entry_sizes = st.sampled_from(ENTRY_SIZES)


@contextmanager
def ring_over(kind: str, order: int = 0, entry_size: int = ENTRY_SIZE_X86_64) -> Iterator[SharedRing]:
    """A SharedRing over a fresh buffer of `kind`, released (and the mmap closed) afterwards."""
    n = ring_bytes(order)
    owner: mmap.mmap | None = None
    if kind == "bytearray":
        buf: object = bytearray(n)
    elif kind == "mmap":
        owner = mmap.mmap(-1, n)
        buf = owner
    elif kind == "memoryview":
        buf = memoryview(bytearray(n + 128))[64 : 64 + n]  # a window into a larger block
    else:  # pragma: no cover
        raise AssertionError(kind)
    shared = SharedRing(buf, order, entry_size)
    try:
        yield shared
    finally:
        shared.release()
        if owner is not None:
            owner.close()  # BufferError here would mean release() left a view behind


def payload(n: int) -> bytes:
    return n.to_bytes(8, "little")


def ident(slot: bytes) -> int:
    return int.from_bytes(slot[:8], "little")


def ref_notify(old: int, new: int, event: int) -> bool:
    """RING-6 in words: notify iff the event index lies in (old, new], going forward from old."""
    return 0 < (event - old) % M <= (new - old) % M


# --------------------------------------------------------------------------------------
# Ring sizes (WIRE-9, WIRE-10, MPR-4)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry_size", ENTRY_SIZES)
@pytest.mark.parametrize(("order", "expected"), [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)])
def test_ring_size_matches_inventory_table(order: int, entry_size: int, expected: int) -> None:
    assert ring_size(order, entry_size) == expected == 32 << order
    assert ring_bytes(order) == 4096 << order


@given(order=orders, entry_size=st.integers(1, 4032))
def test_ring_size_is_largest_power_of_two_that_fits(order: int, entry_size: int) -> None:
    size = ring_size(order, entry_size)
    fit = ((4096 << order) - 64) // entry_size  # whole slots after the 64-byte header
    assert size & (size - 1) == 0
    assert size <= fit < 2 * size


@given(st.integers(1, 2**40))
def test_round_down_pow2(n: int) -> None:
    p = round_down_pow2(n)
    assert p & (p - 1) == 0 and p <= n < 2 * p


@pytest.mark.parametrize("order", [-1, 5, 6, 100, True, 1.0, "0"])
def test_bad_order_is_value_error_naming_it(order: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"order {order!r}")):
        ring_size(order, ENTRY_SIZE_X86_64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(f"order {order!r}")):
        SharedRing(bytearray(4096 << 4), order)  # type: ignore[arg-type]


@pytest.mark.parametrize("entry_size", [0, -1, -112, 4033])
def test_bad_entry_size_is_value_error_naming_it(entry_size: int) -> None:
    with pytest.raises(ValueError, match=rf"entry size {entry_size}\b"):
        ring_size(0, entry_size)


@pytest.mark.parametrize("kind", KINDS)
@given(order=orders, short=st.integers(1, 4095))
def test_short_buffer_is_value_error_naming_sizes(kind: str, order: int, short: int) -> None:
    n = (4096 << order) - short
    raw = mmap.mmap(-1, n) if kind == "mmap" else bytearray(n)
    buf = memoryview(raw) if kind == "memoryview" else raw
    try:
        with pytest.raises(ValueError, match=rf"{n} bytes .* {4096 << order} bytes .*order {order}"):
            SharedRing(buf, order)
    finally:
        if isinstance(buf, memoryview):
            buf.release()
        if isinstance(raw, mmap.mmap):
            raw.close()  # no view may survive a refused construction


def test_read_only_buffer_is_refused() -> None:
    with pytest.raises(TypeError, match="writable"):
        SharedRing(bytes(4096))


def test_larger_buffer_is_accepted() -> None:
    shared = SharedRing(bytearray(3 * 4096), 1)
    assert shared.size == 64
    shared.release()


# --------------------------------------------------------------------------------------
# Header layout and initialisation (WIRE-8, RING-11, conventions §3)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@given(start=starts, order=orders)
def test_init_writes_the_wire_8_header_and_nothing_else(kind: str, start: int, order: int) -> None:
    with ring_over(kind, order) as shared:
        shared._buf[:] = b"\xa5" * shared._buf.nbytes
        FrontRing(shared).init(start)
        head = shared._buf[:64].tobytes()
        assert struct.unpack_from("<4I", head) == (start, (start + 1) % M, start, (start + 1) % M)
        assert head[16:] == bytes(48) == shared.header_padding()
        assert shared._buf[64:].tobytes() == b"\xa5" * (shared._buf.nbytes - 64)  # slots untouched


@pytest.mark.parametrize("kind", KINDS)
def test_index_words_are_one_native_uint32_view(kind: str) -> None:
    with ring_over(kind) as shared:
        assert shared.words.format == "I" and shared.words.itemsize == 4 and len(shared.words) == 4
        shared.req_prod, shared.req_event, shared.rsp_prod, shared.rsp_event = 1, 2**32 - 1, 3, 2**32 + 4
        assert struct.unpack_from("<4I", shared._buf) == (1, 2**32 - 1, 3, 4)
        assert [shared.words[i] for i in (REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT)] == [1, 2**32 - 1, 3, 4]


def test_backend_attach_never_writes_the_page() -> None:
    with ring_over("bytearray", 1) as shared:
        front = FrontRing(shared)
        front.init(M - 3)
        for i in range(5):
            front.put_request(payload(i))
        front.push_requests()
        before = shared._buf.tobytes()
        back = BackRing(shared)
        back.attach()  # RING-12: Linux attaches at the shared rsp_prod
        assert (back.req_cons, back.rsp_prod_pvt) == (M - 3, M - 3)
        back.attach(M - 3)
        assert shared._buf.tobytes() == before  # RING-11
        assert back.poll_requests() == 5


# --------------------------------------------------------------------------------------
# Slots (WIRE-9, RING-1, RING-10)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@given(order=orders, entry_size=entry_sizes, idx=u32, data=st.binary(min_size=0, max_size=112))
def test_slot_offset_write_read(kind: str, order: int, entry_size: int, idx: int, data: bytes) -> None:
    data = data[:entry_size]
    with ring_over(kind, order, entry_size) as shared:
        size = shared.size
        off = shared.slot_offset(idx)
        assert off == 64 + (idx % size) * entry_size
        assert off + entry_size <= 4096 << order
        assert shared.slot_offset(idx_add(idx, size)) == off  # the same slot one lap later
        shared._buf[off : off + entry_size] = b"\xee" * entry_size
        shared.write_slot(idx, data)
        copy = shared.read_slot(idx_add(idx, size))
        assert type(copy) is bytes and len(copy) == entry_size
        assert copy == data + b"\xee" * (entry_size - len(data))  # a short write leaves the tail
        shared.write_slot(idx, b"\x00" * entry_size)
        assert copy[: len(data)] == data  # the copy is private (RING-10)


def test_write_slot_rejects_oversized_data() -> None:
    with ring_over("bytearray", 0, ENTRY_SIZE_X86_32) as shared, pytest.raises(ValueError, match="112 bytes"):
        shared.write_slot(0, bytes(112))


# --------------------------------------------------------------------------------------
# Pure arithmetic against reference formulas (RING-1, RING-3, RING-6, RING-8, RING-9)
# --------------------------------------------------------------------------------------


@given(a=u32, b=u32, n=st.integers(0, 2**33))
def test_idx_arithmetic_is_modulo_2_32(a: int, b: int, n: int) -> None:
    assert idx_add(a, n) == (a + n) % M
    assert idx_sub(a, b) == (a - b) % M
    assert idx_add(b, idx_sub(a, b)) == a


@given(old=u32, delta=st.integers(0, 2000), event_off=st.integers(-2000, 2000) | u32)
def test_need_notify_equals_event_in_half_open_interval(old: int, delta: int, event_off: int) -> None:
    new = (old + delta) % M
    event = (old + event_off) % M
    assert need_notify(old, new, event) == ref_notify(old, new, event)


@given(size=st.sampled_from([32, 64, 128, 256, 512]), base=starts, d=st.integers(-3, 1100))
def test_pure_predicates_at_their_boundaries(size: int, base: int, d: int) -> None:
    other = (base + d) % M
    assert request_cons_overflow(size, other, base) == (d >= size or d < 0)
    assert request_prod_overflow(size, other, base) == (d > size or d < 0)
    assert response_prod_overflow(size, other, base) == (d > size or d < 0)
    if 0 <= d <= size:
        assert free_requests(size, other, base) == size - d
        assert nr_unconsumed_requests(size, other, base, base) == d


# --------------------------------------------------------------------------------------
# A front/back pair exchanging batches (RING-2 .. RING-7)
# --------------------------------------------------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["submit", "consume", "respond", "collect", "back_sleep", "front_sleep"]),
        st.integers(1, 40),
    ),
    max_size=40,
)


@pytest.mark.parametrize("kind", KINDS)
@given(start=near_wrap, order=small_orders, entry_size=entry_sizes, script=ops)
def test_exchange_model(kind: str, start: int, order: int, entry_size: int, script: list) -> None:
    """Random batches: never more than RING_SIZE outstanding, FIFO slots, RING-6 decisions, no lost wake-up.

    Model: `published` ids the backend has not consumed, `inflight` ids it has
    consumed and not answered, `answered` ids published as responses. Each end
    is asleep after a final check that found nothing (both start asleep: the
    initial event words are start + 1, WIRE-8) and wakes only on a notify; a
    sleeping end does not consume, and an asleep end with work to do is a lost
    wake-up (RING-7).
    """
    with ring_over(kind, order, entry_size) as shared:
        size = shared.size
        front, back = FrontRing(shared), BackRing(shared)
        front.init(start)
        back.attach()
        published: deque[int] = deque()
        inflight: deque[int] = deque()
        answered: deque[int] = deque()
        next_id = 0
        back_asleep = front_asleep = True
        for op, k in script:
            if op == "submit":
                n = min(k, front.free_requests())
                for _ in range(n):
                    front.put_request(payload(next_id))
                    published.append(next_id)
                    next_id += 1
                old, event = shared.req_prod, shared.req_event
                notify = front.push_requests()
                assert notify == ref_notify(old, front.req_prod_pvt, event)
                assert shared.req_prod == front.req_prod_pvt
                back_asleep = back_asleep and not notify
            elif op == "consume" and not back_asleep:
                n = back.poll_requests()
                assert n == len(published)
                for _ in range(min(k, n)):
                    rid = ident(back.get_request())
                    assert rid == published.popleft()  # FIFO
                    inflight.append(rid)
            elif op == "respond":
                for _ in range(min(k, len(inflight))):
                    back.put_response(payload(inflight[0]) + b"rsp")
                    answered.append(inflight.popleft())
                old, event = shared.rsp_prod, shared.rsp_event
                notify = back.push_responses()
                assert notify == ref_notify(old, back.rsp_prod_pvt, event)
                front_asleep = front_asleep and not notify
            elif op == "collect" and not front_asleep:
                n = front.unconsumed_responses()
                assert n == len(answered)
                for _ in range(min(k, n)):
                    rsp = front.get_response()
                    assert ident(rsp) == answered.popleft() and rsp[8:11] == b"rsp"
            elif op == "back_sleep" and not back_asleep:
                back_asleep = not back.final_check_for_requests()
                assert back_asleep == (not published)
                if back_asleep:
                    assert shared.req_event == idx_add(back.req_cons, 1)
            elif op == "front_sleep" and not front_asleep:
                front_asleep = not front.final_check_for_responses()
                assert front_asleep == (not answered)
                if front_asleep:
                    assert shared.rsp_event == idx_add(front.rsp_cons, 1)

            outstanding = len(published) + len(inflight) + len(answered)
            assert idx_sub(front.req_prod_pvt, front.rsp_cons) == outstanding <= size  # RING-3
            assert front.free_requests() == size - outstanding
            assert front.full() == (outstanding == size)
            assert idx_sub(back.req_cons, back.rsp_prod_pvt) == len(inflight) <= size  # RING-8
            assert not (back_asleep and published), "lost wake-up: backend asleep with requests"
            assert not (front_asleep and answered), "lost wake-up: frontend asleep with responses"
            assert front.req_prod_pvt == idx_add(start, next_id)


@pytest.mark.parametrize("kind", KINDS)
@given(start=starts, order=orders)
def test_put_refuses_overrun(kind: str, start: int, order: int) -> None:
    with ring_over(kind, order) as shared:
        front, back = FrontRing(shared), BackRing(shared)
        front.init(start)
        back.attach()
        with pytest.raises(OverflowError, match="RING-3"):
            back.put_response(b"x")
        for i in range(shared.size):
            front.put_request(payload(i))
        assert front.full() and front.free_requests() == 0
        with pytest.raises(OverflowError, match="RING-3"):
            front.put_request(b"x")
        assert front.req_prod_pvt == idx_add(start, shared.size)


# --------------------------------------------------------------------------------------
# Final check never loses a wake-up (RING-6, RING-7)
# --------------------------------------------------------------------------------------


class _BackInterleaved(BackRing):
    """Runs `hook` once, right after the final check's first look at the ring (between check and store)."""

    __slots__ = ("hook",)

    def unconsumed_requests(self) -> int:
        n = super().unconsumed_requests()
        hook, self.hook = self.hook, None
        if hook:
            hook()
        return n


class _FrontInterleaved(FrontRing):
    __slots__ = ("hook",)

    def unconsumed_responses(self) -> int:
        n = super().unconsumed_responses()
        hook, self.hook = self.hook, None
        if hook:
            hook()
        return n


@pytest.mark.parametrize("kind", KINDS)
@given(
    start=near_wrap,
    consumed=st.integers(0, 31),
    batch=st.integers(1, 31),
    stale=st.integers(-40, 40),
    when=st.sampled_from(["before", "during", "after"]),
)
def test_final_check_for_requests_never_loses_a_wakeup(
    kind: str, start: int, consumed: int, batch: int, stale: int, when: str
) -> None:
    """Whatever `req_event` held and wherever the push lands in the backend's final check,
    the push notifies or the final check reports work."""
    with ring_over(kind) as shared:
        front, back = FrontRing(shared), _BackInterleaved(shared)
        back.hook = None
        front.init(start)
        back.attach()
        for i in range(consumed):
            front.put_request(payload(i))
        front.push_requests()
        for _ in range(back.poll_requests()):
            back.get_request()
            back.put_response(b"r")
        back.push_responses()
        for _ in range(front.unconsumed_responses()):
            front.get_response()
        shared.req_event = back.req_cons + stale  # whatever an earlier final check or batching left
        decided: list[bool] = []

        def push() -> None:
            for i in range(batch):
                front.put_request(payload(i))
            decided.append(front.push_requests())

        if when == "before":
            push()
        elif when == "during":
            back.hook = push
        work = back.final_check_for_requests()
        if when == "after":
            push()
            assert decided == [True]  # the backend armed req_event = req_cons + 1, so it must be woken
        assert decided[0] or work


@pytest.mark.parametrize("kind", KINDS)
@given(
    start=near_wrap,
    batch=st.integers(1, 31),
    stale=st.integers(-40, 40),
    when=st.sampled_from(["before", "during", "after"]),
)
def test_final_check_for_responses_never_loses_a_wakeup(
    kind: str, start: int, batch: int, stale: int, when: str
) -> None:
    with ring_over(kind) as shared:
        front, back = _FrontInterleaved(shared), BackRing(shared)
        front.hook = None
        front.init(start)
        back.attach()
        for i in range(batch):
            front.put_request(payload(i))
        front.push_requests()
        for _ in range(back.poll_requests()):
            back.get_request()
        shared.rsp_event = front.rsp_cons + stale
        decided: list[bool] = []

        def push() -> None:
            for i in range(batch):
                back.put_response(payload(i))
            decided.append(back.push_responses())

        if when == "before":
            push()
        elif when == "during":
            front.hook = push
        work = front.final_check_for_responses()
        if when == "after":
            push()
            assert decided == [True]
        assert decided[0] or work


# --------------------------------------------------------------------------------------
# Overflow detection exactly at the boundary (RING-8, RING-9)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@given(start=starts, order=orders)
def test_ring_8_request_cons_overflow_boundary(kind: str, start: int, order: int) -> None:
    with ring_over(kind, order) as shared:
        size = shared.size
        front, back = FrontRing(shared), BackRing(shared)
        front.init(start)
        back.attach()
        for _ in range(size + 1):  # the raw layer over-produces by one
            shared.write_slot(front.next_request_slot(), b"q")
        front.push_requests()
        assert back.unconsumed_requests() == size  # the min() caps what may be consumed
        assert not back.request_cons_overflow(idx_add(start, size - 1))
        assert back.request_cons_overflow(idx_add(start, size))
        for _ in range(size):  # RING_SIZE requests unanswered: allowed
            back.get_request()
        assert back.unconsumed_requests() == 0
        with pytest.raises(RuleViolation) as info:  # the RING_SIZE+1-th: refused
            back.get_request()
        assert info.value.rule_id == "RING-8"
        assert back.req_cons == idx_add(start, size)
        back.put_response(b"r")  # one answer frees one slot
        assert back.unconsumed_requests() == 1
        back.get_request()


@pytest.mark.parametrize("kind", KINDS)
@given(start=starts, order=orders, answered=st.integers(0, 40))
def test_ring_9_request_prod_overflow_boundary(kind: str, start: int, order: int, answered: int) -> None:
    with ring_over(kind, order) as shared:
        size = shared.size
        answered = min(answered, size)
        front, back = FrontRing(shared), BackRing(shared)
        front.init(start)
        back.attach()
        for _ in range(answered):
            front.next_request_slot()
        front.push_requests()
        for _ in range(back.poll_requests()):
            back.get_request()
            back.next_response_slot()
        base = back.rsp_prod_pvt
        shared.req_prod = base + size
        assert not back.request_prod_overflow(shared.req_prod)
        assert back.poll_requests() == size
        shared.req_prod = base + size + 1
        assert back.request_prod_overflow(shared.req_prod)
        assert back.unconsumed_requests() == size  # the C macro only caps
        with pytest.raises(RuleViolation) as info:
            back.poll_requests()
        assert info.value.rule_id == "RING-9"
        fresh = BackRing(shared)
        with pytest.raises(RuleViolation) as info:  # Linux refuses such a ring at attach (RING-12)
            fresh.attach(base)
        assert info.value.rule_id == "RING-9"
        shared.req_prod = base + size
        fresh.attach(base)


@pytest.mark.parametrize("kind", KINDS)
@given(start=starts, order=orders)
def test_ring_9_response_prod_overflow_boundary(kind: str, start: int, order: int) -> None:
    with ring_over(kind, order) as shared:
        size = shared.size
        front = FrontRing(shared)
        front.init(start)
        shared.rsp_prod = start + size
        assert not front.response_prod_overflow(shared.rsp_prod)
        assert front.unconsumed_responses() == size
        assert front.final_check_for_responses() is True
        shared.rsp_prod = start + size + 1
        assert front.response_prod_overflow(shared.rsp_prod)
        for call in (front.unconsumed_responses, front.final_check_for_responses):
            with pytest.raises(RuleViolation) as info:
                call()
            assert info.value.rule_id == "RING-9"


# --------------------------------------------------------------------------------------
# Lifetime over shared memory
# --------------------------------------------------------------------------------------


def test_release_lets_mmap_and_shared_memory_close() -> None:
    m = mmap.mmap(-1, 4096)
    with SharedRing(m) as shared:
        FrontRing(shared).init()
        with pytest.raises(BufferError):
            m.close()  # the ring still views it
    m.close()
    with pytest.raises(ValueError, match="released"):
        shared.read_slot(0)
    shared.release()  # idempotent
    assert "released" in repr(shared)

    shm = shared_memory.SharedMemory(create=True, size=4096 << 1)
    try:
        ring = SharedRing(shm.buf, 1)
        FrontRing(ring).init(7)
        assert struct.unpack_from("<I", shm.buf, 8)[0] == 7
        ring.release()
    finally:
        shm.close()
        shm.unlink()
