"""Security rules (inventory §8: SEC-1..12, SEC-20..26) and the regressions named after real bugs, both roles.

Backend role (the backend must not trust the frontend, §8.1):

* XSA-155 double fetch (SEC-1): exact in simulation, where the backend's reads of
  the ring are recorded (`record_grants=True`): each byte of each request slot is
  read once. Black box as well: the frontend rewrites a slot after publishing it,
  flipping a field between two versions, and the answer must agree with one of
  them, with no I/O outside the validated request (weaker evidence: a race).
* XSA-216 response padding (SEC-5): request slots full of canary bytes; after the
  response only id, operation and status changed, the rest is as it was or zero.
* Hostile requests (SEC-11, SEC-2, SEC-3, SEC-6, OP-5): hypothesis draws broken
  requests; each is answered exactly once, status 0/-1/-2, id and operation
  echoed (IND-6 for indirect), and the ring is still served afterwards.
* XSA-332 event storms (SEC-10), and nothing left behind after a close (SM-23,
  persistent grants SEC-12).

Frontend role (the frontend must not trust the backend, §8.2): the suite's
backend holds a request back (`pause`) and answers it through its raw layer with
an unknown or duplicate id, a wrong operation, a status outside the spec or a
response producer past the ring (SEC-21, DIV-22, RING-9, OP-6); the frontend must
stop using the device. XSA-403 (SEC-24): with `trusted=0` a first-use data page
holds nothing but the data. Requests are never read back from the ring (SEC-22),
responses are read once (SEC-20, race), a backend event storm is survived
(SEC-25), device properties are validated (SEC-26), and a closed frontend leaves
no grant or port behind (SEC-23).

Not tested: SEC-7 (state flapping, test_xenbus' area), SEC-8 (bad transport keys,
test_multipage/test_xenbus), SEC-9 (XenStore spam), double fetch of indirect
descriptor pages (the reference backend copies them by grant copy, which the
simulation does not record) and SEC-23's "still mapped at completion" case (needs
a backend that keeps a grant mapped after answering: a raw-layer mapping not offered).
"""

from __future__ import annotations

import struct
import threading
import time
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec import codec, consts
from blkif_spec.consts import BlkifOp, XenbusState
from blkif_spec.drivers import xsutil
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.harness import FrontendUnderTest, TargetTimeout
from blkif_spec.xen.api import XenError, XenTimeout
from tests.conformance.conftest import (
    EOPNOTSUPP,
    ERROR,
    GREF_REUSE,
    HOST_HAZARD_SECTOR_SIZE,
    OKAY,
    RUN_LAST_READ_ONLY_VBD,
    exchange,
    expect,
    require,
    require_destroyable,
    require_leaks_visible,
)

STATUSES = (OKAY, ERROR, EOPNOTSUPP)
READ, WRITE, BARRIER, FLUSH = (int(BlkifOp.READ), int(BlkifOp.WRITE), int(BlkifOp.WRITE_BARRIER),
                               int(BlkifOp.FLUSH_DISKCACHE))  # fmt: skip
DISCARD, INDIRECT = int(BlkifOp.DISCARD), int(BlkifOp.INDIRECT)
SECTOR, SPP, PAGE = consts.SECTOR_SIZE, consts.SECTORS_PER_PAGE, consts.PAGE_SIZE
HIGH_ID = 0xFEDC_BA98_0000_0000  # DIV-31: ids with the high bits set
UNKNOWN_OPS = [4, *range(7, 256)]
NEVER_GRANTED = 0x7FFF_FFF0


def advertised_indirect(env) -> int:
    try:
        return int(env.backend_tree().get("feature-max-indirect-segments", "0"))
    except ValueError:
        return 0


def ring_still_served(env, slots, gref: int, rule: str) -> None:
    got = exchange(env, [slots.rw(READ, HIGH_ID | 0xC0DE, 0, [(gref, 0, 7)])])
    expect(
        rule, [(HIGH_ID | 0xC0DE, READ, OKAY)], got, "a valid READ after the hostile ones: the ring is served"
    )


def tree_paths(env) -> set[str]:
    return set(xsutil.read_tree(env.dom0, "/local"))


def left_behind(env, before: set[str]) -> list[str]:
    """Nodes created since `before` outside both device directories."""
    mine = tuple(p.removeprefix("/local/") for p in (env.vbd.backend_path, env.vbd.frontend_path))
    return sorted(p for p in tree_paths(env) - before if not p.startswith(mine))


def settled_leaks(env) -> dict[str, list[int]]:
    """The target domain's grants, mappings and ports, once they stop shrinking (bounded)."""
    deadline = time.monotonic() + env.timeout
    leaks = env.leaks()
    while leaks and time.monotonic() < deadline:
        time.sleep(0.01)
        leaks = env.leaks()
    return leaks


