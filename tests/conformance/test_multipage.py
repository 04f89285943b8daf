"""Multi-page rings (inventory §4.5 MPR-1..5, WIRE-10, XK-11, DIV-11, DIV-13), both roles.

Backend role: the suite's frontend connects with every ring order the backend
offers (up to 4) and fills each ring, the last page's slots included, then
pushes 1.5 rings more so that the indices wrap. Other key schemes are written
with the frontend's raw layer (`connect_edited`): `ring-page-order="0"` with
`ring-ref0` (MPR-2 read as written, DIV-11), a stale `ring-ref0` left by an
earlier multi-page connection beside a fresh `ring-ref` (the 2021 Linux
regression "xen-blkback: fix compatibility bug with single page rings"), an
order above the maximum (MPR-3) and the legacy page-count keys (XK-11). A
backend that maps a key it should not read is caught by the grant it holds:
the frontend cannot end access to a page the backend still maps.

Frontend role: the suite's backend offers orders 0, 2, 4 or nothing; the
frontend must stay within the offer, name its grants as MPR-2 says, and leave
no key of an earlier connection behind after reconnecting to another offer.
"""

from __future__ import annotations

from functools import partial

import pytest

from blkif_spec import consts, xenbus
from blkif_spec.consts import BlkifOp, XenbusState
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.drivers.frontend import DeviceDisabled, is_transport_key
from blkif_spec.harness import BackendUnderTest
from blkif_spec.xen.api import XenError, XenTimeout
from tests.conformance.conftest import (
    OKAY,
    REFUSED,
    XENBUS_ERROR,
    attach_judged,
    backend_offer,
    check_read,
    connect_edited,
    expect,
    expect_empty,
    require,
    require_restart,
)
from tests.conformance.conftest import (
    payload as tagged_payload,
)

payload = partial(tagged_payload, tag=b"mp")  # 512 distinct bytes per (i, salt)
READ, WRITE = int(BlkifOp.READ), int(BlkifOp.WRITE)
CONNECTED = XenbusState.Connected
SPP = consts.SECTORS_PER_PAGE
ORDERS = range(consts.MAX_RING_PAGE_ORDER + 1)  # MPR-5: Linux's cap, the most the suite's peer builds


def offered_order(tree: dict[str, str]) -> int:
    """The largest ring order a backend tree offers (MAX of both key schemes, absent ⇒ 0)."""
    return xenbus.max_ring_order_offered(tree)


