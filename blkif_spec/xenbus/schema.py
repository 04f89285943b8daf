"""The vbd XenStore key schema of inventory §4.2/§4.3, as data, plus strict value parsers.

One `KeySpec` row per key of the backend (XK-B1..B34) and frontend (XK-F1..F16)
tables. Keeping the schema as rows (not as code paths in the validator) lets the
validator, the reference drivers, the fixture tests and the docs read the same
facts: who writes a key, in what format, what absence means, and by when it must
exist.

Parsing is strict on purpose. XK-4 says values are decimal strings; what real
parsers accept beyond that differs (`%u` takes leading blanks and zeros, `%i`
takes `0x`), so anything other than the canonical decimal spelling is a value two
implementations may read differently, and is rejected with the rule ID:
syntax and range of the type ⇒ XK-4, a row's own constraint (power of two,
≥ 512, 0/1 …) ⇒ that row's ID.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

from blkif_spec.consts import PROTOCOL_TO_ABI, SECTOR_SIZE, XenbusState
from blkif_spec.errors import RuleViolation

UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF
DOMID_FIRST_RESERVED = 0x7FF0  # xen.h: DOMID_FIRST_RESERVED; larger ids are special, never a guest


class Side(StrEnum):
    BACKEND = "backend"
    FRONTEND = "frontend"


class Writer(StrEnum):
    TOOLSTACK = "toolstack"
    HOTPLUG = "hotplug"
    BACKEND = "backend"
    FRONTEND = "frontend"


class Format(StrEnum):
    """How a value is spelled. Each member has one parser in `parse_format`."""

    UINT32 = "uint32"  # canonical decimal, 0 ≤ n ≤ 2^32-1
    UINT64 = "uint64"  # canonical decimal, 0 ≤ n ≤ 2^64-1
    BOOL01 = "bool01"  # decimal "0" or "1"
    XENBUS_STATE = "xenbus-state"  # decimal uint32; values outside 0..8 are a row finding
    MAJOR_MINOR = "hex-major:minor"  # "fd:3" (XK-B5, the one non-decimal number)
    XS_PATH = "xenstore-path"  # absolute XenStore path
    FS_PATH = "fs-path"  # absolute filesystem path (hotplug, script)
    DOMID = "domid"  # decimal domain id below DOMID_FIRST_RESERVED
    PROTOCOL = "protocol"  # one of protocols.h's ABI strings
    STRING = "string"  # free-form
    EMPTY_DIR = "empty-dir"  # a directory node, value ""


class When(StrEnum):
    """By when a key must exist, relative to the writer's XenbusState transitions."""

    CREATION = "creation"  # toolstack, when it creates the directories (SM-1)
    BACKEND_TRANSPORT = "before backend InitWait"  # XK-7.a (must)
    BACKEND_FEATURE = "before backend InitWait (feature)"  # XK-7.b (should; Linux: at Connected)
    AFTER_BACKEND_INITWAIT = "after backend InitWait"  # hotplug script (SM-11)
    HOTPLUG_END = "end of hotplug script"
    WITH_FEATURE_DISCARD = "with feature-discard"
    BEFORE_FRONTEND_INITIALISED = "before frontend Initialised"  # XK-8
    BEFORE_BACKEND_CONNECTED = "before backend Connected"  # XK-9
    DETACH = "detach"
    NEVER = "never (deprecated)"  # XK-F16: frontends should not write it