# ====================================================================================================
# Backend role
# ====================================================================================================


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-1", "RING-10")
def test_each_request_slot_is_read_once(backend_under_test, record_negotiated, slots) -> None:
    """XSA-155, exact: the backend's recorded reads of each slot cover every byte exactly once."""
    env = backend_under_test(record_grants=True)
    record_negotiated(env.connect(max_queues=1))
    fe = env.peer
    log = env.ring_log(0)
    if log is None:
        pytest.skip("the backend's ring reads are not observable (no recorded ring mapping)")
    data_ref = fe.raw_grant(b"s" * PAGE)[0]
    batch = {
        "READ": slots.rw(READ, HIGH_ID | 1, 0, [(data_ref, 0, 7)]),
        "WRITE": slots.rw(WRITE, HIGH_ID | 2, 64, [(data_ref, 0, 7)]),
        "FLUSH": slots.rw(FLUSH, HIGH_ID | 3, 0, []),
        "DISCARD": slots.discard(HIGH_ID | 4, 128, 8),
        "unknown op 99": slots.other(99, HIGH_ID | 5, fill=b"\x99"),
        "nr_segments 200": slots.rw(READ, HIGH_ID | 6, 0, [(data_ref, 0, 7)], nr_segments=200),
        "last_sect 9": slots.rw(READ, HIGH_ID | 7, 0, [(data_ref, 0, 9)]),
        "never-granted gref": slots.rw(READ, HIGH_ID | 8, 0, [(NEVER_GRANTED, 0, 7)]),
    }
    if advertised_indirect(env) >= 2:
        table = fe.raw_grant(slots.segments_page([(data_ref, 0, 7)] * 2), readonly=True)[0]
        batch["INDIRECT"] = slots.indirect(READ, HIGH_ID | 9, 0, 2, [table])
    ring = fe.raw_ring(0).ring
    shared = ring.shared
    first = ring.req_prod_pvt
    mark = log.mark()
    answers = exchange(env, list(batch.values()))
    expect("SEC-1", len(batch), len(answers), "one response per request")
    reads = {}
    for i, kind in enumerate(batch):
        at = shared.slot_offset(first + i)
        counts = log.reads_of(at, at + shared.entry_size, since=mark)
        escaped = any(k == "v" for *_, k in log.accesses(at, at + shared.entry_size, since=mark))
        reads[kind] = ("live view" if escaped else "", sorted(set(counts)))
    if all(counts == [0] for _, counts in reads.values()):
        pytest.skip("the backend reads the ring buffer directly: per-byte reads are not observable")
    bad = {kind: seen for kind, seen in reads.items() if seen != ("", [1])}
    expect("SEC-1", {}, bad, "slots not read exactly once per byte: {kind: (escape, distinct read counts)}")


# -- XSA-155, black box: a slot rewritten while the backend processes it --------------------------


def _race(env, slot: bytes, offset: int, a: int, b: int) -> tuple[int, int, int]:
    """Publish `slot` (byte `offset` = a), then flip that byte a <-> b until the response arrives."""
    fe = env.peer
    raw = fe.raw_ring(0)
    ring = raw.ring
    idx = ring.put_request(slot)
    view = ring.shared.slot_view(idx)
    if ring.push_requests():
        fe.evtchn.notify(raw.port)
    deadline = time.monotonic() + env.timeout
    flips = 0
    while not ring.unconsumed_responses():
        view[offset] = b if flips % 2 == 0 else a
        flips += 1
        if flips % 64 == 0 and time.monotonic() > deadline:
            raise TargetTimeout(f"no response within {env.timeout:g} s to a slot rewritten {flips} times")
    rsp = codec.codecs(env.abi).response
    out = [rsp.unpack_from(ring.get_response()) for _ in range(ring.unconsumed_responses())]
    expect("SEC-1", 1, len(out), "responses to one rewritten slot")
    values = out[0]
    return values[rsp.index("id")], values[rsp.index("operation")], values[rsp.index("status")]


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-1")
def test_a_slot_rewritten_after_publishing(connected_backend, slots, record_variant) -> None:
    """XSA-155 as a race: every byte mix of the two versions has one classifiable answer.

    Judged by SEC-1's invariants: exactly one response, a status that agrees with one
    version, no I/O outside the validated request, no hang. Our own late flip may land
    in the response's id (the slot is shared), so the flipped byte is not judged there.
    """
    env = connected_backend(frontend={"max_queues": 1})
    fe = env.peer
    rw = slots.codecs.request_rw
    src = fe.raw_grant(b"W" * PAGE)[0]
    dst, dst_page = fe.raw_grant()
    background = b"\x11" * (64 * SECTOR)
    sector = 16
    reading = slots.rw(READ, 0, sector, [(dst, 0, 7)])
    writing = slots.rw(WRITE, 0, sector, [(src, 0, 7)])
    flips = {  # name: (slot, flipped offset, version a, version b)
        "nr_segments 1<->200 (READ)": (reading, rw.offset("nr_segments"), 1, 200),
        "nr_segments 1<->200 (WRITE)": (writing, rw.offset("nr_segments"), 1, 200),
        "operation READ<->99": (reading, rw.offset("operation"), READ, 99),
        "sector 16<->2^40+16 (WRITE)": (writing, rw.offset("sector_number") + 5, 0, 1),
        "last_sect 7<->9 (READ)": (reading, rw.offset("seg[0].last_sect"), 7, 9),
    }
    id_at = rw.offset("id")
    seen: Counter[str] = Counter()
    for name, (template, offset, a, b) in flips.items():
        for trial in range(6):
            rid = HIGH_ID | 0x5A5A | (trial << 16)
            slot = bytearray(template)
            struct.pack_into("<Q", slot, id_at, rid)
            env.store.write(0, background)
            dst_page[:] = bytes(PAGE)
            got_id, op, status = _race(env, bytes(slot), offset, a, b)
            where = f"{name}, trial {trial}"
            late = offset if offset < 8 else None  # our own late flip may hit the response's id byte
            same = [i for i in range(8) if i != late]
            expect("SEC-1", [rid.to_bytes(8, "little")[i] for i in same],
                   [got_id.to_bytes(8, "little")[i] for i in same], f"{where}: id echoed")  # fmt: skip
            disk = env.store.read(0, len(background))
            if name.startswith("operation"):
                expect("SEC-1", {(READ, OKAY), (99, ERROR), (99, EOPNOTSUPP)}, (op, status), where)
            else:
                want_op = WRITE if "WRITE" in name else READ
                expect("SEC-1", {(want_op, OKAY), (want_op, ERROR)}, (op, status), where)
            if "WRITE" in name:
                expected = bytearray(background)
                if status == OKAY:
                    expected[sector * SECTOR : (sector + 8) * SECTOR] = b"W" * PAGE
                expect("SEC-1", True, disk == bytes(expected), f"{where}: disk matches the {status} answer")
            else:
                expect("SEC-1", True, disk == background, f"{where}: a READ changed the disk")
                if status == OKAY and op == READ:
                    expect("SEC-1", background[: 8 * SECTOR], bytes(dst_page), f"{where}: data read")
            seen[f"{name}: {'OKAY' if status == OKAY else 'refused'}"] += 1
    record_variant(
        "SEC-1",
        "race (weaker than the exact check): " + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())),
    )


