"""`python -m tests.faulty.killrate [--json] [NAME ...]`: per faulty implementation, caught or missed.

Prints, for every fault of the catalogue, whether the conformance suite caught
it on a test tagged with the rule it breaks, by which tests and with which
verdict, and the overall kill rate (goal: 100%).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tests.faulty.registry import all_faults
from tests.faulty.selfcheck import run_fault


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faulty.killrate", description=__doc__)
    parser.add_argument("names", nargs="*", help="only these faults (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    faults = [f for f in all_faults() if not args.names or f.name in args.names]
    rows = []
    for fault in faults:
        t0 = time.monotonic()
        out = run_fault(fault)
        rows.append({"name": fault.name, "role": fault.role, "rule": fault.rule, "what": fault.what,
                     "caught": out.caught, "by": out.caught_by,
                     "verdicts": sorted({out.verdicts[n] for n in out.caught_by}),
                     "tests_run": out.ran, "seconds": round(time.monotonic() - t0, 1)})  # fmt: skip
        if not args.json:
            r = rows[-1]
            mark = "caught" if r["caught"] else "MISSED"
            by = ", ".join(n.split("::", 1)[-1] for n in r["by"][:2]) or "-"
            verdicts = "/".join(r["verdicts"])
            print(f"{r['name']:<34} {r['role']:<8} {r['rule']:<9} {mark:<7} {verdicts:<12} {by}", flush=True)
    caught = sum(r["caught"] for r in rows)
    rate = caught / len(rows) if rows else 0.0
    if args.json:
        print(json.dumps({"faults": rows, "caught": caught, "total": len(rows), "kill_rate": rate}, indent=2))
    else:
        print(f"kill rate: {caught}/{len(rows)} = {rate:.0%}")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
