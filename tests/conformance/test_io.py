"""I/O against the sector model (conventions §10), both roles, and across ABIs (WIRE-2).

Two hypothesis state machines, one per role, judge I/O with the trusted oracle
`blkif_spec.model.SectorModel`: a read returns what was written; a discarded
range reads back as the old data or zeros until written again; writes in flight
at once never overlap (their order would be undefined). Each run creates its own
environment in `initialize` and closes it in `teardown`.

* `BackendIO`: the suite's frontend (its shape drawn per run: queues, ring order,
  persistent grants, indirect limit, ABI) drives the backend under test: single
  requests, batches spread over every queue and in flight together, FLUSH (then
  every completed write is on the disk, FL-2), BARRIER after writes on one ring
  (they are on the disk when its answer arrives, FL-1.a), DISCARD (DISC-1).
* `FrontendIO`: the frontend under test's block API against the suite's backend
  (its offers drawn per run, some answering EOPNOTSUPP, OP-3); the disk is
  `env.store`, and the suite's backend records every request it should not have
  received (IND-1, DISC-2, SEG-*; OP-2, a SHOULD, is judged by test_operations.py).

A run costs an environment (~0.3 s), so the machines run a tenth of the
profile's examples, each with the profile's step count, and do not shrink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from blkif_spec import codec, consts
from blkif_spec.consts import BlkifOp, XenbusState
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.factory import SlotFactory
from blkif_spec.harness import BackendUnderTest, FrontendUnderTest, TargetTimeout
from blkif_spec.model import SectorModel, pattern
from blkif_spec.xen.api import XenTimeout
from tests.conformance.conftest import BLKFRONT_OP_REFUSED, EOPNOTSUPP, OKAY, backend_faults, expect, reply
from tests.strategies.pair import backend_configs

READ, WRITE = int(BlkifOp.READ), int(BlkifOp.WRITE)
BARRIER, FLUSH, DISCARD = int(BlkifOp.WRITE_BARRIER), int(BlkifOp.FLUSH_DISKCACHE), int(BlkifOp.DISCARD)
SECTOR = consts.SECTOR_SIZE
DISK_SECTORS = 2048  # 1 MiB: small, so extents collide often
SLOT = 64  # batches take disjoint 64-sector slots


def machine_settings() -> settings:
    """The profile's settings with a tenth of its examples and no shrinking: every example and
    every shrink attempt costs an environment (shrinking a failing run took minutes), and the
    focused modules reproduce each rule with minimal input. The failing program is printed
    (with `note`s) as it ran."""
    profile = settings()
    return settings(max_examples=max(2, profile.max_examples // 10),
                    phases=[p for p in profile.phases if p != Phase.shrink])  # fmt: skip


#: (sector, count) inside the disk, up to 200 sectors: one to 26 pages, so indirect too.
extents = st.tuples(st.integers(0, DISK_SECTORS - 1), st.integers(1, 200)).map(
    lambda e: (e[0], min(e[1], DISK_SECTORS - e[0]))
)


def batch(n_min: int, n_max: int) -> st.SearchStrategy[list[tuple[int, int, bool]]]:
    """Disjoint (sector, count, is_write) extents, one per 64-sector slot."""
    item = st.tuples(st.integers(0, SLOT // 2), st.integers(1, SLOT // 2), st.booleans())
    return st.lists(st.tuples(st.integers(0, DISK_SECTORS // SLOT - 1), item), min_size=n_min, max_size=n_max,
                    unique_by=lambda e: e[0]).map(
        lambda es: [(slot * SLOT + off, count, w) for slot, (off, count, w) in es])  # fmt: skip


# -- backend role ------------------------------------------------------------------------------


frontend_shapes = st.fixed_dictionaries({
    "max_queues": st.integers(1, 4),
    "max_ring_page_order": st.integers(0, consts.MAX_RING_PAGE_ORDER),
    "persistent": st.booleans(),
    "max_indirect_segments": st.sampled_from([0, 32, 256]),
    "protocol": st.sampled_from(consts.ABIS),
})  # fmt: skip


class BackendIO(RuleBasedStateMachine):
    """The suite's frontend against the backend under test, judged by the sector model."""

    def __init__(self, make: Callable[..., BackendUnderTest]) -> None:
        super().__init__()
        self.make = make
        self.env: BackendUnderTest | None = None

    @initialize(shape=frontend_shapes)
    def connect(self, shape: dict[str, Any]) -> None:
        self.env = self.make(size=DISK_SECTORS * SECTOR)
        self.n = self.env.connect(**shape)
        note(f"suite frontend {shape}; negotiated {self.n.as_report()}")
        self.fe = self.env.peer
        self.model = SectorModel(DISK_SECTORS)
        self.seed = 0
        tree = self.env.backend_tree()
        self.unit = max(
            1, int(tree.get("discard-granularity") or tree.get("sector-size") or SECTOR) // SECTOR
        )

    def data(self, sector: int, count: int) -> bytes:
        self.seed += 1
        return pattern(self.seed, sector, count)

    def check_read(self, sector: int, got: bytes, what: str) -> None:
        expect("SEG-6", [], self.model.mismatches(sector, got)[:4], what)

    def check_disk(self, what: str) -> None:
        """Every completed write is on the backend's disk (after FLUSH or BARRIER)."""
        disk = self.env.store.read(0, DISK_SECTORS * SECTOR)
        expect("FL-2", [], self.model.mismatches(0, disk)[:4], what)

    @rule(extent=extents, queue=st.integers(0, 3))
    def write(self, extent: tuple[int, int], queue: int) -> None:
        sector, count = extent
        data = self.data(sector, count)
        with backend_faults(self.env):
            status = self.fe.write(sector, data, queue=queue).status
        expect("SEG-6", OKAY, status, f"write of {count} sectors at {sector}, queue {queue}")
        self.model.write(sector, data)

    @rule(extent=extents, queue=st.integers(0, 3))
    def read(self, extent: tuple[int, int], queue: int) -> None:
        sector, count = extent
        with backend_faults(self.env):
            done = self.fe.read(sector, count, queue=queue)
        expect("SEG-6", OKAY, done.status, f"read of {count} sectors at {sector}, queue {queue}")
        self.check_read(sector, done.data, f"read of {count} sectors at {sector}, queue {queue}")

    @rule(extents=batch(2, 12))
    def in_flight(self, extents: list[tuple[int, int, bool]]) -> None:
        """Disjoint reads and writes in flight together, spread over every queue (OP-7, MQ-7)."""
        pending, done_writes = [], []
        for i, (sector, count, is_write) in enumerate(extents):
            queue = i % self.fe.queues
            if is_write:
                data = self.data(sector, count)
                pending.append(self.fe.submit_rw(WRITE, sector, data, queue=queue))
                done_writes.append((sector, data))
            else:
                pending.append(self.fe.submit_rw(READ, sector, count, queue=queue))
        with backend_faults(self.env):
            done = self.fe.wait(pending)
        expect("OP-7", [OKAY] * len(done), [d.status for d in done], f"{len(done)} requests in flight")
        for (sector, count, is_write), d in zip(extents, done, strict=True):
            if not is_write:
                self.check_read(
                    sector, d.data, f"read of {count} at {sector} in flight with {len(done) - 1} others"
                )
        for sector, data in done_writes:
            self.model.write(sector, data)

    @precondition(lambda self: self.n.flush_cache)
    @rule()
    def flush(self) -> None:
        with backend_faults(self.env):
            status = self.fe.flush().status
        expect("DIV-6.b", OKAY, status, "0-segment FLUSH, feature-flush-cache=1")
        self.check_disk("the disk after FLUSH")

    @precondition(lambda self: self.n.barrier)
    @rule(extents=batch(1, 6), queue=st.integers(0, 3))
    def barrier(self, extents: list[tuple[int, int, bool]], queue: int) -> None:
        """Writes then a BARRIER on one ring, one push: the writes are on disk at its answer."""
        queue %= self.fe.queues
        pending, issued = [], []
        for sector, count, _ in extents:
            data = self.data(sector, count)
            pending.append(self.fe.submit_rw(WRITE, sector, data, queue=queue))
            issued.append((sector, data))
        barrier = self.fe.submit_simple(BARRIER, queue=queue)
        self.fe.push()
        deadline = time.monotonic() + self.env.timeout
        while barrier.done is None:
            self.fe.poll()
            if self.fe.disabled:
                raise self.fe.violations[-1]
            if barrier.done is None:
                if time.monotonic() > deadline:
                    raise TargetTimeout(f"no answer to a BARRIER within {self.env.timeout:g} s")
                self.fe.evtchn.wait(0.005)
        status = barrier.done.status
        expect("FL-1.a", {OKAY, EOPNOTSUPP}, status, f"BARRIER after {len(issued)} writes on queue {queue}")
        if status == OKAY:
            for sector, data in issued:
                what = f"{len(data) // SECTOR} sectors at {sector}, written before the BARRIER, at its answer"
                expect("FL-1.a", data, self.env.store.read(sector * SECTOR, len(data)), what)
        with backend_faults(self.env):
            done = self.fe.wait(pending)
        expect("FL-1.a", [OKAY] * len(done), [d.status for d in done], "the writes before the BARRIER")
        for sector, data in issued:
            self.model.write(sector, data)
        if status == OKAY:
            self.check_disk("the disk after BARRIER")

    @precondition(lambda self: self.n.discard)
    @rule(extent=extents, secure=st.booleans())
    def discard(self, extent: tuple[int, int], secure: bool) -> None:
        start = extent[0] // self.unit * self.unit  # DISC-2: aligned to discard-granularity
        count = max(self.unit, extent[1] // self.unit * self.unit)
        count = min(count, (DISK_SECTORS - start) // self.unit * self.unit)
        if count <= 0:
            return
        with backend_faults(self.env):
            status = self.fe.discard(start, count, secure=secure).status
        expect("DISC-1", {OKAY, EOPNOTSUPP}, status, f"DISCARD of {count} at {start} (secure={secure})")
        self.model.discard(start, count)

    @invariant()
    def backend_kept_the_protocol(self) -> None:
        if self.env is not None and self.fe.violations:
            raise self.fe.violations[0]

    def teardown(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            finally:
                self.env.store.close()  # the fixture keeps the environment until the test ends


@pytest.mark.role("backend")
@pytest.mark.rule("SEG-6", "OP-7", "MQ-7", "FL-1.a", "FL-2", "DIV-6.b", "DISC-1", "WIRE-2")
def test_backend_io_matches_the_sector_model(backend_under_test) -> None:
    run_state_machine_as_test(lambda: BackendIO(backend_under_test), settings=machine_settings())


# -- frontend role -----------------------------------------------------------------------------


backend_offers = backend_configs.flatmap(
    lambda c: st.builds(
        replace, st.just(c),
        discard_granularity=st.sampled_from([0, 512, 4096]),
        unsupported_ops=st.sampled_from([(), (BARRIER, FLUSH, DISCARD)]),
    )
)  # fmt: skip


def attempt(env: FrontendUnderTest, method: str, *args: Any, **kwargs: Any) -> Any:
    """A block-API call whose outcome is not judged (a frontend may refuse it, or raise)."""
    try:
        return env.io(method, *args, **kwargs)
    except XenTimeout:
        raise
    except Exception as exc:
        return exc


class FrontendIO(RuleBasedStateMachine):
    """The frontend under test's block API against the suite's backend; the disk is `env.store`."""

    def __init__(self, make: Callable[..., FrontendUnderTest]) -> None:
        super().__init__()
        self.make = make
        self.env: FrontendUnderTest | None = None

    @initialize(offers=backend_offers)
    def attach(self, offers: BackendConfig) -> None:
        note(f"suite backend {offers}")
        self.env = self.make(backend=offers, size=DISK_SECTORS * SECTOR)
        self.env.attach()
        self.model = SectorModel(DISK_SECTORS)
        self.seed = 0

    def disk(self, sector: int, count: int) -> bytes:
        return self.env.store.read(sector * SECTOR, count * SECTOR)

    @rule(extent=extents, queue=st.integers(0, 3))
    def write(self, extent: tuple[int, int], queue: int) -> None:
        sector, count = extent
        self.seed += 1
        data = pattern(self.seed, sector, count)
        status = self.env.io("write", sector, data, queue=queue).status
        expect("SEG-6", OKAY, status, f"write of {count} sectors at {sector}, queue {queue}")
        expect("SEG-6", data, self.disk(sector, count), f"write of {count} sectors at {sector}: on the disk")
        self.model.write(sector, data)

    @rule(extent=extents, queue=st.integers(0, 3))
    def read(self, extent: tuple[int, int], queue: int) -> None:
        sector, count = extent
        done = self.env.io("read", sector, count, queue=queue)
        expect("SEG-6", OKAY, done.status, f"read of {count} sectors at {sector}, queue {queue}")
        expect(
            "SEG-6", [], self.model.mismatches(sector, done.data)[:4], f"read of {count} sectors at {sector}"
        )

    @rule(method=st.sampled_from(["flush", "barrier"]), queue=st.integers(0, 3))
    def flush_or_barrier(self, method: str, queue: int) -> None:
        attempt(self.env, method, queue=queue)  # offered or not, refused or not: never sent unoffered

    @rule(extent=extents, secure=st.booleans())
    def discard(self, extent: tuple[int, int], secure: bool) -> None:
        sector, count = extent
        attempt(self.env, "discard", sector, count, secure=secure)
        self.model.discard(sector, count)
        expect("DISC-2", [], self.model.mismatches(0, self.disk(0, DISK_SECTORS))[:4],
               f"the disk after a discard of {count} at {sector}")  # fmt: skip

    @invariant()
    def only_requests_the_backend_accepts(self) -> None:
        if self.env is not None:
            # An operation sent without the offer (OP-2) is a SHOULD, judged on its own by
            # test_operations.py; every other rule the suite's backend records is a MUST.
            broken = {r: n for r, n in self.env.request_rules_broken().items() if r != "OP-2"}
            expect(min(broken, default="IND-1"), {}, broken, "requests the suite's backend refused")
            expect("OP-3", XenbusState.Connected, self.env.state("frontend"), "the frontend's state")

    def teardown(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            finally:
                self.env.store.close()


@pytest.mark.role("frontend")
@pytest.mark.rule("SEG-6", "OP-3", "IND-1", "DISC-2")
@pytest.mark.provokes(BLKFRONT_OP_REFUSED)  # some examples answer EOPNOTSUPP
def test_frontend_io_matches_the_sector_model(frontend_under_test) -> None:
    run_state_machine_as_test(lambda: FrontendIO(frontend_under_test), settings=machine_settings())


# -- across ABIs (WIRE-2, WIRE-3, DIV-9) --------------------------------------------------------


def durable_io(env: BackendUnderTest, what: str, model: SectorModel | None = None) -> None:
    """Writes and reads of every shape the suite's frontend makes, on every queue, checked by
    reading back and, after a FLUSH when offered, on the backend's disk (`model`: what the test
    wrote before)."""
    fe, n = env.peer, env.peer.negotiated
    model = model or SectorModel(env.store.size // SECTOR)
    shapes = [(8, 1), (17, 7), (64, 88), (300, 8 * 40)]  # one sector, within a page, 11 pages, indirect
    with backend_faults(env):
        for q in range(fe.queues):
            for i, (sector, count) in enumerate(shapes):
                sector += 1024 * q
                data = pattern(10 * q + i, sector, count)
                expect(
                    "WIRE-2",
                    OKAY,
                    fe.write(sector, data, queue=q).status,
                    f"{what}: write {count} at {sector}",
                )
                model.write(sector, data)
                got = fe.read(sector, count, queue=q)
                expect(
                    "WIRE-2", [], model.mismatches(sector, got.data)[:4], f"{what}: read {count} at {sector}"
                )
        if n.discard:
            expect("WIRE-2", {OKAY, EOPNOTSUPP}, fe.discard(1024, 64).status, f"{what}: DISCARD")
            model.discard(1024, 64)
        if n.flush_cache:
            expect("WIRE-2", OKAY, fe.flush().status, f"{what}: FLUSH")
            disk = env.store.read(0, env.store.size)
            expect("WIRE-2", [], model.mismatches(0, disk)[:4], f"{what}: the disk after FLUSH")


@pytest.mark.role("backend")
@pytest.mark.rule("WIRE-2", "WIRE-3")
def test_x86_32_frontend(backend_under_test, record_negotiated) -> None:
    """The suite's frontend speaks x86_32-abi (id@4, sector_number@12, seg@20, 108-byte slots,
    12-byte responses): a backend of another ABI translates, so I/O is correct."""
    env = backend_under_test(abi=consts.X86_32_ABI)
    record_negotiated(env.connect())
    expect("WIRE-2", consts.X86_32_ABI, env.frontend_tree().get("protocol"), "the suite frontend's protocol")
    slots = SlotFactory(consts.X86_32_ABI)
    data = pattern(1, 4000, 8)
    src = env.peer.raw_grant(data)[0]
    dst, page = env.peer.raw_grant()
    rid = 0x1122_3344_5566_7788  # both halves matter: x86_32 keeps it at offset 4
    got = reply(env, slots.rw(WRITE, rid, 4000, [(src, 0, 7)]))
    expect("WIRE-3", {(WRITE, OKAY)}, got, "an x86_32 WRITE slot, id 0x1122334455667788 at offset 4")
    expect(
        "WIRE-3", {(READ, OKAY)}, reply(env, slots.rw(READ, rid, 4000, [(dst, 0, 7)])), "an x86_32 READ slot"
    )
    expect("WIRE-3", data, bytes(page), "sector_number at offset 12, seg[0] at 20: the data round-trips")
    model = SectorModel(env.store.size // SECTOR)
    model.write(4000, data)
    durable_io(env, "x86_32-abi", model)


def connect_without_protocol(env: BackendUnderTest):
    """The documented startup, except that the suite's frontend writes no `protocol` key."""
    env.wait_state("backend", {XenbusState.InitWait}, "backend InitWait (SM-2)")
    fe = env.peer
    keys = fe.raw_transport()
    keys.pop("protocol", None)
    fe.raw_write(keys, clear=True)
    fe.raw_state(XenbusState.Initialised)
    try:
        return fe.raw_finish()
    except XenTimeout as exc:
        raise TargetTimeout(str(exc)) from None


@pytest.mark.role("backend")
@pytest.mark.rule("DIV-9", "WIRE-2")
def test_absent_protocol_means_x86_32_or_native(backend_under_test, record_variant) -> None:
    """No `protocol` key: an x86 backend takes x86_32 (Linux, QEMU), the spec says native; both
    pass. A probe whose id reads differently in the two layouts tells which one was taken,
    then I/O in that layout must be correct."""
    env = backend_under_test(abi=consts.X86_32_ABI)
    connect_without_protocol(env)
    fe = env.peer
    probe = bytearray(fe.raw_ring(0).ring.shared.entry_size)
    probe[0] = FLUSH  # 0 segments: nothing but the id matters (EOPNOTSUPP if not offered)
    probe[4:16] = bytes.fromhex("111111112222222233333333")
    ids = {consts.X86_32_ABI: 0x22222222_11111111, consts.X86_64_ABI: 0x33333333_22222222}
    ring = fe.raw_ring(0).ring
    pending = fe.raw_request(bytes(probe))
    fe.push()
    deadline = time.monotonic() + env.timeout
    while not ring.unconsumed_responses():
        if time.monotonic() > deadline:
            raise TargetTimeout(f"no answer to the probe within {env.timeout:g} s")
        fe.evtchn.wait(0.01)
    rid = codec.codecs(consts.X86_64_ABI).response.unpack_from(fe.ring_slot(ring.rsp_cons))[0]
    taken = next((abi for abi, i in ids.items() if i == rid), None)
    expect("DIV-9", set(ids), taken, f"the probe's id as answered: {rid:#x} ({ids})")
    record_variant(
        "DIV-9",
        f"protocol absent: {taken}" + (" (x86 backend)" if taken == consts.X86_32_ABI else " (native)"),
    )
    if taken == consts.X86_32_ABI:
        with backend_faults(env):
            fe.wait([pending])
    else:  # the suite's frontend spoke x86_32 to a backend reading x86_64: start again in that layout
        env.close()  # first: a live run has one vdev
        env = backend_under_test(abi=consts.X86_64_ABI)
        connect_without_protocol(env)
    durable_io(env, f"protocol absent, {taken}")