class Constraint(StrEnum):
    """A row-level restriction beyond the format; a violation carries the row's rule ID."""

    NONE = "none"
    POSITIVE = "≥ 1"
    POWER_OF_TWO = "power of two"
    SECTOR_SIZE = "power of two ≥ 512"
    INFO_BITS = "bitmap of VDISK_CDROM|VDISK_REMOVABLE|VDISK_READONLY"
    CHOICES = "one of the listed values"
    KNOWN_STATE = "a XenbusState (0..8)"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One row of the §4.2/§4.3 tables.

    `key` may contain `%u` (a canonical decimal index). `required_by` names the rule
    that makes the key mandatory (None: optional, its `default` applies when absent);
    at which phase it becomes mandatory is `when`.
    """

    rule: str
    key: str
    side: Side
    writer: Writer
    format: Format
    default: str | None
    when: When
    required_by: str | None = None
    constraint: Constraint = Constraint.NONE
    choices: tuple[str, ...] = ()
    deprecated: bool = False

    @property
    def required(self) -> bool:
        return self.required_by is not None

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compile(self.key)


_INDEX = "(0|[1-9][0-9]*)"  # %u as written by printf: no sign, no leading zeros


@cache
def _compile(key: str) -> re.Pattern[str]:
    return re.compile(re.escape(key).replace("%u", _INDEX))


B, F = Side.BACKEND, Side.FRONTEND
TS, HP, BE, FE = Writer.TOOLSTACK, Writer.HOTPLUG, Writer.BACKEND, Writer.FRONTEND
U32, U64, BOOL, STATE = Format.UINT32, Format.UINT64, Format.BOOL01, Format.XENBUS_STATE
CRE = When.CREATION

BACKEND_KEYS: tuple[KeySpec, ...] = (
    KeySpec("XK-B1", "frontend", B, TS, Format.XS_PATH, None, CRE, required_by="XK-2"),
    KeySpec("XK-B2", "frontend-id", B, TS, Format.DOMID, None, CRE, required_by="XK-2"),
    KeySpec("XK-B3", "online", B, TS, BOOL, "0", CRE),
    KeySpec("XK-B4", "state", B, TS, STATE, None, CRE, "XK-B4", Constraint.KNOWN_STATE),
    KeySpec("XK-B5", "physical-device", B, HP, Format.MAJOR_MINOR, None, When.AFTER_BACKEND_INITWAIT),
    KeySpec("XK-B6", "physical-device-path", B, HP, Format.FS_PATH, None, When.AFTER_BACKEND_INITWAIT),
    KeySpec(
        "XK-B7", "hotplug-status", B, HP, Format.STRING, None, When.HOTPLUG_END,
        constraint=Constraint.CHOICES, choices=("connected", "error", "busy"),
    ),
    KeySpec("XK-B8", "hotplug-error", B, HP, Format.STRING, None, When.HOTPLUG_END),
    KeySpec("XK-B9", "mode", B, TS, Format.STRING, None, CRE, None, Constraint.CHOICES, ("r", "w")),
    KeySpec("XK-B10", "params", B, TS, Format.STRING, None, CRE),
    KeySpec("XK-B11", "type", B, TS, Format.STRING, None, CRE),
    KeySpec("XK-B12", "dev", B, TS, Format.STRING, None, CRE),
    KeySpec("XK-B13", "device-type", B, TS, Format.STRING, None, CRE),
    KeySpec("XK-B14", "removable", B, TS, BOOL, None, CRE),
    KeySpec("XK-B15", "bootable", B, TS, BOOL, None, CRE),
    KeySpec("XK-B16", "script", B, TS, Format.FS_PATH, None, CRE),
    KeySpec("XK-B17", "discard-enable", B, TS, BOOL, "1", CRE),
    KeySpec("XK-B18", "direct-io-safe", B, TS, BOOL, "0", CRE),
    KeySpec(
        "XK-B19", "specification", B, TS, Format.STRING, None, CRE,
        constraint=Constraint.CHOICES, choices=("xen", "virtio"),
    ),
    KeySpec("XK-B20", "max-ring-page-order", B, BE, U32, "0", When.BACKEND_TRANSPORT),
    KeySpec(
        "XK-B21", "max-ring-pages", B, BE, U32, "1", When.BACKEND_TRANSPORT,
        constraint=Constraint.POWER_OF_TWO, deprecated=True,
    ),
    KeySpec(
        "XK-B22", "multi-queue-max-queues", B, BE, U32, "1", When.BACKEND_TRANSPORT,
        constraint=Constraint.POSITIVE,
    ),
    KeySpec("XK-B23", "feature-max-indirect-segments", B, BE, U32, "0", When.BACKEND_TRANSPORT),
    KeySpec("XK-B24", "feature-barrier", B, BE, BOOL, "0", When.BACKEND_FEATURE),
    KeySpec("XK-B25", "feature-flush-cache", B, BE, BOOL, "0", When.BACKEND_FEATURE),
    KeySpec("XK-B26", "feature-discard", B, BE, BOOL, "0", When.BACKEND_FEATURE),
    # default: sector-size (resolved by the reader, DIV-18 for what frontends do)
    KeySpec("XK-B27", "discard-granularity", B, BE, U32, None, When.WITH_FEATURE_DISCARD),
    KeySpec("XK-B28", "discard-alignment", B, BE, U32, "0", When.WITH_FEATURE_DISCARD),
    KeySpec("XK-B29", "discard-secure", B, BE, BOOL, "0", When.WITH_FEATURE_DISCARD),
    KeySpec("XK-B30", "feature-persistent", B, BE, BOOL, "0", When.BACKEND_FEATURE),
    KeySpec(
        "XK-B31", "info", B, BE, U32, None, When.BEFORE_BACKEND_CONNECTED, "XK-9", Constraint.INFO_BITS
    ),
    KeySpec(
        "XK-B32", "sector-size", B, BE, U32, None, When.BEFORE_BACKEND_CONNECTED, "XK-9",
        Constraint.SECTOR_SIZE,
    ),
    # default: sector-size; "multiple of sector-size" is a cross-key check in validate
    KeySpec("XK-B33", "physical-sector-size", B, BE, U32, None, When.BEFORE_BACKEND_CONNECTED),
    KeySpec("XK-B34", "sectors", B, BE, U64, None, When.BEFORE_BACKEND_CONNECTED, "XK-9"),
)  # fmt: skip

FI = When.BEFORE_FRONTEND_INITIALISED

FRONTEND_KEYS: tuple[KeySpec, ...] = (
    KeySpec("XK-F1", "backend", F, TS, Format.XS_PATH, None, CRE, required_by="XK-2"),
    KeySpec("XK-F2", "backend-id", F, TS, Format.DOMID, None, CRE, required_by="XK-2"),
    KeySpec("XK-F3", "state", F, TS, STATE, None, CRE, "XK-F3", Constraint.KNOWN_STATE),
    KeySpec("XK-F4", "virtual-device", F, TS, U32, None, CRE),
    KeySpec("XK-F5", "device-type", F, TS, Format.STRING, None, CRE),
    KeySpec("XK-F6", "trusted", F, TS, BOOL, "1", CRE),
    KeySpec("XK-F7", "protocol", F, FE, Format.PROTOCOL, None, FI),
    KeySpec("XK-F8", "event-channel", F, FE, U32, None, FI),
    KeySpec("XK-F9", "ring-ref", F, FE, U32, None, FI),
    KeySpec("XK-F10", "ring-ref%u", F, FE, U32, None, FI),
    KeySpec("XK-F11", "ring-page-order", F, FE, U32, "0", FI),
    KeySpec(
        "XK-F12", "num-ring-pages", F, FE, U32, "1", FI, constraint=Constraint.POWER_OF_TWO, deprecated=True
    ),
    KeySpec("XK-F13", "multi-queue-num-queues", F, FE, U32, "1", FI),
    KeySpec("XK-F14", "queue-%u", F, FE, Format.EMPTY_DIR, None, FI),
    KeySpec("XK-F14", "queue-%u/event-channel", F, FE, U32, None, FI),
    KeySpec("XK-F14", "queue-%u/ring-ref", F, FE, U32, None, FI),
    KeySpec("XK-F14", "queue-%u/ring-ref%u", F, FE, U32, None, FI),
    KeySpec("XK-F15", "feature-persistent", F, FE, BOOL, "0", FI),
    KeySpec("XK-F16", "feature-large-sector-size", F, FE, BOOL, "0", When.NEVER, deprecated=True),
)  # fmt: skip

KEYS: tuple[KeySpec, ...] = BACKEND_KEYS + FRONTEND_KEYS

_LITERAL: dict[tuple[Side, str], KeySpec] = {(s.side, s.key): s for s in KEYS if "%u" not in s.key}
_PATTERNED: tuple[KeySpec, ...] = tuple(s for s in KEYS if "%u" in s.key)


def lookup(side: Side | str, key: str) -> KeySpec | None:
    """The row describing `key` (relative to the device directory), or None for an unknown key.

    Unknown keys are normal (toolstacks add their own), so this never raises.
    """
    side = Side(side)
    spec = _LITERAL.get((side, key))
    if spec is not None:
        return spec
    for spec in _PATTERNED:
        if spec.side is side and spec.pattern.fullmatch(key):
            return spec
    return None


def spec(side: Side | str, key: str) -> KeySpec:
    """Like `lookup` for a key the caller knows is in the schema; KeyError otherwise."""
    found = lookup(side, key)
    if found is None:
        raise KeyError(f"{key!r} is not a {Side(side)} key of the vbd schema")
    return found


def required_keys(side: Side | str, when: When | None = None) -> tuple[KeySpec, ...]:
    side = Side(side)
    return tuple(s for s in KEYS if s.side is side and s.required and (when is None or s.when is when))


def default(side: Side | str, key: str) -> str | None:
    """The value a reader assumes when `key` is absent (None: no default, the key is needed)."""
    return spec(side, key).default


# --------------------------------------------------------------------------- parsers

_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")
# xenstore.txt: path elements are alphanumerics and "-/_@"
_XS_PATH = re.compile(r"/(?:[A-Za-z0-9_@-]+(?:/[A-Za-z0-9_@-]+)*)?")


def _need(ok: bool, rule: str, expected: str, value: object, key: str) -> None:
    if not ok:
        raise RuleViolation(rule, expected, repr(value), f"key {key!r}" if key else "")


def parse_uint(value: str, bits: int = 32, *, key: str = "") -> int:
    """Canonical unsigned decimal of at most `bits` bits (XK-4).

    Rejects what a lenient C parser would take differently: sign, blanks, leading
    zeros (octal under `%i`), `0x`, non-ASCII digits, empty string, overflow.
    """
    _need(
        isinstance(value, str) and _DECIMAL.fullmatch(value) is not None,
        "XK-4", "canonical decimal digits", value, key,
    )  # fmt: skip
    number = int(value)
    _need(number < 1 << bits, "XK-4", f"decimal < 2^{bits}", value, key)
    return number


def parse_uint32(value: str, *, key: str = "") -> int:
    return parse_uint(value, 32, key=key)


def parse_uint64(value: str, *, key: str = "") -> int:
    return parse_uint(value, 64, key=key)


def parse_bool01(value: str, *, key: str = "", rule: str = "XK-4") -> bool:
    """`"0"`/`"1"`. A non-decimal is XK-4; another decimal number is the row's rule."""
    number = parse_uint32(value, key=key)
    _need(number in (0, 1), rule, '"0" or "1"', value, key)
    return bool(number)


