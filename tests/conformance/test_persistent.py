"""Persistent grants (inventory §2.6, SEC-12), both roles.

Backend role: with both sides advertising `feature-persistent=1` the suite's
frontend reuses one small set of writable grants for every request (PG-2), so a
backend that maps them once must read each request's data afresh and write reads
into them; a gref used twice in one request or by two requests in flight is
served normally (PG-5: OKAY). Without the frontend's 1 the backend keeps no
mapping past a request (PG-1, PG-4): the suite's frontend revokes every grant at
completion and reports one still mapped (SEC-23). On close every persistent
mapping is gone (SEC-12). Frontend role: a frontend advertises its own
capability and works with a backend either way; reusing grants without the
backend's support is allowed (PG-1), so it is not flagged.
"""

from __future__ import annotations

import pytest

from blkif_spec import consts
from blkif_spec.consts import BlkifOp, XenbusState
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.model import pattern
from tests.conformance.conftest import (
    GREF_REUSE,
    OKAY,
    RAW_ID,
    backend_faults,
    expect,
    replies,
    reply,
    require,
    require_leaks_visible,
)

READ, WRITE = int(BlkifOp.READ), int(BlkifOp.WRITE)
SECTOR = consts.SECTOR_SIZE


def mappings(env) -> int:
    """Foreign mappings the target domain holds (what the grant table shows a frontend)."""
    return len(env.leaks().get("mappings", []))


# -- backend role ------------------------------------------------------------------------------


@pytest.mark.role("backend")
@pytest.mark.rule("PG-2", "PG-1")
def test_reused_grants_carry_each_requests_data(connected_backend) -> None:
    """64 one-page writes and reads through the same few writable grants (the suite's frontend
    returns each page to its pool): every request moves its own data."""
    env = connected_backend()
    require(env, "persistent")
    expect("PG-1", True, env.peer.negotiated.persistent, "both sides advertise feature-persistent=1")
    with backend_faults(env):
        for i in range(64):
            sector = (i * 37 % 512) * 8  # scattered, so a stale page would show
            data = pattern(i + 1, sector, 8)
            expect("PG-2", OKAY, env.peer.write(sector, data, queue=0).status, f"write #{i} at {sector}")
            got = env.peer.read(sector, 8, queue=0)
            expect("PG-2", {(OKAY, True)}, (got.status, got.data == data), f"read back #{i} at {sector}")
        pool = {gref for _page, gref in env.peer._queues[0].pool}
    if len(pool) > 4:  # the suite's own frontend, not the target: a harness error
        raise RuntimeError(f"the suite's frontend used {len(pool)} grants, not a few reused ones")


