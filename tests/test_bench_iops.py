"""`python -m blkif_spec.bench iops` runs end to end: JSON shape, every response correct, bounded time.

Speed goals live in the benchmark's output, never here: a loaded CI machine
must not fail the suite. What is checked is that the bench measures a working
pair: ring worker processes served every request with status 0 and the ids
echoed (zero bad responses), the disk round-trips afterwards, nothing leaked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

BOUND_S = 60.0  # two short windows plus set-up and teardown take a few seconds


@pytest.fixture(scope="module")
def bench() -> tuple[dict, float]:
    t0 = time.monotonic()
    argv = ["iops", "--json", "--seconds", "0.3", "--queues", "1", "2"]
    proc = subprocess.run([sys.executable, "-m", "blkif_spec.bench", *argv],
                          capture_output=True, text=True, timeout=BOUND_S)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout), elapsed


def test_json_shape(bench: tuple[dict, float]) -> None:
    out, _ = bench
    assert isinstance(out["cores"], int) and out["cores"] >= 1
    assert [r["queues"] for r in out["results"]] == [1, 2]
    for r in out["results"]:
        cpu = r["cpu_s"]
        assert len(cpu["backend_workers"]) == r["queues"]
        assert all(c >= 0 for c in cpu["backend_workers"])
        assert cpu["generator"] >= 0 and cpu["parent_process"] >= 0


def test_every_response_correct(bench: tuple[dict, float]) -> None:
    out, _ = bench
    for r in out["results"]:
        assert r["iops"] > 0 and r["responses"] > 0
        assert len(r["iops_per_queue"]) == r["queues"] and all(q > 0 for q in r["iops_per_queue"])
        assert r["bad_responses"] == {"status": 0, "echo": 0, "padding": 0}
        assert r["data_ok"] is True
        assert r["errors"] == []


def test_finishes_within_bound(bench: tuple[dict, float]) -> None:
    _, elapsed = bench
    assert elapsed < BOUND_S


def test_responses_out_of_order_are_right_and_wrong_ones_are_counted() -> None:
    """A real backend completes requests in any order: a slot answering another in-flight request
    of the chunk is right; a wrong echo, a touched padding byte or a bad status is counted."""
    from types import SimpleNamespace

    from blkif_spec import codec
    from blkif_spec.bench import iops_bench as ib
    from blkif_spec.ring import SRING_HEADER_SIZE

    size, entry = 8, codec.codecs(ib.ABI).request_rw.size
    raw = SimpleNamespace(ring=SimpleNamespace(size=size, shared=SimpleNamespace(entry_size=entry)),
                          pages=[(None, 100 + i) for i in range(size)])  # fmt: skip
    requests, expected = ib._chunks(raw, seed=1, handle=0)
    buf = bytearray(SRING_HEADER_SIZE + size * entry)
    raw.buf = memoryview(buf)
    write = codec.codecs(ib.ABI).response.field_packer("id", "operation", "status")
    op_of = [
        codec.codecs(ib.ABI).request_rw.unpack_from(requests[0][i * entry :])[0] for i in range(size // 2)
    ]

    def answer(order: list[int], status: int = 0) -> ib._Load:
        load = ib._Load(raw, entry, size // 2, requests, expected)
        buf[SRING_HEADER_SIZE : SRING_HEADER_SIZE + size // 2 * entry] = requests[0][: size // 2 * entry]
        for slot, which in enumerate(order):
            write(buf, SRING_HEADER_SIZE + slot * entry, which, op_of[which], status if slot == 0 else 0)
        return load

    load = answer([2, 0, 3, 1])
    ib._classify(load, 0, 0, size // 2)
    assert load.bad == {"status": 0, "echo": 0, "padding": 0}
    load = answer([2, 0, 3, 1], status=-1)
    ib._classify(load, 0, 0, size // 2)
    assert load.bad == {"status": 1, "echo": 0, "padding": 0}
    load = answer([2, 0, 3, 1])
    write(buf, SRING_HEADER_SIZE, 2, 1 - op_of[2], 0)  # READ for a WRITE or the other way round
    buf[SRING_HEADER_SIZE + entry + 9] ^= 0xFF  # the padding byte after `operation`
    ib._classify(load, 0, 0, size // 2)
    assert load.bad == {"status": 0, "echo": 1, "padding": 1}