def fill_and_wrap(env: BackendUnderTest, rule: str, size: int, *, queue: int = 0) -> None:
    """RING_SIZE writes in flight at once (every slot, the last page's too), then 1.5 rings of reads.

    The reads cannot all be in flight: the frontend waits for free slots, so the
    indices pass RING_SIZE and wrap (slot = index & (RING_SIZE - 1)). Writes go one
    per 4 KiB block, each at another offset in its page.
    """
    fe = env.peer
    sectors = [i * SPP + i % SPP for i in range(size)]
    try:
        writes = fe.wait(
            [fe.submit_rw(WRITE, s, payload(i, queue), queue=queue) for i, s in enumerate(sectors)]
        )
        bad = [(i, c.status) for i, c in enumerate(writes) if c.status != OKAY]
        expect(rule, [], bad[:5], f"WRITEs filling all {size} slots of queue {queue}: (slot, status)")
        for i, s in enumerate(sectors):
            check_read(rule, OKAY, env.store.read(s * 512, 512), payload(i, queue), f"disk at {s} (slot {i})")
        order = [i % size for i in range(size + size // 2)]
        reads = fe.wait([fe.submit_rw(READ, sectors[i], 1, queue=queue) for i in order])
    except DeviceDisabled as exc:  # a wrong id or operation: the backend read other slots than ours
        expect(rule, "one answer per request, on its ring", f"frontend disabled the device: {exc}")
    for i, done in zip(order, reads, strict=True):
        check_read(rule, done.status, done.data, payload(i, queue), f"READ past the wrap, block {i}")


def connect(env: BackendUnderTest, rule: str, what: str, **frontend):
    """`env.connect(**frontend)`; a backend refusing this valid layout fails `rule` (silence: timeout)."""
    try:
        return env.connect(**frontend)
    except XenTimeout:
        raise
    except XenError as exc:  # the backend went Closing or Closed instead of Connected
        expect(rule, "Connected", f"{type(exc).__name__}: {exc}", what)


def still_mapped(env: BackendUnderTest, grefs: list[int]) -> list[int]:
    """Grants the backend holds mapped: ending access fails for them (gnttab_end_foreign_access)."""
    return [g for g in grefs if not env.peer.raw_revoke(g)]


# -- backend role ------------------------------------------------------------------------------


@pytest.mark.role("backend")
@pytest.mark.rule("MPR-5")
def test_ring_order_offer_is_well_formed(backend_under_test, record_variant) -> None:
    """max-ring-page-order, when offered, is a uint32; the cap itself varies (Linux: 4)."""
    tree = backend_offer(backend_under_test())
    findings = [f for f in xenbus.validate({}, tree) if f.path in ("max-ring-page-order", "max-ring-pages")]
    expect_empty("MPR-5", [f for f in findings if f.rule != "XK-11"], "findings on the ring-order offer")
    offered = tree.get("max-ring-page-order")
    record_variant("MPR-5", f"max-ring-page-order={offered}" if offered else "absent: single-page rings")


@pytest.mark.role("backend")
@pytest.mark.rule("XK-11")
def test_legacy_max_ring_pages_agrees_with_the_order(backend_under_test) -> None:
    """A backend that also publishes max-ring-pages gives 2^max-ring-page-order (MAY, info)."""
    findings = xenbus.validate({}, backend_offer(backend_under_test()))
    expect_empty("XK-11", [f for f in findings if f.rule == "XK-11"], "findings on max-ring-pages")


@pytest.mark.role("backend")
@pytest.mark.rule("WIRE-10", "MPR-4", "RING-3")
@pytest.mark.parametrize("order", ORDERS)
def test_every_offered_ring_order_serves_a_full_ring(
    backend_under_test, record_negotiated, order: int
) -> None:
    """2^order pages in ring-ref0.. order, 32·2^order slots: every slot used, then the indices wrap."""
    env = backend_under_test()
    tree = backend_offer(env)
    if order:
        require(env, "multi-page")
        if order > offered_order(tree):
            pytest.skip(f"backend offers ring order {offered_order(tree)} < {order}")
    negotiated = connect(env, "WIRE-10", f"ring order {order}", max_ring_page_order=order, max_queues=1)
    record_negotiated(negotiated)
    expect("WIRE-10", order, negotiated.ring_page_order, "order the suite's frontend connected with")
    fill_and_wrap(env, "WIRE-10", 32 << order)


@pytest.mark.role("backend")
@pytest.mark.rule("MPR-2", "DIV-11")
@pytest.mark.parametrize("with_ring_ref", [False, True], ids=["ring-ref0-only", "beside-a-ring-ref"])
def test_ring_page_order_zero_means_ring_ref0(backend_under_test, with_ring_ref: bool) -> None:
    """ring-page-order="0" is present, so the grant is read from ring-ref0 (conventions §5 DIV-11).

    With a `ring-ref` naming another granted page as well, the backend must still
    map ring-ref0: the presence of ring-page-order alone chooses the scheme.
    """
    env = backend_under_test()
    backend_offer(env)
    decoys: list[int] = []

    def edit(keys: dict[str, str]) -> dict[str, str]:
        new = {k: v for k, v in keys.items() if k != "ring-ref"}
        new |= {"ring-page-order": "0", "ring-ref0": keys["ring-ref"]}
        if with_ring_ref:  # granted now: the frontend's ring set-up ends earlier grants
            decoys.append(env.peer.raw_grant()[0])
            new["ring-ref"] = str(decoys[0])
        return new

    state = connect_edited(env, edit, max_ring_page_order=0, max_queues=1)
    expect("MPR-2", CONNECTED, state, "ring-page-order=0, ring-ref0 = the ring: the backend must connect")
    expect("MPR-2", [], still_mapped(env, decoys), "backend mapped ring-ref although ring-page-order=0")
    fill_and_wrap(env, "MPR-2", 32)


@pytest.mark.role("backend")
@pytest.mark.rule("MPR-2", "SM-26")
@pytest.mark.parametrize("stale", ["revoked", "still-granted"])
def test_stale_ring_ref0_after_reconnect_is_ignored(backend_under_test, stale: str) -> None:
    """Regression (Linux d75e7f63b7c9, 2021): no ring-page-order ⇒ ring-ref, whatever ring-ref0 says.

    A first connection uses a multi-page ring (ring-page-order, ring-ref0..N). The
    frontend closes and reconnects single-page, leaving ring-ref0..N behind: as the
    grants the earlier connection ended ("revoked", the real history) or as pages
    still granted ("still-granted", which a backend could map and then serve nothing).
    """
    env = backend_under_test()
    tree = backend_offer(env)
    require(env, "multi-page")
    order = min(offered_order(tree), 2)
    connect(env, "MPR-2", f"first connection, ring order {order}", max_ring_page_order=order, max_queues=1)
    old = {k: v for k, v in env.frontend_tree().items() if k.startswith("ring-ref")}
    expect("MPR-2", 1 << order, len(old), f"ring-ref0.. of the first connection: {sorted(old)}")
    env.peer.close()
    decoys: list[int] = []

    def edit(keys: dict[str, str]) -> dict[str, str]:
        if stale == "still-granted":  # granted now: the frontend's ring set-up ends earlier grants
            decoys.extend(env.peer.raw_grant()[0] for _ in old)
            return dict(zip(sorted(old), map(str, decoys), strict=True)) | keys
        return old | keys

    state = connect_edited(env, edit, reconnect=True, max_ring_page_order=0, max_queues=1)
    left = sorted(k for k in env.frontend_tree() if k.startswith("ring-ref"))
    expect("MPR-2", CONNECTED, state, f"single-page reconnect with ring-ref beside stale keys {left}")
    held = still_mapped(env, decoys)
    expect("MPR-2", [], held, "backend mapped a stale ring-ref%u without ring-page-order")
    fill_and_wrap(env, "MPR-2", 32)


@pytest.mark.role("backend")
@pytest.mark.rule("MPR-3", "SM-29")
@pytest.mark.provokes(XENBUS_ERROR)
def test_ring_order_above_the_maximum_is_refused(backend_under_test, record_variant) -> None:
    """Order max+1 with all its 2^(max+1) grants: a fatal negotiation error, the ring never connects."""
    env = backend_under_test()
    top = offered_order(backend_offer(env))
    if top >= consts.MAX_RING_PAGE_ORDER + 3:
        pytest.skip(f"max-ring-page-order {top}: the suite does not grant 2^{top + 1} ring pages")
    base = min(top, consts.MAX_RING_PAGE_ORDER)

    def edit(keys: dict[str, str]) -> dict[str, str]:
        (ring,) = xenbus.read_rings(keys)
        grefs = list(ring.grefs) + [env.peer.raw_grant()[0] for _ in range((2 << top) - len(ring.grefs))]
        rest = {k: v for k, v in keys.items() if not is_transport_key(k)}
        ring_keys = xenbus.frontend_transport(order=top + 1, grefs=[grefs], ports=[ring.port],
                                              protocol=None, persistent=None, write_order=True)  # fmt: skip
        return rest | ring_keys

    state = connect_edited(env, edit, max_ring_page_order=base, max_queues=1)
    expect("MPR-3", REFUSED, state, f"ring-page-order={top + 1} with max-ring-page-order {top}")
    record_variant(
        "SM-29", "stays InitWait (QEMU)" if state == XenbusState.InitWait else f"{state.name} (Linux)"
    )


@pytest.mark.role("backend")
@pytest.mark.rule("XK-11", "DIV-13")
@pytest.mark.parametrize("order", [0, 1])
def test_legacy_num_ring_pages_beside_the_order_keys(backend_under_test, record_variant, order: int) -> None:
    """A frontend for old peers adds num-ring-pages = 2^order (XK-11): nothing may break (DIV-13)."""
    env = backend_under_test()
    legacy = backend_offer(env).get("max-ring-pages")
    record_variant("DIV-13", f"publishes max-ring-pages={legacy}" if legacy else "no legacy max-ring-pages")
    if order:
        require(env, "multi-page")
    state = connect_edited(env, lambda keys: keys | {"num-ring-pages": str(1 << order)},
                           max_ring_page_order=order, max_queues=1)  # fmt: skip
    expect("DIV-13", CONNECTED, state, f"num-ring-pages={1 << order} beside the order-{order} keys")
    fill_and_wrap(env, "DIV-13", 32 << order)


# -- frontend role -----------------------------------------------------------------------------


def transport_findings(env, rules: tuple[str, ...]) -> list[xenbus.Finding]:
    findings = xenbus.validate(env.frontend_tree(), env.backend_tree())
    return [f for f in findings if f.rule in rules]


def sequential_io(env, count: int, salt: int) -> None:
    """`count` one-block writes, then their reads, through the block API (one request each)."""
    for i in range(count):
        expect("WIRE-10", OKAY, env.io("write", i * SPP, payload(i, salt)).status, f"write #{i}")
    for i in range(count):
        done = env.io("read", i * SPP, 1)
        check_read("WIRE-10", done.status, done.data, payload(i, salt), f"read #{i}")


@pytest.mark.role("frontend")
@pytest.mark.rule("MPR-1", "MPR-2", "DIV-11", "WIRE-10", "MPR-4", "MPR-5", "DIV-13")
@pytest.mark.parametrize("offer", [None, 0, 2, 4], ids=["absent", "max0", "max2", "max4"])
def test_frontend_ring_order_within_the_offer(frontend_under_test, record_variant, offer: int | None) -> None:
    """ring-page-order ≤ the offer (absent ⇒ 0), ring-ref vs ring-ref%u by its presence, I/O past a wrap."""
    env = frontend_under_test(backend=BackendConfig(max_ring_page_order=offer or 0, max_queues=1))
    if offer is None:  # a backend without multi-page rings (QEMU without multi-page grant maps)
        env.dom0.rm(f"{env.vbd.backend_path}/max-ring-page-order")
    attach_judged(env, {rule: rule for rule in ("MPR-1", "MPR-2")})
    findings = transport_findings(env, ("MPR-1", "MPR-2"))
    for rule in ("MPR-1", "MPR-2"):
        expect_empty(rule, [f for f in findings if f.rule == rule], "findings in the frontend's tree")
    tree = env.frontend_tree()
    order = int(tree.get("ring-page-order", "0"))
    expect("MPR-1", True, order <= (offer or 0), f"ring-page-order {order}, backend max {offer}")
    written = "ring-page-order" in tree
    record_variant(
        "MPR-5", f"order {order} of max {offer}" + ("" if written else ", ring-page-order not written")
    )
    legacy = tree.get("num-ring-pages")
    record_variant("DIV-13", f"writes num-ring-pages={legacy}" if legacy else "no legacy num-ring-pages")
    # One request at a time: RING_SIZE + 8 of them take the frontend's indices past the wrap.
    sequential_io(env, (32 << order) + 8, salt=order)
    expect_empty("WIRE-10", env.request_rules_broken().items(), "requests the suite's backend refused")


@pytest.mark.role("frontend")
@pytest.mark.rule("XK-11")
def test_frontend_legacy_num_ring_pages_agrees(frontend_under_test) -> None:
    """A frontend that also writes num-ring-pages gives 2^ring-page-order (MAY, info)."""
    env = frontend_under_test(backend=BackendConfig(max_ring_page_order=2, max_queues=1))
    attach_judged(env, {"XK-11": "XK-11"})
    expect_empty("XK-11", transport_findings(env, ("XK-11",)), "findings on num-ring-pages")


@pytest.mark.role("frontend")
@pytest.mark.rule("MPR-2", "MQ-3", "MQ-4", "SM-26")
@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_frontend_reconnect_to_another_offer_leaves_no_stale_keys(frontend_under_test, change: str) -> None:
    """After a reconnect to a smaller (or larger) offer no key of the earlier connection remains.

    A stale ring-page-order or queue-N/ would make a conforming backend read the
    wrong keys; a stale ring-ref0 next to ring-ref is what broke Linux blkback in
    2021 (MPR-2 history). Every transport key must belong to the new choice.
    """
    big = BackendConfig(max_queues=4, max_ring_page_order=4)
    small = BackendConfig(max_queues=1, max_ring_page_order=0)
    first, second = (big, small) if change == "shrink" else (small, big)
    rules = ("MPR-1", "MPR-2", "MQ-2", "MQ-3", "MQ-4")
    env = frontend_under_test(backend=first)
    require_restart(env)
    attach_judged(env, {rule: rule for rule in rules})
    sequential_io(env, 4, salt=1)
    env.io("close")
    env.wait_state("frontend", {XenbusState.Closed}, "frontend Closed after close (SM-25)")
    env.peer.config = second  # re-published when the frontend comes back (SM-26)
    attach_judged(env, {rule: rule for rule in rules})
    findings = transport_findings(env, rules)
    for rule in rules:
        expect_empty(rule, [f for f in findings if f.rule == rule], "findings in the frontend's tree")
    tree = env.frontend_tree()
    written = "ring-page-order" in tree
    order = int(tree.get("ring-page-order", "0"))
    nqueues = int(tree.get("multi-queue-num-queues", "1"))
    expected = set(xenbus.frontend_transport(order=order, grefs=[[0] * (1 << order)] * nqueues,
                                             ports=[0] * nqueues, protocol=None, persistent=None,
                                             write_order=written))  # fmt: skip
    expected |= {"multi-queue-num-queues", "num-ring-pages"} & set(tree)  # "1" is fine (MQ-3), legacy XK-11
    stale = sorted(k for k in tree if is_transport_key(k) and k not in expected)
    expect_empty("MPR-2", stale, "transport keys of the earlier connection")
    sequential_io(env, 4, salt=2)
    expect_empty("MPR-2", env.request_rules_broken().items(), "requests the suite's backend refused")
