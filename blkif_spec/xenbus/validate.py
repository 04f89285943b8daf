"""Judge a pair of vbd XenStore trees against the key rules (§4, MPR, MQ, DIV-9/10).

Trees are plain dicts of path (relative to the device directory) → value, as a
`xenstore-ls` of each directory gives them. The validator reports every problem
it can see as a `Finding` instead of stopping at the first, so that a report
shows the whole picture; code that must stop (a reference driver, `negotiate`)
turns a finding into a `RuleViolation`.

Two habits keep one fault to one finding: a value that does not parse is
reported once (XK-4) and every check that depends on it is skipped; a layout
that is wrong as a whole (queue dirs where flat keys belong) is one finding, not
one per missing key. Unknown keys are never findings: real trees carry toolstack
and hotplug keys the schema does not list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from blkif_spec import catalogue
from blkif_spec.consts import SECTOR_SIZE, XenbusState
from blkif_spec.errors import RuleViolation
from blkif_spec.xenbus import schema
from blkif_spec.xenbus.schema import Side, When

Tree = Mapping[str, str]

SIDES = (Side.FRONTEND.value, Side.BACKEND.value)
QUEUE_DIR = re.compile(r"queue-(0|[1-9][0-9]*)(?:/(.*))?")
RING_REF_N = re.compile(r"ring-ref(0|[1-9][0-9]*)")
MAX_LISTED_MISSING = 64  # beyond this, a hostile count is reported as one summary finding


class Phase(IntEnum):
    """How far the pair has got, which decides the keys that must exist.

    `validate` infers it per side from the `state` keys when not given: the
    frontend's transport keys are due once the frontend is Initialised or
    Connected (XK-8), the device properties once the backend is Connected (XK-9).
    """

    CREATED = 1  # toolstack wrote both directories (SM-1)
    INIT_WAIT = 2  # backend published its offers (XK-7, timing only: offers are optional)
    INITIALISED = 3  # frontend published its choice (XK-8)
    CONNECTED = 4  # backend published device properties (XK-9)
    CLOSING = 5  # tearing down: nothing more is due; what is present is still checked


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule a tree breaks. Its repr is valid Python, so it can be pasted into a test."""

    rule: str
    path: str
    expected: str
    observed: str | None
    message: str
    side: str

    def __post_init__(self) -> None:
        catalogue.get(self.rule)  # an unknown ID is a bug here, never a silent new rule
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, not {self.side!r}")

    @property
    def level(self) -> str:
        return catalogue.get(self.rule).level

    @property
    def enforcement(self) -> str:
        return catalogue.get(self.rule).enforcement

    def violation(self) -> RuleViolation:
        return RuleViolation(
            self.rule, self.expected, self.observed, f"{self.side} {self.path}: {self.message}"
        )


@dataclass(frozen=True, slots=True)
class _Needs:
    frontend_transport: bool
    device_properties: bool


@dataclass(slots=True)
class _Side:
    """One directory: raw values, what parsed, and which keys were malformed."""

    name: Side
    raw: Tree
    parsed: dict[str, object] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)

    def add(self, rule: str, path: str, expected: object, message: str) -> None:
        observed = self.raw.get(path)
        self.findings.append(Finding(rule, path, str(expected), observed, message, self.name.value))

    def has(self, key: str) -> bool:
        return key in self.raw

    def ok(self, key: str) -> bool:
        """Present and well-formed."""
        return key in self.parsed

    def get(self, key: str) -> object:
        """The parsed value (absent ⇒ schema default); only call when `key` is not in `bad`."""
        if key in self.parsed:
            return self.parsed[key]
        return schema.read(self.raw, self.name, key)


def state_of(tree: Tree) -> int | None:
    """The `state` as an int; None when absent or malformed (then nothing is inferred from it)."""
    try:
        return schema.parse_state(tree["state"])
    except (KeyError, RuleViolation):
        return None


def infer_phase(frontend: Tree, backend: Tree) -> Phase:
    """A single phase for the pair, for reports; `validate` itself judges each side by its own state."""
    fe, be = state_of(frontend), state_of(backend)
    if fe in (XenbusState.Closing, XenbusState.Closed) or be in (XenbusState.Closing, XenbusState.Closed):
        return Phase.CLOSING
    if be == XenbusState.Connected:
        return Phase.CONNECTED
    if fe in (XenbusState.Initialised, XenbusState.Connected):
        return Phase.INITIALISED
    if be in (XenbusState.InitWait, XenbusState.Initialised):
        return Phase.INIT_WAIT
    return Phase.CREATED


