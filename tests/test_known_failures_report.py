"""The run's summary names a known-failure entry as unused only when a test it covers ran and passed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TESTS = """
import pytest

@pytest.mark.role("backend")
@pytest.mark.rule("OP-3")
def test_passes():
    assert 1 + 1 == 2

@pytest.mark.role("backend")
@pytest.mark.rule("OP-2")
def test_skipped():
    pytest.skip("feature not offered")

@pytest.mark.role("backend")
@pytest.mark.rule("OP-6")
def test_deselected():
    assert False
"""

ENTRIES = "".join(f'[[accept]]\nrule = "{rule}"\nreason = "r"\ntest = "*{test}*"\n\n'
                  for rule, test in (("OP-3", "test_passes"), ("OP-2", "test_skipped"),
                                     ("OP-6", "test_deselected")))  # fmt: skip


def test_only_entries_of_tests_that_ran_are_called_unused(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(TESTS)
    (tmp_path / "kf.toml").write_text(ENTRIES)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "blkif_spec.pytest_plugin", "-q", "-p", "no:cacheprovider",
         "--known-failures=kf.toml", "-k", "not deselected", "test_x.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    unused = [line for line in run.stdout.splitlines() if line.startswith("known-failures:")]
    assert unused == ["known-failures: OP-3 accepted but passing: remove the entry"]
