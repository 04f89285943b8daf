"""Strategies for vbd XenStore trees: consistent pairs, and single mutations with the rule they break.

`pair_specs()` draws the parameters of a pair (queues 1..8, ring order 0..4,
features, device geometry, how far the handshake got); `build_pair` lays them
out exactly as the §4 tables and Linux do, so every generated pair validates
clean. `mutated_pairs()` applies one fault to a connected pair and says which
rule the validator must report, so "one fault, one finding" is checked for
every kind of fault, not just the fixtures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from hypothesis import strategies as st

from blkif_spec.consts import ABIS, MAX_RING_PAGE_ORDER, SECTOR_SIZE
from blkif_spec.xenbus import frontend_transport
from blkif_spec.xenbus.schema import BACKEND_KEYS, FRONTEND_KEYS, Format, Side

Tree = dict[str, str]

#: The two recorded trees of device 51760 (Linux 6.1 blkback + blkfront, 2 queues), transcribed
#: from ../shared/data/xenstore-linux-6.1.txt so that tests never read ../shared at run time.
RECORDED_BACKEND_2Q = {
    "frontend": "/local/domain/0/device/vbd/51760",
    "params": "/dev/loop1",
    "script": "/etc/xen/scripts/block",
    "frontend-id": "0",
    "online": "1",
    "removable": "0",
    "bootable": "1",
    "state": "4",
    "dev": "xvdd",
    "type": "phy",
    "mode": "w",
    "device-type": "disk",
    "discard-enable": "1",
    "specification": "xen",
    "feature-max-indirect-segments": "256",
    "multi-queue-max-queues": "2",
    "max-ring-page-order": "4",
    "physical-device": "7:1",
    "physical-device-path": "/dev/loop1",
    "hotplug-status": "connected",
    "feature-flush-cache": "1",
    "discard-granularity": "4096",
    "discard-alignment": "0",
    "discard-secure": "0",
    "feature-discard": "1",
    "feature-barrier": "1",
    "feature-persistent": "1",
    "sectors": "65536",
    "info": "0",
    "sector-size": "512",
    "physical-sector-size": "512",
}
RECORDED_FRONTEND_2Q = {
    "backend": "/local/domain/0/backend/vbd/0/51760",
    "backend-id": "0",
    "state": "4",
    "virtual-device": "51760",
    "device-type": "disk",
    "trusted": "1",
    "protocol": "x86_64-abi",
    "multi-queue-num-queues": "2",
    "queue-0": "",
    "queue-0/ring-ref": "9",
    "queue-0/event-channel": "23",
    "queue-1": "",
    "queue-1/ring-ref": "8",
    "queue-1/event-channel": "24",
    "feature-persistent": "1",
}

#: (backend state, frontend state) of each handshake stage the generator can stop at.
STAGES: dict[str, tuple[int, int]] = {
    "created": (1, 1),
    "initwait": (2, 1),
    "initialised": (2, 3),
    "connecting": (4, 3),
    "connected": (4, 4),
    "closed": (6, 6),
}


@dataclass(frozen=True)
class PairSpec:
    """The parameters a pair of trees is built from; None means "key not written"."""

    stage: str
    fe_domid: int
    devid: int
    queues: int
    max_queues: int | None
    order: int
    max_order: int | None
    legacy_max_pages: bool  # backend also writes max-ring-pages (XK-11)
    write_order: bool  # frontend writes ring-page-order (required when order > 0)
    legacy_num_pages: bool  # frontend also writes num-ring-pages
    gref_base: int
    port_base: int
    protocol: str | None
    fe_persistent: bool | None
    be_persistent: bool | None
    max_indirect: int | None
    flush: bool | None
    barrier: bool | None
    discard: bool | None
    discard_granularity: int
    discard_secure: bool | None
    sector_size: int
    physical_sector_size: int | None
    sectors: int
    info: int

    @property
    def states(self) -> tuple[int, int]:
        return STAGES[self.stage]

    @property
    def max_order_effective(self) -> int:
        """What the backend offers (XK-F11): the order key, or the legacy page count alone."""
        return self.max_order if self.max_order is not None else 0


@dataclass(frozen=True)
class GeneratedPair:
    spec: PairSpec
    frontend: Tree
    backend: Tree


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _backend_tree(s: PairSpec) -> Tree:
    be_state, _ = s.states
    dev = {
        "frontend": f"/local/domain/{s.fe_domid}/device/vbd/{s.devid}",
        "frontend-id": str(s.fe_domid),
        "online": "1",
        "removable": "0",
        "bootable": "1",
        "state": str(be_state),
        "dev": "xvda",
        "type": "phy",
        "mode": "w",
        "params": "/dev/loop0",
        "device-type": "disk",
        "discard-enable": "1",
    }
    if be_state == 1:
        return dev
    dev["physical-device"] = "7:0"
    if s.max_queues is not None:
        dev["multi-queue-max-queues"] = str(s.max_queues)
    if s.max_order is not None:
        dev["max-ring-page-order"] = str(s.max_order)
        if s.legacy_max_pages:
            dev["max-ring-pages"] = str(1 << s.max_order)
    if s.max_indirect is not None:
        dev["feature-max-indirect-segments"] = str(s.max_indirect)
    if be_state >= 4:
        dev.update(_device_properties(s))
    return dev


def _device_properties(s: PairSpec) -> Tree:
    props: Tree = {"sectors": str(s.sectors), "info": str(s.info), "sector-size": str(s.sector_size)}
    if s.physical_sector_size is not None:
        props["physical-sector-size"] = str(s.physical_sector_size)
    for key, value in (
        ("feature-flush-cache", s.flush),
        ("feature-barrier", s.barrier),
        ("feature-persistent", s.be_persistent),
    ):
        if value is not None:
            props[key] = _flag(value)
    if s.discard is not None:
        props["feature-discard"] = _flag(s.discard)
        if s.discard:
            props["discard-granularity"] = str(s.discard_granularity)
            props["discard-alignment"] = "0"
            if s.discard_secure is not None:
                props["discard-secure"] = _flag(s.discard_secure)
    return props


def transport(s: PairSpec, *, queues: int | None = None, order: int | None = None) -> Tree:
    """The frontend's transport keys for `s` (optionally with another queue count or order)."""
    queues = s.queues if queues is None else queues
    order = s.order if order is None else order
    pages = 1 << order
    grefs = [[s.gref_base + q * pages + i for i in range(pages)] for q in range(queues)]
    ports = [s.port_base + q for q in range(queues)]
    keys = frontend_transport(
        order=order,
        grefs=grefs,
        ports=ports,
        protocol=s.protocol,
        persistent=s.fe_persistent,
        write_order=s.write_order or order > 0,
    )
    if s.legacy_num_pages and "ring-page-order" in keys:
        keys["num-ring-pages"] = str(pages)
    return keys


