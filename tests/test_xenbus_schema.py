"""The key schema (§4.2/§4.3) as data, and its strict parsers (XK-4)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import catalogue
from blkif_spec.consts import ABIS
from blkif_spec.errors import RuleViolation
from blkif_spec.xenbus import schema
from blkif_spec.xenbus.schema import BACKEND_KEYS, FRONTEND_KEYS, KEYS, Format, Side, When
from tests.strategies.xenbus import NON_DECIMAL, hostile_uint

CANONICAL = re.compile(r"0|[1-9][0-9]*")


def rule_of(call, *args, **kwargs) -> str:
    with pytest.raises(RuleViolation) as caught:
        call(*args, **kwargs)
    return caught.value.rule_id


# --------------------------------------------------------------------------- the tables


def test_every_inventory_row_is_present_once_per_key():
    assert {r.rule for r in BACKEND_KEYS} == {f"XK-B{i}" for i in range(1, 35)}
    assert {r.rule for r in FRONTEND_KEYS} == {f"XK-F{i}" for i in range(1, 17)}
    keys = [(r.side, r.key) for r in KEYS]
    assert len(keys) == len(set(keys))


def test_every_rule_named_by_the_schema_is_in_the_catalogue():
    for row in KEYS:
        catalogue.get(row.rule)
        if row.required_by is not None:
            catalogue.get(row.required_by)


def test_defaults_are_valid_values_of_their_own_row():
    for row in KEYS:
        if row.default is not None:
            schema.parse_value(row, row.default)


def test_required_keys_follow_the_tables():
    assert {r.key for r in schema.required_keys(Side.BACKEND, When.BEFORE_BACKEND_CONNECTED)} == {
        "sectors",
        "info",
        "sector-size",
    }
    assert {r.key for r in schema.required_keys(Side.FRONTEND)} == {"backend", "backend-id", "state"}
    assert {r.key for r in schema.required_keys(Side.BACKEND, When.CREATION)} == {
        "frontend",
        "frontend-id",
        "state",
    }
    assert schema.spec("backend", "sectors").required_by == "XK-9"


def test_writers_and_timing_of_transport_keys():
    offers = {r.key for r in BACKEND_KEYS if r.when is When.BACKEND_TRANSPORT}
    assert offers == {
        "max-ring-page-order",
        "max-ring-pages",
        "multi-queue-max-queues",
        "feature-max-indirect-segments",
    }
    assert {r.writer for r in FRONTEND_KEYS if r.when is When.BEFORE_FRONTEND_INITIALISED} == {"frontend"}


@given(st.integers(0, 2**32 - 1))
def test_lookup_matches_patterned_keys_with_canonical_indices(index):
    assert schema.lookup("frontend", f"ring-ref{index}").rule == "XK-F10"
    assert schema.lookup("frontend", f"queue-{index}").rule == "XK-F14"
    assert schema.lookup("frontend", f"queue-{index}/ring-ref{index}").key == "queue-%u/ring-ref%u"
    assert schema.lookup("frontend", f"queue-{index}/event-channel").key == "queue-%u/event-channel"


@pytest.mark.parametrize(
    "side, key",
    [
        ("frontend", "ring-ref01"),
        ("frontend", "queue-x/ring-ref"),
        ("frontend", "queue--1"),
        ("backend", "ring-ref0"),
        ("frontend", "sectors"),
        ("backend", "script-extra"),
        ("frontend", ""),
    ],
)
def test_unknown_keys_are_not_in_the_schema(side, key):
    assert schema.lookup(side, key) is None


# --------------------------------------------------------------------------- parsers


@given(st.integers(0, 2**32 - 1))
def test_uint32_round_trips(number):
    assert schema.parse_uint32(schema.format_uint(number)) == number


@given(st.integers(0, 2**64 - 1))
def test_uint64_round_trips(number):
    assert schema.parse_uint64(schema.format_uint(number, 64)) == number


@given(st.text(max_size=24))
def test_uint32_accepts_exactly_the_canonical_decimals(text):
    canonical = CANONICAL.fullmatch(text) is not None and int(text) < 2**32
    if canonical:
        assert schema.parse_uint32(text) == int(text)
    else:
        assert rule_of(schema.parse_uint32, text) == "XK-4"


@given(hostile_uint(32))
def test_hostile_uint32_values_are_xk4(text):
    assert rule_of(schema.parse_uint32, text, key="ring-ref") == "XK-4"


@given(hostile_uint(64))
def test_hostile_uint64_values_are_xk4(text):
    assert rule_of(schema.parse_uint64, text, key="sectors") == "XK-4"


@pytest.mark.parametrize("text", ["4294967296", " 1", "0x10", "", "-1"])
def test_the_briefs_examples_are_refused(text):
    assert rule_of(schema.parse_key, "frontend", "event-channel", text) == "XK-4"


def test_format_uint_refuses_what_parse_refuses():
    for bad in (-1, 2**32, True, 1.0, "1"):
        with pytest.raises(ValueError):
            schema.format_uint(bad)


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("feature-barrier", "2", "XK-B24"),
        ("feature-barrier", "01", "XK-4"),
        ("feature-barrier", "yes", "XK-4"),
        ("sector-size", "1000", "XK-B32"),
        ("sector-size", "256", "XK-B32"),
        ("sector-size", "0", "XK-B32"),
        ("multi-queue-max-queues", "0", "XK-B22"),
        ("max-ring-pages", "3", "XK-B21"),
        ("info", "8", "XK-B31"),
        ("mode", "rw", "XK-B9"),
        ("state", "9", "XK-B4"),
        ("hotplug-status", "ok", "XK-B7"),
        ("physical-device", "0x7:0", "XK-4"),
        ("physical-device", "7", "XK-4"),
        ("frontend", "relative", "XK-4"),
        ("frontend", "/a//b", "XK-4"),
        ("frontend-id", "32752", "XK-4"),
        ("sectors", "0x100", "XK-4"),
    ],
)
def test_backend_row_constraints_carry_the_row_id(key, value, rule):
    assert rule_of(schema.parse_key, "backend", key, value) == rule


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("protocol", "x86_65-abi", "DIV-10"),
        ("protocol", "", "DIV-10"),
        ("state", "10", "XK-F3"),
        ("num-ring-pages", "6", "XK-F12"),
        ("queue-0", "x", "XK-F14"),
        ("trusted", "2", "XK-F6"),
    ],
)
def test_frontend_row_constraints_carry_the_row_id(key, value, rule):
    assert rule_of(schema.parse_key, "frontend", key, value) == rule


@pytest.mark.parametrize("abi", ABIS)
def test_known_protocols_parse_to_their_abi(abi):
    assert schema.parse_key("frontend", "protocol", abi) == abi


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_major_minor_round_trips_in_hex(major, minor):
    assert schema.parse_major_minor(schema.format_major_minor(major, minor)) == (major, minor)


@given(st.sampled_from(NON_DECIMAL).filter(lambda t: not re.fullmatch(r"[0-9a-fA-F]{1,8}", t)))
def test_major_minor_refuses_garbage(text):
    assert rule_of(schema.parse_major_minor, f"{text}:{text}") == "XK-4"
    assert rule_of(schema.parse_major_minor, f"7:{text}") == "XK-4"


@given(st.integers(9, 2**32 - 1))
def test_out_of_range_states_parse_but_are_not_xenbus_states(state):
    assert schema.parse_state(str(state)) == state
    assert rule_of(schema.known_state, str(state), rule="XK-F3") == "XK-F3"


def test_read_applies_defaults_and_refuses_missing_required_keys():
    assert schema.read({}, "backend", "max-ring-page-order") == 0
    assert schema.read({}, "backend", "discard-enable") is True
    assert schema.read({}, "frontend", "trusted") is True
    with pytest.raises(KeyError):
        schema.read({}, "backend", "sectors")
    assert schema.read_lenient({"max-ring-page-order": "0x4"}, "backend", "max-ring-page-order") == 0
    assert schema.read_lenient({"sectors": "x"}, "backend", "sectors", fallback=None) is None


@given(st.integers(0, 31), st.integers(0, 31))
def test_max_ring_page_order_is_the_xkf11_formula(order, pages_order):
    backend = {"max-ring-page-order": str(order), "max-ring-pages": str(1 << pages_order)}
    assert schema.max_ring_page_order(backend) == max(order, pages_order)
    assert schema.max_ring_page_order({"max-ring-pages": str(1 << pages_order)}) == pages_order
    assert schema.max_ring_page_order({}) == 0


def test_strict_limits_raise_and_lenient_ones_fall_back():
    junk = {"max-ring-page-order": "four", "multi-queue-max-queues": "0"}
    assert rule_of(schema.max_ring_page_order, junk) == "XK-4"
    assert rule_of(schema.max_queues, junk) == "XK-B22"
    assert schema.max_ring_page_order(junk, lenient=True) == 0
    assert schema.max_queues(junk, lenient=True) == 1


def test_every_format_has_a_parser():
    samples = {
        Format.UINT32: "1",
        Format.UINT64: "1",
        Format.BOOL01: "1",
        Format.XENBUS_STATE: "4",
        Format.MAJOR_MINOR: "fd:3",
        Format.XS_PATH: "/local/domain/0",
        Format.FS_PATH: "/dev/loop0",
        Format.DOMID: "0",
        Format.PROTOCOL: "arm-abi",
        Format.STRING: "x",
        Format.EMPTY_DIR: "",
    }
    assert set(samples) == set(Format)
    for fmt, value in samples.items():
        schema.parse_format(fmt, value)