# -- XSA-216 -----------------------------------------------------------------------------------------


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-5", "DIV-30", "WIRE-5")
def test_response_padding_never_leaks(connected_backend, slots, record_variant) -> None:
    """Canary bytes everywhere a request leaves room; after the answer only id, op and status differ."""
    env = connected_backend(frontend={"max_queues": 1})
    fe = env.peer
    ring = fe.raw_ring(0).ring
    entry = ring.shared.entry_size
    c = slots.codecs
    rsp = c.response
    fields = set()
    for name in ("id", "operation", "status"):
        ((at, st_),) = rsp.field_parts(name)
        fields.update(range(at, at + st_.size))
    others = [i for i in range(entry) if i not in fields]
    gref = fe.raw_grant(b"d" * PAGE)[0]
    seg0 = c.request_rw.offset("seg[0].gref")
    kinds = {  # name: (slot, bytes the request uses)
        "READ": lambda rid: (slots.rw(READ, rid, 8, [(gref, 0, 7)]), seg0 + 8),
        "WRITE": lambda rid: (slots.rw(WRITE, rid, 8, [(gref, 1, 6)]), seg0 + 8),
        "FLUSH": lambda rid: (slots.rw(FLUSH, rid, 0, []), seg0),
        "DISCARD": lambda rid: (slots.discard(rid, 64, 8), c.request_discard.size),
        "unknown op": lambda rid: (slots.other(77, rid), c.request_other.size),
        "last_sect 9": lambda rid: (slots.rw(READ, rid, 8, [(gref, 0, 9)]), seg0 + 8),
        "bad gref": lambda rid: (slots.rw(READ, rid, 8, [(NEVER_GRANTED, 0, 7)]), seg0 + 8),
    }
    canary = 0xA5
    tally: Counter[str] = Counter()

    @given(kind=st.sampled_from(sorted(kinds)), low=st.integers(0, 0xFF))
    def check(kind: str, low: int) -> None:
        rid = 0xA5A5_A5A5_A5A5_A500 | low  # every id byte but the lowest is a canary too
        slot, used = kinds[kind](rid)
        before = bytearray(slot)
        before[used:] = bytes([canary]) * (entry - used)
        idx = ring.req_prod_pvt
        answers = exchange(env, [bytes(before)])
        expect("WIRE-5", 1, len(answers), f"{kind}: responses")
        expect("WIRE-5", rid, answers[0][0], f"{kind}: id echoed")
        expect(
            "WIRE-5",
            idx,
            (ring.rsp_cons - 1) & consts.RING_IDX_MASK,
            f"{kind}: response in the request's slot",
        )
        after = fe.ring_slot(idx)
        leaked = [(i, hex(before[i]), hex(after[i])) for i in others if after[i] not in (0, before[i])]
        expect("SEC-5", [], leaked, f"{kind}: (offset, before, after) of bytes neither unchanged nor zero")
        tally["zeroed" if any(after[i] != before[i] for i in others) else "unchanged"] += 1

    check()
    record_variant("DIV-30", ", ".join(f"padding {k} x{v}" for k, v in sorted(tally.items())))


# -- hostile requests ------------------------------------------------------------------------------


