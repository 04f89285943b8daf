"""Flush and barrier (inventory §2.5, conventions §5 FL-1/DIV-6/DIV-7), backend role.

The suite's frontend puts writes and a BARRIER or FLUSH on one ring in a single
push and watches the backend's disk (`env.store`): every write issued before a
BARRIER is on disk when the barrier's answer arrives (FL-1.a, must); a write
issued after it does not overtake it (FL-1.b, should: Linux blkback does not hold
later writes back, and ordering is per ring, FL-3); a FLUSH makes completed
writes durable (FL-2). Segments on a FLUSH/BARRIER are a recorded variant
(DIV-6.a); on a read-only disk a data-carrying one is refused (SEC-3.a) and a
0-segment one may succeed or be refused (SEC-3.b, DIV-7). EOPNOTSUPP may answer
BARRIER or FLUSH at any time (OP-3), so it is accepted and recorded where the
inventory does not say otherwise.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import consts
from blkif_spec.consts import BlkifOp
from blkif_spec.harness import BackendUnderTest, TargetTimeout
from blkif_spec.model import pattern
from tests.conformance.conftest import (
    EOPNOTSUPP,
    ERROR,
    OKAY,
    RAW_ID,
    RUN_LAST_READ_ONLY_VBD,
    backend_faults,
    expect,
    reply,
    require,
    status_name,
)

READ, WRITE = int(BlkifOp.READ), int(BlkifOp.WRITE)
BARRIER, FLUSH = int(BlkifOp.WRITE_BARRIER), int(BlkifOp.FLUSH_DISKCACHE)
KEYS = {BARRIER: ("feature-barrier", "barrier"), FLUSH: ("feature-flush-cache", "flush")}
SECTOR = consts.SECTOR_SIZE

#: Non-overlapping extents: slot k of 32 sectors, an offset and a length inside it.
extents = st.lists(st.tuples(st.integers(0, 255), st.integers(0, 15), st.integers(1, 16)),
                   min_size=1, max_size=8, unique_by=lambda e: e[0])  # fmt: skip


def until_answered(env: BackendUnderTest, pending) -> None:
    """Poll the suite's frontend until `pending` is answered (bounded), and no longer."""
    fe = env.peer
    fe.push()
    deadline = time.monotonic() + env.timeout
    while pending.done is None:
        fe.poll()
        if fe.disabled:
            raise fe.violations[-1]
        if pending.done is not None:
            break
        if time.monotonic() > deadline:
            raise TargetTimeout(f"no answer to operation {pending.operation} within {env.timeout:g} s")
        fe.evtchn.wait(0.005)


def on_disk(env: BackendUnderTest, sector: int, length: int) -> bytes:
    return env.store.read(sector * SECTOR, length)


@pytest.mark.role("backend")
@pytest.mark.rule("FL-1.a", "FL-3")
def test_barrier_executes_after_earlier_writes(connected_backend, record_variant) -> None:
    """Writes, then a BARRIER, on one ring in one push: when the barrier's answer arrives,
    every earlier write is on the backend's disk."""
    env = connected_backend()
    require(env, "barrier")
    fe = env.peer
    seen: set[int] = set()

    @given(writes=extents, queue=st.integers(0, fe.queues - 1), seed=st.integers(0, 2**16))
    def check(writes: list[tuple[int, int, int]], queue: int, seed: int) -> None:
        issued, pending = [], []
        for slot, offset, count in writes:
            sector = slot * 32 + offset
            data = pattern(seed, sector, count)
            pending.append(fe.submit_rw(WRITE, sector, data, queue=queue))
            issued.append((sector, data))
        barrier = fe.submit_simple(BARRIER, queue=queue)
        until_answered(env, barrier)
        status = barrier.done.status
        expect("FL-1.a", {OKAY, EOPNOTSUPP}, status, f"BARRIER after {len(issued)} writes on queue {queue}")
        seen.add(status)
        if status == OKAY:
            for sector, data in issued:
                what = f"{len(data) // SECTOR} sectors at {sector}, issued before the barrier, at its answer"
                expect("FL-1.a", data, on_disk(env, sector, len(data)), what)
        with backend_faults(env):
            done = fe.wait(pending)
        expect("FL-1.a", [OKAY] * len(done), [d.status for d in done], "the writes before the barrier")

    check()
    record_variant(
        "FL-3", "BARRIER after writes on its ring: " + "/".join(status_name(s) for s in sorted(seen))
    )


@pytest.mark.role("backend")
@pytest.mark.rule("FL-1.b")
def test_barrier_holds_back_later_writes(connected_backend) -> None:
    """X, BARRIER, Y to the same sectors on one ring in one push: Y is what stays."""
    env = connected_backend()
    require(env, "barrier")
    fe = env.peer

    @given(sector=st.integers(0, 8000), count=st.integers(1, 24), queue=st.integers(0, fe.queues - 1))
    def check(sector: int, count: int, queue: int) -> None:
        x, y = pattern(1, sector, count), pattern(2, sector, count)
        first = fe.submit_rw(WRITE, sector, x, queue=queue)
        barrier = fe.submit_simple(BARRIER, queue=queue)
        later = fe.submit_rw(WRITE, sector, y, queue=queue)
        with backend_faults(env):
            done = fe.wait([first, barrier, later])
        expect("FL-1.b", OKAY, done[0].status, "the write before the barrier")
        expect("FL-1.b", OKAY, done[2].status, "the write after the barrier")
        if done[1].status == OKAY:  # EOPNOTSUPP: no barrier was executed, either order may stay
            with backend_faults(env):
                got = fe.read(sector, count, queue=queue).data
            expect("FL-1.b", y, got, f"{count} sectors at {sector}: X, BARRIER, Y; X came last")

    check()


