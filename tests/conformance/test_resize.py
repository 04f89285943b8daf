"""Resize (XK-10), both roles.

A backend whose disk changed size rewrites `sectors`, then rewrites `state` with
the same Connected value, so the frontend's watch on `state` fires; a frontend
seeing Connected while connected re-reads `sectors`. The suite (the toolstack)
grows the disk (`env.store`), then tells the backend under test through the
optional `resize(size_bytes)` hook of `blkif_spec.targets.ResizableBackend`; a
backend without it cannot be driven to resize and the test SKIPs. For a frontend
under test, the suite's backend resizes and the frontend must use the new end.
"""

from __future__ import annotations

import time

import pytest

from blkif_spec import consts
from blkif_spec.consts import XenbusState
from blkif_spec.harness import TargetTimeout
from blkif_spec.model import pattern
from tests.conformance.conftest import OKAY, backend_faults, expect

SECTOR = consts.SECTOR_SIZE


@pytest.mark.role("backend")
@pytest.mark.rule("XK-10")
def test_backend_announces_a_resize(connected_backend) -> None:
    """`sectors` rewritten before `state` (still Connected); the new end is usable, old data kept."""
    env = connected_backend(size=1 << 20)
    resize = getattr(env.target, "resize", None)
    if not callable(resize):
        pytest.skip("the backend target has no resize(size_bytes) hook (optional, ResizableBackend)")
    old = int(env.backend_tree()["sectors"])
    data = pattern(1, old - 8, 8)
    with backend_faults(env):
        expect("XK-10", OKAY, env.peer.write(old - 8, data).status, "the last 4 KiB before the resize")
    path = env.vbd.backend_path
    watch = env.dom0.watch(path, "suite-resize")
    try:
        while watch.wait(0.02) is not None:  # the initial event(s) (XS-14)
            pass
        new_size = 2 << 20
        env.store.resize(new_size)
        env.call(lambda: resize(new_size), "backend resize")
        order, deadline = [], time.monotonic() + env.timeout
        while f"{path}/state" not in order:
            left = deadline - time.monotonic()
            event = watch.wait(left) if left > 0 else None
            if event is None:
                raise TargetTimeout(f"no rewrite of {path}/state within {env.timeout:g} s of the resize "
                                    f"(writes seen: {order})")  # fmt: skip
            order.append(event)
    finally:
        watch.close()
    written = [e.removeprefix(path + "/") for e in order]
    expect("XK-10", True, "sectors" in written, f"backend writes after the resize, in order: {written}")
    expect("XK-10", str(new_size // SECTOR), env.backend_tree().get("sectors"), "`sectors` after the resize")
    expect("XK-10", XenbusState.Connected, env.state("backend"), "the rewritten backend state")
    deadline = time.monotonic() + env.timeout
    while env.peer.sectors != new_size // SECTOR and time.monotonic() < deadline:
        time.sleep(0.005)  # the suite's frontend re-reads `sectors` on its watch
    tail = pattern(2, new_size // SECTOR - 8, 8)
    with backend_faults(env):
        expect("XK-10", OKAY, env.peer.write(new_size // SECTOR - 8, tail).status, "the new last 4 KiB")
        expect("XK-10", tail, env.peer.read(new_size // SECTOR - 8, 8).data, "the new last 4 KiB read back")
        expect("XK-10", data, env.peer.read(old - 8, 8).data, "the old last 4 KiB kept")


@pytest.mark.role("frontend")
@pytest.mark.rule("XK-10")
def test_frontend_follows_a_resize(frontend_under_test) -> None:
    """The suite's backend doubles the disk: the frontend stays Connected and writes the new end."""
    env = frontend_under_test(size=1 << 20)
    env.attach()
    new_size = 2 << 20
    env.peer.resize(new_size)
    sector = new_size // SECTOR - 8
    data = pattern(3, sector, 8)
    deadline, status = time.monotonic() + env.timeout, None
    while status != OKAY:  # the frontend learns the size through its watch: give it the bound
        try:
            status = env.io("write", sector, data).status
        except TargetTimeout:
            raise
        except Exception:  # a frontend may refuse I/O past the end it knows, by raising
            status = None
        if status != OKAY and time.monotonic() > deadline:
            break
        if status != OKAY:
            time.sleep(0.01)
    expect("XK-10", OKAY, status, f"a write to the new last 4 KiB (sector {sector}) after the resize")
    expect("XK-10", data, env.store.read(sector * SECTOR, len(data)), "the new last 4 KiB on the disk")
    expect("XK-10", XenbusState.Connected, env.state("frontend"), "the frontend after the resize")
    expect("XK-10", {}, env.request_rules_broken(), "requests the suite's backend refused")