@st.composite
def hostile_requests(draw, slots, ctx: dict) -> tuple[str, bytes, int, str | None]:
    """(kind, slot, operation the response must echo, rule requiring refusal or None)."""
    rid = draw(st.integers(0, 2**64 - 1))
    gref = ctx["gref"]
    op = draw(st.sampled_from([READ, WRITE]))
    kinds = ["nr_segments > 11", "first_sect > last_sect", "last_sect > 7", "past the end",
             "unknown operation", "bad gref", "indirect", "random bytes"]  # fmt: skip
    kind = draw(st.sampled_from(kinds))
    if kind == "nr_segments > 11":
        n = draw(st.integers(12, 255))
        return kind, slots.rw(op, rid, 0, [(gref, 0, 7)] * 11, nr_segments=n), op, "SEC-2"
    if kind == "first_sect > last_sect":
        last = draw(st.integers(0, 254))
        first = draw(st.integers(last + 1, 255))
        return kind, slots.rw(op, rid, 0, [(gref, first, last)]), op, "SEC-3"
    if kind == "last_sect > 7":
        last = draw(st.integers(8, 255))
        return kind, slots.rw(op, rid, 0, [(gref, draw(st.integers(0, last)), last)]), op, "SEC-3"
    if kind == "past the end":
        sector = draw(
            st.one_of(st.integers(ctx["sectors"] - 7, ctx["sectors"] + 64), st.integers(2**63, 2**64 - 1))
        )
        return kind, slots.rw(op, rid, sector, [(gref, 0, 7)]), op, "SEC-3"
    if kind == "unknown operation":
        bad_op = draw(st.sampled_from(UNKNOWN_OPS))
        return kind, slots.other(bad_op, rid, fill=bytes([draw(st.integers(0, 255))])), bad_op, "OP-5"
    if kind == "bad gref":
        bad = draw(st.one_of(st.just(ctx["revoked"]), st.integers(0x4000_0000, 2**32 - 1)))
        return kind, slots.rw(op, rid, 0, [(gref, 0, 7), (bad, 0, 7)][draw(st.integers(0, 1)) :]), op, "SEC-6"
    if kind == "indirect":
        limit = ctx["indirect"]
        if not limit:  # not advertised: op 6 is an unknown operation (DIV-2, DIV-1)
            return kind, slots.indirect(op, rid, 0, 1, [gref]), INDIRECT, "OP-5"
        n = draw(st.one_of(st.just(0), st.integers(limit + 1, 0xFFFF))) if limit < 0xFFFF else 0
        inner = draw(st.sampled_from([op, op, 2, 3, 5, 77]))  # IND-2: only READ/WRITE are valid
        return kind, slots.indirect(inner, rid, 0, n, [gref] * 8), inner, "SEC-2"
    raw = bytearray(draw(st.binary(min_size=slots.entry_size, max_size=slots.entry_size)))
    struct.pack_into("<Q", raw, slots.codecs.request_other.offset("id"), rid)
    # Our own ring pages are granted writable to the backend: a random READ (or an indirect
    # page) naming one would make the backend scribble on the suite's ring, not test it.
    c = slots.codecs
    fields = [f"seg[{i}].gref" for i in range(consts.BLKIF_MAX_SEGMENTS_PER_REQUEST)]
    form = c.request_rw
    if raw[0] == INDIRECT:
        form, fields = c.request_indirect, [f"indirect_grefs[{i}]" for i in range(8)]
    for name in fields:
        at = form.offset(name)
        if struct.unpack_from("<I", raw, at)[0] in ctx["ring"]:
            struct.pack_into("<I", raw, at, NEVER_GRANTED)
    echo = raw[1] if raw[0] == INDIRECT and ctx["indirect"] else raw[0]
    return kind, bytes(raw), echo, None


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-11", "SEC-2", "SEC-3", "SEC-6", "OP-5", "IND-6", "DIV-2", "WIRE-5", "DIV-31")
def test_hostile_requests_are_answered_once(connected_backend, slots, record_variant) -> None:
    """Each hostile request: one response, status 0/-1/-2, id and operation echoed, the ring served after."""
    env = connected_backend(frontend={"max_queues": 1})
    fe = env.peer
    gref = fe.raw_grant(b"h" * PAGE)[0]
    revoked = fe.raw_grant()[0]
    fe.raw_revoke(revoked)
    ctx = {"gref": gref, "revoked": revoked, "sectors": env.store.size // SECTOR,
           "indirect": advertised_indirect(env), "ring": set(fe.raw_ring(0).ring_grefs)}  # fmt: skip
    unknown: Counter[int] = Counter()

    @given(case=hostile_requests(slots, ctx))
    def check(case: tuple[str, bytes, int, str | None]) -> None:
        kind, slot, echo, refuse = case
        rid = struct.unpack_from("<Q", slot, slots.codecs.request_other.offset("id"))[0]
        answers = exchange(env, [slot])
        expect("SEC-11", 1, len(answers), f"{kind}: responses to one request")
        got_id, op, status = answers[0]
        expect("WIRE-5", hex(rid), hex(got_id), f"{kind}: id echoed bit-exactly")
        echo_rule = (
            "IND-6" if slot[0] == INDIRECT and ctx["indirect"] else "DIV-2" if slot[0] == INDIRECT else "OP-5"
        )
        expect(echo_rule, echo, op, f"{kind}: operation echoed (operation byte {slot[0]})")
        expect("OP-5", STATUSES, status, f"{kind}: status")
        if refuse is not None:
            expect(refuse, {ERROR, EOPNOTSUPP}, status, f"{kind}: refused")
        if kind == "unknown operation":
            unknown[status] += 1
        ring_still_served(env, slots, gref, "SEC-11")

    check()
    names = {ERROR: "ERROR (QEMU)", EOPNOTSUPP: "EOPNOTSUPP (Linux)"}
    if unknown:
        record_variant("DIV-1", ", ".join(f"{names.get(s, s)} x{n}" for s, n in sorted(unknown.items())))


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-11", "WIRE-5")
@pytest.mark.provokes(*GREF_REUSE)
def test_duplicate_ids_are_each_answered(connected_backend, slots) -> None:
    """Three requests in flight with one id: three responses carrying it (the backend keeps no id table)."""
    env = connected_backend(frontend={"max_queues": 1})
    gref = env.peer.raw_grant()[0]
    rid = HIGH_ID | 0xD0D0
    answers = exchange(env, [slots.rw(READ, rid, 8 * k, [(gref, 0, 7)]) for k in range(3)])
    expect("SEC-11", [(rid, READ, OKAY)] * 3, answers, "responses to three READs sharing one id")


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-3.a", "SEC-11")
@RUN_LAST_READ_ONLY_VBD
def test_a_read_only_disk_refuses_every_write(connected_backend, slots) -> None:
    """Writes, discards, flushes with data, indirect writes on a read-only disk: refused, disk untouched."""
    env = connected_backend(readonly=True, frontend={"max_queues": 1})
    fe = env.peer
    gref = fe.raw_grant(b"w" * PAGE)[0]
    table = fe.raw_grant(slots.segments_page([(gref, 0, 7)] * 4), readonly=True)[0]
    indirect = advertised_indirect(env)
    span = 256 * SECTOR

    @given(op=st.sampled_from(["WRITE", "WRITE 0 segments", "FLUSH with data", "BARRIER with data", "DISCARD",
                               "INDIRECT WRITE"]),
           sector=st.integers(0, 128), n=st.integers(1, 11), rid=st.integers(0, 2**64 - 1))  # fmt: skip
    def check(op: str, sector: int, n: int, rid: int) -> None:
        if op == "INDIRECT WRITE" and indirect < 4:
            return
        slot = {
            "WRITE": lambda: slots.rw(WRITE, rid, sector, [(gref, 0, 7)] * n),
            "WRITE 0 segments": lambda: slots.rw(WRITE, rid, sector, []),
            "FLUSH with data": lambda: slots.rw(FLUSH, rid, sector, [(gref, 0, 7)] * n),
            "BARRIER with data": lambda: slots.rw(BARRIER, rid, sector, [(gref, 0, 7)] * n),
            "DISCARD": lambda: slots.discard(rid, sector, 8 * n),
            "INDIRECT WRITE": lambda: slots.indirect(WRITE, rid, sector, 4, [table]),
        }[op]()
        ((got_id, _, status),) = exchange(env, [slot])
        expect("SEC-3.a", [rid, True], [got_id, status in (ERROR, EOPNOTSUPP)], f"{op} at {sector}: refused")
        expect("SEC-3.a", True, env.store.read(0, span) == bytes(span), f"{op} at {sector}: disk untouched")

    check()


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-6")
def test_bad_grants_fail_only_their_own_request(connected_backend, slots) -> None:
    """One batch mixing good and bad grants: the good ones succeed, every bad one fails, nothing else."""
    env = connected_backend(frontend={"max_queues": 1})
    fe = env.peer
    good = fe.raw_grant(b"G" * PAGE)[0]
    read_into, read_page = fe.raw_grant()
    ro = fe.raw_grant(readonly=True)[0]
    revoked = fe.raw_grant()[0]
    fe.raw_revoke(revoked)
    env.store.write(0, b"D" * PAGE)
    good_seg, bad_seg, revoked_seg = (good, 0, 7), (NEVER_GRANTED, 0, 7), (revoked, 0, 7)
    batch = {  # id: (what, slot, status)
        1: ("good READ", slots.rw(READ, HIGH_ID | 1, 0, [(read_into, 0, 7)]), OKAY),
        2: ("READ, never-granted gref", slots.rw(READ, HIGH_ID | 2, 0, [(NEVER_GRANTED, 0, 7)]), ERROR),
        3: ("good WRITE", slots.rw(WRITE, HIGH_ID | 3, 64, [(good, 0, 7)]), OKAY),
        4: ("WRITE, revoked gref", slots.rw(WRITE, HIGH_ID | 4, 128, [(revoked, 0, 7)]), ERROR),
        5: ("WRITE, good then bad", slots.rw(WRITE, HIGH_ID | 5, 192, [good_seg, revoked_seg]), ERROR),
        6: ("READ, bad then good", slots.rw(READ, HIGH_ID | 6, 0, [bad_seg, good_seg]), ERROR),
        7: ("READ into a read-only grant", slots.rw(READ, HIGH_ID | 7, 0, [(ro, 0, 7)]), ERROR),
    }  # fmt: skip
    answers = exchange(env, [slot for _, slot, _ in batch.values()])
    got = sorted((rid & 0xFF, status) for rid, _, status in answers)
    want = sorted((k, status) for k, (_, _, status) in batch.items())
    expect(
        "SEC-6",
        want,
        got,
        "(request, status) for " + "; ".join(f"{k}: {w}" for k, (w, _, _) in batch.items()),
    )
    expect("SEC-6", b"D" * PAGE, bytes(read_page), "data of the good READ")
    expect("SEC-6", b"G" * PAGE, env.store.read(64 * SECTOR, PAGE), "data of the good WRITE")
    expect("SEC-6", bytes(PAGE), env.store.read(128 * SECTOR, PAGE), "the revoked WRITE wrote nothing")
    ring_still_served(env, slots, good, "SEC-6")


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-10", "DIV-35")
def test_a_notification_storm_does_not_stop_service(connected_backend, record_variant) -> None:
    """XSA-332: tens of thousands of notifications with nothing new on the ring, while reads go on."""
    env = connected_backend(frontend={"max_queues": 1})
    fe = env.peer
    raw = fe.raw_ring(0)
    stop = threading.Event()
    sent = [0]

    def storm() -> None:
        while not stop.is_set() and sent[0] < 10000:
            fe.evtchn.notify(raw.port)
            sent[0] += 1

    storm_thread = threading.Thread(target=storm, name="event-storm", daemon=True)
    latencies = []
    storm_thread.start()
    try:
        i = 0
        while storm_thread.is_alive() or i < 10:  # the storm ends by itself after 10000
            t0 = time.monotonic()
            done = fe.read(i % 64 * SPP, 8, queue=0)  # bounded by the peer's timeout: no answer is `timeout`
            latencies.append(time.monotonic() - t0)
            expect("SEC-10", OKAY, done.status, f"read {i} during the storm ({sent[0]} notifications sent)")
            i += 1
    finally:
        stop.set()
        storm_thread.join(env.timeout)
    cpu0 = time.process_time()
    time.sleep(0.2)
    idle_cpu = time.process_time() - cpu0
    expect("SEC-10", OKAY, fe.read(0, 8, queue=0).status, "a read after the storm")
    record_variant("DIV-35", f"{sent[0]} spurious notifications: reads answered in at most "
                   f"{max(latencies) * 1000:.1f} ms; {idle_cpu:.2f} s CPU in 0.2 s idle after")  # fmt: skip


