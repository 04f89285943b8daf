"""Discard (inventory §2.4, conventions §5 DISC-4/DIV-18), both roles.

Backend role: a discarded range reads back as the old data or zeros (no
guarantee either way) and later writes to it read back exactly (DISC-1, the
sector model); the secure flag is a plain discard unless `discard-secure=1`
(DISC-3); a discard is range-checked and refused on a read-only disk (DISC-5,
SEC-3.a); `discard-enable=0` from the toolstack removes the offer (DISC-6), and a
discard sent anyway is answered (DIV-28, recorded). EOPNOTSUPP may answer a
discard at any time (OP-3): accepted and recorded. Frontend role: the frontend
under test aligns its discards to `discard-granularity` (DISC-2) and copes when
the granularity is not published (DIV-18).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import consts
from blkif_spec.consts import BlkifOp, XenbusState
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.harness import BackendUnderTest
from blkif_spec.model import SectorModel, pattern
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

DISCARD = int(BlkifOp.DISCARD)
SECTOR = consts.SECTOR_SIZE
REGION = 512  # sectors written and checked by the data tests
DISCARD_KEYS = ("feature-discard", "discard-granularity", "discard-alignment", "discard-secure")


def granule(env) -> int:
    """discard-granularity in 512-byte sectors (absent: sector-size, DISC-4)."""
    tree = env.backend_tree()
    return max(1, int(tree.get("discard-granularity") or tree.get("sector-size") or SECTOR) // SECTOR)


def fill(env: BackendUnderTest, model: SectorModel, seed: int) -> None:
    """Write REGION sectors of distinct data through the ring, and into the model."""
    data = pattern(seed, 0, REGION)
    with backend_faults(env):
        expect("DISC-1", OKAY, env.peer.write(0, data).status, f"writing {REGION} sectors")
    model.write(0, data)


def check_region(env: BackendUnderTest, model: SectorModel, rule: str, what: str) -> None:
    with backend_faults(env):
        got = env.peer.read(0, REGION)
    expect(rule, OKAY, got.status, f"reading {REGION} sectors {what}")
    expect(rule, [], model.mismatches(0, got.data)[:4], what)


# -- backend role ------------------------------------------------------------------------------


@pytest.mark.role("backend")
@pytest.mark.rule("DISC-1")
def test_discarded_range_reads_old_data_or_zeros(connected_backend, slots, record_variant) -> None:
    """Aligned discards of a written region: old data or zeros inside, nothing changed outside;
    a write after the discard reads back exactly."""
    env = connected_backend()
    require(env, "discard")
    unit = granule(env)
    model = SectorModel(int(env.backend_tree()["sectors"]))
    seen: set[int] = set()
    fill(env, model, 1)

    @given(start=st.integers(0, REGION // unit - 1), data=st.data())
    def check(start: int, data: st.DataObject) -> None:
        count = data.draw(st.integers(1, REGION // unit - start), label="granules")
        sector, n = start * unit, count * unit
        echoed, status = reply(env, slots.discard(RAW_ID, sector, n))
        expect(
            "DISC-1", {(DISCARD, OKAY), (DISCARD, EOPNOTSUPP)}, (echoed, status), f"DISCARD {n} at {sector}"
        )
        seen.add(status)
        model.discard(sector, n)
        check_region(env, model, "DISC-1", f"after discarding {n} sectors at {sector}")
        again = pattern(sector + n, sector, min(n, 8))
        with backend_faults(env):
            expect(
                "DISC-1", OKAY, env.peer.write(sector, again).status, f"write at {sector} after the discard"
            )
        model.write(sector, again)
        check_region(env, model, "DISC-1", f"after writing {len(again) // SECTOR} sectors at {sector} again")

    check()
    record_variant("DISC-1", "aligned DISCARD in range: " + "/".join(status_name(s) for s in sorted(seen)))


@pytest.mark.role("backend")
@pytest.mark.rule("DISC-4")
def test_discard_granularity_and_alignment_are_published(connected_backend) -> None:
    env = connected_backend()
    require(env, "discard")
    tree = env.backend_tree()
    missing = [k for k in ("discard-granularity", "discard-alignment") if k not in tree]
    expect("DISC-4", [], missing, "keys a backend offering discard publishes")


@pytest.mark.role("backend")
@pytest.mark.rule("DISC-3")
def test_secure_flag_without_discard_secure_is_a_plain_discard(backend_under_test, record_negotiated,
                                                                slots) -> None:  # fmt: skip
    env = backend_under_test(options={"discard_secure": False})
    record_negotiated(env.connect())
    require(env, "discard")
    if env.backend_tree().get("discard-secure") == "1":
        pytest.skip("backend advertises discard-secure although asked not to")
    unit = granule(env)
    model = SectorModel(int(env.backend_tree()["sectors"]))
    fill(env, model, 2)
    plain = reply(env, slots.discard(RAW_ID, 0, 8 * unit))
    expect("DISC-3", {(DISCARD, OKAY)}, plain, "a plain DISCARD")
    secure = reply(env, slots.discard(RAW_ID, 16 * unit, 8 * unit, flag=consts.BLKIF_DISCARD_SECURE))
    expect("DISC-3", {(DISCARD, OKAY)}, secure, "DISCARD with BLKIF_DISCARD_SECURE, discard-secure not 1")
    model.discard(0, 8 * unit)
    model.discard(16 * unit, 8 * unit)
    check_region(env, model, "DISC-3", "after a plain and a flagged discard")


@pytest.mark.role("backend")
@pytest.mark.rule("DISC-3")
def test_secure_discard_leaves_nothing_readable(connected_backend, slots, record_variant) -> None:
    """With discard-secure=1, a secure discard answered OKAY leaves none of the old data."""
    env = connected_backend()
    require(env, "discard", "discard-secure")
    unit = granule(env)
    model = SectorModel(int(env.backend_tree()["sectors"]))
    fill(env, model, 3)
    sector, n = 4 * unit, 16 * unit
    echoed, status = reply(env, slots.discard(RAW_ID, sector, n, flag=consts.BLKIF_DISCARD_SECURE))
    expect("DISC-3", {(DISCARD, OKAY), (DISCARD, EOPNOTSUPP)}, (echoed, status), "a secure DISCARD")
    record_variant("DISC-3", f"secure DISCARD with discard-secure=1: {status_name(status)}")
    with backend_faults(env):
        got = env.peer.read(sector, n).data
    old = pattern(3, 0, REGION)[sector * SECTOR : (sector + n) * SECTOR]
    if status == OKAY:
        kept = [
            sector + i
            for i in range(n)
            if got[i * SECTOR : (i + 1) * SECTOR] == old[i * SECTOR : (i + 1) * SECTOR]
        ]
        expect("DISC-3", [], kept[:8], "sectors still holding their data after a secure discard")
    model.discard(sector, n)
    check_region(env, model, "DISC-3", "around the secure discard")


@pytest.mark.role("backend")
@pytest.mark.rule("DISC-5", "SEC-3")
@pytest.mark.provokes("access denied: DISCARD")
def test_discard_is_range_checked(connected_backend, slots) -> None:
    """Past the end, or wrapping around 2^64 into the disk: ERROR, and nothing discarded."""
    env = connected_backend()
    require(env, "discard")
    sectors = int(env.backend_tree()["sectors"])
    model = SectorModel(sectors)
    fill(env, model, 4)
    tail = pattern(5, sectors - 16, 16)
    with backend_faults(env):
        env.peer.write(sectors - 16, tail)

    @given(st.one_of(
        st.tuples(st.integers(sectors - 16, sectors + 16), st.integers(1, 64)).filter(
            lambda e: sum(e) > sectors),
        st.tuples(st.integers(2**64 - 64, 2**64 - 1), st.integers(64, 256)),  # wraps into the disk
        st.tuples(st.integers(0, 64), st.integers(2**64 - 64, 2**64 - 1)),  # a huge count
    ))  # fmt: skip
    def check(extent: tuple[int, int]) -> None:
        sector, n = extent
        got = reply(env, slots.discard(RAW_ID, sector, n))
        expect(
            "DISC-5", {(DISCARD, ERROR)}, got, f"DISCARD of {n} sectors at {sector} ({sectors} on the disk)"
        )

    check()
    check_region(env, model, "DISC-5", "nothing discarded by the refused requests")
    with backend_faults(env):
        expect("DISC-5", tail, env.peer.read(sectors - 16, 16).data, "the last 16 sectors intact")


@pytest.mark.role("backend")
@pytest.mark.rule("DISC-5", "DISC-1")
def test_discard_up_to_the_last_sector_is_served(connected_backend, slots) -> None:
    """The range check is not off by one: aligned discards ending exactly at the end of the
    disk are in range (OKAY, or EOPNOTSUPP as OP-3 allows at any time), and what lies
    before them is untouched."""
    env = connected_backend()
    require(env, "discard")
    sectors, unit = int(env.backend_tree()["sectors"]), granule(env)
    head = pattern(7, sectors - 64 * unit, 32 * unit)
    with backend_faults(env):
        expect("DISC-1", OKAY, env.peer.write(sectors - 64 * unit, head).status, "writing below the tail")
    for n in (unit, 32 * unit):
        got = reply(env, slots.discard(RAW_ID, sectors - n, n))
        expect("DISC-5", {(DISCARD, OKAY), (DISCARD, EOPNOTSUPP)}, got,
               f"DISCARD of the last {n} sectors ({sectors} on the disk)")  # fmt: skip
    with backend_faults(env):
        got = env.peer.read(sectors - 64 * unit, 32 * unit)
    expect("DISC-1", {(OKAY, True)}, (got.status, got.data == head), "sectors before the discarded tail")


@pytest.mark.role("backend")
@pytest.mark.rule("DISC-5", "SEC-3.a")
@RUN_LAST_READ_ONLY_VBD
@pytest.mark.provokes("access denied: DISCARD")
def test_discard_on_a_read_only_disk_is_refused(backend_under_test, record_negotiated, slots) -> None:
    env = backend_under_test(readonly=True)
    data = pattern(6, 0, 64)
    env.store.write(0, data)  # the disk image, as the toolstack handed it over
    record_negotiated(env.connect())
    echoed, status = reply(env, slots.discard(RAW_ID, 0, 64))
    expect(
        "SEC-3.a", {(DISCARD, ERROR), (DISCARD, EOPNOTSUPP)}, (echoed, status), "DISCARD on a read-only disk"
    )
    with backend_faults(env):
        got = env.peer.read(0, 64)
    expect("DISC-5", {(OKAY, True)}, (got.status, got.data == data), "the data after the refused DISCARD")


@pytest.mark.role("backend")
@pytest.mark.rule("DISC-6", "DIV-28", "OP-5")
def test_discard_enable_0_removes_the_offer(
    backend_under_test, record_negotiated, slots, record_variant
) -> None:
    """The toolstack writes discard-enable=0: no feature-discard=1 (Linux writes no discard key
    at all); a DISCARD sent anyway is processed, EOPNOTSUPP, or refused as an unknown operation."""
    env = backend_under_test(discard=False)
    record_negotiated(env.connect())
    tree = env.backend_tree()
    present = {k: tree[k] for k in DISCARD_KEYS if k in tree}
    expect("DISC-6", True, present.get("feature-discard") in (None, "0"), f"discard keys: {present}")
    record_variant("DISC-6", f"discard-enable=0: discard keys {present or 'none'}")
    model = SectorModel(int(tree["sectors"]))
    fill(env, model, 7)
    echoed, status = reply(env, slots.discard(RAW_ID, 64, 64))
    expect("OP-5", DISCARD, echoed, "DISCARD without the offer: operation echoed")
    expect("DIV-28", {OKAY, EOPNOTSUPP, ERROR}, status, "DISCARD without feature-discard")
    variant = {OKAY: "processed (OKAY)", EOPNOTSUPP: "EOPNOTSUPP", ERROR: "ERROR, as an unknown operation"}
    record_variant("DIV-28", variant[status])
    if status == OKAY:
        model.discard(64, 64)
    check_region(env, model, "DIV-28", f"after a DISCARD answered {status_name(status)}")


# -- frontend role -----------------------------------------------------------------------------


@pytest.mark.role("frontend")
@pytest.mark.rule("DISC-2", "DISC-1")
def test_frontend_aligns_discards(frontend_under_test) -> None:
    """discard-granularity 4096: misaligned discards through the block API reach the suite's
    backend aligned (or not at all), and never touch data outside what was asked."""
    env = frontend_under_test(backend=BackendConfig(discard_granularity=4096))
    env.attach()
    model = SectorModel(env.store.size // SECTOR)
    data = pattern(8, 0, 256)
    expect("DISC-1", OKAY, env.io("write", 0, data).status, "writing 256 sectors")
    model.write(0, data)
    for sector, n in ((3, 20), (37, 5), (64, 64), (130, 1), (141, 100)):
        env.io("discard", sector, n)  # any status: a discard is a hint
        model.discard(sector, n)
        expect("DISC-2", [], model.mismatches(0, env.store.read(0, 256 * SECTOR))[:4],
               f"the disk after discarding {n} sectors at {sector}")  # fmt: skip
    expect("DISC-2", {}, env.request_rules_broken(), "discards the suite's backend saw misaligned or refused")


@pytest.mark.role("frontend")
@pytest.mark.rule("DIV-18", "DISC-2", "DISC-5")
def test_frontend_without_discard_granularity(frontend_under_test, record_variant) -> None:
    """feature-discard=1 without discard-granularity/-alignment: the frontend connects, and its
    discards stay inside the disk (assumed granularity: sector-size, or its own default)."""
    env = frontend_under_test(backend=BackendConfig(discard_granularity=0))
    env.attach()
    expect("DIV-18", XenbusState.Connected, env.state("frontend"), "the frontend's state")
    sectors = env.store.size // SECTOR
    model = SectorModel(sectors)
    for sector in (0, sectors - 64):
        data = pattern(9, sector, 64)
        expect("DIV-18", OKAY, env.io("write", sector, data).status, f"writing 64 sectors at {sector}")
        model.write(sector, data)
    env.io("discard", 5, 9)
    env.io("discard", sectors - 24, 24)
    model.discard(5, 9)
    model.discard(sectors - 24, 24)
    for sector in (0, sectors - 64):
        expect("DIV-18", [], model.mismatches(sector, env.store.read(sector * SECTOR, 64 * SECTOR))[:4],
               f"the disk around the discards at {sector}")  # fmt: skip
    expect("DISC-5", {}, env.request_rules_broken(), "discards the suite's backend refused or saw misaligned")
    sent = env.store.read(5 * SECTOR, 9 * SECTOR) == bytes(9 * SECTOR)
    record_variant("DIV-18", "no discard-granularity: a 9-sector discard " + ("sent" if sent else "not sent"))