def _frontend_tree(s: PairSpec) -> Tree:
    fe_state = s.states[1]
    tree = {
        "backend": f"/local/domain/0/backend/vbd/{s.fe_domid}/{s.devid}",
        "backend-id": "0",
        "state": str(fe_state),
        "virtual-device": str(s.devid),
        "device-type": "disk",
        "trusted": "1",
    }
    if fe_state >= 3:
        tree.update(transport(s))
    return tree


def build_pair(s: PairSpec) -> GeneratedPair:
    return GeneratedPair(s, _frontend_tree(s), _backend_tree(s))


_STAGE_STRATEGIES: dict[tuple[str, ...], st.SearchStrategy[GeneratedPair]] = {}


_BOOL3 = st.none() | st.booleans()
_MAYBE_QUEUES = st.none() | st.integers(1, 8)
_MAYBE_ORDER = st.none() | st.integers(0, MAX_RING_PAGE_ORDER)
_SECTOR_SIZES = st.sampled_from([512, 1024, 2048, 4096])
_PHYSICAL_FACTOR = st.none() | st.sampled_from([1, 2, 4, 8])
_PROTOCOLS = st.none() | st.sampled_from(ABIS)
_MAYBE_U32 = st.none() | st.integers(0, 2**32 - 1)
_GRANULARITY = st.sampled_from([512, 4096, 1 << 20])


