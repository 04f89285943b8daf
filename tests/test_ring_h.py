"""Differential test: `blkif_spec.ring` against the real `ring.h` macros compiled with gcc (conventions §10).

A small C probe (our own code, below) includes the installed `xen/io/blkif.h`
(which includes `ring.h` and expands DEFINE_RING_TYPES for `blkif`), reads
commands from stdin and prints what the macros compute:

* ``H order``: the shared-ring header after XEN_FRONT_RING_INIT over a page
  filled with 0xa5, the field offsets, `sizeof(union blkif_sring_entry)`,
  `__CONST_RING_SIZE` and `RING_SIZE` (WIRE-8, WIRE-9);
* ``R entry_size order``: `__RD32((4096·2^order − 64) / entry_size)` for any
  entry size (WIRE-9);
* ``S order req_prod req_event rsp_prod rsp_event req_prod_pvt rsp_cons req_cons
  rsp_prod_pvt arg``: every index macro on that state (RING-1, RING-3, RING-6 ..
  RING-9), each mutating macro from a fresh copy of the state.

The probe is compiled once per session; hypothesis batches scenarios (indices
near 2^32 and near the RING_SIZE boundaries) through one run per example.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec.errors import RuleViolation
from blkif_spec.ring import (
    ENTRY_SIZE_X86_32,
    ENTRY_SIZE_X86_64,
    BackRing,
    FrontRing,
    SharedRing,
    free_requests,
    need_notify,
    nr_unconsumed_requests,
    nr_unconsumed_responses,
    request_cons_overflow,
    request_prod_overflow,
    response_prod_overflow,
    ring_bytes,
    ring_size,
)

M = 2**32
RING_H = Path("/usr/include/xen/io/ring.h")
BLKIF_H = RING_H.with_name("blkif.h")

PROBE_C = r"""
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* The legacy interface maps xen_mb() and friends onto mb() and friends. */
#define mb()  __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#include <xen/io/blkif.h>

/* A second ring type with the x86_32 entry size, so both sizes are checked in one ABI. */
struct probe_req108 { uint32_t w[27]; };
struct probe_rsp12 { uint32_t w[3]; };
DEFINE_RING_TYPES(probe108, struct probe_req108, struct probe_rsp12);

static unsigned char page[4096 << 4] __attribute__((aligned(4096)));

static void header(unsigned order)
{
    blkif_front_ring_t front;
    blkif_sring_t *s = (blkif_sring_t *)page;
    unsigned bytes = 4096u << order;
    int i;

    memset(page, 0xa5, sizeof(page));
    XEN_FRONT_RING_INIT(&front, s, bytes);
    printf("%u %u %u %u %u %u %u %u %u %u ", order,
           (unsigned)offsetof(blkif_sring_t, req_prod), (unsigned)offsetof(blkif_sring_t, req_event),
           (unsigned)offsetof(blkif_sring_t, rsp_prod), (unsigned)offsetof(blkif_sring_t, rsp_event),
           (unsigned)offsetof(blkif_sring_t, ring), (unsigned)sizeof(union blkif_sring_entry),
           (unsigned)__CONST_RING_SIZE(blkif, bytes), (unsigned)RING_SIZE(&front),
           (unsigned)__CONST_RING_SIZE(probe108, bytes));
    for (i = 0; i < 64; i++)
        printf("%02x", page[i]);
    printf("\n");
}

static void scenario(unsigned order, const RING_IDX v[9])
{
    blkif_sring_t *s = (blkif_sring_t *)page;
    blkif_front_ring_t f;
    blkif_back_ring_t b;
    unsigned bytes = 4096u << order;
    RING_IDX arg = v[8];
    unsigned work;
    int notify;

    FRONT_RING_ATTACH(&f, s, 0, bytes);
    BACK_RING_ATTACH(&b, s, 0, bytes);
#define RESET() do {                                                  \
        s->req_prod = v[0]; s->req_event = v[1];                      \
        s->rsp_prod = v[2]; s->rsp_event = v[3];                      \
        f.req_prod_pvt = v[4]; f.rsp_cons = v[5];                     \
        b.req_cons = v[6]; b.rsp_prod_pvt = v[7];                     \
    } while (0)

    RESET();
    printf("%u %u %u %u %u", (unsigned)RING_SIZE(&f), (unsigned)RING_FREE_REQUESTS(&f),
           (unsigned)RING_FULL(&f), (unsigned)RING_HAS_UNCONSUMED_REQUESTS(&b),
           (unsigned)RING_HAS_UNCONSUMED_RESPONSES(&f));
    printf(" %d %d", (int)RING_REQUEST_CONS_OVERFLOW(&b, arg), (int)RING_REQUEST_PROD_OVERFLOW(&b, arg));