def parse_state(value: str, *, key: str = "state") -> int:
    """A `state` node: decimal; values outside 0..8 are returned as ints for the caller to judge.

    Use `known_state` to also require a XenbusState.
    """
    return parse_uint32(value, key=key)


def known_state(value: str, *, rule: str, key: str = "state") -> XenbusState:
    number = parse_state(value, key=key)
    _need(number <= max(XenbusState), rule, "a XenbusState 0..8", value, key)
    return XenbusState(number)


def parse_major_minor(value: str, *, key: str = "physical-device") -> tuple[int, int]:
    """`"<major-hex>:<minor-hex>"` as the hotplug script writes it (XK-B5, DIV-26)."""
    parts = value.split(":") if isinstance(value, str) else []
    _need(
        len(parts) == 2 and all(_HEX.fullmatch(p) for p in parts),
        "XK-4", "hex MAJOR:MINOR, e.g. 'fd:3'", value, key,
    )  # fmt: skip
    return int(parts[0], 16), int(parts[1], 16)


def parse_xs_path(value: str, *, key: str = "") -> str:
    _need(
        isinstance(value, str) and _XS_PATH.fullmatch(value) is not None,
        "XK-4", "absolute XenStore path of [A-Za-z0-9_@-] elements", value, key,
    )  # fmt: skip
    return value


