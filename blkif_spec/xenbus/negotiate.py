"""What two trees negotiate, and the choices each side makes while negotiating.

Two kinds of functions live here:

* choosers a *frontend* uses (`choose_ring_order`, `choose_queues`,
  `indirect_limit`, `ring_ref_keys`, `frontend_transport`): they read the
  backend's offers leniently, as Linux's `xenbus_read_unsigned` does (junk is
  absent), because a frontend must keep working against a sloppy backend; the
  junk itself is `validate`'s business;
* the *backend's* reading of a frontend (`backend_reads`, `read_rings`): strict,
  because SEC-8 says a backend never acts on out-of-range or unparseable
  transport keys. It picks `ring-ref` vs `ring-ref%u` from the presence of
  `ring-page-order` only (MPR-2), never from whatever other keys are lying around.

`negotiate` gives the frozen `Negotiated` record for a pair that validates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from blkif_spec.consts import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    MAX_RING_PAGE_ORDER,
    PROTOCOL_TO_ABI,
    VDISK_CDROM,
    VDISK_READONLY,
    VDISK_REMOVABLE,
    X86_64_ABI,
)
from blkif_spec.errors import RuleViolation
from blkif_spec.xenbus import schema
from blkif_spec.xenbus.schema import Side, When
from blkif_spec.xenbus.validate import Phase, raise_first, validate

Tree = Mapping[str, str]
B, F = Side.BACKEND, Side.FRONTEND

#: Backend feature keys and their value when absent (absent ⇒ 0: not offered).
FEATURE_DEFAULTS: Mapping[str, str] = {
    row.key: row.default
    for row in schema.BACKEND_KEYS
    if row.when in (When.BACKEND_FEATURE, When.BACKEND_TRANSPORT, When.WITH_FEATURE_DISCARD)
    and row.default is not None
}


class RingKeys(NamedTuple):
    """The keys a backend reads for one ring: queue (None: the flat layout), ring refs, event channel."""

    queue: int | None
    ring_refs: tuple[str, ...]
    event_channel: str


class Ring(NamedTuple):
    """One ring's values as the backend read them."""

    queue: int | None
    grefs: tuple[int, ...]
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Features:
    """The backend's offers, defaults applied (absent ⇒ not offered)."""

    flush_cache: bool
    barrier: bool
    discard: bool
    discard_secure: bool
    persistent: bool
    max_indirect_segments: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Negotiated:
    """What a connected pair agreed on; `as_report()` gives report.json's `negotiated`."""

    protocol: str | None  # as the frontend wrote it; None when absent (DIV-9)
    abi: str | None  # the ABI in use; None for an unknown protocol string (DIV-10)
    queues: int
    ring_page_order: int
    ring_ref_indexed: bool  # ring-page-order present ⇒ ring-ref%u (MPR-2)
    persistent: bool
    frontend_persistent: bool
    backend_persistent: bool
    max_indirect_segments: int
    flush_cache: bool
    barrier: bool
    discard: bool
    discard_granularity: int | None  # spec default = sector-size when absent (DIV-18)
    discard_alignment: int
    discard_secure: bool
    sector_size: int | None  # None until the backend published it (XK-9)
    physical_sector_size: int | None
    sectors: int | None
    info: int | None

    @property
    def readonly(self) -> bool:
        return bool((self.info or 0) & VDISK_READONLY)

    @property
    def cdrom(self) -> bool:
        return bool((self.info or 0) & VDISK_CDROM)

    @property
    def removable(self) -> bool:
        return bool((self.info or 0) & VDISK_REMOVABLE)

    def as_report(self) -> dict[str, object]:
        return {
            "protocol": self.abi,
            "queues": self.queues,
            "ring_page_order": self.ring_page_order,
            "persistent": self.persistent,
            "max_indirect_segments": self.max_indirect_segments,
            "features": {
                "flush_cache": self.flush_cache,
                "barrier": self.barrier,
                "discard": self.discard,
                "discard_secure": self.discard_secure,
                "discard_granularity": self.discard_granularity,
                "discard_alignment": self.discard_alignment,
                "sector_size": self.sector_size,
                "physical_sector_size": self.physical_sector_size,
                "sectors": self.sectors,
                "info": self.info,
            },
        }