#ifdef RING_RESPONSE_PROD_OVERFLOW
    printf(" %d", (int)RING_RESPONSE_PROD_OVERFLOW(&f, arg));
#else
    printf(" -1");
#endif
    RESET();
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f, notify);
    printf(" %d %u", notify, (unsigned)s->req_prod);
    RESET();
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b, notify);
    printf(" %d %u", notify, (unsigned)s->rsp_prod);
    RESET();
    RING_FINAL_CHECK_FOR_REQUESTS(&b, work);
    printf(" %u %u", work, (unsigned)s->req_event);
    RESET();
    RING_FINAL_CHECK_FOR_RESPONSES(&f, work);
    printf(" %u %u\n", work, (unsigned)s->rsp_event);
}

int main(void)
{
    char cmd[2];
    unsigned order, es;
    RING_IDX v[9];
    int i;

    while (scanf("%1s", cmd) == 1) {
        if (cmd[0] == 'H') {
            if (scanf("%u", &order) != 1 || order > 4) return 3;
            header(order);
        } else if (cmd[0] == 'R') {
            if (scanf("%u %u", &es, &order) != 2 || es == 0 || order > 4) return 3;
            printf("%u\n", (unsigned)__RD32(((4096u << order) - 64u) / es));
        } else if (cmd[0] == 'S') {
            if (scanf("%u", &order) != 1 || order > 4) return 3;
            for (i = 0; i < 9; i++)
                if (scanf("%u", &v[i]) != 1) return 3;
            scenario(order, v);
        } else {
            return 2;
        }
    }
    return 0;
}
"""


def _compile(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    if not RING_H.exists():
        pytest.skip(f"no {RING_H}: apt-get install libxen-dev")
    if not BLKIF_H.exists():
        pytest.skip(f"no {BLKIF_H}: apt-get install libxen-dev")
    tmp = tmp_path_factory.mktemp("ring_h")
    src = tmp / "ring_h_probe.c"
    src.write_text(PROBE_C)
    exe = tmp / "ring_h_probe"
    cmd = ["gcc", "-std=gnu11", "-O1", "-Wall", *flags, "-o", str(exe), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        if flags:  # an optional ABI (e.g. -m32 without gcc-multilib) is a skip, not a failure
            pytest.skip(f"gcc {' '.join(flags)} cannot build the probe: {proc.stderr.strip()[:300]}")
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return exe


@pytest.fixture(scope="session")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory)


@pytest.fixture(scope="session")
def probe32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory, "-m32")


def run_probe(exe: Path, lines: list[str]) -> list[list[str]]:
    proc = subprocess.run(
        [str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, f"probe exited {proc.returncode}: {proc.stderr}"
    out = [line.split() for line in proc.stdout.splitlines()]
    assert len(out) == len(lines)
    return out


# --------------------------------------------------------------------------------------
# Layout, SHARED_RING_INIT and ring sizes (WIRE-8, WIRE-9)
# --------------------------------------------------------------------------------------


def _check_headers(exe: Path, entry_size: int) -> None:
    for row in run_probe(exe, [f"H {order}" for order in range(5)]):
        order = int(row[0])
        offsets = [int(x) for x in row[1:6]]
        sizeof_entry, const_size, runtime_size, const_size_108 = (int(x) for x in row[6:10])
        assert offsets == [0, 4, 8, 12, 64]
        assert sizeof_entry == entry_size
        assert const_size == runtime_size == ring_size(order, entry_size) == 32 << order
        assert const_size_108 == ring_size(order, ENTRY_SIZE_X86_32)
        buf = bytearray(b"\xa5" * ring_bytes(order))
        shared = SharedRing(buf, order, entry_size)
        FrontRing(shared).init()
        shared.release()
        assert bytes(buf[:64]).hex() == row[10]  # XEN_FRONT_RING_INIT == SharedRing.init (WIRE-8)


def test_header_and_sizes_x86_64(probe: Path) -> None:
    _check_headers(probe, ENTRY_SIZE_X86_64)


def test_header_and_sizes_x86_32(probe32: Path) -> None:
    _check_headers(probe32, ENTRY_SIZE_X86_32)


@given(st.lists(st.tuples(st.integers(1, 4032), st.integers(0, 4)), min_size=1, max_size=50))
def test_ring_size_equals_rd32_for_any_entry_size(probe: Path, cases: list[tuple[int, int]]) -> None:
    out = run_probe(probe, [f"R {es} {order}" for es, order in cases])
    for (es, order), (c_size,) in zip(cases, out, strict=True):
        assert ring_size(order, es) == int(c_size), (es, order)


# --------------------------------------------------------------------------------------
# Index macros on arbitrary states (RING-1, RING-3, RING-6 .. RING-9)
# --------------------------------------------------------------------------------------


def _step(size: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 3),
        st.integers(-3, 3),
        st.sampled_from([size - 1, size, size + 1, -size, -size - 1, 2 * size]),
        st.integers(-2 * size - 2, 2 * size + 2),
        st.integers(0, M - 1),
    )


# Built once: constructing strategies inside the composite dominated the run time.
_STEPS = {order: _step(32 << order) for order in range(5)}
_STARTS = {
    order: st.one_of(st.integers(M - (64 << order) - 600, M - 1), st.just(0), st.integers(0, M - 1))
    for order in range(5)
}
_PICK = st.integers(0, 1)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, tuple[int, ...]]:
    """A ring state as a chain of distances, mostly plausible, sometimes wild.

    rsp_cons → rsp_prod → rsp_prod_pvt → req_cons → req_prod → req_prod_pvt,
    each step small, at a RING_SIZE boundary, or any uint32; the chain starts
    near 2^32 so most states wrap.
    """
    order = draw(st.integers(0, 4))
    step = _STEPS[order]
    rsp_cons = draw(_STARTS[order])
    rsp_prod = rsp_cons + draw(step)
    rsp_prod_pvt = rsp_prod + draw(step)
    req_cons = rsp_prod_pvt + draw(step)
    req_prod = req_cons + draw(step)
    req_prod_pvt = req_prod + draw(step)
    req_event = (req_cons, req_prod)[draw(_PICK)] + draw(step)
    rsp_event = (rsp_cons, rsp_prod)[draw(_PICK)] + draw(step)
    arg = (rsp_prod_pvt, rsp_cons)[draw(_PICK)] + draw(step)
    state = (req_prod, req_event, rsp_prod, rsp_event, req_prod_pvt, rsp_cons, req_cons, rsp_prod_pvt, arg)
    return order, tuple(x % M for x in state)


def model(shared: SharedRing, v: tuple[int, ...], c: list[int]) -> None:
    """Run blkif_spec.ring on state `v` over `shared` and compare with the probe's row `c`."""
    (c_size, c_free, c_full, c_unreq, c_unrsp, c_cons_of, c_prod_of, c_rsp_of,
     c_notify_req, c_req_prod, c_notify_rsp, c_rsp_prod,
     c_work_req, c_req_event, c_work_rsp, c_rsp_event) = c  # fmt: skip
    req_prod, req_event, rsp_prod, rsp_event, req_prod_pvt, rsp_cons, req_cons, rsp_prod_pvt, arg = v
    front, back = FrontRing(shared), BackRing(shared)
    size = shared.size

    def reset() -> None:
        w = shared.words
        w[0], w[1], w[2], w[3] = req_prod, req_event, rsp_prod, rsp_event
        front.req_prod_pvt, front.rsp_cons = req_prod_pvt, rsp_cons
        back.req_cons, back.rsp_prod_pvt = req_cons, rsp_prod_pvt

    reset()
    assert size == c_size
    # RING-3
    assert front.free_requests() % M == free_requests(size, req_prod_pvt, rsp_cons) % M == c_free
    if (req_prod_pvt - rsp_cons) % M <= size:
        assert front.full() == bool(c_full)
    else:
        assert front.full()  # deliberate: the unsigned macro wraps and calls an over-produced ring "not full"
    # RING_HAS_UNCONSUMED_* (as counts)
    assert (
        back.unconsumed_requests()
        == nr_unconsumed_requests(size, req_prod, req_cons, rsp_prod_pvt)
        == c_unreq
    )
    assert nr_unconsumed_responses(rsp_prod, rsp_cons) == c_unrsp
    # RING-8, RING-9 predicates, pure and bound
    assert (
        back.request_cons_overflow(arg) == request_cons_overflow(size, arg, rsp_prod_pvt) == bool(c_cons_of)
    )
    assert (
        back.request_prod_overflow(arg) == request_prod_overflow(size, arg, rsp_prod_pvt) == bool(c_prod_of)
    )
    if c_rsp_of != -1:  # RING_RESPONSE_PROD_OVERFLOW is absent from old headers
        assert (
            front.response_prod_overflow(arg) == response_prod_overflow(size, arg, rsp_cons) == bool(c_rsp_of)
        )
    # the raising forms judge the peer exactly where the predicates say so (RING-9)
    if request_prod_overflow(size, req_prod, rsp_prod_pvt):
        with pytest.raises(RuleViolation, match="RING-9"):
            back.poll_requests()
    else:
        assert back.poll_requests() == c_unreq
    rsp_overflow = response_prod_overflow(size, rsp_prod, rsp_cons)
    if rsp_overflow:
        with pytest.raises(RuleViolation, match="RING-9"):
            front.unconsumed_responses()
    else:
        assert front.unconsumed_responses() == c_unrsp
    # RING-6
    reset()
    assert front.push_requests() == need_notify(req_prod, req_prod_pvt, req_event) == bool(c_notify_req)
    assert shared.req_prod == c_req_prod
    reset()
    assert back.push_responses() == need_notify(rsp_prod, rsp_prod_pvt, rsp_event) == bool(c_notify_rsp)
    assert shared.rsp_prod == c_rsp_prod
    # RING-7
    reset()
    assert back.final_check_for_requests() == bool(c_work_req)
    assert shared.req_event == c_req_event
    reset()
    if rsp_overflow:
        with pytest.raises(RuleViolation, match="RING-9"):
            front.final_check_for_responses()
    else:
        assert front.final_check_for_responses() == bool(c_work_rsp)
        assert shared.rsp_event == c_rsp_event