def parse_fs_path(value: str, *, key: str = "") -> str:
    _need(
        isinstance(value, str) and value.startswith("/") and "\0" not in value,
        "XK-4", "absolute filesystem path", value, key,
    )  # fmt: skip
    return value


def parse_domid(value: str, *, key: str = "") -> int:
    domid = parse_uint32(value, key=key)
    _need(domid < DOMID_FIRST_RESERVED, "XK-4", f"domid < {DOMID_FIRST_RESERVED:#x}", value, key)
    return domid


def parse_protocol(value: str, *, key: str = "protocol") -> str:
    """The ABI named by `protocol`. An unknown string is DIV-10 (a variant: Linux refuses, QEMU
    takes native), so it is reported under that ID, not XK-4."""
    _need(isinstance(value, str) and value in PROTOCOL_TO_ABI, "DIV-10", sorted(PROTOCOL_TO_ABI), value, key)
    return PROTOCOL_TO_ABI[value]


def parse_empty(value: str, *, key: str = "", rule: str = "XK-4") -> str:
    _need(value == "", rule, 'directory node with value ""', value, key)
    return value


def is_power_of_two(number: int) -> bool:
    return number > 0 and number & (number - 1) == 0


def parse_format(fmt: Format, value: str, *, key: str = "", rule: str = "XK-4") -> object:
    """Parse `value` as `fmt`; `rule` is the row ID used for format-internal limits (0/1, "")."""
    match fmt:
        case Format.UINT32:
            return parse_uint32(value, key=key)
        case Format.UINT64:
            return parse_uint64(value, key=key)
        case Format.BOOL01:
            return parse_bool01(value, key=key, rule=rule)
        case Format.XENBUS_STATE:
            return parse_state(value, key=key)
        case Format.MAJOR_MINOR:
            return parse_major_minor(value, key=key)
        case Format.XS_PATH:
            return parse_xs_path(value, key=key)
        case Format.FS_PATH:
            return parse_fs_path(value, key=key)
        case Format.DOMID:
            return parse_domid(value, key=key)
        case Format.PROTOCOL:
            return parse_protocol(value, key=key)
        case Format.EMPTY_DIR:
            return parse_empty(value, key=key, rule=rule)
        case Format.STRING:
            _need(isinstance(value, str), "XK-4", "a string", value, key)
            return value
    raise AssertionError(f"unhandled format {fmt}")  # pragma: no cover


