"""Shared tools of the conformance modules: connected environments and expectation helpers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from blkif_spec import catalogue, codec, consts, xenbus
from blkif_spec.consts import XenbusState
from blkif_spec.drivers.frontend import DeviceDisabled, Frontend, FrontendConfig, is_transport_key
from blkif_spec.factory import SlotFactory
from blkif_spec.harness import BackendUnderTest, FrontendUnderTest, TargetTimeout
from blkif_spec.xen.api import XenError, XenTimeout

#: Feature names of @pytest.mark.needs and the backend key that offers each.
FEATURE_KEYS = {
    "multi-queue": "multi-queue-max-queues",
    "multi-page": "max-ring-page-order",
    "indirect": "feature-max-indirect-segments",
    "persistent": "feature-persistent",
    "flush": "feature-flush-cache",
    "barrier": "feature-barrier",
    "discard": "feature-discard",
    "discard-secure": "discard-secure",
}


def require(env: BackendUnderTest | FrontendUnderTest, *features: str) -> None:
    """SKIP with the reason unless the backend offers every feature (conventions §4 `needs`)."""
    tree = env.backend_tree()
    for feature in features:
        key = FEATURE_KEYS[feature]
        value = tree.get(key)
        if value is None or value in ("0", ""):
            pytest.skip(f"backend does not advertise {key} ({feature})")


def require_leaks_visible(env: BackendUnderTest | FrontendUnderTest) -> None:
    """SKIP a test whose point is what the target still holds, where that cannot be seen."""
    if not env.leaks_visible:
        pytest.skip("a live target's grant mappings and ports are not visible from dom0's user space")


def require_destroyable(env: FrontendUnderTest) -> None:
    """SKIP a test that may make the frontend stop using the device with I/O pending (DIV-22) when
    the target cannot be destroyed (the dom0 kernel's blkfront): it would wedge the host."""
    if not env.destroyable:
        pytest.skip("a frontend that stops using the device may leave its I/O pending forever (DIV-22), "
                    "and this target cannot be destroyed: the test would wedge the host")  # fmt: skip


def require_restart(env: FrontendUnderTest) -> None:
    """SKIP with the reason when the frontend cannot be started again after a guest close."""
    if env.no_restart:
        pytest.skip(env.no_restart)


def expect(rule_id: str, expected: Any, observed: Any, detail: str = "") -> None:
    """Assert with the four-line message of conventions §4: rule and summary, expected, observed."""
    ok = observed in expected if isinstance(expected, (set, frozenset, tuple)) else observed == expected
    if not ok:
        rule = catalogue.get(rule_id)
        shown = (expected, observed)
        if isinstance(expected, (bytes, bytearray)) and isinstance(observed, (bytes, bytearray)):
            shown = _sectors_differing(expected, observed)
        lines = [f"{rule.id} [{rule.level}] {rule.summary}", f"  expected: {shown[0]!r}",
                 f"  observed: {shown[1]!r}"]  # fmt: skip
        if detail:
            lines.append(f"  detail:   {detail}")
        raise AssertionError("\n".join(lines))


def _sectors_differing(expected: bytes, observed: bytes) -> tuple[str, str]:
    """Disk data in a failure message: sizes and the first 512-byte sectors that differ, not a dump."""
    if len(expected) <= 64 and len(observed) <= 64:
        return bytes(expected).hex(), bytes(observed).hex()
    step = consts.SECTOR_SIZE
    bad = [i for i in range(0, max(len(expected), len(observed)), step)
           if expected[i : i + step] != observed[i : i + step]]  # fmt: skip
    first = "; ".join(f"sector +{i // step}: {bytes(observed[i : i + 8]).hex()}… for "
                      f"{bytes(expected[i : i + 8]).hex()}…" for i in bad[:4])  # fmt: skip
    return f"{len(expected)} bytes", f"{len(observed)} bytes; {len(bad)} 512-byte sectors differ: {first}"


def expect_empty(rule_id: str, found: Iterable[Any], what: str) -> None:
    items = list(found)
    expect(rule_id, f"no {what}", f"{len(items)} {what}: {items[:5]}" if items else f"no {what}")


@pytest.fixture
def connected_backend(
    backend_under_test: Callable[..., BackendUnderTest], record_negotiated
) -> Callable[..., BackendUnderTest]:
    """`make(disk options..., frontend=FrontendConfig fields)` -> a backend under test, connected."""

    def make(frontend: dict[str, Any] | None = None, **options: Any) -> BackendUnderTest:
        env = backend_under_test(**options)
        record_negotiated(env.connect(**(frontend or {})))
        return env

    return make


@pytest.fixture
def slots(request: pytest.FixtureRequest) -> SlotFactory:
    return SlotFactory(request.config.getoption("blkif_abi") or consts.X86_64_ABI)


#: What Linux blkback logs, on purpose, for the tests that provoke it (the dmesg oracle of live runs,
#: `@pytest.mark.provokes`): xenbus_dev_fatal()'s "vbd vbd-<fe>-<devid>: <errno> <what>" when it
#: refuses a negotiation or a state, and its alerts when a gref is in two requests at once, which
#: the raw-ring tests do (PG-5 allows it; blkback serves it and says so).
XENBUS_ERROR = r"vbd vbd-\d+-\d+: -?\d+ "
GREF_REUSE = ("trying to add a gref that's already in the tree", "requesting a grant already in use")
#: Linux blkfront's warning when the suite's backend answers a flush, barrier or discard EOPNOTSUPP
#: (OP-3 allows it at any time): it then turns the feature off.
BLKFRONT_OP_REFUSED = r"blkfront: \S+: (flush|barrier|discard) op failed"

#: Tests that may leave a real backend unusable run after the others against a live one
#: (`run_last`, in `order`): the QEMU 7.2 crash first, then the read-only vbds, whose refusal
#: only wedges the vdev, so that each finding hides as little as it can.
RUN_LAST_RING_NEAR_2_32 = pytest.mark.run_last(
    "a ring starting near 2^32: QEMU 7.2 starts at 0, serves phantom requests, crashes on close", order=0
)
RUN_LAST_READ_ONLY_VBD = pytest.mark.run_last(
    "a read-only vbd: QEMU 7.2 refuses it, then cannot reuse the vdev (its block node name stays)", order=1
)

#: Tests that have crashed a real driver in dom0's kernel (`host_hazard`): skipped against a live
#: target unless --xen-allow-host-crash, then run last (the lab: in its last job, after `record`).
HOST_HAZARD_SECTOR_SIZE = pytest.mark.host_hazard(
    "a 1000-byte sector-size: Linux 6.1 blkfront takes it and dom0's xenwatch oopses scanning partitions"
)

#: Response statuses (OP-6), shared by every module.
OKAY, ERROR, EOPNOTSUPP = (int(consts.BlkifRsp.OKAY), int(consts.BlkifRsp.ERROR),
                           int(consts.BlkifRsp.EOPNOTSUPP))  # fmt: skip


def status_name(status: int) -> str:
    """OKAY, ERROR or EOPNOTSUPP; any other value as a number (for messages and variants)."""
    return {OKAY: "OKAY", ERROR: "ERROR", EOPNOTSUPP: "EOPNOTSUPP"}.get(status, str(status))


RAW_ID = 0x5EC0_0000_0000  # ids of raw requests stay clear of the suite frontend's own (< RING_SIZE)


def answer(env: BackendUnderTest, slot: bytes, *, operation: int | None = None, queue: int = 0) -> int:
    """Put one raw request on the target's ring and return the status of its response (bounded)."""
    fe = env.peer
    done = fe.wait([fe.raw_request(slot, operation=operation, queue=queue)])[0]
    return done.status


@contextmanager
def backend_faults(env: BackendUnderTest) -> Iterator[None]:
    """A backend fault the suite's frontend detected (it then stops using the device, DIV-22)
    is raised as its RuleViolation (verdict fail) instead of DeviceDisabled (an error)."""
    try:
        yield
    except DeviceDisabled:
        raise env.peer.violations[-1] from None


def replies(env: BackendUnderTest, raw: Sequence[bytes], *, queue: int = 0) -> list[tuple[int, int]]:
    """Put raw requests on one ring at once; the (operation, status) answering each, in order.

    Unlike `answer`, the operation is whatever the backend echoed, for the caller to judge
    (OP-5, DIV-1, IND-6). Ids must differ and nothing else be outstanding on that queue.
    Bounded; a response the suite's frontend rejects (unknown id, status outside OP-6)
    raises its RuleViolation.
    """
    fe = env.peer
    pending = [fe.raw_request(slot, queue=queue) for slot in raw]
    ring = fe.raw_ring(queue).ring
    fe.push()
    deadline = time.monotonic() + env.timeout
    while (ready := ring.unconsumed_responses()) < len(pending):
        if time.monotonic() > deadline:
            raise TargetTimeout(f"{ready} of {len(pending)} raw requests answered within {env.timeout:g} s")
        fe.evtchn.wait(0.01)
    rsp = codec.codecs(fe.config.protocol).response
    echoed = {}
    for i in range(len(pending)):
        values = rsp.unpack_from(fe.ring_slot(ring.rsp_cons + i, queue=queue))
        echoed[values[0]] = values[1]
    for p in pending:
        p.operation = echoed.get(p.id, p.operation)
    with backend_faults(env):
        return [(done.operation, done.status) for done in fe.wait(pending)]


def reply(env: BackendUnderTest, slot: bytes, *, queue: int = 0) -> tuple[int, int]:
    """(operation, status) of the response to one raw request (see `replies`)."""
    return replies(env, [slot], queue=queue)[0]


def exchange(env: BackendUnderTest, raw: Sequence[bytes], *, queue: int = 0) -> list[tuple[int, int, int]]:
    """Put raw requests on one ring in one push (RING-6) and return every response, raw: (id, op, status).

    The responses are consumed from the ring here and never reach the suite frontend's
    block API, so a wrong id, operation or status is judged by the test, and duplicates or
    extra responses already published are returned too. Bounded (TargetTimeout); a
    response producer past the ring raises RuleViolation RING-9.
    """
    fe = env.peer
    ring_view = fe.raw_ring(queue)
    ring = ring_view.ring
    for slot in raw:
        ring.put_request(slot)
    if ring.push_requests():
        fe.evtchn.notify(ring_view.port)
    rsp = codec.codecs(fe.config.protocol).response
    at = rsp.index("id"), rsp.index("operation"), rsp.index("status")
    deadline = time.monotonic() + env.timeout
    while (ready := ring.unconsumed_responses()) < len(raw):
        if time.monotonic() > deadline:
            raise TargetTimeout(f"{ready} of {len(raw)} raw requests answered within {env.timeout:g} s")
        fe.evtchn.wait(0.002)
    out = []
    for _ in range(ring.unconsumed_responses()):
        values = rsp.unpack_from(ring.get_response())
        out.append((values[at[0]], values[at[1]], values[at[2]]))
    return out


def backend_offer(env: BackendUnderTest | FrontendUnderTest) -> dict[str, str]:
    """The backend's tree once it reached InitWait or later (bounded): its offers are in (XK-7.a)."""
    env.wait_state("backend", OFFERED, "backend InitWait (SM-2)")
    return env.backend_tree()


OFFERED = {XenbusState.InitWait, XenbusState.Connected, XenbusState.Closing, XenbusState.Closed}
REFUSED = frozenset({XenbusState.InitWait, XenbusState.Closing, XenbusState.Closed})  # SM-29 forms


def connect_edited(env: BackendUnderTest, edit: Callable[[dict[str, str]], dict[str, str]], *,
                   reconnect: bool = False, **frontend: Any) -> XenbusState:  # fmt: skip
    """Connect the suite's frontend with `edit` rewriting its transport keys just before Initialised.

    `edit(keys)` gets the keys the frontend published and returns the keys to publish
    instead: every transport key of the directory is replaced by them ("" makes a
    directory node, `queue-N`). `reconnect`: close nothing, go back through
    Initialising on the same frontend (SM-26), so keys it does not rewrite stay. The
    backend's state once it decided is returned: Connected, or the state it refused in
    (REFUSED: Closing or Closed as Linux, or InitWait kept past the bound as QEMU, SM-29).
    """
    config = FrontendConfig(**{"protocol": env.abi, "timeout": env.timeout, **frontend})
    peer = env.peer if reconnect else Frontend(env.peer.xen, env.peer.path, config)

    def rewrite(store, keys: dict[str, str]) -> None:
        new = edit(keys)

        def body(t) -> None:
            for name in t.directory(peer.path):
                if is_transport_key(name):
                    t.rm(f"{peer.path}/{name}")
            for key, value in new.items():
                t.mkdir(f"{peer.path}/{key}") if value == "" else t.write(f"{peer.path}/{key}", value)

        store.transact(body)

    peer.raw_before_initialised = rewrite
    env.peer = peer
    try:
        peer.reconnect(config) if reconnect else peer.connect()
    except XenTimeout as exc:
        waited = env.state("frontend") == XenbusState.Initialised  # the backend had our keys
        if not waited or env.state("backend") != XenbusState.InitWait:
            raise TargetTimeout(str(exc)) from None
    except XenError:
        if env.state("frontend") != XenbusState.Initialised:
            raise  # our own set-up failed (the edit, a transaction), not the backend's refusal
    finally:
        peer.raw_before_initialised = None
    return env.state("backend")


def attach_judged(env: FrontendUnderTest, rules: dict[str, str]) -> None:
    """`env.attach()`; if the frontend never got Connected, fail with what its tree breaks, if anything.

    `rules` maps a validator finding's rule to the rule the test reports it under
    (e.g. {"MQ-3": "MQ-3.a"}). The suite's backend refuses a tree it cannot read (MPR-3,
    MQ-2), so a broken layout shows as "never Connected": the tree says why.
    """
    try:
        env.attach()
    except TargetTimeout as exc:
        fe, be = env.frontend_tree(), env.backend_tree()
        findings = xenbus.validate(fe, be, phase=xenbus.Phase.INITIALISED)
        for rule, as_rule in rules.items():
            expect_empty(as_rule, [f for f in findings if f.rule == rule], "findings in the frontend's tree")
        raise TargetTimeout(f"{exc}\n  frontend tree: {fe}\n  backend tree: {be}") from None


def settle(env: Any, side: str, states: set, within: float | None = None) -> int:
    """Poll `side`'s state until it is in `states` or `within` s (default: the bound) passed; return it."""
    deadline = time.monotonic() + (env.timeout if within is None else within)
    while True:
        state = env.state(side)
        if state in states or time.monotonic() >= deadline:
            return state
        time.sleep(0.002)


def released(env: Any) -> dict[str, list[int]]:
    """What the target still holds (grants, mappings, ports), once it let go or the bound passed."""
    deadline = time.monotonic() + env.timeout
    while (held := env.leaks()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return held


def payload(i: int, salt: int = 0, tag: bytes = b"io") -> bytes:
    """512 bytes no other (tag, i, salt) gives, never all zeros."""
    return (tag[:2] + i.to_bytes(3, "little") + salt.to_bytes(3, "little")) * 64


def seen(status: int, data: bytes, want: bytes) -> str:
    """A READ's outcome in a few words (a sector of bytes makes an unreadable message)."""
    if status != int(consts.BlkifRsp.OKAY):
        return f"status {status}"
    if data == want:
        return "OKAY, the data written"
    return f"OKAY, other data ({len(data)} bytes: {data[:8].hex()}…)"


def check_read(rule: str, status: int, data: bytes, want: bytes, what: str) -> None:
    expect(rule, "OKAY, the data written", seen(status, data, want), what)
