"""Reading what the jobs left in the share, and the run's record (`lab.json`) and summary.

Pure apart from reading files: the tests run it on a fake share directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from blkif_spec.lab.plan import Job


@dataclass(frozen=True)
class JobResult:
    """One job's outcome; rc None means the job never finished (no `rc` file: boot failed, or a timeout)."""

    name: str
    rc: int | None
    seconds: float | None
    log_tail: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def collect(share: Path, jobs: Sequence[Job], tail: int = 15) -> list[JobResult]:
    """Each job's `rc`, `seconds` and the end of its `log.txt`, in plan order."""
    out = []
    for job in jobs:
        folder = share / job.name
        rc_text, sec_text, log = (_read(folder / n) for n in ("rc", "seconds", "log.txt"))
        rc = int(rc_text.strip()) if rc_text and rc_text.strip().lstrip("-").isdigit() else None
        try:
            seconds = float(sec_text) if sec_text else None
        except ValueError:
            seconds = None
        out.append(JobResult(job.name, rc, seconds, "\n".join((log or "").splitlines()[-tail:])))
    return out


def guest_info(share: Path) -> dict[str, str]:
    """`key=value` lines of `guest-info.txt` (versions dom0 itself reports)."""
    text = _read(share / "guest-info.txt") or ""
    pairs = (line.partition("=") for line in text.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, _, v in pairs}


def record(*, phases: Mapping[str, float], hits: Mapping[str, bool], versions: Mapping[str, str],
           results: Sequence[JobResult], error: str | None,
           extra: Mapping[str, object]) -> dict[str, object]:  # fmt: skip
    """The content of `lab.json`."""
    return {
        "ok": error is None and bool(results) and all(r.ok for r in results),
        "error": error,
        "phases": {k: round(v, 1) for k, v in phases.items()},
        "cache": {
            "hit": bool(hits) and all(hits.values()),
            "layers": {k: "hit" if v else "miss" for k, v in hits.items()},
        },
        "versions": dict(versions),
        "jobs": {r.name: {"rc": r.rc, "seconds": r.seconds} for r in results},
        **extra,
    }


def summary(rec: Mapping[str, object], results: Sequence[JobResult]) -> str:
    """Lines for the terminal: phases, cache, versions, one per job (a failure with its log's end)."""
    phases = rec["phases"]
    assert isinstance(phases, dict)
    cache = rec["cache"]
    assert isinstance(cache, dict)
    lines = ["lab: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
             + f"; cache {'hit' if cache['hit'] else 'miss'}"]  # fmt: skip
    versions = rec["versions"]
    assert isinstance(versions, dict)
    lines += [f"  {k}: {v}" for k, v in versions.items()]
    for r in results:
        state = "ok" if r.ok else ("did not finish" if r.rc is None else f"FAILED rc={r.rc}")
        secs = f" ({r.seconds:.1f} s)" if r.seconds is not None else ""
        lines.append(f"  job {r.name}: {state}{secs}")
        if not r.ok and r.log_tail:
            lines += [f"    | {line}" for line in r.log_tail.splitlines()]
    if rec.get("error"):
        lines.append(str(rec["error"]))
    return "\n".join(lines)