@st.composite
def pair_specs(draw: st.DrawFn, stages: tuple[str, ...] = tuple(STAGES)) -> PairSpec:
    """Parameters of a consistent pair; every choice stays inside what the backend offers."""
    queues = draw(st.integers(1, 8))
    max_queues = draw(_MAYBE_QUEUES) if queues == 1 else draw(st.integers(queues, 8))
    order = draw(st.integers(0, MAX_RING_PAGE_ORDER))
    max_order = draw(_MAYBE_ORDER) if order == 0 else draw(st.integers(order, MAX_RING_PAGE_ORDER))
    sector_size = draw(_SECTOR_SIZES)
    factor = draw(_PHYSICAL_FACTOR)
    physical = None if factor is None else factor * sector_size
    unit = (physical or sector_size) // SECTOR_SIZE
    write_order = order > 0 or draw(st.booleans())
    return PairSpec(
        stage=draw(st.sampled_from(stages)),
        fe_domid=draw(st.integers(0, 0x7FEF)),
        devid=draw(st.integers(1, 0xFFFF)),
        queues=queues,
        max_queues=max_queues,
        order=order,
        max_order=max_order,
        legacy_max_pages=draw(st.booleans()),
        write_order=write_order,
        legacy_num_pages=write_order and draw(st.booleans()),
        gref_base=draw(st.integers(8, 2**32 - 1 - 10 * 32)),
        port_base=draw(st.integers(1, 2**32 - 1 - 10)),
        protocol=draw(_PROTOCOLS),
        fe_persistent=draw(_BOOL3),
        be_persistent=draw(_BOOL3),
        max_indirect=draw(_MAYBE_U32),
        flush=draw(_BOOL3),
        barrier=draw(_BOOL3),
        discard=draw(_BOOL3),
        discard_granularity=draw(_GRANULARITY),
        discard_secure=draw(_BOOL3),
        sector_size=sector_size,
        physical_sector_size=physical,
        sectors=unit * draw(st.integers(0, 2**40)),
        info=draw(st.integers(0, 7)),
    )


def valid_pairs(stages: tuple[str, ...] = tuple(STAGES)) -> st.SearchStrategy[GeneratedPair]:
    """Consistent pairs stopped at one of `stages` (one strategy object per stage set, built once)."""
    if stages not in _STAGE_STRATEGIES:
        _STAGE_STRATEGIES[stages] = pair_specs(stages).map(build_pair)
    return _STAGE_STRATEGIES[stages]


def connected_pairs() -> st.SearchStrategy[GeneratedPair]:
    return valid_pairs(("connected",))


# --------------------------------------------------------------------------- hostile values

#: Strings a lenient C parser reads as a number but XK-4 does not allow.
NON_DECIMAL = ("", " 1", "1 ", "+1", "-1", "0x10", "01", "1.0", "1e3", "\u0661", "1\n", "one", "0 ", "00")
UINT32_OVERFLOW = ("4294967296", "99999999999999999999")
UINT64_OVERFLOW = ("18446744073709551616",)


def hostile_uint(bits: int = 32) -> st.SearchStrategy[str]:
    """Values a uint`bits` key must refuse with XK-4."""
    overflow = UINT32_OVERFLOW if bits == 32 else UINT64_OVERFLOW
    return st.sampled_from(NON_DECIMAL + overflow) | st.integers(1 << bits, 1 << (bits + 8)).map(str)


_NUMERIC = {Format.UINT32, Format.UINT64, Format.BOOL01, Format.XENBUS_STATE, Format.DOMID}
NUMERIC_KEYS = {
    Side.BACKEND: {r.key: r.format for r in BACKEND_KEYS if r.format in _NUMERIC},
    Side.FRONTEND: {r.key: r.format for r in FRONTEND_KEYS if r.format in _NUMERIC and "%u" not in r.key},
}


# --------------------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Mutation:
    """One fault applied to a connected pair, and the only rule the validator may report."""

    name: str
    rule: str
    frontend: Tree
    backend: Tree
    base: GeneratedPair


Mutator = Callable[[st.DrawFn, GeneratedPair], tuple[str, Tree, Tree]]


def _ring_keys(tree: Tree) -> list[str]:
    return sorted(k for k in tree if k.rsplit("/", 1)[-1].startswith("ring-ref"))


def _drop_device_property(draw, p):
    key = draw(st.sampled_from(["sectors", "info", "sector-size"]))
    return "XK-9", p.frontend, {k: v for k, v in p.backend.items() if k != key}


def _drop_link(draw, p):
    side, key = draw(
        st.sampled_from([("be", "frontend"), ("be", "frontend-id"), ("fe", "backend"), ("fe", "backend-id")])
    )
    fe, be = dict(p.frontend), dict(p.backend)
    del (be if side == "be" else fe)[key]
    return "XK-2", fe, be


def _drop_state(draw, p):
    side = draw(st.sampled_from(["fe", "be"]))
    fe, be = dict(p.frontend), dict(p.backend)
    del (be if side == "be" else fe)["state"]
    return ("XK-B4" if side == "be" else "XK-F3"), fe, be


