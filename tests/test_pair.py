"""The reference pair: connects in every feature combination and moves data correctly.

A hypothesis state machine drives I/O through the reference frontend against a
sector-level model (conventions §10): reads return what was written; a discarded
range reads back as old data or zeros until written again; flush and barrier
complete with OKAY when offered. Every pair is closed at the end and must leave
no XenStore node, grant, mapping or port behind.
"""

from __future__ import annotations

import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from blkif_spec import consts
from blkif_spec.consts import BlkifRsp
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.drivers.frontend import FrontendConfig
from blkif_spec.model import SectorModel, pattern
from blkif_spec.pair import ReferencePair
from blkif_spec.xen.sim import SimXen
from tests.strategies.pair import backend_configs, frontend_configs

SECTOR = consts.SECTOR_SIZE
DISK_SECTORS = 2048  # 1 MiB: small, so reads and writes collide often
OKAY = int(BlkifRsp.OKAY)


extents = st.integers(0, DISK_SECTORS - 1).flatmap(
    lambda start: st.tuples(st.just(start), st.integers(1, min(DISK_SECTORS - start, 200)))
)


class PairIO(RuleBasedStateMachine):
    """I/O on a connected pair, checked against the sector model."""

    xen: SimXen

    @initialize(be=backend_configs, fe=frontend_configs)
    def connect(self, be: BackendConfig, fe: FrontendConfig) -> None:
        self.pair = ReferencePair(self.xen, be, fe, size=DISK_SECTORS * SECTOR)
        self.negotiated = self.pair.connect()
        note(f"negotiated {self.negotiated.as_report()}")
        self.fe = self.pair.frontend
        self.model = SectorModel(DISK_SECTORS)
        self.seed = 0

    @rule(extent=extents, queue=st.integers(0, 3))
    def write(self, extent: tuple[int, int], queue: int) -> None:
        sector, count = extent
        self.seed += 1
        data = pattern(self.seed, sector, count)
        assert self.fe.write(sector, data, queue=queue).status == OKAY
        self.model.write(sector, data)

    @rule(extent=extents, queue=st.integers(0, 3))
    def read(self, extent: tuple[int, int], queue: int) -> None:
        sector, count = extent
        done = self.fe.read(sector, count, queue=queue)
        assert done.status == OKAY
        assert not self.model.mismatches(sector, done.data)

    @rule(n=st.integers(2, 6), data=st.data())
    def interleaved_writes(self, n: int, data: st.DataObject) -> None:
        """Non-overlapping writes in flight at once, spread over every queue."""
        slots = sorted(data.draw(st.sets(st.integers(0, DISK_SECTORS // 64 - 1), min_size=n, max_size=n)))
        pending, written = [], []
        for i, slot in enumerate(slots):
            self.seed += 1
            sector = slot * 64 + data.draw(st.integers(0, 32))
            payload = pattern(self.seed, sector, data.draw(st.integers(1, 32)))
            pending.append(self.fe.submit_rw(consts.BlkifOp.WRITE, sector, payload, queue=i))
            written.append((sector, payload))
        assert all(c.status == OKAY for c in self.fe.wait(pending))
        for sector, payload in written:
            self.model.write(sector, payload)

    @precondition(lambda self: self.negotiated.flush_cache)
    @rule()
    def flush(self) -> None:
        assert self.fe.flush().status == OKAY  # DIV-6.b: a 0-segment FLUSH when offered

    @precondition(lambda self: self.negotiated.barrier)
    @rule()
    def barrier(self) -> None:
        assert self.fe.barrier().status == OKAY

    @precondition(lambda self: self.negotiated.discard)
    @rule(extent=extents, secure=st.booleans())
    def discard(self, extent: tuple[int, int], secure: bool) -> None:
        sector, count = extent
        assert self.fe.discard(sector, count, secure=secure).status == OKAY
        self.model.discard(sector, count)

    @invariant()
    def no_violations(self) -> None:
        if hasattr(self, "pair"):
            assert not self.fe.violations and not self.pair.backend.violations

    def teardown(self) -> None:
        if hasattr(self, "pair"):
            self.pair.close()


def test_pair_io_matches_the_sector_model(sim_xen: SimXen) -> None:
    PairIO.xen = sim_xen
    run_state_machine_as_test(PairIO)


@given(be=backend_configs, fe=frontend_configs)
def test_negotiation_takes_the_minimum_of_both_sides(sim_xen: SimXen, be: BackendConfig,
                                                      fe: FrontendConfig) -> None:  # fmt: skip
    """MQ-2, MPR-1, PG-1, IND-1: what the pair agrees on, in every combination."""
    with ReferencePair(sim_xen, be, fe) as pair:
        n = pair.connect()
        assert n.queues == min(be.max_queues, fe.max_queues)
        assert n.ring_page_order == min(be.max_ring_page_order, fe.max_ring_page_order)
        assert n.persistent == (be.persistent and fe.persistent)
        assert n.max_indirect_segments == be.max_indirect_segments
        assert n.abi == fe.protocol
        assert pair.frontend.queues == n.queues


def test_read_only_disk(sim_xen: SimXen) -> None:
    """SEG-8, SEC-3.a: writes and discards refused on a read-only disk; reads served; info bit set."""
    with ReferencePair(sim_xen, readonly=True) as pair:
        n = pair.connect()
        assert n.readonly and pair.frontend.readonly
        assert pair.frontend.read(0, 8).status == OKAY
        assert pair.frontend.write(0, bytes(4096)).status == int(BlkifRsp.ERROR)
        assert pair.frontend.discard(0, 8).status == int(BlkifRsp.ERROR)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_sector_size_keeps_512_byte_units(sim_xen: SimXen, sector_size: int) -> None:
    """SEG-4, SEG-5: `sectors` and sector_number count 512 bytes; misaligned I/O fails on 4 KiB disks."""
    with ReferencePair(sim_xen, BackendConfig(sector_size=sector_size), size=1 << 20) as pair:
        n = pair.connect()
        assert (n.sector_size, n.sectors) == (sector_size, (1 << 20) // 512)
        assert pair.frontend.write(8, b"z" * 4096).status == OKAY
        assert pair.frontend.read(8, 8).data == b"z" * 4096
        misaligned = pair.frontend.read(1, 8).status
        assert misaligned == (OKAY if sector_size == 512 else int(BlkifRsp.ERROR))


def test_resize_is_seen_by_the_frontend(sim_xen: SimXen) -> None:
    """XK-10: the backend rewrites `sectors`, then `state`; the frontend re-reads the size."""
    with ReferencePair(sim_xen, size=1 << 20) as pair:
        pair.connect()
        pair.backend.resize(2 << 20)
        pair.frontend.refresh()
        assert pair.frontend.sectors == (2 << 20) // 512
        assert pair.frontend.write((2 << 20) // 512 - 8, b"e" * 4096).status == OKAY


def test_reconnect_with_other_parameters_leaves_nothing_stale(sim_xen: SimXen) -> None:
    """SM-26, MPR-2: close, then reconnect with another queue count, ring order and features."""
    be = BackendConfig(max_queues=4)
    with ReferencePair(sim_xen, be, FrontendConfig(max_queues=4, max_ring_page_order=2)) as pair:
        pair.connect()
        assert pair.frontend.write(0, b"1" * 4096).status == OKAY
        pair.frontend.close()
        for fe in (FrontendConfig(max_queues=1, max_ring_page_order=0, persistent=False),
                   FrontendConfig(max_queues=3, max_ring_page_order=4)):  # fmt: skip
            n = pair.frontend.reconnect(fe)
            assert (n.queues, n.ring_page_order) == (fe.max_queues, fe.max_ring_page_order)
            keys = set(pair.xen.dom0.store.directory(pair.vbd.frontend_path))
            if n.queues == 1:
                assert not any(k.startswith("queue-") for k in keys), keys
                assert ("ring-ref" in keys) == (n.ring_page_order == 0), keys
            assert pair.frontend.read(0, 8).data == b"1" * 4096
            pair.frontend.close()


def test_repeated_attach_detach_leaves_nothing_behind(sim_xen: SimXen) -> None:
    for _ in range(5):
        with ReferencePair(sim_xen) as pair:
            pair.connect()
            assert pair.frontend.write(0, b"x" * 512).status == OKAY


def test_toolstack_detach_with_io_in_flight(sim_xen: SimXen) -> None:
    """SM-20, SM-21, SM-23: online=0 + backend Closing; the frontend goes Closed, the backend Closed."""
    from blkif_spec import toolstack
    from blkif_spec.consts import XenbusState

    with ReferencePair(sim_xen) as pair:
        pair.connect()
        fe = pair.frontend
        pending = [fe.submit_rw(consts.BlkifOp.WRITE, 8 * i, b"d" * 4096) for i in range(8)]
        fe.push()
        toolstack.request_detach(sim_xen.dom0.store, pair.vbd)
        deadline = __import__("time").monotonic() + 2
        while __import__("time").monotonic() < deadline and pair.backend.state != XenbusState.Closed:
            __import__("time").sleep(0.01)
        assert fe.detached and pair.backend.state == XenbusState.Closed
        assert fe.backend_state() == XenbusState.Closed
        assert len(pending) == 8
