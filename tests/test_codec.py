"""The fast codecs stay byte-identical to the construct definitions they derive from."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import codec, consts, wire
from tests.strategies import wire as wst


@cache
def _compiled(abi: str, name: str):
    return wire.abi(abi).structures()[name].compile()


def _pairs():
    return [(abi, name) for abi in consts.ABIS for name in wire.abi(abi).structures()]


@pytest.mark.parametrize(("abi", "name"), _pairs())
@given(data=st.data())
def test_parse_parity(abi: str, name: str, data: st.DataObject) -> None:
    """Any bytes parse to the same values through construct, compiled construct and the codec."""
    c = codec.codecs(abi).structures()[name]
    raw = data.draw(wst.raw(c))
    values = c.unpack_from(raw)
    expected = wire.abi(abi).structures()[name].parse(raw)
    assert c.from_container(expected) == values
    assert c.from_container(_compiled(abi, name).parse(raw)) == values


@pytest.mark.parametrize(("abi", "name"), _pairs())
@given(data=st.data())
def test_build_parity_and_round_trip(abi: str, name: str, data: st.DataObject) -> None:
    """Building any value gives the same bytes both ways, and parse(build(x)) == x."""
    c = codec.codecs(abi).structures()[name]
    obj = data.draw(wst.containers(c))
    built = wire.abi(abi).structures()[name].build(obj)
    flat = c.from_container(obj)
    assert c.pack(*flat) == built
    assert c.unpack_from(built) == flat
    assert c.to_container(flat) == obj


@given(c=wst.structures(), data=st.data())
def test_pack_into_at_offset(c: codec.Codec, data: st.DataObject) -> None:
    """pack_into/unpack_from at an offset inside a larger page (ring slots)."""
    flat = c.from_container(data.draw(wst.containers(c)))
    off = data.draw(st.integers(0, 64))
    buf = bytearray(off + c.size + 8)
    c.pack_into(buf, off, *flat)
    assert c.unpack_from(buf, off) == flat


@given(st.sampled_from(consts.ABIS), st.integers(0, 2**64 - 1), st.integers(0, 255), st.integers(-3, 3),
       st.binary(min_size=16, max_size=16))  # fmt: skip
def test_field_packer_never_touches_padding(abi: str, rid: int, op: int, status: int, canary: bytes) -> None:
    """SEC-5: writing a response field by field leaves every padding byte as it was."""
    rsp = codec.codecs(abi).response
    buf = bytearray(canary)
    rsp.field_packer("id", "operation", "status")(buf, 0, rid, op, status)
    values = rsp.unpack_from(buf)
    assert (values[rsp.index("id")], values[rsp.index("operation")], values[rsp.index("status")]) == (
        rid, op, status)  # fmt: skip
    for name in (f for f in rsp.fields if f.startswith("_pad")):
        start = rsp.offset(name)
        width = len(values[rsp.index(name)])
        assert buf[start : start + width] == canary[start : start + width]


def test_unsupported_construct_is_refused() -> None:
    from construct import GreedyBytes, Struct

    with pytest.raises(TypeError, match="no fixed struct equivalent"):
        codec.derive(Struct("tail" / GreedyBytes), "bad")


def test_unknown_field_names_structure() -> None:
    with pytest.raises(KeyError, match="response has no field 'nope'"):
        codec.codecs(consts.X86_64_ABI).response.index("nope")