# --------------------------------------------------------------------------- frontend choices


def max_ring_order_offered(backend: Tree) -> int:
    """XK-F11: MAX(ffs(max-ring-pages) - 1, max-ring-page-order); absent or junk ⇒ 0 (MPR-1)."""
    return schema.max_ring_page_order(backend, lenient=True)


def choose_ring_order(backend: Tree, want: int) -> int:
    """The ring order a frontend that wants `want` uses with this backend (MPR-1)."""
    if want < 0:
        raise ValueError(f"want must be ≥ 0, not {want}")
    return min(want, max_ring_order_offered(backend))


def choose_queues(backend: Tree, want: int) -> int:
    """The queue count a frontend that wants `want` uses (MQ-2; absent offer ⇒ 1)."""
    if want < 1:
        raise ValueError(f"want must be ≥ 1, not {want}")
    return min(want, schema.max_queues(backend, lenient=True))


def indirect_limit(backend: Tree, want: int | None = None) -> int:
    """Segments per indirect request a frontend may send: ≤ the offer (DIV-4 reads "less than"
    as ≤), ≤ 8 indirect pages (IND-3), ≤ `want`. 0: no indirect (absent offer)."""
    offered = schema.read_lenient(backend, B, "feature-max-indirect-segments")
    limit = min(offered, BLKIF_MAX_INDIRECT_SEGMENTS)
    return limit if want is None else min(limit, want)


def feature(backend: Tree, key: str) -> bool:
    """A backend `feature-*`/`discard-secure` flag with its default (absent or junk ⇒ no)."""
    return bool(schema.read_lenient(backend, B, key, fallback=False))


def features(backend: Tree) -> Features:
    return Features(
        flush_cache=feature(backend, "feature-flush-cache"),
        barrier=feature(backend, "feature-barrier"),
        discard=feature(backend, "feature-discard"),
        discard_secure=feature(backend, "discard-secure"),
        persistent=feature(backend, "feature-persistent"),
        max_indirect_segments=indirect_limit(backend),
    )


def persistent(frontend: Tree, backend: Tree) -> bool:
    """Persistent grants are in use when both sides advertise 1 (conventions §4, PG-1)."""
    fe = schema.read_lenient(frontend, F, "feature-persistent", fallback=False)
    return bool(fe) and feature(backend, "feature-persistent")


def _prefix(queue: int | None, nqueues: int) -> str:
    if nqueues < 1:
        raise ValueError(f"nqueues must be ≥ 1, not {nqueues}")
    if nqueues == 1:
        if queue not in (None, 0):
            raise ValueError(f"queue {queue} with a single queue (flat layout, MQ-3)")
        return ""
    if queue is None or not 0 <= queue < nqueues:
        raise ValueError(f"queue must be in 0..{nqueues - 1} with {nqueues} queues (MQ-4)")
    return f"queue-{queue}/"


def ring_ref_keys(
    order: int, queue: int | None = None, nqueues: int = 1, *, write_order: bool | None = None
) -> tuple[str, ...]:
    """The ring-ref key names a frontend writes for one ring.

    `write_order` says whether the frontend publishes `ring-page-order` (default:
    only when order > 0, as Linux does). Its presence, not the order's value,
    selects `ring-ref%u` (MPR-2): order 0 with the key written is `ring-ref0`.
    """
    prefix = _prefix(queue, nqueues)
    indexed = order > 0 if write_order is None else write_order
    if order > 0 and not indexed:
        raise ValueError("a multi-page ring needs ring-page-order (MPR-2)")
    if not indexed:
        return (f"{prefix}ring-ref",)
    return tuple(f"{prefix}ring-ref{i}" for i in range(1 << order))


def event_channel_key(queue: int | None = None, nqueues: int = 1) -> str:
    return f"{_prefix(queue, nqueues)}event-channel"


