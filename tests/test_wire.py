"""Wire layouts (WIRE-1..10): sizes and offsets of inventory §1.1, padding visibility."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import codec, consts, wire
from blkif_spec.consts import BlkifOp

X64, X32, ARM = consts.X86_64_ABI, consts.X86_32_ABI, consts.ARM_ABI

# (structure, field) -> offset per ABI, transcribed from inventory Appendix A.
OFFSETS = {
    ("request_rw", "id"): {X64: 8, X32: 4, ARM: 8},
    ("request_rw", "sector_number"): {X64: 16, X32: 12, ARM: 16},
    ("request_rw", "seg[0].gref"): {X64: 24, X32: 20, ARM: 24},
    ("request_discard", "nr_sectors"): {X64: 24, X32: 20, ARM: 24},
    ("request_indirect", "nr_segments"): {X64: 2, X32: 2, ARM: 2},
    ("request_indirect", "handle"): {X64: 24, X32: 20, ARM: 24},
    ("request_indirect", "indirect_grefs[0]"): {X64: 28, X32: 24, ARM: 28},
    ("request_other", "id"): {X64: 8, X32: 4, ARM: 8},
    ("response", "operation"): {X64: 8, X32: 8, ARM: 8},
    ("response", "status"): {X64: 10, X32: 10, ARM: 10},
    ("sring_header", "rsp_event"): {X64: 12, X32: 12, ARM: 12},
}
SIZES = {
    "segment": {X64: 8, X32: 8, ARM: 8},
    "request_rw": {X64: 112, X32: 108, ARM: 112},
    "request_discard": {X64: 32, X32: 28, ARM: 32},
    "request_indirect": {X64: 64, X32: 64, ARM: 64},
    "response": {X64: 16, X32: 12, ARM: 16},
    "sring_header": {X64: 64, X32: 64, ARM: 64},
    "indirect_page": {X64: 4096, X32: 4096, ARM: 4096},
}


@pytest.mark.parametrize("abi", consts.ABIS)
@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_match_compiled_layout(abi: str, name: str) -> None:
    """WIRE-1, WIRE-3, WIRE-4: sizeof() of every structure as compiled by gcc."""
    assert wire.abi(abi).structures()[name].sizeof() == SIZES[name][abi]


@pytest.mark.parametrize("abi", consts.ABIS)
@pytest.mark.parametrize(("name", "field"), sorted(OFFSETS))
def test_offsets_match_compiled_layout(abi: str, name: str, field: str) -> None:
    assert codec.codecs(abi).structures()[name].offset(field) == OFFSETS[name, field][abi]


@pytest.mark.parametrize(("abi", "size"), [(X64, 112), (X32, 108), (ARM, 112)])
def test_ring_slot_is_the_union_size(abi: str, size: int) -> None:
    """WIRE-1: the slot is sizeof(union blkif_sring_entry)."""
    assert wire.abi(abi).entry_size == size


@given(st.sampled_from(consts.ABIS), st.data())
def test_padding_stays_visible(abi: str, data: st.DataObject) -> None:
    """Non-zero padding written by a peer is parsed, not dropped (SEC-5 needs it)."""
    rsp = wire.abi(abi).response
    pad0 = data.draw(st.binary(min_size=1, max_size=1))
    raw = bytearray(rsp.build({"id": 7, "operation": 1, "status": -1}))
    raw[9:10] = pad0
    assert rsp.parse(bytes(raw))._pad0 == pad0


def test_padding_builds_as_zeros() -> None:
    built = wire.abi(X64).response.build({"id": 1, "operation": 0, "status": 0})
    assert built[9] == 0 and built[12:16] == bytes(4)


@given(st.integers(0, 255))
def test_request_form_dispatch(op: int) -> None:
    """Operation byte selects the request form; unknown ops keep the common prefix (DIV-1)."""
    form = wire.request_form(op)
    expected = {0: "rw", 1: "rw", 2: "rw", 3: "rw", 5: "discard", 6: "indirect"}.get(op, "other")
    assert form == expected


def test_parse_request_uses_form() -> None:
    a = wire.abi(X64)
    slot = a.request_discard.build({"operation": BlkifOp.DISCARD, "flag": 1, "handle": 0, "id": 9,
                                     "sector_number": 8, "nr_sectors": 16}).ljust(112, b"\0")  # fmt: skip
    parsed = a.parse_request(slot)
    assert (parsed.flag, parsed.nr_sectors) == (1, 16)


def test_unknown_abi_is_rejected_with_rule() -> None:
    with pytest.raises(ValueError, match="WIRE-2"):
        wire.abi("sparc-abi")


@pytest.mark.parametrize(
    ("protocol", "x86", "expected"),
    [(None, True, X32), (None, False, ARM), ("x86_64-abi", True, X64), ("arm-abi", False, ARM)],
)
def test_abi_for_protocol(protocol: str | None, x86: bool, expected: str) -> None:
    """DIV-9: an absent protocol key means x86_32 on x86 hosts (Linux and QEMU)."""
    assert wire.abi_for_protocol(protocol, host_is_x86=x86).name == expected


def test_unknown_protocol_names_div10() -> None:
    with pytest.raises(ValueError, match="DIV-10"):
        wire.abi_for_protocol("x86_16-abi")


def test_constants_match_header() -> None:
    """OP-1, OP-6 and the limits of Appendix A."""
    assert [int(op) for op in BlkifOp] == list(range(7))
    assert [int(s) for s in consts.BlkifRsp] == [0, -1, -2]
    assert consts.SEGS_PER_INDIRECT_FRAME == 512 and consts.BLKIF_MAX_INDIRECT_SEGMENTS == 4096
    assert (consts.VDISK_CDROM, consts.VDISK_REMOVABLE, consts.VDISK_READONLY) == (1, 2, 4)
    assert [int(s) for s in consts.XenbusState] == list(range(9))
