"""Run the conformance suite against one faulty implementation, in-process, and judge the result.

Each fault runs only the conformance tests marked with the rule it breaks
(`--blkif-rules`), under the `selfcheck` hypothesis profile (few examples, no
shrinking), as conventions §8 asks. It is caught when a test tagged with that
rule (or a sub-clause or the parent of it) ends `fail`, or `timeout` for a
fault that hangs; faults of `should` rules run with `--blkif-strict`.
`python -m tests.faulty.killrate` prints the table for all.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings

from blkif_spec import catalogue
from tests.faulty.registry import Fault

ROOT = Path(__file__).resolve().parents[2]
SELFCHECK_TIMEOUT = 1.0  # seconds: the bound on every wait on a faulty target


@dataclass
class Outcome:
    fault: Fault
    exit_code: int
    caught_by: list[str] = field(default_factory=list)  # node ids failing on the broken rule
    other_failures: list[str] = field(default_factory=list)  # failing, but on other rules only
    verdicts: dict[str, str] = field(default_factory=dict)  # node id -> verdict, failing tests
    ran: int = 0

    @property
    def caught(self) -> bool:
        return bool(self.caught_by)


def _same_rule(a: str, b: str) -> bool:
    """A rule, its sub-clauses and its parent count as the same rule for attribution."""
    return a == b or catalogue.get(a).parent == b or catalogue.get(b).parent == a


def run_fault(fault: Fault, *, quiet: bool = True) -> Outcome:
    expected = {"timeout"} if fault.hangs else {"fail", "timeout"}
    profile = settings._current_profile  # a nested pytest run loads its own profile: restore ours
    with tempfile.TemporaryDirectory(prefix="blkif-selfcheck-") as tmp:
        args = [
            str(ROOT / "tests" / "conformance"), "-p", "no:cacheprovider", "-q", "--no-header",
            f"--rootdir={ROOT}", f"--{fault.role}={fault.target}", f"--blkif-rules={fault.rule}",
            "--hypothesis-profile=selfcheck", f"--conformance-report={tmp}",
        ]  # fmt: skip
        # One failure on the rule is the verdict: stop there (a hanging fault must show its timeout,
        # so it runs on). A tighter bound than the suite's default keeps hangs cheap.
        args.append(f"--blkif-timeout={SELFCHECK_TIMEOUT}")
        if not fault.hangs:
            args.append("--maxfail=1")
        if catalogue.get(fault.rule).enforcement == "should":
            args.append("--blkif-strict")  # a SHOULD rule fails only when enforced (conventions §4)
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                code = int(pytest.main(args))
        finally:
            if profile is not None:
                settings.load_profile(profile)
        path = Path(tmp) / "report.json"
        tests = json.loads(path.read_text())["tests"] if path.exists() else []
    out = Outcome(fault, code, ran=len(tests))
    for t in tests:
        if t["verdict"] in ("fail", "timeout", "error"):
            out.verdicts[t["nodeid"]] = t["verdict"]
            if t["verdict"] in expected and any(_same_rule(r, fault.rule) for r in t["rules"]):
                out.caught_by.append(t["nodeid"])
            else:
                out.other_failures.append(t["nodeid"])
    return out
