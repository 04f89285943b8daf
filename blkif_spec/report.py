"""Verdicts per test and per rule, and the conformance report (`report.json`, `report.md`).

A rule's verdict aggregates its tests: fail > timeout > error > warn > known >
pass > skip > untested, the first any of its tests shows (conventions §4).
Every catalogue rule appears in the report, untested ones included (§6).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blkif_spec import __version__, catalogue

VERDICTS = ("fail", "timeout", "error", "warn", "known", "pass", "skip", "untested")
SCHEMA = "blkif-conformance-report/1"


_TOOLSTACK = "written by the suite itself, playing the toolstack: no target writes it"

#: Why a `must` rule has no test of a target (issue: the report lists exceptions with a reason).
UNTESTED_REASONS = {
    "RING-4": "write-barrier placement is not observable from a peer in Python (entries and index "
              "are seen in order by construction); lost or torn publications are caught by RING-6/7 tests",
    "RING-5": "read-barrier placement is not observable from a peer; consequences are caught by SEC-1",
    "XK-1": "the suite, as toolstack, chooses the device paths; a target cannot choose them",
    "XK-2": _TOOLSTACK, "XK-B1": _TOOLSTACK, "XK-B2": _TOOLSTACK, "XK-B9": _TOOLSTACK,
    "XK-B12": _TOOLSTACK, "XK-F1": _TOOLSTACK, "XK-F2": _TOOLSTACK, "XK-F4": _TOOLSTACK,
    "SM-1": _TOOLSTACK,
    "SEC-31": "a rule of the XenStore server, which is never a target (tested on the simulated "
              "xenstored by the project's own tests)",
}  # fmt: skip


def worst(verdicts: list[str]) -> str:
    return min(verdicts, key=VERDICTS.index) if verdicts else "untested"


@dataclass
class TestResult:
    nodeid: str
    outcome: str  # pytest's: passed, failed, skipped
    verdict: str
    rules: list[str]
    duration_s: float = 0.0
    message: str | None = None
    reproduce: str | None = None
    variants: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"nodeid": self.nodeid, "outcome": self.outcome, "verdict": self.verdict, "rules": self.rules,
                "duration_s": round(self.duration_s, 4), "message": self.message, "reproduce": self.reproduce,
                "variants": self.variants}  # fmt: skip


@dataclass
class Report:
    """Everything a run observed; `rules()` and `summary()` derive the rest."""

    targets: dict[str, dict[str, Any]]
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    tests: list[TestResult] = field(default_factory=list)
    negotiated: dict[str, Any] | None = None
    duration_s: float = 0.0
    strict: bool = False

    def rules(self) -> list[dict[str, Any]]:
        by_rule: dict[str, list[TestResult]] = {}
        for t in self.tests:
            for rid in t.rules:
                by_rule.setdefault(rid, []).append(t)
                parent = catalogue.get(rid).parent
                if parent:  # a sub-clause's tests also stand behind its parent
                    by_rule.setdefault(parent, []).append(t)
        rows = []
        for rule in catalogue.rules():
            tests = by_rule.get(rule.id, [])
            verdict = worst([t.verdict for t in tests])
            variants = sorted({t.variants[rule.id] for t in tests if rule.id in t.variants})
            reason = None
            if verdict == "skip":
                reason = next((t.message for t in tests if t.message), None)
            elif verdict == "untested" and rule.enforcement == "harness":
                reason = "harness rule: checked by the project's own tests, never counted for a target"
            elif verdict == "untested":
                reason = UNTESTED_REASONS.get(rule.id)
            rows.append({"id": rule.id, "area": rule.area, "level": rule.level,
                         "enforcement": rule.enforcement, "summary": rule.summary, "verdict": verdict,
                         "variant": ", ".join(variants) or None,
                         "tests": sorted({t.nodeid for t in tests}), "reason": reason})  # fmt: skip
        return rows

    def summary(self, rows: list[dict[str, Any]] | None = None) -> dict[str, dict[str, int]]:
        """Verdict counts per level, and per area (`area:XK`)."""
        rows = self.rules() if rows is None else rows
        out: dict[str, Counter] = {}
        for row in rows:
            for key in (row["level"], f"area:{row['area']}"):
                out.setdefault(key, Counter())[row["verdict"]] += 1
        return {k: dict(v) for k, v in out.items()}

    def as_json(self) -> dict[str, Any]:
        rows = self.rules()
        return {
            "schema": SCHEMA,
            "tool": {"name": "blkif-conformance", "version": __version__, "commit": _commit()},
            "started": self.started.isoformat(),
            "duration_s": round(self.duration_s, 3),
            "strict": self.strict,
            "targets": self.targets,
            "negotiated": self.negotiated,
            "summary": self.summary(rows),
            "rules": rows,
            "tests": [t.as_json() for t in self.tests],
        }

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        data = self.as_json()
        (directory / "report.json").write_text(json.dumps(data, indent=2) + "\n")
        (directory / "report.md").write_text(markdown(data))


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def markdown(data: dict[str, Any]) -> str:
    """report.md: the same content for people: summary, failures, divergences observed."""
    lines = ["# blkif conformance report", ""]
    for role, t in data["targets"].items():
        lines.append(f"- {role}: **{t['name']}** ({t['kind']})")
    lines += ["", f"Started {data['started']}, {data['duration_s']} s.", "",
              f"Negotiated: `{data['negotiated']}`", ""]  # fmt: skip
    lines += ["## Summary by level", "", "| level | " + " | ".join(VERDICTS) + " |",
              "|---|" + "---|" * len(VERDICTS)]  # fmt: skip
    for key, counts in data["summary"].items():
        if not key.startswith("area:"):
            lines.append(f"| {key} | " + " | ".join(str(counts.get(v, 0)) for v in VERDICTS) + " |")
    lines += ["", "## Summary by area", "", "| area | " + " | ".join(VERDICTS) + " |",
              "|---|" + "---|" * len(VERDICTS)]  # fmt: skip
    for key, counts in data["summary"].items():
        if key.startswith("area:"):
            lines.append(f"| {key[5:]} | " + " | ".join(str(counts.get(v, 0)) for v in VERDICTS) + " |")
    failing = [t for t in data["tests"] if t["verdict"] in ("fail", "timeout", "error", "warn")]
    lines += ["", f"## Failures ({len(failing)})", ""]
    for t in failing:
        lines += [f"### {t['verdict'].upper()} `{t['nodeid']}` ({', '.join(t['rules'])})", "", "```",
                  (t["message"] or "").strip(), "```", ""]  # fmt: skip
        if t["reproduce"]:
            lines += [f"Reproduce: `{t['reproduce']}`", ""]
    untested = [r for r in data["rules"] if r["verdict"] == "untested" and r["enforcement"] == "must"]
    lines += [f"## MUST rules without a test ({len(untested)})", ""]
    lines += [f"- {r['id']}: {r['reason'] or 'no test yet'}" for r in untested] or ["none"]
    lines.append("")
    variants = [r for r in data["rules"] if r["variant"]]
    lines += ["## Divergences observed", ""]
    lines += [f"- {r['id']}: {r['variant']}" for r in variants] or ["none recorded"]
    return "\n".join(lines) + "\n"