def compare_batch(probe: Path, batch: list[tuple[int, tuple[int, ...]]]) -> None:
    """One probe run for the whole batch; one SharedRing per order, reused (every scenario resets it)."""
    out = run_probe(probe, [f"S {order} " + " ".join(map(str, v)) for order, v in batch])
    rings = {order: SharedRing(bytearray(ring_bytes(order)), order) for order in {o for o, _ in batch}}
    try:
        for (order, v), row in zip(batch, out, strict=True):
            model(rings[order], v, [int(x) for x in row])
    finally:
        for shared in rings.values():
            shared.release()


@given(st.lists(scenarios(), min_size=1, max_size=40))
def test_index_macros_match_ring_h(probe: Path, batch: list[tuple[int, tuple[int, ...]]]) -> None:
    compare_batch(probe, batch)


def test_index_macros_at_fixed_boundaries(probe: Path) -> None:
    """The boundary cases by hand, so they run whatever hypothesis draws."""
    batch = []
    for order in range(5):
        size = 32 << order
        for base in (0, M - 1, M - size, M - size - 1, 12345):
            for d in (0, 1, size - 1, size, size + 1):
                state = (base + d, base + 1, base, base + 1, base + d, base, base + d, base, base + d)
                batch.append((order, tuple(x % M for x in state)))
    compare_batch(probe, batch)