@pytest.mark.role("backend")
@pytest.mark.rule("SM-23")
def test_the_backend_leaves_nothing_behind(backend_under_test, record_negotiated) -> None:
    """After the frontend closed: no mapping, no port, no grant, no node outside the device directories."""
    env = backend_under_test()
    before = tree_paths(env)
    record_negotiated(env.connect(persistent=False))
    fe = env.peer
    for i in range(8):
        expect("SM-23", OKAY, fe.write(i * 64, bytes([i + 1]) * PAGE).status, f"write {i}")
    try:
        fe.close()
    except XenTimeout:
        raise
    except XenError as exc:  # the suite's frontend cannot free ring pages the backend still maps
        expect("SM-23", {}, env.leaks(), f"held by the backend after its Closed; our teardown: {exc}")
        raise
    expect("SM-23", {}, settled_leaks(env), "what the backend domain still holds after the close")
    expect("SM-23", [], left_behind(env, before), "XenStore nodes it created outside the device directories")


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-12")
def test_persistent_grants_are_freed_on_disconnect(backend_under_test, record_negotiated) -> None:
    """Data grants the backend kept mapped (PG-3) are all unmapped when the frontend closes."""
    env = backend_under_test()
    require(env, "persistent")
    require_leaks_visible(env)
    negotiated = env.connect(persistent=True)
    record_negotiated(negotiated)
    if not negotiated.persistent:
        pytest.skip("persistent grants not negotiated")
    fe = env.peer
    data = bytes(range(256)) * 16 * 64  # 64 pages
    expect("SEC-12", OKAY, fe.write(0, data).status, "a 64-page write")
    expect("SEC-12", OKAY, fe.read(0, len(data) // SECTOR).status, "a 64-page read")
    fe.close()
    expect(
        "SEC-12", [], settled_leaks(env).get("mappings", []), "grants still mapped by the backend after close"
    )


# ====================================================================================================
# Frontend role
# ====================================================================================================


def _parse(be, slot: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(id, operation the response must echo, data segments) of a request the suite's backend took."""
    c = codec.codecs(be.negotiated.abi if be.negotiated else consts.X86_64_ABI)
    op = slot[0]
    if op == INDIRECT:
        f = c.request_indirect.unpack_from(slot)
        n = f[c.request_indirect.index("nr_segments")]
        first = c.request_indirect.index("indirect_grefs[0]")
        segs = []
        for page in range(-(-n // consts.SEGS_PER_INDIRECT_FRAME)):
            values = c.indirect_page.unpack_from(be.raw_copy(f[first + page]))
            count = min(n - len(segs), consts.SEGS_PER_INDIRECT_FRAME)
            segs += [(values[i], values[i + 1], values[i + 2]) for i in range(0, 4 * count, 4)]
        return f[c.request_indirect.index("id")], slot[1], segs
    f = c.request_rw.unpack_from(slot)
    base = c.request_rw.index("seg[0].gref")
    n = min(f[1], consts.BLKIF_MAX_SEGMENTS_PER_REQUEST) if op in (READ, WRITE, BARRIER, FLUSH) else 0
    segs = [(f[base + 4 * i], f[base + 4 * i + 1], f[base + 4 * i + 2]) for i in range(n)]
    return f[c.request_rw.index("id")], op, segs


def _held_request(env: FrontendUnderTest, method: str, *args, scribble: int | None = None):
    """Pause the suite's backend, start a block-API call, take its requests off the ring (unanswered)."""
    be = env.peer
    be.pause()
    io = env.submit(method, *args)
    deadline = time.monotonic() + env.timeout
    while not be.raw_peek(0):
        if time.monotonic() > deadline:
            raise TargetTimeout(f"frontend {method}{args}: no request on the ring within {env.timeout:g} s")
        time.sleep(0.002)
    time.sleep(0.01)  # the rest of a multi-request call
    return io, be.raw_take(0, scribble=scribble)


def _said(kind: str, value) -> str:
    if kind == "done":
        return f"returned status {getattr(value, 'status', value)}"
    return "raised " + type(value).__name__ if kind == "raised" else "still pending"


def _ok(kind: str, value) -> bool:
    return kind == "done" and getattr(value, "status", None) == OKAY


HOSTILE = {  # case: the rule a frontend that misses it fails
    "unknown id": "SEC-21",
    "duplicate id": "SEC-21",
    "wrong operation": "SEC-21",
    "rsp_prod past the ring": "RING-9",
}


@pytest.mark.role("frontend")
@pytest.mark.rule("SEC-21", "DIV-22", "RING-9")
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_responses_stop_the_device(frontend_under_test, record_variant, case: str) -> None:
    """The suite's backend answers a held read with a broken response: the frontend stops using the device.

    Stopping means: the broken answer is not taken as success, later I/O is refused
    or left pending, and the frontend sends no more notifications or requests.
    """
    env = frontend_under_test(backend=BackendConfig(max_queues=1, max_ring_page_order=0))
    require_destroyable(env)
    env.attach()
    be = env.peer
    io, taken = _held_request(env, "read", 0, 8)
    rid, op, _ = _parse(be, taken[0])
    if case == "unknown id":
        be.raw_respond(rid ^ 0x8000_0000_0000_5A5A, op, OKAY)
    elif case == "duplicate id":
        be.raw_answer(taken, publish=False)
        be.raw_respond(rid, op, OKAY)
    elif case == "wrong operation":
        be.raw_respond(rid, WRITE if op == READ else READ, OKAY)
    be.raw_publish(0, extra=be.raw_ring(0).size + 1 if case == "rsp_prod past the ring" else 0)
    kind, value = io.outcome(env.timeout / 2)  # a frontend that leaves it pending costs this wait
    if case != "duplicate id":
        expect(HOSTILE[case], False, _ok(kind, value), f"{case}: the held read {_said(kind, value)}")
    time.sleep(0.05)
    events, req_prod = be.notifications(0), be.raw_ring(0).shared.req_prod
    later = env.submit("read", 8, 8)
    later_kind, later_value = later.outcome(0.3)
    time.sleep(0.05)
    expect(
        "SEC-21",
        False,
        _ok(later_kind, later_value),
        f"{case}: a later read {_said(later_kind, later_value)}",
    )
    after = [be.notifications(0), be.raw_ring(0).shared.req_prod]
    why = f"{case}: (notifications, req_prod) before and after a later read: the device is no longer used"
    expect("DIV-22", [events, req_prod], after, why)
    record_variant(
        "DIV-22", f"{case}: held read {_said(kind, value)}; later read {_said(later_kind, later_value)}"
    )


@pytest.mark.role("frontend")
@pytest.mark.rule("OP-6")
def test_a_status_outside_the_spec_is_an_error(frontend_under_test, record_variant) -> None:
    """Status 5 for a read: never success (Linux errors the request; disabling the device also passes);
    nor dropped while the device is used on (the read would hang, and nothing took it as an error)."""
    env = frontend_under_test(backend=BackendConfig(max_queues=1))
    env.attach()
    be = env.peer
    io, taken = _held_request(env, "read", 0, 8)
    rid, op, _ = _parse(be, taken[0])
    be.raw_respond(rid, op, 5)
    be.raw_publish(0)
    kind, value = io.outcome(env.timeout / 2)
    expect("OP-6", False, _ok(kind, value), f"a read answered with status 5 {_said(kind, value)}")
    be.resume()
    later = env.submit("read", 8, 8)
    later_kind, later_value = later.outcome(0.5)
    if kind == "pending":  # neither completed nor failed: only a device no longer used explains it
        expect("OP-6", False, _ok(later_kind, later_value),
               f"the status-5 read still pending, yet a later read {_said(later_kind, later_value)}: "
               "the answer was dropped, not taken as an error")  # fmt: skip
    said = f"status 5: read {_said(kind, value)}; a later read {_said(later_kind, later_value)}"
    record_variant("OP-6", said)


@pytest.mark.role("frontend")
@pytest.mark.rule("OP-6")
def test_a_failed_read_delivers_no_data(frontend_under_test) -> None:
    """A READ answered ERROR fails and hands no bytes on: what sits in its pages is not the disk's data."""
    env = frontend_under_test(backend=BackendConfig(max_queues=1))
    env.attach()
    be = env.peer
    io, taken = _held_request(env, "read", 0, 8)
    rid, op, _ = _parse(be, taken[0])
    be.raw_respond(rid, op, ERROR)
    be.raw_publish(0)
    kind, value = io.outcome(env.timeout / 2)
    expect("OP-6", False, _ok(kind, value), f"a read answered ERROR {_said(kind, value)}")
    if kind == "done":
        expect("OP-6", b"", value.data, "the data of a read answered ERROR")


@pytest.mark.role("frontend")
@pytest.mark.rule("SEC-24")
def test_first_use_pages_hold_nothing_but_the_data(frontend_under_test) -> None:
    """XSA-403 with trusted=0: the ring and a first-use data page are zero outside what was written."""
    env = frontend_under_test(backend=BackendConfig(max_queues=1))
    env.dom0.write(f"{env.vbd.frontend_path}/trusted", "0")
    env.attach()
    be = env.peer
    ring = be.initial_ring(0)
    stale = sum(1 for b in ring[64:] if b)
    expect("SEC-24", 0, stale, "non-zero bytes in the ring's slots when first mapped")
    data = b"\x5a" * SECTOR
    io, taken = _held_request(env, "write", 3, data)
    for slot in taken:
        _, op, segs = _parse(be, slot)
        expect("SEC-24", WRITE, op, "the request of a one-sector write")
        for gref, first, last in segs:
            page = be.raw_copy(gref)
            outside = page[: first * SECTOR] + page[(last + 1) * SECTOR :]
            expect("SEC-24", 0, sum(1 for b in outside if b),
                   f"non-zero bytes outside sectors {first}..{last} of the granted page {gref}")  # fmt: skip
            expect("SEC-24", data, page[first * SECTOR : (last + 1) * SECTOR], f"the data in page {gref}")
    be.raw_answer(taken)
    be.resume()
    kind, value = io.outcome(env.timeout)
    expect("SEC-24", ["done", OKAY], [kind, getattr(value, "status", value)], "the write")


@pytest.mark.role("frontend")
@pytest.mark.rule("SEC-22")
def test_requests_are_never_read_back_from_the_ring(frontend_under_test) -> None:
    """The suite's backend fills each request slot with 0xA5 once it has its copy: the read still works."""
    env = frontend_under_test(backend=BackendConfig(max_queues=1))
    env.attach()
    be = env.peer
    data = bytes(range(256)) * 2 * 16  # 16 sectors over two pages
    env.store.write(8 * SECTOR, data)
    io, taken = _held_request(env, "read", 8, 16, scribble=0xA5)  # slots overwritten once copied
    be.raw_answer(taken)
    be.resume()
    kind, value = io.outcome(env.timeout)
    got = [kind, getattr(value, "status", None), getattr(value, "data", b"") == data]
    expect("SEC-22", ["done", OKAY, True], got, f"(outcome, status, data right) of the read: {value!r:.100}")
    again = env.io("read", 8, 16)
    expect(
        "SEC-22", [OKAY, True], [again.status, again.data == data], "a second read: the device still works"
    )
    expect("SEC-22", {}, env.request_rules_broken(), "requests the suite's backend refused")


@pytest.mark.role("frontend")
@pytest.mark.rule("SEC-20", "SEC-21")
def test_a_response_rewritten_after_publishing(frontend_under_test, record_variant) -> None:
    """The response's id flips to a bogus one and back for 30 ms after publishing (a race, weak evidence).

    A frontend copying the response once acts on one version: the good one (the read
    succeeds and the device keeps working) or the bogus one (the device stops). A read
    that succeeds and a device that then stops points at a second fetch. A frontend that took
    the bogus copy stops the device: Linux then leaves the read pending (DIV-22), so this
    needs a target that can be destroyed.
    """
    env = frontend_under_test(backend=BackendConfig(max_queues=1))
    require_destroyable(env)
    env.attach()
    be = env.peer
    data = b"\x3c" * PAGE
    env.store.write(0, data)
    io, taken = _held_request(env, "read", 0, 8)
    be.raw_answer(taken, publish=False)
    ring = be.raw_ring(0)
    pos = (ring.rsp_prod_pvt - 1) & consts.RING_IDX_MASK
    c = codec.codecs(be.negotiated.abi)
    good = ring.shared.read_slot(pos)[: c.response.size]
    bogus = bytearray(good)
    bogus[0] ^= 0xFF
    bogus[7] ^= 0x80
    be.raw_publish(0)
    end, flips = time.monotonic() + 0.03, 0
    while time.monotonic() < end:
        ring.shared.write_slot(pos, bytes(bogus) if flips % 2 == 0 else good)
        flips += 1
    ring.shared.write_slot(pos, good)
    kind, value = io.outcome(env.timeout)
    be.resume()
    later = env.submit("read", 0, 8)
    later_kind, later_value = later.outcome(0.5)
    first_ok = _ok(kind, value) and getattr(value, "data", b"") == data
    outcome = f"read {_said(kind, value)}, a later read {_said(later_kind, later_value)} ({flips} rewrites)"
    if first_ok:
        expect("SEC-20", True, _ok(later_kind, later_value), f"accepted the good copy, then: {outcome}")
    else:
        expect("SEC-20", False, _ok(kind, value), f"a success with wrong data: {outcome}")
        expect("SEC-21", False, _ok(later_kind, later_value), f"took the bogus copy, then: {outcome}")
    record_variant("SEC-20", f"rewritten response: {outcome}")


@pytest.mark.role("frontend")
@pytest.mark.rule("SEC-25", "DIV-35")
def test_a_backend_event_storm_is_survived(frontend_under_test, record_variant) -> None:
    """XSA-391: thousands of events with no response while the frontend does I/O."""
    env = frontend_under_test(backend=BackendConfig(max_queues=1))
    env.attach()
    be = env.peer
    stop = threading.Event()
    sent = [0]

    def storm() -> None:
        while not stop.is_set() and sent[0] < 10000:
            be.raw_notify(0, 100)
            sent[0] += 100

    storm_thread = threading.Thread(target=storm, name="backend-event-storm", daemon=True)
    storm_thread.start()
    try:
        i = 0
        while storm_thread.is_alive() or i < 10:  # the storm ends by itself after 10000
            data = bytes([i % 251 + 1]) * PAGE
            sector = i % 64 * SPP
            expect("SEC-25", OKAY, env.io("write", sector, data).status, f"write {i} during the storm")
            got = env.io("read", sector, SPP)
            expect("SEC-25", [OKAY, True], [got.status, got.data == data], f"read {i} during the storm")
            i += 1
    finally:
        stop.set()
        storm_thread.join(env.timeout)
    expect("SEC-25", OKAY, env.io("read", 0, 8).status, "a read after the storm")
    record_variant("DIV-35", f"{sent[0]} spurious events from the backend: I/O went on")


@pytest.mark.role("frontend")
@pytest.mark.rule("SEC-26")
@HOST_HAZARD_SECTOR_SIZE
def test_a_nonsense_sector_size_is_not_used(frontend_under_test, record_variant) -> None:
    """sector-size 1000 (not a power of two): the frontend should not connect. Current Linux refuses
    it in the block layer; Linux 6.1 blkfront takes it and oopses in the partition scan.

    Started without `attach()`, which would wait for Connected.
    """
    env = frontend_under_test(backend=BackendConfig(max_queues=1, sector_size=1000))
    env.start()
    deadline = time.monotonic() + min(0.5, env.timeout)
    state = env.state("frontend")
    while state != XenbusState.Connected and time.monotonic() < deadline:
        time.sleep(0.01)
        state = env.state("frontend")
    expect(
        "SEC-26", False, state == XenbusState.Connected, "the frontend connected to a 1000-byte sector-size"
    )
    record_variant("SEC-26", f"sector-size 1000: frontend state {state.name}")


@pytest.mark.role("frontend")
@pytest.mark.rule("SEC-23", "SM-25")
def test_the_frontend_leaves_nothing_behind(frontend_under_test, record_variant) -> None:
    """After a guest close: every grant ended, every port closed, no node outside the device directories."""
    env = frontend_under_test()
    before = tree_paths(env)
    env.attach()
    for i in range(8):
        expect("SEC-23", OKAY, env.io("write", i * 64, bytes([i + 1]) * PAGE).status, f"write {i}")
        expect("SEC-23", OKAY, env.io("read", i * 64, SPP).status, f"read {i}")
    env.io("close")
    state = env.wait_state("frontend", {XenbusState.Closed}, "frontend Closed after close (SM-25)")
    record_variant("SM-25", f"guest close ends in {state.name}")
    if env.leaks_visible:
        expect("SEC-23", {}, settled_leaks(env), "what the frontend domain still holds after close")
    else:
        record_variant("SEC-23", "grants and ports not checked: not visible from dom0's user space")
    expect("SEC-23", [], left_behind(env, before), "XenStore nodes it created outside the device directories")
