"""Sector sizes (SEG-4, SEG-5, DIV-8, DIV-12), both roles.

`sectors`, `sector_number` and `first_sect`/`last_sect` count 512 bytes whatever
`sector-size` says (the upstream 2024 text; sector-size units fail DIV-12 unless
accepted in --known-failures). With a 4096-byte `sector-size` every request's
start and every segment's length must be multiples of 4096 bytes, else the
backend answers ERROR (SEG-5; DIV-8 records it). The suite asks the backend for
its sector size through `options={"sector_size": …}`, a request a target may
ignore: the test SKIPs when the backend publishes another size.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import consts
from blkif_spec.consts import BlkifOp
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.factory import SlotFactory
from blkif_spec.harness import BackendUnderTest
from blkif_spec.model import pattern
from tests.conformance.conftest import ERROR, OKAY, RAW_ID, backend_faults, expect, reply

READ, WRITE, FLUSH = int(BlkifOp.READ), int(BlkifOp.WRITE), int(BlkifOp.FLUSH_DISKCACHE)
SECTOR = consts.SECTOR_SIZE
SIZES = [512, 4096]


def with_sector_size(backend_under_test, record_negotiated, size: int) -> BackendUnderTest:
    env = backend_under_test(options={"sector_size": size})
    record_negotiated(env.connect())
    published = env.backend_tree().get("sector-size")
    if published != str(size):
        pytest.skip(f"backend publishes sector-size {published} although asked for {size}")
    return env


def durable(env: BackendUnderTest, slots: SlotFactory) -> None:
    """Make completed writes reach the disk before the test looks at it (FL-2), when offered."""
    if env.backend_tree().get("feature-flush-cache") == "1":
        reply(env, slots.rw(FLUSH, RAW_ID, 0, []))


# -- backend role ------------------------------------------------------------------------------


@pytest.mark.role("backend")
@pytest.mark.rule("SEG-4", "DIV-12")
@pytest.mark.parametrize("size", SIZES)
def test_units_are_512_bytes(backend_under_test, record_negotiated, slots, size: int) -> None:
    """`sectors` is the disk size / 512; sector_number s addresses byte s * 512; the last
    4 KiB of the disk is at `sectors` - 8 and one block further is outside."""
    env = with_sector_size(backend_under_test, record_negotiated, size)
    sectors = int(env.backend_tree()["sectors"])
    expect(
        "DIV-12",
        env.store.size // SECTOR,
        sectors,
        f"`sectors` of a {env.store.size}-byte disk, sector-size {size}",
    )
    head, tail = pattern(1, 8, 8), pattern(2, sectors - 8, 8)
    with backend_faults(env):
        expect("SEG-4", OKAY, env.peer.write(8, head).status, "8 sectors at sector 8")
        expect("SEG-4", OKAY, env.peer.write(sectors - 8, tail).status, f"the last 8 sectors ({sectors - 8})")
        beyond = env.peer.write(sectors, tail).status
    durable(env, slots)
    expect("SEG-4", head, env.store.read(8 * SECTOR, len(head)), "sector 8 is byte 4096 of the disk")
    expect("SEG-4", tail, env.store.read((sectors - 8) * SECTOR, len(tail)), "the last 4 KiB of the disk")
    expect("SEG-4", ERROR, beyond, f"8 sectors at sector {sectors}: past the end")


@pytest.mark.role("backend")
@pytest.mark.rule("SEG-5", "DIV-8")
def test_misaligned_io_is_refused_with_4096_byte_sectors(backend_under_test, record_negotiated, slots,
                                                          record_variant) -> None:  # fmt: skip
    """A start that is not a multiple of 8 (512-byte units), or a segment length that is not
    8 sectors: ERROR, and nothing written. Aligned I/O is served."""
    env = with_sector_size(backend_under_test, record_negotiated, 4096)
    data = pattern(3, 0, 8)
    src = env.peer.raw_grant(data)[0]
    dst = env.peer.raw_grant()[0]
    image = bytearray(1008 * SECTOR)  # sectors 2048..3055 as the accepted writes leave them

    @given(sector=st.integers(0, 1000), first=st.integers(0, 7), last=st.integers(0, 7), write=st.booleans())
    def check(sector: int, first: int, last: int, write: bool) -> None:
        if last < first:
            first, last = last, first
        aligned = sector % 8 == 0 and (first, last) == (0, 7)
        op = WRITE if write else READ
        got = reply(env, slots.rw(op, RAW_ID, 2048 + sector, [(src if write else dst, first, last)]))
        want = OKAY if aligned else ERROR
        expect("SEG-5", {(op, want)}, got, f"{BlkifOp(op).name} at {2048 + sector}, sectors {first}-{last}")
        if write and aligned:
            image[sector * SECTOR : (sector + 8) * SECTOR] = data

    check()
    with backend_faults(env):
        got = env.peer.read(2048, 1008)
    expect("SEG-5", {(OKAY, True)}, (got.status, got.data == image), "only the aligned writes written")
    record_variant("DIV-8", "misaligned start or segment length with sector-size 4096: ERROR")


@pytest.mark.role("backend")
@pytest.mark.rule("SEG-5", "DIV-8")
@pytest.mark.parametrize("size", [1024, 2048])
def test_alignment_follows_the_published_sector_size(backend_under_test, record_negotiated, slots,
                                                     size: int) -> None:  # fmt: skip
    """With a 1024- or 2048-byte `sector-size` the unit of alignment is that size, not 4096: a
    start or segment on a multiple of size/512 sectors is served, anything else is ERROR."""
    env = with_sector_size(backend_under_test, record_negotiated, size)
    unit = size // SECTOR
    dst = env.peer.raw_grant()[0]
    for sector in (2048, 2048 + unit, 2049):
        for first in range(8):
            for last in range(first, 8):
                aligned = sector % unit == 0 and first % unit == 0 and (last - first + 1) % unit == 0
                got = reply(env, slots.rw(READ, RAW_ID, sector, [(dst, first, last)]))
                want = OKAY if aligned else ERROR
                expect(
                    "SEG-5",
                    {(READ, want)},
                    got,
                    f"READ at {sector}, sectors {first}-{last}, sector-size {size}",
                )


# -- frontend role -----------------------------------------------------------------------------


@pytest.mark.role("frontend")
@pytest.mark.rule("SEG-4", "DIV-12", "SEG-5")
@pytest.mark.parametrize("size", SIZES)
def test_frontend_uses_512_byte_units(frontend_under_test, size: int) -> None:
    """I/O at 512-byte sector offsets through the block API reaches the disk at offset * 512, in
    requests the suite's backend finds aligned and in range (else it records SEG-5 or SEG-7)."""
    env = frontend_under_test(backend=BackendConfig(sector_size=size))
    env.attach()
    sectors = env.store.size // SECTOR
    for sector, seed in ((8, 1), (64, 2), (sectors - 16, 3)):
        data = pattern(seed, sector, 16)
        expect("SEG-4", OKAY, env.io("write", sector, data).status, f"16 sectors at {sector}")
        expect(
            "SEG-4",
            data,
            env.store.read(sector * SECTOR, len(data)),
            f"sector {sector} is byte {sector * SECTOR}",
        )
        got = env.io("read", sector, 16)
        expect("SEG-4", {(OKAY, True)}, (got.status, got.data == data), f"16 sectors read back at {sector}")
    expect(
        "SEG-5", {}, env.request_rules_broken(), f"requests the suite's backend refused (sector-size {size})"
    )