@pytest.mark.role("backend")
@pytest.mark.rule("PG-5", "SEC-12")
@pytest.mark.provokes(*GREF_REUSE)
def test_a_gref_used_twice_is_served(connected_backend, slots, record_variant) -> None:
    """One gref twice in a request, and in two requests in flight at once: OKAY, data right."""
    env = connected_backend()
    require(env, "persistent")
    data = pattern(7, 0, 8)
    gref = env.peer.raw_grant(data)[0]  # writable, as persistent grants are (PG-2)
    got = reply(env, slots.rw(WRITE, RAW_ID, 64, [(gref, 0, 3), (gref, 4, 7)]))
    expect("PG-5", {(WRITE, OKAY)}, got, "WRITE with segments (g, 0-3) and (g, 4-7)")
    got = reply(env, slots.rw(WRITE, RAW_ID, 128, [(gref, 0, 7), (gref, 0, 7)]))
    expect("PG-5", {(WRITE, OKAY)}, got, "WRITE with segment (g, 0-7) twice")
    both = replies(env, [slots.rw(WRITE, RAW_ID + i, 256 + 8 * i, [(gref, 0, 7)]) for i in range(2)])
    expect("PG-5", [(WRITE, OKAY)] * 2, both, "two WRITEs from the same gref in flight at once")
    back, page = env.peer.raw_grant()
    got = reply(env, slots.rw(READ, RAW_ID, 128, [(back, 0, 7), (back, 0, 7)]))
    expect("PG-5", {(READ, OKAY)}, got, "READ into segment (g, 0-7) twice")
    expect("PG-5", data, bytes(page), "the READ's data")
    with backend_faults(env):
        for sector, n in ((64, 8), (128, 16), (256, 16)):
            expect("PG-5", data * (n // 8), env.peer.read(sector, n).data, f"{n} sectors at {sector}")
    record_variant("PG-5", "OKAY for a gref used twice in a request and in two requests in flight")


@pytest.mark.role("backend")
@pytest.mark.rule("PG-1", "PG-4", "DIV-15")
def test_frontend_without_persistent_grants(connected_backend, record_variant) -> None:
    """feature-persistent=0 from the frontend: I/O correct and no mapping kept past a request.

    The backend's own key does not depend on the frontend's (the 2022 Linux regression made
    each side advertise only what the other had advertised)."""
    env = connected_backend(frontend={"persistent": False})
    expect("PG-1", "0", env.frontend_tree().get("feature-persistent"), "the suite's frontend says 0")
    expect("PG-1", False, env.peer.negotiated.persistent, "persistent grants not in use")
    ring_only = mappings(env)
    with backend_faults(env):  # the suite's frontend reports a grant still mapped at completion (SEC-23)
        for i in range(16):
            data = pattern(i + 20, 8 * i, 24)
            expect("PG-4", OKAY, env.peer.write(8 * i, data).status, f"write #{i}")
            expect("PG-4", data, env.peer.read(8 * i, 24).data, f"read back #{i}")
    expect("PG-1", ring_only, mappings(env), "backend mappings after 32 requests (the rings only)")
    own = env.backend_tree().get("feature-persistent")
    env.close()  # one device at a time (a live host has one test device)
    other = connected_backend().backend_tree().get("feature-persistent")
    expect("PG-1", other, own, "the backend's feature-persistent with a frontend saying 0 vs 1")
    expect("PG-1", {None, "0", "1"}, own, "backend feature-persistent")
    record_variant("DIV-15", f"backend feature-persistent {own or 'absent'}")


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-12")
def test_persistent_mappings_are_freed_on_close(connected_backend) -> None:
    """After many requests over persistent grants and a guest close, the backend holds no
    mapping and no port (SEC-12: all freed on disconnect)."""
    env = connected_backend()
    require(env, "persistent")
    require_leaks_visible(env)
    with backend_faults(env):
        for q in range(env.peer.queues):
            for i in range(8):
                env.peer.write(64 * q + 8 * i, pattern(i, 0, 16), queue=q)
    expect("SEC-12", True, mappings(env) > 0, "the backend maps the rings while connected")
    env.peer.close()
    env.wait_state("backend", {XenbusState.Closed}, "backend Closed after the guest closed (SM-23)")
    expect("SEC-12", {}, env.leaks(), "what the backend holds once closed")


# -- frontend role -----------------------------------------------------------------------------


@pytest.mark.role("frontend")
@pytest.mark.rule("PG-1", "PG-4", "DIV-15")
@pytest.mark.parametrize("backend_persistent", [True, False], ids=["backend-1", "backend-0"])
def test_frontend_persistent_with_either_backend(frontend_under_test, record_variant,
                                                 backend_persistent: bool) -> None:  # fmt: skip
    env = frontend_under_test(backend=BackendConfig(persistent=backend_persistent))
    env.attach()
    key = env.frontend_tree().get("feature-persistent")
    expect("PG-1", {None, "0", "1"}, key, "the frontend's feature-persistent")
    for i in range(8):
        data = pattern(i + 40, 16 * i, 16)
        expect("PG-4", OKAY, env.io("write", 16 * i, data).status, f"write #{i}")
        got = env.io("read", 16 * i, 16)
        expect("PG-4", {(OKAY, True)}, (got.status, got.data == data), f"read back #{i}")
        expect("PG-4", data, env.store.read(16 * i * SECTOR, len(data)), f"write #{i} on the suite's disk")
    expect("PG-4", {}, env.request_rules_broken(), "requests the suite's backend refused")
    record_variant(
        "DIV-15", f"frontend feature-persistent {key or 'absent'} with backend {int(backend_persistent)}"
    )