def frontend_transport(
    *,
    order: int,
    grefs: Sequence[Sequence[int]],
    ports: Sequence[int],
    protocol: str | None = X86_64_ABI,
    persistent: bool | None = True,
    write_order: bool | None = None,
) -> dict[str, str]:
    """Every transport key a frontend publishes before Initialised (XK-8), as Linux lays them out.

    One entry of `grefs` (2^order refs) and `ports` per queue. `multi-queue-num-queues`
    is written only for ≥ 2 queues and `ring-page-order` only for order > 0 unless
    `write_order` says otherwise (MQ-3, MPR-2). None for protocol/persistent: not written.
    """
    nqueues = len(ports)
    if len(grefs) != nqueues:
        raise ValueError(f"{len(grefs)} gref lists for {nqueues} event channels")
    indexed = order > 0 if write_order is None else write_order
    keys: dict[str, str] = {}
    if indexed:
        keys["ring-page-order"] = schema.format_uint(order)
    if nqueues >= 2:
        keys["multi-queue-num-queues"] = schema.format_uint(nqueues)
    for q, (refs, port) in enumerate(zip(grefs, ports, strict=True)):
        queue = q if nqueues >= 2 else None
        if queue is not None:
            keys[f"queue-{q}"] = ""
        names = ring_ref_keys(order, queue, nqueues, write_order=indexed)
        if len(refs) != len(names):
            raise ValueError(f"queue {q}: {len(refs)} grefs for a {len(names)}-page ring")
        keys.update({name: schema.format_uint(ref) for name, ref in zip(names, refs, strict=True)})
        keys[event_channel_key(queue, nqueues)] = schema.format_uint(port)
    if protocol is not None:
        keys["protocol"] = protocol
    if persistent is not None:
        keys["feature-persistent"] = schema.format_bool(persistent)
    return keys


# --------------------------------------------------------------------------- backend reading


def _strict_uint(frontend: Tree, key: str) -> int:
    try:
        return schema.parse_uint32(frontend[key], key=key)
    except RuleViolation as bad:
        raise RuleViolation(
            "SEC-8", "a decimal uint32", bad.observed, f"frontend {key}: unparseable"
        ) from None


def _read_order(frontend: Tree, max_order: int) -> tuple[int, bool]:
    if "ring-page-order" not in frontend:
        return 0, False
    order = _strict_uint(frontend, "ring-page-order")
    if order > max_order:
        raise RuleViolation("MPR-3", f"ring-page-order ≤ {max_order}", order, "fatal negotiation error")
    return order, True


def _read_queues(frontend: Tree, max_queues: int | None) -> int:
    if "multi-queue-num-queues" not in frontend:
        return 1
    queues = _strict_uint(frontend, "multi-queue-num-queues")
    if queues < 1 or (max_queues is not None and queues > max_queues):
        bound = "" if max_queues is None else f" ≤ {max_queues}"
        raise RuleViolation("MQ-2", f"1 ≤ multi-queue-num-queues{bound}", queues, "fatal negotiation error")
    return queues


def _read_ring(
    frontend: Tree, queue: int | None, nqueues: int, order: int, indexed: bool
) -> tuple[RingKeys, Ring]:
    names = ring_ref_keys(order, queue, nqueues, write_order=indexed)
    channel = event_channel_key(queue, nqueues)
    if queue is not None and not any(
        k == f"queue-{queue}" or k.startswith(f"queue-{queue}/") for k in frontend
    ):
        raise RuleViolation(
            "MQ-4", f"queue-{queue}/ with {nqueues} queues", "absent", "queue directory missing"
        )
    for name in names:
        if name not in frontend:
            scheme = (
                "ring-ref%u (ring-page-order present)" if indexed else "ring-ref (ring-page-order absent)"
            )
            raise RuleViolation(
                "MPR-2", scheme, f"{name} absent", "the backend picks keys by ring-page-order"
            )
    if channel not in frontend:
        rule = "XK-8" if queue is None else "MQ-4"
        raise RuleViolation(rule, f"{channel} present", "absent", "no event channel for the ring")
    grefs = tuple(_strict_uint(frontend, name) for name in names)
    return RingKeys(queue, names, channel), Ring(queue, grefs, _strict_uint(frontend, channel))


