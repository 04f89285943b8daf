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