@pytest.mark.role("backend")
@pytest.mark.rule("FL-2", "DIV-6.b")
def test_flush_makes_completed_writes_durable(connected_backend) -> None:
    """Completed writes, then a 0-segment FLUSH: OKAY, and the writes are on the disk."""
    env = connected_backend()
    require(env, "flush")
    fe = env.peer

    @given(writes=extents, seed=st.integers(0, 2**16))
    def check(writes: list[tuple[int, int, int]], seed: int) -> None:
        issued = []
        with backend_faults(env):
            for slot, offset, count in writes:
                sector = slot * 32 + offset
                data = pattern(seed, sector, count)
                expect("FL-2", OKAY, fe.write(sector, data).status, f"write at {sector}")
                issued.append((sector, data))
            status = fe.flush().status
        expect("DIV-6.b", OKAY, status, "0-segment FLUSH, feature-flush-cache=1")
        for sector, data in issued:
            expect(
                "FL-2",
                data,
                on_disk(env, sector, len(data)),
                f"{len(data) // SECTOR} sectors at {sector} after FLUSH",
            )

    check()


@pytest.mark.role("backend")
@pytest.mark.rule("DIV-6.a")
@pytest.mark.parametrize("op", [FLUSH, BARRIER], ids=["flush", "barrier"])
def test_flush_or_barrier_carrying_segments(connected_backend, slots, record_variant, op: int) -> None:
    """Flush then write the data (Linux; QEMU for FLUSH), or refuse a BARRIER with ERROR (QEMU)."""
    env = connected_backend()
    require(env, KEYS[op][1])
    data = pattern(op, 1000, 12)
    one = env.peer.raw_grant(data[: 8 * SECTOR])[0]
    two = env.peer.raw_grant(data[8 * SECTOR :])[0]
    echoed, status = reply(env, slots.rw(op, RAW_ID, 1000, [(one, 0, 7), (two, 0, 3)]))
    expect("DIV-6.a", op, echoed, f"{BlkifOp(op).name} with 2 segments: operation echoed")
    with backend_faults(env):
        got = env.peer.read(1000, 12).data
    if status == OKAY:
        expect("DIV-6.a", data, got, f"{BlkifOp(op).name} with 2 segments answered OKAY: the data on disk")
        record_variant("DIV-6.a", f"{BlkifOp(op).name} with segments: flush, then write (OKAY)")
        return
    refusals = {ERROR, EOPNOTSUPP} if op == BARRIER else {EOPNOTSUPP}  # OP-3: EOPNOTSUPP at any time
    expect("DIV-6.a", refusals, status, f"{BlkifOp(op).name} with 2 segments: OKAY with the data written, "
           + ("or refused" if op == BARRIER else "or EOPNOTSUPP"))  # fmt: skip
    expect(
        "DIV-6.a",
        bytes(len(data)),
        got,
        f"{BlkifOp(op).name} refused with {status_name(status)}: nothing written",
    )
    record_variant("DIV-6.a", f"{BlkifOp(op).name} with segments: refused with {status_name(status)}")


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-3.a", "SEC-3.b", "DIV-7")
@pytest.mark.parametrize("op", [FLUSH, BARRIER], ids=["flush", "barrier"])
@RUN_LAST_READ_ONLY_VBD
def test_flush_and_barrier_on_a_read_only_disk(connected_backend, slots, record_variant, op: int) -> None:
    """0 segments: OKAY (QEMU FLUSH) or ERROR (Linux), EOPNOTSUPP when not offered (FL-4);
    with a data segment: refused, nothing written (SEC-3.a, must)."""
    env = connected_backend(readonly=True)
    key, _feature = KEYS[op]
    offer = env.backend_tree().get(key, "absent")
    name = BlkifOp(op).name
    echoed, status = reply(env, slots.rw(op, RAW_ID, 0, []))
    expect("SEC-3.b", op, echoed, f"0-segment {name} on a read-only disk: operation echoed")
    expect(
        "SEC-3.b", {OKAY, ERROR, EOPNOTSUPP}, status, f"0-segment {name} on a read-only disk ({key} {offer})"
    )
    record_variant("SEC-3.b", f"0-segment {name} on a read-only disk: {status_name(status)}")
    record_variant("DIV-7", f"0-segment {name}, {key} {offer}: {status_name(status)}")
    data = pattern(op, 64, 8)
    gref = env.peer.raw_grant(data)[0]
    echoed, status = reply(env, slots.rw(op, RAW_ID, 64, [(gref, 0, 7)]))
    expect(
        "SEC-3.a", {(op, ERROR), (op, EOPNOTSUPP)}, (echoed, status), f"{name} carrying data, read-only disk"
    )
    with backend_faults(env):
        got = env.peer.read(64, 8)
    expect(
        "SEC-3.a", {(OKAY, True)}, (got.status, got.data == bytes(len(data))), "nothing written, reads served"
    )