def _check_constraint(row: KeySpec, parsed: object, value: str, key: str) -> None:
    rule = row.rule
    match row.constraint:
        case Constraint.NONE:
            return
        case Constraint.POSITIVE:
            _need(parsed >= 1, rule, "≥ 1", value, key)
        case Constraint.POWER_OF_TWO:
            _need(is_power_of_two(parsed), rule, "a power of two", value, key)
        case Constraint.SECTOR_SIZE:
            _need(is_power_of_two(parsed) and parsed >= SECTOR_SIZE, rule, "a power of two ≥ 512", value, key)
        case Constraint.INFO_BITS:
            _need(parsed & ~0b111 == 0, rule, "only bits VDISK_CDROM|REMOVABLE|READONLY (0..7)", value, key)
        case Constraint.CHOICES:
            _need(parsed in row.choices, rule, f"one of {list(row.choices)}", value, key)
        case Constraint.KNOWN_STATE:
            _need(parsed <= max(XenbusState), rule, "a XenbusState 0..8", value, key)


def parse_value(row: KeySpec, value: str, *, key: str | None = None) -> object:
    """Parse `value` for `row`, raising RuleViolation (XK-4, the row's ID, or DIV-10)."""
    key = row.key if key is None else key
    parsed = parse_format(row.format, value, key=key, rule=row.rule)
    _check_constraint(row, parsed, value, key)
    return parsed


