"""The interop matrix: several conformance reports side by side, rule by rule.

    python -m blkif_spec.matrix --out DIR NAME=report.json [NAME=report.json ...]

Each column is one implementation's `report.json` (the reference, Linux blkback,
QEMU qdisk, Linux blkfront, …). A row is a rule any column exercised; a cell is
the verdict there: `pass`, `FAIL`, `TIMEOUT`, `warn`, `known`, `skip` (the target
did not offer the feature: the reason is in the report), `-` (not exercised),
and for a rule with variants, the variant the implementation showed (a
documented divergence). Writes `matrix.md` and `matrix.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SHOWN = {"fail": "FAIL", "timeout": "TIMEOUT", "error": "ERROR"}


def cell(row: dict[str, Any] | None) -> str:
    if row is None or row["verdict"] == "untested":
        return "-"
    verdict = SHOWN.get(row["verdict"], row["verdict"])
    if row.get("variant") and row["verdict"] in ("pass", "known", "warn"):
        return f"{verdict}: {row['variant']}"
    return verdict


def build(columns: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{columns, rows: [{id, level, summary, cells: {name: cell}}], counts: {name: {verdict: n}}}."""
    by_col = {name: {r["id"]: r for r in data["rules"]} for name, data in columns.items()}
    order = [r["id"] for r in next(iter(columns.values()))["rules"]] if columns else []
    rows, counts = [], {name: {} for name in columns}
    for rid in order:
        found = {name: rules.get(rid) for name, rules in by_col.items()}
        if all(r is None or r["verdict"] == "untested" for r in found.values()):
            continue
        any_row = next(r for r in found.values() if r is not None)
        for name, r in found.items():
            v = "untested" if r is None else r["verdict"]
            counts[name][v] = counts[name].get(v, 0) + 1
        rows.append({"id": rid, "level": any_row["level"], "summary": any_row["summary"],
                     "cells": {name: cell(r) for name, r in found.items()}})  # fmt: skip
    targets = {name: data.get("targets", {}) for name, data in columns.items()}
    return {"columns": list(columns), "targets": targets, "rows": rows, "counts": counts}


def markdown(matrix: dict[str, Any], title: str = "Interop matrix") -> str:
    cols = matrix["columns"]
    lines = [f"# {title}", "", "Cells: verdict per rule (`-` = not exercised; `skip` = feature not offered; "
             "text after a colon = the documented variant seen).", ""]  # fmt: skip
    lines += ["| verdicts | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for v in ("pass", "fail", "timeout", "error", "warn", "known", "skip"):
        lines.append(f"| {v} | " + " | ".join(str(matrix["counts"][c].get(v, 0)) for c in cols) + " |")
    header = "| rule | level | " + " | ".join(cols) + " | summary |"
    lines += ["", header, "|---|---|" + "---|" * (len(cols) + 1)]
    for row in matrix["rows"]:
        cells = " | ".join(row["cells"][c].replace("|", "/") for c in cols)
        lines.append(f"| {row['id']} | {row['level']} | {cells} | {row['summary']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blkif_spec.matrix", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Interop matrix")
    parser.add_argument("columns", nargs="+", metavar="NAME=REPORT")
    args = parser.parse_args(argv)
    columns = {}
    for spec in args.columns:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"{spec!r}: expected NAME=path/to/report.json")
        try:
            columns[name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"matrix: {name}: {path}: {exc}", file=sys.stderr)
            return 2
    matrix = build(columns)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
    (args.out / "matrix.md").write_text(markdown(matrix, args.title))
    print(f"matrix: {len(matrix['rows'])} rules x {len(columns)} implementations -> {args.out}/matrix.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
