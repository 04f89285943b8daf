"""Operation and status codes (inventory §2.1), both roles.

Backend role: the suite's frontend puts raw requests on the ring and judges each
answer: exactly one response per request, `id` and `operation` echoed (OP-5),
status OKAY 0, ERROR -1 or EOPNOTSUPP -2 (OP-6), unknown operations refused with
EOPNOTSUPP or ERROR (DIV-1, recorded), and the ring still served afterwards (SEC-11).
Frontend role: the frontend under test sends only the operations the suite's
backend offered (OP-2) and copes with EOPNOTSUPP at any time (OP-3).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec.consts import BlkifOp, XenbusState
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.model import pattern
from blkif_spec.xen.api import XenTimeout
from tests.conformance.conftest import (
    BLKFRONT_OP_REFUSED,
    EOPNOTSUPP,
    ERROR,
    GREF_REUSE,
    OKAY,
    RAW_ID,
    backend_faults,
    expect,
    replies,
    reply,
    status_name,
)

STATUSES = frozenset({OKAY, ERROR, EOPNOTSUPP})
READ, WRITE, BARRIER, FLUSH = (int(BlkifOp.READ), int(BlkifOp.WRITE), int(BlkifOp.WRITE_BARRIER),
                               int(BlkifOp.FLUSH_DISKCACHE))  # fmt: skip
DISCARD, INDIRECT = int(BlkifOp.DISCARD), int(BlkifOp.INDIRECT)
UNKNOWN_OPS = (4, 7, 99, 255)  # RESERVED_1 and beyond the table (OP-1)


def late_responses(env) -> list:
    """What the suite's frontend rejected after a short grace period: a second answer to a
    request already answered arrives as an unknown id (SEC-21) and lands here."""
    env.peer.evtchn.wait(0.02)
    env.peer.poll()
    return [str(v) for v in env.peer.violations]


# -- backend role ------------------------------------------------------------------------------


@pytest.mark.role("backend")
@pytest.mark.rule("OP-5", "OP-6", "DIV-1", "SEC-11")
def test_unknown_operations_are_refused_once(connected_backend, slots, record_variant) -> None:
    """Ops 4, 7, 99, 255 (and any other ≥ 7, junk in the rest of the slot): one answer each,
    EOPNOTSUPP or ERROR with the operation echoed; the next READ is still served."""
    env = connected_backend()
    seen: dict[int, set[int]] = {}

    def check(op: int, fill: bytes) -> None:
        echoed, status = reply(env, slots.other(op, RAW_ID, fill=fill))
        expect("OP-6", STATUSES, status, f"unknown operation {op}")
        expect("OP-5", op, echoed, f"operation echoed in the answer to operation {op}")
        expect("DIV-1", {EOPNOTSUPP, ERROR}, status, f"unknown operation {op}")
        seen.setdefault(status, set()).add(op)
        with backend_faults(env):
            after = env.peer.read(0, 8).status
        expect("SEC-11", OKAY, after, f"a READ after unknown operation {op}: the ring is still served")

    for op in UNKNOWN_OPS:
        check(op, b"\0")

    @given(op=st.integers(7, 255), fill=st.binary(min_size=1, max_size=1))
    def any_unknown(op: int, fill: bytes) -> None:
        check(op, fill)

    any_unknown()
    expect("OP-5", [], late_responses(env), "answers after each request was answered once")
    record_variant(
        "DIV-1", " and ".join(f"{status_name(s)} for {sorted(ops)[:6]}" for s, ops in sorted(seen.items()))
    )


@pytest.mark.role("backend")
@pytest.mark.rule("OP-1", "OP-5", "IND-6", "DIV-6.b")
def test_operation_codes(connected_backend, slots) -> None:
    """READ=0 and WRITE=1 move data; every offered operation (2, 3, 5, 6) is answered with its
    code echoed (`indirect_op` for 6, IND-6) and a status it may give: OKAY for a 0-segment
    FLUSH (DIV-6.b), OKAY or EOPNOTSUPP (OP-3) for BARRIER and DISCARD."""
    env = connected_backend()
    tree = env.backend_tree()
    data = pattern(1, 64, 8)
    src = env.peer.raw_grant(data)[0]
    dst, page = env.peer.raw_grant()
    expect("OP-1", {(WRITE, OKAY)}, reply(env, slots.rw(WRITE, RAW_ID, 64, [(src, 0, 7)])), "WRITE = 1")
    expect("OP-1", {(READ, OKAY)}, reply(env, slots.rw(READ, RAW_ID, 64, [(dst, 0, 7)])), "READ = 0")
    expect("OP-1", data, bytes(page), "READ (0) returns what WRITE (1) wrote")
    offered = {op: tree.get(key) == "1" for op, key in ((BARRIER, "feature-barrier"),
               (FLUSH, "feature-flush-cache"), (DISCARD, "feature-discard"))}  # fmt: skip
    if offered[FLUSH]:
        got = reply(env, slots.rw(FLUSH, RAW_ID, 0, []))
        expect("DIV-6.b", {(FLUSH, OKAY)}, got, "FLUSH_DISKCACHE = 3 with 0 segments, feature-flush-cache=1")
    if offered[BARRIER]:  # OP-3: EOPNOTSUPP may come at any time, even when offered
        expect("OP-1", {(BARRIER, OKAY), (BARRIER, EOPNOTSUPP)}, reply(env, slots.rw(BARRIER, RAW_ID, 0, [])),
               "WRITE_BARRIER = 2")  # fmt: skip
    if offered[DISCARD]:
        unit = int(tree.get("discard-granularity") or tree.get("sector-size") or 512) // 512
        expect("OP-1", {(DISCARD, OKAY), (DISCARD, EOPNOTSUPP)},
               reply(env, slots.discard(RAW_ID, 128 * unit, unit)), "DISCARD = 5")  # fmt: skip
    if tree.get("feature-max-indirect-segments") not in (None, "", "0"):
        ind = env.peer.raw_grant(slots.segments_page([(dst, 0, 7)]))[0]
        expect("IND-6", {(READ, OKAY)}, reply(env, slots.indirect(READ, RAW_ID, 64, 1, [ind])),
               "INDIRECT = 6 carrying a READ: the answer carries indirect_op")  # fmt: skip


@pytest.mark.role("backend")
@pytest.mark.rule("FL-4", "DIV-17", "OP-5", "SEC-11")
def test_operations_not_offered(backend_under_test, record_negotiated, slots, record_variant) -> None:
    """BARRIER without feature-barrier=1, FLUSH without feature-flush-cache=1: OKAY (Linux,
    no volatile cache), EOPNOTSUPP or ERROR (QEMU, op 2), answered once with the op echoed."""
    env = backend_under_test(options={"flush": False, "barrier": False})
    record_negotiated(env.connect())
    tree = env.backend_tree()
    record_variant("DIV-17", f"feature-barrier {tree.get('feature-barrier', 'absent')}")
    tested: list[str] = []
    for op, key in ((BARRIER, "feature-barrier"), (FLUSH, "feature-flush-cache")):
        value = tree.get(key)
        expect("FL-4", {None, "0", "1"}, value, f"{key}: absent, 0 or 1")
        if value == "1":
            continue
        echoed, status = reply(env, slots.rw(op, RAW_ID, 0, []))
        expect("OP-5", op, echoed, f"{BlkifOp(op).name} not offered: operation echoed")
        expect("FL-4", STATUSES, status, f"{BlkifOp(op).name} with {key} {value or 'absent'}")
        tested.append(f"{BlkifOp(op).name} with {key} {value or 'absent'}: {status_name(status)}")
    if not tested:
        pytest.skip("backend advertises feature-barrier and feature-flush-cache although asked not to")
    record_variant("FL-4", "; ".join(tested))
    with backend_faults(env):
        expect("SEC-11", OKAY, env.peer.read(0, 8).status, "a READ afterwards: the ring is still served")
    expect("OP-5", [], late_responses(env), "answers after each request was answered once")


@pytest.mark.role("backend")
@pytest.mark.rule("OP-7", "OP-5")
@pytest.mark.provokes(*GREF_REUSE)
def test_answers_are_matched_by_id(connected_backend, slots) -> None:
    """Many requests in flight at once with arbitrary 64-bit ids: each answered once, by its id."""
    env = connected_backend()
    src = env.peer.raw_grant(pattern(2, 0, 8))[0]
    dst = env.peer.raw_grant()[0]

    @given(ids=st.lists(st.integers(1 << 16, 2**64 - 1), min_size=2, max_size=24, unique=True))
    def check(ids: list[int]) -> None:
        raw = [slots.rw(WRITE if i % 2 else READ, rid, 8 * i, [(src, 0, 7)] if i % 2 else [(dst, 0, 7)])
               for i, rid in enumerate(ids)]  # fmt: skip
        got = replies(env, raw)
        want = [(WRITE if i % 2 else READ, OKAY) for i in range(len(ids))]
        expect("OP-5", want, got, f"{len(ids)} requests in flight with ids {[hex(i) for i in ids[:4]]}…")

    check()


# -- frontend role -----------------------------------------------------------------------------


def attempt(env, method: str, *args: Any, **kwargs: Any) -> Any:
    """A block-API call whose outcome is recorded rather than required: the Completion, or the
    exception the target raised. A timeout still propagates (verdict timeout)."""
    try:
        return env.io(method, *args, **kwargs)
    except XenTimeout:
        raise
    except Exception as exc:  # a frontend may report "not supported" by raising
        return exc


def outcome(result: Any) -> str:
    if isinstance(result, Exception):
        return f"raised {type(result).__name__}"
    return status_name(result.status)


@pytest.mark.role("frontend")
@pytest.mark.rule("OP-2")
def test_frontend_sends_only_offered_operations(frontend_under_test, record_variant) -> None:
    """No flush-cache, barrier, discard or indirect offered: the frontend may be asked for all
    of them, and sends none of them (the suite's backend records every one it receives)."""
    env = frontend_under_test(backend=BackendConfig(flush=False, barrier=False, discard=False,
                                                    max_indirect_segments=0))  # fmt: skip
    env.attach()
    data = pattern(3, 8, 40 * 8)  # 40 pages: more than 11, so only indirect could carry it at once
    expect("OP-2", OKAY, env.io("write", 8, data).status, "a 40-page write without indirect")
    seen = {m: outcome(attempt(env, m)) for m in ("flush", "barrier")}
    seen["discard"] = outcome(attempt(env, "discard", 8, 64))
    got = env.io("read", 8, 40 * 8)
    expect("OP-2", {(OKAY, True)}, (got.status, got.data == data), "the 40-page extent reads back")
    expect("OP-2", {}, env.request_rules_broken(), "requests the suite's backend did not offer")
    record_variant("OP-2", "; ".join(f"{method} not offered: {what}" for method, what in seen.items()))


@pytest.mark.role("frontend")
@pytest.mark.rule("OP-3", "DIV-29")
@pytest.mark.provokes(BLKFRONT_OP_REFUSED)
def test_frontend_copes_with_eopnotsupp(frontend_under_test, record_variant) -> None:
    """The suite's backend offers flush-cache, barrier and discard, then answers them EOPNOTSUPP
    (allowed at any time, OP-3): the frontend neither hangs nor gives up the device."""
    env = frontend_under_test(backend=BackendConfig(unsupported_ops=(BARRIER, FLUSH, DISCARD)))
    env.attach()
    data = pattern(4, 0, 16)
    expect("OP-3", OKAY, env.io("write", 0, data).status, "a write before the refusals")
    seen = {}
    for _ in range(2):  # a second call shows whether the frontend stopped sending (DIV-29)
        seen["flush"] = outcome(attempt(env, "flush"))
        seen["barrier"] = outcome(attempt(env, "barrier"))
        seen["discard"] = outcome(attempt(env, "discard", 64, 64))
    expect("OP-3", XenbusState.Connected, env.state("frontend"), "the frontend after EOPNOTSUPP answers")
    expect("OP-3", OKAY, env.io("write", 16, data).status, "a write after EOPNOTSUPP answers")
    got = env.io("read", 0, 32)
    expect("OP-3", {(OKAY, True)}, (got.status, got.data == data + data), "reads after EOPNOTSUPP answers")
    refused: dict[int, int] = {}
    for q in env.peer._queues:  # the suite's own backend: inspected freely
        for op, n in q.server.stats.refused.items():
            refused[op] = refused.get(op, 0) + n
    reactions = []
    for op, method in ((FLUSH, "flush"), (BARRIER, "barrier"), (DISCARD, "discard")):
        sent = refused.get(op, 0)
        kept = "kept sending" if sent > 1 else "stopped after the first EOPNOTSUPP" if sent else "never sent"
        reactions.append(f"{method}: {kept} ({sent} sent for 2 calls; block API: {seen[method]})")
    record_variant("DIV-29", "; ".join(reactions))
    expect("OP-2", {}, env.request_rules_broken(), "requests the suite's backend refused")