def _corrupt_number(draw, p):
    side = draw(st.sampled_from([Side.FRONTEND, Side.BACKEND]))
    tree = dict(p.frontend if side is Side.FRONTEND else p.backend)
    present = sorted(
        k for k in tree if k in NUMERIC_KEYS[side] or k in _ring_keys(tree) or k.endswith("/event-channel")
    )
    key = draw(st.sampled_from(present))
    fmt = NUMERIC_KEYS[side].get(key, Format.UINT32)
    tree[key] = draw(hostile_uint(64 if fmt is Format.UINT64 else 32))
    fe, be = (tree, p.backend) if side is Side.FRONTEND else (p.frontend, tree)
    return "XK-4", fe, be


def _bad_state_value(draw, p):
    side = draw(st.sampled_from(["fe", "be"]))
    fe, be = dict(p.frontend), dict(p.backend)
    (be if side == "be" else fe)["state"] = str(draw(st.integers(9, 2**32 - 1)))
    return ("XK-B4" if side == "be" else "XK-F3"), fe, be


def _queue0_with_one_queue(draw, p):
    fe = dict(p.frontend)
    extra = {
        f"queue-0/{k}": v for k, v in p.frontend.items() if k == "event-channel" or k.startswith("ring-ref")
    }
    fe.update({"queue-0": "", **extra})
    if draw(st.booleans()):
        fe["multi-queue-num-queues"] = "1"
    return "MQ-3", fe, p.backend


def _without_transport(p: GeneratedPair) -> Tree:
    old = transport(p.spec)
    return {k: v for k, v in p.frontend.items() if k not in old}


def _queues_above_max(draw, p):
    offered = p.spec.max_queues or 1
    fe = _without_transport(p)
    fe.update(transport(p.spec, queues=offered + draw(st.integers(1, 2))))
    return "MQ-2", fe, p.backend


def _zero_queues(draw, p):
    return "MQ-2", {**p.frontend, "multi-queue-num-queues": "0"}, p.backend


def _order_above_max(draw, p):
    fe = _without_transport(p)
    fe.update(transport(p.spec, order=min(p.spec.max_order_effective + 1, 5)))
    return "MPR-1", fe, p.backend


def _drop_ring_ref(draw, p):
    key = draw(st.sampled_from(_ring_keys(p.frontend)))
    return "MPR-2", {k: v for k, v in p.frontend.items() if k != key}, p.backend


def _order_zero_with_ring_ref(draw, p):
    return "MPR-2", {**p.frontend, "ring-page-order": "0"}, p.backend


def _order_key_removed(draw, p):
    return "MPR-2", {k: v for k, v in p.frontend.items() if k != "ring-page-order"}, p.backend


def _top_level_with_queues(draw, p):
    key = draw(st.sampled_from(["ring-ref", "event-channel", "ring-ref0"]))
    return "MQ-4", {**p.frontend, key: "7"}, p.backend


def _drop_queue_part(draw, p):
    q = draw(st.integers(0, p.spec.queues - 1))
    if draw(st.booleans()):
        gone = {f"queue-{q}/event-channel"}
    else:
        gone = {k for k in p.frontend if k == f"queue-{q}" or k.startswith(f"queue-{q}/")}
    return "MQ-4", {k: v for k, v in p.frontend.items() if k not in gone}, p.backend


def _per_queue_order(draw, p):
    q = draw(st.integers(0, p.spec.queues - 1))
    return "MQ-5", {**p.frontend, f"queue-{q}/ring-page-order": str(p.spec.order)}, p.backend


def _unknown_protocol(draw, p):
    value = draw(st.text(max_size=12).filter(lambda s: s not in ABIS))
    return "DIV-10", {**p.frontend, "protocol": value}, p.backend


def _large_sector_size(draw, p):
    return "XK-F16", {**p.frontend, "feature-large-sector-size": draw(st.sampled_from(["0", "1"]))}, p.backend


def _bad_sector_size(draw, p):
    size = draw(st.integers(0, 2**32 - 1).filter(lambda n: n < 512 or n & (n - 1)))
    return "XK-B32", p.frontend, {**p.backend, "sector-size": str(size)}


def _physical_not_multiple(draw, p):
    size = p.spec.sector_size
    physical = draw(st.integers(1, 2**32 - 1).filter(lambda n: n < size or n % size))
    return "XK-B33", p.frontend, {**p.backend, "physical-sector-size": str(physical)}


def _sectors_not_whole(draw, p):
    unit = (p.spec.physical_sector_size or p.spec.sector_size) // SECTOR_SIZE
    sectors = draw(st.integers(0, 2**40).filter(lambda n: n % unit))
    return "XK-B34", p.frontend, {**p.backend, "sectors": str(sectors)}