def _needs(frontend: Tree, backend: Tree, phase: Phase | None) -> _Needs:
    if phase is not None:
        phase = Phase(phase)
        return _Needs(phase in (Phase.INITIALISED, Phase.CONNECTED), phase == Phase.CONNECTED)
    return _Needs(
        frontend_transport=state_of(frontend) in (XenbusState.Initialised, XenbusState.Connected),
        device_properties=state_of(backend) == XenbusState.Connected,
    )


# --------------------------------------------------------------------------- per-key checks


def _scan_formats(side: _Side) -> None:
    """XK-4 and each row's own constraint, for every key the schema knows (DIV-10 for protocol)."""
    for key in sorted(side.raw):
        row = schema.lookup(side.name, key)
        if row is None:
            continue
        try:
            side.parsed[key] = schema.parse_value(row, side.raw[key], key=key)
        except RuleViolation as bad:
            side.bad.add(key)
            side.add(bad.rule_id, key, bad.expected, f"{key}={side.raw[key]!r} is malformed")


def _check_presence(side: _Side, needs: _Needs) -> None:
    """Keys required at creation always; device properties once the backend is Connected (XK-9)."""
    for row in schema.required_keys(side.name):
        due = row.when is When.CREATION or (
            row.when is When.BEFORE_BACKEND_CONNECTED and needs.device_properties
        )
        if due and not side.has(row.key):
            side.add(row.required_by, row.key, f"{row.key} present ({row.when})", f"{row.key} is missing")


def _check_device_properties(be: _Side) -> None:
    """Cross-key rules of the backend's device properties (XK-B33, XK-B34, DISC-4)."""
    sector_size = be.parsed.get("sector-size")  # parsed only when well-formed and a valid size
    unit = sector_size
    if sector_size is not None and be.has("physical-sector-size"):
        physical = be.parsed.get("physical-sector-size")
        unit = physical
        if physical is not None and (physical < sector_size or physical % sector_size):
            be.add("XK-B33", "physical-sector-size", f"a multiple of sector-size {sector_size}", "bad size")
            unit = None
    if unit is not None and be.ok("sectors") and (be.parsed["sectors"] * SECTOR_SIZE) % unit:
        be.add("XK-B34", "sectors", f"sectors × 512 a multiple of {unit}", "size not whole physical sectors")
    if be.parsed.get("feature-discard") is True:
        for key in ("discard-granularity", "discard-alignment"):
            if not be.has(key):
                be.add("DISC-4", key, f"{key} published with feature-discard=1", f"{key} is missing")


def _check_legacy_pages(side: _Side, pages_key: str, order_key: str) -> None:
    """XK-11: a page-count key, when published beside its order key, must agree with it."""
    if side.ok(pages_key) and side.ok(order_key):
        pages, order = side.parsed[pages_key], side.parsed[order_key]
        if not (schema.is_power_of_two(pages) and pages.bit_length() - 1 == order):
            side.add("XK-11", pages_key, f"2^{order_key} = 2^{order}", "legacy page count disagrees")


# --------------------------------------------------------------------------- frontend transport


def _queue_dirs(raw: Tree) -> dict[int, list[str]]:
    """queue index → keys under it (the `queue-N` node itself included), canonical indices only."""
    dirs: dict[int, list[str]] = {}
    for key in raw:
        match = QUEUE_DIR.fullmatch(key)
        if match:
            dirs.setdefault(int(match.group(1)), []).append(key)
    return dirs


def _flat_transport_keys(raw: Tree) -> list[str]:
    return sorted(k for k in raw if k in ("event-channel", "ring-ref") or RING_REF_N.fullmatch(k))


def _check_ring_refs(fe: _Side, prefix: str) -> None:
    """MPR-2: `ring-page-order` present (even "0") ⇒ ring-ref0..2^order-1; absent ⇒ ring-ref."""
    flat, first = f"{prefix}ring-ref", f"{prefix}ring-ref0"
    if not fe.has("ring-page-order"):
        if not fe.has(flat):
            hint = "; ring-ref0… found, but without ring-page-order the backend reads ring-ref"
            fe.add(
                "MPR-2", flat, "ring-ref (no ring-page-order)", "missing" + (hint if fe.has(first) else "")
            )
        return
    if "ring-page-order" in fe.bad:
        return
    order = fe.parsed["ring-page-order"]
    if order >= 32 or 1 << order > len(fe.raw):
        fe.add("MPR-2", first, f"2^{order} ring-ref%u keys", "the tree cannot hold that many ring refs")
        return
    wanted = [f"{prefix}ring-ref{i}" for i in range(1 << order)]
    span = wanted[0] if len(wanted) == 1 else f"{wanted[0]}..{wanted[-1]}"
    missing = [key for key in wanted if not fe.has(key)]
    if missing and len(missing) == len(wanted) and fe.has(flat):
        fe.add("MPR-2", first, span, "ring-page-order present but only "
               "ring-ref written: the backend reads ring-ref0 (DIV-11)")  # fmt: skip
        return
    for key in missing:
        fe.add("MPR-2", key, span, f"{key} is missing")