def _backend_limits(backend: Tree | None) -> tuple[int, int | None]:
    """The backend's own offers: from its tree, or (None) Linux's defaults with no queue cap."""
    if backend is None:
        return MAX_RING_PAGE_ORDER, None
    return schema.max_ring_page_order(backend, lenient=True), schema.max_queues(backend, lenient=True)


def _read_all(frontend: Tree, backend: Tree | None) -> list[tuple[RingKeys, Ring]]:
    max_order, max_queues = _backend_limits(backend)
    order, indexed = _read_order(frontend, max_order)
    nqueues = _read_queues(frontend, max_queues)
    if nqueues == 1:
        flat = ("event-channel", "ring-ref", "ring-ref0")
        if not any(k in frontend for k in flat) and any(k.startswith("queue-0") for k in frontend):
            raise RuleViolation("MQ-3", "flat keys with one queue", "queue-0/ layout", "n = 1 means flat")
        return [_read_ring(frontend, None, 1, order, indexed)]
    return [_read_ring(frontend, q, nqueues, order, indexed) for q in range(nqueues)]


def backend_reads(frontend: Tree, backend: Tree | None = None) -> list[RingKeys]:
    """The keys a conforming backend reads from this frontend, one entry per ring.

    Raises RuleViolation: MPR-3 for an order above the backend's max, MQ-2 for a
    queue count outside 1..max, SEC-8 for an unparseable value, MPR-2/MQ-3/MQ-4/XK-8
    for keys the chosen layout needs but the frontend did not write. `backend` is
    the backend's own tree (its offers); None assumes Linux's default order cap
    (MPR-5) and no queue cap.
    """
    return [keys for keys, _ in _read_all(frontend, backend)]


def read_rings(frontend: Tree, backend: Tree | None = None) -> list[Ring]:
    """Like `backend_reads`, returning the parsed grant refs and event channel of each ring."""
    return [ring for _, ring in _read_all(frontend, backend)]


# --------------------------------------------------------------------------- the record


def _optional(tree: Tree, side: Side, key: str) -> int | None:
    return schema.read_lenient(tree, side, key) if key in tree else None


def negotiate(
    frontend: Tree, backend: Tree, *, default_abi: str = X86_64_ABI, phase: Phase | None = None
) -> Negotiated:
    """The negotiated parameters of a pair, after `validate` found nothing `must`-level.

    `default_abi` is what an absent `protocol` means: the spec says the backend's
    native ABI; Linux and QEMU on x86 take x86_32 (DIV-9, both pass). An unknown
    protocol string is a variant (DIV-10): `abi` is None and nothing is raised.
    Properties the backend has not published yet (before Connected) are None.
    """
    raise_first(validate(frontend, backend, phase=phase))
    protocol = frontend.get("protocol")
    abi = default_abi if protocol is None else PROTOCOL_TO_ABI.get(protocol)
    offers = features(backend)
    sector_size = _optional(backend, B, "sector-size")
    granularity = _optional(backend, B, "discard-granularity")
    fe_persistent = bool(schema.read_lenient(frontend, F, "feature-persistent", fallback=False))
    return Negotiated(
        protocol=protocol,
        abi=abi,
        queues=schema.read_lenient(frontend, F, "multi-queue-num-queues"),
        ring_page_order=schema.read_lenient(frontend, F, "ring-page-order"),
        ring_ref_indexed="ring-page-order" in frontend,
        persistent=fe_persistent and offers.persistent,
        frontend_persistent=fe_persistent,
        backend_persistent=offers.persistent,
        max_indirect_segments=offers.max_indirect_segments,
        flush_cache=offers.flush_cache,
        barrier=offers.barrier,
        discard=offers.discard,
        discard_granularity=granularity if granularity is not None else sector_size,
        discard_alignment=schema.read_lenient(backend, B, "discard-alignment"),
        discard_secure=offers.discard_secure,
        sector_size=sector_size,
        physical_sector_size=_optional(backend, B, "physical-sector-size") or sector_size,
        sectors=_optional(backend, B, "sectors"),
        info=_optional(backend, B, "info"),
    )