def _legacy_disagrees(draw, p):
    if draw(st.booleans()) and "ring-page-order" in p.frontend:
        return "XK-11", {**p.frontend, "num-ring-pages": str(2 << p.spec.order)}, p.backend
    return "XK-11", p.frontend, {**p.backend, "max-ring-pages": str(1 << (p.spec.max_order + 1))}


def _info_bits(draw, p):
    return "XK-B31", p.frontend, {**p.backend, "info": str(draw(st.integers(8, 2**32 - 1)))}


def _zero_max_queues(draw, p):
    return "XK-B22", p.frontend, {**p.backend, "multi-queue-max-queues": "0"}


def _bool_out_of_range(draw, p):
    keys = sorted(k for k in p.backend if k.startswith("feature-") and k != "feature-max-indirect-segments")
    key = draw(st.sampled_from(keys))
    rule = {
        "feature-barrier": "XK-B24",
        "feature-flush-cache": "XK-B25",
        "feature-discard": "XK-B26",
        "feature-persistent": "XK-B30",
    }[key]
    return rule, p.frontend, {**p.backend, key: str(draw(st.integers(2, 2**32 - 1)))}


def _no_transport(draw, p):
    transport_keys = set(transport(p.spec)) - {"protocol", "feature-persistent"}
    return "XK-8", {k: v for k, v in p.frontend.items() if k not in transport_keys}, p.backend


MUTATORS: dict[str, Mutator] = {
    f.__name__.lstrip("_"): f
    for f in (
        _drop_device_property,
        _drop_link,
        _drop_state,
        _corrupt_number,
        _bad_state_value,
        _queue0_with_one_queue,
        _queues_above_max,
        _zero_queues,
        _order_above_max,
        _drop_ring_ref,
        _order_zero_with_ring_ref,
        _order_key_removed,
        _top_level_with_queues,
        _drop_queue_part,
        _per_queue_order,
        _unknown_protocol,
        _large_sector_size,
        _bad_sector_size,
        _physical_not_multiple,
        _sectors_not_whole,
        _legacy_disagrees,
        _info_bits,
        _zero_max_queues,
        _bool_out_of_range,
        _no_transport,
    )
}


def _multi_queue(s: PairSpec) -> PairSpec:
    return s if s.queues >= 2 else replace(s, queues=2, max_queues=max(2, s.max_queues or 0))


#: Adjust a drawn spec so that a fault applies to it (e.g. MQ-3 needs a single queue).
PREPARE: dict[str, Callable[[PairSpec], PairSpec]] = {
    "queue0_with_one_queue": lambda s: replace(s, queues=1),
    "top_level_with_queues": _multi_queue,
    "drop_queue_part": _multi_queue,
    "per_queue_order": _multi_queue,
    "order_zero_with_ring_ref": lambda s: replace(s, order=0, write_order=False, legacy_num_pages=False),
    "order_key_removed": lambda s: replace(s, write_order=True),
    "sectors_not_whole": lambda s: replace(s, sector_size=4096, physical_sector_size=None, sectors=8),
    "legacy_disagrees": lambda s: replace(s, max_order=s.max_order or 0),
    "bool_out_of_range": lambda s: replace(s, flush=True),
}
#: Mutations of the frontend's transport keys: the ones a backend reading the frontend must notice.
TRANSPORT_MUTATIONS = (
    "queue0_with_one_queue",
    "queues_above_max",
    "zero_queues",
    "order_above_max",
    "drop_ring_ref",
    "order_zero_with_ring_ref",
    "order_key_removed",
    "drop_queue_part",
    "no_transport",
)


_CONNECTED_SPECS = pair_specs(("connected",))


@st.composite
def mutated_pairs(draw: st.DrawFn, names: tuple[str, ...] = tuple(MUTATORS)) -> Mutation:
    """A connected pair with exactly one fault, and the rule that fault breaks."""
    name = draw(st.sampled_from(sorted(names)))
    spec = PREPARE.get(name, lambda s: s)(draw(_CONNECTED_SPECS))
    base = build_pair(spec)
    rule, fe, be = MUTATORS[name](draw, base)
    return Mutation(name, rule, fe, be, base)


@st.composite
def every_mutation(draw: st.DrawFn) -> list[Mutation]:
    """One connected pair and each kind of fault applied to it in turn: every kind, every example."""
    spec = draw(_CONNECTED_SPECS)
    out = []
    for name in sorted(MUTATORS):
        base = build_pair(PREPARE.get(name, lambda s: s)(spec))
        rule, fe, be = MUTATORS[name](draw, base)
        out.append(Mutation(name, rule, fe, be, base))
    return out