def _check_limits(fe: _Side, be: _Side | None, queues: int | None) -> None:
    """MPR-1 (order ≤ the backend's max, absent ⇒ 0) and MQ-2 (1 ≤ n ≤ max, absent ⇒ 1)."""
    if queues is not None and queues < 1:
        fe.add("MQ-2", "multi-queue-num-queues", "1 ≤ n", "no queue at all")
    if be is None:
        return
    if fe.ok("ring-page-order"):
        try:
            limit = schema.max_ring_page_order(be.raw)
        except RuleViolation:
            limit = None  # the backend's own key is reported on its side
        if limit is not None and fe.parsed["ring-page-order"] > limit:
            fe.add("MPR-1", "ring-page-order", f"≤ {limit} (backend max-ring-page-order)", "order too large")
    if queues is not None and queues >= 1 and "multi-queue-max-queues" not in be.bad:
        limit = be.get("multi-queue-max-queues")
        if limit >= 1 and queues > limit:
            absent = "" if be.has("multi-queue-max-queues") else " (backend does not offer multi-queue)"
            fe.add("MQ-2", "multi-queue-num-queues", f"1 ≤ n ≤ {limit}{absent}", "too many queues")


def _check_flat_layout(fe: _Side, queue_dirs: dict[int, list[str]]) -> None:
    """MQ-3: one queue (n = 1 or absent) uses the flat keys and no `queue-0/`."""
    if queue_dirs:
        first = min(queue_dirs)
        fe.add(
            "MQ-3", f"queue-{first}", "flat ring-ref*/event-channel, no queue-N/", "queue layout with n ≤ 1"
        )
        if not _flat_transport_keys(fe.raw):
            return  # the layout is wrong as a whole: one finding
    _check_ring_refs(fe, "")
    if not fe.has("event-channel"):
        fe.add("XK-8", "event-channel", "event-channel before Initialised", "event-channel is missing")


def _check_queue_layout(fe: _Side, queues: int, queue_dirs: dict[int, list[str]]) -> None:
    """MQ-4: n ≥ 2 ⇒ queue-0..n-1 each with event-channel and ring refs, nothing flat."""
    for key in _flat_transport_keys(fe.raw):
        fe.add("MQ-4", key, "no top-level event-channel/ring-ref* when n ≥ 2", f"top-level {key}")
    present = sorted(q for q in queue_dirs if q < queues)
    if queues - len(present) > MAX_LISTED_MISSING:
        fe.add("MQ-4", "multi-queue-num-queues", f"queue-0..queue-{queues - 1}",
               f"only {len(present)} of {queues} queue directories exist")  # fmt: skip
    else:
        for q in sorted(set(range(queues)) - set(present)):
            fe.add("MQ-4", f"queue-{q}", f"queue-0..queue-{queues - 1}", f"queue-{q} is missing")
    for q in present:
        _check_ring_refs(fe, f"queue-{q}/")
        if not fe.has(f"queue-{q}/event-channel"):
            fe.add("MQ-4", f"queue-{q}/event-channel", "an event channel per queue", "missing")


def _check_transport(fe: _Side, be: _Side | None) -> None:
    """The frontend's published transport (XK-8, MPR-1/2, MQ-2/3/4)."""
    queue_dirs = _queue_dirs(fe.raw)
    choice_keys = ("ring-page-order", "multi-queue-num-queues")
    if not (queue_dirs or _flat_transport_keys(fe.raw) or any(fe.has(k) for k in choice_keys)):
        fe.add("XK-8", "event-channel", "transport keys before Initialised", "no transport key at all")
        return
    if "multi-queue-num-queues" in fe.bad:
        return  # layout undecidable; the XK-4 finding says why
    queues = fe.parsed.get("multi-queue-num-queues")
    _check_limits(fe, be, queues)
    if queues is not None and queues < 1:
        return
    if queues is None or queues == 1:
        _check_flat_layout(fe, queue_dirs)
    else:
        _check_queue_layout(fe, queues, queue_dirs)