def parse_key(side: Side | str, key: str, value: str) -> object:
    """Parse the value of a known key of `side` (KeyError for an unknown key)."""
    return parse_value(spec(side, key), value, key=key)


def read(tree: Mapping[str, str], side: Side | str, key: str) -> object:
    """The parsed value of `key` in `tree`, or its parsed default when absent.

    Raises RuleViolation for a malformed value and KeyError when the key is absent
    and has no default (it is needed, not optional).
    """
    row = spec(side, key)
    if key in tree:
        return parse_value(row, tree[key], key=key)
    if row.default is None:
        raise KeyError(f"{Side(side)} key {key!r} is absent and has no default")
    return parse_value(row, row.default, key=key)


def read_lenient(tree: Mapping[str, str], side: Side | str, key: str, fallback: object = None) -> object:
    """Like `read`, but a malformed or absent-without-default value gives `fallback`.

    What Linux's `xenbus_read_unsigned` does: a reader that must keep going (a
    driver choosing parameters, a report) takes junk as absent; `validate` is
    where the junk is reported.
    """
    try:
        return read(tree, side, key)
    except (RuleViolation, KeyError):
        row = spec(side, key)
        if key in tree and row.default is not None:
            return parse_value(row, row.default, key=key)
        return fallback


# --------------------------------------------------------------------------- derived limits


def _ffs_order(pages: int) -> int:
    """ffs(pages) - 1: the order of the lowest set bit (-1 for 0), as XK-F11 computes it."""
    return (pages & -pages).bit_length() - 1


def max_ring_page_order(backend: Mapping[str, str], *, lenient: bool = False) -> int:
    """The largest `ring-page-order` the backend accepts (XK-F11, MPR-1).

    MAX(ffs(`max-ring-pages`) - 1, `max-ring-page-order`), both absent ⇒ 0. Strict
    mode raises RuleViolation for a malformed key (XK-4, XK-B21); lenient mode reads
    junk as absent but applies ffs() to any decimal page count, as the formula intends.
    """
    if not lenient:
        order = read(backend, Side.BACKEND, "max-ring-page-order")
        pages = read(backend, Side.BACKEND, "max-ring-pages")
        return max(order, _ffs_order(pages))
    order = read_lenient(backend, Side.BACKEND, "max-ring-page-order")
    try:  # ffs() copes with a page count that is not a power of two: only the lowest bit counts
        pages = parse_uint32(backend.get("max-ring-pages", "1"))
    except RuleViolation:
        pages = 1
    return max(order, _ffs_order(pages))


def max_queues(backend: Mapping[str, str], *, lenient: bool = False) -> int:
    """`multi-queue-max-queues`; absent ⇒ 1 (no multi-queue, MQ-2). Lenient: junk or 0 ⇒ 1."""
    if lenient:
        return max(1, read_lenient(backend, Side.BACKEND, "multi-queue-max-queues"))
    return read(backend, Side.BACKEND, "multi-queue-max-queues")


# --------------------------------------------------------------------------- formatters


def format_uint(number: int, bits: int = 32) -> str:
    """The canonical decimal spelling (XK-4); ValueError outside the type's range."""
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 1 << bits:
        raise ValueError(f"{number!r} is not a uint{bits}")
    return str(number)


def format_bool(flag: bool) -> str:
    return "1" if flag else "0"


def format_state(state: int) -> str:
    return format_uint(int(state))


def format_major_minor(major: int, minor: int) -> str:
    return f"{major:x}:{minor:x}"
