"""After a lab run: the reference pair's reports on the host, and the interop matrix beside the live ones.

The live jobs leave `OUT/<job>/report.json`; the reference implementations are
run here, on the host, role by role (`OUT/reference-backend/`, `OUT/reference-frontend/`),
so that `OUT/matrix.md` shows, rule by rule, the reference against Linux blkback
and QEMU qdisk (backend role) and against Linux blkfront (frontend role).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from blkif_spec import matrix
from blkif_spec.lab.plan import QUICK
from blkif_spec.lab.proc import say

# (role, column name, job folder) of every live job whose report joins the matrix
LIVE_COLUMNS = (
    ("backend", "Linux blkback", "live-blkback"),
    ("backend", "QEMU qdisk", "live-qdisk"),
    ("backend", "Linux blkback, smallest offer", "live-blkback-min"),
    ("frontend", "Linux blkfront", "live-blkfront"),
    ("frontend", "Linux blkfront, smallest offer", "live-blkfront-min"),
    ("frontend", "Linux blkfront, tests that may crash dom0", "live-blkfront-hazards"),
)
REFERENCE_TIMEOUT = 600


def run_reference(project: Path, out: Path, role: str, scope: str = "full") -> Path | None:
    """The same tests of one role against the reference pair, on the host; its report.json."""
    folder = out / f"reference-{role}"
    argv = [sys.executable, "-m", "pytest", "tests/conformance", f"--blkif-role={role}", "-q",
            "-p", "no:cacheprovider", f"--conformance-report={folder}"]  # fmt: skip
    if scope == "quick":
        argv += ["-k", " or ".join(QUICK[role])]
    try:
        run = subprocess.run(argv, cwd=project, capture_output=True, text=True, timeout=REFERENCE_TIMEOUT)
    except subprocess.TimeoutExpired:
        say(f"interop: the reference {role} run took over {REFERENCE_TIMEOUT} s; left out of the matrix")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text(run.stdout + run.stderr)
    report = folder / "report.json"
    return report if report.exists() else None


def build(project: Path, out: Path, *, reference: bool = True, scope: str = "full") -> Path | None:
    """Write OUT/matrix.md and matrix.json from the live reports found; None when there are none."""
    found = [(role, name, out / job / "report.json") for role, name, job in LIVE_COLUMNS
             if (out / job / "report.json").exists()]  # fmt: skip
    if not found:
        return None
    sections, data = [], {}
    for role in ("backend", "frontend"):
        columns = {}
        if reference:
            ref = run_reference(project, out, role, scope) if any(r == role for r, _, _ in found) else None
            if ref is not None:
                columns[f"reference {role}"] = json.loads(ref.read_text())
        columns.update({name: json.loads(path.read_text()) for r, name, path in found if r == role})
        if not any(r == role for r, _, _ in found):
            continue
        m = matrix.build(columns)
        data[role] = m
        sections.append(matrix.markdown(m, f"Interop matrix, {role} role"))
    (out / "matrix.json").write_text(json.dumps(data, indent=2) + "\n")
    path = out / "matrix.md"
    path.write_text("\n".join(sections))
    sizes = ", ".join(f"{role}: {len(m['rows'])} rules" for role, m in data.items())
    say(f"interop: {path} ({sizes})")
    return path