def _check_frontend_always(fe: _Side) -> None:
    """Rules about keys that are wrong whenever they appear (MQ-5, XK-F16)."""
    for key in sorted(fe.raw):
        match = QUEUE_DIR.fullmatch(key)
        if match and match.group(2) == "ring-page-order":
            fe.add("MQ-5", key, "ring-page-order only at top level", "per-queue ring-page-order")
    if fe.has("feature-large-sector-size"):
        fe.add("XK-F16", "feature-large-sector-size", "absent (deprecated)", "a frontend wrote it")


# --------------------------------------------------------------------------- entry points


def validate(frontend: Tree, backend: Tree, *, phase: Phase | None = None) -> list[Finding]:
    """Every rule the pair of trees breaks, frontend findings first, in a stable order.

    An empty dict means the directory does not exist (or was not observed): that
    side is not judged, and nothing that needs it is checked. `phase` overrides
    what the `state` keys say about which keys are due.
    """
    needs = _needs(frontend, backend, phase)
    fe = _Side(Side.FRONTEND, frontend) if frontend else None
    be = _Side(Side.BACKEND, backend) if backend else None
    for side in (fe, be):
        if side is not None:
            _scan_formats(side)
            _check_presence(side, needs)
    if be is not None:
        _check_device_properties(be)
        _check_legacy_pages(be, "max-ring-pages", "max-ring-page-order")
    if fe is not None:
        _check_legacy_pages(fe, "num-ring-pages", "ring-page-order")
        _check_frontend_always(fe)
        if needs.frontend_transport:
            _check_transport(fe, be)
    return [f for side in (fe, be) if side is not None for f in side.findings]


def rules_of(findings: Iterable[Finding]) -> set[str]:
    return {f.rule for f in findings}


def blocking(findings: Iterable[Finding], enforcements: Iterable[str] = ("must",)) -> list[Finding]:
    """The findings whose catalogue enforcement is in `enforcements` (by default: must)."""
    wanted = set(enforcements)
    return [f for f in findings if f.enforcement in wanted]


def raise_first(findings: Iterable[Finding], enforcements: Iterable[str] = ("must",)) -> None:
    """Raise the first blocking finding as a RuleViolation (for code that must stop)."""
    for finding in blocking(findings, enforcements):
        raise finding.violation()


# --------------------------------------------------------------------------- write order


def validate_write_order(writes: Iterable[tuple[str, str | None]], side: Side | str) -> list[Finding]:
    """Judge the order in which one directory was written (XK-7.a/b, XK-8, XK-9).

    `writes` are (relative key, value) in the order xenstored processed them (a
    `xenstored -T` trace); value None removes the key, and key "." with None
    removes the whole directory. A key counts from its first write; rewrites
    (e.g. a resize of `sectors`, XK-10) are not judged again.
    """
    tree: dict[str, str] = {}  # the directory as written so far: findings quote current values
    out = _Side(Side(side), tree)
    state = 0
    for key, value in writes:
        if value is None:
            if key == ".":
                tree.clear()
                state = 0
            tree.pop(key, None)
            continue
        first = key not in tree
        tree[key] = value
        if key == "state":
            state = _next_state(out, state, value)
        elif first:
            _judge_first_write(out, key, state)
    return out.findings


def _next_state(out: _Side, state: int, value: str) -> int:
    try:
        new = schema.parse_state(value)
    except RuleViolation:
        return state
    if out.name is Side.BACKEND and new == XenbusState.Connected and state != new:
        for row in schema.required_keys(Side.BACKEND, When.BEFORE_BACKEND_CONNECTED):
            if not out.has(row.key):
                out.add("XK-9", row.key, f"{row.key} written before state=4", "state=4 written first")
    return new


def _judge_first_write(out: _Side, key: str, state: int) -> None:
    row = schema.lookup(out.name, key)
    if row is None:
        return
    active = (XenbusState.InitWait, XenbusState.Initialised, XenbusState.Connected)
    if out.name is Side.BACKEND and state in active:
        if row.when is When.BACKEND_TRANSPORT:
            out.add("XK-7.a", key, f"{key} before state=2 (transport parameter)", "written after InitWait")
        elif row.when is When.BACKEND_FEATURE:
            out.add("XK-7.b", key, f"{key} before state=2 (feature)", "written after InitWait")
        elif row.when is When.BEFORE_BACKEND_CONNECTED and state == XenbusState.Connected:
            out.add("XK-9", key, f"{key} before state=4 (device property)", "written after Connected")
    if out.name is Side.FRONTEND and state in (XenbusState.Initialised, XenbusState.Connected):
        if row.when is When.BEFORE_FRONTEND_INITIALISED:
            out.add("XK-8", key, f"{key} before state=3 (transport parameter)", "written after Initialised")
